#include "ehrgate/audit.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <array>
#include <cstdint>
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
enum class Field : uint8_t {
    Kind,
    TimeUs,
    RecordId,
    CorrelationId,
    Traceparent,
    ClientId,
    User,
    PatientIds,
    Method,
    ResourceType,
    Interaction,
    Query,
    HttpStatus,
    LatencyUs,
    Bytes,
    Upstream,
    PolicyVersion,
    Decision,
    Reason,
    ConsentIds,
    PurposeOfUse,
    BreakGlass,
    RedactionCount,
    ClientAddress,
    CertFingerprint,
    JtiHash,
    Detail,
};

constexpr std::array<std::string_view, 27> kFieldNames = {
    "kind",           "time_us",        "record_id",       "correlation_id", "traceparent",
    "client_id",      "user",           "patient_ids",     "method",         "resource_type",
    "interaction",    "query",          "http_status",     "latency_us",     "bytes",
    "upstream",       "policy_version", "decision",        "reason",         "consent_ids",
    "purpose_of_use", "break_glass",    "redaction_count", "client_address", "cert_fingerprint",
    "jti_hash",       "detail",
};
constexpr uint32_t kRecordFieldCount = kFieldNames.size();

// Writes msgpack with exactly msgpack::Writer's (smallest) encodings, straight into space sized
// by encoded_size_bound() beforehand: no capacity check or growth per byte. The writer encodes
// every record it appends, so this is on the audit log's hot path.
class BoundedWriter {
  public:
    BoundedWriter(std::string &out, size_t bound) : out_(out), start_(out.size()) {
        out.resize(start_ + bound);
        at_ = out.data() + start_;
    }
    // Trims the string to what was written.
    ~BoundedWriter() { out_.resize(static_cast<size_t>(at_ - out_.data())); }
    BoundedWriter(const BoundedWriter &) = delete;
    BoundedWriter &operator=(const BoundedWriter &) = delete;

    void boolean(bool value) { byte(value ? 0xc3 : 0xc2); }
    void uint(uint64_t value) {
        if (value <= 0x7f) {
            byte(static_cast<uint8_t>(value));
        } else if (value <= 0xff) {
            byte(0xcc);
            be(value, 1);
        } else if (value <= 0xffff) {
            byte(0xcd);
            be(value, 2);
        } else if (value <= 0xffffffffULL) {
            byte(0xce);
            be(value, 4);
        } else {
            byte(0xcf);
            be(value, 8);
        }
    }
    void sint(int64_t value) {
        if (value >= 0) {
            uint(static_cast<uint64_t>(value));
        } else if (value >= -32) {
            byte(static_cast<uint8_t>(value));
        } else if (value >= INT8_MIN) {
            byte(0xd0);
            be(static_cast<uint64_t>(value), 1);
        } else if (value >= INT16_MIN) {
            byte(0xd1);
            be(static_cast<uint64_t>(value), 2);
        } else if (value >= INT32_MIN) {
            byte(0xd2);
            be(static_cast<uint64_t>(value), 4);
        } else {
            byte(0xd3);
            be(static_cast<uint64_t>(value), 8);
        }
    }
    void str(std::string_view value) {
        const size_t n = value.size();
        if (n <= 31) {
            byte(static_cast<uint8_t>(0xa0 | n));
        } else if (n <= 0xff) {
            byte(0xd9);
            be(n, 1);
        } else if (n <= 0xffff) {
            byte(0xda);
            be(n, 2);
        } else {
            byte(0xdb);
            be(n, 4);
        }
        std::memcpy(at_, value.data(), n);
        at_ += n;
    }
    void key(std::string_view name) { str(name); }
    void array(uint32_t count) { header(count, 0x90, 0xdc, 0xdd); }
    void map(uint32_t count) { header(count, 0x80, 0xde, 0xdf); }

  private:
    void byte(uint8_t v) { *at_++ = static_cast<char>(v); }
    void be(uint64_t v, int bytes) {
        for (int shift = (bytes - 1) * 8; shift >= 0; shift -= 8) {
            byte(static_cast<uint8_t>(v >> shift));
        }
    }
    void header(uint32_t count, uint8_t fix, uint8_t marker16, uint8_t marker32) {
        if (count <= 15) {
            byte(static_cast<uint8_t>(fix | count));
        } else if (count <= 0xffff) {
            byte(marker16);
            be(count, 2);
        } else {
            byte(marker32);
            be(count, 4);
        }
    }

    std::string &out_;
    size_t start_;
    char *at_;
};

template <typename W>
void write_strings(W &w, const std::vector<std::string> &values) {
    w.array(static_cast<uint32_t>(values.size()));
    for (const std::string &v : values) {
        w.str(v);
    }
}

