#include "ehrgate/redaction.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "ehrgate/json.hpp"
#include "testdata.hpp"

namespace ehrgate::redaction {
namespace {

constexpr std::string_view kIcd10 = "http://hl7.org/fhir/sid/icd-10-cm";
constexpr std::string_view kLoinc = "http://loinc.org";
constexpr std::string_view kSsn = "http://hl7.org/fhir/sid/us-ssn";
constexpr std::string_view kActCode = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

Config sandbox_config() {
    Config config;
    for (int n = 10; n <= 19; ++n) {
        config.inference.push_back({std::string(kIcd10), "F" + std::to_string(n), true, "SUD"});
    }
    config.inference.push_back({std::string(kLoinc), "75622-1", false, "HIV"});
    config.inference.push_back({std::string(kLoinc), "25836-8", false, "HIV"});
    config.masks.push_back({"Patient", "identifier", std::string(kSsn)});
    return config;
}

Request treating() {
    Request request;
    request.withheld = split_labels("PSY,ETH,SUD,HIV,SEX");
    return request;
}

std::string label(std::string_view code) {
    return R"({"system":")" + std::string(kActCode) + R"(","code":")" + std::string(code) + "\"}";
}

std::string observation(std::string_view id, std::string_view patient, std::string_view loinc,
                        std::string_view labels = "") {
    std::string meta =
        labels.empty() ? "" : R"("meta": {"security": [)" + std::string(labels) + "]},\n  ";
    return R"({"resourceType": "Observation", "id": ")" + std::string(id) + "\",\n  " + meta +
           R"("status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": ")" +
           std::string(loinc) +
           R"("}], "text": "caf\u00e9 \"quoted\" é"}, "subject": {"reference": "Patient/)" +
           std::string(patient) +
           R"("}, "valueQuantity": {"value": -1.5e3, "unit": "mg"}, "flag": [true, false, null]})";
}

std::string condition(std::string_view id, std::string_view patient, std::string_view icd) {
    return R"({"resourceType":"Condition","id":")" + std::string(id) +
           R"(","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":")" +
           std::string(icd) + R"("}]},"subject":{"reference":"Patient/)" + std::string(patient) +
           "\"}}";
}

std::string patient(std::string_view id) {
    return R"({"resourceType":"Patient","id":")" + std::string(id) +
           R"(","identifier":[{"system":"http://hl7.org/fhir/sid/us-ssn","value":"123-45-6789"},)"
           R"({"system":"urn:mrn","value":"MRN-1"}],"name":[{"family":"Doe"}]})";
}

std::string entry(const std::string &resource) {
    return "{\n    \"fullUrl\": \"urn:x\",\n    \"resource\": " + resource +
           ",\n    \"search\": {\"mode\": \"match\"}\n  }";
}

std::string bundle(const std::vector<std::string> &resources, bool total = true) {
    std::string out = "{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"searchset\",\n";
    if (total) {
        out += "  \"total\": " + std::to_string(resources.size()) + ",\n";
    }
    out += "  \"link\": [{\"relation\": \"self\", \"url\": \"http://x/fhir/Observation\"}],\n";
    out += "  \"entry\": [\n  ";
    for (size_t i = 0; i < resources.size(); ++i) {
        out += (i ? ",\n  " : "") + entry(resources[i]);
    }
    out += "\n  ],\n  \"meta\": {\"lastUpdated\": \"2024-01-01T00:00:00Z\"}\n}\n";
    return out;
}

std::string mixed_bundle() {
    return bundle({
        observation("o1", "p1", "8480-6"), observation("o2", "p1", "8480-6", label("PSY")),
        condition("c1", "p1", "F11.20"),                // unlabelled SUD
        observation("o3", "p1", "75622-1"),             // unlabelled HIV test
        patient("p1"),                                  // SSN masked
        condition("c2", "p1", "E11.9"),                 // kept
        observation("o4", "p1", "1234-5", label("R")),  // R is not withheld
    });
}

struct Result {
    Status status;
    std::string out;
    std::string reason;
    Counters counters;
    size_t peak = 0;
};

