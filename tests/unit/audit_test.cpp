#include "ehrgate/audit.hpp"

#include <gtest/gtest.h>

#include <msgpack.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "ehrgate/msgpack.hpp"

namespace ehrgate::audit {
namespace {

Record sample(int i) {
    Record r;
    r.kind = Kind::Access;
    r.time_us = 1'780'000'000'000'000 + i;
    r.record_id = "w1-" + std::to_string(i);
    r.correlation_id = "corr-" + std::to_string(i);
    r.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    r.client_id = "demo-clinician-app";
    r.user = "Practitioner/p1";
    r.patient_ids = {"pat-" + std::to_string(i % 3)};
    r.method = "GET";
    r.resource_type = "Observation";
    r.interaction = "search-type";
    r.query = "patient=pat-1&category=laboratory";
    r.http_status = 200;
    r.policy_version = "v1";
    r.decision = "permit";
    r.reason = "ok";
    r.consent_ids = {"c1", "c2"};
    r.purpose_of_use = "TREAT";
    r.client_address = "127.0.0.1";
    r.jti_hash = hex(sha256("jti-1"));
    return r;
}

// A chain of n records as the store would hold them, plus checkpoints at the given seqs.
struct Chain {
    std::vector<StoredEntry> entries;
    std::vector<Checkpoint> checkpoints;
    std::unique_ptr<SigningKey> key = SigningKey::generate();
    std::vector<std::string> hashes{zero_hash()};

