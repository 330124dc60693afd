#include "dispatcher.hpp"

#include <openssl/rand.h>

#include <algorithm>
#include <cstddef>
#include <ctime>

#include "log.hpp"

namespace ehrgate::policyd {

using protocol::MessageType;

void append_error_frame(std::string &out, uint32_t request_id, std::string_view code,
                        std::string_view message) {
    protocol::encode_frame(
        out, MessageType::Error, request_id,
        protocol::encode(protocol::ErrorBody{std::string(code), std::string(message)}));
}

void apply_consent(const policy::Snapshot &snapshot, const protocol::DecideRequest &request,
                   const ConsentStore *consents, int64_t now, DataCounters &counters,
                   protocol::DecideReply &reply, const ConsentSigner *signer) {
    const consent::ConsentPolicy &policy = snapshot.bundle.consent;
    // Requests the policy refused, unidentified callers (the public capability statement) and
    // capabilities carry no patient data: nothing to decide.
    if (!policy.enabled || reply.decision != protocol::Decision::Permit ||
        request.client_id.empty() || reply.interaction == "capabilities") {
        return;
    }
    static constexpr char kHex[] = "0123456789abcdef";
    // A random prefix per process keeps ids unique across restarts; the sequence within it.
    static const std::string prefix = [] {
        unsigned char bytes[4] = {};
        RAND_bytes(bytes, sizeof bytes);
        std::string out = "d-";
        for (const unsigned char b : bytes) {
            out += kHex[b >> 4];
            out += kHex[b & 0xf];
        }
        return out + "-";
    }();
    uint64_t seq = ++counters.decision_seq;
    reply.decision_id = prefix;
    for (int i = 0; i < 12; ++i, seq >>= 4) {
        reply.decision_id.insert(
            reply.decision_id.begin() + static_cast<std::ptrdiff_t>(prefix.size()),
            kHex[seq & 0xf]);
    }
    const auto refuse = [&](std::string_view reason, std::string_view message) {
        reply.decision = protocol::Decision::Deny;
        reply.http_status = 403;
        reply.reason = reason;
        reply.message = message;
        ++counters.consent_denies;
    };
    if (consents == nullptr) {
        refuse("consent-unavailable", "Consent cannot be checked; no decision was made");
        reply.cache_ms = 0;
        return;
    }
    const policy::Client *client = snapshot.bundle.find_client(request.client_id);
    const policy::Route *route = snapshot.bundle.match_route(request.path);
    consent::Request input;
    input.client_id = request.client_id;
    input.user = request.user;
    // The token's patient when it has one (the worker keeps the request in its compartment);
    // else the one patient the request names, if any.
    std::string named;
    if (request.patient.empty() && route != nullptr && request.path.starts_with(route->prefix)) {
        named = consent::named_patient(request.method, request.path.substr(route->prefix.size()),
                                       request.query);
    }
    input.patient = request.patient.empty() ? std::string_view(named) : request.patient;
    input.resource_type = reply.resource_type;
    input.interaction = reply.interaction;
    input.purpose = request.purpose_of_use;
    input.tenant = route != nullptr ? std::string_view(route->tenant) : std::string_view();
    input.break_glass_reason = request.break_glass_reason;
    if (client != nullptr) {
        input.client_purposes = client->purposes;
    }
    input.now = now;
    const std::span<const consent::Record> records = consents->for_patient(input.patient);
    consent::Decision decision = consent::decide(policy, input, records);
    // The same request gets the same answer until a consent changes (the epoch moves, and the
    // workers drop every cached decision) or a period starts or ends: cache no longer than that.
    if (const std::optional<int64_t> boundary = consent::next_period_boundary(records, now)) {
        reply.cache_ms = static_cast<uint32_t>(
            std::min<int64_t>(reply.cache_ms, std::max<int64_t>(0, *boundary - now - 1) * 1000));
    }
    reply.purpose_of_use = decision.purpose;
    reply.consent_ids = std::move(decision.consent_ids);
    if (!decision.permit) {
        refuse(decision.reason, decision.message);
        return;
    }
    reply.obligations = std::move(decision.obligations);
    reply.break_glass = decision.break_glass;
    if (reply.break_glass) {
        reply.cache_ms = 0;  // every emergency access is decided, logged and alerted on its own
    }
    if (signer != nullptr) {
        ConsentContext context;
        context.purpose_of_use = reply.purpose_of_use;
        context.decision = "permit";
        context.obligations = reply.obligations;
        context.consent_ids = reply.consent_ids;
        context.decision_id = reply.decision_id;
        context.patient = input.patient;
        context.resource_type = reply.resource_type;
        context.interaction = reply.interaction;
        context.client_id = request.client_id;
        context.break_glass = reply.break_glass;
        context.issued_at = now;
        context.expires_at = now + ConsentSigner::kLifetimeSeconds;
        reply.consent_token = signer->sign(context);
        if (reply.consent_token.empty()) {
            refuse("consent-unavailable", "The consent context could not be signed");
            reply.http_status = 503;
            reply.cache_ms = 0;
            return;
        }
        // A cached decision forwards this token again: never past a second before its expiry,
        // so the hop behind always has time to verify it.
        reply.cache_ms = static_cast<uint32_t>(
            std::min<int64_t>(reply.cache_ms, (context.expires_at - now - 1) * 1000));
    }
    if (decision.break_glass) {
        ++counters.break_glass;
        // No PHI: the correlation id and decision id lead to the audit record.
        log::warn("break-glass access by client " + request.client_id + " for purpose " +
                  decision.purpose + " (decision " + reply.decision_id + ", correlation " +
                  request.correlation_id + ")");
    }
}

DispatchResult handle_data_frame(const PolicyState &state, const protocol::FrameView &frame,
                                 DataPeer &peer, DataCounters &counters, std::string &out,
                                 const Revocations *revocations, const ConsentStore *consents,
                                 const ConsentSigner *signer, uint64_t consent_epoch) {
    const uint32_t id = frame.header.request_id;
    switch (frame.header.type) {
        case MessageType::DecideRequest: {
            const std::optional<protocol::DecideRequest> request =
                protocol::decode_decide_request(frame.body);
            if (!request) {
                ++counters.rejected_frames;
                append_error_frame(out, id, "bad-request", "undecodable decide request");
                return DispatchResult::Ok;  // framing is intact; only this message was bad
            }
            protocol::DecideReply reply = policy::evaluate(state.snapshot(), *request);
            reply.consent_epoch = consent_epoch;
            reply.cache_ms = reply.http_status < 500 && request->break_glass_reason.empty()
                                 ? kDecisionCacheMs
                                 : 0;
            apply_consent(state.snapshot(), *request, consents,
                          static_cast<int64_t>(std::time(nullptr)), counters, reply, signer);
            ++peer.decisions;
            ++(reply.decision == protocol::Decision::Permit ? counters.permits : counters.denies);
            protocol::encode_frame(out, MessageType::DecideReply, id, protocol::encode(reply));
            return DispatchResult::Ok;
        }
        case MessageType::PolicyFetch:
            protocol::encode_frame(out, MessageType::PolicySnapshot, id, state.encoded());
            return DispatchResult::Ok;
        case MessageType::PolicyAck: {
            const std::optional<protocol::PolicyAck> ack = protocol::decode_policy_ack(frame.body);
            if (ack) {
                peer.acked_serial = ack->serial;
                peer.worker_pid = ack->worker_pid;
            }
            return DispatchResult::Ok;
        }
        case MessageType::RevocationFetch:
            protocol::encode_frame(out, MessageType::RevocationList, id,
                                   revocations != nullptr
                                       ? revocations->encoded()
                                       : protocol::encode(protocol::RevocationList{}));
            return DispatchResult::Ok;
        case MessageType::Ping:
            protocol::encode_frame(out, MessageType::Pong, id, protocol::empty_body());
            return DispatchResult::Ok;
        default:
            // Replies, pushes and admin calls have no business on the data socket.
            ++counters.rejected_frames;
            append_error_frame(out, id, "unexpected-message",
                               std::string("message type not accepted on the data socket: ") +
                                   protocol::message_type_name(frame.header.type));
            return DispatchResult::CloseConnection;
    }
}

}  // namespace ehrgate::policyd
