// The LMDB audit log (policyd/src/audit_log.cpp) and the audit protocol messages.
#include "audit_log.hpp"
#include "syslog_forwarder.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <uv.h>

#include <filesystem>
#include <string>
#include <vector>

#include "ehrgate/protocol.hpp"

namespace ehrgate::policyd {
namespace {

audit::Record record(const std::string &id, const std::string &patient, int64_t time_us) {
    audit::Record r;
    r.record_id = id;
    r.time_us = time_us;
    r.correlation_id = "corr-" + id;
    r.client_id = patient == "p1" ? "client-a" : "client-b";
    r.user = "Practitioner/" + patient;
    r.patient_ids = {patient};
    r.decision = "permit";
    r.http_status = 200;
    return r;
}

// Designated initializers would trip -Wmissing-field-initializers; build queries field by field.
AuditStore::Query query(std::string patient, std::string client = {}, std::string user = {},
                        std::string correlation_id = {}, std::optional<int64_t> since = {},
                        std::optional<int64_t> until = {}) {
    AuditStore::Query q;
    q.patient = std::move(patient);
    q.client = std::move(client);
    q.user = std::move(user);
    q.correlation_id = std::move(correlation_id);
    q.since_us = since;
    q.until_us = until;
    return q;
}

class AuditStoreTest : public ::testing::Test {
  protected:
    void SetUp() override {
        char pattern[] = "/tmp/ehrgate-audit-test-XXXXXX";
        ASSERT_NE(::mkdtemp(pattern), nullptr);
        dir_ = pattern;
        key_ = audit::SigningKey::generate();
    }
    void TearDown() override {
        std::error_code ignored;
        std::filesystem::remove_all(dir_, ignored);
    }
    std::unique_ptr<AuditStore> open(size_t map = size_t{64} << 20, bool read_only = false) {
        StoreError error;
        auto store = AuditStore::open({dir_ + "/audit", map, read_only}, &error);
        EXPECT_NE(store, nullptr) << store_status_name(error.status) << " " << error.detail;
        return store;
    }
    StoreStatus append(AuditStore &store, const std::vector<audit::Record> &records,
                       bool checkpoint, std::vector<AuditStore::Appended> *out = nullptr) {
        std::vector<const audit::Record *> ptrs;
        for (const auto &r : records)
            ptrs.push_back(&r);
        std::vector<AuditStore::Appended> appended;
        StoreError error;
        const StoreStatus status =
            store.append(ptrs, key_.get(), checkpoint, 1'000'000, appended, &error);
        if (out != nullptr)
            *out = appended;
        return status;
    }
    audit::VerifyResult verify(AuditStore &store) {
        std::vector<audit::Checkpoint> checkpoints;
        StoreError error;
        EXPECT_EQ(store.checkpoints(checkpoints, &error), StoreStatus::Ok);
        audit::ChainVerifier verifier(key_->public_raw(), checkpoints);
        store.scan_records([&](uint64_t seq, std::string_view v) { return verifier.add(seq, v); },
                           &error);
        return verifier.finish();
    }
    std::vector<uint64_t> search(AuditStore &store, const AuditStore::Query &q) {
        std::vector<uint64_t> seqs;
        StoreError error;
        EXPECT_EQ(store.search(
                      q,
                      [&](const audit::ChainedRecord &e) {
                          seqs.push_back(e.seq);
                          return true;
                      },
                      &error),
                  StoreStatus::Ok);
        return seqs;
    }

