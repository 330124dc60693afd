#include "ehrgate/consent.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <set>

#include "ehrgate/fhir_request.hpp"
#include "ehrgate/json.hpp"
#include "ehrgate/json_text.hpp"

namespace ehrgate::consent {

namespace {

using namespace std::string_view_literals;

// HL7 v3 PurposeOfUse (http://terminology.hl7.org/ValueSet/v3-PurposeOfUse) as bound by FHIR
// R4 4.0.1: every concept of the value set except its abstract root. Sorted for bisection. The
// bundle's `purposes` validation (policy_parse.cpp) uses this list too.
constexpr std::array kPurposeOfUse = {
    "BIORCH"sv,      "BTG"sv,      "CAREMGT"sv,  "CLINTRCH"sv,  "CLINTRCHNPC"sv, "CLINTRCHPC"sv,
    "CLINTRL"sv,     "CLMATTCH"sv, "COC"sv,      "COVAUTH"sv,   "COVERAGE"sv,    "DISASTER"sv,
    "DONAT"sv,       "DSRCH"sv,    "ELIGDTRM"sv, "ELIGVER"sv,   "ENROLLM"sv,     "ERTREAT"sv,
    "ETREAT"sv,      "FAMRQT"sv,   "FRAUD"sv,    "GOV"sv,       "HACCRED"sv,     "HCOMPL"sv,
    "HDECD"sv,       "HDIRECT"sv,  "HDM"sv,      "HLEGAL"sv,    "HMARKT"sv,      "HOPERAT"sv,
    "HOUTCOMS"sv,    "HPAYMT"sv,   "HPRGRP"sv,   "HQUALIMP"sv,  "HRESCH"sv,      "HSYSADMIN"sv,
    "HTEST"sv,       "LABELING"sv, "MEMADMIN"sv, "METAMGT"sv,   "MILCDM"sv,      "MILDCRG"sv,
    "PATADMIN"sv,    "PATRQT"sv,   "PATSFTY"sv,  "PERFMSR"sv,   "POARCH"sv,      "POPHLTH"sv,
    "PRECLINTRCH"sv, "PUBHLTH"sv,  "PWATRNY"sv,  "RECORDMGT"sv, "REMITADV"sv,    "SUPNWK"sv,
    "SYSDEV"sv,      "THREAT"sv,   "TRAIN"sv,    "TRANSRCH"sv,  "TREAT"sv,
};
static_assert(std::is_sorted(kPurposeOfUse.begin(), kPurposeOfUse.end()));

constexpr std::array kStatusNames = {"draft"sv,    "proposed"sv, "active"sv,
                                     "rejected"sv, "inactive"sv, "entered-in-error"sv};

bool contains(const std::vector<std::string> &list, std::string_view value) {
    return std::find(list.begin(), list.end(), value) != list.end();
}

// ---- Time ----

int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = static_cast<unsigned>(y - era * 400);
    const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

bool digits(std::string_view text, size_t at, size_t n, int *out) {
    if (at + n > text.size()) {
        return false;
    }
    int v = 0;
    for (size_t i = at; i < at + n; ++i) {
        if (text[i] < '0' || text[i] > '9') {
            return false;
        }
        v = v * 10 + (text[i] - '0');
    }
    *out = v;
    return true;
}

unsigned days_in_month(int y, int m) {
    static constexpr unsigned kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return m == 2 && leap ? 29 : kDays[m - 1];
}

}  // namespace

std::optional<int64_t> parse_fhir_datetime(std::string_view text, bool as_end) {
    int year = 0;
    int month = 1;
    int day = 1;
    if (!digits(text, 0, 4, &year)) {
        return std::nullopt;
    }
    if (text.size() == 4) {
        return days_from_civil(as_end ? year + 1 : year, 1, 1) * 86400;
    }
    if (text[4] != '-' || !digits(text, 5, 2, &month) || month < 1 || month > 12) {
        return std::nullopt;
    }
    if (text.size() == 7) {
        const int64_t first = days_from_civil(year, static_cast<unsigned>(month), 1);
        return (as_end ? first + days_in_month(year, month) : first) * 86400;
    }
    if (text[7] != '-' || !digits(text, 8, 2, &day) || day < 1 ||
        static_cast<unsigned>(day) > days_in_month(year, month)) {
        return std::nullopt;
    }
    const int64_t days =
        days_from_civil(year, static_cast<unsigned>(month), static_cast<unsigned>(day));
    if (text.size() == 10) {
        return (as_end ? days + 1 : days) * 86400;
    }
    int hh = 0;
    int mm = 0;
    int ss = 0;
    if (text[10] != 'T' || !digits(text, 11, 2, &hh) || text.size() < 19 || text[13] != ':' ||
        !digits(text, 14, 2, &mm) || text[16] != ':' || !digits(text, 17, 2, &ss) || hh > 23 ||
        mm > 59 || ss > 60) {
        return std::nullopt;
    }
    size_t at = 19;
    bool fraction = false;
    if (at < text.size() && text[at] == '.') {
        ++at;
        const size_t start = at;
        while (at < text.size() && text[at] >= '0' && text[at] <= '9') {
            ++at;
        }
        if (at == start) {
            return std::nullopt;
        }
        fraction = true;
    }
    int64_t offset = 0;
    if (at < text.size() && text[at] == 'Z') {
        ++at;
    } else if (at < text.size() && (text[at] == '+' || text[at] == '-')) {
        int oh = 0;
        int om = 0;
        if (!digits(text, at + 1, 2, &oh) || at + 3 >= text.size() || text[at + 3] != ':' ||
            !digits(text, at + 4, 2, &om) || oh > 14 || om > 59) {
            return std::nullopt;
        }
        offset = (oh * 3600 + om * 60) * (text[at] == '+' ? 1 : -1);
        at += 6;
    } else {
        return std::nullopt;  // FHIR requires a time zone when a time is given
    }
    if (at != text.size()) {
        return std::nullopt;
    }
    int64_t t = days * 86400 + hh * 3600 + mm * 60 + std::min(ss, 59) - offset;
    if (as_end && fraction) {
        ++t;  // a fractional end second still includes that second
    }
    return t;
}

std::string format_datetime(int64_t t) {
    int64_t days = t >= 0 ? t / 86400 : (t - 86399) / 86400;
    const int64_t secs = t - days * 86400;
    // civil_from_days
    days += 719468;
    const int64_t era = (days >= 0 ? days : days - 146096) / 146097;
    const unsigned doe = static_cast<unsigned>(days - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const int64_t y0 = static_cast<int64_t>(yoe) + era * 400;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    const unsigned d = doy - (153 * mp + 2) / 5 + 1;
    const unsigned m = mp < 10 ? mp + 3 : mp - 9;
    const int64_t y = y0 + (m <= 2);
    char buf[96];
    std::snprintf(buf, sizeof buf, "%04lld-%02u-%02uT%02lld:%02lld:%02lldZ",
                  static_cast<long long>(y), m, d, static_cast<long long>(secs / 3600),
                  static_cast<long long>(secs / 60 % 60), static_cast<long long>(secs % 60));
    return buf;
}

std::span<const std::string_view> purpose_of_use_codes() {
    return kPurposeOfUse;
}

bool is_purpose_of_use(std::string_view code) {
    return std::binary_search(kPurposeOfUse.begin(), kPurposeOfUse.end(), code);
}

bool is_label_code(std::string_view code) {
    if (code.empty() || code.size() > 32) {
        return false;
    }
    return std::all_of(code.begin(), code.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_';
    });
}

std::string_view status_name(Status status) {
    return kStatusNames[static_cast<size_t>(status)];
}

std::optional<Status> status_from_name(std::string_view name) {
    for (size_t i = 0; i < kStatusNames.size(); ++i) {
        if (kStatusNames[i] == name) {
            return static_cast<Status>(i);
        }
    }
    return std::nullopt;
}

// ---- FHIR import ------------------------------------------------------------------------------

namespace {

class Importer {
  public:
    std::string error;

