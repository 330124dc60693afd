#include "audit_log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

#include "ehrgate/json_text.hpp"
#include "log.hpp"

namespace ehrgate::policyd {

namespace {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

std::string be64(uint64_t v) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) {
        out[static_cast<size_t>(i)] = static_cast<char>(v >> (8 * (7 - i)));
    }
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
std::string time_key(int64_t time_us) {
    return be64(static_cast<uint64_t>(time_us) ^ (uint64_t{1} << 63));
}

std::string index_prefix(std::string_view value) {
    const size_t n = std::min<size_t>(value.size(), 0xffff);
    std::string out;
    out.push_back(static_cast<char>(n >> 8));
    out.push_back(static_cast<char>(n & 0xff));
    out.append(value.substr(0, n));
    return out;
}

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

}  // namespace

// ---- AuditStore ------------------------------------------------------------------------------

std::unique_ptr<AuditStore> AuditStore::open(const Options &options, StoreError *error) {
    if (!options.read_only && ::mkdir(options.directory.c_str(), 0700) != 0 && errno != EEXIST) {
        translate_lmdb_error(errno, error);
        return nullptr;
    }
    MDB_env *env = nullptr;
    int rc = mdb_env_create(&env);
    if (rc == MDB_SUCCESS && !options.read_only)
        rc = mdb_env_set_mapsize(env, options.map_size_bytes);
    if (rc == MDB_SUCCESS)
        rc = mdb_env_set_maxdbs(env, 16);
    // No MDB_NOSYNC / MDB_NOMETASYNC: a commit returns only after fsync, which is the
    // durability every acknowledgement promises.
    if (rc == MDB_SUCCESS)
        rc = mdb_env_open(env, options.directory.c_str(),
                          MDB_NOTLS | (options.read_only ? MDB_RDONLY : 0), 0600);
    if (rc != MDB_SUCCESS) {
        translate_lmdb_error(rc, error);
        if (env != nullptr) {
            mdb_env_close(env);
        }
        return nullptr;
    }
    int stale = 0;
    mdb_reader_check(env, &stale);
    std::unique_ptr<AuditStore> store(new AuditStore(env, options.read_only));
    if (store->open_databases(error) != StoreStatus::Ok ||
        store->load_head(error) != StoreStatus::Ok) {
        return nullptr;
    }
    return store;
}

AuditStore::~AuditStore() {
    mdb_env_close(env_);
}

