#include "audit_log.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ehrgate/json_text.hpp"
#include "ehrgate/msgpack.hpp"
#include "log.hpp"

namespace ehrgate::policyd {

namespace {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

void put_be64(char *out, uint64_t v) {
    for (int i = 0; i < 8; ++i) {
        out[i] = static_cast<char>(v >> (8 * (7 - i)));
    }
}

std::string be64(uint64_t v) {
    std::string out(8, '\0');
    put_be64(out.data(), v);
    return out;
}

uint64_t read_be64(std::string_view bytes) {
    uint64_t v = 0;
    for (size_t i = 0; i < 8 && i < bytes.size(); ++i) {
        v = (v << 8) | static_cast<uint8_t>(bytes[i]);
    }
    return v;
}

// Signed times sort correctly as unsigned big-endian once the sign bit is flipped.
uint64_t time_bits(int64_t time_us) {
    return static_cast<uint64_t>(time_us) ^ (uint64_t{1} << 63);
}

int64_t time_from_bits(uint64_t bits) {
    return static_cast<int64_t>(bits ^ (uint64_t{1} << 63));
}

// time key: flipped be64 time_us || be64 seq.
void put_time_key(char *out, int64_t time_us, uint64_t seq) {
    put_be64(out, time_bits(time_us));
    put_be64(out + 8, seq);
}

// LMDB keys have at most 511 bytes (one of them a search key's tag). A longer value is keyed by
// its first 400 bytes and its SHA-256: still one key per value (record ids must not collide),
// and search builds the same key. Shorter ones are keyed as they are, as ids always were.
constexpr size_t kMaxKeyedValue = 510;
constexpr size_t kHashedValuePrefix = 400;

void append_key_value(std::string &out, std::string_view value) {
    if (value.size() <= kMaxKeyedValue) {
        out.append(value);
    } else {
        out.append(value.substr(0, kHashedValuePrefix));
        out.append(audit::sha256(value));
    }
}

// Key of the ids database.
void id_key(std::string &out, std::string_view record_id) {
    out.clear();
    append_key_value(out, record_id);
}

// Tags of the search database's keys.
enum class SearchTag : char {
    Patient = 'p',
    Client = 'c',
    User = 'u',
    Correlation = 'r',
};

constexpr SearchTag kSearchTags[] = {SearchTag::Patient, SearchTag::Client, SearchTag::User,
                                     SearchTag::Correlation};

void search_key(std::string &out, SearchTag tag, std::string_view value) {
    out.clear();
    out.push_back(static_cast<char>(tag));
    append_key_value(out, value);
}

constexpr char kIndexedThroughKey[] = "indexed_through";

MDB_val as_val(std::string_view bytes) {
    return MDB_val{bytes.size(), const_cast<char *>(bytes.data())};
}

std::string_view as_view(const MDB_val &v) {
    return {static_cast<const char *>(v.mv_data), v.mv_size};
}

// A transaction that aborts unless committed.
class Txn {
  public:
    Txn(MDB_env *env, bool read_only) {
        rc_ = mdb_txn_begin(env, nullptr, read_only ? MDB_RDONLY : 0, &txn_);
        if (rc_ != MDB_SUCCESS) {
            txn_ = nullptr;
        }
    }
    ~Txn() {
        if (txn_ != nullptr) {
            mdb_txn_abort(txn_);
        }
    }
    int begin_rc() const { return rc_; }
    MDB_txn *get() { return txn_; }
    int commit() {
        const int rc = mdb_txn_commit(txn_);
        txn_ = nullptr;
        return rc;
    }

  private:
    MDB_txn *txn_ = nullptr;
    int rc_ = MDB_SUCCESS;
};

class Cursor {
  public:
    Cursor(MDB_txn *txn, MDB_dbi dbi) { rc_ = mdb_cursor_open(txn, dbi, &cursor_); }
    ~Cursor() {
        if (rc_ == MDB_SUCCESS) {
            mdb_cursor_close(cursor_);
        }
    }
    int rc() const { return rc_; }
    MDB_cursor *get() { return cursor_; }

