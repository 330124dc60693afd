// Module definition: directives, configuration, worker start-up and shutdown.
#include <openssl/rand.h>

#include <memory>
#include <new>

#include "module.hpp"

namespace ehrgate::ngx {

bool random_bytes(u_char *out, size_t n) noexcept {
    // Each RAND_bytes call costs about a microsecond in OpenSSL 3 (DRBG locking, fork check),
    // and a request needs two or three ids: draw from the DRBG in blocks and hand out slices.
    // The bytes are the DRBG's all the same. A block never outlives the process that drew it
    // (the master's would otherwise be shared by every forked worker).
    static u_char block[4096];
    static size_t used = sizeof block;
    static ngx_pid_t owner = -1;
    if (n > sizeof block) {
        return RAND_bytes(out, static_cast<int>(n)) == 1;
    }
    if (owner != ngx_pid || sizeof block - used < n) {
        if (RAND_bytes(block, sizeof block) != 1) {
            return false;
        }
        owner = ngx_pid;
        used = 0;
    }
    ngx_memcpy(out, block + used, n);
    // Handed out once: never again from this buffer, and not left lying around in memory.
    ngx_explicit_memzero(block + used, n);
    used += n;
    return true;
}

namespace {

std::unique_ptr<SidecarClient> g_client;

char *set_policyd(ngx_conf_t *cf, ngx_command_t *, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    if (mcf->policyd != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    const ngx_str_t *value = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_url_t url{};
    url.url = value[1];
    url.no_resolve = 1;
    if (value[1].len < 6 || ngx_strncmp(value[1].data, "unix:", 5) != 0) {
        ngx_conf_log_error(
            NGX_LOG_EMERG, cf, 0,
            "invalid policyd address \"%V\": expected \"unix:/path/to/policyd.sock\"", &value[1]);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    if (ngx_parse_url(cf->pool, &url) != NGX_OK || url.naddrs != 1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid policyd address \"%V\": %s", &value[1],
                           url.err != nullptr ? url.err : "cannot parse");
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    mcf->policyd = &url.addrs[0];
    return NGX_CONF_OK;
}

char *set_enabled(ngx_conf_t *cf, ngx_command_t *cmd, void *conf) noexcept {
    auto *lcf = static_cast<LocConf *>(conf);
    char *rc = ngx_conf_set_flag_slot(cf, cmd, conf);
    if (rc == NGX_CONF_OK && lcf->enabled) {
        lcf->enabled_file = cf->conf_file->file.name;
        lcf->enabled_line = cf->conf_file->line;
    }
    return rc;
}

ngx_conf_num_bounds_t g_max_pending_bounds = {ngx_conf_check_num_bounds, 1, 65534};
ngx_conf_num_bounds_t g_audit_queue_bounds = {ngx_conf_check_num_bounds, 1, 10000000};

// At least a few hundred entries; at most what a slab zone sensibly holds.
char *check_zone_size(ngx_conf_t *cf, void *, void *data) noexcept {
    const size_t size = *static_cast<size_t *>(data);
    if (size < 256 * 1024 || size > (size_t{1} << 30)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "zone size must be between 256k and 1g");
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}
ngx_conf_post_t g_zone_size_bounds = {check_zone_size};

ngx_command_t g_commands[] = {
    {ngx_string("ehrgate_policyd"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_policyd,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("ehrgate_policyd_timeout"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, timeout), nullptr},
    {ngx_string("ehrgate_policyd_max_pending"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_num_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, max_pending),
     &g_max_pending_bounds},
    {ngx_string("ehrgate_policyd_reconnect_max"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, reconnect_max), nullptr},
    {ngx_string("ehrgate_token_cache_size"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_size_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, token_cache_size),
     &g_zone_size_bounds},
    {ngx_string("ehrgate_limit_zone_size"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_size_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, limit_zone_size),
     &g_zone_size_bounds},
    {ngx_string("ehrgate_decision_cache_size"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_size_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, decision_cache_size),
     &g_zone_size_bounds},
    {ngx_string("ehrgate_decision_cache"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG,
     ngx_conf_set_flag_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decision_cache), nullptr},
    {ngx_string("ehrgate_consent_jwks"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
     set_consent_jwks_handler, 0, 0, nullptr},
    {ngx_string("ehrgate_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_status_handler, 0, 0,
     nullptr},
    // audit (issue 7)
    {ngx_string("ehrgate_audit"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_audit_mode,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("ehrgate_audit_timeout"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, audit_timeout), nullptr},
    {ngx_string("ehrgate_audit_queue"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, ngx_conf_set_num_slot,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, audit_queue), &g_audit_queue_bounds},
    {ngx_string("ehrgate"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_FLAG, set_enabled,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, enabled), nullptr},
    ngx_null_command,
};

void *create_main_conf(ngx_conf_t *cf) noexcept {
    auto *mcf = static_cast<MainConf *>(ngx_pcalloc(cf->pool, sizeof(MainConf)));
    if (mcf == nullptr) {
        return nullptr;
    }
    mcf->timeout = NGX_CONF_UNSET_MSEC;
    mcf->max_pending = NGX_CONF_UNSET_UINT;
    mcf->reconnect_max = NGX_CONF_UNSET_MSEC;
    mcf->token_cache_size = NGX_CONF_UNSET_SIZE;
    mcf->limit_zone_size = NGX_CONF_UNSET_SIZE;
    mcf->decision_cache_size = NGX_CONF_UNSET_SIZE;
    mcf->audit_timeout = NGX_CONF_UNSET_MSEC;
    mcf->audit_queue = NGX_CONF_UNSET_UINT;
    return mcf;
}

char *init_main_conf(ngx_conf_t *cf, void *conf) noexcept {
    auto *mcf = static_cast<MainConf *>(conf);
    ngx_conf_init_size_value(mcf->token_cache_size, 4 * 1024 * 1024);
    ngx_conf_init_size_value(mcf->limit_zone_size, 8 * 1024 * 1024);
    ngx_conf_init_size_value(mcf->decision_cache_size, 8 * 1024 * 1024);
    if (mcf->policyd != nullptr && (!add_token_cache_zone(cf, mcf) || !add_limit_zone(cf, mcf) ||
                                    !add_decision_cache_zone(cf, mcf))) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_conf_init_msec_value(mcf->timeout, 250);
    ngx_conf_init_uint_value(mcf->max_pending, 4096);
    ngx_conf_init_msec_value(mcf->reconnect_max, 1000);
    ngx_conf_init_msec_value(mcf->audit_timeout, 1000);
    ngx_conf_init_uint_value(mcf->audit_queue, 10000);
    return NGX_CONF_OK;
}

void *create_loc_conf(ngx_conf_t *cf) noexcept {
    auto *lcf = static_cast<LocConf *>(ngx_pcalloc(cf->pool, sizeof(LocConf)));
    if (lcf == nullptr) {
        return nullptr;
    }
    lcf->enabled = NGX_CONF_UNSET;
    lcf->audit_mode = NGX_CONF_UNSET_UINT;
    lcf->decision_cache = NGX_CONF_UNSET;
    return lcf;
}

char *merge_loc_conf(ngx_conf_t *cf, void *parent, void *child) noexcept {
    auto *prev = static_cast<LocConf *>(parent);
    auto *conf = static_cast<LocConf *>(child);
    if (conf->enabled == NGX_CONF_UNSET && prev->enabled != NGX_CONF_UNSET) {
        conf->enabled_file = prev->enabled_file;
        conf->enabled_line = prev->enabled_line;
    }
    ngx_conf_merge_value(conf->enabled, prev->enabled, 0);
    ngx_conf_merge_uint_value(conf->audit_mode, prev->audit_mode,
                              static_cast<ngx_uint_t>(AuditMode::Sync));
    ngx_conf_merge_value(conf->decision_cache, prev->decision_cache, 1);
    auto *mcf =
        static_cast<MainConf *>(ngx_http_conf_get_module_main_conf(cf, ngx_http_ehrgate_module));
    if (conf->enabled && mcf->policyd == nullptr) {
        ngx_log_error(
            NGX_LOG_EMERG, cf->log, 0,
            "\"ehrgate on\" in %V:%ui needs \"ehrgate_policyd unix:/path;\" in the http block",
            &conf->enabled_file, conf->enabled_line);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}

ngx_int_t postconfiguration(ngx_conf_t *cf) noexcept {
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module));
    auto *h = static_cast<ngx_http_handler_pt *>(
        ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers));
    if (h == nullptr) {
        return NGX_ERROR;
    }
    *h = access_handler;
    // The correlation-id filter goes on top so its headers are in place when the redaction
    // filter releases a held response.
    if (install_redact_filter() != NGX_OK) {
        return NGX_ERROR;
    }
    if (install_audit_log_handler(cf) != NGX_OK) {  // audit (issue 7)
        return NGX_ERROR;
    }
    return install_header_filter();
}

ngx_int_t preconfiguration(ngx_conf_t *cf) noexcept {
    return add_variables(cf);
}

ngx_int_t init_process(ngx_cycle_t *cycle) noexcept {
    auto *mcf = static_cast<MainConf *>(
        ngx_http_cycle_get_module_main_conf(cycle, ngx_http_ehrgate_module));
    if (mcf == nullptr || mcf->policyd == nullptr) {
        return NGX_OK;
    }
    try {
        SidecarSettings settings;
        settings.address = *mcf->policyd;
        settings.max_pending = static_cast<uint32_t>(mcf->max_pending);
        settings.reconnect_max = mcf->reconnect_max;
        g_client = std::make_unique<SidecarClient>(settings, cycle->log);
        watch_policy_changes(*g_client, mcf);
        watch_consent_changes(*g_client, mcf);
        attach_limit_zone(mcf);
        audit_worker_start(mcf, cycle->log);  // audit (issue 7)
        g_client->start();
    } catch (const std::exception &e) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "ehrgate: worker start failed: %s", e.what());
        return NGX_ERROR;
    }
    return NGX_OK;
}

void exit_process(ngx_cycle_t *) noexcept {
    audit_worker_stop();  // audit (issue 7): before the client its calls go through
    g_client.reset();
}

ngx_http_module_t g_module_ctx = {
    preconfiguration, postconfiguration, create_main_conf, init_main_conf,
    nullptr,          nullptr,           create_loc_conf,  merge_loc_conf,
};

bool valid_incoming_request_id(const ngx_str_t &value) {
    if (value.len == 0 || value.len > 128) {
        return false;
    }
    for (size_t i = 0; i < value.len; ++i) {
        const u_char ch = value.data[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '-' || ch == '_' || ch == '.' || ch == ':')) {
            return false;
        }
    }
    return true;
}

// The caller's X-Request-ID when it is a sane token (so a partner can correlate with its own
// logs); otherwise 128 random bits. Never echo arbitrary client bytes into headers and logs.
ngx_str_t make_correlation_id(ngx_http_request_t *r) {
    ngx_list_part_t *part = &r->headers_in.headers.part;
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
        if (headers[i].key.len == sizeof("X-Request-ID") - 1 &&
            ngx_strncasecmp(headers[i].key.data,
                            reinterpret_cast<u_char *>(const_cast<char *>("X-Request-ID")),
                            headers[i].key.len) == 0 &&
            valid_incoming_request_id(headers[i].value)) {
            return headers[i].value;
        }
    }
    u_char random[16];
    ngx_str_t id{0, nullptr};
    if (!random_bytes(random, sizeof random)) {
        return id;
    }
    id.data = static_cast<u_char *>(ngx_pnalloc(r->pool, 2 * sizeof random));
    if (id.data != nullptr) {
        ngx_hex_dump(id.data, random, sizeof random);
        id.len = 2 * sizeof random;
    }
    return id;
}

void cleanup_request_ctx(void *data) noexcept {
    auto *ctx = static_cast<RequestCtx *>(data);
    // Every ending of a request destroys its pool: this is where concurrency slots come back.
    release_limits(ctx);
    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }
    if (ctx->call_id != 0 && g_client != nullptr) {
        g_client->cancel(ctx->call_id);
        ctx->call_id = 0;
    }
    cleanup_audit(ctx);  // audit (issue 7)
}

}  // namespace

