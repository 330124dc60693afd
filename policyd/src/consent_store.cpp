#include "consent_store.hpp"

#include <openssl/rand.h>

#include <algorithm>

#include "ehrgate/json.hpp"
#include "ehrgate/json_text.hpp"

namespace ehrgate::policyd {

namespace {

constexpr std::string_view kRecords = "consents";
constexpr std::string_view kPatients = "consent_patients";
constexpr std::string_view kHistory = "consent_history";
constexpr char kSeparator = '\x1f';

std::string seq_key(uint64_t seq) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string key(16, '0');
    for (int i = 15; i >= 0; --i, seq >>= 4) {
        key[static_cast<size_t>(i)] = kHex[seq & 0xf];
    }
    return key;
}

}  // namespace

std::string ConsentChange::to_json() const {
    std::string out = "{\"seq\":" + std::to_string(seq) + ",\"at\":";
    json::append_string(out, consent::format_datetime(at));
    for (const auto &[key, value] : {std::pair<const char *, const std::string &>{"actor", actor},
                                     {"action", action},
                                     {"id", id},
                                     {"patient", patient},
                                     {"status", status},
                                     {"source", source}}) {
        out += ",\"";
        out += key;
        out += "\":";
        json::append_string(out, value);
    }
    out += '}';
    return out;
}

std::string ConsentStore::new_id() {
    unsigned char bytes[12];
    if (RAND_bytes(bytes, sizeof bytes) != 1) {
        return {};
    }
    static constexpr char kHex[] = "0123456789abcdef";
    std::string id = "c-";
    for (const unsigned char b : bytes) {
        id += kHex[b >> 4];
        id += kHex[b & 0xf];
    }
    return id;
}

void ConsentStore::index(const consent::Record &record) {
    by_id_[record.id] = record.patient;
    std::vector<consent::Record> &list = by_patient_[record.patient];
    const auto it = std::find_if(list.begin(), list.end(),
                                 [&](const consent::Record &r) { return r.id == record.id; });
    if (it != list.end()) {
        *it = record;
    } else {
        list.push_back(record);
    }
}

StoreStatus ConsentStore::load(StoreError *error) {
    bool corrupt = false;
    StoreStatus status = store_.for_each(
        kRecords,
        [&](std::string_view key, std::string_view value) {
            consent::ImportResult r = consent::import_fhir(value);
            if (!r.record || r.record->id != key) {
                corrupt = true;
                return;
            }
            index(*r.record);
        },
        error);
    if (status != StoreStatus::Ok) {
        return status;
    }
    if (corrupt) {
        if (error != nullptr) {
            error->status = StoreStatus::Corrupted;
            error->detail = "a stored consent record does not parse";
        }
        return StoreStatus::Corrupted;
    }
    status = store_.for_each(
        kHistory,
        [&](std::string_view key, std::string_view) {
            next_seq_ =
                std::max<uint64_t>(next_seq_, std::stoull(std::string(key), nullptr, 16) + 1);
        },
        error);
    epoch_ = next_seq_;
    return status;
}

StoreStatus ConsentStore::add(std::vector<consent::Record> records, const std::string &actor,
                              const std::string &source, int64_t now,
                              std::vector<ConsentChange> *changes, std::string *problem,
                              StoreError *error) {
    std::vector<std::string> seen;
    for (consent::Record &record : records) {
        if (record.id.empty()) {
            record.id = new_id();
            if (record.id.empty()) {
                *problem = "no random bytes for a consent id";
                return StoreStatus::Invalid;
            }
        }
        if (by_id_.count(record.id) != 0 ||
            std::find(seen.begin(), seen.end(), record.id) != seen.end()) {
            *problem = "consent id \"" + record.id +
                       "\" already exists; nothing was imported (revoke it, or import the "
                       "new version under another id)";
            return StoreStatus::Invalid;
        }
        seen.push_back(record.id);
    }
    // The values must outlive put_all: build them all first.
    std::vector<std::string> texts;
    std::vector<std::string> keys;
    std::vector<ConsentChange> made;
    texts.reserve(records.size() * 3);
    keys.reserve(records.size() * 2);
    uint64_t seq = next_seq_;
    for (const consent::Record &record : records) {
        ConsentChange change{seq++,
                             now,
                             actor,
                             "create",
                             record.id,
                             record.patient,
                             std::string(consent::status_name(record.status)),
                             source};
        texts.push_back(consent::export_fhir(record));
        texts.push_back(change.to_json());
        keys.push_back(record.patient + kSeparator + record.id);
        keys.push_back(seq_key(change.seq));
        made.push_back(std::move(change));
    }
    std::vector<Store::Put> puts;
    for (size_t i = 0; i < records.size(); ++i) {
        puts.push_back({kRecords, records[i].id, texts[2 * i]});
        puts.push_back({kPatients, keys[2 * i], ""});
        puts.push_back({kHistory, keys[2 * i + 1], texts[2 * i + 1]});
    }
    const StoreStatus status = store_.put_all(puts, error);
    if (status != StoreStatus::Ok) {
        return status;
    }
    next_seq_ = seq;
    ++epoch_;
    for (const consent::Record &record : records) {
        index(record);
    }
    *changes = std::move(made);
    return StoreStatus::Ok;
}

StoreStatus ConsentStore::revoke(const std::string &id, const std::string &actor, int64_t now,
                                 ConsentChange *change, std::string *problem, StoreError *error) {
    const consent::Record *current = find(id);
    if (current == nullptr) {
        return StoreStatus::NotFound;
    }
    if (current->status != consent::Status::Active) {
        *problem = "consent " + id + " is not active (" +
                   std::string(consent::status_name(current->status)) + ")";
        return StoreStatus::Invalid;
    }
    consent::Record revoked = *current;
    revoked.status = consent::Status::Inactive;
    ConsentChange made{next_seq_, now, actor, "revoke", id, revoked.patient, "inactive", "revoke"};
    const std::string text = consent::export_fhir(revoked);
    const std::string entry = made.to_json();
    const std::string key = seq_key(made.seq);
    const StoreStatus status =
        store_.put_all({{kRecords, id, text}, {kHistory, key, entry}}, error);
    if (status != StoreStatus::Ok) {
        return status;
    }
    ++next_seq_;
    ++epoch_;
    index(revoked);
    *change = std::move(made);
    return StoreStatus::Ok;
}

const consent::Record *ConsentStore::find(const std::string &id) const {
    const auto it = by_id_.find(id);
    if (it == by_id_.end()) {
        return nullptr;
    }
    for (const consent::Record &record : for_patient(it->second)) {
        if (record.id == id) {
            return &record;
        }
    }
    return nullptr;
}

std::span<const consent::Record> ConsentStore::for_patient(std::string_view patient) const {
    const auto it = by_patient_.find(patient);
    if (it == by_patient_.end()) {
        return {};
    }
    return it->second;
}

std::vector<std::string> ConsentStore::history(const std::string &id, StoreError *error) const {
    std::vector<std::string> out;
    const std::string needle = "\"id\":" + json::quote(id) + ",";
    store_.for_each(
        kHistory,
        [&](std::string_view, std::string_view value) {
            if (value.find(needle) != std::string_view::npos) {
                out.emplace_back(value);
            }
        },
        error);
    return out;
}

}  // namespace ehrgate::policyd
