// Token revocations: by `jti` (until a time, at most the token's own expiry) and by client (every
// token issued before the revocation). Kept in LMDB so a restart forgets nothing, and pushed to
// every nginx worker on each change so all of them refuse the token within a second.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "ehrgate/protocol.hpp"
#include "store.hpp"

namespace ehrgate::policyd {

class Revocations {
  public:
    // Revoked jtis are kept at most this long when no expiry is given: longer than any access
    // token lives.
    static constexpr int64_t kDefaultJtiRetentionSeconds = 24 * 3600;

    explicit Revocations(Store &store) : store_(store) {}

    // Reads every stored revocation; drops expired jti entries.
    StoreStatus load(int64_t now, StoreError *error);

    StoreStatus revoke_jti(const std::string &jti, int64_t until, StoreError *error);
    StoreStatus revoke_client(const std::string &client_id, int64_t at, StoreError *error);
    // Removes jti revocations past their time; returns how many went.
    size_t purge(int64_t now);

    uint64_t serial() const { return serial_; }
    size_t jti_count() const { return jtis_.size(); }
    size_t client_count() const { return clients_.size(); }
    // The RevocationList body, rebuilt on change only.
    const std::string &encoded() const { return encoded_; }

  private:
    void rebuild();

    Store &store_;
    std::map<std::string, int64_t> jtis_;
    std::map<std::string, int64_t> clients_;
    uint64_t serial_ = 0;
    std::string encoded_;
};

}  // namespace ehrgate::policyd
