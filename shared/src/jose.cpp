#include "ehrgate/jose.hpp"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <new>

#include "ehrgate/base64url.hpp"
#include "ehrgate/json.hpp"

namespace ehrgate::jose {

namespace {

enum class Family : uint8_t { Rsa, Ec };

struct AlgSpec {
    Algorithm alg;
    std::string_view name;
    Family family;
    bool pss;
    std::string_view crv;  // EC only
    int digest_bits;
};

constexpr AlgSpec kSpecs[] = {
    {Algorithm::RS256, "RS256", Family::Rsa, false, "", 256},
    {Algorithm::RS384, "RS384", Family::Rsa, false, "", 384},
    {Algorithm::RS512, "RS512", Family::Rsa, false, "", 512},
    {Algorithm::PS256, "PS256", Family::Rsa, true, "", 256},
    {Algorithm::PS384, "PS384", Family::Rsa, true, "", 384},
    {Algorithm::PS512, "PS512", Family::Rsa, true, "", 512},
    {Algorithm::ES256, "ES256", Family::Ec, false, "P-256", 256},
    {Algorithm::ES384, "ES384", Family::Ec, false, "P-384", 384},
    {Algorithm::ES512, "ES512", Family::Ec, false, "P-521", 512},
};

const AlgSpec &spec_of(Algorithm alg) {
    return kSpecs[static_cast<size_t>(alg)];
}

const EVP_MD *digest_of(const AlgSpec &spec) {
    switch (spec.digest_bits) {
        case 256:
            return EVP_sha256();
        case 384:
            return EVP_sha384();
        default:
            return EVP_sha512();
    }
}

struct Curve {
    std::string_view crv;
    size_t bytes;
};

constexpr Curve kCurves[] = {{"P-256", 32}, {"P-384", 48}, {"P-521", 66}};

// Kid-less tokens are tried against at most this many keys (and so are kids shared by several
// keys), so a token cannot make one request cost a verification per key of a large JWKS.
constexpr size_t kMaxCandidates = 4;

// Members that only private or symmetric JWKs carry (RFC 7518 section 6).
constexpr std::string_view kPrivateMembers[] = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"};

// Header members that let the token pick its own verification key.
constexpr std::string_view kForbiddenHeaders[] = {"jwk", "jku", "x5u", "x5c"};

struct BnFree {
    void operator()(BIGNUM *bn) const { BN_free(bn); }
};
struct ParamBldFree {
    void operator()(OSSL_PARAM_BLD *bld) const { OSSL_PARAM_BLD_free(bld); }
};
struct ParamFree {
    void operator()(OSSL_PARAM *params) const { OSSL_PARAM_free(params); }
};
struct PkeyCtxFree {
    void operator()(EVP_PKEY_CTX *ctx) const { EVP_PKEY_CTX_free(ctx); }
};
struct MdCtxFree {
    void operator()(EVP_MD_CTX *ctx) const { EVP_MD_CTX_free(ctx); }
};
using BnPtr = std::unique_ptr<BIGNUM, BnFree>;
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, ParamBldFree>;
using ParamPtr = std::unique_ptr<OSSL_PARAM, ParamFree>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, MdCtxFree>;

// OpenSSL reports failures on a per-thread error queue. Errors we expect (a bad signature, an
// off-curve point) must not linger there: nginx reads that queue after its own TLS calls and
// would log our leftovers against an unrelated connection.
class ErrorQueueMark {
  public:
    ErrorQueueMark() { ERR_set_mark(); }
    ~ErrorQueueMark() { ERR_pop_to_mark(); }
    ErrorQueueMark(const ErrorQueueMark &) = delete;
    ErrorQueueMark &operator=(const ErrorQueueMark &) = delete;
};

bool equals_ignore_case(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               const auto lower = [](char c) {
                   return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
               };
               return lower(x) == lower(y);
           });
}

}  // namespace

struct KeySet::Impl {
    struct Key {
        KeyInfo info;
        Family family = Family::Rsa;
        std::shared_ptr<EVP_PKEY> pkey;
        size_t signature_bytes = 0;  // RSA: modulus bytes; EC: 2 * coordinate bytes
        std::string ec_order;        // EC: group order, big-endian, coordinate bytes long
        // One EVP_DigestVerifyInit'ed context per algorithm this key may verify, indexed by
        // Algorithm; null for the others. Under OpenSSL 3 the init (provider and algorithm
        // fetches, key export) costs as much as an RSA-2048 verification itself, so it is done
        // once here and each verification copies the template instead. The templates are never
        // modified after parse: EVP_MD_CTX_copy_ex only reads its source (and takes reference
        // counts atomically), so threads may copy the same template concurrently.
        std::array<std::unique_ptr<EVP_MD_CTX, MdCtxFree>, kAllAlgorithms.size()> templates;
    };
    std::vector<Key> keys;
};

