// Access phase: one policyd round trip per request, re-entered with the answer.
//
// Modelled on ngx_http_auth_request_module: the handler starts the call and returns NGX_AGAIN;
// when the reply (or the timeout, or a lost connection) arrives, the completion records the
// outcome and re-runs the phase engine, which calls the handler again to act on it. Every path
// that is not an explicit permit from policyd ends in an OperationOutcome error: fail closed.
#include <exception>
#include <string>
#include <vector>

#include "ehrgate/outcome.hpp"
#include "module.hpp"

namespace ehrgate::ngx {

namespace {

ngx_http_output_header_filter_pt g_next_header_filter;

MainConf *main_conf(ngx_http_request_t *r) {
    return static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_http_ehrgate_module));
}

ngx_table_elt_t *push_header(ngx_http_request_t *r, const char *name, ngx_str_t value) {
    auto *h = static_cast<ngx_table_elt_t *>(ngx_list_push(&r->headers_out.headers));
    if (h != nullptr) {
        h->hash = 1;
        h->key.data = reinterpret_cast<u_char *>(const_cast<char *>(name));
        h->key.len = ngx_strlen(name);
        h->value = value;
    }
    return h;
}

// nginx's own request log context adds the request line and Host to every error-log line; the
// request line carries patient ids. On protected locations this replaces it with the client
// address and the correlation id, which lead to the audit record instead.
u_char *phi_free_log_context(ngx_log_t *log, u_char *buf, size_t len) {
    u_char *p = buf;
    if (log->action != nullptr) {
        p = ngx_snprintf(buf, len, " while %s", log->action);
        len -= static_cast<size_t>(p - buf);
        buf = p;
    }
    const auto *log_ctx = static_cast<ngx_http_log_ctx_t *>(log->data);
    if (log_ctx == nullptr) {
        return p;
    }
    p = ngx_snprintf(buf, len, ", client: %V", &log_ctx->connection->addr_text);
    len -= static_cast<size_t>(p - buf);
    buf = p;
    if (ngx_http_request_t *r = log_ctx->request) {
        const auto *ctx =
            static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
        if (ctx != nullptr && ctx->correlation_id.len > 0) {
            p = ngx_snprintf(buf, len, ", correlation_id: %V", &ctx->correlation_id);
        }
    }
    return p;
}

}  // namespace

void record_failure(RequestCtx *ctx, uint16_t status, std::string_view reason,
                    std::string_view message) {
    ngx_pool_t *pool = ctx->request->pool;
    ctx->state = DecisionState::Failed;
    ctx->permit = false;
    ctx->status = status;
    ctx->reason = pool_copy(pool, reason);
    ctx->message = pool_copy(pool, message);
}

ngx_int_t send_outcome(ngx_http_request_t *r, RequestCtx *ctx) {
    const std::string body = outcome::render(ctx->status, view(ctx->reason), view(ctx->message),
                                             view(ctx->correlation_id));
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    r->headers_out.status = ctx->status;
    ngx_str_set(&r->headers_out.content_type, "application/fhir+json; charset=utf-8");
    r->headers_out.content_type_len = sizeof("application/fhir+json") - 1;
    r->headers_out.content_length_n = static_cast<off_t>(body.size());
    if (ctx->retry_after.len > 0 || ctx->status == NGX_HTTP_SERVICE_UNAVAILABLE) {
        ngx_str_t one = ngx_string("1");
        if (push_header(r, "Retry-After", ctx->retry_after.len > 0 ? ctx->retry_after : one) ==
            nullptr) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }
    if (ctx->www_authenticate.len > 0 &&
        push_header(r, "WWW-Authenticate", ctx->www_authenticate) == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    ngx_int_t rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }
    auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
    const ngx_str_t copy = pool_copy(r->pool, body);
    if (b == nullptr || copy.data == nullptr) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return NGX_DONE;
    }
    b->pos = copy.data;
    b->last = copy.data + copy.len;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;
    ngx_chain_t out{b, nullptr};
    ngx_http_finalize_request(r, ngx_http_output_filter(r, &out));
    return NGX_DONE;
}

namespace {

void resume(ngx_http_request_t *r) {
    ngx_connection_t *c = r->connection;
    ngx_http_core_run_phases(r);
    ngx_http_run_posted_requests(c);
}

// Consent (issue 5): a request header by name (case-insensitive); empty when absent.
ngx_str_t find_header(ngx_http_request_t *r, std::string_view name) {
    for (ngx_list_part_t *part = &r->headers_in.headers.part; part != nullptr; part = part->next) {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; ++i) {
            if (h[i].key.len == name.size() &&
                ngx_strncasecmp(h[i].key.data,
                                reinterpret_cast<u_char *>(const_cast<char *>(name.data())),
                                name.size()) == 0) {
                return h[i].value;
            }
        }
    }
    return ngx_str_t{0, nullptr};
}