    bool fail(const std::string &path, const std::string &message) {
        if (error.empty()) {
            error = path + ": " + message;
        }
        return false;
    }

    const std::string *string_at(const json::Value &object, std::string_view key,
                                 const std::string &path, bool required) {
        const json::Value *v = object.find(key);
        if (v == nullptr) {
            if (required) {
                fail(path + "." + std::string(key), "required");
            }
            return nullptr;
        }
        const std::string *s = v->as_string();
        if (s == nullptr) {
            fail(path + "." + std::string(key), "expected a string");
        }
        return s;
    }

    const json::Value::Array *array_at(const json::Value &object, std::string_view key,
                                       const std::string &path) {
        const json::Value *v = object.find(key);
        if (v == nullptr) {
            return nullptr;
        }
        const json::Value::Array *a = v->as_array();
        if (a == nullptr) {
            fail(path + "." + std::string(key), "expected an array");
            return nullptr;
        }
        if (a->size() > kMaxListEntries) {
            fail(path + "." + std::string(key),
                 "too many entries (at most " + std::to_string(kMaxListEntries) + ")");
            return nullptr;
        }
        return a;
    }

    bool period(const json::Value &v, const std::string &path, Period *out) {
        if (!v.is_object()) {
            return fail(path, "expected an object");
        }
        for (const auto &[key, as_end] : {std::pair{"start"sv, false}, std::pair{"end"sv, true}}) {
            const std::string *text = string_at(v, key, path, false);
            if (!error.empty()) {
                return false;
            }
            if (text == nullptr) {
                continue;
            }
            const std::optional<int64_t> t = parse_fhir_datetime(*text, as_end);
            if (!t) {
                return fail(path + "." + std::string(key), "not a FHIR dateTime");
            }
            (as_end ? out->end : out->start) = t;
        }
        if (out->start && out->end && *out->end <= *out->start) {
            return fail(path, "end is not after start");
        }
        return true;
    }