template <typename W>
void write_fields(W &w, const Record &r) {
    auto put = [&](Field field, std::string_view value) {
        w.key(kFieldNames[static_cast<size_t>(field)]);
        w.str(value);
    };
    auto key = [&](Field field) { w.key(kFieldNames[static_cast<size_t>(field)]); };
    key(Field::Kind);
    w.uint(static_cast<uint8_t>(r.kind));
    key(Field::TimeUs);
    w.sint(r.time_us);
    put(Field::RecordId, r.record_id);
    put(Field::CorrelationId, r.correlation_id);
    put(Field::Traceparent, r.traceparent);
    put(Field::ClientId, r.client_id);
    put(Field::User, r.user);
    key(Field::PatientIds);
    write_strings(w, r.patient_ids);
    put(Field::Method, r.method);
    put(Field::ResourceType, r.resource_type);
    put(Field::Interaction, r.interaction);
    put(Field::Query, r.query);
    key(Field::HttpStatus);
    w.uint(r.http_status);
    key(Field::LatencyUs);
    w.uint(r.latency_us);
    key(Field::Bytes);
    w.uint(r.bytes);
    put(Field::Upstream, r.upstream);
    put(Field::PolicyVersion, r.policy_version);
    put(Field::Decision, r.decision);
    put(Field::Reason, r.reason);
    key(Field::ConsentIds);
    write_strings(w, r.consent_ids);
    put(Field::PurposeOfUse, r.purpose_of_use);
    key(Field::BreakGlass);
    w.boolean(r.break_glass);
    key(Field::RedactionCount);
    w.uint(r.redaction_count);
    put(Field::ClientAddress, r.client_address);
    put(Field::CertFingerprint, r.cert_fingerprint);
    put(Field::JtiHash, r.jti_hash);
    put(Field::Detail, r.detail);
}

// At least as many bytes as an encoded record takes: every key, each value's largest header or
// integer, and the string bytes. BoundedWriter relies on it.
size_t encoded_size_bound(const Record &r) {
    size_t n = 5 + 4 + 9;  // the largest map header, the "seq" key and its largest uint
    for (const std::string_view name : kFieldNames) {
        n += 1 + name.size() + 9;  // fixstr key; value header, integer or array header
    }
    auto strings = [&](const std::vector<std::string> &values) {
        for (const std::string &v : values) {
            n += 5 + v.size();
        }
    };
    strings(r.patient_ids);
    strings(r.consent_ids);
    for (const std::string *s :
         {&r.record_id, &r.correlation_id, &r.traceparent, &r.client_id, &r.user, &r.method,
          &r.resource_type, &r.interaction, &r.query, &r.upstream, &r.policy_version, &r.decision,
          &r.reason, &r.purpose_of_use, &r.client_address, &r.cert_fingerprint, &r.jti_hash,
          &r.detail}) {
        n += s->size();
    }
    return n;
}

// The field a key names. Both encodings write the fields in canonical order, so the key at
// position `expected` is tried first and nearly always matches with one comparison.
std::optional<Field> field_named(std::string_view key, size_t expected) {
    if (expected < kFieldNames.size() && kFieldNames[expected] == key) {
        return static_cast<Field>(expected);
    }
    for (size_t i = 0; i < kFieldNames.size(); ++i) {
        if (kFieldNames[i] == key) {
            return static_cast<Field>(i);
        }
    }
    return std::nullopt;
}

void read_string(Reader &r, std::string &out) {
    if (const std::optional<std::string_view> v = r.read_str()) {
        out.assign(*v);
    }
}

void read_strings(Reader &r, std::vector<std::string> &out) {
    const std::optional<uint32_t> n = r.read_array();
    // Bounded by the frame size anyway; refuse absurd counts before reserving.
    if (!n || *n > 4096) {
        r.fail();
        return;
    }
    out.clear();
    out.reserve(*n);
    for (uint32_t i = 0; i < *n && r.ok(); ++i) {
        if (const std::optional<std::string_view> v = r.read_str()) {
            out.emplace_back(*v);
        }
    }
}

template <typename Int>
void read_uint_into(Reader &r, Int &out) {
    const std::optional<uint64_t> v = r.read_uint();
    if (v && *v <= static_cast<uint64_t>(static_cast<Int>(~Int{0}))) {
        out = static_cast<Int>(*v);
    } else {
        r.fail();
    }
}

