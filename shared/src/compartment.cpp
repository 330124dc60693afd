#include "ehrgate/compartment.hpp"

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

namespace ehrgate::compartment {

namespace {

using namespace std::string_view_literals;

enum Flags : unsigned {
    kNoFlags = 0,
    kPatientAlias = 1,     // Member::patient_alias
    kSeveralPatients = 2,  // !Member::single_patient_reference
    kNoPatientAccess = 4,  // !Member::patient_access
};

constexpr Member member(std::string_view type, std::span<const std::string_view> params,
                        std::span<const std::string_view> paths, std::string_view narrow_param,
                        unsigned flags) {
    return Member{type,
                  params,
                  paths,
                  narrow_param,
                  (flags & kPatientAlias) != 0,
                  (flags & kSeveralPatients) == 0,
                  (flags & kNoPatientAccess) == 0};
}

// FHIR R4 (4.0.1) CompartmentDefinition/patient: every resource type with its `param` list, and
// the elements those search parameters select (their R4 expressions without the
// `.where(resolve() is Patient)` filters, which a reference check applies anyway).
// kPatientAlias: the base types of R4's shared `patient` search parameter (SearchParameter
// clinical-patient) whose compartment entry lists `subject` instead.
// kSeveralPatients: `patient`/`subject` may hold several references (Account.subject 0..*,
// AuditEvent agent/entity, Person.link.target, Provenance.target, Group.member).
constexpr std::array kAccountParams = {"subject"sv};
constexpr std::array kAccountPaths = {"subject"sv};
constexpr std::array kAdverseEventParams = {"subject"sv};
constexpr std::array kAdverseEventPaths = {"subject"sv};
constexpr std::array kAllergyIntoleranceParams = {"patient"sv, "recorder"sv, "asserter"sv};
constexpr std::array kAllergyIntolerancePaths = {"patient"sv, "recorder"sv, "asserter"sv};
constexpr std::array kAppointmentParams = {"actor"sv};
constexpr std::array kAppointmentPaths = {"participant.actor"sv};
constexpr std::array kAppointmentResponseParams = {"actor"sv};
constexpr std::array kAppointmentResponsePaths = {"actor"sv};
constexpr std::array kAuditEventParams = {"patient"sv};
constexpr std::array kAuditEventPaths = {"agent.who"sv, "entity.what"sv};
constexpr std::array kBasicParams = {"patient"sv, "author"sv};
constexpr std::array kBasicPaths = {"subject"sv, "author"sv};
constexpr std::array kBodyStructureParams = {"patient"sv};
constexpr std::array kBodyStructurePaths = {"patient"sv};
constexpr std::array kCarePlanParams = {"patient"sv, "performer"sv};
constexpr std::array kCarePlanPaths = {"subject"sv, "activity.detail.performer"sv};
constexpr std::array kCareTeamParams = {"patient"sv, "participant"sv};
constexpr std::array kCareTeamPaths = {"subject"sv, "participant.member"sv};
constexpr std::array kChargeItemParams = {"subject"sv};
constexpr std::array kChargeItemPaths = {"subject"sv};
constexpr std::array kClaimParams = {"patient"sv, "payee"sv};
constexpr std::array kClaimPaths = {"patient"sv, "payee.party"sv};
constexpr std::array kClaimResponseParams = {"patient"sv};
constexpr std::array kClaimResponsePaths = {"patient"sv};
constexpr std::array kClinicalImpressionParams = {"subject"sv};
constexpr std::array kClinicalImpressionPaths = {"subject"sv};
constexpr std::array kCommunicationParams = {"subject"sv, "sender"sv, "recipient"sv};
constexpr std::array kCommunicationPaths = {"subject"sv, "sender"sv, "recipient"sv};
constexpr std::array kCommunicationRequestParams = {"subject"sv, "sender"sv, "recipient"sv,
                                                    "requester"sv};
constexpr std::array kCommunicationRequestPaths = {"subject"sv, "sender"sv, "recipient"sv,
                                                   "requester"sv};
constexpr std::array kCompositionParams = {"subject"sv, "author"sv, "attester"sv};
constexpr std::array kCompositionPaths = {"subject"sv, "author"sv, "attester.party"sv};
constexpr std::array kConditionParams = {"patient"sv, "asserter"sv};
constexpr std::array kConditionPaths = {"subject"sv, "asserter"sv};
constexpr std::array kConsentParams = {"patient"sv};
constexpr std::array kConsentPaths = {"patient"sv};
constexpr std::array kCoverageParams = {"policy-holder"sv, "subscriber"sv, "beneficiary"sv,
                                        "payor"sv};
constexpr std::array kCoveragePaths = {"policyHolder"sv, "subscriber"sv, "beneficiary"sv,
                                       "payor"sv};
constexpr std::array kCoverageEligibilityRequestParams = {"patient"sv};
constexpr std::array kCoverageEligibilityRequestPaths = {"patient"sv};
constexpr std::array kCoverageEligibilityResponseParams = {"patient"sv};
constexpr std::array kCoverageEligibilityResponsePaths = {"patient"sv};
constexpr std::array kDetectedIssueParams = {"patient"sv};
constexpr std::array kDetectedIssuePaths = {"patient"sv};
constexpr std::array kDeviceRequestParams = {"subject"sv, "performer"sv};
constexpr std::array kDeviceRequestPaths = {"subject"sv, "performer"sv};
constexpr std::array kDeviceUseStatementParams = {"subject"sv};
constexpr std::array kDeviceUseStatementPaths = {"subject"sv};
constexpr std::array kDiagnosticReportParams = {"subject"sv};
constexpr std::array kDiagnosticReportPaths = {"subject"sv};
constexpr std::array kDocumentManifestParams = {"subject"sv, "author"sv, "recipient"sv};
constexpr std::array kDocumentManifestPaths = {"subject"sv, "author"sv, "recipient"sv};
constexpr std::array kDocumentReferenceParams = {"subject"sv, "author"sv};
constexpr std::array kDocumentReferencePaths = {"subject"sv, "author"sv};
constexpr std::array kEncounterParams = {"patient"sv};
constexpr std::array kEncounterPaths = {"subject"sv};
constexpr std::array kEnrollmentRequestParams = {"subject"sv};
constexpr std::array kEnrollmentRequestPaths = {"candidate"sv};
constexpr std::array kEpisodeOfCareParams = {"patient"sv};
constexpr std::array kEpisodeOfCarePaths = {"patient"sv};
constexpr std::array kExplanationOfBenefitParams = {"patient"sv, "payee"sv};
constexpr std::array kExplanationOfBenefitPaths = {"patient"sv, "payee.party"sv};
constexpr std::array kFamilyMemberHistoryParams = {"patient"sv};
constexpr std::array kFamilyMemberHistoryPaths = {"patient"sv};
constexpr std::array kFlagParams = {"patient"sv};
constexpr std::array kFlagPaths = {"subject"sv};
constexpr std::array kGoalParams = {"patient"sv};
constexpr std::array kGoalPaths = {"subject"sv};
constexpr std::array kGroupParams = {"member"sv};
constexpr std::array kGroupPaths = {"member.entity"sv};
constexpr std::array kImagingStudyParams = {"patient"sv};
constexpr std::array kImagingStudyPaths = {"subject"sv};
constexpr std::array kImmunizationParams = {"patient"sv};
constexpr std::array kImmunizationPaths = {"patient"sv};
constexpr std::array kImmunizationEvaluationParams = {"patient"sv};
constexpr std::array kImmunizationEvaluationPaths = {"patient"sv};
constexpr std::array kImmunizationRecommendationParams = {"patient"sv};
constexpr std::array kImmunizationRecommendationPaths = {"patient"sv};
constexpr std::array kInvoiceParams = {"subject"sv, "patient"sv, "recipient"sv};
constexpr std::array kInvoicePaths = {"subject"sv, "recipient"sv};
constexpr std::array kListParams = {"subject"sv, "source"sv};
constexpr std::array kListPaths = {"subject"sv, "source"sv};
constexpr std::array kMeasureReportParams = {"patient"sv};
constexpr std::array kMeasureReportPaths = {"subject"sv};
constexpr std::array kMediaParams = {"subject"sv};
constexpr std::array kMediaPaths = {"subject"sv};
constexpr std::array kMedicationAdministrationParams = {"patient"sv, "performer"sv, "subject"sv};
constexpr std::array kMedicationAdministrationPaths = {"subject"sv, "performer.actor"sv};
constexpr std::array kMedicationDispenseParams = {"subject"sv, "patient"sv, "receiver"sv};
constexpr std::array kMedicationDispensePaths = {"subject"sv, "receiver"sv};
constexpr std::array kMedicationRequestParams = {"subject"sv};
constexpr std::array kMedicationRequestPaths = {"subject"sv};
constexpr std::array kMedicationStatementParams = {"subject"sv};
constexpr std::array kMedicationStatementPaths = {"subject"sv};
constexpr std::array kMolecularSequenceParams = {"patient"sv};
constexpr std::array kMolecularSequencePaths = {"patient"sv};
constexpr std::array kNutritionOrderParams = {"patient"sv};
constexpr std::array kNutritionOrderPaths = {"patient"sv};
constexpr std::array kObservationParams = {"subject"sv, "performer"sv};
constexpr std::array kObservationPaths = {"subject"sv, "performer"sv};
constexpr std::array kPatientParams = {"link"sv};
constexpr std::array kPatientPaths = {"link.other"sv};
constexpr std::array kPersonParams = {"patient"sv};
constexpr std::array kPersonPaths = {"link.target"sv};
constexpr std::array kProcedureParams = {"patient"sv, "performer"sv};
constexpr std::array kProcedurePaths = {"subject"sv, "performer.actor"sv};
constexpr std::array kProvenanceParams = {"patient"sv};
constexpr std::array kProvenancePaths = {"target"sv};
constexpr std::array kQuestionnaireResponseParams = {"subject"sv, "author"sv};
constexpr std::array kQuestionnaireResponsePaths = {"subject"sv, "author"sv};
constexpr std::array kRelatedPersonParams = {"patient"sv};
constexpr std::array kRelatedPersonPaths = {"patient"sv};
constexpr std::array kRequestGroupParams = {"subject"sv, "participant"sv};
constexpr std::array kRequestGroupPaths = {"subject"sv, "action.participant"sv};
constexpr std::array kResearchSubjectParams = {"individual"sv};
constexpr std::array kResearchSubjectPaths = {"individual"sv};
constexpr std::array kRiskAssessmentParams = {"subject"sv};
constexpr std::array kRiskAssessmentPaths = {"subject"sv};
constexpr std::array kScheduleParams = {"actor"sv};
constexpr std::array kSchedulePaths = {"actor"sv};
constexpr std::array kServiceRequestParams = {"subject"sv, "performer"sv};
constexpr std::array kServiceRequestPaths = {"subject"sv, "performer"sv};
constexpr std::array kSpecimenParams = {"subject"sv};
constexpr std::array kSpecimenPaths = {"subject"sv};
constexpr std::array kSupplyDeliveryParams = {"patient"sv};
constexpr std::array kSupplyDeliveryPaths = {"patient"sv};
constexpr std::array kSupplyRequestParams = {"subject"sv};
constexpr std::array kSupplyRequestPaths = {"deliverTo"sv};
constexpr std::array kVisionPrescriptionParams = {"patient"sv};
constexpr std::array kVisionPrescriptionPaths = {"patient"sv};

constexpr std::array kMembers = {
    member("Account"sv, kAccountParams, kAccountPaths, "subject"sv, kSeveralPatients),
    member("AdverseEvent"sv, kAdverseEventParams, kAdverseEventPaths, "subject"sv, kNoFlags),
    member("AllergyIntolerance"sv, kAllergyIntoleranceParams, kAllergyIntolerancePaths, "patient"sv,
           kNoFlags),
    member("Appointment"sv, kAppointmentParams, kAppointmentPaths, "actor"sv, kNoFlags),
    member("AppointmentResponse"sv, kAppointmentResponseParams, kAppointmentResponsePaths,
           "actor"sv, kNoFlags),
    member("AuditEvent"sv, kAuditEventParams, kAuditEventPaths, "patient"sv, kSeveralPatients),
    member("Basic"sv, kBasicParams, kBasicPaths, "patient"sv, kNoFlags),
    member("BodyStructure"sv, kBodyStructureParams, kBodyStructurePaths, "patient"sv, kNoFlags),
    member("CarePlan"sv, kCarePlanParams, kCarePlanPaths, "patient"sv, kNoFlags),
    member("CareTeam"sv, kCareTeamParams, kCareTeamPaths, "patient"sv, kNoFlags),
    member("ChargeItem"sv, kChargeItemParams, kChargeItemPaths, "subject"sv, kNoFlags),
    member("Claim"sv, kClaimParams, kClaimPaths, "patient"sv, kNoFlags),
    member("ClaimResponse"sv, kClaimResponseParams, kClaimResponsePaths, "patient"sv, kNoFlags),
    member("ClinicalImpression"sv, kClinicalImpressionParams, kClinicalImpressionPaths, "patient"sv,
           kPatientAlias),
    member("Communication"sv, kCommunicationParams, kCommunicationPaths, "subject"sv, kNoFlags),
    member("CommunicationRequest"sv, kCommunicationRequestParams, kCommunicationRequestPaths,
           "subject"sv, kNoFlags),
    member("Composition"sv, kCompositionParams, kCompositionPaths, "patient"sv, kPatientAlias),
    member("Condition"sv, kConditionParams, kConditionPaths, "patient"sv, kNoFlags),
    member("Consent"sv, kConsentParams, kConsentPaths, "patient"sv, kNoFlags),
    member("Coverage"sv, kCoverageParams, kCoveragePaths, "beneficiary"sv, kNoFlags),
    member("CoverageEligibilityRequest"sv, kCoverageEligibilityRequestParams,
           kCoverageEligibilityRequestPaths, "patient"sv, kNoFlags),
    member("CoverageEligibilityResponse"sv, kCoverageEligibilityResponseParams,
           kCoverageEligibilityResponsePaths, "patient"sv, kNoFlags),
    member("DetectedIssue"sv, kDetectedIssueParams, kDetectedIssuePaths, "patient"sv, kNoFlags),
    member("DeviceRequest"sv, kDeviceRequestParams, kDeviceRequestPaths, "patient"sv,
           kPatientAlias),
    member("DeviceUseStatement"sv, kDeviceUseStatementParams, kDeviceUseStatementPaths, "patient"sv,
           kPatientAlias),
    member("DiagnosticReport"sv, kDiagnosticReportParams, kDiagnosticReportPaths, "patient"sv,
           kPatientAlias),
    member("DocumentManifest"sv, kDocumentManifestParams, kDocumentManifestPaths, "patient"sv,
           kPatientAlias),
    member("DocumentReference"sv, kDocumentReferenceParams, kDocumentReferencePaths, "patient"sv,
           kPatientAlias),
    member("Encounter"sv, kEncounterParams, kEncounterPaths, "patient"sv, kNoFlags),
    member("EnrollmentRequest"sv, kEnrollmentRequestParams, kEnrollmentRequestPaths, "subject"sv,
           kNoFlags),
    member("EpisodeOfCare"sv, kEpisodeOfCareParams, kEpisodeOfCarePaths, "patient"sv, kNoFlags),
    member("ExplanationOfBenefit"sv, kExplanationOfBenefitParams, kExplanationOfBenefitPaths,
           "patient"sv, kNoFlags),
    member("FamilyMemberHistory"sv, kFamilyMemberHistoryParams, kFamilyMemberHistoryPaths,
           "patient"sv, kNoFlags),
    member("Flag"sv, kFlagParams, kFlagPaths, "patient"sv, kNoFlags),
    member("Goal"sv, kGoalParams, kGoalPaths, "patient"sv, kNoFlags),
    member("Group"sv, kGroupParams, kGroupPaths, "member"sv, kSeveralPatients | kNoPatientAccess),
    member("ImagingStudy"sv, kImagingStudyParams, kImagingStudyPaths, "patient"sv, kNoFlags),
    member("Immunization"sv, kImmunizationParams, kImmunizationPaths, "patient"sv, kNoFlags),
    member("ImmunizationEvaluation"sv, kImmunizationEvaluationParams, kImmunizationEvaluationPaths,
           "patient"sv, kNoFlags),
    member("ImmunizationRecommendation"sv, kImmunizationRecommendationParams,
           kImmunizationRecommendationPaths, "patient"sv, kNoFlags),
    member("Invoice"sv, kInvoiceParams, kInvoicePaths, "patient"sv, kNoFlags),
    member("List"sv, kListParams, kListPaths, "patient"sv, kPatientAlias),
    member("MeasureReport"sv, kMeasureReportParams, kMeasureReportPaths, "patient"sv, kNoFlags),
    member("Media"sv, kMediaParams, kMediaPaths, "subject"sv, kNoFlags),
    member("MedicationAdministration"sv, kMedicationAdministrationParams,
           kMedicationAdministrationPaths, "patient"sv, kNoFlags),
    member("MedicationDispense"sv, kMedicationDispenseParams, kMedicationDispensePaths, "patient"sv,
           kNoFlags),
    member("MedicationRequest"sv, kMedicationRequestParams, kMedicationRequestPaths, "patient"sv,
           kPatientAlias),
    member("MedicationStatement"sv, kMedicationStatementParams, kMedicationStatementPaths,
           "patient"sv, kPatientAlias),
    member("MolecularSequence"sv, kMolecularSequenceParams, kMolecularSequencePaths, "patient"sv,
           kNoFlags),
    member("NutritionOrder"sv, kNutritionOrderParams, kNutritionOrderPaths, "patient"sv, kNoFlags),
    member("Observation"sv, kObservationParams, kObservationPaths, "patient"sv, kPatientAlias),
    member("Patient"sv, kPatientParams, kPatientPaths, "_id"sv, kNoFlags),
    member("Person"sv, kPersonParams, kPersonPaths, "patient"sv, kSeveralPatients),
    member("Procedure"sv, kProcedureParams, kProcedurePaths, "patient"sv, kNoFlags),
    member("Provenance"sv, kProvenanceParams, kProvenancePaths, "patient"sv, kSeveralPatients),
    member("QuestionnaireResponse"sv, kQuestionnaireResponseParams, kQuestionnaireResponsePaths,
           "subject"sv, kNoFlags),
    member("RelatedPerson"sv, kRelatedPersonParams, kRelatedPersonPaths, "patient"sv, kNoFlags),
    member("RequestGroup"sv, kRequestGroupParams, kRequestGroupPaths, "subject"sv, kNoFlags),
    member("ResearchSubject"sv, kResearchSubjectParams, kResearchSubjectPaths, "individual"sv,
           kNoFlags),
    member("RiskAssessment"sv, kRiskAssessmentParams, kRiskAssessmentPaths, "patient"sv,
           kPatientAlias),
    member("Schedule"sv, kScheduleParams, kSchedulePaths, "actor"sv, kNoFlags),
    member("ServiceRequest"sv, kServiceRequestParams, kServiceRequestPaths, "patient"sv,
           kPatientAlias),
    member("Specimen"sv, kSpecimenParams, kSpecimenPaths, "subject"sv, kNoFlags),
    member("SupplyDelivery"sv, kSupplyDeliveryParams, kSupplyDeliveryPaths, "patient"sv, kNoFlags),
    member("SupplyRequest"sv, kSupplyRequestParams, kSupplyRequestPaths, "subject"sv, kNoFlags),
    member("VisionPrescription"sv, kVisionPrescriptionParams, kVisionPrescriptionPaths, "patient"sv,
           kNoFlags),
};

static_assert(kMembers.size() == 66);
static_assert(std::is_sorted(kMembers.begin(), kMembers.end(),
                             [](const Member &a, const Member &b) {
                                 return a.resource_type < b.resource_type;
                             }));

constexpr std::array kSharedReferenceTypes = {
    "Location"sv, "Medication"sv, "Organization"sv, "Practitioner"sv, "PractitionerRole"sv,
};
static_assert(std::is_sorted(kSharedReferenceTypes.begin(), kSharedReferenceTypes.end()));

char ascii_lower(char c) {
    return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

bool equals_ignoring_case(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return ascii_lower(x) == ascii_lower(y);
           });
}

bool contains(std::span<const std::string_view> list, std::string_view item) {
    return std::find(list.begin(), list.end(), item) != list.end();
}

Decision decide(Decision::Kind kind, std::string_view why) {
    Decision decision;
    decision.kind = kind;
    decision.reason = std::string(why);
    return decision;
}

Decision refuse(std::string_view why) {
    return decide(Decision::Kind::Refuse, why);
}

Decision check_body(const Member &member) {
    Decision decision = decide(Decision::Kind::CheckRequestBody, reason::kVerifyRequestBody);
    decision.reference_paths = member.reference_paths;
    return decision;
}

// Calls `visit` with each comma-separated item of `value`; stops at the first false.
template <typename Visit>
bool each_item(std::string_view value, Visit visit) {
    size_t start = 0;
    while (start <= value.size()) {
        size_t end = value.find(',', start);
        if (end == std::string_view::npos) {
            end = value.size();
        }
        if (!visit(value.substr(start, end - start))) {
            return false;
        }
        start = end + 1;
    }
    return true;
}

// What a search is about to do, worked out parameter by parameter.
class SearchCheck {
  public:
    SearchCheck(const Member &member, const PatientContext &context)
        : member_(member), context_(context), is_patient_(member.resource_type == "Patient") {}