SidecarClient *worker_client() {
    return g_client.get();
}

RequestCtx *request_ctx(ngx_http_request_t *r) {
    auto *ctx = static_cast<RequestCtx *>(ngx_http_get_module_ctx(r, ngx_http_ehrgate_module));
    if (ctx != nullptr) {
        return ctx;
    }
    ngx_pool_cleanup_t *cleanup = ngx_pool_cleanup_add(r->pool, 0);
    ctx = static_cast<RequestCtx *>(ngx_pcalloc(r->pool, sizeof(RequestCtx)));
    if (cleanup == nullptr || ctx == nullptr) {
        return nullptr;
    }
    ctx->request = r;
    ctx->state = DecisionState::Idle;
    ctx->correlation_id = make_correlation_id(r);
    cleanup->handler = cleanup_request_ctx;
    cleanup->data = ctx;
    ngx_http_set_ctx(r, ctx, ngx_http_ehrgate_module);
    return ctx;
}

}  // namespace ehrgate::ngx

// The only exported symbol (the build uses hidden visibility for everything else).
extern "C" {
__attribute__((visibility("default"))) ngx_module_t ngx_http_ehrgate_module = {
    NGX_MODULE_V1,
    &ehrgate::ngx::g_module_ctx,
    ehrgate::ngx::g_commands,
    NGX_HTTP_MODULE,
    nullptr,                     // init master
    nullptr,                     // init module
    ehrgate::ngx::init_process,  // init process
    nullptr,                     // init thread
    nullptr,                     // exit thread
    ehrgate::ngx::exit_process,  // exit process
    nullptr,                     // exit master
    NGX_MODULE_V1_PADDING,
};
}  // extern "C"
