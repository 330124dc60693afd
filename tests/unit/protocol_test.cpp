#include "ehrgate/protocol.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ehrgate/msgpack.hpp"

namespace ehrgate::protocol {
namespace {

std::string hex(std::string_view bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    for (const char ch : bytes) {
        const auto b = static_cast<uint8_t>(ch);
        out.push_back(kHex[b >> 4]);
        out.push_back(kHex[b & 0xf]);
    }
    return out;
}

std::string unhex(std::string_view text) {
    auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    std::string out;
    for (size_t i = 0; i + 1 < text.size(); i += 2) {
        out.push_back(static_cast<char>(nibble(text[i]) << 4 | nibble(text[i + 1])));
    }
    return out;
}

std::string frame(MessageType type, uint32_t request_id, std::string_view body) {
    std::string out;
    encode_frame(out, type, request_id, body);
    return out;
}

// A payload (the bytes after the length prefix) with its length prefix in front.
std::string with_length(std::string_view payload) {
    std::string out(4, '\0');
    const auto n = static_cast<uint32_t>(payload.size());
    for (int i = 0; i < 4; ++i) {
        out[i] = static_cast<char>(n >> (24 - 8 * i));
    }
    return out.append(payload);
}

// A decoded frame with its body copied out of the decoder's buffer.
struct Frame {
    MessageType type;
    uint32_t request_id;
    std::string body;