// Feeds `body` cut at the given sizes (cycled), then finishes.
Result run(const Config &config, const Request &request, std::string_view body,
           const std::vector<size_t> &cuts) {
    Redactor redactor(config, request);
    Result result;
    size_t pos = 0, k = 0;
    Status status = Status::Ok;
    while (pos < body.size() && status == Status::Ok) {
        const size_t n =
            std::min(cuts.empty() ? body.size() : cuts[k++ % cuts.size()], body.size() - pos);
        status = redactor.feed(body.substr(pos, n), result.out);
        pos += n;
    }
    if (status == Status::Ok) {
        status = redactor.finish(result.out);
    }
    result.status = status;
    result.reason = std::string(redactor.reason());
    result.counters = redactor.counters();
    result.peak = redactor.peak_memory();
    return result;
}

Result run(std::string_view body, const Request &request = treating()) {
    return run(sandbox_config(), request, body, {});
}

json::Value parse(std::string_view text) {
    json::ParseError error;
    json::Limits limits;
    limits.max_bytes = 64u << 20;
    limits.max_depth = 64;
    std::optional<json::Value> value = json::parse(text, &error, limits);
    EXPECT_TRUE(value.has_value()) << error.message << " at " << error.offset;
    return value ? *value : json::Value();
}

std::vector<std::string> entry_ids(const json::Value &bundle_value) {
    std::vector<std::string> ids;
    const json::Value *entries = bundle_value.find("entry");
    if (entries == nullptr) {
        return ids;
    }
    for (const json::Value &e : *entries->as_array()) {
        ids.push_back(*e.find("resource")->find("id")->as_string());
    }
    return ids;
}

bool equal(const json::Value &a, const json::Value &b) {
    if (a.type() != b.type()) {
        return false;
    }
    switch (a.type()) {
        case json::Value::Type::Null:
            return true;
        case json::Value::Type::Bool:
            return a.as_bool() == b.as_bool();
        case json::Value::Type::Int:
        case json::Value::Type::Double:
            return a.as_double() == b.as_double();
        case json::Value::Type::String:
            return *a.as_string() == *b.as_string();
        case json::Value::Type::Array: {
            const auto &x = *a.as_array(), &y = *b.as_array();
            if (x.size() != y.size()) {
                return false;
            }
            for (size_t i = 0; i < x.size(); ++i) {
                if (!equal(x[i], y[i])) {
                    return false;
                }
            }
            return true;
        }
        case json::Value::Type::Object: {
            const auto &x = *a.as_object(), &y = *b.as_object();
            if (x.size() != y.size()) {
                return false;
            }
            for (const auto &[key, value] : x) {
                const json::Value *other = b.find(key);
                if (other == nullptr || !equal(value, *other)) {
                    return false;
                }
            }
            return true;
        }
    }
    return false;
}

TEST(Redaction, SplitLabels) {
    EXPECT_EQ(split_labels(" PSY, ETH,,SUD "), (std::vector<std::string>{"PSY", "ETH", "SUD"}));
    EXPECT_TRUE(split_labels("").empty());
}

TEST(Redaction, BundleDropsLabelledAndInferredEntriesMasksAndRemovesTotal) {
    const Result result = run(mixed_bundle());
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    const json::Value out = parse(result.out);
    EXPECT_EQ(entry_ids(out), (std::vector<std::string>{"o1", "p1", "c2", "o4"}));
    EXPECT_EQ(out.find("total"), nullptr);
    EXPECT_NE(out.find("link"), nullptr);
    EXPECT_NE(out.find("meta"), nullptr);  // members after the entries are kept
    EXPECT_EQ(result.out.find("PSY"), std::string::npos);
    EXPECT_EQ(result.out.find("F11"), std::string::npos);
    EXPECT_EQ(result.out.find("75622-1"), std::string::npos);
    EXPECT_EQ(result.out.find("123-45-6789"), std::string::npos);
    EXPECT_NE(result.out.find("MRN-1"), std::string::npos);
    EXPECT_EQ(result.counters.resources_removed, 3u);
    EXPECT_EQ(result.counters.resources_masked, 1u);
    EXPECT_EQ(result.counters.elements_removed, 1u);
    // The masked Patient says so.
    const json::Value &masked = (*out.find("entry")->as_array())[1];
    const json::Value *security = masked.find("resource")->find("meta")->find("security");
    ASSERT_NE(security, nullptr);
    EXPECT_EQ(*(*security->as_array())[0].find("code")->as_string(), "REDACTED");
    EXPECT_EQ(*(*security->as_array())[0].find("system")->as_string(), kObligationSystem);
    // Untouched entries are released byte for byte.
    EXPECT_NE(result.out.find(entry(observation("o1", "p1", "8480-6"))), std::string::npos);
}

