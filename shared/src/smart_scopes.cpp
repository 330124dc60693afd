#include "ehrgate/smart_scopes.hpp"

#include <algorithm>
#include <array>
#include <utility>

namespace ehrgate::smart {

namespace {

using namespace std::string_view_literals;

constexpr std::string_view kPermissionLetters = "cruds";

// Indexed by LaunchScope.
constexpr std::array kLaunchScopeNames = {
    "openid"sv,         "fhirUser"sv,         "profile"sv,        "launch"sv,
    "launch/patient"sv, "launch/encounter"sv, "offline_access"sv, "online_access"sv,
};

constexpr size_t kContextCount = 3;
constexpr std::array<std::string_view, kContextCount> kContextNames = {"patient"sv, "user"sv,
                                                                       "system"sv};

bool fail(ScopeError *error, ScopeError::Code code, std::string_view scope,
          std::string_view reason) {
    if (error != nullptr) {
        error->code = code;
        error->scope = std::string(scope);
        error->reason = std::string(reason);
    }
    return false;
}

// RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
bool is_scope_char(char c) {
    const auto byte = static_cast<unsigned char>(c);
    return byte >= 0x21 && byte <= 0x7e && c != '"' && c != '\\';
}

char ascii_lower(char c) {
    return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

bool starts_with_ignoring_case(std::string_view text, std::string_view prefix) {
    if (text.size() < prefix.size()) {
        return false;
    }
    for (size_t i = 0; i < prefix.size(); ++i) {
        if (ascii_lower(text[i]) != prefix[i]) {
            return false;
        }
    }
    return true;
}

// A token that is meant as a resource scope, well-formed or not. See the header for why these
// shapes are refused rather than filed under other_scopes().
bool looks_like_resource_scope(std::string_view token) {
    if (token.find('/') != std::string_view::npos) {
        return true;
    }
    for (const std::string_view context : kContextNames) {
        if (starts_with_ignoring_case(token, context)) {
            const std::string_view rest = token.substr(context.size());
            if (!rest.empty() && std::string_view("/*.?").find(rest[0]) != std::string_view::npos) {
                return true;
            }
        }
    }
    return false;
}

std::optional<LaunchScope> launch_scope(std::string_view token) {
    for (size_t i = 0; i < kLaunchScopeNames.size(); ++i) {
        if (kLaunchScopeNames[i] == token) {
            return static_cast<LaunchScope>(i);
        }
    }
    return std::nullopt;
}

std::optional<Permissions> parse_permissions(std::string_view text, bool &v1) {
    v1 = true;
    if (text == "read")
        return Permissions::of(Permission::Read) | Permissions::of(Permission::Search);
    if (text == "write")
        return Permissions::of(Permission::Create) | Permissions::of(Permission::Update) |
               Permissions::of(Permission::Delete);
    if (text == "*")
        return Permissions::all();
    v1 = false;
    if (text.empty()) {
        return std::nullopt;
    }
    Permissions permissions;
    size_t next = 0;  // letters before this index of "cruds" may no longer appear
    for (const char c : text) {
        const size_t at = kPermissionLetters.find(c, next);
        if (at == std::string_view::npos) {
            return std::nullopt;
        }
        permissions = permissions | Permissions::of(static_cast<Permission>(at));
        next = at + 1;
    }
    return permissions;
}

bool is_constraint_name_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

bool parse_constraints(std::string_view token, std::string_view text, fhir::Query &out,
                       ScopeError *error) {
    const auto bad = [&](std::string_view reason) {
        return fail(error, ScopeError::Code::MalformedConstraints, token, reason);
    };
    if (text.empty()) {
        return bad("empty constraint after '?'");
    }
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find('&', start);
        if (end == std::string_view::npos) {
            end = text.size();
        }
        const std::string_view piece = text.substr(start, end - start);
        start = end + 1;
        const size_t equals = piece.find('=');
        if (equals == std::string_view::npos) {
            return bad("constraint is not name=value");
        }
        const std::string_view name = piece.substr(0, equals);
        if (name.empty() || !std::all_of(name.begin(), name.end(), is_constraint_name_char)) {
            return bad("constraint name must be [A-Za-z0-9_-]+");
        }
        std::optional<std::string> value = fhir::percent_decode(piece.substr(equals + 1));
        if (!value || value->empty() || value->find(',') != std::string::npos) {
            return bad("constraint value must be non-empty, well-encoded and without ','");
        }
        out.push_back({std::string(name), std::move(*value)});
    }
    return true;
}

bool parse_resource_scope(std::string_view token, ResourceScope &out, ScopeError *error) {
    const size_t slash = token.find('/');
    if (slash == std::string_view::npos) {
        return fail(error, ScopeError::Code::Malformed, token,
                    "expected context/ResourceType.permissions");
    }
    const std::string_view context = token.substr(0, slash);
    const auto found = std::find(kContextNames.begin(), kContextNames.end(), context);
    if (found == kContextNames.end()) {
        return fail(error, ScopeError::Code::UnknownContext, token,
                    "context must be patient, user or system");
    }
    out.context = static_cast<Context>(found - kContextNames.begin());

    const std::string_view rest = token.substr(slash + 1);
    const size_t dot = rest.find('.');
    if (dot == std::string_view::npos) {
        return fail(error, ScopeError::Code::Malformed, token,
                    "expected '.' between resource type and permissions");
    }
    const std::string_view type = rest.substr(0, dot);
    if (type.empty()) {
        return fail(error, ScopeError::Code::Malformed, token, "missing resource type");
    }
    if (type != "*" && !fhir::is_resource_type(type)) {
        return fail(error, ScopeError::Code::UnknownResourceType, token,
                    "not a FHIR R4 resource type");
    }
    out.resource_type = std::string(type);

    const std::string_view after = rest.substr(dot + 1);
    const size_t question = after.find('?');
    bool v1 = false;
    const std::optional<Permissions> permissions = parse_permissions(after.substr(0, question), v1);
    if (!permissions) {
        return fail(error, ScopeError::Code::InvalidPermissions, token,
                    "permissions must be read, write, * or an ordered subset of cruds");
    }
    out.permissions = *permissions;
    if (question == std::string_view::npos) {
        return true;
    }
    if (v1) {
        return fail(error, ScopeError::Code::MalformedConstraints, token,
                    "constraints need v2 permissions");
    }
    return parse_constraints(token, after.substr(question + 1), out.constraints, error);
}

// FHIR token subset test for `category`: is every resource matching `requested` also matched by
// `granted`?
bool token_within(std::string_view requested, std::string_view granted) {
    if (requested == granted) {
        return true;
    }
    if (granted.find('|') != std::string_view::npos) {
        return false;
    }
    // A bare granted code accepts that code in any system, so "system|code" and "|code" qualify.
    const size_t bar = requested.find('|');
    return bar != std::string_view::npos && requested.substr(bar + 1) == granted;
}

bool value_within(std::string_view param, std::string_view requested, std::string_view granted) {
    return param == "category" ? token_within(requested, granted) : requested == granted;
}

// Does one occurrence of `constraint.name` in the query restrict the search to values within
// the constraint? Repeated parameters are AND-ed, so one restrictive occurrence is enough.
bool query_satisfies(const fhir::Query &query, const fhir::QueryParam &constraint) {
    for (const fhir::QueryParam &param : query) {
        if (param.name != constraint.name || param.value.empty() ||
            param.value.find('\\') != std::string::npos) {
            // FHIR escapes ',' as "\,"; an escaped value is not worth the ambiguity.
            continue;
        }
        bool all_within = true;
        size_t start = 0;
        while (start <= param.value.size()) {
            size_t end = param.value.find(',', start);
            if (end == std::string::npos) {
                end = param.value.size();
            }
            const std::string_view item = std::string_view(param.value).substr(start, end - start);
            start = end + 1;
            if (item.empty() || !value_within(constraint.name, item, constraint.value)) {
                all_within = false;
                break;
            }
        }
        if (all_within) {
            return true;
        }
    }
    return false;
}

void add_constraint(std::vector<Constraint> &constraints, const fhir::QueryParam &param) {
    for (Constraint &existing : constraints) {
        if (existing.param == param.name) {
            if (std::find(existing.values.begin(), existing.values.end(), param.value) ==
                existing.values.end()) {
                existing.values.push_back(param.value);
            }
            return;
        }
    }
    constraints.push_back({param.name, {param.value}});
}

bool is_unreserved_for_display(char c) {
    return is_constraint_name_char(c) || c == '.' || c == '~' || c == ':' || c == '/' || c == '|';
}

void append_encoded(std::string &out, std::string_view text) {
    constexpr std::string_view kHex = "0123456789ABCDEF";
    for (const char c : text) {
        if (is_unreserved_for_display(c)) {
            out.push_back(c);
        } else {
            const auto byte = static_cast<unsigned char>(c);
            out.push_back('%');
            out.push_back(kHex[byte >> 4]);
            out.push_back(kHex[byte & 0x0f]);
        }
    }
}

std::optional<ResourceScope> intersect(const ResourceScope &a, const ResourceScope &b) {
    if (a.context != b.context) {
        return std::nullopt;
    }
    ResourceScope out;
    out.context = a.context;
    if (a.resource_type == b.resource_type || b.resource_type == "*") {
        out.resource_type = a.resource_type;
    } else if (a.resource_type == "*") {
        out.resource_type = b.resource_type;
    } else {
        return std::nullopt;
    }
    out.permissions = a.permissions & b.permissions;
    if (out.permissions.empty()) {
        return std::nullopt;
    }
    out.constraints = a.constraints;
    for (const fhir::QueryParam &constraint : b.constraints) {
        if (std::find(out.constraints.begin(), out.constraints.end(), constraint) ==
            out.constraints.end()) {
            out.constraints.push_back(constraint);
        }
    }
    return out;
}

}  // namespace

std::string_view context_name(Context context) {
    const auto index = static_cast<size_t>(context);
    return index < kContextNames.size() ? kContextNames[index] : std::string_view{};
}

char permission_letter(Permission permission) {
    const auto index = static_cast<size_t>(permission);
    return index < kPermissionLetters.size() ? kPermissionLetters[index] : '?';
}

std::string_view launch_scope_name(LaunchScope scope) {
    const auto index = static_cast<size_t>(scope);
    return index < kLaunchScopeNames.size() ? kLaunchScopeNames[index] : std::string_view{};
}

std::string Permissions::to_string() const {
    std::string out;
    for (size_t i = 0; i < kPermissionLetters.size(); ++i) {
        if (has(static_cast<Permission>(i))) {
            out.push_back(kPermissionLetters[i]);
        }
    }
    return out;
}

std::string ResourceScope::to_string() const {
    std::string out;
    out.append(context_name(context)).append("/").append(resource_type).append(".");
    out.append(permissions.to_string());
    for (size_t i = 0; i < constraints.size(); ++i) {
        out.push_back(i == 0 ? '?' : '&');
        append_encoded(out, constraints[i].name);
        out.push_back('=');
        append_encoded(out, constraints[i].value);
    }
    return out;
}

RequiredPermission required_permission(fhir::Interaction interaction) {
    using fhir::Interaction;
    using Kind = RequiredPermission::Kind;
    switch (interaction) {
        case Interaction::Read:
        case Interaction::VRead:
        case Interaction::HistoryInstance:
        case Interaction::HistoryType:
            return {Kind::Required, Permission::Read};
        case Interaction::SearchType:
            return {Kind::Required, Permission::Search};
        case Interaction::Create:
            return {Kind::Required, Permission::Create};
        case Interaction::Update:
        case Interaction::Patch:
            return {Kind::Required, Permission::Update};
        case Interaction::Delete:
            return {Kind::Required, Permission::Delete};
        case Interaction::Capabilities:
            return {Kind::None, Permission::Read};
        case Interaction::SearchSystem:
        case Interaction::HistorySystem:
        case Interaction::Batch:
        case Interaction::OperationSystem:
        case Interaction::OperationType:
        case Interaction::OperationInstance:
            return {Kind::Unsupported, Permission::Read};
    }
    return {Kind::Unsupported, Permission::Read};
}

bool ScopeSet::has(LaunchScope scope) const {
    return (launch_ & (1u << static_cast<unsigned>(scope))) != 0;
}

Access ScopeSet::allows(Context context, std::string_view resource_type, Permission permission,
                        const fhir::Query *query) const {
    Access access;
    if (!fhir::is_resource_type(resource_type)) {
        return access;
    }
    std::vector<const ResourceScope *> granular;
    for (const ResourceScope &scope : resource_) {
        if (scope.context != context || !scope.permissions.has(permission) ||
            (scope.resource_type != "*" && scope.resource_type != resource_type)) {
            continue;
        }
        if (!scope.granular()) {
            access.kind = Access::Kind::Allowed;
            return access;
        }
        granular.push_back(&scope);
    }
    switch (permission) {
        case Permission::Search:
            if (query == nullptr) {
                return access;
            }
            for (const ResourceScope *scope : granular) {
                const bool satisfied = std::all_of(
                    scope->constraints.begin(), scope->constraints.end(),
                    [&](const fhir::QueryParam &c) { return query_satisfies(*query, c); });
                if (satisfied) {
                    access.kind = Access::Kind::Allowed;
                    return access;
                }
            }
            return access;
        case Permission::Read:
        case Permission::Create:
        case Permission::Update:
            for (const ResourceScope *scope : granular) {
                if (scope->constraints.size() == 1) {
                    add_constraint(access.constraints, scope->constraints.front());
                }
            }
            if (!access.constraints.empty()) {
                access.kind = Access::Kind::AllowedWithConstraint;
            }
            return access;
        case Permission::Delete:
            return access;
    }
    return access;
}

Access ScopeSet::allows_interaction(Context context, fhir::Interaction interaction,
                                    std::string_view resource_type,
                                    const fhir::Query *query) const {
    const RequiredPermission required = required_permission(interaction);
    switch (required.kind) {
        case RequiredPermission::Kind::None:
            return {Access::Kind::Allowed, {}};
        case RequiredPermission::Kind::Required:
            return allows(context, resource_type, required.permission, query);
        case RequiredPermission::Kind::Unsupported:
            return {};
    }
    return {};
}

ScopeSet ScopeSet::intersect_ceiling(const ScopeSet &ceiling) const {
    ScopeSet out;
    out.launch_ = launch_ & ceiling.launch_;
    for (const std::string &other : other_) {
        if (std::find(ceiling.other_.begin(), ceiling.other_.end(), other) !=
            ceiling.other_.end()) {
            out.other_.push_back(other);
        }
    }
    for (const ResourceScope &granted : resource_) {
        for (const ResourceScope &limit : ceiling.resource_) {
            std::optional<ResourceScope> both = intersect(granted, limit);
            if (both && std::find(out.resource_.begin(), out.resource_.end(), *both) ==
                            out.resource_.end()) {
                out.resource_.push_back(std::move(*both));
            }
        }
    }
    return out;
}

std::string ScopeSet::to_string() const {
    std::string out;
    const auto append = [&out](std::string_view token) {
        if (!out.empty()) {
            out.push_back(' ');
        }
        out.append(token);
    };
    for (size_t i = 0; i < kLaunchScopeNames.size(); ++i) {
        if (has(static_cast<LaunchScope>(i))) {
            append(kLaunchScopeNames[i]);
        }
    }
    for (const ResourceScope &scope : resource_) {
        append(scope.to_string());
    }
    for (const std::string &other : other_) {
        append(other);
    }
    return out;
}

std::optional<ScopeSet> parse_scopes(std::string_view scopes, ScopeError *error) {
    if (scopes.size() > kMaxScopeStringLength) {
        fail(error, ScopeError::Code::TooLong, {}, "scope string is too long");
        return std::nullopt;
    }
    ScopeSet set;
    size_t count = 0;
    size_t start = 0;
    while (start <= scopes.size()) {
        size_t end = scopes.find(' ', start);
        if (end == std::string_view::npos) {
            end = scopes.size();
        }
        const std::string_view token = scopes.substr(start, end - start);
        start = end + 1;
        if (token.empty()) {
            continue;
        }
        if (++count > kMaxScopes) {
            fail(error, ScopeError::Code::TooMany, {}, "too many scopes");
            return std::nullopt;
        }
        if (!std::all_of(token.begin(), token.end(), is_scope_char)) {
            fail(error, ScopeError::Code::InvalidCharacter, token,
                 "scope contains a character outside RFC 6749 scope-token");
            return std::nullopt;
        }
        if (const std::optional<LaunchScope> launch = launch_scope(token)) {
            set.launch_ |= static_cast<uint16_t>(1u << static_cast<unsigned>(*launch));
            continue;
        }
        if (looks_like_resource_scope(token)) {
            ResourceScope scope;
            if (!parse_resource_scope(token, scope, error)) {
                return std::nullopt;
            }
            if (std::find(set.resource_.begin(), set.resource_.end(), scope) ==
                set.resource_.end()) {
                set.resource_.push_back(std::move(scope));
            }
            continue;
        }
        if (std::find(set.other_.begin(), set.other_.end(), token) == set.other_.end()) {
            set.other_.emplace_back(token);
        }
    }
    return set;
}

}  // namespace ehrgate::smart