StoreStatus AuditStore::open_databases(StoreError *error) {
    Txn txn(env_, read_only_);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    const struct {
        const char *name;
        MDB_dbi *dbi;
    } dbs[] = {{"records", &records_},
               {"ids", &ids_},
               {"checkpoints", &checkpoints_},
               {"idx_patient", &idx_patient_},
               {"idx_client", &idx_client_},
               {"idx_user", &idx_user_},
               {"idx_correlation", &idx_correlation_},
               {"idx_time", &idx_time_}};
    for (const auto &db : dbs) {
        const int rc = mdb_dbi_open(txn.get(), db.name, read_only_ ? 0 : MDB_CREATE, db.dbi);
        if (rc == MDB_NOTFOUND && read_only_) {
            return StoreStatus::Ok;  // nothing was ever written: an empty log
        }
        if (rc != MDB_SUCCESS) {
            return translate_lmdb_error(rc, error);
        }
    }
    const int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    have_databases_ = true;
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
                               std::vector<Appended> &out, StoreError *error) {
    out.clear();
    if (read_only_ || !have_databases_) {
        return translate_lmdb_error(EACCES, error);
    }
    Txn txn(env_, false);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    uint64_t seq = last_seq_;
    std::string hash = last_hash_;
    auto put = [&](MDB_dbi dbi, std::string_view k, std::string_view v, unsigned flags) {
        MDB_val kv = as_val(k), vv = as_val(v);
        return mdb_put(txn.get(), dbi, &kv, &vv, flags);
    };
    for (const audit::Record *record : records) {
        if (!record->record_id.empty()) {
            MDB_val kv = as_val(record->record_id), vv{};
            const int rc = mdb_get(txn.get(), ids_, &kv, &vv);
            if (rc == MDB_SUCCESS) {
                out.push_back({read_be64(as_view(vv)), true});
                continue;
            }
            if (rc != MDB_NOTFOUND) {
                out.clear();
                return translate_lmdb_error(rc, error);
            }
        }
        ++seq;
        const std::string canonical = audit::canonical_encode({seq, *record});
        hash = audit::chain_hash(hash, canonical);
        const std::string seq_key = be64(seq);
        // MDB_APPEND: keys only grow; LMDB checks it and fills pages completely.
        int rc = put(records_, seq_key, audit::stored_value(hash, canonical), MDB_APPEND);
        if (rc == MDB_SUCCESS && !record->record_id.empty()) {
            rc = put(ids_, record->record_id, seq_key, 0);
        }
        auto index = [&](MDB_dbi dbi, std::string_view value) {
            if (rc == MDB_SUCCESS && !value.empty()) {
                rc = put(dbi, index_prefix(value) + seq_key, {}, 0);
            }
        };
        for (const std::string &patient : record->patient_ids) {
            index(idx_patient_, patient);
        }
        index(idx_client_, record->client_id);
        index(idx_user_, record->user);
        index(idx_correlation_, record->correlation_id);
        if (rc == MDB_SUCCESS) {
            rc = put(idx_time_, time_key(record->time_us) + seq_key, {}, 0);
        }
        if (rc != MDB_SUCCESS) {
            out.clear();
            return translate_lmdb_error(rc, error);
        }
        out.push_back({seq, false});
    }
    const bool write_checkpoint = key != nullptr && checkpoint && seq > last_checkpoint_seq_;
    if (write_checkpoint) {
        const StoreStatus status = put_checkpoint(txn.get(), *key, seq, hash, now, error);
        if (status != StoreStatus::Ok) {
            out.clear();
            return status;
        }
    }
    const int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        out.clear();
        return translate_lmdb_error(rc, error);
    }
    last_seq_ = seq;
    last_hash_ = hash;
    if (write_checkpoint) {
        last_checkpoint_seq_ = seq;
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
    const int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
    }
    last_checkpoint_seq_ = last_seq_;
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
    Txn txn(env_, true);
    if (txn.begin_rc() != MDB_SUCCESS) {
        return translate_lmdb_error(txn.begin_rc(), error);
    }
    // The most selective index given: a patient, a request, a user, a client, then time.
    std::optional<std::vector<uint64_t>> seqs;
    auto by_prefix = [&](MDB_dbi dbi, std::string_view value) -> int {
        const std::string prefix = index_prefix(value);
        Cursor cursor(txn.get(), dbi);
        if (cursor.rc() != MDB_SUCCESS) {
            return cursor.rc();
        }
        seqs.emplace();
        MDB_val k = as_val(prefix), v{};
        int rc;
        for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
             rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
            const std::string_view key = as_view(k);
            if (key.size() != prefix.size() + 8 || !key.starts_with(prefix)) {
                break;
            }
            seqs->push_back(read_be64(key.substr(prefix.size())));
        }
        return rc == MDB_NOTFOUND || rc == MDB_SUCCESS ? MDB_SUCCESS : rc;
    };
    int rc = MDB_SUCCESS;
    if (!query.patient.empty()) {
        rc = by_prefix(idx_patient_, query.patient);
    } else if (!query.correlation_id.empty()) {
        rc = by_prefix(idx_correlation_, query.correlation_id);
    } else if (!query.user.empty()) {
        rc = by_prefix(idx_user_, query.user);
    } else if (!query.client.empty()) {
        rc = by_prefix(idx_client_, query.client);
    } else if (query.since_us || query.until_us) {
        Cursor cursor(txn.get(), idx_time_);
        rc = cursor.rc();
        if (rc == MDB_SUCCESS) {
            seqs.emplace();
            const std::string start = time_key(query.since_us.value_or(INT64_MIN));
            MDB_val k = as_val(start), v{};
            for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_SET_RANGE); rc == MDB_SUCCESS;
                 rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_NEXT)) {
                const std::string_view key = as_view(k);
                if (key.size() != 16) {
                    continue;
                }
                const auto t =
                    static_cast<int64_t>(read_be64(key.substr(0, 8)) ^ (uint64_t{1} << 63));
                if (query.until_us && t > *query.until_us) {
                    break;
                }
                seqs->push_back(read_be64(key.substr(8)));
            }
            std::sort(seqs->begin(), seqs->end());
            rc = rc == MDB_NOTFOUND || rc == MDB_SUCCESS ? MDB_SUCCESS : rc;
        }
    }
    if (rc != MDB_SUCCESS) {
        return translate_lmdb_error(rc, error);
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
        if (value.size() <= audit::kHashSize) {
            return true;
        }
        std::optional<audit::ChainedRecord> entry =
            audit::canonical_decode(value.substr(audit::kHashSize));
        // Search reports what is stored; whether it is genuine is `audit verify`'s question.
        return !entry || !matches(entry->record) || visit(*entry);
    };
    if (seqs) {
        for (const uint64_t seq : *seqs) {
            const std::string k = be64(seq);
            MDB_val kv = as_val(k), vv{};
            rc = mdb_get(txn.get(), records_, &kv, &vv);
            if (rc == MDB_NOTFOUND) {
                continue;  // purged, or an index entry left by tampering
            }
            if (rc != MDB_SUCCESS) {
                return translate_lmdb_error(rc, error);
            }
            if (!emit(as_view(vv))) {
                break;
            }
        }
        return StoreStatus::Ok;
    }
    Cursor cursor(txn.get(), records_);
    if (cursor.rc() != MDB_SUCCESS) {
        return translate_lmdb_error(cursor.rc(), error);
    }
    MDB_val k{}, v{};
    for (rc = mdb_cursor_get(cursor.get(), &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
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
            const std::string_view value = as_view(v);
            std::optional<audit::ChainedRecord> e =
                value.size() > audit::kHashSize
                    ? audit::canonical_decode(value.substr(audit::kHashSize))
                    : std::nullopt;
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
            e = audit::canonical_decode(as_view(v).substr(audit::kHashSize));
        }
        const std::string seq_key = be64(read_be64(as_view(k)));
        int rc = del(records_, seq_key);
        if (e) {
            const audit::Record &r = e->record;
            if (rc == MDB_SUCCESS && !r.record_id.empty())
                rc = del(ids_, r.record_id);
            for (const std::string &p : r.patient_ids)
                if (rc == MDB_SUCCESS)
                    rc = del(idx_patient_, index_prefix(p) + seq_key);
            if (rc == MDB_SUCCESS && !r.client_id.empty())
                rc = del(idx_client_, index_prefix(r.client_id) + seq_key);
            if (rc == MDB_SUCCESS && !r.user.empty())
                rc = del(idx_user_, index_prefix(r.user) + seq_key);
            if (rc == MDB_SUCCESS && !r.correlation_id.empty())
                rc = del(idx_correlation_, index_prefix(r.correlation_id) + seq_key);
            if (rc == MDB_SUCCESS)
                rc = del(idx_time_, time_key(r.time_us) + seq_key);
        }
        if (rc == MDB_SUCCESS && read_be64(seq_key) < anchor) {
            rc = del(checkpoints_, seq_key);
        }
        if (rc != MDB_SUCCESS) {
            return translate_lmdb_error(rc, error);
        }
        ++*removed;
    }
    const int rc = txn.commit();
    if (rc != MDB_SUCCESS) {
        *removed = 0;
        return translate_lmdb_error(rc, error);
    }
    return StoreStatus::Ok;
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
}

