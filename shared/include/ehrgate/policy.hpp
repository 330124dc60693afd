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

#include "ehrgate/protocol.hpp"

namespace ehrgate::policy {

inline constexpr std::string_view kSchemaV1 = "ehrgate.policy/v1";

// Limits enforced by parse_bundle() (and the snapshot decoder, for the list lengths). They bound
// the memory and time a hostile or broken bundle can cost; real bundles stay far below them.
inline constexpr size_t kMaxBundleBytes = 4u << 20;
inline constexpr size_t kMaxClients = 10000;
inline constexpr size_t kMaxRoutes = 256;
inline constexpr size_t kMaxDiagnostics = 100;  // parse_bundle stops reporting after this many

enum class TrafficClass : uint8_t { Interactive, Batch };
enum class LaunchContext : uint8_t { User, Patient, System };

struct Client {
    std::string id;
    std::string display_name;
    LaunchContext context = LaunchContext::System;
    TrafficClass traffic_class = TrafficClass::Batch;
    std::vector<std::string> purposes;  // HL7 v3 PurposeOfUse codes the client may assert

    bool operator==(const Client &) const = default;
};

struct Route {
    std::string name;
    std::string prefix;                     // URI prefix, e.g. "/fhir/"; longest match wins
    std::vector<std::string> methods;       // upper-case HTTP methods
    std::vector<std::string> resources;     // FHIR resource types, or "*"
    std::vector<std::string> interactions;  // FHIR interactions (see fhir::Interaction names)

    bool operator==(const Route &) const = default;
};

struct Bundle {
    std::string schema;
    std::string version;  // operator-chosen label; identifies the content (see reload rules)
    std::string description;
    std::vector<Client> clients;
    std::vector<Route> routes;

    // Binary search: `clients` must be sorted by id, which parse_bundle(), decode_snapshot() and
    // canonicalize() guarantee. A bundle assembled by hand must call canonicalize() first.
    const Client *find_client(std::string_view id) const;
    // Longest-prefix match over routes; nullptr when no route covers the path.
    const Route *match_route(std::string_view path) const;

    // Puts the bundle in canonical order: clients by id, routes by prefix, every list of names
    // sorted. Order carries no meaning in a bundle, so this changes no decision; it makes the
    // encoding, and so the digest, depend on content alone.
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

// Parses and validates YAML text. `file_name` is used only in diagnostics. Never throws; the
// bundle comes back in canonical order (see Bundle::canonicalize).
ParseResult parse_bundle(std::string_view yaml_text, std::string_view file_name);

// Reads the file (no size above 4 MiB) and parses it; an unreadable file is one diagnostic.
ParseResult load_bundle_file(const std::string &path);

// A bundle compiled for distribution: policyd assigns a serial that increases with every
// successful (re)load and a SHA-256 digest of the canonical encoding.
struct Snapshot {
    uint64_t serial = 0;
    std::string digest_hex;
    Bundle bundle;

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
