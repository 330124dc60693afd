// The active policy snapshot and the rules for replacing it.
//
// A reload parses and validates the whole file first; only a valid bundle that could also be
// recorded in the store becomes active. Anything else leaves the running snapshot untouched, so a
// typo in production never takes the gateway down.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ehrgate/policy.hpp"
#include "store.hpp"

namespace ehrgate::policyd {

struct ReloadOutcome {
    enum class Kind { Activated, Unchanged, Refused };
    Kind kind = Kind::Refused;
    std::vector<policy::Diagnostic> diagnostics;
    std::string message;  // one line for the operator
};

class PolicyState {
  public:
    PolicyState(Store &store, std::string source_path);

    // Loads the bundle from source_path. Used at start-up (where Refused means: do not start) and
    // by every reload.
    ReloadOutcome reload();

    bool loaded() const { return current_ != nullptr; }
    const policy::Snapshot &snapshot() const { return *current_; }
    // The PolicySnapshot message body, encoded once per activation rather than per worker.
    const std::string &encoded() const { return encoded_; }
    const std::string &source_path() const { return source_path_; }
    int64_t activated_at_unix() const { return activated_at_unix_; }
    // The consent-signing key's JWKS travels in every snapshot from now on (workers publish it).
    void set_consent_jwks(std::string jwks);

  private:
    Store &store_;
    std::string source_path_;
    std::shared_ptr<const policy::Snapshot> current_;
    std::string encoded_;
    int64_t activated_at_unix_ = 0;
    std::string consent_jwks_;
};

}  // namespace ehrgate::policyd