namespace {

using Key = KeySet::Impl::Key;

bool key_fits(const Key &key, const AlgSpec &spec) {
    if (key.family != spec.family) {
        return false;
    }
    if (spec.family == Family::Ec && key.info.crv != spec.crv) {
        return false;
    }
    return !key.info.alg || *key.info.alg == spec.alg;
}

// Builds the per-algorithm verification templates of a key (see Impl::Key::templates).
bool prepare_templates(Key &key) {
    if (!key.info.verifies) {
        return true;
    }
    for (const AlgSpec &spec : kSpecs) {
        if (!key_fits(key, spec)) {
            continue;
        }
        MdCtxPtr ctx(EVP_MD_CTX_new());
        EVP_PKEY_CTX *pctx = nullptr;
        const EVP_MD *md = digest_of(spec);
        if (!ctx || EVP_DigestVerifyInit(ctx.get(), &pctx, md, nullptr, key.pkey.get()) != 1) {
            return false;
        }
        if (spec.pss && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
                         EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) != 1 ||
                         EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, md) != 1)) {
            return false;
        }
        key.templates[static_cast<size_t>(spec.alg)] = std::move(ctx);
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// JWKS parsing

class JwkReader {
  public:
    JwkReader(const json::Value &jwk, size_t index, std::string *error)
        : jwk_(jwk), prefix_("keys[" + std::to_string(index) + "]: "), error_(error) {}

    std::optional<Key> read() {
        if (!jwk_.is_object()) {
            return fail("a key must be a JSON object");
        }
        const std::string *kty = nullptr;
        if (!required_string("kty", &kty)) {
            return std::nullopt;
        }
        if (*kty == "oct") {
            return fail("symmetric (\"oct\") keys are not accepted: only RSA and EC public keys");
        }
        for (const std::string_view member : kPrivateMembers) {
            if (jwk_.find(member) != nullptr) {
                return fail("private key member \"" + std::string(member) +
                            "\" present: a trusted JWKS must hold public keys only");
            }
        }
        Key key;
        key.info.verifies = true;
        if (!read_metadata(key)) {
            return std::nullopt;
        }
        if (*kty == "RSA") {
            if (!read_rsa(key)) {
                return std::nullopt;
            }
        } else if (*kty == "EC") {
            if (!read_ec(key)) {
                return std::nullopt;
            }
        } else {
            return fail("unsupported kty \"" + printable(*kty) + "\": expected \"RSA\" or \"EC\"");
        }
        if (key.info.alg) {
            const AlgSpec &spec = spec_of(*key.info.alg);
            if (spec.family != key.family ||
                (spec.family == Family::Ec && spec.crv != key.info.crv)) {
                return fail("alg \"" + std::string(spec.name) + "\" does not match kty \"" +
                            key.info.kty + "\"" +
                            (key.info.crv.empty() ? "" : " crv \"" + key.info.crv + "\""));
            }
        }
        if (!prepare_templates(key)) {
            return fail("OpenSSL could not set up verification with this key");
        }
        return key;
    }

  private:
    std::nullopt_t fail(const std::string &message) {
        if (error_ != nullptr) {
            *error_ = prefix_ + message;
        }
        return std::nullopt;
    }

    static std::string printable(std::string_view text) {
        std::string out;
        for (size_t i = 0; i < text.size() && i < 32; ++i) {
            const char ch = text[i];
            out.push_back(ch >= 0x20 && ch < 0x7f && ch != '"' ? ch : '?');
        }
        return out;
    }

    bool required_string(std::string_view name, const std::string **out) {
        const json::Value *value = jwk_.find(name);
        if (value == nullptr) {
            fail("missing \"" + std::string(name) + "\"");
            return false;
        }
        *out = value->as_string();
        if (*out == nullptr) {
            fail("\"" + std::string(name) + "\" must be a string");
            return false;
        }
        return true;
    }

    // nullptr when absent; false when present with another type.
    bool optional_string(std::string_view name, const std::string **out) {
        *out = nullptr;
        const json::Value *value = jwk_.find(name);
        if (value == nullptr) {
            return true;
        }
        *out = value->as_string();
        if (*out == nullptr) {
            fail("\"" + std::string(name) + "\" must be a string");
            return false;
        }
        return true;
    }

