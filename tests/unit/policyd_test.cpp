// policyd's logic without libuv: the LMDB store, the reload rules of PolicyState and the
// data-socket dispatcher.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dispatcher.hpp"
#include "ehrgate/msgpack.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/protocol.hpp"
#include "policy_state.hpp"
#include "store.hpp"

namespace ehrgate::policyd {
namespace {

using protocol::MessageType;

const std::string kSourceDir = EHRGATE_SOURCE_DIR;

std::string read_file(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

std::string replace_once(std::string text, std::string_view from, std::string_view to) {
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << "the bundle no longer contains: " << from;
    if (at != std::string::npos) {
        text.replace(at, from.size(), to);
    }
    return text;
}

// The shipped sandbox bundle, and variations of it.
std::string sandbox_bundle() {
    return read_file(kSourceDir + "/conf/policy.yaml");
}

// The shipped bundle's `version` label, read from the file so that editing it breaks no test.
std::string sandbox_version() {
    const std::string bundle = sandbox_bundle();
    const size_t at = bundle.find("\nversion: ");
    EXPECT_NE(at, std::string::npos);
    const size_t start = at + std::string_view("\nversion: ").size();
    return bundle.substr(start, bundle.find_first_of(" #\n", start) - start);
}

std::string with_version(const std::string &bundle, std::string_view version) {
    return replace_once(bundle, "\nversion: " + sandbox_version(),
                        "\nversion: " + std::string(version));
}

// Different content: Consent is no longer reachable.
std::string without_consent(const std::string &bundle) {
    return replace_once(bundle, "      - Consent\n", "");
}

// A fresh directory under /tmp per test, removed afterwards.
class TempDirTest : public ::testing::Test {
  protected:
    void SetUp() override {
        char pattern[] = "/tmp/ehrgate-policyd-test-XXXXXX";
        ASSERT_NE(::mkdtemp(pattern), nullptr);
        dir_ = pattern;
    }
    void TearDown() override {
        std::error_code ignored;
        std::filesystem::remove_all(dir_, ignored);
    }

    std::string write(const std::string &name, const std::string &content) {
        const std::string path = dir_ + "/" + name;
        std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
        return path;
    }

    std::unique_ptr<Store> open_store(size_t map_size = size_t{64} << 20) {
        Store::Options options;
        options.directory = dir_ + "/db";
        options.map_size_bytes = map_size;
        StoreError error;
        std::unique_ptr<Store> store = Store::open(options, &error);
        EXPECT_NE(store, nullptr) << store_status_name(error.status) << ": " << error.detail;
        return store;
    }

    std::string dir_;
};

// ---- Store -----------------------------------------------------------------------------------

using StoreTest = TempDirTest;

TEST_F(StoreTest, PutThenGet) {
    std::unique_ptr<Store> store = open_store();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->directory(), dir_ + "/db");
    EXPECT_EQ(store->put("db", "key", "value"), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "key"), "value");
    // Overwrite replaces.
    EXPECT_EQ(store->put("db", "key", "second"), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "key"), "second");
    // Databases are separate namespaces.
    EXPECT_EQ(store->put("other", "key", "elsewhere"), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "key"), "second");
    EXPECT_EQ(store->get("other", "key"), "elsewhere");
}

TEST_F(StoreTest, BinaryKeysAndValuesAreExact) {
    std::unique_ptr<Store> store = open_store();
    ASSERT_NE(store, nullptr);
    const std::string key("a\0b", 3);
    const std::string value("\0\xff\0", 3);
    EXPECT_EQ(store->put("db", key, value), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", key), value);
    EXPECT_EQ(store->get("db", "a"), std::nullopt);  // not a prefix match
    EXPECT_EQ(store->put("db", "empty", ""), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "empty"), "");
}

