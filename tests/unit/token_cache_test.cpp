#include "ehrgate/token_cache.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace ehrgate::cache {
namespace {

class TokenCacheTest : public ::testing::Test {
  protected:
    std::vector<std::max_align_t> memory_ = std::vector<std::max_align_t>(
        TokenCacheTable::bytes_for(64) / sizeof(std::max_align_t) + 1);
    TokenCacheTable table_ =
        *TokenCacheTable::attach(memory_.data(), memory_.size() * sizeof(std::max_align_t));
};

TEST_F(TokenCacheTest, MissThenHitUntilExpiry) {
    const TokenDigest d = digest_token("header.payload.signature");
    std::string payload;
    EXPECT_FALSE(table_.lookup(d, 1000, &payload));
    ASSERT_TRUE(table_.insert(d, 1100, "claims", 1000));
    ASSERT_TRUE(table_.lookup(d, 1099, &payload));
    EXPECT_EQ(payload, "claims");
    EXPECT_FALSE(table_.lookup(d, 1100, &payload)) << "an entry expires with its token";
    EXPECT_EQ(table_.hits(), 1u);
    EXPECT_EQ(table_.misses(), 2u);
}

TEST_F(TokenCacheTest, DigestIsSha256) {
    const TokenDigest d = digest_token("abc");
    EXPECT_EQ(d[0], 0xba);
    EXPECT_EQ(d[31], 0xad);
}

TEST_F(TokenCacheTest, ExpiredOrOversizedPayloadsAreNotStored) {
    const TokenDigest d = digest_token("t");
    EXPECT_FALSE(table_.insert(d, 1000, "x", 1000));
    EXPECT_FALSE(table_.insert(d, 2000, std::string(TokenCacheTable::kMaxPayload + 1, 'x'), 1000));
    EXPECT_TRUE(table_.insert(d, 2000, std::string(TokenCacheTable::kMaxPayload, 'x'), 1000));
}

TEST_F(TokenCacheTest, GenerationChangeInvalidatesEverything) {
    const TokenDigest d = digest_token("t");
    table_.set_generation(1);
    ASSERT_TRUE(table_.insert(d, 2000, "v1", 1000));
    table_.set_generation(2);
    std::string payload;
    EXPECT_FALSE(table_.lookup(d, 1000, &payload));
    ASSERT_TRUE(table_.insert(d, 2000, "v2", 1000));
    ASSERT_TRUE(table_.lookup(d, 1000, &payload));
    EXPECT_EQ(payload, "v2");
}

TEST_F(TokenCacheTest, BoundedWithLeastRecentlyUsedEvictionWithinASet) {
    // Many more tokens than slots: the table never grows, and recently used entries survive.
    const size_t capacity = table_.capacity();
    const TokenDigest hot = digest_token("hot");
    ASSERT_TRUE(table_.insert(hot, 5000, "hot", 1000));
    std::string payload;
    for (size_t i = 0; i < capacity * 20; ++i) {
        ASSERT_TRUE(table_.lookup(hot, 1000, &payload));  // keep it the most recently used
        table_.insert(digest_token("cold-" + std::to_string(i)), 5000, "cold", 1000);
    }
    EXPECT_TRUE(table_.lookup(hot, 1000, &payload));
    size_t live = 0;
    for (size_t i = 0; i < capacity * 20; ++i) {
        live += table_.lookup(digest_token("cold-" + std::to_string(i)), 1000, &payload) ? 1 : 0;
    }
    EXPECT_LT(live, capacity);
}

TEST_F(TokenCacheTest, ReattachKeepsEntriesAndForeignMemoryIsFormatted) {
    const TokenDigest d = digest_token("survives-reload");
    ASSERT_TRUE(table_.insert(d, 2000, "kept", 1000));
    auto again = TokenCacheTable::attach(memory_.data(), memory_.size() * sizeof(std::max_align_t));
    ASSERT_TRUE(again.has_value());
    std::string payload;
    EXPECT_TRUE(again->lookup(d, 1000, &payload));

    std::vector<std::max_align_t> garbage(memory_.size());
    std::memset(garbage.data(), 0xab, garbage.size() * sizeof(std::max_align_t));
    auto fresh = TokenCacheTable::attach(garbage.data(), garbage.size() * sizeof(std::max_align_t));
    ASSERT_TRUE(fresh.has_value());
    EXPECT_FALSE(fresh->lookup(d, 1000, &payload));
    EXPECT_FALSE(TokenCacheTable::attach(garbage.data(), 100).has_value());
}

}  // namespace
}  // namespace ehrgate::cache

namespace ehrgate::cache {
namespace {

// The decision cache is the same table with larger slots and its own magic: a zone formatted
// for one is never adopted by the other.
TEST(DecisionCacheTable, HoldsADecisionAndRefusesTheOtherGeometry) {
    std::vector<std::max_align_t> memory(
        DecisionCacheTable::bytes_for(16) / sizeof(std::max_align_t) + 1);
    const size_t bytes = memory.size() * sizeof(std::max_align_t);
    std::optional<DecisionCacheTable> table = DecisionCacheTable::attach(memory.data(), bytes);
    ASSERT_TRUE(table);
    const TokenDigest key = digest_token("GET /fhir/Patient/1 demo-clinician-app TREAT");
    const std::string reply(1500, 'r');  // a reply with its signed consent context
    table->set_generation(7);            // consent epoch
    ASSERT_TRUE(table->insert(key, 5000, reply, 1000));
    std::string out;
    ASSERT_TRUE(table->lookup(key, 4999, &out));
    EXPECT_EQ(out, reply);
    // A consent change (new epoch) kills it for every reader at once.
    table->set_generation(8);
    EXPECT_FALSE(table->lookup(key, 2000, &out));
    // Re-attaching keeps the content; attaching as a token cache reformats the block.
    ASSERT_TRUE(table->insert(key, 5000, reply, 1000));
    ASSERT_TRUE(DecisionCacheTable::attach(memory.data(), bytes)->lookup(key, 2000, &out));
    std::optional<TokenCacheTable> other = TokenCacheTable::attach(memory.data(), bytes);
    ASSERT_TRUE(other);
    EXPECT_FALSE(other->lookup(key, 2000, &out));
    EXPECT_FALSE(DecisionCacheTable::attach(memory.data(), bytes)->lookup(key, 2000, &out));
}

}  // namespace
}  // namespace ehrgate::cache
