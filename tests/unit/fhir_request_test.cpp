#include "ehrgate/fhir_request.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>

namespace ehrgate::fhir {
namespace {

struct Case {
    const char *method;
    const char *path;
    const char *query;
    Interaction interaction;
    const char *resource_type;
    const char *id;
    const char *version_id;
    const char *operation;
    bool conditional;
};

std::string describe(const Case &c) {
    return std::string(c.method) + " [" + c.path + "]" + (*c.query ? "?" : "") + c.query;
}

// Every shape of the FHIR R4 RESTful API the classifier recognizes.
const Case kRecognized[] = {
    {"GET", "Patient/123", "", Interaction::Read, "Patient", "123", "", "", false},
    {"HEAD", "Patient/123", "", Interaction::Read, "Patient", "123", "", "", false},
    {"GET", "Patient/123", "_format=json", Interaction::Read, "Patient", "123", "", "", false},
    {"GET", "Patient/123/_history/2", "", Interaction::VRead, "Patient", "123", "2", "", false},
    {"HEAD", "Observation/a.b-c/_history/v-1.2", "", Interaction::VRead, "Observation", "a.b-c",
     "v-1.2", "", false},
    {"PUT", "Patient/123", "", Interaction::Update, "Patient", "123", "", "", false},
    {"PATCH", "Patient/123", "", Interaction::Patch, "Patient", "123", "", "", false},
    {"DELETE", "Patient/123", "", Interaction::Delete, "Patient", "123", "", "", false},
    {"PUT", "Patient", "identifier=x|1", Interaction::Update, "Patient", "", "", "", true},
    {"PATCH", "Patient", "identifier=x|1", Interaction::Patch, "Patient", "", "", "", true},
    {"DELETE", "Patient", "identifier=x|1", Interaction::Delete, "Patient", "", "", "", true},
    {"GET", "Patient/123/_history", "", Interaction::HistoryInstance, "Patient", "123", "", "",
     false},
    {"GET", "Patient/_history", "_since=2020", Interaction::HistoryType, "Patient", "", "", "",
     false},
    {"GET", "_history", "", Interaction::HistorySystem, "", "", "", "", false},
    {"HEAD", "_history", "", Interaction::HistorySystem, "", "", "", "", false},
    {"POST", "Patient", "", Interaction::Create, "Patient", "", "", "", false},
    {"GET", "Observation", "", Interaction::SearchType, "Observation", "", "", "", false},
    {"GET", "Observation", "code=1234-5", Interaction::SearchType, "Observation", "", "", "",
     false},
    {"HEAD", "Observation", "", Interaction::SearchType, "Observation", "", "", "", false},
    {"POST", "Observation/_search", "", Interaction::SearchType, "Observation", "", "", "", false},
    {"GET", "", "_type=Patient", Interaction::SearchSystem, "", "", "", "", false},
    {"POST", "_search", "", Interaction::SearchSystem, "", "", "", "", false},
    {"GET", "metadata", "", Interaction::Capabilities, "", "", "", "", false},
    {"HEAD", "metadata", "mode=full", Interaction::Capabilities, "", "", "", "", false},
    {"POST", "", "", Interaction::Batch, "", "", "", "", false},
    {"GET", "$export", "", Interaction::OperationSystem, "", "", "", "export", false},
    {"POST", "$export", "", Interaction::OperationSystem, "", "", "", "export", false},
    {"GET", "Patient/$match", "", Interaction::OperationType, "Patient", "", "", "match", false},
    {"POST", "ValueSet/$validate-code", "", Interaction::OperationType, "ValueSet", "", "",
     "validate-code", false},
    {"GET", "Patient/1/$everything", "", Interaction::OperationInstance, "Patient", "1", "",
     "everything", false},
    {"POST", "Patient/1/$meta_add", "", Interaction::OperationInstance, "Patient", "1", "",
     "meta_add", false},
    // Ids are opaque: reserved-looking words are ids when the grammar allows them.
    {"GET", "Patient/metadata", "", Interaction::Read, "Patient", "metadata", "", "", false},
    {"GET", "Patient/...", "", Interaction::Read, "Patient", "...", "", "", false},
};

TEST(FhirClassify, RecognizesEveryShape) {
    for (const Case &c : kRecognized) {
        SCOPED_TRACE(describe(c));
        const std::optional<RequestTarget> target = classify(c.method, c.path, c.query);
        ASSERT_TRUE(target.has_value());
        EXPECT_EQ(target->interaction, c.interaction)
            << interaction_name(target->interaction) << " vs " << interaction_name(c.interaction);
        EXPECT_EQ(target->resource_type, c.resource_type);
        EXPECT_EQ(target->id, c.id);
        EXPECT_EQ(target->version_id, c.version_id);
        EXPECT_EQ(target->operation, c.operation);
        EXPECT_EQ(target->conditional, c.conditional);
    }
}

TEST(FhirClassify, ViewAgreesWithOwningResult) {
    for (const Case &c : kRecognized) {
        SCOPED_TRACE(describe(c));
        const std::string path = c.path;
        const std::optional<RequestTargetView> view = classify_view(c.method, path, c.query);
        ASSERT_TRUE(view.has_value());
        EXPECT_EQ(view->interaction, c.interaction);
        EXPECT_EQ(view->resource_type, c.resource_type);
        EXPECT_EQ(view->id, c.id);
        // The views point into the caller's path: nothing was copied.
        if (!view->id.empty()) {
            EXPECT_GE(view->id.data(), path.data());
            EXPECT_LE(view->id.data() + view->id.size(), path.data() + path.size());
        }
    }
}

TEST(FhirClassify, IdsAreExact) {
    const std::optional<RequestTarget> a = classify("GET", "Patient/12", "");
    const std::optional<RequestTarget> b = classify("GET", "Patient/123", "");
    ASSERT_TRUE(a && b);
    EXPECT_EQ(a->id, "12");
    EXPECT_EQ(b->id, "123");
    EXPECT_NE(*a, *b);
    EXPECT_FALSE(classify("GET", "Patient/12/", ""));
}

TEST(FhirClassify, IdGrammar) {
    EXPECT_TRUE(is_valid_id("a"));
    EXPECT_TRUE(is_valid_id("A-Za-z0-9.-"));
    EXPECT_TRUE(is_valid_id(std::string(64, 'x')));
    EXPECT_FALSE(is_valid_id(""));
    EXPECT_FALSE(is_valid_id(std::string(65, 'x')));
    for (const char *bad : {"a_b", "a b", "a%2Fb", "a/b", "ä", "a:b", "a+b", "$x"}) {
        EXPECT_FALSE(is_valid_id(bad)) << bad;
    }
    EXPECT_TRUE(classify("GET", "Patient/" + std::string(64, 'x'), ""));
    EXPECT_FALSE(classify("GET", "Patient/" + std::string(65, 'x'), ""));
    EXPECT_TRUE(classify("GET", "Patient/1/_history/" + std::string(64, '9'), ""));
    EXPECT_FALSE(classify("GET", "Patient/1/_history/" + std::string(65, '9'), ""));
}

TEST(FhirClassify, RejectsMalformedPaths) {
    const char *const kBad[] = {
        "/Patient",                  // leading slash: the caller strips the base
        "Patient/",                  // trailing slash
        "Patient//123",              // empty segment
        "Patient/123/",              // trailing slash after an id
        "Patient/123/_history/",     // trailing slash after _history
        "Patient/123/_history/2/",   // trailing slash after a version
        "Patient/123/_history/2/x",  // extra segment
        "Patient/123/Observation",   // compartment search: not recognized yet
        "Patient/123/foo",           // unknown instance segment
        "Patient/.",                 // dot segments
        "Patient/..",                //
        "Patient/../Observation",    //
        "Patient/1/_history/..",     //
        "Patient/a%2Fb",             // percent-encoded slash
        "Patient%2F123",             //
        "Patient/a b",               // space
        "Patient/123;x",             // path parameter
        "patient/123",               // resource types are case-sensitive
        "Patients/123",              // unknown type
        "Resource/1",                // abstract types are not endpoints
        "DomainResource/1",          //
        "Foo",                       //
        "Patient/$",                 // empty operation name
        "Patient/$1x",               // operation names start with a letter
        "Patient/$a.b",              //
        "$",                         //
        "Patient/_history/1",        // type history has no further segment
        "_history/1",                //
        "metadata/x",                //
        "_search/x",                 //
        "Patient/_search/x",         //
        "Patient/1/$everything/x",   //
    };
    for (const char *path : kBad) {
        EXPECT_FALSE(classify("GET", path, "")) << path;
        EXPECT_FALSE(classify("POST", path, "")) << path;
        EXPECT_FALSE(classify("PUT", path, "x=1")) << path;
    }
    EXPECT_FALSE(classify("GET", std::string_view("Patient/1\0", 10), ""));  // NUL byte
    EXPECT_FALSE(classify("GET", "a/b/c/d/e/f/g/h", ""));
}

TEST(FhirClassify, RejectsWrongMethodForShape) {
    struct Bad {
        const char *method;
        const char *path;
        const char *query;
    };
    const Bad kBad[] = {
        {"POST", "Patient/123", ""},           // create takes no id
        {"PUT", "Patient", ""},                // conditional update needs search parameters
        {"PATCH", "Patient", ""},              //
        {"DELETE", "Patient", ""},             //
        {"GET", "Patient/_search", ""},        // _search is POST only
        {"GET", "_search", ""},                //
        {"POST", "Patient/123/_history", ""},  //
        {"DELETE", "Patient/123/_history/1", ""},
        {"PUT", "Patient/123/_history/1", ""},
        {"POST", "Patient/_history", ""},
        {"DELETE", "_history", ""},
        {"POST", "metadata", ""},
        {"PUT", "metadata", ""},
        {"PUT", "", ""},
        {"DELETE", "", "x=1"},
        {"GET", "", ""},  // the bare base: no parameters, no search
        {"HEAD", "", ""},
        {"PUT", "$export", ""},
        {"DELETE", "Patient/$match", ""},
        {"PATCH", "Patient/1/$everything", ""},
        {"OPTIONS", "metadata", ""},
        {"TRACE", "Patient/1", ""},
        {"get", "Patient/1", ""},  // methods are case-sensitive
        {"", "Patient/1", ""},
    };
    for (const Bad &b : kBad) {
        EXPECT_FALSE(classify(b.method, b.path, b.query)) << b.method << " " << b.path;
    }
}

TEST(FhirClassify, ResourceTypes) {
    const std::span<const std::string_view> types = resource_types();
    EXPECT_EQ(types.size(), 146u);
    EXPECT_TRUE(std::is_sorted(types.begin(), types.end()));
    for (const std::string_view type : types) {
        EXPECT_TRUE(is_resource_type(type)) << type;
        EXPECT_TRUE(classify("GET", std::string(type) + "/x", "")) << type;
    }
    for (const char *type : {"Patient", "Observation", "AllergyIntolerance", "Account",
                             "VisionPrescription", "MedicinalProductUndesirableEffect"}) {
        EXPECT_TRUE(is_resource_type(type)) << type;
    }
    for (const char *type : {"", "patient", "PATIENT", "Patient ", "Resource", "DomainResource",
                             "MedicationOrder", "DiagnosticOrder", "Aaa", "Zzz"}) {
        EXPECT_FALSE(is_resource_type(type)) << type;
    }
}

TEST(FhirInteraction, NamesRoundTrip) {
    const char *const kNames[] = {"read",           "vread",
                                  "update",         "patch",
                                  "delete",         "history-instance",
                                  "history-type",   "history-system",
                                  "create",         "search-type",
                                  "search-system",  "capabilities",
                                  "batch",          "operation-system",
                                  "operation-type", "operation-instance"};
    static_assert(std::size(kNames) == kInteractionCount);
    for (size_t i = 0; i < kInteractionCount; ++i) {
        const auto interaction = static_cast<Interaction>(i);
        EXPECT_EQ(interaction_name(interaction), kNames[i]);
        EXPECT_EQ(interaction_from_name(kNames[i]), interaction);
    }
    EXPECT_FALSE(interaction_from_name("READ"));
    EXPECT_FALSE(interaction_from_name("search"));
    EXPECT_FALSE(interaction_from_name(""));
    EXPECT_FALSE(interaction_from_name("*"));
}

TEST(FhirInteraction, SystemLevel) {
    for (size_t i = 0; i < kInteractionCount; ++i) {
        const auto interaction = static_cast<Interaction>(i);
        const bool expected =
            interaction == Interaction::HistorySystem || interaction == Interaction::SearchSystem ||
            interaction == Interaction::Capabilities || interaction == Interaction::Batch ||
            interaction == Interaction::OperationSystem;
        EXPECT_EQ(is_system_level(interaction), expected) << interaction_name(interaction);
    }
    // Consistency with classification: system-level targets are exactly those with no type.
    for (const Case &c : kRecognized) {
        EXPECT_EQ(is_system_level(c.interaction), std::string(c.resource_type).empty())
            << describe(c);
    }
}

}  // namespace
}  // namespace ehrgate::fhir