TEST_F(StoreTest, NotFound) {
    std::unique_ptr<Store> store = open_store();
    ASSERT_NE(store, nullptr);
    // A database that was never written.
    StoreError error;
    EXPECT_EQ(store->get("never", "key", &error), std::nullopt);
    EXPECT_EQ(error.status, StoreStatus::NotFound);
    // A key that was never written, in a database that exists.
    ASSERT_EQ(store->put("db", "present", "1"), StoreStatus::Ok);
    StoreError missing;
    EXPECT_EQ(store->get("db", "absent", &missing), std::nullopt);
    EXPECT_EQ(missing.status, StoreStatus::NotFound);
    EXPECT_FALSE(missing.detail.empty());
    // Errors are optional to collect.
    EXPECT_EQ(store->get("db", "absent"), std::nullopt);
}

TEST_F(StoreTest, InvalidKeysAreTranslatedNotFatal) {
    std::unique_ptr<Store> store = open_store();
    ASSERT_NE(store, nullptr);
    StoreError error;
    // LMDB refuses empty keys and keys above its compile-time limit (511 bytes by default).
    EXPECT_EQ(store->put("db", "", "v", &error), StoreStatus::Invalid);
    EXPECT_EQ(error.status, StoreStatus::Invalid);
    EXPECT_EQ(store->put("db", std::string(4096, 'k'), "v"), StoreStatus::Invalid);
    EXPECT_EQ(store->put("db", "fine", "v"), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "fine"), "v");
}

TEST_F(StoreTest, DurableAcrossCloseAndReopen) {
    {
        std::unique_ptr<Store> store = open_store();
        ASSERT_NE(store, nullptr);
        ASSERT_EQ(store->put("db", "k1", "v1"), StoreStatus::Ok);
        ASSERT_EQ(store->put("db", "k2", std::string(10000, 'x')), StoreStatus::Ok);
        ASSERT_EQ(store->put("second", "k", "v"), StoreStatus::Ok);
    }
    std::unique_ptr<Store> store = open_store();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->get("db", "k1"), "v1");
    EXPECT_EQ(store->get("db", "k2"), std::string(10000, 'x'));
    EXPECT_EQ(store->get("second", "k"), "v");
}

TEST_F(StoreTest, MapFullIsTranslatedAndTheStoreStaysUsable) {
    std::unique_ptr<Store> store = open_store(64 << 10);
    ASSERT_NE(store, nullptr);
    ASSERT_EQ(store->put("db", "small", "kept"), StoreStatus::Ok);

    StoreError error;
    EXPECT_EQ(store->put("db", "big", std::string(256 << 10, 'b'), &error), StoreStatus::MapFull);
    EXPECT_EQ(error.status, StoreStatus::MapFull);
    EXPECT_FALSE(error.detail.empty());

    // The failed transaction left nothing behind, and both reads and small writes still work.
    EXPECT_EQ(store->get("db", "small"), "kept");
    StoreError missing;
    EXPECT_EQ(store->get("db", "big", &missing), std::nullopt);
    EXPECT_EQ(missing.status, StoreStatus::NotFound);
    EXPECT_EQ(store->put("db", "after", "ok"), StoreStatus::Ok);
    EXPECT_EQ(store->get("db", "after"), "ok");
}

TEST_F(StoreTest, MapFullOnANewDatabaseLeavesNoStaleHandle) {
    // The first write to a database creates it; if that transaction aborts, the handle opened in
    // it is gone and must not be cached.
    std::unique_ptr<Store> store = open_store(64 << 10);
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->put("fresh", "big", std::string(256 << 10, 'b')), StoreStatus::MapFull);
    EXPECT_EQ(store->get("fresh", "big"), std::nullopt);
    EXPECT_EQ(store->put("fresh", "small", "v"), StoreStatus::Ok);
    EXPECT_EQ(store->get("fresh", "small"), "v");
    store.reset();
    store = open_store(64 << 10);
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->get("fresh", "small"), "v");
}

TEST_F(StoreTest, OpenFailureIsReported) {
    write("plain-file", "x");
    Store::Options options;
    options.directory = dir_ + "/plain-file/db";  // a path through a regular file
    StoreError error;
    EXPECT_EQ(Store::open(options, &error), nullptr);
    EXPECT_NE(error.status, StoreStatus::Ok);
    EXPECT_FALSE(error.detail.empty());

    options.directory = dir_ + "/missing-parent/db";
    StoreError missing;
    EXPECT_EQ(Store::open(options, &missing), nullptr);
    EXPECT_EQ(missing.status, StoreStatus::Io);
}