    void append(const Record &r) {
        ChainedRecord e{entries.size() + 1, r};
        const std::string canonical = canonical_encode(e);
        const std::string h = chain_hash(hashes.back(), canonical);
        hashes.push_back(h);
        entries.push_back({e.seq, stored_value(h, canonical)});
    }
    void checkpoint(uint64_t seq) {
        Checkpoint c{seq, hashes[seq], 1'780'000'000'000'000, "", ""};
        sign_checkpoint(*key, c);
        checkpoints.push_back(c);
    }
    VerifyResult verify() const { return verify_chain(entries, checkpoints, key->public_raw()); }
};

Chain make_chain(int n, std::vector<uint64_t> checkpoint_seqs = {}) {
    Chain chain;
    for (int i = 1; i <= n; ++i) {
        chain.append(sample(i));
    }
    for (uint64_t s : checkpoint_seqs) {
        chain.checkpoint(s);
    }
    return chain;
}

TEST(AuditRecord, CanonicalEncodingRoundTripsAndIsDeterministic) {
    ChainedRecord e{7, sample(7)};
    e.record.break_glass = true;
    e.record.redaction_count = 3;
    e.record.bytes = 123456;
    e.record.latency_us = 1500;
    e.record.time_us = -5;  // before the epoch: still one encoding
    const std::string a = canonical_encode(e);
    EXPECT_EQ(a, canonical_encode(e));
    const std::optional<ChainedRecord> back = canonical_decode(a);
    ASSERT_TRUE(back);
    EXPECT_EQ(back->seq, 7u);
    EXPECT_EQ(back->record, e.record);
}

TEST(AuditRecord, CanonicalGoldenBytesForEmptyRecord) {
    // Pins the key order and the smallest encodings: changing either breaks every stored chain.
    // The expected bytes come from Debian's python3-msgpack packing the same ordered map
    // (an independent encoder), so this is not our output checked against itself.
    ChainedRecord e{1, Record{}};
    const std::string bytes = canonical_encode(e);
    EXPECT_EQ(hex(bytes.substr(0, 14)), "de001ca373657101a46b696e6400");
    EXPECT_EQ(bytes.size(), 323u);
    EXPECT_EQ(hex(sha256(bytes)),
              "00729dd31b3a57e01f3c5042dfff6808c85bf3e8df440ffdd05a91db96f614f3");
}

// The canonical encoding with every header width (fixstr, str8, str16, str32; fixarray and
// array16; every integer width, negative ones too) against msgpack-cxx packing the same map in
// the same order: the encoder writes into presized space, not through msgpack::Writer.
TEST(AuditRecord, CanonicalEncodingMatchesAnIndependentEncoder) {
    const std::vector<std::string> lengths = {std::string(),          std::string(31, 'a'),
                                              std::string(32, 'b'),   std::string(255, 'c'),
                                              std::string(256, 'd'),  std::string(65535, 'e'),
                                              std::string(65536, 'f')};
    const int64_t times[] = {0,
                             127,
                             128,
                             65536,
                             -1,
                             -32,
                             -33,
                             -129,
                             -32769,
                             -2147483649LL,
                             std::numeric_limits<int64_t>::min(),
                             std::numeric_limits<int64_t>::max()};
    for (size_t i = 0; i < lengths.size(); ++i) {
        for (const int64_t time_us : times) {
            Record r = sample(static_cast<int>(i));
            r.time_us = time_us;
            r.query = lengths[i];
            r.detail = lengths[lengths.size() - 1 - i];
            r.patient_ids.assign(i * 3, "patient");  // 0 .. 18 elements: fixarray and array16
            r.latency_us = uint64_t{1} << (i * 9);
            r.bytes = std::numeric_limits<uint64_t>::max() >> i;
            r.http_status = static_cast<uint16_t>(i * 11000);
            r.redaction_count = static_cast<uint32_t>(uint64_t{1} << (i * 5));
            r.break_glass = i % 2 == 1;
            const uint64_t seq = uint64_t{1} << (i * 10);

            ::msgpack::sbuffer expected;
            ::msgpack::packer<::msgpack::sbuffer> pk(&expected);
            auto str = [&](const char *key, const std::string &value) {
                pk.pack(std::string(key));
                pk.pack(value);
            };
            auto strings = [&](const char *key, const std::vector<std::string> &values) {
                pk.pack(std::string(key));
                pk.pack_array(static_cast<uint32_t>(values.size()));
                for (const std::string &v : values)
                    pk.pack(v);
            };
            pk.pack_map(28);
            pk.pack(std::string("seq"));
            pk.pack(seq);
            pk.pack(std::string("kind"));
            pk.pack(static_cast<uint64_t>(r.kind));
            pk.pack(std::string("time_us"));
            pk.pack(r.time_us);
            str("record_id", r.record_id);
            str("correlation_id", r.correlation_id);
            str("traceparent", r.traceparent);
            str("client_id", r.client_id);
            str("user", r.user);
            strings("patient_ids", r.patient_ids);
            str("method", r.method);
            str("resource_type", r.resource_type);
            str("interaction", r.interaction);
            str("query", r.query);
            pk.pack(std::string("http_status"));
            pk.pack(static_cast<uint64_t>(r.http_status));
            pk.pack(std::string("latency_us"));
            pk.pack(r.latency_us);
            pk.pack(std::string("bytes"));
            pk.pack(r.bytes);
            str("upstream", r.upstream);
            str("policy_version", r.policy_version);
            str("decision", r.decision);
            str("reason", r.reason);
            strings("consent_ids", r.consent_ids);
            str("purpose_of_use", r.purpose_of_use);
            pk.pack(std::string("break_glass"));
            pk.pack(r.break_glass);
            pk.pack(std::string("redaction_count"));
            pk.pack(static_cast<uint64_t>(r.redaction_count));
            str("client_address", r.client_address);
            str("cert_fingerprint", r.cert_fingerprint);
            str("jti_hash", r.jti_hash);
            str("detail", r.detail);

            const std::string bytes = canonical_encode({seq, r});
            ASSERT_EQ(bytes, std::string(expected.data(), expected.size()))
                << "query length " << lengths[i].size() << ", time_us " << time_us;
            std::string appended = "prefix";
            canonical_encode_into(appended, seq, r);
            EXPECT_EQ(appended, "prefix" + bytes);
            const std::optional<ChainedRecord> back = canonical_decode(bytes);
            ASSERT_TRUE(back);
            EXPECT_EQ(back->record, r);
            // The wire form is the same fields without the seq.
            const std::optional<Record> wire = decode_record(encode_record(r));
            ASSERT_TRUE(wire);
            EXPECT_EQ(*wire, r);
        }
    }
}

TEST(AuditRecord, ChainHasherMatchesChainHash) {
    ChainHasher hasher;
    std::string previous = zero_hash();
    for (int i = 0; i < 5; ++i) {
        const std::string canonical = canonical_encode({static_cast<uint64_t>(i + 1), sample(i)});
        char out[kHashSize];
        ASSERT_TRUE(hasher.hash(previous, canonical, out));
        const std::string expected = sha256(previous + canonical);
        EXPECT_EQ(std::string(out, kHashSize), expected);
        EXPECT_EQ(chain_hash(previous, canonical), expected);
        previous = expected;
    }
}

TEST(AuditRecord, NonCanonicalBytesAreRefused) {
    ChainedRecord e{3, sample(3)};
    std::string bytes = canonical_encode(e);
    // Same content with an extra unknown key appended: decodes leniently on the wire, never as
    // a stored record.
    std::string extended = bytes;
    extended[2] = static_cast<char>(static_cast<uint8_t>(extended[2]) + 1);  // map16 count + 1
    msgpack::Writer w(extended);
    w.key("extra");
    w.uint(1);
    EXPECT_FALSE(canonical_decode(extended));
    // The seq encoded wider than necessary (uint64 instead of fixint).
    std::string padded;
    padded.append(bytes.substr(0, 3 + 4));  // map16 header + "seq" key
    padded.push_back(static_cast<char>(0xcf));
    padded.append(std::string(7, '\0'));
    padded.push_back(3);
    padded.append(bytes.substr(3 + 4 + 1));
    EXPECT_FALSE(canonical_decode(padded));
    EXPECT_FALSE(canonical_decode(bytes.substr(0, bytes.size() - 1)));
    EXPECT_TRUE(canonical_decode(bytes));
}

TEST(AuditRecord, WireEncodingSkipsUnknownKeys) {
    const Record r = sample(1);
    std::string body;
    msgpack::Writer w(body);
    w.map(2);
    w.key("future_field");
    w.array(1);
    w.uint(1);
    w.key("client_id");
    w.str("x");
    const std::optional<Record> decoded = decode_record(body);
    ASSERT_TRUE(decoded);
    EXPECT_EQ(decoded->client_id, "x");
    EXPECT_EQ(decode_record(encode_record(r)), r);
    EXPECT_FALSE(decode_record("\x81\xa4kind\x09"));  // kind out of range
}

TEST(AuditChain, IntactChainVerifies) {
    Chain chain = make_chain(20, {10, 20});
    const VerifyResult result = chain.verify();
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.records, 20u);
    EXPECT_EQ(result.checkpoints, 2u);
    EXPECT_EQ(result.last_checkpoint_seq, 20u);
}

TEST(AuditChain, EmptyLogVerifies) {
    Chain chain;
    EXPECT_TRUE(chain.verify().ok);
}

TEST(AuditChain, ModifiedRecordIsNamed) {
    Chain chain = make_chain(10);
    // Flip the client id of record 4 inside its stored value, keeping the stored hash.
    std::string &value = chain.entries[3].value;
    const size_t at = value.find("demo-clinician-app");
    ASSERT_NE(at, std::string::npos);
    value[at] = 'D';
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 4u);
}

TEST(AuditChain, ModifiedRecordWithRecomputedHashesIsCaughtByCheckpoint) {
    Chain chain = make_chain(10, {10});
    // An attacker rewrites record 4 and recomputes every hash after it: the chain is internally
    // consistent again, but checkpoint 10 signed the old head.
    std::string prev = chain.hashes[3];
    for (size_t i = 3; i < chain.entries.size(); ++i) {
        std::optional<ChainedRecord> e =
            canonical_decode(std::string_view(chain.entries[i].value).substr(kHashSize));
        ASSERT_TRUE(e);
        if (i == 3) {
            e->record.patient_ids = {"someone-else"};
        }
        const std::string canonical = canonical_encode(*e);
        prev = chain_hash(prev, canonical);
        chain.entries[i].value = stored_value(prev, canonical);
    }
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 10u);
    EXPECT_NE(result.problem.find("checkpoint"), std::string::npos);
}

