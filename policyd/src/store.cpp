#include "store.hpp"

#include <sys/stat.h>

#include <cerrno>

namespace ehrgate::policyd {

namespace {

StoreStatus translate_error(int rc, StoreError *error) {
    StoreStatus status;
    switch (rc) {
        case MDB_SUCCESS:
            return StoreStatus::Ok;
        case MDB_NOTFOUND:
            status = StoreStatus::NotFound;
            break;
        case MDB_MAP_FULL:
            status = StoreStatus::MapFull;
            break;
        case MDB_READERS_FULL:
            status = StoreStatus::ReadersFull;
            break;
        case EAGAIN:
        case EBUSY:
            status = StoreStatus::Busy;
            break;
        case MDB_CORRUPTED:
        case MDB_PAGE_NOTFOUND:
        case MDB_INVALID:
        case MDB_VERSION_MISMATCH:
            status = StoreStatus::Corrupted;
            break;
        case EIO:
        case ENOSPC:
        case EACCES:
        case ENOENT:
            status = StoreStatus::Io;
            break;
        default:
            status = StoreStatus::Invalid;
            break;
    }
    if (error != nullptr) {
        error->status = status;
        error->detail = mdb_strerror(rc);
    }
    return status;
}

MDB_val as_val(std::string_view bytes) {
    return MDB_val{bytes.size(), const_cast<char *>(bytes.data())};
}

}  // namespace

StoreStatus translate_lmdb_error(int rc, StoreError *error) {
    return translate_error(rc, error);
}

const char *store_status_name(StoreStatus status) {
    switch (status) {
        case StoreStatus::Ok:
            return "ok";
        case StoreStatus::NotFound:
            return "not-found";
        case StoreStatus::MapFull:
            return "map-full";
        case StoreStatus::ReadersFull:
            return "readers-full";
        case StoreStatus::Busy:
            return "busy";
        case StoreStatus::Corrupted:
            return "corrupted";
        case StoreStatus::Io:
            return "io-error";
        case StoreStatus::Invalid:
            return "invalid";
    }
    return "unknown";
}

std::unique_ptr<Store> Store::open(const Options &options, StoreError *error) {
    if (::mkdir(options.directory.c_str(), 0700) != 0 && errno != EEXIST) {
        translate_error(errno, error);
        return nullptr;
    }
    MDB_env *env = nullptr;
    int rc = mdb_env_create(&env);
    if (rc == MDB_SUCCESS)
        rc = mdb_env_set_mapsize(env, options.map_size_bytes);
    if (rc == MDB_SUCCESS)
        rc = mdb_env_set_maxdbs(env, options.max_databases);
    // MDB_NOTLS: read transactions are not tied to threads, so a future reader thread pool can
    // reuse them; the writer stays single-threaded.
    if (rc == MDB_SUCCESS)
        rc = mdb_env_open(env, options.directory.c_str(), MDB_NOTLS, 0600);
    if (rc != MDB_SUCCESS) {
        translate_error(rc, error);
        if (env != nullptr) {
            mdb_env_close(env);
        }
        return nullptr;
    }
    int stale_readers = 0;
    mdb_reader_check(env, &stale_readers);
    return std::unique_ptr<Store>(new Store(env, options.directory));
}

Store::~Store() {
    mdb_env_close(env_);
}

StoreStatus Store::database(MDB_txn *txn, std::string_view name, bool create, MDB_dbi *dbi,
                            StoreError *error) {
    if (auto it = dbis_.find(name); it != dbis_.end()) {
        *dbi = it->second;
        return StoreStatus::Ok;
    }
    const std::string owned(name);
    const int rc = mdb_dbi_open(txn, owned.c_str(), create ? MDB_CREATE : 0, dbi);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    // A handle opened in a write transaction becomes visible to others only after commit, so
    // it is cached by the caller after a successful commit (see put); read opens are cached now.
    if (!create) {
        dbis_.emplace(owned, *dbi);
    }
    return StoreStatus::Ok;
}

StoreStatus Store::put(std::string_view database_name, std::string_view key, std::string_view value,
                       StoreError *error) {
    MDB_txn *txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    MDB_dbi dbi;
    const bool known = dbis_.count(database_name) != 0;
    StoreStatus status = database(txn, database_name, true, &dbi, error);
    if (status != StoreStatus::Ok) {
        mdb_txn_abort(txn);
        return status;
    }
    MDB_val k = as_val(key);
    MDB_val v = as_val(value);
    rc = mdb_put(txn, dbi, &k, &v, 0);
    if (rc != MDB_SUCCESS) {
        mdb_txn_abort(txn);
        return translate_error(rc, error);
    }
    rc = mdb_txn_commit(txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    if (!known) {
        dbis_.emplace(std::string(database_name), dbi);
    }
    return StoreStatus::Ok;
}

StoreStatus Store::put_all(const std::vector<Put> &puts, StoreError *error) {
    MDB_txn *txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    std::vector<std::pair<std::string, MDB_dbi>> opened;
    for (const Put &put : puts) {
        MDB_dbi dbi;
        const bool known = dbis_.count(put.database) != 0;
        StoreStatus status = database(txn, put.database, true, &dbi, error);
        if (status != StoreStatus::Ok) {
            mdb_txn_abort(txn);
            return status;
        }
        if (!known) {
            opened.emplace_back(std::string(put.database), dbi);
        }
        MDB_val k = as_val(put.key);
        MDB_val v = as_val(put.value);
        rc = mdb_put(txn, dbi, &k, &v, 0);
        if (rc != MDB_SUCCESS) {
            mdb_txn_abort(txn);
            return translate_error(rc, error);
        }
    }
    rc = mdb_txn_commit(txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    for (auto &[name, dbi] : opened) {
        dbis_.emplace(std::move(name), dbi);
    }
    return StoreStatus::Ok;
}

std::optional<std::string> Store::get(std::string_view database_name, std::string_view key,
                                      StoreError *error) {
    MDB_txn *txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
    if (rc != MDB_SUCCESS) {
        translate_error(rc, error);
        return std::nullopt;
    }
    MDB_dbi dbi;
    if (database(txn, database_name, false, &dbi, error) != StoreStatus::Ok) {
        mdb_txn_abort(txn);
        return std::nullopt;
    }
    MDB_val k = as_val(key);
    MDB_val v{};
    rc = mdb_get(txn, dbi, &k, &v);
    std::optional<std::string> result;
    if (rc == MDB_SUCCESS) {
        result.emplace(static_cast<const char *>(v.mv_data), v.mv_size);  // copy before txn ends
    } else {
        translate_error(rc, error);
    }
    // Commit rather than abort: it is as cheap for a read-only transaction and keeps a DBI
    // handle opened in it valid for the environment, which the cache relies on.
    mdb_txn_commit(txn);
    return result;
}

StoreStatus Store::erase(std::string_view database_name, std::string_view key, StoreError *error) {
    MDB_txn *txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    MDB_dbi dbi;
    const bool known = dbis_.count(database_name) != 0;
    StoreStatus status = database(txn, database_name, true, &dbi, error);
    if (status != StoreStatus::Ok) {
        mdb_txn_abort(txn);
        return status;
    }
    MDB_val k = as_val(key);
    rc = mdb_del(txn, dbi, &k, nullptr);
    if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return translate_error(rc, error);
    }
    const int commit_rc = mdb_txn_commit(txn);
    if (commit_rc != MDB_SUCCESS) {
        return translate_error(commit_rc, error);
    }
    if (!known) {
        dbis_.emplace(std::string(database_name), dbi);
    }
    return rc == MDB_NOTFOUND ? StoreStatus::NotFound : StoreStatus::Ok;
}

StoreStatus Store::scan(std::string_view database_name, Visitor visitor, void *context,
                        StoreError *error) {
    MDB_txn *txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
    if (rc != MDB_SUCCESS) {
        return translate_error(rc, error);
    }
    MDB_dbi dbi;
    StoreError open_error;
    if (database(txn, database_name, false, &dbi, &open_error) != StoreStatus::Ok) {
        mdb_txn_abort(txn);
        if (open_error.status == StoreStatus::NotFound) {
            return StoreStatus::Ok;
        }
        if (error != nullptr) {
            *error = open_error;
        }
        return open_error.status;
    }
    MDB_cursor *cursor = nullptr;
    rc = mdb_cursor_open(txn, dbi, &cursor);
    if (rc != MDB_SUCCESS) {
        mdb_txn_abort(txn);
        return translate_error(rc, error);
    }
    MDB_val k{};
    MDB_val v{};
    for (rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST); rc == MDB_SUCCESS;
         rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)) {
        visitor(context, std::string_view(static_cast<const char *>(k.mv_data), k.mv_size),
                std::string_view(static_cast<const char *>(v.mv_data), v.mv_size));
    }
    mdb_cursor_close(cursor);
    mdb_txn_commit(txn);
    return rc == MDB_NOTFOUND ? StoreStatus::Ok : translate_error(rc, error);
}

}  // namespace ehrgate::policyd
