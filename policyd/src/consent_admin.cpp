// Consent admin commands on the admin socket (ehrgatectl consent ...): grant, revoke, list, show,
// import. Every change goes through ConsentStore (durable, with history) and then
// Server::on_consent_change.
#include <cstdlib>
#include <ctime>

#include "ehrgate/consent.hpp"
#include "ehrgate/fhir_request.hpp"
#include "ehrgate/json.hpp"
#include "ehrgate/json_text.hpp"
#include "log.hpp"
#include "server.hpp"

namespace ehrgate::policyd {

namespace {

std::vector<std::string> split_commas(std::string_view text) {
    std::vector<std::string> out;
    while (!text.empty()) {
        const size_t comma = text.find(',');
        const std::string_view item = text.substr(0, comma);
        if (!item.empty()) {
            out.emplace_back(item);
        }
        if (comma == std::string_view::npos) {
            break;
        }
        text.remove_prefix(comma + 1);
    }
    return out;
}

// --until: a FHIR dateTime (a date means until the end of that day, UTC), or unix seconds.
std::optional<int64_t> parse_until(std::string_view text) {
    if (!text.empty() && text.find_first_not_of("0123456789") == std::string_view::npos &&
        text.size() <= 12) {
        return std::strtoll(std::string(text).c_str(), nullptr, 10);
    }
    return consent::parse_fhir_datetime(text, true);
}

std::string summary_json(const consent::Record &record) {
    std::string out = "{\"id\":";
    json::append_string(out, record.id);
    out += ",\"status\":";
    json::append_string(out, consent::status_name(record.status));
    out += ",\"resource\":" + consent::export_fhir(record) + "}";
    return out;
}

// The Consent resources in an import file: one Consent, a JSON array of them, or a FHIR Bundle
// whose entries' resources are Consents. All of them must be valid, or none is imported.
bool consent_records(std::string_view text, std::vector<consent::Record> *out, std::string *error) {
    json::ParseError parse_error;
    const std::optional<json::Value> root =
        json::parse(text, &parse_error, json::Limits{size_t{4} << 20, 64});
    if (!root) {
        *error = "not valid JSON: " + parse_error.message + " at byte " +
                 std::to_string(parse_error.offset);
        return false;
    }
    std::vector<std::pair<std::string, const json::Value *>> items;
    const json::Value *type = root->find("resourceType");
    const std::string *type_name = type != nullptr ? type->as_string() : nullptr;
    if (const auto *array = root->as_array()) {
        for (size_t i = 0; i < array->size(); ++i) {
            items.emplace_back("[" + std::to_string(i) + "] ", &(*array)[i]);
        }
    } else if (type_name != nullptr && *type_name == "Bundle") {
        const json::Value *entries = root->find("entry");
        if (entries != nullptr && entries->as_array() != nullptr) {
            for (size_t i = 0; i < entries->as_array()->size(); ++i) {
                const json::Value &entry = (*entries->as_array())[i];
                const json::Value *resource = entry.find("resource");
                if (resource == nullptr) {
                    *error = "Bundle.entry[" + std::to_string(i) + "]: no resource";
                    return false;
                }
                items.emplace_back("Bundle.entry[" + std::to_string(i) + "].resource: ", resource);
            }
        }
    } else {
        items.emplace_back("", &*root);
    }
    if (items.empty()) {
        *error = "no Consent resources found";
        return false;
    }
    for (const auto &[where, item] : items) {
        consent::ImportResult r = consent::import_fhir(*item);
        if (!r.record) {
            *error = where + r.error;
            return false;
        }
        out->push_back(std::move(*r.record));
    }
    return true;
}

}  // namespace

void Server::on_consent_change(const ConsentChange &change) {
    ++consent_changes_;
    // Before anything else: from here on no worker may answer from a decision made before it.
    push_consent_epoch();
    // The patient id stays out of the log; the history and the audit log have it.
    log::info("consent " + change.action + " " + change.id + " by " + change.actor);
    if (audit_ != nullptr) {
        audit_->append_event(audit::Kind::ConsentChange,
                             "consent " + change.action + " by " + change.actor + " (" +
                                 change.source + "), status " + change.status,
                             {}, {change.patient}, {change.id});
    }
}

bool Server::handle_consent_admin(const protocol::AdminRequest &request, const std::string &actor,
                                  protocol::AdminReply &reply) {
    const std::string &command = request.command;
    if (!command.starts_with("consent-")) {
        return false;
    }
    reply.ok = false;
    reply.json = "{}";
    if (command == "consent-jwks") {
        if (signer_ == nullptr) {
            reply.message = "this policyd signs no consent contexts";
            return true;
        }
        reply.ok = true;
        reply.message = signer_->kid();
        reply.json = signer_->jwks();
        return true;
    }
    if (consents_ == nullptr) {
        reply.message = "this policyd has no consent store";
        return true;
    }
    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    StoreError error;
    std::string problem;
    const auto store_failure = [&](StoreStatus status) {
        reply.message = problem.empty() ? std::string("not recorded: ") +
                                              store_status_name(status) + " (" + error.detail + ")"
                                        : problem;
    };

