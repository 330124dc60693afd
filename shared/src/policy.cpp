// The policy model, its snapshot encoding and the decision function. YAML parsing lives in
// policy_parse.cpp so that this file, linked into the nginx module, needs no yaml-cpp.
#include "ehrgate/policy.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <array>

#include "ehrgate/fhir_request.hpp"
#include "ehrgate/msgpack.hpp"

namespace ehrgate::policy {

namespace {

using msgpack::Reader;
using msgpack::Writer;

// ---- Canonical encoding ----------------------------------------------------------------------

std::string_view context_name(LaunchContext context) {
    switch (context) {
        case LaunchContext::User:
            return "user";
        case LaunchContext::Patient:
            return "patient";
        case LaunchContext::System:
            return "system";
    }
    return "";
}

std::optional<LaunchContext> context_from_name(std::string_view name) {
    if (name == "user")
        return LaunchContext::User;
    if (name == "patient")
        return LaunchContext::Patient;
    if (name == "system")
        return LaunchContext::System;
    return std::nullopt;
}

std::string_view traffic_class_name(TrafficClass traffic_class) {
    switch (traffic_class) {
        case TrafficClass::Interactive:
            return "interactive";
        case TrafficClass::Batch:
            return "batch";
    }
    return "";
}

std::optional<TrafficClass> traffic_class_from_name(std::string_view name) {
    if (name == "interactive")
        return TrafficClass::Interactive;
    if (name == "batch")
        return TrafficClass::Batch;
    return std::nullopt;
}

void put_str(Writer &w, std::string_view key, std::string_view value) {
    w.key(key);
    w.str(value);
}

void put_list(Writer &w, std::string_view key, const std::vector<std::string> &values) {
    w.key(key);
    w.array(static_cast<uint32_t>(values.size()));
    for (const std::string &value : values) {
        w.str(value);
    }
}

// Writes `bundle` as it is; callers pass a canonicalized copy.
void encode_bundle(Writer &w, const Bundle &bundle) {
    w.map(5);
    put_str(w, "schema", bundle.schema);
    put_str(w, "version", bundle.version);
    put_str(w, "description", bundle.description);
    w.key("clients");
    w.array(static_cast<uint32_t>(bundle.clients.size()));
    for (const Client &client : bundle.clients) {
        w.map(5);
        put_str(w, "id", client.id);
        put_str(w, "display_name", client.display_name);
        put_str(w, "context", context_name(client.context));
        put_str(w, "traffic_class", traffic_class_name(client.traffic_class));
        put_list(w, "purposes", client.purposes);
    }
    w.key("routes");
    w.array(static_cast<uint32_t>(bundle.routes.size()));
    for (const Route &route : bundle.routes) {
        w.map(5);
        put_str(w, "name", route.name);
        put_str(w, "prefix", route.prefix);
        put_list(w, "methods", route.methods);
        put_list(w, "resources", route.resources);
        put_list(w, "interactions", route.interactions);
    }
}

std::string encode_canonical_bundle(const Bundle &bundle) {
    Bundle canonical = bundle;
    canonical.canonicalize();
    std::string out;
    Writer w(out);
    encode_bundle(w, canonical);
    return out;
}

// ---- Strict decoding -------------------------------------------------------------------------
//
// Every reader below returns false (and leaves the Reader failed) on a value of the wrong type.
// Keys a reader does not know are skipped, so a newer policyd can add fields; a known key given
// twice is refused, since which of the two counts would be a guess.

// Upper bounds for lists inside a route or client. Generous: the parser enforces the real limits;
// these only stop a corrupt body from growing a list without bound.
constexpr uint32_t kMaxNames = 1024;

// Reads a map, calling on_field(index, reader) for each key listed in `keys` and skipping the
// rest. `required` is a bit mask over `keys` of the fields that must be present.
template <size_t N, typename OnField>
bool read_fields(Reader &r, const std::array<std::string_view, N> &keys, uint32_t required,
                 OnField &&on_field) {
    static_assert(N <= 32);
    const std::optional<uint32_t> count = r.read_map();
    if (!count) {
        return false;
    }
    uint32_t seen = 0;
    for (uint32_t i = 0; i < *count; ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return false;
        }
        const auto known = std::find(keys.begin(), keys.end(), *key);
        if (known == keys.end()) {
            if (!r.skip()) {
                return false;
            }
            continue;
        }
        const uint32_t bit = uint32_t{1} << (known - keys.begin());
        if ((seen & bit) != 0 || !on_field(static_cast<size_t>(known - keys.begin())) || !r.ok()) {
            r.fail();
            return false;
        }
        seen |= bit;
    }
    if ((seen & required) != required) {
        r.fail();
        return false;
    }
    return r.ok();
}

bool read_string(Reader &r, std::string &out) {
    const std::optional<std::string_view> value = r.read_str();
    if (!value) {
        return false;
    }
    out.assign(*value);
    return true;
}

bool read_string_list(Reader &r, std::vector<std::string> &out, uint32_t max) {
    const std::optional<uint32_t> count = r.read_array();
    if (!count || *count > max) {
        r.fail();
        return false;
    }
    // No reserve(count): the count is untrusted until the elements are actually there.
    for (uint32_t i = 0; i < *count; ++i) {
        const std::optional<std::string_view> value = r.read_str();
        if (!value) {
            return false;
        }
        out.emplace_back(*value);
    }
    return true;
}

bool read_client(Reader &r, Client &client) {
    static constexpr std::array<std::string_view, 5> kKeys = {"id", "display_name", "context",
                                                              "traffic_class", "purposes"};
    return read_fields(r, kKeys, 0b01101, [&](size_t field) {
        std::string name;
        switch (field) {
            case 0:
                return read_string(r, client.id);
            case 1:
                return read_string(r, client.display_name);
            case 2: {
                const std::optional<LaunchContext> context =
                    read_string(r, name) ? context_from_name(name) : std::nullopt;
                client.context = context.value_or(client.context);
                return context.has_value();
            }
            case 3: {
                const std::optional<TrafficClass> traffic_class =
                    read_string(r, name) ? traffic_class_from_name(name) : std::nullopt;
                client.traffic_class = traffic_class.value_or(client.traffic_class);
                return traffic_class.has_value();
            }
            default:
                return read_string_list(r, client.purposes, kMaxNames);
        }
    });
}

bool read_route(Reader &r, Route &route) {
    static constexpr std::array<std::string_view, 5> kKeys = {"name", "prefix", "methods",
                                                              "resources", "interactions"};
    return read_fields(r, kKeys, 0b11111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, route.name);
            case 1:
                return read_string(r, route.prefix);
            case 2:
                return read_string_list(r, route.methods, kMaxNames);
            case 3:
                return read_string_list(r, route.resources, kMaxNames);
            default:
                return read_string_list(r, route.interactions, kMaxNames);
        }
    });
}