    bool read_bytes(std::string_view name, std::string *out) {
        const std::string *text = nullptr;
        if (!required_string(name, &text)) {
            return false;
        }
        std::optional<std::string> bytes = base64url::decode(*text);
        if (!bytes || bytes->empty()) {
            fail("\"" + std::string(name) + "\" is not non-empty unpadded base64url");
            return false;
        }
        *out = std::move(*bytes);
        return true;
    }

    bool read_metadata(Key &key) {
        const std::string *kid = nullptr;
        const std::string *use = nullptr;
        const std::string *alg = nullptr;
        if (!optional_string("kid", &kid) || !optional_string("use", &use) ||
            !optional_string("alg", &alg)) {
            return false;
        }
        if (kid != nullptr) {
            key.info.kid = *kid;
        }
        // RFC 7517 4.2: "enc" keys encrypt; other values are not ours to interpret.
        if (use != nullptr && *use != "sig") {
            key.info.verifies = false;
        }
        if (const json::Value *ops = jwk_.find("key_ops")) {
            const json::Value::Array *list = ops->as_array();
            if (list == nullptr) {
                fail("\"key_ops\" must be an array of strings");
                return false;
            }
            bool verify = false;
            for (const json::Value &op : *list) {
                const std::string *name = op.as_string();
                if (name == nullptr) {
                    fail("\"key_ops\" must be an array of strings");
                    return false;
                }
                verify = verify || *name == "verify";
            }
            key.info.verifies = key.info.verifies && verify;
        }
        if (alg != nullptr) {
            key.info.alg = algorithm_from_name(*alg);
            // A key reserved for an algorithm we do not implement (RSA-OAEP, EdDSA, ...) is
            // never used with one we do.
            if (!key.info.alg) {
                key.info.verifies = false;
            }
        }
        return true;
    }

    bool read_rsa(Key &key) {
        std::string n_bytes;
        std::string e_bytes;
        if (!read_bytes("n", &n_bytes) || !read_bytes("e", &e_bytes)) {
            return false;
        }
        key.family = Family::Rsa;
        key.info.kty = "RSA";
        BnPtr n(BN_bin2bn(reinterpret_cast<const unsigned char *>(n_bytes.data()),
                          static_cast<int>(n_bytes.size()), nullptr));
        BnPtr e(BN_bin2bn(reinterpret_cast<const unsigned char *>(e_bytes.data()),
                          static_cast<int>(e_bytes.size()), nullptr));
        if (!n || !e) {
            throw std::bad_alloc();
        }
        const int bits = BN_num_bits(n.get());
        if (bits < KeySet::kMinRsaBits) {
            fail("RSA modulus of " + std::to_string(bits) + " bits is below the minimum of " +
                 std::to_string(KeySet::kMinRsaBits));
            return false;
        }
        if (bits > KeySet::kMaxRsaBits) {
            fail("RSA modulus of " + std::to_string(bits) + " bits is above the maximum of " +
                 std::to_string(KeySet::kMaxRsaBits));
            return false;
        }
        if (!BN_is_odd(n.get())) {
            fail("RSA modulus is even");
            return false;
        }
        if (!BN_is_odd(e.get()) || BN_is_one(e.get()) || BN_num_bits(e.get()) > 64) {
            fail("RSA public exponent must be odd, greater than 1 and at most 64 bits");
            return false;
        }
        key.info.bits = bits;
        key.signature_bytes = static_cast<size_t>((bits + 7) / 8);

        ParamBldPtr bld(OSSL_PARAM_BLD_new());
        if (!bld || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
            OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
            throw std::bad_alloc();
        }
        ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
        PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr));
        EVP_PKEY *pkey = nullptr;
        if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
            EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
            fail("OpenSSL refused the RSA public key");
            return false;
        }
        key.pkey.reset(pkey, EVP_PKEY_free);
        return true;
    }

    bool read_ec(Key &key) {
        const std::string *crv = nullptr;
        if (!required_string("crv", &crv)) {
            return false;
        }
        const Curve *curve = nullptr;
        for (const Curve &candidate : kCurves) {
            if (candidate.crv == *crv) {
                curve = &candidate;
            }
        }
        if (curve == nullptr) {
            fail("unsupported crv \"" + printable(*crv) + "\": expected P-256, P-384 or P-521");
            return false;
        }
        key.family = Family::Ec;
        key.info.kty = "EC";
        key.info.crv = std::string(curve->crv);
        key.info.bits = curve->crv == "P-521" ? 521 : static_cast<int>(curve->bytes * 8);
        key.signature_bytes = curve->bytes * 2;
        std::string x;
        std::string y;
        if (!read_bytes("x", &x) || !read_bytes("y", &y)) {
            return false;
        }
        // RFC 7518 6.2.1.2: coordinates are the full field size, leading zeros included.
        if (x.size() != curve->bytes || y.size() != curve->bytes) {
            fail("\"x\" and \"y\" must be " + std::to_string(curve->bytes) + " bytes for " +
                 key.info.crv);
            return false;
        }
        std::string point;
        point.reserve(1 + 2 * curve->bytes);
        point.push_back('\x04');  // uncompressed SEC1 point
        point += x;
        point += y;

        ParamBldPtr bld(OSSL_PARAM_BLD_new());
        if (!bld ||
            OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                            key.info.crv.c_str(), 0) != 1 ||
            OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                             point.size()) != 1) {
            throw std::bad_alloc();
        }
        ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
        PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
        if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1) {
            throw std::bad_alloc();
        }
        EVP_PKEY *pkey = nullptr;
        const std::string off_curve = "(x, y) is not a point on " + key.info.crv;
        if (EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
            fail(off_curve);
            return false;
        }
        key.pkey.reset(pkey, EVP_PKEY_free);
        // fromdata decodes the point; the public check is the explicit guarantee that it lies on
        // the curve and is not the point at infinity (invalid-curve attacks).
        PkeyCtxPtr check(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
        if (!check) {
            throw std::bad_alloc();
        }
        if (EVP_PKEY_public_check(check.get()) != 1) {
            fail(off_curve);
            return false;
        }
        BIGNUM *order = nullptr;
        if (EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_ORDER, &order) != 1) {
            fail("OpenSSL did not report the order of " + key.info.crv);
            return false;
        }
        BnPtr order_owner(order);
        key.ec_order.assign(curve->bytes, '\0');
        if (BN_bn2binpad(order, reinterpret_cast<unsigned char *>(key.ec_order.data()),
                         static_cast<int>(curve->bytes)) < 0) {
            fail("unexpected order size for " + key.info.crv);
            return false;
        }
        return true;
    }

    const json::Value &jwk_;
    std::string prefix_;
    std::string *error_;
};