// Reads the value of one record field.
void read_field(Field field, Reader &r, Record &rec) {
    switch (field) {
        case Field::Kind: {
            uint8_t kind = 0;
            read_uint_into(r, kind);
            if (kind > static_cast<uint8_t>(Kind::Admin)) {
                r.fail();
            }
            rec.kind = static_cast<Kind>(kind);
            return;
        }
        case Field::TimeUs:
            if (const std::optional<int64_t> v = r.read_int()) {
                rec.time_us = *v;
            }
            return;
        case Field::HttpStatus:
            return read_uint_into(r, rec.http_status);
        case Field::LatencyUs:
            return read_uint_into(r, rec.latency_us);
        case Field::Bytes:
            return read_uint_into(r, rec.bytes);
        case Field::RedactionCount:
            return read_uint_into(r, rec.redaction_count);
        case Field::BreakGlass:
            rec.break_glass = r.read_bool().value_or(false);
            return;
        case Field::PatientIds:
            return read_strings(r, rec.patient_ids);
        case Field::ConsentIds:
            return read_strings(r, rec.consent_ids);
        case Field::RecordId:
            return read_string(r, rec.record_id);
        case Field::CorrelationId:
            return read_string(r, rec.correlation_id);
        case Field::Traceparent:
            return read_string(r, rec.traceparent);
        case Field::ClientId:
            return read_string(r, rec.client_id);
        case Field::User:
            return read_string(r, rec.user);
        case Field::Method:
            return read_string(r, rec.method);
        case Field::ResourceType:
            return read_string(r, rec.resource_type);
        case Field::Interaction:
            return read_string(r, rec.interaction);
        case Field::Query:
            return read_string(r, rec.query);
        case Field::Upstream:
            return read_string(r, rec.upstream);
        case Field::PolicyVersion:
            return read_string(r, rec.policy_version);
        case Field::Decision:
            return read_string(r, rec.decision);
        case Field::Reason:
            return read_string(r, rec.reason);
        case Field::PurposeOfUse:
            return read_string(r, rec.purpose_of_use);
        case Field::ClientAddress:
            return read_string(r, rec.client_address);
        case Field::CertFingerprint:
            return read_string(r, rec.cert_fingerprint);
        case Field::JtiHash:
            return read_string(r, rec.jti_hash);
        case Field::Detail:
            return read_string(r, rec.detail);
    }
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

void canonical_encode_into(std::string &out, uint64_t seq, const Record &record) {
    BoundedWriter w(out, encoded_size_bound(record));
    w.map(kRecordFieldCount + 1);
    w.key("seq");
    w.uint(seq);
    write_fields(w, record);
}

std::string canonical_encode(const ChainedRecord &entry) {
    std::string out;
    canonical_encode_into(out, entry.seq, entry.record);
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
        } else if (const std::optional<Field> field = field_named(*key, i - 1)) {
            read_field(*field, r, entry.record);
        } else {
            return std::nullopt;
        }
    }
    if (!r.ok() || !r.at_end()) {
        return std::nullopt;
    }
    // Verification decodes every record: re-encode into a buffer that is reused, not allocated.
    thread_local std::string reencoded;
    reencoded.clear();
    canonical_encode_into(reencoded, entry.seq, entry.record);
    if (reencoded != bytes) {
        return std::nullopt;
    }
    return entry;
}

void encode_record_fields(std::string &out, const Record &record) {
    BoundedWriter w(out, encoded_size_bound(record));
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
        if (const std::optional<Field> field = field_named(*key, i)) {
            read_field(*field, r, rec);
        } else {
            r.skip();
        }
    }
    if (!count || !r.ok() || !r.at_end()) {
        return std::nullopt;
    }
    return rec;
}

namespace {

// SHA-256 fetched once: EVP_sha256() in a digest call makes OpenSSL 3 look the algorithm up
// in its provider tables every time, which costs more than hashing a record.
const EVP_MD *sha256_md() {
    static EVP_MD *const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return md;
}

}  // namespace

std::string zero_hash() {
    return std::string(kHashSize, '\0');
}

std::string sha256(std::string_view bytes) {
    std::string out(kHashSize, '\0');
    unsigned int len = 0;
    EVP_Digest(bytes.data(), bytes.size(), reinterpret_cast<unsigned char *>(out.data()), &len,
               sha256_md(), nullptr);
    return out;
}

ChainHasher::ChainHasher() : ctx_(EVP_MD_CTX_new()) {}

ChainHasher::~ChainHasher() {
    EVP_MD_CTX_free(static_cast<EVP_MD_CTX *>(ctx_));
}

bool ChainHasher::hash(std::string_view previous, std::string_view canonical, char *out) {
    auto *ctx = static_cast<EVP_MD_CTX *>(ctx_);
    unsigned int len = 0;
    return ctx != nullptr && sha256_md() != nullptr &&
           EVP_DigestInit_ex2(ctx, sha256_md(), nullptr) == 1 &&
           EVP_DigestUpdate(ctx, previous.data(), previous.size()) == 1 &&
           EVP_DigestUpdate(ctx, canonical.data(), canonical.size()) == 1 &&
           EVP_DigestFinal_ex(ctx, reinterpret_cast<unsigned char *>(out), &len) == 1 &&
           len == kHashSize;
}

std::string chain_hash(std::string_view previous, std::string_view canonical) {
    thread_local ChainHasher hasher;
    std::string out(kHashSize, '\0');
    if (!hasher.hash(previous, canonical, out.data())) {
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
