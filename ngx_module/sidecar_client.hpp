// The worker's connection to policyd, driven entirely by nginx's event loop.
//
// One connection per worker; calls are pipelined and matched to replies by request id, so
// replies may arrive in any order. Pending calls live in a fixed table whose size is the queue
// bound: when it is full, or policyd is known to be down, a call fails at once instead of
// waiting, and the request is answered 503 (fail closed). The caller owns the per-call timeout;
// this class owns reconnecting with exponential backoff and the worker's copy of the policy
// snapshot, which policyd pushes on every reload.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/auth.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/protocol.hpp"
#include "ehrgate/revocation_set.hpp"
#include "ngx.hpp"

namespace ehrgate::ngx {

struct SidecarSettings {
    ngx_addr_t address{};  // AF_UNIX sockaddr, pool-owned by the configuration
    ngx_msec_t reconnect_min = 50;
    ngx_msec_t reconnect_max = 1000;
    uint32_t max_pending = 4096;
    uint32_t max_frame = protocol::kDefaultMaxFrame;
    size_t max_output_bytes = size_t{16} << 20;
};

enum class CallOutcome { Reply, Disconnected };

// Invoked exactly once per accepted call unless the call is cancelled first. `frame` is valid
// only during the callback (it points into the receive buffer).
using CallCompletion = void (*)(void *data, CallOutcome outcome, const protocol::FrameView *frame);

class SidecarClient {
  public:
    SidecarClient(const SidecarSettings &settings, ngx_log_t *log);
    ~SidecarClient();
    SidecarClient(const SidecarClient &) = delete;
    SidecarClient &operator=(const SidecarClient &) = delete;

    void start();

    // Queues a request. Returns its id (never 0), or 0 when the call cannot be accepted: policyd
    // is unreachable (between reconnect attempts) or the pending table is full.
    uint32_t call(protocol::MessageType type, std::string_view body, CallCompletion completion,
                  void *data);
    // Forgets a pending call (request finalized or timed out); a late reply is dropped.
    void cancel(uint32_t id);
    // A caller's timeout fired. Several in a row with nothing received means the connection is
    // wedged (policyd stopped reading), so it is dropped and re-established.
    void note_timeout();

    bool connected() const { return state_ == State::Connected; }
    // The snapshot this worker holds, or nullptr before the first one arrives.
    const policy::Snapshot *snapshot() const { return snapshot_.get(); }
    // For work that outlives a reload (a response streaming through redaction).
    std::shared_ptr<const policy::Snapshot> snapshot_ref() const { return snapshot_; }
    // The snapshot's authentication data, compiled; nullptr before the first snapshot or when it
    // could not be compiled (then bearer authentication fails closed).
    const auth::AuthPolicy *auth_policy() const { return auth_policy_.get(); }
    // Called with the new serial whenever a snapshot is applied (the token cache's generation).
    void on_policy_change(void (*callback)(uint64_t serial)) { policy_change_callback_ = callback; }
    // Called with the epoch policyd pushes on every consent change (the decision cache's).
    void on_consent_epoch(void (*callback)(uint64_t epoch)) { consent_epoch_callback_ = callback; }
    // True when this connection is up and delivered something within `window`: only then would a
    // consent change pushed by policyd have reached this worker, so only then may it answer from
    // cached decisions. An idle worker falls back to asking (and so hears from policyd again).
    bool heard_within(ngx_msec_t window) const {
        return state_ == State::Connected && heard_since_connect_ &&
               ngx_current_msec - last_heard_ <= window;
    }
    const RevocationSet &revocations() const { return revocations_; }
    // True once this connection has delivered the revocation list: until then a worker cannot
    // know which tokens are revoked, so bearer authentication fails closed.
    bool revocations_current() const { return revocations_current_; }
    // A reply said policyd decided with a newer snapshot than ours: fetch it now rather than
    // wait for the push (which may have been lost with a dropped connection).
    void saw_policy_serial(uint64_t serial);

  private:
    enum class State { Disconnected, Connected };

    struct Slot {
        uint16_t generation = 0;
        bool in_use = false;
        CallCompletion completion = nullptr;
        void *data = nullptr;
    };

    static void on_read_event(ngx_event_t *ev);
    static void on_write_event(ngx_event_t *ev);
    static void on_flush_event(ngx_event_t *ev);
    static void on_reconnect_timer(ngx_event_t *ev);
    static void on_snapshot(void *data, CallOutcome outcome, const protocol::FrameView *frame);
    static void on_revocations(void *data, CallOutcome outcome, const protocol::FrameView *frame);

    void connect();
    void disconnect(const char *why);
    void schedule_reconnect();
    void read_available();
    void flush();
    void dispatch(const protocol::FrameView &frame);
    void apply_snapshot(std::string_view body);
    void request_snapshot();
    void apply_revocations(std::string_view body);
    Slot *slot_for(uint32_t id);

    SidecarSettings settings_;
    ngx_log_t *log_;
    State state_ = State::Disconnected;
    ngx_connection_t *connection_ = nullptr;
    ngx_event_t flush_event_{};
    ngx_event_t reconnect_timer_{};
    ngx_msec_t backoff_;
    bool ever_connected_ = false;
    bool logged_unreachable_ = false;

    std::vector<Slot> slots_;
    std::vector<uint32_t> free_slots_;
    std::string output_;
    size_t output_sent_ = 0;
    std::unique_ptr<protocol::FrameDecoder> decoder_;
    unsigned consecutive_timeouts_ = 0;

    std::shared_ptr<const policy::Snapshot> snapshot_;
    std::shared_ptr<const auth::AuthPolicy> auth_policy_;
    void (*policy_change_callback_)(uint64_t serial) = nullptr;
    void (*consent_epoch_callback_)(uint64_t epoch) = nullptr;
    ngx_msec_t last_heard_ = 0;
    // Pushes sent while the connection was down are lost: only what arrives on this connection
    // counts.
    bool heard_since_connect_ = false;
    bool snapshot_requested_ = false;
    RevocationSet revocations_;
    bool revocations_current_ = false;
};

}  // namespace ehrgate::ngx
