#include "ehrgate/protocol.hpp"

#include "ehrgate/msgpack.hpp"

namespace ehrgate::protocol {

namespace {

using msgpack::Reader;
using msgpack::Writer;

// Decodes a map body, calling on_field(key, reader) for every key. on_field must consume exactly
// one value for keys it knows and return false for keys it does not (they are skipped).
template <typename OnField>
bool decode_map(std::string_view body, OnField &&on_field) {
    Reader reader(body);
    const std::optional<uint32_t> count = reader.read_map();
    for (uint32_t i = 0; count && i < *count && reader.ok(); ++i) {
        const std::optional<std::string_view> key = reader.read_str();
        if (!key) {
            return false;
        }
        if (!on_field(*key, reader)) {
            reader.skip();
        }
    }
    return count && reader.ok() && reader.at_end();
}

bool read_into(Reader &reader, std::string &out) {
    const std::optional<std::string_view> v = reader.read_str();
    if (v) {
        out.assign(*v);
    }
    return true;
}

template <typename Int>
bool read_into_uint(Reader &reader, Int &out) {
    const std::optional<uint64_t> v = reader.read_uint();
    if (v && *v <= static_cast<uint64_t>(static_cast<Int>(~Int{0}))) {
        out = static_cast<Int>(*v);
    } else {
        reader.fail();
    }
    return true;
}

void put(Writer &w, std::string_view key, std::string_view value) {
    w.key(key);
    w.str(value);
}

// Consent (issue 5): lists of short strings (label codes, consent ids), bounded on decode.
constexpr uint32_t kMaxStrings = 1024;

void put_strings(Writer &w, std::string_view key, const std::vector<std::string> &values) {
    w.key(key);
    w.array(static_cast<uint32_t>(values.size()));
    for (const std::string &value : values) {
        w.str(value);
    }
}

bool read_strings(Reader &r, std::vector<std::string> &out) {
    const std::optional<uint32_t> n = r.read_array();
    if (!n || *n > kMaxStrings) {
        r.fail();
        return true;
    }
    for (uint32_t i = 0; i < *n && r.ok(); ++i) {
        const std::optional<std::string_view> v = r.read_str();
        if (!v) {
            r.fail();
            return true;
        }
        out.emplace_back(*v);
    }
    return true;
}

}  // namespace

const char *message_type_name(MessageType type) {
    switch (type) {
        case MessageType::Error:
            return "error";
        case MessageType::DecideRequest:
            return "decide-request";
        case MessageType::DecideReply:
            return "decide-reply";
        case MessageType::PolicyFetch:
            return "policy-fetch";
        case MessageType::PolicySnapshot:
            return "policy-snapshot";
        case MessageType::PolicyAck:
            return "policy-ack";
        case MessageType::Ping:
            return "ping";
        case MessageType::Pong:
            return "pong";
        case MessageType::RevocationFetch:
            return "revocation-fetch";
        case MessageType::ConsentEpoch:
            return "ConsentEpoch";
        case MessageType::RevocationList:
            return "revocation-list";
        case MessageType::AdminRequest:
            return "admin-request";
        case MessageType::AdminReply:
            return "admin-reply";
        case MessageType::AuditAppend:
            return "audit-append";
        case MessageType::AuditAck:
            return "audit-ack";
    }
    return "unknown";
}

const char *frame_error_name(FrameError error) {
    switch (error) {
        case FrameError::None:
            return "none";
        case FrameError::Oversized:
            return "frame exceeds size cap";
        case FrameError::Malformed:
            return "malformed frame envelope";
        case FrameError::BadVersion:
            return "unsupported protocol version";
        case FrameError::UnknownType:
            return "unknown message type";
        case FrameError::TrailingBytes:
            return "trailing bytes after frame body";
    }
    return "unknown";
}

void encode_frame(std::string &out, MessageType type, uint32_t request_id, std::string_view body) {
    const size_t length_at = out.size();
    out.append(kFrameHeaderSize, '\0');
    Writer w(out);
    w.array(4);
    w.uint(kProtocolVersion);
    w.uint(static_cast<uint8_t>(type));
    w.uint(request_id);
    out.append(body);
    const uint32_t length = static_cast<uint32_t>(out.size() - length_at - kFrameHeaderSize);
    for (size_t i = 0; i < kFrameHeaderSize; ++i) {
        out[length_at + i] = static_cast<char>(length >> (8 * (3 - i)));
    }
}

void FrameDecoder::feed(std::string_view bytes) {
    // Compact lazily: only when the consumed prefix dominates, so a stream of small frames does
    // not memmove on every read.
    if (consumed_ > 0 && consumed_ >= buffer_.size() / 2) {
        buffer_.erase(0, consumed_);
        consumed_ = 0;
    }
    buffer_.append(bytes);
}

std::optional<FrameView> FrameDecoder::next() {
    if (error_ != FrameError::None || buffer_.size() - consumed_ < kFrameHeaderSize) {
        return std::nullopt;
    }
    const auto *p = reinterpret_cast<const uint8_t *>(buffer_.data() + consumed_);
    const uint32_t length =
        (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
    if (length > max_frame_) {
        error_ = FrameError::Oversized;
        return std::nullopt;
    }
    if (buffer_.size() - consumed_ - kFrameHeaderSize < length) {
        return std::nullopt;
    }
    const std::string_view payload(buffer_.data() + consumed_ + kFrameHeaderSize, length);
    Reader reader(payload);
    const std::optional<uint32_t> fields = reader.read_array();
    const std::optional<uint64_t> version = reader.read_uint();
    const std::optional<uint64_t> type = reader.read_uint();
    const std::optional<uint64_t> id = reader.read_uint();
    const size_t body_start = reader.position();
    if (!fields || *fields != 4 || !version || !type || !id || *id > UINT32_MAX ||
        reader.peek_type() != msgpack::Type::Map) {
        error_ = FrameError::Malformed;
        return std::nullopt;
    }
    if (*version != kProtocolVersion) {
        error_ = FrameError::BadVersion;
        return std::nullopt;
    }
    const bool known_type = *type <= static_cast<uint8_t>(MessageType::ConsentEpoch) ||
                            *type == static_cast<uint8_t>(MessageType::AdminRequest) ||
                            *type == static_cast<uint8_t>(MessageType::AdminReply) ||
                            // audit (issue 7)
                            *type == static_cast<uint8_t>(MessageType::AuditAppend) ||
                            *type == static_cast<uint8_t>(MessageType::AuditAck);
    if (!known_type) {
        error_ = FrameError::UnknownType;
        return std::nullopt;
    }
    if (!reader.skip()) {
        error_ = FrameError::Malformed;
        return std::nullopt;
    }
    if (!reader.at_end()) {
        error_ = FrameError::TrailingBytes;
        return std::nullopt;
    }
    consumed_ += kFrameHeaderSize + length;
    FrameView frame;
    frame.header.version = static_cast<uint8_t>(*version);
    frame.header.type = static_cast<MessageType>(*type);
    frame.header.request_id = static_cast<uint32_t>(*id);
    frame.body = payload.substr(body_start);
    return frame;
}

std::string_view AdminRequest::arg(std::string_view name) const {
    for (const auto &[key, value] : args) {
        if (key == name) {
            return value;
        }
    }
    return {};
}

std::string empty_body() {
    std::string out;
    Writer(out).map(0);
    return out;
}

std::string encode(const DecideRequest &msg) {
    std::string out;
    // One allocation instead of a growth step every few fields (this runs for every request).
    out.reserve(192 + msg.correlation_id.size() + msg.path.size() + msg.query.size() +
                msg.client_id.size() + msg.host.size() + msg.user.size() + msg.patient.size() +
                msg.break_glass_reason.size());
    Writer w(out);
    // Consent fields (issue 5) only when set: requests without them keep their encoding.
    const std::pair<std::string_view, const std::string *> consent_fields[] = {
        {"user", &msg.user},
        {"patient", &msg.patient},
        {"purpose_of_use", &msg.purpose_of_use},
        {"tenant", &msg.tenant},
        {"break_glass_reason", &msg.break_glass_reason},
    };
    uint32_t extra = 0;
    for (const auto &[key, value] : consent_fields) {
        extra += value->empty() ? 0 : 1;
    }
    w.map(6 + extra);
    put(w, "correlation_id", msg.correlation_id);
    put(w, "method", msg.method);
    put(w, "path", msg.path);
    put(w, "query", msg.query);
    put(w, "client_id", msg.client_id);
    put(w, "host", msg.host);
    for (const auto &[key, value] : consent_fields) {
        if (!value->empty()) {
            put(w, key, *value);
        }
    }
    return out;
}

std::optional<DecideRequest> decode_decide_request(std::string_view body) {
    DecideRequest msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "correlation_id")
            return read_into(r, msg.correlation_id);
        if (key == "method")
            return read_into(r, msg.method);
        if (key == "path")
            return read_into(r, msg.path);
        if (key == "query")
            return read_into(r, msg.query);
        if (key == "client_id")
            return read_into(r, msg.client_id);
        if (key == "host")
            return read_into(r, msg.host);
        if (key == "user")
            return read_into(r, msg.user);
        if (key == "patient")
            return read_into(r, msg.patient);
        if (key == "purpose_of_use")
            return read_into(r, msg.purpose_of_use);
        if (key == "tenant")
            return read_into(r, msg.tenant);
        if (key == "break_glass_reason")
            return read_into(r, msg.break_glass_reason);
        return false;
    });
    if (!ok || msg.method.empty()) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const DecideReply &msg) {
    std::string out;
    out.reserve(384 + msg.message.size() + msg.consent_token.size());
    Writer w(out);
    // Consent fields (issue 5) only when set: replies without them keep their encoding.
    const bool has_obligations = !msg.obligations.empty();
    const bool has_consent_ids = !msg.consent_ids.empty();
    w.map(9 + (has_obligations ? 1 : 0) + (has_consent_ids ? 1 : 0) +
          (msg.decision_id.empty() ? 0 : 1) + (msg.purpose_of_use.empty() ? 0 : 1) +
          (msg.break_glass ? 1 : 0) + (msg.consent_token.empty() ? 0 : 1) +
          (msg.consent_epoch == 0 ? 0 : 1) + (msg.cache_ms == 0 ? 0 : 1));
    w.key("decision");
    w.uint(static_cast<uint8_t>(msg.decision));
    w.key("http_status");
    w.uint(msg.http_status);
    put(w, "reason", msg.reason);
    put(w, "message", msg.message);
    put(w, "policy_version", msg.policy_version);
    w.key("policy_serial");
    w.uint(msg.policy_serial);
    put(w, "route", msg.route);
    put(w, "resource_type", msg.resource_type);
    put(w, "interaction", msg.interaction);
    if (has_obligations) {
        put_strings(w, "obligations", msg.obligations);
    }
    if (has_consent_ids) {
        put_strings(w, "consent_ids", msg.consent_ids);
    }
    if (!msg.decision_id.empty()) {
        put(w, "decision_id", msg.decision_id);
    }
    if (!msg.purpose_of_use.empty()) {
        put(w, "purpose_of_use", msg.purpose_of_use);
    }
    if (msg.break_glass) {
        w.key("break_glass");
        w.boolean(true);
    }
    if (!msg.consent_token.empty()) {
        put(w, "consent_token", msg.consent_token);
    }
    if (msg.consent_epoch != 0) {
        w.key("consent_epoch");
        w.uint(msg.consent_epoch);
    }
    if (msg.cache_ms != 0) {
        w.key("cache_ms");
        w.uint(msg.cache_ms);
    }
    return out;
}