template <typename T, typename ReadOne>
bool read_object_list(Reader &r, std::vector<T> &out, size_t max, ReadOne &&read_one) {
    const std::optional<uint32_t> count = r.read_array();
    if (!count || *count > max) {
        r.fail();
        return false;
    }
    for (uint32_t i = 0; i < *count; ++i) {
        if (!read_one(r, out.emplace_back())) {
            return false;
        }
    }
    return true;
}

bool read_bundle(Reader &r, Bundle &bundle) {
    static constexpr std::array<std::string_view, 5> kKeys = {"schema", "version", "description",
                                                              "clients", "routes"};
    return read_fields(r, kKeys, 0b11011, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, bundle.schema);
            case 1:
                return read_string(r, bundle.version);
            case 2:
                return read_string(r, bundle.description);
            case 3:
                return read_object_list(r, bundle.clients, kMaxClients, read_client);
            default:
                return read_object_list(r, bundle.routes, kMaxRoutes, read_route);
        }
    });
}

// ---- Evaluation helpers ----------------------------------------------------------------------

bool contains(const std::vector<std::string> &values, std::string_view value) {
    for (const std::string &v : values) {
        if (v == value) {
            return true;
        }
    }
    return false;
}

bool allows(const std::vector<std::string> &values, std::string_view value) {
    for (const std::string &v : values) {
        if (v == value || v == "*") {
            return true;
        }
    }
    return false;
}

protocol::DecideReply &deny(protocol::DecideReply &reply, uint16_t status, const char *reason,
                            const char *message) {
    reply.decision = protocol::Decision::Deny;
    reply.http_status = status;
    reply.reason = reason;
    reply.message = message;
    return reply;
}

}  // namespace

std::string Diagnostic::to_string() const {
    std::string out = file;
    if (!out.empty()) {
        out += ':';
    }
    if (line > 0) {
        out += std::to_string(line);
        out += ':';
        if (column > 0) {
            out += std::to_string(column);
            out += ':';
        }
    }
    if (!out.empty()) {
        out += ' ';
    }
    if (!field.empty()) {
        out += field;
        out += ": ";
    }
    out += message;
    return out;
}

const Client *Bundle::find_client(std::string_view id) const {
    const auto it = std::lower_bound(
        clients.begin(), clients.end(), id,
        [](const Client &client, std::string_view wanted) { return client.id < wanted; });
    return it != clients.end() && it->id == id ? &*it : nullptr;
}

const Route *Bundle::match_route(std::string_view path) const {
    const Route *best = nullptr;
    for (const Route &route : routes) {
        if (path.starts_with(route.prefix) &&
            (best == nullptr || route.prefix.size() > best->prefix.size())) {
            best = &route;
        }
    }
    return best;
}

