#include "ehrgate/auth.hpp"

#include <algorithm>

#include "ehrgate/base64url.hpp"
#include "ehrgate/compartment.hpp"
#include "ehrgate/fhir_request.hpp"
#include "ehrgate/json.hpp"
#include "ehrgate/msgpack.hpp"

namespace ehrgate::auth {

namespace {

Failure invalid_token(std::string reason, std::string message) {
    return Failure{401, std::move(reason), std::move(message), "invalid_token", {}};
}

Failure forbidden(std::string reason, std::string message) {
    return Failure{403, std::move(reason), std::move(message), {}, {}};
}

bool has_method(const policy::Client &client, policy::AuthMethod method) {
    return std::find(client.auth.begin(), client.auth.end(), method) != client.auth.end();
}

bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return (x | 0x20) == (y | 0x20);
           });
}

// RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
bool is_b64token(std::string_view token) {
    size_t i = 0;
    for (; i < token.size(); ++i) {
        const char c = token[i];
        const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                        (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == '~' ||
                        c == '+' || c == '/';
        if (!ok)
            break;
    }
    if (i == 0)
        return false;
    for (; i < token.size(); ++i) {
        if (token[i] != '=')
            return false;
    }
    return true;
}

void put(msgpack::Writer &w, std::string_view key, std::string_view value) {
    w.key(key);
    w.str(value);
}

jose::VerifyOptions verify_options(const AuthPolicy::IssuerKeys &issuer, int64_t now) {
    jose::VerifyOptions options;
    options.allowed_algorithms = issuer.algorithms;
    options.issuer = issuer.issuer->issuer;
    options.audience = issuer.issuer->audience;
    options.now = now;
    options.leeway_seconds = issuer.issuer->leeway_seconds;
    return options;
}

// The `iss` claim of a token whose signature is not checked yet: only to choose whose keys verify
// it. nullopt when the payload cannot be read or has no string `iss`.
std::optional<std::string> unverified_issuer(std::string_view token) {
    const size_t first = token.find('.');
    const size_t second = first == std::string_view::npos ? first : token.find('.', first + 1);
    if (second == std::string_view::npos || token.size() > jose::kDefaultMaxTokenBytes) {
        return std::nullopt;
    }
    const std::optional<std::string> payload =
        base64url::decode(token.substr(first + 1, second - first - 1));
    if (!payload) {
        return std::nullopt;
    }
    json::ParseError error;
    const std::optional<json::Value> claims = json::parse(*payload, &error);
    const json::Value *iss = claims ? claims->find("iss") : nullptr;
    if (iss == nullptr || iss->as_string() == nullptr) {
        return std::nullopt;
    }
    return *iss->as_string();
}

}  // namespace

// ---- Identity cache encoding -----------------------------------------------------------------

std::string encode_identity(const Identity &identity) {
    std::string out;
    msgpack::Writer w(out);
    // Consent (issue 5): the break-glass reason only when present, so other payloads keep
    // their bytes.
    w.map(identity.break_glass_reason.empty() ? 12 : 13);
    put(w, "client_id", identity.client_id);
    put(w, "issuer_id", identity.issuer_id);
    put(w, "sub", identity.subject);
    put(w, "fhir_user", identity.fhir_user);
    put(w, "patient", identity.patient);
    put(w, "jti", identity.jti);
    put(w, "scope", identity.scope);
    put(w, "cnf", identity.cnf_x5t_s256);
    w.key("purpose_of_use");
    w.array(static_cast<uint32_t>(identity.purpose_of_use.size()));
    for (const std::string &purpose : identity.purpose_of_use) {
        w.str(purpose);
    }
    w.key("exp");
    w.sint(identity.expires_at);
    w.key("iat");
    w.sint(identity.issued_at);
    w.key("has_iat");
    w.boolean(identity.has_iat);
    if (!identity.break_glass_reason.empty()) {
        put(w, "break_glass_reason", identity.break_glass_reason);
    }
    return out;
}

