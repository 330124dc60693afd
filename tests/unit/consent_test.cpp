// Consent records, FHIR import/export and the decision table (shared/src/consent.cpp).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ehrgate/consent.hpp"
#include "testdata.hpp"

namespace ehrgate::consent {
namespace {

constexpr int64_t kNow = 1'790'000'000;  // 2026-09-21
const std::vector<std::string> kSensitive = {"ETH", "HIV", "PSY", "SEX", "SUD"};

ConsentPolicy sandbox_policy() {
    ConsentPolicy p;
    p.enabled = true;
    p.sensitive_labels = kSensitive;
    p.explicit_consent_labels = {"ETH", "SUD"};
    p.purposes = {
        {"HOPERAT", {"batch"}, DefaultAccess::Permit, kSensitive},
        {"PATRQT", {}, DefaultAccess::ConsentRequired, kSensitive},
        {"TREAT", {"clinician"}, DefaultAccess::Permit, kSensitive},
    };
    p.fallback = {DefaultAccess::ConsentRequired, kSensitive};
    p.break_glass = {{"BTG", "ETREAT"}, {"clinician"}, {"Practitioner/er-doc"}, {}};
    return p;
}

const std::vector<std::string> kClinicianPurposes = {"BTG", "ETREAT", "TREAT"};
const std::vector<std::string> kAppPurposes = {"PATRQT"};

Request clinician(std::string_view purpose = "TREAT") {
    Request r;
    r.client_id = "clinician";
    r.user = "Practitioner/doc";
    r.patient = "p1";
    r.resource_type = "Observation";
    r.interaction = "search-type";
    r.purpose = purpose;
    r.tenant = "general-hospital";
    r.client_purposes = kClinicianPurposes;
    r.now = kNow;
    return r;
}

Request patient_app() {
    Request r = clinician("PATRQT");
    r.client_id = "patient-app";
    r.user = "Patient/p1";
    r.client_purposes = kAppPurposes;
    return r;
}

Provision permit_for(std::string actor) {
    Provision p;
    p.type = ProvisionType::Permit;
    p.actors = {std::move(actor)};
    return p;
}

Record record(std::string id, Provision provision, Status status = Status::Active) {
    Record r;
    r.id = std::move(id);
    r.patient = "p1";
    r.status = status;
    r.scope = "patient-privacy";
    r.provision = std::move(provision);
    return r;
}

std::vector<std::string> v(std::initializer_list<std::string> list) {
    return list;
}

TEST(ConsentPurpose, ValueSetCodes) {
    for (const char *code : {"TREAT", "ETREAT", "BTG", "HPAYMT", "HOPERAT", "PUBHLTH", "HRESCH",
                             "PATRQT", "FAMRQT", "PWATRNY", "CAREMGT"}) {
        EXPECT_TRUE(is_purpose_of_use(code)) << code;
    }
    for (const char *code : {"", "treat", "TRAET", "PurposeOfUse", "TREAT ", "ACT"}) {
        EXPECT_FALSE(is_purpose_of_use(code)) << code;
    }
}

TEST(ConsentTime, ParsesFhirPrecisions) {
    EXPECT_EQ(parse_fhir_datetime("1970-01-01", false), 0);
    EXPECT_EQ(parse_fhir_datetime("1970-01-01", true), 86400);
    EXPECT_EQ(parse_fhir_datetime("1970", true), 365 * 86400);
    EXPECT_EQ(parse_fhir_datetime("1970-02", true), (31 + 28) * 86400);
    EXPECT_EQ(parse_fhir_datetime("2016-06-23T17:02:33+10:00", false),
              parse_fhir_datetime("2016-06-23T07:02:33Z", false));
    EXPECT_EQ(parse_fhir_datetime("1964-01-01", false), -189388800);
    EXPECT_FALSE(parse_fhir_datetime("2016-06-23T17:02:33", false));  // no zone
    EXPECT_FALSE(parse_fhir_datetime("2016-02-30", false));
    EXPECT_FALSE(parse_fhir_datetime("2016-13", false));
    EXPECT_FALSE(parse_fhir_datetime("16-01-01", false));
    EXPECT_EQ(format_datetime(0), "1970-01-01T00:00:00Z");
    EXPECT_EQ(format_datetime(-189388800), "1964-01-01T00:00:00Z");
    EXPECT_EQ(parse_fhir_datetime(format_datetime(kNow), false), kNow);
}

// ---- Decision table ----

TEST(ConsentDecide, TreatmentDefaultPermitsWithholdingSensitiveClasses) {
    const Decision d = decide(sandbox_policy(), clinician(), {});
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.reason, reason::kPurposeDefault);
    EXPECT_EQ(d.obligations, kSensitive);
    EXPECT_TRUE(d.consent_ids.empty());
    EXPECT_EQ(d.purpose, "TREAT");
    EXPECT_FALSE(d.break_glass);
}

TEST(ConsentDecide, TreatmentDefaultAppliesOnlyToListedClients) {
    Request r = clinician();
    r.client_id = "other-clinician";
    const Decision d = decide(sandbox_policy(), r, {});
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentRequired);
}

