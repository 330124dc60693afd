// Patient consents (FHIR R4 Consent shaped, shared/consent.hpp) kept in LMDB, with every change
// in an append-only history, and indexed by patient in memory for the per-request decision.
//
// LMDB layout (databases):
//   consents          id -> the record as FHIR Consent JSON (consent::export_fhir)
//   consent_patients  "<patient>\x1f<id>" -> ""           (the patient index, durable)
//   consent_history   16 hex digits of a sequence -> one JSON object per change:
//                     {"seq","at","actor","action","id","patient","status"}
// A change writes the record, the index entry and its history entry in one transaction
// (Store::put_all): either all of them are durable or none is.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "ehrgate/consent.hpp"
#include "store.hpp"

namespace ehrgate::policyd {

// One recorded change, as the history keeps it and the audit hook receives it.
struct ConsentChange {
    uint64_t seq = 0;
    int64_t at = 0;       // unix seconds
    std::string actor;    // who made it: "uid:<n>(<name>)" from the admin socket peer
    std::string action;   // "create" | "revoke"
    std::string id;       // consent id
    std::string patient;  // patient id
    std::string status;   // the record's status after the change
    std::string source;   // "grant" | "import"
    std::string to_json() const;
};

class ConsentStore {
  public:
    explicit ConsentStore(Store &store) : store_(store) {}

    // Reads every record and the history sequence. A record that no longer parses makes the
    // load fail (Corrupted): deciding without it could permit what it denies.
    StoreStatus load(StoreError *error);

    // Adds records (all or none). Records without an id get a fresh one; an id that exists is
    // refused with Invalid and `*problem` saying which. On success `changes` holds one entry per
    // record, and `epoch()` has moved.
    StoreStatus add(std::vector<consent::Record> records, const std::string &actor,
                    const std::string &source, int64_t now, std::vector<ConsentChange> *changes,
                    std::string *problem, StoreError *error);
    // Sets the record's status to inactive. NotFound for an unknown id; Invalid (with *problem)
    // when it is not active.
    StoreStatus revoke(const std::string &id, const std::string &actor, int64_t now,
                       ConsentChange *change, std::string *problem, StoreError *error);

    const consent::Record *find(const std::string &id) const;
    // The patient's records, every status.
    std::span<const consent::Record> for_patient(std::string_view patient) const;
    // History entries of one consent (JSON objects), oldest first.
    std::vector<std::string> history(const std::string &id, StoreError *error) const;

    // Moves with every change; a decision cache keyed on it can never serve a stale answer.
    uint64_t epoch() const { return epoch_; }
    size_t size() const { return by_id_.size(); }

    static std::string new_id();

  private:
    void index(const consent::Record &record);

    Store &store_;
    std::map<std::string, std::string, std::less<>> by_id_;  // id -> patient
    std::map<std::string, std::vector<consent::Record>, std::less<>> by_patient_;
    uint64_t next_seq_ = 1;
    uint64_t epoch_ = 0;
};

}  // namespace ehrgate::policyd
