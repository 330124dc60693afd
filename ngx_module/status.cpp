// `ehrgate_status;`: this worker's view of the gateway as JSON, for operators and tests. Like
// stub_status it has no access control of its own; restrict it with allow/deny.
#include <exception>
#include <string>

#include "ehrgate/json_text.hpp"
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
    const ngx_str_t copy = pool_copy(r->pool, body);
    auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
    if (copy.data == nullptr || b == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_length_n = static_cast<off_t>(copy.len);
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

}  // namespace

char *set_status_handler(ngx_conf_t *cf, ngx_command_t *, void *) noexcept {
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = status_handler;
    return NGX_CONF_OK;
}

}  // namespace ehrgate::ngx