TEST(Redaction, NothingWithheldKeepsEverythingButTotal) {
    Request open;
    const Result result = run(mixed_bundle(), open);
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    const json::Value out = parse(result.out);
    EXPECT_EQ(entry_ids(out), (std::vector<std::string>{"o1", "o2", "c1", "o3", "p1", "c2", "o4"}));
    EXPECT_EQ(out.find("total"), nullptr);
    EXPECT_EQ(result.counters.resources_removed, 0u);
    EXPECT_EQ(result.counters.resources_masked, 1u);  // the SSN mask is policy, not consent
}

TEST(Redaction, EveryChunkSplitGivesIdenticalOutput) {
    const std::string body = mixed_bundle();
    const Result whole = run(body);
    ASSERT_EQ(whole.status, Status::Ok);
    for (const size_t size : {size_t{1}, size_t{2}, size_t{3}, size_t{7}, size_t{64}}) {
        const Result split = run(sandbox_config(), treating(), body, {size});
        ASSERT_EQ(split.status, Status::Ok) << size;
        EXPECT_EQ(split.out, whole.out) << "chunks of " << size;
    }
    // Every two-piece split.
    for (size_t cut = 1; cut < body.size(); ++cut) {
        const Result split = run(sandbox_config(), treating(), body, {cut, body.size()});
        ASSERT_EQ(split.out, whole.out) << "cut at " << cut;
    }
    std::mt19937 rng(42);
    for (int round = 0; round < 200; ++round) {
        std::vector<size_t> cuts;
        for (int i = 0; i < 50; ++i) {
            cuts.push_back(1 + rng() % 40);
        }
        const Result split = run(sandbox_config(), treating(), body, cuts);
        ASSERT_EQ(split.out, whole.out) << "round " << round;
    }
}

TEST(Redaction, SingleResourceWithheldByLabelOrInference) {
    for (const std::string &body :
         {observation("o2", "p1", "8480-6", label("HIV")), condition("c1", "p1", "F10.20"),
          condition("c1", "p1", "F19"), observation("o3", "p1", "25836-8")}) {
        const Result result = run(body);
        EXPECT_EQ(result.status, Status::Withheld) << body;
        EXPECT_EQ(result.reason, "security-label");
        EXPECT_TRUE(result.out.empty());
    }
    // Not in F10-F19, or not the same system: released.
    for (const std::string &body : {condition("c1", "p1", "F20.9"), condition("c1", "p1", "F1")}) {
        const Result result = run(body);
        EXPECT_EQ(result.status, Status::Ok) << body;
        EXPECT_TRUE(equal(parse(result.out), parse(body)));
    }
}

TEST(Redaction, BundleLabelledItselfIsWithheldBeforeAnyByte) {
    std::string body = bundle({observation("o1", "p1", "1-1")});
    body.replace(body.find("\"type\""), 0, "\"meta\": {\"security\": [" + label("ETH") + "]},");
    const Result result = run(body);
    EXPECT_EQ(result.status, Status::Withheld);
    EXPECT_TRUE(result.out.empty());
}

TEST(Redaction, BundleLabelAfterEntriesCutsTheResponse) {
    std::string body = bundle({observation("o1", "p1", "1-1")});
    body.replace(body.find("\"lastUpdated\""), 0, "\"security\": [" + label("ETH") + "],");
    const Result result = run(body);
    EXPECT_EQ(result.status, Status::Error);
    EXPECT_EQ(result.reason, "late-bundle-label");
}

TEST(Redaction, EmptiedBundleHasNoEntryArray) {
    const Result result = run(bundle({condition("c1", "p1", "F11.20")}));
    ASSERT_EQ(result.status, Status::Ok);
    const json::Value out = parse(result.out);
    EXPECT_EQ(out.find("entry"), nullptr);
    EXPECT_EQ(out.find("total"), nullptr);
    EXPECT_EQ(result.out.find("F11"), std::string::npos);
}

