#include "consent_signer.hpp"

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

constexpr const char *kKeyFile = "consent-signing-key.pem";

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
        if (key == nullptr || EVP_PKEY_get_base_id(key) != EVP_PKEY_ED25519) {
            EVP_PKEY_free(key);
            *error = path + " is not an Ed25519 private key";
            return nullptr;
        }
    } else if (errno != ENOENT) {
        *error = "cannot read " + path + ": " + std::strerror(errno);
        return nullptr;
    } else {
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
        if (key == nullptr) {
            *error = "cannot generate an Ed25519 key";
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
    unsigned char raw[32];
    size_t raw_len = sizeof raw;
    EVP_PKEY_get_raw_public_key(key_, raw, &raw_len);
    const std::string x =
        base64url::encode(std::string_view(reinterpret_cast<char *>(raw), raw_len));
    // RFC 7638 thumbprint (RFC 8037 for OKP): the required members in lexicographic order.
    kid_ = base64url::encode(sha256("{\"crv\":\"Ed25519\",\"kty\":\"OKP\",\"x\":\"" + x + "\"}"));
    jwks_ = "{\"keys\":[{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"" + x + "\",\"kid\":\"" +
            kid_ + "\",\"alg\":\"EdDSA\",\"use\":\"sig\"}]}";
    prepared_ = EVP_MD_CTX_new();
    if (prepared_ != nullptr &&
        EVP_DigestSignInit(prepared_, nullptr, nullptr, nullptr, key_) != 1) {
        EVP_MD_CTX_free(prepared_);
        prepared_ = nullptr;  // sign() then fails, and decisions refuse: fail closed
    }
    header_b64_ = base64url::encode(
        "{\"alg\":\"EdDSA\",\"typ\":\"ehrgate-consent+jwt\",\"kid\":\"" + kid_ + "\"}");
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
    claims += ",\"correlation_id\":";
    json::append_string(claims, c.correlation_id);
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
    unsigned char signature[64];
    size_t signature_len = sizeof signature;
    const bool ok =
        ctx != nullptr && prepared_ != nullptr && EVP_MD_CTX_copy_ex(ctx, prepared_) == 1 &&
        EVP_DigestSign(ctx, signature, &signature_len,
                       reinterpret_cast<const unsigned char *>(input.data()), input.size()) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        return {};
    }
    return input + "." +
           base64url::encode(std::string_view(reinterpret_cast<char *>(signature), signature_len));
}

}  // namespace ehrgate::policyd