TEST(StoreStatusNames, AreDistinct) {
    std::set<std::string> names;
    for (const StoreStatus status :
         {StoreStatus::Ok, StoreStatus::NotFound, StoreStatus::MapFull, StoreStatus::ReadersFull,
          StoreStatus::Busy, StoreStatus::Corrupted, StoreStatus::Io, StoreStatus::Invalid}) {
        names.insert(store_status_name(status));
    }
    EXPECT_EQ(names.size(), 8u);
    EXPECT_EQ(names.count("map-full"), 1u);
}

// ---- PolicyState -----------------------------------------------------------------------------

std::string dump(const ReloadOutcome &outcome) {
    std::string out = outcome.message;
    for (const policy::Diagnostic &d : outcome.diagnostics) {
        out += "\n  " + d.to_string();
    }
    return out;
}

class PolicyStateTest : public TempDirTest {
  protected:
    void SetUp() override {
        TempDirTest::SetUp();
        path_ = write("policy.yaml", sandbox_bundle());
        // Files the bundle names (JWKS) are resolved relative to it.
        std::filesystem::copy(kSourceDir + "/conf/sandbox", dir_ + "/sandbox",
                              std::filesystem::copy_options::recursive);
        store_ = open_store();
        ASSERT_NE(store_, nullptr);
    }
    void TearDown() override {
        store_.reset();
        TempDirTest::TearDown();
    }

    // Closes and reopens the store, as a restart of policyd would.
    void restart_store(size_t map_size = size_t{64} << 20) {
        store_.reset();
        store_ = open_store(map_size);
        ASSERT_NE(store_, nullptr);
    }

    // The snapshot a worker would receive, decoded from the encoded body.
    static policy::Snapshot published(const PolicyState &state) {
        const std::optional<policy::Snapshot> snapshot = policy::decode_snapshot(state.encoded());
        EXPECT_TRUE(snapshot.has_value());
        return snapshot.value_or(policy::Snapshot{});
    }

    std::string path_;
    std::unique_ptr<Store> store_;
};

TEST_F(PolicyStateTest, InitialLoadActivatesSerialOne) {
    PolicyState state(*store_, path_);
    EXPECT_FALSE(state.loaded());
    const ReloadOutcome outcome = state.reload();
    ASSERT_EQ(outcome.kind, ReloadOutcome::Kind::Activated) << dump(outcome);
    EXPECT_TRUE(outcome.diagnostics.empty());
    ASSERT_TRUE(state.loaded());
    EXPECT_EQ(state.snapshot().serial, 1u);
    EXPECT_EQ(state.snapshot().bundle.version, sandbox_version());
    EXPECT_EQ(state.snapshot().digest_hex, policy::bundle_digest(state.snapshot().bundle));
    EXPECT_EQ(state.source_path(), path_);
    EXPECT_GT(state.activated_at_unix(), 0);
    EXPECT_NE(outcome.message.find(sandbox_version()), std::string::npos) << outcome.message;
    EXPECT_EQ(published(state), state.snapshot());
}