    bool operator==(const Frame &) const = default;
};

void PrintTo(const Frame &f, std::ostream *os) {
    *os << message_type_name(f.type) << " #" << f.request_id << " " << hex(f.body);
}

void drain(FrameDecoder &decoder, std::vector<Frame> &out) {
    while (std::optional<FrameView> view = decoder.next()) {
        EXPECT_EQ(view->header.version, kProtocolVersion);
        out.push_back({view->header.type, view->header.request_id, std::string(view->body)});
    }
}

// Feeds `bytes` in one piece and returns the error the decoder ends in.
FrameError error_for(std::string_view bytes, uint32_t max_frame = kDefaultMaxFrame) {
    FrameDecoder decoder(max_frame);
    decoder.feed(bytes);
    std::vector<Frame> frames;
    drain(decoder, frames);
    EXPECT_TRUE(frames.empty());
    return decoder.error();
}

// ---- Golden frames ---------------------------------------------------------------------------

// Any change here is a wire-format change: old peers would stop understanding new ones. Bump
// kProtocolVersion (and update these bytes) only on purpose.
TEST(ProtocolGolden, DecideRequestFrame) {
    DecideRequest msg;
    msg.correlation_id = "c-1";
    msg.method = "GET";
    msg.path = "/fhir/Patient/123";
    msg.query = "_format=json";
    msg.client_id = "demo-clinician-app";
    msg.host = "ehr.example";
    EXPECT_EQ(hex(frame(MessageType::DecideRequest, 7, encode(msg))),
              "0000007b9401010786ae636f7272656c6174696f6e5f6964a3632d31a66d6574686f64a3474554a4"
              "70617468b12f666869722f50617469656e742f313233a57175657279ac5f666f726d61743d6a736f"
              "6ea9636c69656e745f6964b264656d6f2d636c696e696369616e2d617070a4686f7374ab6568722e"
              "6578616d706c65");
}

TEST(ProtocolGolden, DecideReplyFrame) {
    DecideReply msg;
    msg.decision = Decision::Permit;
    msg.http_status = 200;
    msg.reason = "permitted";
    msg.message = "ok";
    msg.policy_version = "v1";
    msg.policy_serial = 3;
    msg.route = "fhir";
    msg.resource_type = "Patient";
    msg.interaction = "read";
    EXPECT_EQ(hex(frame(MessageType::DecideReply, 7, encode(msg))),
              "0000008c9401020789a86465636973696f6e01ab687474705f737461747573ccc8a6726561736f6e"
              "a97065726d6974746564a76d657373616765a26f6bae706f6c6963795f76657273696f6ea27631ad"
              "706f6c6963795f73657269616c03a5726f757465a466686972ad7265736f757263655f74797065a7"
              "50617469656e74ab696e746572616374696f6ea472656164");
}

TEST(ProtocolGolden, ErrorFrame) {
    EXPECT_EQ(hex(frame(MessageType::Error, 9, encode(ErrorBody{"bad-request", "m"}))),
              "000000209401000982a4636f6465ab6261642d72657175657374a76d657373616765a16d");
}

TEST(ProtocolGolden, PolicyFrames) {
    EXPECT_EQ(hex(frame(MessageType::PolicyFetch, 1, empty_body())), "000000059401030180");
    // The snapshot body is policy::encode_snapshot()'s business (tested there); the frame
    // carries whatever map it is given.
    EXPECT_EQ(hex(frame(MessageType::PolicySnapshot, kPushRequestId, unhex("81a673657269616c02"))),
              "0000000d9401040081a673657269616c02");
    EXPECT_EQ(hex(frame(MessageType::PolicyAck, 2, encode(PolicyAck{300, 70000}))),
              "0000001f9401050282a673657269616ccd012caa776f726b65725f706964ce00011170");
}

TEST(ProtocolGolden, PingPongFrames) {
    EXPECT_EQ(hex(frame(MessageType::Ping, 65536, empty_body())), "00000009940106ce0001000080");
    EXPECT_EQ(hex(frame(MessageType::Pong, 65536, empty_body())), "00000009940107ce0001000080");
}

TEST(ProtocolGolden, AdminFrames) {
    AdminRequest request;
    request.command = "policy-reload";
    request.args = {{"path", "/etc/p.yaml"}};
    EXPECT_EQ(hex(frame(MessageType::AdminRequest, 300, encode(request))),
              "00000034940110cd012c82a7636f6d6d616e64ad706f6c6963792d72656c6f6164a46172677381a4"
              "70617468ab2f6574632f702e79616d6c");
    EXPECT_EQ(hex(frame(MessageType::AdminReply, 300, encode(AdminReply{true, "reloaded", "{}"}))),
              "00000024940111cd012c83a26f6bc3a76d657373616765a872656c6f61646564a46a736f6ea27b7d");
}

TEST(ProtocolGolden, EncodeFrameAppends) {
    std::string out = "xy";
    encode_frame(out, MessageType::Ping, 1, empty_body());
    encode_frame(out, MessageType::Pong, 1, empty_body());
    EXPECT_EQ(hex(out),
              "7879"
              "000000059401060180"
              "000000059401070180");
}

TEST(ProtocolNames, EveryTypeAndErrorHasADistinctName) {
    const MessageType types[] = {
        MessageType::Error,          MessageType::DecideRequest,  MessageType::DecideReply,
        MessageType::PolicyFetch,    MessageType::PolicySnapshot, MessageType::PolicyAck,
        MessageType::Ping,           MessageType::Pong,           MessageType::RevocationFetch,
        MessageType::RevocationList, MessageType::ConsentEpoch,   MessageType::AdminRequest,
        MessageType::AdminReply,     MessageType::AuditAppend,    MessageType::AuditAck};
    std::set<std::string> names;
    for (const MessageType type : types) {
        names.insert(message_type_name(type));
    }
    EXPECT_EQ(names.size(), std::size(types));
    EXPECT_EQ(names.count("unknown"), 0u);
    EXPECT_STREQ(message_type_name(static_cast<MessageType>(99)), "unknown");

    std::set<std::string> errors;
    for (const FrameError error :
         {FrameError::None, FrameError::Oversized, FrameError::Malformed, FrameError::BadVersion,
          FrameError::UnknownType, FrameError::TrailingBytes}) {
        errors.insert(frame_error_name(error));
    }
    EXPECT_EQ(errors.size(), 6u);
}

// ---- FrameDecoder: stream handling -----------------------------------------------------------

// Three pipelined frames of different types and sizes.
std::string three_frames() {
    DecideRequest request;
    request.correlation_id = "corr";
    request.method = "GET";
    request.path = "/fhir/Observation";
    request.query = "code=1234-5&_count=10";
    std::string stream;
    encode_frame(stream, MessageType::DecideRequest, 1, encode(request));
    encode_frame(stream, MessageType::Ping, 2, empty_body());
    encode_frame(stream, MessageType::PolicyAck, std::numeric_limits<uint32_t>::max(),
                 encode(PolicyAck{7, 1234}));
    return stream;
}

std::vector<Frame> expected_three_frames() {
    DecideRequest request;
    request.correlation_id = "corr";
    request.method = "GET";
    request.path = "/fhir/Observation";
    request.query = "code=1234-5&_count=10";
    return {
        {MessageType::DecideRequest, 1, encode(request)},
        {MessageType::Ping, 2, empty_body()},
        {MessageType::PolicyAck, std::numeric_limits<uint32_t>::max(), encode(PolicyAck{7, 1234})}};
}

TEST(FrameDecoder, OneFeed) {
    FrameDecoder decoder;
    decoder.feed(three_frames());
    std::vector<Frame> frames;
    drain(decoder, frames);
    EXPECT_EQ(frames, expected_three_frames());
    EXPECT_EQ(decoder.error(), FrameError::None);
    EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, EverySplitIntoTwoChunks) {
    const std::string stream = three_frames();
    for (size_t split = 0; split <= stream.size(); ++split) {
        SCOPED_TRACE(split);
        FrameDecoder decoder;
        std::vector<Frame> frames;
        decoder.feed(std::string_view(stream).substr(0, split));
        drain(decoder, frames);
        decoder.feed(std::string_view(stream).substr(split));
        drain(decoder, frames);
        EXPECT_EQ(frames, expected_three_frames());
        EXPECT_EQ(decoder.error(), FrameError::None);
        EXPECT_EQ(decoder.buffered(), 0u);
    }
}

TEST(FrameDecoder, EverySplitIntoThreeChunks) {
    const std::string stream = three_frames();
    for (size_t a = 0; a <= stream.size(); ++a) {
        for (size_t b = a; b <= stream.size(); ++b) {
            FrameDecoder decoder;
            std::vector<Frame> frames;
            decoder.feed(std::string_view(stream).substr(0, a));
            drain(decoder, frames);
            decoder.feed(std::string_view(stream).substr(a, b - a));
            drain(decoder, frames);
            decoder.feed(std::string_view(stream).substr(b));
            drain(decoder, frames);
            ASSERT_EQ(frames, expected_three_frames()) << "split at " << a << ", " << b;
        }
    }
}

TEST(FrameDecoder, ByteByByte) {
    const std::string stream = three_frames();
    FrameDecoder decoder;
    std::vector<Frame> frames;
    for (const char ch : stream) {
        decoder.feed(std::string_view(&ch, 1));
        drain(decoder, frames);
    }
    EXPECT_EQ(frames, expected_three_frames());
    EXPECT_EQ(decoder.buffered(), 0u);
}

TEST(FrameDecoder, ManySmallFramesKeepTheBufferBounded) {
    // Lazy compaction must still compact: a long-lived connection does not grow its buffer.
    const std::string one = frame(MessageType::Ping, 1, empty_body());
    FrameDecoder decoder;
    std::vector<Frame> frames;
    for (int i = 0; i < 10000; ++i) {
        decoder.feed(one.substr(0, 3));
        drain(decoder, frames);
        decoder.feed(one.substr(3));
        drain(decoder, frames);
    }
    EXPECT_EQ(frames.size(), 10000u);
    EXPECT_EQ(decoder.buffered(), 0u);
    EXPECT_EQ(decoder.error(), FrameError::None);
}

TEST(FrameDecoder, TruncatedFramesWaitWithoutError) {
    const std::string one =
        frame(MessageType::DecideRequest, 5, encode(DecideRequest{"c", "GET", "/p", "", "", ""}));
    for (size_t len = 0; len < one.size(); ++len) {
        SCOPED_TRACE(len);
        FrameDecoder decoder;
        decoder.feed(std::string_view(one).substr(0, len));
        EXPECT_EQ(decoder.next(), std::nullopt);
        EXPECT_EQ(decoder.next(), std::nullopt);
        EXPECT_EQ(decoder.error(), FrameError::None);
        EXPECT_EQ(decoder.buffered(), len);
        decoder.feed(std::string_view(one).substr(len));
        const std::optional<FrameView> view = decoder.next();
        ASSERT_TRUE(view.has_value());
        EXPECT_EQ(view->header.request_id, 5u);
    }
}

TEST(FrameDecoder, OversizedPrefixFailsBeforeTheBodyArrives) {
    // The cap is checked on the 4-byte prefix alone: no waiting for (or buffering) the body.
    FrameDecoder decoder(100);
    decoder.feed(unhex("00000065"));  // 101
    EXPECT_EQ(decoder.next(), std::nullopt);
    EXPECT_EQ(decoder.error(), FrameError::Oversized);

    EXPECT_EQ(error_for(unhex("ffffffff")), FrameError::Oversized);
    EXPECT_EQ(error_for(unhex("00400001")), FrameError::Oversized);  // kDefaultMaxFrame + 1

    // At the cap exactly, the decoder waits for the body.
    FrameDecoder at_cap(100);
    at_cap.feed(unhex("00000064"));
    EXPECT_EQ(at_cap.next(), std::nullopt);
    EXPECT_EQ(at_cap.error(), FrameError::None);
    // And a frame of exactly the cap decodes.
    // [1, 6, 1, {"k": bin8 of 91 bytes}] is 4 + 3 + 2 + 91 = 100 bytes.
    const std::string body = unhex("81a16bc45b") + std::string(91, 'x');
    const std::string exact = frame(MessageType::Ping, 1, body);
    ASSERT_EQ(exact.size(), 104u);
    FrameDecoder exact_decoder(100);
    exact_decoder.feed(exact);
    EXPECT_TRUE(exact_decoder.next().has_value());
}

TEST(FrameDecoder, AfterAnErrorNothingMoreIsDecoded) {
    FrameDecoder decoder;
    decoder.feed(with_length(unhex("9402010780")));  // bad version
    EXPECT_EQ(decoder.next(), std::nullopt);
    EXPECT_EQ(decoder.error(), FrameError::BadVersion);
    decoder.feed(frame(MessageType::Ping, 1, empty_body()));
    EXPECT_EQ(decoder.next(), std::nullopt);
    EXPECT_EQ(decoder.error(), FrameError::BadVersion);
}

TEST(FrameDecoder, GoodFramesBeforeABadOneAreDelivered) {
    std::string stream = frame(MessageType::Ping, 1, empty_body());
    stream += with_length(unhex("9401630780"));  // type 99
    FrameDecoder decoder;
    decoder.feed(stream);
    std::vector<Frame> frames;
    drain(decoder, frames);
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_EQ(frames[0].type, MessageType::Ping);
    EXPECT_EQ(decoder.error(), FrameError::UnknownType);
}

// ---- FrameDecoder: envelope errors -----------------------------------------------------------

TEST(FrameDecoder, EnvelopeErrors) {
    struct Case {
        const char *payload_hex;
        FrameError error;
    };
    const Case cases[] = {
        // Well-formed, for reference.
        {"9401060780", FrameError::None},
        {"940106ceffffffff80", FrameError::None},
        // Version.
        {"9400060780", FrameError::BadVersion},
        {"9402060780", FrameError::BadVersion},
        {"94cd0101060780", FrameError::BadVersion},
        // Types outside the enum.
        {"9401120780", FrameError::UnknownType},
        {"9401630780", FrameError::UnknownType},
        {"94017f0780", FrameError::UnknownType},
        {"9401ccff0780", FrameError::UnknownType},
        {"9401cd01010780", FrameError::UnknownType},  // 257 would truncate to 1 in a uint8_t
        {"9401cf00000001000000010780", FrameError::UnknownType},
        // Trailing bytes after the body map.
        {"9401060780c0", FrameError::TrailingBytes},
        {"940106078000", FrameError::TrailingBytes},
        // Envelope shape.
        {"", FrameError::Malformed},
        {"c0", FrameError::Malformed},
        {"80", FrameError::Malformed},
        {"93010607", FrameError::Malformed},
        {"9301060780", FrameError::Malformed},
        {"950106078080", FrameError::Malformed},
        {"dc000401060780", FrameError::None},  // array16 of 4 is still an array of 4
        {"94a131060780", FrameError::Malformed},
        {"94ff060780", FrameError::Malformed},                  // negative version
        {"9401ff0780", FrameError::Malformed},                  // negative type
        {"940106ff80", FrameError::Malformed},                  // negative request id
        {"940106cf000000010000000080", FrameError::Malformed},  // request id above uint32
        // Body not a map.
        {"94010607c0", FrameError::Malformed},
        {"9401060790", FrameError::Malformed},
        {"94010607a0", FrameError::Malformed},
        {"94010607", FrameError::Malformed},
        // Body map cut short inside the payload.
        {"9401060781a16b", FrameError::Malformed},
        {"9401060781", FrameError::Malformed},
        {"9401060782a16bc0", FrameError::Malformed},
    };
    for (const Case &c : cases) {
        SCOPED_TRACE(c.payload_hex);
        FrameDecoder decoder;
        decoder.feed(with_length(unhex(c.payload_hex)));
        const std::optional<FrameView> view = decoder.next();
        EXPECT_EQ(decoder.error(), c.error) << frame_error_name(decoder.error());
        EXPECT_EQ(view.has_value(), c.error == FrameError::None);
    }
}

TEST(FrameDecoder, RandomGarbageNeverCrashes) {
    std::mt19937 rng(12345);
    int errors = 0;
    int waiting = 0;
    for (int round = 0; round < 2000; ++round) {
        std::string garbage(rng() % 64, '\0');
        for (char &c : garbage) {
            c = static_cast<char>(rng());
        }
        FrameDecoder decoder(1024);
        std::vector<Frame> frames;
        for (size_t at = 0; at < garbage.size();) {
            const size_t chunk = std::min<size_t>(1 + rng() % 8, garbage.size() - at);
            decoder.feed(std::string_view(garbage).substr(at, chunk));
            drain(decoder, frames);
            at += chunk;
        }
        if (decoder.error() != FrameError::None) {
            ++errors;
            EXPECT_EQ(decoder.next(), std::nullopt);
            continue;
        }
        // No error: the decoder must be waiting for the rest of a frame it cannot finish yet.
        ++waiting;
        if (decoder.buffered() >= kFrameHeaderSize) {
            const std::string_view rest =
                std::string_view(garbage).substr(garbage.size() - decoder.buffered());
            const uint32_t length = (uint32_t{static_cast<uint8_t>(rest[0])} << 24) |
                                    (uint32_t{static_cast<uint8_t>(rest[1])} << 16) |
                                    (uint32_t{static_cast<uint8_t>(rest[2])} << 8) |
                                    uint32_t{static_cast<uint8_t>(rest[3])};
            EXPECT_GT(length, decoder.buffered() - kFrameHeaderSize);
        }
    }
    // Both outcomes happen with this seed, so the test exercises both paths.
    EXPECT_GT(errors, 0);
    EXPECT_GT(waiting, 0);
}

TEST(FrameDecoder, RandomPayloadUnderAValidPrefixIsAFrameOrAnError) {
    // With a length prefix that matches, the decoder has everything it needs: it must decide.
    std::mt19937 rng(777);
    for (int round = 0; round < 5000; ++round) {
        std::string payload;
        // Start like a real envelope half of the time, so the later checks are reached too.
        if (rng() % 2 == 0) {
            payload = unhex("9401");
            payload.push_back(static_cast<char>(rng() % 20));
            payload.push_back(static_cast<char>(rng() % 128));
        }
        const size_t extra = rng() % 24;
        for (size_t i = 0; i < extra; ++i) {
            payload.push_back(static_cast<char>(rng()));
        }
        FrameDecoder decoder;
        decoder.feed(with_length(payload));
        const std::optional<FrameView> view = decoder.next();
        ASSERT_NE(view.has_value(), decoder.error() != FrameError::None) << hex(payload);
        if (view) {
            EXPECT_EQ(decoder.buffered(), 0u);
        }
    }
}

// ---- Message bodies --------------------------------------------------------------------------

DecideRequest sample_request() {
    DecideRequest msg;
    msg.correlation_id = "01HZX3J5QK";
    msg.method = "POST";
    msg.path = "/fhir/Observation/_search";
    msg.query = std::string(40, 'q') + "=\xc3\xa9";
    msg.client_id = "demo-batch";
    msg.host = "ehr.example:8443";
    return msg;
}

DecideReply sample_reply() {
    DecideReply msg;
    msg.decision = Decision::Deny;
    msg.http_status = 403;
    msg.reason = "resource-type-not-permitted";
    msg.message = "The gateway policy does not permit access to this resource type";
    msg.policy_version = "sandbox-2026.11.25-1";
    msg.policy_serial = std::numeric_limits<uint64_t>::max();
    msg.route = "fhir";
    msg.resource_type = "AllergyIntolerance";
    msg.interaction = "search-type";
    return msg;
}

void expect_same(const DecideRequest &a, const DecideRequest &b) {
    EXPECT_EQ(a.correlation_id, b.correlation_id);
    EXPECT_EQ(a.method, b.method);
    EXPECT_EQ(a.path, b.path);
    EXPECT_EQ(a.query, b.query);
    EXPECT_EQ(a.client_id, b.client_id);
    EXPECT_EQ(a.host, b.host);
}

void expect_same(const DecideReply &a, const DecideReply &b) {
    EXPECT_EQ(a.decision, b.decision);
    EXPECT_EQ(a.http_status, b.http_status);
    EXPECT_EQ(a.reason, b.reason);
    EXPECT_EQ(a.message, b.message);
    EXPECT_EQ(a.policy_version, b.policy_version);
    EXPECT_EQ(a.policy_serial, b.policy_serial);
    EXPECT_EQ(a.route, b.route);
    EXPECT_EQ(a.resource_type, b.resource_type);
    EXPECT_EQ(a.interaction, b.interaction);
}

TEST(ProtocolBodies, RoundTrips) {
    const std::optional<DecideRequest> request = decode_decide_request(encode(sample_request()));
    ASSERT_TRUE(request.has_value());
    expect_same(*request, sample_request());

    const std::optional<DecideReply> reply = decode_decide_reply(encode(sample_reply()));
    ASSERT_TRUE(reply.has_value());
    expect_same(*reply, sample_reply());

    const std::optional<ErrorBody> error = decode_error(encode(ErrorBody{"c", "m\n\"x\""}));
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->code, "c");
    EXPECT_EQ(error->message, "m\n\"x\"");