TEST(ConsentDecide, ThirdPartyAppNeedsExplicitConsent) {
    const Decision d = decide(sandbox_policy(), patient_app(), {});
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentRequired);
}

TEST(ConsentDecide, ConsentPermitsTheApp) {
    const std::vector<Record> records = {record("c1", permit_for("client:patient-app"))};
    const Decision d = decide(sandbox_policy(), patient_app(), records);
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentPermit);
    EXPECT_EQ(d.consent_ids, v({"c1"}));
    // A consent without labels covers every class except the 42 CFR Part 2 ones, which must be
    // named.
    EXPECT_EQ(d.obligations, v({"ETH", "SUD"}));
}

TEST(ConsentDecide, PartTwoLabelsOpenOnlyWhenNamed) {
    Provision root = permit_for("client:patient-app");
    Provision sud;
    sud.type = ProvisionType::Permit;
    sud.security_labels = {"SUD", "ETH"};
    root.provisions.push_back(sud);
    const Decision d = decide(sandbox_policy(), patient_app(), std::vector{record("c1", root)});
    EXPECT_TRUE(d.permit);
    EXPECT_TRUE(d.obligations.empty());
}

TEST(ConsentDecide, PartTwoLabelsNeedConsentEvenForTreatment) {
    // A general treatment consent does not open substance-use data; one naming SUD does.
    const std::vector<Record> general = {record("c1", permit_for("client:clinician"))};
    Decision d = decide(sandbox_policy(), clinician(), general);
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, v({"ETH", "SUD"}));
    Provision named = permit_for("client:clinician");
    named.security_labels = {"SUD"};
    d = decide(sandbox_policy(), clinician(), std::vector{record("c2", named)});
    EXPECT_EQ(d.obligations, v({"ETH", "HIV", "PSY", "SEX"}));
    EXPECT_EQ(d.consent_ids, v({"c2"}));
}

TEST(ConsentDecide, ExplicitDenyRefuses) {
    Provision deny = permit_for("client:clinician");
    deny.type = ProvisionType::Deny;
    const Decision d = decide(sandbox_policy(), clinician(), std::vector{record("no", deny)});
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentDenied);
    EXPECT_EQ(d.consent_ids, v({"no"}));
}

TEST(ConsentDecide, DenyWinsOverPermitAcrossConsents) {
    Provision deny = permit_for("client:patient-app");
    deny.type = ProvisionType::Deny;
    const std::vector<Record> records = {record("yes", permit_for("client:patient-app")),
                                         record("no", deny)};
    const Decision d = decide(sandbox_policy(), patient_app(), records);
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.consent_ids, v({"no"}));
}

TEST(ConsentDecide, ExpiredConsentDoesNotCount) {
    Provision p = permit_for("client:patient-app");
    p.period = Period{kNow - 1000, kNow};  // end is exclusive
    Decision d = decide(sandbox_policy(), patient_app(), std::vector{record("c1", p)});
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentRequired);
    p.period = Period{kNow + 10, std::nullopt};  // not yet in force
    d = decide(sandbox_policy(), patient_app(), std::vector{record("c1", p)});
    EXPECT_FALSE(d.permit);
    p.period = Period{kNow - 10, kNow + 10};
    d = decide(sandbox_policy(), patient_app(), std::vector{record("c1", p)});
    EXPECT_TRUE(d.permit);
}

