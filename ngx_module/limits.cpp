// Throttling in the worker: every protected request is counted in the shared-memory limiter
// (shared/rate_limit) against its client's plan, its client x route bucket and its upstream's
// capacity, before policyd is asked anything. Concurrency slots are released when the request's
// pool goes away, which happens on every ending: success, error, client abort, upstream timeout.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "ehrgate/rate_limit.hpp"
#include "module.hpp"
#include "shm_table.hpp"

namespace ehrgate::ngx {

namespace {

ngx_shm_zone_t *g_limit_zone;

uint16_t status_for(ratelimit::Verdict verdict) {
    switch (verdict) {
        case ratelimit::Verdict::RateLimited:
        case ratelimit::Verdict::ConcurrencyLimited:
            return 429;
        default:
            return NGX_HTTP_SERVICE_UNAVAILABLE;
    }
}

const char *message_for(ratelimit::Verdict verdict) {
    switch (verdict) {
        case ratelimit::Verdict::RateLimited:
            return "Request rate limit reached for this client; retry later";
        case ratelimit::Verdict::ConcurrencyLimited:
            return "Too many concurrent requests from this client";
        case ratelimit::Verdict::UpstreamShed:
            return "The record system is at capacity; the request was shed to protect it";
        default:
            return "The gateway cannot account for this request; retry later";
    }
}

// IETF httpapi ratelimit-headers: the policy as a quota per window, and what is left of it.
void set_rate_headers(ngx_http_request_t *r, RequestCtx *ctx, const policy::RatePlan &plan,
                      int64_t remaining, int64_t retry_after_ms) {
    const int64_t per_second =
        std::max<int64_t>(plan.rate_units_per_second / ratelimit::kUnitsPerToken, 0);
    const int64_t window =
        per_second > 0 ? std::max<int64_t>(plan.burst / per_second, 1)
                       : plan.burst * ratelimit::kUnitsPerToken / plan.rate_units_per_second;
    // ngx_snprintf: libc's snprintf costs a microsecond per call here, on every request.
    u_char text[256];
    u_char *end = ngx_snprintf(text, sizeof text, "\"%s\";q=%L;w=%L", plan.name.c_str(),
                               static_cast<int64_t>(plan.burst), static_cast<int64_t>(window));
    ctx->ratelimit_policy = pool_copy(
        r->pool, std::string_view(reinterpret_cast<char *>(text), static_cast<size_t>(end - text)));
    end = ngx_snprintf(text, sizeof text, "\"%s\";r=%L;t=%L", plan.name.c_str(),
                       static_cast<int64_t>(remaining),
                       static_cast<int64_t>((retry_after_ms + 999) / 1000));
    ctx->ratelimit = pool_copy(
        r->pool, std::string_view(reinterpret_cast<char *>(text), static_cast<size_t>(end - text)));
}

}  // namespace

bool add_limit_zone(ngx_conf_t *cf, MainConf *mcf) {
    static ngx_str_t name = ngx_string("ehrgate_limits");
    mcf->limit_zone =
        ngx_shared_memory_add(cf, &name, mcf->limit_zone_size, &ngx_http_ehrgate_module);
    if (mcf->limit_zone == nullptr) {
        return false;
    }
    mcf->limit_zone->init = init_table_zone<ratelimit::LimiterTable>;
    return true;
}

void attach_limit_zone(MainConf *mcf) {
    g_limit_zone = mcf->limit_zone;
}

ngx_int_t apply_limits(ngx_http_request_t *r, RequestCtx *ctx) {
    const SidecarClient *client = worker_client();
    const policy::Snapshot *snapshot = client != nullptr ? client->snapshot() : nullptr;
    if (snapshot == nullptr) {
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "policy-unavailable",
                       "The gateway has no current policy; no request can be admitted");
        return send_outcome(r, ctx);
    }
    const policy::Bundle &bundle = snapshot->bundle;
    if (bundle.rate_plans.empty()) {
        ctx->limit_status = pool_copy(r->pool, "off");
        return NGX_DECLINED;
    }
    const policy::Client *registered =
        ctx->client_id.len > 0 ? bundle.find_client(view(ctx->client_id)) : nullptr;
    const policy::RatePlan *plan = bundle.plan_for(registered);
    std::optional<ratelimit::LimiterTable> table =
        zone_table<ratelimit::LimiterTable>(g_limit_zone);
    if (plan == nullptr || !table) {
        // Throttling is configured but cannot be applied: never an open default.
        record_failure(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "limiter-unavailable",
                       "The gateway cannot apply its rate limits; retry later");
        return send_outcome(r, ctx);
    }
    const policy::Route *route = bundle.match_route(view(r->uri));
    const policy::Upstream *upstream = route != nullptr && !route->upstream.empty()
                                           ? bundle.find_upstream(route->upstream)
                                           : nullptr;
    // Unidentified callers share the unclassified plan per client address, so one anonymous
    // source cannot use up the allowance of all of them.
    const std::string client_key = registered != nullptr
                                       ? registered->id
                                       : "anon:" + std::string(view(r->connection->addr_text));
    const std::string bucket_key =
        client_key + "|" + (route != nullptr ? route->name : std::string("-"));
    const ratelimit::Plan limits{plan->rate_units_per_second, plan->burst, plan->concurrency,
                                 plan->dry_run};
    const ratelimit::UpstreamLimits upstream_limits =
        upstream != nullptr
            ? ratelimit::UpstreamLimits{upstream->capacity, upstream->interactive_reserve}
            : ratelimit::UpstreamLimits{};
    const bool interactive =
        registered != nullptr && registered->traffic_class == policy::TrafficClass::Interactive;

