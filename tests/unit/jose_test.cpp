#include "ehrgate/jose.hpp"

#include <gtest/gtest.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "ehrgate/base64url.hpp"
#include "ehrgate/json.hpp"
#include "ehrgate/json_text.hpp"
#include "testdata.hpp"

namespace ehrgate::jose {

// gtest prints enum values as numbers; names make failures readable.
void PrintTo(TokenError error, std::ostream *os) {
    *os << token_error_name(error);
}

namespace {

// ---- Test-only signer ------------------------------------------------------------------------

struct PkeyFree {
    void operator()(EVP_PKEY *pkey) const { EVP_PKEY_free(pkey); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

constexpr int64_t kNow = 1'700'000'000;
constexpr std::string_view kIssuer = "https://idp.example.org";
constexpr std::string_view kAudience = "https://ehr.example.org/fhir";

const EVP_MD *digest_for(Algorithm alg) {
    switch (alg) {
        case Algorithm::RS256:
        case Algorithm::PS256:
        case Algorithm::ES256:
            return EVP_sha256();
        case Algorithm::RS384:
        case Algorithm::PS384:
        case Algorithm::ES384:
            return EVP_sha384();
        default:
            return EVP_sha512();
    }
}

bool is_ec(Algorithm alg) {
    return alg == Algorithm::ES256 || alg == Algorithm::ES384 || alg == Algorithm::ES512;
}

bool is_pss(Algorithm alg) {
    return alg == Algorithm::PS256 || alg == Algorithm::PS384 || alg == Algorithm::PS512;
}

size_t ec_bytes(Algorithm alg) {
    return alg == Algorithm::ES256 ? 32 : alg == Algorithm::ES384 ? 48 : 66;
}

std::string b64(std::string_view bytes) {
    return base64url::encode(bytes);
}

std::string bn_param(EVP_PKEY *pkey, const char *name, size_t width) {
    BIGNUM *bn = nullptr;
    if (EVP_PKEY_get_bn_param(pkey, name, &bn) != 1) {
        ADD_FAILURE() << "EVP_PKEY_get_bn_param(" << name << ") failed";
        return {};
    }
    std::string out(width != 0 ? width : static_cast<size_t>(BN_num_bytes(bn)), '\0');
    BN_bn2binpad(bn, reinterpret_cast<unsigned char *>(out.data()), static_cast<int>(out.size()));
    BN_free(bn);
    return out;
}

struct TestKey {
    PkeyPtr pkey;
    std::string kid;
    std::string crv;  // empty for RSA

    // The public JWK members, without braces, so tests can add or drop members.
    std::string members() const {
        if (crv.empty()) {
            return R"("kty":"RSA","n":)" + json::quote(b64(bn_param(pkey.get(), "n", 0))) +
                   R"(,"e":)" + json::quote(b64(bn_param(pkey.get(), "e", 0)));
        }
        const size_t width = crv == "P-256" ? 32 : crv == "P-384" ? 48 : 66;
        return R"("kty":"EC","crv":)" + json::quote(crv) + R"(,"x":)" +
               json::quote(b64(bn_param(pkey.get(), OSSL_PKEY_PARAM_EC_PUB_X, width))) +
               R"(,"y":)" + json::quote(b64(bn_param(pkey.get(), OSSL_PKEY_PARAM_EC_PUB_Y, width)));
    }

    std::string jwk(std::string_view extra = "") const {
        std::string out = "{" + members();
        if (!kid.empty()) {
            out += R"(,"kid":)" + json::quote(kid);
        }
        if (!extra.empty()) {
            out += ",";
            out += extra;
        }
        return out + "}";
    }
};

TestKey generate_rsa(std::string kid, size_t bits = 2048) {
    PkeyPtr pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", bits));
    EXPECT_NE(pkey, nullptr);
    return {std::move(pkey), std::move(kid), ""};
}

TestKey generate_ec(std::string kid, const char *crv) {
    PkeyPtr pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", crv));
    EXPECT_NE(pkey, nullptr);
    return {std::move(pkey), std::move(kid), crv};
}

// JWS signature over `input`: PKCS#1 v1.5, PSS (salt = hash length) or raw r || s.
std::string sign(EVP_PKEY *pkey, Algorithm alg, std::string_view input) {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    EVP_PKEY_CTX *pctx = nullptr;
    const EVP_MD *md = digest_for(alg);
    EXPECT_EQ(EVP_DigestSignInit(ctx.get(), &pctx, md, nullptr, pkey), 1);
    if (is_pss(alg)) {
        EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING), 1);
        EXPECT_EQ(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST), 1);
        EXPECT_EQ(EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, md), 1);
    }
    const auto *data = reinterpret_cast<const unsigned char *>(input.data());
    size_t length = 0;
    EXPECT_EQ(EVP_DigestSign(ctx.get(), nullptr, &length, data, input.size()), 1);
    std::string signature(length, '\0');
    EXPECT_EQ(EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char *>(signature.data()),
                             &length, data, input.size()),
              1);
    signature.resize(length);
    if (!is_ec(alg)) {
        return signature;
    }
    const auto *der = reinterpret_cast<const unsigned char *>(signature.data());
    ECDSA_SIG *ecdsa = d2i_ECDSA_SIG(nullptr, &der, static_cast<long>(signature.size()));
    EXPECT_NE(ecdsa, nullptr);
    const size_t width = ec_bytes(alg);
    std::string raw(2 * width, '\0');
    auto *out = reinterpret_cast<unsigned char *>(raw.data());
    BN_bn2binpad(ECDSA_SIG_get0_r(ecdsa), out, static_cast<int>(width));
    BN_bn2binpad(ECDSA_SIG_get0_s(ecdsa), out + width, static_cast<int>(width));
    ECDSA_SIG_free(ecdsa);
    return raw;
}

std::string header_json(Algorithm alg, std::string_view kid, std::string_view extra = "") {
    std::string out = R"({"alg":")" + std::string(algorithm_name(alg)) + R"(","typ":"JWT")";
    if (!kid.empty()) {
        out += R"(,"kid":)" + json::quote(kid);
    }
    if (!extra.empty()) {
        out += ",";
        out += extra;
    }
    return out + "}";
}

// Token with arbitrary header and payload bytes, signed as `alg`.
std::string make_token(std::string_view header, std::string_view payload, EVP_PKEY *pkey,
                       Algorithm alg) {
    const std::string input = b64(header) + "." + b64(payload);
    return input + "." + b64(sign(pkey, alg, input));
}

std::string claims_json(std::string_view overrides = "", std::string_view drop = "") {
    std::vector<std::pair<std::string, std::string>> members = {
        {"iss", json::quote(kIssuer)},
        {"sub", R"("user-17")"},
        {"aud", json::quote(kAudience)},
        {"exp", std::to_string(kNow + 300)},
        {"nbf", std::to_string(kNow - 10)},
        {"iat", std::to_string(kNow - 10)},
        {"jti", R"("jti-1")"},
        {"client_id", R"("ward-app")"},
        {"scope", R"("patient/Observation.rs launch/patient")"},
        {"patient", R"("Patient/123")"},
        {"fhirUser", R"("Practitioner/9")"},
        {"purpose_of_use", R"("TREAT")"},
        {"cnf", R"({"x5t#S256":"bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"})"},
    };
    std::string out = "{";
    if (!overrides.empty()) {
        // Overrides replace members by name (a repeated member would be refused); they are kept
        // as raw text so unusual spellings (1e3, 1.5) reach the token unchanged.
        const std::optional<json::Value> parsed =
            json::parse("{" + std::string(overrides) + "}", nullptr);
        EXPECT_TRUE(parsed.has_value()) << overrides;
        for (const auto &member : *parsed->as_object()) {
            std::erase_if(members, [&](const auto &m) { return m.first == member.first; });
        }
        out += overrides;
    }
    for (const auto &[key, value] : members) {
        if (drop.find("," + key + ",") != std::string_view::npos) {
            continue;
        }
        if (out.size() > 1) {
            out += ",";
        }
        out += json::quote(key) + ":" + value;
    }
    return out + "}";
}

KeySet parse_keys(const std::string &jwks) {
    std::string error;
    std::optional<KeySet> keys = KeySet::parse(jwks, &error);
    EXPECT_TRUE(keys.has_value()) << error << "\n" << jwks;
    return keys ? *keys : KeySet();
}

std::string parse_keys_error(const std::string &jwks) {
    std::string error;
    const std::optional<KeySet> keys = KeySet::parse(jwks, &error);
    EXPECT_FALSE(keys.has_value()) << jwks;
    EXPECT_FALSE(error.empty());
    return error;
}

// ---- Fixture: keys generated once per run ----------------------------------------------------

class JoseTest : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        keys_ = new Keys{generate_rsa("rsa-1"),          generate_rsa("rsa-2"),
                         generate_ec("ec-256", "P-256"), generate_ec("ec-384", "P-384"),
                         generate_ec("ec-521", "P-521"), generate_ec("stranger", "P-256")};
    }
    static void TearDownTestSuite() {
        delete keys_;
        keys_ = nullptr;
    }

    struct Keys {
        TestKey rsa;
        TestKey rsa2;
        TestKey p256;
        TestKey p384;
        TestKey p521;
        TestKey stranger;  // never in the JWKS
    };
    static Keys *keys_;

    static const TestKey &key_for(Algorithm alg) {
        switch (alg) {
            case Algorithm::ES256:
                return keys_->p256;
            case Algorithm::ES384:
                return keys_->p384;
            case Algorithm::ES512:
                return keys_->p521;
            default:
                return keys_->rsa;
        }
    }

    static std::string jwks() {
        return R"({"keys":[)" + keys_->rsa.jwk() + "," + keys_->rsa2.jwk() + "," +
               keys_->p256.jwk() + "," + keys_->p384.jwk() + "," + keys_->p521.jwk() + "]}";
    }

    static VerifyOptions options() {
        VerifyOptions o;
        o.allowed_algorithms.assign(kAllAlgorithms.begin(), kAllAlgorithms.end());
        o.issuer = kIssuer;
        o.audience = kAudience;
        o.now = kNow;
        return o;
    }

    void SetUp() override { keyset_ = parse_keys(jwks()); }

    // A token for `alg`, with the standard claims unless told otherwise, signed by the matching
    // key and naming its kid.
    std::string token(Algorithm alg, std::string_view claims = "", std::string_view header = "") {
        const TestKey &key = key_for(alg);
        return make_token(header.empty() ? header_json(alg, key.kid) : header,
                          claims.empty() ? claims_json() : claims, key.pkey.get(), alg);
    }

    TokenError verify(std::string_view compact, const VerifyOptions &o) {
        return verify_jwt(compact, keyset_, o).error;
    }
    TokenError verify(std::string_view compact) { return verify(compact, options()); }

    KeySet keyset_;
};