std::optional<DecideReply> decode_decide_reply(std::string_view body) {
    DecideReply msg;
    bool has_decision = false;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "decision") {
            const std::optional<uint64_t> v = r.read_uint();
            if (!v || *v > 1) {
                r.fail();
            } else {
                msg.decision = static_cast<Decision>(*v);
                has_decision = true;
            }
            return true;
        }
        if (key == "http_status")
            return read_into_uint(r, msg.http_status);
        if (key == "reason")
            return read_into(r, msg.reason);
        if (key == "message")
            return read_into(r, msg.message);
        if (key == "policy_version")
            return read_into(r, msg.policy_version);
        if (key == "policy_serial")
            return read_into_uint(r, msg.policy_serial);
        if (key == "route")
            return read_into(r, msg.route);
        if (key == "resource_type")
            return read_into(r, msg.resource_type);
        if (key == "interaction")
            return read_into(r, msg.interaction);
        if (key == "obligations")
            return read_strings(r, msg.obligations);
        if (key == "consent_ids")
            return read_strings(r, msg.consent_ids);
        if (key == "decision_id")
            return read_into(r, msg.decision_id);
        if (key == "purpose_of_use")
            return read_into(r, msg.purpose_of_use);
        if (key == "consent_token")
            return read_into(r, msg.consent_token);
        if (key == "consent_epoch")
            return read_into_uint(r, msg.consent_epoch);
        if (key == "cache_ms")
            return read_into_uint(r, msg.cache_ms);
        if (key == "break_glass") {
            const std::optional<bool> v = r.read_bool();
            if (!v) {
                r.fail();
            } else {
                msg.break_glass = *v;
            }
            return true;
        }
        return false;
    });
    // A reply without an explicit decision is garbage, never an implicit permit.
    if (!ok || !has_decision || msg.http_status < 100 || msg.http_status > 599) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const ErrorBody &msg) {
    std::string out;
    Writer w(out);
    w.map(2);
    put(w, "code", msg.code);
    put(w, "message", msg.message);
    return out;
}