    // std::nullopt when the search stays in the compartment, else the refusal reason.
    std::optional<std::string_view> run(const fhir::Query &query) {
        for (const fhir::QueryParam &param : query) {
            if (const std::optional<std::string_view> refused = visit(param)) {
                return refused;
            }
        }
        // Includes are judged last: whether one is safe depends on what anchors the search.
        for (const fhir::QueryParam *param : includes_) {
            if (!include_allowed(*param)) {
                return reason::kIncludeNotAllowed;
            }
        }
        return std::nullopt;
    }

    bool anchored() const { return anchored_count_ > 0; }

  private:
    enum class Item : uint8_t { NamesPatient, BarePatient, OtherType };

    bool is_anchor(std::string_view name) const {
        if (is_patient_) {
            return name == "_id";
        }
        return contains(member_.params, name) || (member_.patient_alias && name == "patient");
    }

    bool anchors_or_narrows(std::string_view name) const {
        if (anchored()) {
            return std::find(anchored_.begin(), anchored_.begin() + anchored_count_, name) !=
                   anchored_.begin() + anchored_count_;
        }
        return name == member_.narrow_param;
    }

    void mark_anchored(std::string_view name) {
        if (anchored_count_ < anchored_.size()) {
            anchored_[anchored_count_++] = name;
        }
    }

