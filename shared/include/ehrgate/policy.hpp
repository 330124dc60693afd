// The policy bundle: the declarative YAML file operators edit, its validated in-memory model,
// the compiled snapshot every nginx worker receives, and the decision policyd answers from it.
//
// Parsing and validation report every problem with file, line, column and a field path such as
// `routes[2].methods[0]`, so `ehrgatectl policy validate` can point at the exact spot.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "ehrgate/consent_policy.hpp"
#include "ehrgate/protocol.hpp"
#include "ehrgate/redaction.hpp"

namespace ehrgate::policy {

inline constexpr std::string_view kSchemaV1 = "ehrgate.policy/v1";

// Limits enforced by parse_bundle() (and the snapshot decoder, for the list lengths). They bound
// the memory and time a hostile or broken bundle can cost; real bundles stay far below them.
inline constexpr size_t kMaxBundleBytes = 4u << 20;
inline constexpr size_t kMaxClients = 10000;
inline constexpr size_t kMaxRoutes = 256;
inline constexpr size_t kMaxIssuers = 64;
inline constexpr size_t kMaxRatePlans = 256;
inline constexpr size_t kMaxUpstreams = 256;
inline constexpr size_t kMaxJwksBytes = 1u << 20;  // one issuer's JWKS file
// All JWKS texts together: they travel in every snapshot, which must fit a protocol frame.
inline constexpr size_t kMaxJwksTotalBytes = 1u << 20;
inline constexpr int64_t kMaxLeewaySeconds = 300;  // clock skew tolerated on exp/nbf/iat
inline constexpr size_t kMaxDiagnostics = 100;     // parse_bundle stops reporting after this many
// Throttling ranges, enforced by parse_bundle() and the snapshot decoder alike.
inline constexpr int64_t kMaxBurst = 1'000'000;
inline constexpr uint32_t kMaxConcurrency = 100'000;
inline constexpr uint32_t kMaxUpstreamCapacity = 1'000'000;

enum class TrafficClass : uint8_t { Interactive, Batch };
enum class LaunchContext : uint8_t { User, Patient, System };

// How a client may prove who it is; a request must succeed with one of its client's methods.
// Declaration order is the canonical order of Client::auth.
enum class AuthMethod : uint8_t {
    Bearer,     // "bearer": a JWT access token from one of the trusted issuers
    Mtls,       // "mtls": a TLS client certificate pinned in Client::certificates, no token
    CertBound,  // "cert-bound": a JWT whose cnf."x5t#S256" names the presented, pinned certificate
};

// The YAML and snapshot spelling: "bearer", "mtls", "cert-bound".
std::string_view auth_method_name(AuthMethod method);
std::optional<AuthMethod> auth_method_from_name(std::string_view name);

// An authorization server whose tokens the gateway accepts. The JWKS is read when the bundle is
// loaded and travels in the snapshot, so nginx workers never touch the file system for it.
struct Issuer {
    std::string id;         // the bundle's name for it, referenced by Client::issuers
    std::string issuer;     // the exact `iss` claim value
    std::string audience;   // a value that must appear in the token's `aud`
    std::string jwks_file;  // as written in the bundle, for operators; workers use jwks_json
    std::string jwks_json;  // the JWKS document, validated with jose::KeySet::parse
    std::vector<std::string> algorithms;  // JWA names (jose::algorithm_from_name), sorted
    int64_t leeway_seconds = 60;

    bool operator==(const Issuer &) const = default;
};

// Members added after the first release carry `{}` initializers: code that builds a Client or a
// Route with a braced list of the original fields keeps compiling under
// -Wmissing-field-initializers, and gets the defaults.
struct Client {
    std::string id;
    std::string display_name;
    LaunchContext context = LaunchContext::System;
    TrafficClass traffic_class = TrafficClass::Batch;
    std::vector<std::string> purposes;  // HL7 v3 PurposeOfUse codes the client may assert
    std::vector<AuthMethod> auth{AuthMethod::Bearer};  // sorted, distinct, never empty
    // SMART scopes (smart::parse_scopes syntax): the most any token for this client can grant.
    // Empty: no resource access at all. Canonical form: distinct tokens, sorted, one space apart.
    std::string scope_ceiling{};
    std::vector<std::string> issuers{};  // Issuer ids that may mint its tokens; empty: any issuer
    std::vector<std::string> tenants{};  // tenants whose routes it may use
    // SHA-256 of the DER client certificates it may present: 64 lower-case hex digits each.
    std::vector<std::string> certificates{};
    // RatePlan::name overriding the plan of its traffic class; empty: the class's plan.
    std::string rate_plan{};

