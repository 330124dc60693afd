// Authentication on the fast path: bearer JWTs verified in the worker (with a shared-memory
// cache of verified tokens), client certificates, then SMART scopes and the patient compartment.
// The logic is shared/auth; this file extracts what nginx knows and applies the answer.
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <ctime>
#include <exception>
#include <string>

#include "ehrgate/audit.hpp"
#include "ehrgate/auth.hpp"
#include "ehrgate/base64url.hpp"
#include "ehrgate/token_cache.hpp"
#include "module.hpp"
#include "shm_table.hpp"

namespace ehrgate::ngx {

namespace {

ngx_shm_zone_t *g_cache_zone;  // this worker's view of the zone (set in watch_policy_changes)

std::optional<cache::TokenCacheTable> cache_table() {
    return zone_table<cache::TokenCacheTable>(g_cache_zone);
}

void invalidate_cache(uint64_t serial) {
    std::optional<cache::TokenCacheTable> table = cache_table();
    if (!table) {
        return;
    }
    // Workers switch snapshots a few milliseconds apart: only ever move the generation forward.
    ZoneLock lock(g_cache_zone);
    if (serial > table->generation()) {
        table->set_generation(serial);
    }
}

int64_t unix_now() {
    return static_cast<int64_t>(ngx_time());
}

std::optional<auth::ClientCertificate> client_certificate(ngx_http_request_t *r) {
    if (r->connection->ssl == nullptr) {
        return std::nullopt;
    }
    SSL *ssl = r->connection->ssl->connection;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == nullptr) {
        return std::nullopt;
    }
    std::optional<auth::ClientCertificate> result;
    // With `ssl_verify_client optional`, an unverifiable certificate still reaches us: it
    // identifies no one.
    if (SSL_get_verify_result(ssl) == X509_V_OK) {
        unsigned char *der = nullptr;
        const int der_len = i2d_X509(cert, &der);
        if (der_len > 0) {
            unsigned char digest[32];
            unsigned int digest_len = 0;
            EVP_Digest(der, static_cast<size_t>(der_len), digest, &digest_len, EVP_sha256(),
                       nullptr);
            static constexpr char kHex[] = "0123456789abcdef";
            auth::ClientCertificate certificate;
            for (unsigned int i = 0; i < digest_len; ++i) {
                certificate.sha256_hex.push_back(kHex[digest[i] >> 4]);
                certificate.sha256_hex.push_back(kHex[digest[i] & 0xf]);
            }
            certificate.sha256_base64url =
                base64url::encode(std::string_view(reinterpret_cast<char *>(digest), digest_len));
            result = std::move(certificate);
            OPENSSL_free(der);
        }
    }
    X509_free(cert);
    return result;
}

std::string www_authenticate(const auth::Failure &failure) {
    std::string value = "Bearer realm=\"ehrgate\"";
    if (!failure.bearer_error.empty()) {
        value += ", error=\"" + failure.bearer_error + "\", error_description=\"" +
                 failure.message + "\"";
    }
    if (!failure.required_scope.empty()) {
        value += ", scope=\"" + failure.required_scope + "\"";
    }
    return value;
}

ngx_int_t refuse(ngx_http_request_t *r, RequestCtx *ctx, const auth::Failure &failure) {
    ctx->auth_status = pool_copy(r->pool, failure.reason);
    if (failure.http_status == NGX_HTTP_UNAUTHORIZED || !failure.bearer_error.empty()) {
        ctx->www_authenticate = pool_copy(r->pool, www_authenticate(failure));
    }
    record_failure(ctx, failure.http_status, failure.reason, failure.message);
    return send_outcome(r, ctx);
}

ngx_int_t unavailable(ngx_http_request_t *r, RequestCtx *ctx, std::string_view reason,
                      std::string_view message) {
    ctx->auth_status = pool_copy(r->pool, reason);
    record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, reason, message);
    return send_outcome(r, ctx);
}

// Verified identity for a bearer token: from the shared cache, else verified and cached.
auth::TokenResult identity_for_token(const auth::AuthPolicy &policy, std::string_view token,
                                     int64_t now) {
    const cache::TokenDigest digest = cache::digest_token(token);
    std::optional<cache::TokenCacheTable> table = cache_table();
    if (table) {
        std::string payload;
        bool hit;
        {
            ZoneLock lock(g_cache_zone);
            hit = table->lookup(digest, now, &payload);
        }
        if (hit) {
            if (std::optional<auth::Identity> identity = auth::decode_identity(payload)) {
                return auth::TokenResult{std::move(identity), {}};
            }
        }
    }
    auth::TokenResult result = auth::authenticate_token(policy, token, now);
    if (result.identity && table) {
        const std::string payload = auth::encode_identity(*result.identity);
        ZoneLock lock(g_cache_zone);
        table->insert(digest, result.identity->expires_at, payload, now);
    }
    return result;
}

std::string server_base(ngx_http_request_t *r, const policy::Snapshot &snapshot) {
    const policy::Route *route = snapshot.bundle.match_route(view(r->uri));
    if (route == nullptr || r->headers_in.host == nullptr) {
        return {};
    }
    std::string base = r->connection->ssl != nullptr ? "https://" : "http://";
    base.append(view(r->headers_in.host->value));
    base.append(route->prefix, 0, route->prefix.size() - 1);
    return base;
}

}  // namespace

