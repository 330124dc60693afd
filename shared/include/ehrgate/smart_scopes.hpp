// SMART App Launch scopes (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)
// as they arrive in an access token's `scope` claim, and the question the gateway asks of them:
// may this token perform permission X on resource type T in context C?
//
// Grammar, per space-separated token:
//
//     resource scope   (patient|user|system) "/" (Type|"*") "." permissions ["?" constraints]
//     v1 permissions   "read" = rs, "write" = cud, "*" = cruds
//     v2 permissions   a non-empty subsequence of "cruds", in that order ("rs", "cud", "d")
//     constraints      name=value ("&" name=value)*, v2 only (granular scopes)
//     other scopes     openid fhirUser profile launch launch/patient launch/encounter
//                      offline_access online_access: recorded, grant no resource access
//
// Type is a FHIR R4 resource type (case-sensitive). The whole string is refused when any token
// that looks like a resource scope is malformed: a token containing '/' that is not one of the
// launch scopes above, or a token starting (in any case) with "patient", "user" or "system"
// followed by '/', '*', '.' or '?'. Dropping a scope a client believes it has would only move the
// failure somewhere harder to diagnose, and a lenient parser is how typos become grants. Other
// tokens (OIDC "email", vendor scopes without '/') are kept in other_scopes() and grant nothing.
// Every token must consist of RFC 6749 scope-token characters (printable ASCII except '"' and
// '\'); tokens are separated by spaces and empty tokens (doubled spaces) are ignored.
//
// Constraint values are percent-decoded like a query string; names are [A-Za-z0-9_-]+, values are
// non-empty and contain no ','. `category` is matched as a FHIR token (see ScopeSet::allows);
// every other constrained parameter must match exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/fhir_request.hpp"

namespace ehrgate::smart {

// Who the token acts for: a launched patient, the signed-in user, or a backend service.
enum class Context : uint8_t { Patient, User, System };

// The SMART v2 permission letters c, r, u, d, s.
enum class Permission : uint8_t { Create, Read, Update, Delete, Search };

std::string_view context_name(Context context);  // "patient", "user", "system"
char permission_letter(Permission permission);   // 'c', 'r', 'u', 'd', 's'

class Permissions {
  public:
    constexpr Permissions() = default;
    static constexpr Permissions all() { return Permissions(0x1f); }
    static constexpr Permissions of(Permission permission) {
        return Permissions(static_cast<uint8_t>(1u << static_cast<unsigned>(permission)));
    }

    constexpr bool has(Permission permission) const { return (bits_ & of(permission).bits_) != 0; }
    constexpr bool empty() const { return bits_ == 0; }
    constexpr uint8_t bits() const { return bits_; }
    constexpr Permissions operator&(Permissions other) const {
        return Permissions(bits_ & other.bits_);
    }
    constexpr Permissions operator|(Permissions other) const {
        return Permissions(bits_ | other.bits_);
    }
    constexpr bool operator==(const Permissions &) const = default;

    // The v2 spelling, letters in "cruds" order: "rs", "cud". Empty for no permission.
    std::string to_string() const;

  private:
    explicit constexpr Permissions(unsigned bits) : bits_(static_cast<uint8_t>(bits & 0x1f)) {}
    uint8_t bits_ = 0;
};

// The scopes that carry no resource access.
enum class LaunchScope : uint8_t {
    OpenId,
    FhirUser,
    Profile,
    Launch,
    LaunchPatient,
    LaunchEncounter,
    OfflineAccess,
    OnlineAccess,
};

std::string_view launch_scope_name(LaunchScope scope);  // "openid", "launch/patient", ...

struct ResourceScope {
    Context context = Context::Patient;
    std::string resource_type;  // a FHIR R4 resource type, or "*" for every type
    Permissions permissions;
    // Granular (v2) constraints, all of which a resource must satisfy; empty for a plain scope.
    fhir::Query constraints;

    bool granular() const { return !constraints.empty(); }
    // Canonical v2 text, e.g. "patient/Observation.rs?category=laboratory".
    std::string to_string() const;

    bool operator==(const ResourceScope &) const = default;
};

// One way a resource may qualify under granular scopes: its search parameter `param` must match
// one of `values`. For `category` a value is a FHIR token: "system|code" needs that exact coding,
// a bare "code" accepts the code in any system.
struct Constraint {
    std::string param;
    std::vector<std::string> values;