std::string join(const std::vector<std::string> &values) {
    std::string out;
    for (const std::string &value : values) {
        out += (out.empty() ? "" : ",") + value;
    }
    return out;
}

void record_consent(ngx_http_request_t *r, RequestCtx *ctx, const protocol::DecideReply &reply) {
    ngx_pool_t *pool = r->pool;
    ctx->purpose_of_use = pool_copy(pool, reply.purpose_of_use);
    ctx->obligations = pool_copy(pool, join(reply.obligations));
    ctx->consent_ids = pool_copy(pool, join(reply.consent_ids));
    ctx->decision_id = pool_copy(pool, reply.decision_id);
    ctx->consent_token = pool_copy(pool, reply.consent_token);
    ctx->obligations_decided = !reply.decision_id.empty();  // consent was evaluated
    ctx->break_glass = reply.break_glass && reply.decision == protocol::Decision::Permit;
    if (ctx->break_glass) {
        // An alert for operators; no PHI: the ids lead to the audit record.
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "ehrgate: break-glass access permitted, client: %V, decision: %V",
                      &ctx->client_id, &ctx->decision_id);
    }
}

void apply_decision(ngx_http_request_t *r, RequestCtx *ctx, const protocol::DecideReply &reply) {
    ngx_pool_t *pool = r->pool;
    ctx->state = DecisionState::Decided;
    ctx->permit = reply.decision == protocol::Decision::Permit;
    ctx->status = ctx->permit ? NGX_HTTP_OK : reply.http_status;
    ctx->reason = pool_copy(pool, reply.reason);
    ctx->message = pool_copy(pool, reply.message);
    ctx->policy_version = pool_copy(pool, reply.policy_version);
    ctx->audit_resource_type = pool_copy(pool, reply.resource_type);  // audit (issue 7)
    ctx->audit_interaction = pool_copy(pool, reply.interaction);
    record_consent(r, ctx, reply);
}

void on_decision(void *data, CallOutcome outcome, const protocol::FrameView *frame) noexcept {
    auto *ctx = static_cast<RequestCtx *>(data);
    ngx_http_request_t *r = ctx->request;
    ctx->call_id = 0;
    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }
    try {
        if (outcome == CallOutcome::Disconnected) {
            record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-unavailable",
                           "The policy service connection was lost; no decision was made");
        } else if (frame->header.type != protocol::MessageType::DecideReply) {
            record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-error",
                           "The policy service could not decide this request");
        } else if (std::optional<protocol::DecideReply> reply =
                       protocol::decode_decide_reply(frame->body)) {
            apply_decision(r, ctx, *reply);
            remember_decision(ctx, *reply, frame->body);
            if (SidecarClient *client = worker_client()) {
                client->saw_policy_serial(reply->policy_serial);
            }
        } else {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "ehrgate: undecodable decision from policyd");
            record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-error",
                           "The policy service sent an invalid decision");
        }
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: decision handling failed: %s",
                      e.what());
        ctx->state = DecisionState::Failed;
        ctx->status = NGX_HTTP_SERVICE_UNAVAILABLE;
    }
    resume(r);
}

void on_timeout(ngx_event_t *ev) noexcept {
    auto *ctx = static_cast<RequestCtx *>(ev->data);
    ngx_http_request_t *r = ctx->request;
    SidecarClient *client = worker_client();
    if (client != nullptr && ctx->call_id != 0) {
        client->cancel(ctx->call_id);
    }
    ctx->call_id = 0;
    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0, "ehrgate: policyd decision timed out");
    try {
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-timeout",
                       "The policy service did not answer in time; no decision was made");
    } catch (const std::exception &) {
        ctx->state = DecisionState::Failed;
        ctx->status = NGX_HTTP_SERVICE_UNAVAILABLE;
    }
    // After resuming, the request may be gone: note_timeout() can drop the connection, which
    // completes other requests, so do it first.
    if (client != nullptr) {
        client->note_timeout();
    }
    resume(r);
}

// The access phase once the request is decided (and again when it re-enters after waiting).
ngx_int_t act_on_decision(ngx_http_request_t *r, RequestCtx *ctx) {
    if (ctx->state == DecisionState::Decided && ctx->permit) {
        // audit (issue 7): the access record is durable before anything is proxied.
        const ngx_int_t rc = audit_before_release(r, ctx);
        return rc == NGX_DECLINED ? NGX_OK : rc;
    }
    return send_outcome(r, ctx);
}

