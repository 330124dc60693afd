#include "ehrgate/fhir_request.hpp"

#include <algorithm>
#include <array>
#include <utility>

namespace ehrgate::fhir {

namespace {

using namespace std::string_view_literals;

// FHIR R4 (4.0.1) resource types: the resource-types value set without the abstract Resource and
// DomainResource. Sorted by byte value so lookups can bisect; the static_asserts keep it so.
constexpr std::array kResourceTypes = {
    "Account"sv,
    "ActivityDefinition"sv,
    "AdverseEvent"sv,
    "AllergyIntolerance"sv,
    "Appointment"sv,
    "AppointmentResponse"sv,
    "AuditEvent"sv,
    "Basic"sv,
    "Binary"sv,
    "BiologicallyDerivedProduct"sv,
    "BodyStructure"sv,
    "Bundle"sv,
    "CapabilityStatement"sv,
    "CarePlan"sv,
    "CareTeam"sv,
    "CatalogEntry"sv,
    "ChargeItem"sv,
    "ChargeItemDefinition"sv,
    "Claim"sv,
    "ClaimResponse"sv,
    "ClinicalImpression"sv,
    "CodeSystem"sv,
    "Communication"sv,
    "CommunicationRequest"sv,
    "CompartmentDefinition"sv,
    "Composition"sv,
    "ConceptMap"sv,
    "Condition"sv,
    "Consent"sv,
    "Contract"sv,
    "Coverage"sv,
    "CoverageEligibilityRequest"sv,
    "CoverageEligibilityResponse"sv,
    "DetectedIssue"sv,
    "Device"sv,
    "DeviceDefinition"sv,
    "DeviceMetric"sv,
    "DeviceRequest"sv,
    "DeviceUseStatement"sv,
    "DiagnosticReport"sv,
    "DocumentManifest"sv,
    "DocumentReference"sv,
    "EffectEvidenceSynthesis"sv,
    "Encounter"sv,
    "Endpoint"sv,
    "EnrollmentRequest"sv,
    "EnrollmentResponse"sv,
    "EpisodeOfCare"sv,
    "EventDefinition"sv,
    "Evidence"sv,
    "EvidenceVariable"sv,
    "ExampleScenario"sv,
    "ExplanationOfBenefit"sv,
    "FamilyMemberHistory"sv,
    "Flag"sv,
    "Goal"sv,
    "GraphDefinition"sv,
    "Group"sv,
    "GuidanceResponse"sv,
    "HealthcareService"sv,
    "ImagingStudy"sv,
    "Immunization"sv,
    "ImmunizationEvaluation"sv,
    "ImmunizationRecommendation"sv,
    "ImplementationGuide"sv,
    "InsurancePlan"sv,
    "Invoice"sv,
    "Library"sv,
    "Linkage"sv,
    "List"sv,
    "Location"sv,
    "Measure"sv,
    "MeasureReport"sv,
    "Media"sv,
    "Medication"sv,
    "MedicationAdministration"sv,
    "MedicationDispense"sv,
    "MedicationKnowledge"sv,
    "MedicationRequest"sv,
    "MedicationStatement"sv,
    "MedicinalProduct"sv,
    "MedicinalProductAuthorization"sv,
    "MedicinalProductContraindication"sv,
    "MedicinalProductIndication"sv,
    "MedicinalProductIngredient"sv,
    "MedicinalProductInteraction"sv,
    "MedicinalProductManufactured"sv,
    "MedicinalProductPackaged"sv,
    "MedicinalProductPharmaceutical"sv,
    "MedicinalProductUndesirableEffect"sv,
    "MessageDefinition"sv,
    "MessageHeader"sv,
    "MolecularSequence"sv,
    "NamingSystem"sv,
    "NutritionOrder"sv,
    "Observation"sv,
    "ObservationDefinition"sv,
    "OperationDefinition"sv,
    "OperationOutcome"sv,
    "Organization"sv,
    "OrganizationAffiliation"sv,
    "Parameters"sv,
    "Patient"sv,
    "PaymentNotice"sv,
    "PaymentReconciliation"sv,
    "Person"sv,
    "PlanDefinition"sv,
    "Practitioner"sv,
    "PractitionerRole"sv,
    "Procedure"sv,
    "Provenance"sv,
    "Questionnaire"sv,
    "QuestionnaireResponse"sv,
    "RelatedPerson"sv,
    "RequestGroup"sv,
    "ResearchDefinition"sv,
    "ResearchElementDefinition"sv,
    "ResearchStudy"sv,
    "ResearchSubject"sv,
    "RiskAssessment"sv,
    "RiskEvidenceSynthesis"sv,
    "Schedule"sv,
    "SearchParameter"sv,
    "ServiceRequest"sv,
    "Slot"sv,
    "Specimen"sv,
    "SpecimenDefinition"sv,
    "StructureDefinition"sv,
    "StructureMap"sv,
    "Subscription"sv,
    "Substance"sv,
    "SubstanceNucleicAcid"sv,
    "SubstancePolymer"sv,
    "SubstanceProtein"sv,
    "SubstanceReferenceInformation"sv,
    "SubstanceSourceMaterial"sv,
    "SubstanceSpecification"sv,
    "SupplyDelivery"sv,
    "SupplyRequest"sv,
    "Task"sv,
    "TerminologyCapabilities"sv,
    "TestReport"sv,
    "TestScript"sv,
    "ValueSet"sv,
    "VerificationResult"sv,
    "VisionPrescription"sv,
};
static_assert(kResourceTypes.size() == 146);
static_assert(std::is_sorted(kResourceTypes.begin(), kResourceTypes.end()));
static_assert(std::adjacent_find(kResourceTypes.begin(), kResourceTypes.end()) ==
              kResourceTypes.end());

// Indexed by Interaction.
constexpr std::array<std::string_view, kInteractionCount> kInteractionNames = {
    "read"sv,           "vread"sv,
    "update"sv,         "patch"sv,
    "delete"sv,         "history-instance"sv,
    "history-type"sv,   "history-system"sv,
    "create"sv,         "search-type"sv,
    "search-system"sv,  "capabilities"sv,
    "batch"sv,          "operation-system"sv,
    "operation-type"sv, "operation-instance"sv,
};

enum class Method : uint8_t { Get, Head, Post, Put, Patch, Delete, Other };

Method parse_method(std::string_view method) {
    if (method == "GET")
        return Method::Get;
    if (method == "HEAD")
        return Method::Head;
    if (method == "POST")
        return Method::Post;
    if (method == "PUT")
        return Method::Put;
    if (method == "PATCH")
        return Method::Patch;
    if (method == "DELETE")
        return Method::Delete;
    return Method::Other;
}

// The deepest shape is Type/id/_history/vid.
constexpr size_t kMaxSegments = 4;

struct Segments {
    std::array<std::string_view, kMaxSegments> at;
    size_t count = 0;
};

// Splits on '/'. Empty segments (a leading, trailing or doubled slash) and paths deeper than any
// FHIR shape are refused here, so no later step sees them.
bool split(std::string_view path, Segments &out) {
    if (path.empty()) {
        return true;
    }
    size_t start = 0;
    while (true) {
        const size_t slash = path.find('/', start);
        const std::string_view segment =
            path.substr(start, slash == std::string_view::npos ? slash : slash - start);
        if (segment.empty() || out.count == kMaxSegments) {
            return false;
        }
        out.at[out.count++] = segment;
        if (slash == std::string_view::npos) {
            return true;
        }
        start = slash + 1;
    }
}

bool is_alpha(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}
bool is_digit(char c) {
    return c >= '0' && c <= '9';
}

// An id as a path segment: the FHIR grammar minus the dot segments, which URI normalization
// would resolve against the parent and so could address something else upstream.
bool is_id_segment(std::string_view segment) {
    return is_valid_id(segment) && segment != "." && segment != "..";
}

// "$name": FHIR operation names are computable names (letters, digits, '-', '_').
std::optional<std::string_view> operation_name(std::string_view segment) {
    if (segment.size() < 2 || segment.size() > 65 || segment[0] != '$' || !is_alpha(segment[1])) {
        return std::nullopt;
    }
    const std::string_view name = segment.substr(1);
    for (const char c : name) {
        if (!is_alpha(c) && !is_digit(c) && c != '-' && c != '_') {
            return std::nullopt;
        }
    }
    return name;
}

std::optional<RequestTargetView> with(RequestTargetView target, Interaction interaction) {
    target.interaction = interaction;
    return target;
}

// Type/id with a method: the instance-level interactions that carry no further segment.
std::optional<Interaction> instance_interaction(Method method) {
    switch (method) {
        case Method::Get:
        case Method::Head:
            return Interaction::Read;
        case Method::Put:
            return Interaction::Update;
        case Method::Patch:
            return Interaction::Patch;
        case Method::Delete:
            return Interaction::Delete;
        case Method::Post:
        case Method::Other:
            return std::nullopt;
    }
    return std::nullopt;
}

std::optional<RequestTargetView> classify_system(Method method, std::string_view segment,
                                                 std::string_view query) {
    const bool read_like = method == Method::Get || method == Method::Head;
    RequestTargetView target;
    if (segment.empty()) {
        // A bare GET of the base is not a search without parameters: servers answer it with an
        // error, and treating it as search-system would make every base URL a search.
        if (read_like && !query.empty())
            return with(target, Interaction::SearchSystem);
        if (method == Method::Post)
            return with(target, Interaction::Batch);
        return std::nullopt;
    }
    if (segment == "metadata") {
        return read_like ? with(target, Interaction::Capabilities) : std::nullopt;
    }
    if (segment == "_history") {
        return read_like ? with(target, Interaction::HistorySystem) : std::nullopt;
    }
    if (segment == "_search") {
        return method == Method::Post ? with(target, Interaction::SearchSystem) : std::nullopt;
    }
    if (const std::optional<std::string_view> op = operation_name(segment)) {
        if (!read_like && method != Method::Post) {
            return std::nullopt;
        }
        target.operation = *op;
        return with(target, Interaction::OperationSystem);
    }
    return std::nullopt;
}

std::optional<RequestTargetView> classify_type(Method method, std::string_view type,
                                               std::string_view query) {
    const bool read_like = method == Method::Get || method == Method::Head;
    RequestTargetView target;
    target.resource_type = type;
    if (read_like)
        return with(target, Interaction::SearchType);
    if (method == Method::Post)
        return with(target, Interaction::Create);
    // Conditional update, patch and delete select their target by search parameters; without
    // them the request addresses nothing.
    if (query.empty()) {
        return std::nullopt;
    }
    target.conditional = true;
    if (method == Method::Put)
        return with(target, Interaction::Update);
    if (method == Method::Patch)
        return with(target, Interaction::Patch);
    if (method == Method::Delete)
        return with(target, Interaction::Delete);
    return std::nullopt;
}

}  // namespace

std::string_view interaction_name(Interaction interaction) {
    const size_t index = static_cast<size_t>(interaction);
    return index < kInteractionNames.size() ? kInteractionNames[index] : std::string_view{};
}

std::optional<Interaction> interaction_from_name(std::string_view name) {
    for (size_t i = 0; i < kInteractionNames.size(); ++i) {
        if (kInteractionNames[i] == name) {
            return static_cast<Interaction>(i);
        }
    }
    return std::nullopt;
}

bool is_system_level(Interaction interaction) {
    switch (interaction) {
        case Interaction::HistorySystem:
        case Interaction::SearchSystem:
        case Interaction::Capabilities:
        case Interaction::Batch:
        case Interaction::OperationSystem:
            return true;
        default:
            return false;
    }
}

bool is_resource_type(std::string_view name) {
    return std::binary_search(kResourceTypes.begin(), kResourceTypes.end(), name);
}

std::span<const std::string_view> resource_types() {
    return kResourceTypes;
}

bool is_valid_id(std::string_view id) {
    if (id.empty() || id.size() > 64) {
        return false;
    }
    for (const char c : id) {
        if (!is_alpha(c) && !is_digit(c) && c != '-' && c != '.') {
            return false;
        }
    }
    return true;
}

std::optional<RequestTargetView> classify_view(std::string_view method,
                                               std::string_view relative_path,
                                               std::string_view query) {
    const Method m = parse_method(method);
    Segments segments;
    if (m == Method::Other || !split(relative_path, segments)) {
        return std::nullopt;
    }
    if (segments.count == 0) {
        return classify_system(m, {}, query);
    }
    const std::string_view first = segments.at[0];
    if (!is_resource_type(first)) {
        return segments.count == 1 ? classify_system(m, first, query) : std::nullopt;
    }
    if (segments.count == 1) {
        return classify_type(m, first, query);
    }

    const bool read_like = m == Method::Get || m == Method::Head;
    const std::string_view second = segments.at[1];
    RequestTargetView target;
    target.resource_type = first;
    if (segments.count == 2) {
        if (second == "_search") {
            return m == Method::Post ? with(target, Interaction::SearchType) : std::nullopt;
        }
        if (second == "_history") {
            return read_like ? with(target, Interaction::HistoryType) : std::nullopt;
        }
        if (const std::optional<std::string_view> op = operation_name(second)) {
            if (!read_like && m != Method::Post) {
                return std::nullopt;
            }
            target.operation = *op;
            return with(target, Interaction::OperationType);
        }
        if (!is_id_segment(second)) {
            return std::nullopt;
        }
        target.id = second;
        const std::optional<Interaction> interaction = instance_interaction(m);
        return interaction ? with(target, *interaction) : std::nullopt;
    }

    if (!is_id_segment(second)) {
        return std::nullopt;
    }
    target.id = second;
    const std::string_view third = segments.at[2];
    if (segments.count == 3) {
        if (third == "_history") {
            return read_like ? with(target, Interaction::HistoryInstance) : std::nullopt;
        }
        if (const std::optional<std::string_view> op = operation_name(third)) {
            if (!read_like && m != Method::Post) {
                return std::nullopt;
            }
            target.operation = *op;
            return with(target, Interaction::OperationInstance);
        }
        return std::nullopt;
    }

    const std::string_view fourth = segments.at[3];
    if (third != "_history" || !is_id_segment(fourth) || !read_like) {
        return std::nullopt;
    }
    target.version_id = fourth;
    return with(target, Interaction::VRead);
}

std::optional<RequestTarget> classify(std::string_view method, std::string_view relative_path,
                                      std::string_view query) {
    const std::optional<RequestTargetView> view = classify_view(method, relative_path, query);
    if (!view) {
        return std::nullopt;
    }
    RequestTarget target;
    target.interaction = view->interaction;
    target.resource_type = view->resource_type;
    target.id = view->id;
    target.version_id = view->version_id;
    target.operation = view->operation;
    target.conditional = view->conditional;
    return target;
}

namespace {

int hex_value(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

}  // namespace

std::optional<std::string> percent_decode(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        char c = text[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            if (i + 2 >= text.size()) {
                return std::nullopt;
            }
            const int high = hex_value(text[i + 1]);
            const int low = hex_value(text[i + 2]);
            if (high < 0 || low < 0) {
                return std::nullopt;
            }
            c = static_cast<char>(high * 16 + low);
            i += 2;
        }
        const auto byte = static_cast<unsigned char>(c);
        if (byte < 0x20 || byte == 0x7f) {
            return std::nullopt;
        }
        out.push_back(c);
    }
    return out;
}

std::optional<Query> parse_query(std::string_view raw) {
    Query query;
    size_t start = 0;
    while (start <= raw.size()) {
        size_t end = raw.find('&', start);
        if (end == std::string_view::npos) {
            end = raw.size();
        }
        const std::string_view piece = raw.substr(start, end - start);
        start = end + 1;
        if (piece.empty()) {
            continue;
        }
        if (query.size() == kMaxQueryParams) {
            return std::nullopt;
        }
        const size_t equals = piece.find('=');
        std::optional<std::string> name = percent_decode(piece.substr(0, equals));
        std::optional<std::string> value = percent_decode(
            equals == std::string_view::npos ? std::string_view{} : piece.substr(equals + 1));
        if (!name || name->empty() || !value) {
            return std::nullopt;
        }
        query.push_back({std::move(*name), std::move(*value)});
    }
    return query;
}

}  // namespace ehrgate::fhir