std::optional<Identity> decode_identity(std::string_view bytes) {
    msgpack::Reader r(bytes);
    Identity identity;
    const std::optional<uint32_t> count = r.read_map();
    auto str = [&](std::string &out) {
        const std::optional<std::string_view> v = r.read_str();
        if (v)
            out.assign(*v);
    };
    for (uint32_t i = 0; count && i < *count && r.ok(); ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key)
            break;
        if (*key == "client_id")
            str(identity.client_id);
        else if (*key == "issuer_id")
            str(identity.issuer_id);
        else if (*key == "sub")
            str(identity.subject);
        else if (*key == "fhir_user")
            str(identity.fhir_user);
        else if (*key == "patient")
            str(identity.patient);
        else if (*key == "jti")
            str(identity.jti);
        else if (*key == "scope")
            str(identity.scope);
        else if (*key == "cnf")
            str(identity.cnf_x5t_s256);
        else if (*key == "exp")
            identity.expires_at = r.read_int().value_or(0);
        else if (*key == "iat")
            identity.issued_at = r.read_int().value_or(0);
        else if (*key == "has_iat")
            identity.has_iat = r.read_bool().value_or(false);
        else if (*key == "break_glass_reason")
            str(identity.break_glass_reason);
        else if (*key == "purpose_of_use") {
            const std::optional<uint32_t> n = r.read_array();
            for (uint32_t k = 0; n && k < *n && k < 64 && r.ok(); ++k) {
                const std::optional<std::string_view> v = r.read_str();
                if (v)
                    identity.purpose_of_use.emplace_back(*v);
            }
            if (n && *n > 64)
                r.fail();
        } else {
            r.skip();
        }
    }
    if (!count || !r.ok() || !r.at_end() || identity.client_id.empty()) {
        return std::nullopt;
    }
    return identity;
}

// ---- Compiled policy -------------------------------------------------------------------------

std::shared_ptr<const AuthPolicy> AuthPolicy::compile(
    std::shared_ptr<const policy::Snapshot> snapshot, std::string *error) {
    auto compiled = std::shared_ptr<AuthPolicy>(new AuthPolicy());
    compiled->snapshot_ = std::move(snapshot);
    const policy::Bundle &bundle = compiled->snapshot_->bundle;
    for (const policy::Issuer &issuer : bundle.issuers) {
        std::string key_error;
        std::optional<jose::KeySet> keys = jose::KeySet::parse(issuer.jwks_json, &key_error);
        if (!keys) {
            *error = "issuer " + issuer.id + ": " + key_error;
            return nullptr;
        }
        IssuerKeys entry{&issuer, std::move(*keys), {}};
        for (const std::string &name : issuer.algorithms) {
            const std::optional<jose::Algorithm> alg = jose::algorithm_from_name(name);
            if (!alg) {
                *error = "issuer " + issuer.id + ": unknown algorithm " + name;
                return nullptr;
            }
            entry.algorithms.push_back(*alg);
        }
        compiled->issuers_.push_back(std::move(entry));
    }
    for (const policy::Client &client : bundle.clients) {
        smart::ScopeError scope_error;
        std::optional<smart::ScopeSet> ceiling =
            smart::parse_scopes(client.scope_ceiling, &scope_error);
        if (!ceiling) {
            *error = "client " + client.id + ": scope_ceiling: " + scope_error.reason;
            return nullptr;
        }
        compiled->clients_.emplace(client.id, ClientEntry{&client, std::move(*ceiling)});
    }
    return compiled;
}

const AuthPolicy::ClientEntry *AuthPolicy::client(std::string_view id) const {
    const auto it = clients_.find(std::string(id));
    return it == clients_.end() ? nullptr : &it->second;
}

// ---- Authentication --------------------------------------------------------------------------

std::optional<std::string_view> bearer_token(std::string_view authorization, Failure *failure) {
    const size_t space = authorization.find(' ');
    const std::string_view scheme = authorization.substr(0, space);
    if (!iequals(scheme, "Bearer")) {
        // RFC 6750 section 3: a request without a Bearer credential gets a challenge without an
        // error code.
        *failure = Failure{401, "not-bearer", "Authorization must use the Bearer scheme", "", {}};
        return std::nullopt;
    }
    std::string_view token =
        space == std::string_view::npos ? std::string_view() : authorization.substr(space + 1);
    while (!token.empty() && token.front() == ' ')
        token.remove_prefix(1);
    while (!token.empty() && token.back() == ' ')
        token.remove_suffix(1);
    if (!is_b64token(token)) {
        *failure = Failure{400,
                           "malformed-authorization",
                           "The Bearer credential is malformed",
                           "invalid_request",
                           {}};
        return std::nullopt;
    }
    return token;
}

