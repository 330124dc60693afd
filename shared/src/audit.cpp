#include "ehrgate/audit.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "ehrgate/json_text.hpp"
#include "ehrgate/msgpack.hpp"

namespace ehrgate::audit {

namespace {

using msgpack::Reader;
using msgpack::Writer;

// Record fields in their one canonical order. Both encodings (canonical and wire) write them
// all, every time: a missing key and an empty value must not be two encodings of one record.
constexpr uint32_t kRecordFieldCount = 27;

void write_strings(Writer &w, const std::vector<std::string> &values) {
    w.array(static_cast<uint32_t>(values.size()));
    for (const std::string &v : values) {
        w.str(v);
    }
}

void write_fields(Writer &w, const Record &r) {
    auto put = [&](std::string_view key, std::string_view value) {
        w.key(key);
        w.str(value);
    };
    w.key("kind");
    w.uint(static_cast<uint8_t>(r.kind));
    w.key("time_us");
    w.sint(r.time_us);
    put("record_id", r.record_id);
    put("correlation_id", r.correlation_id);
    put("traceparent", r.traceparent);
    put("client_id", r.client_id);
    put("user", r.user);
    w.key("patient_ids");
    write_strings(w, r.patient_ids);
    put("method", r.method);
    put("resource_type", r.resource_type);
    put("interaction", r.interaction);
    put("query", r.query);
    w.key("http_status");
    w.uint(r.http_status);
    w.key("latency_us");
    w.uint(r.latency_us);
    w.key("bytes");
    w.uint(r.bytes);
    put("upstream", r.upstream);
    put("policy_version", r.policy_version);
    put("decision", r.decision);
    put("reason", r.reason);
    w.key("consent_ids");
    write_strings(w, r.consent_ids);
    put("purpose_of_use", r.purpose_of_use);
    w.key("break_glass");
    w.boolean(r.break_glass);
    w.key("redaction_count");
    w.uint(r.redaction_count);
    put("client_address", r.client_address);
    put("cert_fingerprint", r.cert_fingerprint);
    put("jti_hash", r.jti_hash);
    put("detail", r.detail);
}

bool read_string(Reader &r, std::string &out) {
    const std::optional<std::string_view> v = r.read_str();
    if (v) {
        out.assign(*v);
    }
    return true;
}

bool read_strings(Reader &r, std::vector<std::string> &out) {
    const std::optional<uint32_t> n = r.read_array();
    // Bounded by the frame size anyway; refuse absurd counts before reserving.
    if (!n || *n > 4096) {
        r.fail();
        return true;
    }
    out.clear();
    for (uint32_t i = 0; i < *n && r.ok(); ++i) {
        const std::optional<std::string_view> v = r.read_str();
        if (v) {
            out.emplace_back(*v);
        }
    }
    return true;
}

template <typename Int>
bool read_uint_into(Reader &r, Int &out) {
    const std::optional<uint64_t> v = r.read_uint();
    if (v && *v <= static_cast<uint64_t>(static_cast<Int>(~Int{0}))) {
        out = static_cast<Int>(*v);
    } else {
        r.fail();
    }
    return true;
}

// Reads one record field; false for keys that are not record fields.
bool read_field(std::string_view key, Reader &r, Record &rec) {
    if (key == "kind") {
        uint8_t kind = 0;
        read_uint_into(r, kind);
        if (kind > static_cast<uint8_t>(Kind::Admin)) {
            r.fail();
        }
        rec.kind = static_cast<Kind>(kind);
        return true;
    }
    if (key == "time_us") {
        const std::optional<int64_t> v = r.read_int();
        if (v) {
            rec.time_us = *v;
        }
        return true;
    }
    if (key == "http_status")
        return read_uint_into(r, rec.http_status);
    if (key == "latency_us")
        return read_uint_into(r, rec.latency_us);
    if (key == "bytes")
        return read_uint_into(r, rec.bytes);
    if (key == "redaction_count")
        return read_uint_into(r, rec.redaction_count);
    if (key == "break_glass") {
        const std::optional<bool> v = r.read_bool();
        rec.break_glass = v.value_or(false);
        return true;
    }
    if (key == "patient_ids")
        return read_strings(r, rec.patient_ids);
    if (key == "consent_ids")
        return read_strings(r, rec.consent_ids);
    struct StringField {
        std::string_view name;
        std::string Record::*member;
    };
    static const StringField kStrings[] = {
        {"record_id", &Record::record_id},
        {"correlation_id", &Record::correlation_id},
        {"traceparent", &Record::traceparent},
        {"client_id", &Record::client_id},
        {"user", &Record::user},
        {"method", &Record::method},
        {"resource_type", &Record::resource_type},
        {"interaction", &Record::interaction},
        {"query", &Record::query},
        {"upstream", &Record::upstream},
        {"policy_version", &Record::policy_version},
        {"decision", &Record::decision},
        {"reason", &Record::reason},
        {"purpose_of_use", &Record::purpose_of_use},
        {"client_address", &Record::client_address},
        {"cert_fingerprint", &Record::cert_fingerprint},
        {"jti_hash", &Record::jti_hash},
        {"detail", &Record::detail},
    };
    for (const StringField &f : kStrings) {
        if (key == f.name) {
            return read_string(r, rec.*(f.member));
        }
    }
    return false;
}

void put_be64(std::string &out, uint64_t v) {
    for (int i = 7; i >= 0; --i) {
        out.push_back(static_cast<char>(v >> (8 * i)));
    }
}

struct PkeyFree {
    void operator()(EVP_PKEY *p) const { EVP_PKEY_free(p); }
};
struct MdCtxFree {
    void operator()(EVP_MD_CTX *p) const { EVP_MD_CTX_free(p); }
};
struct BioFree {
    void operator()(BIO *p) const { BIO_free(p); }
};

}  // namespace

const char *kind_name(Kind kind) {
    switch (kind) {
        case Kind::Access:
            return "access";
        case Kind::Outcome:
            return "outcome";
        case Kind::ConsentChange:
            return "consent-change";
        case Kind::PolicyReload:
            return "policy-reload";
        case Kind::Revocation:
            return "revocation";
        case Kind::Admin:
            return "admin";
    }
    return "unknown";
}

std::optional<Kind> parse_kind(std::string_view name) {
    for (uint8_t k = 0; k <= static_cast<uint8_t>(Kind::Admin); ++k) {
        if (name == kind_name(static_cast<Kind>(k))) {
            return static_cast<Kind>(k);
        }
    }
    return std::nullopt;
}

std::string canonical_encode(const ChainedRecord &entry) {
    std::string out;
    out.reserve(256);
    Writer w(out);
    w.map(kRecordFieldCount + 1);
    w.key("seq");
    w.uint(entry.seq);
    write_fields(w, entry.record);
    return out;
}

std::optional<ChainedRecord> canonical_decode(std::string_view bytes) {
    ChainedRecord entry;
    Reader r(bytes);
    const std::optional<uint32_t> count = r.read_map();
    if (!count || *count != kRecordFieldCount + 1) {
        return std::nullopt;
    }
    for (uint32_t i = 0; i < *count && r.ok(); ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return std::nullopt;
        }
        if (*key == "seq") {
            read_uint_into(r, entry.seq);
        } else if (!read_field(*key, r, entry.record)) {
            return std::nullopt;
        }
    }
    if (!r.ok() || !r.at_end() || canonical_encode(entry) != bytes) {
        return std::nullopt;
    }
    return entry;
}