    const std::optional<PolicyAck> ack =
        decode_policy_ack(encode(PolicyAck{std::numeric_limits<uint64_t>::max(), 4000000000u}));
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->serial, std::numeric_limits<uint64_t>::max());
    EXPECT_EQ(ack->worker_pid, 4000000000u);

    AdminRequest admin;
    admin.command = "status";
    admin.args = {{"a", "1"}, {"b", ""}, {"a", "2"}};
    const std::optional<AdminRequest> admin_back = decode_admin_request(encode(admin));
    ASSERT_TRUE(admin_back.has_value());
    EXPECT_EQ(admin_back->command, "status");
    EXPECT_EQ(admin_back->args, admin.args);
    EXPECT_EQ(admin_back->arg("a"), "1");  // the first one wins
    EXPECT_EQ(admin_back->arg("b"), "");
    EXPECT_EQ(admin_back->arg("missing"), "");

    for (const bool ok : {false, true}) {
        const std::optional<AdminReply> admin_reply =
            decode_admin_reply(encode(AdminReply{ok, "done", R"({"serial":2})"}));
        ASSERT_TRUE(admin_reply.has_value());
        EXPECT_EQ(admin_reply->ok, ok);
        EXPECT_EQ(admin_reply->message, "done");
        EXPECT_EQ(admin_reply->json, R"({"serial":2})");
    }
}

