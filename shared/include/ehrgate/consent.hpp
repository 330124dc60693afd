// Patient consent: records shaped after FHIR R4 Consent (https://hl7.org/fhir/R4/consent.html),
// their import from and export to FHIR JSON, the HL7 v3 PurposeOfUse codes, and the decision a
// request gets from the policy's per-purpose defaults and the patient's consents.
//
// The decision is a pure function of its arguments (the clock is an argument), so every row of
// the decision table is a unit test. policyd owns the store and calls decide() per request; the
// nginx module acts on the answer (docs/consent.md).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/consent_policy.hpp"
#include "ehrgate/json.hpp"

namespace ehrgate::consent {

// ---- Purpose of use -------------------------------------------------------------------------

// HL7 v3 PurposeOfUse (http://terminology.hl7.org/ValueSet/v3-PurposeOfUse, as bound by FHIR R4
// 4.0.1): every concept except the abstract root. Sorted.
std::span<const std::string_view> purpose_of_use_codes();
bool is_purpose_of_use(std::string_view code);
inline constexpr std::string_view kPurposeOfUseSystem =
    "http://terminology.hl7.org/CodeSystem/v3-ActReason";
// Security label codes (confidentiality R/N/..., sensitivity PSY/ETH/...): letters only, 1-32.
bool is_label_code(std::string_view code);

// ---- Records ----------------------------------------------------------------------------------

// FHIR Consent.status.
enum class Status : uint8_t { Draft, Proposed, Active, Rejected, Inactive, EnteredInError };
std::string_view status_name(Status status);
std::optional<Status> status_from_name(std::string_view name);

enum class ProvisionType : uint8_t { Deny, Permit };

// Unix seconds; nullopt ends are open.
struct Period {
    std::optional<int64_t> start;
    std::optional<int64_t> end;  // exclusive

    bool contains(int64_t t) const { return (!start || t >= *start) && (!end || t < *end); }
    bool operator==(const Period &) const = default;
};

// Parses a FHIR dateTime (YYYY, YYYY-MM, YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss[.f+](Z|+hh:mm)).
// `as_end`: the first instant after the value's precision (2016-01-01 -> 2016-01-02T00:00:00Z),
// so a period ending on a date includes that whole day.
std::optional<int64_t> parse_fhir_datetime(std::string_view text, bool as_end);
// RFC 3339 UTC text, e.g. "2026-11-29T20:00:00Z".
std::string format_datetime(int64_t unix_seconds);

// Consent.provision, nested.
struct Provision {
    ProvisionType type = ProvisionType::Permit;
    std::optional<Period> period;
    // "client:<client id>" for a gateway client (FHIR: a reference whose identifier has the
    // system kClientSystem, or Device/<id>), else a relative reference "Practitioner/13",
    // "Organization/f001" (an Organization actor matches the request's tenant).
    std::vector<std::string> actors;
    std::vector<std::string> actions;          // consentaction codes: access, use, correct, ...
    std::vector<std::string> purposes;         // PurposeOfUse codes
    std::vector<std::string> security_labels;  // label codes the provision covers; empty: all data
    std::vector<std::string> classes;          // FHIR resource types
    // The provision is narrowed by elements the gateway cannot check before the response (data,
    // code, dataPeriod): as a permit it never applies, as a deny it applies without them.
    bool unenforceable_narrowing = false;
    std::vector<Provision> provisions;

    bool operator==(const Provision &) const = default;
};

inline constexpr std::string_view kClientSystem = "urn:ehrgate:client";
inline constexpr size_t kMaxProvisionDepth = 8;
inline constexpr size_t kMaxListEntries = 64;

struct Record {
    std::string id;
    std::string patient;  // Patient id, without "Patient/"
    Status status = Status::Active;
    std::string scope;        // consentscope code, e.g. patient-privacy
    std::string policy_rule;  // v3 ActCode, e.g. OPTIN / OPTOUT
    std::optional<int64_t> date_time;
    Provision provision;  // the root rule

    bool operator==(const Record &) const = default;
};

struct ImportResult {
    std::optional<Record> record;
    std::string error;  // when !record: what is wrong and where (JSON path), no record content
};

// Parses a FHIR R4 Consent resource. Refuses (with a message naming the element) anything not
// shaped as R4 says, a patient that is not Patient/<id>, unknown status, purposes outside the
// value set, nesting deeper than kMaxProvisionDepth. An absent id is allowed (the store assigns
// one); elements the model does not keep (text, category, sourceAttachment...) are ignored.
ImportResult import_fhir(std::string_view json_text);
ImportResult import_fhir(const json::Value &resource);
// The record as a FHIR R4 Consent resource; import_fhir(export_fhir(r)) == r.
std::string export_fhir(const Record &record);

// ---- Decision ---------------------------------------------------------------------------------

struct Request {
    std::string_view client_id;
    std::string_view user;     // fhirUser or sub; may be empty
    std::string_view patient;  // Patient id; empty when the request names no single patient
    std::string_view resource_type;
    std::string_view interaction;  // fhir::interaction_name spelling
    std::string_view purpose;      // as asserted (claim or header); validated here
    std::string_view tenant;
    std::string_view break_glass_reason;
    std::span<const std::string> client_purposes;  // what the client is registered to assert
    int64_t now = 0;
};

struct Decision {
    bool permit = false;
    std::string reason;   // machine-readable (docs/consent.md), e.g. "consent-required"
    std::string message;  // for the caller; no PHI
    std::string purpose;  // the effective purpose; empty: missing or unknown (fallback applied)
    std::vector<std::string> obligations;  // security labels to withhold, sorted
    std::vector<std::string> consent_ids;  // consents that decided something, sorted
    bool break_glass = false;
};

namespace reason {
inline constexpr std::string_view kConsentPermit = "consent-permit";
inline constexpr std::string_view kPurposeDefault = "purpose-default";
inline constexpr std::string_view kBreakGlass = "break-glass";
inline constexpr std::string_view kConsentDenied = "consent-denied";
inline constexpr std::string_view kConsentRequired = "consent-required";
inline constexpr std::string_view kPurposeNotAllowed = "purpose-not-allowed";
inline constexpr std::string_view kBreakGlassNotAllowed = "break-glass-not-allowed";
inline constexpr std::string_view kBreakGlassReasonRequired = "break-glass-reason-required";
}  // namespace reason

// The one patient a request names by itself, for requests whose token has no patient: the id of
// Patient/<id> (any interaction on it), or of a type search whose `_id` (Patient), `patient` or
// `subject` parameters name exactly one patient (Patient/<id>, or a bare id for `patient` and
// `_id`). Empty when it names none or several: only the defaults decide then.
std::string named_patient(std::string_view method, std::string_view relative_path,
                          std::string_view query);

// `records` are the patient's consents (any status; only active ones count).
Decision decide(const ConsentPolicy &policy, const Request &request,
                std::span<const Record> records);

// The first instant after `now` at which one of the records' periods (of the consent or of any
// nested provision) starts or ends: until then, decide() over these records gives the same
// answer for the same request. nullopt when no period boundary lies ahead. A decision cache
// must not keep a decision past it.
std::optional<int64_t> next_period_boundary(std::span<const Record> records, int64_t now);

}  // namespace ehrgate::consent
