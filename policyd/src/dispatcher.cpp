#include "dispatcher.hpp"

namespace ehrgate::policyd {

using protocol::MessageType;

void append_error_frame(std::string &out, uint32_t request_id, std::string_view code,
                        std::string_view message) {
    protocol::encode_frame(
        out, MessageType::Error, request_id,
        protocol::encode(protocol::ErrorBody{std::string(code), std::string(message)}));
}

DispatchResult handle_data_frame(const PolicyState &state, const protocol::FrameView &frame,
                                 DataPeer &peer, DataCounters &counters, std::string &out,
                                 const Revocations *revocations) {
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
            const protocol::DecideReply reply = policy::evaluate(state.snapshot(), *request);
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
