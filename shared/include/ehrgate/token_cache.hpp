// The verified-token cache, laid out in a caller-provided memory block so nginx can place it in a
// shared-memory zone that every worker sees: a repeated bearer token skips signature verification
// in all workers, not just the one that verified it first.
//
// Layout: a header, then a set-associative table of fixed-size slots (4 ways per set, LRU within
// a set). Everything in the block is trivially copyable with no pointers, so it is valid at any
// mapping address and survives `nginx -s reload` (the zone is reused when the size matches).
// Entries are keyed by SHA-256 of the token, expire with the token, and belong to a policy
// generation: a policy reload (new issuers, rotated keys) bumps the generation, invalidating every
// entry at once without touching them.
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

class TokenCacheTable {
  public:
    static constexpr size_t kWays = 4;
    static constexpr size_t kSlotBytes = 1024;
    static constexpr size_t kMaxPayload = kSlotBytes - 64;

    // Bytes needed for at least `min_entries` entries.
    static size_t bytes_for(size_t min_entries);

    // Formats `memory` as an empty table, or adopts it unchanged when it already holds a table of
    // the same geometry (a reload reusing the zone). Returns nothing when `bytes` is too small.
    // The handle is two pointers into the block; copy it freely.
    static std::optional<TokenCacheTable> attach(void *memory, size_t bytes);

    // Copies the payload of a live entry into `payload`. `now` is unix seconds.
    bool lookup(const TokenDigest &digest, int64_t now, std::string *payload);
    // Stores a verified token's payload until `expires_at`. Payloads over kMaxPayload are not
    // cached (the caller verifies such tokens every time).
    bool insert(const TokenDigest &digest, int64_t expires_at, std::string_view payload,
                int64_t now);
    // Invalidates every entry (policy generation change).
    void set_generation(uint64_t generation);
    uint64_t generation() const;

    size_t capacity() const;
    uint64_t hits() const;
    uint64_t misses() const;

    struct Header;
    struct Slot;

  private:
    TokenCacheTable(Header *header, Slot *slots) : header_(header), slots_(slots) {}

    Header *header_;
    Slot *slots_;
};

}  // namespace ehrgate::cache
