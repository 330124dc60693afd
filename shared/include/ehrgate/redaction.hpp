// Streaming redaction of FHIR JSON responses.
//
// The engine is fed a response body in arbitrary chunks and releases output as soon as it can
// decide about it, never holding the whole body: it holds at most one resource at a time (the
// whole of a single-resource response, or one Bundle.entry of a search Bundle, plus the Bundle's
// members before `entry`). What it holds is bounded by `Config::max_held_bytes`; a resource larger
// than that fails closed.
//
// Every byte released has passed a strict JSON check (structure, strings, escapes, UTF-8,
// numbers) as part of the unit that contains it, so a fault anywhere makes the engine stop
// releasing from the start of the faulty unit on: the caller then cuts the response.
//
// Rules, applied per resource:
//  - labels: the codes in meta.security, plus labels inferred from Codings anywhere in the
//    resource (system + code or code prefix -> label). A resource carrying a withheld label is
//    dropped: a Bundle entry disappears without a placeholder; a single resource makes the whole
//    response Withheld (the caller answers 403).
//  - patient compartment: with a patient set, a resource outside that patient's compartment is
//    dropped the same way.
//  - field masks (resource type + element path, optionally only identifiers of one system) and
//    DS4P inline element labels (extension-inline-sec-label with a withheld code) remove
//    elements; a resource that lost an element carries the HL7 obligation code REDACTED in
//    meta.security.
//  - Bundle.total is always removed: it precedes the entries in the stream, so it cannot be
//    corrected before they are seen, and a stale count would betray removed entries.
//
// What a chunk holds whole is read in place (tokenized where it lies, an unchanged unit released
// from there); what a chunk boundary cuts is gathered, its tokenization resumed where it stopped.
// Either way the verdict and the output are the same for every split of the body.
//
// Not thread-safe; one engine per response (engines are reused per thread behind the API).
// Never throws on bad input (std::bad_alloc aside).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::redaction {

inline constexpr std::string_view kObligationSystem =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
inline constexpr std::string_view kRedactedCode = "REDACTED";
inline constexpr std::string_view kInlineLabelUrl =
    "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label";
// Text and token tape together; text buffers grow by doubling and the tape no further than its
// limit, so the peak stays under 1 MiB.
inline constexpr size_t kDefaultMaxHeldBytes = 384 * 1024;
// Bounds a policy bundle may set.
inline constexpr size_t kMinHeldBytes = 16 * 1024;
inline constexpr size_t kMaxHeldBytesLimit = 64 * 1024 * 1024;

// Unlabelled data is labelled by its codes: a Coding (any object with string `system` and
// `code` members) matching `system` and `code` exactly, or starting with `code` when
// `prefix` is set, gives the resource `label`.
struct InferenceRule {
    std::string system;
    std::string code;
    bool prefix = false;
    std::string label;

    bool operator==(const InferenceRule &) const = default;
};

// Removes the elements at `path` (dot-separated from the resource root, descending through
// arrays) of resources of `resource_type`; with `identifier_system` set, only those elements
// whose `system` member equals it (e.g. Patient.identifier of the SSN system).
struct FieldMask {
    std::string resource_type;
    std::string path;
    std::string identifier_system;

    bool operator==(const FieldMask &) const = default;
};

struct Config {
    std::vector<InferenceRule> inference;
    std::vector<FieldMask> masks;
    // Bytes held at once: the current unit, its token tape and the Bundle members before
    // `entry`. Output released by one feed() is on top of this, at most about one chunk.
    size_t max_held_bytes = kDefaultMaxHeldBytes;

    bool operator==(const Config &) const = default;
};

// Per response.
struct Request {
    // Label codes (e.g. "PSY", "HIV") whose resources and elements are withheld; compared with
    // the `code` of security Codings (the system is not compared).
    std::vector<std::string> withheld;
    // Non-empty: the token's patient; resources outside the compartment are dropped.
    std::string patient_id;
    // This endpoint's FHIR base without a trailing '/', for absolute references.
    std::string server_base;
};

// Splits "PSY,ETH, SUD" into codes, skipping empty items and blanks.
std::vector<std::string> split_labels(std::string_view comma_separated);

enum class Status : uint8_t {
    Ok,        // output so far may be released
    Withheld,  // a single-resource response must not be released at all (see reason())
    Error,     // malformed or too large: release nothing more (see reason())
};

struct Counters {
    uint64_t resources_removed = 0;  // Bundle entries dropped
    uint64_t resources_masked = 0;   // resources kept with elements removed
    uint64_t elements_removed = 0;
};

class Redactor {
  public:
    // `config` is referenced, not copied: it must outlive the Redactor.
    Redactor(const Config &config, Request request);
    Redactor(Config &&, Request) = delete;  // a temporary would dangle
    ~Redactor();
    Redactor(const Redactor &) = delete;
    Redactor &operator=(const Redactor &) = delete;

    // Consumes `chunk`; appends what may be released to `out`. Once the status is not Ok it
    // stays so and nothing more is appended.
    Status feed(std::string_view chunk, std::string &out);
    // End of body: Ok only if a complete, valid document was seen.
    Status finish(std::string &out);

    Status status() const { return status_; }
    // A stable kebab-case code, never data from the body: "security-label",
    // "outside-patient-compartment", "malformed-json", "too-large", ...
    std::string_view reason() const { return reason_; }
    const Counters &counters() const { return counters_; }
    // True once the whole document has been seen (its counters are final).
    bool complete() const;
    // True once the response is known to be a single resource (not a streamed Bundle).
    bool single_resource() const;
    // Peak bytes held by the engine's buffers (capacity, not size).
    size_t peak_memory() const { return peak_memory_; }
    // The top-level resource's meta.lastUpdated when seen before output started, else empty.
    std::string_view last_updated() const;

    // The engine's state and buffers. A finished Redactor hands its small buffers on to the next
    // one on the same thread, so that a small response costs no allocation of its own.
    struct Impl;

  private:
    const Config &config_;
    Request request_;
    Impl *impl_;
    Status status_ = Status::Ok;
    std::string_view reason_;
    Counters counters_;
    size_t peak_memory_ = 0;
};

}  // namespace ehrgate::redaction