    std::optional<std::string_view> visit(const fhir::QueryParam &param) {
        const std::string_view name = param.name;
        const size_t colon = name.find(':');
        const std::string_view base = name.substr(0, colon);
        const std::string_view modifier =
            colon == std::string_view::npos ? std::string_view{} : name.substr(colon + 1);

        // No FHIR parameter name has a space; a server that trims one would see another name.
        if (name.find(' ') != std::string_view::npos) {
            return reason::kMalformedQuery;
        }
        if (equals_ignoring_case(base, "_has")) {
            return reason::kHasParameter;
        }
        if (name.find('.') != std::string_view::npos) {
            return reason::kChainedParameter;
        }
        for (const std::string_view forbidden :
             {"_contained"sv, "_containedType"sv, "_query"sv, "_filter"sv, "_list"sv}) {
            if (equals_ignoring_case(base, forbidden)) {
                return reason::kForbiddenParameter;
            }
        }
        if (equals_ignoring_case(base, "_include") || equals_ignoring_case(base, "_revinclude")) {
            if (name != "_include" && name != "_revinclude") {
                return reason::kIncludeNotAllowed;  // a modifier, or an odd spelling
            }
            includes_.push_back(&param);
            return std::nullopt;
        }
        if (is_patient_ && base == "_id") {
            return visit_patient_id(modifier, param.value);
        }
        if (contains(member_.params, base) || base == "patient" || base == "subject") {
            return visit_reference(base, modifier, param.value);
        }
        return std::nullopt;
    }

