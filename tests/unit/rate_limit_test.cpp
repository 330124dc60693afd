#include "ehrgate/rate_limit.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace ehrgate::ratelimit {
namespace {

Plan plan(std::string_view rate, int64_t burst, uint32_t concurrency = 0, bool dry_run = false) {
    return Plan{*parse_rate(rate), burst, concurrency, dry_run};
}

class LimiterTest : public ::testing::Test {
  protected:
    void SetUp() override { memory_.resize(LimiterTable::bytes_for(256) / sizeof(uint64_t) + 1); }
    LimiterTable table() {
        return *LimiterTable::attach(memory_.data(), memory_.size() * sizeof(uint64_t));
    }
    std::vector<uint64_t> memory_;
};

TEST(RateParse, AcceptsPerSecondMinuteHour) {
    EXPECT_EQ(parse_rate("50/s"), 50 * kUnitsPerToken);
    EXPECT_EQ(parse_rate("300/m"), 5 * kUnitsPerToken);
    EXPECT_EQ(parse_rate("3600/h"), kUnitsPerToken);
    EXPECT_EQ(parse_rate("1/h"), kUnitsPerToken / 3600);
    for (const char *bad :
         {"", "50", "/s", "0/s", "-1/s", "5/d", "5/S", "1.5/s", "50 /s", "99999999999/s"}) {
        EXPECT_FALSE(parse_rate(bad).has_value()) << bad;
    }
}

TEST(TokenBucket, AdmitsBurstThenRateExactlyOverTime) {
    const Plan p = plan("100/s", 10);
    Bucket bucket{p.burst * kUnitsPerToken, 0};
    int admitted = 0;
    for (int64_t ms = 0; ms < 10'000; ++ms) {
        for (int i = 0; i < 3; ++i) {  // 300 requests/s offered
            admitted += take_token(bucket, p, ms).admitted ? 1 : 0;
        }
    }
    // burst + rate x time, to the token.
    EXPECT_NEAR(admitted, 10 + 100 * 10, 1);
}

TEST(TokenBucket, SlowRatesRefillWithoutFloatingPoint) {
    const Plan p = plan("2/m", 1);
    Bucket bucket{p.burst * kUnitsPerToken, 0};
    EXPECT_TRUE(take_token(bucket, p, 0).admitted);
    const Take refused = take_token(bucket, p, 1);
    EXPECT_FALSE(refused.admitted);
    EXPECT_NEAR(refused.retry_after_ms, 30'000, 2);
    EXPECT_FALSE(take_token(bucket, p, 29'990).admitted);
    EXPECT_TRUE(take_token(bucket, p, 30'001).admitted);
}

TEST(TokenBucket, ClockGoingBackwardsRefillsNothingAndIdleDaysDoNotOverflow) {
    const Plan p = plan("10/s", 5);
    Bucket bucket{0, 1'000'000};
    EXPECT_FALSE(take_token(bucket, p, 500'000).admitted);
    const Take later = take_token(bucket, p, int64_t{1} << 50);
    EXPECT_TRUE(later.admitted);
    EXPECT_EQ(later.remaining, 4);
}

TEST_F(LimiterTest, ConcurrencyCapAndReleaseLeaveNoLeak) {
    LimiterTable t = table();
    const Plan p = plan("1000/s", 1000, 3);
    const RequestKeys keys{"c1|fhir", "c1", ""};
    std::vector<Hold> holds;
    for (int i = 0; i < 3; ++i) {
        const Admission a = t.admit(keys, p, true, {}, 0);
        ASSERT_EQ(a.verdict, Verdict::Admitted);
        holds.push_back(a.hold);
    }
    EXPECT_EQ(t.admit(keys, p, true, {}, 0).verdict, Verdict::ConcurrencyLimited);
    EXPECT_EQ(t.in_flight("c:c1"), 3u);
    for (const Hold &h : holds)
        t.release(h);
    EXPECT_EQ(t.in_flight("c:c1"), 0u);
    t.release(holds[0]);  // a double release never goes below zero
    EXPECT_EQ(t.in_flight("c:c1"), 0u);
    EXPECT_EQ(t.admit(keys, p, true, {}, 0).verdict, Verdict::Admitted);
}

TEST_F(LimiterTest, RefusalByALaterCheckGivesTheTokenBack) {
    LimiterTable t = table();
    const Plan p = plan("1/h", 2, 1);
    const RequestKeys keys{"c1|fhir", "c1", ""};
    const Admission first = t.admit(keys, p, true, {}, 0);
    ASSERT_EQ(first.verdict, Verdict::Admitted);
    EXPECT_EQ(t.admit(keys, p, true, {}, 0).verdict, Verdict::ConcurrencyLimited);
    t.release(first.hold);
    // Had the refused request kept its token, the bucket would be empty now.
    EXPECT_EQ(t.admit(keys, p, true, {}, 0).verdict, Verdict::Admitted);
    EXPECT_EQ(t.admit(keys, p, true, {}, 0).verdict, Verdict::RateLimited);
}

TEST_F(LimiterTest, UpstreamReserveKeepsRoomForInteractiveTraffic) {
    LimiterTable t = table();
    const Plan p = plan("1000/s", 1000);
    const UpstreamLimits ehr{10, 4};
    std::vector<Hold> batch;
    for (int i = 0; i < 6; ++i) {
        const Admission a = t.admit({"batch|fhir", "batch", "ehr"}, p, false, ehr, 0);
        ASSERT_EQ(a.verdict, Verdict::Admitted) << i;
        batch.push_back(a.hold);
    }
    EXPECT_EQ(t.admit({"batch|fhir", "batch", "ehr"}, p, false, ehr, 0).verdict,
              Verdict::UpstreamShed);
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(t.admit({"clin|fhir", "clin", "ehr"}, p, true, ehr, 0).verdict, Verdict::Admitted)
            << i;
    }
    EXPECT_EQ(t.admit({"clin|fhir", "clin", "ehr"}, p, true, ehr, 0).verdict,
              Verdict::UpstreamShed);
    t.release(batch[0]);
    EXPECT_EQ(t.in_flight("u:ehr"), 9u);
    // Freed capacity goes to interactive traffic first: batch is still over its ceiling.
    EXPECT_EQ(t.admit({"batch|fhir", "batch", "ehr"}, p, false, ehr, 0).verdict,
              Verdict::UpstreamShed);
    EXPECT_EQ(t.admit({"clin|fhir", "clin", "ehr"}, p, true, ehr, 0).verdict, Verdict::Admitted);
}

TEST_F(LimiterTest, DryRunAdmitsButReportsWhatItWouldHaveDone) {
    LimiterTable t = table();
    const Plan p = plan("1/h", 1, 0, true);
    ASSERT_EQ(t.admit({"k", "c", ""}, p, true, {}, 0).verdict, Verdict::Admitted);
    const Admission a = t.admit({"k", "c", ""}, p, true, {}, 0);
    EXPECT_EQ(a.verdict, Verdict::Admitted);
    EXPECT_TRUE(a.would_refuse);
    EXPECT_EQ(a.dry_run_verdict, Verdict::RateLimited);
}

TEST_F(LimiterTest, EvictsLeastRecentlyUsedIdleEntriesNeverBusyOnes) {
    std::vector<uint64_t> small(LimiterTable::bytes_for(LimiterTable::kWays) / sizeof(uint64_t) +
                                1);
    LimiterTable t = *LimiterTable::attach(small.data(), small.size() * sizeof(uint64_t));
    ASSERT_EQ(t.capacity(), LimiterTable::kWays);
    const Plan p = plan("1000/s", 1000, 100);
    // Fill every way with busy client entries (each request holds its client slot).
    std::vector<Hold> holds;
    for (size_t i = 0; holds.size() < LimiterTable::kWays / 2; ++i) {
        const std::string id = "busy" + std::to_string(i);
        const Admission a = t.admit({id, id, ""}, p, true, {}, 0);
        ASSERT_EQ(a.verdict, Verdict::Admitted);
        holds.push_back(a.hold);
    }
    EXPECT_EQ(t.live_entries(), LimiterTable::kWays);
    // Buckets are idle and may be evicted; busy client entries may not.
    for (int i = 0; i < 50; ++i) {
        const std::string id = "churn" + std::to_string(i);
        t.admit({id, "busy0", ""}, p, true, {}, 0);
    }
    EXPECT_GT(t.evictions(), 0u);
    for (size_t i = 0; i < holds.size(); ++i) {
        EXPECT_EQ(t.in_flight("c:busy" + std::to_string(i)), 1u + (i == 0 ? 50u : 0u)) << i;
    }
}

TEST_F(LimiterTest, TableFullOfBusyEntriesFailsClosed) {
    std::vector<uint64_t> small(LimiterTable::bytes_for(LimiterTable::kWays) / sizeof(uint64_t) +
                                1);
    LimiterTable t = *LimiterTable::attach(small.data(), small.size() * sizeof(uint64_t));
    const Plan p = plan("1000/s", 1000, 100);
    Verdict last = Verdict::Admitted;
    for (size_t i = 0; i < LimiterTable::kWays && last == Verdict::Admitted; ++i) {
        const std::string id = "c" + std::to_string(i);
        last = t.admit({"shared-bucket", id, ""}, p, true, {}, 0).verdict;
    }
    EXPECT_EQ(last, Verdict::TableFull);
}

TEST_F(LimiterTest, ReattachKeepsCountersAndBuckets) {
    LimiterTable t = table();
    const Plan p = plan("1/h", 3, 5);
    const Admission a = t.admit({"k", "c", ""}, p, true, {}, 0);
    ASSERT_EQ(a.verdict, Verdict::Admitted);
    LimiterTable again = *LimiterTable::attach(memory_.data(), memory_.size() * sizeof(uint64_t));
    EXPECT_EQ(again.in_flight("c:c"), 1u);
    EXPECT_EQ(again.bucket("r:k")->level, 2 * kUnitsPerToken);
}

TEST_F(LimiterTest, LongKeysAreDistinguishedByTheirFullHash) {
    LimiterTable t = table();
    const Plan p = plan("1/h", 1);
    const std::string prefix(200, 'x');
    EXPECT_EQ(t.admit({prefix + "a", "c", ""}, p, true, {}, 0).verdict, Verdict::Admitted);
    EXPECT_EQ(t.admit({prefix + "b", "c", ""}, p, true, {}, 0).verdict, Verdict::Admitted);
    EXPECT_EQ(t.admit({prefix + "a", "c", ""}, p, true, {}, 0).verdict, Verdict::RateLimited);
}

}  // namespace
}  // namespace ehrgate::ratelimit