JoseTest::Keys *JoseTest::keys_ = nullptr;

// ---- Happy paths -----------------------------------------------------------------------------

TEST_F(JoseTest, AllNineAlgorithmsVerify) {
    for (const Algorithm alg : kAllAlgorithms) {
        SCOPED_TRACE(algorithm_name(alg));
        const VerifyResult result = verify_jwt(token(alg), keyset_, options());
        EXPECT_EQ(result.error, TokenError::None);
        EXPECT_TRUE(result.ok());
        EXPECT_EQ(result.alg, alg);
        EXPECT_EQ(result.kid, key_for(alg).kid);
        EXPECT_EQ(verify_signature_only(token(alg), keyset_, kAllAlgorithms), TokenError::None);
    }
}

TEST_F(JoseTest, ClaimsAreExtracted) {
    const VerifyResult result = verify_jwt(token(Algorithm::ES256), keyset_, options());
    ASSERT_EQ(result.error, TokenError::None);
    const Claims &c = result.claims;
    EXPECT_EQ(c.iss, kIssuer);
    EXPECT_EQ(c.sub, "user-17");
    EXPECT_EQ(c.aud, std::vector<std::string>{std::string(kAudience)});
    EXPECT_EQ(c.exp, kNow + 300);
    EXPECT_EQ(c.nbf, kNow - 10);
    EXPECT_EQ(c.iat, kNow - 10);
    EXPECT_EQ(c.jti, "jti-1");
    EXPECT_EQ(c.client_id, "ward-app");
    EXPECT_EQ(c.scope, "patient/Observation.rs launch/patient");
    EXPECT_EQ(c.patient, "Patient/123");
    EXPECT_EQ(c.fhir_user, "Practitioner/9");
    EXPECT_EQ(c.purpose_of_use, std::vector<std::string>{"TREAT"});
    EXPECT_EQ(c.cnf_x5t_s256, "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2");
}

TEST_F(JoseTest, OptionalClaimsMayBeAbsent) {
    const std::string minimal = "{\"iss\":" + json::quote(kIssuer) +
                                ",\"aud\":" + json::quote(kAudience) +
                                ",\"exp\":" + std::to_string(kNow + 1) + "}";
    const VerifyResult result = verify_jwt(token(Algorithm::RS256, minimal), keyset_, options());
    ASSERT_EQ(result.error, TokenError::None);
    EXPECT_EQ(result.claims.nbf, std::nullopt);
    EXPECT_EQ(result.claims.iat, std::nullopt);
    EXPECT_TRUE(result.claims.sub.empty());
    EXPECT_TRUE(result.claims.scope.empty());
    EXPECT_TRUE(result.claims.purpose_of_use.empty());
    EXPECT_TRUE(result.claims.cnf_x5t_s256.empty());
}

TEST_F(JoseTest, ClientIdFallsBackToAzp) {
    const VerifyResult azp =
        verify_jwt(token(Algorithm::ES384, claims_json(R"("azp":"from-azp")", ",client_id,")),
                   keyset_, options());
    ASSERT_EQ(azp.error, TokenError::None);
    EXPECT_EQ(azp.claims.client_id, "from-azp");
    const VerifyResult both =
        verify_jwt(token(Algorithm::ES384, claims_json(R"("azp":"from-azp")")), keyset_, options());
    ASSERT_EQ(both.error, TokenError::None);
    EXPECT_EQ(both.claims.client_id, "ward-app");
}

TEST_F(JoseTest, AudienceArrayAndPurposeList) {
    const std::string claims =
        claims_json(R"("aud":["https://other.example",")" + std::string(kAudience) +
                    R"("],"purpose_of_use":["TREAT","ETREAT"])");
    const VerifyResult result = verify_jwt(token(Algorithm::PS256, claims), keyset_, options());
    ASSERT_EQ(result.error, TokenError::None);
    EXPECT_EQ(result.claims.aud.size(), 2u);
    EXPECT_EQ(result.claims.purpose_of_use, (std::vector<std::string>{"TREAT", "ETREAT"}));
}

TEST_F(JoseTest, KidlessTokensTryKeysOfTheRightFamily) {
    for (const Algorithm alg : kAllAlgorithms) {
        SCOPED_TRACE(algorithm_name(alg));
        const std::string compact =
            make_token(header_json(alg, ""), claims_json(), key_for(alg).pkey.get(), alg);
        const VerifyResult result = verify_jwt(compact, keyset_, options());
        EXPECT_EQ(result.error, TokenError::None);
        EXPECT_TRUE(result.kid.empty());
    }
    // The second RSA key of the set signs: the verifier must not stop at the first RSA key.
    const std::string second = make_token(header_json(Algorithm::RS512, ""), claims_json(),
                                          keys_->rsa2.pkey.get(), Algorithm::RS512);
    EXPECT_EQ(verify(second), TokenError::None);
    // A kid-less token from a key outside the set is a bad signature, not an unknown key.
    const std::string stranger = make_token(header_json(Algorithm::ES256, ""), claims_json(),
                                            keys_->stranger.pkey.get(), Algorithm::ES256);
    EXPECT_EQ(verify(stranger), TokenError::BadSignature);
}

TEST_F(JoseTest, AcceptedTypValues) {
    for (const char *typ : {"JWT", "jwt", "at+jwt", "AT+JWT", "application/jwt",
                            "application/at+jwt", "Application/JWT"}) {
        SCOPED_TRACE(typ);
        const std::string header =
            R"({"alg":"ES256","kid":"ec-256","typ":)" + json::quote(typ) + "}";
        EXPECT_EQ(verify(token(Algorithm::ES256, "", header)), TokenError::None);
    }
    EXPECT_EQ(verify(token(Algorithm::ES256, "", R"({"alg":"ES256","kid":"ec-256"})")),
              TokenError::None);
}

TEST_F(JoseTest, UnknownHeaderMembersAreIgnored) {
    const std::string header =
        R"({"alg":"RS256","kid":"rsa-1","x5t#S256":"abc","cty":"JWT","custom":{"a":[1]}})";
    EXPECT_EQ(verify(token(Algorithm::RS256, "", header)), TokenError::None);
}

TEST_F(JoseTest, KeySetCopiesShareKeys) {
    const KeySet copy = keyset_;  // NOLINT(performance-unnecessary-copy-initialization)
    EXPECT_EQ(copy.size(), 5u);
    EXPECT_EQ(&copy.impl(), &keyset_.impl());
    EXPECT_EQ(verify_jwt(token(Algorithm::ES512), copy, options()).error, TokenError::None);
    EXPECT_EQ(verify_jwt(token(Algorithm::ES512), KeySet(), options()).error,
              TokenError::UnknownKey);
}

TEST_F(JoseTest, ThreadsShareOneKeySet) {
    // KeySet is immutable after parse: concurrent verifications copy the same per-key templates.
    std::vector<std::string> tokens;
    for (const Algorithm alg : kAllAlgorithms) {
        tokens.push_back(token(alg));
    }
    const KeySet shared = keyset_;
    const VerifyOptions o = options();
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 60; ++i) {
                const std::string &compact = tokens[static_cast<size_t>(t + i) % tokens.size()];
                if (verify_jwt(compact, shared, o).error != TokenError::None) {
                    ++failures;
                }
            }
        });
    }
    for (std::thread &thread : threads) {
        thread.join();
    }
    EXPECT_EQ(failures.load(), 0);
}

// ---- alg and header rejections ---------------------------------------------------------------