TEST_F(PolicyStateTest, ReloadRules) {
    PolicyState state(*store_, path_);
    ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);

    // The same file again: nothing moves.
    const std::string encoded_v1 = state.encoded();
    const ReloadOutcome same = state.reload();
    EXPECT_EQ(same.kind, ReloadOutcome::Kind::Unchanged) << dump(same);
    EXPECT_EQ(state.snapshot().serial, 1u);
    EXPECT_EQ(state.encoded(), encoded_v1);

    // New content under a new version: serial 2, and the published body says so.
    write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
    const ReloadOutcome changed = state.reload();
    ASSERT_EQ(changed.kind, ReloadOutcome::Kind::Activated) << dump(changed);
    EXPECT_EQ(state.snapshot().serial, 2u);
    EXPECT_EQ(state.snapshot().bundle.version, "v2");
    const policy::Snapshot v2 = published(state);
    EXPECT_EQ(v2.serial, 2u);
    EXPECT_EQ(v2.bundle.version, "v2");
    EXPECT_EQ(v2, state.snapshot());
    const std::string encoded_v2 = state.encoded();

    // Changed content under the same version label: refused, nothing moves.
    write("policy.yaml", with_version(sandbox_bundle(), "v2"));
    const ReloadOutcome relabelled = state.reload();
    EXPECT_EQ(relabelled.kind, ReloadOutcome::Kind::Refused) << dump(relabelled);
    ASSERT_EQ(relabelled.diagnostics.size(), 1u);
    EXPECT_EQ(relabelled.diagnostics[0].file, path_);
    EXPECT_EQ(relabelled.diagnostics[0].field, "version");
    EXPECT_NE(relabelled.message.find("bump"), std::string::npos) << relabelled.message;
    EXPECT_EQ(state.snapshot().serial, 2u);
    EXPECT_EQ(state.snapshot().bundle.version, "v2");
    EXPECT_EQ(state.encoded(), encoded_v2);

    // Invalid YAML: refused with a located diagnostic, nothing moves.
    write("policy.yaml", read_file(kSourceDir + "/conf/examples/syntax-error.yaml"));
    const ReloadOutcome broken = state.reload();
    EXPECT_EQ(broken.kind, ReloadOutcome::Kind::Refused);
    ASSERT_EQ(broken.diagnostics.size(), 1u) << dump(broken);
    EXPECT_EQ(broken.diagnostics[0].file, path_);
    EXPECT_EQ(broken.diagnostics[0].line, 10);
    EXPECT_GT(broken.diagnostics[0].column, 0);
    EXPECT_NE(broken.message.find(path_), std::string::npos) << broken.message;
    EXPECT_EQ(state.snapshot().serial, 2u);
    EXPECT_EQ(state.encoded(), encoded_v2);

    // A bundle that parses but does not validate: every problem reported, nothing moves.
    write("policy.yaml", read_file(kSourceDir + "/conf/examples/invalid-policy.yaml"));
    const ReloadOutcome invalid = state.reload();
    EXPECT_EQ(invalid.kind, ReloadOutcome::Kind::Refused);
    EXPECT_GT(invalid.diagnostics.size(), 5u) << dump(invalid);
    for (const policy::Diagnostic &d : invalid.diagnostics) {
        EXPECT_EQ(d.file, path_);
        EXPECT_GT(d.line, 0) << d.to_string();
    }
    EXPECT_EQ(state.encoded(), encoded_v2);

    // The file disappears: refused.
    std::filesystem::remove(path_);
    EXPECT_EQ(state.reload().kind, ReloadOutcome::Kind::Refused);
    EXPECT_EQ(state.encoded(), encoded_v2);

    // Back to the active content: unchanged, despite the refusals in between.
    write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
    EXPECT_EQ(state.reload().kind, ReloadOutcome::Kind::Unchanged);
    EXPECT_EQ(state.snapshot().serial, 2u);
}

TEST_F(PolicyStateTest, CommentsAndOrderAreNotContent) {
    PolicyState state(*store_, path_);
    ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
    // The digest covers the canonical bundle: comments and list order do not change it.
    std::string reordered = sandbox_bundle() + "\n# a trailing comment\n";
    reordered = replace_once(reordered, "purposes: [TREAT, ETREAT]", "purposes: [ETREAT, TREAT]");
    write("policy.yaml", reordered);
    const ReloadOutcome outcome = state.reload();
    EXPECT_EQ(outcome.kind, ReloadOutcome::Kind::Unchanged) << dump(outcome);
    EXPECT_EQ(state.snapshot().serial, 1u);
}

TEST_F(PolicyStateTest, RefusedAtStartLeavesNothingLoaded) {
    write("policy.yaml", "schema: [");
    PolicyState state(*store_, path_);
    EXPECT_EQ(state.reload().kind, ReloadOutcome::Kind::Refused);
    EXPECT_FALSE(state.loaded());
    EXPECT_TRUE(state.encoded().empty());
}