    std::string dir_;
    std::unique_ptr<audit::SigningKey> key_;
};

TEST_F(AuditStoreTest, AppendsChainVerifiesAndSurvivesReopen) {
    {
        auto store = open();
        ASSERT_TRUE(store);
        ASSERT_EQ(append(*store, {record("a", "p1", 10), record("b", "p2", 20)}, false),
                  StoreStatus::Ok);
        ASSERT_EQ(append(*store, {record("c", "p1", 30)}, true), StoreStatus::Ok);
        EXPECT_EQ(store->last_seq(), 3u);
        EXPECT_EQ(store->last_checkpoint_seq(), 3u);
    }
    auto store = open();
    ASSERT_TRUE(store);
    EXPECT_EQ(store->last_seq(), 3u);  // the head is reloaded: the chain continues
    ASSERT_EQ(append(*store, {record("d", "p2", 40)}, true), StoreStatus::Ok);
    const audit::VerifyResult result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.records, 4u);
    EXPECT_EQ(result.checkpoints, 2u);
}

TEST_F(AuditStoreTest, RedeliveredRecordIdsAreStoredOnce) {
    auto store = open();
    std::vector<AuditStore::Appended> out;
    ASSERT_EQ(append(*store, {record("a", "p1", 10), record("b", "p1", 11)}, false, &out),
              StoreStatus::Ok);
    ASSERT_EQ(append(*store, {record("b", "p1", 11), record("c", "p1", 12), record("c", "p1", 12)},
                     false, &out),
              StoreStatus::Ok);
    ASSERT_EQ(out.size(), 3u);
    EXPECT_TRUE(out[0].duplicate);
    EXPECT_EQ(out[0].seq, 2u);
    EXPECT_FALSE(out[1].duplicate);
    EXPECT_EQ(out[1].seq, 3u);
    EXPECT_TRUE(out[2].duplicate);  // twice in one batch
    EXPECT_EQ(store->last_seq(), 3u);
}

TEST_F(AuditStoreTest, SearchUsesIndexesAndCombinesCriteria) {
    auto store = open();
    ASSERT_EQ(append(*store,
                     {record("a", "p1", 100), record("b", "p2", 200), record("c", "p1", 300),
                      record("d", "p2", 400)},
                     false),
              StoreStatus::Ok);
    EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1, 3}));
    EXPECT_EQ(search(*store, query("", "client-b")), (std::vector<uint64_t>{2, 4}));
    EXPECT_EQ(search(*store, query("", "", "Practitioner/p2")), (std::vector<uint64_t>{2, 4}));
    EXPECT_EQ(search(*store, query("", "", "", "corr-c")), (std::vector<uint64_t>{3}));
    EXPECT_EQ(search(*store, query("", "", "", "", 200, 300)), (std::vector<uint64_t>{2, 3}));
    EXPECT_EQ(search(*store, query("p1", "", "", "", 200)), (std::vector<uint64_t>{3}));
    EXPECT_EQ(search(*store, query("p1", "client-b")), (std::vector<uint64_t>{}));
    EXPECT_EQ(search(*store, query("p")), (std::vector<uint64_t>{}));  // no prefix match
    EXPECT_EQ(search(*store, query("")).size(), 4u);
}

TEST_F(AuditStoreTest, MapFullFailsTheWholeBatchAndKeepsTheChain) {
    auto store = open(size_t{1} << 20);  // 1 MiB
    ASSERT_TRUE(store);
    int ok_batches = 0;
    StoreStatus status = StoreStatus::Ok;
    std::string big(2000, 'x');
    for (int i = 0; i < 2000 && status == StoreStatus::Ok; ++i) {
        std::vector<audit::Record> batch;
        for (int j = 0; j < 10; ++j) {
            audit::Record r = record("r" + std::to_string(i) + "-" + std::to_string(j), "p1", i);
            r.query = big;
            batch.push_back(r);
        }
        status = append(*store, batch, i % 10 == 0);
        ok_batches += status == StoreStatus::Ok;
    }
    EXPECT_EQ(status, StoreStatus::MapFull);
    EXPECT_EQ(store->last_seq(), static_cast<uint64_t>(ok_batches) * 10);
    const audit::VerifyResult result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.records, store->last_seq());
}

TEST_F(AuditStoreTest, PurgeKeepsASignedAnchor) {
    auto store = open();
    for (int i = 1; i <= 10; ++i) {
        ASSERT_EQ(append(*store, {record("r" + std::to_string(i), "p1", i * 100)}, i % 4 == 0),
                  StoreStatus::Ok);
    }
    uint64_t removed = 0;
    StoreError error;
    // Records 1-6 are older than 650; the newest checkpoint among them is at 4.
    ASSERT_EQ(store->purge_before(650, &removed, &error), StoreStatus::Ok);
    EXPECT_EQ(removed, 4u);
    audit::VerifyResult result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.first_seq, 5u);
    EXPECT_EQ(search(*store, query("p1")).front(), 5u);
    ASSERT_EQ(append(*store, {record("r11", "p1", 1100)}, true), StoreStatus::Ok);
    result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.last_seq, 11u);
}