void encode_record_fields(std::string &out, const Record &record) {
    Writer w(out);
    w.map(kRecordFieldCount);
    write_fields(w, record);
}

std::string encode_record(const Record &record) {
    std::string out;
    encode_record_fields(out, record);
    return out;
}

std::optional<Record> decode_record(std::string_view msgpack_map) {
    Record rec;
    Reader r(msgpack_map);
    const std::optional<uint32_t> count = r.read_map();
    for (uint32_t i = 0; count && i < *count && r.ok(); ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return std::nullopt;
        }
        if (!read_field(*key, r, rec)) {
            r.skip();
        }
    }
    if (!count || !r.ok() || !r.at_end()) {
        return std::nullopt;
    }
    return rec;
}

std::string zero_hash() {
    return std::string(kHashSize, '\0');
}

std::string sha256(std::string_view bytes) {
    std::string out(kHashSize, '\0');
    unsigned int len = 0;
    EVP_Digest(bytes.data(), bytes.size(), reinterpret_cast<unsigned char *>(out.data()), &len,
               EVP_sha256(), nullptr);
    return out;
}

std::string chain_hash(std::string_view previous, std::string_view canonical) {
    std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
    std::string out(kHashSize, '\0');
    unsigned int len = 0;
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx.get(), previous.data(), previous.size()) != 1 ||
        EVP_DigestUpdate(ctx.get(), canonical.data(), canonical.size()) != 1 ||
        EVP_DigestFinal_ex(ctx.get(), reinterpret_cast<unsigned char *>(out.data()), &len) != 1) {
        // Only allocation failure gets here; an empty hash never matches, so nothing verifies.
        return {};
    }
    return out;
}