TEST(ProtocolBodies, DecisionCacheFields) {
    DecideReply reply = sample_reply();
    const std::string without = encode(reply);
    reply.consent_epoch = 1795980000123456ULL;
    reply.cache_ms = 4000;
    const std::optional<DecideReply> back = decode_decide_reply(encode(reply));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(back->consent_epoch, 1795980000123456ULL);
    EXPECT_EQ(back->cache_ms, 4000u);
    // Unset, they stay out of the encoding (older goldens keep their bytes).
    EXPECT_EQ(decode_decide_reply(without)->cache_ms, 0u);
    EXPECT_EQ(without.find("cache_ms"), std::string::npos);

    const std::optional<ConsentEpoch> epoch = decode_consent_epoch(encode(ConsentEpoch{42}));
    ASSERT_TRUE(epoch.has_value());
    EXPECT_EQ(epoch->epoch, 42u);
    // An epoch push without its epoch is garbage, never "epoch 0".
    EXPECT_FALSE(decode_consent_epoch(empty_body()).has_value());
    std::string frame;
    encode_frame(frame, MessageType::ConsentEpoch, kPushRequestId, encode(ConsentEpoch{42}));
    FrameDecoder decoder;
    decoder.feed(frame);
    const std::optional<FrameView> view = decoder.next();
    ASSERT_TRUE(view.has_value());
    EXPECT_EQ(view->header.type, MessageType::ConsentEpoch);
}

