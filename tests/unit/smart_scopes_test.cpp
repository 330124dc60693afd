#include "ehrgate/smart_scopes.hpp"

#include <gtest/gtest.h>

#include <iterator>
#include <string>
#include <vector>

#include "ehrgate/fhir_request.hpp"

namespace ehrgate::smart {
namespace {

using fhir::Query;
using Kind = Access::Kind;

constexpr std::string_view kLab =
    "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
constexpr std::string_view kVitals =
    "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

ScopeSet parse(std::string_view text) {
    ScopeError error;
    std::optional<ScopeSet> set = parse_scopes(text, &error);
    EXPECT_TRUE(set.has_value()) << text << ": " << error.scope << ": " << error.reason;
    return set.value_or(ScopeSet{});
}

Permissions perms(std::string_view letters) {
    Permissions out;
    for (const char c : letters) {
        out = out | Permissions::of(static_cast<Permission>(std::string_view("cruds").find(c)));
    }
    return out;
}

TEST(SmartScopes, ParsesV1AndV2) {
    const ScopeSet set = parse(
        "openid fhirUser launch/patient offline_access patient/Observation.read "
        "user/*.cruds system/Patient.rs patient/Condition.c");
    EXPECT_TRUE(set.has(LaunchScope::OpenId));
    EXPECT_TRUE(set.has(LaunchScope::FhirUser));
    EXPECT_TRUE(set.has(LaunchScope::LaunchPatient));
    EXPECT_TRUE(set.has(LaunchScope::OfflineAccess));
    EXPECT_FALSE(set.has(LaunchScope::Launch));
    EXPECT_FALSE(set.has(LaunchScope::OnlineAccess));
    ASSERT_EQ(set.resource_scopes().size(), 4u);
    EXPECT_EQ(set.resource_scopes()[0],
              (ResourceScope{Context::Patient, "Observation", perms("rs"), {}}));
    EXPECT_EQ(set.resource_scopes()[1],
              (ResourceScope{Context::User, "*", Permissions::all(), {}}));
    EXPECT_EQ(set.resource_scopes()[2],
              (ResourceScope{Context::System, "Patient", perms("rs"), {}}));
    EXPECT_EQ(set.resource_scopes()[3],
              (ResourceScope{Context::Patient, "Condition", perms("c"), {}}));
    EXPECT_TRUE(set.other_scopes().empty());
}

TEST(SmartScopes, V1MapsOntoV2) {
    EXPECT_EQ(parse("patient/Observation.read"), parse("patient/Observation.rs"));
    EXPECT_EQ(parse("patient/Observation.write"), parse("patient/Observation.cud"));
    EXPECT_EQ(parse("patient/Observation.*"), parse("patient/Observation.cruds"));
    EXPECT_EQ(parse("user/*.read user/*.write"), parse("user/*.rs user/*.cud"));
    EXPECT_EQ(parse("patient/*.*").to_string(), "patient/*.cruds");
    // Union of v1 read and write is everything.
    const ScopeSet v1 = parse("patient/Observation.read patient/Observation.write");
    for (const Permission p : {Permission::Create, Permission::Read, Permission::Update,
                               Permission::Delete, Permission::Search}) {
        EXPECT_EQ(v1.allows(Context::Patient, "Observation", p, nullptr).kind, Kind::Allowed);
    }
}

TEST(SmartScopes, EveryV2SubsequenceParses) {
    for (unsigned bits = 1; bits < 32; ++bits) {
        std::string letters;
        for (unsigned i = 0; i < 5; ++i) {
            if (bits & (1u << i)) {
                letters.push_back("cruds"[i]);
            }
        }
        const ScopeSet set = parse("patient/Observation." + letters);
        ASSERT_EQ(set.resource_scopes().size(), 1u) << letters;
        EXPECT_EQ(set.resource_scopes()[0].permissions.bits(), bits) << letters;
        EXPECT_EQ(set.resource_scopes()[0].permissions.to_string(), letters);
    }
}

struct Invalid {
    const char *scope;
    ScopeError::Code code;
};

TEST(SmartScopes, RefusesMalformedResourceScopes) {
    using Code = ScopeError::Code;
    const Invalid cases[] = {
        {"patient/*/read", Code::Malformed},
        {"patient*.read", Code::Malformed},
        {"patient/*.readx", Code::InvalidPermissions},
        {"patient/Observation.rs.", Code::InvalidPermissions},
        {"patient/.read", Code::Malformed},
        {"patient/Observation.dr", Code::InvalidPermissions},
        {"patient/Observation.sc", Code::InvalidPermissions},
        {"patient/Observation.rrs", Code::InvalidPermissions},
        {"patient/Observation.", Code::InvalidPermissions},
        {"patient/Observation.RS", Code::InvalidPermissions},
        {"patient/Observation.Read", Code::InvalidPermissions},
        {"patient/Observation", Code::Malformed},
        {"patient/Observation/1.read", Code::UnknownResourceType},
        {"Patient/Observation.read", Code::UnknownContext},
        {"PATIENT/*.read", Code::UnknownContext},
        {"patients/*.read", Code::UnknownContext},
        {"/Observation.read", Code::UnknownContext},
        {"patient/Foo.read", Code::UnknownResourceType},
        {"patient/observation.read", Code::UnknownResourceType},
        {"patient/Observation.rs?", Code::MalformedConstraints},
        {"patient/Observation.rs?category", Code::MalformedConstraints},
        {"patient/Observation.rs?category=", Code::MalformedConstraints},
        {"patient/Observation.rs?=laboratory", Code::MalformedConstraints},
        {"patient/Observation.rs?category=a&", Code::MalformedConstraints},
        {"patient/Observation.rs?category=a&&code=b", Code::MalformedConstraints},
        {"patient/Observation.rs?category=a,b", Code::MalformedConstraints},
        {"patient/Observation.rs?category=%zz", Code::MalformedConstraints},
        {"patient/Observation.rs?category:not=a", Code::MalformedConstraints},
        {"patient/Observation.read?category=laboratory", Code::MalformedConstraints},
        {"patient/Observation.*?category=laboratory", Code::MalformedConstraints},
        {"launch/Patient", Code::UnknownContext},
        {"user.read", Code::Malformed},
        {"system?x", Code::Malformed},
    };
    for (const Invalid &c : cases) {
        ScopeError error;
        const std::string text = std::string("openid ") + c.scope + " patient/Patient.rs";
        EXPECT_FALSE(parse_scopes(text, &error).has_value()) << c.scope;
        EXPECT_EQ(error.code, c.code) << c.scope;
        EXPECT_EQ(error.scope, c.scope);
        EXPECT_FALSE(error.reason.empty()) << c.scope;
        // Also without an error out-parameter.
        EXPECT_FALSE(parse_scopes(c.scope).has_value()) << c.scope;
    }
}

TEST(SmartScopes, RefusesCharactersOutsideScopeTokens) {
    for (const char *text :
         {"openid\tprofile", "patient/Observation.rs\n", "a\"b", "a\\b", "caf\xC3\xA9", "x\x7f"}) {
        ScopeError error;
        EXPECT_FALSE(parse_scopes(text, &error).has_value()) << text;
        EXPECT_EQ(error.code, ScopeError::Code::InvalidCharacter) << text;
    }
}

TEST(SmartScopes, EmptyTokensAndOtherScopes) {
    const ScopeSet set = parse("  openid   email  user_impersonation email patient ");
    EXPECT_TRUE(set.has(LaunchScope::OpenId));
    EXPECT_TRUE(set.resource_scopes().empty());
    EXPECT_EQ(set.other_scopes(),
              (std::vector<std::string>{"email", "user_impersonation", "patient"}));
    EXPECT_EQ(parse("").to_string(), "");
    EXPECT_EQ(parse("   ").to_string(), "");
    // Other scopes grant nothing.
    EXPECT_EQ(set.allows(Context::Patient, "Patient", Permission::Read, nullptr).kind,
              Kind::Denied);
}

TEST(SmartScopes, CapsLengthAndCount) {
    std::string many;
    for (size_t i = 0; i < kMaxScopes; ++i) {
        many += "openid ";
    }
    EXPECT_TRUE(parse_scopes(many).has_value());
    ScopeError error;
    EXPECT_FALSE(parse_scopes(many + "openid", &error).has_value());
    EXPECT_EQ(error.code, ScopeError::Code::TooMany);

    std::string text = "openid";
    text.resize(kMaxScopeStringLength, ' ');
    EXPECT_TRUE(parse_scopes(text).has_value());
    text.push_back(' ');
    EXPECT_FALSE(parse_scopes(text, &error).has_value());
    EXPECT_EQ(error.code, ScopeError::Code::TooLong);
}

TEST(SmartScopes, GrantIsTheUnionOfScopes) {
    const ScopeSet set =
        parse("patient/Observation.r patient/Observation.s patient/Condition.cu patient/*.d");
    const auto kind = [&](std::string_view type, Permission p) {
        return set.allows(Context::Patient, type, p, nullptr).kind;
    };
    EXPECT_EQ(kind("Observation", Permission::Read), Kind::Allowed);
    EXPECT_EQ(kind("Observation", Permission::Search), Kind::Allowed);
    EXPECT_EQ(kind("Observation", Permission::Create), Kind::Denied);
    EXPECT_EQ(kind("Observation", Permission::Delete), Kind::Allowed);
    EXPECT_EQ(kind("Condition", Permission::Create), Kind::Allowed);
    EXPECT_EQ(kind("Condition", Permission::Update), Kind::Allowed);
    EXPECT_EQ(kind("Condition", Permission::Read), Kind::Denied);
    EXPECT_EQ(kind("Patient", Permission::Delete), Kind::Allowed);
    EXPECT_EQ(kind("Patient", Permission::Read), Kind::Denied);
    // Contexts do not mix, and only real types are answered.
    EXPECT_EQ(set.allows(Context::User, "Observation", Permission::Read, nullptr).kind,
              Kind::Denied);
    EXPECT_EQ(set.allows(Context::System, "Observation", Permission::Read, nullptr).kind,
              Kind::Denied);
    EXPECT_EQ(kind("*", Permission::Delete), Kind::Denied);
    EXPECT_EQ(kind("observation", Permission::Read), Kind::Denied);
}

TEST(SmartScopes, GranularSearchNeedsAMatchingCategory) {
    const ScopeSet set =
        parse(std::string("patient/Observation.rs?category=") +
              "http://terminology.hl7.org/CodeSystem/observation-category%7C" + "laboratory");
    ASSERT_EQ(set.resource_scopes().size(), 1u);
    EXPECT_TRUE(set.resource_scopes()[0].granular());
    EXPECT_EQ(set.resource_scopes()[0].constraints, (Query{{"category", std::string(kLab)}}));

    const auto search = [&](const Query &query) {
        return set.allows(Context::Patient, "Observation", Permission::Search, &query).kind;
    };
    EXPECT_EQ(search({{"category", std::string(kLab)}}), Kind::Allowed);
    EXPECT_EQ(search({{"code", "1234-5"}, {"category", std::string(kLab)}}), Kind::Allowed);
    EXPECT_EQ(search({{"category", "laboratory"}}), Kind::Denied);  // any system: wider
    EXPECT_EQ(search({{"category", std::string(kLab) + "," + std::string(kVitals)}}), Kind::Denied);
    // Repeated parameters AND: one restrictive occurrence is enough.
    EXPECT_EQ(search({{"category", "laboratory"}, {"category", std::string(kLab)}}), Kind::Allowed);
    EXPECT_EQ(search({{"category:not", std::string(kLab)}}), Kind::Denied);
    EXPECT_EQ(search({{"category", std::string(kVitals)}}), Kind::Denied);
    EXPECT_EQ(search({}), Kind::Denied);
    EXPECT_EQ(set.allows(Context::Patient, "Observation", Permission::Search, nullptr).kind,
              Kind::Denied);
}

TEST(SmartScopes, GranularCodeOnlyCategoryAcceptsAnySystem) {
    const ScopeSet set = parse("patient/Observation.rs?category=laboratory");
    const auto search = [&](const Query &query) {
        return set.allows(Context::Patient, "Observation", Permission::Search, &query).kind;
    };
    EXPECT_EQ(search({{"category", "laboratory"}}), Kind::Allowed);
    EXPECT_EQ(search({{"category", std::string(kLab)}}), Kind::Allowed);
    EXPECT_EQ(search({{"category", "|laboratory"}}), Kind::Allowed);
    EXPECT_EQ(search({{"category", "laboratory,vital-signs"}}), Kind::Denied);
    EXPECT_EQ(search({{"category", "http://x|laboratoryx"}}), Kind::Denied);
    EXPECT_EQ(search({{"category", "laboratory\\,x"}}), Kind::Denied);
}

TEST(SmartScopes, GranularOtherParametersMatchExactly) {
    const ScopeSet set = parse("patient/Observation.rs?code=http://loinc.org|1234-5");
    const auto search = [&](const Query &query) {
        return set.allows(Context::Patient, "Observation", Permission::Search, &query).kind;
    };
    EXPECT_EQ(search({{"code", "http://loinc.org|1234-5"}}), Kind::Allowed);
    EXPECT_EQ(search({{"code", "1234-5"}}), Kind::Denied);
}

TEST(SmartScopes, GranularReadsAreConstrainedOnTheResource) {
    const ScopeSet set = parse(std::string("patient/Observation.rs?category=") + std::string(kLab) +
                               " patient/Observation.rs?category=" + std::string(kVitals) +
                               " patient/Observation.r?category=" + std::string(kLab) +
                               " patient/Condition.rs?category=problem");
    const Access read = set.allows(Context::Patient, "Observation", Permission::Read, nullptr);
    EXPECT_EQ(read.kind, Kind::AllowedWithConstraint);
    EXPECT_EQ(read.constraints,
              (std::vector<Constraint>{{"category", {std::string(kLab), std::string(kVitals)}}}));
    const Access condition = set.allows(Context::Patient, "Condition", Permission::Read, nullptr);
    EXPECT_EQ(condition.constraints, (std::vector<Constraint>{{"category", {"problem"}}}));
    EXPECT_EQ(set.allows(Context::Patient, "Patient", Permission::Read, nullptr).kind,
              Kind::Denied);

    // A plain scope in the union lifts the constraint.
    const ScopeSet mixed = parse(std::string("patient/Observation.rs?category=") +
                                 std::string(kLab) + " patient/Observation.r");
    EXPECT_EQ(mixed.allows(Context::Patient, "Observation", Permission::Read, nullptr),
              (Access{Kind::Allowed, {}}));
    // ... but only for what it grants.
    const Query vitals{{"category", std::string(kVitals)}};
    EXPECT_EQ(mixed.allows(Context::Patient, "Observation", Permission::Search, &vitals).kind,
              Kind::Denied);
}

TEST(SmartScopes, GranularWritesAndMultiParameterScopes) {
    const ScopeSet set = parse("patient/Observation.cruds?category=laboratory");
    EXPECT_EQ(set.allows(Context::Patient, "Observation", Permission::Create, nullptr).kind,
              Kind::AllowedWithConstraint);
    EXPECT_EQ(set.allows(Context::Patient, "Observation", Permission::Update, nullptr).kind,
              Kind::AllowedWithConstraint);
    EXPECT_EQ(set.allows(Context::Patient, "Observation", Permission::Delete, nullptr).kind,
              Kind::Denied);

    const ScopeSet two = parse("patient/Observation.rs?category=laboratory&code=1234-5");
    EXPECT_EQ(two.allows(Context::Patient, "Observation", Permission::Read, nullptr).kind,
              Kind::Denied);
    const Query both{{"code", "1234-5"}, {"category", "laboratory"}};
    const Query one{{"category", "laboratory"}};
    EXPECT_EQ(two.allows(Context::Patient, "Observation", Permission::Search, &both).kind,
              Kind::Allowed);
    EXPECT_EQ(two.allows(Context::Patient, "Observation", Permission::Search, &one).kind,
              Kind::Denied);
}

TEST(SmartScopes, CeilingLimitsTheGrant) {
    const ScopeSet ceiling = parse("openid launch/patient patient/*.rs");
    EXPECT_EQ(parse("openid offline_access patient/*.cruds").intersect_ceiling(ceiling),
              parse("openid patient/*.rs"));
    EXPECT_EQ(parse("patient/*.*").intersect_ceiling(ceiling).to_string(), "patient/*.rs");
    EXPECT_EQ(parse("patient/Observation.cruds patient/Condition.c").intersect_ceiling(ceiling),
              parse("patient/Observation.rs"));
    EXPECT_EQ(parse("patient/*.rs").intersect_ceiling(parse("patient/Observation.r user/*.cruds")),
              parse("patient/Observation.r"));
    EXPECT_EQ(parse("user/*.rs email").intersect_ceiling(parse("patient/*.rs email")),
              parse("email"));
    EXPECT_EQ(parse("patient/Observation.rs")
                  .intersect_ceiling(parse("patient/Observation.rs?category=laboratory")),
              parse("patient/Observation.rs?category=laboratory"));

    // The effective grant never exceeds the ceiling, whatever the token asks for.
    const ScopeSet effective =
        parse("patient/*.cruds user/Patient.cruds").intersect_ceiling(ceiling);
    EXPECT_EQ(effective.allows(Context::Patient, "Observation", Permission::Read, nullptr).kind,
              Kind::Allowed);
    EXPECT_EQ(effective.allows(Context::Patient, "Observation", Permission::Create, nullptr).kind,
              Kind::Denied);
    EXPECT_EQ(effective.allows(Context::User, "Patient", Permission::Read, nullptr).kind,
              Kind::Denied);
}

TEST(SmartScopes, InteractionsMapToPermissions) {
    using fhir::Interaction;
    using RK = RequiredPermission::Kind;
    const struct {
        Interaction interaction;
        RK kind;
        Permission permission;
    } cases[] = {
        {Interaction::Read, RK::Required, Permission::Read},
        {Interaction::VRead, RK::Required, Permission::Read},
        {Interaction::HistoryInstance, RK::Required, Permission::Read},
        {Interaction::HistoryType, RK::Required, Permission::Read},
        {Interaction::SearchType, RK::Required, Permission::Search},
        {Interaction::Create, RK::Required, Permission::Create},
        {Interaction::Update, RK::Required, Permission::Update},
        {Interaction::Patch, RK::Required, Permission::Update},
        {Interaction::Delete, RK::Required, Permission::Delete},
        {Interaction::Capabilities, RK::None, Permission::Read},
        {Interaction::SearchSystem, RK::Unsupported, Permission::Read},
        {Interaction::HistorySystem, RK::Unsupported, Permission::Read},
        {Interaction::Batch, RK::Unsupported, Permission::Read},
        {Interaction::OperationSystem, RK::Unsupported, Permission::Read},
        {Interaction::OperationType, RK::Unsupported, Permission::Read},
        {Interaction::OperationInstance, RK::Unsupported, Permission::Read},
    };
    static_assert(std::size(cases) == fhir::kInteractionCount);
    for (const auto &c : cases) {
        const RequiredPermission required = required_permission(c.interaction);
        EXPECT_EQ(required.kind, c.kind) << fhir::interaction_name(c.interaction);
        if (c.kind == RK::Required) {
            EXPECT_EQ(required.permission, c.permission) << fhir::interaction_name(c.interaction);
        }
    }

    const ScopeSet set = parse("system/*.cruds");
    EXPECT_EQ(set.allows_interaction(Context::System, Interaction::Capabilities, "", nullptr).kind,
              Kind::Allowed);
    EXPECT_EQ(set.allows_interaction(Context::System, Interaction::Patch, "Patient", nullptr).kind,
              Kind::Allowed);
    EXPECT_EQ(set.allows_interaction(Context::System, Interaction::Batch, "", nullptr).kind,
              Kind::Denied);
    EXPECT_EQ(
        set.allows_interaction(Context::System, Interaction::OperationType, "Patient", nullptr)
            .kind,
        Kind::Denied);
    EXPECT_EQ(parse("system/Patient.r")
                  .allows_interaction(Context::System, Interaction::Patch, "Patient", nullptr)
                  .kind,
              Kind::Denied);
}

TEST(SmartScopes, CanonicalText) {
    EXPECT_EQ(parse("patient/Observation.read launch openid user/*.write x").to_string(),
              "openid launch patient/Observation.rs user/*.cud x");
    EXPECT_EQ(parse("patient/Observation.rs?category=a%26b").to_string(),
              "patient/Observation.rs?category=a%26b");
    // Round trip.
    const ScopeSet set = parse("patient/Observation.rs?category=http://x.org/cs%7Clab&code=1");
    EXPECT_EQ(parse(set.to_string()), set);
    EXPECT_EQ(context_name(Context::User), "user");
    EXPECT_EQ(permission_letter(Permission::Search), 's');
    EXPECT_EQ(launch_scope_name(LaunchScope::LaunchEncounter), "launch/encounter");
}

}  // namespace
}  // namespace ehrgate::smart
