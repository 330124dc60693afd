// The key policyd signs consent contexts with (docs/consent.md, "For teams behind the gateway"):
// a P-256 key kept in the data directory (consent-signing-key.pem, mode 0600), created on first
// start. Each permitted decision carries a compact JWS (alg ES256) that the worker forwards as
// X-Ehrgate-Consent; downstream hops verify it with the JWKS from `ehrgatectl consent jwks`.
// ES256 rather than EdDSA: one signature per permitted decision is policyd's largest cost, and
// OpenSSL signs P-256 about twice as fast as Ed25519 here (`openssl speed ecdsap256 ed25519`);
// every JOSE library verifies ES256.
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
    std::string patient;  // the patient decided for; empty: none named
    std::string resource_type;
    std::string interaction;
    std::string decision_id;
    std::string client_id;
    bool break_glass = false;
    int64_t issued_at = 0;
    int64_t expires_at = 0;
};

class ConsentSigner {
  public:
    // Reads <directory>/consent-signing-key.pem, creating it when absent. nullptr (with *error)
    // when the file exists but is not a P-256 private key, or cannot be written.
    static std::unique_ptr<ConsentSigner> load_or_create(const std::string &directory,
                                                         std::string *error);
    ~ConsentSigner();
    ConsentSigner(const ConsentSigner &) = delete;
    ConsentSigner &operator=(const ConsentSigner &) = delete;

    // Compact JWS over the context's claims; empty on a signing failure (callers fail closed).
    std::string sign(const ConsentContext &context) const;
    const std::string &kid() const { return kid_; }
    // {"keys":[{"kty":"EC","crv":"P-256","x":...,"y":...,"kid":...,"alg":"ES256","use":"sig"}]}
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