TEST(ConsentDecide, InactiveConsentDoesNotCount) {
    for (Status status : {Status::Inactive, Status::Draft, Status::Proposed, Status::Rejected,
                          Status::EnteredInError}) {
        const Decision d =
            decide(sandbox_policy(), patient_app(),
                   std::vector{record("c1", permit_for("client:patient-app"), status)});
        EXPECT_FALSE(d.permit) << status_name(status);
    }
    // An inactive deny does not refuse either.
    Provision deny = permit_for("client:clinician");
    deny.type = ProvisionType::Deny;
    EXPECT_TRUE(
        decide(sandbox_policy(), clinician(), std::vector{record("c", deny, Status::Inactive)})
            .permit);
}

TEST(ConsentDecide, WrongActorDoesNotCount) {
    const std::vector<Record> records = {record("c1", permit_for("client:someone-else"))};
    EXPECT_FALSE(decide(sandbox_policy(), patient_app(), records).permit);
    // Another patient's consent never counts.
    std::vector<Record> other = {record("c2", permit_for("client:patient-app"))};
    other[0].patient = "p2";
    EXPECT_FALSE(decide(sandbox_policy(), patient_app(), other).permit);
}

TEST(ConsentDecide, ActorsMatchUserAndOrganization) {
    Request r = patient_app();
    r.user = "https://ehr.example/fhir/RelatedPerson/mum";
    EXPECT_TRUE(
        decide(sandbox_policy(), r, std::vector{record("c", permit_for("RelatedPerson/mum"))})
            .permit);
    EXPECT_FALSE(
        decide(sandbox_policy(), r, std::vector{record("c", permit_for("RelatedPerson/um"))})
            .permit);
    EXPECT_TRUE(decide(sandbox_policy(), r,
                       std::vector{record("c", permit_for("Organization/general-hospital"))})
                    .permit);
}

TEST(ConsentDecide, WrongPurposeDoesNotCount) {
    Provision p = permit_for("client:patient-app");
    p.purposes = {"HRESCH"};
    EXPECT_FALSE(decide(sandbox_policy(), patient_app(), std::vector{record("c1", p)}).permit);
    p.purposes = {"PATRQT"};
    EXPECT_TRUE(decide(sandbox_policy(), patient_app(), std::vector{record("c1", p)}).permit);
}

TEST(ConsentDecide, PurposeNotRegisteredForClientRefuses) {
    const Decision d = decide(sandbox_policy(), clinician("HPAYMT"), {});
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kPurposeNotAllowed);
}

TEST(ConsentDecide, MissingOrUnknownPurposeGetsTheFallback) {
    for (const char *purpose : {"", "TRAET", "treat"}) {
        const Decision d = decide(sandbox_policy(), clinician(purpose), {});
        EXPECT_FALSE(d.permit) << purpose;
        EXPECT_EQ(d.reason, reason::kConsentRequired);
        EXPECT_EQ(d.purpose, "");
    }
    // A consent without a purpose restriction still lets the request through, withholding
    // what the fallback withholds where the consent is silent.
    const std::vector<Record> records = {record("c1", permit_for("client:clinician"))};
    const Decision d = decide(sandbox_policy(), clinician(""), records);
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, v({"ETH", "SUD"}));
    // One restricted to a purpose does not.
    Provision treat = permit_for("client:clinician");
    treat.purposes = {"TREAT"};
    EXPECT_FALSE(decide(sandbox_policy(), clinician(""), std::vector{record("c2", treat)}).permit);
}

TEST(ConsentDecide, LabelSpecificDenyWithholdsOnlyThatLabel) {
    // The sandbox's fixture: permit, except psychiatric data.
    Provision root = permit_for("client:patient-app");
    Provision psy;
    psy.type = ProvisionType::Deny;
    psy.security_labels = {"PSY"};
    root.provisions.push_back(psy);
    const Decision d = decide(sandbox_policy(), patient_app(), std::vector{record("c1", root)});
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, v({"ETH", "PSY", "SUD"}));
    // For the clinician, whose default withholds PSY anyway, the same deny keeps it withheld
    // even if another consent permits everything.
    Provision all = permit_for("client:clinician");
    Provision deny_psy = permit_for("client:clinician");
    deny_psy.type = ProvisionType::Deny;
    deny_psy.security_labels = {"PSY"};
    const Decision c =
        decide(sandbox_policy(), clinician(), std::vector{record("a", all), record("b", deny_psy)});
    EXPECT_TRUE(c.permit);
    EXPECT_EQ(c.obligations, v({"ETH", "PSY", "SUD"}));
    EXPECT_EQ(c.consent_ids, v({"a", "b"}));
}

