#include "ehrgate/rate_limit.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace ehrgate::ratelimit {

namespace {

constexpr uint64_t kMagic = 0x6568726772746c31ULL;  // "ehrgrtl1"

// Namespaced key built on the stack: "r:" bucket, "c:" client, "u:" upstream.
class PrefixedKey {
  public:
    PrefixedKey(char kind, std::string_view key) {
        length_ = std::min(key.size(), sizeof(buffer_) - 2);
        buffer_[0] = kind;
        buffer_[1] = ':';
        std::memcpy(buffer_ + 2, key.data(), length_);
        length_ += 2;
        full_length_ = key.size() + 2;
        // Long keys are stored truncated; the hash covers the whole key, so two keys sharing the
        // stored prefix still differ.
        hash_ = hash_key(key) ^ (static_cast<uint64_t>(kind) * 0x9e3779b97f4a7c15ULL);
    }
    std::string_view stored() const { return {buffer_, length_}; }
    size_t full_length() const { return full_length_; }
    uint64_t hash() const { return hash_; }

  private:
    char buffer_[LimiterTable::kMaxKey];
    size_t length_ = 0;
    size_t full_length_ = 0;
    uint64_t hash_ = 0;
};

}  // namespace

struct LimiterTable::Header {
    uint64_t magic;
    uint64_t entry_bytes;
    uint64_t sets;
    uint64_t tick;
    uint64_t evictions;
    uint64_t reserved[3];
};

struct LimiterTable::Entry {
    uint64_t hash;  // 0: empty
    int64_t level;
    int64_t last_ms;
    uint64_t last_used;
    uint32_t in_flight;
    uint16_t full_key_length;
    uint8_t key_length;
    uint8_t reserved;
    char key[kMaxKey];
};

static_assert(std::is_trivially_copyable_v<LimiterTable::Header>);
static_assert(std::is_trivially_copyable_v<LimiterTable::Entry>);

