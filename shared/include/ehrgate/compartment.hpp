// Patient compartment enforcement for patient-context tokens: does a classified FHIR request stay
// inside the compartment of the token's patient P
// (https://hl7.org/fhir/R4/compartmentdefinition-patient.html)?
//
// Only the method, the classified path and the query are looked at. What cannot be decided from
// them is handed back as a check for the gateway to make on a body, with the reference paths the
// body must satisfy; no JSON is parsed here.
//
// Decisions by interaction (T a member type of the compartment other than Patient):
//   capabilities                           Allow
//   read/vread/history-instance Patient/P  Allow; Patient/Q is Refused
//   read/vread/history-instance T/id       CheckResponse: the returned resource (every entry of
//                                          a history bundle) must reference Patient/P through one
//                                          of reference_paths(T)
//   read/vread of shared reference data    Allow (see shared_reference_types())
//   search Patient                         Allow with _id=P (every _id value must be exactly P);
//                                          without _id, AllowNarrowed by appending _id=P
//   search T (GET/HEAD)                    see "Searches" below
//   search via POST _search                Refuse: the parameters travel in the body
//   create T                               CheckRequestBody: the body must reference Patient/P
//                                          through one of reference_paths(T)
//   update T/id                            CheckRequestBody, as for create. The caller must also
//                                          make sure the version being replaced is P's (e.g. with
//                                          a conditional update or a prior read): this layer
//                                          cannot see what is stored under T/id.
//   update Patient/P                       CheckRequestBody, reason kPatientIdInBody: the body's
//                                          id must be P
//   conditional update T?/Patient?         CheckRequestBody, only when the selection names P
//                                          explicitly (as for a search that would be Allowed);
//                                          writes are never narrowed
//   patch Patient/P                        Allow; every other patch is Refused (a patch document
//                                          cannot be checked without the stored resource)
//   conditional delete T?                  Allow only when the selection names P explicitly
//   delete by id, history-type, history-system, search-system, batch/transaction, operations
//                                          Refuse
//   anything on a type outside the compartment, and every interaction on Group (a Group lists
//   its other members)                     Refuse
//
// Searches. The query is decoded with fhir::parse_query (a malformed escape, a decoded control
// byte, or a decoded space in a parameter name refuses). A parameter is a patient reference when
// its name, without modifier, is one of the type's compartment parameters, `patient`, or `subject`.
// Each patient reference must use no modifier or the `:Patient` type modifier, and each of its
// comma-separated values must be one of:
//   Patient/P, or server_base + "/Patient/P"  names P
//   P (bare id)                                names P for `patient` and with `:Patient`; for
//                                              other parameters (subject, performer...) it may
//                                              also match Group/P or Device/P, so it narrows
//                                              but does not anchor
//   Type/id with Type other than Patient       neither anchors nor refuses (the anchor ANDs it)
// and a value naming another patient (Patient/Q, bare Q), any other absolute URL or urn, or a
// value that is not a reference is Refused. Ids compare exactly: Patient/12 never names 12.3 or
// 123. A parameter anchors the search when all its values name P and it is one of the type's
// anchor parameters (compartment parameters, plus `patient` where R4 defines it for the type's
// subject, e.g. Observation). Anchored: Allow. Not anchored: AllowNarrowed, the query with
// `narrow_param=P` appended (`patient=P`, or e.g. `subject=Patient/P`, `beneficiary=Patient/P`).
//
// Always refused in a search: `_has`; chained parameters (a '.' anywhere in the decoded name,
// e.g. `subject:Patient.name`, `patient.name`); `_contained`, `_containedType`, `_query`,
// `_filter`, `_list` (matched case-insensitively); `_include`/`_revinclude` with any modifier
// (`:iterate`, `:recurse`) or value other than:
//   _include=T:patient | T:subject [":Patient"], T the searched type, when that very parameter
//       anchors the search (named P explicitly, or appended by narrowing) and T is not one where
//       it may hold several references (Account, AuditEvent, Group, Person, Provenance). The
//       included resources are then Patient/P itself.
//   _revinclude=U:p [":Patient"] on a Patient search, U a member type other than Patient and
//       Group, p one of U's anchor parameters. The matched Patient is P, so the included U
//       reference P through a compartment parameter: they are in the compartment by definition.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "ehrgate/fhir_request.hpp"