TokenResult authenticate_token(const AuthPolicy &policy, std::string_view token, int64_t now) {
    TokenResult result;
    if (policy.issuers().empty()) {
        result.failure =
            invalid_token("no-trusted-issuer", "No token issuer is trusted by this gateway");
        return result;
    }
    // The issuer is chosen by the token's own (not yet verified) `iss`; verify_jwt then checks
    // the signature with that issuer's keys only and the `iss` again. A kid-less token is thus
    // never tried against another issuer's keys.
    const std::optional<std::string> claimed_issuer = unverified_issuer(token);
    const AuthPolicy::IssuerKeys *issuer = nullptr;
    for (const AuthPolicy::IssuerKeys &candidate : policy.issuers()) {
        if (claimed_issuer && candidate.issuer->issuer == *claimed_issuer) {
            issuer = &candidate;
        }
    }
    if (issuer == nullptr && claimed_issuer) {
        result.failure =
            invalid_token("untrusted-issuer", "The token's issuer is not trusted by this gateway");
        return result;
    }
    jose::VerifyResult verified;
    const AuthPolicy::IssuerKeys *chosen = issuer;
    if (issuer != nullptr) {
        verified = jose::verify_jwt(token, issuer->keys, verify_options(*issuer, now));
    } else {
        // The payload is unreadable, so the token fails whatever keys are tried; trying each
        // issuer only finds the most precise reason (the one whose key it names).
        for (const AuthPolicy::IssuerKeys &candidate : policy.issuers()) {
            chosen = &candidate;
            verified = jose::verify_jwt(token, candidate.keys, verify_options(candidate, now));
            if (verified.error != jose::TokenError::UnknownKey &&
                verified.error != jose::TokenError::AlgNotAllowed) {
                break;
            }
        }
        if (verified.ok()) {
            // Cannot happen (the verifier reads the same payload); never accept on a guess.
            verified.error = jose::TokenError::Internal;
        }
    }
    if (!verified.ok()) {
        const std::string_view name = jose::token_error_name(verified.error);
        result.failure = invalid_token(std::string(name),
                                       "The access token is not valid (" + std::string(name) + ")");
        return result;
    }
    const jose::Claims &claims = verified.claims;
    const AuthPolicy::ClientEntry *client = policy.client(claims.client_id);
    if (claims.client_id.empty() || client == nullptr) {
        result.failure = invalid_token("unknown-client",
                                       "The token's client is not registered with this gateway");
        return result;
    }
    if (!has_method(*client->client, policy::AuthMethod::Bearer) &&
        !has_method(*client->client, policy::AuthMethod::CertBound)) {
        result.failure = invalid_token("auth-method-not-allowed",
                                       "This client may not authenticate with a bearer token");
        return result;
    }
    const std::vector<std::string> &allowed_issuers = client->client->issuers;
    if (!allowed_issuers.empty() && std::find(allowed_issuers.begin(), allowed_issuers.end(),
                                              issuer->issuer->id) == allowed_issuers.end()) {
        result.failure = invalid_token("issuer-not-allowed-for-client",
                                       "This issuer may not issue tokens for this client");
        return result;
    }
    // A malformed scope makes the token invalid: guessing what was meant could widen access.
    smart::ScopeError scope_error;
    const std::optional<smart::ScopeSet> scopes = smart::parse_scopes(claims.scope, &scope_error);
    if (!scopes) {
        result.failure = invalid_token("malformed-scope",
                                       "The token's scope is malformed: " + scope_error.reason);
        return result;
    }
    Identity identity;
    identity.client_id = claims.client_id;
    identity.issuer_id = chosen->issuer->id;
    identity.subject = claims.sub;
    identity.fhir_user = claims.fhir_user;
    identity.patient = claims.patient;
    identity.jti = claims.jti;
    identity.scope = scopes->intersect_ceiling(client->ceiling).to_string();
    identity.cnf_x5t_s256 = claims.cnf_x5t_s256;
    identity.purpose_of_use = claims.purpose_of_use;
    identity.break_glass_reason = claims.break_glass_reason;
    // Usable until exp plus the issuer's leeway: the same tolerance verify_jwt applied, kept for
    // the cache and the per-request re-check.
    identity.expires_at = claims.exp.value_or(now) + chosen->issuer->leeway_seconds;
    identity.issued_at = claims.iat.value_or(0);
    identity.has_iat = claims.iat.has_value();
    result.identity = std::move(identity);
    return result;
}