    bool operator==(const Client &) const = default;
};

struct Route {
    std::string name;
    std::string prefix;                     // URI prefix, e.g. "/fhir/"; longest match wins
    std::vector<std::string> methods;       // upper-case HTTP methods
    std::vector<std::string> resources;     // FHIR resource types, or "*"
    std::vector<std::string> interactions;  // FHIR interactions (see fhir::Interaction names)
    std::string tenant{};    // when set, only clients listing this tenant may use the route
    std::string upstream{};  // Upstream::name whose capacity the route draws on; empty: none

    bool operator==(const Route &) const = default;
};

// Throttling (docs/throttling.md). A token bucket per client and route, refilled at `rate`, holding
// at most `burst` tokens; optionally a cap on the client's requests in flight.
struct RatePlan {
    std::string name;
    std::string rate;  // as written: "2000/s", "300/m", "1000/h" (ratelimit::parse_rate)
    // Derived from `rate` by parse_bundle() and checked against it by decode_snapshot(): a
    // bundle assembled by hand must set both (ratelimit::parse_rate(rate)).
    int64_t rate_units_per_second = 0;
    int64_t burst = 1;         // 1..kMaxBurst tokens
    uint32_t concurrency = 0;  // in-flight requests per client, 0..kMaxConcurrency; 0: no cap
    bool dry_run = false;      // decide and report, never refuse

    bool operator==(const RatePlan &) const = default;
};

// A system behind the gateway with a bounded number of requests in flight. Batch (and
// unclassified) traffic stops at capacity - interactive_reserve, so clinical traffic always
// finds room.
struct Upstream {
    std::string name;
    uint32_t capacity = 0;             // 1..kMaxUpstreamCapacity
    uint32_t interactive_reserve = 0;  // < capacity

    bool operator==(const Upstream &) const = default;
};

// Which RatePlan applies to which kind of caller. All three are set exactly when the bundle has
// rate plans, and all three name one of them.
struct Throttling {
    std::string interactive_plan;   // clients with TrafficClass::Interactive
    std::string batch_plan;         // clients with TrafficClass::Batch
    std::string unclassified_plan;  // requests with no identified client: the least privilege

    bool operator==(const Throttling &) const = default;
};

// Response redaction (docs/redaction.md). Present in the bundle or not: without it the gateway
// still checks responses (JSON only, patient compartment) but withholds no label.
struct Redaction {
    bool present = false;
    redaction::Config engine{};
    // Labels withheld until the consent service supplies the request's obligations.
    std::vector<std::string> withheld_labels{};
    // Media types (lower case, no parameters) released unfiltered on protected routes besides
    // JSON; everything else is refused.
    std::vector<std::string> allowed_content_types{};
    // Client launch contexts ("user", "patient", "system") the default withheld_labels apply to;
    // empty: all. A patient reading their own compartment may be exempted (right of access).
    std::vector<std::string> withheld_contexts{};

    bool operator==(const Redaction &) const = default;
};

struct Bundle {
    std::string schema;
    std::string version;  // operator-chosen label; identifies the content (see reload rules)
    std::string description;
    std::vector<Client> clients;
    std::vector<Route> routes;
    std::vector<Issuer> issuers{};
    // Empty: throttling is off, and `throttling` is empty too.
    std::vector<RatePlan> rate_plans{};
    std::vector<Upstream> upstreams{};
    Throttling throttling{};
    Redaction redaction{};  // redaction
    // Consent (issue 5): defaults per purpose, sensitive labels, break-glass. enabled == false
    // (no `consent:` section): consent is not evaluated.
    consent::ConsentPolicy consent{};