    std::optional<std::string_view> visit_patient_id(std::string_view modifier,
                                                     std::string_view value) {
        if (!modifier.empty()) {
            return reason::kModifierNotAllowed;
        }
        const bool all_p =
            each_item(value, [&](std::string_view item) { return item == context_.patient_id; });
        if (!all_p) {
            return reason::kOtherPatient;
        }
        mark_anchored("_id");
        return std::nullopt;
    }

    std::optional<std::string_view> visit_reference(std::string_view base,
                                                    std::string_view modifier,
                                                    std::string_view value) {
        const bool typed_patient = modifier == "Patient";
        if (!modifier.empty() && !typed_patient) {
            return reason::kModifierNotAllowed;
        }
        // Only `patient` is a reference to Patient alone; with any other parameter a bare id
        // may name a Group, Device, Practitioner... with the same id.
        const bool patient_only = typed_patient || base == "patient";
        std::optional<std::string_view> refused;
        bool names_p = true;
        each_item(value, [&](std::string_view item) {
            std::optional<Item> kind;
            refused = classify(item, typed_patient, patient_only, kind);
            if (refused) {
                return false;
            }
            if (*kind == Item::OtherType || (*kind == Item::BarePatient && !patient_only)) {
                names_p = false;
            }
            return true;
        });
        if (refused) {
            return refused;
        }
        if (names_p && is_anchor(base)) {
            mark_anchored(base);
        }
        return std::nullopt;
    }

