// Audit in the worker (issue 7): audit-before-release in the access phase, the outcome record in
// the log phase, and the per-worker outbox that delivers outcome records to policyd.
//
// Access records on `ehrgate_audit sync` locations are sent as one AuditAppend each and the
// request waits (NGX_AGAIN, like the decision) until policyd acknowledges that the record is
// durable; any other answer, a timeout or an unreachable policyd ends in 503 and nothing is
// proxied. Outcome records (and access records of async locations) go into a bounded
// in-memory outbox that never blocks: it is flushed in batches while policyd is reachable,
// kept while it is not, and redelivered after a lost ack (policyd deduplicates by record id).
// When the outbox is full, new records are dropped and counted (see docs/audit.md).

#include <chrono>
#include <deque>
#include <exception>
#include <memory>
#include <vector>

#include "ehrgate/audit.hpp"
#include "ehrgate/consent.hpp"
#include "module.hpp"

namespace ehrgate::ngx {

namespace {

constexpr size_t kMaxRecordsPerFlush = 512;
constexpr ngx_msec_t kFlushDelay = 5;    // gather records of one burst into one frame
constexpr ngx_msec_t kRetryDelay = 250;  // policyd unreachable or refused the batch
constexpr ngx_msec_t kInflightTimeout = 5000;

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// Record ids: a random per-worker prefix and a counter, unique across workers and restarts.
std::string g_id_prefix;
uint64_t g_id_counter = 0;

std::string next_record_id() {
    return g_id_prefix + "-" + std::to_string(++g_id_counter);
}

LocConf *loc_conf(ngx_http_request_t *r) {
    return static_cast<LocConf *>(ngx_http_get_module_loc_conf(r, ngx_http_ehrgate_module));
}

MainConf *main_conf(ngx_http_request_t *r) {
    return static_cast<MainConf *>(ngx_http_get_module_main_conf(r, ngx_http_ehrgate_module));
}

const ngx_str_t *find_header(ngx_http_request_t *r, std::string_view name) {
    ngx_list_part_t *part = &r->headers_in.headers.part;
    auto *headers = static_cast<ngx_table_elt_t *>(part->elts);
    for (ngx_uint_t i = 0;; ++i) {
        if (i >= part->nelts) {
            if (part->next == nullptr) {
                return nullptr;
            }
            part = part->next;
            headers = static_cast<ngx_table_elt_t *>(part->elts);
            i = 0;
        }
        if (headers[i].key.len == name.size() &&
            ngx_strncasecmp(headers[i].key.data,
                            reinterpret_cast<u_char *>(const_cast<char *>(name.data())),
                            name.size()) == 0) {
            return &headers[i].value;
        }
    }
}

bool lower_hex(std::string_view s) {
    for (const char c : s) {
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return false;
        }
    }
    return true;
}

// W3C trace context: version 00, 32-hex trace id, 16-hex parent id, 2-hex flags, ids not all 0.
bool valid_traceparent(std::string_view v) {
    return v.size() == 55 && v.substr(0, 3) == "00-" && v[35] == '-' && v[52] == '-' &&
           lower_hex(v.substr(3, 32)) && lower_hex(v.substr(36, 16)) &&
           lower_hex(v.substr(53, 2)) && v.substr(3, 32) != std::string(32, '0') &&
           v.substr(36, 16) != std::string(16, '0');
}

void ensure_traceparent(ngx_http_request_t *r, RequestCtx *ctx) {
    if (ctx->traceparent.len > 0) {
        return;
    }
    if (const ngx_str_t *incoming = find_header(r, "traceparent");
        incoming != nullptr && valid_traceparent(view(*incoming))) {
        ctx->traceparent = *incoming;
        return;
    }
    // A generated correlation id is 32 hex digits: reuse it as the trace id so the two agree.
    u_char random[24];
    if (!random_bytes(random, sizeof random)) {
        return;
    }
    char hex[2 * sizeof random + 1];
    ngx_hex_dump(reinterpret_cast<u_char *>(hex), random, sizeof random);
    const std::string_view corr = view(ctx->correlation_id);
    const std::string trace_id =
        corr.size() == 32 && lower_hex(corr) ? std::string(corr) : std::string(hex, 32);
    ctx->traceparent =
        pool_copy(r->pool, "00-" + trace_id + "-" + std::string(hex + 32, 16) + "-01");
}

audit::Record build_record(ngx_http_request_t *r, RequestCtx *ctx, audit::Kind kind) {
    ensure_traceparent(r, ctx);
    audit::Record rec;
    rec.kind = kind;
    rec.time_us = now_us();
    rec.record_id = next_record_id();
    rec.correlation_id.assign(view(ctx->correlation_id));
    rec.traceparent.assign(view(ctx->traceparent));
    rec.client_id.assign(view(ctx->client_id));
    rec.user.assign(view(ctx->user));
    if (ctx->patient.len > 0) {
        rec.patient_ids.emplace_back(view(ctx->patient));
    }
    if (ctx->check_patient.len > 0 && view(ctx->check_patient) != view(ctx->patient)) {
        rec.patient_ids.emplace_back(view(ctx->check_patient));
    }
    if (rec.patient_ids.empty()) {
        // A clinician's or a service's request names its patient in the URL (Patient/<id>,
        // ?patient=, ?subject=), the same one consent was decided for: "who accessed this
        // patient's record" must find it. Worked out once for both of the request's records.
        if (!ctx->url_patient_known) {
            const SidecarClient *client = worker_client();
            const policy::Snapshot *snapshot = client != nullptr ? client->snapshot() : nullptr;
            const std::string_view uri = view(r->uri);
            if (const policy::Route *route =
                    snapshot != nullptr ? snapshot->bundle.match_route(uri) : nullptr) {
                ctx->url_patient =
                    pool_copy(r->pool, consent::named_patient(view(r->method_name),
                                                              uri.substr(route->prefix.size()),
                                                              view(r->args)));
            }
            ctx->url_patient_known = true;
        }
        if (ctx->url_patient.len > 0) {
            rec.patient_ids.emplace_back(view(ctx->url_patient));
        }
    }
    rec.method.assign(view(r->method_name));
    rec.resource_type.assign(view(ctx->audit_resource_type));
    rec.interaction.assign(view(ctx->audit_interaction));
    rec.query.assign(view(r->args));
    rec.policy_version.assign(view(ctx->policy_version));
    const bool permitted = ctx->state == DecisionState::Decided && ctx->permit;
    rec.decision = permitted ? "permit" : ctx->status >= 500 ? "error" : "deny";
    rec.reason.assign(view(ctx->reason));
    // Consent (docs/consent.md): what the decision rested on.
    rec.purpose_of_use.assign(view(ctx->purpose_of_use));
    rec.break_glass = ctx->break_glass;
    for (std::string_view ids = view(ctx->consent_ids); !ids.empty();) {
        const size_t comma = ids.find(',');
        if (comma != 0) {
            rec.consent_ids.emplace_back(ids.substr(0, comma));
        }
        ids = comma == std::string_view::npos ? std::string_view() : ids.substr(comma + 1);
    }
    rec.client_address.assign(view(r->connection->addr_text));
    rec.cert_fingerprint.assign(view(ctx->cert_fingerprint));
    rec.jti_hash.assign(view(ctx->jti_hash));
    if (kind == audit::Kind::Outcome) {
        rec.http_status = static_cast<uint16_t>(r->headers_out.status);
        const ngx_time_t *tp = ngx_timeofday();
        const ngx_msec_int_t ms = static_cast<ngx_msec_int_t>((tp->sec - r->start_sec) * 1000 +
                                                              (tp->msec - r->start_msec));
        rec.latency_us = static_cast<uint64_t>(ms < 0 ? 0 : ms) * 1000;
        rec.bytes = static_cast<uint64_t>(r->connection->sent);
        rec.redaction_count = ctx->redaction_count;
        if (r->upstream != nullptr && r->upstream->peer.name != nullptr) {
            rec.upstream.assign(view(*r->upstream->peer.name));
        }
    }
    return rec;
}

// ---- the outbox --------------------------------------------------------------------------------

class Outbox {
  public:
    Outbox(size_t max_records, ngx_log_t *log) : max_(max_records), log_(log) {
        timer_.handler = on_timer;
        timer_.data = this;
        timer_.log = log;
        // A gracefully exiting worker does not wait for it; what is still queued then is lost
        // and logged (docs/audit.md).
        timer_.cancelable = 1;
    }
    ~Outbox() {
        if (timer_.timer_set) {
            ngx_del_timer(&timer_);
        }
        if (call_id_ != 0) {
            if (SidecarClient *client = worker_client()) {
                client->cancel(call_id_);
            }
        }
        const size_t left = pending_.size() + inflight_.size();
        if (left > 0) {
            ngx_log_error(NGX_LOG_WARN, log_, 0,
                          "ehrgate: worker exiting with %uz undelivered audit records", left);
        }
    }

