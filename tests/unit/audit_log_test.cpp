// The LMDB audit log (policyd/src/audit_log.cpp) and the audit protocol messages.
#include "audit_log.hpp"
#include "syslog_forwarder.hpp"

#include <gtest/gtest.h>
#include <lmdb.h>
#include <sys/stat.h>
#include <uv.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
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

    // The indexer's step: search entries for the records through `seq`.
    void index(AuditStore &store, uint64_t seq) {
        uint64_t indexed = 0;
        StoreError error;
        ASSERT_EQ(store.index_records(seq, &indexed, &error), StoreStatus::Ok) << error.detail;
        EXPECT_EQ(store.indexed_through(), seq);
    }
    // Entries under one key of the index environment's search database (tag || value). Only
    // while no transaction of a store is open: this opens the environment a second time in the
    // process, and closing it clears the process's reader slots (LMDB's rule is to open an
    // environment once per process).
    size_t index_entries(const std::string &key) {
        MDB_env *env = nullptr;
        EXPECT_EQ(mdb_env_create(&env), MDB_SUCCESS);
        mdb_env_set_maxdbs(env, 4);
        size_t count = 0;
        MDB_txn *txn = nullptr;
        MDB_dbi dbi{};
        MDB_cursor *cursor = nullptr;
        MDB_val k{key.size(), const_cast<char *>(key.data())}, v{};
        if (mdb_env_open(env, (dir_ + "/audit/index").c_str(), MDB_RDONLY, 0600) == MDB_SUCCESS &&
            mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn) == MDB_SUCCESS &&
            mdb_dbi_open(txn, "search", MDB_DUPSORT | MDB_DUPFIXED, &dbi) == MDB_SUCCESS &&
            mdb_cursor_open(txn, dbi, &cursor) == MDB_SUCCESS &&
            mdb_cursor_get(cursor, &k, &v, MDB_SET_KEY) == MDB_SUCCESS) {
            size_t n = 0;
            mdb_cursor_count(cursor, &n);
            count = n;
        }
        if (cursor != nullptr) {
            mdb_cursor_close(cursor);  // read-only transactions leave their cursors to us
        }
        if (txn != nullptr) {
            mdb_txn_abort(txn);
        }
        mdb_env_close(env);
        return count;
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
    // The same answers, in seq order, whether the records are found by scanning (not indexed
    // yet), from the indexes, or partly each way.
    for (const uint64_t indexed_through : {0, 2, 4}) {
        SCOPED_TRACE("indexed through " + std::to_string(indexed_through));
        if (indexed_through > 0) {
            index(*store, indexed_through);
        }
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
    EXPECT_EQ(index_entries("pp1"), 2u);
    EXPECT_EQ(index_entries("cclient-b"), 2u);
}

TEST_F(AuditStoreTest, IndexIsRebuiltWhenLostAndRewoundWhenAheadOfTheRecords) {
    {
        auto store = open();
        ASSERT_EQ(append(*store, {record("a", "p1", 100), record("b", "p2", 200)}, false),
                  StoreStatus::Ok);
    }
    std::filesystem::copy_file(dir_ + "/audit/data.mdb", dir_ + "/two-records.mdb");
    {
        auto store = open();
        ASSERT_EQ(append(*store, {record("c", "p3", 300), record("d", "p3", 400)}, false),
                  StoreStatus::Ok);
        index(*store, 4);
    }
    // A crash took the last commit of the records but not of the index: the records file
    // rewinds to two records, the index still says four.
    std::filesystem::copy_file(dir_ + "/two-records.mdb", dir_ + "/audit/data.mdb",
                               std::filesystem::copy_options::overwrite_existing);
    {
        auto store = open();
        EXPECT_EQ(store->last_seq(), 2u);
        EXPECT_EQ(store->indexed_through(), 2u);
        ASSERT_EQ(append(*store, {record("e", "p4", 500), record("f", "p4", 600)}, false),
                  StoreStatus::Ok);
        index(*store, 4);
        // Entries left by the lost records point at seqs that other records now hold: search
        // checks every candidate against its record.
        EXPECT_EQ(search(*store, query("p3")), (std::vector<uint64_t>{}));
        EXPECT_EQ(search(*store, query("p4")), (std::vector<uint64_t>{3, 4}));
        EXPECT_EQ(search(*store, query("", "", "", "", 300, 400)), (std::vector<uint64_t>{}));
        EXPECT_EQ(search(*store, query("", "", "", "", 500)), (std::vector<uint64_t>{3, 4}));
    }
    // The index environment lost altogether: search scans, and indexing starts over.
    std::filesystem::remove_all(dir_ + "/audit/index");
    {
        auto store = open(size_t{64} << 20, true);
        EXPECT_EQ(search(*store, query("p4")), (std::vector<uint64_t>{3, 4}));
    }
    auto store = open();
    EXPECT_EQ(store->indexed_through(), 0u);
    EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1}));
    index(*store, 4);
    EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1}));
    EXPECT_EQ(index_entries("pp4"), 2u);
}

