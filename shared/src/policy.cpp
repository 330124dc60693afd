// The policy model, its snapshot encoding and the decision function. YAML parsing lives in
// policy_parse.cpp so that this file, linked into the nginx module, needs no yaml-cpp.
#include "ehrgate/policy.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <array>

#include "ehrgate/fhir_request.hpp"
#include "ehrgate/msgpack.hpp"
#include "ehrgate/rate_limit.hpp"

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

char lower_hex(char c) {
    return c >= 'A' && c <= 'F' ? static_cast<char>(c - 'A' + 'a') : c;
}

bool is_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// "b a  c a" -> "a b c": a scope string is a set of space-separated tokens.
std::string canonical_scopes(std::string_view scopes) {
    std::vector<std::string_view> tokens;
    size_t start = 0;
    while (start <= scopes.size()) {
        const size_t space = std::min(scopes.find(' ', start), scopes.size());
        if (space > start) {
            tokens.push_back(scopes.substr(start, space - start));
        }
        start = space + 1;
    }
    std::sort(tokens.begin(), tokens.end());
    tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
    std::string out;
    for (const std::string_view token : tokens) {
        if (!out.empty()) {
            out += ' ';
        }
        out += token;
    }
    return out;
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

bool throttling_set(const Throttling &throttling) {
    return !throttling.interactive_plan.empty() || !throttling.batch_plan.empty() ||
           !throttling.unclassified_plan.empty();
}

// Writes `bundle` as it is; callers pass a canonicalized copy. Every key is always written,
// except the throttling ones, which are written only when set: a bundle without throttling keeps
// the encoding, and so the digest, it had before throttling existed (policyd ties each version
// label to one digest forever, so an upgrade must not change the digest of unchanged content).
// Either way the encoding of a given content is unique.
void encode_bundle(Writer &w, const Bundle &bundle) {
    const bool throttling = throttling_set(bundle.throttling);
    w.map(6 + (bundle.rate_plans.empty() ? 0 : 1) + (bundle.upstreams.empty() ? 0 : 1) +
          (throttling ? 1 : 0) + (bundle.redaction.present ? 1 : 0) +
          (bundle.consent.enabled ? 1 : 0));
    put_str(w, "schema", bundle.schema);
    put_str(w, "version", bundle.version);
    put_str(w, "description", bundle.description);
    w.key("issuers");
    w.array(static_cast<uint32_t>(bundle.issuers.size()));
    for (const Issuer &issuer : bundle.issuers) {
        w.map(7);
        put_str(w, "id", issuer.id);
        put_str(w, "issuer", issuer.issuer);
        put_str(w, "audience", issuer.audience);
        put_str(w, "jwks_file", issuer.jwks_file);
        put_str(w, "jwks_json", issuer.jwks_json);
        put_list(w, "algorithms", issuer.algorithms);
        w.key("leeway_seconds");
        w.uint(static_cast<uint64_t>(std::max<int64_t>(issuer.leeway_seconds, 0)));
    }
    w.key("clients");
    w.array(static_cast<uint32_t>(bundle.clients.size()));
    for (const Client &client : bundle.clients) {
        w.map(client.rate_plan.empty() ? 10 : 11);
        put_str(w, "id", client.id);
        put_str(w, "display_name", client.display_name);
        put_str(w, "context", context_name(client.context));
        put_str(w, "traffic_class", traffic_class_name(client.traffic_class));
        put_list(w, "purposes", client.purposes);
        w.key("auth");
        w.array(static_cast<uint32_t>(client.auth.size()));
        for (const AuthMethod method : client.auth) {
            w.str(auth_method_name(method));
        }
        put_str(w, "scope_ceiling", client.scope_ceiling);
        put_list(w, "issuers", client.issuers);
        put_list(w, "tenants", client.tenants);
        put_list(w, "certificates", client.certificates);
        if (!client.rate_plan.empty()) {
            put_str(w, "rate_plan", client.rate_plan);
        }
    }
    w.key("routes");
    w.array(static_cast<uint32_t>(bundle.routes.size()));
    for (const Route &route : bundle.routes) {
        w.map(route.upstream.empty() ? 6 : 7);
        put_str(w, "name", route.name);
        put_str(w, "prefix", route.prefix);
        put_list(w, "methods", route.methods);
        put_list(w, "resources", route.resources);
        put_list(w, "interactions", route.interactions);
        put_str(w, "tenant", route.tenant);
        if (!route.upstream.empty()) {
            put_str(w, "upstream", route.upstream);
        }
    }
    if (!bundle.rate_plans.empty()) {
        w.key("rate_plans");
        w.array(static_cast<uint32_t>(bundle.rate_plans.size()));
        for (const RatePlan &plan : bundle.rate_plans) {
            w.map(6);
            put_str(w, "name", plan.name);
            put_str(w, "rate", plan.rate);
            // A negative value (only a hand-built bundle has one) goes out as 0: refused too.
            w.key("rate_units_per_second");
            w.uint(static_cast<uint64_t>(std::max<int64_t>(plan.rate_units_per_second, 0)));
            w.key("burst");
            w.uint(static_cast<uint64_t>(std::max<int64_t>(plan.burst, 0)));
            w.key("concurrency");
            w.uint(plan.concurrency);
            w.key("dry_run");
            w.boolean(plan.dry_run);
        }
    }
    if (!bundle.upstreams.empty()) {
        w.key("upstreams");
        w.array(static_cast<uint32_t>(bundle.upstreams.size()));
        for (const Upstream &upstream : bundle.upstreams) {
            w.map(3);
            put_str(w, "name", upstream.name);
            w.key("capacity");
            w.uint(upstream.capacity);
            w.key("interactive_reserve");
            w.uint(upstream.interactive_reserve);
        }
    }
    if (throttling) {
        w.key("throttling");
        w.map(3);
        put_str(w, "interactive_plan", bundle.throttling.interactive_plan);
        put_str(w, "batch_plan", bundle.throttling.batch_plan);
        put_str(w, "unclassified_plan", bundle.throttling.unclassified_plan);
    }
    if (bundle.redaction.present) {  // redaction: written only when set, like throttling
        const Redaction &redaction = bundle.redaction;
        w.key("redaction");
        w.map(6);
        w.key("max_held_bytes");
        w.uint(redaction.engine.max_held_bytes);
        put_list(w, "withheld_labels", redaction.withheld_labels);
        put_list(w, "allowed_content_types", redaction.allowed_content_types);
        put_list(w, "withheld_contexts", redaction.withheld_contexts);
        w.key("inference");
        w.array(static_cast<uint32_t>(redaction.engine.inference.size()));
        for (const redaction::InferenceRule &rule : redaction.engine.inference) {
            w.map(4);
            put_str(w, "system", rule.system);
            put_str(w, "code", rule.code);
            w.key("prefix");
            w.boolean(rule.prefix);
            put_str(w, "label", rule.label);
        }
        w.key("masks");
        w.array(static_cast<uint32_t>(redaction.engine.masks.size()));
        for (const redaction::FieldMask &mask : redaction.engine.masks) {
            w.map(3);
            put_str(w, "resource", mask.resource_type);
            put_str(w, "path", mask.path);
            put_str(w, "identifier_system", mask.identifier_system);
        }
    }
    // Consent (issue 5): written only when the bundle has the section, as throttling is.
    if (bundle.consent.enabled) {
        w.key("consent");
        consent::encode_policy(w, bundle.consent);
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

using msgpack::read_fields;

bool read_string(Reader &r, std::string &out) {
    const std::optional<std::string_view> value = r.read_str();
    if (!value) {
        return false;
    }
    out.assign(*value);
    return true;
}

using msgpack::read_string_list;

// A list of distinct auth method names. Empty is refused: such a client could never
// authenticate, and the parser never produces one.
bool read_auth(Reader &r, std::vector<AuthMethod> &out) {
    std::vector<std::string> names;
    if (!read_string_list(r, names, kMaxNames) || names.empty()) {
        return false;
    }
    out.clear();
    for (const std::string &name : names) {
        const std::optional<AuthMethod> method = auth_method_from_name(name);
        if (!method || std::find(out.begin(), out.end(), *method) != out.end()) {
            return false;
        }
        out.push_back(*method);
    }
    return true;
}

bool read_issuer(Reader &r, Issuer &issuer) {
    static constexpr std::array<std::string_view, 7> kKeys = {
        "id", "issuer", "audience", "jwks_file", "jwks_json", "algorithms", "leeway_seconds"};
    return read_fields(r, kKeys, 0b0110111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, issuer.id);
            case 1:
                return read_string(r, issuer.issuer);
            case 2:
                return read_string(r, issuer.audience);
            case 3:
                return read_string(r, issuer.jwks_file);
            case 4:
                return read_string(r, issuer.jwks_json);
            case 5:
                return read_string_list(r, issuer.algorithms, kMaxNames);
            default: {
                // Bounded like the parser bounds it: a corrupt leeway would accept expired tokens.
                const std::optional<uint64_t> leeway = r.read_uint();
                if (!leeway || *leeway > static_cast<uint64_t>(kMaxLeewaySeconds)) {
                    return false;
                }
                issuer.leeway_seconds = static_cast<int64_t>(*leeway);
                return true;
            }
        }
    });
}