std::optional<ErrorBody> decode_error(std::string_view body) {
    ErrorBody msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "code")
            return read_into(r, msg.code);
        if (key == "message")
            return read_into(r, msg.message);
        return false;
    });
    if (!ok) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const PolicyAck &msg) {
    std::string out;
    Writer w(out);
    w.map(2);
    w.key("serial");
    w.uint(msg.serial);
    w.key("worker_pid");
    w.uint(msg.worker_pid);
    return out;
}

std::optional<PolicyAck> decode_policy_ack(std::string_view body) {
    PolicyAck msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "serial")
            return read_into_uint(r, msg.serial);
        if (key == "worker_pid")
            return read_into_uint(r, msg.worker_pid);
        return false;
    });
    if (!ok) {
        return std::nullopt;
    }
    return msg;
}

namespace {

// Revocation lists are bounded like everything else decoded from the wire.
constexpr uint32_t kMaxRevocations = 1u << 20;

void put_pairs(Writer &w, std::string_view key,
               const std::vector<std::pair<std::string, int64_t>> &pairs) {
    w.key(key);
    w.array(static_cast<uint32_t>(pairs.size()));
    for (const auto &[name, when] : pairs) {
        w.array(2);
        w.str(name);
        w.sint(when);
    }
}

bool read_pairs(Reader &r, std::vector<std::pair<std::string, int64_t>> &out) {
    const std::optional<uint32_t> n = r.read_array();
    if (!n || *n > kMaxRevocations) {
        r.fail();
        return true;
    }
    for (uint32_t i = 0; i < *n && r.ok(); ++i) {
        const std::optional<uint32_t> fields = r.read_array();
        const std::optional<std::string_view> name = r.read_str();
        const std::optional<int64_t> when = r.read_int();
        if (fields != 2u || !name || !when) {
            r.fail();
            return true;
        }
        out.emplace_back(std::string(*name), *when);
    }
    return true;
}

}  // namespace

