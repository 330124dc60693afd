#include "ehrgate/revocation_set.hpp"

namespace ehrgate {

RevocationSet::RevocationSet(const protocol::RevocationList &list) : serial_(list.serial) {
    jtis_.reserve(list.jtis.size());
    for (const auto &[jti, until] : list.jtis) {
        jtis_.emplace(jti, until);
    }
    for (const auto &[client, at] : list.clients) {
        clients_.emplace(client, at);
    }
}

bool RevocationSet::is_revoked(std::string_view jti, std::string_view client_id, int64_t issued_at,
                               bool has_iat, int64_t now) const {
    if (!jti.empty()) {
        if (const auto it = jtis_.find(jti); it != jtis_.end() && it->second > now) {
            return true;
        }
    }
    if (const auto it = clients_.find(client_id); it != clients_.end()) {
        return !has_iat || issued_at <= it->second;
    }
    return false;
}

}  // namespace ehrgate
