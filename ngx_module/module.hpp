// Declarations shared by the module's adapter files: configuration, the per-request context
// and the per-worker sidecar client.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>

#include "ehrgate/rate_limit.hpp"
#include "ngx.hpp"
#include "sidecar_client.hpp"

extern "C" ngx_module_t ngx_http_ehrgate_module;

namespace ehrgate::ngx {

struct MainConf {
    ngx_addr_t *policyd;  // nullptr when `ehrgate_policyd` is absent
    ngx_shm_zone_t *token_cache;
    size_t token_cache_size;
    ngx_shm_zone_t *limit_zone;
    size_t limit_zone_size;
    ngx_shm_zone_t *decision_cache;  // consent (issue 5): decision_cache.cpp
    size_t decision_cache_size;
    ngx_msec_t timeout;
    ngx_uint_t max_pending;
    ngx_msec_t reconnect_max;
    // audit (issue 7)
    ngx_msec_t audit_timeout;  // ehrgate_audit_timeout: wait for a durable access record
    ngx_uint_t audit_queue;    // ehrgate_audit_queue: outcome records held per worker
};

struct LocConf {
    ngx_flag_t enabled;
    // Where `ehrgate on` was written, for the "needs ehrgate_policyd" error.
    ngx_str_t enabled_file;
    ngx_uint_t enabled_line;
    ngx_uint_t audit_mode;      // audit (issue 7): ehrgate_audit sync (default) | async
    ngx_flag_t decision_cache;  // ehrgate_decision_cache on (default) | off
};

// audit (issue 7)
enum class AuditMode : ngx_uint_t { Sync = 1, Async = 2 };
enum class AuditState : uint8_t { None, Waiting, Durable, Failed };

enum class DecisionState : uint8_t { Idle, Waiting, Decided, Failed };
// Where the request's decision came from: $ehrgate_decision_cache.
enum class DecisionCacheUse : uint8_t { Bypass, Miss, Hit };

// Lives in the request pool and is never destroyed explicitly: it must stay trivially
// destructible. Strings point into the request pool.
struct RequestCtx {
    ngx_http_request_t *request;
    ngx_event_t timer;  // per-call timeout
    uint32_t call_id;   // 0 when no call is pending
    DecisionState state;
    bool permit;
    uint16_t status;
    ngx_str_t correlation_id;
    ngx_str_t reason;
    ngx_str_t message;
    ngx_str_t policy_version;
    // Authentication outcome, for variables, the decision call and error responses.
    ngx_str_t client_id;
    ngx_str_t user;
    ngx_str_t patient;
    ngx_str_t auth_status;       // "ok", "public", or the failure reason
    ngx_str_t www_authenticate;  // set on 401/403 from authentication
    ngx_str_t check_patient;     // non-empty: the response must be in this patient's compartment
    // Throttling (limits.cpp): the slots this request holds until its pool is destroyed.
    ratelimit::Hold limit_hold;
    bool limit_held;
    ngx_str_t limit_status;
    ngx_str_t ratelimit_policy;  // RateLimit-Policy header value
    ngx_str_t ratelimit;         // RateLimit header value
    ngx_str_t retry_after;       // Retry-After for refusals; empty: "1" on 503
    // audit (issue 7): the access record (audit-before-release) and the log-phase outcome.
    AuditState audit_state;
    uint32_t audit_call_id;  // 0 when no AuditAppend is pending
    ngx_event_t audit_timer;
    ngx_str_t traceparent;       // incoming W3C traceparent when well-formed, else generated
    ngx_str_t jti_hash;          // hex SHA-256 of the token's jti
    ngx_str_t cert_fingerprint;  // hex SHA-256 of the mTLS client certificate
    ngx_str_t url_patient;       // the one patient the URL names (build_record), if any
    bool url_patient_known;
    ngx_str_t audit_resource_type;  // from the decision
    ngx_str_t audit_interaction;
    // Response redaction (redact_filter.cpp): the engine is owned by a pool cleanup.
    uint8_t redact_state;
    void *redactor;
    ngx_chain_t *redact_free;
    ngx_chain_t *redact_busy;
    // Consent (issue 5; access.cpp). Before the decision: what the caller asserted. After it:
    // policyd's answer.
    ngx_str_t asserted_purpose;    // token claim `purpose_of_use`, else X-Purpose-Of-Use
    ngx_str_t break_glass_reason;  // X-Break-Glass-Reason; never logged
    ngx_str_t purpose_of_use;      // effective purpose; empty: missing/unknown (fallback rule)
    // Security label codes whose data must be withheld from the response, comma-separated
    // ("ETH,PSY,SUD"); empty: nothing to withhold. The redaction filter reads this field.
    ngx_str_t obligations;
    ngx_str_t consent_ids;  // comma-separated
    ngx_str_t decision_id;
    ngx_str_t consent_token;  // signed consent context: $ehrgate_consent_token
    bool break_glass;
    // The decision carried consent obligations (consent evaluated): `obligations` is then the
    // whole answer, empty meaning nothing to withhold. Otherwise the redaction filter applies
    // the bundle's default withheld labels.
    bool obligations_decided;
    // Decision cache (decision_cache.cpp): the request's key, set when it was looked up.
    DecisionCacheUse decision_cache;
    u_char decision_key[32];
    // Resources removed plus resources masked by the redaction filter, once the body is done;
    // the outcome audit record carries it.
    uint32_t redaction_count;
};
static_assert(std::is_trivially_destructible_v<RequestCtx>);
static_assert(std::is_trivially_copyable_v<RequestCtx>);

// Random bytes from OpenSSL's DRBG, drawn in blocks (ngx_http_ehrgate_module.cpp); false when the
// DRBG fails.
bool random_bytes(u_char *out, size_t n) noexcept;

// The worker's client; nullptr in the master, in `nginx -t`, and when policyd is not configured.
SidecarClient *worker_client();

// Returns the request's context, creating it (with a correlation id) on first use.
RequestCtx *request_ctx(ngx_http_request_t *r);

// Records a refusal to answer with send_outcome().
void record_failure(RequestCtx *ctx, uint16_t status, std::string_view reason,
                    std::string_view message);
// Answers with ctx's status and an OperationOutcome from within the access phase; finalizes.
ngx_int_t send_outcome(ngx_http_request_t *r, RequestCtx *ctx);

// Authentication and authorization (auth.cpp). NGX_DECLINED: go on to the policyd decision;
// anything else is the access handler's return value (a refusal was sent).
ngx_int_t authenticate(ngx_http_request_t *r, RequestCtx *ctx);
// Creates the verified-token cache zone (configuration time).
bool add_token_cache_zone(ngx_conf_t *cf, MainConf *mcf);
// Worker start: policy changes invalidate the cache.
void watch_policy_changes(SidecarClient &client, MainConf *mcf);

// Throttling (limits.cpp). apply_limits: NGX_DECLINED to go on, else the handler's result.
bool add_limit_zone(ngx_conf_t *cf, MainConf *mcf);
void attach_limit_zone(MainConf *mcf);
ngx_int_t apply_limits(ngx_http_request_t *r, RequestCtx *ctx);
void release_limits(RequestCtx *ctx);
std::string limiter_status_json();
std::string token_cache_status_json();

// Decision cache (decision_cache.cpp; consent, issue 5).
bool add_decision_cache_zone(ngx_conf_t *cf, MainConf *mcf);
void watch_consent_changes(SidecarClient &client, MainConf *mcf);
// A current cached decision for `request` into *reply (true), or false: ask policyd, then pass
// its reply to remember_decision(). Either way ctx->decision_cache says what happened.
bool cached_decision(ngx_http_request_t *r, RequestCtx *ctx, const protocol::DecideRequest &request,
                     protocol::DecideReply *reply);
void remember_decision(RequestCtx *ctx, const protocol::DecideReply &reply,
                       std::string_view reply_body);
std::string decision_cache_status_json();

// `ehrgate_status;` content handler (status.cpp).
char *set_status_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept;
char *set_consent_jwks_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept;

// Response redaction, which includes the response compartment check (redact_filter.cpp).
ngx_int_t install_redact_filter() noexcept;

// Access-phase handler and response header filter (access.cpp).
ngx_int_t access_handler(ngx_http_request_t *r) noexcept;
ngx_int_t install_header_filter() noexcept;

// Audit (audit.cpp, issue 7). NGX_DECLINED: the request may proceed (async location, or the
// access record is durable); NGX_AGAIN: waiting for policyd's ack; else the handler's result.
ngx_int_t audit_before_release(ngx_http_request_t *r, RequestCtx *ctx);
ngx_int_t install_audit_log_handler(ngx_conf_t *cf) noexcept;
void audit_worker_start(MainConf *mcf, ngx_log_t *log);
void audit_worker_stop();
void cleanup_audit(RequestCtx *ctx);
std::string audit_status_json();
char *set_audit_mode(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept;

// Variables (variables.cpp).
ngx_int_t add_variables(ngx_conf_t *cf) noexcept;

}  // namespace ehrgate::ngx