bool read_client(Reader &r, Client &client) {
    static constexpr std::array<std::string_view, 11> kKeys = {
        "id",       "display_name", "context",       "traffic_class",
        "purposes", "auth",         "scope_ceiling", "issuers",
        "tenants",  "certificates", "rate_plan"};
    return read_fields(r, kKeys, 0b00000001101, [&](size_t field) {
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
            case 4:
                return read_string_list(r, client.purposes, kMaxNames);
            case 5:
                return read_auth(r, client.auth);
            case 6:
                return read_string(r, client.scope_ceiling);
            case 7:
                return read_string_list(r, client.issuers, kMaxNames);
            case 8:
                return read_string_list(r, client.tenants, kMaxNames);
            case 9:
                return read_string_list(r, client.certificates, kMaxNames);
            default:
                return read_string(r, client.rate_plan);
        }
    });
}

bool read_route(Reader &r, Route &route) {
    static constexpr std::array<std::string_view, 7> kKeys = {
        "name", "prefix", "methods", "resources", "interactions", "tenant", "upstream"};
    return read_fields(r, kKeys, 0b0011111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, route.name);
            case 1:
                return read_string(r, route.prefix);
            case 2:
                return read_string_list(r, route.methods, kMaxNames);
            case 3:
                return read_string_list(r, route.resources, kMaxNames);
            case 4:
                return read_string_list(r, route.interactions, kMaxNames);
            case 5:
                return read_string(r, route.tenant);
            default:
                return read_string(r, route.upstream);
        }
    });
}

