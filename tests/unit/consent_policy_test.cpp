// The bundle's `consent:` section: parsing with diagnostics, and the snapshot codec.
#include <gtest/gtest.h>

#include "ehrgate/consent.hpp"
#include "ehrgate/msgpack.hpp"
#include "ehrgate/policy.hpp"

namespace ehrgate::policy {
namespace {

const std::string kHead = R"(schema: ehrgate.policy/v1
version: v1
clients:
  - id: clinician
    context: user
    traffic_class: interactive
    purposes: [TREAT, ETREAT]
  - id: app
    context: patient
    traffic_class: interactive
    purposes: [PATRQT]
routes:
  - name: fhir
    prefix: /fhir/
    methods: [GET]
    resources: ["*"]
    interactions: ["*"]
)";  // 17 lines

const std::string kConsent = R"(consent:
  sensitive_labels: [PSY, SUD, ETH]
  explicit_consent_labels: [SUD, ETH]
  purposes:
    - purpose: TREAT
      clients: [clinician]
      access: permit
      withhold: [PSY, SUD, ETH]
    - purpose: PATRQT
      access: consent-required
  break_glass:
    purposes: [ETREAT]
    clients: [clinician]
    users: [Practitioner/er]
)";

std::string dump(const std::vector<Diagnostic> &diagnostics) {
    std::string out;
    for (const Diagnostic &d : diagnostics) {
        out += "\n  " + d.to_string();
    }
    return out;
}

TEST(ConsentPolicy, ParsesTheSection) {
    const ParseResult r = parse_bundle(kHead + kConsent, "t.yaml");
    ASSERT_TRUE(r.bundle) << dump(r.diagnostics);
    const consent::ConsentPolicy &c = r.bundle->consent;
    EXPECT_TRUE(c.enabled);
    EXPECT_EQ(c.sensitive_labels, (std::vector<std::string>{"ETH", "PSY", "SUD"}));
    EXPECT_EQ(c.explicit_consent_labels, (std::vector<std::string>{"ETH", "SUD"}));
    ASSERT_EQ(c.purposes.size(), 2u);
    EXPECT_EQ(c.purposes[0].purpose, "PATRQT");
    EXPECT_EQ(c.purposes[1].access, consent::DefaultAccess::Permit);
    // No fallback given: consent-required, withholding every sensitive label.
    EXPECT_EQ(c.fallback.access, consent::DefaultAccess::ConsentRequired);
    EXPECT_EQ(c.fallback.withhold, c.sensitive_labels);
    EXPECT_EQ(c.break_glass.users, (std::vector<std::string>{"Practitioner/er"}));
}

TEST(ConsentPolicy, AbsentSectionLeavesConsentOff) {
    const ParseResult r = parse_bundle(kHead, "t.yaml");
    ASSERT_TRUE(r.bundle) << dump(r.diagnostics);
    EXPECT_FALSE(r.bundle->consent.enabled);
}

TEST(ConsentPolicy, SnapshotRoundTrip) {
    const ParseResult r = parse_bundle(kHead + kConsent, "t.yaml");
    ASSERT_TRUE(r.bundle);
    Snapshot snapshot{7, bundle_digest(*r.bundle), *r.bundle};
    const std::optional<Snapshot> back = decode_snapshot(encode_snapshot(snapshot));
    ASSERT_TRUE(back);
    EXPECT_EQ(back->bundle.consent, r.bundle->consent);
    EXPECT_EQ(*back, snapshot);
    // Without a consent section the digest is what it was before consent existed: the key is
    // not written at all.
    const ParseResult plain = parse_bundle(kHead, "t.yaml");
    ASSERT_TRUE(plain.bundle);
    EXPECT_EQ(encode_snapshot({1, "", *plain.bundle}).find("consent"), std::string::npos);
    EXPECT_NE(bundle_digest(*plain.bundle), bundle_digest(*r.bundle));
    // policyd's consent-signing JWKS rides along; it is not part of the bundle's digest.
    snapshot.consent_jwks = R"({"keys":[{"kty":"EC","kid":"k1"}]})";
    const std::optional<Snapshot> with_keys = decode_snapshot(encode_snapshot(snapshot));
    ASSERT_TRUE(with_keys);
    EXPECT_EQ(with_keys->consent_jwks, snapshot.consent_jwks);
    EXPECT_EQ(*with_keys, snapshot);
    EXPECT_EQ(bundle_digest(with_keys->bundle), bundle_digest(*r.bundle));
}