TEST_F(AuditStoreTest, AnIndexThatCannotBeOpenedIsStartedOver) {
    {
        auto store = open();
        ASSERT_EQ(append(*store, {record("a", "p1", 100)}, false), StoreStatus::Ok);
        index(*store, 1);
    }
    {
        std::ofstream garbage(dir_ + "/audit/index/data.mdb", std::ios::trunc);
        garbage << std::string(8192, 'g');
    }
    {
        auto reader = open(size_t{64} << 20, true);  // the records still answer, by a scan
        ASSERT_TRUE(reader);
        EXPECT_FALSE(reader->has_index());
        EXPECT_EQ(search(*reader, query("p1")), (std::vector<uint64_t>{1}));
    }
    auto store = open();
    ASSERT_TRUE(store);
    EXPECT_TRUE(store->has_index());
    EXPECT_EQ(store->indexed_through(), 0u);
    index(*store, 1);
    EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1}));
}

// The layout before the index environment: ids and the search indexes beside the records.
TEST_F(AuditStoreTest, LogsOfTheEarlierLayoutKeepDeduplicatingAndAreIndexedAgain) {
    std::filesystem::create_directories(dir_ + "/audit");
    {
        MDB_env *env = nullptr;
        ASSERT_EQ(mdb_env_create(&env), MDB_SUCCESS);
        mdb_env_set_maxdbs(env, 16);
        ASSERT_EQ(mdb_env_open(env, (dir_ + "/audit").c_str(), 0, 0600), MDB_SUCCESS);
        MDB_txn *txn = nullptr;
        ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), MDB_SUCCESS);
        MDB_dbi records{}, ids{}, patients{}, checkpoints{};
        ASSERT_EQ(mdb_dbi_open(txn, "checkpoints", MDB_CREATE, &checkpoints), MDB_SUCCESS);
        ASSERT_EQ(mdb_dbi_open(txn, "records", MDB_CREATE, &records), MDB_SUCCESS);
        ASSERT_EQ(mdb_dbi_open(txn, "ids", MDB_CREATE, &ids), MDB_SUCCESS);
        ASSERT_EQ(mdb_dbi_open(txn, "idx_patient", MDB_CREATE, &patients), MDB_SUCCESS);
        std::string hash = audit::zero_hash();
        for (uint64_t seq = 1; seq <= 2; ++seq) {
            const audit::Record r = record(seq == 1 ? "old-a" : "old-b", "p1", seq * 100);
            const std::string canonical = audit::canonical_encode({seq, r});
            hash = audit::chain_hash(hash, canonical);
            const std::string value = audit::stored_value(hash, canonical);
            std::string key(8, '\0');
            key[7] = static_cast<char>(seq);
            MDB_val k{key.size(), key.data()}, v{value.size(), const_cast<char *>(value.data())};
            ASSERT_EQ(mdb_put(txn, records, &k, &v, 0), MDB_SUCCESS);
            MDB_val ik{r.record_id.size(), const_cast<char *>(r.record_id.data())};
            ASSERT_EQ(mdb_put(txn, ids, &ik, &k, 0), MDB_SUCCESS);
            std::string entry = std::string("\0\x02p1", 4) + key;
            MDB_val pk{entry.size(), entry.data()}, empty{};
            ASSERT_EQ(mdb_put(txn, patients, &pk, &empty, 0), MDB_SUCCESS);
        }
        ASSERT_EQ(mdb_txn_commit(txn), MDB_SUCCESS);
        mdb_env_close(env);
    }
    {
        // Read-only, before anything converted it: search scans.
        auto store = open(size_t{64} << 20, true);
        EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1, 2}));
    }
    auto store = open();
    ASSERT_EQ(store->last_seq(), 2u);
    std::vector<AuditStore::Appended> out;
    ASSERT_EQ(append(*store, {record("old-b", "p1", 200), record("new-c", "p1", 300)}, true, &out),
              StoreStatus::Ok);
    ASSERT_EQ(out.size(), 2u);
    EXPECT_TRUE(out[0].duplicate);  // the old ids database still deduplicates
    EXPECT_EQ(out[0].seq, 2u);
    EXPECT_EQ(out[1].seq, 3u);
    index(*store, 3);
    EXPECT_EQ(search(*store, query("p1")), (std::vector<uint64_t>{1, 2, 3}));
    EXPECT_TRUE(verify(*store).ok);
}