    if (command == "consent-grant") {
        const std::string patient(request.arg("patient"));
        const std::string client(request.arg("client"));
        const std::string purpose(request.arg("purpose"));
        if (!fhir::is_valid_id(patient)) {
            reply.message = "--patient must be a FHIR id ([A-Za-z0-9-.]{1,64})";
            return true;
        }
        if (policy_.snapshot().bundle.find_client(client) == nullptr) {
            reply.message =
                "--client \"" + client.substr(0, 64) + "\" is not a client of the active policy";
            return true;
        }
        if (!consent::is_purpose_of_use(purpose)) {
            reply.message = "--purpose \"" + purpose.substr(0, 32) +
                            "\" is not an HL7 v3 PurposeOfUse code (e.g. TREAT, PATRQT)";
            return true;
        }
        consent::Record record;
        record.patient = patient;
        record.status = consent::Status::Active;
        record.scope = "patient-privacy";
        record.policy_rule = "OPTIN";
        record.date_time = now;
        record.provision.type = consent::ProvisionType::Permit;
        record.provision.actors = {"client:" + client};
        record.provision.purposes = {purpose};
        record.provision.period = consent::Period{now, std::nullopt};
        if (const std::string_view until = request.arg("until"); !until.empty()) {
            const std::optional<int64_t> end = parse_until(until);
            if (!end || *end <= now) {
                reply.message =
                    "--until must be a future time: a FHIR dateTime such as "
                    "2027-01-31 or 2027-01-31T12:00:00Z, or unix seconds";
                return true;
            }
            record.provision.period->end = end;
        }
        for (const std::string &label : split_commas(request.arg("deny_labels"))) {
            if (!consent::is_label_code(label)) {
                reply.message = "--deny-label \"" + label.substr(0, 32) +
                                "\" is not a security label code (e.g. PSY)";
                return true;
            }
            consent::Provision deny;
            deny.type = consent::ProvisionType::Deny;
            deny.security_labels = {label};
            record.provision.provisions.push_back(std::move(deny));
        }
        std::vector<ConsentChange> changes;
        const StoreStatus status =
            consents_->add({record}, actor, "grant", now, &changes, &problem, &error);
        if (status != StoreStatus::Ok) {
            store_failure(status);
            return true;
        }
        for (const ConsentChange &change : changes) {
            on_consent_change(change);
        }
        reply.ok = true;
        reply.message = changes[0].id;
        reply.json = summary_json(*consents_->find(changes[0].id));
        return true;
    }
    if (command == "consent-revoke") {
        const std::string id(request.arg("id"));
        ConsentChange change;
        const StoreStatus status = consents_->revoke(id, actor, now, &change, &problem, &error);
        if (status == StoreStatus::NotFound) {
            reply.message = "no consent with id \"" + id.substr(0, 64) + "\"";
            return true;
        }
        if (status != StoreStatus::Ok) {
            store_failure(status);
            return true;
        }
        on_consent_change(change);
        reply.ok = true;
        reply.message = "consent " + id + " revoked";
        reply.json = summary_json(*consents_->find(id));
        return true;
    }
    if (command == "consent-list") {
        const std::string patient(request.arg("patient"));
        if (!fhir::is_valid_id(patient)) {
            reply.message = "--patient must be a FHIR id ([A-Za-z0-9-.]{1,64})";
            return true;
        }
        reply.ok = true;
        reply.json = "{\"patient\":";
        json::append_string(reply.json, patient);
        reply.json += ",\"consents\":[";
        size_t n = 0;
        for (const consent::Record &record : consents_->for_patient(patient)) {
            reply.json += n++ == 0 ? "" : ",";
            reply.json += summary_json(record);
        }
        reply.json += "]}";
        reply.message = std::to_string(n) + " consent(s)";
        return true;
    }
    if (command == "consent-show") {
        const std::string id(request.arg("id"));
        const consent::Record *record = consents_->find(id);
        if (record == nullptr) {
            reply.message = "no consent with id \"" + id.substr(0, 64) + "\"";
            return true;
        }
        reply.ok = true;
        reply.message = id;
        reply.json = summary_json(*record);
        reply.json.pop_back();
        reply.json += ",\"history\":[";
        const std::vector<std::string> history = consents_->history(id, &error);
        for (size_t i = 0; i < history.size(); ++i) {
            reply.json += (i == 0 ? "" : ",") + history[i];
        }
        reply.json += "]}";
        return true;
    }
    if (command == "consent-import") {
        std::vector<consent::Record> records;
        std::string invalid;
        if (!consent_records(request.arg("json"), &records, &invalid)) {
            reply.message = "invalid import: " + invalid + "; nothing was imported";
            return true;
        }
        std::vector<ConsentChange> changes;
        const StoreStatus status =
            consents_->add(std::move(records), actor, "import", now, &changes, &problem, &error);
        if (status != StoreStatus::Ok) {
            store_failure(status);
            if (problem.empty()) {
                reply.message += "; nothing was imported";
            }
            return true;
        }
        reply.ok = true;
        reply.json = "{\"imported\":[";
        for (size_t i = 0; i < changes.size(); ++i) {
            on_consent_change(changes[i]);
            reply.json += i == 0 ? "" : ",";
            json::append_string(reply.json, changes[i].id);
        }
        reply.json += "]}";
        reply.message = changes.size() == 1 ? changes[0].id
                                            : std::to_string(changes.size()) + " consents imported";
        return true;
    }
    reply.message = "unknown consent command \"" + command.substr(0, 32) +
                    "\"; known: consent-grant, consent-revoke, consent-list, consent-show, "
                    "consent-import, consent-jwks";
    return true;
}

}  // namespace ehrgate::policyd