// ---------------------------------------------------------------------------------------------
// Signature verification

// JWS carries ECDSA signatures as fixed-size r || s (RFC 7518 3.4); OpenSSL wants DER. Refuses
// r or s of zero or not below the group order, which no valid signature has.
size_t ecdsa_raw_to_der(std::string_view raw, std::string_view order, unsigned char *out) {
    const size_t half = raw.size() / 2;
    unsigned char integers[2][2 + 1 + 66];
    size_t lengths[2];
    for (size_t part = 0; part < 2; ++part) {
        const std::string_view value = raw.substr(part * half, half);
        if (value.compare(order) >= 0) {  // same length, so this compares big-endian numbers
            return 0;
        }
        size_t skip = 0;
        while (skip < half && value[skip] == '\0') {
            ++skip;
        }
        if (skip == half) {
            return 0;
        }
        const bool pad = (static_cast<unsigned char>(value[skip]) & 0x80) != 0;
        const size_t length = half - skip + (pad ? 1 : 0);
        unsigned char *p = integers[part];
        *p++ = 0x02;
        *p++ = static_cast<unsigned char>(length);  // at most 67: short form
        if (pad) {
            *p++ = 0x00;
        }
        std::copy(value.begin() + static_cast<std::ptrdiff_t>(skip), value.end(), p);
        lengths[part] = 2 + length;
    }
    const size_t body = lengths[0] + lengths[1];
    size_t pos = 0;
    out[pos++] = 0x30;
    if (body >= 0x80) {
        out[pos++] = 0x81;
    }
    out[pos++] = static_cast<unsigned char>(body);
    for (size_t part = 0; part < 2; ++part) {
        std::copy(integers[part], integers[part] + lengths[part], out + pos);
        pos += lengths[part];
    }
    return pos;
}

constexpr size_t kMaxEcdsaDer = 3 + 2 * (2 + 1 + 66);

enum class Outcome : uint8_t { Verified, Failed, Internal };