TEST_F(PolicyStateTest, SerialSurvivesRestarts) {
    {
        PolicyState state(*store_, path_);
        ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
        write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
        ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
        ASSERT_EQ(state.snapshot().serial, 2u);
    }
    restart_store();
    {
        // Same file after a restart: the same serial, so workers holding it need nothing new.
        PolicyState state(*store_, path_);
        const ReloadOutcome outcome = state.reload();
        ASSERT_EQ(outcome.kind, ReloadOutcome::Kind::Activated) << dump(outcome);
        EXPECT_EQ(state.snapshot().serial, 2u);
        EXPECT_EQ(published(state).serial, 2u);
        EXPECT_EQ(state.reload().kind, ReloadOutcome::Kind::Unchanged);
    }
    restart_store();
    {
        // Different content after a restart: the serial moves on from the stored one.
        write("policy.yaml", with_version(sandbox_bundle(), "v3"));
        PolicyState state(*store_, path_);
        const ReloadOutcome outcome = state.reload();
        ASSERT_EQ(outcome.kind, ReloadOutcome::Kind::Activated) << dump(outcome);
        EXPECT_EQ(state.snapshot().serial, 3u);
        EXPECT_EQ(published(state).serial, 3u);
        EXPECT_EQ(state.snapshot().bundle.version, "v3");
    }
}

TEST_F(PolicyStateTest, StoreWriteFailureRefusesAndKeepsTheSnapshot) {
    restart_store(64 << 10);
    PolicyState state(*store_, path_);
    ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
    const std::string encoded_v1 = state.encoded();

    // Fill the map through the very B-tree leaf the reload writes to first: "policy_history"
    // is keyed by the big-endian serial, so these keys (serial 1 plus a suffix) sort right
    // before serial 2. Once an insert there fails, the reload's insert of serial 2, a larger
    // value at the next position in the same leaf, cannot succeed either. (Filling another
    // database would not do: LMDB recycles freed pages, so small writes elsewhere keep working.)
    const std::string serial_1("\0\0\0\0\0\0\0\x01", 8);
    int written = 0;
    for (const size_t size : {size_t{256}, size_t{16}, size_t{1}}) {
        for (int i = 0; i < 100000; ++i) {
            std::string key = serial_1;
            for (int shift = 24; shift >= 0; shift -= 8) {
                key.push_back(static_cast<char>(written >> shift));
            }
            const StoreStatus status = store_->put("policy_history", key, std::string(size, 'j'));
            if (status == StoreStatus::MapFull) {
                break;
            }
            ASSERT_EQ(status, StoreStatus::Ok);
            ++written;
        }
    }
    ASSERT_GT(written, 0);

    write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
    const ReloadOutcome outcome = state.reload();
    EXPECT_EQ(outcome.kind, ReloadOutcome::Kind::Refused) << dump(outcome);
    EXPECT_NE(outcome.message.find("map-full"), std::string::npos) << outcome.message;
    EXPECT_EQ(state.snapshot().serial, 1u);
    EXPECT_EQ(state.snapshot().bundle.version, sandbox_version());
    EXPECT_EQ(state.encoded(), encoded_v1);
}

// One version label must always mean one content (audit records name the version), also across
// a restart.
TEST_F(PolicyStateTest, SameVersionWithNewContentIsRefusedAfterRestart) {
    {
        PolicyState state(*store_, path_);
        ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
    }
    restart_store();
    write("policy.yaml", without_consent(sandbox_bundle()));  // same label, new content
    PolicyState state(*store_, path_);
    const ReloadOutcome outcome = state.reload();
    EXPECT_EQ(outcome.kind, ReloadOutcome::Kind::Refused) << dump(outcome);
}

// The serial only moves forward: workers compare serials. An unreadable active record must not
// send it back to 1.
TEST_F(PolicyStateTest, CorruptActiveRecordNeverMovesTheSerialBack) {
    {
        PolicyState state(*store_, path_);
        ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
        write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
        ASSERT_EQ(state.reload().kind, ReloadOutcome::Kind::Activated);
        ASSERT_EQ(state.snapshot().serial, 2u);
    }
    ASSERT_EQ(store_->put("policy", "active", "\xc1"), StoreStatus::Ok);
    restart_store();
    write("policy.yaml", with_version(sandbox_bundle(), "v3"));
    PolicyState state(*store_, path_);
    const ReloadOutcome outcome = state.reload();
    if (outcome.kind == ReloadOutcome::Kind::Activated) {
        EXPECT_GT(state.snapshot().serial, 2u) << dump(outcome);
    } else {
        EXPECT_EQ(outcome.kind, ReloadOutcome::Kind::Refused);
        EXPECT_FALSE(state.loaded());
    }
}