std::string hex(std::string_view bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    out.reserve(bytes.size() * 2);
    for (const char ch : bytes) {
        const auto b = static_cast<uint8_t>(ch);
        out.push_back(kHex[b >> 4]);
        out.push_back(kHex[b & 0xf]);
    }
    return out;
}

std::optional<std::string> unhex(std::string_view text) {
    if (text.size() % 2 != 0) {
        return std::nullopt;
    }
    auto nibble = [](char c) -> int {
        if (c >= '0' && c <= '9')
            return c - '0';
        if (c >= 'a' && c <= 'f')
            return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
            return c - 'A' + 10;
        return -1;
    };
    std::string out;
    for (size_t i = 0; i < text.size(); i += 2) {
        const int hi = nibble(text[i]);
        const int lo = nibble(text[i + 1]);
        if (hi < 0 || lo < 0) {
            return std::nullopt;
        }
        out.push_back(static_cast<char>(hi << 4 | lo));
    }
    return out;
}

std::string stored_value(std::string_view hash, std::string_view canonical) {
    std::string out;
    out.reserve(hash.size() + canonical.size());
    out.append(hash);
    out.append(canonical);
    return out;
}

// ---- checkpoints -----------------------------------------------------------------------------

std::string checkpoint_message(const Checkpoint &c) {
    std::string out = "ehrgate-audit-checkpoint/v1";
    put_be64(out, c.seq);
    out.append(c.hash);
    put_be64(out, static_cast<uint64_t>(c.time_us));
    return out;
}

std::string encode_checkpoint(const Checkpoint &c) {
    std::string out;
    Writer w(out);
    w.map(5);
    w.key("seq");
    w.uint(c.seq);
    w.key("hash");
    w.bin(c.hash);
    w.key("time_us");
    w.sint(c.time_us);
    w.key("key_id");
    w.str(c.key_id);
    w.key("signature");
    w.bin(c.signature);
    return out;
}

std::optional<Checkpoint> decode_checkpoint(std::string_view bytes) {
    Checkpoint c;
    Reader r(bytes);
    const std::optional<uint32_t> count = r.read_map();
    for (uint32_t i = 0; count && i < *count && r.ok(); ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return std::nullopt;
        }
        if (*key == "seq") {
            read_uint_into(r, c.seq);
        } else if (*key == "hash") {
            if (auto v = r.read_bin())
                c.hash.assign(*v);
        } else if (*key == "time_us") {
            if (auto v = r.read_int())
                c.time_us = *v;
        } else if (*key == "key_id") {
            read_string(r, c.key_id);
        } else if (*key == "signature") {
            if (auto v = r.read_bin())
                c.signature.assign(*v);
        } else {
            r.skip();
        }
    }
    if (!count || !r.ok() || !r.at_end()) {
        return std::nullopt;
    }
    return c;
}