// An unsigned integer no larger than `max`.
template <typename T>
bool read_bounded(Reader &r, T &out, uint64_t max) {
    const std::optional<uint64_t> value = r.read_uint();
    if (!value || *value > max) {
        return false;
    }
    out = static_cast<T>(*value);
    return true;
}

// Ranges as the parser enforces them, and a rate_units_per_second that is what `rate` means: a
// worker throttles by the number, an operator reads the text, and they must not disagree.
bool read_rate_plan(Reader &r, RatePlan &plan) {
    static constexpr std::array<std::string_view, 6> kKeys = {
        "name", "rate", "rate_units_per_second", "burst", "concurrency", "dry_run"};
    const bool ok = read_fields(r, kKeys, 0b001111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, plan.name) && !plan.name.empty();
            case 1:
                return read_string(r, plan.rate);
            case 2:
                return read_bounded(r, plan.rate_units_per_second, INT64_MAX);
            case 3:
                return read_bounded(r, plan.burst, static_cast<uint64_t>(kMaxBurst)) &&
                       plan.burst >= 1;
            case 4:
                return read_bounded(r, plan.concurrency, kMaxConcurrency);
            default: {
                const std::optional<bool> dry_run = r.read_bool();
                plan.dry_run = dry_run.value_or(false);
                return dry_run.has_value();
            }
        }
    });
    if (!ok || ratelimit::parse_rate(plan.rate) != plan.rate_units_per_second) {
        r.fail();
        return false;
    }
    return true;
}