void AuditLog::start() {
    if (started_) {
        return;
    }
    started_ = true;
    uv_async_init(loop_, &async_, on_async);
    async_.data = this;
    writer_ = std::thread([this] { writer_main(); });
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
    writer_.join();
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

void AuditLog::writer_main() {
    using Clock = std::chrono::steady_clock;
    auto last_checkpoint = Clock::now();
    const auto checkpoint_interval = std::chrono::milliseconds(options_.checkpoint_every_ms);
    for (;;) {
        std::vector<std::unique_ptr<Job>> batch;
        size_t batch_records = 0;
        bool stopping;
        {
            std::unique_lock lock(mutex_);
            wake_.wait_until(lock, last_checkpoint + checkpoint_interval,
                             [&] { return stopping_ || !queued_.empty(); });
            // Group commit: everything queued while the previous transaction synced goes into
            // this one, up to the batch cap.
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
        if (!batch.empty()) {
            std::vector<const audit::Record *> records;
            records.reserve(batch_records);
            for (const auto &job : batch) {
                for (const audit::Record &r : job->records) {
                    records.push_back(&r);
                }
            }
            const bool checkpoint_due =
                store_.last_seq() + records.size() - store_.last_checkpoint_seq() >=
                    options_.checkpoint_every_records ||
                Clock::now() - last_checkpoint >= checkpoint_interval;
            std::vector<AuditStore::Appended> appended;
            StoreError error;
            const StoreStatus status =
                store_.append(records, &key_, checkpoint_due, now_us(), appended, &error);
            if (status == StoreStatus::Ok && checkpoint_due) {
                last_checkpoint = Clock::now();
            }
            std::lock_guard lock(mutex_);
            ++counters_.transactions;
            size_t at = 0;
            for (const auto &job : batch) {
                job->result.status = status;
                job->result.detail = error.detail;
                if (status == StoreStatus::Ok) {
                    job->result.appended.assign(
                        appended.begin() + static_cast<long>(at),
                        appended.begin() + static_cast<long>(at + job->records.size()));
                }
                at += job->records.size();
            }
            if (status == StoreStatus::Ok) {
                for (const AuditStore::Appended &a : appended) {
                    ++(a.duplicate ? counters_.duplicates : counters_.appended);
                }
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
            for (auto &job : batch) {
                done_.push_back(std::move(job));
            }
        }
        if ((Clock::now() - last_checkpoint >= checkpoint_interval || stopping) &&
            store_.last_seq() > store_.last_checkpoint_seq()) {
            StoreError error;
            const StoreStatus status = store_.checkpoint(key_, now_us(), &error);
            std::lock_guard lock(mutex_);
            if (status == StoreStatus::Ok) {
                ++counters_.checkpoints;
            } else {
                counters_.last_error =
                    std::string("checkpoint: ") + store_status_name(status) + ": " + error.detail;
            }
            last_checkpoint = Clock::now();
        } else if (Clock::now() - last_checkpoint >= checkpoint_interval) {
            last_checkpoint = Clock::now();
        }
        if (!batch.empty()) {
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
        ",\"queued\":" + std::to_string(queued) +
        ",\"storage_errors\":{\"failed_records\":" + std::to_string(c.failed_records) +
        ",\"map_full\":" + std::to_string(c.map_full) + ",\"io\":" + std::to_string(c.io_errors) +
        ",\"other\":" + std::to_string(c.other_errors) +
        ",\"overloaded\":" + std::to_string(c.overloaded) +
        ",\"event_failures\":" + std::to_string(c.event_failures) + ",\"last\":";
    json::append_string(out, c.last_error);
    return out + "}}";
}

}  // namespace ehrgate::policyd
