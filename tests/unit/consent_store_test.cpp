// policyd's consent store (LMDB, history, patient index), the consent step of the decision, and
// the protocol's consent fields.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "consent_signer.hpp"
#include "consent_store.hpp"
#include "dispatcher.hpp"
#include "ehrgate/auth.hpp"
#include "ehrgate/consent.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/protocol.hpp"

namespace ehrgate::policyd {
namespace {

class ConsentStoreTest : public ::testing::Test {
  protected:
    void SetUp() override {
        char pattern[] = "/tmp/ehrgate-consent-test-XXXXXX";
        ASSERT_NE(::mkdtemp(pattern), nullptr);
        dir_ = pattern;
        open();
    }
    void TearDown() override {
        consents_.reset();
        store_.reset();
        std::error_code ignored;
        std::filesystem::remove_all(dir_, ignored);
    }
    void open() {
        consents_.reset();
        store_.reset();
        Store::Options options;
        options.directory = dir_ + "/db";
        options.map_size_bytes = size_t{16} << 20;
        StoreError error;
        store_ = Store::open(options, &error);
        ASSERT_NE(store_, nullptr);
        consents_ = std::make_unique<ConsentStore>(*store_);
        ASSERT_EQ(consents_->load(&error), StoreStatus::Ok) << error.detail;
    }

    static consent::Record grant(std::string patient, std::string client) {
        consent::Record r;
        r.patient = std::move(patient);
        r.scope = "patient-privacy";
        r.provision.actors = {"client:" + client};
        r.provision.purposes = {"PATRQT"};
        return r;
    }

    std::string add(consent::Record record) {
        std::vector<ConsentChange> changes;
        std::string problem;
        StoreError error;
        EXPECT_EQ(consents_->add({std::move(record)}, "uid:0(root)", "grant", 1000, &changes,
                                 &problem, &error),
                  StoreStatus::Ok)
            << problem;
        return changes.empty() ? std::string() : changes[0].id;
    }

