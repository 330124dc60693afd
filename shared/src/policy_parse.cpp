// YAML front end of the policy bundle: parse with yaml-cpp, then validate every node against
// schema v1 (docs/policy-bundle.md) and report every problem with its position and field path.
//
// The validator walks the YAML tree itself instead of using yaml-cpp's `node["key"]` lookups,
// because those silently pick one of two duplicate keys and cannot tell a typo from an absent
// optional field. It never stops at the first problem: an operator fixing a bundle should see
// all of them in one run of `ehrgatectl policy validate`.
#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <sstream>
#include <unordered_map>

#include "ehrgate/consent.hpp"
#include "ehrgate/fhir_request.hpp"
#include "ehrgate/jose.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/rate_limit.hpp"
#include "ehrgate/smart_scopes.hpp"

namespace ehrgate::policy {

namespace {

using namespace std::string_view_literals;

constexpr std::array kMethods = {"GET"sv, "HEAD"sv, "POST"sv, "PUT"sv, "PATCH"sv, "DELETE"sv};

constexpr size_t kMaxNameLength = 64;
constexpr size_t kMaxDisplayName = 128;
constexpr size_t kMaxDescription = 1024;
constexpr size_t kMaxPrefix = 256;
constexpr size_t kMaxPurposes = 64;
constexpr size_t kMaxMethods = 16;
constexpr size_t kMaxResources = 256;
constexpr size_t kMaxInteractions = 32;
constexpr size_t kMaxUrl = 512;  // issuer and audience
constexpr size_t kMaxPath = 4096;
constexpr size_t kMaxTenants = 64;
constexpr size_t kMaxCertificates = 32;

constexpr std::array kAuthMethods = {"bearer"sv, "mtls"sv, "cert-bound"sv};

// ---- Small text helpers ----------------------------------------------------------------------

// Quotes a value from the file for a message: escapes what would garble a terminal and cuts
// long values, so a diagnostic stays one readable line.
std::string quote(std::string_view value, size_t max_shown = 64) {
    std::string out = "\"";
    for (size_t i = 0; i < value.size() && i < max_shown; ++i) {
        const unsigned char c = static_cast<unsigned char>(value[i]);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f) {
            static constexpr char kHex[] = "0123456789abcdef";
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (value.size() > max_shown) {
        out += "...";
    }
    out += '"';
    return out;
}

char lower(char c) {
    return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

// Case-insensitive optimal-string-alignment distance (a transposition counts as one edit), for
// "did you mean" hints. Inputs are short names; longer ones are never close enough to matter.
size_t edit_distance(std::string_view a, std::string_view b) {
    if (a.size() > 64 || b.size() > 64) {
        return SIZE_MAX;
    }
    std::array<std::array<size_t, 65>, 65> d{};
    for (size_t i = 0; i <= a.size(); ++i)
        d[i][0] = i;
    for (size_t j = 0; j <= b.size(); ++j)
        d[0][j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
        for (size_t j = 1; j <= b.size(); ++j) {
            const size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
            d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
            if (i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2]) &&
                lower(a[i - 2]) == lower(b[j - 1])) {
                d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
            }
        }
    }
    return d[a.size()][b.size()];
}

template <typename Names>
std::optional<std::string_view> closest(std::string_view value, const Names &names) {
    const size_t allowed = value.size() >= 6 ? 2 : 1;
    std::optional<std::string_view> best;
    size_t best_distance = allowed + 1;
    for (const std::string_view name : names) {
        const size_t distance = edit_distance(value, name);
        if (distance < best_distance) {
            best = name;
            best_distance = distance;
        }
    }
    return best;
}

template <typename Names>
std::string join(const Names &names) {
    std::string out;
    for (const std::string_view name : names) {
        if (!out.empty()) {
            out += ", ";
        }
        out += name;
    }
    return out;
}

bool is_name_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
}

bool is_name(std::string_view value, bool allow_colon) {
    if (value.empty() || value.size() > kMaxNameLength) {
        return false;
    }
    return std::all_of(value.begin(), value.end(),
                       [&](char c) { return is_name_char(c) || (allow_colon && c == ':'); });
}

// A whole number from `min` to `max` in plain decimal digits: no sign, no spaces, none of YAML
// 1.1's 0x10, 0o17 or 1_000 (which some YAML tools would read differently).
std::optional<int64_t> whole_number(std::string_view text, int64_t min, int64_t max) {
    if (text.empty() || text.size() > 18 ||
        !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        return std::nullopt;
    }
    int64_t value = 0;
    for (const char c : text) {
        value = value * 10 + (c - '0');
    }
    if (value < min || value > max) {
        return std::nullopt;
    }
    return value;
}

// Why `text` is not a rate ratelimit::parse_rate accepts, with a hint for nginx's "50r/s".
std::string rate_problem(std::string_view text) {
    std::string problem =
        "expected N/s, N/m or N/h (N requests per second, minute or hour, 1 to 10000000), "
        "e.g. 50/s";
    const size_t r = text.find("r/");
    if (r != std::string_view::npos && r > 0) {
        std::string fixed(text);
        fixed.erase(r, 1);
        if (ratelimit::parse_rate(fixed)) {
            problem = "write " + quote(fixed) + ", not nginx's " + quote(text) + "; " + problem;
        }
    }
    return problem;
}

bool has_control(std::string_view value, bool allow_newlines) {
    return std::any_of(value.begin(), value.end(), [&](char ch) {
        const unsigned char c = static_cast<unsigned char>(ch);
        if (allow_newlines && (c == '\n' || c == '\t')) {
            return false;
        }
        return c < 0x20 || c == 0x7f;
    });
}

// Characters a route prefix may use: RFC 3986 pchar without percent-encoding, plus '/'. nginx
// matches decoded paths, so an encoded byte in a prefix could never match as written.
bool is_prefix_char(char c) {
    return is_name_char(c) || c == '~' || c == '!' || c == '$' || c == '&' || c == '\'' ||
           c == '(' || c == ')' || c == '*' || c == '+' || c == ',' || c == ';' || c == '=' ||
           c == ':' || c == '@' || c == '/';
}

// Returns why `prefix` is unacceptable, or an empty string.
std::string prefix_problem(std::string_view prefix) {
    if (prefix.size() > kMaxPrefix) {
        return "is longer than " + std::to_string(kMaxPrefix) + " characters";
    }
    if (prefix.empty() || prefix.front() != '/' || prefix.back() != '/') {
        return "must start and end with '/'";
    }
    for (const char c : prefix) {
        if (!is_prefix_char(c)) {
            return "contains " + quote(std::string_view(&c, 1)) +
                   "; use only letters, digits, '/' and - . _ ~ ! $ & ' ( ) * + , ; = : @";
        }
    }
    // Segments between the slashes: none empty, none "." or "..", since nginx normalizes those
    // away before matching and the prefix could then never match.
    size_t start = 1;
    while (start < prefix.size()) {
        const size_t slash = prefix.find('/', start);
        const std::string_view segment = prefix.substr(start, slash - start);
        if (segment.empty()) {
            return "contains an empty path segment (\"//\")";
        }
        if (segment == "." || segment == "..") {
            return "contains a dot segment (" + quote(segment) + ")";
        }
        start = slash + 1;
    }
    return {};
}

// Returns why `url` cannot be an issuer identifier, or an empty string. The value is compared
// byte for byte with each token's `iss`, so only its shape is checked here: https (RFC 8414
// section 2), a host, no user information, query or fragment. Plain http is for a sandbox
// issuer on the same machine.
std::string issuer_problem(std::string_view url) {
    if (url.size() > kMaxUrl) {
        return "is longer than " + std::to_string(kMaxUrl) + " characters";
    }
    if (std::any_of(url.begin(), url.end(),
                    [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; })) {
        return "contains whitespace or control characters";
    }
    std::string_view rest;
    bool https = true;
    if (url.starts_with("https://")) {
        rest = url.substr(8);
    } else if (url.starts_with("http://")) {
        rest = url.substr(7);
        https = false;
    } else {
        return "must be an https:// URL";
    }
    if (url.find_first_of("?#") != std::string_view::npos) {
        return "must not have a query or fragment";
    }
    const std::string_view authority = rest.substr(0, rest.find('/'));
    if (authority.find('@') != std::string_view::npos) {
        return "must not contain user information ('@')";
    }
    const size_t colon = authority.rfind(':');
    const std::string_view host = authority.substr(0, colon);
    if (host.empty()) {
        return "has no host";
    }
    if (colon != std::string_view::npos) {
        const std::string_view port = authority.substr(colon + 1);
        if (port.empty() || port.size() > 5 ||
            !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
            return "has an invalid port";
        }
    }
    if (!https && host != "127.0.0.1" && host != "localhost") {
        return "must use https:// (plain http:// is accepted only for 127.0.0.1 and localhost, "
               "for a sandbox issuer)";
    }
    return {};
}

// ---- Files -----------------------------------------------------------------------------------

struct FileText {
    std::string text;
    std::string error;  // "cannot open: ...", "cannot read: ..."; empty on success
    bool too_large = false;
};

// Reads a whole file of at most `max` bytes. Reads at most one byte past the limit: enough to
// know the file is too large without trusting a size from stat(), which a pipe or a growing
// file would not have.
FileText read_file(const std::string &path, size_t max) {
    FileText result;
    const std::unique_ptr<std::FILE, int (*)(std::FILE *)> file(std::fopen(path.c_str(), "rb"),
                                                                &std::fclose);
    if (!file) {
        result.error = std::string("cannot open: ") + std::strerror(errno);
        return result;
    }
    std::array<char, 64 * 1024> chunk;
    while (result.text.size() <= max) {
        const size_t n = std::fread(chunk.data(), 1, chunk.size(), file.get());
        result.text.append(chunk.data(), n);
        if (n < chunk.size()) {
            break;
        }
    }
    if (std::ferror(file.get())) {
        result.error = std::string("cannot read: ") + std::strerror(errno);
        result.text.clear();
    } else if (result.text.size() > max) {
        result.too_large = true;
        result.text.clear();
    }
    return result;
}

// ---- Positions and diagnostics ---------------------------------------------------------------

struct Position {
    int line = 0;
    int column = 0;
};

Position position_of(const YAML::Mark &mark) {
    if (mark.is_null() || mark.line < 0 || mark.column < 0) {
        return {};
    }
    return {mark.line + 1, mark.column + 1};
}

Position position_of(const YAML::Node &node) {
    return position_of(node.Mark());
}

// yaml-cpp places an empty value ("key:" and nothing) at the token that follows it, which is on
// another line; the key is where the reader should look.
Position value_position(const YAML::Node &key, const YAML::Node &value) {
    return value.IsNull() ? position_of(key) : position_of(value);
}

std::string_view kind_of(const YAML::Node &node) {
    switch (node.Type()) {
        case YAML::NodeType::Null:
            return "null";
        case YAML::NodeType::Scalar:
            return "a string";
        case YAML::NodeType::Sequence:
            return "a list";
        case YAML::NodeType::Map:
            return "a mapping";
        case YAML::NodeType::Undefined:
            break;
    }
    return "nothing";
}

std::string child(const std::string &path, std::string_view name) {
    return path.empty() ? std::string(name) : path + "." + std::string(name);
}

std::string item(const std::string &path, size_t index) {
    return path + "[" + std::to_string(index) + "]";
}

struct FieldSpec {
    std::string_view name;
    bool required;
};

// One YAML value as the validator sees it: the node, where to point at it, its field path.
struct Value {
    YAML::Node node;
    Position at;
    std::string path;
};

class Validator {
  public:
    explicit Validator(std::string_view file) : file_(file) {}

