// `ehrgate_status;`: this worker's view of the gateway as JSON, for operators and tests. Like
// stub_status it has no access control of its own; restrict it with allow/deny.
#include <exception>
#include <string>

#include "ehrgate/json_text.hpp"
#include "ehrgate/outcome.hpp"
#include "module.hpp"

namespace ehrgate::ngx {

namespace {

std::string status_json() {
    const SidecarClient *client = worker_client();
    std::string out = "{\"worker_pid\":" + std::to_string(ngx_pid) + ",\"policyd_connected\":";
    out += client != nullptr && client->connected() ? "true" : "false";
    out += ",\"policy\":";
    if (client != nullptr && client->snapshot() != nullptr) {
        out += "{\"version\":";
        json::append_string(out, client->snapshot()->bundle.version);
        out += ",\"serial\":" + std::to_string(client->snapshot()->serial) + "}";
    } else {
        out += "null";
    }
    out += ",\"revocations_serial\":" +
           std::to_string(client != nullptr ? client->revocations().serial() : 0) +
           ",\"limiter\":" + limiter_status_json() +
           ",\"token_cache\":" + token_cache_status_json() +
           ",\"decision_cache\":" + decision_cache_status_json() +
           ",\"audit\":" + audit_status_json() + "}";
    return out;
}

// A small generated document, whole, with its length. `cacheable`: for a few minutes (keys
// rotate rarely, and a verifier refetches on an unknown kid anyway).
ngx_int_t send_document(ngx_http_request_t *r, ngx_uint_t status, const char *content_type,
                        const std::string &body, bool cacheable) {
    const ngx_str_t copy = pool_copy(r->pool, body);
    auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
    if (copy.data == nullptr || b == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    r->headers_out.status = status;
    r->headers_out.content_type.data = reinterpret_cast<u_char *>(const_cast<char *>(content_type));
    r->headers_out.content_type.len = ngx_strlen(content_type);
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_length_n = static_cast<off_t>(copy.len);
    if (cacheable) {
        auto *h = static_cast<ngx_table_elt_t *>(ngx_list_push(&r->headers_out.headers));
        if (h == nullptr) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        h->hash = 1;
        ngx_str_set(&h->key, "Cache-Control");
        ngx_str_set(&h->value, "public, max-age=300");
    }
    const ngx_int_t rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    b->pos = copy.data;
    b->last = copy.data + copy.len;
    b->memory = 1;
    b->last_buf = 1;
    ngx_chain_t out{b, nullptr};
    return ngx_http_output_filter(r, &out);
}

ngx_int_t status_handler(ngx_http_request_t *r) noexcept {
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    std::string body;
    try {
        body = status_json() + "\n";
    } catch (const std::exception &) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    return send_document(r, NGX_HTTP_OK, "application/json", body, false);
}

// `ehrgate_consent_jwks;`: the public key that signs the consent context forwarded to the hops
// behind the gateway (X-Ehrgate-Consent), as a JWK Set (RFC 7517), for them to fetch. policyd
// sends it with every policy snapshot.
ngx_int_t consent_jwks_handler(ngx_http_request_t *r) noexcept {
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    const SidecarClient *client = worker_client();
    const policy::Snapshot *snapshot = client != nullptr ? client->snapshot() : nullptr;
    try {
        if (snapshot == nullptr || snapshot->consent_jwks.empty()) {
            const RequestCtx *ctx = request_ctx(r);
            return send_document(
                r, NGX_HTTP_SERVICE_UNAVAILABLE, "application/fhir+json; charset=utf-8",
                outcome::render(NGX_HTTP_SERVICE_UNAVAILABLE, "jwks-unavailable",
                                "The consent-signing keys are not known yet; try again shortly",
                                ctx != nullptr ? view(ctx->correlation_id) : std::string_view()),
                false);
        }
        return send_document(r, NGX_HTTP_OK, "application/jwk-set+json",
                             snapshot->consent_jwks + "\n", true);
    } catch (const std::exception &) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}

}  // namespace

char *set_status_handler(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = status_handler;
    return NGX_CONF_OK;
}

char *set_consent_jwks_handler(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = consent_jwks_handler;
    return NGX_CONF_OK;
}

}  // namespace ehrgate::ngx
