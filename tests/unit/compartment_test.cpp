#include "ehrgate/compartment.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <vector>

#include "ehrgate/fhir_request.hpp"

namespace ehrgate::compartment {
namespace {

using namespace std::string_view_literals;
using Kind = Decision::Kind;

constexpr std::string_view kPatient = "123";
constexpr std::string_view kBase = "https://ehr.example/fhir";

struct Case {
    const char *method;
    const char *path;
    const char *query;
    Kind kind;
    std::string_view reason;
    const char *narrowed;  // AllowNarrowed only
};

std::string describe(const Case &c) {
    return std::string(c.method) + " " + c.path + (*c.query ? "?" : "") + c.query;
}

const Case kCases[] = {
    // Patient itself.
    {"GET", "Patient/123", "", Kind::Allow, reason::kInCompartment, ""},
    {"HEAD", "Patient/123", "_format=json", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Patient/123/_history", "", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Patient/123/_history/2", "", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Patient/456", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient/12", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient/1234", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient/456/_history/1", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient", "_id=123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Patient", "_id=123,123&_id=123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Patient", "", Kind::AllowNarrowed, reason::kNarrowed, "_id=123"},
    {"GET", "Patient", "name=smith", Kind::AllowNarrowed, reason::kNarrowed, "name=smith&_id=123"},
    {"GET", "Patient", "_id=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient", "_id=123,456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient", "_id=123&_id=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient", "_id=12", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Patient", "_id:not=123", Kind::Refuse, reason::kModifierNotAllowed, ""},
    {"GET", "Patient", "link=Patient/456", Kind::Refuse, reason::kOtherPatient, ""},
    {"PATCH", "Patient/123", "", Kind::Allow, reason::kInCompartment, ""},
    {"PUT", "Patient/123", "", Kind::CheckRequestBody, reason::kPatientIdInBody, ""},
    {"PUT", "Patient", "_id=123", Kind::CheckRequestBody, reason::kPatientIdInBody, ""},
    {"PUT", "Patient/456", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"PATCH", "Patient/456", "", Kind::Refuse, reason::kOtherPatient, ""},
    {"POST", "Patient", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"DELETE", "Patient/123", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"DELETE", "Patient", "_id=123", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"GET", "Patient/123/$everything", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},

    // Searches anchored on P.
    {"GET", "Observation", "patient=123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "patient=Patient/123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "subject=Patient/123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "subject:Patient=123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "subject=Patient%2F123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "subject=https://ehr.example/fhir/Patient/123", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Observation", "performer=Patient/123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Observation", "patient=123&patient=Patient/123,123", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Observation", "patient=123&code=http://loinc.org|1234-5&_count=10", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Observation", "patient=Patient/123&subject=Group/7", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Condition", "patient=123&clinical-status=active", Kind::Allow, reason::kInCompartment,
     ""},
    {"HEAD", "MedicationRequest", "subject=Patient/123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Immunization", "patient=123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Coverage", "beneficiary=Patient/123", Kind::Allow, reason::kInCompartment, ""},
    {"GET", "Encounter", "patient=123&_include=Encounter:patient", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Observation", "patient=Patient/123&_include=Observation:patient", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Observation", "subject=Patient/123&_include=Observation:subject:Patient", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Patient", "_id=123&_revinclude=Observation:subject", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Patient", "_id=123&_revinclude=Observation:patient", Kind::Allow,
     reason::kInCompartment, ""},
    {"GET", "Patient", "_id=123&_revinclude=Provenance:patient:Patient", Kind::Allow,
     reason::kInCompartment, ""},

    // Searches narrowed to P.
    {"GET", "Observation", "", Kind::AllowNarrowed, reason::kNarrowed, "patient=123"},
    {"GET", "Observation", "code=1234-5", Kind::AllowNarrowed, reason::kNarrowed,
     "code=1234-5&patient=123"},
    // A bare id on a parameter that also targets Group/Device narrows rather than anchors.
    {"GET", "Observation", "subject=123", Kind::AllowNarrowed, reason::kNarrowed,
     "subject=123&patient=123"},
    {"GET", "Observation", "performer=Practitioner/9", Kind::AllowNarrowed, reason::kNarrowed,
     "performer=Practitioner/9&patient=123"},
    {"GET", "Observation", "_include=Observation:patient", Kind::AllowNarrowed, reason::kNarrowed,
     "_include=Observation:patient&patient=123"},
    // Encounter's compartment parameter is `patient`; `subject` does not anchor it.
    {"GET", "Encounter", "subject=Patient/123", Kind::AllowNarrowed, reason::kNarrowed,
     "subject=Patient/123&patient=123"},
    {"GET", "Observation", "code=a&&b=c&", Kind::AllowNarrowed, reason::kNarrowed,
     "code=a&&b=c&&patient=123"},
    {"GET", "Specimen", "", Kind::AllowNarrowed, reason::kNarrowed, "subject=Patient/123"},
    {"GET", "Coverage", "status=active", Kind::AllowNarrowed, reason::kNarrowed,
     "status=active&beneficiary=Patient/123"},
    {"GET", "Appointment", "date=2020", Kind::AllowNarrowed, reason::kNarrowed,
     "date=2020&actor=Patient/123"},
    {"GET", "ResearchSubject", "", Kind::AllowNarrowed, reason::kNarrowed,
     "individual=Patient/123"},
    {"GET", "SupplyRequest", "", Kind::AllowNarrowed, reason::kNarrowed, "subject=Patient/123"},

    // Other patients, however spelled.
    {"GET", "Observation", "patient=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=Patient/456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "subject=Patient/456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=Patient/12", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=Patient/1234", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=123,456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=123%2C456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "patient=123&patient=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "subject=Patient/123,Patient/456", Kind::Refuse, reason::kOtherPatient,
     ""},
    {"GET", "Observation", "patient=%50atient/other", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "subject=Patient%2Fother", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "pat%69ent=other", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "subject:Patient=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"GET", "Observation", "subject=https://ehr.example/fhir/Patient/456", Kind::Refuse,
     reason::kOtherPatient, ""},
    {"GET", "Observation", "subject=other", Kind::Refuse, reason::kAmbiguousReference, ""},
    {"GET", "Observation", "patient=123&performer=other", Kind::Refuse, reason::kAmbiguousReference,
     ""},
    {"GET", "Observation", "patient=http://evil.example/fhir/Patient/123", Kind::Refuse,
     reason::kAbsoluteReference, ""},
    {"GET", "Observation", "patient=https://ehr.example/fhirx/Patient/123", Kind::Refuse,
     reason::kAbsoluteReference, ""},
    {"GET", "Observation", "patient=urn:uuid:0b7d7f2e-1c2b-4c1e-9d59-3c3f0e8b1a11", Kind::Refuse,
     reason::kAbsoluteReference, ""},
    {"GET", "Observation", "patient=Patient/123/_history/1", Kind::Refuse,
     reason::kMalformedReference, ""},
    {"GET", "Observation", "patient=123%5C,456", Kind::Refuse, reason::kMalformedReference, ""},
    {"GET", "Observation", "patient=", Kind::Refuse, reason::kMalformedReference, ""},
    {"GET", "Observation", "patient=123+", Kind::Refuse, reason::kMalformedReference, ""},
    {"GET", "Observation", "subject:Patient=Group/1", Kind::Refuse, reason::kMalformedReference,
     ""},
    {"GET", "Observation", "patient=Foo/1", Kind::Refuse, reason::kMalformedReference, ""},

    // Encoding tricks.
    {"GET", "Observation", "patient=Patient/123%00", Kind::Refuse, reason::kMalformedQuery, ""},
    {"GET", "Observation", "patient=%zz", Kind::Refuse, reason::kMalformedQuery, ""},
    {"GET", "Observation", "patient=12%3", Kind::Refuse, reason::kMalformedQuery, ""},
    {"GET", "Observation", "=123", Kind::Refuse, reason::kMalformedQuery, ""},
    {"GET", "Observation/abc", "x=%", Kind::Refuse, reason::kMalformedQuery, ""},
    {"GET", "Patient", "+_has:Observation:patient:code=1", Kind::Refuse, reason::kMalformedQuery,
     ""},
    {"GET", "Observation", "patient%20=456", Kind::Refuse, reason::kMalformedQuery, ""},

    // Parameters that leave the compartment.
    {"GET", "Observation", "subject:Patient.name=smith", Kind::Refuse, reason::kChainedParameter,
     ""},
    {"GET", "Observation", "patient.name=smith", Kind::Refuse, reason::kChainedParameter, ""},
    {"GET", "Observation", "patient=123&subject.name=x", Kind::Refuse, reason::kChainedParameter,
     ""},
    {"GET", "Observation", "patient=123&performer:Practitioner.name=x", Kind::Refuse,
     reason::kChainedParameter, ""},
    {"GET", "Observation", "patient=123&encounter%2Eclass=x", Kind::Refuse,
     reason::kChainedParameter, ""},
    {"GET", "Patient", "_has:Observation:patient:code=1234-5", Kind::Refuse, reason::kHasParameter,
     ""},
    {"GET", "Observation", "patient=123&_HAS:Encounter:x:y=1", Kind::Refuse, reason::kHasParameter,
     ""},
    {"GET", "Observation", "patient=123&_contained=true", Kind::Refuse, reason::kForbiddenParameter,
     ""},
    {"GET", "Observation", "patient=123&_containedType=contained", Kind::Refuse,
     reason::kForbiddenParameter, ""},
    {"GET", "Observation", "patient=123&_query=everything", Kind::Refuse,
     reason::kForbiddenParameter, ""},
    {"GET", "Observation", "patient=123&_filter=subject+eq+Patient/456", Kind::Refuse,
     reason::kForbiddenParameter, ""},
    {"GET", "Observation", "patient=123&_List=L1", Kind::Refuse, reason::kForbiddenParameter, ""},
    {"GET", "Observation", "patient:missing=true", Kind::Refuse, reason::kModifierNotAllowed, ""},
    {"GET", "Observation", "subject:identifier=urn:x|1", Kind::Refuse, reason::kModifierNotAllowed,
     ""},
    {"GET", "Observation", "patient=123&_include=Observation:performer", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "patient=123&_include:iterate=Observation:patient", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "patient=123&_include=*", Kind::Refuse, reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "patient=123&_include=Encounter:patient", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "patient=123&_include=Observation:patient:Group", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    // Anchored by performer: the included subjects may be other patients.
    {"GET", "Observation", "performer=Patient/123&_include=Observation:patient", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "subject=Patient/123&_include=Observation:patient", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Provenance", "patient=123&_include=Provenance:patient", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Observation", "patient=123&_revinclude=Provenance:target", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Patient", "_id=123&_revinclude=Group:member", Kind::Refuse, reason::kIncludeNotAllowed,
     ""},
    {"GET", "Patient", "_id=123&_revinclude=Provenance:target", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},
    {"GET", "Patient", "_id=123&_include=Patient:link", Kind::Refuse, reason::kIncludeNotAllowed,
     ""},
    {"GET", "Patient", "_id=123&_revinclude:iterate=Observation:subject", Kind::Refuse,
     reason::kIncludeNotAllowed, ""},

    // Instances of member types: checked on the body.
    {"GET", "Observation/abc", "", Kind::CheckResponse, reason::kVerifyResponse, ""},
    {"GET", "Observation/abc/_history/1", "", Kind::CheckResponse, reason::kVerifyResponse, ""},
    {"GET", "Condition/x/_history", "", Kind::CheckResponse, reason::kVerifyResponse, ""},
    {"POST", "Observation", "", Kind::CheckRequestBody, reason::kVerifyRequestBody, ""},
    {"PUT", "Observation/abc", "", Kind::CheckRequestBody, reason::kVerifyRequestBody, ""},
    {"PUT", "Observation", "patient=123&identifier=x", Kind::CheckRequestBody,
     reason::kVerifyRequestBody, ""},
    {"PUT", "Observation", "identifier=x", Kind::Refuse, reason::kWriteNeedsPatient, ""},
    {"PUT", "Observation", "patient=456", Kind::Refuse, reason::kOtherPatient, ""},
    {"DELETE", "Observation", "patient=123&code=x", Kind::Allow, reason::kInCompartment, ""},
    {"DELETE", "Observation", "code=x", Kind::Refuse, reason::kWriteNeedsPatient, ""},
    {"DELETE", "Observation/abc", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"PATCH", "Observation/abc", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"PATCH", "Observation", "patient=123", Kind::Refuse, reason::kInteractionNotAllowed, ""},

    // Other interactions and types.
    {"GET", "metadata", "", Kind::Allow, reason::kCapabilities, ""},
    {"GET", "Medication/abc", "", Kind::Allow, reason::kSharedReferenceData, ""},
    {"GET", "Practitioner/1/_history/2", "", Kind::Allow, reason::kSharedReferenceData, ""},
    {"GET", "Organization/1/_history", "", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"GET", "Practitioner", "name=x", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"PUT", "Medication/abc", "", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"GET", "Questionnaire/1", "", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"GET", "Group/1", "", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"GET", "Group", "member=Patient/123", Kind::Refuse, reason::kTypeNotInCompartment, ""},
    {"POST", "Observation/_search", "", Kind::Refuse, reason::kSearchInBody, ""},
    {"GET", "Observation/_history", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"GET", "", "_type=Observation", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"GET", "_history", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"POST", "", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"GET", "Observation/$lastn", "patient=123", Kind::Refuse, reason::kInteractionNotAllowed, ""},
    {"POST", "$export", "", Kind::Refuse, reason::kInteractionNotAllowed, ""},
};

Decision run(const Case &c, PatientContext context = {kPatient, kBase}) {
    const std::optional<fhir::RequestTargetView> target =
        fhir::classify_view(c.method, c.path, c.query);
    EXPECT_TRUE(target.has_value()) << describe(c);
    if (!target) {
        return {};
    }
    return check(c.method, *target, c.query, context);
}

TEST(CompartmentCheck, DecisionTable) {
    static_assert(std::size(kCases) >= 60);
    for (const Case &c : kCases) {
        const Decision decision = run(c);
        EXPECT_EQ(decision.kind, c.kind) << describe(c) << " reason " << decision.reason;
        EXPECT_EQ(decision.reason, c.reason) << describe(c);
        if (c.kind == Kind::AllowNarrowed) {
            EXPECT_EQ(decision.narrowed_query, c.narrowed) << describe(c);
        } else {
            EXPECT_EQ(decision.narrowed_query, "") << describe(c);
        }
    }
}

TEST(CompartmentCheck, NarrowedQueryIsItselfAnchored) {
    // Feeding a narrowed query back in must give Allow: the narrowing is a real anchor.
    for (const Case &c : kCases) {
        if (c.kind != Kind::AllowNarrowed) {
            continue;
        }
        const Decision first = run(c);
        const Case again{c.method, c.path, first.narrowed_query.c_str(), Kind::Allow, {}, ""};
        EXPECT_EQ(run(again).kind, Kind::Allow) << describe(again);
    }
}

TEST(CompartmentCheck, ChecksCarryReferencePaths) {
    const Decision read = run({"GET", "Observation/abc", "", {}, {}, ""});
    ASSERT_EQ(read.kind, Kind::CheckResponse);
    EXPECT_EQ(
        std::vector<std::string_view>(read.reference_paths.begin(), read.reference_paths.end()),
        (std::vector<std::string_view>{"subject", "performer"}));

    const Decision create = run({"POST", "CarePlan", "", {}, {}, ""});
    ASSERT_EQ(create.kind, Kind::CheckRequestBody);
    EXPECT_EQ(
        std::vector<std::string_view>(create.reference_paths.begin(), create.reference_paths.end()),
        (std::vector<std::string_view>{"subject", "activity.detail.performer"}));

    const Decision patient = run({"PUT", "Patient/123", "", {}, {}, ""});
    EXPECT_TRUE(patient.reference_paths.empty());
}

TEST(CompartmentCheck, InvalidPatientIdRefusesEverything) {
    for (const std::string_view id : {""sv, "a/b"sv, "a b"sv, std::string_view("x\0y", 3)}) {
        const Decision decision = run({"GET", "metadata", "", {}, {}, ""}, {id, kBase});
        EXPECT_EQ(decision.kind, Kind::Refuse);
        EXPECT_EQ(decision.reason, reason::kInvalidPatientId);
    }
}

TEST(CompartmentCheck, AbsoluteReferencesNeedAServerBase) {
    const Case c{"GET", "Observation", "subject=https://ehr.example/fhir/Patient/123", {}, {}, ""};
    EXPECT_EQ(run(c, {kPatient, kBase}).kind, Kind::Allow);
    EXPECT_EQ(run(c, {kPatient, ""}).reason, reason::kAbsoluteReference);
    // The base must be followed by '/', and the rest must be relative.
    EXPECT_EQ(run({"GET", "Observation", "subject=https://ehr.example/fhirPatient/123", {}, {}, ""})
                  .reason,
              reason::kAbsoluteReference);
    EXPECT_EQ(run({"GET",
                   "Observation",
                   "subject=https://ehr.example/fhir/http://x/Patient/123",
                   {},
                   {},
                   ""})
                  .reason,
              reason::kAbsoluteReference);
}

TEST(CompartmentCheck, PatientIdsWithDotsCompareExactly) {
    const PatientContext context{"a.b", kBase};
    EXPECT_EQ(run({"GET", "Patient/a.b", "", {}, {}, ""}, context).kind, Kind::Allow);
    EXPECT_EQ(run({"GET", "Patient/aXb", "", {}, {}, ""}, context).kind, Kind::Refuse);
    EXPECT_EQ(run({"GET", "Observation", "patient=a.b", {}, {}, ""}, context).kind, Kind::Allow);
    EXPECT_EQ(run({"GET", "Observation", "patient=a.bc", {}, {}, ""}, context).kind, Kind::Refuse);
}

TEST(CompartmentMembers, TableIsTheR4PatientCompartment) {
    const std::span<const Member> members = patient_compartment();
    EXPECT_EQ(members.size(), 66u);
    for (const Member &member : members) {
        EXPECT_TRUE(fhir::is_resource_type(member.resource_type)) << member.resource_type;
        EXPECT_FALSE(member.params.empty()) << member.resource_type;
        EXPECT_FALSE(member.reference_paths.empty()) << member.resource_type;
        EXPECT_EQ(find_member(member.resource_type), &member);
        // The narrowing parameter must be one that anchors, or narrowing would not narrow.
        if (member.resource_type != "Patient") {
            const bool anchors = std::find(member.params.begin(), member.params.end(),
                                           member.narrow_param) != member.params.end() ||
                                 (member.patient_alias && member.narrow_param == "patient");
            EXPECT_TRUE(anchors) << member.resource_type;
        }
    }
    EXPECT_EQ(find_member("Medication"), nullptr);
    EXPECT_EQ(find_member("observation"), nullptr);
    EXPECT_EQ(find_member(""), nullptr);
}

TEST(CompartmentMembers, ReferenceParamsAndPaths) {
    const auto list = [](std::span<const std::string_view> span) {
        return std::vector<std::string_view>(span.begin(), span.end());
    };
    using V = std::vector<std::string_view>;
    EXPECT_EQ(list(reference_params("Observation")), (V{"subject", "performer"}));
    EXPECT_EQ(list(reference_paths("Observation")), (V{"subject", "performer"}));
    EXPECT_EQ(list(reference_params("Encounter")), (V{"patient"}));
    EXPECT_EQ(list(reference_paths("Encounter")), (V{"subject"}));
    EXPECT_EQ(list(reference_params("Condition")), (V{"patient", "asserter"}));
    EXPECT_EQ(list(reference_params("MedicationRequest")), (V{"subject"}));
    EXPECT_EQ(list(reference_params("ServiceRequest")), (V{"subject", "performer"}));
    EXPECT_EQ(list(reference_params("Consent")), (V{"patient"}));
    EXPECT_EQ(list(reference_params("AllergyIntolerance")), (V{"patient", "recorder", "asserter"}));
    EXPECT_EQ(list(reference_params("DocumentReference")), (V{"subject", "author"}));
    EXPECT_EQ(list(reference_params("Procedure")), (V{"patient", "performer"}));
    EXPECT_EQ(list(reference_paths("Procedure")), (V{"subject", "performer.actor"}));
    EXPECT_EQ(list(reference_params("Immunization")), (V{"patient"}));
    EXPECT_EQ(list(reference_params("DiagnosticReport")), (V{"subject"}));
    EXPECT_EQ(list(reference_params("CarePlan")), (V{"patient", "performer"}));
    EXPECT_EQ(list(reference_paths("Coverage")),
              (V{"policyHolder", "subscriber", "beneficiary", "payor"}));
    EXPECT_EQ(list(reference_paths("Patient")), (V{"link.other"}));
    EXPECT_TRUE(reference_params("Practitioner").empty());
    EXPECT_TRUE(reference_paths("NoSuchType").empty());
}

TEST(CompartmentMembers, SharedReferenceTypesAreOutsideTheCompartment) {
    EXPECT_EQ(shared_reference_types().size(), 5u);
    for (const std::string_view type : shared_reference_types()) {
        EXPECT_TRUE(fhir::is_resource_type(type)) << type;
        EXPECT_EQ(find_member(type), nullptr) << type;
        EXPECT_TRUE(is_shared_reference_type(type));
    }
    EXPECT_FALSE(is_shared_reference_type("Patient"));
    EXPECT_FALSE(is_shared_reference_type("Device"));
}

TEST(CompartmentQuery, ParseQueryDecodes) {
    using fhir::Query;
    EXPECT_EQ(fhir::parse_query(""), Query{});
    EXPECT_EQ(fhir::parse_query("&&"), Query{});
    EXPECT_EQ(fhir::parse_query("a=1&&b=x+y%2Bz&c&d="),
              (Query{{"a", "1"}, {"b", "x y+z"}, {"c", ""}, {"d", ""}}));
    EXPECT_EQ(fhir::parse_query("pat%69ent=%50atient%2f1"), (Query{{"patient", "Patient/1"}}));
    EXPECT_EQ(fhir::parse_query("a=b=c"), (Query{{"a", "b=c"}}));
    EXPECT_EQ(fhir::parse_query("n=%C3%A9"), (Query{{"n", "\xC3\xA9"}}));
    for (const char *bad :
         {"=1", "a=%", "a=%4", "a=%G1", "%zz=1", "a=%00", "a=%1F", "a=%7F", "a=\x01", "a=1&=2"}) {
        EXPECT_FALSE(fhir::parse_query(bad).has_value()) << bad;
    }
}

TEST(CompartmentQuery, ParseQueryCapsParameterCount) {
    std::string query;
    for (size_t i = 0; i < fhir::kMaxQueryParams; ++i) {
        query += "a=1&";
    }
    EXPECT_TRUE(fhir::parse_query(query).has_value());
    query += "a=1";
    EXPECT_FALSE(fhir::parse_query(query).has_value());
}

}  // namespace
}  // namespace ehrgate::compartment