    ratelimit::Admission admission;
    {
        ZoneLock lock(g_limit_zone);
        admission = table->admit(
            {bucket_key, client_key, upstream != nullptr ? upstream->name : ""}, limits,
            interactive, upstream_limits, static_cast<int64_t>(ngx_current_msec));
    }
    ctx->limit_hold = admission.hold;
    ctx->limit_held = admission.hold.client_slot != 0 || admission.hold.upstream_slot != 0;
    set_rate_headers(r, ctx, *plan, admission.remaining, admission.retry_after_ms);

    if (admission.verdict == ratelimit::Verdict::Admitted) {
        ctx->limit_status =
            admission.would_refuse
                ? pool_copy(r->pool, std::string("dry-run:") +
                                         ratelimit::verdict_name(admission.dry_run_verdict))
                : pool_copy(r->pool, "admitted");
        return NGX_DECLINED;
    }
    ctx->limit_status = pool_copy(r->pool, ratelimit::verdict_name(admission.verdict));
    const int64_t retry_seconds = std::max<int64_t>((admission.retry_after_ms + 999) / 1000, 1);
    ctx->retry_after = pool_copy(r->pool, std::to_string(retry_seconds));
    record_failure(ctx, status_for(admission.verdict), ratelimit::verdict_name(admission.verdict),
                   message_for(admission.verdict));
    return send_outcome(r, ctx);
}

void release_limits(RequestCtx *ctx) {
    if (!ctx->limit_held) {
        return;
    }
    ctx->limit_held = false;
    if (std::optional<ratelimit::LimiterTable> table =
            zone_table<ratelimit::LimiterTable>(g_limit_zone)) {
        ZoneLock lock(g_limit_zone);
        table->release(ctx->limit_hold);
    }
}

std::string limiter_status_json() {
    std::string out = "{";
    if (std::optional<ratelimit::LimiterTable> table =
            zone_table<ratelimit::LimiterTable>(g_limit_zone)) {
        ZoneLock lock(g_limit_zone);
        out += "\"capacity\":" + std::to_string(table->capacity()) +
               ",\"live_entries\":" + std::to_string(table->live_entries()) +
               ",\"evictions\":" + std::to_string(table->evictions()) +
               ",\"in_flight\":" + std::to_string(table->total_in_flight());
    }
    out += "}";
    return out;
}

}  // namespace ehrgate::ngx