std::unique_ptr<SigningKey> SigningKey::generate() {
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
    if (pkey == nullptr) {
        return nullptr;
    }
    return std::unique_ptr<SigningKey>(new SigningKey(pkey));
}

std::unique_ptr<SigningKey> SigningKey::from_private_pem(std::string_view pem) {
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!bio) {
        return nullptr;
    }
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr);
    if (pkey == nullptr) {
        return nullptr;
    }
    if (EVP_PKEY_get_id(pkey) != EVP_PKEY_ED25519) {
        EVP_PKEY_free(pkey);
        return nullptr;
    }
    return std::unique_ptr<SigningKey>(new SigningKey(pkey));
}

SigningKey::~SigningKey() {
    EVP_PKEY_free(static_cast<EVP_PKEY *>(pkey_));
}

std::string SigningKey::private_pem() const {
    std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
    if (!bio || PEM_write_bio_PrivateKey(bio.get(), static_cast<EVP_PKEY *>(pkey_), nullptr,
                                         nullptr, 0, nullptr, nullptr) != 1) {
        return {};
    }
    char *data = nullptr;
    const long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<size_t>(len));
}

std::string SigningKey::public_raw() const {
    std::string out(kPublicKeySize, '\0');
    size_t len = out.size();
    if (EVP_PKEY_get_raw_public_key(static_cast<EVP_PKEY *>(pkey_),
                                    reinterpret_cast<unsigned char *>(out.data()), &len) != 1) {
        return {};
    }
    out.resize(len);
    return out;
}

std::string SigningKey::key_id() const {
    return hex(sha256(public_raw()));
}

std::string SigningKey::sign(std::string_view message) const {
    std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
    std::string sig(kSignatureSize, '\0');
    size_t len = sig.size();
    if (!ctx ||
        EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, static_cast<EVP_PKEY *>(pkey_)) !=
            1 ||
        EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char *>(sig.data()), &len,
                       reinterpret_cast<const unsigned char *>(message.data()),
                       message.size()) != 1) {
        return {};
    }
    sig.resize(len);
    return sig;
}

bool verify_signature(std::string_view public_raw, std::string_view message,
                      std::string_view signature) {
    if (public_raw.size() != kPublicKeySize || signature.size() != kSignatureSize) {
        return false;
    }
    std::unique_ptr<EVP_PKEY, PkeyFree> pkey(EVP_PKEY_new_raw_public_key(
        EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char *>(public_raw.data()),
        public_raw.size()));
    std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
    return pkey && ctx &&
           EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) == 1 &&
           EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char *>(signature.data()),
                            signature.size(),
                            reinterpret_cast<const unsigned char *>(message.data()),
                            message.size()) == 1;
}

void sign_checkpoint(const SigningKey &key, Checkpoint &checkpoint) {
    checkpoint.key_id = key.key_id();
    checkpoint.signature = key.sign(checkpoint_message(checkpoint));
}

// ---- verification ----------------------------------------------------------------------------

ChainVerifier::ChainVerifier(std::string public_raw, std::vector<Checkpoint> checkpoints)
    : public_raw_(std::move(public_raw)), checkpoints_(std::move(checkpoints)) {
    std::sort(checkpoints_.begin(), checkpoints_.end(),
              [](const Checkpoint &a, const Checkpoint &b) { return a.seq < b.seq; });
    // Every checkpoint's signature is checked up front, whether or not a record still
    // references it: a forged or altered checkpoint is tampering in itself.
    for (const Checkpoint &c : checkpoints_) {
        if (c.hash.size() != kHashSize ||
            !verify_signature(public_raw_, checkpoint_message(c), c.signature)) {
            fail(c.seq, "checkpoint at seq " + std::to_string(c.seq) +
                            " has an invalid signature (forged, altered, or another key)");
            return;
        }
        ++result_.checkpoints;
    }
}