std::string encode(const RevocationList &msg) {
    std::string out;
    Writer w(out);
    w.map(3);
    w.key("serial");
    w.uint(msg.serial);
    put_pairs(w, "jtis", msg.jtis);
    put_pairs(w, "clients", msg.clients);
    return out;
}

std::optional<RevocationList> decode_revocation_list(std::string_view body) {
    RevocationList msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "serial")
            return read_into_uint(r, msg.serial);
        if (key == "jtis")
            return read_pairs(r, msg.jtis);
        if (key == "clients")
            return read_pairs(r, msg.clients);
        return false;
    });
    if (!ok) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const ConsentEpoch &msg) {
    std::string out;
    Writer w(out);
    w.map(1);
    w.key("epoch");
    w.uint(msg.epoch);
    return out;
}

std::optional<ConsentEpoch> decode_consent_epoch(std::string_view body) {
    ConsentEpoch msg;
    bool has_epoch = false;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "epoch") {
            has_epoch = true;
            return read_into_uint(r, msg.epoch);
        }
        return false;
    });
    if (!ok || !has_epoch) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const AdminRequest &msg) {
    std::string out;
    Writer w(out);
    w.map(2);
    put(w, "command", msg.command);
    w.key("args");
    w.map(static_cast<uint32_t>(msg.args.size()));
    for (const auto &[key, value] : msg.args) {
        put(w, key, value);
    }
    return out;
}

std::optional<AdminRequest> decode_admin_request(std::string_view body) {
    AdminRequest msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "command")
            return read_into(r, msg.command);
        if (key != "args")
            return false;
        const std::optional<uint32_t> n = r.read_map();
        for (uint32_t i = 0; n && i < *n && r.ok(); ++i) {
            const std::optional<std::string_view> k = r.read_str();
            const std::optional<std::string_view> v = r.read_str();
            if (k && v) {
                msg.args.emplace_back(std::string(*k), std::string(*v));
            }
        }
        return true;
    });
    if (!ok || msg.command.empty()) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const AdminReply &msg) {
    std::string out;
    Writer w(out);
    w.map(3);
    w.key("ok");
    w.boolean(msg.ok);
    put(w, "message", msg.message);
    put(w, "json", msg.json);
    return out;
}

