// The worker's view of revoked tokens, built from policyd's RevocationList.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

#include "ehrgate/protocol.hpp"

namespace ehrgate {

class RevocationSet {
  public:
    RevocationSet() = default;
    explicit RevocationSet(const protocol::RevocationList &list);

    // A token is revoked when its jti is listed (and the entry has not lapsed), or when its client
    // was revoked at or after the token was issued. A token without `iat` from a revoked client
    // is revoked: nothing shows it came later.
    bool is_revoked(std::string_view jti, std::string_view client_id, int64_t issued_at,
                    bool has_iat, int64_t now) const;

    uint64_t serial() const { return serial_; }

  private:
    struct Hash {
        using is_transparent = void;
        size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
    };
    uint64_t serial_ = 0;
    std::unordered_map<std::string, int64_t, Hash, std::equal_to<>> jtis_;
    std::unordered_map<std::string, int64_t, Hash, std::equal_to<>> clients_;
};

}  // namespace ehrgate