    std::string dir_;
    std::unique_ptr<Store> store_;
    std::unique_ptr<ConsentStore> consents_;
};

TEST_F(ConsentStoreTest, AddIndexesByPatientAndSurvivesRestart) {
    const std::string a = add(grant("p1", "app"));
    const std::string b = add(grant("p1", "other"));
    const std::string c = add(grant("p2", "app"));
    EXPECT_TRUE(a.starts_with("c-"));
    EXPECT_NE(a, b);
    EXPECT_EQ(consents_->for_patient("p1").size(), 2u);
    EXPECT_EQ(consents_->for_patient("p2").size(), 1u);
    EXPECT_TRUE(consents_->for_patient("p3").empty());
    const uint64_t epoch = consents_->epoch();
    open();  // a restart reads everything back
    EXPECT_EQ(consents_->size(), 3u);
    ASSERT_NE(consents_->find(c), nullptr);
    EXPECT_EQ(consents_->find(c)->patient, "p2");
    EXPECT_EQ(consents_->find(a)->provision.actors, std::vector<std::string>{"client:app"});
    EXPECT_GE(consents_->epoch(), epoch);
}

TEST_F(ConsentStoreTest, RevokeKeepsHistoryAndMovesTheEpoch) {
    const std::string id = add(grant("p1", "app"));
    const uint64_t before = consents_->epoch();
    ConsentChange change;
    std::string problem;
    StoreError error;
    ASSERT_EQ(consents_->revoke(id, "uid:5(ops)", 2000, &change, &problem, &error),
              StoreStatus::Ok);
    EXPECT_GT(consents_->epoch(), before);
    EXPECT_EQ(consents_->find(id)->status, consent::Status::Inactive);
    EXPECT_EQ(consents_->revoke(id, "x", 2001, &change, &problem, &error), StoreStatus::Invalid);
    EXPECT_NE(problem.find("not active"), std::string::npos);
    EXPECT_EQ(consents_->revoke("c-nope", "x", 2001, &change, &problem, &error),
              StoreStatus::NotFound);
    open();
    EXPECT_EQ(consents_->find(id)->status, consent::Status::Inactive);
    const std::vector<std::string> history = consents_->history(id, &error);
    ASSERT_EQ(history.size(), 2u);
    EXPECT_NE(history[0].find("\"action\":\"create\""), std::string::npos);
    EXPECT_NE(history[0].find("\"actor\":\"uid:0(root)\""), std::string::npos);
    EXPECT_NE(history[1].find("\"action\":\"revoke\""), std::string::npos);
    EXPECT_NE(history[1].find("\"actor\":\"uid:5(ops)\""), std::string::npos);
    EXPECT_NE(history[1].find("1970-01-01T00:33:20Z"), std::string::npos);
}

TEST_F(ConsentStoreTest, AddIsAllOrNothing) {
    consent::Record first = grant("p1", "app");
    first.id = "fixed";
    add(first);
    consent::Record fresh = grant("p2", "app");
    consent::Record clash = grant("p3", "app");
    clash.id = "fixed";
    std::vector<ConsentChange> changes;
    std::string problem;
    StoreError error;
    EXPECT_EQ(consents_->add({fresh, clash}, "x", "import", 1, &changes, &problem, &error),
              StoreStatus::Invalid);
    EXPECT_NE(problem.find("already exists"), std::string::npos);
    EXPECT_TRUE(consents_->for_patient("p2").empty());
    open();
    EXPECT_EQ(consents_->size(), 1u);
}

TEST_F(ConsentStoreTest, MapFullIsReportedAndNothingIsKept) {
    consent::Record big = grant("p1", "app");
    for (int i = 0; i < 64; ++i) {
        consent::Provision p;
        p.type = consent::ProvisionType::Deny;
        p.security_labels = {"L" + std::to_string(i)};
        big.provision.provisions.push_back(p);
    }
    std::vector<consent::Record> many(4000, big);
    std::vector<ConsentChange> changes;
    std::string problem;
    StoreError error;
    EXPECT_EQ(consents_->add(many, "x", "import", 1, &changes, &problem, &error),
              StoreStatus::MapFull);
    EXPECT_EQ(consents_->size(), 0u);
    open();
    EXPECT_EQ(consents_->size(), 0u);
}

// ---- The consent step of policyd's decision ----

policy::Snapshot sandbox_snapshot() {
    policy::ParseResult r =
        policy::load_bundle_file(std::string(EHRGATE_SOURCE_DIR) + "/conf/policy.yaml");
    EXPECT_TRUE(r.bundle);
    return policy::Snapshot{1, "", *r.bundle};
}

protocol::DecideRequest request(std::string client, std::string path, std::string purpose) {
    protocol::DecideRequest req;
    req.correlation_id = "corr";
    req.method = "GET";
    req.path = std::move(path);
    req.client_id = std::move(client);
    req.purpose_of_use = std::move(purpose);
    return req;
}

TEST_F(ConsentStoreTest, DecisionAddsObligationsAndRefusesWithoutConsent) {
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    // Treatment by the clinician app: permitted, sensitive classes withheld.
    protocol::DecideRequest treat = request("demo-clinician-app", "/fhir/Patient/p1", "TREAT");
    protocol::DecideReply reply = policy::evaluate(snapshot, treat);
    ASSERT_EQ(reply.decision, protocol::Decision::Permit);
    apply_consent(snapshot, treat, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Permit);
    EXPECT_EQ(reply.obligations, (std::vector<std::string>{"ETH", "HIV", "PSY", "SEX", "SUD"}));
    EXPECT_EQ(reply.purpose_of_use, "TREAT");
    EXPECT_FALSE(reply.decision_id.empty());

    // The patient app without a consent: 403 consent-required; with one: permitted.
    protocol::DecideRequest app = request("demo-patient-app", "/fhir/Observation", "PATRQT");
    app.patient = "p1";
    reply = policy::evaluate(snapshot, app);
    apply_consent(snapshot, app, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.http_status, 403);
    EXPECT_EQ(reply.reason, "consent-required");
    EXPECT_EQ(counters.consent_denies, 1u);

    consent::Record c = grant("p1", "demo-patient-app");
    c.provision.period = consent::Period{0, 5000};
    const std::string id = add(c);
    reply = policy::evaluate(snapshot, app);
    apply_consent(snapshot, app, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Permit);
    EXPECT_EQ(reply.consent_ids, std::vector<std::string>{id});
    EXPECT_EQ(reply.obligations, (std::vector<std::string>{"ETH", "SUD"}));
    // After its period the same request is refused.
    reply = policy::evaluate(snapshot, app);
    apply_consent(snapshot, app, consents_.get(), 5000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
}

TEST_F(ConsentStoreTest, DecisionTakesThePatientFromTheRequestForUserTokens) {
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    consent::Record deny = grant("p9", "demo-clinician-app");
    deny.provision.type = consent::ProvisionType::Deny;
    deny.provision.purposes = {};
    add(deny);
    for (const char *path : {"/fhir/Patient/p9", "/fhir/Patient/p9/_history"}) {
        protocol::DecideRequest req = request("demo-clinician-app", path, "TREAT");
        protocol::DecideReply reply = policy::evaluate(snapshot, req);
        apply_consent(snapshot, req, consents_.get(), 1000, counters, reply);
        EXPECT_EQ(reply.reason, "consent-denied") << path;
    }
    protocol::DecideRequest search = request("demo-clinician-app", "/fhir/Observation", "TREAT");
    search.query = "patient=Patient/p9&code=1234-5";
    protocol::DecideReply reply = policy::evaluate(snapshot, search);
    apply_consent(snapshot, search, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.reason, "consent-denied");
    search.query = "patient=p8";
    reply = policy::evaluate(snapshot, search);
    apply_consent(snapshot, search, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Permit);
}

TEST_F(ConsentStoreTest, NoStoreRefuses) {
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    protocol::DecideRequest treat = request("demo-clinician-app", "/fhir/Patient/p1", "TREAT");
    protocol::DecideReply reply = policy::evaluate(snapshot, treat);
    apply_consent(snapshot, treat, nullptr, 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.reason, "consent-unavailable");
}

TEST_F(ConsentStoreTest, BreakGlassIsCounted) {
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    protocol::DecideRequest req = request("demo-clinician-app", "/fhir/Patient/p1", "ETREAT");
    req.break_glass_reason = "cardiac arrest";
    protocol::DecideReply reply = policy::evaluate(snapshot, req);
    apply_consent(snapshot, req, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.decision, protocol::Decision::Permit);
    EXPECT_TRUE(reply.break_glass);
    EXPECT_TRUE(reply.obligations.empty());
    EXPECT_EQ(counters.break_glass, 1u);
    req.break_glass_reason.clear();
    reply = policy::evaluate(snapshot, req);
    apply_consent(snapshot, req, consents_.get(), 1000, counters, reply);
    EXPECT_EQ(reply.reason, "break-glass-reason-required");
    EXPECT_EQ(counters.break_glass, 1u);
}

TEST_F(ConsentStoreTest, CacheLifetimeStopsBeforeAnyPeriodBoundaryAndNeverForBreakGlass) {
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    const auto decide = [&](const protocol::DecideRequest &req, int64_t now) {
        protocol::DecideReply reply = policy::evaluate(snapshot, req);
        reply.cache_ms = kDecisionCacheMs;
        apply_consent(snapshot, req, consents_.get(), now, counters, reply);
        return reply;
    };
    protocol::DecideRequest app = request("demo-patient-app", "/fhir/Observation", "PATRQT");
    app.patient = "p1";
    consent::Record c = grant("p1", "demo-patient-app");
    c.provision.period = consent::Period{2000, 5000};
    consent::Provision nested_deny;
    nested_deny.type = consent::ProvisionType::Deny;
    nested_deny.period = consent::Period{std::nullopt, 3000};
    c.provision.provisions = {nested_deny};
    add(c);
    // Before the start: refused, and reused only until a second before the consent starts.
    protocol::DecideReply reply = decide(app, 1000);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.cache_ms, kDecisionCacheMs);  // the nearest boundary is 1000 s away
    reply = decide(app, 1998);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.cache_ms, 1000u);
    // Inside, the nested deny's end is the next boundary.
    reply = decide(app, 2997);
    EXPECT_EQ(reply.cache_ms, 2000u);
    // Past every boundary: the default.
    reply = decide(app, 6000);
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.cache_ms, kDecisionCacheMs);
    // Break-glass: never reused.
    protocol::DecideRequest glass = request("demo-clinician-app", "/fhir/Patient/p1", "ETREAT");
    glass.break_glass_reason = "cardiac arrest";
    reply = decide(glass, 1000);
    EXPECT_TRUE(reply.break_glass);
    EXPECT_EQ(reply.cache_ms, 0u);
    // No store: refused, and never reused.
    protocol::DecideRequest treat = request("demo-clinician-app", "/fhir/Patient/p1", "TREAT");
    reply = policy::evaluate(snapshot, treat);
    reply.cache_ms = kDecisionCacheMs;
    apply_consent(snapshot, treat, nullptr, 1000, counters, reply);
    EXPECT_EQ(reply.cache_ms, 0u);
}

