// Data-plane message handling, independent of libuv so it is unit-tested directly: one frame in,
// reply frames appended to an output buffer.
#pragma once

#include <cstdint>
#include <string>

#include "consent_signer.hpp"
#include "consent_store.hpp"
#include "ehrgate/protocol.hpp"
#include "policy_state.hpp"
#include "revocations.hpp"

namespace ehrgate::policyd {

// What policyd knows about one connected nginx worker.
struct DataPeer {
    uint32_t worker_pid = 0;
    uint64_t acked_serial = 0;
    uint64_t decisions = 0;
};

struct DataCounters {
    uint64_t permits = 0;
    uint64_t denies = 0;
    uint64_t rejected_frames = 0;
    // Consent (issue 5)
    uint64_t consent_denies = 0;
    uint64_t break_glass = 0;  // permitted emergency accesses: each one is an alert
    uint64_t decision_seq = 0;
};

enum class DispatchResult { Ok, CloseConnection };

// `revocations` may be null (no revocation store): a fetch then gets an empty list.
// `consents` may be null (no consent store): consent is then not evaluated, which a bundle with
// a consent section turns into a refusal (fail closed).
DispatchResult handle_data_frame(const PolicyState &state, const protocol::FrameView &frame,
                                 DataPeer &peer, DataCounters &counters, std::string &out,
                                 const Revocations *revocations = nullptr,
                                 const ConsentStore *consents = nullptr,
                                 const ConsentSigner *signer = nullptr, uint64_t consent_epoch = 0);

// How long a worker may reuse a decision for an identical request (DecideReply::cache_ms), at
// most. Consent changes do not wait for it (they move the epoch); it bounds how long a decision
// outlives the clock-driven parts: a token's or consent's period, the consent context's expiry.
inline constexpr uint32_t kDecisionCacheMs = 4000;

// Consent (issue 5): after the policy permitted `request`, decides it against the patient's
// consents and the bundle's defaults, and fills the reply's consent fields (a refusal turns it
// into a 403). `now` is unix seconds. With a signer, a permit carries the signed consent context
// (consent_token); a signing failure refuses (503): the hops behind expect it. Lowers
// reply.cache_ms to what the decision allows (0 for break-glass and failures).
void apply_consent(const policy::Snapshot &snapshot, const protocol::DecideRequest &request,
                   const ConsentStore *consents, int64_t now, DataCounters &counters,
                   protocol::DecideReply &reply, const ConsentSigner *signer = nullptr);

// Frames sent to a peer that broke the protocol, right before the connection is closed.
void append_error_frame(std::string &out, uint32_t request_id, std::string_view code,
                        std::string_view message);

}  // namespace ehrgate::policyd