TEST_F(AuditStoreTest, ReadOnlyOpenOfMissingLogIsEmpty) {
    StoreError error;
    std::filesystem::create_directories(dir_ + "/audit");
    {
        auto writer = open();  // creates the environment but writes no record
    }
    auto store = open(size_t{64} << 20, true);
    ASSERT_TRUE(store);
    EXPECT_TRUE(search(*store, query("")).empty());
    EXPECT_TRUE(verify(*store).ok);
}

TEST_F(AuditStoreTest, SigningKeyIsCreatedPrivateAndReloaded) {
    std::string problem;
    auto key = load_or_create_signing_key(dir_, &problem);
    ASSERT_TRUE(key) << problem;
    struct stat st {};
    ASSERT_EQ(::stat((dir_ + "/audit-signing.key").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    auto again = load_or_create_signing_key(dir_, &problem);
    ASSERT_TRUE(again) << problem;
    EXPECT_EQ(again->public_raw(), key->public_raw());
    EXPECT_EQ(read_public_key_hex(dir_ + "/audit-signing.pub"), key->public_raw());
    ::chmod((dir_ + "/audit-signing.key").c_str(), 0644);
    EXPECT_FALSE(load_or_create_signing_key(dir_, &problem));
}

// The writer thread and the loop: completions run on the loop, after the commit.
TEST_F(AuditStoreTest, GroupCommitAcksOnTheLoopAndBatches) {
    auto store = open();
    uv_loop_t loop;
    uv_loop_init(&loop);
    AuditLog::Options options;
    options.checkpoint_every_records = 50;
    {
        AuditLog log(&loop, *store, *key_, options);
        log.start();
        const uv_thread_t loop_thread = uv_thread_self();
        int acked = 0;
        bool all_on_loop = true;
        for (int i = 0; i < 200; ++i) {
            log.append({record("g" + std::to_string(i), "p1", i)},
                       [&](const AuditLog::Result &result) {
                           EXPECT_EQ(result.status, StoreStatus::Ok);
                           EXPECT_EQ(result.appended.size(), 1u);
                           const uv_thread_t self = uv_thread_self();
                           all_on_loop = all_on_loop && uv_thread_equal(&self, &loop_thread);
                           ++acked;
                       });
        }
        log.append_event(audit::Kind::PolicyReload, "activated version v2");
        while (acked < 200) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        EXPECT_TRUE(all_on_loop);
        log.stop();
        uv_run(&loop, UV_RUN_DEFAULT);
        const AuditCounters c = log.counters();
        EXPECT_EQ(c.appended, 201u);
        // Many appends share a transaction: fewer commits than records.
        EXPECT_LT(c.transactions, 201u);
        EXPECT_GE(c.checkpoints, 1u);
    }
    EXPECT_EQ(uv_loop_close(&loop), 0);
    const audit::VerifyResult result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.records, 201u);
    EXPECT_EQ(result.last_checkpoint_seq, 201u);  // stop() checkpoints the head
    std::vector<uint64_t> events;
    StoreError error;
    store->search(
        query(""),
        [&](const audit::ChainedRecord &e) {
            if (e.record.kind == audit::Kind::PolicyReload)
                events.push_back(e.seq);
            return true;
        },
        &error);
    EXPECT_EQ(events.size(), 1u);
}

TEST_F(AuditStoreTest, StorageFailureIsReportedToTheCallerAndCounted) {
    auto store = open(size_t{1} << 20);
    uv_loop_t loop;
    uv_loop_init(&loop);
    {
        AuditLog log(&loop, *store, *key_, {});
        log.start();
        std::string big(100000, 'q');
        int failures = 0, done = 0;
        for (int i = 0; i < 40; ++i) {
            audit::Record r = record("f" + std::to_string(i), "p1", i);
            r.query = big;
            log.append({r}, [&](const AuditLog::Result &result) {
                failures += result.status == StoreStatus::MapFull;
                ++done;
            });
        }
        while (done < 40) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        EXPECT_GT(failures, 0);
        log.stop();
        uv_run(&loop, UV_RUN_DEFAULT);
        EXPECT_GT(log.counters().map_full, 0u);
        EXPECT_EQ(log.counters().failed_records, static_cast<uint64_t>(failures));
        EXPECT_NE(log.status_json().find("\"map_full\":"), std::string::npos);
    }
    EXPECT_EQ(uv_loop_close(&loop), 0);
    EXPECT_TRUE(verify(*store).ok);
}

// ---- protocol ----------------------------------------------------------------------------------

std::string hex(const std::string &s) {
    return audit::hex(s);
}

TEST(AuditProtocol, AckGoldenBytes) {
    protocol::AuditAck ack{true, {"w1-1"}, "", ""};
    EXPECT_EQ(hex(protocol::encode(ack)),
              "84a26f6bc3aa7265636f72645f69647391a477312d31a56572726f72a0a76d657373616765a0");
    std::string frame;
    protocol::encode_frame(frame, protocol::MessageType::AuditAck, 7, protocol::encode(ack));
    EXPECT_EQ(hex(frame.substr(0, 8)), "0000002a94011507");
    EXPECT_EQ(protocol::decode_audit_ack(protocol::encode(ack))->record_ids,
              std::vector<std::string>{"w1-1"});
}

TEST(AuditProtocol, AppendGoldenPrefixAndRoundTrip) {
    protocol::AuditAppend append;
    append.sync = false;
    audit::Record r;
    r.record_id = "x";
    append.records.push_back(r);
    const std::string body = protocol::encode(append);
    // {"mode":"async","records":[{...27 keys...}]}
    EXPECT_EQ(hex(body.substr(0, 30)),
              "82a46d6f6465a56173796e63a77265636f72647391de001ba46b696e6400");
    const std::optional<protocol::AuditAppend> back = protocol::decode_audit_append(body);
    ASSERT_TRUE(back);
    EXPECT_FALSE(back->sync);
    ASSERT_EQ(back->records.size(), 1u);
    EXPECT_EQ(back->records[0], r);
    std::string frame;
    protocol::encode_frame(frame, protocol::MessageType::AuditAppend, 1, body);
    protocol::FrameDecoder decoder;
    decoder.feed(frame);
    const std::optional<protocol::FrameView> view = decoder.next();
    ASSERT_TRUE(view);
    EXPECT_EQ(view->header.type, protocol::MessageType::AuditAppend);
    EXPECT_STREQ(protocol::message_type_name(protocol::MessageType::AuditAppend), "audit-append");
}

TEST(AuditProtocol, AppendWithoutRecordIdIsRefused) {
    protocol::AuditAppend append;
    append.records.emplace_back();  // no record id: redelivery could not be deduplicated
    EXPECT_FALSE(protocol::decode_audit_append(protocol::encode(append)));
    EXPECT_FALSE(
        protocol::decode_audit_append("\x81\xa4mode\xa3"
                                      "bad"));
    EXPECT_FALSE(protocol::decode_audit_ack("\x80"));  // "ok" is required
}

}  // namespace
}  // namespace ehrgate::policyd

