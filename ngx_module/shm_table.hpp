// Shared-memory zones holding one of shared/'s fixed-layout tables (the verified-token cache, the
// rate limiter). nginx gives each zone a slab pool; the table is one block from it, formatted
// once by the master and reused as it is across `nginx -s reload` when the size is unchanged, so
// cached tokens and rate counters survive a reload (the limit_req discipline).
#pragma once

#include <optional>

#include "ngx.hpp"

namespace ehrgate::ngx {

struct TableBlock {
    size_t table_bytes;
    alignas(64) unsigned char table[1];
};

// Holds the zone's slab mutex for a scope: every table call happens under it.
class ZoneLock {
  public:
    explicit ZoneLock(ngx_shm_zone_t *zone)
        : mutex_(&reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr)->mutex) {
        ngx_shmtx_lock(mutex_);
    }
    ~ZoneLock() { ngx_shmtx_unlock(mutex_); }
    ZoneLock(const ZoneLock &) = delete;
    ZoneLock &operator=(const ZoneLock &) = delete;

  private:
    ngx_shmtx_t *mutex_;
};

// ngx_shm_zone_t::init for a zone holding a `Table`.
template <typename Table>
ngx_int_t init_table_zone(ngx_shm_zone_t *zone, void *data) noexcept {
    if (data != nullptr) {
        zone->data = data;  // reload with the same size: keep what the zone holds
        return NGX_OK;
    }
    auto *shpool = reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr);
    if (zone->shm.exists) {
        zone->data = shpool->data;
        return NGX_OK;
    }
    // The largest table that fits in three quarters of the zone; the rest is the slab
    // allocator's own bookkeeping.
    const size_t budget = zone->shm.size / 4 * 3;
    size_t low = 0;
    size_t high = budget;
    while (low < high) {
        const size_t mid = low + (high - low + 1) / 2;
        if (Table::bytes_for(mid) <= budget) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    const size_t table_bytes = Table::bytes_for(low);
    auto *block =
        static_cast<TableBlock *>(ngx_slab_alloc(shpool, sizeof(TableBlock) + table_bytes));
    if (low == 0 || block == nullptr || !Table::attach(block->table, table_bytes)) {
        ngx_log_error(NGX_LOG_EMERG, zone->shm.log, 0,
                      "ehrgate: shared memory zone \"%V\" is too small", &zone->shm.name);
        return NGX_ERROR;
    }
    block->table_bytes = table_bytes;
    shpool->data = block;
    zone->data = block;
    return NGX_OK;
}

template <typename Table>
std::optional<Table> zone_table(ngx_shm_zone_t *zone) {
    if (zone == nullptr || zone->data == nullptr) {
        return std::nullopt;
    }
    auto *block = static_cast<TableBlock *>(zone->data);
    return Table::attach(block->table, block->table_bytes);
}

}  // namespace ehrgate::ngx
