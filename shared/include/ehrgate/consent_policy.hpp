// The `consent:` section of the policy bundle (docs/policy-bundle.md, docs/consent.md): what
// the gateway allows, per purpose of use, when the patient has recorded no consent that decides,
// which security labels are sensitive, and who may break the glass.
//
// Kept apart from policy.hpp so consent.hpp (the decision) does not depend on the whole bundle.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::consent {

// What a purpose allows without an explicit consent.
enum class DefaultAccess : uint8_t {
    ConsentRequired,  // "consent-required": deny unless a consent permits the request
    Permit,           // "permit": allow, withholding `withhold` unless a consent permits them
};

// The default for one purpose of use.
struct PurposeDefault {
    std::string purpose;               // HL7 v3 PurposeOfUse code
    std::vector<std::string> clients;  // clients the default applies to; empty: every client
    DefaultAccess access = DefaultAccess::ConsentRequired;
    std::vector<std::string> withhold;  // security label codes, sorted

    bool operator==(const PurposeDefault &) const = default;
};

// The rule for a request whose purpose is missing, unknown, or has no default for its client.
struct Fallback {
    DefaultAccess access = DefaultAccess::ConsentRequired;
    std::vector<std::string> withhold;  // must include every sensitive label

    bool operator==(const Fallback &) const = default;
};

// Emergency access (ETREAT/BTG): only these clients and users, only with a stated reason.
struct BreakGlass {
    std::vector<std::string> purposes;  // subset of {ETREAT, BTG}, sorted
    std::vector<std::string> clients;   // sorted
    std::vector<std::string> users;     // fhirUser or sub values, sorted; empty: any user
    std::vector<std::string> withhold;  // labels withheld even under break-glass, sorted

    bool operator==(const BreakGlass &) const = default;
};

struct ConsentPolicy {
    bool enabled = false;                       // the bundle has a `consent:` section
    std::vector<std::string> sensitive_labels;  // sorted
    // 42 CFR Part 2 style: withheld unless a consent explicitly permits them, whatever the
    // purpose default says. Sorted; a subset of sensitive_labels.
    std::vector<std::string> explicit_consent_labels;
    std::vector<PurposeDefault> purposes;  // sorted by purpose, then clients
    Fallback fallback;
    BreakGlass break_glass;

    bool operator==(const ConsentPolicy &) const = default;
};

}  // namespace ehrgate::consent

namespace ehrgate::msgpack {
class Writer;
class Reader;
}  // namespace ehrgate::msgpack

namespace ehrgate::consent {

std::string_view default_access_name(DefaultAccess access);  // "permit" / "consent-required"

// Snapshot codec (policy.cpp writes it under the bundle key "consent" when enabled). The decoder
// skips unknown keys and refuses a policy that consistent() rejects.
void encode_policy(msgpack::Writer &w, const ConsentPolicy &policy);
bool decode_policy(msgpack::Reader &r, ConsentPolicy &policy);
// Sorts every list; order carries no meaning.
void canonicalize(ConsentPolicy &policy);
// The invariants parse_bundle() guarantees (docs/policy-bundle.md): codes are PurposeOfUse
// codes, at most one default per purpose and client, explicit-consent labels are sensitive, the
// fallback is consent-required and withholds every sensitive label, break-glass purposes are
// ETREAT/BTG and name at least one client when any.
bool consistent(const ConsentPolicy &policy);

}  // namespace ehrgate::consent
