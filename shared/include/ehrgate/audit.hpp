// Tamper-evident audit records: the record model, its canonical encoding, the hash chain, signed
// checkpoints and a pure chain verifier.
//
// The chain: record n (sequence numbers start at 1) is stored with
//     hash_n = SHA-256(hash_{n-1} || canonical(record_n)),   hash_0 = 32 zero bytes,
// where canonical() is a msgpack map whose keys always appear, in one fixed order, each value in
// its smallest encoding (our msgpack::Writer guarantees that), and which includes the sequence
// number. Changing any byte of a record, renumbering, deleting, inserting or swapping records
// therefore breaks either the recomputed hash or the sequence continuity. Someone who can also
// rewrite every later hash is caught by checkpoints: Ed25519 signatures over (seq, hash_seq)
// made with a key the rewriter does not hold.
//
// Plain C++ and OpenSSL only: policyd stores records, ehrgatectl verifies and exports them, the
// module builds them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::audit {

inline constexpr size_t kHashSize = 32;
inline constexpr size_t kSignatureSize = 64;
inline constexpr size_t kPublicKeySize = 32;

enum class Kind : uint8_t {
    Access = 0,         // the request as decided, written before anything is released
    Outcome = 1,        // what was actually answered (status, bytes, latency, upstream)
    ConsentChange = 2,  // a consent directive was created, changed or withdrawn
    PolicyReload = 3,   // a policy bundle was activated or refused
    Revocation = 4,     // a token or a client's tokens were revoked
    Admin = 5,          // any other operator command
};

const char *kind_name(Kind kind);
std::optional<Kind> parse_kind(std::string_view name);

// One audit record. Strings are opaque UTF-8; times are UTC microseconds since the epoch.
struct Record {
    Kind kind = Kind::Access;
    int64_t time_us = 0;
    std::string record_id;  // chosen by the writer (worker or policyd), unique: deduplication key
    std::string correlation_id;
    std::string traceparent;
    std::string client_id;
    std::string user;  // sub / fhirUser
    std::vector<std::string> patient_ids;
    std::string method;
    std::string resource_type;
    std::string interaction;
    std::string query;
    uint16_t http_status = 0;
    uint64_t latency_us = 0;
    uint64_t bytes = 0;
    std::string upstream;
    std::string policy_version;
    std::string decision;  // "permit", "deny", "error" (fail-closed refusals)
    std::string reason;
    std::vector<std::string> consent_ids;
    std::string purpose_of_use;
    bool break_glass = false;
    uint32_t redaction_count = 0;
    std::string client_address;
    std::string cert_fingerprint;  // SHA-256 of the mTLS client certificate, hex
    std::string jti_hash;          // SHA-256 of the token's jti, hex (never the jti itself)
    std::string detail;            // event records: what happened (no PHI)

    bool operator==(const Record &) const = default;
};

// A record as it sits in the chain.
struct ChainedRecord {
    uint64_t seq = 0;
    Record record;
};

// The canonical bytes that are hashed and stored. Deterministic: equal records encode equally.
std::string canonical_encode(const ChainedRecord &entry);
// Appends the same bytes to `out` without a ChainedRecord (the writer encodes each record it
// appends into one reused buffer).
void canonical_encode_into(std::string &out, uint64_t seq, const Record &record);
// Accepts only canonical bytes: the decoded record must re-encode to exactly `bytes`, so a
// stored value cannot carry a second meaning (extra keys, other key order, padded integers).
std::optional<ChainedRecord> canonical_decode(std::string_view bytes);

// The record as the wire carries it from a worker: same field names, decoders skip unknown keys.
void encode_record_fields(std::string &out, const Record &record);  // appends one msgpack map
std::string encode_record(const Record &record);
std::optional<Record> decode_record(std::string_view msgpack_map);

std::string zero_hash();
// SHA-256(previous || canonical).
std::string chain_hash(std::string_view previous, std::string_view canonical);
std::string sha256(std::string_view bytes);

// chain_hash with one OpenSSL context kept for every record, so hashing allocates nothing.
// Not thread-safe: one per thread.
class ChainHasher {
  public:
    ChainHasher();
    ~ChainHasher();
    ChainHasher(const ChainHasher &) = delete;
    ChainHasher &operator=(const ChainHasher &) = delete;
    // Writes SHA-256(previous || canonical), kHashSize bytes, to `out`. False only when OpenSSL
    // fails (allocation).
    bool hash(std::string_view previous, std::string_view canonical, char *out);