const Checkpoint *ChainVerifier::checkpoint_at(uint64_t seq) const {
    const auto it = std::lower_bound(checkpoints_.begin(), checkpoints_.end(), seq,
                                     [](const Checkpoint &c, uint64_t s) { return c.seq < s; });
    return it != checkpoints_.end() && it->seq == seq ? &*it : nullptr;
}

bool ChainVerifier::fail(uint64_t seq, std::string problem) {
    if (result_.ok) {
        result_.ok = false;
        result_.first_bad_seq = seq;
        result_.problem = std::move(problem);
    }
    return false;
}

bool ChainVerifier::add(uint64_t key_seq, std::string_view value) {
    if (!result_.ok) {
        return false;
    }
    if (expected_seq_ == 0) {
        // The start of what is kept: seq 1 from the zero hash, or a signed anchor right before.
        if (key_seq == 1) {
            previous_hash_ = zero_hash();
        } else if (const Checkpoint *anchor = checkpoint_at(key_seq - 1)) {
            previous_hash_ = anchor->hash;
        } else {
            return fail(key_seq, "log starts at seq " + std::to_string(key_seq) +
                                     " with no signed checkpoint at seq " +
                                     std::to_string(key_seq - 1) +
                                     " to anchor it (records deleted from the start)");
        }
        expected_seq_ = key_seq;
        result_.first_seq = key_seq;
    }
    if (key_seq != expected_seq_) {
        return fail(expected_seq_, key_seq > expected_seq_
                                       ? "record " + std::to_string(expected_seq_) +
                                             " is missing (deleted); next stored is " +
                                             std::to_string(key_seq)
                                       : "record key " + std::to_string(key_seq) + " out of order");
    }
    if (value.size() <= kHashSize) {
        return fail(key_seq, "record " + std::to_string(key_seq) + " is truncated");
    }
    const std::string_view stored_hash = value.substr(0, kHashSize);
    const std::string_view canonical = value.substr(kHashSize);
    std::optional<ChainedRecord> entry = canonical_decode(canonical);
    if (!entry) {
        return fail(key_seq, "record " + std::to_string(key_seq) + " is not canonically encoded");
    }
    if (entry->seq != key_seq) {
        return fail(key_seq, "record stored at " + std::to_string(key_seq) + " says it is seq " +
                                 std::to_string(entry->seq) + " (moved, reordered or inserted)");
    }
    const std::string computed = chain_hash(previous_hash_, canonical);
    if (computed != stored_hash) {
        return fail(key_seq, "record " + std::to_string(key_seq) +
                                 " does not match the chain (modified, inserted, or a record "
                                 "before it was removed)");
    }
    if (const Checkpoint *c = checkpoint_at(key_seq); c != nullptr && c->hash != computed) {
        return fail(key_seq, "record " + std::to_string(key_seq) +
                                 " differs from what checkpoint " + std::to_string(c->seq) +
                                 " signed (chain rewritten)");
    }
    if (checkpoint_at(key_seq) != nullptr) {
        result_.last_checkpoint_seq = key_seq;
    }
    previous_hash_ = computed;
    ++expected_seq_;
    ++result_.records;
    result_.last_seq = key_seq;
    last_ = std::move(*entry);
    return true;
}

VerifyResult ChainVerifier::finish() {
    if (result_.ok && !checkpoints_.empty()) {
        const Checkpoint &newest = checkpoints_.back();
        if (newest.seq > result_.last_seq) {
            fail(result_.last_seq + 1, "checkpoint at seq " + std::to_string(newest.seq) +
                                           " covers records that are gone (deleted from the "
                                           "end); last stored is " +
                                           std::to_string(result_.last_seq));
        }
    }
    return result_;
}

VerifyResult verify_chain(const std::vector<StoredEntry> &entries,
                          const std::vector<Checkpoint> &checkpoints, std::string_view public_raw) {
    ChainVerifier verifier{std::string(public_raw), checkpoints};
    for (const StoredEntry &e : entries) {
        if (!verifier.add(e.key_seq, e.value)) {
            break;
        }
    }
    return verifier.finish();
}