    // Sorts one reference value; refusals for anything that may leave the compartment.
    std::optional<std::string_view> classify(std::string_view item, bool typed_patient,
                                             bool patient_only, std::optional<Item> &kind) const {
        if (item.find(':') != std::string_view::npos) {
            const std::string_view server = context_.server_base;
            if (server.empty() || item.size() <= server.size() + 1 ||
                item.substr(0, server.size()) != server || item[server.size()] != '/') {
                return reason::kAbsoluteReference;
            }
            item.remove_prefix(server.size() + 1);
            if (item.find(':') != std::string_view::npos) {
                return reason::kAbsoluteReference;
            }
        }
        const size_t slash = item.find('/');
        if (slash == std::string_view::npos) {
            if (!fhir::is_valid_id(item)) {
                return reason::kMalformedReference;
            }
            if (item != context_.patient_id) {
                return patient_only ? reason::kOtherPatient : reason::kAmbiguousReference;
            }
            kind = typed_patient ? Item::NamesPatient : Item::BarePatient;
            return std::nullopt;
        }
        const std::string_view type = item.substr(0, slash);
        const std::string_view id = item.substr(slash + 1);
        if (!fhir::is_resource_type(type) || !fhir::is_valid_id(id)) {
            return reason::kMalformedReference;  // also Patient/P/_history/1
        }
        if (type != "Patient") {
            if (typed_patient) {
                return reason::kMalformedReference;
            }
            kind = Item::OtherType;
            return std::nullopt;
        }
        if (id != context_.patient_id) {
            return reason::kOtherPatient;
        }
        kind = Item::NamesPatient;
        return std::nullopt;
    }