    // A Coding's code (optionally checking its system).
    bool coding_code(const json::Value &coding, const std::string &path, std::string *out) {
        if (!coding.is_object()) {
            return fail(path, "expected a Coding object");
        }
        const std::string *code = string_at(coding, "code", path, true);
        if (code == nullptr) {
            return false;
        }
        *out = *code;
        return true;
    }

    // A CodeableConcept's first coding's code (scope, policyRule, action).
    bool concept_code(const json::Value &codeable, const std::string &path, std::string *out) {
        if (!codeable.is_object()) {
            return fail(path, "expected a CodeableConcept object");
        }
        const json::Value::Array *codings = array_at(codeable, "coding", path);
        if (codings == nullptr || codings->empty()) {
            return error.empty() ? fail(path + ".coding", "required") : false;
        }
        return coding_code((*codings)[0], path + ".coding[0]", out);
    }

    bool actor(const json::Value &v, const std::string &path, std::string *out) {
        if (!v.is_object()) {
            return fail(path, "expected an object");
        }
        const json::Value *ref = v.find("reference");
        if (ref == nullptr || !ref->is_object()) {
            return fail(path + ".reference", "required Reference object");
        }
        const std::string rpath = path + ".reference";
        if (const json::Value *identifier = ref->find("identifier")) {
            const std::string *system =
                string_at(*identifier, "system", rpath + ".identifier", true);
            const std::string *value = string_at(*identifier, "value", rpath + ".identifier", true);
            if (system == nullptr || value == nullptr) {
                return false;
            }
            if (*system != kClientSystem) {
                return fail(rpath + ".identifier.system", "only \"" + std::string(kClientSystem) +
                                                              "\" identifiers are understood");
            }
            if (!fhir::is_valid_id(*value) && value->size() > 128) {
                return fail(rpath + ".identifier.value", "invalid client id");
            }
            *out = "client:" + *value;
            return true;
        }
        const std::string *reference = string_at(*ref, "reference", rpath, true);
        if (reference == nullptr) {
            return false;
        }
        const size_t slash = reference->find('/');
        if (slash == std::string::npos ||
            !fhir::is_resource_type(std::string_view(*reference).substr(0, slash)) ||
            !fhir::is_valid_id(std::string_view(*reference).substr(slash + 1))) {
            return fail(rpath + ".reference", "expected a relative reference Type/id");
        }
        if (reference->starts_with("Device/")) {
            *out = "client:" + reference->substr(slash + 1);
        } else {
            *out = *reference;
        }
        return true;
    }

