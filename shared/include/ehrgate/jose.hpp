// JWS/JWT verification (RFC 7515, 7518, 7519) for bearer tokens, on OpenSSL 3's EVP API.
//
// Only asymmetric algorithms exist here: RS256/384/512, PS256/384/512, ES256/384/512. There are
// no symmetric keys, so the classic HS256-keyed-with-the-public-key confusion cannot verify, and
// "none" is refused in any spelling. Everything a token could use to choose its own key (jwk,
// jku, x5u, x5c headers) is refused; the key always comes from the KeySet the operator trusts.
//
// Runs on the nginx request path: nothing here throws, uses global state or does I/O; the clock
// is the `now` the caller passes in.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ehrgate::jose {

enum class Algorithm : uint8_t { RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512 };

inline constexpr std::array<Algorithm, 9> kAllAlgorithms = {
    Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384,
    Algorithm::PS512, Algorithm::ES256, Algorithm::ES384, Algorithm::ES512};

// The JWA name, e.g. "PS384".
std::string_view algorithm_name(Algorithm alg);
// Exact, case-sensitive JWA name; nullopt for anything else (HS256 and "none" included).
std::optional<Algorithm> algorithm_from_name(std::string_view name);

// Why a token was refused. Each has a stable name (token_error_name) for logs and metrics.
enum class TokenError : uint8_t {
    None,                  // "none": verified
    TooLarge,              // "too-large": over max_token_bytes, checked before any decoding
    Malformed,             // "malformed": not three segments, or an empty segment (an empty
                           // signature only after the header checks: "alg":"none" counts as such)
    BadBase64url,          // "bad-base64url": a segment is not canonical unpadded base64url
    HeaderNotJson,         // "header-not-json": header is not a JSON object
    PayloadNotJson,        // "payload-not-json": payload is not a JSON object
    DuplicateKey,          // "duplicate-key": header or payload repeats a member name
    BadHeader,             // "bad-header": alg missing or not a string, kid not a string
    AlgNone,               // "alg-none": alg is "none" in any letter case
    AlgNotAllowed,         // "alg-not-allowed": alg unknown, symmetric, or not in the allow-list
    ForbiddenHeader,       // "forbidden-header": jwk, jku, x5u or x5c present
    UnknownCrit,           // "unknown-crit": crit present (we understand no extension)
    BadTyp,                // "bad-typ": typ present and not JWT / at+jwt
    UnknownKey,            // "unknown-key": no verification key with this kid (or for this alg)
    KeyAlgorithmMismatch,  // "key-algorithm-mismatch": the kid names a key of another type/curve
    BadSignature,          // "bad-signature"
    BadClaimType,          // "bad-claim-type": a registered or SMART claim has the wrong JSON type
    MissingExp,            // "missing-exp"
    Expired,               // "expired": exp + leeway <= now
    NotYetValid,           // "not-yet-valid": nbf - leeway > now
    IssuedInFuture,        // "issued-in-future": iat - leeway > now
    WrongIssuer,           // "wrong-issuer"
    WrongAudience,         // "wrong-audience"
    Internal,              // "internal-error": out of memory or an OpenSSL failure
};

std::string_view token_error_name(TokenError error);

// Public facts about one key of a KeySet, for diagnostics.
struct KeyInfo {
    std::string kid;               // empty when the JWK has none
    std::string kty;               // "RSA" or "EC"
    std::string crv;               // "P-256", "P-384" or "P-521" for EC keys
    std::optional<Algorithm> alg;  // the JWK's "alg", when it names one of ours
    // False for keys that must never verify a signature: "use":"enc", a "use" we do not know,
    // "key_ops" without "verify", or an "alg" outside our algorithms.
    bool verifies = false;
    int bits = 0;  // RSA modulus or EC field size
};

// The trusted verification keys, parsed once from a JWKS document. Immutable after parse and
// cheap to copy (one shared pointer), so one set can be shared by every request and thread.
class KeySet {
  public:
    static constexpr size_t kMaxKeys = 64;
    static constexpr int kMinRsaBits = 2048;
    static constexpr int kMaxRsaBits = 16384;

    KeySet();  // empty: verifies nothing

    // Parses {"keys":[...]}. Refuses the whole document (nullopt, reason in `error`) when any key
    // is unacceptable: private key material ("d" or other private members), symmetric ("oct")
    // or unknown kty, RSA under kMinRsaBits, an EC point not on its curve, a missing or
    // malformed member, or an "alg" that contradicts the key type; also an empty set, one with
    // no key usable for verification, over kMaxKeys keys, or over 1 MiB. A trusted JWKS with a
    // bad key is a misconfiguration worth failing loudly on, not a key to skip quietly.
    static std::optional<KeySet> parse(std::string_view jwks_json, std::string *error) noexcept;

    size_t size() const;
    const KeyInfo &info(size_t index) const;  // index < size()

    struct Impl;
    const Impl &impl() const { return *impl_; }

  private:
    explicit KeySet(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
    std::shared_ptr<const Impl> impl_;
};

inline constexpr size_t kDefaultMaxTokenBytes = 8192;

struct VerifyOptions {
    std::vector<Algorithm> allowed_algorithms;
    // Both always checked: an empty issuer or audience matches no token (fail closed).
    std::string issuer;
    std::string audience;
    int64_t now = 0;  // unix seconds
    int64_t leeway_seconds = 60;
    size_t max_token_bytes = kDefaultMaxTokenBytes;
    bool require_exp = true;
};

// Claims of a verified token. Absent string claims are empty; absent times are nullopt.
// Fractional NumericDates are rounded towards the stricter side (exp down, nbf/iat up).
struct Claims {
    std::string iss;
    std::string sub;
    std::vector<std::string> aud;  // "aud" as a string becomes a one-element list
    std::optional<int64_t> exp;
    std::optional<int64_t> nbf;
    std::optional<int64_t> iat;
    std::string jti;
    std::string client_id;                    // "client_id" (RFC 9068), else "azp"
    std::string scope;                        // space-separated, as sent
    std::string patient;                      // SMART launch context
    std::string fhir_user;                    // "fhirUser"
    std::vector<std::string> purpose_of_use;  // "purpose_of_use": a string or a list of strings
    std::string cnf_x5t_s256;          // "cnf":{"x5t#S256":...} (RFC 8705 certificate binding)
    std::string break_glass_reason{};  // "break_glass_reason" (consent, issue 5)
};

struct VerifyResult {
    TokenError error = TokenError::Internal;
    // From the header, filled as soon as it is known (also on most failures, for logs).
    std::string kid;
    std::optional<Algorithm> alg;
    Claims claims;  // only on success

    bool ok() const { return error == TokenError::None; }
};

// Full JWT verification. Check order: size, structure, header, key, signature, then claims; the
// payload is not even parsed until the signature holds. Claims are checked as: types of the
// claims we read (bad-claim-type), exp, nbf, iat, iss, aud. Never throws.
VerifyResult verify_jwt(std::string_view compact, const KeySet &keys,
                        const VerifyOptions &options) noexcept;

// The same checks up to and including the signature, without parsing the payload: for test
// vectors whose payloads are not JWT claims.
TokenError verify_signature_only(std::string_view compact, const KeySet &keys,
                                 std::span<const Algorithm> allowed,
                                 size_t max_token_bytes = kDefaultMaxTokenBytes) noexcept;

}  // namespace ehrgate::jose