TEST(ConsentDecide, NestedProvisionsAreExceptionsToTheirParent) {
    // Deny everything to the app, except (permit) Observations, except (deny) HIV ones.
    Provision root = permit_for("client:patient-app");
    root.type = ProvisionType::Deny;
    Provision obs;
    obs.type = ProvisionType::Permit;
    obs.classes = {"Observation"};
    Provision hiv;
    hiv.type = ProvisionType::Deny;
    hiv.security_labels = {"HIV"};
    obs.provisions.push_back(hiv);
    root.provisions.push_back(obs);
    const std::vector<Record> records = {record("n", root)};
    Decision d = decide(sandbox_policy(), patient_app(), records);
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, v({"ETH", "HIV", "SUD"}));
    Request conditions = patient_app();
    conditions.resource_type = "Condition";
    d = decide(sandbox_policy(), conditions, records);
    EXPECT_FALSE(d.permit);
    EXPECT_EQ(d.reason, reason::kConsentDenied);
    // A nested rule that does not apply (another actor) leaves the parent's answer.
    root.provisions[0].actors = {"client:someone-else"};
    d = decide(sandbox_policy(), patient_app(), std::vector{record("n", root)});
    EXPECT_FALSE(d.permit);
}

TEST(ConsentDecide, WritesMatchCorrectActionOnly) {
    Provision p = permit_for("client:patient-app");
    p.actions = {"access"};
    Request write = patient_app();
    write.interaction = "update";
    EXPECT_TRUE(decide(sandbox_policy(), patient_app(), std::vector{record("c", p)}).permit);
    EXPECT_FALSE(decide(sandbox_policy(), write, std::vector{record("c", p)}).permit);
    p.actions = {"correct"};
    EXPECT_TRUE(decide(sandbox_policy(), write, std::vector{record("c", p)}).permit);
}

TEST(ConsentDecide, UnenforceableNarrowingNeverPermits) {
    Provision p = permit_for("client:patient-app");
    p.unenforceable_narrowing = true;
    EXPECT_FALSE(decide(sandbox_policy(), patient_app(), std::vector{record("c", p)}).permit);
    p.type = ProvisionType::Deny;
    Request r = clinician();
    p.actors = {"client:clinician"};
    EXPECT_FALSE(decide(sandbox_policy(), r, std::vector{record("c", p)}).permit);
}

TEST(ConsentDecide, BreakGlassForNamedClientAndUserWithReason) {
    Request r = clinician("ETREAT");
    r.user = "Practitioner/er-doc";
    r.break_glass_reason = "unconscious patient in ED";
    Provision deny = permit_for("client:clinician");
    deny.type = ProvisionType::Deny;
    const Decision d = decide(sandbox_policy(), r, std::vector{record("refusal", deny)});
    EXPECT_TRUE(d.permit);
    EXPECT_TRUE(d.break_glass);
    EXPECT_EQ(d.reason, reason::kBreakGlass);
    EXPECT_TRUE(d.obligations.empty());
    EXPECT_EQ(d.consent_ids, v({"refusal"}));  // overridden, and named for the audit

    Request no_reason = r;
    no_reason.break_glass_reason = "";
    EXPECT_EQ(decide(sandbox_policy(), no_reason, {}).reason, reason::kBreakGlassReasonRequired);
    Request other_user = r;
    other_user.user = "Practitioner/doc";
    EXPECT_EQ(decide(sandbox_policy(), other_user, {}).reason, reason::kBreakGlassNotAllowed);
    Request app = patient_app();
    app.purpose = "BTG";
    app.break_glass_reason = "x";
    const std::vector<std::string> app_purposes = {"BTG", "PATRQT"};
    app.client_purposes = app_purposes;
    EXPECT_EQ(decide(sandbox_policy(), app, {}).reason, reason::kBreakGlassNotAllowed);
    // A client not registered for the purpose is refused before break-glass is considered.
    Request unregistered = r;
    const std::vector<std::string> treat_only = {"TREAT"};
    unregistered.client_purposes = treat_only;
    EXPECT_EQ(decide(sandbox_policy(), unregistered, {}).reason, reason::kPurposeNotAllowed);
}

