// The audit log in LMDB: append-only, hash-chained records (shared/audit.hpp), indexes for
// search, signed checkpoints; and the group-commit writer that keeps the libuv loop free.
//
// Its own LMDB environment (<data-dir>/audit), not named databases in policyd's main one:
// - LMDB allows one write transaction per environment at a time. The audit writer thread holds
//   write transactions back to back under load; policy and revocation writes happen on the loop
//   thread and would wait on that lock, i.e. block the loop.
// - Its map size is its own (--audit-map-size-mb): a full audit map refuses audited requests
//   (fail closed) without also stopping policy reloads and revocations from being recorded.
// - ehrgatectl opens it read-only for verify/search/export without touching policy state.
//
// The records environment (<data-dir>/audit) holds what every acknowledgement depends on:
// - records: be64 seq -> 32-byte chain hash || canonical record.
// - checkpoints: be64 seq -> encoded checkpoint.
// - ids: record id -> be64 seq, the deduplication index (an id longer than 510 bytes is keyed by
//   its first 400 bytes and its SHA-256: LMDB keys have at most 511 bytes).
// The search indexes live in a second environment (<data-dir>/audit/index), written by their
// own thread behind the records, so that index work neither lengthens a durable commit nor
// waits for LMDB's single write lock of the records:
// - search (MDB_DUPSORT | MDB_DUPFIXED): tag byte || value -> be64 seq, one sorted duplicate
//   per record; tags 'p' patient, 'c' client, 'u' user, 'r' correlation id. Each value's seqs
//   are packed 8 bytes apiece in one tree.
// - time: be64 time_us (sign bit flipped) || be64 seq -> empty.
// - state: "indexed_through" -> be64 seq: records 1..n have their entries.
// Search takes the records up to indexed_through from the indexes and scans the ones after it.
// The indexes are derived data: lost or behind, they are rebuilt from the records.
// Logs from before the split (idx_patient, idx_client, idx_user, idx_correlation, idx_time in the
// records environment) lose those databases when opened for writing, and are indexed again.
#pragma once

#include <lmdb.h>
#include <uv.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ehrgate/audit.hpp"
#include "store.hpp"

namespace ehrgate::policyd {

// Synchronous LMDB side; used by the writer thread in policyd and read-only by ehrgatectl.
class AuditStore {
  public:
    struct Options {
        std::string directory;  // the environment directory, e.g. <data-dir>/audit
        size_t map_size_bytes = size_t{1} << 30;
        bool read_only = false;
    };

    static std::unique_ptr<AuditStore> open(const Options &options, StoreError *error);
    ~AuditStore();
    AuditStore(const AuditStore &) = delete;
    AuditStore &operator=(const AuditStore &) = delete;

    struct Appended {
        uint64_t seq = 0;
        bool duplicate = false;  // this record id was already in the log (redelivery)
    };

    // Synced: the commit is durable when append() returns. Deferred: LMDB has synced the data
    // pages, but its commit record (the meta page) becomes durable only with the next commit
    // that writes or with sync(); until then a power loss rolls the log back to the commit
    // before, intact. The group-commit writer defers, so one disk flush per commit suffices
    // under load, and syncs at once when nothing else is waiting.
    enum class Durability { Synced, Deferred };

    // Appends in one transaction. Records whose id is already stored are not appended again.
    // When `key` is given and `checkpoint` is true, a signed checkpoint of the new head is written
    // in the same transaction. On any error nothing of the batch is stored and the in-memory head
    // is unchanged.
    StoreStatus append(const std::vector<const audit::Record *> &records,
                       const audit::SigningKey *key, bool checkpoint, int64_t now_us,
                       std::vector<Appended> &out, StoreError *error,
                       Durability durability = Durability::Synced);
    // A checkpoint of the current head in its own transaction, synced (no-op when already
    // covered).
    StoreStatus checkpoint(const audit::SigningKey &key, int64_t now_us, StoreError *error);
    // Makes every commit so far durable (fdatasync). May run on another thread than append():
    // LMDB writes its file only inside a commit, and flushing the file while the next
    // transaction is being built or committed flushes nothing that a crash could make harmful
    // (see docs/audit.md).
    StoreStatus sync(StoreError *error);
    // Commits that wrote something, in order: commit k+1 synced the data of its own and every
    // earlier commit before writing its meta page, so it made commits 1..k durable.
    uint64_t commits() const { return commits_; }