TEST(ProtocolBodies, PreEncodedAuditAppendIsTheSameBytes) {
    AuditAppend append;
    append.sync = false;
    for (int i = 0; i < 3; ++i) {
        audit::Record record;
        record.kind = i == 0 ? audit::Kind::Access : audit::Kind::Outcome;
        record.record_id = "w-" + std::to_string(i);
        record.correlation_id = "corr";
        record.client_id = "demo-clinician-app";
        record.patient_ids = {"p1"};
        record.http_status = 200;
        append.records.push_back(record);
    }
    std::vector<std::string> encoded;
    for (const audit::Record &record : append.records) {
        encoded.push_back(audit::encode_record(record));
    }
    EXPECT_EQ(encode_audit_append(false, encoded), encode(append));
    append.sync = true;
    append.records.clear();
    EXPECT_EQ(encode_audit_append(true, {}), encode(append));
}

TEST(ProtocolBodies, DecisionMustBeExplicitAndValid) {
    auto reply_with = [](const std::function<void(msgpack::Writer &)> &decision, uint64_t status) {
        std::string body;
        msgpack::Writer w(body);
        w.map(decision ? 3 : 2);
        if (decision) {
            w.key("decision");
            decision(w);
        }
        w.key("http_status");
        w.uint(status);
        w.key("reason");
        w.str("r");
        return body;
    };
    auto uint_decision = [](uint64_t v) { return [v](msgpack::Writer &w) { w.uint(v); }; };

    EXPECT_TRUE(decode_decide_reply(reply_with(uint_decision(0), 403)));
    const std::optional<DecideReply> permit =
        decode_decide_reply(reply_with(uint_decision(1), 200));
    ASSERT_TRUE(permit.has_value());
    EXPECT_EQ(permit->decision, Decision::Permit);

    // No decision at all is never an implicit permit (nor an implicit deny).
    EXPECT_EQ(decode_decide_reply(reply_with(nullptr, 200)), std::nullopt);
    EXPECT_EQ(decode_decide_reply(empty_body()), std::nullopt);
    EXPECT_EQ(decode_decide_reply(reply_with(uint_decision(2), 200)), std::nullopt);
    EXPECT_EQ(decode_decide_reply(reply_with(uint_decision(255), 200)), std::nullopt);
    EXPECT_EQ(decode_decide_reply(reply_with([](msgpack::Writer &w) { w.boolean(true); }, 200)),
              std::nullopt);
    EXPECT_EQ(decode_decide_reply(reply_with([](msgpack::Writer &w) { w.str("permit"); }, 200)),
              std::nullopt);
    EXPECT_EQ(decode_decide_reply(reply_with([](msgpack::Writer &w) { w.sint(-1); }, 200)),
              std::nullopt);
}