    bool operator==(const Constraint &) const = default;
};

struct Access {
    enum class Kind : uint8_t {
        Denied,
        Allowed,
        // Allowed only for resources that satisfy at least one of `constraints`. The gateway
        // must check the resource itself: the response body for reads, the request body for
        // create and update.
        AllowedWithConstraint,
    };
    Kind kind = Kind::Denied;
    std::vector<Constraint> constraints;

    bool operator==(const Access &) const = default;
};

struct ScopeError {
    enum class Code : uint8_t {
        TooLong,               // the string exceeds kMaxScopeStringLength
        TooMany,               // more than kMaxScopes tokens
        InvalidCharacter,      // a byte outside the RFC 6749 scope-token set
        Malformed,             // not context/Type.permissions
        UnknownContext,        // context other than patient, user, system (case-sensitive)
        UnknownResourceType,   // not a FHIR R4 resource type nor "*"
        InvalidPermissions,    // neither read/write/* nor an ordered subsequence of cruds
        MalformedConstraints,  // empty or malformed "?name=value" part, or constraints on v1
    };
    Code code = Code::Malformed;
    std::string scope;   // the offending token, empty for TooLong and TooMany
    std::string reason;  // fixed English text, never request data
};

inline constexpr size_t kMaxScopeStringLength = 4096;
inline constexpr size_t kMaxScopes = 256;

// What a FHIR interaction needs from the scopes.
struct RequiredPermission {
    enum class Kind : uint8_t {
        None,         // capabilities: public by the FHIR spec
        Required,     // `permission` on the request's resource type
        Unsupported,  // refused whatever the scopes say (see required_permission)
    };
    Kind kind = Kind::Unsupported;
    Permission permission = Permission::Read;
};

// read, vread, history-instance, history-type -> r; search-type -> s; create -> c;
// update, patch -> u; delete -> d; capabilities -> none.
// Unsupported: search-system and history-system (they span every type, and a per-type answer
// cannot be given before the response exists), batch/transaction (the entries are in the body,
// which this layer does not see) and every operation (an operation's effect is defined by the
// operation, not by a letter of "cruds"; each one the gateway wants to expose must be mapped
// explicitly).
RequiredPermission required_permission(fhir::Interaction interaction);

class ScopeSet {
  public:
    const std::vector<ResourceScope> &resource_scopes() const { return resource_; }
    // Accepted tokens that are neither resource nor launch scopes, in first-seen order.
    const std::vector<std::string> &other_scopes() const { return other_; }
    bool has(LaunchScope scope) const;

    // The union of every scope for `context` that names `resource_type` (or "*") and grants
    // `permission`:
    //  - any such plain scope: Allowed;
    //  - otherwise only granular scopes, by permission:
    //    search: Allowed when `query` (the request's decoded search parameters) satisfies all
    //      constraints of one scope, i.e. for each constraint it carries that very parameter (no
    //      modifier) whose comma-separated values are all within the constraint. A search that
    //      does not say which category it wants is Denied, not answered with a filtered bundle.
    //    read, create, update: AllowedWithConstraint, listing the constraints of the granular
    //      scopes (merged per parameter) so the gateway checks the resource. Scopes with more
    //      than one constraint cannot be expressed that way and contribute nothing.
    //    delete: Denied; a resource cannot be checked before it is destroyed.
    // "Within the constraint": for category, a request value "system|code" is within a scope
    // value "system|code" (equal) or "code" (any system); a request value "code" is within only
    // "code". Other parameters compare exactly.
    Access allows(Context context, std::string_view resource_type, Permission permission,
                  const fhir::Query *query) const;

    // allows() for a classified interaction, through required_permission().
    Access allows_interaction(Context context, fhir::Interaction interaction,
                              std::string_view resource_type, const fhir::Query *query) const;

    // The grant that is in both this set and `ceiling` (a client's registered scopes): pairwise
    // intersection of resource scopes of the same context (specific type wins over "*",
    // permissions AND-ed, constraints of both kept), launch and other scopes present in both.
    ScopeSet intersect_ceiling(const ScopeSet &ceiling) const;

    // Canonical space-separated text: launch scopes, resource scopes (v2 form), other scopes.
    std::string to_string() const;

    bool operator==(const ScopeSet &) const = default;

  private:
    friend std::optional<ScopeSet> parse_scopes(std::string_view scopes, ScopeError *error);

    std::vector<ResourceScope> resource_;
    std::vector<std::string> other_;
    uint16_t launch_ = 0;  // bit i: LaunchScope i
};

// Parses the `scope` claim. On failure returns std::nullopt and, when `error` is not null,
// describes the first offending token.
std::optional<ScopeSet> parse_scopes(std::string_view scopes, ScopeError *error = nullptr);

}  // namespace ehrgate::smart