namespace ehrgate::compartment {

// One resource type of the R4 Patient compartment.
struct Member {
    std::string_view resource_type;
    // The search parameters that put a resource in the compartment (CompartmentDefinition
    // resource.param), e.g. Observation: subject, performer.
    std::span<const std::string_view> params;
    // The elements those parameters search, as dot-separated JSON paths from the resource root
    // through arrays to a Reference, e.g. Observation: "subject", "performer"; CarePlan:
    // "subject", "activity.detail.performer". A resource is in P's compartment when any
    // Reference at any of these paths is Patient/P.
    std::span<const std::string_view> reference_paths;
    // The parameter appended when a search names no anchor: "patient", "subject", ... ("_id"
    // for Patient).
    std::string_view narrow_param;
    // R4 defines a `patient` search parameter (on the subject) for the type although the
    // compartment lists `subject`; `patient` then anchors too.
    bool patient_alias = false;
    // `patient` / `subject` hold at most one reference, so including them is safe.
    bool single_patient_reference = true;
    // False for Group: a member of the compartment that still exposes other patients.
    bool patient_access = true;
};

// The 66 R4 Patient compartment members, sorted by type.
std::span<const Member> patient_compartment();
const Member *find_member(std::string_view resource_type);

// Empty for types outside the compartment.
std::span<const std::string_view> reference_params(std::string_view resource_type);
std::span<const std::string_view> reference_paths(std::string_view resource_type);

// Types outside the compartment whose instances a patient-context token may read by id:
// Medication, Organization, Location, Practitioner, PractitionerRole. They describe the care the
// patient gets, not other patients. Searches of them are refused: a search enumerates the whole
// directory and belongs to a user- or system-context token.
std::span<const std::string_view> shared_reference_types();
bool is_shared_reference_type(std::string_view resource_type);

struct Decision {
    enum class Kind : uint8_t {
        Allow,
        AllowNarrowed,     // forward `narrowed_query` instead of the request's query
        CheckResponse,     // allow, but the response body must pass the reference check
        CheckRequestBody,  // allow only if the request body passes the reference check
        Refuse,
    };
    Kind kind = Kind::Refuse;
    std::string reason;  // one of the reason:: codes, never request data
    std::string narrowed_query;
    // CheckResponse / CheckRequestBody: reference_paths() of the resource type.
    std::span<const std::string_view> reference_paths;
};

namespace reason {
inline constexpr std::string_view kInCompartment = "in-compartment";
inline constexpr std::string_view kNarrowed = "narrowed-to-patient";
inline constexpr std::string_view kCapabilities = "capabilities";
inline constexpr std::string_view kSharedReferenceData = "shared-reference-data";
inline constexpr std::string_view kVerifyResponse = "verify-response-references";
inline constexpr std::string_view kVerifyRequestBody = "verify-request-body-references";
inline constexpr std::string_view kPatientIdInBody = "verify-patient-id-in-body";
inline constexpr std::string_view kInvalidPatientId = "invalid-patient-id";
inline constexpr std::string_view kMalformedQuery = "malformed-query";
inline constexpr std::string_view kOtherPatient = "other-patient";
inline constexpr std::string_view kAmbiguousReference = "ambiguous-reference";
inline constexpr std::string_view kAbsoluteReference = "absolute-reference";
inline constexpr std::string_view kMalformedReference = "malformed-reference";
inline constexpr std::string_view kModifierNotAllowed = "modifier-not-allowed";
inline constexpr std::string_view kChainedParameter = "chained-parameter";
inline constexpr std::string_view kHasParameter = "has-parameter";
inline constexpr std::string_view kForbiddenParameter = "forbidden-parameter";
inline constexpr std::string_view kIncludeNotAllowed = "include-not-allowed";
inline constexpr std::string_view kTypeNotInCompartment = "type-not-in-compartment";
inline constexpr std::string_view kInteractionNotAllowed = "interaction-not-allowed";
inline constexpr std::string_view kSearchInBody = "search-parameters-in-body";
inline constexpr std::string_view kWriteNeedsPatient = "conditional-write-must-name-patient";
}  // namespace reason

struct PatientContext {
    std::string_view patient_id;  // the token's patient; not a valid FHIR id refuses everything
    // This endpoint's absolute FHIR base without a trailing '/', e.g. "https://ehr.example/fhir".
    // An absolute reference is accepted only below it (compared byte for byte); empty refuses
    // every absolute reference.
    std::string_view server_base;
};

// `method` as in HTTP ("GET", "HEAD", "POST", ...), `target` from fhir::classify_view for the same
// request, `query` the raw query without '?'.
Decision check(std::string_view method, const fhir::RequestTargetView &target,
               std::string_view query, const PatientContext &context);

}  // namespace ehrgate::compartment
