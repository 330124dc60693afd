// Authentication and authorization on the worker's fast path.
//
// Everything here is plain C++ over the policy snapshot; the nginx module only extracts the
// Authorization header and the client certificate, keeps the verified-token cache, and turns the
// result into a response. Two steps, because only the first is cacheable:
//
//   authenticate_token():  JWT -> Identity (signature, issuer, audience, times, registered client,
//                          scopes narrowed to the client's ceiling). Depends on the token and the
//                          policy only, so its result is cached per token in shared memory.
//   authorize():           Identity + this request -> decision (revocation, certificate binding,
//                          SMART scopes, patient compartment). Runs on every request.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ehrgate/jose.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/revocation_set.hpp"
#include "ehrgate/smart_scopes.hpp"

namespace ehrgate::auth {

// Who is calling, as established by a verified token or a registered client certificate.
struct Identity {
    std::string client_id;
    std::string issuer_id;  // policy issuer id; empty for certificate-only clients
    std::string subject;    // `sub`
    std::string fhir_user;  // `fhirUser`
    std::string patient;    // SMART launch patient
    std::string jti;
    std::string scope;         // effective grant: the token's scopes within the client's ceiling
    std::string cnf_x5t_s256;  // certificate binding (RFC 8705), base64url SHA-256
    std::vector<std::string> purpose_of_use;
    int64_t expires_at = 0;
    int64_t issued_at = 0;
    bool has_iat = false;
    std::string break_glass_reason{};  // the token's `break_glass_reason` claim (consent)

    // The user for logs and audit: fhirUser when given, else sub.
    const std::string &user() const { return fhir_user.empty() ? subject : fhir_user; }
};

// Cache payload encoding (msgpack); decode returns nullopt on anything unexpected.
std::string encode_identity(const Identity &identity);
std::optional<Identity> decode_identity(std::string_view bytes);

// An authentication or authorization failure, ready to become a response.
struct Failure {
    uint16_t http_status = 401;
    std::string reason;   // machine-readable, e.g. "expired", "insufficient-scope"
    std::string message;  // fixed text, safe for the caller: never token or request content
    // RFC 6750 error code for WWW-Authenticate: "" (no token), "invalid_request",
    // "invalid_token" or "insufficient_scope".
    std::string bearer_error;
    std::string required_scope;  // with insufficient_scope: what would have been enough
};

// The policy's authentication data compiled for fast use: parsed key sets, scope ceilings,
// lookups by id. Built once per snapshot in every worker, shared by all requests.
class AuthPolicy {
  public:
    // Fails only when the snapshot is inconsistent (policyd validated it, so that means a bug or
    // version skew); the worker then refuses bearer tokens rather than guess.
    static std::shared_ptr<const AuthPolicy> compile(
        std::shared_ptr<const policy::Snapshot> snapshot, std::string *error);

    const policy::Snapshot &snapshot() const { return *snapshot_; }

    struct IssuerKeys {
        const policy::Issuer *issuer;
        jose::KeySet keys;
        std::vector<jose::Algorithm> algorithms;
    };
    struct ClientEntry {
        const policy::Client *client;
        smart::ScopeSet ceiling;
    };
    const std::vector<IssuerKeys> &issuers() const { return issuers_; }
    const ClientEntry *client(std::string_view id) const;

  private:
    std::shared_ptr<const policy::Snapshot> snapshot_;
    std::vector<IssuerKeys> issuers_;
    std::unordered_map<std::string, ClientEntry> clients_;
};

// Extracts the token from an Authorization header value. nullopt with `failure` set when the
// header is present but not a well-formed Bearer credential.
std::optional<std::string_view> bearer_token(std::string_view authorization, Failure *failure);

struct TokenResult {
    std::optional<Identity> identity;
    Failure failure;  // when !identity
};

TokenResult authenticate_token(const AuthPolicy &policy, std::string_view token, int64_t now);

// A presented client certificate, already verified by nginx's TLS layer.
struct ClientCertificate {
    std::string sha256_hex;        // lower-case hex of SHA-256 over the DER certificate
    std::string sha256_base64url;  // the same digest as RFC 8705's x5t#S256
};

// An identity for a request that brought only a client certificate: the client registered for
// that certificate, if its auth methods include mtls, with its scope ceiling as the grant.
TokenResult authenticate_certificate(const AuthPolicy &policy,
                                     const ClientCertificate &certificate);

struct Request {
    std::string_view method;
    std::string_view path;         // decoded URI path
    std::string_view query;        // raw query string, without '?'
    std::string_view server_base;  // this endpoint's absolute FHIR base, for absolute references
    const ClientCertificate *certificate = nullptr;  // nullptr: no (verified) client certificate
    int64_t now = 0;
};

struct Authorization {
    enum class Kind : uint8_t { Allow, AllowNarrowed, AllowCheckResponse, Deny };
    Kind kind = Kind::Deny;
    Failure failure;             // when Deny
    std::string narrowed_query;  // when AllowNarrowed: forward this query instead
    std::string patient_id;      // when AllowCheckResponse: the response must be in this
                                 // patient's compartment
    std::string resource_type;
    std::string interaction;
};

Authorization authorize(const AuthPolicy &policy, const Identity &identity, const Request &request,
                        const RevocationSet &revocations);

// Requests without any credential: only the capability statement (FHIR `metadata`) is public,
// as SMART apps discover the server before they have a token.
bool is_public_request(const AuthPolicy &policy, std::string_view method, std::string_view path);

}  // namespace ehrgate::auth