TEST(ConsentPolicy, SnapshotDecoderRefusesAPermissiveFallback) {
    ParseResult r = parse_bundle(kHead + kConsent, "t.yaml");
    ASSERT_TRUE(r.bundle);
    r.bundle->consent.fallback.access = consent::DefaultAccess::Permit;
    EXPECT_FALSE(decode_snapshot(encode_snapshot({1, "", *r.bundle})));
    r.bundle->consent.fallback.access = consent::DefaultAccess::ConsentRequired;
    r.bundle->consent.fallback.withhold = {"PSY"};
    EXPECT_FALSE(decode_snapshot(encode_snapshot({1, "", *r.bundle})));
}

struct BadCase {
    std::string yaml;
    int line;
    std::string field;
    std::string message;
};

TEST(ConsentPolicy, ReportsProblemsWithLineAndField) {
    const std::vector<BadCase> cases = {
        {"consent:\n  purposes:\n    - purpose: TRAET\n      access: permit\n", 20,
         "consent.purposes[0].purpose", "did you mean \"TREAT\"?"},
        {"consent:\n  purposes:\n    - purpose: TREAT\n      access: allow\n", 21,
         "consent.purposes[0].access", "expected permit or consent-required"},
        {"consent:\n  purposes:\n    - purpose: TREAT\n      clients: [clinican]\n      access: "
         "permit\n",
         21, "consent.purposes[0].clients[0]", "did you mean \"clinician\"?"},
        {"consent:\n  sensitive_labels: [PSY]\n  fallback:\n    access: permit\n    withhold: "
         "[PSY]\n",
         21, "consent.fallback.access", "must be consent-required"},
        {"consent:\n  sensitive_labels: [PSY, HIV]\n  fallback:\n    access: consent-required\n"
         "    withhold: [PSY]\n",
         21, "consent.fallback", "missing \"HIV\""},
        {"consent:\n  sensitive_labels: [PSY]\n  explicit_consent_labels: [SUD]\n", 20,
         "consent.explicit_consent_labels", "must also be listed in sensitive_labels"},
        {"consent:\n  break_glass:\n    purposes: [TREAT]\n    clients: [clinician]\n", 20,
         "consent.break_glass.purposes[0]", "must be ETREAT or BTG"},
        {"consent:\n  purposes:\n    - purpose: ETREAT\n      access: permit\n", 20,
         "consent.purposes[0].purpose", "consent.break_glass"},
        {"consent:\n  purposes:\n    - purpose: TREAT\n      access: permit\n    - purpose: "
         "TREAT\n      clients: [app]\n      access: permit\n",
         22, "consent.purposes[1].purpose", "second default for purpose \"TREAT\""},
        {"consent:\n  sensitive_labels: [\"P S\"]\n", 19, "consent.sensitive_labels[0]",
         "invalid security label code"},
        {"consent:\n  sensitve_labels: []\n", 19, "consent.sensitve_labels",
         "did you mean \"sensitive_labels\"?"},
    };
    for (const BadCase &c : cases) {
        const ParseResult r = parse_bundle(kHead + c.yaml, "t.yaml");
        EXPECT_FALSE(r.bundle) << c.yaml;
        ASSERT_EQ(r.diagnostics.size(), 1u) << c.yaml << dump(r.diagnostics);
        const Diagnostic &d = r.diagnostics[0];
        EXPECT_EQ(d.line, c.line) << d.to_string();
        EXPECT_EQ(d.field, c.field) << d.to_string();
        EXPECT_NE(d.message.find(c.message), std::string::npos) << d.to_string();
    }
}

TEST(ConsentPolicy, SandboxBundleDefaults) {
    const ParseResult r = load_bundle_file(std::string(EHRGATE_SOURCE_DIR) + "/conf/policy.yaml");
    ASSERT_TRUE(r.bundle) << dump(r.diagnostics);
    const consent::ConsentPolicy &c = r.bundle->consent;
    ASSERT_TRUE(c.enabled);
    const std::vector<std::string> clinician_purposes =
        r.bundle->find_client("demo-clinician-app")->purposes;
    consent::Request treat;
    treat.client_id = "demo-clinician-app";
    treat.patient = "p";
    treat.resource_type = "Condition";
    treat.interaction = "read";
    treat.purpose = "TREAT";
    treat.client_purposes = clinician_purposes;
    const consent::Decision d = consent::decide(c, treat, {});
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, (std::vector<std::string>{"ETH", "HIV", "PSY", "SEX", "SUD"}));
    const std::vector<std::string> app_purposes =
        r.bundle->find_client("demo-patient-app")->purposes;
    consent::Request app = treat;
    app.client_id = "demo-patient-app";
    app.purpose = "PATRQT";
    app.client_purposes = app_purposes;
    EXPECT_EQ(consent::decide(c, app, {}).reason, consent::reason::kConsentRequired);
}

}  // namespace
}  // namespace ehrgate::policy
