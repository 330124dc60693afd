// Classification of a FHIR R4 RESTful request (https://hl7.org/fhir/R4/http.html) into the
// interaction it performs and the resource it addresses, from the method and the path below the
// FHIR base alone. The body is never looked at: a batch or transaction is classified as `batch`
// whatever it contains, which is why a policy that permits `batch` permits everything.
//
// The grammar is deliberately narrow. Anything that is not exactly one of the shapes below is
// unrecognized (std::nullopt), so the policy never has to guess what an odd path means:
//
//     shape                               methods            interaction
//     ""          (with a query)          GET HEAD           search-system
//     ""                                  POST               batch (batch or transaction)
//     _search                             POST               search-system
//     _history                            GET HEAD           history-system
//     metadata                            GET HEAD           capabilities
//     $op                                 GET HEAD POST      operation-system
//     Type                                GET HEAD           search-type
//     Type                                POST               create
//     Type        (with a query)          PUT PATCH DELETE   update / patch / delete, conditional
//     Type/_search                        POST               search-type
//     Type/_history                       GET HEAD           history-type
//     Type/$op                            GET HEAD POST      operation-type
//     Type/id                             GET HEAD           read
//     Type/id                             PUT PATCH DELETE   update / patch / delete
//     Type/id/_history                    GET HEAD           history-instance
//     Type/id/$op                         GET HEAD POST      operation-instance
//     Type/id/_history/vid                GET HEAD           vread
//
// Type is one of the 146 FHIR R4 resource types (case-sensitive), id and vid follow the FHIR id
// grammar [A-Za-z0-9\-.]{1,64} except that "." and ".." are refused as dot segments, and an
// operation name is a letter followed by up to 63 letters, digits, '-' or '_'. Empty segments
// (leading, trailing or doubled '/'), percent signs and every other byte make a path
// unrecognized. Compartment searches (Patient/1/Observation) are not recognized yet.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::fhir {

enum class Interaction : uint8_t {
    Read,
    VRead,
    Update,
    Patch,
    Delete,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Create,
    SearchType,
    SearchSystem,
    Capabilities,
    Batch,
    OperationSystem,
    OperationType,
    OperationInstance,
};

inline constexpr size_t kInteractionCount = static_cast<size_t>(Interaction::OperationInstance) + 1;

// Kebab-case name used in policy bundles and decision replies, e.g. "history-instance".
std::string_view interaction_name(Interaction interaction);
std::optional<Interaction> interaction_from_name(std::string_view name);

// True for interactions that address no resource type (capabilities, batch, search-system,
// history-system, operation-system).
bool is_system_level(Interaction interaction);

struct RequestTarget {
    Interaction interaction = Interaction::Read;
    std::string resource_type;  // empty for system-level interactions
    std::string id;             // empty unless the interaction addresses one instance
    std::string version_id;     // vread only
    std::string operation;      // operation name without '$'
    // update/patch/delete addressed by search parameters instead of an id (`PUT Patient?...`).
    bool conditional = false;

    bool operator==(const RequestTarget &) const = default;
};

// The same as RequestTarget, viewing into the path passed to classify_view(). Used where a
// request is classified on the hot path and nothing may be allocated.
struct RequestTargetView {
    Interaction interaction = Interaction::Read;
    std::string_view resource_type;
    std::string_view id;
    std::string_view version_id;
    std::string_view operation;
    bool conditional = false;
};

// `relative_path` is the path below the FHIR base without a leading slash ("Patient/123",
// "metadata", "" for the base itself); `query` is the raw query string without '?'. Methods are
// case-sensitive, as in HTTP.
std::optional<RequestTarget> classify(std::string_view method, std::string_view relative_path,
                                      std::string_view query);
std::optional<RequestTargetView> classify_view(std::string_view method,
                                               std::string_view relative_path,
                                               std::string_view query);

// True when `name` is a FHIR R4 resource type, e.g. "Patient" (case-sensitive).
bool is_resource_type(std::string_view name);

// Every FHIR R4 resource type, sorted.
std::span<const std::string_view> resource_types();

// FHIR id grammar: [A-Za-z0-9\-.]{1,64}.
bool is_valid_id(std::string_view id);

// One decoded `name=value` pair of a query string. The name keeps its modifier and chain
// ("subject:Patient.name"); splitting them is the caller's business.
struct QueryParam {
    std::string name;
    std::string value;

    bool operator==(const QueryParam &) const = default;
};

// A request's search parameters in the order they were given. Repeated names stay repeated: in
// FHIR search they mean AND, and dropping one would widen the search.
using Query = std::vector<QueryParam>;

// More parameters than any real client sends; the cap bounds the work a hostile query can cause.
inline constexpr size_t kMaxQueryParams = 256;

// Strict application/x-www-form-urlencoded decoding: "%XX" with two hex digits, '+' as a space.
// A malformed escape or a decoded control byte (0x00-0x1F, 0x7F) makes the text undecodable:
// such bytes have no business in a FHIR search and servers disagree on what they mean.
std::optional<std::string> percent_decode(std::string_view text);

// Splits `raw` (the query without '?') on '&' and decodes names and values with percent_decode.
// Empty pieces ("a=1&&b=2", a trailing '&') are ignored; a piece without '=' is a name with an
// empty value. std::nullopt when a piece does not decode, has an empty name, or there are more
// than kMaxQueryParams parameters.
std::optional<Query> parse_query(std::string_view raw);

}  // namespace ehrgate::fhir
