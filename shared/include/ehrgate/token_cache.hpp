// Digest-keyed caches laid out in a caller-provided memory block, so nginx can place them in a
// shared-memory zone that every worker sees:
//  - the verified-token cache: a repeated bearer token skips signature verification in all
//    workers, not just the one that verified it first;
//  - the decision cache: a repeated request (same client, user, patient, purpose, method and URL)
//    reuses policyd's consent decision while it is current (ngx_module/decision_cache.cpp).
//
// Layout: a header, then a set-associative table of fixed-size slots (4 ways per set, LRU within
// a set). Everything in the block is trivially copyable with no pointers, so it is valid at any
// mapping address and survives `nginx -s reload` (the zone is reused when the size matches).
// Entries are keyed by a SHA-256 digest, expire at a time the caller gives, and belong to a
// generation: bumping it (a policy reload for tokens, a consent change for decisions) invalidates
// every entry at once without touching them.
//
// The table does no locking; the caller serializes access (nginx: the zone's ngx_shmtx).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ehrgate::cache {

using TokenDigest = std::array<uint8_t, 32>;

TokenDigest digest_token(std::string_view token);

// One geometry per use; `Magic` tells a zone formatted for one use from another's.
template <size_t SlotBytes, uint64_t Magic>
class DigestCacheTable {
  public:
    static constexpr size_t kWays = 4;
    static constexpr size_t kSlotBytes = SlotBytes;
    static constexpr size_t kMaxPayload = kSlotBytes - 64;

    // Bytes needed for at least `min_entries` entries.
    static size_t bytes_for(size_t min_entries);

    // Formats `memory` as an empty table, or adopts it unchanged when it already holds a table of
    // the same geometry (a reload reusing the zone). Returns nothing when `bytes` is too small.
    // The handle is two pointers into the block; copy it freely.
    static std::optional<DigestCacheTable> attach(void *memory, size_t bytes);

    // Copies the payload of a live entry into `payload`. `now` is in the unit the caller uses
    // for expiry times (unix seconds for tokens, milliseconds for decisions).
    bool lookup(const TokenDigest &digest, int64_t now, std::string *payload);
    // Stores a payload until `expires_at`. Payloads over kMaxPayload are not cached (the caller
    // does the full work every time).
    bool insert(const TokenDigest &digest, int64_t expires_at, std::string_view payload,
                int64_t now);
    // Invalidates every entry whose generation differs.
    void set_generation(uint64_t generation);
    uint64_t generation() const;

    size_t capacity() const;
    uint64_t hits() const;
    uint64_t misses() const;

    struct Header;
    struct Slot;

  private:
    DigestCacheTable(Header *header, Slot *slots) : header_(header), slots_(slots) {}

    Header *header_;
    Slot *slots_;
};

inline constexpr uint64_t kTokenCacheMagic = 0x65687267746b6331ULL;     // "ehrgtkc1"
inline constexpr uint64_t kDecisionCacheMagic = 0x6568726764656331ULL;  // "ehrgdec1"
using TokenCacheTable = DigestCacheTable<1024, kTokenCacheMagic>;
// A decision is a DecideReply with its signed consent context (about 1 KB).
using DecisionCacheTable = DigestCacheTable<2048, kDecisionCacheMagic>;

}  // namespace ehrgate::cache