TEST_F(ConsentStoreTest, SignedDecisionsAreReusedOnlyWhileTheirContextIsValid) {
    std::string error;
    const std::unique_ptr<ConsentSigner> signer = ConsentSigner::load_or_create(dir_, &error);
    ASSERT_NE(signer, nullptr) << error;
    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    protocol::DecideRequest treat = request("demo-clinician-app", "/fhir/Patient/p1", "TREAT");
    protocol::DecideReply reply = policy::evaluate(snapshot, treat);
    reply.cache_ms = kDecisionCacheMs;
    apply_consent(snapshot, treat, consents_.get(), 1000, counters, reply, signer.get());
    ASSERT_FALSE(reply.consent_token.empty());
    EXPECT_EQ(reply.cache_ms, static_cast<uint32_t>((ConsentSigner::kLifetimeSeconds - 1) * 1000));
}

TEST(ConsentNamedPatient, FromPathAndQuery) {
    EXPECT_EQ(consent::named_patient("GET", "Patient/p1", ""), "p1");
    EXPECT_EQ(consent::named_patient("GET", "Patient", "_id=p1"), "p1");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "patient=p1"), "p1");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "subject=Patient/p1&patient=p1"), "p1");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "patient=p1,p2"), "");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "patient=p1&patient=p2"), "");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "subject=Group/g"), "");
    EXPECT_EQ(consent::named_patient("GET", "Observation/o1", ""), "");
    EXPECT_EQ(consent::named_patient("GET", "Observation", "code=1"), "");
}