TEST(Redaction, EscapedKeysAndCodesAreRecognized) {
    // "s\u0065curity" is "security" to every JSON parser downstream.
    const std::string body =
        R"({"resourceType":"Observation","id":"x","meta":{"s\u0065curity":[{"code":"H\u0049V"}]},)"
        R"("subject":{"reference":"Patient/p1"}})";
    EXPECT_EQ(run(body).status, Status::Withheld);
}

TEST(Redaction, DuplicateKeysFailClosed) {
    const std::string body =
        R"({"resourceType":"Observation","meta":{"security":[]},"meta":{"security":[{"code":"HIV"}]}})";
    const Result result = run(body);
    EXPECT_NE(result.status, Status::Ok);
    EXPECT_TRUE(result.out.empty());
    const std::string dup_subject =
        R"({"resourceType":"Observation","subject":{"reference":"Patient/p1"},"subject":{"reference":"Patient/p2"}})";
    Request request;
    request.patient_id = "p1";
    const Result subject = run(dup_subject, request);
    EXPECT_EQ(subject.status, Status::Error);
    EXPECT_EQ(subject.reason, "duplicate-key");
    const std::string entry_dup = bundle({R"({"resourceType":"Condition","code":{"coding":[)"
                                          R"({"system":"http://hl7.org/fhir/sid/icd-10-cm",)"
                                          R"("code":"E11","code":"F11.2"}]},"id":"d"})"});
    EXPECT_EQ(run(entry_dup).status, Status::Error);
}

TEST(Redaction, InlineElementLabelsRemoveTheElement) {
    const std::string body =
        R"({"resourceType":"Patient","id":"p1","name":[{"family":"Doe"},{"family":"Secret",)"
        R"("extension":[{"url":")" +
        std::string(kInlineLabelUrl) +
        R"(","valueCoding":{"system":"x","code":"PSY"}}]}],)"
        R"("birthDate":"1970-01-01","_birthDate":{"extension":[{"url":")" +
        std::string(kInlineLabelUrl) + R"(","valueCoding":{"code":"SEX"}}]}})";
    const Result result = run(body);
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    EXPECT_EQ(result.out.find("Secret"), std::string::npos);
    EXPECT_EQ(result.out.find("1970"), std::string::npos);
    EXPECT_EQ(result.counters.resources_masked, 1u);
    const json::Value out = parse(result.out);
    EXPECT_EQ(out.find("name")->as_array()->size(), 1u);
    EXPECT_EQ(*(*out.find("meta")->find("security")->as_array())[0].find("code")->as_string(),
              "REDACTED");
}

TEST(Redaction, MaskedToEmptyArrayDropsTheMember) {
    const std::string body =
        R"({"resourceType":"Patient","id":"p1","meta":{"versionId":"1"},"identifier":[{"system":")" +
        std::string(kSsn) + R"(","value":"1"}],"gender":"male"})";
    const Result result = run(body);
    ASSERT_EQ(result.status, Status::Ok);
    const json::Value out = parse(result.out);
    EXPECT_EQ(out.find("identifier"), nullptr);
    EXPECT_EQ(*out.find("meta")->find("versionId")->as_string(), "1");
    EXPECT_EQ(out.find("meta")->find("security")->as_array()->size(), 1u);
}

TEST(Redaction, PatientCompartment) {
    Request request = treating();
    request.patient_id = "p1";
    request.server_base = "https://gw.example/fhir";
    const Result result = run(
        bundle(
            {observation("o1", "p1", "1-1"), observation("o9", "p2", "1-1"),
             R"({"resourceType":"Practitioner","id":"dr"})",
             R"({"resourceType":"Observation","id":"oa","subject":{"reference":"https://gw.example/fhir/Patient/p1"}})",
             R"({"resourceType":"Observation","id":"ob","subject":{"reference":"https://evil.example/fhir/Patient/p1"}})",
             patient("p2"), patient("p1")}),
        request);
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    EXPECT_EQ(entry_ids(parse(result.out)), (std::vector<std::string>{"o1", "dr", "oa", "p1"}));
    EXPECT_EQ(result.counters.resources_removed, 3u);
    const Result single = run(sandbox_config(), request, observation("o9", "p2", "1-1"), {3});
    EXPECT_EQ(single.status, Status::Withheld);
    EXPECT_EQ(single.reason, "outside-patient-compartment");
    EXPECT_TRUE(single.out.empty());
}