    void push(audit::Record record) {
        if (pending_.size() + inflight_.size() >= max_) {
            // Bounded: dropping is counted and logged, never waited on (docs/audit.md).
            if (dropped_++ % 1000 == 0) {
                ngx_log_error(NGX_LOG_ERR, log_, 0,
                              "ehrgate: audit outbox full (%uz records), dropped %uL so far", max_,
                              dropped_);
            }
            return;
        }
        // Kept encoded: the record's strings are freed now, and a flush (or a redelivery) only
        // concatenates bytes.
        pending_.push_back(audit::encode_record(record));
        arm(kFlushDelay);
    }

    std::string status_json() const {
        return "{\"queued\":" + std::to_string(pending_.size()) +
               ",\"inflight\":" + std::to_string(inflight_.size()) +
               ",\"capacity\":" + std::to_string(max_) +
               ",\"delivered\":" + std::to_string(delivered_) +
               ",\"dropped\":" + std::to_string(dropped_) +
               ",\"redeliveries\":" + std::to_string(redeliveries_) + "}";
    }

  private:
    void arm(ngx_msec_t delay) {
        if (!timer_.timer_set) {
            ngx_add_timer(&timer_, delay);
        }
    }

    void requeue() {
        redeliveries_ += inflight_.size();
        for (auto it = inflight_.rbegin(); it != inflight_.rend(); ++it) {
            pending_.push_front(std::move(*it));
        }
        inflight_.clear();
    }