    // ---- search indexes (the indexer thread; concurrent with append() and sync()) ----
    // Adds the search entries of the records after indexed_through(), up to `through` (a seq
    // already committed), in one transaction of the index environment, and advances
    // indexed_through in it. *indexed: how many records that covered.
    StoreStatus index_records(uint64_t through, uint64_t *indexed, StoreError *error);
    uint64_t indexed_through() const { return indexed_through_.load(); }
    // False when the index environment could not be opened: search scans everything.
    bool has_index() const { return index_env_ != nullptr; }

    uint64_t last_seq() const { return last_seq_; }
    uint64_t last_checkpoint_seq() const { return last_checkpoint_seq_; }

    // ---- reading (one read transaction per call) ----
    // Visits every record in seq order: visit(seq, stored value). Stops when visit returns false.
    StoreStatus scan_records(const std::function<bool(uint64_t, std::string_view)> &visit,
                             StoreError *error);
    StoreStatus checkpoints(std::vector<audit::Checkpoint> &out, StoreError *error);
    // Records with seq > after_seq, in order, until visit returns false (syslog forwarding).
    StoreStatus scan_after(uint64_t after_seq,
                           const std::function<bool(uint64_t, std::string_view)> &visit,
                           StoreError *error);

    struct Query {
        std::string patient, client, user, correlation_id;
        std::optional<int64_t> since_us, until_us;  // inclusive bounds on time_us
    };
    // Records matching every given criterion, in seq order: those up to indexed_through from the
    // most selective index, the rest by a scan. Reading may run beside the writer and the
    // indexer (the syslog forwarder does); LMDB wants one AuditStore per log per process.
    StoreStatus search(const Query &query,
                       const std::function<bool(const audit::ChainedRecord &)> &visit,
                       StoreError *error);

    // Retention: removes records with time_us < before_us from the start of the log, but only
    // up to the newest signed checkpoint at or before them, which stays as the anchor the rest
    // verifies from. The newest record is never removed. Returns the number removed.
    StoreStatus purge_before(int64_t before_us, uint64_t *removed, StoreError *error);

  private:
    AuditStore(MDB_env *env, bool read_only) : env_(env), read_only_(read_only) {}
    StoreStatus open_databases(StoreError *error);
    StoreStatus open_index(const Options &options, StoreError *error);
    StoreStatus load_head(StoreError *error);
    StoreStatus put_checkpoint(MDB_txn *txn, const audit::SigningKey &key, uint64_t seq,
                               const std::string &hash, int64_t now_us, StoreError *error);
    // Deletes the search entries of purged records from the index environment.
    StoreStatus unindex(const std::vector<audit::Record> &records,
                        const std::vector<uint64_t> &seqs, StoreError *error);

    MDB_env *env_;
    MDB_env *index_env_ = nullptr;  // nullptr: no index (read-only, never indexed): search scans
    bool read_only_;
    bool have_databases_ = false;
    MDB_dbi records_{}, checkpoints_{}, ids_{};
    MDB_dbi search_{}, time_{}, state_{};  // in index_env_
    uint64_t last_seq_ = 0;
    std::string last_hash_ = audit::zero_hash();
    uint64_t last_checkpoint_seq_ = 0;
    uint64_t commits_ = 0;
    // Writer thread: reused by append() so that a record costs no allocation (its canonical
    // encoding, an id key, the hash context).
    std::string encoded_;
    std::string key_;
    audit::ChainHasher hasher_;
    // Indexer thread.
    std::atomic<uint64_t> indexed_through_{0};
    std::optional<int64_t> last_time_us_;  // of the last time key: later times can append
    std::string index_key_;
};

// Loads the checkpoint signing key from <data-dir>/audit-signing.key, creating it (mode 0600)
// on first start, and writes the public half to <data-dir>/audit-signing.pub (hex) for
// `ehrgatectl audit verify`. Returns nullptr and sets *problem on failure.
std::unique_ptr<audit::SigningKey> load_or_create_signing_key(const std::string &data_dir,
                                                              std::string *problem);
std::optional<std::string> read_public_key_hex(const std::string &path);

struct AuditCounters {
    uint64_t appended = 0;      // records durably written
    uint64_t duplicates = 0;    // redelivered records acknowledged without a second copy
    uint64_t transactions = 0;  // group commits
    uint64_t checkpoints = 0;
    uint64_t failed_records = 0;  // appends refused because storage failed (caller was told)
    uint64_t map_full = 0;        // failed transactions by cause
    uint64_t io_errors = 0;
    uint64_t other_errors = 0;
    uint64_t overloaded = 0;      // refused at once: too many records queued for the writer
    uint64_t event_failures = 0;  // policyd's own event records that could not be written
    uint64_t indexed = 0;         // records given their search index entries
    uint64_t index_errors = 0;    // failed index transactions (search scans those records)
    std::string last_error;
};

// Group commit for the libuv loop. append() queues and returns at once; a dedicated writer
// thread takes everything queued and appends it in one transaction (Durability::Deferred: one
// disk flush). A second thread, the syncer, flushes again so that the commit record is durable
// too, while the writer already builds and commits the next batch; the next commit's own flush
// does the same. Only once a batch is durable does its outcome go back to the loop, through a
// uv_async_t, where the completion runs. The loop never waits for the disk. A third thread, the
// indexer, adds the search index entries of committed records in bulk.
class AuditLog {
  public:
    struct Options {
        uint64_t checkpoint_every_records = 1000;
        uint64_t checkpoint_every_ms = 10000;
        size_t max_batch_records = 8192;
        size_t max_queued_records = 200000;
    };