  private:
    void *ctx_;  // EVP_MD_CTX*
};
std::string hex(std::string_view bytes);
std::optional<std::string> unhex(std::string_view text);

// Stored value of a record: 32-byte chain hash followed by the canonical encoding.
std::string stored_value(std::string_view hash, std::string_view canonical);

// ---- checkpoints -----------------------------------------------------------------------------

struct Checkpoint {
    uint64_t seq = 0;       // the last record covered
    std::string hash;       // hash_seq (32 bytes)
    int64_t time_us = 0;    // when it was signed
    std::string key_id;     // hex SHA-256 of the raw public key, to pick the key on rotation
    std::string signature;  // Ed25519 over signed_message()

    bool operator==(const Checkpoint &) const = default;
};

// "ehrgate-audit-checkpoint/v1" || be64(seq) || hash || be64(time_us)
std::string checkpoint_message(const Checkpoint &checkpoint);
std::string encode_checkpoint(const Checkpoint &checkpoint);
std::optional<Checkpoint> decode_checkpoint(std::string_view bytes);

// An Ed25519 key pair (OpenSSL EVP). The private half is only in policyd.
class SigningKey {
  public:
    static std::unique_ptr<SigningKey> generate();
    // PKCS#8 PEM.
    static std::unique_ptr<SigningKey> from_private_pem(std::string_view pem);
    std::string private_pem() const;
    std::string public_raw() const;  // 32 bytes
    std::string key_id() const;      // hex SHA-256 of public_raw()
    std::string sign(std::string_view message) const;

    ~SigningKey();
    SigningKey(const SigningKey &) = delete;
    SigningKey &operator=(const SigningKey &) = delete;

  private:
    explicit SigningKey(void *pkey) : pkey_(pkey) {}
    void *pkey_;  // EVP_PKEY*
};

bool verify_signature(std::string_view public_raw, std::string_view message,
                      std::string_view signature);

// Fills key_id and signature.
void sign_checkpoint(const SigningKey &key, Checkpoint &checkpoint);

// ---- verification ----------------------------------------------------------------------------

struct StoredEntry {
    uint64_t key_seq = 0;  // the sequence number the storage key says
    std::string value;     // stored_value()
};

struct VerifyResult {
    bool ok = true;
    uint64_t first_bad_seq = 0;  // 0 when ok (or when the problem is not tied to a record)
    std::string problem;
    uint64_t records = 0;
    uint64_t checkpoints = 0;
    uint64_t first_seq = 0;  // 0 when the log is empty
    uint64_t last_seq = 0;
    uint64_t last_checkpoint_seq = 0;
};

// Walks `entries` (in storage key order) and `checkpoints` (by seq). The first record must be
// seq 1 with the zero hash before it, or start right after a checkpoint (retention purged what
// came before: the signed checkpoint is the anchor). Every checkpoint must carry a valid
// signature by `public_raw` and match the chain at its seq; a checkpoint beyond the last record
// means records were removed from the end. `require_checkpoint_at_head`: the last record must be
// covered by a checkpoint (policyd writes one on clean shutdown).
VerifyResult verify_chain(const std::vector<StoredEntry> &entries,
                          const std::vector<Checkpoint> &checkpoints, std::string_view public_raw);

// Incremental form of verify_chain for large logs (same checks, constant memory).
class ChainVerifier {
  public:
    ChainVerifier(std::string public_raw, std::vector<Checkpoint> checkpoints);
    // Returns false at the first problem (result() says which).
    bool add(uint64_t key_seq, std::string_view value);
    // Checks what can only be checked at the end (checkpoints beyond the last record).
    VerifyResult finish();
    const VerifyResult &result() const { return result_; }
    // The decoded record of the last successful add().
    const ChainedRecord &last() const { return last_; }

  private:
    bool fail(uint64_t seq, std::string problem);
    const Checkpoint *checkpoint_at(uint64_t seq) const;

    std::string public_raw_;
    std::vector<Checkpoint> checkpoints_;  // sorted by seq
    VerifyResult result_;
    std::string previous_hash_;
    uint64_t expected_seq_ = 0;  // 0: nothing seen yet
    size_t next_checkpoint_ = 0;
    ChainedRecord last_;
};

// ---- export ----------------------------------------------------------------------------------

// One JSON object per record (ndjson line without the newline).
std::string to_json(const ChainedRecord &entry);
// A FHIR R4 AuditEvent following IHE Basic Audit Log Patterns (BALP).
std::string to_fhir_audit_event(const ChainedRecord &entry);

}  // namespace ehrgate::audit