  private:
    MDB_cursor *cursor_ = nullptr;
    int rc_;
};

// The record a stored value holds, or nullopt when it is not one.
std::optional<audit::ChainedRecord> decode_stored(std::string_view value) {
    if (value.size() <= audit::kHashSize) {
        return std::nullopt;
    }
    return audit::canonical_decode(value.substr(audit::kHashSize));
}

// What the search indexes take from a stored record, read in place (views into the value).
struct IndexedFields {
    uint64_t seq = 0;
    int64_t time_us = 0;
    std::string_view client, user, correlation;
    size_t patients_begin = 0, patients_end = 0;  // in the caller's patient list
};

// Reads the indexed fields of a stored value; patients are appended to `patients`, each once.
// False when the value does not parse (tampering: verify reports it; it has no index entries).
// The canonical order puts all of them among the first keys: reading stops once they are read.
bool read_indexed_fields(std::string_view value, IndexedFields &out,
                         std::vector<std::string_view> &patients) {
    if (value.size() <= audit::kHashSize) {
        return false;
    }
    msgpack::Reader r(value.substr(audit::kHashSize));
    const std::optional<uint32_t> count = r.read_map();
    out.patients_begin = out.patients_end = patients.size();
    enum : unsigned { kTime = 1, kClient = 2, kUser = 4, kCorrelation = 8, kPatients = 16 };
    unsigned seen = 0;
    for (uint32_t i = 0; count && i < *count && r.ok() && seen != 31; ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return false;
        }
        auto str = [&](std::string_view &field, unsigned bit) {
            field = r.read_str().value_or("");
            seen |= bit;
        };
        if (*key == "time_us") {
            out.time_us = r.read_int().value_or(0);
            seen |= kTime;
        } else if (*key == "client_id") {
            str(out.client, kClient);
        } else if (*key == "user") {
            str(out.user, kUser);
        } else if (*key == "correlation_id") {
            str(out.correlation, kCorrelation);
        } else if (*key == "patient_ids") {
            const std::optional<uint32_t> n = r.read_array();
            for (uint32_t j = 0; n && j < *n && r.ok(); ++j) {
                const std::string_view patient = r.read_str().value_or("");
                if (!patient.empty() && std::find(patients.begin() + out.patients_begin,
                                                  patients.end(), patient) == patients.end()) {
                    patients.push_back(patient);
                }
            }
            out.patients_end = patients.size();
            seen |= kPatients;
        } else {
            r.skip();
        }
    }
    return count.has_value() && r.ok() && seen == 31;
}

// The search values of one tag that a record has.
template <typename Visit>
int for_each_value(SearchTag tag, const IndexedFields &record,
                   const std::vector<std::string_view> &patients, Visit &&visit) {
    auto one = [&](std::string_view value) { return value.empty() ? MDB_SUCCESS : visit(value); };
    switch (tag) {
        case SearchTag::Patient:
            for (size_t i = record.patients_begin; i < record.patients_end; ++i) {
                if (const int rc = visit(patients[i]); rc != MDB_SUCCESS) {
                    return rc;
                }
            }
            return MDB_SUCCESS;
        case SearchTag::Client:
            return one(record.client);
        case SearchTag::User:
            return one(record.user);
        case SearchTag::Correlation:
            return one(record.correlation);
    }
    return MDB_SUCCESS;
}

int read_indexed_through(MDB_txn *txn, MDB_dbi state, uint64_t *seq) {
    MDB_val k{sizeof kIndexedThroughKey - 1, const_cast<char *>(kIndexedThroughKey)}, v{};
    const int rc = mdb_get(txn, state, &k, &v);
    *seq = rc == MDB_SUCCESS && v.mv_size == 8 ? read_be64(as_view(v)) : 0;
    return rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
}

int write_indexed_through(MDB_txn *txn, MDB_dbi state, uint64_t seq) {
    char mark[8];
    put_be64(mark, seq);
    MDB_val k{sizeof kIndexedThroughKey - 1, const_cast<char *>(kIndexedThroughKey)},
        v{sizeof mark, mark};
    return mdb_put(txn, state, &k, &v, 0);
}

int put_time_entry(MDB_cursor *cursor, int64_t time_us, uint64_t seq,
                   std::optional<int64_t> &last_time_us) {
    char key[16];
    put_time_key(key, time_us, seq);
    MDB_val kv{sizeof key, key}, vv{};
    // Times nearly always grow with seq: then the key goes at the end (MDB_APPEND, no search).
    const bool at_end = !last_time_us || time_us >= *last_time_us;
    int rc = mdb_cursor_put(cursor, &kv, &vv, at_end ? MDB_APPEND : 0);
    if (rc == MDB_KEYEXIST && at_end) {
        // Not after the last key after all (entries of records lost in a crash, see open()):
        // an ordinary insert is right either way.
        rc = mdb_cursor_put(cursor, &kv, &vv, 0);
    }
    if (rc == MDB_SUCCESS && at_end) {
        last_time_us = time_us;
    }
    return rc;
}

std::unique_ptr<MDB_env, decltype(&mdb_env_close)> open_env(const std::string &directory,
                                                            size_t map_size, unsigned max_dbs,
                                                            bool read_only, int *rc) {
    MDB_env *env = nullptr;
    *rc = mdb_env_create(&env);
    std::unique_ptr<MDB_env, decltype(&mdb_env_close)> owned(*rc == MDB_SUCCESS ? env : nullptr,
                                                             mdb_env_close);
    if (*rc == MDB_SUCCESS && !read_only)
        *rc = mdb_env_set_mapsize(env, map_size);
    if (*rc == MDB_SUCCESS)
        *rc = mdb_env_set_maxdbs(env, max_dbs);
    // Never MDB_NOSYNC: every commit flushes its data pages before it writes the meta page that
    // makes them the database, so a crash can only ever leave the last commit or the one
    // before. MDB_NOMETASYNC leaves that meta page to the next flush; append() says when one
    // follows (Durability), and nothing is acknowledged before it has (see docs/audit.md).
    if (*rc == MDB_SUCCESS)
        *rc = mdb_env_open(env, directory.c_str(),
                           MDB_NOTLS | MDB_NOMETASYNC | (read_only ? MDB_RDONLY : 0), 0600);
    if (*rc == MDB_SUCCESS) {
        int stale = 0;
        mdb_reader_check(env, &stale);
    }
    return owned;
}

}  // namespace

// ---- AuditStore ------------------------------------------------------------------------------

std::unique_ptr<AuditStore> AuditStore::open(const Options &options, StoreError *error) {
    if (!options.read_only && ::mkdir(options.directory.c_str(), 0700) != 0 && errno != EEXIST) {
        translate_lmdb_error(errno, error);
        return nullptr;
    }
    int rc = MDB_SUCCESS;
    auto env = open_env(options.directory, options.map_size_bytes, 8, options.read_only, &rc);
    if (rc != MDB_SUCCESS) {
        translate_lmdb_error(rc, error);
        return nullptr;
    }
    std::unique_ptr<AuditStore> store(new AuditStore(env.release(), options.read_only));
    if (store->open_databases(error) != StoreStatus::Ok ||
        store->load_head(error) != StoreStatus::Ok) {
        return nullptr;
    }
    if (!options.read_only) {
        // The last commit of a process that was killed may still wait for its meta page's
        // flush; a redelivered record found in it is acknowledged as durable, so flush now.
        rc = mdb_env_sync(store->env_, 1);
        if (rc != MDB_SUCCESS) {
            translate_lmdb_error(rc, error);
            return nullptr;
        }
    }
    // The indexes are derived data: one that cannot be opened is started over (or, read-only,
    // done without: search scans), never a reason to refuse the log itself.
    StoreError index_error;
    if (store->open_index(options, &index_error) != StoreStatus::Ok && !options.read_only) {
        std::error_code ignored;
        std::filesystem::remove_all(options.directory + "/index", ignored);
        store->open_index(options, &index_error);
    }
    return store;
}

AuditStore::~AuditStore() {
    if (index_env_ != nullptr) {
        mdb_env_close(index_env_);
    }
    mdb_env_close(env_);
}

StoreStatus AuditStore::open_databases(StoreError *error) {
    Txn txn(env_, read_only_);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    const unsigned create = read_only_ ? 0 : MDB_CREATE;
    const struct {
        const char *name;
        MDB_dbi *dbi;
    } dbs[] = {{"records", &records_}, {"checkpoints", &checkpoints_}, {"ids", &ids_}};
    for (const auto &db : dbs) {
        const int rc = mdb_dbi_open(txn.get(), db.name, create, db.dbi);
        if (rc == MDB_NOTFOUND && read_only_) {
            return StoreStatus::Ok;  // nothing was ever written: an empty log
        }
        if (rc != MDB_SUCCESS) {
            return translate_lmdb_error(rc, error);
        }
    }
    if (!read_only_) {
        // The search indexes of the layout before the index environment: rebuilt there.
        for (const char *name :
             {"idx_patient", "idx_client", "idx_user", "idx_correlation", "idx_time"}) {
            MDB_dbi dbi{};
            int rc = mdb_dbi_open(txn.get(), name, 0, &dbi);
            if (rc == MDB_SUCCESS) {
                rc = mdb_drop(txn.get(), dbi, 1);
            }
            if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
                return translate_lmdb_error(rc, error);
            }
        }
    }
    const int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    have_databases_ = true;
    return StoreStatus::Ok;
}