    void report(Position at, std::string field, std::string message) {
        ++problems_;
        if (diagnostics_.size() >= kMaxDiagnostics) {
            truncated_ = true;
            return;
        }
        diagnostics_.push_back({file_, at.line, at.column, std::move(field), std::move(message)});
    }

    void report(const Value &value, std::string message) {
        report(value.at, value.path, std::move(message));
    }

    // Problems reported so far, counting those past the cap: comparing two readings tells
    // whether a part of the bundle was clean, so checks that build on it can be skipped instead
    // of repeating the same mistake in other words.
    size_t problems() const { return problems_; }

    std::vector<Diagnostic> finish() {
        std::stable_sort(diagnostics_.begin(), diagnostics_.end(),
                         [](const Diagnostic &a, const Diagnostic &b) {
                             return a.line != b.line ? a.line < b.line : a.column < b.column;
                         });
        if (truncated_) {
            diagnostics_.push_back(
                {file_,
                 0,
                 0,
                 {},
                 "too many problems; stopped after the first " + std::to_string(kMaxDiagnostics)});
        }
        return std::move(diagnostics_);
    }

    // Walks a mapping: reports non-string, unknown and duplicate keys and missing required
    // fields, and calls on_field(index into specs, value) once for each known key.
    template <size_t N, typename OnField>
    bool walk_map(const Value &map, const std::array<FieldSpec, N> &specs, OnField &&on_field) {
        if (!map.node.IsMap()) {
            report(map, "expected a mapping, got " + std::string(kind_of(map.node)));
            return false;
        }
        std::array<Position, N> seen_at{};
        std::array<bool, N> seen{};
        for (auto it = map.node.begin(); it != map.node.end(); ++it) {
            // Copies: yaml-cpp's iterator yields a temporary pair, and its members die with it.
            const YAML::Node key = it->first;
            const YAML::Node value = it->second;
            if (!key.IsScalar()) {
                report(position_of(key), map.path,
                       "mapping keys must be strings, got " + std::string(kind_of(key)));
                continue;
            }
            const std::string &name = key.Scalar();
            const auto spec = std::find_if(specs.begin(), specs.end(),
                                           [&](const FieldSpec &s) { return s.name == name; });
            if (spec == specs.end()) {
                std::array<std::string_view, N> names;
                std::transform(specs.begin(), specs.end(), names.begin(),
                               [](const FieldSpec &s) { return s.name; });
                const std::optional<std::string_view> hint = closest(name, names);
                report(position_of(key), child(map.path, name),
                       "unknown field " + quote(name) +
                           (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                 : "; expected one of " + join(names)));
                continue;
            }
            const size_t index = static_cast<size_t>(spec - specs.begin());
            if (seen[index]) {
                report(position_of(key), child(map.path, name),
                       "duplicate key " + quote(name) + "; first given at line " +
                           std::to_string(seen_at[index].line));
                continue;
            }
            seen[index] = true;
            seen_at[index] = position_of(key);
            on_field(index, Value{value, value_position(key, value), child(map.path, name)});
        }
        for (size_t i = 0; i < N; ++i) {
            if (specs[i].required && !seen[i]) {
                report(map.at, child(map.path, specs[i].name),
                       "missing required field \"" + std::string(specs[i].name) + "\"");
            }
        }
        return true;
    }

    std::optional<std::string> string(const Value &value) {
        if (!value.node.IsScalar()) {
            report(value, "expected a string, got " + std::string(kind_of(value.node)));
            return std::nullopt;
        }
        return value.node.Scalar();
    }

    // Calls on_item(Value) for each entry of a list of at most `max` entries.
    template <typename OnItem>
    bool walk_list(const Value &list, size_t max, OnItem &&on_item) {
        if (!list.node.IsSequence()) {
            std::string message = "expected a list, got " + std::string(kind_of(list.node));
            if (list.node.IsNull()) {
                message += "; write [] for an empty list";
            }
            report(list, std::move(message));
            return false;
        }
        if (list.node.size() > max) {
            report(list, "too many entries (" + std::to_string(list.node.size()) + "); at most " +
                             std::to_string(max) + " are allowed");
            return false;
        }
        size_t index = 0;
        for (auto it = list.node.begin(); it != list.node.end(); ++it, ++index) {
            on_item(Value{*it, position_of(*it), item(list.path, index)});
        }
        return true;
    }

    // A list of distinct strings each accepted by `check` (which reports and returns false for
    // the bad ones). "*" is accepted as the only entry when `allow_wildcard`.
    template <typename Check>
    void string_set(const Value &list, size_t max, bool allow_empty, bool allow_wildcard,
                    std::string_view what, std::vector<std::string> &out, Check &&check) {
        std::unordered_map<std::string, int> first_line;
        std::optional<Value> wildcard;
        const bool is_list = walk_list(list, max, [&](const Value &entry) {
            std::optional<std::string> value = string(entry);
            if (!value) {
                return;
            }
            if (allow_wildcard && *value == "*") {
                wildcard = entry;
            } else if (!check(entry, *value)) {
                return;
            }
            const auto [it, inserted] = first_line.emplace(*value, entry.at.line);
            if (!inserted) {
                report(entry, "duplicate " + std::string(what) + " " + quote(*value) +
                                  "; first listed at line " + std::to_string(it->second));
                return;
            }
            out.push_back(std::move(*value));
        });
        if (!is_list) {
            return;
        }
        if (wildcard && list.node.size() > 1) {
            report(*wildcard, "\"*\" already allows everything and must be the only entry");
        }
        if (!allow_empty && list.node.size() == 0) {
            report(list, "must list at least one " + std::string(what));
        }
    }

