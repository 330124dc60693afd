// The worker's authorization step over the real sandbox bundle. Token signatures are covered by
// jose_test and the integration suite; here identities are built directly.
#include "ehrgate/auth.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace ehrgate::auth {
namespace {

constexpr const char *kPatient = "erXuFYUfucBZaryVksYEcMg3";
constexpr int64_t kNow = 1'800'000'000;

std::shared_ptr<const AuthPolicy> sandbox_policy() {
    policy::ParseResult parsed = policy::load_bundle_file(EHRGATE_SOURCE_DIR "/conf/policy.yaml");
    EXPECT_TRUE(parsed.bundle.has_value());
    auto snapshot = std::make_shared<policy::Snapshot>();
    snapshot->serial = 1;
    snapshot->bundle = std::move(*parsed.bundle);
    std::string error;
    auto compiled = AuthPolicy::compile(snapshot, &error);
    EXPECT_NE(compiled, nullptr) << error;
    return compiled;
}

Identity identity(std::string client, std::string scope, std::string patient = "") {
    Identity id;
    id.client_id = std::move(client);
    id.issuer_id = "sandbox-dev";
    id.subject = "someone";
    id.scope = std::move(scope);
    id.patient = std::move(patient);
    id.jti = "jti-1";
    id.expires_at = kNow + 300;
    id.issued_at = kNow - 10;
    id.has_iat = true;
    return id;
}

Authorization check(const AuthPolicy &policy, const Identity &who, std::string_view method,
                    std::string_view path, std::string_view query = {},
                    const RevocationSet &revocations = {}) {
    Request request;
    request.method = method;
    request.path = path;
    request.query = query;
    request.server_base = "http://127.0.0.1:8080/fhir";
    request.now = kNow;
    return authorize(policy, who, request, revocations);
}

TEST(BearerToken, ParsesTheCredentialAndRefusesEverythingElse) {
    Failure failure;
    EXPECT_EQ(bearer_token("Bearer abc.def.ghi", &failure), "abc.def.ghi");
    EXPECT_EQ(bearer_token("bearer abc.def.ghi  ", &failure), "abc.def.ghi");
    EXPECT_FALSE(bearer_token("Basic dXNlcjpwYXNz", &failure));
    EXPECT_EQ(failure.reason, "not-bearer");
    EXPECT_EQ(failure.bearer_error, "")
        << "RFC 6750 section 3: no error code without a Bearer credential";
    for (const char *bad : {"Bearer", "Bearer    ", "Bearer a b", "Bearer a\"b", "Bearer ==abc"}) {
        EXPECT_FALSE(bearer_token(bad, &failure)) << bad;
        EXPECT_EQ(failure.http_status, 400) << bad;
        EXPECT_EQ(failure.reason, "malformed-authorization") << bad;
    }
}

TEST(IdentityCache, RoundTripsAndRefusesGarbage) {
    Identity original = identity("demo-clinician-app", "user/*.rs", kPatient);
    original.purpose_of_use = {"TREAT", "ETREAT"};
    original.cnf_x5t_s256 = "abc";
    const std::optional<Identity> decoded = decode_identity(encode_identity(original));
    ASSERT_TRUE(decoded);
    EXPECT_EQ(decoded->client_id, original.client_id);
    EXPECT_EQ(decoded->scope, original.scope);
    EXPECT_EQ(decoded->purpose_of_use, original.purpose_of_use);
    EXPECT_EQ(decoded->expires_at, original.expires_at);
    const std::string bytes = encode_identity(original);
    for (size_t cut = 0; cut < bytes.size(); ++cut) {
        EXPECT_FALSE(decode_identity(bytes.substr(0, cut))) << cut;
    }
}

TEST(Authorize, UserScopesReachAnyPatientButOnlyWithTheRightPermission) {
    const auto policy = sandbox_policy();
    const Identity clinician = identity("demo-clinician-app", "user/*.rs");
    EXPECT_EQ(check(*policy, clinician, "GET", "/fhir/Observation", "patient=other").kind,
              Authorization::Kind::Allow);
    const Authorization write = check(*policy, clinician, "POST", "/fhir/Observation");
    EXPECT_EQ(write.kind, Authorization::Kind::Deny);
    EXPECT_EQ(write.failure.http_status, 403);
    EXPECT_EQ(write.failure.bearer_error, "insufficient_scope");
    EXPECT_EQ(write.failure.required_scope, "user/Observation.c");
}

TEST(Authorize, PatientScopesStayInTheCompartment) {
    const auto policy = sandbox_policy();
    const Identity app = identity("demo-patient-app", "patient/*.rs", kPatient);
    const Authorization narrowed =
        check(*policy, app, "GET", "/fhir/Observation", "category=laboratory");
    EXPECT_EQ(narrowed.kind, Authorization::Kind::AllowNarrowed);
    EXPECT_NE(narrowed.narrowed_query.find(kPatient), std::string::npos);
    EXPECT_EQ(check(*policy, app, "GET", std::string("/fhir/Patient/") + kPatient).kind,
              Authorization::Kind::Allow);
    EXPECT_EQ(check(*policy, app, "GET", "/fhir/Patient/someone-else").kind,
              Authorization::Kind::Deny);
    const Authorization by_id = check(*policy, app, "GET", "/fhir/Observation/abc");
    EXPECT_EQ(by_id.kind, Authorization::Kind::AllowCheckResponse);
    EXPECT_EQ(by_id.patient_id, kPatient);
    EXPECT_EQ(check(*policy, app, "HEAD", "/fhir/Observation/abc").failure.reason,
              "patient-head-unverifiable");
    EXPECT_EQ(
        check(*policy, identity("demo-patient-app", "patient/*.rs"), "GET", "/fhir/Observation")
            .failure.reason,
        "no-patient-context");
}

TEST(Authorize, RevokedAndExpiredTokensAreRefused) {
    const auto policy = sandbox_policy();
    const Identity clinician = identity("demo-clinician-app", "user/*.rs");
    protocol::RevocationList list;
    list.jtis = {{"jti-1", kNow + 100}};
    EXPECT_EQ(
        check(*policy, clinician, "GET", "/fhir/Patient/x", {}, RevocationSet(list)).failure.reason,
        "revoked");
    list.jtis = {{"jti-1", kNow - 1}};  // lapsed entry
    EXPECT_EQ(check(*policy, clinician, "GET", "/fhir/Patient/x", {}, RevocationSet(list)).kind,
              Authorization::Kind::Allow);
    list.jtis.clear();
    list.clients = {{"demo-clinician-app", kNow - 5}};  // revoked after this token was issued
    EXPECT_EQ(
        check(*policy, clinician, "GET", "/fhir/Patient/x", {}, RevocationSet(list)).failure.reason,
        "revoked");
    Identity expired = clinician;
    expired.expires_at = kNow;
    EXPECT_EQ(check(*policy, expired, "GET", "/fhir/Patient/x").failure.reason, "expired");
}

TEST(Authorize, CertificateBoundTokensNeedTheirCertificate) {
    const auto policy = sandbox_policy();
    Identity bound = identity("demo-clinician-app", "user/*.rs");
    bound.cnf_x5t_s256 = "bound-thumbprint";
    EXPECT_EQ(check(*policy, bound, "GET", "/fhir/Patient/x").failure.reason,
              "certificate-required");
    ClientCertificate other{"00", "other-thumbprint"};
    Request request;
    request.method = "GET";
    request.path = "/fhir/Patient/x";
    request.certificate = &other;
    request.now = kNow;
    EXPECT_EQ(authorize(*policy, bound, request, {}).failure.reason, "certificate-mismatch");
}

TEST(Authorize, UnknownRoutesAndShapesAreRefusedInTheWorker) {
    const auto policy = sandbox_policy();
    const Identity clinician = identity("demo-clinician-app", "user/*.rs");
    EXPECT_EQ(check(*policy, clinician, "GET", "/other/Patient/x").failure.reason, "no-route");
    EXPECT_EQ(check(*policy, clinician, "GET", "/fhir/Patient/x/y/z/w").failure.reason,
              "unrecognized-fhir-request");
    EXPECT_EQ(check(*policy, clinician, "GET", "/fhir/Patient/x/$everything").failure.reason,
              "interaction-not-supported");
    EXPECT_TRUE(is_public_request(*policy, "GET", "/fhir/metadata"));
    EXPECT_FALSE(is_public_request(*policy, "GET", "/fhir/Patient"));
}

}  // namespace
}  // namespace ehrgate::auth