std::optional<AdminReply> decode_admin_reply(std::string_view body) {
    AdminReply msg;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "ok") {
            msg.ok = r.read_bool().value_or(false);
            return true;
        }
        if (key == "message")
            return read_into(r, msg.message);
        if (key == "json")
            return read_into(r, msg.json);
        return false;
    });
    if (!ok) {
        return std::nullopt;
    }
    return msg;
}

// ---- audit (issue 7) ----

std::string encode(const AuditAppend &msg) {
    std::string out;
    Writer w(out);
    w.map(2);
    put(w, "mode", msg.sync ? "sync" : "async");
    w.key("records");
    w.array(static_cast<uint32_t>(msg.records.size()));
    for (const audit::Record &record : msg.records) {
        audit::encode_record_fields(out, record);
    }
    return out;
}

std::string encode_audit_append(bool sync, std::span<const std::string> encoded_records) {
    size_t size = 32;
    for (const std::string &record : encoded_records) {
        size += record.size();
    }
    std::string out;
    out.reserve(size);
    Writer w(out);
    w.map(2);
    put(w, "mode", sync ? "sync" : "async");
    w.key("records");
    w.array(static_cast<uint32_t>(encoded_records.size()));
    for (const std::string &record : encoded_records) {
        out += record;
    }
    return out;
}

std::optional<AuditAppend> decode_audit_append(std::string_view body) {
    AuditAppend msg;
    bool have_records = false;
    bool records_ok = true;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "mode") {
            const std::optional<std::string_view> mode = r.read_str();
            if (mode && *mode != "sync" && *mode != "async") {
                r.fail();
            }
            msg.sync = !mode || *mode == "sync";
            return true;
        }
        if (key == "records") {
            const std::optional<uint32_t> n = r.read_array();
            if (!n || *n > kMaxAuditRecordsPerAppend) {
                r.fail();
                return true;
            }
            have_records = true;
            msg.records.reserve(*n);
            for (uint32_t i = 0; i < *n && r.ok(); ++i) {
                const size_t start = r.position();
                if (!r.skip()) {
                    break;
                }
                std::optional<audit::Record> record =
                    audit::decode_record(body.substr(start, r.position() - start));
                // Without a record id redelivery could not be deduplicated: refuse.
                if (!record || record->record_id.empty()) {
                    records_ok = false;
                    continue;
                }
                msg.records.push_back(std::move(*record));
            }
            return true;
        }
        return false;
    });
    if (!ok || !have_records || !records_ok) {
        return std::nullopt;
    }
    return msg;
}

std::string encode(const AuditAck &msg) {
    std::string out;
    Writer w(out);
    w.map(4);
    w.key("ok");
    w.boolean(msg.ok);
    w.key("record_ids");
    w.array(static_cast<uint32_t>(msg.record_ids.size()));
    for (const std::string &id : msg.record_ids) {
        w.str(id);
    }
    put(w, "error", msg.error);
    put(w, "message", msg.message);
    return out;
}

std::optional<AuditAck> decode_audit_ack(std::string_view body) {
    AuditAck msg;
    bool have_ok = false;
    const bool ok = decode_map(body, [&](std::string_view key, Reader &r) {
        if (key == "ok") {
            const std::optional<bool> v = r.read_bool();
            have_ok = v.has_value();
            msg.ok = v.value_or(false);
            return true;
        }
        if (key == "record_ids") {
            const std::optional<uint32_t> n = r.read_array();
            if (!n || *n > kMaxAuditRecordsPerAppend) {
                r.fail();
                return true;
            }
            for (uint32_t i = 0; i < *n && r.ok(); ++i) {
                if (const std::optional<std::string_view> id = r.read_str()) {
                    msg.record_ids.emplace_back(*id);
                }
            }
            return true;
        }
        if (key == "error")
            return read_into(r, msg.error);
        if (key == "message")
            return read_into(r, msg.message);
        return false;
    });
    if (!ok || !have_ok) {
        return std::nullopt;
    }
    return msg;
}

}  // namespace ehrgate::protocol