TEST(AuditChain, DeletedRecordIsNamed) {
    Chain chain = make_chain(10);
    chain.entries.erase(chain.entries.begin() + 5);  // seq 6
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 6u);
    EXPECT_NE(result.problem.find("missing"), std::string::npos);
}

TEST(AuditChain, DeletedAndRenumberedIsCaught) {
    Chain chain = make_chain(10);
    // Remove seq 6 and shift the keys of the rest down, so keys stay contiguous.
    chain.entries.erase(chain.entries.begin() + 5);
    for (size_t i = 5; i < chain.entries.size(); ++i) {
        chain.entries[i].key_seq = i + 1;
    }
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 6u);
}

TEST(AuditChain, DeletedFromTheStartNeedsAnAnchor) {
    Chain chain = make_chain(10, {4});
    chain.entries.erase(chain.entries.begin(), chain.entries.begin() + 2);  // seq 1-2 gone
    VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 3u);
    // Purged up to a signed checkpoint (retention): the rest verifies from the anchor.
    Chain purged = make_chain(10, {4, 10});
    purged.entries.erase(purged.entries.begin(), purged.entries.begin() + 4);
    result = purged.verify();
    EXPECT_TRUE(result.ok) << result.problem;
    EXPECT_EQ(result.first_seq, 5u);
}