// ---- Dispatcher ------------------------------------------------------------------------------

struct Frame {
    MessageType type;
    uint32_t request_id;
    std::string body;
};

std::vector<Frame> parse_frames(std::string_view bytes) {
    protocol::FrameDecoder decoder;
    decoder.feed(bytes);
    std::vector<Frame> frames;
    while (std::optional<protocol::FrameView> view = decoder.next()) {
        frames.push_back({view->header.type, view->header.request_id, std::string(view->body)});
    }
    EXPECT_EQ(decoder.error(), protocol::FrameError::None);
    EXPECT_EQ(decoder.buffered(), 0u) << "a partial frame in the output";
    return frames;
}

class DispatcherTest : public PolicyStateTest {
  protected:
    void SetUp() override {
        PolicyStateTest::SetUp();
        state_ = std::make_unique<PolicyState>(*store_, path_);
        ASSERT_EQ(state_->reload().kind, ReloadOutcome::Kind::Activated);
    }
    void TearDown() override {
        state_.reset();
        PolicyStateTest::TearDown();
    }

    // Hands one frame to the dispatcher, as the server does after FrameDecoder::next(), and
    // returns the frames it answered with.
    std::vector<Frame> dispatch(MessageType type, uint32_t id, std::string_view body,
                                DispatchResult expected = DispatchResult::Ok) {
        protocol::FrameView frame;
        frame.header.type = type;
        frame.header.request_id = id;
        frame.body = body;
        std::string out;
        EXPECT_EQ(handle_data_frame(*state_, frame, peer_, counters_, out), expected)
            << protocol::message_type_name(type);
        return parse_frames(out);
    }

    std::optional<protocol::DecideReply> decide(const std::string &method, const std::string &path,
                                                uint32_t id = 42) {
        protocol::DecideRequest request;
        request.correlation_id = "corr-" + std::to_string(id);
        request.method = method;
        request.path = path;
        const std::vector<Frame> frames =
            dispatch(MessageType::DecideRequest, id, protocol::encode(request));
        EXPECT_EQ(frames.size(), 1u);
        if (frames.size() != 1) {
            return std::nullopt;
        }
        EXPECT_EQ(frames[0].type, MessageType::DecideReply);
        EXPECT_EQ(frames[0].request_id, id);
        return protocol::decode_decide_reply(frames[0].body);
    }

    std::unique_ptr<PolicyState> state_;
    DataPeer peer_;
    DataCounters counters_;
};

TEST_F(DispatcherTest, PermitsAnAllowedRead) {
    const std::optional<protocol::DecideReply> reply = decide("GET", "/fhir/Patient/123", 7);
    ASSERT_TRUE(reply.has_value());
    EXPECT_EQ(reply->decision, protocol::Decision::Permit);
    EXPECT_EQ(reply->http_status, 200);
    EXPECT_EQ(reply->reason, "permitted");
    EXPECT_EQ(reply->policy_version, sandbox_version());
    EXPECT_EQ(reply->policy_serial, 1u);
    EXPECT_EQ(reply->route, "fhir");
    EXPECT_EQ(reply->resource_type, "Patient");
    EXPECT_EQ(reply->interaction, "read");
    EXPECT_EQ(counters_.permits, 1u);
    EXPECT_EQ(counters_.denies, 0u);
    EXPECT_EQ(counters_.rejected_frames, 0u);
    EXPECT_EQ(peer_.decisions, 1u);
}

TEST_F(DispatcherTest, DeniesAResourceTypeOutsideThePolicy) {
    const std::optional<protocol::DecideReply> reply = decide("GET", "/fhir/AllergyIntolerance");
    ASSERT_TRUE(reply.has_value());
    EXPECT_EQ(reply->decision, protocol::Decision::Deny);
    EXPECT_EQ(reply->http_status, 403);
    EXPECT_EQ(reply->reason, "resource-type-not-permitted");
    EXPECT_FALSE(reply->message.empty());
    EXPECT_EQ(reply->policy_version, sandbox_version());
    EXPECT_EQ(counters_.denies, 1u);
    EXPECT_EQ(counters_.permits, 0u);
    EXPECT_EQ(peer_.decisions, 1u);
}