std::string token_cache_status_json() {
    std::optional<cache::TokenCacheTable> table = cache_table();
    if (!table) {
        return "{}";
    }
    ZoneLock lock(g_cache_zone);
    return "{\"capacity\":" + std::to_string(table->capacity()) +
           ",\"hits\":" + std::to_string(table->hits()) +
           ",\"misses\":" + std::to_string(table->misses()) +
           ",\"generation\":" + std::to_string(table->generation()) + "}";
}

bool add_token_cache_zone(ngx_conf_t *cf, MainConf *mcf) {
    static ngx_str_t name = ngx_string("ehrgate_token_cache");
    mcf->token_cache =
        ngx_shared_memory_add(cf, &name, mcf->token_cache_size, &ngx_http_ehrgate_module);
    if (mcf->token_cache == nullptr) {
        return false;
    }
    mcf->token_cache->init = init_table_zone<cache::TokenCacheTable>;
    return true;
}

void watch_policy_changes(SidecarClient &client, MainConf *mcf) {
    g_cache_zone = mcf->token_cache;
    client.on_policy_change(invalidate_cache);
}

ngx_int_t authenticate(ngx_http_request_t *r, RequestCtx *ctx) {
    SidecarClient *client = worker_client();
    const auth::AuthPolicy *policy = client != nullptr ? client->auth_policy() : nullptr;
    if (policy == nullptr) {
        return unavailable(r, ctx, "policy-unavailable",
                           "The gateway has no current policy; no request can be authorized");
    }
    if (!client->revocations_current()) {
        return unavailable(r, ctx, "revocations-unavailable",
                           "The gateway cannot confirm that tokens are not revoked; try again");
    }
    // A refusal here is decided by the worker's snapshot: name its version like policyd's replies
    // do.
    ctx->policy_version = pool_copy(r->pool, policy->snapshot().bundle.version);
    const int64_t now = unix_now();
    const std::optional<auth::ClientCertificate> certificate = client_certificate(r);

    auth::TokenResult authenticated;
    if (r->headers_in.authorization != nullptr) {
        auth::Failure failure;
        const std::optional<std::string_view> token =
            auth::bearer_token(view(r->headers_in.authorization->value), &failure);
        if (!token) {
            return refuse(r, ctx, failure);
        }
        authenticated = identity_for_token(*policy, *token, now);
    } else if (certificate) {
        authenticated = auth::authenticate_certificate(*policy, *certificate);
    } else if (auth::is_public_request(*policy, view(r->method_name), view(r->uri))) {
        ctx->auth_status = pool_copy(r->pool, "public");
        return NGX_DECLINED;
    } else {
        return refuse(r, ctx,
                      auth::Failure{401, "no-token", "An access token is required", "", {}});
    }
    if (!authenticated.identity) {
        return refuse(r, ctx, authenticated.failure);
    }
    const auth::Identity &identity = *authenticated.identity;
    ctx->client_id = pool_copy(r->pool, identity.client_id);
    ctx->user = pool_copy(r->pool, identity.user());
    ctx->patient = pool_copy(r->pool, identity.patient);
    // audit (issue 7): the token is recorded by the hash of its jti, never the jti itself.
    if (!identity.jti.empty()) {
        const cache::TokenDigest jti_digest = cache::digest_token(identity.jti);  // SHA-256
        ctx->jti_hash = pool_copy(
            r->pool, audit::hex(std::string_view(reinterpret_cast<const char *>(jti_digest.data()),
                                                 jti_digest.size())));
    }
    if (certificate) {
        ctx->cert_fingerprint = pool_copy(r->pool, certificate->sha256_hex);
    }
    // Consent (issue 5): the token's purpose claim wins over the header. Several values are
    // passed joined, which no PurposeOfUse code matches: policyd then applies the fallback.
    if (!identity.purpose_of_use.empty()) {
        std::string purposes;
        for (const std::string &purpose : identity.purpose_of_use) {
            purposes += (purposes.empty() ? "" : ",") + purpose;
        }
        ctx->asserted_purpose = pool_copy(r->pool, purposes);
    }
    if (!identity.break_glass_reason.empty()) {
        ctx->break_glass_reason = pool_copy(r->pool, identity.break_glass_reason);
    }

    const std::string base = server_base(r, policy->snapshot());
    auth::Request request;
    request.method = view(r->method_name);
    request.path = view(r->uri);
    request.query = view(r->args);
    request.server_base = base;
    request.certificate = certificate ? &*certificate : nullptr;
    request.now = now;
    const auth::Authorization authorization =
        auth::authorize(*policy, identity, request, client->revocations());
    switch (authorization.kind) {
        case auth::Authorization::Kind::Deny:
            return refuse(r, ctx, authorization.failure);
        case auth::Authorization::Kind::AllowNarrowed: {
            // Forward the narrowed query: proxy_pass rebuilds the upstream URI from r->args once
            // the original request line is marked stale.
            const ngx_str_t args = pool_copy(r->pool, authorization.narrowed_query);
            if (args.data == nullptr && !authorization.narrowed_query.empty()) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
            r->args = args;
            r->valid_unparsed_uri = 0;
            break;
        }
        case auth::Authorization::Kind::AllowCheckResponse:
            ctx->check_patient = pool_copy(r->pool, authorization.patient_id);
            break;
        case auth::Authorization::Kind::Allow:
            break;
    }
    ctx->auth_status = pool_copy(r->pool, "ok");
    return NGX_DECLINED;
}

}  // namespace ehrgate::ngx
