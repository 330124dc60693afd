// Wire protocol between the nginx module (and ehrgatectl) and policyd.
//
// A frame is a 4-byte big-endian payload length followed by a MessagePack payload:
//
//     [version:uint, type:uint, request_id:uint, body:map]
//
// Requests carry a caller-chosen request id; replies echo it and may arrive in any order, so a
// client can pipeline. Request id 0 is reserved for messages policyd pushes unprompted (a new
// policy snapshot). Bodies are maps with string keys: decoders skip keys they do not know, so a
// newer peer can add fields without breaking an older one. A change that old peers cannot
// ignore bumps kProtocolVersion, and policyd refuses frames of a version it does not speak.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/audit.hpp"

namespace ehrgate::protocol {

inline constexpr uint8_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderSize = 4;
// Large enough for a policy snapshot with a few thousand clients; small enough that a corrupt
// length prefix cannot make either side allocate without bound.
inline constexpr uint32_t kDefaultMaxFrame = 4u << 20;
inline constexpr uint32_t kPushRequestId = 0;

enum class MessageType : uint8_t {
    Error = 0,
    DecideRequest = 1,
    DecideReply = 2,
    PolicyFetch = 3,     // worker -> policyd: send me the current snapshot
    PolicySnapshot = 4,  // policyd -> worker: reply to PolicyFetch, or pushed with id 0
    PolicyAck = 5,       // worker -> policyd: snapshot applied (no reply)
    Ping = 6,
    Pong = 7,
    RevocationFetch = 8,  // worker -> policyd: send me the revocation list
    RevocationList = 9,   // policyd -> worker: reply to RevocationFetch, or pushed with id 0
    ConsentEpoch = 10,    // policyd -> worker, pushed with id 0: consent changed, forget decisions
    AdminRequest = 16,    // ehrgatectl -> policyd, admin socket only
    AdminReply = 17,
    // audit (issue 7): 20-25 reserved
    AuditAppend = 20,  // worker -> policyd: records to append durably
    AuditAck = 21,     // policyd -> worker: the records are durable (or why they are not)
};

const char *message_type_name(MessageType type);

struct FrameHeader {
    uint8_t version = kProtocolVersion;
    MessageType type = MessageType::Error;
    uint32_t request_id = 0;
};

// A decoded frame; `body` points into the decoder's buffer and is valid until the next feed().
struct FrameView {
    FrameHeader header;
    std::string_view body;  // the raw msgpack body map
};

enum class FrameError : uint8_t {
    None,
    Oversized,     // length prefix above the cap
    Malformed,     // payload is not [uint, uint, uint, map]
    BadVersion,    // protocol version we do not speak
    UnknownType,   // message type outside the enum
    TrailingBytes  // payload longer than the envelope it contains
};

const char *frame_error_name(FrameError error);

// Appends one complete frame (length prefix included) to `out`.
void encode_frame(std::string &out, MessageType type, uint32_t request_id, std::string_view body);

// Incremental decoder for a byte stream. Feed whatever the socket returned, then call next()
// until it returns nothing. After an error the stream is unusable: the connection must be closed,
// since framing can no longer be trusted.
class FrameDecoder {
  public:
    explicit FrameDecoder(uint32_t max_frame = kDefaultMaxFrame) : max_frame_(max_frame) {}

    void feed(std::string_view bytes);
    std::optional<FrameView> next();
    FrameError error() const { return error_; }
    size_t buffered() const { return buffer_.size() - consumed_; }