TEST_F(DispatcherTest, DecisionsFollowAReload) {
    ASSERT_EQ(decide("GET", "/fhir/Consent/1")->decision, protocol::Decision::Permit);
    write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
    ASSERT_EQ(state_->reload().kind, ReloadOutcome::Kind::Activated);
    const std::optional<protocol::DecideReply> reply = decide("GET", "/fhir/Consent/1");
    ASSERT_TRUE(reply.has_value());
    EXPECT_EQ(reply->decision, protocol::Decision::Deny);
    EXPECT_EQ(reply->policy_version, "v2");
    EXPECT_EQ(reply->policy_serial, 2u);
}

TEST_F(DispatcherTest, UndecodableDecideRequestIsAnErrorButKeepsTheConnection) {
    std::string method_not_a_string;
    msgpack::Writer w(method_not_a_string);
    w.map(1);
    w.key("method");
    w.uint(1);
    for (const std::string &body :
         {method_not_a_string, protocol::empty_body(), std::string("\xc1"), std::string()}) {
        SCOPED_TRACE(body.size());
        const std::vector<Frame> frames = dispatch(MessageType::DecideRequest, 9, body);
        ASSERT_EQ(frames.size(), 1u);
        EXPECT_EQ(frames[0].type, MessageType::Error);
        EXPECT_EQ(frames[0].request_id, 9u);
        const std::optional<protocol::ErrorBody> error = protocol::decode_error(frames[0].body);
        ASSERT_TRUE(error.has_value());
        EXPECT_EQ(error->code, "bad-request");
    }
    EXPECT_EQ(counters_.rejected_frames, 4u);
    EXPECT_EQ(counters_.permits + counters_.denies, 0u);
    EXPECT_EQ(peer_.decisions, 0u);
    // The next request on the same connection is answered normally.
    EXPECT_TRUE(decide("GET", "/fhir/Patient/1").has_value());
}

TEST_F(DispatcherTest, PolicyFetchAnswersWithTheEncodedSnapshot) {
    std::vector<Frame> frames = dispatch(MessageType::PolicyFetch, 3, protocol::empty_body());
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_EQ(frames[0].type, MessageType::PolicySnapshot);
    EXPECT_EQ(frames[0].request_id, 3u);
    EXPECT_EQ(frames[0].body, state_->encoded());
    const std::optional<policy::Snapshot> snapshot = policy::decode_snapshot(frames[0].body);
    ASSERT_TRUE(snapshot.has_value());
    EXPECT_EQ(snapshot->serial, 1u);

    write("policy.yaml", with_version(without_consent(sandbox_bundle()), "v2"));
    ASSERT_EQ(state_->reload().kind, ReloadOutcome::Kind::Activated);
    frames = dispatch(MessageType::PolicyFetch, 4, protocol::empty_body());
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_EQ(policy::decode_snapshot(frames[0].body)->serial, 2u);
}

TEST_F(DispatcherTest, PolicyAckUpdatesThePeerSilently) {
    EXPECT_TRUE(dispatch(MessageType::PolicyAck, 0, protocol::encode(protocol::PolicyAck{1, 4242}))
                    .empty());
    EXPECT_EQ(peer_.acked_serial, 1u);
    EXPECT_EQ(peer_.worker_pid, 4242u);
    // A later ack wins.
    EXPECT_TRUE(dispatch(MessageType::PolicyAck, 0, protocol::encode(protocol::PolicyAck{2, 4242}))
                    .empty());
    EXPECT_EQ(peer_.acked_serial, 2u);
    // An undecodable ack changes nothing and closes nothing.
    EXPECT_TRUE(dispatch(MessageType::PolicyAck, 0, "\xc1").empty());
    EXPECT_EQ(peer_.acked_serial, 2u);
    EXPECT_EQ(peer_.worker_pid, 4242u);
}

