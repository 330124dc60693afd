#include "policy_state.hpp"

#include <ctime>

#include "ehrgate/msgpack.hpp"

namespace ehrgate::policyd {

namespace {

constexpr std::string_view kPolicyDb = "policy";
constexpr std::string_view kHistoryDb = "policy_history";
constexpr std::string_view kActiveKey = "active";

struct ActiveRecord {
    uint64_t serial = 0;
    std::string version;
    std::string digest;
};

std::string encode_active(const ActiveRecord &record, int64_t at_unix, std::string_view source) {
    std::string out;
    msgpack::Writer w(out);
    w.map(5);
    w.key("serial");
    w.uint(record.serial);
    w.key("version");
    w.str(record.version);
    w.key("digest");
    w.str(record.digest);
    w.key("activated_at");
    w.sint(at_unix);
    w.key("source");
    w.str(source);
    return out;
}

std::optional<ActiveRecord> decode_active(std::string_view bytes) {
    msgpack::Reader r(bytes);
    ActiveRecord record;
    const std::optional<uint32_t> n = r.read_map();
    for (uint32_t i = 0; n && i < *n && r.ok(); ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (key == "serial") {
            record.serial = r.read_uint().value_or(0);
        } else if (key == "version") {
            record.version = r.read_str().value_or("");
        } else if (key == "digest") {
            record.digest = r.read_str().value_or("");
        } else {
            r.skip();
        }
    }
    if (!n || !r.ok()) {
        return std::nullopt;
    }
    return record;
}

std::string serial_key(uint64_t serial) {
    // Big-endian so LMDB's byte order is numeric order.
    std::string key(8, '\0');
    for (int i = 0; i < 8; ++i) {
        key[i] = static_cast<char>(serial >> (56 - 8 * i));
    }
    return key;
}

}  // namespace

PolicyState::PolicyState(Store &store, std::string source_path)
    : store_(store), source_path_(std::move(source_path)) {}

ReloadOutcome PolicyState::reload() {
    ReloadOutcome outcome;
    policy::ParseResult parsed = policy::load_bundle_file(source_path_);
    if (!parsed.bundle) {
        outcome.diagnostics = std::move(parsed.diagnostics);
        outcome.message = "policy bundle " + source_path_ +
                          " refused: " + std::to_string(outcome.diagnostics.size()) + " problem(s)";
        return outcome;
    }
    const std::string digest = policy::bundle_digest(*parsed.bundle);

    if (current_ && current_->digest_hex == digest) {
        outcome.kind = ReloadOutcome::Kind::Unchanged;
        outcome.message = "policy unchanged (version " + current_->bundle.version + ", serial " +
                          std::to_string(current_->serial) + ")";
        return outcome;
    }
    StoreError error;
    const std::optional<std::string> stored = store_.get(kPolicyDb, kActiveKey, &error);
    if (!stored && error.status != StoreStatus::NotFound && error.status != StoreStatus::Ok) {
        outcome.message = std::string("policy store unreadable: ") +
                          store_status_name(error.status) + " (" + error.detail + ")";
        return outcome;
    }
    const std::optional<ActiveRecord> previous = stored ? decode_active(*stored) : std::nullopt;
    if (stored && !previous) {
        // Guessing would risk moving the serial back, and workers trust it to only go forward.
        outcome.message =
            "policy store unreadable: the active-policy record is corrupt; restore the "
            "data directory from backup";
        return outcome;
    }
    // Audit records name the policy version that decided a request, so one version label must
    // always mean one content: across every version ever activated, restarts included.
    bool label_reused = false;
    const StoreStatus history_status = store_.for_each(
        kHistoryDb,
        [&](std::string_view, std::string_view value) {
            const std::optional<ActiveRecord> record = decode_active(value);
            label_reused = label_reused || (record && record->version == parsed.bundle->version &&
                                            record->digest != digest);
        },
        &error);
    if (history_status != StoreStatus::Ok) {
        outcome.message = std::string("policy store unreadable: ") +
                          store_status_name(history_status) + " (" + error.detail + ")";
        return outcome;
    }
    if (label_reused) {
        outcome.message = "policy bundle " + source_path_ +
                          " refused: content changed but version \"" + parsed.bundle->version +
                          "\" was already used for other content; bump `version`";
        outcome.diagnostics.push_back(
            {source_path_, 0, 0, "version", "content changed but the version label did not"});
        return outcome;
    }

    auto next = std::make_shared<policy::Snapshot>();
    next->bundle = std::move(*parsed.bundle);
    next->digest_hex = digest;
    // The serial only moves forward, across restarts too: workers compare serials to know
    // whether the snapshot they hold is current.
    next->serial = previous ? previous->serial : 0;
    if (!previous || previous->digest != digest) {
        ++next->serial;
    }

    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    const ActiveRecord record{next->serial, next->bundle.version, digest};
    const std::string encoded_record = encode_active(record, now, source_path_);
    // Fail closed: a policy we cannot record as active is not activated.
    if (store_.put(kHistoryDb, serial_key(next->serial), encoded_record, &error) !=
            StoreStatus::Ok ||
        store_.put(kPolicyDb, kActiveKey, encoded_record, &error) != StoreStatus::Ok) {
        outcome.message = std::string("policy not activated: store write failed: ") +
                          store_status_name(error.status) + " (" + error.detail + ")";
        return outcome;
    }

    next->consent_jwks = consent_jwks_;
    encoded_ = policy::encode_snapshot(*next);
    current_ = std::move(next);
    activated_at_unix_ = now;
    outcome.kind = ReloadOutcome::Kind::Activated;
    outcome.message = "policy version " + current_->bundle.version + " active (serial " +
                      std::to_string(current_->serial) + ")";
    return outcome;
}

void PolicyState::set_consent_jwks(std::string jwks) {
    consent_jwks_ = std::move(jwks);
    if (current_ != nullptr) {
        auto next = std::make_shared<policy::Snapshot>(*current_);
        next->consent_jwks = consent_jwks_;
        encoded_ = policy::encode_snapshot(*next);
        current_ = std::move(next);
    }
}

}  // namespace ehrgate::policyd