TEST(ProtocolBodies, HttpStatusRange) {
    for (const uint64_t status : {uint64_t{100}, uint64_t{200}, uint64_t{429}, uint64_t{599}}) {
        DecideReply msg = sample_reply();
        msg.http_status = static_cast<uint16_t>(status);
        const std::optional<DecideReply> back = decode_decide_reply(encode(msg));
        ASSERT_TRUE(back.has_value()) << status;
        EXPECT_EQ(back->http_status, status);
    }
    for (const uint64_t status :
         {uint64_t{0}, uint64_t{42}, uint64_t{99}, uint64_t{600}, uint64_t{700}, uint64_t{65535},
          uint64_t{65536 + 200}, uint64_t{1} << 40}) {
        std::string body;
        msgpack::Writer w(body);
        w.map(2);
        w.key("decision");
        w.uint(0);
        w.key("http_status");
        w.uint(status);
        EXPECT_EQ(decode_decide_reply(body), std::nullopt) << status;
    }
}

TEST(ProtocolBodies, DecideRequestNeedsAMethod) {
    DecideRequest msg = sample_request();
    msg.method.clear();
    EXPECT_EQ(decode_decide_request(encode(msg)), std::nullopt);
    EXPECT_EQ(decode_decide_request(empty_body()), std::nullopt);
    // Every other field may be absent.
    std::string only_method;
    msgpack::Writer w(only_method);
    w.map(1);
    w.key("method");
    w.str("GET");
    const std::optional<DecideRequest> back = decode_decide_request(only_method);
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(back->method, "GET");
    EXPECT_EQ(back->path, "");
}