void Bundle::canonicalize() {
    std::stable_sort(clients.begin(), clients.end(),
                     [](const Client &a, const Client &b) { return a.id < b.id; });
    for (Client &client : clients) {
        std::sort(client.purposes.begin(), client.purposes.end());
    }
    std::stable_sort(routes.begin(), routes.end(), [](const Route &a, const Route &b) {
        return a.prefix != b.prefix ? a.prefix < b.prefix : a.name < b.name;
    });
    for (Route &route : routes) {
        std::sort(route.methods.begin(), route.methods.end());
        std::sort(route.resources.begin(), route.resources.end());
        std::sort(route.interactions.begin(), route.interactions.end());
    }
}

std::string encode_snapshot(const Snapshot &snapshot) {
    Bundle canonical = snapshot.bundle;
    canonical.canonicalize();
    std::string out;
    Writer w(out);
    w.map(3);
    w.key("serial");
    w.uint(snapshot.serial);
    put_str(w, "digest", snapshot.digest_hex);
    w.key("bundle");
    encode_bundle(w, canonical);
    return out;
}

std::optional<Snapshot> decode_snapshot(std::string_view body) {
    static constexpr std::array<std::string_view, 3> kKeys = {"serial", "digest", "bundle"};
    Snapshot snapshot;
    Reader r(body);
    const bool ok = read_fields(r, kKeys, 0b111, [&](size_t field) {
        switch (field) {
            case 0: {
                const std::optional<uint64_t> serial = r.read_uint();
                snapshot.serial = serial.value_or(0);
                return serial.has_value();
            }
            case 1:
                return read_string(r, snapshot.digest_hex);
            default:
                return read_bundle(r, snapshot.bundle);
        }
    });
    if (!ok || !r.at_end()) {
        return std::nullopt;
    }
    snapshot.bundle.canonicalize();
    // find_client() bisects: two clients with one id would make the answer depend on the sort.
    const auto duplicate =
        std::adjacent_find(snapshot.bundle.clients.begin(), snapshot.bundle.clients.end(),
                           [](const Client &a, const Client &b) { return a.id == b.id; });
    if (duplicate != snapshot.bundle.clients.end()) {
        return std::nullopt;
    }
    return snapshot;
}

std::string bundle_digest(const Bundle &bundle) {
    const std::string encoded = encode_canonical_bundle(bundle);
    std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
    unsigned int md_len = 0;
    if (EVP_Digest(encoded.data(), encoded.size(), md.data(), &md_len, EVP_sha256(), nullptr) !=
        1) {
        // Only a broken OpenSSL installation gets here; an empty digest never matches a real one.
        return {};
    }
    static constexpr char kHex[] = "0123456789abcdef";
    std::string hex;
    hex.reserve(md_len * 2);
    for (unsigned int i = 0; i < md_len; ++i) {
        hex.push_back(kHex[md[i] >> 4]);
        hex.push_back(kHex[md[i] & 0x0f]);
    }
    return hex;
}

protocol::DecideReply evaluate(const Snapshot &snapshot, const protocol::DecideRequest &request) {
    // Messages are fixed strings on purpose: the path and query name patients and resources, and
    // a reply may end up in front of the caller or in logs.
    protocol::DecideReply reply;
    reply.policy_version = snapshot.bundle.version;
    reply.policy_serial = snapshot.serial;

    const Route *route = snapshot.bundle.match_route(request.path);
    if (route == nullptr) {
        return deny(reply, 404, "no-route", "No gateway route serves this path");
    }
    reply.route = route->name;

    if (!contains(route->methods, request.method)) {
        return deny(reply, 405, "method-not-allowed", "This route does not accept the HTTP method");
    }

    const std::string_view relative = std::string_view(request.path).substr(route->prefix.size());
    const std::optional<fhir::RequestTargetView> target =
        fhir::classify_view(request.method, relative, request.query);
    if (!target) {
        return deny(reply, 400, "unrecognized-fhir-request",
                    "The request is not a FHIR RESTful interaction the gateway recognizes");
    }
    const std::string_view interaction = fhir::interaction_name(target->interaction);
    reply.resource_type = target->resource_type;
    reply.interaction = interaction;

    // System-level interactions name no resource type; the interaction list alone governs them.
    if (!target->resource_type.empty() && !allows(route->resources, target->resource_type)) {
        return deny(reply, 403, "resource-type-not-permitted",
                    "The gateway policy does not permit access to this resource type");
    }
    if (!allows(route->interactions, interaction)) {
        return deny(reply, 403, "interaction-not-permitted",
                    "The gateway policy does not permit this FHIR interaction");
    }
    if (!request.client_id.empty() && snapshot.bundle.find_client(request.client_id) == nullptr) {
        return deny(reply, 403, "unknown-client", "The client is not registered with the gateway");
    }

    reply.decision = protocol::Decision::Permit;
    reply.http_status = 200;
    reply.reason = "permitted";
    reply.message = "Permitted by the gateway policy";
    return reply;
}

}  // namespace ehrgate::policy