Outcome verify_with_key(const Key &key, const AlgSpec &spec, std::string_view signing_input,
                        std::string_view signature) {
    const EVP_MD_CTX *tmpl = key.templates[static_cast<size_t>(spec.alg)].get();
    if (tmpl == nullptr) {
        return Outcome::Failed;  // not reached: candidates are selected with key_fits
    }
    if (signature.size() != key.signature_bytes) {
        return Outcome::Failed;
    }
    const auto *sig = reinterpret_cast<const unsigned char *>(signature.data());
    size_t sig_length = signature.size();
    unsigned char der[kMaxEcdsaDer];
    if (spec.family == Family::Ec) {
        sig_length = ecdsa_raw_to_der(signature, key.ec_order, der);
        if (sig_length == 0) {
            return Outcome::Failed;
        }
        sig = der;
    }
    ErrorQueueMark mark;
    MdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_MD_CTX_copy_ex(ctx.get(), tmpl) != 1) {
        return Outcome::Internal;
    }
    // Without FINALISE, EVP_DigestVerifyFinal duplicates the whole context once more so the
    // caller could keep feeding data; this context is used once.
    EVP_MD_CTX_set_flags(ctx.get(), EVP_MD_CTX_FLAG_FINALISE);
    return EVP_DigestVerify(ctx.get(), sig, sig_length,
                            reinterpret_cast<const unsigned char *>(signing_input.data()),
                            signing_input.size()) == 1
               ? Outcome::Verified
               : Outcome::Failed;
}

// With a kid: the verifying keys carrying it (unknown-key if none; key-algorithm-mismatch if
// none of them fits the alg). Without: the verifying keys that fit the alg. At most
// kMaxCandidates are tried, in JWKS order.
TokenError select_and_verify(const KeySet::Impl &impl, const AlgSpec &spec, const std::string *kid,
                             std::string_view signing_input, std::string_view signature) {
    const Key *candidates[kMaxCandidates];
    size_t count = 0;
    bool kid_known = false;
    for (const Key &key : impl.keys) {
        if (!key.info.verifies) {
            continue;
        }
        if (kid != nullptr) {
            // A JWK without a kid is never selected by one (not even by "kid":"").
            if (key.info.kid.empty() || key.info.kid != *kid) {
                continue;
            }
            kid_known = true;
        }
        if (key_fits(key, spec) && count < kMaxCandidates) {
            candidates[count++] = &key;
        }
    }
    if (count == 0) {
        return kid != nullptr && kid_known ? TokenError::KeyAlgorithmMismatch
                                           : TokenError::UnknownKey;
    }
    bool internal = false;
    for (size_t i = 0; i < count; ++i) {
        switch (verify_with_key(*candidates[i], spec, signing_input, signature)) {
            case Outcome::Verified:
                return TokenError::None;
            case Outcome::Internal:
                internal = true;
                break;
            case Outcome::Failed:
                break;
        }
    }
    return internal ? TokenError::Internal : TokenError::BadSignature;
}

// ---------------------------------------------------------------------------------------------
// Token structure and header

bool acceptable_typ(std::string_view typ) {
    constexpr std::string_view kMediaPrefix = "application/";
    if (typ.size() > kMediaPrefix.size() &&
        equals_ignore_case(typ.substr(0, kMediaPrefix.size()), kMediaPrefix)) {
        typ.remove_prefix(kMediaPrefix.size());
    }
    return equals_ignore_case(typ, "JWT") || equals_ignore_case(typ, "at+jwt");
}

struct Verified {
    std::string kid;
    std::optional<Algorithm> alg;
    std::string payload;  // decoded, not yet parsed
};