    bool provision(const json::Value &v, const std::string &path, size_t depth, Provision *out,
                   std::string_view policy_rule, ProvisionType parent_type) {
        if (depth > kMaxProvisionDepth) {
            return fail(path, "provisions nested deeper than " +
                                  std::to_string(kMaxProvisionDepth) + " levels");
        }
        if (!v.is_object()) {
            return fail(path, "expected an object");
        }
        if (const std::string *type = string_at(v, "type", path, false)) {
            if (*type == "permit") {
                out->type = ProvisionType::Permit;
            } else if (*type == "deny") {
                out->type = ProvisionType::Deny;
            } else {
                return fail(path + ".type", "expected \"permit\" or \"deny\"");
            }
        } else if (!error.empty()) {
            return false;
        } else if (depth > 0) {
            out->type = parent_type;  // R4 allows an untyped nested rule: it refines its parent
        } else {
            // The root rule's meaning follows the consent's policy rule: opt-out denies.
            out->type = policy_rule == "OPTOUT" ? ProvisionType::Deny : ProvisionType::Permit;
        }
        if (const json::Value *p = v.find("period")) {
            Period period;
            if (!this->period(*p, path + ".period", &period)) {
                return false;
            }
            out->period = period;
        }
        if (const auto *actors = array_at(v, "actor", path)) {
            for (size_t i = 0; i < actors->size(); ++i) {
                std::string a;
                if (!actor((*actors)[i], path + ".actor[" + std::to_string(i) + "]", &a)) {
                    return false;
                }
                out->actors.push_back(std::move(a));
            }
        }
        if (const auto *actions = array_at(v, "action", path)) {
            for (size_t i = 0; i < actions->size(); ++i) {
                std::string code;
                if (!concept_code((*actions)[i], path + ".action[" + std::to_string(i) + "]",
                                  &code)) {
                    return false;
                }
                out->actions.push_back(std::move(code));
            }
        }
        if (const auto *purposes = array_at(v, "purpose", path)) {
            for (size_t i = 0; i < purposes->size(); ++i) {
                const std::string p = path + ".purpose[" + std::to_string(i) + "]";
                std::string code;
                if (!coding_code((*purposes)[i], p, &code)) {
                    return false;
                }
                if (!is_purpose_of_use(code)) {
                    return fail(p + ".code", "\"" + code.substr(0, 32) +
                                                 "\" is not an HL7 v3 PurposeOfUse code");
                }
                out->purposes.push_back(std::move(code));
            }
        }
        if (const auto *labels = array_at(v, "securityLabel", path)) {
            for (size_t i = 0; i < labels->size(); ++i) {
                const std::string p = path + ".securityLabel[" + std::to_string(i) + "]";
                std::string code;
                if (!coding_code((*labels)[i], p, &code)) {
                    return false;
                }
                if (!is_label_code(code)) {
                    return fail(p + ".code", "not a security label code");
                }
                out->security_labels.push_back(std::move(code));
            }
        }
        if (const auto *classes = array_at(v, "class", path)) {
            for (size_t i = 0; i < classes->size(); ++i) {
                const std::string p = path + ".class[" + std::to_string(i) + "]";
                std::string code;
                if (!coding_code((*classes)[i], p, &code)) {
                    return false;
                }
                if (fhir::is_resource_type(code)) {
                    out->classes.push_back(std::move(code));
                } else {
                    // A class the gateway cannot match against a request (e.g. a MIME type).
                    out->unenforceable_narrowing = true;
                }
            }
        }
        for (const std::string_view narrowing : {"data"sv, "code"sv, "dataPeriod"sv}) {
            if (v.find(narrowing) != nullptr) {
                out->unenforceable_narrowing = true;
            }
        }
        if (const auto *children = array_at(v, "provision", path)) {
            for (size_t i = 0; i < children->size(); ++i) {
                Provision child;
                if (!provision((*children)[i], path + ".provision[" + std::to_string(i) + "]",
                               depth + 1, &child, policy_rule, out->type)) {
                    return false;
                }
                out->provisions.push_back(std::move(child));
            }
        }
        return error.empty();
    }