    struct Result {
        StoreStatus status = StoreStatus::Ok;
        std::string detail;
        std::vector<AuditStore::Appended> appended;  // per record, on Ok
    };
    using Completion = std::function<void(const Result &)>;

    AuditLog(uv_loop_t *loop, AuditStore &store, const audit::SigningKey &key, Options options);
    ~AuditLog();
    AuditLog(const AuditLog &) = delete;
    AuditLog &operator=(const AuditLog &) = delete;

    void start();
    // Drains what is queued, writes a final checkpoint, joins the writer and closes the async
    // handle (completions still run on the loop). Idempotent.
    void stop();

    void append(std::vector<audit::Record> records, Completion done);
    // policyd's own events (policy reloads, revocations, admin commands; consent changes from
    // the consent store). Time and record id are filled in when empty. Failures are counted
    // (event_failures) and logged; the call never blocks.
    void append_event(audit::Kind kind, std::string detail, std::string client_id = {},
                      std::vector<std::string> patient_ids = {},
                      std::vector<std::string> consent_ids = {});

    AuditCounters counters() const;
    uint64_t last_seq() const { return last_seq_.load(); }
    std::string status_json() const;

  private:
    struct Job {
        std::vector<audit::Record> records;
        size_t record_count = 0;  // records.size() before the writer released the records
        Completion done;
        Result result;
        uint64_t commit = 0;  // the store commit that must be durable before the ack
    };

    static void on_async(uv_async_t *handle);
    void writer_main();
    void syncer_main();
    void deliver();
    // With mutex_ held: hands every awaiting job whose commit is durable to the loop.
    // Returns true when it moved any.
    bool release_durable();
    // With mutex_ held: fails the awaiting jobs (the flush that would have made them durable
    // failed).
    void fail_awaiting(StoreStatus status, const std::string &detail);
    void indexer_main();

    uv_loop_t *loop_;
    AuditStore &store_;
    const audit::SigningKey &key_;
    Options options_;
    uv_async_t async_{};
    bool started_ = false;
    bool stopped_ = false;
    std::thread writer_;
    std::thread syncer_;
    std::thread indexer_;

    mutable std::mutex mutex_;
    std::condition_variable wake_;        // the writer: records queued, or stop
    std::condition_variable sync_wake_;   // the syncer: a commit to make durable, or stop
    std::condition_variable index_wake_;  // the indexer: records to index, or stop
    std::deque<std::unique_ptr<Job>> queued_;
    size_t queued_records_ = 0;
    std::deque<std::unique_ptr<Job>> awaiting_;  // committed, waiting to be durable
    uint64_t durable_commits_ = 0;               // store commits 1..n are durable
    uint64_t sync_target_ = 0;  // the syncer flushes until commits 1..n are durable
    std::deque<std::unique_ptr<Job>> done_;
    bool stopping_ = false;
    bool syncer_stopping_ = false;
    bool indexer_stopping_ = false;
    AuditCounters counters_;
    std::atomic<uint64_t> last_seq_{0};
    uint64_t event_counter_ = 0;
};

}  // namespace ehrgate::policyd
