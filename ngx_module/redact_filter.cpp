// Response redaction: every upstream response on an `ehrgate on` location streams through the
// redaction engine (shared/redaction.hpp) before a byte of it leaves.
//
// Modelled on ngx_http_sub_filter_module: Content-Length is cleared, output goes through a
// free/busy chain of our own buffers, input buffers are consumed as they come. Unlike sub_filter
// the headers are held until the engine releases its first byte: a single resource is held whole
// (so a withheld one becomes a 403 OperationOutcome), a search Bundle starts flowing at its
// `entry` member. After the headers went out, a fault can no longer become an error status: the
// connection is cut instead (NGX_ERROR), so the client never sees a complete, valid document.
//
// This replaces response_check.cpp, which held whole single-resource bodies for the patient
// compartment check; the engine does that check per resource, in streaming form.
#include <exception>
#include <memory>
#include <new>

#include "ehrgate/outcome.hpp"
#include "ehrgate/redaction.hpp"
#include "module.hpp"

namespace ehrgate::ngx {

namespace {

enum RedactState : uint8_t { kOff = 0, kHolding, kStreaming, kDone };

constexpr size_t kOutputBufferSize = 32 * 1024;

ngx_http_output_header_filter_pt g_next_header_filter;
ngx_http_output_body_filter_pt g_next_body_filter;

// Owned by a pool cleanup; keeps the snapshot (and so the engine's configuration) alive.
struct Stream {
    std::shared_ptr<const policy::Snapshot> snapshot;
    redaction::Redactor redactor;
    std::string out;