TEST(ConsentDecide, BreakGlassStillWithholdsConfiguredLabels) {
    ConsentPolicy p = sandbox_policy();
    p.break_glass.withhold = {"PSY"};
    Request r = clinician("BTG");
    r.user = "Practitioner/er-doc";
    r.break_glass_reason = "r";
    EXPECT_EQ(decide(p, r, {}).obligations, v({"PSY"}));
}

TEST(ConsentDecide, NoPatientUsesDefaultsOnly) {
    Request batch = clinician("HOPERAT");
    batch.client_id = "batch";
    batch.patient = "";
    const std::vector<std::string> purposes = {"HOPERAT"};
    batch.client_purposes = purposes;
    Decision d = decide(sandbox_policy(), batch, {});
    EXPECT_TRUE(d.permit);
    EXPECT_EQ(d.obligations, kSensitive);
    Request app = patient_app();
    app.patient = "";
    EXPECT_FALSE(decide(sandbox_policy(), app, {}).permit);
}

// ---- FHIR import/export ----

TEST(ConsentImport, ReadsProvisionsActorsAndPeriods) {
    const ImportResult r = import_fhir(R"({
      "resourceType": "Consent", "id": "c-1", "status": "active",
      "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "patient-privacy"}]},
      "patient": {"reference": "Patient/p1"}, "dateTime": "2026-01-02",
      "policyRule": {"coding": [{"code": "OPTIN"}]},
      "provision": {
        "period": {"start": "2026-01-01", "end": "2026-12-31"},
        "actor": [{"reference": {"identifier": {"system": "urn:ehrgate:client",
                                                "value": "demo-patient-app"}}},
                  {"reference": {"reference": "Practitioner/13"}}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                     "code": "PATRQT"}],
        "provision": [{"type": "deny", "securityLabel": [{"code": "PSY"}],
                       "class": [{"code": "Condition"}]}]}})");
    ASSERT_TRUE(r.record) << r.error;
    EXPECT_EQ(r.record->id, "c-1");
    EXPECT_EQ(r.record->patient, "p1");
    EXPECT_EQ(r.record->status, Status::Active);
    EXPECT_EQ(r.record->provision.type, ProvisionType::Permit);
    EXPECT_EQ(r.record->provision.actors, v({"client:demo-patient-app", "Practitioner/13"}));
    EXPECT_EQ(r.record->provision.period->end, parse_fhir_datetime("2027-01-01", false));
    ASSERT_EQ(r.record->provision.provisions.size(), 1u);
    EXPECT_EQ(r.record->provision.provisions[0].type, ProvisionType::Deny);
    EXPECT_EQ(r.record->provision.provisions[0].security_labels, v({"PSY"}));
    EXPECT_EQ(r.record->provision.provisions[0].classes, v({"Condition"}));
    // Round trip.
    const ImportResult again = import_fhir(export_fhir(*r.record));
    ASSERT_TRUE(again.record) << again.error;
    EXPECT_EQ(*again.record, *r.record);
}

TEST(ConsentImport, RefusesBadInputWithThePlace) {
    const struct {
        const char *json;
        const char *error_starts;
    } cases[] = {
        {"[", "not valid JSON"},
        {R"({"resourceType":"Patient"})", "Consent.resourceType"},
        {R"({"resourceType":"Consent","patient":{"reference":"Patient/p"}})", "Consent.status"},
        {R"({"resourceType":"Consent","status":"activ","patient":{"reference":"Patient/p"}})",
         "Consent.status"},
        {R"({"resourceType":"Consent","status":"active"})", "Consent.patient"},
        {R"({"resourceType":"Consent","status":"active","patient":{"reference":"Group/p"}})",
         "Consent.patient.reference"},
        {R"({"resourceType":"Consent","status":"active","patient":{"reference":"Patient/p"},
             "provision":{"purpose":[{"code":"TRAET"}]}})",
         "Consent.provision.purpose[0].code"},
        {R"({"resourceType":"Consent","status":"active","patient":{"reference":"Patient/p"},
             "provision":{"provision":[{"type":"maybe"}]}})",
         "Consent.provision.provision[0].type"},
        {R"({"resourceType":"Consent","status":"active","patient":{"reference":"Patient/p"},
             "provision":{"period":{"start":"2026-13-01"}}})",
         "Consent.provision.period.start"},
        {R"({"resourceType":"Consent","status":"active","patient":{"reference":"Patient/p"},
             "provision":{"actor":[{"reference":{"reference":"nonsense"}}]}})",
         "Consent.provision.actor[0].reference.reference"},
        {R"({"resourceType":"Consent","id":"a b","status":"active","patient":{"reference":"Patient/p"}})",
         "Consent.id"},
    };
    for (const auto &c : cases) {
        const ImportResult r = import_fhir(c.json);
        EXPECT_FALSE(r.record) << c.json;
        EXPECT_EQ(r.error.rfind(c.error_starts, 0), 0u) << r.error;
    }
}