TEST(ProtocolBodies, AdminRequestNeedsACommandAndStringArgs) {
    EXPECT_EQ(decode_admin_request(encode(AdminRequest{"", {}})), std::nullopt);
    std::string body;
    msgpack::Writer w(body);
    w.map(2);
    w.key("command");
    w.str("status");
    w.key("args");
    w.map(1);
    w.key("serial");
    w.uint(3);  // arguments are strings
    EXPECT_EQ(decode_admin_request(body), std::nullopt);
}

// Writes a value of an unrelated shape, as a newer peer might add.
void write_future_value(msgpack::Writer &w, std::string &out, int which) {
    switch (which % 5) {
        case 0:
            w.map(2);
            w.key("nested");
            w.array(3);
            w.nil();
            w.boolean(true);
            w.sint(-70000);
            w.key("bin");
            w.bin(std::string(300, '\0'));
            break;
        case 1:
            out += unhex("cb400921fb54442d18");  // float64 pi
            break;
        case 2:
            out += unhex("d6ff00000001");  // timestamp extension
            break;
        case 3:
            w.str("decision");  // a value that looks like a known key
            break;
        default:
            w.uint(std::numeric_limits<uint64_t>::max());
            break;
    }
}

// Re-encodes a body map with an unknown key inserted before every known one and at the end.
std::string with_unknown_keys(std::string_view body) {
    msgpack::Reader r(body);
    const std::optional<uint32_t> n = r.read_map();
    EXPECT_TRUE(n.has_value());
    std::string out;
    msgpack::Writer w(out);
    w.map(*n * 2 + 1);
    for (uint32_t i = 0; i < *n; ++i) {
        w.key("x-future-" + std::to_string(i));
        write_future_value(w, out, static_cast<int>(i));
        const size_t start = r.position();
        EXPECT_TRUE(r.skip());  // the key
        EXPECT_TRUE(r.skip());  // the value
        out.append(body.substr(start, r.position() - start));
    }
    w.key("zz-last");
    write_future_value(w, out, 0);
    EXPECT_TRUE(r.at_end());
    return out;
}

TEST(ProtocolBodies, UnknownKeysAreSkipped) {
    {
        const std::optional<DecideRequest> back =
            decode_decide_request(with_unknown_keys(encode(sample_request())));
        ASSERT_TRUE(back.has_value());
        expect_same(*back, sample_request());
    }
    {
        const std::optional<DecideReply> back =
            decode_decide_reply(with_unknown_keys(encode(sample_reply())));
        ASSERT_TRUE(back.has_value());
        expect_same(*back, sample_reply());
    }
    {
        const std::optional<ErrorBody> back =
            decode_error(with_unknown_keys(encode(ErrorBody{"code", "message"})));
        ASSERT_TRUE(back.has_value());
        EXPECT_EQ(back->code, "code");
        EXPECT_EQ(back->message, "message");
    }
    {
        const std::optional<PolicyAck> back =
            decode_policy_ack(with_unknown_keys(encode(PolicyAck{12, 34})));
        ASSERT_TRUE(back.has_value());
        EXPECT_EQ(back->serial, 12u);
        EXPECT_EQ(back->worker_pid, 34u);
    }
    {
        const std::optional<AdminRequest> back = decode_admin_request(
            with_unknown_keys(encode(AdminRequest{"reload", {{"path", "/p"}}})));
        ASSERT_TRUE(back.has_value());
        EXPECT_EQ(back->command, "reload");
        EXPECT_EQ(back->arg("path"), "/p");
    }
    {
        const std::optional<AdminReply> back =
            decode_admin_reply(with_unknown_keys(encode(AdminReply{true, "m", "{}"})));
        ASSERT_TRUE(back.has_value());
        EXPECT_TRUE(back->ok);
        EXPECT_EQ(back->json, "{}");
    }
}