TokenError verify_to_signature(std::string_view compact, const KeySet &keys,
                               std::span<const Algorithm> allowed, size_t max_token_bytes,
                               Verified *out) {
    if (compact.size() > max_token_bytes) {
        return TokenError::TooLarge;
    }
    const size_t dot1 = compact.find('.');
    const size_t dot2 = dot1 == std::string_view::npos ? dot1 : compact.find('.', dot1 + 1);
    if (dot2 == std::string_view::npos || compact.find('.', dot2 + 1) != std::string_view::npos) {
        return TokenError::Malformed;
    }
    const std::string_view header_b64 = compact.substr(0, dot1);
    const std::string_view payload_b64 = compact.substr(dot1 + 1, dot2 - dot1 - 1);
    const std::string_view signature_b64 = compact.substr(dot2 + 1);
    // An empty signature is checked after the header: unsecured JWTs ("alg":"none") have one,
    // and they should be counted as alg-none attempts rather than as noise.
    if (header_b64.empty() || payload_b64.empty()) {
        return TokenError::Malformed;
    }
    std::optional<std::string> header_bytes = base64url::decode(header_b64);
    if (!header_bytes) {
        return TokenError::BadBase64url;
    }
    json::ParseError parse_error;
    const std::optional<json::Value> header = json::parse(
        *header_bytes, &parse_error, json::Limits{.max_bytes = max_token_bytes, .max_depth = 8});
    if (!header) {
        return parse_error.code == json::ParseErrorCode::DuplicateKey  ? TokenError::DuplicateKey
               : parse_error.code == json::ParseErrorCode::OutOfMemory ? TokenError::Internal
                                                                       : TokenError::HeaderNotJson;
    }
    if (!header->is_object()) {
        return TokenError::HeaderNotJson;
    }

    const json::Value *alg_value = header->find("alg");
    const std::string *alg_name = alg_value != nullptr ? alg_value->as_string() : nullptr;
    if (alg_name == nullptr) {
        return TokenError::BadHeader;
    }
    if (equals_ignore_case(*alg_name, "none")) {
        return TokenError::AlgNone;
    }
    const std::optional<Algorithm> alg = algorithm_from_name(*alg_name);
    if (!alg || std::find(allowed.begin(), allowed.end(), *alg) == allowed.end()) {
        return TokenError::AlgNotAllowed;
    }
    out->alg = alg;
    const std::string *kid = nullptr;
    if (const json::Value *kid_value = header->find("kid")) {
        kid = kid_value->as_string();
        if (kid == nullptr) {
            return TokenError::BadHeader;
        }
        out->kid = *kid;
    }
    // RFC 7515 4.1.11: a recipient must refuse a token whose crit lists an extension it does not
    // understand; we understand none, and a malformed crit is refused the same way.
    if (header->find("crit") != nullptr) {
        return TokenError::UnknownCrit;
    }
    for (const std::string_view name : kForbiddenHeaders) {
        if (header->find(name) != nullptr) {
            return TokenError::ForbiddenHeader;
        }
    }
    if (const json::Value *typ = header->find("typ")) {
        const std::string *text = typ->as_string();
        if (text == nullptr || !acceptable_typ(*text)) {
            return TokenError::BadTyp;
        }
    }

    if (signature_b64.empty()) {
        return TokenError::Malformed;
    }
    std::optional<std::string> signature = base64url::decode(signature_b64);
    std::optional<std::string> payload = base64url::decode(payload_b64);
    if (!signature || !payload) {
        return TokenError::BadBase64url;
    }
    const TokenError verdict =
        select_and_verify(keys.impl(), spec_of(*alg), kid, compact.substr(0, dot2), *signature);
    if (verdict == TokenError::None) {
        out->payload = std::move(*payload);
    }
    return verdict;
}

// ---------------------------------------------------------------------------------------------
// Claims

int64_t saturating_add(int64_t a, int64_t b) {
    int64_t sum = 0;
    if (__builtin_add_overflow(a, b, &sum)) {
        return b > 0 ? INT64_MAX : INT64_MIN;
    }
    return sum;
}

// Claim readers: false when the claim has another JSON type.

bool read_string(const json::Value &value, std::string *out) {
    const std::string *text = value.as_string();
    if (text == nullptr) {
        return false;
    }
    *out = *text;
    return true;
}

bool read_string_or_list(const json::Value &value, std::vector<std::string> *out) {
    if (const std::string *text = value.as_string()) {
        out->push_back(*text);
        return true;
    }
    const json::Value::Array *list = value.as_array();
    if (list == nullptr) {
        return false;
    }
    for (const json::Value &item : *list) {
        const std::string *text = item.as_string();
        if (text == nullptr) {
            return false;
        }
        out->push_back(*text);
    }
    return true;
}

// RFC 7519 NumericDate: any JSON number of seconds. Fractions are rounded towards the stricter
// reading: `round_up` for nbf/iat, down for exp.
bool read_numeric_date(const json::Value &value, bool round_up, std::optional<int64_t> *out) {
    if (value.is_int()) {
        *out = *value.as_int();
        return true;
    }
    const std::optional<double> number = value.as_double();
    if (!number) {
        return false;
    }
    const double rounded = round_up ? std::ceil(*number) : std::floor(*number);
    constexpr double kTwo63 = 9223372036854775808.0;
    if (!(rounded >= -kTwo63 && rounded < kTwo63)) {
        return false;
    }
    *out = static_cast<int64_t>(rounded);
    return true;
}