TEST_F(DispatcherTest, PingIsAnsweredWithPong) {
    const std::vector<Frame> frames =
        dispatch(MessageType::Ping, 0xfffffffe, protocol::empty_body());
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_EQ(frames[0].type, MessageType::Pong);
    EXPECT_EQ(frames[0].request_id, 0xfffffffeu);
    EXPECT_EQ(frames[0].body, protocol::empty_body());
}

TEST_F(DispatcherTest, OtherMessageTypesCloseTheConnection) {
    const MessageType foreign[] = {MessageType::AdminRequest, MessageType::AdminReply,
                                   MessageType::DecideReply,  MessageType::PolicySnapshot,
                                   MessageType::Pong,         MessageType::Error};
    uint64_t rejected = 0;
    for (const MessageType type : foreign) {
        SCOPED_TRACE(protocol::message_type_name(type));
        const std::vector<Frame> frames =
            dispatch(type, 11, protocol::empty_body(), DispatchResult::CloseConnection);
        ASSERT_EQ(frames.size(), 1u);
        EXPECT_EQ(frames[0].type, MessageType::Error);
        EXPECT_EQ(frames[0].request_id, 11u);
        const std::optional<protocol::ErrorBody> error = protocol::decode_error(frames[0].body);
        ASSERT_TRUE(error.has_value());
        EXPECT_EQ(error->code, "unexpected-message");
        EXPECT_NE(error->message.find(protocol::message_type_name(type)), std::string::npos)
            << error->message;
        EXPECT_EQ(counters_.rejected_frames, ++rejected);
    }
    EXPECT_EQ(peer_.decisions, 0u);
}

TEST_F(DispatcherTest, RepliesAreAppendedAndCountersAccumulate) {
    protocol::DecideRequest permit;
    permit.method = "GET";
    permit.path = "/fhir/Observation";
    protocol::DecideRequest deny;
    deny.method = "DELETE";
    deny.path = "/fhir/AllergyIntolerance/1";

    std::string out;
    auto run = [&](MessageType type, uint32_t id, const std::string &body) {
        protocol::FrameView frame;
        frame.header.type = type;
        frame.header.request_id = id;
        frame.body = body;
        return handle_data_frame(*state_, frame, peer_, counters_, out);
    };
    EXPECT_EQ(run(MessageType::DecideRequest, 1, protocol::encode(permit)), DispatchResult::Ok);
    EXPECT_EQ(run(MessageType::DecideRequest, 2, protocol::encode(deny)), DispatchResult::Ok);
    EXPECT_EQ(run(MessageType::Ping, 3, protocol::empty_body()), DispatchResult::Ok);
    EXPECT_EQ(run(MessageType::DecideRequest, 4, protocol::encode(permit)), DispatchResult::Ok);

    const std::vector<Frame> frames = parse_frames(out);
    ASSERT_EQ(frames.size(), 4u);
    const uint32_t ids[] = {1, 2, 3, 4};
    const MessageType types[] = {MessageType::DecideReply, MessageType::DecideReply,
                                 MessageType::Pong, MessageType::DecideReply};
    for (size_t i = 0; i < frames.size(); ++i) {
        EXPECT_EQ(frames[i].request_id, ids[i]);
        EXPECT_EQ(frames[i].type, types[i]);
    }
    EXPECT_EQ(counters_.permits, 2u);
    EXPECT_EQ(counters_.denies, 1u);
    EXPECT_EQ(counters_.rejected_frames, 0u);
    EXPECT_EQ(peer_.decisions, 3u);
}

TEST(AppendErrorFrame, IsADecodableErrorFrame) {
    std::string out = "keep";
    append_error_frame(out, 5, "bad-frame", "frame exceeds size cap");
    ASSERT_EQ(out.substr(0, 4), "keep");
    const std::vector<Frame> frames = parse_frames(std::string_view(out).substr(4));
    ASSERT_EQ(frames.size(), 1u);
    EXPECT_EQ(frames[0].type, MessageType::Error);
    EXPECT_EQ(frames[0].request_id, 5u);
    const std::optional<protocol::ErrorBody> error = protocol::decode_error(frames[0].body);
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->code, "bad-frame");
    EXPECT_EQ(error->message, "frame exceeds size cap");
}

}  // namespace
}  // namespace ehrgate::policyd
