#include "consent_signer.hpp"

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "ehrgate/base64url.hpp"
#include "ehrgate/json_text.hpp"

namespace ehrgate::policyd {

namespace {

constexpr const char *kKeyFile = "consent-signing-key.pem";  // P-256, PEM, mode 0600

std::string sha256(std::string_view data) {
    unsigned char digest[32];
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr);
    return std::string(reinterpret_cast<char *>(digest), len);
}

void put_list(std::string &out, const char *key, const std::vector<std::string> &values) {
    out += ",\"";
    out += key;
    out += "\":[";
    for (size_t i = 0; i < values.size(); ++i) {
        out += i == 0 ? "" : ",";
        json::append_string(out, values[i]);
    }
    out += ']';
}

}  // namespace

std::unique_ptr<ConsentSigner> ConsentSigner::load_or_create(const std::string &directory,
                                                             std::string *error) {
    const std::string path = directory + "/" + kKeyFile;
    EVP_PKEY *key = nullptr;
    if (FILE *file = std::fopen(path.c_str(), "r")) {
        key = PEM_read_PrivateKey(file, nullptr, nullptr, nullptr);
        std::fclose(file);
        char curve[32] = {};
        if (key == nullptr || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC ||
            EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, curve, sizeof curve,
                                           nullptr) != 1 ||
            std::strcmp(curve, "prime256v1") != 0) {
            EVP_PKEY_free(key);
            *error = path + " is not a P-256 EC private key";
            return nullptr;
        }
    } else if (errno != ENOENT) {
        *error = "cannot read " + path + ": " + std::strerror(errno);
        return nullptr;
    } else {
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
        if (key == nullptr) {
            *error = "cannot generate a P-256 key";
            return nullptr;
        }
        const std::string temp = path + ".tmp";
        const mode_t old_mask = ::umask(077);
        FILE *file = std::fopen(temp.c_str(), "w");
        ::umask(old_mask);
        const bool written =
            file != nullptr &&
            PEM_write_PrivateKey(file, key, nullptr, nullptr, 0, nullptr, nullptr) == 1 &&
            std::fflush(file) == 0 && ::fsync(fileno(file)) == 0;
        if (file != nullptr) {
            std::fclose(file);
        }
        // Renamed into place only when complete: a crash never leaves half a key behind.
        if (!written || std::rename(temp.c_str(), path.c_str()) != 0) {
            EVP_PKEY_free(key);
            std::remove(temp.c_str());
            *error = "cannot write " + path;
            return nullptr;
        }
    }
    return std::unique_ptr<ConsentSigner>(new ConsentSigner(key));
}

ConsentSigner::ConsentSigner(EVP_PKEY *key) : key_(key) {
    // The public point as JWK coordinates: 32 bytes each, big-endian, zero-padded.
    BIGNUM *bx = nullptr;
    BIGNUM *by = nullptr;
    unsigned char raw[64] = {};
    if (EVP_PKEY_get_bn_param(key_, OSSL_PKEY_PARAM_EC_PUB_X, &bx) == 1 &&
        EVP_PKEY_get_bn_param(key_, OSSL_PKEY_PARAM_EC_PUB_Y, &by) == 1) {
        BN_bn2binpad(bx, raw, 32);
        BN_bn2binpad(by, raw + 32, 32);
    }
    BN_free(bx);
    BN_free(by);
    const std::string x = base64url::encode(std::string_view(reinterpret_cast<char *>(raw), 32));
    const std::string y =
        base64url::encode(std::string_view(reinterpret_cast<char *>(raw + 32), 32));
    // RFC 7638 thumbprint: the required members in lexicographic order.
    kid_ = base64url::encode(
        sha256("{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"" + x + "\",\"y\":\"" + y + "\"}"));
    jwks_ = "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"" + x + "\",\"y\":\"" + y +
            "\",\"kid\":\"" + kid_ + "\",\"alg\":\"ES256\",\"use\":\"sig\"}]}";
    prepared_ = EVP_MD_CTX_new();
    if (prepared_ != nullptr &&
        EVP_DigestSignInit(prepared_, nullptr, EVP_sha256(), nullptr, key_) != 1) {
        EVP_MD_CTX_free(prepared_);
        prepared_ = nullptr;  // sign() then fails, and decisions refuse: fail closed
    }
    header_b64_ = base64url::encode(
        "{\"alg\":\"ES256\",\"typ\":\"ehrgate-consent+jwt\",\"kid\":\"" + kid_ + "\"}");
}

ConsentSigner::~ConsentSigner() {
    EVP_MD_CTX_free(prepared_);
    EVP_PKEY_free(key_);
}

std::string ConsentSigner::sign(const ConsentContext &c) const {
    std::string claims = "{\"iss\":\"ehrgate-policyd\",\"purpose_of_use\":";
    json::append_string(claims, c.purpose_of_use);
    claims += ",\"decision\":";
    json::append_string(claims, c.decision);
    put_list(claims, "obligations", c.obligations);
    put_list(claims, "consent_ids", c.consent_ids);
    // What the decision covers, so a hop can check the request it received is one of them. A
    // decision (and its token) is reused for identical requests while it is current, so the
    // token names no single request: X-Request-ID carries each request's correlation id.
    claims += ",\"patient\":";
    json::append_string(claims, c.patient);
    claims += ",\"resource_type\":";
    json::append_string(claims, c.resource_type);
    claims += ",\"interaction\":";
    json::append_string(claims, c.interaction);
    claims += ",\"decision_id\":";
    json::append_string(claims, c.decision_id);
    claims += ",\"client_id\":";
    json::append_string(claims, c.client_id);
    claims += ",\"break_glass\":";
    claims += c.break_glass ? "true" : "false";
    claims += ",\"iat\":" + std::to_string(c.issued_at) +
              ",\"exp\":" + std::to_string(c.expires_at) + "}";
    const std::string input = header_b64_ + "." + base64url::encode(claims);
    // A copy of the prepared context: initializing one fetches the algorithm from the provider,
    // which costs more than the signature itself.
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char der[80];  // an ECDSA P-256 signature in DER is at most 72 bytes
    size_t der_len = sizeof der;
    const bool ok =
        ctx != nullptr && prepared_ != nullptr && EVP_MD_CTX_copy_ex(ctx, prepared_) == 1 &&
        EVP_DigestSign(ctx, der, &der_len, reinterpret_cast<const unsigned char *>(input.data()),
                       input.size()) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        return {};
    }
    // JWS ES256 wants r || s, 32 bytes each (RFC 7518 section 3.4), not DER.
    const unsigned char *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der_len));
    if (sig == nullptr) {
        return {};
    }
    unsigned char raw[64];
    const bool converted = BN_bn2binpad(ECDSA_SIG_get0_r(sig), raw, 32) == 32 &&
                           BN_bn2binpad(ECDSA_SIG_get0_s(sig), raw + 32, 32) == 32;
    ECDSA_SIG_free(sig);
    if (!converted) {
        return {};
    }
    return input + "." + base64url::encode(std::string_view(reinterpret_cast<char *>(raw), 64));
}

}  // namespace ehrgate::policyd