bool read_confirmation(const json::Value &cnf, std::string *x5t_s256) {
    if (!cnf.is_object()) {
        return false;
    }
    const json::Value *thumbprint = cnf.find("x5t#S256");
    return thumbprint == nullptr || read_string(*thumbprint, x5t_s256);
}

// One pass over the claim set (members are unique, the parser saw to it); claims we do not
// interpret may have any type.
TokenError read_claims(const json::Value &payload, Claims *claims) {
    using namespace std::string_view_literals;
    std::string azp;
    bool has_client_id = false;
    for (const auto &[name, value] : *payload.as_object()) {
        bool ok = true;
        if (name == "iss"sv) {
            ok = read_string(value, &claims->iss);
        } else if (name == "sub"sv) {
            ok = read_string(value, &claims->sub);
        } else if (name == "aud"sv) {
            ok = read_string_or_list(value, &claims->aud);
        } else if (name == "exp"sv) {
            ok = read_numeric_date(value, false, &claims->exp);
        } else if (name == "nbf"sv) {
            ok = read_numeric_date(value, true, &claims->nbf);
        } else if (name == "iat"sv) {
            ok = read_numeric_date(value, true, &claims->iat);
        } else if (name == "jti"sv) {
            ok = read_string(value, &claims->jti);
        } else if (name == "client_id"sv) {
            ok = read_string(value, &claims->client_id);
            has_client_id = true;
        } else if (name == "azp"sv) {
            ok = read_string(value, &azp);
        } else if (name == "scope"sv) {
            ok = read_string(value, &claims->scope);
        } else if (name == "patient"sv) {
            ok = read_string(value, &claims->patient);
        } else if (name == "fhirUser"sv) {
            ok = read_string(value, &claims->fhir_user);
        } else if (name == "purpose_of_use"sv) {
            ok = read_string_or_list(value, &claims->purpose_of_use);
        } else if (name == "break_glass_reason"sv) {  // consent (issue 5)
            ok = read_string(value, &claims->break_glass_reason);
        } else if (name == "cnf"sv) {
            ok = read_confirmation(value, &claims->cnf_x5t_s256);
        }
        if (!ok) {
            return TokenError::BadClaimType;
        }
    }
    if (!has_client_id) {
        claims->client_id = std::move(azp);
    }
    return TokenError::None;
}