StoreStatus AuditStore::open_index(const Options &options, StoreError *error) {
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    const std::string directory = options.directory + "/index";
    if (options.read_only) {
        struct stat st {};
        if (::stat((directory + "/data.mdb").c_str(), &st) != 0) {
            return StoreStatus::Ok;  // never indexed: search scans
        }
    } else if (::mkdir(directory.c_str(), 0700) != 0 && errno != EEXIST) {
        return translate_lmdb_error(errno, error);
    }
    int rc = MDB_SUCCESS;
    auto env = open_env(directory, options.map_size_bytes, 4, options.read_only, &rc);
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    Txn txn(env.get(), options.read_only);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    const unsigned create = options.read_only ? 0 : MDB_CREATE;
    rc = mdb_dbi_open(txn.get(), "search", create | MDB_DUPSORT | MDB_DUPFIXED, &search_);
    if (rc == MDB_SUCCESS)
        rc = mdb_dbi_open(txn.get(), "time", create, &time_);
    if (rc == MDB_SUCCESS)
        rc = mdb_dbi_open(txn.get(), "state", create, &state_);
    if (rc == MDB_NOTFOUND && options.read_only) {
        return StoreStatus::Ok;
    }
    uint64_t indexed_through = 0;
    if (rc == MDB_SUCCESS)
        rc = read_indexed_through(txn.get(), state_, &indexed_through);
    if (rc == MDB_SUCCESS && indexed_through > last_seq_ && !options.read_only) {
        // The index ran ahead of what survived a crash (a commit whose meta page was not yet
        // flushed). Entries of the lost records stay (search checks every candidate against
        // its record); the records that take their seqs are indexed again from here.
        indexed_through = last_seq_;
        rc = write_indexed_through(txn.get(), state_, indexed_through);
    }
    if (rc == MDB_SUCCESS) {
        MDB_val k{}, v{};
        Cursor cursor(txn.get(), time_);
        rc = cursor.rc();
        if (rc == MDB_SUCCESS) {
            rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_LAST);
            if (rc == MDB_SUCCESS && k.mv_size == 16) {
                last_time_us_ = time_from_bits(read_be64(as_view(k)));
            }
            rc = rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
        }
    }
    if (rc == MDB_SUCCESS)
        rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    indexed_through_ = indexed_through;
    index_env_ = env.release();
    return StoreStatus::Ok;
}

StoreStatus AuditStore::load_head(StoreError *error) {
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    MDB_val k{}, v{};
    {
        Cursor cursor(txn.get(), records_);
        if (cursor.rc() != MDB_SUCCESS) {
            return translate_lmdb_error(cursor.rc(), error);
        }
        const int rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_LAST);
        if (rc == MDB_SUCCESS) {
            if (k.mv_size != 8 || v.mv_size < audit::kHashSize) {
                if (error != nullptr) {
                    error->status = StoreStatus::Corrupted;
                    error->detail = "last audit record is malformed";
                }
                return StoreStatus::Corrupted;
            }
            last_seq_ = read_be64(as_view(k));
            last_hash_.assign(static_cast<const char *>(v.mv_data), audit::kHashSize);
        } else if (rc != MDB_NOTFOUND) {
            return translate_lmdb_error(rc, error);
        }
    }
    {
        Cursor cursor(txn.get(), checkpoints_);
        if (cursor.rc() != MDB_SUCCESS) {
            return translate_lmdb_error(cursor.rc(), error);
        }
        const int rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_LAST);
        if (rc == MDB_SUCCESS) {
            last_checkpoint_seq_ = read_be64(as_view(k));
        } else if (rc != MDB_NOTFOUND) {
            return translate_lmdb_error(rc, error);
        }
    }
    return StoreStatus::Ok;
}