    // Binary search: `clients` must be sorted by id, which parse_bundle(), decode_snapshot() and
    // canonicalize() guarantee. A bundle assembled by hand must call canonicalize() first.
    const Client *find_client(std::string_view id) const;
    // Longest-prefix match over routes; nullptr when no route covers the path.
    const Route *match_route(std::string_view path) const;
    // The issuer with this exact `iss` value (byte comparison, no URL normalization).
    const Issuer *find_issuer_by_iss(std::string_view iss) const;
    // By Issuer::id; binary search, so the same canonical-order rule as find_client applies.
    const Issuer *find_issuer(std::string_view id) const;
    // The client that pinned this certificate fingerprint: 64 hex digits, either case (callers
    // hash the DER certificate themselves). A fingerprint belongs to at most one client. Linear
    // in the number of pinned certificates; callers on a hot path should remember the answer
    // per TLS connection.
    const Client *find_client_by_certificate(std::string_view sha256_hex) const;
    // By name; binary search, so the same canonical-order rule as find_client applies.
    const RatePlan *find_rate_plan(std::string_view name) const;
    const Upstream *find_upstream(std::string_view name) const;
    // The plan a request is held to: client == nullptr (unidentified) -> unclassified_plan; the
    // client's rate_plan if set; else the plan of its traffic class. nullptr when throttling is
    // off (no rate_plans), and also when the name it picks is not defined, which parse_bundle()
    // and decode_snapshot() rule out: callers with throttling on must treat nullptr as a refusal,
    // never as "unlimited".
    const RatePlan *plan_for(const Client *client) const;

    // Puts the bundle in canonical order: issuers and clients by id, routes by prefix, rate plans
    // and upstreams by name, every list of names sorted, each scope_ceiling's tokens sorted and
    // de-duplicated. Order carries no meaning in a bundle, so this changes no decision; it makes
    // the encoding, and so the digest, depend on content alone.
    void canonicalize();

    bool operator==(const Bundle &) const = default;
};

struct Diagnostic {
    std::string file;
    int line = 0;       // 1-based; 0 when the problem is not tied to a position
    int column = 0;     // 1-based
    std::string field;  // e.g. "routes[2].methods[0]"; empty for syntax errors
    std::string message;

    // "conf/policy.yaml:12:5: routes[2].methods[0]: unknown HTTP method \"GETT\""
    std::string to_string() const;
};

struct ParseResult {
    std::optional<Bundle> bundle;         // set only when diagnostics is empty
    std::vector<Diagnostic> diagnostics;  // every problem found, in file order
};

// Parses and validates YAML text. `file_name` appears in diagnostics, and its directory is where
// relative `jwks_file` paths are resolved (the current directory when it has none): the files
// are read and validated here, and their text is stored in Issuer::jwks_json. Never throws;
// the bundle comes back in canonical order (see Bundle::canonicalize).
ParseResult parse_bundle(std::string_view yaml_text, std::string_view file_name);

// Reads the file (no size above 4 MiB) and parses it; an unreadable file is one diagnostic.
ParseResult load_bundle_file(const std::string &path);

// A certificate fingerprint as the bundle accepts it (64 hex digits, any case, colons anywhere)
// in its stored form: lower-case hex without colons. nullopt when it is not one.
std::optional<std::string> normalize_certificate_fingerprint(std::string_view text);

// A bundle compiled for distribution: policyd assigns a serial that increases with every
// successful (re)load and a SHA-256 digest of the canonical encoding.
struct Snapshot {
    uint64_t serial = 0;
    std::string digest_hex;
    Bundle bundle;
    // The JWKS of policyd's consent-signing key (docs/consent.md), which workers publish with
    // `ehrgate_consent_jwks;`. policyd's own, not part of the bundle nor of its digest.
    std::string consent_jwks{};

    bool operator==(const Snapshot &) const = default;
};

// Canonical msgpack encoding of a snapshot (the PolicySnapshot message body) and back. The
// encoder writes the bundle in canonical order whatever order it is in. The decoder accepts
// only well-typed maps and skips keys it does not know; its bundle is in canonical order.
std::string encode_snapshot(const Snapshot &snapshot);
std::optional<Snapshot> decode_snapshot(std::string_view body);

// SHA-256 over the canonical encoding of the bundle alone (serial excluded), lower-case hex.
std::string bundle_digest(const Bundle &bundle);

// The decision policyd answers for one request, from one snapshot. Pure function: everything it
// needs is in its arguments.
protocol::DecideReply evaluate(const Snapshot &snapshot, const protocol::DecideRequest &request);

}  // namespace ehrgate::policy