bool read_upstream(Reader &r, Upstream &upstream) {
    static constexpr std::array<std::string_view, 3> kKeys = {"name", "capacity",
                                                              "interactive_reserve"};
    const bool ok = read_fields(r, kKeys, 0b011, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, upstream.name) && !upstream.name.empty();
            case 1:
                return read_bounded(r, upstream.capacity, kMaxUpstreamCapacity) &&
                       upstream.capacity >= 1;
            default:
                return read_bounded(r, upstream.interactive_reserve, kMaxUpstreamCapacity);
        }
    });
    if (!ok || upstream.interactive_reserve >= upstream.capacity) {
        r.fail();
        return false;
    }
    return true;
}

bool read_throttling(Reader &r, Throttling &throttling) {
    static constexpr std::array<std::string_view, 3> kKeys = {"interactive_plan", "batch_plan",
                                                              "unclassified_plan"};
    return read_fields(r, kKeys, 0b111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, throttling.interactive_plan);
            case 1:
                return read_string(r, throttling.batch_plan);
            default:
                return read_string(r, throttling.unclassified_plan);
        }
    });
}

template <typename T, typename ReadOne>
bool read_object_list(Reader &r, std::vector<T> &out, size_t max, ReadOne &&read_one);

// redaction
bool read_redaction(Reader &r, Redaction &redaction) {
    static constexpr std::array<std::string_view, 6> kKeys = {
        "max_held_bytes", "withheld_labels", "allowed_content_types",
        "inference",      "masks",           "withheld_contexts"};
    redaction.present = true;
    return read_fields(r, kKeys, 0b111111, [&](size_t field) {
        switch (field) {
            case 0:
                return read_bounded(r, redaction.engine.max_held_bytes,
                                    redaction::kMaxHeldBytesLimit) &&
                       redaction.engine.max_held_bytes >= redaction::kMinHeldBytes;
            case 1:
                return read_string_list(r, redaction.withheld_labels, kMaxNames);
            case 2:
                return read_string_list(r, redaction.allowed_content_types, kMaxNames);
            case 5:
                return read_string_list(r, redaction.withheld_contexts, 3);
            case 3:
                return read_object_list(
                    r, redaction.engine.inference, kMaxNames,
                    [](Reader &rr, redaction::InferenceRule &rule) {
                        static constexpr std::array<std::string_view, 4> kRuleKeys = {
                            "system", "code", "prefix", "label"};
                        return read_fields(rr, kRuleKeys, 0b1111, [&](size_t f) {
                            if (f == 2) {
                                const std::optional<bool> prefix = rr.read_bool();
                                rule.prefix = prefix.value_or(false);
                                return prefix.has_value();
                            }
                            return read_string(rr, f == 0   ? rule.system
                                                   : f == 1 ? rule.code
                                                            : rule.label);
                        });
                    });
            case 4:
                return read_object_list(
                    r, redaction.engine.masks, kMaxNames,
                    [](Reader &rr, redaction::FieldMask &mask) {
                        static constexpr std::array<std::string_view, 3> kMaskKeys = {
                            "resource", "path", "identifier_system"};
                        return read_fields(rr, kMaskKeys, 0b111, [&](size_t f) {
                            return read_string(rr, f == 0   ? mask.resource_type
                                                   : f == 1 ? mask.path
                                                            : mask.identifier_system);
                        });
                    });
        }
        return false;
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
    static constexpr std::array<std::string_view, 11> kKeys = {
        "schema",     "version",   "description", "clients",   "routes", "issuers",
        "rate_plans", "upstreams", "throttling",  "redaction", "consent"};
    return read_fields(r, kKeys, 0b000011011, [&](size_t field) {
        switch (field) {
            case 0:
                return read_string(r, bundle.schema);
            case 1:
                return read_string(r, bundle.version);
            case 2:
                return read_string(r, bundle.description);
            case 3:
                return read_object_list(r, bundle.clients, kMaxClients, read_client);
            case 4:
                return read_object_list(r, bundle.routes, kMaxRoutes, read_route);
            case 5:
                return read_object_list(r, bundle.issuers, kMaxIssuers, read_issuer);
            case 6:
                return read_object_list(r, bundle.rate_plans, kMaxRatePlans, read_rate_plan);
            case 7:
                return read_object_list(r, bundle.upstreams, kMaxUpstreams, read_upstream);
            case 8:
                return read_throttling(r, bundle.throttling);
            case 9:
                return read_redaction(r, bundle.redaction);
            default:  // consent (issue 5)
                return consent::decode_policy(r, bundle.consent);
        }
    });
}

// The lookups (find_client, find_issuer, find_issuer_by_iss, find_client_by_certificate) each
// expect one answer; a snapshot in which one would depend on order or chance is refused.
// `bundle` is canonical.
bool lookups_unambiguous(const Bundle &bundle) {
    const auto same_id = [](const auto &a, const auto &b) { return a.id == b.id; };
    if (std::adjacent_find(bundle.clients.begin(), bundle.clients.end(), same_id) !=
            bundle.clients.end() ||
        std::adjacent_find(bundle.issuers.begin(), bundle.issuers.end(), same_id) !=
            bundle.issuers.end()) {
        return false;
    }
    std::vector<std::string_view> values;
    for (const Issuer &issuer : bundle.issuers) {
        values.push_back(issuer.issuer);
    }
    std::sort(values.begin(), values.end());
    if (std::adjacent_find(values.begin(), values.end()) != values.end()) {
        return false;
    }
    values.clear();
    for (const Client &client : bundle.clients) {
        values.insert(values.end(), client.certificates.begin(), client.certificates.end());
    }
    std::sort(values.begin(), values.end());
    return std::adjacent_find(values.begin(), values.end()) == values.end();
}

// Every throttling name resolves, to exactly one plan or upstream, and throttling is set exactly
// when there are plans: otherwise plan_for() would have no answer for some caller, and a worker
// would have to guess between refusing and not throttling. `bundle` is canonical.
bool throttling_consistent(const Bundle &bundle) {
    const auto same_name = [](const auto &a, const auto &b) { return a.name == b.name; };
    if (std::adjacent_find(bundle.rate_plans.begin(), bundle.rate_plans.end(), same_name) !=
            bundle.rate_plans.end() ||
        std::adjacent_find(bundle.upstreams.begin(), bundle.upstreams.end(), same_name) !=
            bundle.upstreams.end()) {
        return false;
    }
    if (bundle.rate_plans.empty() && throttling_set(bundle.throttling)) {
        return false;
    }
    const auto plan_named = [&](const std::string &name) {
        return bundle.find_rate_plan(name) != nullptr;
    };
    if (!bundle.rate_plans.empty() && !(plan_named(bundle.throttling.interactive_plan) &&
                                        plan_named(bundle.throttling.batch_plan) &&
                                        plan_named(bundle.throttling.unclassified_plan))) {
        return false;
    }
    for (const Client &client : bundle.clients) {
        if (!client.rate_plan.empty() && !plan_named(client.rate_plan)) {
            return false;
        }
    }
    for (const Route &route : bundle.routes) {
        if (!route.upstream.empty() && bundle.find_upstream(route.upstream) == nullptr) {
            return false;
        }
    }
    return true;
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

std::string_view auth_method_name(AuthMethod method) {
    switch (method) {
        case AuthMethod::Bearer:
            return "bearer";
        case AuthMethod::Mtls:
            return "mtls";
        case AuthMethod::CertBound:
            return "cert-bound";
    }
    return "";
}

std::optional<AuthMethod> auth_method_from_name(std::string_view name) {
    if (name == "bearer")
        return AuthMethod::Bearer;
    if (name == "mtls")
        return AuthMethod::Mtls;
    if (name == "cert-bound")
        return AuthMethod::CertBound;
    return std::nullopt;
}

std::optional<std::string> normalize_certificate_fingerprint(std::string_view text) {
    std::string hex;
    hex.reserve(64);
    for (const char c : text) {
        if (c == ':') {
            continue;
        }
        if (!is_hex(c) || hex.size() == 64) {
            return std::nullopt;
        }
        hex.push_back(lower_hex(c));
    }
    if (hex.size() != 64) {
        return std::nullopt;
    }
    return hex;
}

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

const Issuer *Bundle::find_issuer_by_iss(std::string_view iss) const {
    for (const Issuer &issuer : issuers) {
        if (issuer.issuer == iss) {
            return &issuer;
        }
    }
    return nullptr;
}

const Issuer *Bundle::find_issuer(std::string_view id) const {
    const auto it = std::lower_bound(
        issuers.begin(), issuers.end(), id,
        [](const Issuer &issuer, std::string_view wanted) { return issuer.id < wanted; });
    return it != issuers.end() && it->id == id ? &*it : nullptr;
}

const Client *Bundle::find_client_by_certificate(std::string_view sha256_hex) const {
    if (sha256_hex.size() != 64) {
        return nullptr;
    }
    std::array<char, 64> wanted;
    for (size_t i = 0; i < wanted.size(); ++i) {
        wanted[i] = lower_hex(sha256_hex[i]);
    }
    const std::string_view key(wanted.data(), wanted.size());
    for (const Client &client : clients) {
        for (const std::string &certificate : client.certificates) {
            if (certificate == key) {
                return &client;
            }
        }
    }
    return nullptr;
}

const RatePlan *Bundle::find_rate_plan(std::string_view name) const {
    const auto it = std::lower_bound(
        rate_plans.begin(), rate_plans.end(), name,
        [](const RatePlan &plan, std::string_view wanted) { return plan.name < wanted; });
    return it != rate_plans.end() && it->name == name ? &*it : nullptr;
}

const Upstream *Bundle::find_upstream(std::string_view name) const {
    const auto it = std::lower_bound(
        upstreams.begin(), upstreams.end(), name,
        [](const Upstream &upstream, std::string_view wanted) { return upstream.name < wanted; });
    return it != upstreams.end() && it->name == name ? &*it : nullptr;
}

const RatePlan *Bundle::plan_for(const Client *client) const {
    if (rate_plans.empty()) {
        return nullptr;
    }
    if (client == nullptr) {
        return find_rate_plan(throttling.unclassified_plan);
    }
    if (!client->rate_plan.empty()) {
        return find_rate_plan(client->rate_plan);
    }
    return find_rate_plan(client->traffic_class == TrafficClass::Interactive
                              ? throttling.interactive_plan
                              : throttling.batch_plan);
}

void Bundle::canonicalize() {
    std::stable_sort(issuers.begin(), issuers.end(),
                     [](const Issuer &a, const Issuer &b) { return a.id < b.id; });
    for (Issuer &issuer : issuers) {
        std::sort(issuer.algorithms.begin(), issuer.algorithms.end());
    }
    std::stable_sort(clients.begin(), clients.end(),
                     [](const Client &a, const Client &b) { return a.id < b.id; });
    for (Client &client : clients) {
        std::sort(client.purposes.begin(), client.purposes.end());
        std::sort(client.auth.begin(), client.auth.end());
        client.scope_ceiling = canonical_scopes(client.scope_ceiling);
        std::sort(client.issuers.begin(), client.issuers.end());
        std::sort(client.tenants.begin(), client.tenants.end());
        std::sort(client.certificates.begin(), client.certificates.end());
    }
    std::stable_sort(routes.begin(), routes.end(), [](const Route &a, const Route &b) {
        return a.prefix != b.prefix ? a.prefix < b.prefix : a.name < b.name;
    });
    for (Route &route : routes) {
        std::sort(route.methods.begin(), route.methods.end());
        std::sort(route.resources.begin(), route.resources.end());
        std::sort(route.interactions.begin(), route.interactions.end());
    }
    std::stable_sort(rate_plans.begin(), rate_plans.end(),
                     [](const RatePlan &a, const RatePlan &b) { return a.name < b.name; });
    std::stable_sort(upstreams.begin(), upstreams.end(),
                     [](const Upstream &a, const Upstream &b) { return a.name < b.name; });
    std::sort(redaction.withheld_labels.begin(), redaction.withheld_labels.end());
    std::sort(redaction.allowed_content_types.begin(), redaction.allowed_content_types.end());
    std::sort(redaction.withheld_contexts.begin(), redaction.withheld_contexts.end());
    consent::canonicalize(consent);  // consent (issue 5)
}

std::string encode_snapshot(const Snapshot &snapshot) {
    Bundle canonical = snapshot.bundle;
    canonical.canonicalize();
    std::string out;
    Writer w(out);
    w.map(snapshot.consent_jwks.empty() ? 3 : 4);
    w.key("serial");
    w.uint(snapshot.serial);
    put_str(w, "digest", snapshot.digest_hex);
    w.key("bundle");
    encode_bundle(w, canonical);
    if (!snapshot.consent_jwks.empty()) {
        put_str(w, "consent_jwks", snapshot.consent_jwks);
    }
    return out;
}

std::optional<Snapshot> decode_snapshot(std::string_view body) {
    static constexpr std::array<std::string_view, 4> kKeys = {"serial", "digest", "bundle",
                                                              "consent_jwks"};
    Snapshot snapshot;
    Reader r(body);
    const bool ok = read_fields(r, kKeys, 0b0111, [&](size_t field) {
        switch (field) {
            case 0: {
                const std::optional<uint64_t> serial = r.read_uint();
                snapshot.serial = serial.value_or(0);
                return serial.has_value();
            }
            case 1:
                return read_string(r, snapshot.digest_hex);
            case 3:
                return read_string(r, snapshot.consent_jwks);
            default:
                return read_bundle(r, snapshot.bundle);
        }
    });
    if (!ok || !r.at_end()) {
        return std::nullopt;
    }
    snapshot.bundle.canonicalize();
    if (!lookups_unambiguous(snapshot.bundle) || !throttling_consistent(snapshot.bundle)) {
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
    if (!request.client_id.empty()) {
        const Client *client = snapshot.bundle.find_client(request.client_id);
        if (client == nullptr) {
            return deny(reply, 403, "unknown-client",
                        "The client is not registered with the gateway");
        }
        if (!route->tenant.empty() && !contains(client->tenants, route->tenant)) {
            return deny(reply, 403, "tenant-not-permitted",
                        "The client is not registered for the tenant this route serves");
        }
    }

    reply.decision = protocol::Decision::Permit;
    reply.http_status = 200;
    reply.reason = "permitted";
    reply.message = "Permitted by the gateway policy";
    return reply;
}

}  // namespace ehrgate::policy