    static void on_timer(ngx_event_t *ev) noexcept {
        try {
            static_cast<Outbox *>(ev->data)->flush();
        } catch (const std::exception &e) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0, "ehrgate: audit flush failed: %s", e.what());
        }
    }

    void flush() {
        SidecarClient *client = worker_client();
        if (call_id_ != 0) {
            if (ngx_current_msec - inflight_since_ < kInflightTimeout) {
                arm(kRetryDelay);
                return;
            }
            // No ack for too long (policyd wedged): redeliver; a late ack is simply dropped.
            if (client != nullptr) {
                client->cancel(call_id_);
            }
            call_id_ = 0;
            requeue();
        }
        if (pending_.empty()) {
            return;
        }
        if (client == nullptr || !client->connected()) {
            arm(kRetryDelay);
            return;
        }
        while (!pending_.empty() && inflight_.size() < kMaxRecordsPerFlush) {
            inflight_.push_back(std::move(pending_.front()));
            pending_.pop_front();
        }
        // inflight_ is kept until the ack says the records are durable.
        const uint32_t id =
            client->call(protocol::MessageType::AuditAppend,
                         protocol::encode_audit_append(/*sync=*/false, inflight_), on_ack, this);
        if (id == 0) {
            requeue();
            arm(kRetryDelay);
            return;
        }
        call_id_ = id;
        inflight_since_ = ngx_current_msec;
    }

    static void on_ack(void *data, CallOutcome outcome, const protocol::FrameView *frame) noexcept {
        auto *self = static_cast<Outbox *>(data);
        self->call_id_ = 0;
        try {
            std::optional<protocol::AuditAck> ack;
            if (outcome == CallOutcome::Reply &&
                frame->header.type == protocol::MessageType::AuditAck) {
                ack = protocol::decode_audit_ack(frame->body);
            }
            if (ack && ack->ok) {
                self->delivered_ += self->inflight_.size();
                self->inflight_.clear();
                if (!self->pending_.empty()) {
                    self->arm(kFlushDelay);
                }
                return;
            }
            ngx_log_error(NGX_LOG_WARN, self->log_, 0,
                          "ehrgate: audit batch not acknowledged (%s), will redeliver",
                          ack ? ack->error.c_str() : "no ack");
            self->requeue();
            self->arm(kRetryDelay);
        } catch (const std::exception &) {
            self->requeue();
            self->arm(kRetryDelay);
        }
    }

    std::deque<std::string> pending_;  // encoded records (audit::encode_record)
    std::vector<std::string> inflight_;
    size_t max_;
    ngx_log_t *log_;
    ngx_event_t timer_{};
    uint32_t call_id_ = 0;
    ngx_msec_t inflight_since_ = 0;
    uint64_t delivered_ = 0;
    uint64_t dropped_ = 0;
    uint64_t redeliveries_ = 0;
};