TEST(AuditChain, DeletedFromTheEndIsCaughtByCheckpoint) {
    Chain chain = make_chain(10, {10});
    chain.entries.pop_back();
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 10u);
}

TEST(AuditChain, InsertedRecordIsNamed) {
    Chain chain = make_chain(6);
    // A forged record slotted in as seq 4 with a correctly chained hash, pushing the rest back.
    ChainedRecord forged{4, sample(99)};
    const std::string canonical = canonical_encode(forged);
    const std::string h = chain_hash(chain.hashes[3], canonical);
    chain.entries.insert(chain.entries.begin() + 3, StoredEntry{4, stored_value(h, canonical)});
    for (size_t i = 4; i < chain.entries.size(); ++i) {
        chain.entries[i].key_seq = i + 1;
    }
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 5u);  // the original record 4, now stored at 5
}

TEST(AuditChain, ReorderedRecordsAreNamed) {
    Chain chain = make_chain(8);
    std::swap(chain.entries[2].value, chain.entries[3].value);  // values of seq 3 and 4
    const VerifyResult result = chain.verify();
    EXPECT_FALSE(result.ok);
    EXPECT_EQ(result.first_bad_seq, 3u);
}

TEST(AuditChain, ForgedCheckpointIsRefused) {
    Chain chain = make_chain(5, {5});
    chain.checkpoints[0].time_us += 1;
    EXPECT_FALSE(chain.verify().ok);
    Chain other = make_chain(5, {5});
    // A checkpoint signed by another key.
    std::unique_ptr<SigningKey> stranger = SigningKey::generate();
    sign_checkpoint(*stranger, other.checkpoints[0]);
    EXPECT_FALSE(other.verify().ok);
}

TEST(AuditCheckpoint, EncodingRoundTripsAndKeyPersists) {
    std::unique_ptr<SigningKey> key = SigningKey::generate();
    ASSERT_TRUE(key);
    const std::string pem = key->private_pem();
    EXPECT_NE(pem.find("BEGIN PRIVATE KEY"), std::string::npos);
    std::unique_ptr<SigningKey> again = SigningKey::from_private_pem(pem);
    ASSERT_TRUE(again);
    EXPECT_EQ(again->public_raw(), key->public_raw());
    EXPECT_EQ(key->public_raw().size(), kPublicKeySize);
    Checkpoint c{42, sha256("x"), 1234, "", ""};
    sign_checkpoint(*again, c);
    EXPECT_TRUE(verify_signature(key->public_raw(), checkpoint_message(c), c.signature));
    EXPECT_EQ(decode_checkpoint(encode_checkpoint(c)), c);
    EXPECT_FALSE(SigningKey::from_private_pem("not a key"));
}

TEST(AuditExport, JsonAndFhirCarryTheRecord) {
    ChainedRecord e{3, sample(3)};
    const std::string json = to_json(e);
    EXPECT_NE(json.find("\"seq\":3"), std::string::npos);
    EXPECT_NE(json.find("\"patient_ids\":[\"pat-0\"]"), std::string::npos);
    EXPECT_NE(json.find("\"time\":\"2026-05-28T"), std::string::npos);
    const std::string fhir = to_fhir_audit_event(e);
    EXPECT_NE(fhir.find("\"resourceType\":\"AuditEvent\""), std::string::npos);
    EXPECT_NE(fhir.find("IHE.BasicAudit.PatientQuery"), std::string::npos);
    EXPECT_NE(fhir.find("\"reference\":\"Patient/pat-0\""), std::string::npos);
    EXPECT_NE(fhir.find("\"action\":\"E\""), std::string::npos);
    EXPECT_NE(fhir.find("XrequestId"), std::string::npos);
    // query is base64Binary: standard alphabet with padding.
    EXPECT_NE(fhir.find("cGF0aWVudD1wYXQtMSZjYXRlZ29yeT1sYWJvcmF0b3J5"), std::string::npos);
    EXPECT_EQ(fhir.find("HTEST"), std::string::npos);
    // Without a patient: the generic BALP profile; policyd events: no BALP profile at all.
    e.record.patient_ids.clear();
    EXPECT_NE(to_fhir_audit_event(e).find("StructureDefinition/IHE.BasicAudit.Query\""),
              std::string::npos);
    e.record.kind = Kind::PolicyReload;
    EXPECT_EQ(to_fhir_audit_event(e).find("\"meta\""), std::string::npos) << to_fhir_audit_event(e);
    EXPECT_NE(to_fhir_audit_event(e).find("\"code\":\"policy-reload\""), std::string::npos);
}

}  // namespace
}  // namespace ehrgate::audit