TEST(Redaction, MalformedInputIsCutAtTheFaultyUnit) {
    const std::string good = entry(observation("o1", "p1", "1-1"));
    const std::vector<std::string> faulty_resources = {
        R"({"resourceType":"Observation","id":"BAD1","value":tru})",
        R"({"resourceType":"Observation","id":"BAD1","value":01})",
        R"({"resourceType":"Observation","id":"BAD1","value":"\x"})",
        R"({"resourceType":"Observation","id":"BAD1","value":[1,]})",
        R"({"resourceType":"Observation","id":"BAD1","value":{"a" 1}})",
        R"({"resourceType":"Observation","id":"BAD1","value":[}})",
        "{\"resourceType\":\"Observation\",\"id\":\"BAD1\",\"value\":\"\x01\"}",
        "{\"resourceType\":\"Observation\",\"id\":\"BAD1\",\"value\":\"\xc3\x28\"}",
        "{\"resourceType\":\"Observation\",\"id\":\"BAD1\",\"value\":\"\xed\xa0\x80\"}",
    };
    for (const std::string &faulty : faulty_resources) {
        const std::string body =
            bundle({observation("o1", "p1", "1-1"), faulty, observation("o2", "p1", "1-1")});
        for (const size_t chunk : {size_t{1}, size_t{5}, body.size()}) {
            const Result result = run(sandbox_config(), treating(), body, {chunk});
            EXPECT_EQ(result.status, Status::Error) << faulty;
            EXPECT_EQ(result.out.find("BAD1"), std::string::npos) << faulty;
            EXPECT_EQ(result.out.find("\"o2\""), std::string::npos) << faulty;
        }
    }
    // Truncated anywhere: never Ok, never a complete document.
    const std::string body = mixed_bundle();
    for (size_t cut = 0; cut + 2 < body.size(); cut += 7) {
        const Result result = run(std::string_view(body).substr(0, cut));
        EXPECT_NE(result.status, Status::Ok) << cut;
    }
    for (const std::string bad : {"[]", "\"x\"", "{} {}", "{\"resourceType\":\"Bundle\",}",
                                  "{\"resourceType\":\"Bundle\",\"entry\":[1]}",
                                  "{\"resourceType\":\"Bundle\",\"entry\":[{},]}",
                                  "{\"resourceType\":\"Bundle\",\"entry\":{}}", "{}"}) {
        EXPECT_EQ(run(bad).status, Status::Error) << bad;
    }
}

std::string large_bundle(size_t target_bytes, size_t *entries = nullptr) {
    std::string out = R"({"resourceType":"Bundle","type":"searchset","total":999,"entry":[)";
    size_t n = 0;
    while (out.size() < target_bytes) {
        out += n ? "," : "";
        out += entry(n % 10 == 3 ? condition("c" + std::to_string(n), "p1", "F12.1")
                                 : observation("o" + std::to_string(n), "p1", "8480-6"));
        ++n;
    }
    out += "]}";
    if (entries != nullptr) {
        *entries = n;
    }
    return out;
}

TEST(Redaction, MemoryStaysBoundedOnLargeBundles) {
    size_t entries = 0;
    const std::string body = large_bundle(50u << 20, &entries);
    const Config config = sandbox_config();
    Redactor redactor(config, treating());
    std::string out;
    size_t released = 0;
    for (size_t pos = 0; pos < body.size(); pos += 16384) {
        ASSERT_EQ(redactor.feed(std::string_view(body).substr(pos, 16384), out), Status::Ok);
        released += out.size();
        out.clear();
    }
    ASSERT_EQ(redactor.finish(out), Status::Ok);
    EXPECT_EQ(redactor.counters().resources_removed, (entries + 6) / 10);
    EXPECT_GT(released, 40u << 20);
    EXPECT_LT(redactor.peak_memory(), 64u * 1024);  // small entries: a few buffers of one entry
}