std::unique_ptr<Outbox> g_outbox;

void resume(ngx_http_request_t *r) {
    ngx_connection_t *c = r->connection;
    ngx_http_core_run_phases(r);
    ngx_http_run_posted_requests(c);
}

void on_access_ack(void *data, CallOutcome outcome, const protocol::FrameView *frame) noexcept {
    auto *ctx = static_cast<RequestCtx *>(data);
    ngx_http_request_t *r = ctx->request;
    ctx->audit_call_id = 0;
    if (ctx->audit_timer.timer_set) {
        ngx_del_timer(&ctx->audit_timer);
    }
    try {
        std::optional<protocol::AuditAck> ack;
        if (outcome == CallOutcome::Reply &&
            frame->header.type == protocol::MessageType::AuditAck) {
            ack = protocol::decode_audit_ack(frame->body);
        }
        if (ack && ack->ok) {
            ctx->audit_state = AuditState::Durable;
        } else {
            ctx->audit_state = AuditState::Failed;
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "ehrgate: access record not durable (%s); request refused",
                          ack                                    ? ack->error.c_str()
                          : outcome == CallOutcome::Disconnected ? "policyd connection lost"
                                                                 : "bad reply");
            record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "audit-unavailable",
                           "The access could not be recorded; nothing was released");
        }
    } catch (const std::exception &) {
        ctx->audit_state = AuditState::Failed;
        ctx->state = DecisionState::Failed;
        ctx->status = NGX_HTTP_SERVICE_UNAVAILABLE;
    }
    resume(r);
}

void on_access_timeout(ngx_event_t *ev) noexcept {
    auto *ctx = static_cast<RequestCtx *>(ev->data);
    ngx_http_request_t *r = ctx->request;
    SidecarClient *client = worker_client();
    if (client != nullptr && ctx->audit_call_id != 0) {
        client->cancel(ctx->audit_call_id);
    }
    ctx->audit_call_id = 0;
    ctx->audit_state = AuditState::Failed;
    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "ehrgate: access record not acknowledged in time; request refused");
    try {
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "audit-timeout",
                       "The access could not be recorded in time; nothing was released");
    } catch (const std::exception &) {
        ctx->state = DecisionState::Failed;
        ctx->status = NGX_HTTP_SERVICE_UNAVAILABLE;
    }
    if (client != nullptr) {
        client->note_timeout();
    }
    resume(r);
}