TokenResult authenticate_certificate(const AuthPolicy &policy,
                                     const ClientCertificate &certificate) {
    TokenResult result;
    const policy::Client *registered =
        policy.snapshot().bundle.find_client_by_certificate(certificate.sha256_hex);
    if (registered == nullptr || !has_method(*registered, policy::AuthMethod::Mtls)) {
        result.failure =
            Failure{401,
                    registered == nullptr ? "unknown-certificate" : "auth-method-not-allowed",
                    "No access token, and the client certificate does not identify a client "
                    "allowed to use certificate authentication",
                    "",
                    {}};
        return result;
    }
    const AuthPolicy::ClientEntry *client = policy.client(registered->id);
    Identity identity;
    identity.client_id = registered->id;
    identity.subject = registered->id;
    identity.scope = client != nullptr ? client->ceiling.to_string() : std::string();
    result.identity = std::move(identity);
    return result;
}

// ---- Authorization ---------------------------------------------------------------------------

namespace {

smart::Context context_of(policy::LaunchContext context) {
    switch (context) {
        case policy::LaunchContext::User:
            return smart::Context::User;
        case policy::LaunchContext::Patient:
            return smart::Context::Patient;
        case policy::LaunchContext::System:
            return smart::Context::System;
    }
    return smart::Context::Patient;
}

}  // namespace

bool is_public_request(const AuthPolicy &policy, std::string_view method, std::string_view path) {
    const policy::Route *route = policy.snapshot().bundle.match_route(path);
    if (route == nullptr) {
        return false;
    }
    const std::optional<fhir::RequestTargetView> target =
        fhir::classify_view(method, path.substr(route->prefix.size()), {});
    return target && target->interaction == fhir::Interaction::Capabilities;
}

