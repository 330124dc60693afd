// Throttling as patient-safety infrastructure: token buckets per client and endpoint group,
// concurrency caps per client and per upstream, and a share of every upstream reserved for
// interactive (clinical) traffic.
//
// The state lives in a caller-provided memory block (nginx puts it in a shared-memory zone, so the
// limits hold across all workers) as fixed-size, trivially copyable entries: integers only, no
// floats, no pointers. Time is passed in (milliseconds), so everything is tested with a fake clock.
// The table does no locking; the caller holds the zone's lock around each call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ehrgate::ratelimit {

// Bucket levels are fixed-point: one token is a million units, so rates down to a few per hour
// refill smoothly per millisecond without floating point.
inline constexpr int64_t kUnitsPerToken = 1'000'000;

struct Plan {
    int64_t rate_units_per_second = 0;  // refill rate, tokens/s * kUnitsPerToken
    int64_t burst = 1;                  // bucket size, in tokens (>= 1)
    uint32_t concurrency = 0;           // in-flight requests per client; 0: no cap
    bool dry_run = false;               // decide and report, but never refuse
};

// "50/s", "300/m", "1000/h" -> units per second. nullopt for anything else or a zero rate.
std::optional<int64_t> parse_rate(std::string_view text);

// One token bucket; `level` in units.
struct Bucket {
    int64_t level = 0;
    int64_t last_ms = 0;
};

struct Take {
    bool admitted = false;
    int64_t remaining = 0;       // whole tokens left after this request
    int64_t retry_after_ms = 0;  // when refused: until one token is back
};

// Refills for the time since the last call, then takes one token if there is one. A clock that
// goes backwards refills nothing.
Take take_token(Bucket &bucket, const Plan &plan, int64_t now_ms);

// What a request is counted against.
struct RequestKeys {
    std::string_view bucket;    // client x endpoint group, e.g. "demo-batch|fhir"
    std::string_view client;    // concurrency per client
    std::string_view upstream;  // concurrency per upstream; empty: no upstream cap
};

struct UpstreamLimits {
    uint32_t capacity = 0;             // in-flight requests to the upstream; 0: no cap
    uint32_t interactive_reserve = 0;  // of which batch may never use
};

enum class Verdict : uint8_t {
    Admitted,
    RateLimited,         // 429: the bucket is empty
    ConcurrencyLimited,  // 429: the client has too many requests in flight
    UpstreamShed,        // 503: the upstream's capacity (or its batch share) is used up
    TableFull,           // 503: no slot could be found or evicted; fail closed
};

const char *verdict_name(Verdict verdict);

// Entries a request holds until it ends; pass back to release().
struct Hold {
    uint32_t client_slot = 0;    // 0: none
    uint32_t upstream_slot = 0;  // 0: none
    uint64_t client_hash = 0;
    uint64_t upstream_hash = 0;
};

struct Admission {
    Verdict verdict = Verdict::TableFull;
    bool would_refuse = false;  // dry run: what the verdict would have been is in `dry_run_verdict`
    Verdict dry_run_verdict = Verdict::Admitted;
    int64_t remaining = 0;
    int64_t retry_after_ms = 0;
    Hold hold;  // release it when the request ends, whatever the verdict (empty when refused)
};

class LimiterTable {
  public:
    static constexpr size_t kWays = 8;
    static constexpr size_t kMaxKey = 112;

    static size_t bytes_for(size_t min_entries);
    // Formats the block, or adopts an existing table of the same geometry (nginx -s reload keeps
    // the zone, so counters survive). nullopt when `bytes` is too small.
    static std::optional<LimiterTable> attach(void *memory, size_t bytes);

    // One decision for one request: the bucket, then the client's concurrency, then the
    // upstream's. All or nothing: a refusal undoes whatever this call had taken.
    Admission admit(const RequestKeys &keys, const Plan &plan, bool interactive,
                    const UpstreamLimits &upstream, int64_t now_ms);
    // Ends a request: frees its concurrency slots. Safe to call once per Hold; a Hold whose
    // entries changed owner (they cannot while held) is ignored.
    void release(const Hold &hold);

    // Observability and tests. Keys carry their kind: "r:<bucket>", "c:<client>", "u:<upstream>".
    uint32_t in_flight(std::string_view key) const;
    std::optional<Bucket> bucket(std::string_view key) const;
    size_t capacity() const;
    size_t live_entries() const;
    // Requests holding a concurrency slot right now, over all clients and upstreams. Zero when
    // nothing is in flight: anything else after a quiet period is a leaked slot.
    uint64_t total_in_flight() const;
    uint64_t evictions() const;

    struct Header;
    struct Entry;

  private:
    LimiterTable(Header *header, Entry *entries) : header_(header), entries_(entries) {}
    // `key` with its kind prefix ("r:", "c:", "u:"); 1-based index, 0 when absent.
    uint32_t find(std::string_view key) const;

    Header *header_;
    Entry *entries_;
};

uint64_t hash_key(std::string_view key);

}  // namespace ehrgate::ratelimit