TEST_F(JoseTest, AlgNoneInAnyCase) {
    for (const char *alg : {"none", "None", "NONE", "nOnE"}) {
        SCOPED_TRACE(alg);
        const std::string unsecured =
            b64(std::string(R"({"alg":")") + alg + R"("})") + "." + b64(claims_json()) + ".";
        EXPECT_EQ(verify(unsecured), TokenError::AlgNone);
        // With something in the signature slot too.
        const std::string with_sig = unsecured + b64("whatever");
        EXPECT_EQ(verify(with_sig), TokenError::AlgNone);
        EXPECT_EQ(verify_signature_only(with_sig, keyset_, kAllAlgorithms), TokenError::AlgNone);
    }
}

TEST_F(JoseTest, SymmetricAlgorithmsAreNeverAccepted) {
    // The classic confusion attack: HMAC keyed with the bytes of the server's public key.
    const std::string public_jwk = keys_->rsa.jwk();
    for (const auto &[name, md] :
         {std::pair{"HS256", EVP_sha256()}, std::pair{"HS384", EVP_sha384()},
          std::pair{"HS512", EVP_sha512()}}) {
        SCOPED_TRACE(name);
        const std::string input = b64(std::string(R"({"alg":")") + name + R"(","kid":"rsa-1"})") +
                                  "." + b64(claims_json());
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int mac_length = 0;
        HMAC(md, public_jwk.data(), static_cast<int>(public_jwk.size()),
             reinterpret_cast<const unsigned char *>(input.data()), input.size(), mac, &mac_length);
        const std::string compact =
            input + "." + b64(std::string_view(reinterpret_cast<char *>(mac), mac_length));
        EXPECT_EQ(verify(compact), TokenError::AlgNotAllowed);
    }
}

TEST_F(JoseTest, AlgOutsideTheAllowList) {
    VerifyOptions only_es256 = options();
    only_es256.allowed_algorithms = {Algorithm::ES256};
    EXPECT_EQ(verify(token(Algorithm::ES256), only_es256), TokenError::None);
    EXPECT_EQ(verify(token(Algorithm::RS256), only_es256), TokenError::AlgNotAllowed);
    EXPECT_EQ(verify(token(Algorithm::ES384), only_es256), TokenError::AlgNotAllowed);
    VerifyOptions nothing = options();
    nothing.allowed_algorithms.clear();
    EXPECT_EQ(verify(token(Algorithm::ES256), nothing), TokenError::AlgNotAllowed);
    // Names are case-sensitive, and unknown algorithms are not allowed.
    for (const char *alg : {"rs256", "Es256", "EdDSA", "RS1", "ES256K", "PS256 ", ""}) {
        SCOPED_TRACE(alg);
        const std::string header = R"({"alg":)" + json::quote(alg) + R"(,"kid":"rsa-1"})";
        EXPECT_EQ(verify(token(Algorithm::RS256, "", header)), TokenError::AlgNotAllowed);
    }
    EXPECT_EQ(algorithm_from_name("HS256"), std::nullopt);
    EXPECT_EQ(algorithm_from_name("none"), std::nullopt);
    for (const Algorithm alg : kAllAlgorithms) {
        EXPECT_EQ(algorithm_from_name(algorithm_name(alg)), alg);
    }
}

TEST_F(JoseTest, HeadersThatChooseTheirOwnKeyAreForbidden) {
    const std::string embedded = keys_->stranger.jwk();
    for (const std::string &extra :
         {R"("jwk":)" + embedded, std::string(R"("jku":"https://evil.example/jwks")"),
          std::string(R"("x5u":"https://evil.example/cert.pem")"),
          std::string(R"("x5c":["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"])"),
          std::string(R"("jwk":null)")}) {
        SCOPED_TRACE(extra);
        // Signed by the embedded key and by the real one: both refused.
        const std::string header = header_json(Algorithm::ES256, "ec-256", extra);
        EXPECT_EQ(
            verify(make_token(header, claims_json(), keys_->stranger.pkey.get(), Algorithm::ES256)),
            TokenError::ForbiddenHeader);
        EXPECT_EQ(verify(token(Algorithm::ES256, "", header)), TokenError::ForbiddenHeader);
    }
}

TEST_F(JoseTest, CritIsAlwaysRefused) {
    for (const char *crit : {R"(["exp"])", R"(["b64"])", "[]", R"("exp")", "null", "[1]"}) {
        SCOPED_TRACE(crit);
        const std::string header = header_json(Algorithm::RS256, "rsa-1",
                                               std::string(R"("exp":1,"b64":true,"crit":)") + crit);
        EXPECT_EQ(verify(token(Algorithm::RS256, "", header)), TokenError::UnknownCrit);
    }
}

TEST_F(JoseTest, BadTyp) {
    for (const char *typ : {R"("JWS")", R"("jwt+foo")", R"("application/")", R"("")",
                            R"("application/jose")", R"("JWT ")", "5", "null", R"(["JWT"])"}) {
        SCOPED_TRACE(typ);
        const std::string header =
            std::string(R"({"alg":"ES256","kid":"ec-256","typ":)") + typ + "}";
        EXPECT_EQ(verify(token(Algorithm::ES256, "", header)), TokenError::BadTyp);
    }
}

TEST_F(JoseTest, BadHeaderMembers) {
    EXPECT_EQ(verify(token(Algorithm::ES256, "", R"({"kid":"ec-256"})")), TokenError::BadHeader);
    EXPECT_EQ(verify(token(Algorithm::ES256, "", R"({"alg":null,"kid":"ec-256"})")),
              TokenError::BadHeader);
    EXPECT_EQ(verify(token(Algorithm::ES256, "", R"({"alg":["ES256"]})")), TokenError::BadHeader);
    EXPECT_EQ(verify(token(Algorithm::ES256, "", R"({"alg":"ES256","kid":7})")),
              TokenError::BadHeader);
}

TEST_F(JoseTest, HeaderNotJsonOrNotAnObject) {
    for (const char *header :
         {"not json", R"(["alg","ES256"])", R"("ES256")", "", R"({"alg":"ES256")",
          R"({"alg":"ES256"} )"
          "x",
          "{\"alg\":\"ES\xff\"}", "\xef\xbb\xbf{\"alg\":\"ES256\"}"}) {
        SCOPED_TRACE(header);
        const std::string compact = b64(header) + "." + b64(claims_json()) + "." + b64("sig");
        EXPECT_EQ(verify(compact), std::string_view(header).empty() ? TokenError::Malformed
                                                                    : TokenError::HeaderNotJson);
    }
}

TEST_F(JoseTest, DuplicateHeaderMembers) {
    for (const char *header :
         {R"({"alg":"ES256","alg":"none"})", R"({"alg":"ES256","al\u0067":"ES256"})",
          R"({"alg":"ES256","kid":"ec-256","kid":"rsa-1"})"}) {
        SCOPED_TRACE(header);
        EXPECT_EQ(verify(token(Algorithm::ES256, "", header)), TokenError::DuplicateKey);
    }
}

// ---- Structure and size ----------------------------------------------------------------------

TEST_F(JoseTest, StructureMustBeThreeNonEmptySegments) {
    const std::string good = token(Algorithm::ES256);
    const size_t dot1 = good.find('.');
    const size_t dot2 = good.find('.', dot1 + 1);
    const std::string header = good.substr(0, dot1);
    const std::string payload = good.substr(dot1 + 1, dot2 - dot1 - 1);
    const std::string signature = good.substr(dot2 + 1);
    for (const std::string &compact :
         {std::string(), std::string("."), std::string(".."), std::string("..."),
          header + "." + payload, header + "." + payload + "." + signature + ".",
          header + "." + payload + "." + signature + "." + signature + "." + signature,
          "." + payload + "." + signature, header + ".." + signature, header + "." + payload + ".",
          header, std::string("abc")}) {
        SCOPED_TRACE(compact);
        EXPECT_EQ(verify(compact), TokenError::Malformed);
    }
}

TEST_F(JoseTest, SizeIsCheckedBeforeAnythingElse) {
    VerifyOptions o = options();
    const std::string good = token(Algorithm::ES256);
    o.max_token_bytes = good.size();
    EXPECT_EQ(verify(good, o), TokenError::None);
    o.max_token_bytes = good.size() - 1;
    EXPECT_EQ(verify(good, o), TokenError::TooLarge);
    // Garbage too: size first.
    EXPECT_EQ(verify(std::string(9000, '!')), TokenError::TooLarge);
    EXPECT_EQ(verify(std::string(8193, '.')), TokenError::TooLarge);
    EXPECT_EQ(verify_signature_only(std::string(8193, 'a'), keyset_, kAllAlgorithms),
              TokenError::TooLarge);
    EXPECT_EQ(verify_signature_only(good, keyset_, kAllAlgorithms, good.size() - 1),
              TokenError::TooLarge);
}

TEST_F(JoseTest, NonCanonicalBase64url) {
    const std::string good = token(Algorithm::ES256);
    const size_t dot1 = good.find('.');
    const size_t dot2 = good.find('.', dot1 + 1);
    const std::string header = good.substr(0, dot1);
    const std::string payload = good.substr(dot1 + 1, dot2 - dot1 - 1);
    const std::string signature = good.substr(dot2 + 1);
    // An ES256 signature is 64 bytes, 86 characters: padding it with "==" is refused.
    const auto padded = [](std::string s) {
        while (s.size() % 4 != 0) {
            s += "=";
        }
        return s;
    };
    ASSERT_EQ(signature.size(), 86u);
    // Standard base64 alphabet instead of url-safe.
    std::string plus_signature = signature;
    std::replace(plus_signature.begin(), plus_signature.end(), '-', '+');
    std::replace(plus_signature.begin(), plus_signature.end(), '_', '/');
    if (plus_signature == signature) {
        plus_signature[0] = '+';
    }
    // Non-zero trailing bits: "eyJ" + ... the last character of a 2-byte tail changed.
    std::string trailing = b64("{}");  // "e30"
    trailing.back() = '1';
    for (const std::string &compact :
         {header + "." + payload + "." + padded(signature),
          header + "." + payload + "." + signature + "==",
          header + "." + payload + "." + plus_signature, header + " ." + payload + "." + signature,
          header + "." + payload + "." + signature + "\n",
          header + "." + payload + "!" + "." + signature,
          trailing + "." + payload + "." + signature, header + "." + payload + "." + "A"}) {
        SCOPED_TRACE(compact);
        EXPECT_EQ(verify(compact), TokenError::BadBase64url);
    }
}

// ---- Keys ------------------------------------------------------------------------------------

TEST_F(JoseTest, UnknownKid) {
    EXPECT_EQ(verify(token(Algorithm::ES256, "", header_json(Algorithm::ES256, "nope"))),
              TokenError::UnknownKey);
    EXPECT_EQ(verify(token(Algorithm::ES256, "", header_json(Algorithm::ES256, "EC-256"))),
              TokenError::UnknownKey);
    // An empty kid does not select the keys that have none.
    const KeySet no_kids =
        parse_keys(R"({"keys":[)" + keys_->p256.members().insert(0, "{") + "}]}");
    EXPECT_EQ(
        verify_jwt(token(Algorithm::ES256, "", R"({"alg":"ES256","kid":""})"), no_kids, options())
            .error,
        TokenError::UnknownKey);
    EXPECT_EQ(
        verify_jwt(token(Algorithm::ES256, "", R"({"alg":"ES256"})"), no_kids, options()).error,
        TokenError::None);
    // A kid-less token whose family has no key in the set.
    const KeySet rsa_only = parse_keys(R"({"keys":[)" + keys_->rsa.jwk() + "]}");
    const std::string kidless = make_token(header_json(Algorithm::ES256, ""), claims_json(),
                                           keys_->p256.pkey.get(), Algorithm::ES256);
    EXPECT_EQ(verify_jwt(kidless, rsa_only, options()).error, TokenError::UnknownKey);
}

TEST_F(JoseTest, EncryptionKeysNeverVerify) {
    for (const char *extra : {R"("use":"enc")", R"("use":"other")", R"("key_ops":["encrypt"])",
                              R"("alg":"RSA-OAEP")"}) {
        SCOPED_TRACE(extra);
        const KeySet keys =
            parse_keys(R"({"keys":[)" + keys_->rsa.jwk(extra) + "," + keys_->p256.jwk() + "]}");
        EXPECT_FALSE(keys.info(0).verifies);
        EXPECT_TRUE(keys.info(1).verifies);
        EXPECT_EQ(verify_jwt(token(Algorithm::RS256), keys, options()).error,
                  TokenError::UnknownKey);
        const std::string kidless = make_token(header_json(Algorithm::RS256, ""), claims_json(),
                                               keys_->rsa.pkey.get(), Algorithm::RS256);
        EXPECT_EQ(verify_jwt(kidless, keys, options()).error, TokenError::UnknownKey);
    }
    for (const char *extra :
         {R"("use":"sig")", R"("key_ops":["verify","sign"])", R"("alg":"RS256")"}) {
        SCOPED_TRACE(extra);
        const KeySet keys = parse_keys(R"({"keys":[)" + keys_->rsa.jwk(extra) + "]}");
        EXPECT_TRUE(keys.info(0).verifies);
        EXPECT_EQ(verify_jwt(token(Algorithm::RS256), keys, options()).error, TokenError::None);
    }
}

TEST_F(JoseTest, KeyAlgorithmMismatch) {
    // RSA key named for an ECDSA token.
    EXPECT_EQ(verify(token(Algorithm::ES256, "", header_json(Algorithm::ES256, "rsa-1"))),
              TokenError::KeyAlgorithmMismatch);
    // EC key for RSA tokens.
    EXPECT_EQ(verify(token(Algorithm::RS256, "", header_json(Algorithm::RS256, "ec-256"))),
              TokenError::KeyAlgorithmMismatch);
    EXPECT_EQ(verify(token(Algorithm::PS512, "", header_json(Algorithm::PS512, "ec-521"))),
              TokenError::KeyAlgorithmMismatch);
    // Wrong curve: P-384 key for ES256, P-256 key for ES512.
    EXPECT_EQ(verify(token(Algorithm::ES256, "", header_json(Algorithm::ES256, "ec-384"))),
              TokenError::KeyAlgorithmMismatch);
    EXPECT_EQ(verify(token(Algorithm::ES512, "", header_json(Algorithm::ES512, "ec-256"))),
              TokenError::KeyAlgorithmMismatch);
    // The JWK pins its algorithm: an RS256 key does not verify PS256 (or RS512).
    const KeySet pinned = parse_keys(R"({"keys":[)" + keys_->rsa.jwk(R"("alg":"RS256")") + "]}");
    EXPECT_EQ(verify_jwt(token(Algorithm::RS256), pinned, options()).error, TokenError::None);
    EXPECT_EQ(verify_jwt(token(Algorithm::PS256), pinned, options()).error,
              TokenError::KeyAlgorithmMismatch);
    EXPECT_EQ(verify_jwt(token(Algorithm::RS512), pinned, options()).error,
              TokenError::KeyAlgorithmMismatch);
}

TEST_F(JoseTest, SharedKidAcrossKeyTypes) {
    // RFC 7517 allows one kid on keys of different types (RFC 7520 does it): pick by alg.
    TestKey rsa{PkeyPtr(EVP_PKEY_dup(keys_->rsa.pkey.get())), "shared", ""};
    TestKey ec{PkeyPtr(EVP_PKEY_dup(keys_->p521.pkey.get())), "shared", "P-521"};
    const KeySet keys = parse_keys(R"({"keys":[)" + rsa.jwk() + "," + ec.jwk() + "]}");
    EXPECT_EQ(verify_jwt(make_token(header_json(Algorithm::PS384, "shared"), claims_json(),
                                    rsa.pkey.get(), Algorithm::PS384),
                         keys, options())
                  .error,
              TokenError::None);
    EXPECT_EQ(verify_jwt(make_token(header_json(Algorithm::ES512, "shared"), claims_json(),
                                    ec.pkey.get(), Algorithm::ES512),
                         keys, options())
                  .error,
              TokenError::None);
    EXPECT_EQ(verify_jwt(make_token(header_json(Algorithm::ES256, "shared"), claims_json(),
                                    keys_->p256.pkey.get(), Algorithm::ES256),
                         keys, options())
                  .error,
              TokenError::KeyAlgorithmMismatch);
}

// ---- Signatures ------------------------------------------------------------------------------

TEST_F(JoseTest, TamperedSignaturesFail) {
    for (const Algorithm alg : kAllAlgorithms) {
        SCOPED_TRACE(algorithm_name(alg));
        const std::string good = token(alg);
        const size_t dot2 = good.rfind('.');
        std::string signature = *base64url::decode(good.substr(dot2 + 1));
        for (const size_t at : {size_t{0}, signature.size() / 2, signature.size() - 1}) {
            std::string flipped = signature;
            flipped[at] ^= 0x01;
            EXPECT_EQ(verify(good.substr(0, dot2 + 1) + b64(flipped)), TokenError::BadSignature);
        }
        // Truncated or extended signatures.
        EXPECT_EQ(verify(good.substr(0, dot2 + 1) + b64(signature.substr(1))),
                  TokenError::BadSignature);
        EXPECT_EQ(verify(good.substr(0, dot2 + 1) + b64(signature + '\0')),
                  TokenError::BadSignature);
        // A valid signature over different claims.
        const std::string other = token(alg, claims_json(R"("sub":"someone-else")"));
        EXPECT_EQ(verify(good.substr(0, dot2) + other.substr(other.rfind('.'))),
                  TokenError::BadSignature);
        // Payload changed under the signature.
        const size_t dot1 = good.find('.');
        const std::string swapped = good.substr(0, dot1 + 1) +
                                    b64(claims_json(R"("scope":"system/*.cruds")")) +
                                    good.substr(dot2);
        EXPECT_EQ(verify(swapped), TokenError::BadSignature);
    }
}

TEST_F(JoseTest, SignatureFromAnotherKeyWithTheSameKid) {
    const std::string forged = make_token(header_json(Algorithm::ES256, "ec-256"), claims_json(),
                                          keys_->stranger.pkey.get(), Algorithm::ES256);
    EXPECT_EQ(verify(forged), TokenError::BadSignature);
    const std::string rsa_forged = make_token(header_json(Algorithm::RS256, "rsa-1"), claims_json(),
                                              keys_->rsa2.pkey.get(), Algorithm::RS256);
    EXPECT_EQ(verify(rsa_forged), TokenError::BadSignature);
}

TEST_F(JoseTest, EcdsaSignatureEncodingIsStrict) {
    const std::string good = token(Algorithm::ES256);
    const size_t dot2 = good.rfind('.');
    const std::string prefix = good.substr(0, dot2 + 1);
    const std::string raw = *base64url::decode(good.substr(dot2 + 1));
    ASSERT_EQ(raw.size(), 64u);
    // DER instead of raw r || s.
    {
        ECDSA_SIG *sig = ECDSA_SIG_new();
        BIGNUM *r = BN_bin2bn(reinterpret_cast<const unsigned char *>(raw.data()), 32, nullptr);
        BIGNUM *s =
            BN_bin2bn(reinterpret_cast<const unsigned char *>(raw.data()) + 32, 32, nullptr);
        ECDSA_SIG_set0(sig, r, s);
        unsigned char *der = nullptr;
        const int length = i2d_ECDSA_SIG(sig, &der);
        ASSERT_GT(length, 0);
        EXPECT_EQ(verify(prefix + b64(std::string_view(reinterpret_cast<char *>(der),
                                                       static_cast<size_t>(length)))),
                  TokenError::BadSignature);
        OPENSSL_free(der);
        ECDSA_SIG_free(sig);
    }
    // r = 0, s = 0.
    EXPECT_EQ(verify(prefix + b64(std::string(32, '\0') + raw.substr(32))),
              TokenError::BadSignature);
    EXPECT_EQ(verify(prefix + b64(raw.substr(0, 32) + std::string(32, '\0'))),
              TokenError::BadSignature);
    // s = n (the P-256 order) and s = 2^256 - 1.
    const std::string order = *base64url::decode("_____wAAAAD__________7zm-q2nF56E87nKwvxjJVE");
    ASSERT_EQ(order.size(), 32u);
    EXPECT_EQ(verify(prefix + b64(raw.substr(0, 32) + order)), TokenError::BadSignature);
    EXPECT_EQ(verify(prefix + b64(raw.substr(0, 32) + std::string(32, '\xff'))),
              TokenError::BadSignature);
    // P-256 length for an ES384 token and the other way round.
    const std::string es384 = token(Algorithm::ES384);
    EXPECT_EQ(verify(es384.substr(0, es384.rfind('.') + 1) + b64(raw)), TokenError::BadSignature);
    EXPECT_EQ(verify(prefix + b64(raw + raw.substr(0, 32))), TokenError::BadSignature);
}

TEST_F(JoseTest, PssAndPkcs1AreNotInterchangeable) {
    // A PKCS#1 v1.5 signature under a PS256 header and the other way round, each over exactly
    // the signing input it is presented with.
    EXPECT_EQ(verify(make_token(header_json(Algorithm::PS256, "rsa-1"), claims_json(),
                                keys_->rsa.pkey.get(), Algorithm::RS256)),
              TokenError::BadSignature);
    EXPECT_EQ(verify(make_token(header_json(Algorithm::RS256, "rsa-1"), claims_json(),
                                keys_->rsa.pkey.get(), Algorithm::PS256)),
              TokenError::BadSignature);
    const std::string ps = token(Algorithm::PS256);
    // PSS with a salt length other than the hash length is refused.
    const std::string input = ps.substr(0, ps.rfind('.'));
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    EVP_PKEY_CTX *pctx = nullptr;
    ASSERT_EQ(EVP_DigestSignInit(ctx.get(), &pctx, EVP_sha256(), nullptr, keys_->rsa.pkey.get()),
              1);
    ASSERT_EQ(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING), 1);
    ASSERT_EQ(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 20), 1);
    size_t length = 512;
    std::string sig(length, '\0');
    ASSERT_EQ(EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char *>(sig.data()), &length,
                             reinterpret_cast<const unsigned char *>(input.data()), input.size()),
              1);
    sig.resize(length);
    EXPECT_EQ(verify(input + "." + b64(sig)), TokenError::BadSignature);
}

TEST_F(JoseTest, SignatureIsCheckedBeforeClaims) {
    // Unverified payloads are never interpreted: expired, wrong-typed, or not JSON at all, a
    // token with a bad signature is a bad signature.
    for (const std::string &claims : {claims_json(R"("exp":1)"), claims_json(R"("exp":"soon")"),
                                      std::string("not json"), std::string(R"({"a":1,"a":2})")}) {
        SCOPED_TRACE(claims);
        const std::string compact = make_token(header_json(Algorithm::ES256, "ec-256"), claims,
                                               keys_->stranger.pkey.get(), Algorithm::ES256);
        EXPECT_EQ(verify(compact), TokenError::BadSignature);
    }
}

TEST_F(JoseTest, MutatedTokensNeverVerifyAndNeverCrash) {
    // Base64url is canonical, so any change to the compact form changes the signed bytes or the
    // signature: no mutation may verify.
    std::mt19937 rng(4711);
    const std::string originals[] = {token(Algorithm::ES256), token(Algorithm::RS256),
                                     token(Algorithm::PS384)};
    constexpr std::string_view kAlphabet =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";
    for (int i = 0; i < 1500; ++i) {
        std::string compact = originals[static_cast<size_t>(i) % std::size(originals)];
        const size_t at = rng() % compact.size();
        switch (rng() % 4) {
            case 0:
                compact[at] = kAlphabet[rng() % kAlphabet.size()];
                break;
            case 1:
                compact.insert(at, 1, kAlphabet[rng() % kAlphabet.size()]);
                break;
            case 2:
                compact.erase(at, 1 + rng() % 4);
                break;
            default:
                compact[at] = static_cast<char>(rng());
                break;
        }
        if (std::find(std::begin(originals), std::end(originals), compact) != std::end(originals)) {
            continue;
        }
        const VerifyResult result = verify_jwt(compact, keyset_, options());
        ASSERT_NE(result.error, TokenError::None) << compact;
        ASSERT_NE(result.error, TokenError::Internal) << compact;
    }
}

// ---- Payload and claims ----------------------------------------------------------------------

TEST_F(JoseTest, PayloadMustBeAJsonObject) {
    for (const char *payload :
         {"hello", "[1,2]", "\"str\"", "42", "{\"exp\":1", "{} {}", "{\"a\":\"\xed\xa0\x80\"}"}) {
        SCOPED_TRACE(payload);
        EXPECT_EQ(verify(token(Algorithm::RS256, payload)), TokenError::PayloadNotJson);
    }
}

TEST_F(JoseTest, DuplicateClaims) {
    const std::string claims = claims_json().insert(1, R"("exp":1,)");
    EXPECT_EQ(verify(token(Algorithm::ES256, claims)), TokenError::DuplicateKey);
    const std::string escaped = claims_json().insert(1, R"("\u0065xp":1,)");
    EXPECT_EQ(verify(token(Algorithm::ES256, escaped)), TokenError::DuplicateKey);
}

TEST_F(JoseTest, MissingExp) {
    const std::string claims = claims_json("", ",exp,");
    EXPECT_EQ(verify(token(Algorithm::ES256, claims)), TokenError::MissingExp);
    VerifyOptions o = options();
    o.require_exp = false;
    EXPECT_EQ(verify(token(Algorithm::ES256, claims), o), TokenError::None);
}

TEST_F(JoseTest, ExpiryBoundaryWithLeeway) {
    // Expired exactly when exp + leeway <= now.
    const auto with_exp = [&](int64_t exp) {
        return verify(token(Algorithm::ES256, claims_json("\"exp\":" + std::to_string(exp))));
    };
    EXPECT_EQ(with_exp(kNow - 60), TokenError::Expired);
    EXPECT_EQ(with_exp(kNow - 59), TokenError::None);
    EXPECT_EQ(with_exp(kNow - 100000), TokenError::Expired);
    VerifyOptions strict = options();
    strict.leeway_seconds = 0;
    const std::string at_now =
        token(Algorithm::ES256, claims_json("\"exp\":" + std::to_string(kNow)));
    EXPECT_EQ(verify(at_now, strict), TokenError::Expired);
    strict.now = kNow - 1;
    EXPECT_EQ(verify(at_now, strict), TokenError::None);
    // A negative leeway is treated as zero, not as a stricter clock.
    VerifyOptions negative = options();
    negative.leeway_seconds = -30;
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json("\"exp\":" + std::to_string(kNow + 1))),
                     negative),
              TokenError::None);
}

TEST_F(JoseTest, NotBeforeBoundaryWithLeeway) {
    const auto with_nbf = [&](int64_t nbf) {
        return verify(token(Algorithm::PS384, claims_json("\"nbf\":" + std::to_string(nbf))));
    };
    EXPECT_EQ(with_nbf(kNow + 60), TokenError::None);
    EXPECT_EQ(with_nbf(kNow + 61), TokenError::NotYetValid);
}

TEST_F(JoseTest, IssuedAtBoundaryWithLeeway) {
    const auto with_iat = [&](int64_t iat) {
        return verify(token(Algorithm::ES512, claims_json("\"iat\":" + std::to_string(iat))));
    };
    EXPECT_EQ(with_iat(kNow + 60), TokenError::None);
    EXPECT_EQ(with_iat(kNow + 61), TokenError::IssuedInFuture);
    EXPECT_EQ(with_iat(kNow - 1000000), TokenError::None);
}

TEST_F(JoseTest, FractionalNumericDatesRoundTowardsStrict) {
    // exp rounds down: kNow - 59.5 -> kNow - 60, expired.
    EXPECT_EQ(
        verify(token(Algorithm::ES256, claims_json("\"exp\":" + std::to_string(kNow - 60) + ".5"))),
        TokenError::Expired);
    EXPECT_EQ(verify(token(Algorithm::ES256,
                           claims_json("\"exp\":" + std::to_string(kNow + 60) + ".25"))),
              TokenError::None);
    // nbf rounds up: kNow + 60.5 -> kNow + 61, not yet valid.
    EXPECT_EQ(
        verify(token(Algorithm::ES256, claims_json("\"nbf\":" + std::to_string(kNow + 60) + ".5"))),
        TokenError::NotYetValid);
    // Exponent notation is a number like any other.
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":1.8e9)"))), TokenError::None);
}

TEST_F(JoseTest, ExtremeTimesDoNotOverflow) {
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":9223372036854775807)"))),
              TokenError::None);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("nbf":-9223372036854775808)"))),
              TokenError::None);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("iat":-9223372036854775808)"))),
              TokenError::None);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":-9223372036854775808)"))),
              TokenError::Expired);
    VerifyOptions o = options();
    o.leeway_seconds = INT64_MAX;
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":1)")), o), TokenError::None);
    // Beyond int64: not a usable NumericDate.
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":1e300)"))),
              TokenError::BadClaimType);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("nbf":9223372036854775808)"))),
              TokenError::BadClaimType);
}

TEST_F(JoseTest, WrongIssuer) {
    EXPECT_EQ(verify(token(Algorithm::RS384, claims_json(R"("iss":"https://evil.example")"))),
              TokenError::WrongIssuer);
    EXPECT_EQ(verify(token(Algorithm::RS384, claims_json(R"("iss":"https://idp.example.org/")"))),
              TokenError::WrongIssuer);
    EXPECT_EQ(verify(token(Algorithm::RS384, claims_json("", ",iss,"))), TokenError::WrongIssuer);
    // An unconfigured issuer matches nothing, not even a token without iss.
    VerifyOptions o = options();
    o.issuer.clear();
    EXPECT_EQ(verify(token(Algorithm::RS384, claims_json("", ",iss,")), o),
              TokenError::WrongIssuer);
}

TEST_F(JoseTest, WrongAudience) {
    EXPECT_EQ(verify(token(Algorithm::ES384, claims_json(R"("aud":"https://other.example")"))),
              TokenError::WrongAudience);
    EXPECT_EQ(verify(token(Algorithm::ES384, claims_json(R"("aud":["a","b"])"))),
              TokenError::WrongAudience);
    EXPECT_EQ(verify(token(Algorithm::ES384, claims_json(R"("aud":[])"))),
              TokenError::WrongAudience);
    EXPECT_EQ(verify(token(Algorithm::ES384, claims_json("", ",aud,"))), TokenError::WrongAudience);
    VerifyOptions o = options();
    o.audience.clear();
    EXPECT_EQ(verify(token(Algorithm::ES384, claims_json(R"("aud":"")")), o),
              TokenError::WrongAudience);
}

TEST_F(JoseTest, BadClaimTypes) {
    for (const char *claim : {R"("exp":"1700000300")",
                              R"("exp":null)",
                              R"("nbf":true)",
                              R"("iat":[1])",
                              R"("scope":5)",
                              R"("scope":["a","b"])",
                              R"("iss":5)",
                              R"("sub":{})",
                              R"("aud":5)",
                              R"("aud":[1])",
                              R"("aud":["https://ehr.example.org/fhir",null])",
                              R"("jti":1)",
                              R"("client_id":["x"])",
                              R"("azp":7)",
                              R"("patient":123)",
                              R"("fhirUser":false)",
                              R"("purpose_of_use":5)",
                              R"("purpose_of_use":[["TREAT"]])",
                              R"("cnf":"thumb")",
                              R"("cnf":{"x5t#S256":1})"}) {
        SCOPED_TRACE(claim);
        EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(claim))), TokenError::BadClaimType);
    }
    // Claims we do not interpret may have any type.
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("ext":{"a":[1,null]},"cnf":{})"))),
              TokenError::None);
}

TEST_F(JoseTest, ClaimChecksRunInDocumentedOrder) {
    // Type errors first, then exp, nbf, iat, iss, aud.
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":1,"scope":5,"iss":"x")"))),
              TokenError::BadClaimType);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("exp":1,"iss":"x","aud":"y")"))),
              TokenError::Expired);
    EXPECT_EQ(verify(token(Algorithm::ES256, claims_json(R"("iss":"x","aud":"y")"))),
              TokenError::WrongIssuer);
}

TEST_F(JoseTest, ResultCarriesHeaderFactsOnFailure) {
    const VerifyResult result =
        verify_jwt(token(Algorithm::ES384, claims_json(R"("exp":1)")), keyset_, options());
    EXPECT_EQ(result.error, TokenError::Expired);
    EXPECT_FALSE(result.ok());
    EXPECT_EQ(result.kid, "ec-384");
    EXPECT_EQ(result.alg, Algorithm::ES384);
    EXPECT_TRUE(result.claims.iss.empty());  // claims only on success
}

TEST(JoseNames, TokenErrorNamesAreStableAndDistinct) {
    std::vector<std::string_view> names;
    for (int e = 0; e <= static_cast<int>(TokenError::Internal); ++e) {
        names.push_back(token_error_name(static_cast<TokenError>(e)));
    }
    EXPECT_EQ(names.size(), 24u);
    const std::vector<std::pair<TokenError, std::string_view>> expected = {
        {TokenError::None, "none"},
        {TokenError::AlgNone, "alg-none"},
        {TokenError::AlgNotAllowed, "alg-not-allowed"},
        {TokenError::ForbiddenHeader, "forbidden-header"},
        {TokenError::UnknownCrit, "unknown-crit"},
        {TokenError::Malformed, "malformed"},
        {TokenError::TooLarge, "too-large"},
        {TokenError::BadBase64url, "bad-base64url"},
        {TokenError::HeaderNotJson, "header-not-json"},
        {TokenError::PayloadNotJson, "payload-not-json"},
        {TokenError::DuplicateKey, "duplicate-key"},
        {TokenError::UnknownKey, "unknown-key"},
        {TokenError::KeyAlgorithmMismatch, "key-algorithm-mismatch"},
        {TokenError::BadSignature, "bad-signature"},
        {TokenError::MissingExp, "missing-exp"},
        {TokenError::Expired, "expired"},
        {TokenError::NotYetValid, "not-yet-valid"},
        {TokenError::IssuedInFuture, "issued-in-future"},
        {TokenError::WrongIssuer, "wrong-issuer"},
        {TokenError::WrongAudience, "wrong-audience"},
        {TokenError::BadClaimType, "bad-claim-type"},
        {TokenError::BadTyp, "bad-typ"},
        {TokenError::BadHeader, "bad-header"},
        {TokenError::Internal, "internal-error"},
    };
    for (const auto &[error, name] : expected) {
        EXPECT_EQ(token_error_name(error), name);
    }
    std::sort(names.begin(), names.end());
    EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
}

// ---- JWKS parsing ----------------------------------------------------------------------------

TEST_F(JoseTest, JwksKeyInfo) {
    ASSERT_EQ(keyset_.size(), 5u);
    EXPECT_EQ(keyset_.info(0).kid, "rsa-1");
    EXPECT_EQ(keyset_.info(0).kty, "RSA");
    EXPECT_EQ(keyset_.info(0).bits, 2048);
    EXPECT_TRUE(keyset_.info(0).verifies);
    EXPECT_EQ(keyset_.info(2).crv, "P-256");
    EXPECT_EQ(keyset_.info(2).bits, 256);
    EXPECT_EQ(keyset_.info(3).bits, 384);
    EXPECT_EQ(keyset_.info(4).crv, "P-521");
    EXPECT_EQ(keyset_.info(4).bits, 521);
    EXPECT_EQ(keyset_.info(4).alg, std::nullopt);
}

TEST_F(JoseTest, JwksRejectsPrivateKeys) {
    for (const char *member : {"d", "p", "q", "dp", "dq", "qi", "oth"}) {
        SCOPED_TRACE(member);
        const std::string jwks = R"({"keys":[)" + keys_->p256.jwk() + "," +
                                 keys_->rsa.jwk(std::string("\"") + member + R"(":"AQAB")") + "]}";
        EXPECT_EQ(parse_keys_error(jwks),
                  std::string("keys[1]: private key member \"") + member +
                      "\" present: a trusted JWKS must hold public keys only");
    }
    EXPECT_NE(parse_keys_error(R"({"keys":[)" + keys_->p384.jwk(R"("d":"AAAA")") + "]}")
                  .find("private key member \"d\""),
              std::string::npos);
}

TEST_F(JoseTest, JwksRejectsSymmetricAndUnknownKeyTypes) {
    EXPECT_EQ(
        parse_keys_error(R"({"keys":[{"kty":"oct","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ"}]})"),
        "keys[0]: symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"oct","kid":"x"}]})"),
              "keys[0]: symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
    EXPECT_EQ(
        parse_keys_error(
            R"({"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]})"),
        "keys[0]: unsupported kty \"OKP\": expected \"RSA\" or \"EC\"");
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"rsa","n":"AQAB","e":"AQAB"}]})"),
              "keys[0]: unsupported kty \"rsa\": expected \"RSA\" or \"EC\"");
}

TEST_F(JoseTest, JwksRejectsShortAndOddRsaKeys) {
    // A 2047-bit modulus (top bit of 256 bytes clear) and a 1024-bit one.
    std::string n(256, '\x5a');
    n[0] = '\x7f';
    n.back() = '\x01';
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"RSA","n":")" + b64(n) + R"(","e":"AQAB"}]})"),
              "keys[0]: RSA modulus of 2047 bits is below the minimum of 2048");
    const TestKey small = generate_rsa("small", 1024);
    EXPECT_EQ(parse_keys_error(R"({"keys":[)" + small.jwk() + "]}"),
              "keys[0]: RSA modulus of 1024 bits is below the minimum of 2048");
    // Leading zero octets do not count towards the size.
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"RSA","n":")" + b64(std::string(2, '\0') + n) +
                               R"(","e":"AQAB"}]})"),
              "keys[0]: RSA modulus of 2047 bits is below the minimum of 2048");
    std::string even(256, '\x9a');
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"RSA","n":")" + b64(even) + R"(","e":"AQAB"}]})"),
              "keys[0]: RSA modulus is even");
    std::string odd = even;
    odd.back() = '\x9b';
    for (const std::string &e : {b64("\x01"), b64("\x01\x00"), b64(std::string(9, '\x01'))}) {
        SCOPED_TRACE(e);
        EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"RSA","n":")" + b64(odd) + R"(","e":")" + e +
                                   R"("}]})"),
                  "keys[0]: RSA public exponent must be odd, greater than 1 and at most 64 bits");
    }
}

TEST_F(JoseTest, JwksRejectsPointsOffTheCurve) {
    for (const TestKey *key : {&keys_->p256, &keys_->p384, &keys_->p521}) {
        SCOPED_TRACE(key->crv);
        const size_t width = key->crv == "P-256" ? 32 : key->crv == "P-384" ? 48 : 66;
        std::string y = bn_param(key->pkey.get(), OSSL_PKEY_PARAM_EC_PUB_Y, width);
        y.back() ^= 0x01;
        const std::string jwk = R"({"kty":"EC","crv":")" + key->crv + R"(","x":")" +
                                b64(bn_param(key->pkey.get(), OSSL_PKEY_PARAM_EC_PUB_X, width)) +
                                R"(","y":")" + b64(y) + R"("})";
        EXPECT_EQ(parse_keys_error(R"({"keys":[)" + jwk + "]}"),
                  "keys[0]: (x, y) is not a point on " + key->crv);
    }
    // The point at infinity / all-zero coordinates.
    const std::string zeros = b64(std::string(32, '\0'));
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"EC","crv":"P-256","x":")" + zeros +
                               R"(","y":")" + zeros + R"("}]})"),
              "keys[0]: (x, y) is not a point on P-256");
    // A P-256 point presented as P-384 (wrong length) and a coordinate not below p.
    const std::string x = bn_param(keys_->p256.pkey.get(), OSSL_PKEY_PARAM_EC_PUB_X, 32);
    const std::string y = bn_param(keys_->p256.pkey.get(), OSSL_PKEY_PARAM_EC_PUB_Y, 32);
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"EC","crv":"P-384","x":")" + b64(x) +
                               R"(","y":")" + b64(y) + R"("}]})"),
              "keys[0]: \"x\" and \"y\" must be 48 bytes for P-384");
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"EC","crv":"P-256","x":")" +
                               b64(std::string(32, '\xff')) + R"(","y":")" + b64(y) + R"("}]})"),
              "keys[0]: (x, y) is not a point on P-256");
    // x with a leading zero octet dropped (not full length).
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"EC","crv":"P-256","x":")" + b64(x.substr(1)) +
                               R"(","y":")" + b64(y) + R"("}]})"),
              "keys[0]: \"x\" and \"y\" must be 32 bytes for P-256");
    EXPECT_EQ(parse_keys_error(R"({"keys":[{"kty":"EC","crv":"secp256k1","x":")" + b64(x) +
                               R"(","y":")" + b64(y) + R"("}]})"),
              "keys[0]: unsupported crv \"secp256k1\": expected P-256, P-384 or P-521");
}

TEST_F(JoseTest, JwksRejectsMissingAndMalformedMembers) {
    const std::string n = b64(bn_param(keys_->rsa.pkey.get(), "n", 0));
    const std::string x = b64(bn_param(keys_->p256.pkey.get(), OSSL_PKEY_PARAM_EC_PUB_X, 32));
    const std::string y = b64(bn_param(keys_->p256.pkey.get(), OSSL_PKEY_PARAM_EC_PUB_Y, 32));
    const struct {
        std::string jwks;
        std::string error;
    } cases[] = {
        {"", "JWKS is not valid JSON at byte 0: unexpected end of input, expected a value"},
        {R"({"keys":[]} x)",
         "JWKS is not valid JSON at byte 12: trailing data after the JSON "
         "value: 'x'"},
        {R"({"keys":[],"keys":[]})",
         "JWKS is not valid JSON at byte 11: duplicate object key \"keys\""},
        {"[]", "JWKS must be an object with a \"keys\" array"},
        {R"({"kty":"RSA"})", "JWKS must be an object with a \"keys\" array"},
        {R"({"keys":{}})", "JWKS must be an object with a \"keys\" array"},
        {R"({"keys":[]})", "JWKS has no keys"},
        {R"({"keys":[5]})", "keys[0]: a key must be a JSON object"},
        {R"({"keys":[{}]})", "keys[0]: missing \"kty\""},
        {R"({"keys":[{"kty":1}]})", "keys[0]: \"kty\" must be a string"},
        {R"({"keys":[{"kty":"RSA","e":"AQAB"}]})", "keys[0]: missing \"n\""},
        {R"({"keys":[{"kty":"RSA","n":")" + n + R"("}]})", "keys[0]: missing \"e\""},
        {R"({"keys":[{"kty":"RSA","n":")" + n + R"(=","e":"AQAB"}]})",
         "keys[0]: \"n\" is not non-empty unpadded base64url"},
        {R"({"keys":[{"kty":"RSA","n":")" + n + R"(","e":""}]})",
         "keys[0]: \"e\" is not non-empty unpadded base64url"},
        {R"({"keys":[{"kty":"RSA","n":)" + std::string("5") + R"(,"e":"AQAB"}]})",
         "keys[0]: \"n\" must be a string"},
        {R"({"keys":[{"kty":"EC","x":")" + x + R"(","y":")" + y + R"("}]})",
         "keys[0]: missing \"crv\""},
        {R"({"keys":[{"kty":"EC","crv":"P-256","y":")" + y + R"("}]})", "keys[0]: missing \"x\""},
        {R"({"keys":[{"kty":"EC","crv":"P-256","x":")" + x + R"("}]})", "keys[0]: missing \"y\""},
        {R"({"keys":[{"kty":"RSA","kid":5,"n":")" + n + R"(","e":"AQAB"}]})",
         "keys[0]: \"kid\" must be a string"},
        {R"({"keys":[{"kty":"RSA","use":["sig"],"n":")" + n + R"(","e":"AQAB"}]})",
         "keys[0]: \"use\" must be a string"},
        {R"({"keys":[{"kty":"RSA","alg":5,"n":")" + n + R"(","e":"AQAB"}]})",
         "keys[0]: \"alg\" must be a string"},
        {R"({"keys":[{"kty":"RSA","key_ops":"verify","n":")" + n + R"(","e":"AQAB"}]})",
         "keys[0]: \"key_ops\" must be an array of strings"},
        {R"({"keys":[{"kty":"RSA","alg":"ES256","n":")" + n + R"(","e":"AQAB"}]})",
         "keys[0]: alg \"ES256\" does not match kty \"RSA\""},
        {R"({"keys":[{"kty":"EC","alg":"ES384","crv":"P-256","x":")" + x + R"(","y":")" + y +
             R"("}]})",
         "keys[0]: alg \"ES384\" does not match kty \"EC\" crv \"P-256\""},
        {R"({"keys":[{"kty":"EC","alg":"RS256","crv":"P-256","x":")" + x + R"(","y":")" + y +
             R"("}]})",
         "keys[0]: alg \"RS256\" does not match kty \"EC\" crv \"P-256\""},
        {R"({"keys":[{"kty":"RSA","use":"enc","n":")" + n + R"(","e":"AQAB"}]})",
         "JWKS has no key usable for signature verification"},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.jwks);
        EXPECT_EQ(parse_keys_error(c.jwks), c.error);
    }
}

TEST_F(JoseTest, JwksKeyCountIsBounded) {
    std::string jwks = R"({"keys":[)";
    for (size_t i = 0; i <= KeySet::kMaxKeys; ++i) {
        jwks += (i == 0 ? "" : ",") + keys_->p256.jwk();
    }
    jwks += "]}";
    EXPECT_EQ(parse_keys_error(jwks), "JWKS has 65 keys, the limit is 64");
}

TEST_F(JoseTest, JwksErrorPointerMayBeNull) {
    EXPECT_FALSE(KeySet::parse("{}", nullptr).has_value());
    EXPECT_TRUE(KeySet::parse(R"({"keys":[)" + keys_->p256.jwk() + "]}", nullptr).has_value());
}

// ---- RFC 7515 / 7517 / 7520 vectors ----------------------------------------------------------

const std::filesystem::path kVectors = ehrgate::testing::testdata_dir() / "jose";

std::string read_file(const std::filesystem::path &path) {
    std::ifstream in(path, std::ios::binary);
    EXPECT_TRUE(in.good()) << "cannot read " << path;
    std::ostringstream out;
    out << in.rdbuf();
    return out.str();
}

std::string trimmed(std::string text) {
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) {
        text.pop_back();
    }
    return text;
}

// The vectors' JWKs include the private parts (the RFCs sign with them); a trusted JWKS must not,
// so keep only the public members.
std::string public_jwk(const json::Value &jwk) {
    std::string out = "{";
    for (const auto &[name, value] : *jwk.as_object()) {
        if (name != "kty" && name != "kid" && name != "use" && name != "alg" && name != "n" &&
            name != "e" && name != "crv" && name != "x" && name != "y") {
            continue;
        }
        if (out.size() > 1) {
            out += ",";
        }
        out += json::quote(name) + ":" + json::quote(*value.as_string());
    }
    return out + "}";
}

std::string public_jwks(const std::string &jwk_text) {
    json::ParseError error;
    const std::optional<json::Value> jwk = json::parse(jwk_text, &error);
    EXPECT_TRUE(jwk.has_value()) << error.message;
    return jwk ? R"({"keys":[)" + public_jwk(*jwk) + "]}" : "";
}

class JoseVectors : public ::testing::Test {
  protected:
    void SetUp() override {
        if (!std::filesystem::is_directory(kVectors / "latchset-vectors") ||
            !std::filesystem::is_directory(kVectors / "rfc7520-cookbook")) {
            GTEST_SKIP() << "../shared/testdata not present: the RFC 7515/7520 vectors are "
                            "expected in "
                         << kVectors.lexically_normal() << "/{latchset-vectors,rfc7520-cookbook}";
        }
    }

    static std::string latchset(std::string_view name) {
        return trimmed(read_file(kVectors / "latchset-vectors" / name));
    }

    static VerifyOptions options(int64_t now, std::string issuer = "joe") {
        VerifyOptions o;
        o.allowed_algorithms.assign(kAllAlgorithms.begin(), kAllAlgorithms.end());
        o.issuer = std::move(issuer);
        o.audience = "https://ehr.example.org/fhir";
        o.now = now;
        return o;
    }
};

// The RFC 7515 A.2/A.3 payload: {"iss":"joe",\r\n "exp":1300819380,\r\n "http://...":true}.
constexpr int64_t kRfc7515Exp = 1300819380;

TEST_F(JoseVectors, Rfc7515A1Hs256IsRefused) {
    const std::string token = latchset("rfc7515_A.1.jwsc");
    EXPECT_EQ(parse_keys_error(R"({"keys":[)" + latchset("rfc7515_A.1.jwk") + "]}"),
              "keys[0]: symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
    const KeySet rsa = parse_keys(public_jwks(latchset("rfc7515_A.2.jwk")));
    EXPECT_EQ(verify_signature_only(token, rsa, kAllAlgorithms), TokenError::AlgNotAllowed);
    EXPECT_EQ(verify_jwt(token, rsa, options(kRfc7515Exp - 100)).error, TokenError::AlgNotAllowed);
}

TEST_F(JoseVectors, Rfc7515A2Rs256) {
    const std::string token = latchset("rfc7515_A.2.jwsc");
    const std::string jwk = latchset("rfc7515_A.2.jwk");
    // The vector file holds the private key, which a trusted JWKS must never contain.
    EXPECT_EQ(parse_keys_error(R"({"keys":[)" + jwk + "]}"),
              "keys[0]: private key member \"d\" present: a trusted JWKS must hold public keys "
              "only");
    const KeySet keys = parse_keys(public_jwks(jwk));
    EXPECT_EQ(keys.info(0).bits, 2048);
    EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::None);
    const Algorithm rs256[] = {Algorithm::RS256};
    EXPECT_EQ(verify_signature_only(token, keys, rs256), TokenError::None);
    const Algorithm ps256[] = {Algorithm::PS256};
    EXPECT_EQ(verify_signature_only(token, keys, ps256), TokenError::AlgNotAllowed);
    // Claims: expired today; before its exp it is valid but has no audience.
    EXPECT_EQ(verify_jwt(token, keys, options(kNow)).error, TokenError::Expired);
    EXPECT_EQ(verify_jwt(token, keys, options(kRfc7515Exp - 100)).error, TokenError::WrongAudience);
    EXPECT_EQ(verify_jwt(token, keys, options(kRfc7515Exp - 100, "mallory")).error,
              TokenError::WrongIssuer);
    // One changed character in the payload breaks the signature.
    std::string tampered = token;
    const size_t at = tampered.find('.') + 5;
    tampered[at] = tampered[at] == 'A' ? 'B' : 'A';
    EXPECT_EQ(verify_signature_only(tampered, keys, kAllAlgorithms), TokenError::BadSignature);
}

TEST_F(JoseVectors, Rfc7515A3Es256) {
    const std::string token = latchset("rfc7515_A.3.jwsc");
    const KeySet keys = parse_keys(public_jwks(latchset("rfc7515_A.3.jwk")));
    EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::None);
    EXPECT_EQ(verify_jwt(token, keys, options(kNow)).error, TokenError::Expired);
    EXPECT_EQ(verify_jwt(token, keys, options(kRfc7515Exp - 100)).error, TokenError::WrongAudience);
    // Against the RSA key of A.2: no EC key at all.
    const KeySet rsa = parse_keys(public_jwks(latchset("rfc7515_A.2.jwk")));
    EXPECT_EQ(verify_signature_only(token, rsa, kAllAlgorithms), TokenError::UnknownKey);
}

TEST_F(JoseVectors, Rfc7515A4Es512) {
    const std::string token = latchset("rfc7515_A.4.jwsc");
    const KeySet keys = parse_keys(public_jwks(latchset("rfc7515_A.4.jwk")));
    EXPECT_EQ(keys.info(0).crv, "P-521");
    EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::None);
    // The payload is the bare word "Payload".
    EXPECT_EQ(verify_jwt(token, keys, options(kNow)).error, TokenError::PayloadNotJson);
}

TEST_F(JoseVectors, Rfc7515A5UnsecuredIsAlgNone) {
    const std::string token = latchset("rfc7515_A.5.jwsc");
    const KeySet keys = parse_keys(public_jwks(latchset("rfc7515_A.2.jwk")));
    EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::AlgNone);
    EXPECT_EQ(verify_jwt(token, keys, options(kRfc7515Exp - 100)).error, TokenError::AlgNone);
}

TEST_F(JoseVectors, Rfc7517KeySets) {
    // A.1: public keys; the EC key is for encryption and never verifies.
    const KeySet a1 = parse_keys(latchset("rfc7517_A.1.jwkset"));
    ASSERT_EQ(a1.size(), 2u);
    EXPECT_EQ(a1.info(0).kid, "1");
    EXPECT_FALSE(a1.info(0).verifies);
    EXPECT_EQ(a1.info(1).kid, "2011-04-29");
    EXPECT_EQ(a1.info(1).alg, Algorithm::RS256);
    EXPECT_TRUE(a1.info(1).verifies);
    // A.2: the same keys with private parts.
    EXPECT_EQ(parse_keys_error(latchset("rfc7517_A.2.jwkset")),
              "keys[0]: private key member \"d\" present: a trusted JWKS must hold public keys "
              "only");
    // A.3: symmetric keys.
    EXPECT_EQ(parse_keys_error(latchset("rfc7517_A.3.jwkset")),
              "keys[0]: symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
    // B: an RSA key with an x5c chain member (harmless inside a trusted JWK).
    const KeySet b = parse_keys(R"({"keys":[)" + latchset("rfc7517_B.jwk") + "]}");
    EXPECT_EQ(b.info(0).kid, "1b94c");
    EXPECT_TRUE(b.info(0).verifies);
    // RFC 7520 4.8: private RSA and EC keys plus an HMAC key.
    EXPECT_FALSE(KeySet::parse(latchset("rfc7520_4.8.jwkset"), nullptr).has_value());
}

TEST_F(JoseVectors, Rfc7520LatchsetSignatures) {
    const struct {
        const char *name;
        Algorithm alg;
    } cases[] = {
        {"rfc7520_4.1", Algorithm::RS256},
        {"rfc7520_4.2", Algorithm::PS384},
        {"rfc7520_4.3", Algorithm::ES512},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.name);
        const std::string token = latchset(std::string(c.name) + ".jwsc");
        const KeySet keys = parse_keys(public_jwks(latchset(std::string(c.name) + ".jwk")));
        EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::None);
        const Algorithm only[] = {c.alg};
        EXPECT_EQ(verify_signature_only(token, keys, only), TokenError::None);
        // The payload is a line of Tolkien, not claims.
        const VerifyResult result = verify_jwt(token, keys, options(kNow));
        EXPECT_EQ(result.error, TokenError::PayloadNotJson);
        EXPECT_EQ(result.kid, "bilbo.baggins@hobbiton.example");
        EXPECT_EQ(result.alg, c.alg);
    }
    // 4.4 is HMAC.
    const KeySet rsa = parse_keys(public_jwks(latchset("rfc7520_4.1.jwk")));
    EXPECT_EQ(verify_signature_only(latchset("rfc7520_4.4.jwsc"), rsa, kAllAlgorithms),
              TokenError::AlgNotAllowed);
}

TEST_F(JoseVectors, Rfc7520CookbookSignatures) {
    const struct {
        const char *file;
        Algorithm alg;
        TokenError jwt;
    } cases[] = {
        {"4_1.rsa_v15_signature.json", Algorithm::RS256, TokenError::PayloadNotJson},
        {"4_2.rsa-pss_signature.json", Algorithm::PS384, TokenError::PayloadNotJson},
        {"4_3.ecdsa_signature.json", Algorithm::ES512, TokenError::PayloadNotJson},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.file);
        json::ParseError error;
        const std::optional<json::Value> doc =
            json::parse(read_file(kVectors / "rfc7520-cookbook" / "jws" / c.file), &error);
        ASSERT_TRUE(doc.has_value()) << error.message;
        const json::Value *key = doc->find("input")->find("key");
        ASSERT_NE(key, nullptr);
        EXPECT_EQ(*doc->find("input")->find("alg")->as_string(), algorithm_name(c.alg));
        const std::string token = *doc->find("output")->find("compact")->as_string();
        const KeySet keys = parse_keys(R"({"keys":[)" + public_jwk(*key) + "]}");
        EXPECT_EQ(verify_signature_only(token, keys, kAllAlgorithms), TokenError::None);
        EXPECT_EQ(verify_jwt(token, keys, options(kNow)).error, c.jwt);
        // The decoded payload is the cookbook's input text.
        const std::string payload_b64 =
            token.substr(token.find('.') + 1, token.rfind('.') - token.find('.') - 1);
        EXPECT_EQ(base64url::decode(payload_b64),
                  *doc->find("input")->find("payload")->as_string());
    }
    // The HMAC example is refused whatever keys we hold.
    const std::optional<json::Value> hmac =
        json::parse(read_file(kVectors / "rfc7520-cookbook" / "jws" /
                              "4_4.hmac-sha2_integrity_protection.json"),
                    nullptr);
    ASSERT_TRUE(hmac.has_value());
    const KeySet rsa = parse_keys(
        R"({"keys":[)" +
        read_file(kVectors / "rfc7520-cookbook" / "jwk" / "3_3.rsa_public_key.json") + "]}");
    EXPECT_EQ(verify_signature_only(*hmac->find("output")->find("compact")->as_string(), rsa,
                                    kAllAlgorithms),
              TokenError::AlgNotAllowed);
}

TEST_F(JoseVectors, Rfc7520CookbookKeys) {
    const auto jwk = [](const char *file) {
        return R"({"keys":[)" + read_file(kVectors / "rfc7520-cookbook" / "jwk" / file) + "]}";
    };
    const KeySet ec = parse_keys(jwk("3_1.ec_public_key.json"));
    EXPECT_EQ(ec.info(0).crv, "P-521");
    EXPECT_EQ(ec.info(0).bits, 521);
    const KeySet rsa = parse_keys(jwk("3_3.rsa_public_key.json"));
    EXPECT_EQ(rsa.info(0).bits, 2048);
    EXPECT_EQ(parse_keys_error(jwk("3_2.ec_private_key.json")),
              "keys[0]: private key member \"d\" present: a trusted JWKS must hold public keys "
              "only");
    EXPECT_EQ(parse_keys_error(jwk("3_4.rsa_private_key.json")),
              "keys[0]: private key member \"d\" present: a trusted JWKS must hold public keys "
              "only");
    EXPECT_EQ(parse_keys_error(jwk("3_5.symmetric_key_mac_computation.json")),
              "keys[0]: symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
}

}  // namespace
}  // namespace ehrgate::jose