ngx_int_t start_decision(ngx_http_request_t *r, RequestCtx *ctx) {
    SidecarClient *client = worker_client();
    protocol::DecideRequest request;
    request.correlation_id.assign(view(ctx->correlation_id));
    request.method.assign(view(r->method_name));
    request.path.assign(view(r->uri));
    request.query.assign(view(r->args));
    if (r->headers_in.server.len > 0) {
        request.host.assign(view(r->headers_in.server));
    }
    request.client_id.assign(view(ctx->client_id));
    // Consent (issue 5): the claim (set by authenticate) wins over the header.
    request.user.assign(view(ctx->user));
    request.patient.assign(view(ctx->patient));
    if (ctx->asserted_purpose.len == 0) {
        ctx->asserted_purpose = find_header(r, "X-Purpose-Of-Use");
    }
    request.purpose_of_use.assign(view(ctx->asserted_purpose));
    if (ctx->break_glass_reason.len == 0) {  // the claim, set by authenticate, wins
        ctx->break_glass_reason = find_header(r, "X-Break-Glass-Reason");
    }
    request.break_glass_reason.assign(view(ctx->break_glass_reason));
    if (protocol::DecideReply cached; cached_decision(r, ctx, request, &cached)) {
        apply_decision(r, ctx, cached);
        return act_on_decision(r, ctx);
    }
    const uint32_t id = client == nullptr
                            ? 0
                            : client->call(protocol::MessageType::DecideRequest,
                                           protocol::encode(request), on_decision, ctx);
    if (id == 0) {
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-unavailable",
                       "The policy service is unavailable; no decision was made");
        return send_outcome(r, ctx);
    }
    ctx->call_id = id;
    ctx->state = DecisionState::Waiting;
    ctx->timer.handler = on_timeout;
    ctx->timer.data = ctx;
    ctx->timer.log = r->connection->log;
    ngx_add_timer(&ctx->timer, main_conf(r)->timeout);
    return NGX_AGAIN;
}

ngx_int_t header_filter(ngx_http_request_t *r) noexcept {
    auto *ctx = static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
    if (ctx == nullptr || r != r->main) {
        return g_next_header_filter(r);
    }
    const struct {
        ngx_str_t name;
        const ngx_str_t &value;
    } headers[] = {
        {ngx_string("X-Request-ID"), ctx->correlation_id},
        {ngx_string("X-Ehrgate-Policy-Version"), ctx->policy_version},
        {ngx_string("RateLimit-Policy"), ctx->ratelimit_policy},
        {ngx_string("RateLimit"), ctx->ratelimit},
    };
    for (const auto &header : headers) {
        if (header.value.len == 0) {
            continue;
        }
        auto *h = static_cast<ngx_table_elt_t *>(ngx_list_push(&r->headers_out.headers));
        if (h == nullptr) {
            return NGX_ERROR;
        }
        h->hash = 1;
        h->key = header.name;
        h->value = header.value;
    }
    return g_next_header_filter(r);
}

// Only the gateway speaks for consent: a client's own X-Ehrgate-Consent must never reach the
// upstream, even from a location whose configuration forgot
// `proxy_set_header X-Ehrgate-Consent $ehrgate_consent_token;` (which replaces it). nginx's
// header list cannot drop an element safely (other fields point into it), so the value is
// emptied: a downstream verifier sees no token.
void blank_client_consent_headers(ngx_http_request_t *r) {
    static constexpr std::string_view kName = "x-ehrgate-consent";
    for (ngx_list_part_t *part = &r->headers_in.headers.part; part != nullptr; part = part->next) {
        auto *headers = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; ++i) {
            ngx_table_elt_t &h = headers[i];
            if (h.key.len == kName.size() &&
                ngx_strncasecmp(h.key.data,
                                reinterpret_cast<u_char *>(const_cast<char *>(kName.data())),
                                kName.size()) == 0) {
                h.value.len = 0;
            }
        }
    }
}

}  // namespace

ngx_int_t access_handler(ngx_http_request_t *r) noexcept {
    auto *lcf = static_cast<LocConf *>(ngx_http_get_module_loc_conf(r, ngx_http_ehrgate_module));
    if (!lcf->enabled || r != r->main) {
        return NGX_DECLINED;
    }
    r->connection->log->handler = phi_free_log_context;
    // Forward the URI that is authorized: nginx's normalized one (dot segments and %2E resolved),
    // not the raw request line, which an upstream might resolve to another resource.
    r->valid_unparsed_uri = 0;
    try {
        RequestCtx *ctx = request_ctx(r);
        if (ctx == nullptr) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        switch (ctx->state) {
            case DecisionState::Idle: {
                blank_client_consent_headers(r);
                ngx_int_t rc = authenticate(r, ctx);
                if (rc == NGX_DECLINED) {
                    rc = apply_limits(r, ctx);
                }
                return rc == NGX_DECLINED ? start_decision(r, ctx) : rc;
            }
            case DecisionState::Waiting:
                return NGX_AGAIN;
            case DecisionState::Decided:
            case DecisionState::Failed:
                return act_on_decision(r, ctx);
        }
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: access check failed: %s",
                      e.what());
    }
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

ngx_int_t install_header_filter() noexcept {
    g_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = header_filter;
    return NGX_OK;
}

}  // namespace ehrgate::ngx