  private:
    std::string buffer_;
    size_t consumed_ = 0;
    uint32_t max_frame_;
    FrameError error_ = FrameError::None;
};

// ---- Message bodies --------------------------------------------------------------------------

enum class Decision : uint8_t { Deny = 0, Permit = 1 };

// What the worker knows about a request when it asks for a decision. No PHI beyond what the
// decision needs: the path and query identify resources, so policyd never logs them verbatim.
struct DecideRequest {
    std::string correlation_id;
    std::string method;
    std::string path;   // URI path, decoded by nginx
    std::string query;  // raw query string, without '?'
    std::string client_id;
    std::string host;
    // Consent (issue 5). Written only when non-empty, so older goldens keep their bytes; `{}`
    // initializers keep brace-initialized requests of the original fields compiling.
    std::string user{};                // fhirUser or sub of the token
    std::string patient{};             // the patient the request targets; empty: none known
    std::string purpose_of_use{};      // as asserted (claim, else X-Purpose-Of-Use); unvalidated
    std::string tenant{};              // reserved: policyd takes the tenant from the route
    std::string break_glass_reason{};  // X-Break-Glass-Reason or the claim; never logged
};

struct DecideReply {
    Decision decision = Decision::Deny;
    uint16_t http_status = 403;
    std::string reason;   // machine-readable, e.g. "method-not-allowed"
    std::string message;  // human-readable, safe to show the caller (no PHI)
    std::string policy_version;
    uint64_t policy_serial = 0;
    std::string route;
    std::string resource_type;
    std::string interaction;
    // Consent (issue 5). Written only when set.
    std::vector<std::string> obligations{};  // security label codes whose data must be withheld
    std::vector<std::string> consent_ids{};  // the consents that decided
    std::string decision_id{};
    std::string purpose_of_use{};  // the effective purpose; empty: missing/unknown (fallback)
    bool break_glass{false};
    // Compact JWS of the consent context, forwarded as X-Ehrgate-Consent (docs/consent.md).
    std::string consent_token{};
    // Decision cache (issue 5). The consent epoch the decision was made in (every consent change
    // moves it forward), and how long the worker may reuse the decision for an identical request
    // while the epoch holds; 0: never (break-glass, failures). Written only when set.
    uint64_t consent_epoch{0};
    uint32_t cache_ms{0};
};

// Pushed to every worker on a consent change (and sent once after connecting).
struct ConsentEpoch {
    uint64_t epoch = 0;
};

struct ErrorBody {
    std::string code;
    std::string message;
};

// Revoked tokens, as every worker must refuse them. Tokens are revoked by `jti` until the time
// given (the token's own expiry at the latest), and by client: every token of the client issued
// before `revoked_at` is refused.
struct RevocationList {
    uint64_t serial = 0;                                   // increases with every change
    std::vector<std::pair<std::string, int64_t>> jtis;     // (jti, revoked until, unix seconds)
    std::vector<std::pair<std::string, int64_t>> clients;  // (client id, revoked at, unix seconds)
};

struct PolicyAck {
    uint64_t serial = 0;
    uint32_t worker_pid = 0;
};

// Admin calls carry a command name and string arguments; the reply is a status and a JSON
// document meant for operators and scripts (ehrgatectl prints it).
struct AdminRequest {
    std::string command;
    std::vector<std::pair<std::string, std::string>> args;

    std::string_view arg(std::string_view name) const;
};

struct AdminReply {
    bool ok = false;
    std::string message;
    std::string json;
};

// ---- audit (issue 7) ----
// The records are acknowledged only once durably written (synced). `sync` says whether the
// worker holds a request until then (audit-before-release) or not (outcome records, async
// locations); policyd treats both alike. Every record carries a worker-chosen unique record_id:
// a record sent again after a lost ack is acknowledged without being stored twice.
inline constexpr size_t kMaxAuditRecordsPerAppend = 4096;
struct AuditAppend {
    bool sync = true;
    std::vector<audit::Record> records;
};
// ok: every record of the append is durable (newly or already). Otherwise none of them was
// written and `error` says why (map-full, io-error, busy, ...).
struct AuditAck {
    bool ok = false;
    std::vector<std::string> record_ids;
    std::string error;
    std::string message;
};
std::string encode(const AuditAppend &msg);
// The same bytes as encode(AuditAppend) for records already encoded with audit::encode_record.
std::string encode_audit_append(bool sync, std::span<const std::string> encoded_records);
std::string encode(const AuditAck &msg);
std::optional<AuditAppend> decode_audit_append(std::string_view body);
std::optional<AuditAck> decode_audit_ack(std::string_view body);

std::string encode(const DecideRequest &msg);
std::string encode(const DecideReply &msg);
std::string encode(const ErrorBody &msg);
std::string encode(const PolicyAck &msg);
std::string encode(const RevocationList &msg);
std::string encode(const ConsentEpoch &msg);
std::string encode(const AdminRequest &msg);
std::string encode(const AdminReply &msg);

std::optional<DecideRequest> decode_decide_request(std::string_view body);
std::optional<DecideReply> decode_decide_reply(std::string_view body);
std::optional<ErrorBody> decode_error(std::string_view body);
std::optional<PolicyAck> decode_policy_ack(std::string_view body);
std::optional<RevocationList> decode_revocation_list(std::string_view body);
std::optional<ConsentEpoch> decode_consent_epoch(std::string_view body);
std::optional<AdminRequest> decode_admin_request(std::string_view body);
std::optional<AdminReply> decode_admin_reply(std::string_view body);

// The empty body: an empty map.
std::string empty_body();

}  // namespace ehrgate::protocol