// ---- Protocol ----

TEST(ConsentProtocol, FieldsRoundTripAndStayOutWhenUnset) {
    protocol::DecideRequest req;
    req.method = "GET";
    const std::string plain = protocol::encode(req);
    req.user = "Practitioner/1";
    req.patient = "p1";
    req.purpose_of_use = "TREAT";
    req.tenant = "t";
    req.break_glass_reason = "why";
    const std::optional<protocol::DecideRequest> back =
        protocol::decode_decide_request(protocol::encode(req));
    ASSERT_TRUE(back);
    EXPECT_EQ(back->user, "Practitioner/1");
    EXPECT_EQ(back->patient, "p1");
    EXPECT_EQ(back->purpose_of_use, "TREAT");
    EXPECT_EQ(back->tenant, "t");
    EXPECT_EQ(back->break_glass_reason, "why");
    EXPECT_EQ(plain.find("patient"), std::string::npos);

    protocol::DecideReply reply;
    reply.decision = protocol::Decision::Permit;
    reply.http_status = 200;
    EXPECT_EQ(protocol::encode(reply).find("obligations"), std::string::npos);
    reply.obligations = {"PSY", "SUD"};
    reply.consent_ids = {"c-1"};
    reply.decision_id = "d-1";
    reply.purpose_of_use = "ETREAT";
    reply.break_glass = true;
    reply.consent_token = "h.p.s";
    const std::optional<protocol::DecideReply> decoded =
        protocol::decode_decide_reply(protocol::encode(reply));
    ASSERT_TRUE(decoded);
    EXPECT_EQ(decoded->obligations, reply.obligations);
    EXPECT_EQ(decoded->consent_ids, reply.consent_ids);
    EXPECT_EQ(decoded->decision_id, "d-1");
    EXPECT_EQ(decoded->purpose_of_use, "ETREAT");
    EXPECT_TRUE(decoded->break_glass);
    EXPECT_EQ(decoded->consent_token, "h.p.s");
}