TEST(Redaction, ResourceLargerThanTheCapFailsClosed) {
    Config config = sandbox_config();
    std::string big = R"({"resourceType":"Observation","id":"big","note":[)";
    for (int i = 0; i < 40000; ++i) {
        big += i ? ",{\"text\":\"abcdefghij\"}" : "{\"text\":\"abcdefghij\"}";
    }
    big += "]}";
    ASSERT_GT(big.size(), config.max_held_bytes);
    const Result single = run(config, treating(), big, {4096});
    EXPECT_EQ(single.status, Status::Error);
    EXPECT_EQ(single.reason, "too-large");
    EXPECT_LT(single.peak, size_t{1} << 20);
    const Result in_bundle =
        run(config, treating(), bundle({observation("o1", "p1", "1"), big}), {4096});
    EXPECT_EQ(in_bundle.status, Status::Error);
    EXPECT_EQ(in_bundle.out.find("big"), std::string::npos);
    // Many tokens in few bytes count against the same cap.
    std::string dense = R"({"resourceType":"Observation","id":"d","v":[)";
    for (int i = 0; i < 100000; ++i) {
        dense += i ? ",0" : "0";
    }
    dense += "]}";
    ASSERT_LT(dense.size(), config.max_held_bytes);
    const Result tokens = run(config, treating(), dense, {4096});
    EXPECT_EQ(tokens.status, Status::Error);
    EXPECT_EQ(tokens.reason, "too-large");
    EXPECT_LT(tokens.peak, size_t{1} << 20);
}

// ---- Public test data --------------------------------------------------------------------------

std::filesystem::path testdata() {
    return ehrgate::testing::testdata_dir();
}

std::string slurp(const std::filesystem::path &path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

TEST(RedactionTestdata, R4CoreExamplesPassUnchangedWhenNothingIsWithheld) {
    const std::filesystem::path dir = testdata() / "fhir" / "r4-core";
    if (!std::filesystem::exists(dir)) {
        GTEST_SKIP() << "no test data at " << dir;
    }
    Config config;  // no masks, no inference
    int seen = 0;
    for (const auto &file : std::filesystem::directory_iterator(dir)) {
        if (file.path().extension() != ".json" || file.path().filename().string()[0] == '_') {
            continue;
        }
        const std::string body = slurp(file.path());
        const Result whole = run(config, Request{}, body, {});
        ASSERT_EQ(whole.status, Status::Ok) << file.path() << " " << whole.reason;
        json::Value expected = parse(body);
        const json::Value actual = parse(whole.out);
        if (expected.find("total") != nullptr) {
            continue;  // Bundle.total is always dropped
        }
        EXPECT_TRUE(equal(actual, expected)) << file.path();
        const Result bytes = run(config, Request{}, body, {1});
        EXPECT_EQ(bytes.out, whole.out) << file.path();
        ++seen;
    }
    EXPECT_GT(seen, 20);
}

TEST(RedactionTestdata, TabooLabelledConditionIsWithheldWhenTabooIs) {
    const std::filesystem::path file = testdata() / "fhir" / "r4-core" / "Condition-f202.json";
    if (!std::filesystem::exists(file)) {
        GTEST_SKIP() << "no test data at " << file;
    }
    Request request;
    request.withheld = {"TBOO"};
    EXPECT_EQ(run(sandbox_config(), request, slurp(file), {3}).status, Status::Withheld);
    EXPECT_EQ(run(sandbox_config(), treating(), slurp(file), {3}).status, Status::Ok);
}

TEST(RedactionTestdata, Ds4pInlineLabels) {
    const std::filesystem::path dir = testdata() / "fhir" / "ds4p-ig";
    if (!std::filesystem::exists(dir)) {
        GTEST_SKIP() << "no test data at " << dir;
    }
    // The IG's Patient carries an inline R label on its SSN identifier.
    const std::string patient_body = slurp(dir / "extension-inline-sec-label-patient.json");
    Request restricted;
    restricted.withheld = {"R"};
    const Result result = run(Config{}, restricted, patient_body, {2});
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    EXPECT_EQ(result.out.find("111-22-3333"), std::string::npos);
    EXPECT_NE(result.out.find("1234567"), std::string::npos);
    const json::Value out = parse(result.out);
    const auto &security = *out.find("meta")->find("security")->as_array();
    ASSERT_EQ(security.size(), 2u);
    EXPECT_EQ(*security[0].find("code")->as_string(), "PROCESSINLINELABEL");
    EXPECT_EQ(*security[1].find("code")->as_string(), "REDACTED");
    // Without R withheld the SSN goes only through the policy mask.
    const Result masked = run(sandbox_config(), treating(), patient_body, {1});
    EXPECT_EQ(masked.out.find("111-22-3333"), std::string::npos);
    EXPECT_EQ(
        run(Config{}, treating(), patient_body, {1}).out.find("111-22-3333") == std::string::npos,
        false);
    // Immunization: inline labels on `patient` (UNCERTREL, PATRPT) remove it when withheld.
    const std::string immunization = slurp(dir / "extension-inline-sec-label-immunization.json");
    Request uncertain;
    uncertain.withheld = {"UNCERTREL"};
    const Result imm = run(Config{}, uncertain, immunization, {1});
    ASSERT_EQ(imm.status, Status::Ok);
    EXPECT_EQ(parse(imm.out).find("patient"), nullptr);
    EXPECT_NE(parse(imm.out).find("vaccineCode"), nullptr);
}

TEST(RedactionTestdata, LabelledAndUnlabelledRecordsAreRedactedAlike) {
    // The same SUD diagnosis, once labelled by the EHR and once not.
    const std::string labelled =
        R"({"resourceType":"Condition","id":"l","meta":{"security":[)" + label("SUD") +
        R"(]},"code":{"coding":[{"system":"http://snomed.info/sct","code":"7200002"}]}})";
    const std::string unlabelled = condition("u", "p1", "F10.20");
    const Result result = run(bundle({labelled, unlabelled, condition("k", "p1", "I10")}));
    ASSERT_EQ(result.status, Status::Ok);
    EXPECT_EQ(entry_ids(parse(result.out)), std::vector<std::string>{"k"});
    EXPECT_EQ(result.counters.resources_removed, 2u);
}

}  // namespace
}  // namespace ehrgate::redaction