// ---- export ----------------------------------------------------------------------------------

namespace {

std::string iso_time(int64_t time_us) {
    const time_t secs = static_cast<time_t>(time_us / 1000000);
    const auto micros = static_cast<int>(time_us % 1000000);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[40];
    const size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    char frac[16];
    std::snprintf(frac, sizeof frac, ".%06dZ", micros < 0 ? 0 : micros);
    return std::string(buf, n) + frac;
}

void field(std::string &out, std::string_view key, std::string_view value, bool &first) {
    out += first ? "" : ",";
    first = false;
    json::append_string(out, key);
    out += ':';
    json::append_string(out, value);
}

void field_raw(std::string &out, std::string_view key, std::string_view raw, bool &first) {
    out += first ? "" : ",";
    first = false;
    json::append_string(out, key);
    out += ':';
    out += raw;
}

std::string json_array(const std::vector<std::string> &values) {
    std::string out = "[";
    for (size_t i = 0; i < values.size(); ++i) {
        out += i == 0 ? "" : ",";
        json::append_string(out, values[i]);
    }
    return out + "]";
}

}  // namespace

std::string to_json(const ChainedRecord &entry) {
    const Record &r = entry.record;
    std::string out = "{";
    bool first = true;
    field_raw(out, "seq", std::to_string(entry.seq), first);
    field(out, "kind", kind_name(r.kind), first);
    field(out, "time", iso_time(r.time_us), first);
    field_raw(out, "time_us", std::to_string(r.time_us), first);
    field(out, "record_id", r.record_id, first);
    field(out, "correlation_id", r.correlation_id, first);
    field(out, "traceparent", r.traceparent, first);
    field(out, "client_id", r.client_id, first);
    field(out, "user", r.user, first);
    field_raw(out, "patient_ids", json_array(r.patient_ids), first);
    field(out, "method", r.method, first);
    field(out, "resource_type", r.resource_type, first);
    field(out, "interaction", r.interaction, first);
    field(out, "query", r.query, first);
    field_raw(out, "http_status", std::to_string(r.http_status), first);
    field_raw(out, "latency_us", std::to_string(r.latency_us), first);
    field_raw(out, "bytes", std::to_string(r.bytes), first);
    field(out, "upstream", r.upstream, first);
    field(out, "policy_version", r.policy_version, first);
    field(out, "decision", r.decision, first);
    field(out, "reason", r.reason, first);
    field_raw(out, "consent_ids", json_array(r.consent_ids), first);
    field(out, "purpose_of_use", r.purpose_of_use, first);
    field_raw(out, "break_glass", r.break_glass ? "true" : "false", first);
    field_raw(out, "redaction_count", std::to_string(r.redaction_count), first);
    field(out, "client_address", r.client_address, first);
    field(out, "cert_fingerprint", r.cert_fingerprint, first);
    field(out, "jti_hash", r.jti_hash, first);
    field(out, "detail", r.detail, first);
    return out + "}";
}

namespace {

// BALP: the RESTful interaction as subtype, and the CRUDE action it implies.
struct RestfulMapping {
    std::string_view interaction;
    char action;
    std::string_view profile;  // BALP profile for patient-specific access
};

RestfulMapping restful(std::string_view interaction) {
    static constexpr RestfulMapping kMap[] = {
        {"read", 'R', "IHE.BasicAudit.PatientRead"},
        {"vread", 'R', "IHE.BasicAudit.PatientRead"},
        {"history-instance", 'R', "IHE.BasicAudit.PatientRead"},
        {"search-type", 'E', "IHE.BasicAudit.PatientQuery"},
        {"search", 'E', "IHE.BasicAudit.PatientQuery"},
        {"search-system", 'E', "IHE.BasicAudit.PatientQuery"},
        {"create", 'C', "IHE.BasicAudit.PatientCreate"},
        {"update", 'U', "IHE.BasicAudit.PatientUpdate"},
        {"patch", 'U', "IHE.BasicAudit.PatientUpdate"},
        {"delete", 'D', "IHE.BasicAudit.PatientDelete"},
    };
    for (const RestfulMapping &m : kMap) {
        if (m.interaction == interaction) {
            return m;
        }
    }
    return {interaction, 'E', ""};
}

// FHIR base64Binary is standard base64 with padding (not base64url).
std::string base64(std::string_view bytes) {
    std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
    const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char *>(out.data()),
                                  reinterpret_cast<const unsigned char *>(bytes.data()),
                                  static_cast<int>(bytes.size()));
    out.resize(n < 0 ? 0 : static_cast<size_t>(n));
    return out;
}

