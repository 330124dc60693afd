// Snapshot codec and invariants of the bundle's `consent:` section.
#include "ehrgate/consent_policy.hpp"

#include <algorithm>
#include <array>
#include <utility>

#include "ehrgate/consent.hpp"
#include "ehrgate/msgpack.hpp"

namespace ehrgate::consent {

namespace {

constexpr uint32_t kMaxEntries = 1024;

void put_list(msgpack::Writer &w, std::string_view key, const std::vector<std::string> &values) {
    w.key(key);
    w.array(static_cast<uint32_t>(values.size()));
    for (const std::string &value : values) {
        w.str(value);
    }
}

bool read_list(msgpack::Reader &r, std::vector<std::string> &out) {
    return msgpack::read_string_list(r, out, kMaxEntries);
}

bool read_access(msgpack::Reader &r, DefaultAccess &out) {
    const std::optional<std::string_view> name = r.read_str();
    if (name == default_access_name(DefaultAccess::Permit)) {
        out = DefaultAccess::Permit;
    } else if (name == default_access_name(DefaultAccess::ConsentRequired)) {
        out = DefaultAccess::ConsentRequired;
    } else {
        r.fail();
        return false;
    }
    return true;
}

// A map of known keys, none required: unknown keys are skipped, a repeated key refused.
template <size_t N, typename OnField>
bool read_map(msgpack::Reader &r, const std::array<std::string_view, N> &keys, OnField &&on_field) {
    return msgpack::read_fields(r, keys, 0, std::forward<OnField>(on_field));
}

bool sorted_unique(const std::vector<std::string> &v) {
    return std::adjacent_find(v.begin(), v.end(), std::greater_equal<>()) == v.end();
}

bool subset(const std::vector<std::string> &small, const std::vector<std::string> &big) {
    return std::includes(big.begin(), big.end(), small.begin(), small.end());
}

}  // namespace

std::string_view default_access_name(DefaultAccess access) {
    return access == DefaultAccess::Permit ? "permit" : "consent-required";
}

void encode_policy(msgpack::Writer &w, const ConsentPolicy &policy) {
    w.map(5);
    put_list(w, "sensitive_labels", policy.sensitive_labels);
    put_list(w, "explicit_consent_labels", policy.explicit_consent_labels);
    w.key("purposes");
    w.array(static_cast<uint32_t>(policy.purposes.size()));
    for (const PurposeDefault &d : policy.purposes) {
        w.map(4);
        w.key("purpose");
        w.str(d.purpose);
        put_list(w, "clients", d.clients);
        w.key("access");
        w.str(default_access_name(d.access));
        put_list(w, "withhold", d.withhold);
    }
    w.key("fallback");
    w.map(2);
    w.key("access");
    w.str(default_access_name(policy.fallback.access));
    put_list(w, "withhold", policy.fallback.withhold);
    w.key("break_glass");
    w.map(4);
    put_list(w, "purposes", policy.break_glass.purposes);
    put_list(w, "clients", policy.break_glass.clients);
    put_list(w, "users", policy.break_glass.users);
    put_list(w, "withhold", policy.break_glass.withhold);
}

bool decode_policy(msgpack::Reader &r, ConsentPolicy &policy) {
    static constexpr std::array<std::string_view, 5> kKeys = {
        "sensitive_labels", "explicit_consent_labels", "purposes", "fallback", "break_glass"};
    static constexpr std::array<std::string_view, 4> kDefaultKeys = {"purpose", "clients", "access",
                                                                     "withhold"};
    static constexpr std::array<std::string_view, 2> kFallbackKeys = {"access", "withhold"};
    static constexpr std::array<std::string_view, 4> kBreakGlassKeys = {"purposes", "clients",
                                                                        "users", "withhold"};
    policy = ConsentPolicy{};
    policy.enabled = true;
    const bool ok = read_map(r, kKeys, [&](size_t field) {
        switch (field) {
            case 0:
                return read_list(r, policy.sensitive_labels);
            case 1:
                return read_list(r, policy.explicit_consent_labels);
            case 2: {
                const std::optional<uint32_t> count = r.read_array();
                if (!count || *count > kMaxEntries) {
                    return false;
                }
                for (uint32_t i = 0; i < *count; ++i) {
                    PurposeDefault &d = policy.purposes.emplace_back();
                    if (!read_map(r, kDefaultKeys, [&](size_t f) {
                            switch (f) {
                                case 0: {
                                    const std::optional<std::string_view> p = r.read_str();
                                    d.purpose.assign(p.value_or(""));
                                    return p.has_value();
                                }
                                case 1:
                                    return read_list(r, d.clients);
                                case 2:
                                    return read_access(r, d.access);
                                default:
                                    return read_list(r, d.withhold);
                            }
                        })) {
                        return false;
                    }
                }
                return true;
            }
            case 3:
                return read_map(r, kFallbackKeys, [&](size_t f) {
                    return f == 0 ? read_access(r, policy.fallback.access)
                                  : read_list(r, policy.fallback.withhold);
                });
            default:
                return read_map(r, kBreakGlassKeys, [&](size_t f) {
                    BreakGlass &bg = policy.break_glass;
                    return read_list(r, f == 0   ? bg.purposes
                                        : f == 1 ? bg.clients
                                        : f == 2 ? bg.users
                                                 : bg.withhold);
                });
        }
    });
    if (!ok) {
        return false;
    }
    canonicalize(policy);
    return consistent(policy);
}

void canonicalize(ConsentPolicy &policy) {
    const auto sort = [](std::vector<std::string> &v) { std::sort(v.begin(), v.end()); };
    sort(policy.sensitive_labels);
    sort(policy.explicit_consent_labels);
    for (PurposeDefault &d : policy.purposes) {
        sort(d.clients);
        sort(d.withhold);
    }
    std::stable_sort(policy.purposes.begin(), policy.purposes.end(),
                     [](const PurposeDefault &a, const PurposeDefault &b) {
                         return a.purpose != b.purpose ? a.purpose < b.purpose
                                                       : a.clients < b.clients;
                     });
    sort(policy.fallback.withhold);
    sort(policy.break_glass.purposes);
    sort(policy.break_glass.clients);
    sort(policy.break_glass.users);
    sort(policy.break_glass.withhold);
}

bool consistent(const ConsentPolicy &policy) {
    if (!policy.enabled) {
        return true;
    }
    const auto labels_ok = [](const std::vector<std::string> &v) {
        return sorted_unique(v) && std::all_of(v.begin(), v.end(), [](const std::string &l) {
                   return is_label_code(l);
               });
    };
    if (!labels_ok(policy.sensitive_labels) || !labels_ok(policy.explicit_consent_labels) ||
        !subset(policy.explicit_consent_labels, policy.sensitive_labels) ||
        !labels_ok(policy.fallback.withhold) || !labels_ok(policy.break_glass.withhold)) {
        return false;
    }
    // The fallback is the lowest privilege: never a permit, never less withheld than sensitive.
    if (policy.fallback.access != DefaultAccess::ConsentRequired ||
        !subset(policy.sensitive_labels, policy.fallback.withhold)) {
        return false;
    }
    for (size_t i = 0; i < policy.purposes.size(); ++i) {
        const PurposeDefault &d = policy.purposes[i];
        if (!is_purpose_of_use(d.purpose) || !sorted_unique(d.clients) || !labels_ok(d.withhold)) {
            return false;
        }
        // Two defaults for one purpose must not both apply to one client.
        for (size_t j = i + 1;
             j < policy.purposes.size() && policy.purposes[j].purpose == d.purpose; ++j) {
            const PurposeDefault &o = policy.purposes[j];
            if (d.clients.empty() || o.clients.empty() ||
                std::find_first_of(d.clients.begin(), d.clients.end(), o.clients.begin(),
                                   o.clients.end()) != d.clients.end()) {
                return false;
            }
        }
    }
    const BreakGlass &bg = policy.break_glass;
    if (!sorted_unique(bg.purposes) || !sorted_unique(bg.clients) || !sorted_unique(bg.users)) {
        return false;
    }
    for (const std::string &p : bg.purposes) {
        if (p != "BTG" && p != "ETREAT") {
            return false;
        }
    }
    return bg.purposes.empty() || !bg.clients.empty();
}

}  // namespace ehrgate::consent