// ---- syslog forwarding (format only; delivery is tested against rsyslog) -----------------------

namespace ehrgate::policyd {
namespace {

TEST(AuditSyslog, Rfc5424MessageAndOctetCountingFrame) {
    audit::ChainedRecord entry{42, record("id\"]x", "p1", 1'780'000'000'123'456)};
    entry.record.kind = audit::Kind::Outcome;
    const std::string message = syslog_message(entry, "gw1", 77);
    EXPECT_EQ(message.rfind("<85>1 2026-05-28T20:26:40.123456Z gw1 ehrgate 77 outcome "
                            "[ehrgate@32473 seq=\"42\" record_id=\"id\\\"\\]x\" "
                            "correlation_id=\"corr-id\\\"\\]x\"] {\"seq\":42,",
                            0),
              0u)
        << message;
    EXPECT_EQ(syslog_frame("abc"), "3 abc");
    EXPECT_EQ(syslog_frame(message).substr(0, std::to_string(message.size()).size() + 1),
              std::to_string(message.size()) + " ");
}

TEST(AuditSyslog, TargetParsing) {
    SyslogOptions o;
    EXPECT_TRUE(parse_syslog_target("127.0.0.1:6514", o));
    EXPECT_EQ(o.host, "127.0.0.1");
    EXPECT_EQ(o.port, 6514);
    EXPECT_TRUE(parse_syslog_target("[::1]:10514", o));
    EXPECT_EQ(o.host, "::1");
    EXPECT_FALSE(parse_syslog_target("host", o));
    EXPECT_FALSE(parse_syslog_target("host:0", o));
    EXPECT_FALSE(parse_syslog_target("host:70000", o));
    EXPECT_FALSE(parse_syslog_target(":514", o));
}

}  // namespace
}  // namespace ehrgate::policyd
