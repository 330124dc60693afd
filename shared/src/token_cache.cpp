#include "ehrgate/token_cache.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace ehrgate::cache {

template <size_t SlotBytes, uint64_t Magic>
struct DigestCacheTable<SlotBytes, Magic>::Header {
    uint64_t magic;
    uint64_t slot_bytes;
    uint64_t sets;
    uint64_t generation;
    uint64_t tick;  // LRU clock: bumped on every hit and insert
    uint64_t hits;
    uint64_t misses;
    uint64_t reserved;
};

template <size_t SlotBytes, uint64_t Magic>
struct DigestCacheTable<SlotBytes, Magic>::Slot {
    TokenDigest digest;
    int64_t expires_at;  // 0: empty
    uint64_t generation;
    uint64_t last_used;
    uint32_t payload_len;
    uint32_t reserved;
    char payload[kMaxPayload];
};

namespace {

// Every request digests its token and its decision key. EVP_sha256() makes OpenSSL 3 look the
// implementation up in its provider tables on every call, which costs more than hashing a
// 1 KB token: fetch it once, and keep one context per thread.
struct Sha256 {
    EVP_MD *md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    ~Sha256() {
        EVP_MD_CTX_free(ctx);
        EVP_MD_free(md);
    }
};

}  // namespace

TokenDigest digest_token(std::string_view token) {
    thread_local Sha256 sha;
    TokenDigest digest{};
    unsigned int len = 0;
    if (sha.md == nullptr || sha.ctx == nullptr ||
        EVP_DigestInit_ex2(sha.ctx, sha.md, nullptr) != 1 ||
        EVP_DigestUpdate(sha.ctx, token.data(), token.size()) != 1 ||
        EVP_DigestFinal_ex(sha.ctx, digest.data(), &len) != 1) {
        // Never returns an all-zero digest that would match other failures: hash the slow way.
        EVP_Digest(token.data(), token.size(), digest.data(), &len, EVP_sha256(), nullptr);
    }
    return digest;
}

template <size_t SlotBytes, uint64_t Magic>
size_t DigestCacheTable<SlotBytes, Magic>::bytes_for(size_t min_entries) {
    const size_t sets = (min_entries + kWays - 1) / kWays;
    return sizeof(Header) + std::max<size_t>(sets, 1) * kWays * sizeof(Slot);
}

template <size_t SlotBytes, uint64_t Magic>
std::optional<DigestCacheTable<SlotBytes, Magic>> DigestCacheTable<SlotBytes, Magic>::attach(
    void *memory, size_t bytes) {
    if (memory == nullptr || bytes < bytes_for(kWays)) {
        return std::nullopt;
    }
    auto *header = static_cast<Header *>(memory);
    auto *slots = reinterpret_cast<Slot *>(static_cast<char *>(memory) + sizeof(Header));
    const uint64_t sets = (bytes - sizeof(Header)) / (kWays * sizeof(Slot));
    if (header->magic != Magic || header->slot_bytes != sizeof(Slot) || header->sets != sets) {
        std::memset(memory, 0, sizeof(Header) + sets * kWays * sizeof(Slot));
        header->magic = Magic;
        header->slot_bytes = sizeof(Slot);
        header->sets = sets;
    }
    return DigestCacheTable(header, slots);
}

template <size_t SlotBytes, uint64_t Magic>
bool DigestCacheTable<SlotBytes, Magic>::lookup(const TokenDigest &digest, int64_t now,
                                                std::string *payload) {
    uint64_t set;
    std::memcpy(&set, digest.data(), sizeof set);
    Slot *ways = slots_ + (set % header_->sets) * kWays;
    for (size_t i = 0; i < kWays; ++i) {
        Slot &slot = ways[i];
        if (slot.expires_at > now && slot.generation == header_->generation &&
            slot.digest == digest) {
            slot.last_used = ++header_->tick;
            ++header_->hits;
            payload->assign(slot.payload, slot.payload_len);
            return true;
        }
    }
    ++header_->misses;
    return false;
}

template <size_t SlotBytes, uint64_t Magic>
bool DigestCacheTable<SlotBytes, Magic>::insert(const TokenDigest &digest, int64_t expires_at,
                                                std::string_view payload, int64_t now) {
    if (payload.size() > kMaxPayload || expires_at <= now) {
        return false;
    }
    uint64_t set;
    std::memcpy(&set, digest.data(), sizeof set);
    Slot *ways = slots_ + (set % header_->sets) * kWays;
    // Prefer the same token's slot, then a dead slot, then the least recently used one.
    Slot *victim = nullptr;
    for (size_t i = 0; i < kWays && victim == nullptr; ++i) {
        if (ways[i].digest == digest)
            victim = &ways[i];
    }
    for (size_t i = 0; i < kWays && victim == nullptr; ++i) {
        if (ways[i].expires_at <= now || ways[i].generation != header_->generation)
            victim = &ways[i];
    }
    if (victim == nullptr) {
        victim = &ways[0];
        for (size_t i = 1; i < kWays; ++i) {
            if (ways[i].last_used < victim->last_used)
                victim = &ways[i];
        }
    }
    victim->digest = digest;
    victim->expires_at = expires_at;
    victim->generation = header_->generation;
    victim->last_used = ++header_->tick;
    victim->payload_len = static_cast<uint32_t>(payload.size());
    std::memcpy(victim->payload, payload.data(), payload.size());
    return true;
}

template <size_t SlotBytes, uint64_t Magic>
void DigestCacheTable<SlotBytes, Magic>::set_generation(uint64_t generation) {
    header_->generation = generation;
}
template <size_t SlotBytes, uint64_t Magic>
uint64_t DigestCacheTable<SlotBytes, Magic>::generation() const {
    return header_->generation;
}
template <size_t SlotBytes, uint64_t Magic>
size_t DigestCacheTable<SlotBytes, Magic>::capacity() const {
    return header_->sets * kWays;
}
template <size_t SlotBytes, uint64_t Magic>
uint64_t DigestCacheTable<SlotBytes, Magic>::hits() const {
    return header_->hits;
}
template <size_t SlotBytes, uint64_t Magic>
uint64_t DigestCacheTable<SlotBytes, Magic>::misses() const {
    return header_->misses;
}

template class DigestCacheTable<TokenCacheTable::kSlotBytes, kTokenCacheMagic>;
template class DigestCacheTable<DecisionCacheTable::kSlotBytes, kDecisionCacheMagic>;

static_assert(std::is_trivially_copyable_v<TokenCacheTable::Header>);
static_assert(std::is_trivially_copyable_v<TokenCacheTable::Slot>);
static_assert(sizeof(TokenCacheTable::Slot) <= TokenCacheTable::kSlotBytes);
static_assert(std::is_trivially_copyable_v<DecisionCacheTable::Slot>);
static_assert(sizeof(DecisionCacheTable::Slot) <= DecisionCacheTable::kSlotBytes);

}  // namespace ehrgate::cache