StoreStatus AuditStore::put_checkpoint(MDB_txn *txn, const audit::SigningKey &key, uint64_t seq,
                                       const std::string &hash, int64_t now, StoreError *error) {
    audit::Checkpoint c{seq, hash, now, "", ""};
    audit::sign_checkpoint(key, c);
    if (c.signature.size() != audit::kSignatureSize) {
        if (error != nullptr) {
            error->status = StoreStatus::Invalid;
            error->detail = "signing the checkpoint failed";
        }
        return StoreStatus::Invalid;
    }
    const std::string k = be64(seq);
    const std::string value = audit::encode_checkpoint(c);
    MDB_val kv = as_val(k), vv = as_val(value);
    const int rc = mdb_put(txn, checkpoints_, &kv, &vv, 0);
    return rc == MDB_SUCCESS ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::append(const std::vector<const audit::Record *> &records,
                               const audit::SigningKey *key, bool checkpoint, int64_t now,
                               std::vector<Appended> &out, StoreError *error,
                               Durability durability) {
    out.clear();
    if (read_only_ || !have_databases_) {
        return translate_lmdb_error(EACCES, error);
    }
    out.reserve(records.size());
    Txn txn(env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    uint64_t seq = last_seq_;
    char hash[audit::kHashSize];
    std::memcpy(hash, last_hash_.data(), audit::kHashSize);
    auto fail = [&](int rc) {
        out.clear();
        return translate_lmdb_error(rc, error);
    };
    {
        // Cursors kept for the whole batch: the records go at the end, and record ids from one
        // writer land next to the cursor's last position.
        Cursor ids(txn.get(), ids_), values(txn.get(), records_);
        for (const Cursor *c : {&ids, &values}) {
            if (c->rc() != MDB_SUCCESS) {
                return fail(c->rc());
            }
        }
        for (const audit::Record *record : records) {
            char seq_key[8];
            put_be64(seq_key, seq + 1);
            if (!record->record_id.empty()) {
                // Deduplication and the id index in one B-tree descent: NOOVERWRITE reports an id
                // already stored, with the seq it was stored under.
                id_key(key_, record->record_id);
                MDB_val kv = as_val(key_), vv{sizeof seq_key, seq_key};
                const int rc = mdb_cursor_put(ids.get(), &kv, &vv, MDB_NOOVERWRITE);
                if (rc == MDB_KEYEXIST) {
                    out.push_back({read_be64(as_view(vv)), true});
                    continue;
                }
                if (rc != MDB_SUCCESS) {
                    return fail(rc);
                }
            }
            ++seq;
            encoded_.clear();
            audit::canonical_encode_into(encoded_, seq, *record);
            if (!hasher_.hash({hash, sizeof hash}, encoded_, hash)) {
                return fail(ENOMEM);
            }
            // MDB_APPEND: keys only grow; LMDB checks it and fills pages completely. MDB_RESERVE:
            // the value is written in place rather than copied from a temporary.
            MDB_val kv{sizeof seq_key, seq_key}, vv{audit::kHashSize + encoded_.size(), nullptr};
            const int rc = mdb_cursor_put(values.get(), &kv, &vv, MDB_APPEND | MDB_RESERVE);
            if (rc != MDB_SUCCESS) {
                return fail(rc);
            }
            auto *value = static_cast<char *>(vv.mv_data);
            std::memcpy(value, hash, audit::kHashSize);
            std::memcpy(value + audit::kHashSize, encoded_.data(), encoded_.size());
            out.push_back({seq, false});
        }
    }
    const bool write_checkpoint = key != nullptr && checkpoint && seq > last_checkpoint_seq_;
    const std::string head_hash(hash, sizeof hash);
    if (write_checkpoint) {
        const StoreStatus status = put_checkpoint(txn.get(), *key, seq, head_hash, now, error);
        if (status != StoreStatus::Ok) {
            out.clear();
            return status;
        }
    }
    // Only a transaction that changed something reaches the disk (LMDB skips empty commits).
    const bool writes = seq > last_seq_ || write_checkpoint;
    int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return fail(rc);
    }
    last_seq_ = seq;
    last_hash_ = head_hash;
    if (write_checkpoint) {
        last_checkpoint_seq_ = seq;
    }
    if (writes) {
        ++commits_;
    }
    if (durability == Durability::Synced) {
        // Also when nothing was written: the duplicates' first copies may sit in a commit
        // whose meta page is not flushed yet.
        rc = mdb_env_sync(env_, 1);
        if (rc != MDB_SUCCESS) {
            return fail(rc);
        }
    }
    return StoreStatus::Ok;
}

StoreStatus AuditStore::checkpoint(const audit::SigningKey &key, int64_t now, StoreError *error) {
    if (last_seq_ == 0 || last_seq_ <= last_checkpoint_seq_) {
        return StoreStatus::Ok;
    }
    Txn txn(env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    const StoreStatus status = put_checkpoint(txn.get(), key, last_seq_, last_hash_, now, error);
    if (status != StoreStatus::Ok) {
        return status;
    }
    int rc = txn.commit();
    if (rc == MDB_SUCCESS) {
        ++commits_;
        last_checkpoint_seq_ = last_seq_;
        rc = mdb_env_sync(env_, 1);
    }
    return rc == MDB_SUCCESS ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::sync(StoreError *error) {
    const int rc = mdb_env_sync(env_, 1);
    return rc == MDB_SUCCESS ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::index_records(uint64_t through, uint64_t *indexed, StoreError *error) {
    *indexed = 0;
    const uint64_t from = indexed_through_.load() + 1;
    if (index_env_ == nullptr || read_only_ || through < from) {
        return StoreStatus::Ok;
    }
    // The records, read in place from a snapshot of the records environment: the writer goes on
    // committing meanwhile (LMDB readers never wait for the writer, nor it for them).
    Txn records(env_, true);
    if (records.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(records.begin_rc(), error);
    }
    std::vector<IndexedFields> pending;
    std::vector<std::string_view> patients;
    pending.reserve(through - from + 1);
    int rc;
    {
        Cursor values(records.get(), records_);
        if (values.rc() != MDB_SUCCESS) {
            return translate_lmdb_error(values.rc(), error);
        }
        char start[8];
        put_be64(start, from);
        MDB_val k{sizeof start, start}, v{};
        for (rc = mdb_cursor_get(values.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
             rc = mdb_cursor_get(values.get(), &k, &v, MDB_NEXT)) {
            const uint64_t seq = k.mv_size == 8 ? read_be64(as_view(k)) : UINT64_MAX;
            if (seq > through) {
                break;
            }
            IndexedFields fields;
            fields.seq = seq;
            if (read_indexed_fields(as_view(v), fields, patients)) {
                pending.push_back(fields);
            }
        }
        if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
            return translate_lmdb_error(rc, error);
        }
    }
    Txn txn(index_env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    std::optional<int64_t> last_time_us = last_time_us_;
    {
        Cursor search(txn.get(), search_), times(txn.get(), time_);
        rc = search.rc() != MDB_SUCCESS ? search.rc() : times.rc();
        // Successive records with the same value (one client's, one user's) make a run: its
        // seqs go in with one MDB_MULTIPLE put.
        std::string run_seqs;
        auto put_run = [&](std::string_view key) -> int {
            const size_t count = run_seqs.size() / 8;
            MDB_val kv = as_val(key);
            MDB_val data[2] = {{8, run_seqs.data()}, {count, nullptr}};
            // Seqs only grow, so these go after the key's other duplicates: APPENDDUP puts
            // them there without searching them.
            int put = mdb_cursor_put(search.get(), &kv, data, MDB_MULTIPLE | MDB_APPENDDUP);
            // KEYEXIST: one of them is not the largest after all (entries of records lost in
            // a crash, see open()). From there one by one, with an ordinary insert, which finds
            // the pair when it is there already.
            for (size_t i = put == MDB_KEYEXIST ? data[1].mv_size : count; i < count; ++i) {
                MDB_val one{8, run_seqs.data() + 8 * i};
                put = mdb_cursor_put(search.get(), &kv, &one, MDB_NODUPDATA);
                if (put != MDB_SUCCESS && put != MDB_KEYEXIST) {
                    break;
                }
                put = MDB_SUCCESS;
            }
            run_seqs.clear();
            return put;
        };
        // The keys first, every tag's laid out one after the other in one pass over the records
        // (whose values are spread over their pages); then one tag at a time through one cursor:
        // successive keys are often on the page the cursor is on, which LMDB finds without
        // descending from the root.
        constexpr size_t kTags = std::size(kSearchTags);
        std::string keys[kTags];
        std::vector<std::pair<size_t, uint64_t>> entries[kTags];  // key's end in keys[t], seq
        for (const IndexedFields &record : pending) {
            for (size_t t = 0; t < kTags; ++t) {
                for_each_value(kSearchTags[t], record, patients, [&](std::string_view value) {
                    search_key(index_key_, kSearchTags[t], value);
                    keys[t].append(index_key_);
                    entries[t].emplace_back(keys[t].size(), record.seq);
                    return MDB_SUCCESS;
                });
            }
        }
        for (size_t t = 0; t < kTags && rc == MDB_SUCCESS; ++t) {
            std::string_view run_key;
            size_t start = 0;
            for (const auto &[end, seq] : entries[t]) {
                const std::string_view key(keys[t].data() + start, end - start);
                start = end;
                if (!run_seqs.empty() && key != run_key) {
                    rc = put_run(run_key);
                    if (rc != MDB_SUCCESS) {
                        break;
                    }
                }
                run_key = key;
                char seq_bytes[8];
                put_be64(seq_bytes, seq);
                run_seqs.append(seq_bytes, sizeof seq_bytes);
            }
            if (rc == MDB_SUCCESS && !run_seqs.empty()) {
                rc = put_run(run_key);
            }
            run_seqs.clear();
        }
        for (const IndexedFields &record : pending) {
            if (rc == MDB_SUCCESS) {
                rc = put_time_entry(times.get(), record.time_us, record.seq, last_time_us);
            }
        }
    }
    // Every record through `through` was committed before the snapshot: all seen (or purged).
    if (rc == MDB_SUCCESS)
        rc = write_indexed_through(txn.get(), state_, through);
    // Not synced, nor ever waited for: a crash loses at most what the next start indexes again.
    if (rc == MDB_SUCCESS)
        rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    *indexed = through - (from - 1);
    indexed_through_ = through;
    last_time_us_ = last_time_us;
    return StoreStatus::Ok;
}

StoreStatus AuditStore::scan_records(const std::function<bool(uint64_t, std::string_view)> &visit,
                                     StoreError *error) {
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    Cursor cursor(txn.get(), records_);
    if (cursor.rc() != MDB_SUCCESS) {
        return translate_lmdb_error(cursor.rc(), error);
    }
    MDB_val k{}, v{};
    int rc;
    for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
        // A key that is not 8 bytes is tampering too; report it as an impossible seq.
        const uint64_t seq = k.mv_size == 8 ? read_be64(as_view(k)) : UINT64_MAX;
        if (!visit(seq, as_view(v))) {
            return StoreStatus::Ok;
        }
    }
    return rc == MDB_NOTFOUND ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::scan_after(uint64_t after_seq,
                                   const std::function<bool(uint64_t, std::string_view)> &visit,
                                   StoreError *error) {
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    Cursor cursor(txn.get(), records_);
    if (cursor.rc() != MDB_SUCCESS) {
        return translate_lmdb_error(cursor.rc(), error);
    }
    const std::string start = be64(after_seq + 1);
    MDB_val k = as_val(start), v{};
    int rc;
    for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
        if (k.mv_size != 8 || !visit(read_be64(as_view(k)), as_view(v))) {
            return StoreStatus::Ok;
        }
    }
    return rc == MDB_NOTFOUND ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::checkpoints(std::vector<audit::Checkpoint> &out, StoreError *error) {
    out.clear();
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    Cursor cursor(txn.get(), checkpoints_);
    if (cursor.rc() != MDB_SUCCESS) {
        return translate_lmdb_error(cursor.rc(), error);
    }
    MDB_val k{}, v{};
    int rc;
    for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
        std::optional<audit::Checkpoint> c = audit::decode_checkpoint(as_view(v));
        if (!c || k.mv_size != 8 || read_be64(as_view(k)) != c->seq) {
            // Undecodable or misfiled: keep it with an empty signature so verify reports it.
            audit::Checkpoint bad;
            bad.seq = k.mv_size == 8 ? read_be64(as_view(k)) : 0;
            out.push_back(bad);
            continue;
        }
        out.push_back(std::move(*c));
    }
    return rc == MDB_NOTFOUND ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::search(const Query &query,
                               const std::function<bool(const audit::ChainedRecord &)> &visit,
                               StoreError *error) {
    if (!have_databases_) {
        return StoreStatus::Ok;
    }
    // The indexes cover the records up to indexed_through: those come from the most selective
    // index given (a patient, a request, a user, a client, then time), the records after it
    // from a scan. Without an index, everything is scanned. The index is read first: every
    // record it covers was committed before, so the records snapshot taken next has them.
    uint64_t indexed_through = 0;
    std::optional<std::vector<uint64_t>> seqs;
    if (index_env_ != nullptr) {
        Txn txn(index_env_, true);
        if (txn.begin_rc() != MDB_SUCCESS) {
            return translate_lmdb_error(txn.begin_rc(), error);
        }
        int rc = read_indexed_through(txn.get(), state_, &indexed_through);
        auto by_value = [&](SearchTag tag, std::string_view value) -> int {
            std::string key;
            search_key(key, tag, value);
            Cursor cursor(txn.get(), search_);
            if (cursor.rc() != MDB_SUCCESS) {
                return cursor.rc();
            }
            seqs.emplace();
            MDB_val k = as_val(key), v{};
            int rc;
            for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_KEY); rc == MDB_SUCCESS;
                 rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT_DUP)) {
                if (v.mv_size == 8) {
                    seqs->push_back(read_be64(as_view(v)));
                }
            }
            return rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
        };
        if (rc != MDB_SUCCESS || indexed_through == 0) {
        } else if (!query.patient.empty()) {
            rc = by_value(SearchTag::Patient, query.patient);
        } else if (!query.correlation_id.empty()) {
            rc = by_value(SearchTag::Correlation, query.correlation_id);
        } else if (!query.user.empty()) {
            rc = by_value(SearchTag::User, query.user);
        } else if (!query.client.empty()) {
            rc = by_value(SearchTag::Client, query.client);
        } else if (query.since_us || query.until_us) {
            Cursor cursor(txn.get(), time_);
            rc = cursor.rc();
            if (rc == MDB_SUCCESS) {
                seqs.emplace();
                const std::string start = be64(time_bits(query.since_us.value_or(INT64_MIN)));
                MDB_val k = as_val(start), v{};
                for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
                     rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
                    const std::string_view key = as_view(k);
                    if (key.size() != 16) {
                        continue;
                    }
                    if (query.until_us && time_from_bits(read_be64(key)) > *query.until_us) {
                        break;
                    }
                    seqs->push_back(read_be64(key.substr(8)));
                }
                std::sort(seqs->begin(), seqs->end());
                rc = rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
            }
        }
        if (rc != MDB_SUCCESS) {
            return translate_lmdb_error(rc, error);
        }
    }
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    auto matches = [&](const audit::Record &r) {
        if (!query.patient.empty() && std::find(r.patient_ids.begin(), r.patient_ids.end(),
                                                query.patient) == r.patient_ids.end())
            return false;
        if (!query.client.empty() && r.client_id != query.client)
            return false;
        if (!query.user.empty() && r.user != query.user)
            return false;
        if (!query.correlation_id.empty() && r.correlation_id != query.correlation_id)
            return false;
        if (query.since_us && r.time_us < *query.since_us)
            return false;
        if (query.until_us && r.time_us > *query.until_us)
            return false;
        return true;
    };
    auto emit = [&](std::string_view value) {
        std::optional<audit::ChainedRecord> entry = decode_stored(value);
        // Search reports what is stored; whether it is genuine is `audit verify`'s question.
        return !entry || !matches(entry->record) || visit(*entry);
    };
    int rc;
    uint64_t scan_from = 1;
    if (seqs) {
        // Index hits first (all at or before indexed_through), then the scan after it: seq
        // order throughout.
        for (const uint64_t seq : *seqs) {
            if (seq > indexed_through) {
                continue;  // the scan below covers it
            }
            const std::string k = be64(seq);
            MDB_val kv = as_val(k), vv{};
            rc = mdb_get(txn.get(), records_, &kv, &vv);
            if (rc == MDB_NOTFOUND) {
                continue;  // purged, or an index entry left by tampering or a crash
            }
            if (rc != MDB_SUCCESS) {
                return translate_lmdb_error(rc, error);
            }
            if (!emit(as_view(vv))) {
                return StoreStatus::Ok;
            }
        }
        scan_from = indexed_through + 1;
    }
    Cursor cursor(txn.get(), records_);
    if (cursor.rc() != MDB_SUCCESS) {
        return translate_lmdb_error(cursor.rc(), error);
    }
    const std::string start = be64(scan_from);
    MDB_val k = as_val(start), v{};
    for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
        if (!emit(as_view(v))) {
            return StoreStatus::Ok;
        }
    }
    return rc == MDB_NOTFOUND ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

StoreStatus AuditStore::purge_before(int64_t before_us, uint64_t *removed, StoreError *error) {
    *removed = 0;
    if (read_only_ || !have_databases_) {
        return translate_lmdb_error(EACCES, error);
    }
    Txn txn(env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    // Find the newest checkpointed seq whose records (and all before it) are older than the
    // cutoff: everything up to it can go, and its checkpoint anchors what remains.
    uint64_t anchor = 0;
    {
        Cursor cursor(txn.get(), records_);
        if (cursor.rc() != MDB_SUCCESS) {
            return translate_lmdb_error(cursor.rc(), error);
        }
        MDB_val k{}, v{};
        int rc;
        for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
             rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
            std::optional<audit::ChainedRecord> e = decode_stored(as_view(v));
            if (!e || e->record.time_us >= before_us) {
                break;
            }
            // Never the newest record: at least one stays after the anchor, so a checkpoint
            // beyond the last record still means records were cut from the end.
            MDB_val ck = k, cv{};
            if (e->seq < last_seq_ && mdb_get(txn.get(), checkpoints_, &ck, &cv) == MDB_SUCCESS) {
                anchor = e->seq;
            }
        }
        if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
            return translate_lmdb_error(rc, error);
        }
    }
    if (anchor == 0) {
        return StoreStatus::Ok;
    }
    auto del = [&](MDB_dbi dbi, std::string_view key) {
        MDB_val kv = as_val(key);
        const int rc = mdb_del(txn.get(), dbi, &kv, nullptr);
        return rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
    };
    std::vector<audit::Record> purged;
    std::vector<uint64_t> purged_seqs;
    std::string key;
    for (;;) {
        MDB_val k{}, v{};
        std::optional<audit::ChainedRecord> e;
        {
            Cursor cursor(txn.get(), records_);
            int rc = cursor.rc() == MDB_SUCCESS ? mdb_cursor_get(cursor.get(), &k, &v, MDB_FIRST)
                                                : cursor.rc();
            if (rc == MDB_NOTFOUND) {
                break;
            }
            if (rc != MDB_SUCCESS) {
                return translate_lmdb_error(rc, error);
            }
            if (read_be64(as_view(k)) > anchor) {
                break;
            }
            e = decode_stored(as_view(v));
        }
        const uint64_t seq = read_be64(as_view(k));
        const std::string seq_key = be64(seq);
        int rc = del(records_, seq_key);
        if (rc == MDB_SUCCESS && e && !e->record.record_id.empty()) {
            id_key(key, e->record.record_id);
            rc = del(ids_, key);
        }
        if (rc == MDB_SUCCESS && seq < anchor) {
            rc = del(checkpoints_, seq_key);
        }
        if (rc != MDB_SUCCESS) {
            return translate_lmdb_error(rc, error);
        }
        if (e) {
            purged.push_back(std::move(e->record));
            purged_seqs.push_back(seq);
        }
        ++*removed;
    }
    int rc = txn.commit();
    if (rc == MDB_SUCCESS) {
        rc = mdb_env_sync(env_, 1);
    }
    if (rc != MDB_SUCCESS) {
        *removed = 0;
        return translate_lmdb_error(rc, error);
    }
    // Then their search entries: if this is cut short, what is left points at records that are
    // gone, which search skips.
    return unindex(purged, purged_seqs, error);
}