Authorization authorize(const AuthPolicy &policy, const Identity &identity, const Request &request,
                        const RevocationSet &revocations) {
    Authorization result;
    const AuthPolicy::ClientEntry *client = policy.client(identity.client_id);
    if (client == nullptr) {
        // Registered when the token was verified, gone since (policy reload).
        result.failure = invalid_token("unknown-client",
                                       "The token's client is not registered with this gateway");
        return result;
    }
    if (revocations.is_revoked(identity.jti, identity.client_id, identity.issued_at,
                               identity.has_iat, request.now)) {
        result.failure = invalid_token("revoked", "The access token has been revoked");
        return result;
    }
    if (identity.expires_at <= request.now && !identity.issuer_id.empty()) {
        result.failure = invalid_token("expired", "The access token is not valid (expired)");
        return result;
    }

    // Certificate binding (RFC 8705): a bound token is only good with its certificate, and a
    // client registered for cert-bound tokens only presents bound ones.
    const policy::Client &registered = *client->client;
    if (!identity.issuer_id.empty()) {
        const bool needs_binding = has_method(registered, policy::AuthMethod::CertBound) &&
                                   !has_method(registered, policy::AuthMethod::Bearer);
        if (!identity.cnf_x5t_s256.empty() || needs_binding) {
            if (request.certificate == nullptr) {
                result.failure = invalid_token(
                    "certificate-required",
                    "The access token is bound to a client certificate, and none was presented");
                return result;
            }
            if (identity.cnf_x5t_s256 != request.certificate->sha256_base64url) {
                result.failure =
                    invalid_token("certificate-mismatch",
                                  "The access token is bound to a different client certificate");
                return result;
            }
            if (std::find(registered.certificates.begin(), registered.certificates.end(),
                          request.certificate->sha256_hex) == registered.certificates.end()) {
                result.failure =
                    invalid_token("certificate-not-registered",
                                  "The client certificate is not registered for this client");
                return result;
            }
        }
    }

    const policy::Route *route = policy.snapshot().bundle.match_route(request.path);
    if (route == nullptr) {
        result.failure = Failure{404, "no-route", "No gateway route serves this path", {}, {}};
        return result;
    }
    const std::optional<fhir::RequestTargetView> target = fhir::classify_view(
        request.method, request.path.substr(route->prefix.size()), request.query);
    if (!target) {
        result.failure = Failure{400,
                                 "unrecognized-fhir-request",
                                 "The request is not a recognized FHIR interaction",
                                 {},
                                 {}};
        return result;
    }
    result.resource_type.assign(target->resource_type);
    result.interaction.assign(fhir::interaction_name(target->interaction));

    const smart::RequiredPermission required = smart::required_permission(target->interaction);
    if (required.kind == smart::RequiredPermission::Kind::None) {
        result.kind = Authorization::Kind::Allow;
        return result;
    }
    if (required.kind == smart::RequiredPermission::Kind::Unsupported) {
        result.failure = forbidden("interaction-not-supported",
                                   "This FHIR interaction is not available through the gateway");
        return result;
    }
    smart::ScopeError scope_error;
    const std::optional<smart::ScopeSet> scopes = smart::parse_scopes(identity.scope, &scope_error);
    if (!scopes) {
        result.failure = invalid_token("malformed-scope", "The token's scope is malformed");
        return result;
    }
    const std::optional<fhir::Query> query = fhir::parse_query(request.query);
    if (!query) {
        result.failure = Failure{400, "malformed-query", "The query string is malformed", {}, {}};
        return result;
    }
    const std::string_view type = target->resource_type;
    std::string needed = std::string(smart::context_name(context_of(registered.context))) + "/" +
                         std::string(type.empty() ? "*" : type) + "." +
                         smart::permission_letter(required.permission);

    // user/ and system/ scopes reach whatever the user or system may; patient/ scopes reach one
    // patient's compartment only.
    for (const smart::Context context : {smart::Context::User, smart::Context::System}) {
        const smart::Access access =
            scopes->allows_interaction(context, target->interaction, type, &*query);
        if (access.kind == smart::Access::Kind::Allowed) {
            result.kind = Authorization::Kind::Allow;
            return result;
        }
        if (access.kind == smart::Access::Kind::AllowedWithConstraint) {
            // Granular scopes on reads need a response-side category check that does not exist
            // yet: refuse rather than release what the scope may not cover.
            result.failure = forbidden("granular-scope-needs-search",
                                       "A category-restricted scope permits searches that name the "
                                       "category, not reads by id");
            result.failure.bearer_error = "insufficient_scope";
            result.failure.required_scope = needed;
            return result;
        }
    }
    const smart::Access patient_access =
        scopes->allows_interaction(smart::Context::Patient, target->interaction, type, &*query);
    if (patient_access.kind != smart::Access::Kind::Allowed) {
        result.failure =
            forbidden("insufficient-scope", "The token's scopes do not permit this request");
        result.failure.bearer_error = "insufficient_scope";
        result.failure.required_scope = needed;
        return result;
    }
    if (identity.patient.empty()) {
        result.failure = forbidden("no-patient-context",
                                   "Patient scopes need a patient in the token's launch context");
        return result;
    }
    const compartment::Decision decision =
        compartment::check(request.method, *target, request.query,
                           compartment::PatientContext{identity.patient, request.server_base});
    switch (decision.kind) {
        case compartment::Decision::Kind::Allow:
            result.kind = Authorization::Kind::Allow;
            return result;
        case compartment::Decision::Kind::AllowNarrowed:
            result.kind = Authorization::Kind::AllowNarrowed;
            result.narrowed_query = decision.narrowed_query;
            return result;
        case compartment::Decision::Kind::CheckResponse:
            if (request.method == "HEAD") {
                // Nothing to check in a HEAD response, but its headers (ETag, length) still
                // describe the resource: refuse rather than release them unchecked.
                result.failure =
                    forbidden("patient-head-unverifiable",
                              "HEAD by id is not available with a patient-context token; use GET");
                return result;
            }
            result.kind = Authorization::Kind::AllowCheckResponse;
            result.patient_id = identity.patient;
            return result;
        case compartment::Decision::Kind::CheckRequestBody:
            // Request bodies are not inspected yet: a patient-context write could name another
            // patient, so it is refused.
            result.failure = forbidden(
                "patient-write-unverifiable",
                "Writes with a patient-context token are not available through the gateway");
            return result;
        case compartment::Decision::Kind::Refuse:
            break;
    }
    result.failure = forbidden("outside-patient-compartment:" + decision.reason,
                               "The request reaches outside the patient's compartment");
    return result;
}

}  // namespace ehrgate::auth
