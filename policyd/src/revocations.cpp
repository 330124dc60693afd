#include "revocations.hpp"

#include <vector>

namespace ehrgate::policyd {

namespace {

constexpr std::string_view kDb = "revocations";
constexpr std::string_view kJtiPrefix = "jti:";
constexpr std::string_view kClientPrefix = "client:";

std::string encode_time(int64_t t) {
    return std::to_string(t);
}

std::optional<int64_t> decode_time(std::string_view text) {
    int64_t value = 0;
    if (text.empty() || text.size() > 19)
        return std::nullopt;
    for (const char ch : text) {
        if (ch < '0' || ch > '9')
            return std::nullopt;
        value = value * 10 + (ch - '0');
    }
    return value;
}

}  // namespace

StoreStatus Revocations::load(int64_t now, StoreError *error) {
    jtis_.clear();
    clients_.clear();
    std::vector<std::string> expired;
    const StoreStatus status = store_.for_each(
        kDb,
        [&](std::string_view key, std::string_view value) {
            const std::optional<int64_t> when = decode_time(value);
            if (!when)
                return;
            if (key.starts_with(kJtiPrefix)) {
                if (*when <= now) {
                    expired.emplace_back(key);
                } else {
                    jtis_.emplace(std::string(key.substr(kJtiPrefix.size())), *when);
                }
            } else if (key.starts_with(kClientPrefix)) {
                clients_.emplace(std::string(key.substr(kClientPrefix.size())), *when);
            }
        },
        error);
    for (const std::string &key : expired) {
        store_.erase(kDb, key);
    }
    rebuild();
    return status;
}

StoreStatus Revocations::revoke_jti(const std::string &jti, int64_t until, StoreError *error) {
    const StoreStatus status =
        store_.put(kDb, std::string(kJtiPrefix) + jti, encode_time(until), error);
    if (status == StoreStatus::Ok) {
        jtis_[jti] = until;
        rebuild();
    }
    return status;
}

StoreStatus Revocations::revoke_client(const std::string &client_id, int64_t at,
                                       StoreError *error) {
    const StoreStatus status =
        store_.put(kDb, std::string(kClientPrefix) + client_id, encode_time(at), error);
    if (status == StoreStatus::Ok) {
        clients_[client_id] = at;
        rebuild();
    }
    return status;
}

size_t Revocations::purge(int64_t now) {
    size_t removed = 0;
    for (auto it = jtis_.begin(); it != jtis_.end();) {
        if (it->second <= now &&
            store_.erase(kDb, std::string(kJtiPrefix) + it->first) != StoreStatus::Io) {
            it = jtis_.erase(it);
            ++removed;
        } else {
            ++it;
        }
    }
    if (removed > 0) {
        rebuild();
    }
    return removed;
}

void Revocations::rebuild() {
    ++serial_;
    protocol::RevocationList list;
    list.serial = serial_;
    list.jtis.assign(jtis_.begin(), jtis_.end());
    list.clients.assign(clients_.begin(), clients_.end());
    encoded_ = protocol::encode(list);
}

}  // namespace ehrgate::policyd