  private:
    std::string file_;
    std::vector<Diagnostic> diagnostics_;
    size_t problems_ = 0;
    bool truncated_ = false;
};

// ---- Schema v1 -------------------------------------------------------------------------------

constexpr std::array<FieldSpec, 11> kBundleFields = {{
    {"schema", true},
    {"version", true},
    {"description", false},
    {"issuers", false},
    {"clients", true},
    {"routes", true},
    {"rate_plans", false},
    {"upstreams", false},
    {"throttling", false},  // required exactly when rate_plans lists a plan
    {"redaction", false},   // redaction
    {"consent", false},     // consent (issue 5)
}};

// redaction
constexpr std::array<FieldSpec, 6> kRedactionFields = {{
    {"max_held_bytes", false},
    {"withheld_labels", false},
    {"allowed_content_types", false},
    {"inference", false},
    {"masks", false},
    {"withheld_contexts", false},
}};

constexpr std::array<FieldSpec, 5> kInferenceFields = {{
    {"system", true},
    {"code", false},
    {"code_prefix", false},
    {"label", true},
    {"display", false},
}};

constexpr std::array<FieldSpec, 3> kMaskFields = {{
    {"resource", true},
    {"path", true},
    {"identifier_system", false},
}};

// ---- Consent (issue 5) ----
constexpr std::array<FieldSpec, 5> kConsentFields = {{
    {"sensitive_labels", false},
    {"explicit_consent_labels", false},
    {"purposes", false},
    {"fallback", false},
    {"break_glass", false},
}};
constexpr std::array<FieldSpec, 4> kConsentDefaultFields = {{
    {"purpose", true},
    {"clients", false},
    {"access", true},
    {"withhold", false},
}};
constexpr std::array<FieldSpec, 2> kConsentFallbackFields = {{
    {"access", true},
    {"withhold", false},
}};
constexpr std::array<FieldSpec, 4> kBreakGlassFields = {{
    {"purposes", true},
    {"clients", true},
    {"users", false},
    {"withhold", false},
}};
constexpr size_t kMaxConsentEntries = 256;

constexpr std::array<FieldSpec, 6> kIssuerFields = {{
    {"id", true},
    {"issuer", true},
    {"audience", true},
    {"jwks_file", true},
    {"algorithms", true},
    {"leeway_seconds", false},
}};

constexpr std::array<FieldSpec, 11> kClientFields = {{
    {"id", true},
    {"display_name", false},
    {"context", true},
    {"traffic_class", true},
    {"purposes", false},
    {"auth", false},
    {"scope_ceiling", false},
    {"issuers", false},
    {"tenants", false},
    {"certificates", false},
    {"rate_plan", false},
}};

constexpr std::array<FieldSpec, 7> kRouteFields = {{
    {"name", true},
    {"prefix", true},
    {"methods", true},
    {"resources", true},
    {"interactions", true},
    {"tenant", false},
    {"upstream", false},
}};

constexpr std::array<FieldSpec, 5> kRatePlanFields = {{
    {"name", true},
    {"rate", true},
    {"burst", true},
    {"concurrency", false},
    {"dry_run", false},
}};

constexpr std::array<FieldSpec, 3> kUpstreamFields = {{
    {"name", true},
    {"capacity", true},
    {"interactive_reserve", false},
}};

constexpr std::array<FieldSpec, 3> kThrottlingFields = {{
    {"interactive_plan", true},
    {"batch_plan", true},
    {"unclassified_plan", true},
}};

// Remembers the first use of a name that must be unique across list entries.
class UniqueNames {
  public:
    // Returns the line of the first use, or 0 when `name` is new.
    int first_use(const std::string &name, int line) {
        const auto [it, inserted] = lines_.emplace(name, line);
        return inserted ? 0 : it->second;
    }

  private:
    std::unordered_map<std::string, int> lines_;
};

// A name used in one place that must be defined in another, checked once the whole bundle is
// read (YAML order is free: clients may come before the issuers they name).
struct Reference {
    Value at;
    std::string name;
};

class BundleParser {
  public:
    explicit BundleParser(std::string_view file)
        : v_(file), base_dir_(std::filesystem::path(file).parent_path()) {}

    void parse(const YAML::Node &root) {
        const Value top{root, position_of(root), ""};
        if (!root.IsMap()) {
            v_.report(top,
                      "expected a mapping with schema, version, clients and routes at the "
                      "top level, got " +
                          std::string(kind_of(root)));
            return;
        }
        v_.walk_map(top, kBundleFields, [&](size_t field, const Value &value) {
            switch (field) {
                case 0:
                    return schema(value);
                case 1:
                    return version(value);
                case 2:
                    return description(value);
                case 3:
                    return issuers(value);
                case 4:
                    return clients(value);
                case 5:
                    return routes(value);
                case 6:
                    return rate_plans(value);
                case 7:
                    return upstreams(value);
                case 8:
                    return throttling(value);
                case 9:
                    return redaction(value);
                default:
                    return consent(value);
            }
        });
        check_references();
        check_throttling(top);
        check_consent();
    }

    Validator &validator() { return v_; }
    Bundle &bundle() { return bundle_; }

  private:
    void schema(const Value &value) {
        const std::optional<std::string> schema = v_.string(value);
        if (!schema) {
            return;
        }
        if (*schema != kSchemaV1) {
            v_.report(value, "unsupported schema " + quote(*schema) + "; expected \"" +
                                 std::string(kSchemaV1) + "\"");
        }
        bundle_.schema = *schema;
    }