    Stream(std::shared_ptr<const policy::Snapshot> s, redaction::Request request)
        : snapshot(std::move(s)), redactor(snapshot->bundle.redaction.engine, std::move(request)) {}
};

void destroy_stream(void *data) noexcept {
    delete static_cast<Stream *>(data);
}

RequestCtx *redact_ctx(ngx_http_request_t *r) {
    if (r != r->main) {
        return nullptr;
    }
    return static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
}

bool media_type_is(const ngx_str_t &content_type, std::string_view wanted) {
    std::string_view type = view(content_type);
    const size_t semicolon = type.find(';');
    type = type.substr(0, semicolon);
    while (!type.empty() && (type.back() == ' ' || type.back() == '\t')) {
        type.remove_suffix(1);
    }
    if (type.size() != wanted.size()) {
        return false;
    }
    for (size_t i = 0; i < type.size(); ++i) {
        const char c = type[i] >= 'A' && type[i] <= 'Z' ? static_cast<char>(type[i] + 32) : type[i];
        if (c != wanted[i]) {
            return false;
        }
    }
    return true;
}

bool is_json(const ngx_str_t &content_type) {
    if (media_type_is(content_type, "application/json") ||
        media_type_is(content_type, "application/fhir+json")) {
        return true;
    }
    std::string_view type = view(content_type);
    type = type.substr(0, type.find(';'));
    return type.size() > 5 && type.ends_with("+json");
}

void push_header(ngx_http_request_t *r, ngx_list_t *list, const char *name, std::string_view v) {
    if (v.empty()) {
        return;
    }
    const ngx_str_t value = pool_copy(r->pool, v);
    auto *h = static_cast<ngx_table_elt_t *>(ngx_list_push(list));
    if (h == nullptr || value.data == nullptr) {
        return;
    }
    h->hash = 1;
    h->key.data = reinterpret_cast<u_char *>(const_cast<char *>(name));
    h->key.len = ngx_strlen(name);
    h->value = value;
}

std::string_view upstream_header(ngx_http_request_t *r, std::string_view name) {
    if (r->upstream == nullptr) {
        return {};
    }
    ngx_list_part_t *part = &r->upstream->headers_in.headers.part;
    auto *headers = static_cast<ngx_table_elt_t *>(part->elts);
    for (ngx_uint_t i = 0;; ++i) {
        if (i >= part->nelts) {
            if (part->next == nullptr) {
                break;
            }
            part = part->next;
            headers = static_cast<ngx_table_elt_t *>(part->elts);
            i = 0;
        }
        if (headers[i].key.len == name.size() &&
            ngx_strncasecmp(headers[i].key.data,
                            reinterpret_cast<u_char *>(const_cast<char *>(name.data())),
                            name.size()) == 0) {
            return view(headers[i].value);
        }
    }
    return {};
}

// Replaces the response with an OperationOutcome; possible only while the headers are held.
ngx_int_t send_replacement(ngx_http_request_t *r, RequestCtx *ctx, ngx_uint_t status,
                           std::string_view reason, std::string_view message) {
    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0, "ehrgate: response withheld: %s",
                  std::string(reason).c_str());
    ctx->redact_state = kDone;
    ctx->redactor = nullptr;  // what the upstream still sends is swallowed quietly
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
    if (r->headers_out.content_encoding != nullptr) {
        r->headers_out.content_encoding->hash = 0;
        r->headers_out.content_encoding = nullptr;
    }
    ngx_http_clear_etag(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_accept_ranges(r);
    r->expect_trailers = 0;
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

bool default_applies(const policy::Redaction &policy, const policy::Client *client) {
    if (policy.withheld_contexts.empty() || client == nullptr) {
        return true;
    }
    const std::string_view context = client->context == policy::LaunchContext::User      ? "user"
                                     : client->context == policy::LaunchContext::Patient ? "patient"
                                                                                         : "system";
    for (const std::string &listed : policy.withheld_contexts) {
        if (listed == context) {
            return true;
        }
    }
    return false;
}

// The route's upstream name, else its name: which system the data came from.
std::string source_system(ngx_http_request_t *r, const policy::Snapshot &snapshot) {
    const policy::Route *route = snapshot.bundle.match_route(view(r->uri));
    if (route == nullptr) {
        return {};
    }
    return route->upstream.empty() ? route->name : route->upstream;
}

ngx_int_t send_held_headers(ngx_http_request_t *r, RequestCtx *ctx, Stream &stream, bool last) {
    ctx->redact_state = kStreaming;
    push_header(r, &r->headers_out.headers, "X-Ehrgate-Source", source_system(r, *stream.snapshot));
    std::string_view when = upstream_header(r, "Last-Modified");
    if (when.empty()) {
        when = upstream_header(r, "Date");
    }
    push_header(r, &r->headers_out.headers, "X-Ehrgate-Source-Time",
                when.empty() ? stream.redactor.last_updated() : when);
    const redaction::Counters &counters = stream.redactor.counters();
    if (last) {
        ctx->redaction_count =
            static_cast<uint32_t>(counters.resources_removed + counters.resources_masked);
        // The whole body is decided: the count goes in the header.
        push_header(r, &r->headers_out.headers, "X-Ehrgate-Redacted",
                    std::to_string(counters.resources_removed + counters.resources_masked));
    } else {
        // Known only at the end: sent as a trailer where the protocol has them (chunked
        // HTTP/1.1, HTTP/2).
        r->expect_trailers = 1;
    }
    // The body is the redacted view for this caller and these obligations: not the upstream's
    // length, and no validator of the upstream's bytes (a 304 must not revive a view made under
    // other rules).
    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_etag(r);
    ngx_http_clear_last_modified(r);
    if (last) {
        // The whole view is known (a single resource, a small Bundle): its own length, so the
        // response needs no chunked framing and leaves in one write.
        r->headers_out.content_length_n = static_cast<off_t>(stream.out.size());
    }
    return g_next_header_filter(r);
}

// Copies `data` into our own buffers and appends them to `*tail`.
bool append_output(ngx_http_request_t *r, RequestCtx *ctx, std::string_view data,
                   ngx_chain_t ***tail) {
    while (!data.empty()) {
        ngx_chain_t *cl = ngx_chain_get_free_buf(r->pool, &ctx->redact_free);
        if (cl == nullptr) {
            return false;
        }
        ngx_buf_t *b = cl->buf;
        if (b->start == nullptr) {
            b->start = static_cast<u_char *>(ngx_palloc(r->pool, kOutputBufferSize));
            if (b->start == nullptr) {
                return false;
            }
            b->end = b->start + kOutputBufferSize;
        }
        b->pos = b->start;
        const size_t n = std::min(data.size(), static_cast<size_t>(b->end - b->start));
        ngx_memcpy(b->pos, data.data(), n);
        b->last = b->pos + n;
        b->memory = 1;
        b->temporary = 0;
        b->recycled = 0;
        b->flush = 0;
        b->last_buf = 0;
        b->tag = reinterpret_cast<ngx_buf_tag_t>(&ngx_http_ehrgate_module);
        data.remove_prefix(n);
        **tail = cl;
        *tail = &cl->next;
    }
    return true;
}

ngx_int_t header_filter(ngx_http_request_t *r) noexcept {
    RequestCtx *ctx = redact_ctx(r);
    if (ctx == nullptr || !ctx->permit || r->upstream == nullptr ||
        r->upstream->headers_in.status_n == 0 || r->header_only ||
        r->headers_out.status == NGX_HTTP_NO_CONTENT ||
        r->headers_out.status == NGX_HTTP_NOT_MODIFIED) {
        return g_next_header_filter(r);
    }
    try {
        SidecarClient *client = worker_client();
        std::shared_ptr<const policy::Snapshot> snapshot =
            client != nullptr ? client->snapshot_ref() : nullptr;
        if (snapshot == nullptr) {
            return send_replacement(r, ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-unavailable",
                                    "No policy is loaded to check the response with");
        }
        ctx->redact_state = kHolding;
        r->filter_need_in_memory = 1;
        const ngx_table_elt_t *encoding = r->headers_out.content_encoding;
        if (encoding != nullptr && encoding->hash != 0 &&
            !(encoding->value.len == 8 &&
              ngx_strncasecmp(encoding->value.data, (u_char *)"identity", 8) == 0)) {
            // Cannot look inside; we ask the EHR for identity (Accept-Encoding cleared in the
            // location), so this is an EHR that ignored it.
            ctx->redact_state = kDone;
            return send_replacement(r, ctx, NGX_HTTP_BAD_GATEWAY, "upstream-encoding-refused",
                                    "The EHR sent an encoded response the gateway cannot check");
        }
        const policy::Redaction &policy = snapshot->bundle.redaction;
        if (!is_json(r->headers_out.content_type)) {
            bool allowed = ctx->check_patient.len == 0;  // a compartment check needs JSON
            if (allowed) {
                allowed = false;
                for (const std::string &type : policy.allowed_content_types) {
                    allowed = allowed || media_type_is(r->headers_out.content_type, type);
                }
            }
            if (allowed) {
                ctx->redact_state = kOff;
                return g_next_header_filter(r);
            }
            ctx->redact_state = kDone;
            return send_replacement(r, ctx, NGX_HTTP_BAD_GATEWAY, "upstream-content-type-refused",
                                    "The EHR sent a content type the gateway does not release");
        }
        redaction::Request request;
        const policy::Client *client_policy = snapshot->bundle.find_client(view(ctx->client_id));
        // Consent obligations when consent decided the request (empty: nothing to withhold),
        // else the bundle's default for the client's launch context (an unidentified client
        // gets the default: fail closed).
        if (ctx->obligations_decided) {
            request.withheld = redaction::split_labels(view(ctx->obligations));
        } else if (default_applies(policy, client_policy)) {
            request.withheld = policy.withheld_labels;
        }
        if (ctx->check_patient.len > 0) {
            request.patient_id = std::string(view(ctx->check_patient));
        } else if (client_policy != nullptr &&
                   client_policy->context == policy::LaunchContext::Patient &&
                   ctx->patient.len > 0) {
            request.patient_id = std::string(view(ctx->patient));
        }
        if (!request.patient_id.empty() && r->headers_in.host != nullptr) {
            if (const policy::Route *route = snapshot->bundle.match_route(view(r->uri))) {
                request.server_base = (r->connection->ssl != nullptr ? "https://" : "http://") +
                                      std::string(view(r->headers_in.host->value)) +
                                      route->prefix.substr(0, route->prefix.size() - 1);
            }
        }
        ngx_pool_cleanup_t *cleanup = ngx_pool_cleanup_add(r->pool, 0);
        if (cleanup == nullptr) {
            return NGX_ERROR;
        }
        auto *stream = new Stream(std::move(snapshot), std::move(request));
        cleanup->handler = destroy_stream;
        cleanup->data = stream;
        ctx->redactor = stream;
        return NGX_OK;  // headers go out with the first released byte
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: redaction setup failed: %s",
                      e.what());
        return NGX_ERROR;
    }
}

ngx_int_t fail_stream(ngx_http_request_t *r, RequestCtx *ctx, const Stream &stream) {
    const std::string reason(stream.redactor.reason());
    if (ctx->redact_state == kHolding) {
        if (stream.redactor.status() == redaction::Status::Withheld) {
            return send_replacement(
                r, ctx, NGX_HTTP_FORBIDDEN, reason,
                reason == "outside-patient-compartment"
                    ? "The requested resource is outside the patient's compartment"
                    : "The requested resource is withheld by policy");
        }
        return send_replacement(r, ctx, NGX_HTTP_BAD_GATEWAY, "upstream-response-unverifiable",
                                "The EHR's response could not be verified and was withheld");
    }
    // Headers are gone: cut the connection so no unchecked byte and no valid end goes out.
    ctx->redact_state = kDone;
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "ehrgate: response cut mid-stream: %s (correlation %V)", reason.c_str(),
                  &ctx->correlation_id);
    r->keepalive = 0;
    return NGX_ERROR;
}

ngx_int_t body_filter(ngx_http_request_t *r, ngx_chain_t *in) noexcept {
    RequestCtx *ctx = redact_ctx(r);
    if (ctx == nullptr || ctx->redact_state == kOff) {
        return g_next_body_filter(r, in);
    }
    if (ctx->redact_state == kDone) {
        // Replaced or cut: swallow what the upstream still sends.
        for (ngx_chain_t *cl = in; cl != nullptr; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            if (cl->buf->in_file) {
                cl->buf->file_pos = cl->buf->file_last;
            }
        }
        return ctx->redactor == nullptr ? NGX_OK : NGX_ERROR;
    }
    auto *stream = static_cast<Stream *>(ctx->redactor);
    if (stream == nullptr) {
        return NGX_ERROR;
    }
    try {
        stream->out.clear();
        for (ngx_chain_t *cl = in; cl != nullptr; cl = cl->next) {
            ngx_buf_t *b = cl->buf;
            if (!ngx_buf_in_memory(b) && ngx_buf_size(b) > 0) {
                // filter_need_in_memory makes the copy filter read file buffers for us; a body
                // we cannot see is never passed on.
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "ehrgate: response body not in memory; cut");
                ctx->redact_state = kDone;
                r->keepalive = 0;
                return NGX_ERROR;
            }
            const std::string_view chunk(reinterpret_cast<const char *>(b->pos),
                                         static_cast<size_t>(b->last - b->pos));
            b->pos = b->last;
            if (b->in_file) {
                b->file_pos = b->file_last;
            }
            if (stream->redactor.feed(chunk, stream->out) != redaction::Status::Ok) {
                return fail_stream(r, ctx, *stream);
            }
        }
        bool last_buf = false;
        for (ngx_chain_t *cl = in; cl != nullptr; cl = cl->next) {
            last_buf = last_buf || cl->buf->last_buf;
        }
        // The document usually closes before the upstream's last buffer arrives (the event
        // pipe sends that on its own, later): end the view now, so that its last bytes and its
        // end leave together. Whatever the upstream still sends is swallowed (kDone); after a
        // complete document only whitespace may follow, and none of it is ours to release.
        last_buf = last_buf || stream->redactor.complete();
        if (last_buf && stream->redactor.finish(stream->out) != redaction::Status::Ok) {
            return fail_stream(r, ctx, *stream);
        }
        if (stream->out.empty() && !last_buf) {
            return ctx->redact_state == kStreaming ? g_next_body_filter(r, nullptr) : NGX_OK;
        }
        if (ctx->redact_state == kHolding) {
            const ngx_int_t rc =
                send_held_headers(r, ctx, *stream, last_buf || stream->redactor.complete());
            if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
                ctx->redact_state = kDone;
                return rc;
            }
        }
        ngx_chain_t *out = nullptr;
        ngx_chain_t **tail = &out;
        if (!append_output(r, ctx, stream->out, &tail)) {
            return NGX_ERROR;
        }
        if (last_buf) {
            const redaction::Counters &counters = stream->redactor.counters();
            ctx->redaction_count =
                static_cast<uint32_t>(counters.resources_removed + counters.resources_masked);
            if (r->expect_trailers) {
                push_header(r, &r->headers_out.trailers, "X-Ehrgate-Redacted",
                            std::to_string(counters.resources_removed + counters.resources_masked));
            }
            ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
            auto *b = static_cast<ngx_buf_t *>(ngx_pcalloc(r->pool, sizeof(ngx_buf_t)));
            if (cl == nullptr || b == nullptr) {
                return NGX_ERROR;
            }
            b->last_buf = 1;
            cl->buf = b;
            cl->next = nullptr;
            *tail = cl;
            ctx->redact_state = kDone;
            ctx->redactor = nullptr;  // the cleanup still owns it; kDone now swallows quietly
        }
        const ngx_int_t rc = g_next_body_filter(r, out);
        ngx_chain_update_chains(r->pool, &ctx->redact_free, &ctx->redact_busy, &out,
                                reinterpret_cast<ngx_buf_tag_t>(&ngx_http_ehrgate_module));
        return rc;
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: redaction failed: %s",
                      e.what());
        ctx->redact_state = kDone;
        r->keepalive = 0;
        return NGX_ERROR;
    }
}

}  // namespace

ngx_int_t install_redact_filter() noexcept {
    g_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = header_filter;
    g_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = body_filter;
    return NGX_OK;
}

}  // namespace ehrgate::ngx