    std::optional<Record> record(const json::Value &root) {
        if (!root.is_object()) {
            fail("Consent", "expected a JSON object");
            return std::nullopt;
        }
        const std::string *type = string_at(root, "resourceType", "Consent", true);
        if (type == nullptr) {
            return std::nullopt;
        }
        if (*type != "Consent") {
            fail("Consent.resourceType", "expected \"Consent\"");
            return std::nullopt;
        }
        Record r;
        if (const std::string *id = string_at(root, "id", "Consent", false)) {
            if (!fhir::is_valid_id(*id)) {
                fail("Consent.id", "not a FHIR id");
                return std::nullopt;
            }
            r.id = *id;
        }
        const std::string *status = string_at(root, "status", "Consent", true);
        if (status == nullptr) {
            return std::nullopt;
        }
        const std::optional<Status> s = status_from_name(*status);
        if (!s) {
            fail("Consent.status",
                 "unknown status; expected draft, proposed, active, rejected, "
                 "inactive or entered-in-error");
            return std::nullopt;
        }
        r.status = *s;
        const json::Value *patient = root.find("patient");
        const std::string *patient_ref =
            patient != nullptr ? string_at(*patient, "reference", "Consent.patient", true)
                               : nullptr;
        if (patient == nullptr) {
            fail("Consent.patient", "required");
        }
        if (patient_ref == nullptr) {
            return std::nullopt;
        }
        if (!patient_ref->starts_with("Patient/") ||
            !fhir::is_valid_id(std::string_view(*patient_ref).substr(8))) {
            fail("Consent.patient.reference", "expected Patient/<id>");
            return std::nullopt;
        }
        r.patient = patient_ref->substr(8);
        if (const json::Value *scope = root.find("scope")) {
            if (!concept_code(*scope, "Consent.scope", &r.scope)) {
                return std::nullopt;
            }
        }
        if (const json::Value *rule = root.find("policyRule")) {
            if (!concept_code(*rule, "Consent.policyRule", &r.policy_rule)) {
                return std::nullopt;
            }
        }
        if (const std::string *when = string_at(root, "dateTime", "Consent", false)) {
            r.date_time = parse_fhir_datetime(*when, false);
            if (!r.date_time) {
                fail("Consent.dateTime", "not a FHIR dateTime");
                return std::nullopt;
            }
        }
        if (!error.empty()) {
            return std::nullopt;
        }
        const json::Value *root_provision = root.find("provision");
        if (root_provision == nullptr) {
            // No rule: the policy rule alone decides (OPTIN permits, OPTOUT denies).
            r.provision.type =
                r.policy_rule == "OPTOUT" ? ProvisionType::Deny : ProvisionType::Permit;
        } else if (!provision(*root_provision, "Consent.provision", 0, &r.provision, r.policy_rule,
                              ProvisionType::Permit)) {
            return std::nullopt;
        }
        return r;
    }
};

void put_key(std::string &out, bool &first, std::string_view key) {
    out += first ? "" : ",";
    first = false;
    json::append_string(out, key);
    out += ':';
}

void put_codings(std::string &out, bool &first, std::string_view key,
                 const std::vector<std::string> &codes, std::string_view system, bool codeable) {
    if (codes.empty()) {
        return;
    }
    put_key(out, first, key);
    out += '[';
    for (size_t i = 0; i < codes.size(); ++i) {
        out += i == 0 ? "" : ",";
        out += codeable ? "{\"coding\":[{\"system\":" : "{\"system\":";
        json::append_string(out, system);
        out += ",\"code\":";
        json::append_string(out, codes[i]);
        out += codeable ? "}]}" : "}";
    }
    out += ']';
}

void put_period(std::string &out, bool &first, const Period &period) {
    put_key(out, first, "period");
    out += '{';
    bool inner_first = true;
    if (period.start) {
        put_key(out, inner_first, "start");
        json::append_string(out, format_datetime(*period.start));
    }
    if (period.end) {
        put_key(out, inner_first, "end");
        json::append_string(out, format_datetime(*period.end));
    }
    out += '}';
}

void export_provision(std::string &out, const Provision &p) {
    out += '{';
    bool first = true;
    put_key(out, first, "type");
    json::append_string(out, p.type == ProvisionType::Permit ? "permit" : "deny");
    if (p.period) {
        put_period(out, first, *p.period);
    }
    if (!p.actors.empty()) {
        put_key(out, first, "actor");
        out += '[';
        for (size_t i = 0; i < p.actors.size(); ++i) {
            out += i == 0 ? "" : ",";
            out +=
                "{\"role\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/"
                "v3-ParticipationType\",\"code\":\"IRCP\"}]},\"reference\":";
            if (p.actors[i].starts_with("client:")) {
                out += "{\"identifier\":{\"system\":";
                json::append_string(out, kClientSystem);
                out += ",\"value\":";
                json::append_string(out, std::string_view(p.actors[i]).substr(7));
                out += "}}}";
            } else {
                out += "{\"reference\":";
                json::append_string(out, p.actors[i]);
                out += "}}";
            }
        }
        out += ']';
    }
    put_codings(out, first, "action", p.actions,
                "http://terminology.hl7.org/CodeSystem/consentaction", true);
    put_codings(out, first, "securityLabel", p.security_labels,
                "http://terminology.hl7.org/CodeSystem/v3-ActCode", false);
    put_codings(out, first, "purpose", p.purposes, kPurposeOfUseSystem, false);
    put_codings(out, first, "class", p.classes, "http://hl7.org/fhir/resource-types", false);
    if (p.unenforceable_narrowing) {
        // Not representable faithfully; keep the marker so a round trip stays fail-closed.
        put_key(out, first, "dataPeriod");
        out += "{}";
    }
    if (!p.provisions.empty()) {
        put_key(out, first, "provision");
        out += '[';
        for (size_t i = 0; i < p.provisions.size(); ++i) {
            out += i == 0 ? "" : ",";
            export_provision(out, p.provisions[i]);
        }
        out += ']';
    }
    out += '}';
}

}  // namespace

ImportResult import_fhir(std::string_view json_text) {
    ImportResult result;
    json::ParseError parse_error;
    const std::optional<json::Value> root =
        json::parse(json_text, &parse_error, json::Limits{size_t{1} << 20, 64});
    if (!root) {
        result.error = "not valid JSON: " + parse_error.message + " at byte " +
                       std::to_string(parse_error.offset);
        return result;
    }
    return import_fhir(*root);
}

ImportResult import_fhir(const json::Value &resource) {
    ImportResult result;
    Importer importer;
    result.record = importer.record(resource);
    if (!result.record) {
        result.error = importer.error.empty() ? "invalid Consent" : importer.error;
    }
    return result;
}

std::string export_fhir(const Record &record) {
    std::string out = "{\"resourceType\":\"Consent\"";
    bool first = false;
    if (!record.id.empty()) {
        put_key(out, first, "id");
        json::append_string(out, record.id);
    }
    put_key(out, first, "status");
    json::append_string(out, status_name(record.status));
    if (!record.scope.empty()) {
        put_key(out, first, "scope");
        out +=
            "{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/"
            "consentscope\",\"code\":";
        json::append_string(out, record.scope);
        out += "}]}";
    }
    put_key(out, first, "patient");
    out += "{\"reference\":";
    json::append_string(out, "Patient/" + record.patient);
    out += '}';
    if (record.date_time) {
        put_key(out, first, "dateTime");
        json::append_string(out, format_datetime(*record.date_time));
    }
    if (!record.policy_rule.empty()) {
        put_key(out, first, "policyRule");
        out +=
            "{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ActCode\","
            "\"code\":";
        json::append_string(out, record.policy_rule);
        out += "}]}";
    }
    put_key(out, first, "provision");
    export_provision(out, record.provision);
    out += '}';
    return out;
}

// ---- Decision ---------------------------------------------------------------------------------

std::string named_patient(std::string_view method, std::string_view relative_path,
                          std::string_view query) {
    const std::optional<fhir::RequestTargetView> target =
        fhir::classify_view(method, relative_path, query);
    if (!target) {
        return {};
    }
    if (target->resource_type == "Patient" && !target->id.empty()) {
        return std::string(target->id);
    }
    if (target->interaction != fhir::Interaction::SearchType) {
        return {};
    }
    const std::optional<fhir::Query> params = fhir::parse_query(query);
    if (!params) {
        return {};
    }
    std::string found;
    for (const fhir::QueryParam &param : *params) {
        const bool on_patient = target->resource_type == "Patient" && param.name == "_id";
        const bool bare_ok = on_patient || param.name == "patient" ||
                             param.name == "subject:Patient" || param.name == "patient:Patient";
        if (!bare_ok && param.name != "subject") {
            continue;
        }
        if (param.value.find(',') != std::string::npos) {
            return {};  // several patients
        }
        std::string_view id = param.value;
        if (id.starts_with("Patient/")) {
            id.remove_prefix(8);
        } else if (!bare_ok) {
            continue;  // subject=Group/..., not a patient
        }
        if (!fhir::is_valid_id(id) || (!found.empty() && found != id)) {
            return {};
        }
        found = id;
    }
    return found;
}

namespace {

enum class Answer : uint8_t { None, Permit, Deny };

bool is_write(std::string_view interaction) {
    return interaction == "create" || interaction == "update" || interaction == "patch" ||
           interaction == "delete";
}

bool action_matches(const std::vector<std::string> &actions, std::string_view interaction) {
    if (actions.empty()) {
        return true;
    }
    if (is_write(interaction)) {
        return contains(actions, "correct") ||
               (interaction == "create" && contains(actions, "collect"));
    }
    return contains(actions, "access") || contains(actions, "use") || contains(actions, "disclose");
}

bool actor_matches(const std::string &actor, const Request &request) {
    if (actor.starts_with("client:")) {
        return std::string_view(actor).substr(7) == request.client_id;
    }
    if (actor.starts_with("Organization/")) {
        return !request.tenant.empty() && std::string_view(actor).substr(13) == request.tenant;
    }
    // fhirUser may be absolute (https://ehr.example/fhir/Practitioner/13).
    return !request.user.empty() &&
           (request.user == actor ||
            (request.user.size() > actor.size() && request.user.ends_with(actor) &&
             request.user[request.user.size() - actor.size() - 1] == '/'));
}

// Does the provision's rule apply to this request (everything but the data it covers)?
bool applies(const Provision &p, const Request &request, std::string_view purpose) {
    if (p.period && !p.period->contains(request.now)) {
        return false;
    }
    if (!p.actors.empty() &&
        std::none_of(p.actors.begin(), p.actors.end(),
                     [&](const std::string &a) { return actor_matches(a, request); })) {
        return false;
    }
    if (!action_matches(p.actions, request.interaction)) {
        return false;
    }
    if (!p.purposes.empty() && (purpose.empty() || !contains(p.purposes, purpose))) {
        return false;
    }
    if (!p.classes.empty() && !contains(p.classes, request.resource_type)) {
        return false;
    }
    return true;
}

// What the provision (and its nested exceptions) says about the data class `label` ("" for data
// without a sensitivity label). With `explicit_only`, a permit counts only when the provision
// names the label itself.
Answer evaluate(const Provision &p, const Request &request, std::string_view purpose,
                std::string_view label, bool explicit_only) {
    if (!applies(p, request, purpose)) {
        return Answer::None;
    }
    const bool covers = p.security_labels.empty() ? true : contains(p.security_labels, label);
    if (!covers) {
        return Answer::None;
    }
    Answer answer = Answer::None;
    if (p.type == ProvisionType::Deny) {
        answer = Answer::Deny;
    } else if (!p.unenforceable_narrowing && (!explicit_only || !p.security_labels.empty())) {
        answer = Answer::Permit;
    }
    // Nested provisions are exceptions to their parent; among siblings a deny wins.
    Answer nested = Answer::None;
    for (const Provision &child : p.provisions) {
        const Answer a = evaluate(child, request, purpose, label, explicit_only);
        if (a == Answer::Deny) {
            nested = Answer::Deny;
        } else if (a == Answer::Permit && nested == Answer::None) {
            nested = Answer::Permit;
        }
    }
    return nested != Answer::None ? nested : answer;
}

void collect_labels(const Provision &p, std::set<std::string> &out) {
    out.insert(p.security_labels.begin(), p.security_labels.end());
    for (const Provision &child : p.provisions) {
        collect_labels(child, out);
    }
}

struct ClassAnswer {
    Answer answer = Answer::None;
    std::vector<const Record *> by;
};

// Every active consent's answer for one data class: a deny anywhere wins, else a permit.
ClassAnswer combine(std::span<const Record> records, const Request &request,
                    std::string_view purpose, std::string_view label, bool explicit_only) {
    ClassAnswer denies{Answer::Deny, {}};
    ClassAnswer permits{Answer::Permit, {}};
    for (const Record &record : records) {
        if (record.status != Status::Active || record.patient != request.patient) {
            continue;
        }
        const Answer a = evaluate(record.provision, request, purpose, label, explicit_only);
        if (a == Answer::Deny) {
            denies.by.push_back(&record);
        } else if (a == Answer::Permit) {
            permits.by.push_back(&record);
        }
    }
    if (!denies.by.empty()) {
        return denies;
    }
    if (!permits.by.empty()) {
        return permits;
    }
    return {};
}

Decision refuse(std::string_view reason, std::string message, std::string purpose) {
    Decision d;
    d.permit = false;
    d.reason = reason;
    d.message = std::move(message);
    d.purpose = std::move(purpose);
    return d;
}

const PurposeDefault *default_for(const ConsentPolicy &policy, std::string_view purpose,
                                  std::string_view client) {
    for (const PurposeDefault &d : policy.purposes) {
        if (d.purpose == purpose && (d.clients.empty() || contains(d.clients, client))) {
            return &d;
        }
    }
    return nullptr;
}

void add_ids(std::set<std::string> &ids, const ClassAnswer &answer) {
    for (const Record *record : answer.by) {
        ids.insert(record->id);
    }
}

}  // namespace

Decision decide(const ConsentPolicy &policy, const Request &request,
                std::span<const Record> records) {
    // Purpose: validated against the value set; missing or unknown gets the fallback rule.
    std::string purpose;
    if (!request.purpose.empty() && is_purpose_of_use(request.purpose)) {
        purpose = request.purpose;
        if (std::find(request.client_purposes.begin(), request.client_purposes.end(), purpose) ==
            request.client_purposes.end()) {
            return refuse(reason::kPurposeNotAllowed,
                          "The client is not registered for the purpose of use " + purpose,
                          purpose);
        }
    }

    Decision d;
    d.purpose = purpose;
    std::set<std::string> ids;

    // ETREAT and BTG are emergency access whether or not the bundle configures break-glass: a
    // bundle without it grants them to no one.
    if (purpose == "ETREAT" || purpose == "BTG") {
        const BreakGlass &bg = policy.break_glass;
        if (!contains(bg.purposes, purpose) || !contains(bg.clients, request.client_id) ||
            (!bg.users.empty() && (request.user.empty() || !contains(bg.users, request.user)))) {
            return refuse(reason::kBreakGlassNotAllowed,
                          "Emergency access is not granted to this client or user", purpose);
        }
        if (request.break_glass_reason.empty()) {
            return refuse(reason::kBreakGlassReasonRequired,
                          "Emergency access needs a stated reason (X-Break-Glass-Reason)", purpose);
        }
        // Break-glass overrides the patient's refusals by design; the consents it overrode are
        // named so the audit record shows them.
        std::set<std::string> labels(policy.sensitive_labels.begin(),
                                     policy.sensitive_labels.end());
        for (const Record &record : records) {
            collect_labels(record.provision, labels);
        }
        labels.insert("");
        for (const std::string &label : labels) {
            add_ids(ids, combine(records, request, purpose, label, false));
        }
        d.permit = true;
        d.break_glass = true;
        d.reason = reason::kBreakGlass;
        d.message = "Emergency access";
        d.obligations = bg.withhold;
        d.consent_ids.assign(ids.begin(), ids.end());
        return d;
    }

    const PurposeDefault *rule =
        purpose.empty() ? nullptr : default_for(policy, purpose, request.client_id);
    const DefaultAccess access = rule != nullptr ? rule->access : policy.fallback.access;
    const std::vector<std::string> &withhold =
        rule != nullptr ? rule->withhold : policy.fallback.withhold;

    // Data without a sensitivity label decides whether the request goes through at all.
    const ClassAnswer general =
        request.patient.empty() ? ClassAnswer{} : combine(records, request, purpose, "", false);
    if (general.answer == Answer::Deny) {
        Decision refused = refuse(reason::kConsentDenied,
                                  "The patient's consent does not allow this access", purpose);
        for (const Record *record : general.by) {
            refused.consent_ids.push_back(record->id);
        }
        std::sort(refused.consent_ids.begin(), refused.consent_ids.end());
        return refused;
    }
    if (general.answer == Answer::None && access == DefaultAccess::ConsentRequired) {
        return refuse(reason::kConsentRequired,
                      request.patient.empty()
                          ? "This access needs the patient's consent; the request names no patient"
                          : "This access needs the patient's consent, and none allows it",
                      purpose);
    }
    add_ids(ids, general);

    // Then each sensitive class: withheld unless allowed, and refused labels always withheld.
    std::set<std::string> labels(policy.sensitive_labels.begin(), policy.sensitive_labels.end());
    labels.insert(withhold.begin(), withhold.end());
    for (const Record &record : records) {
        if (record.status == Status::Active && record.patient == request.patient) {
            collect_labels(record.provision, labels);
        }
    }
    for (const std::string &label : labels) {
        const bool explicit_only = contains(policy.explicit_consent_labels, label);
        const ClassAnswer answer = request.patient.empty()
                                       ? ClassAnswer{}
                                       : combine(records, request, purpose, label, explicit_only);
        bool withheld;
        if (answer.answer == Answer::Deny) {
            withheld = true;
        } else if (answer.answer == Answer::Permit) {
            withheld = false;
        } else {
            withheld = explicit_only || contains(withhold, label);
        }
        if (answer.answer != Answer::None) {
            add_ids(ids, answer);
        }
        if (withheld) {
            d.obligations.push_back(label);
        }
    }
    d.permit = true;
    d.reason = general.answer == Answer::Permit ? reason::kConsentPermit : reason::kPurposeDefault;
    d.message = "Permitted";
    d.consent_ids.assign(ids.begin(), ids.end());
    return d;
}

namespace {

void earliest_boundary(const Provision &provision, int64_t now, std::optional<int64_t> &earliest) {
    if (provision.period) {
        for (const std::optional<int64_t> &edge :
             {provision.period->start, provision.period->end}) {
            if (edge && *edge > now && (!earliest || *edge < *earliest)) {
                earliest = *edge;
            }
        }
    }
    for (const Provision &nested : provision.provisions) {
        earliest_boundary(nested, now, earliest);
    }
}

}  // namespace

std::optional<int64_t> next_period_boundary(std::span<const Record> records, int64_t now) {
    std::optional<int64_t> earliest;
    for (const Record &record : records) {
        earliest_boundary(record.provision, now, earliest);
    }
    return earliest;
}

}  // namespace ehrgate::consent
