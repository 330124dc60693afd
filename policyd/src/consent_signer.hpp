// The key policyd signs consent contexts with (docs/consent.md, "For teams behind the gateway"):
// an Ed25519 key kept in the data directory (consent-signing-key.pem, mode 0600), created on
// first start. Each permitted decision carries a compact JWS (alg EdDSA) that the worker forwards
// as X-Ehrgate-Consent; downstream hops verify it with the JWKS from `ehrgatectl consent jwks`.
#pragma once

#include <openssl/evp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::policyd {

struct ConsentContext {
    std::string purpose_of_use;
    std::string decision;  // "permit"
    std::vector<std::string> obligations;
    std::vector<std::string> consent_ids;
    std::string correlation_id;
    std::string decision_id;
    std::string client_id;
    bool break_glass = false;
    int64_t issued_at = 0;
    int64_t expires_at = 0;
};

class ConsentSigner {
  public:
    // Reads <directory>/consent-signing-key.pem, creating it when absent. nullptr (with *error)
    // when the file exists but is not an Ed25519 private key, or cannot be written.
    static std::unique_ptr<ConsentSigner> load_or_create(const std::string &directory,
                                                         std::string *error);
    ~ConsentSigner();
    ConsentSigner(const ConsentSigner &) = delete;
    ConsentSigner &operator=(const ConsentSigner &) = delete;

    // Compact JWS over the context's claims; empty on a signing failure (callers fail closed).
    std::string sign(const ConsentContext &context) const;
    const std::string &kid() const { return kid_; }
    // {"keys":[{"kty":"OKP","crv":"Ed25519","x":...,"kid":...,"alg":"EdDSA","use":"sig"}]}
    const std::string &jwks() const { return jwks_; }

    static constexpr int64_t kLifetimeSeconds = 5;

  private:
    explicit ConsentSigner(EVP_PKEY *key);
    EVP_PKEY *key_;
    EVP_MD_CTX *prepared_ = nullptr;  // initialized once; copied per signature
    std::string kid_;
    std::string jwks_;
    std::string header_b64_;
};

}  // namespace ehrgate::policyd
