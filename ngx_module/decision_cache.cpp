// The decision cache (issue 5): policyd's answers to decide requests, kept in a shared-memory
// zone every worker reads, so a repeated request (same client, user, patient, purpose, method,
// host and URL, under the same policy) reuses the decision and its signed consent context
// instead of a round trip.
//
// Why a cached decision is never stale:
//  - the key includes the policy serial the worker decides under, so a policy reload starts
//    from an empty cache (and the policy says what a request needs, never the cache);
//  - the zone's generation is policyd's consent epoch, which moves with every consent change.
//    policyd pushes it to every worker before anything else happens, and each reply carries the
//    epoch it was decided in: whichever worker hears of a newer epoch first moves the zone
//    forward, and entries of older epochs are dead for all workers at once. A reply decided in
//    an older epoch than the zone's is not stored;
//  - a worker answers from the cache only while its own connection is up and has delivered
//    something within the last second (SidecarClient::heard_within), so a consent change cannot
//    be missed for longer than that even if policyd stalls;
//  - policyd says how long a decision may be reused (DecideReply::cache_ms): never past a
//    consent period boundary nor a second before the consent context expires; never for
//    break-glass or failures.
// Token revocation, the limiter and compartment checks run before the cache on every request.
#include <cstring>
#include <exception>
#include <string>

#include "ehrgate/token_cache.hpp"
#include "module.hpp"
#include "shm_table.hpp"

namespace ehrgate::ngx {

namespace {

ngx_shm_zone_t *g_decision_zone;  // this worker's view of the zone

// How recently this worker must have heard from policyd to trust that it knows the current
// consent epoch: the revocation bound of issue 5.
constexpr ngx_msec_t kFreshnessWindow = 1000;

std::optional<cache::DecisionCacheTable> decision_table() {
    return zone_table<cache::DecisionCacheTable>(g_decision_zone);
}

// Only ever forward: workers hear of a change a few microseconds apart, in any order.
void advance_epoch(cache::DecisionCacheTable &table, uint64_t epoch) {
    if (epoch > table.generation()) {
        table.set_generation(epoch);
    }
}

void on_consent_epoch(uint64_t epoch) {
    std::optional<cache::DecisionCacheTable> table = decision_table();
    if (!table) {
        return;
    }
    ZoneLock lock(g_decision_zone);
    advance_epoch(*table, epoch);
}

// Everything policyd decides from except the correlation id, and the policy serial: each field
// length-prefixed, so no two requests share a key.
cache::TokenDigest decision_key(const protocol::DecideRequest &request, uint64_t serial) {
    // A field added to the request must be added here too (or deliberately left out, like the
    // correlation id): otherwise two requests differing only in it would share a decision.
    static_assert(sizeof(protocol::DecideRequest) == 11 * sizeof(std::string));
    const std::string *const fields[] = {&request.method,  &request.path,
                                         &request.query,   &request.client_id,
                                         &request.host,    &request.user,
                                         &request.patient, &request.purpose_of_use,
                                         &request.tenant,  &request.break_glass_reason};
    size_t size = sizeof serial;
    for (const std::string *field : fields) {
        size += sizeof(uint32_t) + field->size();
    }
    std::string material;
    material.reserve(size);
    material.append(reinterpret_cast<const char *>(&serial), sizeof serial);
    for (const std::string *field : fields) {
        const auto length = static_cast<uint32_t>(field->size());
        material.append(reinterpret_cast<const char *>(&length), sizeof length);
        material.append(*field);
    }
    return cache::digest_token(material);
}

int64_t now_ms() {
    return static_cast<int64_t>(ngx_current_msec);  // CLOCK_MONOTONIC: the same in every worker
}

}  // namespace

bool add_decision_cache_zone(ngx_conf_t *cf, MainConf *mcf) {
    static ngx_str_t name = ngx_string("ehrgate_decision_cache");
    mcf->decision_cache =
        ngx_shared_memory_add(cf, &name, mcf->decision_cache_size, &ngx_http_ehrgate_module);
    if (mcf->decision_cache == nullptr) {
        return false;
    }
    mcf->decision_cache->init = init_table_zone<cache::DecisionCacheTable>;
    return true;
}

void watch_consent_changes(SidecarClient &client, MainConf *mcf) {
    g_decision_zone = mcf->decision_cache;
    client.on_consent_epoch(on_consent_epoch);
}

bool cached_decision(ngx_http_request_t *r, RequestCtx *ctx, const protocol::DecideRequest &request,
                     protocol::DecideReply *reply) {
    ctx->decision_cache = DecisionCacheUse::Bypass;
    auto *lcf = static_cast<LocConf *>(ngx_http_get_module_loc_conf(r, ngx_http_ehrgate_module));
    SidecarClient *client = worker_client();
    std::optional<cache::DecisionCacheTable> table = decision_table();
    // Break-glass is decided, logged and alerted on every time.
    if (!lcf->decision_cache || client == nullptr || client->snapshot() == nullptr || !table ||
        !request.break_glass_reason.empty()) {
        return false;
    }
    const cache::TokenDigest key = decision_key(request, client->snapshot()->serial);
    static_assert(sizeof key == sizeof ctx->decision_key);
    std::memcpy(ctx->decision_key, key.data(), key.size());
    ctx->decision_cache = DecisionCacheUse::Miss;
    if (!client->heard_within(kFreshnessWindow)) {
        return false;  // we might have missed a consent change: ask, which also hears again
    }
    std::string body;
    {
        ZoneLock lock(g_decision_zone);
        if (!table->lookup(key, now_ms(), &body)) {
            return false;
        }
    }
    std::optional<protocol::DecideReply> decoded = protocol::decode_decide_reply(body);
    if (!decoded) {
        return false;  // cannot happen short of memory corruption: decide afresh
    }
    *reply = std::move(*decoded);
    ctx->decision_cache = DecisionCacheUse::Hit;
    return true;
}

void remember_decision(RequestCtx *ctx, const protocol::DecideReply &reply,
                       std::string_view reply_body) {
    if (ctx->decision_cache != DecisionCacheUse::Miss || reply.cache_ms == 0 || reply.break_glass) {
        return;
    }
    std::optional<cache::DecisionCacheTable> table = decision_table();
    if (!table) {
        return;
    }
    cache::TokenDigest key;
    std::memcpy(key.data(), ctx->decision_key, key.size());
    ZoneLock lock(g_decision_zone);
    advance_epoch(*table, reply.consent_epoch);
    // Decided before a consent change another worker has already heard of: already stale.
    if (reply.consent_epoch != table->generation()) {
        return;
    }
    table->insert(key, now_ms() + reply.cache_ms, reply_body, now_ms());
}

std::string decision_cache_status_json() {
    std::optional<cache::DecisionCacheTable> table = decision_table();
    if (!table) {
        return "{}";
    }
    ZoneLock lock(g_decision_zone);
    return "{\"capacity\":" + std::to_string(table->capacity()) +
           ",\"hits\":" + std::to_string(table->hits()) +
           ",\"misses\":" + std::to_string(table->misses()) +
           ",\"consent_epoch\":" + std::to_string(table->generation()) + "}";
}

}  // namespace ehrgate::ngx