std::string coding(std::string_view system, std::string_view code, std::string_view display) {
    std::string out = "{\"system\":";
    json::append_string(out, system);
    out += ",\"code\":";
    json::append_string(out, code);
    if (!display.empty()) {
        out += ",\"display\":";
        json::append_string(out, display);
    }
    return out + "}";
}

}  // namespace

std::string to_fhir_audit_event(const ChainedRecord &entry) {
    const Record &r = entry.record;
    const bool rest = r.kind == Kind::Access || r.kind == Kind::Outcome;
    const RestfulMapping m = restful(r.interaction);
    std::string out = "{\"resourceType\":\"AuditEvent\",\"id\":";
    json::append_string(out, r.record_id.empty() ? std::to_string(entry.seq) : r.record_id);
    // BALP profiles: the patient-specific one when a patient is known, else the generic one.
    if (rest && !m.profile.empty()) {
        std::string profile(m.profile);
        if (r.patient_ids.empty()) {
            profile.replace(profile.find("Patient"), 7, "");
        }
        out += ",\"meta\":{\"profile\":[";
        json::append_string(out,
                            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/" + profile);
        out += "]}";
    }
    // type: a RESTful operation for requests, an application activity for the rest.
    if (rest) {
        out += ",\"type\":" + coding("http://terminology.hl7.org/CodeSystem/audit-event-type",
                                     "rest", "Restful Operation");
        if (!r.interaction.empty()) {
            out += ",\"subtype\":[" +
                   coding("http://hl7.org/fhir/restful-interaction", r.interaction, "") + "]";
        }
        out += ",\"action\":\"" + std::string(1, m.action) + "\"";
    } else {
        out += ",\"type\":" + coding("http://dicom.nema.org/resources/ontology/DCM", "110100",
                                     "Application Activity");
        out += ",\"subtype\":[" +
               coding("urn:ehrgate:audit-kind", kind_name(r.kind), kind_name(r.kind)) + "]";
        out += ",\"action\":\"E\"";
    }
    out += ",\"recorded\":";
    json::append_string(out, iso_time(r.time_us));
    // outcome: 0 success, 4 minor failure (refused by policy), 8 serious failure (error).
    const char *outcome = "0";
    if (r.decision == "deny" || (r.http_status >= 400 && r.http_status < 500)) {
        outcome = "4";
    } else if (r.decision == "error" || r.http_status >= 500) {
        outcome = "8";
    }
    out += ",\"outcome\":\"" + std::string(outcome) + "\"";
    if (!r.reason.empty() || !r.detail.empty()) {
        out += ",\"outcomeDesc\":";
        json::append_string(out, r.reason.empty()   ? r.detail
                                 : r.detail.empty() ? r.reason
                                                    : r.reason + ": " + r.detail);
    }
    if (!r.purpose_of_use.empty()) {
        out += ",\"purposeOfEvent\":[{\"coding\":[" +
               coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", r.purpose_of_use, "") +
               "]}]";
    }
    // agents: the client application, the user (the requestor when present), the gateway.
    out += ",\"agent\":[";
    bool first_agent = true;
    auto agent = [&](std::string_view type_code, std::string_view type_display,
                     std::string_view system, std::string_view value, bool requestor,
                     std::string_view address) {
        out += first_agent ? "" : ",";
        first_agent = false;
        out += "{\"type\":{\"coding\":[" +
               coding("http://dicom.nema.org/resources/ontology/DCM", type_code, type_display) +
               "]},\"who\":{\"identifier\":{\"system\":";
        json::append_string(out, system);
        out += ",\"value\":";
        json::append_string(out, value);
        out += "}},\"requestor\":";
        out += requestor ? "true" : "false";
        if (!address.empty()) {
            out += ",\"network\":{\"address\":";
            json::append_string(out, address);
            out += ",\"type\":\"2\"}";
        }
        out += "}";
    };
    if (!r.client_id.empty()) {
        agent("110150", "Application", "urn:ehrgate:client-id", r.client_id, r.user.empty(),
              r.client_address);
    }
    if (!r.user.empty()) {
        agent("110153", "Source Role ID", "urn:ehrgate:user", r.user, true, "");
    }
    agent("110152", "Destination Role ID", "urn:ehrgate:gateway", "ehrgate", false, "");
    out += "],\"source\":{\"observer\":{\"display\":\"ehrgate\"},\"type\":[" +
           coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4",
                  "Application Server") +
           "]}";
    // entities: the patient(s), the query, the transaction (X-Request-ID), consents.
    out += ",\"entity\":[";
    bool first_entity = true;
    auto open_entity = [&]() {
        out += first_entity ? "{" : ",{";
        first_entity = false;
    };
    for (const std::string &patient : r.patient_ids) {
        open_entity();
        out += "\"what\":{\"reference\":";
        json::append_string(out, "Patient/" + patient);
        out += "},\"type\":" +
               coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person") +
               ",\"role\":" +
               coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient") + "}";
    }
    if (!r.query.empty()) {
        open_entity();
        out += "\"type\":" +
               coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2",
                      "System Object") +
               ",\"role\":" +
               coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query") +
               ",\"query\":";
        json::append_string(out, base64(r.query));
        out += "}";
    }
    if (!r.correlation_id.empty()) {
        open_entity();
        out += "\"what\":{\"identifier\":{\"value\":";
        json::append_string(out, r.correlation_id);
        out += "}},\"type\":" +
               coding("https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                      "XrequestId",
                      "transport specific unique identifier where http X-Request-Id is used");
        out += "}";
    }
    if (!r.resource_type.empty() && r.patient_ids.empty()) {
        open_entity();
        out += "\"what\":{\"type\":";
        json::append_string(out, r.resource_type);
        out += "},\"type\":" +
               coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2",
                      "System Object") +
               "}";
    }
    for (const std::string &consent : r.consent_ids) {
        open_entity();
        out += "\"what\":{\"reference\":";
        json::append_string(out, "Consent/" + consent);
        out += "},\"type\":" +
               coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2",
                      "System Object") +
               "}";
    }
    out += "]";
    // What does not fit a standard element stays reachable as extensions with our own URLs.
    out += ",\"extension\":[{\"url\":\"urn:ehrgate:audit-seq\",\"valueUnsignedInt\":" +
           std::to_string(entry.seq) + "}";
    auto ext_str = [&](std::string_view name, std::string_view value) {
        if (value.empty())
            return;
        out += ",{\"url\":";
        json::append_string(out, "urn:ehrgate:" + std::string(name));
        out += ",\"valueString\":";
        json::append_string(out, value);
        out += "}";
    };
    ext_str("policy-version", r.policy_version);
    ext_str("decision", r.decision);
    ext_str("traceparent", r.traceparent);
    ext_str("upstream", r.upstream);
    ext_str("jti-sha256", r.jti_hash);
    ext_str("cert-sha256", r.cert_fingerprint);
    if (r.http_status != 0) {
        out += ",{\"url\":\"urn:ehrgate:http-status\",\"valueInteger\":" +
               std::to_string(r.http_status) + "}";
    }
    if (r.break_glass) {
        out += ",{\"url\":\"urn:ehrgate:break-glass\",\"valueBoolean\":true}";
    }
    out += "]}";
    return out;
}

}  // namespace ehrgate::audit