uint64_t hash_key(std::string_view key) {
    // FNV-1a, then a final mix: cheap, and keys are our own ids, not attacker-chosen bytes alone
    // (the client id is authenticated before it is counted).
    uint64_t h = 1469598103934665603ULL;
    for (const char c : key) {
        h ^= static_cast<unsigned char>(c);
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h == 0 ? 1 : h;
}

const char *verdict_name(Verdict verdict) {
    switch (verdict) {
        case Verdict::Admitted:
            return "admitted";
        case Verdict::RateLimited:
            return "rate-limited";
        case Verdict::ConcurrencyLimited:
            return "concurrency-limited";
        case Verdict::UpstreamShed:
            return "upstream-shed";
        case Verdict::TableFull:
            return "limiter-full";
    }
    return "unknown";
}

std::optional<int64_t> parse_rate(std::string_view text) {
    const size_t slash = text.find('/');
    if (slash == std::string_view::npos || slash == 0 || slash > 12) {
        return std::nullopt;
    }
    int64_t count = 0;
    for (const char c : text.substr(0, slash)) {
        if (c < '0' || c > '9')
            return std::nullopt;
        count = count * 10 + (c - '0');
    }
    const std::string_view unit = text.substr(slash + 1);
    int64_t seconds;
    if (unit == "s")
        seconds = 1;
    else if (unit == "m")
        seconds = 60;
    else if (unit == "h")
        seconds = 3600;
    else
        return std::nullopt;
    if (count <= 0 || count > 10'000'000) {
        return std::nullopt;
    }
    const int64_t units = count * kUnitsPerToken / seconds;
    return units > 0 ? std::optional<int64_t>(units) : std::nullopt;
}

Take take_token(Bucket &bucket, const Plan &plan, int64_t now_ms) {
    const int64_t capacity = plan.burst * kUnitsPerToken;
    if (now_ms > bucket.last_ms) {
        const int64_t elapsed = now_ms - bucket.last_ms;
        // Saturate before multiplying: an idle day must not overflow.
        const int64_t max_elapsed =
            capacity / std::max<int64_t>(plan.rate_units_per_second / 1000, 1) + 1;
        const int64_t refill = std::min(elapsed, max_elapsed) * plan.rate_units_per_second / 1000;
        bucket.level = std::min(capacity, bucket.level + refill);
        bucket.last_ms = now_ms;
    }
    Take take;
    if (bucket.level >= kUnitsPerToken) {
        bucket.level -= kUnitsPerToken;
        take.admitted = true;
    } else {
        const int64_t missing = kUnitsPerToken - bucket.level;
        take.retry_after_ms =
            (missing * 1000 + plan.rate_units_per_second - 1) / plan.rate_units_per_second;
    }
    take.remaining = bucket.level / kUnitsPerToken;
    return take;
}

size_t LimiterTable::bytes_for(size_t min_entries) {
    const size_t sets = std::max<size_t>((min_entries + kWays - 1) / kWays, 1);
    return sizeof(Header) + sets * kWays * sizeof(Entry);
}

std::optional<LimiterTable> LimiterTable::attach(void *memory, size_t bytes) {
    if (memory == nullptr || bytes < bytes_for(kWays)) {
        return std::nullopt;
    }
    auto *header = static_cast<Header *>(memory);
    auto *entries = reinterpret_cast<Entry *>(static_cast<char *>(memory) + sizeof(Header));
    const uint64_t sets = (bytes - sizeof(Header)) / (kWays * sizeof(Entry));
    if (header->magic != kMagic || header->entry_bytes != sizeof(Entry) || header->sets != sets) {
        std::memset(memory, 0, sizeof(Header) + sets * kWays * sizeof(Entry));
        header->magic = kMagic;
        header->entry_bytes = sizeof(Entry);
        header->sets = sets;
    }
    return LimiterTable(header, entries);
}

namespace {

bool matches(const LimiterTable::Entry &entry, const PrefixedKey &key) {
    return entry.hash == key.hash() && entry.full_key_length == key.full_length() &&
           std::string_view(entry.key, entry.key_length) == key.stored();
}

}  // namespace

uint32_t LimiterTable::find(std::string_view raw) const {
    // `raw` is already prefixed by the caller (observability helpers).
    const PrefixedKey key(raw.empty() ? '?' : raw[0],
                          raw.size() > 2 ? raw.substr(2) : std::string_view());
    const size_t base = (key.hash() % header_->sets) * kWays;
    for (size_t i = 0; i < kWays; ++i) {
        if (matches(entries_[base + i], key)) {
            return static_cast<uint32_t>(base + i + 1);
        }
    }
    return 0;
}

namespace {

// Finds the entry for `key`, creating it when absent (in an empty way, else in place of the least
// recently used idle entry of its set). 1-based; 0 when every way holds requests in flight.
// `keep` names an entry the current admission already uses, which must not be evicted under it.
uint32_t locate(LimiterTable::Header &header, LimiterTable::Entry *entries, const PrefixedKey &key,
                int64_t initial_level, int64_t now_ms, uint32_t keep = 0, uint32_t keep_too = 0);

}  // namespace

Admission LimiterTable::admit(const RequestKeys &keys, const Plan &plan, bool interactive,
                              const UpstreamLimits &upstream, int64_t now_ms) {
    Admission admission;
    const PrefixedKey bucket_key('r', keys.bucket);
    const uint32_t bucket_slot =
        locate(*header_, entries_, bucket_key, plan.burst * kUnitsPerToken, now_ms);
    if (bucket_slot == 0) {
        admission.verdict = Verdict::TableFull;
        return admission;
    }
    Entry &bucket_entry = entries_[bucket_slot - 1];
    Bucket bucket{bucket_entry.level, bucket_entry.last_ms};
    const Take take = take_token(bucket, plan, now_ms);
    bucket_entry.level = bucket.level;
    bucket_entry.last_ms = bucket.last_ms;
    admission.remaining = take.remaining;
    admission.retry_after_ms = take.retry_after_ms;

    Verdict verdict = take.admitted ? Verdict::Admitted : Verdict::RateLimited;
    uint32_t client_slot = 0;
    uint32_t upstream_slot = 0;
    const PrefixedKey client_key('c', keys.client);
    const PrefixedKey upstream_key('u', keys.upstream);
    if (verdict == Verdict::Admitted && plan.concurrency > 0) {
        client_slot = locate(*header_, entries_, client_key, 0, now_ms, bucket_slot);
        if (client_slot == 0) {
            verdict = Verdict::TableFull;
        } else if (entries_[client_slot - 1].in_flight >= plan.concurrency) {
            verdict = Verdict::ConcurrencyLimited;
        }
    }
    if (verdict == Verdict::Admitted && upstream.capacity > 0 && !keys.upstream.empty()) {
        upstream_slot =
            locate(*header_, entries_, upstream_key, 0, now_ms, bucket_slot, client_slot);
        // Batch traffic stops at the capacity minus the interactive reserve; clinical traffic
        // may use the whole upstream.
        const uint32_t limit =
            interactive
                ? upstream.capacity
                : upstream.capacity - std::min(upstream.interactive_reserve, upstream.capacity);
        if (upstream_slot == 0) {
            verdict = Verdict::TableFull;
        } else if (entries_[upstream_slot - 1].in_flight >= limit) {
            verdict = Verdict::UpstreamShed;
        }
    }

    if (verdict != Verdict::Admitted && plan.dry_run && verdict != Verdict::TableFull) {
        admission.would_refuse = true;
        admission.dry_run_verdict = verdict;
        verdict = Verdict::Admitted;
        // A dry run counts in-flight requests faithfully even past the cap, so the report of
        // what would have been refused stays true.
        if (plan.concurrency > 0 && client_slot == 0) {
            client_slot =
                locate(*header_, entries_, client_key, 0, now_ms, bucket_slot, upstream_slot);
        }
        if (upstream.capacity > 0 && !keys.upstream.empty() && upstream_slot == 0) {
            upstream_slot =
                locate(*header_, entries_, upstream_key, 0, now_ms, bucket_slot, client_slot);
        }
    }
    admission.verdict = verdict;
    if (verdict != Verdict::Admitted) {
        if (take.admitted) {
            // All or nothing: the token goes back when a later check refuses.
            bucket_entry.level =
                std::min(plan.burst * kUnitsPerToken, bucket_entry.level + kUnitsPerToken);
        }
        return admission;
    }
    if (client_slot != 0) {
        ++entries_[client_slot - 1].in_flight;
        admission.hold.client_slot = client_slot;
        admission.hold.client_hash = entries_[client_slot - 1].hash;
    }
    if (upstream_slot != 0) {
        ++entries_[upstream_slot - 1].in_flight;
        admission.hold.upstream_slot = upstream_slot;
        admission.hold.upstream_hash = entries_[upstream_slot - 1].hash;
    }
    return admission;
}

void LimiterTable::release(const Hold &hold) {
    const size_t total = header_->sets * kWays;
    for (const auto &[slot, hash] : {std::pair{hold.client_slot, hold.client_hash},
                                     std::pair{hold.upstream_slot, hold.upstream_hash}}) {
        if (slot == 0 || slot > total) {
            continue;
        }
        Entry &entry = entries_[slot - 1];
        if (entry.hash == hash && entry.in_flight > 0) {
            --entry.in_flight;
        }
    }
}

uint32_t LimiterTable::in_flight(std::string_view key) const {
    const uint32_t slot = find(key);
    return slot == 0 ? 0 : entries_[slot - 1].in_flight;
}

std::optional<Bucket> LimiterTable::bucket(std::string_view key) const {
    const uint32_t slot = find(key);
    if (slot == 0)
        return std::nullopt;
    return Bucket{entries_[slot - 1].level, entries_[slot - 1].last_ms};
}

size_t LimiterTable::capacity() const {
    return header_->sets * kWays;
}

size_t LimiterTable::live_entries() const {
    size_t live = 0;
    for (size_t i = 0; i < capacity(); ++i) {
        live += entries_[i].hash != 0 ? 1 : 0;
    }
    return live;
}

uint64_t LimiterTable::evictions() const {
    return header_->evictions;
}

uint64_t LimiterTable::total_in_flight() const {
    uint64_t total = 0;
    for (size_t i = 0; i < capacity(); ++i) {
        total += entries_[i].in_flight;
    }
    return total;
}

namespace {

uint32_t locate(LimiterTable::Header &header, LimiterTable::Entry *entries, const PrefixedKey &key,
                int64_t initial_level, int64_t now_ms, uint32_t keep, uint32_t keep_too) {
    const size_t base = (key.hash() % header.sets) * LimiterTable::kWays;
    LimiterTable::Entry *empty = nullptr;
    LimiterTable::Entry *least_recent = nullptr;
    for (size_t i = 0; i < LimiterTable::kWays; ++i) {
        LimiterTable::Entry &entry = entries[base + i];
        if (matches(entry, key)) {
            entry.last_used = ++header.tick;
            return static_cast<uint32_t>(base + i + 1);
        }
        if (entry.hash == 0) {
            empty = empty != nullptr ? empty : &entry;
        } else if (entry.in_flight == 0 && base + i + 1 != keep && base + i + 1 != keep_too &&
                   (least_recent == nullptr || entry.last_used < least_recent->last_used)) {
            // Only idle entries may go: evicting one with requests in flight would lose its count.
            least_recent = &entry;
        }
    }
    LimiterTable::Entry *victim = empty != nullptr ? empty : least_recent;
    if (victim == nullptr) {
        return 0;
    }
    if (victim->hash != 0) {
        ++header.evictions;
    }
    std::memset(victim, 0, sizeof(*victim));
    victim->hash = key.hash();
    victim->full_key_length =
        static_cast<uint16_t>(std::min<size_t>(key.full_length(), UINT16_MAX));
    victim->key_length = static_cast<uint8_t>(key.stored().size());
    std::memcpy(victim->key, key.stored().data(), key.stored().size());
    // A new bucket starts full: a client seen for the first time gets its burst.
    victim->level = initial_level;
    victim->last_ms = now_ms;
    victim->last_used = ++header.tick;
    return static_cast<uint32_t>(victim - entries + 1);
}

}  // namespace

}  // namespace ehrgate::ratelimit