    bool include_allowed(const fhir::QueryParam &param) const {
        // Type:param or Type:param:TargetType.
        const std::string_view value = param.value;
        const size_t first = value.find(':');
        if (first == std::string_view::npos) {
            return false;
        }
        const std::string_view source = value.substr(0, first);
        std::string_view target_param = value.substr(first + 1);
        const size_t second = target_param.find(':');
        if (second != std::string_view::npos) {
            if (target_param.substr(second + 1) != "Patient") {
                return false;
            }
            target_param = target_param.substr(0, second);
        }
        if (param.name == "_include") {
            return source == member_.resource_type && !is_patient_ &&
                   member_.single_patient_reference &&
                   (target_param == "patient" || target_param == "subject") &&
                   is_anchor(target_param) && anchors_or_narrows(target_param);
        }
        if (!is_patient_) {
            return false;
        }
        const Member *included = find_member(source);
        return included != nullptr && included->resource_type != "Patient" &&
               included->patient_access &&
               (contains(included->params, target_param) ||
                (included->patient_alias && target_param == "patient"));
    }

    const Member &member_;
    const PatientContext &context_;
    const bool is_patient_;
    std::vector<const fhir::QueryParam *> includes_;
    std::array<std::string_view, 8> anchored_{};
    size_t anchored_count_ = 0;
};

enum class SearchOutcome : uint8_t { Anchored, Narrowed, Refused };

struct SearchResult {
    SearchOutcome outcome = SearchOutcome::Refused;
    std::string_view reason;
};

SearchResult check_search(const Member &member, const fhir::Query &query,
                          const PatientContext &context) {
    SearchCheck check(member, context);
    if (const std::optional<std::string_view> refused = check.run(query)) {
        return {SearchOutcome::Refused, *refused};
    }
    return check.anchored() ? SearchResult{SearchOutcome::Anchored, reason::kInCompartment}
                            : SearchResult{SearchOutcome::Narrowed, reason::kNarrowed};
}

std::string narrowed(std::string_view raw_query, const Member &member,
                     std::string_view patient_id) {
    std::string out(raw_query);
    if (!out.empty()) {
        out.push_back('&');
    }
    out.append(member.narrow_param).push_back('=');
    // `patient` and `_id` can only mean a Patient; every other parameter gets the type.
    if (member.narrow_param != "patient" && member.narrow_param != "_id") {
        out.append("Patient/");
    }
    out.append(patient_id);
    return out;
}

// Reads and writes of Patient itself: only P.
Decision check_patient_instance(const fhir::RequestTargetView &target,
                                const PatientContext &context) {
    if (target.id != context.patient_id) {
        return refuse(reason::kOtherPatient);
    }
    switch (target.interaction) {
        case fhir::Interaction::Read:
        case fhir::Interaction::VRead:
        case fhir::Interaction::HistoryInstance:
        case fhir::Interaction::Patch:
            return decide(Decision::Kind::Allow, reason::kInCompartment);
        case fhir::Interaction::Update:
            return decide(Decision::Kind::CheckRequestBody, reason::kPatientIdInBody);
        default:
            return refuse(reason::kInteractionNotAllowed);
    }
}

}  // namespace