namespace ehrgate::redaction {
namespace {

TEST(RedactionShapes, BundleWhoseTypeComesLateIsHeldAndJudgedWhole) {
    // resourceType after entry: nothing can stream, the whole Bundle is one unit.
    const std::string body = R"({"entry":[{"resource":)" + condition("c1", "p1", "F11.2") +
                             R"(},{"resource":)" + condition("c2", "p1", "I10") +
                             R"(}],"total":2,"resourceType":"Bundle"})";
    const Config config = sandbox_config();
    Redactor redactor(config, treating());
    std::string out;
    ASSERT_EQ(redactor.feed(body, out), Status::Ok);
    ASSERT_EQ(redactor.finish(out), Status::Ok);
    EXPECT_TRUE(redactor.single_resource());
    EXPECT_TRUE(redactor.complete());
    const json::Value value = parse(out);
    EXPECT_EQ(entry_ids(value), std::vector<std::string>{"c2"});
    EXPECT_EQ(value.find("total"), nullptr);
    EXPECT_EQ(redactor.counters().resources_removed, 1u);
}

TEST(RedactionShapes, NestedBundleEntriesAreJudgedOneByOne) {
    const std::string inner =
        R"({"resourceType":"Bundle","type":"collection","entry":[{"resource":)" +
        condition("n1", "p1", "F11.2") + R"(},{"resource":)" + condition("n2", "p1", "I10") + "}]}";
    const Result result = run(bundle({inner}));
    ASSERT_EQ(result.status, Status::Ok) << result.reason;
    EXPECT_EQ(result.out.find("n1"), std::string::npos);
    EXPECT_NE(result.out.find("n2"), std::string::npos);
}

TEST(RedactionShapes, CompleteAndLastUpdatedAreKnownAtTheEnd) {
    const std::string body =
        R"({"resourceType":"Observation","id":"x","meta":{"lastUpdated":"2025-01-02T03:04:05Z"},)"
        R"("status":"final"}   )";
    const Config config = sandbox_config();
    Redactor redactor(config, treating());
    std::string out;
    ASSERT_EQ(redactor.feed(std::string_view(body).substr(0, 20), out), Status::Ok);
    EXPECT_FALSE(redactor.complete());
    ASSERT_EQ(redactor.feed(std::string_view(body).substr(20), out), Status::Ok);
    EXPECT_TRUE(redactor.complete());  // before finish(): trailing blanks change nothing
    EXPECT_EQ(redactor.last_updated(), "2025-01-02T03:04:05Z");
    EXPECT_EQ(redactor.finish(out), Status::Ok);
    EXPECT_TRUE(equal(parse(out), parse(body)));
}

}  // namespace
}  // namespace ehrgate::redaction