TEST(ConsentImport, OptOutRootDenies) {
    const ImportResult r = import_fhir(R"({"resourceType":"Consent","status":"active",
        "patient":{"reference":"Patient/p1"},"policyRule":{"coding":[{"code":"OPTOUT"}]},
        "provision":{"actor":[{"reference":{"reference":"Device/clinician"}}]}})");
    ASSERT_TRUE(r.record) << r.error;
    EXPECT_EQ(r.record->provision.type, ProvisionType::Deny);
    EXPECT_EQ(decide(sandbox_policy(), clinician(), std::vector{*r.record}).reason,
              reason::kConsentDenied);
}

std::filesystem::path testdata() {
    return ehrgate::testing::testdata_dir();
}

TEST(ConsentImport, ImportsTheR4Examples) {
    const std::filesystem::path dir = testdata() / "fhir" / "r4-core";
    if (!std::filesystem::exists(dir)) {
        GTEST_SKIP() << "FHIR R4 examples not found at " << dir;
    }
    size_t imported = 0;
    for (const auto &entry : std::filesystem::directory_iterator(dir)) {
        const std::string name = entry.path().filename().string();
        if (!name.starts_with("Consent-")) {
            continue;
        }
        std::ifstream in(entry.path());
        std::stringstream text;
        text << in.rdbuf();
        const ImportResult r = import_fhir(text.str());
        ASSERT_TRUE(r.record) << name << ": " << r.error;
        EXPECT_FALSE(r.record->patient.empty());
        const ImportResult again = import_fhir(export_fhir(*r.record));
        ASSERT_TRUE(again.record) << name << ": " << again.error;
        EXPECT_EQ(*again.record, *r.record) << name;
        ++imported;
        if (name == "Consent-consent-example-notTime.json") {
            // Permit only in January 2015.
            EXPECT_EQ(r.record->provision.period->start, parse_fhir_datetime("2015-01-01", false));
        }
        if (name == "Consent-consent-example-smartonfhir.json") {
            ASSERT_EQ(r.record->provision.provisions.size(), 1u);
            EXPECT_EQ(r.record->provision.provisions[0].classes, v({"MedicationRequest"}));
        }
    }
    EXPECT_GE(imported, 10u);
}

}  // namespace
}  // namespace ehrgate::consent

namespace ehrgate::consent {
namespace {

TEST(ConsentPeriods, NextBoundaryLooksIntoNestedProvisions) {
    Record a;
    a.provision.period = Period{100, 500};
    Provision nested;
    nested.period = Period{std::nullopt, 300};
    Provision deeper;
    deeper.period = Period{250, std::nullopt};
    nested.provisions = {deeper};
    a.provision.provisions = {nested};
    Record open_ended;  // no period at all
    const std::vector<Record> records = {open_ended, a};
    EXPECT_EQ(next_period_boundary(records, 0), 100);
    EXPECT_EQ(next_period_boundary(records, 100), 250);  // "after now": 100 itself is past
    EXPECT_EQ(next_period_boundary(records, 260), 300);
    EXPECT_EQ(next_period_boundary(records, 300), 500);
    EXPECT_EQ(next_period_boundary(records, 500), std::nullopt);
    EXPECT_EQ(next_period_boundary({}, 0), std::nullopt);
}

}  // namespace
}  // namespace ehrgate::consent