std::span<const Member> patient_compartment() {
    return kMembers;
}

const Member *find_member(std::string_view resource_type) {
    const auto it = std::lower_bound(
        kMembers.begin(), kMembers.end(), resource_type,
        [](const Member &member, std::string_view type) { return member.resource_type < type; });
    return it != kMembers.end() && it->resource_type == resource_type ? &*it : nullptr;
}

std::span<const std::string_view> reference_params(std::string_view resource_type) {
    const Member *member = find_member(resource_type);
    return member != nullptr ? member->params : std::span<const std::string_view>{};
}

std::span<const std::string_view> reference_paths(std::string_view resource_type) {
    const Member *member = find_member(resource_type);
    return member != nullptr ? member->reference_paths : std::span<const std::string_view>{};
}

std::span<const std::string_view> shared_reference_types() {
    return kSharedReferenceTypes;
}

bool is_shared_reference_type(std::string_view resource_type) {
    return std::binary_search(kSharedReferenceTypes.begin(), kSharedReferenceTypes.end(),
                              resource_type);
}

Decision check(std::string_view method, const fhir::RequestTargetView &target,
               std::string_view query, const PatientContext &context) {
    using fhir::Interaction;
    if (!fhir::is_valid_id(context.patient_id)) {
        return refuse(reason::kInvalidPatientId);
    }
    const std::optional<fhir::Query> params = fhir::parse_query(query);
    if (!params) {
        return refuse(reason::kMalformedQuery);
    }
    if (target.interaction == Interaction::Capabilities) {
        return decide(Decision::Kind::Allow, reason::kCapabilities);
    }

    const Member *member = find_member(target.resource_type);
    const bool instance = !target.id.empty();
    if (member == nullptr || !member->patient_access) {
        const bool read =
            target.interaction == Interaction::Read || target.interaction == Interaction::VRead;
        if (read && is_shared_reference_type(target.resource_type)) {
            return decide(Decision::Kind::Allow, reason::kSharedReferenceData);
        }
        return refuse(fhir::is_system_level(target.interaction) ? reason::kInteractionNotAllowed
                                                                : reason::kTypeNotInCompartment);
    }
    const bool is_patient = member->resource_type == "Patient";
    if (is_patient && instance) {
        return check_patient_instance(target, context);
    }

    switch (target.interaction) {
        case Interaction::Read:
        case Interaction::VRead:
        case Interaction::HistoryInstance: {
            Decision decision = decide(Decision::Kind::CheckResponse, reason::kVerifyResponse);
            decision.reference_paths = member->reference_paths;
            return decision;
        }
        case Interaction::SearchType: {
            if (method != "GET" && method != "HEAD") {
                return refuse(reason::kSearchInBody);
            }
            const SearchResult result = check_search(*member, *params, context);
            if (result.outcome == SearchOutcome::Refused) {
                return refuse(result.reason);
            }
            if (result.outcome == SearchOutcome::Anchored) {
                return decide(Decision::Kind::Allow, result.reason);
            }
            Decision decision = decide(Decision::Kind::AllowNarrowed, result.reason);
            decision.narrowed_query = narrowed(query, *member, context.patient_id);
            return decision;
        }
        case Interaction::Create:
            return is_patient ? refuse(reason::kInteractionNotAllowed) : check_body(*member);
        case Interaction::Update:
        case Interaction::Delete: {
            if (!target.conditional) {
                return target.interaction == Interaction::Update
                           ? check_body(*member)
                           : refuse(reason::kInteractionNotAllowed);
            }
            if (target.interaction == Interaction::Delete && is_patient) {
                return refuse(reason::kInteractionNotAllowed);
            }
            // The selection of a write is never narrowed: it must name P itself.
            const SearchResult result = check_search(*member, *params, context);
            if (result.outcome == SearchOutcome::Refused) {
                return refuse(result.reason);
            }
            if (result.outcome == SearchOutcome::Narrowed) {
                return refuse(reason::kWriteNeedsPatient);
            }
            if (target.interaction == Interaction::Delete) {
                return decide(Decision::Kind::Allow, reason::kInCompartment);
            }
            return is_patient ? decide(Decision::Kind::CheckRequestBody, reason::kPatientIdInBody)
                              : check_body(*member);
        }
        default:
            return refuse(reason::kInteractionNotAllowed);
    }
}

}  // namespace ehrgate::compartment