// Every body of every message type, for the tests that apply to all of them.
struct BodyCase {
    const char *name;
    std::string body;
    std::function<bool(std::string_view)> decodes;
};

std::vector<BodyCase> all_bodies() {
    return {
        {"decide-request", encode(sample_request()),
         [](std::string_view b) { return decode_decide_request(b).has_value(); }},
        {"decide-reply", encode(sample_reply()),
         [](std::string_view b) { return decode_decide_reply(b).has_value(); }},
        {"error", encode(ErrorBody{"bad-request", "undecodable"}),
         [](std::string_view b) { return decode_error(b).has_value(); }},
        {"policy-ack", encode(PolicyAck{3, 999}),
         [](std::string_view b) { return decode_policy_ack(b).has_value(); }},
        {"admin-request", encode(AdminRequest{"reload", {{"path", "/etc/p.yaml"}, {"x", "y"}}}),
         [](std::string_view b) { return decode_admin_request(b).has_value(); }},
        {"admin-reply", encode(AdminReply{true, "reloaded", R"({"ok":true})"}),
         [](std::string_view b) { return decode_admin_reply(b).has_value(); }},
    };
}

TEST(ProtocolBodies, EveryTruncationIsRejected) {
    for (const BodyCase &c : all_bodies()) {
        SCOPED_TRACE(c.name);
        ASSERT_TRUE(c.decodes(c.body));
        for (size_t len = 0; len < c.body.size(); ++len) {
            // An exact-size heap copy, so AddressSanitizer sees any read past the end.
            std::unique_ptr<char[]> copy(new char[len + 1]);
            std::copy_n(c.body.data(), len, copy.get());
            EXPECT_FALSE(c.decodes(std::string_view(copy.get(), len))) << "cut to " << len;
        }
    }
}

TEST(ProtocolBodies, TrailingBytesAndWrongShapesAreRejected) {
    for (const BodyCase &c : all_bodies()) {
        SCOPED_TRACE(c.name);
        EXPECT_FALSE(c.decodes(c.body + unhex("c0")));
        EXPECT_FALSE(c.decodes(unhex("90")));
        EXPECT_FALSE(c.decodes(unhex("c0")));
        EXPECT_FALSE(c.decodes(unhex("81c0c0")));      // a nil key
        EXPECT_FALSE(c.decodes(unhex("810101")));      // an integer key
        EXPECT_FALSE(c.decodes(unhex("81a1789191")));  // unknown key, value cut short
    }
}

TEST(ProtocolBodies, KnownKeysWithWrongTypesAreRejected) {
    auto one_field = [](std::string_view key, const std::function<void(msgpack::Writer &)> &value) {
        std::string body;
        msgpack::Writer w(body);
        w.map(2);
        w.key("method");  // keeps decode_decide_request's own requirement satisfied
        w.str("GET");
        w.key(key);
        value(w);
        return body;
    };
    auto as_uint = [](msgpack::Writer &w) { w.uint(1); };
    auto as_str = [](msgpack::Writer &w) { w.str("1"); };
    for (const char *key : {"correlation_id", "path", "query", "client_id", "host"}) {
        EXPECT_EQ(decode_decide_request(one_field(key, as_uint)), std::nullopt) << key;
    }
    EXPECT_EQ(decode_decide_request(one_field("method", as_uint)), std::nullopt);
    EXPECT_EQ(decode_policy_ack(one_field("serial", as_str)), std::nullopt);
    EXPECT_EQ(decode_policy_ack(
                  one_field("worker_pid", [](msgpack::Writer &w) { w.uint(uint64_t{1} << 32); })),
              std::nullopt);
    EXPECT_EQ(decode_error(one_field("code", as_uint)), std::nullopt);
    EXPECT_EQ(decode_admin_reply(one_field("ok", as_uint)), std::nullopt);
}

}  // namespace
}  // namespace ehrgate::protocol