ngx_int_t log_handler(ngx_http_request_t *r) noexcept {
    try {
        LocConf *lcf = loc_conf(r);
        if (lcf == nullptr || !lcf->enabled || r != r->main || g_outbox == nullptr) {
            return NGX_OK;
        }
        auto *ctx = static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
        if (ctx == nullptr) {
            // Refused before our access handler ran (e.g. a malformed request): still recorded.
            ctx = request_ctx(r);
            if (ctx == nullptr) {
                return NGX_OK;
            }
        }
        g_outbox->push(build_record(r, ctx, audit::Kind::Outcome));
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "ehrgate: outcome record failed: %s",
                      e.what());
    }
    return NGX_OK;
}

}  // namespace

ngx_int_t audit_before_release(ngx_http_request_t *r, RequestCtx *ctx) {
    switch (ctx->audit_state) {
        case AuditState::Waiting:
            return NGX_AGAIN;
        case AuditState::Durable:
            return NGX_DECLINED;
        case AuditState::Failed:
            return send_outcome(r, ctx);
        case AuditState::None:
            break;
    }
    if (static_cast<AuditMode>(loc_conf(r)->audit_mode) == AuditMode::Async) {
        if (g_outbox != nullptr) {
            g_outbox->push(build_record(r, ctx, audit::Kind::Access));
        }
        ctx->audit_state = AuditState::Durable;  // not durable: this location opted out
        return NGX_DECLINED;
    }
    SidecarClient *client = worker_client();
    protocol::AuditAppend append;
    append.sync = true;
    append.records.push_back(build_record(r, ctx, audit::Kind::Access));
    const uint32_t id = client == nullptr
                            ? 0
                            : client->call(protocol::MessageType::AuditAppend,
                                           protocol::encode(append), on_access_ack, ctx);
    if (id == 0) {
        ctx->audit_state = AuditState::Failed;
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "audit-unavailable",
                       "The access could not be recorded; nothing was released");
        return send_outcome(r, ctx);
    }
    ctx->audit_call_id = id;
    ctx->audit_state = AuditState::Waiting;
    ctx->audit_timer.handler = on_access_timeout;
    ctx->audit_timer.data = ctx;
    ctx->audit_timer.log = r->connection->log;
    ngx_add_timer(&ctx->audit_timer, main_conf(r)->audit_timeout);
    return NGX_AGAIN;
}

void cleanup_audit(RequestCtx *ctx) {
    if (ctx->audit_timer.timer_set) {
        ngx_del_timer(&ctx->audit_timer);
    }
    if (ctx->audit_call_id != 0) {
        if (SidecarClient *client = worker_client()) {
            client->cancel(ctx->audit_call_id);
        }
        ctx->audit_call_id = 0;
    }
}

ngx_int_t install_audit_log_handler(ngx_conf_t *cf) noexcept {
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module));
    auto *h = static_cast<ngx_http_handler_pt *>(
        ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers));
    if (h == nullptr) {
        return NGX_ERROR;
    }
    *h = log_handler;
    return NGX_OK;
}

void audit_worker_start(MainConf *mcf, ngx_log_t *log) {
    u_char random[8];
    char hex[2 * sizeof random];
    if (!random_bytes(random, sizeof random)) {
        throw std::runtime_error("no randomness for audit record ids");
    }
    ngx_hex_dump(reinterpret_cast<u_char *>(hex), random, sizeof random);
    g_id_prefix.assign(hex, sizeof hex);
    g_id_counter = 0;
    g_outbox = std::make_unique<Outbox>(mcf->audit_queue, log);
}

void audit_worker_stop() {
    g_outbox.reset();
}

std::string audit_status_json() {
    return g_outbox != nullptr ? g_outbox->status_json() : "null";
}

char *set_audit_mode(ngx_conf_t *cf, ngx_command_t *, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->audit_mode != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    const ngx_str_t *value = static_cast<ngx_str_t *>(cf->args->elts);
    if (view(value[1]) == "sync") {
        lcf->audit_mode = static_cast<ngx_uint_t>(AuditMode::Sync);
    } else if (view(value[1]) == "async") {
        lcf->audit_mode = static_cast<ngx_uint_t>(AuditMode::Async);
    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid ehrgate_audit \"%V\": expected \"sync\" or \"async\"",
                           &value[1]);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}

}  // namespace ehrgate::ngx