TokenError check_claims(const Claims &claims, const VerifyOptions &options) {
    const int64_t leeway = std::max<int64_t>(options.leeway_seconds, 0);
    if (!claims.exp) {
        if (options.require_exp) {
            return TokenError::MissingExp;
        }
    } else if (saturating_add(*claims.exp, leeway) <= options.now) {
        return TokenError::Expired;
    }
    if (claims.nbf && saturating_add(*claims.nbf, -leeway) > options.now) {
        return TokenError::NotYetValid;
    }
    if (claims.iat && saturating_add(*claims.iat, -leeway) > options.now) {
        return TokenError::IssuedInFuture;
    }
    if (options.issuer.empty() || claims.iss != options.issuer) {
        return TokenError::WrongIssuer;
    }
    if (options.audience.empty() ||
        std::find(claims.aud.begin(), claims.aud.end(), options.audience) == claims.aud.end()) {
        return TokenError::WrongAudience;
    }
    return TokenError::None;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

std::string_view algorithm_name(Algorithm alg) {
    return spec_of(alg).name;
}

std::optional<Algorithm> algorithm_from_name(std::string_view name) {
    for (const AlgSpec &spec : kSpecs) {
        if (spec.name == name) {
            return spec.alg;
        }
    }
    return std::nullopt;
}

std::string_view token_error_name(TokenError error) {
    switch (error) {
        case TokenError::None:
            return "none";
        case TokenError::TooLarge:
            return "too-large";
        case TokenError::Malformed:
            return "malformed";
        case TokenError::BadBase64url:
            return "bad-base64url";
        case TokenError::HeaderNotJson:
            return "header-not-json";
        case TokenError::PayloadNotJson:
            return "payload-not-json";
        case TokenError::DuplicateKey:
            return "duplicate-key";
        case TokenError::BadHeader:
            return "bad-header";
        case TokenError::AlgNone:
            return "alg-none";
        case TokenError::AlgNotAllowed:
            return "alg-not-allowed";
        case TokenError::ForbiddenHeader:
            return "forbidden-header";
        case TokenError::UnknownCrit:
            return "unknown-crit";
        case TokenError::BadTyp:
            return "bad-typ";
        case TokenError::UnknownKey:
            return "unknown-key";
        case TokenError::KeyAlgorithmMismatch:
            return "key-algorithm-mismatch";
        case TokenError::BadSignature:
            return "bad-signature";
        case TokenError::BadClaimType:
            return "bad-claim-type";
        case TokenError::MissingExp:
            return "missing-exp";
        case TokenError::Expired:
            return "expired";
        case TokenError::NotYetValid:
            return "not-yet-valid";
        case TokenError::IssuedInFuture:
            return "issued-in-future";
        case TokenError::WrongIssuer:
            return "wrong-issuer";
        case TokenError::WrongAudience:
            return "wrong-audience";
        case TokenError::Internal:
            return "internal-error";
    }
    return "unknown";
}

KeySet::KeySet() : impl_(std::make_shared<const Impl>()) {}

size_t KeySet::size() const {
    return impl_->keys.size();
}

const KeyInfo &KeySet::info(size_t index) const {
    return impl_->keys[index].info;
}

std::optional<KeySet> KeySet::parse(std::string_view jwks_json, std::string *error) noexcept {
    const auto fail = [error](std::string message) -> std::optional<KeySet> {
        if (error != nullptr) {
            *error = std::move(message);
        }
        return std::nullopt;
    };
    try {
        ErrorQueueMark mark;
        json::ParseError parse_error;
        const std::optional<json::Value> doc = json::parse(jwks_json, &parse_error);
        if (!doc) {
            return fail("JWKS is not valid JSON at byte " + std::to_string(parse_error.offset) +
                        ": " + parse_error.message);
        }
        const json::Value *keys = doc->find("keys");
        if (keys == nullptr || !keys->is_array()) {
            return fail("JWKS must be an object with a \"keys\" array");
        }
        const json::Value::Array &list = *keys->as_array();
        if (list.empty()) {
            return fail("JWKS has no keys");
        }
        if (list.size() > kMaxKeys) {
            return fail("JWKS has " + std::to_string(list.size()) + " keys, the limit is " +
                        std::to_string(kMaxKeys));
        }
        auto impl = std::make_shared<Impl>();
        impl->keys.reserve(list.size());
        for (size_t i = 0; i < list.size(); ++i) {
            std::optional<Key> key = JwkReader(list[i], i, error).read();
            if (!key) {
                return std::nullopt;
            }
            impl->keys.push_back(std::move(*key));
        }
        if (std::none_of(impl->keys.begin(), impl->keys.end(),
                         [](const Key &key) { return key.info.verifies; })) {
            return fail("JWKS has no key usable for signature verification");
        }
        return KeySet(std::move(impl));
    } catch (...) {  // std::bad_alloc: nothing else is thrown here
        return fail("out of memory");
    }
}

VerifyResult verify_jwt(std::string_view compact, const KeySet &keys,
                        const VerifyOptions &options) noexcept {
    VerifyResult result;
    try {
        Verified verified;
        result.error = verify_to_signature(compact, keys, options.allowed_algorithms,
                                           options.max_token_bytes, &verified);
        result.kid = std::move(verified.kid);
        result.alg = verified.alg;
        if (result.error != TokenError::None) {
            return result;
        }
        json::ParseError parse_error;
        const std::optional<json::Value> payload =
            json::parse(verified.payload, &parse_error,
                        json::Limits{.max_bytes = options.max_token_bytes, .max_depth = 16});
        if (!payload) {
            result.error = parse_error.code == json::ParseErrorCode::DuplicateKey
                               ? TokenError::DuplicateKey
                           : parse_error.code == json::ParseErrorCode::OutOfMemory
                               ? TokenError::Internal
                               : TokenError::PayloadNotJson;
            return result;
        }
        if (!payload->is_object()) {
            result.error = TokenError::PayloadNotJson;
            return result;
        }
        Claims claims;
        result.error = read_claims(*payload, &claims);
        if (result.error == TokenError::None) {
            result.error = check_claims(claims, options);
        }
        if (result.error == TokenError::None) {
            result.claims = std::move(claims);
        }
        return result;
    } catch (...) {  // std::bad_alloc: nothing else is thrown here
        result.error = TokenError::Internal;
        return result;
    }
}

TokenError verify_signature_only(std::string_view compact, const KeySet &keys,
                                 std::span<const Algorithm> allowed,
                                 size_t max_token_bytes) noexcept {
    try {
        Verified verified;
        return verify_to_signature(compact, keys, allowed, max_token_bytes, &verified);
    } catch (...) {  // std::bad_alloc: nothing else is thrown here
        return TokenError::Internal;
    }
}

}  // namespace ehrgate::jose
