// The `redaction:` section of the policy bundle: parsing, diagnostics and the snapshot codec.
#include <gtest/gtest.h>

#include "ehrgate/policy.hpp"

namespace ehrgate::policy {
namespace {

constexpr const char *kMinimal = R"(schema: ehrgate.policy/v1
version: v1
clients: []
routes:
  - name: fhir
    prefix: /fhir/
    methods: [GET]
    resources: ["*"]
    interactions: ["*"]
)";

std::string dump(const ParseResult &result) {
    std::string out;
    for (const Diagnostic &d : result.diagnostics) {
        out += "\n  " + d.to_string();
    }
    return out;
}

TEST(RedactionPolicy, SandboxBundleDefault) {
    const ParseResult result =
        load_bundle_file(std::string(EHRGATE_SOURCE_DIR) + "/conf/policy.yaml");
    ASSERT_TRUE(result.bundle) << dump(result);
    const Redaction &redaction = result.bundle->redaction;
    EXPECT_TRUE(redaction.present);
    EXPECT_EQ(redaction.withheld_labels,
              (std::vector<std::string>{"ETH", "HIV", "PSY", "SEX", "SUD"}));  // canonical order
    EXPECT_LT(redaction.engine.max_held_bytes, size_t{1} << 20);
    EXPECT_FALSE(redaction.engine.inference.empty());
    ASSERT_EQ(redaction.engine.masks.size(), 1u);
    EXPECT_EQ(redaction.engine.masks[0].identifier_system, "http://hl7.org/fhir/sid/us-ssn");
    EXPECT_EQ(redaction.withheld_contexts, (std::vector<std::string>{"system", "user"}));
    Snapshot snapshot;
    snapshot.serial = 7;
    snapshot.bundle = *result.bundle;
    const std::optional<Snapshot> decoded = decode_snapshot(encode_snapshot(snapshot));
    ASSERT_TRUE(decoded);
    EXPECT_EQ(decoded->bundle.redaction, redaction);
}

TEST(RedactionPolicy, FullSectionParses) {
    const std::string yaml = std::string(kMinimal) + R"(redaction:
  max_held_bytes: 65536
  withheld_labels: [PSY, HIV]
  allowed_content_types: [application/pdf]
  withheld_contexts: [user]
  inference:
    - {system: http://hl7.org/fhir/sid/icd-10-cm, code_prefix: F10, label: SUD}
    - {system: http://loinc.org, code: 7917-8, label: HIV, display: HIV 1 Ab}
  masks:
    - {resource: Patient, path: identifier, identifier_system: http://hl7.org/fhir/sid/us-ssn}
    - {resource: Patient, path: contact.telecom}
)";
    const ParseResult result = parse_bundle(yaml, "r.yaml");
    ASSERT_TRUE(result.bundle) << dump(result);
    const Redaction &r = result.bundle->redaction;
    EXPECT_EQ(r.engine.max_held_bytes, 65536u);
    ASSERT_EQ(r.engine.inference.size(), 2u);
    EXPECT_TRUE(r.engine.inference[0].prefix);
    EXPECT_FALSE(r.engine.inference[1].prefix);
    EXPECT_EQ(r.engine.inference[1].code, "7917-8");
    EXPECT_EQ(r.allowed_content_types, std::vector<std::string>{"application/pdf"});
    EXPECT_EQ(r.engine.masks[1].path, "contact.telecom");
    EXPECT_EQ(r.withheld_contexts, std::vector<std::string>{"user"});
}

TEST(RedactionPolicy, AbsentSectionKeepsTheDigest) {
    const ParseResult result = parse_bundle(kMinimal, "m.yaml");
    ASSERT_TRUE(result.bundle);
    EXPECT_FALSE(result.bundle->redaction.present);
    Bundle with = *result.bundle;
    with.redaction.present = true;
    EXPECT_NE(bundle_digest(with), bundle_digest(*result.bundle));
}

TEST(RedactionPolicy, DiagnosticsNameFileLineAndField) {
    const std::string yaml = std::string(kMinimal) + R"(redaction:
  max_held_bytes: 10
  withheld_labels: [PSY, "P SY", PSY]
  allowed_content_types: [application/json, Text/HTML]
  inference:
    - {system: http://loinc.org, label: HIV}
    - {system: http://loinc.org, code: "1", code_prefix: "2", label: HIV}
    - {system: http://loinc.org, code: "1", labl: HIV}
  masks:
    - {resource: Patient, path: .identifier}
  extra: 1
  withheld_contexts: [clinician]
)";
    const ParseResult result = parse_bundle(yaml, "bad.yaml");
    ASSERT_FALSE(result.bundle);
    const std::string text = dump(result);
    for (const char *expected : {
             "bad.yaml:11:19: redaction.max_held_bytes: max_held_bytes must be a whole number",
             "bad.yaml:12:26: redaction.withheld_labels[1]: invalid label code \"P SY\"",
             "bad.yaml:12:34: redaction.withheld_labels[2]: duplicate label \"PSY\"",
             "bad.yaml:13:27: redaction.allowed_content_types[0]: JSON is always redacted",
             "bad.yaml:13:45: redaction.allowed_content_types[1]: invalid content type",
             "bad.yaml:15:7: redaction.inference[0]: missing required field \"code\"",
             "redaction.inference[1].code_prefix: give either code or code_prefix, not both",
             "redaction.inference[2].labl: unknown field \"labl\"; did you mean \"label\"?",
             "redaction.masks[0].path: invalid element path \".identifier\"",
             "bad.yaml:20:3: redaction.extra: unknown field \"extra\"",
             "bad.yaml:21:23: redaction.withheld_contexts[0]: unknown context \"clinician\"",
         }) {
        EXPECT_NE(text.find(expected), std::string::npos) << expected << " not in" << text;
    }
}

}  // namespace
}  // namespace ehrgate::policy