    void version(const Value &value) {
        const std::optional<std::string> version = v_.string(value);
        if (!version) {
            return;
        }
        if (!is_name(*version, true)) {
            v_.report(value, "invalid version " + quote(*version) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ : -");
        }
        bundle_.version = *version;
    }

    void description(const Value &value) {
        const std::optional<std::string> description = v_.string(value);
        if (!description) {
            return;
        }
        if (description->size() > kMaxDescription) {
            v_.report(value,
                      "description is longer than " + std::to_string(kMaxDescription) + " bytes");
        } else if (has_control(*description, true)) {
            v_.report(value, "description contains control characters");
        }
        bundle_.description = *description;
    }

    // ---- Issuers ----

    void issuers(const Value &list) {
        UniqueNames ids;
        UniqueNames urls;
        v_.walk_list(list, kMaxIssuers, [&](const Value &entry) {
            Issuer &issuer = bundle_.issuers.emplace_back();
            std::optional<Value> jwks_file_at;
            bool algorithms_clean = false;
            v_.walk_map(entry, kIssuerFields, [&](size_t field, const Value &value) {
                switch (field) {
                    case 0:
                        return issuer_id(value, issuer, ids);
                    case 1:
                        return issuer_url(value, issuer, urls);
                    case 2:
                        return audience(value, issuer);
                    case 3:
                        if (jwks_file(value, issuer)) {
                            jwks_file_at = value;
                        }
                        return;
                    case 4: {
                        const size_t before = v_.problems();
                        algorithms(value, issuer);
                        algorithms_clean = v_.problems() == before;
                        return;
                    }
                    default:
                        return leeway(value, issuer);
                }
            });
            // After the walk, so the key check can see the algorithms whatever the field order.
            if (jwks_file_at) {
                load_jwks(*jwks_file_at, issuer, algorithms_clean);
            }
        });
    }

    void issuer_id(const Value &value, Issuer &issuer, UniqueNames &ids) {
        const std::optional<std::string> id = v_.string(value);
        if (!id) {
            return;
        }
        if (!is_name(*id, false)) {
            v_.report(value, "invalid issuer id " + quote(*id) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else if (const int first = ids.first_use(*id, value.at.line)) {
            v_.report(value, "duplicate issuer id " + quote(*id) + "; first defined at line " +
                                 std::to_string(first));
        }
        issuer.id = *id;
    }

    void issuer_url(const Value &value, Issuer &issuer, UniqueNames &urls) {
        const std::optional<std::string> url = v_.string(value);
        if (!url) {
            return;
        }
        if (const std::string problem = issuer_problem(*url); !problem.empty()) {
            v_.report(value, "invalid issuer " + quote(*url, 128) + ": " + problem);
        } else if (const int first = urls.first_use(*url, value.at.line)) {
            // A token's iss must select exactly one entry: its keys, audience and algorithms.
            v_.report(value, "duplicate issuer " + quote(*url, 128) +
                                 "; another entry has it at line " + std::to_string(first));
        }
        issuer.issuer = *url;
    }

    void audience(const Value &value, Issuer &issuer) {
        const std::optional<std::string> audience = v_.string(value);
        if (!audience) {
            return;
        }
        if (audience->empty()) {
            v_.report(value, "audience must not be empty");
        } else if (audience->size() > kMaxUrl) {
            v_.report(value, "audience is longer than " + std::to_string(kMaxUrl) + " characters");
        } else if (std::any_of(audience->begin(), audience->end(), [](char c) {
                       return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f;
                   })) {
            v_.report(value, "invalid audience " + quote(*audience, 128) +
                                 ": contains whitespace or control characters");
        }
        issuer.audience = *audience;
    }

    // Returns whether the value is a path worth trying to read.
    bool jwks_file(const Value &value, Issuer &issuer) {
        const std::optional<std::string> path = v_.string(value);
        if (!path) {
            return false;
        }
        issuer.jwks_file = *path;
        if (path->empty()) {
            v_.report(value, "jwks_file must not be empty");
            return false;
        }
        if (path->size() > kMaxPath || has_control(*path, false)) {
            v_.report(value, "invalid jwks_file " + quote(*path, 128) +
                                 ": must be a path of at most " + std::to_string(kMaxPath) +
                                 " characters without control characters");
            return false;
        }
        return true;
    }

    void algorithms(const Value &list, Issuer &issuer) {
        v_.string_set(
            list, jose::kAllAlgorithms.size(), false, false, "algorithm", issuer.algorithms,
            [&](const Value &entry, const std::string &name) {
                if (jose::algorithm_from_name(name)) {
                    return true;
                }
                std::array<std::string_view, jose::kAllAlgorithms.size()> names;
                std::transform(jose::kAllAlgorithms.begin(), jose::kAllAlgorithms.end(),
                               names.begin(), jose::algorithm_name);
                std::string message;
                if (name == "HS256" || name == "HS384" || name == "HS512") {
                    // With a public key the gateway knows, a symmetric "signature" can be made
                    // by anyone who knows that key too: the classic algorithm confusion.
                    message = "symmetric algorithms are never accepted: " + quote(name) +
                              " needs a shared secret, and the gateway verifies tokens only with "
                              "the issuer's public keys; use one of " +
                              join(names);
                } else if (edit_distance(name, "none") == 0) {
                    message = "\"none\" is never accepted: it marks an unsigned token";
                } else if (const std::optional<std::string_view> hint = closest(name, names)) {
                    message = "unknown algorithm " + quote(name) + "; did you mean \"" +
                              std::string(*hint) + "\"?";
                } else {
                    message =
                        "unknown algorithm " + quote(name) + "; expected one of " + join(names);
                }
                v_.report(entry, std::move(message));
                return false;
            });
    }

    void leeway(const Value &value, Issuer &issuer) {
        const std::optional<std::string> text = v_.string(value);
        if (!text) {
            return;
        }
        const bool digits =
            !text->empty() && text->size() <= 3 &&
            std::all_of(text->begin(), text->end(), [](char c) { return c >= '0' && c <= '9'; });
        const int64_t seconds = digits ? std::stoll(*text) : -1;
        if (seconds < 0 || seconds > kMaxLeewaySeconds) {
            v_.report(value, "invalid leeway_seconds " + quote(*text) +
                                 ": expected a whole number of seconds from 0 to " +
                                 std::to_string(kMaxLeewaySeconds));
            return;
        }
        issuer.leeway_seconds = seconds;
    }

    // Reads the issuer's JWKS now, so that a missing or broken file refuses the bundle at load
    // time, and so that workers get the keys in the snapshot instead of reading files.
    void load_jwks(const Value &at, Issuer &issuer, bool check_algorithms) {
        const std::filesystem::path written(issuer.jwks_file);
        const std::string path =
            written.is_absolute() ? written.string() : (base_dir_ / written).string();
        // The resolved path, so a relative one shows where it was looked for.
        const std::string shown = quote(path, 256);
        FileText file = read_file(path, kMaxJwksBytes);
        if (!file.error.empty()) {
            v_.report(at, "jwks_file " + shown + ": " + file.error);
            return;
        }
        if (file.too_large) {
            v_.report(at, "jwks_file " + shown + " is larger than " +
                              std::to_string(kMaxJwksBytes) +
                              " bytes (1 MiB), the limit for a JWKS");
            return;
        }
        std::string error;
        const std::optional<jose::KeySet> keys = jose::KeySet::parse(file.text, &error);
        if (!keys) {
            v_.report(at, "jwks_file " + shown + " is not an acceptable JWKS: " + error);
            return;
        }
        if (keys->size() == 0) {
            v_.report(at, "jwks_file " + shown + " contains no keys");
            return;
        }
        jwks_total_bytes_ += file.text.size();
        if (jwks_total_bytes_ > kMaxJwksTotalBytes) {
            v_.report(at, "jwks_file " + shown + " brings the JWKS files of all issuers to " +
                              std::to_string(jwks_total_bytes_) +
                              " bytes; together they may "
                              "have at most " +
                              std::to_string(kMaxJwksTotalBytes) +
                              " (1 MiB), since every snapshot carries them");
            return;
        }
        issuer.jwks_json = std::move(file.text);
        if (check_algorithms) {
            check_keys(at, *keys, issuer, shown);
        }
    }

    // A key that names its algorithm must name an allowed one: otherwise the operator believes
    // the issuer signs with something the gateway will refuse (or the allow-list is incomplete).
    // And at least one key must fit an allowed algorithm, or no token could ever verify.
    void check_keys(const Value &at, const jose::KeySet &keys, const Issuer &issuer,
                    const std::string &shown) {
        const auto allowed = [&](jose::Algorithm alg) {
            return std::find(issuer.algorithms.begin(), issuer.algorithms.end(),
                             jose::algorithm_name(alg)) != issuer.algorithms.end();
        };
        bool any_usable = false;
        bool mismatch = false;
        for (size_t i = 0; i < keys.size(); ++i) {
            const jose::KeyInfo &info = keys.info(i);
            if (!info.verifies) {
                continue;
            }
            const std::string key_name =
                info.kid.empty() ? "key " + std::to_string(i) : "key " + quote(info.kid);
            if (info.alg) {
                if (!allowed(*info.alg)) {
                    mismatch = true;
                    v_.report(at, "jwks_file " + shown + ": " + key_name + " has alg \"" +
                                      std::string(jose::algorithm_name(*info.alg)) +
                                      "\", which is not in this issuer's algorithms (" +
                                      join(issuer.algorithms) + ")");
                } else {
                    any_usable = true;
                }
                continue;
            }
            for (const jose::Algorithm alg : jose::kAllAlgorithms) {
                if (allowed(alg) && key_fits(info, alg)) {
                    any_usable = true;
                }
            }
        }
        if (!any_usable && !mismatch) {
            v_.report(at, "jwks_file " + shown +
                              ": no key can verify any of this issuer's algorithms (" +
                              join(issuer.algorithms) + ")");
        }
    }

    static bool key_fits(const jose::KeyInfo &info, jose::Algorithm alg) {
        const std::string_view name = jose::algorithm_name(alg);
        if (info.kty == "RSA") {
            return name.starts_with("RS") || name.starts_with("PS");
        }
        if (info.kty == "EC") {
            return (name == "ES256" && info.crv == "P-256") ||
                   (name == "ES384" && info.crv == "P-384") ||
                   (name == "ES512" && info.crv == "P-521");
        }
        return false;
    }

    // ---- Clients ----

    void clients(const Value &list) {
        UniqueNames ids;
        v_.walk_list(list, kMaxClients, [&](const Value &entry) {
            const size_t index = bundle_.clients.size();
            Client &client = bundle_.clients.emplace_back();
            std::optional<Value> certificates_at;
            bool auth_clean = true;
            v_.walk_map(entry, kClientFields, [&](size_t field, const Value &value) {
                switch (field) {
                    case 0:
                        return client_id(value, client, ids);
                    case 1:
                        return display_name(value, client);
                    case 2:
                        return context(value, client);
                    case 3:
                        return traffic_class(value, client);
                    case 4:
                        return purposes(value, client);
                    case 5: {
                        const size_t before = v_.problems();
                        auth(value, client);
                        auth_clean = v_.problems() == before;
                        return;
                    }
                    case 6:
                        return scope_ceiling(value, client);
                    case 7:
                        return client_issuers(value, client);
                    case 8:
                        return client_tenants(value, client);
                    case 9:
                        certificates_at = value;
                        return certificates(value, client, index);
                    default:
                        return client_rate_plan(value, client);
                }
            });
            if (entry.node.IsMap() && auth_clean) {
                certificates_fit_auth(entry, client, certificates_at);
            }
        });
    }

    void client_id(const Value &value, Client &client, UniqueNames &ids) {
        const std::optional<std::string> id = v_.string(value);
        if (!id) {
            return;
        }
        if (!is_name(*id, false)) {
            v_.report(value, "invalid client id " + quote(*id) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else if (const int first = ids.first_use(*id, value.at.line)) {
            v_.report(value, "duplicate client id " + quote(*id) + "; first defined at line " +
                                 std::to_string(first));
        }
        client.id = *id;
    }

    void display_name(const Value &value, Client &client) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (name->size() > kMaxDisplayName) {
            v_.report(value,
                      "display_name is longer than " + std::to_string(kMaxDisplayName) + " bytes");
        } else if (has_control(*name, false)) {
            v_.report(value, "display_name contains control characters");
        }
        client.display_name = *name;
    }

    void context(const Value &value, Client &client) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (*name == "user") {
            client.context = LaunchContext::User;
        } else if (*name == "patient") {
            client.context = LaunchContext::Patient;
        } else if (*name == "system") {
            client.context = LaunchContext::System;
        } else {
            v_.report(value, "unknown context " + quote(*name) +
                                 "; expected one of user, patient, system");
        }
    }

    void traffic_class(const Value &value, Client &client) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (*name == "interactive") {
            client.traffic_class = TrafficClass::Interactive;
        } else if (*name == "batch") {
            client.traffic_class = TrafficClass::Batch;
        } else {
            v_.report(value, "unknown traffic_class " + quote(*name) +
                                 "; expected one of interactive, batch");
        }
    }

    void purposes(const Value &list, Client &client) {
        v_.string_set(list, kMaxPurposes, true, false, "purpose", client.purposes,
                      [&](const Value &entry, const std::string &code) {
                          if (consent::is_purpose_of_use(code)) {
                              return true;
                          }
                          const std::optional<std::string_view> hint =
                              closest(code, consent::purpose_of_use_codes());
                          v_.report(entry,
                                    "unknown PurposeOfUse code " + quote(code) +
                                        (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                              : "; expected a code of the HL7 v3 "
                                                "PurposeOfUse value set, e.g. TREAT"));
                          return false;
                      });
    }

    void auth(const Value &list, Client &client) {
        std::vector<std::string> names;
        v_.string_set(list, kAuthMethods.size(), false, false, "authentication method", names,
                      [&](const Value &entry, const std::string &name) {
                          if (auth_method_from_name(name)) {
                              return true;
                          }
                          const std::optional<std::string_view> hint = closest(name, kAuthMethods);
                          v_.report(entry,
                                    "unknown authentication method " + quote(name) +
                                        (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                              : "; expected one of " + join(kAuthMethods)));
                          return false;
                      });
        client.auth.clear();
        for (const std::string &name : names) {
            client.auth.push_back(*auth_method_from_name(name));
        }
    }

    void scope_ceiling(const Value &value, Client &client) {
        const std::optional<std::string> scopes = v_.string(value);
        if (!scopes) {
            return;
        }
        smart::ScopeError error;
        if (!smart::parse_scopes(*scopes, &error)) {
            v_.report(value, "invalid scope_ceiling: " +
                                 (error.scope.empty() ? error.reason
                                                      : quote(error.scope) + ": " + error.reason));
        }
        client.scope_ceiling = *scopes;
    }

    void client_issuers(const Value &list, Client &client) {
        v_.string_set(list, kMaxIssuers, true, false, "issuer", client.issuers,
                      [&](const Value &entry, const std::string &id) {
                          if (!is_name(id, false)) {
                              v_.report(entry, "invalid issuer id " + quote(id) +
                                                   ": must be 1-64 characters from A-Z a-z 0-9 "
                                                   ". _ -");
                              return false;
                          }
                          issuer_references_.push_back({entry, id});
                          return true;
                      });
    }

    void client_tenants(const Value &list, Client &client) {
        v_.string_set(list, kMaxTenants, true, false, "tenant", client.tenants,
                      [&](const Value &entry, const std::string &tenant) {
                          if (!is_name(tenant, false)) {
                              v_.report(entry, "invalid tenant " + quote(tenant) +
                                                   ": must be 1-64 characters from A-Z a-z 0-9 "
                                                   ". _ -");
                              return false;
                          }
                          client_tenants_.insert(tenant);
                          return true;
                      });
    }

    void certificates(const Value &list, Client &client, size_t client_index) {
        std::unordered_map<std::string, int> first_line;
        v_.walk_list(list, kMaxCertificates, [&](const Value &entry) {
            const std::optional<std::string> text = v_.string(entry);
            if (!text) {
                return;
            }
            std::optional<std::string> fingerprint = normalize_certificate_fingerprint(*text);
            if (!fingerprint) {
                const size_t digits = static_cast<size_t>(
                    std::count_if(text->begin(), text->end(), [](char c) { return c != ':'; }));
                v_.report(entry,
                          "invalid certificate fingerprint " + quote(*text, 100) +
                              (digits == 40 ? ": this looks like a SHA-1 fingerprint; " : ": ") +
                              "expected the SHA-256 of the DER certificate, 64 hex digits "
                              "(colons allowed), e.g. from `openssl x509 -in client.pem -outform "
                              "DER | sha256sum`");
                return;
            }
            if (const auto [it, inserted] = first_line.emplace(*fingerprint, entry.at.line);
                !inserted) {
                v_.report(entry, "duplicate certificate " + quote(*text, 100) +
                                     "; first listed at line " + std::to_string(it->second));
                return;
            }
            const auto [owner, inserted] = certificate_owners_.emplace(
                *fingerprint, std::make_pair(client_index, entry.at.line));
            if (!inserted) {
                const Client &other = bundle_.clients[owner->second.first];
                v_.report(entry, "certificate " + quote(*text, 100) +
                                     " is already pinned by client " + quote(other.id) +
                                     " at line " + std::to_string(owner->second.second) +
                                     "; a certificate identifies exactly one client");
                return;
            }
            client.certificates.push_back(std::move(*fingerprint));
        });
    }

    // mtls and cert-bound both need a pinned certificate; pinning one for a client that uses
    // neither would look like protection that is not there.
    void certificates_fit_auth(const Value &entry, const Client &client,
                               const std::optional<Value> &certificates_at) {
        const auto uses = [&](AuthMethod method) {
            return std::find(client.auth.begin(), client.auth.end(), method) != client.auth.end();
        };
        const bool needs = uses(AuthMethod::Mtls) || uses(AuthMethod::CertBound);
        const std::string_view which = uses(AuthMethod::Mtls) ? "mtls" : "cert-bound";
        if (needs && !certificates_at) {
            v_.report(entry.at, child(entry.path, "certificates"),
                      "missing required field \"certificates\": auth includes \"" +
                          std::string(which) + "\", which needs at least one pinned certificate");
        } else if (needs && certificates_at->node.IsSequence() &&
                   certificates_at->node.size() == 0) {
            v_.report(*certificates_at, "must list at least one certificate: auth includes \"" +
                                            std::string(which) + "\"");
        } else if (!needs && certificates_at && certificates_at->node.IsSequence() &&
                   certificates_at->node.size() > 0) {
            v_.report(*certificates_at,
                      "certificates are used only with auth mtls or cert-bound; add one of them "
                      "to auth or remove the certificates");
        }
    }

    // ---- Routes ----

    void routes(const Value &list) {
        UniqueNames names;
        UniqueNames prefixes;
        const bool is_list = v_.walk_list(list, kMaxRoutes, [&](const Value &entry) {
            Route &route = bundle_.routes.emplace_back();
            v_.walk_map(entry, kRouteFields, [&](size_t field, const Value &value) {
                switch (field) {
                    case 0:
                        return route_name(value, route, names);
                    case 1:
                        return prefix(value, route, prefixes);
                    case 2:
                        return methods(value, route);
                    case 3:
                        return resources(value, route);
                    case 4:
                        return interactions(value, route);
                    case 5:
                        return route_tenant(value, route);
                    default:
                        return route_upstream(value, route);
                }
            });
        });
        if (is_list && list.node.size() == 0) {
            v_.report(list, "at least one route is required");
        }
    }

    void route_name(const Value &value, Route &route, UniqueNames &names) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (!is_name(*name, false)) {
            v_.report(value, "invalid route name " + quote(*name) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else if (const int first = names.first_use(*name, value.at.line)) {
            v_.report(value, "duplicate route name " + quote(*name) + "; first defined at line " +
                                 std::to_string(first));
        }
        route.name = *name;
    }

    void prefix(const Value &value, Route &route, UniqueNames &prefixes) {
        const std::optional<std::string> prefix = v_.string(value);
        if (!prefix) {
            return;
        }
        if (const std::string problem = prefix_problem(*prefix); !problem.empty()) {
            v_.report(value, "invalid prefix " + quote(*prefix) + ": " + problem);
        } else if (const int first = prefixes.first_use(*prefix, value.at.line)) {
            v_.report(value, "duplicate prefix " + quote(*prefix) +
                                 "; another route uses it at line " + std::to_string(first));
        }
        route.prefix = *prefix;
    }

    void methods(const Value &list, Route &route) {
        v_.string_set(
            list, kMaxMethods, false, false, "HTTP method", route.methods,
            [&](const Value &entry, const std::string &method) {
                if (std::find(kMethods.begin(), kMethods.end(), method) != kMethods.end()) {
                    return true;
                }
                v_.report(entry, "unknown HTTP method " + quote(method) + "; expected one of " +
                                     join(kMethods));
                return false;
            });
    }

    void resources(const Value &list, Route &route) {
        v_.string_set(
            list, kMaxResources, false, true, "resource type", route.resources,
            [&](const Value &entry, const std::string &type) {
                if (fhir::is_resource_type(type)) {
                    return true;
                }
                const std::optional<std::string_view> hint = closest(type, fhir::resource_types());
                v_.report(entry, "unknown FHIR R4 resource type " + quote(type) +
                                     (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                           : "; resource types are case-sensitive, "
                                             "e.g. \"Patient\", or \"*\" for all"));
                return false;
            });
    }

    void interactions(const Value &list, Route &route) {
        v_.string_set(list, kMaxInteractions, false, true, "interaction", route.interactions,
                      [&](const Value &entry, const std::string &name) {
                          if (fhir::interaction_from_name(name)) {
                              return true;
                          }
                          std::array<std::string_view, fhir::kInteractionCount> names;
                          for (size_t i = 0; i < names.size(); ++i) {
                              names[i] = fhir::interaction_name(static_cast<fhir::Interaction>(i));
                          }
                          const std::optional<std::string_view> hint = closest(name, names);
                          v_.report(entry,
                                    "unknown interaction " + quote(name) +
                                        (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                              : "; expected \"*\" or one of " + join(names)));
                          return false;
                      });
    }

    void route_tenant(const Value &value, Route &route) {
        const std::optional<std::string> tenant = v_.string(value);
        if (!tenant) {
            return;
        }
        if (!is_name(*tenant, false)) {
            v_.report(value, "invalid tenant " + quote(*tenant) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else {
            route_tenants_.push_back({value, *tenant});
        }
        route.tenant = *tenant;
    }

    void route_upstream(const Value &value, Route &route) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (!is_name(*name, false)) {
            v_.report(value, "invalid upstream name " + quote(*name) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else {
            upstream_references_.push_back({value, *name});
        }
        route.upstream = *name;
    }

    // ---- Throttling ----

    void client_rate_plan(const Value &value, Client &client) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (!is_name(*name, false)) {
            v_.report(value, "invalid rate plan name " + quote(*name) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else {
            plan_references_.push_back({value, *name});
        }
        client.rate_plan = *name;
    }

    void rate_plans(const Value &list) {
        rate_plans_at_ = list;
        UniqueNames names;
        v_.walk_list(list, kMaxRatePlans, [&](const Value &entry) {
            RatePlan &plan = bundle_.rate_plans.emplace_back();
            v_.walk_map(entry, kRatePlanFields, [&](size_t field, const Value &value) {
                switch (field) {
                    case 0:
                        return unique_name(value, "rate plan name", names, plan.name);
                    case 1:
                        return rate(value, plan);
                    case 2:
                        number(value, "burst", "tokens", 1, kMaxBurst, plan.burst);
                        return;
                    case 3:
                        number(value, "concurrency", "requests", 0, kMaxConcurrency,
                               plan.concurrency, " (no cap)");
                        return;
                    default:
                        return boolean(value, "dry_run", plan.dry_run);
                }
            });
        });
    }

    void upstreams(const Value &list) {
        upstreams_at_ = list;
        UniqueNames names;
        v_.walk_list(list, kMaxUpstreams, [&](const Value &entry) {
            Upstream &upstream = bundle_.upstreams.emplace_back();
            std::optional<Value> capacity_at;
            std::optional<Value> reserve_at;
            v_.walk_map(entry, kUpstreamFields, [&](size_t field, const Value &value) {
                switch (field) {
                    case 0:
                        return unique_name(value, "upstream name", names, upstream.name);
                    case 1:
                        if (number(value, "capacity", "requests", 1, kMaxUpstreamCapacity,
                                   upstream.capacity)) {
                            capacity_at = value;
                        }
                        return;
                    default:
                        if (number(value, "interactive_reserve", "requests", 0,
                                   kMaxUpstreamCapacity, upstream.interactive_reserve)) {
                            reserve_at = value;
                        }
                        return;
                }
            });
            // After the walk, whatever the field order; only when both numbers are valid.
            if (capacity_at && reserve_at && upstream.interactive_reserve >= upstream.capacity) {
                v_.report(*reserve_at,
                          "interactive_reserve (" + std::to_string(upstream.interactive_reserve) +
                              ") must be less than capacity (" + std::to_string(upstream.capacity) +
                              "): batch traffic is refused once capacity - interactive_reserve "
                              "requests are in flight, so this would refuse all of it");
            }
        });
    }

    // redaction
    bool label_code(const Value &at, const std::string &code) {
        if (code.empty() || code.size() > 64 || !std::all_of(code.begin(), code.end(), [](char c) {
                return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                       c == '-' || c == '_' || c == '.';
            })) {
            v_.report(at, "invalid label code " + quote(code) +
                              ": must be 1-64 characters from A-Z a-z 0-9 . _ - (e.g. \"PSY\")");
            return false;
        }
        return true;
    }

    bool plain_text(const Value &at, const std::string &text, std::string_view what) {
        if (text.empty() || text.size() > 256 || has_control(text, false) ||
            text.find('"') != std::string::npos || text.find('\\') != std::string::npos) {
            v_.report(at, "invalid " + std::string(what) + " " + quote(text) +
                              ": must be 1-256 characters without quotes, backslashes or "
                              "control characters");
            return false;
        }
        return true;
    }

    void redaction(const Value &map) {
        Redaction &redaction = bundle_.redaction;
        redaction.present = true;
        v_.walk_map(map, kRedactionFields, [&](size_t field, const Value &value) {
            switch (field) {
                case 0: {
                    const std::optional<std::string> text = v_.string(value);
                    const std::optional<int64_t> bytes =
                        text ? whole_number(*text, static_cast<int64_t>(redaction::kMinHeldBytes),
                                            static_cast<int64_t>(redaction::kMaxHeldBytesLimit))
                             : std::nullopt;
                    if (text && !bytes) {
                        v_.report(value, "max_held_bytes must be a whole number of bytes from " +
                                             std::to_string(redaction::kMinHeldBytes) + " to " +
                                             std::to_string(redaction::kMaxHeldBytesLimit) +
                                             ", got " + quote(*text));
                    } else if (bytes) {
                        redaction.engine.max_held_bytes = static_cast<size_t>(*bytes);
                    }
                    return;
                }
                case 1:
                    return v_.string_set(value, 64, true, false, "label", redaction.withheld_labels,
                                         [&](const Value &at, const std::string &code) {
                                             return label_code(at, code);
                                         });
                case 2:
                    return v_.string_set(
                        value, 32, true, false, "content type", redaction.allowed_content_types,
                        [&](const Value &at, const std::string &type) {
                            const bool ok =
                                type.find('/') != std::string::npos && type.size() <= 128 &&
                                std::all_of(type.begin(), type.end(), [](char c) {
                                    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                                           c == '/' || c == '-' || c == '+' || c == '.';
                                });
                            if (!ok) {
                                v_.report(at, "invalid content type " + quote(type) +
                                                  ": expected a lower-case media type without "
                                                  "parameters, e.g. \"application/pdf\"");
                            } else if (type.find("json") != std::string::npos) {
                                v_.report(at,
                                          "JSON is always redacted and cannot be allowed "
                                          "unfiltered: remove " +
                                              quote(type));
                                return false;
                            }
                            return ok;
                        });
                case 3:
                    v_.walk_list(value, 4096, [&](const Value &entry) { inference_rule(entry); });
                    return;
                case 5:
                    return v_.string_set(
                        value, 3, false, false, "context", redaction.withheld_contexts,
                        [&](const Value &at, const std::string &context) {
                            if (context == "user" || context == "patient" || context == "system") {
                                return true;
                            }
                            v_.report(at, "unknown context " + quote(context) +
                                              "; expected user, patient or system");
                            return false;
                        });
                default:
                    v_.walk_list(value, 1024, [&](const Value &entry) { field_mask(entry); });
                    return;
            }
        });
    }

    void inference_rule(const Value &map) {
        redaction::InferenceRule rule;
        bool code_seen = false, ok = true;
        v_.walk_map(map, kInferenceFields, [&](size_t field, const Value &value) {
            const std::optional<std::string> text = v_.string(value);
            if (!text) {
                ok = false;
                return;
            }
            switch (field) {
                case 0:
                    ok = plain_text(value, *text, "code system") && ok;
                    rule.system = *text;
                    return;
                case 1:
                case 2:
                    if (code_seen) {
                        v_.report(value, "give either code or code_prefix, not both");
                        ok = false;
                    }
                    code_seen = true;
                    ok = plain_text(value, *text, "code") && ok;
                    rule.code = *text;
                    rule.prefix = field == 2;
                    return;
                case 3:
                    ok = label_code(value, *text) && ok;
                    rule.label = *text;
                    return;
                default:
                    return;  // display: for readers only
            }
        });
        if (map.node.IsMap() && !code_seen) {
            v_.report(map, "missing required field \"code\" (or \"code_prefix\")");
            ok = false;
        }
        if (ok && map.node.IsMap()) {
            bundle_.redaction.engine.inference.push_back(std::move(rule));
        }
    }

    void field_mask(const Value &map) {
        redaction::FieldMask mask;
        bool ok = true;
        v_.walk_map(map, kMaskFields, [&](size_t field, const Value &value) {
            const std::optional<std::string> text = v_.string(value);
            if (!text) {
                ok = false;
                return;
            }
            if (field == 0) {
                if (!is_name(*text, false)) {
                    v_.report(value, "invalid resource type " + quote(*text));
                    ok = false;
                }
                mask.resource_type = *text;
            } else if (field == 1) {
                const bool valid = !text->empty() && text->front() != '.' && text->back() != '.' &&
                                   text->find("..") == std::string::npos &&
                                   std::all_of(text->begin(), text->end(), [](char c) {
                                       return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                                              (c >= '0' && c <= '9') || c == '.' || c == '_';
                                   });
                if (!valid) {
                    v_.report(value, "invalid element path " + quote(*text) +
                                         ": expected element names joined by '.', e.g. "
                                         "\"identifier\" or \"contact.telecom\"");
                    ok = false;
                }
                mask.path = *text;
            } else {
                ok = plain_text(value, *text, "identifier system") && ok;
                mask.identifier_system = *text;
            }
        });
        if (ok && map.node.IsMap()) {
            bundle_.redaction.engine.masks.push_back(std::move(mask));
        }
    }

    void throttling(const Value &map) {
        throttling_at_ = map;
        Throttling &throttling = bundle_.throttling;
        v_.walk_map(map, kThrottlingFields, [&](size_t field, const Value &value) {
            std::string &name = field == 0   ? throttling.interactive_plan
                                : field == 1 ? throttling.batch_plan
                                             : throttling.unclassified_plan;
            const std::optional<std::string> text = v_.string(value);
            if (!text) {
                return;
            }
            if (!is_name(*text, false)) {
                v_.report(value, "invalid rate plan name " + quote(*text) +
                                     ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
            } else {
                throttling_references_.push_back({value, *text});
            }
            name = *text;
        });
    }

    // A name unique among the entries of one list (rate plans, upstreams).
    void unique_name(const Value &value, std::string_view what, UniqueNames &names,
                     std::string &out) {
        const std::optional<std::string> name = v_.string(value);
        if (!name) {
            return;
        }
        if (!is_name(*name, false)) {
            v_.report(value, "invalid " + std::string(what) + " " + quote(*name) +
                                 ": must be 1-64 characters from A-Z a-z 0-9 . _ -");
        } else if (const int first = names.first_use(*name, value.at.line)) {
            v_.report(value, "duplicate " + std::string(what) + " " + quote(*name) +
                                 "; first defined at line " + std::to_string(first));
        }
        out = *name;
    }

    void rate(const Value &value, RatePlan &plan) {
        const std::optional<std::string> text = v_.string(value);
        if (!text) {
            return;
        }
        plan.rate = *text;
        if (const std::optional<int64_t> units = ratelimit::parse_rate(*text)) {
            plan.rate_units_per_second = *units;
        } else {
            v_.report(value, "invalid rate " + quote(*text) + ": " + rate_problem(*text));
        }
    }

    // Returns whether the value was a number in range (and stored).
    template <typename T>
    bool number(const Value &value, std::string_view field, std::string_view unit, int64_t min,
                int64_t max, T &out, std::string_view min_note = "") {
        const std::optional<std::string> text = v_.string(value);
        if (!text) {
            return false;
        }
        const std::optional<int64_t> number = whole_number(*text, min, max);
        if (!number) {
            v_.report(value, "invalid " + std::string(field) + " " + quote(*text) +
                                 ": expected a whole number of " + std::string(unit) + " from " +
                                 std::to_string(min) + std::string(min_note) + " to " +
                                 std::to_string(max));
            return false;
        }
        out = static_cast<T>(*number);
        return true;
    }

    void boolean(const Value &value, std::string_view field, bool &out) {
        const std::optional<std::string> text = v_.string(value);
        if (!text) {
            return;
        }
        if (*text == "true" || *text == "false") {
            out = *text == "true";
        } else {
            v_.report(value, "invalid " + std::string(field) + " " + quote(*text) +
                                 ": expected true or false");
        }
    }

    // Position of a top-level key, for problems about the presence of a whole section.
    static Position key_position(const Value &top, std::string_view name) {
        for (auto it = top.node.begin(); it != top.node.end(); ++it) {
            const YAML::Node key = it->first;
            if (key.IsScalar() && key.Scalar() == name) {
                return position_of(key);
            }
        }
        return top.at;
    }

    static bool lists_entries(const std::optional<Value> &list) {
        return list && list->node.IsSequence() && list->node.size() > 0;
    }

    // Throttling is off unless rate_plans lists a plan; then (and only then) `throttling` must
    // say which plan each kind of caller gets, and every plan or upstream named must exist.
    void check_throttling(const Value &top) {
        const bool on = lists_entries(rate_plans_at_);
        if (on && !throttling_at_) {
            v_.report(top.at, "throttling",
                      "missing required field \"throttling\": rate_plans (line " +
                          std::to_string(key_position(top, "rate_plans").line) +
                          ") turns throttling on, so throttling must name the plan for "
                          "interactive, batch and unclassified traffic");
        }
        if (!on && throttling_at_) {
            v_.report(key_position(top, "throttling"), "throttling",
                      std::string(rate_plans_at_ ? "rate_plans is empty"
                                                 : "the bundle defines no rate_plans") +
                          ", so throttling is off and this section would do nothing; define the "
                          "plans it names in rate_plans, or remove it");
        }
        if (!on && lists_entries(upstreams_at_)) {
            v_.report(key_position(top, "upstreams"), "upstreams",
                      "upstream capacities are enforced only when throttling is on; add "
                      "rate_plans and throttling, or remove upstreams");
        }

        const std::vector<std::string_view> plans = defined_names(bundle_.rate_plans);
        if (on) {
            // Without plans the missing section was reported above, once, not per name.
            check_names(throttling_references_, plans, "rate plan", "rate_plans");
        }
        check_names(plan_references_, plans, "rate plan", "rate_plans");
        check_names(upstream_references_, defined_names(bundle_.upstreams), "upstream",
                    "upstreams");
    }

    // The distinct names of `entries` in file order, for "did you mean" and "defined in" hints.
    template <typename T>
    static std::vector<std::string_view> defined_names(const std::vector<T> &entries) {
        std::vector<std::string_view> names;
        for (const T &entry : entries) {
            if (!entry.name.empty() &&
                std::find(names.begin(), names.end(), entry.name) == names.end()) {
                names.push_back(entry.name);
            }
        }
        return names;
    }

    void check_names(const std::vector<Reference> &references,
                     const std::vector<std::string_view> &defined, std::string_view what,
                     std::string_view section) {
        for (const Reference &ref : references) {
            if (std::find(defined.begin(), defined.end(), ref.name) != defined.end()) {
                continue;
            }
            const std::optional<std::string_view> hint = closest(ref.name, defined);
            v_.report(ref.at,
                      "unknown " + std::string(what) + " " + quote(ref.name) +
                          (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                           : defined.empty()
                               ? "; the bundle defines no " + std::string(section)
                               : "; defined in " + std::string(section) + ": " + join(defined)));
        }
    }

    // ---- Consent (issue 5) ----

    void labels(const Value &list, std::vector<std::string> &out) {
        v_.string_set(list, kMaxConsentEntries, true, false, "label", out,
                      [&](const Value &entry, const std::string &code) {
                          if (consent::is_label_code(code)) {
                              return true;
                          }
                          v_.report(entry, "invalid security label code " + quote(code) +
                                               ": 1-32 characters from A-Z a-z 0-9 - _, e.g. PSY");
                          return false;
                      });
    }

    bool purpose_code(const Value &entry, const std::string &code) {
        if (consent::is_purpose_of_use(code)) {
            return true;
        }
        const std::optional<std::string_view> hint = closest(code, consent::purpose_of_use_codes());
        v_.report(entry, "unknown PurposeOfUse code " + quote(code) +
                             (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                   : "; expected a code of the HL7 v3 PurposeOfUse value set"));
        return false;
    }

    void access(const Value &value, consent::DefaultAccess &out) {
        const std::optional<std::string> text = v_.string(value);
        if (!text) {
            return;
        }
        if (*text == "permit") {
            out = consent::DefaultAccess::Permit;
        } else if (*text == "consent-required") {
            out = consent::DefaultAccess::ConsentRequired;
        } else {
            v_.report(value,
                      "unknown access " + quote(*text) + "; expected permit or consent-required");
        }
    }

    void consent_clients(const Value &list, std::vector<std::string> &out, bool allow_empty) {
        v_.string_set(list, kMaxConsentEntries, allow_empty, false, "client", out,
                      [&](const Value &entry, const std::string &id) {
                          consent_client_refs_.push_back({entry, id});
                          return true;
                      });
    }

    void consent(const Value &map) {
        consent::ConsentPolicy &policy = bundle_.consent;
        policy.enabled = true;
        bool fallback_given = false;
        v_.walk_map(map, kConsentFields, [&](size_t field, const Value &value) {
            switch (field) {
                case 0:
                    sensitive_at_ = value;
                    return labels(value, policy.sensitive_labels);
                case 1:
                    explicit_at_ = value;
                    return labels(value, policy.explicit_consent_labels);
                case 2:
                    v_.walk_list(value, kMaxConsentEntries, [&](const Value &entry) {
                        consent::PurposeDefault &d = policy.purposes.emplace_back();
                        // Not a Value copy assigned later: assigning a YAML::Node writes
                        // through to the node it refers to.
                        std::optional<Value> purpose_at;
                        v_.walk_map(entry, kConsentDefaultFields, [&](size_t f, const Value &v) {
                            switch (f) {
                                case 0:
                                    if (std::optional<std::string> code = v_.string(v)) {
                                        purpose_at.emplace(v);
                                        if (purpose_code(v, *code)) {
                                            if (*code == "ETREAT" || *code == "BTG") {
                                                v_.report(v, *code +
                                                                 " is emergency access: configure "
                                                                 "it under consent.break_glass");
                                            }
                                            d.purpose = *code;
                                        }
                                    }
                                    return;
                                case 1:
                                    return consent_clients(v, d.clients, false);
                                case 2:
                                    return access(v, d.access);
                                default:
                                    return labels(v, d.withhold);
                            }
                        });
                        default_positions_.push_back(purpose_at ? *purpose_at : entry);
                    });
                    return;
                case 3:
                    fallback_given = true;
                    fallback_at_ = value;
                    v_.walk_map(value, kConsentFallbackFields, [&](size_t f, const Value &v) {
                        if (f == 0) {
                            access(v, policy.fallback.access);
                            if (policy.fallback.access != consent::DefaultAccess::ConsentRequired) {
                                v_.report(v,
                                          "the fallback for a missing or unknown purpose is "
                                          "the lowest privilege: it must be consent-required");
                            }
                        } else {
                            labels(v, policy.fallback.withhold);
                        }
                    });
                    return;
                default:
                    v_.walk_map(value, kBreakGlassFields, [&](size_t f, const Value &v) {
                        consent::BreakGlass &bg = policy.break_glass;
                        switch (f) {
                            case 0:
                                return v_.string_set(
                                    v, 2, false, false, "purpose", bg.purposes,
                                    [&](const Value &entry, const std::string &code) {
                                        if (code == "ETREAT" || code == "BTG") {
                                            return true;
                                        }
                                        v_.report(entry, "break-glass purpose " + quote(code) +
                                                             " must be ETREAT or BTG");
                                        return false;
                                    });
                            case 1:
                                return consent_clients(v, bg.clients, false);
                            case 2:
                                return v_.string_set(
                                    v, kMaxConsentEntries, true, false, "user", bg.users,
                                    [&](const Value &entry, const std::string &user) {
                                        if (!user.empty() && user.size() <= 256) {
                                            return true;
                                        }
                                        v_.report(entry,
                                                  "a user is a fhirUser or sub value of "
                                                  "1-256 characters");
                                        return false;
                                    });
                            default:
                                return labels(v, bg.withhold);
                        }
                    });
                    return;
            }
        });
        if (!fallback_given) {
            policy.fallback.withhold = policy.sensitive_labels;
        }
    }

    void check_consent() {
        const consent::ConsentPolicy &policy = bundle_.consent;
        if (!policy.enabled) {
            return;
        }
        for (const Reference &ref : consent_client_refs_) {
            // Linear: the clients are not in canonical order yet, so find_client cannot be used.
            if (std::none_of(bundle_.clients.begin(), bundle_.clients.end(),
                             [&](const Client &c) { return c.id == ref.name; })) {
                std::vector<std::string_view> ids;
                for (const Client &c : bundle_.clients) {
                    ids.push_back(c.id);
                }
                const std::optional<std::string_view> hint = closest(ref.name, ids);
                v_.report(ref.at, "unknown client " + quote(ref.name) +
                                      (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                            : "; it must be registered under clients"));
            }
        }
        const auto has = [](const std::vector<std::string> &v, std::string_view x) {
            return std::find(v.begin(), v.end(), x) != v.end();
        };
        if (explicit_at_) {
            for (const std::string &label : policy.explicit_consent_labels) {
                if (!has(policy.sensitive_labels, label)) {
                    v_.report(*explicit_at_, "explicit-consent label " + quote(label) +
                                                 " must also be listed in sensitive_labels");
                }
            }
        }
        if (fallback_at_) {
            for (const std::string &label : policy.sensitive_labels) {
                if (!has(policy.fallback.withhold, label)) {
                    v_.report(*fallback_at_,
                              "the fallback must withhold every sensitive label; "
                              "missing " +
                                  quote(label));
                }
            }
        }
        for (size_t i = 0; i < policy.purposes.size(); ++i) {
            const consent::PurposeDefault &d = policy.purposes[i];
            for (size_t j = 0; j < i; ++j) {
                const consent::PurposeDefault &o = policy.purposes[j];
                if (d.purpose.empty() || o.purpose != d.purpose) {
                    continue;
                }
                const bool overlap =
                    d.clients.empty() || o.clients.empty() ||
                    std::find_first_of(d.clients.begin(), d.clients.end(), o.clients.begin(),
                                       o.clients.end()) != d.clients.end();
                if (overlap) {
                    v_.report(default_positions_[i],
                              "a second default for purpose " + quote(d.purpose) +
                                  " applying to the same client; first at line " +
                                  std::to_string(default_positions_[j].at.line));
                }
            }
        }
    }

    // ---- Cross-references ----

    void check_references() {
        std::vector<std::string_view> issuer_ids;
        for (const Issuer &issuer : bundle_.issuers) {
            issuer_ids.push_back(issuer.id);
        }
        for (const Reference &ref : issuer_references_) {
            if (std::find(issuer_ids.begin(), issuer_ids.end(), ref.name) != issuer_ids.end()) {
                continue;
            }
            const std::optional<std::string_view> hint = closest(ref.name, issuer_ids);
            v_.report(ref.at,
                      "unknown issuer " + quote(ref.name) +
                          (hint                 ? "; did you mean \"" + std::string(*hint) + "\"?"
                           : issuer_ids.empty() ? "; the bundle defines no issuers"
                                                : "; defined issuers: " + join(issuer_ids)));
        }
        // A route tenant no client lists refuses every identified client: almost surely a typo.
        for (const Reference &ref : route_tenants_) {
            if (client_tenants_.contains(ref.name)) {
                continue;
            }
            const std::optional<std::string_view> hint = closest(ref.name, client_tenants_);
            v_.report(ref.at, "no client lists tenant " + quote(ref.name) +
                                  (hint ? "; did you mean \"" + std::string(*hint) + "\"?"
                                        : "; add it to the tenants of the clients that may use "
                                          "this route"));
        }
    }

    Validator v_;
    Bundle bundle_;
    std::filesystem::path base_dir_;  // where relative jwks_file paths start
    size_t jwks_total_bytes_ = 0;
    std::vector<Reference> issuer_references_;
    std::vector<Reference> route_tenants_;
    std::vector<Reference> plan_references_;        // clients' rate_plan
    std::vector<Reference> throttling_references_;  // the three plans of `throttling`
    std::vector<Reference> upstream_references_;    // routes' upstream
    std::optional<Value> rate_plans_at_;
    std::optional<Value> upstreams_at_;
    std::optional<Value> throttling_at_;
    // Consent (issue 5)
    std::vector<Reference> consent_client_refs_;
    std::vector<Value> default_positions_;
    std::optional<Value> sensitive_at_;
    std::optional<Value> explicit_at_;
    std::optional<Value> fallback_at_;
    std::set<std::string, std::less<>> client_tenants_;
    // Certificate fingerprint -> (client index, line) of its first pinning.
    std::unordered_map<std::string, std::pair<size_t, int>> certificate_owners_;
};

ParseResult single_problem(std::string_view file, Position at, std::string message) {
    ParseResult result;
    result.diagnostics.push_back({std::string(file), at.line, at.column, {}, std::move(message)});
    return result;
}

// ---- Input screening -------------------------------------------------------------------------

struct BadByte {
    size_t offset;
    std::string message;
};

// Length of the UTF-8 sequence starting at `text[i]`, or 0 when it is not well-formed (including
// overlong forms, surrogates and code points above U+10FFFF).
size_t utf8_sequence_length(std::string_view text, size_t i) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char b0 = byte(i);
    size_t length = 0;
    unsigned char min1 = 0x80;
    unsigned char max1 = 0xbf;
    if (b0 >= 0xc2 && b0 <= 0xdf) {
        length = 2;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
        length = 3;
        if (b0 == 0xe0)
            min1 = 0xa0;  // overlong
        if (b0 == 0xed)
            max1 = 0x9f;  // surrogates
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
        length = 4;
        if (b0 == 0xf0)
            min1 = 0x90;  // overlong
        if (b0 == 0xf4)
            max1 = 0x8f;  // above U+10FFFF
    } else {
        return 0;
    }
    if (text.size() - i < length || byte(i + 1) < min1 || byte(i + 1) > max1) {
        return 0;
    }
    for (size_t k = 2; k < length; ++k) {
        if (byte(i + k) < 0x80 || byte(i + k) > 0xbf) {
            return 0;
        }
    }
    return length;
}

// A policy bundle is UTF-8 text without control characters other than tab and line breaks.
// Checked before yaml-cpp sees the text: yaml-cpp 0.7 takes byte 0x04 for the end of input and,
// on some binary input, never finishes a document, so LoadAll() would keep adding empty
// documents until memory runs out.
std::optional<BadByte> first_bad_byte(std::string_view text) {
    for (size_t i = 0; i < text.size();) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (c < 0x80) {
            if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f) {
                static constexpr char kHex[] = "0123456789abcdef";
                return BadByte{i, std::string("control character 0x") + kHex[c >> 4] +
                                      kHex[c & 0xf] + " is not allowed in a policy bundle"};
            }
            ++i;
            continue;
        }
        const size_t length = utf8_sequence_length(text, i);
        if (length == 0) {
            return BadByte{i, "invalid UTF-8; a policy bundle must be UTF-8 text"};
        }
        i += length;
    }
    return std::nullopt;
}

// 1-based line and byte column of `offset`.
Position position_at_offset(std::string_view text, size_t offset) {
    const std::string_view before = text.substr(0, offset);
    const size_t line_start = before.rfind('\n');
    const int line = static_cast<int>(std::count(before.begin(), before.end(), '\n')) + 1;
    const size_t column = line_start == std::string_view::npos ? offset : offset - line_start - 1;
    return {line, static_cast<int>(column) + 1};
}

// Records where a second YAML document starts, without building any node.
class DocumentCounter : public YAML::EventHandler {
  public:
    void OnDocumentStart(const YAML::Mark &mark) override {
        if (++documents_ == 2) {
            second_ = mark;
        }
    }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark &, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark &, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark &, const std::string &, YAML::anchor_t,
                  const std::string &) override {}
    void OnSequenceStart(const YAML::Mark &, const std::string &, YAML::anchor_t,
                         YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark &, const std::string &, YAML::anchor_t,
                    YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}

    const YAML::Mark &second() const { return second_; }

  private:
    int documents_ = 0;
    YAML::Mark second_ = YAML::Mark::null_mark();
};

// Where a second document starts, if any. Unlike LoadAll() this stops after two documents, so
// it terminates whatever yaml-cpp makes of the input.
std::optional<YAML::Mark> second_document(const std::string &text) {
    std::istringstream in(text);
    YAML::Parser parser(in);
    DocumentCounter counter;
    if (!parser.HandleNextDocument(counter) || !parser.HandleNextDocument(counter)) {
        return std::nullopt;
    }
    return counter.second();
}

}  // namespace

ParseResult parse_bundle(std::string_view yaml_text, std::string_view file_name) {
    if (yaml_text.size() > kMaxBundleBytes) {
        return single_problem(file_name, {},
                              "the bundle is " + std::to_string(yaml_text.size()) +
                                  " bytes; at most " + std::to_string(kMaxBundleBytes) +
                                  " bytes (4 MiB) are allowed");
    }
    if (const std::optional<BadByte> bad = first_bad_byte(yaml_text)) {
        return single_problem(file_name, position_at_offset(yaml_text, bad->offset), bad->message);
    }
    try {
        const std::string text(yaml_text);
        const YAML::Node root = YAML::Load(text);
        if (const std::optional<YAML::Mark> second = second_document(text)) {
            return single_problem(file_name, position_of(*second),
                                  "a policy bundle is a single YAML document; a second one "
                                  "starts here");
        }
        if (root.IsNull()) {
            return single_problem(file_name, {},
                                  "the bundle is empty; expected a mapping with schema, version, "
                                  "clients and routes");
        }
        BundleParser parser(file_name);
        parser.parse(root);
        ParseResult result;
        result.diagnostics = parser.validator().finish();
        if (result.diagnostics.empty()) {
            result.bundle = std::move(parser.bundle());
            result.bundle->canonicalize();
        }
        return result;
    } catch (const YAML::DeepRecursion &e) {
        return single_problem(file_name, position_of(e.mark),
                              "YAML nesting is too deep to be a policy bundle");
    } catch (const YAML::ParserException &e) {
        return single_problem(file_name, position_of(e.mark), "YAML syntax error: " + e.msg);
    } catch (const std::exception &e) {
        // yaml-cpp's representation errors, or memory exhaustion: still a diagnostic, never an
        // exception into the caller (policyd's reload path or ehrgatectl).
        return single_problem(file_name, {}, std::string("cannot process the bundle: ") + e.what());
    } catch (...) {
        return single_problem(file_name, {}, "cannot process the bundle: unknown error");
    }
}

ParseResult load_bundle_file(const std::string &path) {
    const FileText file = read_file(path, kMaxBundleBytes);
    if (!file.error.empty()) {
        return single_problem(path, {}, file.error);
    }
    if (file.too_large) {
        return single_problem(path, {},
                              "the file is larger than " + std::to_string(kMaxBundleBytes) +
                                  " bytes (4 MiB), the limit for a policy bundle");
    }
    return parse_bundle(file.text, path);
}

}  // namespace ehrgate::policy