StoreStatus AuditStore::unindex(const std::vector<audit::Record> &records,
                                const std::vector<uint64_t> &seqs, StoreError *error) {
    if (index_env_ == nullptr || records.empty()) {
        return StoreStatus::Ok;
    }
    Txn txn(index_env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    int rc = MDB_SUCCESS;
    std::string key;
    std::vector<std::string_view> patients;
    for (size_t i = 0; i < records.size() && rc == MDB_SUCCESS; ++i) {
        const audit::Record &r = records[i];
        IndexedFields fields;
        fields.seq = seqs[i];
        fields.time_us = r.time_us;
        fields.client = r.client_id;
        fields.user = r.user;
        fields.correlation = r.correlation_id;
        patients.assign(r.patient_ids.begin(), r.patient_ids.end());
        fields.patients_end = patients.size();
        char seq_bytes[8];
        put_be64(seq_bytes, seqs[i]);
        for (const SearchTag tag : kSearchTags) {
            if (rc == MDB_SUCCESS) {
                rc = for_each_value(tag, fields, patients, [&](std::string_view value) {
                    search_key(key, tag, value);
                    MDB_val kv = as_val(key), dv{sizeof seq_bytes, seq_bytes};
                    const int del = mdb_del(txn.get(), search_, &kv, &dv);
                    return del == MDB_NOTFOUND ? MDB_SUCCESS : del;
                });
            }
        }
        if (rc == MDB_SUCCESS) {
            char tk[16];
            put_time_key(tk, r.time_us, seqs[i]);
            MDB_val kv{sizeof tk, tk};
            rc = mdb_del(txn.get(), time_, &kv, nullptr);
            rc = rc == MDB_NOTFOUND ? MDB_SUCCESS : rc;
        }
    }
    if (rc == MDB_SUCCESS) {
        rc = txn.commit();
    }
    return rc == MDB_SUCCESS ? StoreStatus::Ok : translate_lmdb_error(rc, error);
}

// ---- signing key -----------------------------------------------------------------------------

std::unique_ptr<audit::SigningKey> load_or_create_signing_key(const std::string &data_dir,
                                                              std::string *problem) {
    const std::string key_path = data_dir + "/audit-signing.key";
    const std::string pub_path = data_dir + "/audit-signing.pub";
    std::unique_ptr<audit::SigningKey> key;
    if (std::ifstream in(key_path); in) {
        struct stat st {};
        if (::stat(key_path.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
            *problem = key_path + " is readable by others; expected mode 0600";
            return nullptr;
        }
        std::stringstream text;
        text << in.rdbuf();
        key = audit::SigningKey::from_private_pem(text.str());
        if (!key) {
            *problem = key_path + " is not an Ed25519 private key";
            return nullptr;
        }
    } else {
        key = audit::SigningKey::generate();
        const std::string pem = key ? key->private_pem() : std::string();
        // O_EXCL: never overwrite a key another process just created.
        const int fd = ::open(key_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (pem.empty() || fd < 0 ||
            ::write(fd, pem.data(), pem.size()) != static_cast<ssize_t>(pem.size()) ||
            ::fsync(fd) != 0) {
            *problem = "cannot create " + key_path + ": " + std::strerror(errno);
            if (fd >= 0) {
                ::close(fd);
            }
            return nullptr;
        }
        ::close(fd);
    }
    const std::string pub = audit::hex(key->public_raw()) + "\n";
    const std::string tmp = pub_path + ".tmp";
    std::ofstream out(tmp, std::ios::trunc);
    out << pub;
    out.close();
    if (!out || ::rename(tmp.c_str(), pub_path.c_str()) != 0) {
        *problem = "cannot write " + pub_path;
        return nullptr;
    }
    return key;
}

std::optional<std::string> read_public_key_hex(const std::string &path) {
    std::ifstream in(path);
    std::string text;
    if (!in || !(in >> text)) {
        return std::nullopt;
    }
    std::optional<std::string> raw = audit::unhex(text);
    if (!raw || raw->size() != audit::kPublicKeySize) {
        return std::nullopt;
    }
    return raw;
}

// ---- AuditLog --------------------------------------------------------------------------------

AuditLog::AuditLog(uv_loop_t *loop, AuditStore &store, const audit::SigningKey &key,
                   Options options)
    : loop_(loop), store_(store), key_(key), options_(options) {
    last_seq_ = store.last_seq();
}

AuditLog::~AuditLog() {
    // stop() must have run on the loop; a still-running writer here would touch freed memory.
    if (writer_.joinable()) {
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
        }
        wake_.notify_all();
        writer_.join();
    }
    if (indexer_.joinable()) {
        {
            std::lock_guard lock(mutex_);
            indexer_stopping_ = true;
        }
        index_wake_.notify_all();
        indexer_.join();
    }
    if (syncer_.joinable()) {
        {
            std::lock_guard lock(mutex_);
            syncer_stopping_ = true;
        }
        sync_wake_.notify_all();
        syncer_.join();
    }
}

void AuditLog::start() {
    if (started_) {
        return;
    }
    started_ = true;
    uv_async_init(loop_, &async_, on_async);
    async_.data = this;
    writer_ = std::thread([this] { writer_main(); });
    syncer_ = std::thread([this] { syncer_main(); });
    indexer_ = std::thread([this] { indexer_main(); });
}

void AuditLog::stop() {
    if (!started_ || stopped_) {
        return;
    }
    stopped_ = true;
    {
        std::lock_guard lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    writer_.join();  // everything it committed is durable and handed over when it returns
    {
        std::lock_guard lock(mutex_);
        indexer_stopping_ = true;
    }
    index_wake_.notify_all();
    indexer_.join();  // after indexing what the writer left: a stopped log is fully indexed
    {
        std::lock_guard lock(mutex_);
        syncer_stopping_ = true;
    }
    sync_wake_.notify_all();
    syncer_.join();
    deliver();
    uv_close(reinterpret_cast<uv_handle_t *>(&async_), nullptr);
}

void AuditLog::append(std::vector<audit::Record> records, Completion done) {
    auto job = std::make_unique<Job>();
    job->records = std::move(records);
    job->done = std::move(done);
    bool refused = false;
    const char *why = "audit writer queue is full";
    {
        std::lock_guard lock(mutex_);
        if (stopping_) {
            why = "policyd is stopping";
        }
        if (stopping_ || queued_records_ + job->records.size() > options_.max_queued_records) {
            refused = true;
            ++counters_.overloaded;
            counters_.failed_records += job->records.size();
        } else {
            queued_records_ += job->records.size();
            queued_.push_back(std::move(job));
        }
    }
    if (refused) {
        Result result;
        result.status = StoreStatus::Busy;
        result.detail = why;
        if (job->done) {
            job->done(result);
        }
        return;
    }
    wake_.notify_one();
}

void AuditLog::append_event(audit::Kind kind, std::string detail, std::string client_id,
                            std::vector<std::string> patient_ids,
                            std::vector<std::string> consent_ids) {
    audit::Record r;
    r.kind = kind;
    r.time_us = now_us();
    r.record_id = "policyd-" + std::to_string(::getpid()) + "-" + std::to_string(r.time_us) + "-" +
                  std::to_string(++event_counter_);
    r.decision = "permit";
    r.detail = std::move(detail);
    r.client_id = std::move(client_id);
    r.patient_ids = std::move(patient_ids);
    r.consent_ids = std::move(consent_ids);
    const std::string what = audit::kind_name(kind);
    append({std::move(r)}, [this, what](const Result &result) {
        if (result.status != StoreStatus::Ok) {
            {
                std::lock_guard lock(mutex_);
                ++counters_.event_failures;
            }
            log::error("audit: could not record " + what +
                       " event: " + store_status_name(result.status) + " (" + result.detail + ")");
        }
    });
}

void AuditLog::on_async(uv_async_t *handle) {
    static_cast<AuditLog *>(handle->data)->deliver();
}

void AuditLog::deliver() {
    std::deque<std::unique_ptr<Job>> done;
    {
        std::lock_guard lock(mutex_);
        done.swap(done_);
    }
    for (const std::unique_ptr<Job> &job : done) {
        if (job->done) {
            job->done(job->result);
        }
    }
}

bool AuditLog::release_durable() {
    bool moved = false;
    while (!awaiting_.empty() && awaiting_.front()->commit <= durable_commits_) {
        std::unique_ptr<Job> job = std::move(awaiting_.front());
        awaiting_.pop_front();
        for (const AuditStore::Appended &a : job->result.appended) {
            ++(a.duplicate ? counters_.duplicates : counters_.appended);
        }
        done_.push_back(std::move(job));
        moved = true;
    }
    return moved;
}

void AuditLog::fail_awaiting(StoreStatus status, const std::string &detail) {
    for (std::unique_ptr<Job> &job : awaiting_) {
        job->result.status = status;
        job->result.detail = detail;
        job->result.appended.clear();
        counters_.failed_records += job->record_count;
        done_.push_back(std::move(job));
    }
    awaiting_.clear();
    ++(status == StoreStatus::MapFull ? counters_.map_full
       : status == StoreStatus::Io    ? counters_.io_errors
                                      : counters_.other_errors);
    counters_.last_error = std::string("sync: ") + store_status_name(status) + ": " + detail;
}

void AuditLog::syncer_main() {
    std::unique_lock lock(mutex_);
    for (;;) {
        sync_wake_.wait(lock, [&] { return syncer_stopping_ || sync_target_ > durable_commits_; });
        if (sync_target_ <= durable_commits_) {
            return;  // stopping, and nothing left to flush
        }
        // Commits 1..target are complete (their meta pages written): one flush makes them
        // durable. Commits the writer completes meanwhile wait for the next round, or for their
        // successor's own flush.
        const uint64_t target = sync_target_;
        lock.unlock();
        StoreError error;
        const StoreStatus status = store_.sync(&error);
        lock.lock();
        if (status == StoreStatus::Ok) {
            durable_commits_ = std::max(durable_commits_, target);
            if (!release_durable()) {
                continue;
            }
        } else {
            // Whether those commits reached the disk is unknown: none of them is acknowledged.
            durable_commits_ = std::max(durable_commits_, target);
            fail_awaiting(status, error.detail);
        }
        uv_async_send(&async_);
    }
}

namespace {

// The indexer indexes once this many records are behind, or whatever is behind every second:
// entries of many records share pages, so fewer are written per record, and its commits' disk
// flushes, which delay the writer's on the same disk, stay rare under light load (where the
// writer's flush latency is what a request waits for).
constexpr uint64_t kIndexBatchRecords = 2048;
constexpr auto kIndexDelay = std::chrono::seconds(1);

}  // namespace

void AuditLog::indexer_main() {
    if (!store_.has_index()) {
        return;
    }
    // Background work: on a busy machine the writer, the syncer and the loop, which requests
    // wait for, go first (Linux applies nice per thread).
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 10);
    std::unique_lock lock(mutex_);
    for (;;) {
        // last_seq_: committed by the writer, so in every snapshot the indexer takes from now.
        auto behind = [&] { return last_seq_.load() - store_.indexed_through(); };
        index_wake_.wait_for(lock, kIndexDelay,
                             [&] { return indexer_stopping_ || behind() >= kIndexBatchRecords; });
        if (behind() == 0) {
            if (indexer_stopping_) {
                return;
            }
            continue;
        }
        const uint64_t through = last_seq_.load();
        lock.unlock();
        StoreError error;
        uint64_t indexed = 0;
        const StoreStatus status = store_.index_records(through, &indexed, &error);
        lock.lock();
        counters_.indexed += indexed;
        if (status != StoreStatus::Ok) {
            ++counters_.index_errors;
            counters_.last_error =
                std::string("index: ") + store_status_name(status) + ": " + error.detail;
            if (indexer_stopping_) {
                return;  // search scans what is not indexed
            }
            // Not again at once: a full map or a failing disk stays so for a while.
            index_wake_.wait_for(lock, kIndexDelay * 5, [&] { return indexer_stopping_; });
        }
    }
}

void AuditLog::writer_main() {
    using Clock = std::chrono::steady_clock;
    auto last_checkpoint = Clock::now();
    const auto checkpoint_interval = std::chrono::milliseconds(options_.checkpoint_every_ms);
    std::vector<std::unique_ptr<Job>> batch;
    std::vector<const audit::Record *> records;
    std::vector<AuditStore::Appended> appended;
    for (;;) {
        batch.clear();
        size_t batch_records = 0;
        bool stopping;
        {
            std::unique_lock lock(mutex_);
            wake_.wait_until(lock, last_checkpoint + checkpoint_interval,
                             [&] { return stopping_ || !queued_.empty(); });
            // Group commit: everything queued while the previous transaction was written goes
            // into this one, up to the batch cap.
            while (!queued_.empty() &&
                   (batch.empty() || batch_records + queued_.front()->records.size() <=
                                         options_.max_batch_records)) {
                batch_records += queued_.front()->records.size();
                queued_records_ -= queued_.front()->records.size();
                batch.push_back(std::move(queued_.front()));
                queued_.pop_front();
            }
            stopping = stopping_ && queued_.empty();
        }
        bool handed_over = false;
        if (!batch.empty()) {
            records.clear();
            for (const auto &job : batch) {
                for (const audit::Record &r : job->records) {
                    records.push_back(&r);
                }
            }
            const bool checkpoint_due =
                store_.last_seq() + records.size() - store_.last_checkpoint_seq() >=
                    options_.checkpoint_every_records ||
                Clock::now() - last_checkpoint >= checkpoint_interval;
            StoreError error;
            const uint64_t commits_before = store_.commits();
            const StoreStatus status =
                store_.append(records, &key_, checkpoint_due, now_us(), appended, &error,
                              AuditStore::Durability::Deferred);
            const uint64_t commit = store_.commits();
            if (status == StoreStatus::Ok && checkpoint_due) {
                last_checkpoint = Clock::now();
            }
            // The records are stored (or refused): free them here rather than on the loop.
            for (const auto &job : batch) {
                job->record_count = job->records.size();
                std::vector<audit::Record>().swap(job->records);
            }
            std::lock_guard lock(mutex_);
            ++counters_.transactions;
            if (commit > commits_before) {
                // This commit flushed the data of every earlier one, meta pages included.
                durable_commits_ = std::max(durable_commits_, commit - 1);
            }
            size_t at = 0;
            for (auto &job : batch) {
                const size_t n = job->record_count;
                job->result.status = status;
                job->result.detail = error.detail;
                if (status == StoreStatus::Ok) {
                    job->result.appended.assign(appended.begin() + static_cast<long>(at),
                                                appended.begin() + static_cast<long>(at + n));
                    // Duplicates too: their first copies may be in a commit not yet durable.
                    job->commit = commit;
                    awaiting_.push_back(std::move(job));
                } else {
                    done_.push_back(std::move(job));
                }
                at += n;
            }
            if (status == StoreStatus::Ok) {
                if (checkpoint_due) {
                    ++counters_.checkpoints;
                }
            } else {
                counters_.failed_records += records.size();
                ++(status == StoreStatus::MapFull ? counters_.map_full
                   : status == StoreStatus::Io    ? counters_.io_errors
                                                  : counters_.other_errors);
                counters_.last_error = std::string(store_status_name(status)) + ": " + error.detail;
            }
            last_seq_ = store_.last_seq();
            if (last_seq_.load() - store_.indexed_through() >= kIndexBatchRecords) {
                index_wake_.notify_one();
            }
            handed_over = status != StoreStatus::Ok || release_durable();
            if (!awaiting_.empty() && sync_target_ < commit) {
                sync_target_ = commit;
                sync_wake_.notify_one();
            }
        }
        if ((Clock::now() - last_checkpoint >= checkpoint_interval || stopping) &&
            store_.last_seq() > store_.last_checkpoint_seq()) {
            StoreError error;
            const StoreStatus status = store_.checkpoint(key_, now_us(), &error);
            std::lock_guard lock(mutex_);
            if (status == StoreStatus::Ok) {
                ++counters_.checkpoints;
                durable_commits_ = std::max(durable_commits_, store_.commits());
                handed_over = release_durable() || handed_over;
            } else {
                counters_.last_error =
                    std::string("checkpoint: ") + store_status_name(status) + ": " + error.detail;
            }
            last_checkpoint = Clock::now();
        } else if (Clock::now() - last_checkpoint >= checkpoint_interval) {
            last_checkpoint = Clock::now();
        }
        if (stopping) {
            // Nothing is left waiting for the syncer: flush here and hand everything over.
            StoreError error;
            const StoreStatus status = store_.sync(&error);
            std::lock_guard lock(mutex_);
            if (status == StoreStatus::Ok) {
                durable_commits_ = std::max(durable_commits_, store_.commits());
                release_durable();
            } else {
                fail_awaiting(status, error.detail);
            }
            handed_over = true;
        }
        if (handed_over) {
            uv_async_send(&async_);
        }
        if (stopping) {
            return;
        }
    }
}

AuditCounters AuditLog::counters() const {
    std::lock_guard lock(mutex_);
    return counters_;
}

std::string AuditLog::status_json() const {
    const AuditCounters c = counters();
    size_t queued;
    {
        std::lock_guard lock(mutex_);
        queued = queued_records_;
    }
    std::string out =
        "{\"last_seq\":" + std::to_string(last_seq_.load()) +
        ",\"appended\":" + std::to_string(c.appended) +
        ",\"duplicates\":" + std::to_string(c.duplicates) +
        ",\"transactions\":" + std::to_string(c.transactions) +
        ",\"checkpoints\":" + std::to_string(c.checkpoints) +
        ",\"queued\":" + std::to_string(queued) + ",\"indexed\":" + std::to_string(c.indexed) +
        ",\"storage_errors\":{\"failed_records\":" + std::to_string(c.failed_records) +
        ",\"map_full\":" + std::to_string(c.map_full) + ",\"io\":" + std::to_string(c.io_errors) +
        ",\"other\":" + std::to_string(c.other_errors) +
        ",\"index\":" + std::to_string(c.index_errors) +
        ",\"overloaded\":" + std::to_string(c.overloaded) +
        ",\"event_failures\":" + std::to_string(c.event_failures) + ",\"last\":";
    json::append_string(out, c.last_error);
    return out + "}}";
}

}  // namespace ehrgate::policyd
