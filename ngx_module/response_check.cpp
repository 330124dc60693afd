// Response-side patient compartment check: when a patient-context token reads a resource by id,
// only the body says whose it is. The response is held (headers and body, bounded), checked, and
// released only when it is the token's patient's; otherwise the caller gets a 403
// OperationOutcome and none of the body. Modelled on the xslt filter, which also holds the
// header until the body is complete.
#include <exception>

#include "ehrgate/json.hpp"
#include "ehrgate/outcome.hpp"
#include "ehrgate/resource_compartment.hpp"
#include "module.hpp"

namespace ehrgate::ngx {

namespace {

// A single FHIR resource or a history bundle of one resource; larger means something else is
// going on, and an unverifiable response is not released.
constexpr size_t kMaxCheckedBody = 2u << 20;

enum CheckState : uint8_t { kNotChecked = 0, kHolding, kReplacing };

ngx_http_output_header_filter_pt g_next_header_filter;
ngx_http_output_body_filter_pt g_next_body_filter;

RequestCtx *checked_ctx(ngx_http_request_t *r) {
    if (r != r->main) {
        return nullptr;
    }
    return static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
}

// Replaces the held response with an OperationOutcome; the upstream body is discarded.
ngx_int_t send_replacement(ngx_http_request_t *r, RequestCtx *ctx, ngx_uint_t status,
                           std::string_view reason, std::string_view message) {
    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0, "ehrgate: response withheld: %s",
                  std::string(reason).c_str());
    const std::string body =
        outcome::render(static_cast<unsigned>(status), reason, message, view(ctx->correlation_id));
    const ngx_str_t copy = pool_copy(r->pool, body);
    auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
    if (copy.data == nullptr || b == nullptr) {
        return NGX_ERROR;
    }
    r->headers_out.status = status;
    r->headers_out.status_line.len = 0;
    ngx_str_set(&r->headers_out.content_type, "application/fhir+json; charset=utf-8");
    r->headers_out.content_type_len = sizeof("application/fhir+json") - 1;
    r->headers_out.content_length_n = static_cast<off_t>(copy.len);
    if (r->headers_out.content_length != nullptr) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = nullptr;
    }
    if (r->headers_out.content_encoding != nullptr) {
        r->headers_out.content_encoding->hash = 0;
        r->headers_out.content_encoding = nullptr;
    }
    ngx_http_clear_etag(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_accept_ranges(r);
    ctx->check_state = kNotChecked;
    const ngx_int_t rc = g_next_header_filter(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    b->pos = copy.data;
    b->last = copy.data + copy.len;
    b->memory = 1;
    b->last_buf = 1;
    ngx_chain_t out{b, nullptr};
    return g_next_body_filter(r, &out);
}

ngx_int_t header_filter(ngx_http_request_t *r) noexcept {
    RequestCtx *ctx = checked_ctx(r);
    if (ctx == nullptr || ctx->check_patient.len == 0 || r->header_only ||
        r->headers_out.status != NGX_HTTP_OK) {
        return g_next_header_filter(r);
    }
    const ngx_table_elt_t *encoding = r->headers_out.content_encoding;
    if (encoding != nullptr && encoding->hash != 0 &&
        !(encoding->value.len == 8 &&
          ngx_strncasecmp(encoding->value.data, (u_char *)"identity", 8) == 0)) {
        // Cannot look inside: never release it.
        ctx->check_state = kReplacing;
        r->filter_need_in_memory = 1;
        return NGX_OK;
    }
    ctx->check_state = kHolding;
    r->filter_need_in_memory = 1;
    return NGX_OK;  // headers go out with the verdict
}

bool hold(ngx_http_request_t *r, RequestCtx *ctx, const ngx_buf_t *b) {
    const size_t n = static_cast<size_t>(b->last - b->pos);
    if (n == 0) {
        return true;
    }
    if (ctx->check_len + n > kMaxCheckedBody) {
        return false;
    }
    if (ctx->check_len + n > ctx->check_cap) {
        const size_t cap =
            std::max(ctx->check_cap * 2, std::max<size_t>(ctx->check_len + n, 16384));
        auto *data = static_cast<u_char *>(ngx_pnalloc(r->pool, cap));
        if (data == nullptr) {
            return false;
        }
        if (ctx->check_len > 0) {
            ngx_memcpy(data, ctx->check_data, ctx->check_len);
        }
        ctx->check_data = data;
        ctx->check_cap = cap;
    }
    ngx_memcpy(ctx->check_data + ctx->check_len, b->pos, n);
    ctx->check_len += n;
    return true;
}

ngx_int_t release(ngx_http_request_t *r, RequestCtx *ctx) {
    ctx->check_state = kNotChecked;
    const ngx_int_t rc = g_next_header_filter(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
    if (b == nullptr) {
        return NGX_ERROR;
    }
    b->pos = ctx->check_data;
    b->last = ctx->check_data + ctx->check_len;
    b->memory = ctx->check_len > 0;
    b->last_buf = 1;
    ngx_chain_t out{b, nullptr};
    return g_next_body_filter(r, &out);
}

ngx_int_t verdict(ngx_http_request_t *r, RequestCtx *ctx) {
    json::ParseError error;
    json::Limits limits;
    limits.max_bytes = kMaxCheckedBody;
    limits.max_depth = 64;
    const std::optional<json::Value> resource =
        json::parse(std::string_view(reinterpret_cast<char *>(ctx->check_data), ctx->check_len),
                    &error, limits);
    if (!resource) {
        return send_replacement(r, ctx, NGX_HTTP_BAD_GATEWAY, "upstream-response-unverifiable",
                                "The EHR's response could not be verified and was withheld");
    }
    std::string base;
    if (r->headers_in.host != nullptr) {
        // Absolute references are recognized below this endpoint's own base only.
        if (const SidecarClient *client = worker_client();
            client != nullptr && client->snapshot() != nullptr) {
            if (const policy::Route *route = client->snapshot()->bundle.match_route(view(r->uri))) {
                base = (r->connection->ssl != nullptr ? "https://" : "http://") +
                       std::string(view(r->headers_in.host->value)) +
                       route->prefix.substr(0, route->prefix.size() - 1);
            }
        }
    }
    if (!compartment::resource_in_patient_compartment(*resource, view(ctx->check_patient), base)) {
        return send_replacement(r, ctx, NGX_HTTP_FORBIDDEN, "outside-patient-compartment",
                                "The requested resource is outside the patient's compartment");
    }
    return release(r, ctx);
}

ngx_int_t body_filter(ngx_http_request_t *r, ngx_chain_t *in) noexcept {
    RequestCtx *ctx = checked_ctx(r);
    if (ctx == nullptr || (ctx->check_state != kHolding && ctx->check_state != kReplacing)) {
        return g_next_body_filter(r, in);
    }
    try {
        bool last = false;
        for (ngx_chain_t *cl = in; cl != nullptr; cl = cl->next) {
            ngx_buf_t *b = cl->buf;
            if (ctx->check_state == kHolding && !hold(r, ctx, b)) {
                ctx->check_state = kReplacing;
                ctx->check_len = 0;
            }
            b->pos = b->last;  // consumed: nothing of it goes downstream as it is
            if (b->in_file) {
                b->file_pos = b->file_last;
            }
            last = last || b->last_buf;
        }
        if (!last) {
            return NGX_OK;
        }
        if (ctx->check_state == kReplacing) {
            return send_replacement(r, ctx, NGX_HTTP_BAD_GATEWAY, "upstream-response-unverifiable",
                                    "The EHR's response could not be verified and was withheld");
        }
        return verdict(r, ctx);
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: response check failed: %s",
                      e.what());
        return NGX_ERROR;
    }
}

}  // namespace

ngx_int_t install_response_check_filter() noexcept {
    g_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = header_filter;
    g_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = body_filter;
    return NGX_OK;
}

}  // namespace ehrgate::ngx
