// policyd's durable state behind a small key/value interface over LMDB.
//
// LMDB rules we follow (lmdb.h "Caveats"): one environment per process, opened after any fork;
// stale reader slots cleared at start with mdb_reader_check; values are copied out before the
// transaction ends; MDB_MAP_FULL and friends are translated into StoreStatus in one place
// (translate_error) so callers handle outcomes, not errno values.
#pragma once

#include <lmdb.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ehrgate::policyd {

enum class StoreStatus { Ok, NotFound, MapFull, ReadersFull, Busy, Corrupted, Io, Invalid };

const char *store_status_name(StoreStatus status);

struct StoreError;
// The one translation of LMDB/errno codes into StoreStatus, shared by every LMDB user in policyd
// (the audit log keeps its own environment but not its own error mapping).
StoreStatus translate_lmdb_error(int rc, StoreError *error);

struct StoreError {
    StoreStatus status = StoreStatus::Ok;
    std::string detail;  // LMDB's own message, for logs
};

class Store {
  public:
    struct Options {
        std::string directory;
        size_t map_size_bytes = size_t{1} << 30;
        unsigned max_databases = 16;
    };

    // Opens (creating if needed) the environment in options.directory.
    static std::unique_ptr<Store> open(const Options &options, StoreError *error);

    ~Store();
    Store(const Store &) = delete;
    Store &operator=(const Store &) = delete;

    // Each call is one transaction; durable when it returns Ok (LMDB syncs on commit).
    StoreStatus put(std::string_view database, std::string_view key, std::string_view value,
                    StoreError *error = nullptr);
    std::optional<std::string> get(std::string_view database, std::string_view key,
                                   StoreError *error = nullptr);
    StoreStatus erase(std::string_view database, std::string_view key, StoreError *error = nullptr);
    // Several puts in one transaction: all of them are durable, or none (consent, issue 5).
    struct Put {
        std::string_view database;
        std::string_view key;
        std::string_view value;
    };
    StoreStatus put_all(const std::vector<Put> &puts, StoreError *error = nullptr);
    // Calls visit(key, value) for every entry in key order, in one read transaction. The views
    // are valid only during the call. A database never written to is empty, not an error.
    template <typename Visit>
    StoreStatus for_each(std::string_view database, Visit &&visit, StoreError *error = nullptr);

    const std::string &directory() const { return directory_; }

  private:
    using Visitor = void (*)(void *context, std::string_view key, std::string_view value);
    StoreStatus scan(std::string_view database, Visitor visitor, void *context, StoreError *error);

    explicit Store(MDB_env *env, std::string directory)
        : env_(env), directory_(std::move(directory)) {}

    // Named databases are created on first use in a write transaction; afterwards the handle is
    // cached (DBI handles stay valid for the environment's lifetime).
    StoreStatus database(MDB_txn *txn, std::string_view name, bool create, MDB_dbi *dbi,
                         StoreError *error);

    MDB_env *env_;
    std::string directory_;
    std::map<std::string, MDB_dbi, std::less<>> dbis_;
};

template <typename Visit>
StoreStatus Store::for_each(std::string_view database, Visit &&visit, StoreError *error) {
    return scan(
        database,
        [](void *context, std::string_view key, std::string_view value) {
            (*static_cast<std::remove_reference_t<Visit> *>(context))(key, value);
        },
        &visit, error);
}

}  // namespace ehrgate::policyd