TEST_F(AuditStoreTest, LongRecordIdsAndValuesAreKeyedExactly) {
    auto store = open();
    const std::string common(600, 'x');  // longer than an LMDB key can be
    audit::Record a = record(common + "-a", "p1", 100), b = record(common + "-b", "p1", 200);
    a.patient_ids = {common + "-patient-a"};
    b.patient_ids = {common + "-patient-b"};
    std::vector<AuditStore::Appended> out;
    ASSERT_EQ(append(*store, {a, b, a}, false, &out), StoreStatus::Ok);
    ASSERT_EQ(out.size(), 3u);
    EXPECT_FALSE(out[1].duplicate);  // same first 600 bytes, different ids
    EXPECT_TRUE(out[2].duplicate);
    index(*store, 2);
    EXPECT_EQ(search(*store, query(common + "-patient-b")), (std::vector<uint64_t>{2}));
    EXPECT_EQ(search(*store, query(common)), (std::vector<uint64_t>{}));
}

// Deferred commits: LMDB has flushed their data; the meta page waits for the next flush.
TEST_F(AuditStoreTest, CommitsAreCountedOnlyWhenTheyWrite) {
    auto store = open();
    std::vector<const audit::Record *> batch;
    const audit::Record a = record("a", "p1", 100);
    batch.push_back(&a);
    std::vector<AuditStore::Appended> out;
    StoreError error;
    ASSERT_EQ(
        store->append(batch, nullptr, false, 1, out, &error, AuditStore::Durability::Deferred),
        StoreStatus::Ok);
    EXPECT_EQ(store->commits(), 1u);
    // Only a duplicate: nothing written, no commit that could make the first one durable.
    ASSERT_EQ(
        store->append(batch, nullptr, false, 1, out, &error, AuditStore::Durability::Deferred),
        StoreStatus::Ok);
    EXPECT_EQ(store->commits(), 1u);
    EXPECT_TRUE(out[0].duplicate);
    EXPECT_EQ(store->sync(&error), StoreStatus::Ok);
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
    index(*store, 10);
    EXPECT_EQ(index_entries("pp1"), 10u);
    uint64_t removed = 0;
    StoreError error;
    // Records 1-6 are older than 650; the newest checkpoint among them is at 4.
    ASSERT_EQ(store->purge_before(650, &removed, &error), StoreStatus::Ok);
    EXPECT_EQ(removed, 4u);
    audit::VerifyResult result = verify(*store);
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.first_seq, 5u);
    EXPECT_EQ(search(*store, query("p1")).front(), 5u);
    EXPECT_EQ(index_entries("pp1"), 6u);  // the purged records' entries went with them
    EXPECT_EQ(search(*store, query("", "", "", "", 0, 650)), (std::vector<uint64_t>{5, 6}));
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
        EXPECT_EQ(c.indexed, 201u);  // the indexer caught up before stop() returned
        EXPECT_EQ(store->indexed_through(), 201u);
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

// The indexer works beside the writer (batches behind it) and the syncer; search sees every
// record at every moment, from the indexes or by scanning what they have not reached.
TEST_F(AuditStoreTest, IndexerFollowsTheWriterWhileSearchStaysComplete) {
    auto store = open();
    uv_loop_t loop;
    uv_loop_init(&loop);
    constexpr int kJobs = 120, kPerJob = 50;
    {
        AuditLog log(&loop, *store, *key_, {});
        log.start();
        int done = 0;
        for (int i = 0; i < kJobs; ++i) {
            std::vector<audit::Record> job;
            for (int j = 0; j < kPerJob; ++j) {
                job.push_back(record("i" + std::to_string(i * kPerJob + j), j % 2 ? "p1" : "p2",
                                     i * kPerJob + j));
            }
            log.append(std::move(job), [&](const AuditLog::Result &result) {
                EXPECT_EQ(result.status, StoreStatus::Ok);
                ++done;
            });
            if (i % 10 == 9) {
                // Read while the writer and the indexer work (through the same environment: LMDB
                // must not be opened twice in one process).
                const uint64_t committed = log.last_seq();
                const std::vector<uint64_t> p1 = search(*store, query("p1"));
                EXPECT_GE(p1.size(), committed / 2);
                EXPECT_TRUE(std::is_sorted(p1.begin(), p1.end()));
                EXPECT_EQ(std::adjacent_find(p1.begin(), p1.end()), p1.end());  // no repeats
            }
            uv_run(&loop, UV_RUN_NOWAIT);
        }
        while (done < kJobs) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        log.stop();
        uv_run(&loop, UV_RUN_DEFAULT);
        EXPECT_EQ(log.counters().indexed, static_cast<uint64_t>(kJobs * kPerJob));
        EXPECT_EQ(log.counters().index_errors, 0u);
    }
    EXPECT_EQ(uv_loop_close(&loop), 0);
    EXPECT_EQ(store->indexed_through(), static_cast<uint64_t>(kJobs * kPerJob));
    EXPECT_EQ(search(*store, query("p1")).size(), static_cast<size_t>(kJobs * kPerJob / 2));
    EXPECT_EQ(index_entries("pp2"), static_cast<size_t>(kJobs * kPerJob / 2));
    EXPECT_EQ(search(*store, query("", "", "", "corr-i4321")), (std::vector<uint64_t>{4322}));
    EXPECT_TRUE(verify(*store).ok);
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