TEST_F(ConsentStoreTest, SignerKeyPersistsAndPermitsCarryAToken) {
    std::string error;
    std::unique_ptr<ConsentSigner> signer = ConsentSigner::load_or_create(dir_, &error);
    ASSERT_NE(signer, nullptr) << error;
    const std::string kid = signer->kid();
    EXPECT_EQ(std::filesystem::status(dir_ + "/consent-signing-key.pem").permissions() &
                  std::filesystem::perms::group_all,
              std::filesystem::perms::none);
    signer = ConsentSigner::load_or_create(dir_, &error);
    ASSERT_NE(signer, nullptr) << error;
    EXPECT_EQ(signer->kid(), kid);
    EXPECT_NE(signer->jwks().find(kid), std::string::npos);

    const policy::Snapshot snapshot = sandbox_snapshot();
    DataCounters counters;
    protocol::DecideRequest treat = request("demo-clinician-app", "/fhir/Patient/p1", "TREAT");
    protocol::DecideReply reply = policy::evaluate(snapshot, treat);
    apply_consent(snapshot, treat, consents_.get(), 1000, counters, reply, signer.get());
    ASSERT_EQ(reply.decision, protocol::Decision::Permit);
    EXPECT_EQ(std::count(reply.consent_token.begin(), reply.consent_token.end(), '.'), 2);
    // Refusals carry none.
    protocol::DecideRequest app = request("demo-patient-app", "/fhir/Patient/p1", "PATRQT");
    app.patient = "p1";
    reply = policy::evaluate(snapshot, app);
    apply_consent(snapshot, app, consents_.get(), 1000, counters, reply, signer.get());
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_TRUE(reply.consent_token.empty());

    // A file that is not a P-256 key refuses to start.
    std::filesystem::create_directory(dir_ + "/bad");
    std::ofstream(dir_ + "/bad/consent-signing-key.pem") << "not a key";
    EXPECT_EQ(ConsentSigner::load_or_create(dir_ + "/bad", &error), nullptr);
    EXPECT_NE(error.find("not a P-256 EC private key"), std::string::npos);
}

TEST(ConsentProtocol, GoldenReplyWithConsentFields) {
    protocol::DecideReply reply;
    reply.decision = protocol::Decision::Permit;
    reply.http_status = 200;
    reply.obligations = {"PSY"};
    reply.break_glass = true;
    const std::string body = protocol::encode(reply);
    // ... the 9 original keys, then "obligations": ["PSY"], "break_glass": true.
    const std::string tail = std::string(
        "\xab"
        "obligations"
        "\x91\xa3"
        "PSY"
        "\xab"
        "break_glass"
        "\xc3");
    ASSERT_GE(body.size(), tail.size());
    EXPECT_EQ(static_cast<uint8_t>(body[0]), 0x80 | 11);
    EXPECT_EQ(body.substr(body.size() - tail.size()), tail);
}

}  // namespace
}  // namespace ehrgate::policyd

namespace ehrgate::auth {
namespace {

TEST(ConsentIdentity, BreakGlassReasonSurvivesTheTokenCache) {
    Identity identity;
    identity.client_id = "demo-clinician-app";
    const std::string plain = encode_identity(identity);
    EXPECT_EQ(plain.find("break_glass_reason"), std::string::npos);
    identity.break_glass_reason = "cardiac arrest";
    const std::optional<Identity> back = decode_identity(encode_identity(identity));
    ASSERT_TRUE(back);
    EXPECT_EQ(back->break_glass_reason, "cardiac arrest");
}

}  // namespace
}  // namespace ehrgate::auth
