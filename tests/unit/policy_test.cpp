#include "ehrgate/policy.hpp"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "ehrgate/msgpack.hpp"

namespace ehrgate::policy {
namespace {

const std::string kSourceDir = EHRGATE_SOURCE_DIR;
const std::string kSandboxVersion = "sandbox-2026.11.29-3";

// The smallest valid bundle; tests splice their broken part into copies of it.
constexpr const char *kMinimal = R"(schema: ehrgate.policy/v1
version: v1
clients: []
routes:
  - name: fhir
    prefix: /fhir/
    methods: [GET]
    resources: ["*"]
    interactions: ["*"]
)";

std::string dump(const std::vector<Diagnostic> &diagnostics) {
    std::string out;
    for (const Diagnostic &d : diagnostics) {
        out += "\n  " + d.to_string();
    }
    return out;
}

ParseResult parse(std::string_view yaml) {
    return parse_bundle(yaml, "test.yaml");
}

// Expects exactly one diagnostic, at the given place, whose message contains `message`.
void check_one(const ParseResult &result, std::string_view file, std::string_view yaml, int line,
               int column, std::string_view field, std::string_view message) {
    SCOPED_TRACE(std::string(yaml));
    EXPECT_FALSE(result.bundle.has_value());
    ASSERT_EQ(result.diagnostics.size(), 1u) << dump(result.diagnostics);
    const Diagnostic &d = result.diagnostics[0];
    EXPECT_EQ(d.file, file);
    EXPECT_EQ(d.line, line) << d.to_string();
    EXPECT_EQ(d.column, column) << d.to_string();
    EXPECT_EQ(d.field, field) << d.to_string();
    EXPECT_NE(d.message.find(message), std::string::npos) << d.to_string();
}

// Parses `yaml` and expects exactly one diagnostic, at the given place, whose message contains
// `message`.
void expect_one(std::string_view yaml, int line, int column, std::string_view field,
                std::string_view message) {
    check_one(parse(yaml), "test.yaml", yaml, line, column, field, message);
}

// A bundle with one route whose fields after `prefix` are given by the caller (lines 7..).
std::string with_route_tail(std::string_view tail) {
    return std::string(R"(schema: ehrgate.policy/v1
version: v1
clients: []
routes:
  - name: fhir
    prefix: /fhir/
)") + std::string(tail);
}

// A bundle with one client whose body is given by the caller (lines 4..).
std::string with_client(std::string_view client) {
    return std::string(R"(schema: ehrgate.policy/v1
version: v1
clients:
)") + std::string(client) +
           R"(routes:
  - {name: r, prefix: /, methods: [GET], resources: ["*"], interactions: ["*"]}
)";
}

// ---- The shipped bundles ---------------------------------------------------------------------

TEST(PolicyBundleFiles, SandboxBundleIsValid) {
    const ParseResult result = load_bundle_file(kSourceDir + "/conf/policy.yaml");
    ASSERT_TRUE(result.diagnostics.empty()) << dump(result.diagnostics);
    ASSERT_TRUE(result.bundle.has_value());
    const Bundle &b = *result.bundle;
    EXPECT_EQ(b.schema, kSchemaV1);
    EXPECT_EQ(b.version, kSandboxVersion);
    EXPECT_FALSE(b.description.empty());

    ASSERT_EQ(b.issuers.size(), 1u);
    const Issuer &issuer = b.issuers[0];
    EXPECT_EQ(issuer.id, "sandbox-dev");
    EXPECT_EQ(issuer.issuer, "https://sandbox-issuer.ehrgate.local");
    EXPECT_EQ(issuer.audience, "http://127.0.0.1:8080/fhir");
    EXPECT_EQ(issuer.jwks_file, "sandbox/dev-issuer-jwks.json");
    std::ifstream jwks(kSourceDir + "/conf/sandbox/dev-issuer-jwks.json", std::ios::binary);
    EXPECT_EQ(issuer.jwks_json, std::string(std::istreambuf_iterator<char>(jwks), {}));
    EXPECT_EQ(issuer.algorithms, (std::vector<std::string>{"ES256", "ES384", "PS256", "RS256"}));
    EXPECT_EQ(issuer.leeway_seconds, 60);
    EXPECT_EQ(b.find_issuer_by_iss("https://sandbox-issuer.ehrgate.local"), &issuer);

    ASSERT_EQ(b.clients.size(), 3u);  // canonical order: by id
    EXPECT_EQ(b.clients[0].id, "demo-batch");
    EXPECT_EQ(b.clients[0].context, LaunchContext::System);
    EXPECT_EQ(b.clients[0].traffic_class, TrafficClass::Batch);
    EXPECT_EQ(b.clients[0].purposes, (std::vector<std::string>{"HOPERAT", "HRESCH"}));
    EXPECT_EQ(b.clients[1].id, "demo-clinician-app");
    EXPECT_EQ(b.clients[1].context, LaunchContext::User);
    EXPECT_EQ(b.clients[1].traffic_class, TrafficClass::Interactive);
    EXPECT_EQ(b.clients[1].purposes, (std::vector<std::string>{"ETREAT", "TREAT"}));
    EXPECT_EQ(b.clients[2].id, "demo-patient-app");
    EXPECT_EQ(b.clients[2].context, LaunchContext::Patient);
    EXPECT_EQ(b.clients[2].traffic_class, TrafficClass::Interactive);
    EXPECT_EQ(b.clients[2].purposes, (std::vector<std::string>{"PATRQT"}));
    for (const Client &c : b.clients) {
        EXPECT_FALSE(c.display_name.empty()) << c.id;
        EXPECT_EQ(c.auth, std::vector<AuthMethod>{AuthMethod::Bearer}) << c.id;
        EXPECT_EQ(c.tenants, std::vector<std::string>{"general-hospital"}) << c.id;
        EXPECT_TRUE(c.issuers.empty()) << c.id;
        EXPECT_TRUE(c.certificates.empty()) << c.id;
    }
    // Canonical form: tokens sorted.
    EXPECT_EQ(b.clients[0].scope_ceiling, "system/*.rs");
    EXPECT_EQ(b.clients[1].scope_ceiling, "fhirUser launch offline_access openid user/*.cruds");
    EXPECT_EQ(b.clients[2].scope_ceiling, "fhirUser launch/patient openid patient/*.rs");

    ASSERT_EQ(b.routes.size(), 1u);
    const Route &r = b.routes[0];
    EXPECT_EQ(r.name, "fhir");
    EXPECT_EQ(r.prefix, "/fhir/");
    EXPECT_EQ(r.tenant, "general-hospital");
    EXPECT_EQ(r.methods,
              (std::vector<std::string>{"DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"}));
    EXPECT_EQ(r.resources,
              (std::vector<std::string>{"Condition", "Consent", "Encounter", "MedicationRequest",
                                        "Observation", "Patient", "ServiceRequest"}));
    EXPECT_EQ(r.interactions,
              (std::vector<std::string>{"capabilities", "create", "delete", "history-instance",
                                        "patch", "read", "search-type", "update", "vread"}));
    EXPECT_EQ(r.upstream, "sandbox-ehr");

    // Throttling, as documented in the file and in docs/throttling.md.
    ASSERT_EQ(b.rate_plans.size(), 3u);  // canonical order: by name
    EXPECT_EQ(b.rate_plans[0], (RatePlan{"batch", "100/s", 100'000'000, 100, 16, false}));
    EXPECT_EQ(b.rate_plans[1], (RatePlan{"clinical", "2000/s", 2'000'000'000, 2000, 128, false}));
    EXPECT_EQ(b.rate_plans[2], (RatePlan{"unclassified", "5/s", 5'000'000, 10, 2, false}));
    ASSERT_EQ(b.upstreams.size(), 1u);
    EXPECT_EQ(b.upstreams[0], (Upstream{"sandbox-ehr", 256, 64}));
    EXPECT_EQ(b.throttling, (Throttling{"clinical", "batch", "unclassified"}));
    for (const Client &c : b.clients) {
        EXPECT_EQ(c.rate_plan, "") << c.id;
    }
    EXPECT_EQ(b.plan_for(b.find_client("demo-clinician-app"))->name, "clinical");
    EXPECT_EQ(b.plan_for(b.find_client("demo-patient-app"))->name, "clinical");
    EXPECT_EQ(b.plan_for(b.find_client("demo-batch"))->name, "batch");
    EXPECT_EQ(b.plan_for(nullptr)->name, "unclassified");
}

TEST(PolicyBundleFiles, InvalidExampleReportsEveryProblemInOnePass) {
    const std::string path = kSourceDir + "/conf/examples/invalid-policy.yaml";
    const ParseResult result = load_bundle_file(path);
    EXPECT_FALSE(result.bundle.has_value());
    struct Expected {
        int line;
        int column;
        const char *field;
        const char *message;
    };
    const Expected expected[] = {
        {8, 10, "version",
         "invalid version \"sandbox 2026-11-25\": must be 1-64 characters from A-Z a-z 0-9 . _ "
         ": -"},
        {13, 23, "clients[0].purposes[1]",
         "unknown PurposeOfUse code \"TRAET\"; did you mean \"TREAT\"?"},
        {14, 9, "clients[1].id",
         "duplicate client id \"demo-clinician-app\"; first defined at line 10"},
        {15, 14, "clients[1].context",
         "unknown context \"robot\"; expected one of user, patient, system"},
        {17, 5, "clients[2].traffic_class", "missing required field \"traffic_class\""},
        {20, 5, "routes[0].methods", "missing required field \"methods\""},
        {21, 13, "routes[0].prefix", "invalid prefix \"/fhir\": must start and end with '/'"},
        {22, 5, "routes[0].methds", "unknown field \"methds\"; did you mean \"methods\"?"},
        {23, 26, "routes[0].resources[1]",
         "unknown FHIR R4 resource type \"Patients\"; did you mean \"Patient\"?"},
        {24, 26, "routes[0].interactions[1]",
         "unknown interaction \"raed\"; did you mean \"read\"?"},
        {27, 15, "routes[1].methods[0]",
         "unknown HTTP method \"GETT\"; expected one of GET, HEAD, POST, PUT, PATCH, DELETE"},
        {30, 5, "routes[1].interactions", "duplicate key \"interactions\"; first given at line 29"},
    };
    ASSERT_EQ(result.diagnostics.size(), std::size(expected)) << dump(result.diagnostics);
    for (size_t i = 0; i < std::size(expected); ++i) {
        const Diagnostic &d = result.diagnostics[i];
        SCOPED_TRACE(d.to_string());
        EXPECT_EQ(d.file, path);
        EXPECT_EQ(d.line, expected[i].line);
        EXPECT_EQ(d.column, expected[i].column);
        EXPECT_EQ(d.field, expected[i].field);
        EXPECT_EQ(d.message, expected[i].message);
    }
    EXPECT_EQ(result.diagnostics[10].to_string(),
              path +
                  ":27:15: routes[1].methods[0]: unknown HTTP method \"GETT\"; expected one of "
                  "GET, HEAD, POST, PUT, PATCH, DELETE");
}

TEST(PolicyBundleFiles, InvalidAuthExampleReportsEveryProblemInOnePass) {
    const std::string path = kSourceDir + "/conf/examples/invalid-auth.yaml";
    const ParseResult result = load_bundle_file(path);
    EXPECT_FALSE(result.bundle.has_value());
    struct Expected {
        int line;
        int column;
        const char *field;
        std::string message;
    };
    const Expected expected[] = {
        {10, 13, "issuers[0].issuer",
         "invalid issuer \"http://issuer.example.org\": must use https:// (plain http:// is "
         "accepted only for 127.0.0.1 and localhost, for a sandbox issuer)"},
        {13, 25, "issuers[0].algorithms[1]",
         "symmetric algorithms are never accepted: \"HS256\" needs a shared secret, and the "
         "gateway verifies tokens only with the issuer's public keys; use one of RS256, RS384, "
         "RS512, PS256, PS384, PS512, ES256, ES384, ES512"},
        // Relative to the bundle's directory; the sandbox JWKS on line 12 was found that way.
        {17, 16, "issuers[1].jwks_file",
         "jwks_file \"" + kSourceDir +
             "/conf/examples/partner-jwks.json\": cannot open: No such file or directory"},
        {19, 21, "issuers[1].leeway_seconds",
         "invalid leeway_seconds \"3600\": expected a whole number of seconds from 0 to 300"},
        {24, 20, "clients[0].auth[1]",
         "unknown authentication method \"mtsl\"; did you mean \"mtls\"?"},
        {25, 20, "clients[0].scope_ceiling",
         "invalid scope_ceiling: \"user/Patients.rs\": not a FHIR R4 resource type"},
        {26, 15, "clients[0].issuers[0]", "unknown issuer \"dve\"; did you mean \"dev\"?"},
        {33, 9, "clients[1].certificates[0]",
         "invalid certificate fingerprint "
         "\"A9:4A:8F:E5:CC:B1:9B:A6:1C:4C:08:73:D3:91:E9:87:98:2F:BB:D3\": this looks like a "
         "SHA-1 fingerprint; expected the SHA-256 of the DER certificate, 64 hex digits (colons "
         "allowed), e.g. from `openssl x509 -in client.pem -outform DER | sha256sum`"},
        {34, 5, "clients[2].certificates",
         "missing required field \"certificates\": auth includes \"cert-bound\", which needs at "
         "least one pinned certificate"},
        {44, 13, "routes[0].tenant",
         "no client lists tenant \"general-hospitl\"; did you mean \"general-hospital\"?"},
    };
    ASSERT_EQ(result.diagnostics.size(), std::size(expected)) << dump(result.diagnostics);
    for (size_t i = 0; i < std::size(expected); ++i) {
        const Diagnostic &d = result.diagnostics[i];
        SCOPED_TRACE(d.to_string());
        EXPECT_EQ(d.file, path);
        EXPECT_EQ(d.line, expected[i].line);
        EXPECT_EQ(d.column, expected[i].column);
        EXPECT_EQ(d.field, expected[i].field);
        EXPECT_EQ(d.message, expected[i].message);
    }
}

TEST(PolicyBundleFiles, InvalidThrottlingExampleReportsEveryProblemInOnePass) {
    const std::string path = kSourceDir + "/conf/examples/invalid-throttling.yaml";
    const ParseResult result = load_bundle_file(path);
    EXPECT_FALSE(result.bundle.has_value());
    struct Expected {
        int line;
        int column;
        const char *field;
        const char *message;
    };
    const Expected expected[] = {
        {12, 16, "clients[0].rate_plan",
         "unknown rate plan \"clinicl\"; did you mean \"clinical\"?"},
        {22, 15, "routes[0].upstream",
         "unknown upstream \"ehr\"; defined in upstreams: sandbox-ehr"},
        {25, 11, "rate_plans[0].rate",
         "invalid rate \"2000r/s\": write \"2000/s\", not nginx's \"2000r/s\"; expected N/s, N/m "
         "or "
         "N/h (N requests per second, minute or hour, 1 to 10000000), e.g. 50/s"},
        {26, 12, "rate_plans[0].burst",
         "invalid burst \"0\": expected a whole number of tokens from 1 to 1000000"},
        {30, 18, "rate_plans[1].concurrency",
         "invalid concurrency \"-1\": expected a whole number of requests from 0 (no cap) to "
         "100000"},
        {31, 14, "rate_plans[1].dry_run", "invalid dry_run \"yes\": expected true or false"},
        {32, 11, "rate_plans[2].name",
         "duplicate rate plan name \"clinical\"; first defined at line 24"},
        {33, 11, "rate_plans[2].rate",
         "invalid rate \"10/d\": expected N/s, N/m or N/h (N requests per second, minute or hour, "
         "1 to 10000000), e.g. 50/s"},
        {38, 26, "upstreams[0].interactive_reserve",
         "interactive_reserve (256) must be less than capacity (256): batch traffic is refused "
         "once capacity - interactive_reserve requests are in flight, so this would refuse all of "
         "it"},
        {40, 3, "throttling.unclassified_plan", "missing required field \"unclassified_plan\""},
        {41, 15, "throttling.batch_plan",
         "unknown rate plan \"bulk\"; defined in rate_plans: clinical, batch"},
    };
    ASSERT_EQ(result.diagnostics.size(), std::size(expected)) << dump(result.diagnostics);
    for (size_t i = 0; i < std::size(expected); ++i) {
        const Diagnostic &d = result.diagnostics[i];
        SCOPED_TRACE(d.to_string());
        EXPECT_EQ(d.file, path);
        EXPECT_EQ(d.line, expected[i].line);
        EXPECT_EQ(d.column, expected[i].column);
        EXPECT_EQ(d.field, expected[i].field);
        EXPECT_EQ(d.message, expected[i].message);
    }
}

TEST(PolicyBundleFiles, SyntaxErrorExample) {
    const std::string path = kSourceDir + "/conf/examples/syntax-error.yaml";
    const ParseResult result = load_bundle_file(path);
    EXPECT_FALSE(result.bundle.has_value());
    ASSERT_EQ(result.diagnostics.size(), 1u) << dump(result.diagnostics);
    const Diagnostic &d = result.diagnostics[0];
    EXPECT_EQ(d.line, 10);  // where yaml-cpp notices the unclosed flow list
    EXPECT_EQ(d.column, 14);
    EXPECT_EQ(d.field, "");
    EXPECT_EQ(d.message, "YAML syntax error: end of sequence flow not found");
}

// ---- Loading ---------------------------------------------------------------------------------

class TempDir : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = std::filesystem::temp_directory_path() /
               ("ehrgate-policy-test-" +
                std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "-" +
                ::testing::UnitTest::GetInstance()->current_test_info()->name());
        std::filesystem::create_directories(dir_);
    }
    void TearDown() override { std::filesystem::remove_all(dir_); }

    std::string write(const std::string &name, const std::string &content) {
        const std::filesystem::path path = dir_ / name;
        std::ofstream(path, std::ios::binary) << content;
        return path.string();
    }

    std::filesystem::path dir_;
};

using PolicyLoad = TempDir;

TEST_F(PolicyLoad, MissingFileIsOneDiagnostic) {
    const std::string path = (dir_ / "absent.yaml").string();
    const ParseResult result = load_bundle_file(path);
    EXPECT_FALSE(result.bundle.has_value());
    ASSERT_EQ(result.diagnostics.size(), 1u);
    EXPECT_EQ(result.diagnostics[0].to_string(), path + ": cannot open: No such file or directory");
}

TEST_F(PolicyLoad, DirectoryIsOneDiagnostic) {
    const ParseResult result = load_bundle_file(dir_.string());
    ASSERT_EQ(result.diagnostics.size(), 1u);
    EXPECT_NE(result.diagnostics[0].message.find("cannot"), std::string::npos)
        << result.diagnostics[0].to_string();
}

TEST_F(PolicyLoad, FileSizeLimit) {
    // Exactly at the limit is read (and then parsed); one byte more is refused before parsing.
    std::string padding(kMaxBundleBytes - std::string(kMinimal).size(), '\n');
    const ParseResult at_limit = load_bundle_file(write("at.yaml", kMinimal + padding));
    EXPECT_TRUE(at_limit.bundle.has_value()) << dump(at_limit.diagnostics);

    const ParseResult over = load_bundle_file(write("over.yaml", kMinimal + padding + "\n"));
    EXPECT_FALSE(over.bundle.has_value());
    ASSERT_EQ(over.diagnostics.size(), 1u);
    EXPECT_EQ(over.diagnostics[0].line, 0);
    EXPECT_NE(over.diagnostics[0].message.find("larger than 4194304 bytes (4 MiB)"),
              std::string::npos)
        << over.diagnostics[0].to_string();

    const ParseResult text = parse_bundle(std::string(kMaxBundleBytes + 1, ' '), "big.yaml");
    ASSERT_EQ(text.diagnostics.size(), 1u);
    EXPECT_EQ(text.diagnostics[0].message,
              "the bundle is 4194305 bytes; at most 4194304 bytes (4 MiB) are allowed");
}

// ---- Diagnostics, one kind at a time ---------------------------------------------------------

TEST(PolicyParse, MinimalBundleIsValid) {
    const ParseResult result = parse(kMinimal);
    ASSERT_TRUE(result.bundle.has_value()) << dump(result.diagnostics);
    EXPECT_TRUE(result.bundle->clients.empty());
    EXPECT_EQ(result.bundle->description, "");
}

TEST(PolicyParse, DocumentShape) {
    expect_one("", 0, 0, "", "the bundle is empty");
    expect_one("# nothing but a comment\n", 0, 0, "", "the bundle is empty");
    expect_one("~\n", 0, 0, "", "the bundle is empty");
    expect_one("- a\n- b\n", 1, 1, "", "top level, got a list");
    expect_one("just text\n", 1, 1, "", "top level, got a string");
    expect_one(std::string(kMinimal) + "---\nschema: x\n", 10, 1, "",
               "a policy bundle is a single YAML document; a second one starts here");
}

TEST(PolicyParse, SyntaxErrorsCarryYamlCppPosition) {
    expect_one("schema: ehrgate.policy/v1\nversion: [a\n", 3, 1, "", "YAML syntax error: ");
    expect_one("a: b: c\n", 1, 5, "", "YAML syntax error: illegal map value");
    expect_one("a:\n\t- x\n", 2, 2, "", "YAML syntax error: ");
    expect_one("a: *undefined\n", 1, 4, "", "YAML syntax error: the referenced anchor");
}

TEST(PolicyParse, DeepNestingIsADiagnosticNotACrash) {
    const std::string deep = "schema: " + std::string(100000, '[') + std::string(100000, ']');
    const ParseResult result = parse(deep);
    ASSERT_EQ(result.diagnostics.size(), 1u) << dump(result.diagnostics);
    EXPECT_EQ(result.diagnostics[0].message, "YAML nesting is too deep to be a policy bundle");
    EXPECT_EQ(result.diagnostics[0].line, 1);
}

TEST(PolicyParse, BinaryGarbageNeverThrows) {
    std::mt19937 rng(12345);
    for (int round = 0; round < 200; ++round) {
        std::string text(static_cast<size_t>(rng() % 512), '\0');
        for (char &c : text) {
            c = static_cast<char>(rng());
        }
        const ParseResult result = parse(text);
        EXPECT_FALSE(result.bundle.has_value());
        EXPECT_FALSE(result.diagnostics.empty());
    }
}

TEST(PolicyParse, OnlyUtf8TextIsParsed) {
    // Screened before yaml-cpp: it reads 0x04 as end of input, and LoadAll() never returned on
    // some binary input (it kept appending empty documents until memory ran out).
    expect_one(std::string(kMinimal) +
                   "description: a\x04"
                   "b\n",
               10, 15, "", "control character 0x04 is not allowed in a policy bundle");
    expect_one(std::string("schema: x\n") + std::string(1, '\0'), 2, 1, "",
               "control character 0x00 is not allowed in a policy bundle");
    expect_one(",d\x05\xca\x80o", 1, 3, "", "control character 0x05");
    expect_one("version: \xff\n", 1, 10, "", "invalid UTF-8; a policy bundle must be UTF-8 text");
    expect_one("version: \xc0\xaf\n", 1, 10, "", "invalid UTF-8");      // overlong '/'
    expect_one("version: \xed\xa0\x80\n", 1, 10, "", "invalid UTF-8");  // surrogate
    expect_one("version: \xf4\x90\x80\x80\n", 1, 10, "", "invalid UTF-8");
    expect_one("version: \xe2\x82\n", 1, 10, "", "invalid UTF-8");  // truncated sequence

    const ParseResult text = parse(
        std::string(kMinimal) + "description: \"Überweisung \xe2\x82\xac \xf0\x9f\x8f\xa5\"\r\n");
    ASSERT_TRUE(text.bundle) << dump(text.diagnostics);
    EXPECT_EQ(text.bundle->description, "Überweisung € \xf0\x9f\x8f\xa5");
    EXPECT_TRUE(parse("\xef\xbb\xbf" + std::string(kMinimal)).bundle);  // BOM
}

TEST(PolicyParse, PrintableGarbageNeverThrows) {
    std::mt19937 rng(99);
    const std::string alphabet = "-:[]{},?!&*#|>'\"%@` \n\tab01.~";
    for (int round = 0; round < 500; ++round) {
        std::string text(static_cast<size_t>(rng() % 200), ' ');
        for (char &c : text) {
            c = alphabet[rng() % alphabet.size()];
        }
        const ParseResult result = parse(text);
        EXPECT_FALSE(result.bundle.has_value()) << text;
    }
}

TEST(PolicyParse, UnknownFields) {
    expect_one(std::string(kMinimal) + "extra: 1\n", 10, 1, "extra",
               "unknown field \"extra\"; expected one of schema, version, description, issuers, "
               "clients, routes, rate_plans, upstreams, throttling");
    expect_one(std::string(kMinimal) + "rotues: []\n", 10, 1, "rotues",
               "unknown field \"rotues\"; did you mean \"routes\"?");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [\"*\"]\n    interactions: "
                               "[\"*\"]\n    methds: [GET]\n"),
               10, 5, "routes[0].methds", "unknown field \"methds\"; did you mean \"methods\"?");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, purpose: [TREAT]}\n"),
               4, 50, "clients[0].purpose",
               "unknown field \"purpose\"; did you mean \"purposes\"?");
    expect_one(std::string(kMinimal) + "[a]: 1\n", 10, 1, "",
               "mapping keys must be strings, got a list");
}

TEST(PolicyParse, DuplicateKeys) {
    // yaml-cpp keeps both pairs; the validator must see the second one.
    expect_one(std::string(kMinimal) + "version: v2\n", 10, 1, "version",
               "duplicate key \"version\"; first given at line 2");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [\"*\"]\n    interactions: "
                               "[\"*\"]\n    methods: [DELETE]\n"),
               10, 5, "routes[0].methods", "duplicate key \"methods\"; first given at line 7");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, context: system}\n"),
               4, 50, "clients[0].context", "duplicate key \"context\"; first given at line 4");
}

TEST(PolicyParse, MissingRequiredFields) {
    expect_one(
        "version: v1\nclients: []\nroutes: [{name: r, prefix: /, methods: [GET], "
        "resources: [\"*\"], interactions: [\"*\"]}]\n",
        1, 1, "schema", "missing required field \"schema\"");
    expect_one(with_client("  - id: a\n    context: user\n"), 4, 5, "clients[0].traffic_class",
               "missing required field \"traffic_class\"");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [\"*\"]\n"), 5, 5,
               "routes[0].interactions", "missing required field \"interactions\"");
}

TEST(PolicyParse, WrongTypes) {
    expect_one(
        "schema: [ehrgate.policy/v1]\nversion: v1\nclients: []\nroutes: [{name: r, "
        "prefix: /, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        1, 9, "schema", "expected a string, got a list");
    expect_one(
        "schema: ehrgate.policy/v1\nversion: {a: b}\nclients: []\nroutes: [{name: r, "
        "prefix: /, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        2, 10, "version", "expected a string, got a mapping");
    // An empty value points at its key: yaml-cpp would place it on the next line.
    expect_one(
        "schema: ehrgate.policy/v1\nversion:\nclients: []\nroutes: [{name: r, prefix: "
        "/, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        2, 1, "version", "expected a string, got null");
    expect_one(
        "schema: ehrgate.policy/v1\nversion: v1\nclients:\nroutes: [{name: r, prefix: "
        "/, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        3, 1, "clients", "expected a list, got null; write [] for an empty list");
    expect_one(
        "schema: ehrgate.policy/v1\nversion: v1\nclients: demo\nroutes: [{name: r, "
        "prefix: /, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        3, 10, "clients", "expected a list, got a string");
    expect_one(with_client("  - demo-app\n"), 4, 5, "clients[0]",
               "expected a mapping, got a string");
    expect_one(with_route_tail("    methods: GET\n    resources: [\"*\"]\n    interactions: "
                               "[\"*\"]\n"),
               7, 14, "routes[0].methods", "expected a list, got a string");
    expect_one(with_route_tail("    methods: [[GET]]\n    resources: [\"*\"]\n    interactions: "
                               "[\"*\"]\n"),
               7, 15, "routes[0].methods[0]", "expected a string, got a list");
    expect_one(
        with_client("  - {id: a, context: user, traffic_class: batch, purposes: [TREAT, ~]}\n"), 4,
        68, "clients[0].purposes[1]", "expected a string, got null");
}

TEST(PolicyParse, SchemaAndVersion) {
    expect_one(
        "schema: ehrgate.policy/v2\nversion: v1\nclients: []\nroutes: [{name: r, prefix: "
        "/, methods: [GET], resources: [\"*\"], interactions: [\"*\"]}]\n",
        1, 9, "schema", "unsupported schema \"ehrgate.policy/v2\"; expected \"ehrgate.policy/v1\"");
    const std::string long_version(65, 'v');
    expect_one("schema: ehrgate.policy/v1\nversion: " + long_version +
                   "\nclients: []\nroutes: [{name: r, prefix: /, methods: [GET], resources: "
                   "[\"*\"], interactions: [\"*\"]}]\n",
               2, 10, "version", "invalid version");
    EXPECT_TRUE(parse("schema: ehrgate.policy/v1\nversion: " + std::string(64, 'v') +
                      "\nclients: []\nroutes: [{name: r, prefix: /, methods: [GET], resources: "
                      "[\"*\"], interactions: [\"*\"]}]\n")
                    .bundle);
    EXPECT_TRUE(parse("schema: ehrgate.policy/v1\nversion: A-z_0.9:x\nclients: []\nroutes: "
                      "[{name: r, prefix: /, methods: [GET], resources: [\"*\"], interactions: "
                      "[\"*\"]}]\n")
                    .bundle);
}

TEST(PolicyParse, Description) {
    expect_one(std::string(kMinimal) + "description: \"bell\\a\"\n", 10, 14, "description",
               "description contains control characters");
    expect_one(std::string(kMinimal) + "description: " + std::string(1025, 'd') + "\n", 10, 14,
               "description", "description is longer than 1024 bytes");
    const ParseResult ok = parse(std::string(kMinimal) + "description: |\n  two\n  lines\n");
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->description, "two\nlines\n");
}

TEST(PolicyParse, ClientFields) {
    expect_one(with_client("  - {id: \"a b\", context: user, traffic_class: batch}\n"), 4, 10,
               "clients[0].id",
               "invalid client id \"a b\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    expect_one(with_client("  - {id: \"\", context: user, traffic_class: batch}\n"), 4, 10,
               "clients[0].id", "invalid client id \"\"");
    expect_one(with_client("  - {id: a, context: users, traffic_class: batch}\n"), 4, 22,
               "clients[0].context",
               "unknown context \"users\"; expected one of user, patient, system");
    expect_one(with_client("  - {id: a, context: user, traffic_class: bulk}\n"), 4, 43,
               "clients[0].traffic_class",
               "unknown traffic_class \"bulk\"; expected one of interactive, batch");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, display_name: "
                           "\"x\\ny\"}\n"),
               4, 64, "clients[0].display_name", "display_name contains control characters");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, purposes: [XYZZY]}\n"),
               4, 61, "clients[0].purposes[0]",
               "unknown PurposeOfUse code \"XYZZY\"; expected a code of the HL7 v3 PurposeOfUse "
               "value set, e.g. TREAT");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, purposes: [TREAT, "
                           "TREAT]}\n"),
               4, 68, "clients[0].purposes[1]",
               "duplicate purpose \"TREAT\"; first listed at line 4");
    // Every code of the value set is accepted, and purposes may be left out or empty.
    const ParseResult all = parse(with_client(
        "  - id: a\n    context: system\n    traffic_class: batch\n    purposes: [BIORCH, BTG, "
        "CAREMGT, CLINTRCH, CLINTRCHNPC, CLINTRCHPC, CLINTRL, CLMATTCH, COC, COVAUTH, COVERAGE, "
        "DISASTER, DONAT, DSRCH, ELIGDTRM, ELIGVER, ENROLLM, ERTREAT, ETREAT, FAMRQT, FRAUD, GOV, "
        "HACCRED, HCOMPL, HDECD, HDIRECT, HDM, HLEGAL, HMARKT, HOPERAT, HOUTCOMS, HPAYMT, HPRGRP, "
        "HQUALIMP, HRESCH, HSYSADMIN, HTEST, LABELING, MEMADMIN, METAMGT, MILCDM, MILDCRG, "
        "PATADMIN, PATRQT, PATSFTY, PERFMSR, POARCH, POPHLTH, PRECLINTRCH, PUBHLTH, PWATRNY, "
        "RECORDMGT, REMITADV, SUPNWK, SYSDEV, THREAT, TRAIN, TRANSRCH, TREAT]\n  - {id: b, "
        "context: user, traffic_class: interactive}\n  - {id: c, context: patient, "
        "traffic_class: interactive, purposes: []}\n"));
    ASSERT_TRUE(all.bundle) << dump(all.diagnostics);
    EXPECT_EQ(all.bundle->clients[0].purposes.size(), 59u);
}

TEST(PolicyParse, DuplicateClientIds) {
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch}\n"
                           "  - {id: b, context: user, traffic_class: batch}\n"
                           "  - {id: a, context: system, traffic_class: batch}\n"),
               6, 10, "clients[2].id", "duplicate client id \"a\"; first defined at line 4");
}

TEST(PolicyParse, RouteNamesAndPrefixes) {
    const std::string head = "schema: ehrgate.policy/v1\nversion: v1\nclients: []\nroutes:\n";
    const std::string tail = ", methods: [GET], resources: [\"*\"], interactions: [\"*\"]}\n";
    expect_one(head + "  - {name: a, prefix: /a/" + tail + "  - {name: a, prefix: /b/" + tail, 6,
               12, "routes[1].name", "duplicate route name \"a\"; first defined at line 5");
    expect_one(head + "  - {name: a, prefix: /a/" + tail + "  - {name: b, prefix: /a/" + tail, 6,
               23, "routes[1].prefix", "duplicate prefix \"/a/\"; another route uses it at line 5");
    expect_one(head + "  - {name: \"a/b\", prefix: /a/" + tail, 5, 12, "routes[0].name",
               "invalid route name \"a/b\"");
    struct BadPrefix {
        const char *prefix;
        const char *problem;
    };
    const BadPrefix kBad[] = {
        {"fhir/", "must start and end with '/'"},
        {"/fhir", "must start and end with '/'"},
        {"\"\"", "must start and end with '/'"},
        {"/a//b/", "contains an empty path segment (\"//\")"},
        {"/a/./b/", "contains a dot segment (\".\")"},
        {"/a/../", "contains a dot segment (\"..\")"},
        {"\"/a b/\"", "contains \" \"; use only letters, digits, '/' and"},
        {"/a%2Fb/", "contains \"%\""},
        {"\"/a?b/\"", "contains \"?\""},
        {"\"/a#b/\"", "contains \"#\""},
    };
    for (const BadPrefix &bad : kBad) {
        const std::string yaml = head + "  - {name: a, prefix: " + bad.prefix + tail;
        expect_one(yaml, 5, 23, "routes[0].prefix", "invalid prefix ");
        const ParseResult result = parse(yaml);
        ASSERT_EQ(result.diagnostics.size(), 1u);
        EXPECT_NE(result.diagnostics[0].message.find(bad.problem), std::string::npos)
            << result.diagnostics[0].to_string();
    }
    expect_one(head + "  - {name: a, prefix: /" + std::string(256, 'p') + "/" + tail, 5, 23,
               "routes[0].prefix", "is longer than 256 characters");
    for (const char *good : {"/", "/fhir/", "/fhir/r4/", "/a-b_c.d~e/", "/x:y@z/", "/.well/"}) {
        EXPECT_TRUE(parse(head + "  - {name: a, prefix: " + good + tail).bundle) << good;
    }
    expect_one(head + "  []\n", 5, 3, "routes", "at least one route is required");
}

TEST(PolicyParse, RouteLists) {
    expect_one(with_route_tail("    methods: []\n    resources: [\"*\"]\n    interactions: "
                               "[\"*\"]\n"),
               7, 14, "routes[0].methods", "must list at least one HTTP method");
    expect_one(with_route_tail("    methods: [GET, get]\n    resources: [\"*\"]\n    "
                               "interactions: [\"*\"]\n"),
               7, 20, "routes[0].methods[1]",
               "unknown HTTP method \"get\"; expected one of GET, HEAD, POST, PUT, PATCH, DELETE");
    expect_one(with_route_tail("    methods: [GET, HEAD, GET]\n    resources: [\"*\"]\n    "
                               "interactions: [\"*\"]\n"),
               7, 26, "routes[0].methods[2]",
               "duplicate HTTP method \"GET\"; first listed at line 7");
    expect_one(with_route_tail("    methods: [GET]\n    resources: []\n    interactions: "
                               "[\"*\"]\n"),
               8, 16, "routes[0].resources", "must list at least one resource type");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [Patient, \"*\"]\n    "
                               "interactions: [\"*\"]\n"),
               8, 26, "routes[0].resources[1]",
               "\"*\" already allows everything and must be the only entry");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [Patient, Patient]\n    "
                               "interactions: [\"*\"]\n"),
               8, 26, "routes[0].resources[1]",
               "duplicate resource type \"Patient\"; first listed at line 8");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [Zebra]\n    interactions: "
                               "[\"*\"]\n"),
               8, 17, "routes[0].resources[0]",
               "unknown FHIR R4 resource type \"Zebra\"; resource types are case-sensitive");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [patient]\n    interactions: "
                               "[\"*\"]\n"),
               8, 17, "routes[0].resources[0]", "did you mean \"Patient\"?");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [\"*\"]\n    interactions: "
                               "[]\n"),
               9, 19, "routes[0].interactions", "must list at least one interaction");
    expect_one(with_route_tail("    methods: [GET]\n    resources: [\"*\"]\n    interactions: "
                               "[everything]\n"),
               9, 20, "routes[0].interactions[0]",
               "unknown interaction \"everything\"; expected \"*\" or one of read, vread, "
               "update, patch, delete, history-instance, history-type, history-system, create, "
               "search-type, search-system, capabilities, batch, operation-system, "
               "operation-type, operation-instance");
}

TEST(PolicyParse, ListLengthLimits) {
    std::string many = "schema: ehrgate.policy/v1\nversion: v1\nclients:\n";
    for (size_t i = 0; i <= kMaxClients; ++i) {
        many += "  - {id: c" + std::to_string(i) + ", context: user, traffic_class: batch}\n";
    }
    many +=
        "routes: [{name: r, prefix: /, methods: [GET], resources: [\"*\"], interactions: "
        "[\"*\"]}]\n";
    expect_one(many, 4, 3, "clients", "too many entries (10001); at most 10000 are allowed");

    // At the limit everything is accepted, and find_client works on the result.
    const size_t cut = many.find("  - {id: c10000,");
    const ParseResult at_limit = parse(many.substr(0, cut) + many.substr(many.find("routes:")));
    ASSERT_TRUE(at_limit.bundle) << dump(at_limit.diagnostics);
    EXPECT_EQ(at_limit.bundle->clients.size(), kMaxClients);
    EXPECT_NE(at_limit.bundle->find_client("c9999"), nullptr);
    EXPECT_NE(at_limit.bundle->find_client("c0"), nullptr);
    EXPECT_EQ(at_limit.bundle->find_client("c10000"), nullptr);

    std::string methods = "    methods: [";
    for (int i = 0; i < 17; ++i) {
        methods += i ? ", GET" : "GET";
    }
    expect_one(with_route_tail(methods + "]\n    resources: [\"*\"]\n    interactions: [\"*\"]\n"),
               7, 14, "routes[0].methods", "too many entries (17); at most 16 are allowed");
}

TEST(PolicyParse, DiagnosticsAreCappedWithANote) {
    std::string yaml = kMinimal;
    for (int i = 0; i < 150; ++i) {
        yaml += "unknown" + std::to_string(i) + ": 1\n";
    }
    const ParseResult result = parse(yaml);
    ASSERT_EQ(result.diagnostics.size(), kMaxDiagnostics + 1);
    EXPECT_EQ(result.diagnostics.back().message, "too many problems; stopped after the first 100");
    EXPECT_EQ(result.diagnostics.front().line, 10);
}

TEST(PolicyParse, AllProblemsInOnePassInFileOrder) {
    const ParseResult result = parse(R"(routes:
  - name: "bad name"
    prefix: nope
    methods: [GETT, PUT]
    resources: [Patient, Nope]
    interactions: [read, nope]
    extra: 1
clients:
  - {id: x, context: q, traffic_class: batch}
  - {id: x, context: user, traffic_class: z}
schema: ehrgate.policy/v9
)");
    EXPECT_FALSE(result.bundle);
    std::vector<std::pair<int, std::string>> got;
    for (const Diagnostic &d : result.diagnostics) {
        got.emplace_back(d.line, d.field);
    }
    const std::vector<std::pair<int, std::string>> expected = {
        {1, "version"},  // missing, reported at the top-level mapping
        {2, "routes[0].name"},
        {3, "routes[0].prefix"},
        {4, "routes[0].methods[0]"},
        {5, "routes[0].resources[1]"},
        {6, "routes[0].interactions[1]"},
        {7, "routes[0].extra"},
        {9, "clients[0].context"},
        {10, "clients[1].id"},
        {10, "clients[1].traffic_class"},
        {11, "schema"},
    };
    EXPECT_EQ(got, expected) << dump(result.diagnostics);
}

TEST(PolicyParse, QuotedValuesAreEscapedAndCut) {
    const ParseResult result =
        parse(with_route_tail("    methods: [\"GET\\nX-Evil: 1\"]\n    resources: [\"*\"]\n    "
                              "interactions: [\"*\"]\n"));
    ASSERT_EQ(result.diagnostics.size(), 1u);
    EXPECT_NE(result.diagnostics[0].message.find("\"GET\\nX-Evil: 1\""), std::string::npos)
        << result.diagnostics[0].message;
    EXPECT_EQ(result.diagnostics[0].message.find('\n'), std::string::npos);

    const ParseResult long_value = parse(with_route_tail("    methods: [" + std::string(500, 'G') +
                                                         "]\n    resources: [\"*\"]\n    "
                                                         "interactions: [\"*\"]\n"));
    ASSERT_EQ(long_value.diagnostics.size(), 1u);
    EXPECT_LT(long_value.diagnostics[0].message.size(), 200u);
    EXPECT_NE(long_value.diagnostics[0].message.find("GGG...\""), std::string::npos);
}

TEST(PolicyParse, OrderDoesNotMatter) {
    const ParseResult a = parse(R"(schema: ehrgate.policy/v1
version: v1
clients:
  - {id: b, context: user, traffic_class: batch, purposes: [TREAT, HRESCH]}
  - {id: a, context: system, traffic_class: batch}
routes:
  - {name: y, prefix: /y/, methods: [POST, GET], resources: [Patient, Account], interactions: [read, create]}
  - {name: x, prefix: /x/, methods: [GET], resources: ["*"], interactions: ["*"]}
)");
    const ParseResult b = parse(R"(routes:
  - {interactions: ["*"], resources: ["*"], methods: [GET], prefix: /x/, name: x}
  - {name: y, prefix: /y/, methods: [GET, POST], resources: [Account, Patient], interactions: [create, read]}
clients:
  - {id: a, context: system, traffic_class: batch}
  - {id: b, context: user, traffic_class: batch, purposes: [HRESCH, TREAT]}
version: v1
schema: ehrgate.policy/v1
)");
    ASSERT_TRUE(a.bundle && b.bundle) << dump(a.diagnostics) << dump(b.diagnostics);
    EXPECT_EQ(*a.bundle, *b.bundle);
    EXPECT_EQ(bundle_digest(*a.bundle), bundle_digest(*b.bundle));
    EXPECT_EQ(a.bundle->clients[0].id, "a");
    EXPECT_EQ(a.bundle->routes[0].name, "x");
}

TEST(PolicyDiagnostic, ToString) {
    EXPECT_EQ((Diagnostic{"f.yaml", 12, 5, "routes[2].methods[0]", "bad"}).to_string(),
              "f.yaml:12:5: routes[2].methods[0]: bad");
    EXPECT_EQ((Diagnostic{"f.yaml", 12, 5, "", "bad"}).to_string(), "f.yaml:12:5: bad");
    EXPECT_EQ((Diagnostic{"f.yaml", 12, 0, "", "bad"}).to_string(), "f.yaml:12: bad");
    EXPECT_EQ((Diagnostic{"f.yaml", 0, 0, "", "bad"}).to_string(), "f.yaml: bad");
    EXPECT_EQ((Diagnostic{"f.yaml", 0, 0, "x", "bad"}).to_string(), "f.yaml: x: bad");
    EXPECT_EQ((Diagnostic{"", 3, 4, "x", "bad"}).to_string(), "3:4: x: bad");
    EXPECT_EQ((Diagnostic{"", 0, 0, "", "bad"}).to_string(), "bad");
}

// ---- Authentication: issuers, client credentials, tenants ------------------------------------

const std::string kFingerprint = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
// The same fingerprint as `openssl x509 -fingerprint -sha256` prints it.
const std::string kFingerprintColons =
    "9F:86:D0:81:88:4C:7D:65:9A:2F:EA:A0:C5:5A:D0:15:A3:BF:4F:1B:2B:0B:82:2C:D1:5D:6C:15:B0:F0:0A:"
    "08";
const std::string kOtherFingerprint(64, 'e');

TEST(PolicyParse, ClientAuthMethods) {
    // Flow-style client on line 4; a key after traffic_class starts at column 50.
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [mtsl]}\n"), 4,
               57, "clients[0].auth[0]",
               "unknown authentication method \"mtsl\"; did you mean \"mtls\"?");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [oauth]}\n"), 4,
               57, "clients[0].auth[0]",
               "unknown authentication method \"oauth\"; expected one of bearer, mtls, cert-bound");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: []}\n"), 4, 56,
               "clients[0].auth", "must list at least one authentication method");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [bearer, "
                           "bearer]}\n"),
               4, 65, "clients[0].auth[1]",
               "duplicate authentication method \"bearer\"; first listed at line 4");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: bearer}\n"), 4,
               56, "clients[0].auth", "expected a list, got a string");

    // Left out: bearer only.
    const ParseResult plain =
        parse(with_client("  - {id: a, context: user, traffic_class: batch}\n"));
    ASSERT_TRUE(plain.bundle) << dump(plain.diagnostics);
    EXPECT_EQ(plain.bundle->clients[0].auth, std::vector<AuthMethod>{AuthMethod::Bearer});
    EXPECT_EQ(plain.bundle->clients[0].scope_ceiling, "");

    // Any order in, canonical order out.
    const ParseResult all = parse(with_client(
        "  - {id: a, context: user, traffic_class: batch, auth: [cert-bound, bearer, mtls], "
        "certificates: [" +
        kFingerprint + "]}\n"));
    ASSERT_TRUE(all.bundle) << dump(all.diagnostics);
    EXPECT_EQ(
        all.bundle->clients[0].auth,
        (std::vector<AuthMethod>{AuthMethod::Bearer, AuthMethod::Mtls, AuthMethod::CertBound}));
}

TEST(PolicyParse, CertificatesFollowTheAuthMethods) {
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [mtls]}\n"), 4,
               5, "clients[0].certificates",
               "missing required field \"certificates\": auth includes \"mtls\", which needs at "
               "least one pinned certificate");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [bearer, "
                           "cert-bound]}\n"),
               4, 5, "clients[0].certificates",
               "missing required field \"certificates\": auth includes \"cert-bound\"");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [cert-bound], "
                           "certificates: []}\n"),
               4, 84, "clients[0].certificates",
               "must list at least one certificate: auth includes \"cert-bound\"");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, certificates: [" +
                           kFingerprint + "]}\n"),
               4, 64, "clients[0].certificates",
               "certificates are used only with auth mtls or cert-bound; add one of them to auth "
               "or remove the certificates");
    // A broken auth list is reported once, not again as a certificate problem.
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, auth: [mtsl], "
                           "certificates: [" +
                           kFingerprint + "]}\n"),
               4, 57, "clients[0].auth[0]", "did you mean \"mtls\"?");
}

// A client pinning certificates, in block style: the first certificate is on line 9, column 9.
std::string with_certificates(std::string_view certificates, std::string_view more_clients = "") {
    return with_client(
        "  - id: a\n    context: system\n    traffic_class: batch\n    auth: "
        "[mtls]\n    certificates:\n" +
        std::string(certificates) + std::string(more_clients));
}

TEST(PolicyParse, CertificateFingerprints) {
    const std::string expected_form =
        "expected the SHA-256 of the DER certificate, 64 hex digits (colons allowed), e.g. from "
        "`openssl x509 -in client.pem -outform DER | sha256sum`";
    expect_one(with_certificates("      - abc\n"), 9, 9, "clients[0].certificates[0]",
               "invalid certificate fingerprint \"abc\": " + expected_form);
    expect_one(with_certificates("      - " + std::string(63, 'a') + "g\n"), 9, 9,
               "clients[0].certificates[0]", "invalid certificate fingerprint");
    expect_one(with_certificates("      - " + kFingerprint + "00\n"), 9, 9,
               "clients[0].certificates[0]", "invalid certificate fingerprint");
    expect_one(with_certificates("      - \"" + kFingerprint + " \"\n"), 9, 9,
               "clients[0].certificates[0]", "invalid certificate fingerprint");
    expect_one(with_certificates("      - \"A9:4A:8F:E5:CC:B1:9B:A6:1C:4C:08:73:D3:91:E9:87:98:2F:"
                                 "BB:D3\"\n"),
               9, 9, "clients[0].certificates[0]",
               "\": this looks like a SHA-1 fingerprint; expected the SHA-256");
    expect_one(with_certificates("      - [" + kFingerprint + "]\n"), 9, 9,
               "clients[0].certificates[0]", "expected a string, got a list");

    // Colons and case do not make a different certificate.
    expect_one(
        with_certificates("      - " + kFingerprint + "\n      - \"" + kFingerprintColons + "\"\n"),
        10, 9, "clients[0].certificates[1]",
        "duplicate certificate \"" + kFingerprintColons + "\"; first listed at line 9");
    // One certificate, one client: the certificate is how an mTLS caller is identified.
    expect_one(with_certificates("      - " + kFingerprint + "\n",
                                 "  - id: b\n    context: system\n    traffic_class: batch\n    "
                                 "auth: [cert-bound]\n    certificates: [" +
                                     kOtherFingerprint + ", \"" + kFingerprintColons + "\"]\n"),
               14, 86, "clients[1].certificates[1]",
               "certificate \"" + kFingerprintColons +
                   "\" is already pinned by client \"a\" at line 9; a certificate identifies "
                   "exactly one client");

    std::string many;
    for (int i = 0; i < 33; ++i) {
        many += "      - " + std::string(62, 'a') + (i < 10 ? "0" : "") + std::to_string(i) + "\n";
    }
    // A block list is placed at its first entry.
    expect_one(with_certificates(many), 9, 7, "clients[0].certificates",
               "too many entries (33); at most 32 are allowed");

    // Stored lower-case without colons, sorted; found in any case.
    const ParseResult ok = parse(with_certificates("      - \"" + kFingerprintColons +
                                                   "\"\n      - " + std::string(64, 'D') +
                                                   "\n      - 01" + std::string(62, 'f') + "\n"));
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->clients[0].certificates,
              (std::vector<std::string>{"01" + std::string(62, 'f'), kFingerprint,
                                        std::string(64, 'd')}));
    EXPECT_EQ(ok.bundle->find_client_by_certificate(kFingerprint), &ok.bundle->clients[0]);
    EXPECT_EQ(ok.bundle->find_client_by_certificate(std::string(64, 'D')), &ok.bundle->clients[0]);
    EXPECT_EQ(ok.bundle->find_client_by_certificate(kOtherFingerprint), nullptr);
}

TEST(PolicyParse, ScopeCeiling) {
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, scope_ceiling: "
                           "\"openid user/Patients.rs\"}\n"),
               4, 65, "clients[0].scope_ceiling",
               "invalid scope_ceiling: \"user/Patients.rs\": not a FHIR R4 resource type");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, scope_ceiling: "
                           "\"patient/*.rw\"}\n"),
               4, 65, "clients[0].scope_ceiling",
               "invalid scope_ceiling: \"patient/*.rw\": permissions must be read, write, * or "
               "an ordered subset of cruds");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, scope_ceiling: "
                           "\"robot/*.rs\"}\n"),
               4, 65, "clients[0].scope_ceiling", "invalid scope_ceiling: \"robot/*.rs\": ");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, scope_ceiling: "
                           "[user/*.rs]}\n"),
               4, 65, "clients[0].scope_ceiling", "expected a string, got a list");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, scope_ceiling: \"" +
                           std::string(5000, 'x') + "\"}\n"),
               4, 65, "clients[0].scope_ceiling",
               "invalid scope_ceiling: scope string is too long");

    // Stored as a set: tokens sorted, duplicates and extra spaces dropped.
    const ParseResult ok = parse(with_client(
        "  - {id: a, context: user, traffic_class: batch, scope_ceiling: \"  user/*.rs openid  "
        "launch openid patient/Observation.rs?category=laboratory\"}\n  - {id: b, context: "
        "user, traffic_class: batch, scope_ceiling: \"\"}\n"));
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->clients[0].scope_ceiling,
              "launch openid patient/Observation.rs?category=laboratory user/*.rs");
    EXPECT_EQ(ok.bundle->clients[1].scope_ceiling, "");
}

TEST(PolicyParse, TenantsAndIssuerReferences) {
    expect_one(
        with_client("  - {id: a, context: user, traffic_class: batch, tenants: [\"a b\"]}\n"), 4,
        60, "clients[0].tenants[0]",
        "invalid tenant \"a b\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, tenants: [t1, t1]}\n"),
               4, 64, "clients[0].tenants[1]", "duplicate tenant \"t1\"; first listed at line 4");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, issuers: [dev]}\n"), 4,
               60, "clients[0].issuers[0]",
               "unknown issuer \"dev\"; the bundle defines no issuers");
    expect_one(
        with_client("  - {id: a, context: user, traffic_class: batch, issuers: [\"a/b\"]}\n"), 4,
        60, "clients[0].issuers[0]", "invalid issuer id \"a/b\"");
    const ParseResult ok = parse(with_client(
        "  - {id: a, context: user, traffic_class: batch, tenants: [t2, t1], issuers: []}\n"));
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->clients[0].tenants, (std::vector<std::string>{"t1", "t2"}));
    EXPECT_TRUE(ok.bundle->clients[0].issuers.empty());
}

TEST(PolicyParse, RouteTenant) {
    const auto bundle = [](std::string_view tenant) {
        return std::string(R"(schema: ehrgate.policy/v1
version: v1
clients:
  - {id: a, context: user, traffic_class: batch, tenants: [general-hospital, clinic-2]}
routes:
  - name: r
    prefix: /
    methods: [GET]
    resources: ["*"]
    interactions: ["*"]
    tenant: )") +
               std::string(tenant) + "\n";
    };
    expect_one(bundle("general-hospitl"), 11, 13, "routes[0].tenant",
               "no client lists tenant \"general-hospitl\"; did you mean \"general-hospital\"?");
    expect_one(bundle("pharmacy"), 11, 13, "routes[0].tenant",
               "no client lists tenant \"pharmacy\"; add it to the tenants of the clients that may "
               "use this route");
    expect_one(bundle("\"x y\""), 11, 13, "routes[0].tenant",
               "invalid tenant \"x y\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    expect_one(bundle("[clinic-2]"), 11, 13, "routes[0].tenant", "expected a string, got a list");
    const ParseResult ok = parse(bundle("clinic-2"));
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->routes[0].tenant, "clinic-2");
}

TEST(PolicyParse, AuthFieldOrderDoesNotMatter) {
    const ParseResult a = parse(with_client(
        "  - {id: a, context: user, traffic_class: batch, auth: [mtls, bearer], certificates: [" +
        kOtherFingerprint + ", " + kFingerprint +
        "], tenants: [y, x], scope_ceiling: \"openid user/*.rs\"}\n"));
    const ParseResult b = parse(
        with_client("  - {scope_ceiling: \"user/*.rs openid\", tenants: [x, y], certificates: [\"" +
                    kFingerprintColons + "\", " + kOtherFingerprint +
                    "], auth: [bearer, mtls], traffic_class: batch, context: user, id: a}\n"));
    ASSERT_TRUE(a.bundle && b.bundle) << dump(a.diagnostics) << dump(b.diagnostics);
    EXPECT_EQ(*a.bundle, *b.bundle);
    EXPECT_EQ(bundle_digest(*a.bundle), bundle_digest(*b.bundle));
}

// Issuers read their JWKS from disk, so these tests work in a temporary directory holding a copy
// of the sandbox issuer's JWKS (one EC P-256 key, "alg": "ES256") as jwks.json.
class PolicyIssuers : public TempDir {
  protected:
    void SetUp() override {
        TempDir::SetUp();
        write("jwks.json", sandbox_jwks());
    }

    static std::string sandbox_jwks() {
        std::ifstream in(kSourceDir + "/conf/sandbox/dev-issuer-jwks.json", std::ios::binary);
        return std::string(std::istreambuf_iterator<char>(in), {});
    }

    std::string bundle_path() const { return (dir_ / "policy.yaml").string(); }
    std::string path(std::string_view name) const { return (dir_ / name).string(); }

    ParseResult parse_here(std::string_view yaml) const {
        return parse_bundle(yaml, bundle_path());
    }

    void expect_one_here(std::string_view yaml, int line, int column, std::string_view field,
                         std::string_view message) const {
        check_one(parse_here(yaml), bundle_path(), yaml, line, column, field, message);
    }
};

// One issuer entry, lines 4 to 8 of the bundle with_issuers() makes; `extra` continues it.
struct IssuerYaml {
    std::string id = "dev";
    std::string issuer = "https://issuer.example";     // line 5, value at column 13
    std::string audience = "https://gateway.example";  // line 6, column 15
    std::string jwks_file = "jwks.json";               // line 7, column 16
    std::string algorithms = "[ES256]";                // line 8, column 17
    std::string extra{};                               // from line 9
};

std::string issuer_yaml(const IssuerYaml &i) {
    return "  - id: " + i.id + "\n    issuer: " + i.issuer + "\n    audience: " + i.audience +
           "\n    jwks_file: " + i.jwks_file + "\n    algorithms: " + i.algorithms + "\n" + i.extra;
}

std::string with_issuers(std::string_view issuers, std::string_view clients = "clients: []\n") {
    return "schema: ehrgate.policy/v1\nversion: v1\nissuers:\n" + std::string(issuers) +
           std::string(clients) +
           "routes:\n  - {name: r, prefix: /, methods: [GET], resources: [\"*\"], interactions: "
           "[\"*\"]}\n";
}

TEST_F(PolicyIssuers, IssuerCarriesItsJwks) {
    const ParseResult result =
        parse_here(with_issuers(issuer_yaml({.algorithms = "[RS256, ES256]"}) +
                                issuer_yaml({.id = "dev-2",
                                             .issuer = "http://127.0.0.1:9000/realms/dev",
                                             .jwks_file = path("jwks.json"),
                                             .extra = "    leeway_seconds: 0\n"})));
    ASSERT_TRUE(result.bundle) << dump(result.diagnostics);
    const Bundle &b = *result.bundle;
    ASSERT_EQ(b.issuers.size(), 2u);
    const Issuer &dev = b.issuers[0];
    EXPECT_EQ(dev.id, "dev");
    EXPECT_EQ(dev.issuer, "https://issuer.example");
    EXPECT_EQ(dev.audience, "https://gateway.example");
    EXPECT_EQ(dev.jwks_file, "jwks.json");  // as written; the text is what counts
    EXPECT_EQ(dev.jwks_json, sandbox_jwks());
    EXPECT_EQ(dev.algorithms, (std::vector<std::string>{"ES256", "RS256"}));
    EXPECT_EQ(dev.leeway_seconds, 60);
    EXPECT_EQ(b.issuers[1].jwks_file, path("jwks.json"));
    EXPECT_EQ(b.issuers[1].jwks_json, sandbox_jwks());
    EXPECT_EQ(b.issuers[1].leeway_seconds, 0);

    EXPECT_EQ(b.find_issuer("dev"), &b.issuers[0]);
    EXPECT_EQ(b.find_issuer("dev-2"), &b.issuers[1]);
    EXPECT_EQ(b.find_issuer("dev-3"), nullptr);
    EXPECT_EQ(b.find_issuer_by_iss("http://127.0.0.1:9000/realms/dev"), &b.issuers[1]);
    EXPECT_EQ(b.find_issuer_by_iss("https://issuer.example/"), nullptr);  // exact match only
    EXPECT_EQ(b.find_issuer_by_iss("dev"), nullptr);
}

TEST_F(PolicyIssuers, JwksFileIsResolvedFromTheBundleDirectory) {
    std::filesystem::create_directories(dir_ / "conf" / "keys");
    write("conf/keys/jwks.json", sandbox_jwks());
    const std::string bundle_file = (dir_ / "conf" / "policy.yaml").string();

    // keys/jwks.json next to the bundle, ../jwks.json above it.
    for (const char *relative : {"keys/jwks.json", "../jwks.json", "./keys/../keys/jwks.json"}) {
        const ParseResult result =
            parse_bundle(with_issuers(issuer_yaml({.jwks_file = relative})), bundle_file);
        ASSERT_TRUE(result.bundle) << relative << dump(result.diagnostics);
        EXPECT_EQ(result.bundle->issuers[0].jwks_json, sandbox_jwks());
        EXPECT_EQ(result.bundle->issuers[0].jwks_file, relative);
    }
    // Not relative to the current directory: the message shows where it was looked for.
    const std::string yaml = with_issuers(issuer_yaml({.jwks_file = "jwks.json"}));
    check_one(parse_bundle(yaml, bundle_file), bundle_file, yaml, 7, 16, "issuers[0].jwks_file",
              "jwks_file \"" + (dir_ / "conf" / "jwks.json").string() +
                  "\": cannot open: No such file or directory");
    // A bundle file name without a directory: relative to the current directory.
    const std::string absent = with_issuers(issuer_yaml({.jwks_file = "no-such-jwks-4711.json"}));
    check_one(parse_bundle(absent, "policy.yaml"), "policy.yaml", absent, 7, 16,
              "issuers[0].jwks_file",
              "jwks_file \"no-such-jwks-4711.json\": cannot open: No such file or directory");
    // Absolute paths are used as they are.
    EXPECT_TRUE(
        parse_bundle(with_issuers(issuer_yaml({.jwks_file = path("jwks.json")})), "x/y/p.yaml")
            .bundle);

    // And through load_bundle_file, as policyd loads it.
    std::ofstream(bundle_file) << with_issuers(issuer_yaml({.jwks_file = "keys/jwks.json"}));
    const ParseResult loaded = load_bundle_file(bundle_file);
    ASSERT_TRUE(loaded.bundle) << dump(loaded.diagnostics);
    EXPECT_EQ(loaded.bundle->issuers[0].jwks_json, sandbox_jwks());
}

TEST_F(PolicyIssuers, JwksFileProblems) {
    const auto at_jwks = [&](const std::string &file, const std::string &message) {
        expect_one_here(with_issuers(issuer_yaml({.jwks_file = file})), 7, 16,
                        "issuers[0].jwks_file", message);
    };
    at_jwks("absent.json",
            "jwks_file \"" + path("absent.json") + "\": cannot open: No such file or directory");
    at_jwks(".", "jwks_file \"" + path(".") + "\": cannot read: Is a directory");
    at_jwks("\"\"", "jwks_file must not be empty");
    at_jwks("[a.json]", "expected a string, got a list");

    write("big.json", sandbox_jwks() + std::string(kMaxJwksBytes + 1 - sandbox_jwks().size(), ' '));
    at_jwks("big.json", "jwks_file \"" + path("big.json") +
                            "\" is larger than 1048576 bytes (1 MiB), the limit for a JWKS");
    // Exactly at the limit is fine (JSON allows the trailing white space).
    write("max.json", sandbox_jwks() + std::string(kMaxJwksBytes - sandbox_jwks().size(), ' '));
    const ParseResult max = parse_here(with_issuers(issuer_yaml({.jwks_file = "max.json"})));
    ASSERT_TRUE(max.bundle) << dump(max.diagnostics);
    EXPECT_EQ(max.bundle->issuers[0].jwks_json.size(), kMaxJwksBytes);

    // Every snapshot carries all JWKS texts: together they are bounded too.
    const std::string half = sandbox_jwks() + std::string(kMaxJwksTotalBytes / 2, ' ');
    write("half.json", half);
    const std::string two_halves = with_issuers(
        issuer_yaml({.jwks_file = "half.json"}) +
        issuer_yaml({.id = "dev-2", .issuer = "https://b.example", .jwks_file = "half.json"}));
    expect_one_here(two_halves, 12, 16, "issuers[1].jwks_file",
                    "jwks_file \"" + path("half.json") +
                        "\" brings the JWKS files of all issuers to " +
                        std::to_string(2 * half.size()) +
                        " bytes; together they may have at most 1048576 (1 MiB), since every "
                        "snapshot carries them");

    // jose::KeySet::parse decides what an acceptable JWKS is; its reason is passed on.
    const std::string not_acceptable =
        "jwks_file \"" + path("bad.json") + "\" is not an acceptable JWKS: ";
    write("bad.json", "not json");
    at_jwks("bad.json", not_acceptable + "JWKS is not valid JSON");
    write("bad.json", "{}");
    at_jwks("bad.json", not_acceptable + "JWKS must be an object with a \"keys\" array");
    write("bad.json", R"({"keys": []})");
    at_jwks("bad.json", not_acceptable + "JWKS has no keys");
    write("bad.json", R"({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})");
    at_jwks("bad.json", "symmetric (\"oct\") keys are not accepted");
    std::string with_private = sandbox_jwks();
    with_private.replace(with_private.find("\"use\""), 0, "\"d\": \"AAAA\", ");
    write("bad.json", with_private);
    at_jwks("bad.json", "private key member \"d\"");
}

TEST_F(PolicyIssuers, KeysMustFitTheAlgorithms) {
    // The key says ES256; the issuer does not allow it.
    expect_one_here(with_issuers(issuer_yaml({.algorithms = "[RS256, PS256]"})), 7, 16,
                    "issuers[0].jwks_file",
                    "jwks_file \"" + path("jwks.json") +
                        "\": key \"c98h3f-Ybq_RcZM2-utJvy4ZiV5z4XBfMU9WANPj22w\" has alg "
                        "\"ES256\", which is not in this issuer's algorithms (RS256, PS256)");

    // Without "alg", a P-256 key fits ES256 only.
    std::string no_alg = sandbox_jwks();
    const size_t alg = no_alg.find(",\n      \"alg\"");
    ASSERT_NE(alg, std::string::npos);
    no_alg.erase(alg, no_alg.find('\n', alg + 2) - alg);
    write("no-alg.json", no_alg);
    expect_one_here(
        with_issuers(issuer_yaml({.jwks_file = "no-alg.json", .algorithms = "[RS256, ES384]"})), 7,
        16, "issuers[0].jwks_file",
        "jwks_file \"" + path("no-alg.json") +
            "\": no key can verify any of this issuer's algorithms (RS256, ES384)");
    EXPECT_TRUE(parse_here(with_issuers(issuer_yaml(
                               {.jwks_file = "no-alg.json", .algorithms = "[RS256, ES256]"})))
                    .bundle);

    // Broken algorithms are reported once, not again against the keys.
    expect_one_here(with_issuers(issuer_yaml({.algorithms = "[HS256]"})), 8, 18,
                    "issuers[0].algorithms[0]", "symmetric algorithms are never accepted");
}

TEST_F(PolicyIssuers, Algorithms) {
    const auto at_algorithm = [&](const std::string &list, int column, const std::string &field,
                                  const std::string &message) {
        expect_one_here(with_issuers(issuer_yaml({.algorithms = list})), 8, column, field, message);
    };
    const std::string ours = "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512";
    at_algorithm("[HS256]", 18, "issuers[0].algorithms[0]",
                 "symmetric algorithms are never accepted: \"HS256\" needs a shared secret, and "
                 "the gateway verifies tokens only with the issuer's public keys; use one of " +
                     ours);
    at_algorithm("[ES256, HS384]", 25, "issuers[0].algorithms[1]",
                 "symmetric algorithms are never accepted: \"HS384\"");
    at_algorithm("[HS512, ES256]", 18, "issuers[0].algorithms[0]",
                 "symmetric algorithms are never accepted: \"HS512\"");
    at_algorithm("[none]", 18, "issuers[0].algorithms[0]",
                 "\"none\" is never accepted: it marks an unsigned token");
    at_algorithm("[NoNe]", 18, "issuers[0].algorithms[0]", "\"none\" is never accepted");
    at_algorithm("[es256]", 18, "issuers[0].algorithms[0]",
                 "unknown algorithm \"es256\"; did you mean \"ES256\"?");
    at_algorithm("[ES265]", 18, "issuers[0].algorithms[0]",
                 "unknown algorithm \"ES265\"; did you mean \"ES256\"?");
    at_algorithm("[EdDSA]", 18, "issuers[0].algorithms[0]",
                 "unknown algorithm \"EdDSA\"; expected one of " + ours);
    at_algorithm("[ES256, RS256, ES256]", 32, "issuers[0].algorithms[2]",
                 "duplicate algorithm \"ES256\"; first listed at line 8");
    at_algorithm("[]", 17, "issuers[0].algorithms", "must list at least one algorithm");
    at_algorithm("ES256", 17, "issuers[0].algorithms", "expected a list, got a string");
}

TEST_F(PolicyIssuers, IssuerFields) {
    expect_one_here(with_issuers(issuer_yaml({.id = "\"a b\""})), 4, 9, "issuers[0].id",
                    "invalid issuer id \"a b\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    expect_one_here(with_issuers(issuer_yaml({}) + issuer_yaml({.issuer = "https://b.example"})), 9,
                    9, "issuers[1].id", "duplicate issuer id \"dev\"; first defined at line 4");
    expect_one_here(with_issuers(issuer_yaml({}) + issuer_yaml({.id = "dev-2"})), 10, 13,
                    "issuers[1].issuer",
                    "duplicate issuer \"https://issuer.example\"; another entry has it at line 5");
    expect_one_here(with_issuers(issuer_yaml({.audience = "\"\""})), 6, 15, "issuers[0].audience",
                    "audience must not be empty");
    expect_one_here(with_issuers(issuer_yaml({.audience = "\"a b\""})), 6, 15,
                    "issuers[0].audience",
                    "invalid audience \"a b\": contains whitespace or control characters");
    expect_one_here(with_issuers(issuer_yaml({.extra = "    algorithm: [ES256]\n"})), 9, 5,
                    "issuers[0].algorithm",
                    "unknown field \"algorithm\"; did you mean \"algorithms\"?");
    expect_one_here(with_issuers(issuer_yaml({.extra = "    jwks_uri: https://x\n"})), 9, 5,
                    "issuers[0].jwks_uri",
                    "unknown field \"jwks_uri\"; expected one of id, issuer, audience, jwks_file, "
                    "algorithms, leeway_seconds");
    expect_one_here(with_issuers("  {}\n"), 4, 3, "issuers", "expected a list, got a mapping");

    const ParseResult missing = parse_here(with_issuers("  - {id: x}\n"));
    std::vector<std::string> fields;
    for (const Diagnostic &d : missing.diagnostics) {
        EXPECT_EQ(d.line, 4);
        EXPECT_EQ(d.column, 5);
        fields.push_back(d.field + ": " + d.message);
    }
    EXPECT_EQ(fields, (std::vector<std::string>{
                          "issuers[0].issuer: missing required field \"issuer\"",
                          "issuers[0].audience: missing required field \"audience\"",
                          "issuers[0].jwks_file: missing required field \"jwks_file\"",
                          "issuers[0].algorithms: missing required field \"algorithms\"",
                      }));

    std::string many;
    for (size_t i = 0; i <= kMaxIssuers; ++i) {
        many += "  - {}\n";
    }
    expect_one_here(with_issuers(many), 4, 3, "issuers",
                    "too many entries (65); at most 64 are allowed");
    // An empty list is an empty list: no token is then accepted at all.
    const ParseResult none = parse_here(with_issuers("  []\n"));
    ASSERT_TRUE(none.bundle) << dump(none.diagnostics);
    EXPECT_TRUE(none.bundle->issuers.empty());
}

TEST_F(PolicyIssuers, IssuerUrls) {
    struct Case {
        const char *url;
        const char *problem;  // nullptr: accepted
    };
    const Case kCases[] = {
        {"https://issuer.example", nullptr},
        {"https://issuer.example/realms/ehr", nullptr},
        {"https://issuer.example:8443/", nullptr},
        {"http://127.0.0.1", nullptr},
        {"http://127.0.0.1:9000/realms/dev", nullptr},
        {"http://localhost:8080", nullptr},
        {"http://issuer.example",
         "must use https:// (plain http:// is accepted only for 127.0.0.1 and localhost, for a "
         "sandbox issuer)"},
        {"http://127.0.0.1.evil.example/", "must use https://"},
        {"http://localhost.evil.example", "must use https://"},
        {"http://localhost@evil.example", "must not contain user information ('@')"},
        {"https://user@issuer.example", "must not contain user information ('@')"},
        {"issuer.example", "must be an https:// URL"},
        {"ftp://issuer.example", "must be an https:// URL"},
        {"HTTPS://issuer.example", "must be an https:// URL"},
        {"https://", "has no host"},
        {"https:///path", "has no host"},
        {"https://:443", "has no host"},
        {"\"https://issuer.example:\"", "has an invalid port"},
        {"https://issuer.example:https", "has an invalid port"},
        {"\"https://issuer.example/?tenant=1\"", "must not have a query or fragment"},
        {"\"https://issuer.example/#x\"", "must not have a query or fragment"},
        {"\"https://issuer .example\"", "contains whitespace or control characters"},
    };
    for (const Case &c : kCases) {
        const std::string yaml = with_issuers(issuer_yaml({.issuer = c.url}));
        if (c.problem == nullptr) {
            EXPECT_TRUE(parse_here(yaml).bundle) << c.url << dump(parse_here(yaml).diagnostics);
        } else {
            expect_one_here(yaml, 5, 13, "issuers[0].issuer", "invalid issuer ");
            expect_one_here(yaml, 5, 13, "issuers[0].issuer", c.problem);
        }
    }
    expect_one_here(with_issuers(issuer_yaml({.issuer = "https://" + std::string(510, 'a')})), 5,
                    13, "issuers[0].issuer", "is longer than 512 characters");
}

TEST_F(PolicyIssuers, LeewaySeconds) {
    for (const char *ok : {"0", "60", "300", "\"30\""}) {
        const ParseResult result = parse_here(
            with_issuers(issuer_yaml({.extra = std::string("    leeway_seconds: ") + ok + "\n"})));
        ASSERT_TRUE(result.bundle) << ok << dump(result.diagnostics);
    }
    for (const char *bad : {"301", "-1", "1.5", "+5", "0x10", "1e2", "sixty", "9999"}) {
        expect_one_here(
            with_issuers(issuer_yaml({.extra = std::string("    leeway_seconds: ") + bad + "\n"})),
            9, 21, "issuers[0].leeway_seconds",
            std::string("invalid leeway_seconds \"") + bad +
                "\": expected a whole number of seconds from 0 to 300");
    }
    expect_one_here(with_issuers(issuer_yaml({.extra = "    leeway_seconds:\n"})), 9, 5,
                    "issuers[0].leeway_seconds", "expected a string, got null");
}

TEST_F(PolicyIssuers, ClientsNameIssuersWhereverTheyAreDefined) {
    // Clients before issuers in the file: references are checked once everything is read.
    const std::string clients_first =
        "schema: ehrgate.policy/v1\nversion: v1\nclients:\n"
        "  - {id: a, context: user, traffic_class: batch, issuers: [dev]}\n"
        "routes: [{name: r, prefix: /, methods: [GET], resources: [\"*\"], interactions: "
        "[\"*\"]}]\nissuers:\n" +
        issuer_yaml({});
    const ParseResult ok = parse_here(clients_first);
    ASSERT_TRUE(ok.bundle) << dump(ok.diagnostics);
    EXPECT_EQ(ok.bundle->clients[0].issuers, std::vector<std::string>{"dev"});

    const std::string client =
        "clients:\n  - {id: a, context: user, traffic_class: batch, issuers: [dev, deb]}\n";
    expect_one_here(with_issuers(issuer_yaml({}), client), 10, 65, "clients[0].issuers[1]",
                    "unknown issuer \"deb\"; did you mean \"dev\"?");
    expect_one_here(
        with_issuers(issuer_yaml({}) + issuer_yaml({.id = "prod", .issuer = "https://p.example"}),
                     "clients:\n  - {id: a, context: user, traffic_class: batch, issuers: "
                     "[partner]}\n"),
        15, 60, "clients[0].issuers[0]", "unknown issuer \"partner\"; defined issuers: dev, prod");
}

TEST_F(PolicyIssuers, AllProblemsInOnePass) {
    write("rsa-only.json", R"({"keys": []})");
    const std::string yaml = with_issuers(
        issuer_yaml({.issuer = "http://issuer.example",
                     .jwks_file = "missing.json",
                     .algorithms = "[HS256, ES256]",
                     .extra = "    leeway_seconds: 999\n"}) +
            issuer_yaml(
                {.id = "two", .issuer = "https://two.example", .jwks_file = "rsa-only.json"}),
        "clients:\n  - {id: a, context: user, traffic_class: batch, auth: [mtls], issuers: [tw0], "
        "scope_ceiling: \"user/Foo.r\"}\n");
    const ParseResult result = parse_here(yaml);
    EXPECT_FALSE(result.bundle);
    std::vector<std::pair<int, std::string>> got;
    for (const Diagnostic &d : result.diagnostics) {
        got.emplace_back(d.line, d.field);
    }
    const std::vector<std::pair<int, std::string>> expected = {
        {5, "issuers[0].issuer"},        {7, "issuers[0].jwks_file"},
        {8, "issuers[0].algorithms[0]"}, {9, "issuers[0].leeway_seconds"},
        {13, "issuers[1].jwks_file"},    {16, "clients[0].certificates"},
        {16, "clients[0].issuers[0]"},   {16, "clients[0].scope_ceiling"},
    };
    EXPECT_EQ(got, expected) << dump(result.diagnostics);
}

// ---- Snapshots -------------------------------------------------------------------------------

Bundle sandbox_bundle() {
    ParseResult result = load_bundle_file(kSourceDir + "/conf/policy.yaml");
    EXPECT_TRUE(result.bundle) << dump(result.diagnostics);
    return result.bundle.value_or(Bundle{});
}

Snapshot sandbox_snapshot(uint64_t serial = 7) {
    Snapshot snapshot;
    snapshot.serial = serial;
    snapshot.bundle = sandbox_bundle();
    snapshot.digest_hex = bundle_digest(snapshot.bundle);
    return snapshot;
}

Bundle small_bundle() {
    Bundle b;
    b.schema = std::string(kSchemaV1);
    b.version = "golden-1";
    b.description = "golden";
    b.clients.push_back({"app", "App", LaunchContext::User, TrafficClass::Interactive, {"TREAT"}});
    b.routes.push_back({"fhir", "/fhir/", {"GET"}, {"Patient"}, {"read"}});
    return b;
}

std::string sha256_hex(std::string_view data) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EXPECT_EQ(EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr), 1);
    std::string hex;
    char buf[3];
    for (unsigned int i = 0; i < len; ++i) {
        std::snprintf(buf, sizeof buf, "%02x", md[i]);
        hex += buf;
    }
    return hex;
}

// The bytes of the "bundle" value inside an encoded snapshot.
std::string_view bundle_bytes(std::string_view encoded) {
    msgpack::Reader r(encoded);
    const std::optional<uint32_t> n = r.read_map();
    for (uint32_t i = 0; n && i < *n; ++i) {
        if (r.read_str() == "bundle") {
            const size_t start = r.position();
            r.skip();
            return encoded.substr(start, r.position() - start);
        }
        r.skip();
    }
    ADD_FAILURE() << "no bundle key";
    return {};
}

TEST(PolicySnapshot, RoundTrip) {
    const Snapshot snapshot = sandbox_snapshot(42);
    const std::string encoded = encode_snapshot(snapshot);
    const std::optional<Snapshot> decoded = decode_snapshot(encoded);
    ASSERT_TRUE(decoded.has_value());
    EXPECT_EQ(*decoded, snapshot);
    EXPECT_EQ(encode_snapshot(*decoded), encoded);  // canonical: re-encoding is byte-identical

    Snapshot big;
    big.serial = UINT64_MAX;
    big.bundle = small_bundle();
    for (int i = 0; i < 300; ++i) {
        big.bundle.clients.push_back({"c" + std::to_string(1000 + i),
                                      std::string(40, 'n'),
                                      LaunchContext::Patient,
                                      TrafficClass::Batch,
                                      {}});
    }
    big.bundle.canonicalize();
    const std::optional<Snapshot> big_decoded = decode_snapshot(encode_snapshot(big));
    ASSERT_TRUE(big_decoded);
    EXPECT_EQ(*big_decoded, big);
}

TEST(PolicySnapshot, EncoderCanonicalizesHandBuiltBundles) {
    Snapshot snapshot;
    snapshot.bundle = small_bundle();
    snapshot.bundle.clients.push_back(
        {"aaa", "", LaunchContext::System, TrafficClass::Batch, {"TREAT", "HOPERAT"}});
    snapshot.bundle.routes[0].methods = {"HEAD", "GET"};
    const std::optional<Snapshot> decoded = decode_snapshot(encode_snapshot(snapshot));
    ASSERT_TRUE(decoded);
    EXPECT_EQ(decoded->bundle.clients[0].id, "aaa");
    EXPECT_EQ(decoded->bundle.clients[0].purposes, (std::vector<std::string>{"HOPERAT", "TREAT"}));
    EXPECT_EQ(decoded->bundle.routes[0].methods, (std::vector<std::string>{"GET", "HEAD"}));
    Snapshot canonical = snapshot;
    canonical.bundle.canonicalize();
    EXPECT_EQ(*decoded, canonical);
    EXPECT_EQ(encode_snapshot(snapshot), encode_snapshot(canonical));
}

TEST(PolicySnapshot, DigestIsSha256OfTheCanonicalBundleEncoding) {
    const Bundle bundle = small_bundle();
    const std::string digest = bundle_digest(bundle);
    ASSERT_EQ(digest.size(), 64u);
    EXPECT_EQ(digest.find_first_not_of("0123456789abcdef"), std::string::npos);

    Snapshot snapshot{1, "", bundle};
    EXPECT_EQ(sha256_hex(bundle_bytes(encode_snapshot(snapshot))), digest);

    // Golden value: changes only when the canonical encoding changes, which is a protocol change.
    EXPECT_EQ(digest, "e78379d16cb6e33ca3ad5c43ac8c53e58923df95a8111322dc66729996f4edcf");

    // The serial and the digest field are not part of it.
    Snapshot other{99, "something", bundle};
    EXPECT_EQ(bundle_bytes(encode_snapshot(other)), bundle_bytes(encode_snapshot(snapshot)));

    // Content changes change it; reordering does not.
    Bundle changed = bundle;
    changed.routes[0].methods.push_back("HEAD");
    EXPECT_NE(bundle_digest(changed), digest);
    Bundle described = bundle;
    described.description += ".";
    EXPECT_NE(bundle_digest(described), digest);
    Bundle reordered = changed;
    std::reverse(reordered.routes[0].methods.begin(), reordered.routes[0].methods.end());
    EXPECT_EQ(bundle_digest(reordered), bundle_digest(changed));

    EXPECT_EQ(bundle_digest(sandbox_bundle()), bundle_digest(sandbox_bundle()));
}

TEST(PolicySnapshot, EveryTruncationIsRejected) {
    const std::string encoded = encode_snapshot(sandbox_snapshot());
    for (size_t n = 0; n < encoded.size(); ++n) {
        EXPECT_FALSE(decode_snapshot(std::string_view(encoded).substr(0, n))) << "length " << n;
    }
    EXPECT_FALSE(decode_snapshot(encoded + '\0'));  // trailing bytes
}

TEST(PolicySnapshot, GarbageIsRejectedWithoutCrashing) {
    const std::string encoded = encode_snapshot(sandbox_snapshot());
    std::mt19937 rng(7);
    int accepted = 0;
    for (int round = 0; round < 2000; ++round) {
        std::string mutated = encoded;
        for (int flips = 1 + static_cast<int>(rng() % 4); flips > 0; --flips) {
            mutated[rng() % mutated.size()] = static_cast<char>(rng());
        }
        // A mutation inside a string value can still be a valid snapshot; it must then encode
        // and decode consistently.
        if (const std::optional<Snapshot> decoded = decode_snapshot(mutated)) {
            ++accepted;
            EXPECT_EQ(decode_snapshot(encode_snapshot(*decoded)), decoded);
        }
    }
    EXPECT_LT(accepted, 2000);
    for (int round = 0; round < 500; ++round) {
        std::string random(rng() % 256, '\0');
        for (char &c : random) {
            c = static_cast<char>(rng());
        }
        decode_snapshot(random);
    }
    EXPECT_FALSE(decode_snapshot(""));
    EXPECT_FALSE(decode_snapshot("\xc0"));
    EXPECT_FALSE(decode_snapshot("\x80"));  // empty map: required keys missing
}

// Builders for hand-made snapshot bodies.
using msgpack::Writer;

void client_map(Writer &w, std::string_view context = "user", int extra_keys = 0) {
    w.map(5 + extra_keys);
    w.key("id");
    w.str("app");
    w.key("display_name");
    w.str("App");
    w.key("context");
    w.str(context);
    w.key("traffic_class");
    w.str("batch");
    w.key("purposes");
    w.array(1);
    w.str("TREAT");
    for (int i = 0; i < extra_keys; ++i) {
        w.key("future_field");
        w.array(2);
        w.uint(1);
        w.map(0);
    }
}

void route_map(Writer &w, int extra_keys = 0) {
    w.map(5 + extra_keys);
    w.key("name");
    w.str("fhir");
    w.key("prefix");
    w.str("/fhir/");
    for (const char *key : {"methods", "resources", "interactions"}) {
        w.key(key);
        w.array(1);
        w.str(std::string_view(key) == "methods" ? "GET" : "*");
    }
    for (int i = 0; i < extra_keys; ++i) {
        w.key("rate_limit");
        w.uint(100);
    }
}

struct BodyOptions {
    int extra_keys = 0;
    std::string_view context = "user";
    bool serial_as_string = false;
    bool duplicate_serial = false;
    bool omit_routes = false;
    int clients = 1;
};

std::string body(const BodyOptions &o = {}) {
    std::string out;
    Writer w(out);
    w.map(3 + o.extra_keys + (o.duplicate_serial ? 1 : 0));
    w.key("serial");
    if (o.serial_as_string) {
        w.str("5");
    } else {
        w.uint(5);
    }
    if (o.duplicate_serial) {
        w.key("serial");
        w.uint(6);
    }
    w.key("digest");
    w.str("abc");
    for (int i = 0; i < o.extra_keys; ++i) {
        w.key("signature");
        w.bin("xyz");
    }
    w.key("bundle");
    w.map((o.omit_routes ? 4 : 5) + o.extra_keys);
    w.key("schema");
    w.str(kSchemaV1);
    w.key("version");
    w.str("v1");
    w.key("description");
    w.str("");
    w.key("clients");
    w.array(static_cast<uint32_t>(o.clients));
    for (int i = 0; i < o.clients; ++i) {
        client_map(w, o.context, o.extra_keys);
    }
    if (!o.omit_routes) {
        w.key("routes");
        w.array(1);
        route_map(w, o.extra_keys);
    }
    for (int i = 0; i < o.extra_keys; ++i) {
        w.key("tenants");
        w.nil();
    }
    return out;
}

TEST(PolicySnapshot, DecoderIsStrictAboutTypesAndLenientAboutNewKeys) {
    const std::optional<Snapshot> plain = decode_snapshot(body());
    ASSERT_TRUE(plain);
    EXPECT_EQ(plain->serial, 5u);
    EXPECT_EQ(plain->digest_hex, "abc");
    ASSERT_EQ(plain->bundle.clients.size(), 1u);
    EXPECT_EQ(plain->bundle.clients[0].context, LaunchContext::User);
    EXPECT_EQ(plain->bundle.clients[0].traffic_class, TrafficClass::Batch);

    const std::optional<Snapshot> newer = decode_snapshot(body({.extra_keys = 2}));
    ASSERT_TRUE(newer);
    EXPECT_EQ(*newer, *plain);

    EXPECT_FALSE(decode_snapshot(body({.context = "robot"})));
    EXPECT_FALSE(decode_snapshot(body({.serial_as_string = true})));
    EXPECT_FALSE(decode_snapshot(body({.duplicate_serial = true})));
    EXPECT_FALSE(decode_snapshot(body({.omit_routes = true})));
    EXPECT_FALSE(decode_snapshot(body({.clients = 2})));  // two clients with one id

    // A list header claiming four billion clients fails on the missing bytes, not on memory.
    std::string huge;
    Writer w(huge);
    w.map(3);
    w.key("serial");
    w.uint(1);
    w.key("digest");
    w.str("");
    w.key("bundle");
    w.map(5);
    w.key("clients");
    w.array(UINT32_MAX);
    EXPECT_FALSE(decode_snapshot(huge));

    // Keys must be strings.
    std::string int_key;
    Writer k(int_key);
    k.map(1);
    k.uint(1);
    k.uint(2);
    EXPECT_FALSE(decode_snapshot(int_key));
}

Bundle auth_bundle() {
    Bundle b = small_bundle();
    Issuer issuer;
    issuer.id = "idp";
    issuer.issuer = "https://idp.example";
    issuer.audience = "https://gateway.example/fhir";
    issuer.jwks_file = "keys/idp.json";
    issuer.jwks_json = R"({"keys":[]})";  // the codec carries the text; parse_bundle vets it
    issuer.algorithms = {"RS256", "ES256"};
    issuer.leeway_seconds = 30;
    b.issuers.push_back(issuer);
    issuer.id = "backup";
    issuer.issuer = "https://backup.example";
    issuer.leeway_seconds = 0;
    b.issuers.push_back(issuer);

    Client batch{"batch", "Batch", LaunchContext::System, TrafficClass::Batch, {"HOPERAT"}};
    batch.auth = {AuthMethod::CertBound, AuthMethod::Mtls, AuthMethod::Bearer};
    batch.scope_ceiling = "system/*.rs system/Patient.r";
    batch.issuers = {"idp", "backup"};
    batch.tenants = {"t2", "t1"};
    batch.certificates = {kOtherFingerprint, kFingerprint};
    b.clients.push_back(batch);
    b.routes[0].tenant = "t1";
    return b;
}

TEST(PolicySnapshot, RoundTripWithAuthentication) {
    Snapshot snapshot{11, "", auth_bundle()};
    snapshot.digest_hex = bundle_digest(snapshot.bundle);
    const std::string encoded = encode_snapshot(snapshot);
    const std::optional<Snapshot> decoded = decode_snapshot(encoded);
    ASSERT_TRUE(decoded);
    Snapshot canonical = snapshot;
    canonical.bundle.canonicalize();
    EXPECT_EQ(*decoded, canonical);
    EXPECT_EQ(encode_snapshot(*decoded), encoded);

    const Bundle &b = decoded->bundle;
    ASSERT_EQ(b.issuers.size(), 2u);  // by id
    EXPECT_EQ(b.issuers[0].id, "backup");
    EXPECT_EQ(b.issuers[0].leeway_seconds, 0);
    EXPECT_EQ(b.issuers[1].id, "idp");
    EXPECT_EQ(b.issuers[1].jwks_json, R"({"keys":[]})");
    EXPECT_EQ(b.issuers[1].jwks_file, "keys/idp.json");
    EXPECT_EQ(b.issuers[1].algorithms, (std::vector<std::string>{"ES256", "RS256"}));
    EXPECT_EQ(b.issuers[1].leeway_seconds, 30);
    const Client *batch = b.find_client("batch");
    ASSERT_NE(batch, nullptr);
    EXPECT_EQ(batch->auth, (std::vector<AuthMethod>{AuthMethod::Bearer, AuthMethod::Mtls,
                                                    AuthMethod::CertBound}));
    EXPECT_EQ(batch->scope_ceiling, "system/*.rs system/Patient.r");
    EXPECT_EQ(batch->issuers, (std::vector<std::string>{"backup", "idp"}));
    EXPECT_EQ(batch->tenants, (std::vector<std::string>{"t1", "t2"}));
    EXPECT_EQ(batch->certificates, (std::vector<std::string>{kFingerprint, kOtherFingerprint}));
    EXPECT_EQ(b.find_client("app")->auth, std::vector<AuthMethod>{AuthMethod::Bearer});
    EXPECT_EQ(b.routes[0].tenant, "t1");
    EXPECT_EQ(b.find_client_by_certificate(kFingerprint), batch);
    EXPECT_EQ(b.find_issuer_by_iss("https://backup.example"), &b.issuers[0]);

    // Every new field is content: it changes the digest.
    const std::string digest = bundle_digest(snapshot.bundle);
    const auto changed = [&](auto &&edit) {
        Bundle copy = snapshot.bundle;
        edit(copy);
        return bundle_digest(copy) != digest;
    };
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers[0].jwks_json += " "; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers[0].jwks_file += "x"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers[0].leeway_seconds = 31; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers[0].audience += "/"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers[0].algorithms.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.issuers.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].auth.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].scope_ceiling = "system/*.rs"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].issuers.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].tenants.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].certificates.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.routes[0].tenant.clear(); }));
    // Order is not content.
    EXPECT_FALSE(changed([](Bundle &c) { std::swap(c.issuers[0], c.issuers[1]); }));
    EXPECT_FALSE(
        changed([](Bundle &c) { c.clients[1].scope_ceiling = "system/Patient.r  system/*.rs"; }));
}

TEST(PolicySnapshot, DecoderRefusesBrokenAuthentication) {
    const auto decodes = [](const Bundle &bundle) {
        return decode_snapshot(encode_snapshot({1, "", bundle})).has_value();
    };
    ASSERT_TRUE(decodes(auth_bundle()));
    const auto edited = [](auto &&edit) {
        Bundle b = auth_bundle();
        edit(b);
        return b;
    };
    // Values the parser never produces.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.issuers[0].leeway_seconds = 301; })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) { b.issuers[0].leeway_seconds = 300; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.clients[1].auth.clear(); })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) {
        b.clients[1].auth = {AuthMethod::Mtls, AuthMethod::Mtls};
    })));
    // Lookups that would have two answers.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.issuers[1].id = b.issuers[0].id; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.issuers[1].issuer = b.issuers[0].issuer; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.clients[0].certificates = {kFingerprint}; })));

    // An auth method this version does not know: refused, not skipped.
    std::string encoded = encode_snapshot({1, "", auth_bundle()});
    const size_t at = encoded.find("cert-bound");
    ASSERT_NE(at, std::string::npos);
    encoded[at + 9] = 'D';
    EXPECT_FALSE(decode_snapshot(encoded));
    EXPECT_EQ(encoded.find("cert-bound"), std::string::npos);  // it was the only occurrence

    // A snapshot from before authentication: every new field takes its default.
    const std::optional<Snapshot> old = decode_snapshot(body());
    ASSERT_TRUE(old);
    EXPECT_TRUE(old->bundle.issuers.empty());
    EXPECT_EQ(old->bundle.clients[0].auth, std::vector<AuthMethod>{AuthMethod::Bearer});
    EXPECT_EQ(old->bundle.clients[0].scope_ceiling, "");
    EXPECT_TRUE(old->bundle.clients[0].certificates.empty());
    EXPECT_EQ(old->bundle.routes[0].tenant, "");

    // Issuer fields: jwks_file and leeway_seconds may be absent, the rest may not.
    const auto issuer_body = [](std::initializer_list<std::string_view> skip) {
        const std::pair<std::string_view, std::string_view> fields[] = {
            {"id", "i"},
            {"issuer", "https://i.example"},
            {"audience", "a"},
            {"jwks_file", "f"},
            {"jwks_json", "{}"}};
        std::string out;
        Writer w(out);
        w.map(3);
        w.key("serial");
        w.uint(1);
        w.key("digest");
        w.str("");
        w.key("bundle");
        w.map(5);
        w.key("schema");
        w.str(kSchemaV1);
        w.key("version");
        w.str("v");
        w.key("clients");
        w.array(0);
        w.key("routes");
        w.array(0);
        w.key("issuers");
        w.array(1);
        const bool with_algorithms =
            std::find(skip.begin(), skip.end(), "algorithms") == skip.end();
        uint32_t count = with_algorithms ? 1 : 0;
        for (const auto &[key, value] : fields) {
            count += std::find(skip.begin(), skip.end(), key) == skip.end() ? 1 : 0;
        }
        w.map(count);
        for (const auto &[key, value] : fields) {
            if (std::find(skip.begin(), skip.end(), key) == skip.end()) {
                w.key(key);
                w.str(value);
            }
        }
        if (with_algorithms) {
            w.key("algorithms");
            w.array(1);
            w.str("ES256");
        }
        return out;
    };
    const std::optional<Snapshot> minimal = decode_snapshot(issuer_body({"jwks_file"}));
    ASSERT_TRUE(minimal);
    ASSERT_EQ(minimal->bundle.issuers.size(), 1u);
    EXPECT_EQ(minimal->bundle.issuers[0].leeway_seconds, 60);
    EXPECT_EQ(minimal->bundle.issuers[0].jwks_json, "{}");
    for (const char *required : {"id", "issuer", "audience", "jwks_json", "algorithms"}) {
        EXPECT_FALSE(decode_snapshot(issuer_body({required}))) << required;
    }
}

TEST(PolicyBundle, CertificateFingerprints) {
    EXPECT_EQ(normalize_certificate_fingerprint(kFingerprint), kFingerprint);
    EXPECT_EQ(normalize_certificate_fingerprint(kFingerprintColons), kFingerprint);
    std::string upper = kFingerprint;
    std::transform(upper.begin(), upper.end(), upper.begin(), ::toupper);
    EXPECT_EQ(normalize_certificate_fingerprint(upper), kFingerprint);
    EXPECT_EQ(normalize_certificate_fingerprint(":" + kFingerprint + "::"), kFingerprint);
    for (const std::string &bad :
         {std::string(), std::string(63, 'a'), std::string(65, 'a'), std::string(63, 'a') + "g",
          kFingerprint + " ", " " + kFingerprint, std::string(40, 'a')}) {
        EXPECT_FALSE(normalize_certificate_fingerprint(bad)) << bad;
    }

    Bundle b = auth_bundle();
    b.canonicalize();
    EXPECT_EQ(b.find_client_by_certificate(upper)->id, "batch");
    EXPECT_EQ(b.find_client_by_certificate(kOtherFingerprint)->id, "batch");
    EXPECT_EQ(b.find_client_by_certificate(kFingerprint.substr(1)), nullptr);
    EXPECT_EQ(b.find_client_by_certificate(kFingerprintColons), nullptr);  // callers pass hex
    EXPECT_EQ(b.find_client_by_certificate(std::string(64, '0')), nullptr);
    EXPECT_EQ(Bundle{}.find_client_by_certificate(kFingerprint), nullptr);

    for (const AuthMethod m : {AuthMethod::Bearer, AuthMethod::Mtls, AuthMethod::CertBound}) {
        EXPECT_EQ(auth_method_from_name(auth_method_name(m)), m);
    }
    EXPECT_EQ(auth_method_name(AuthMethod::CertBound), "cert-bound");
    EXPECT_FALSE(auth_method_from_name("Bearer"));
    EXPECT_FALSE(auth_method_from_name(""));
}

// ---- Decisions -------------------------------------------------------------------------------

protocol::DecideRequest request(std::string method, std::string path, std::string query = "",
                                std::string client_id = "") {
    protocol::DecideRequest r;
    r.correlation_id = "corr-1";
    r.method = std::move(method);
    r.path = std::move(path);
    r.query = std::move(query);
    r.client_id = std::move(client_id);
    r.host = "gateway.example";
    return r;
}

struct DecisionCase {
    const char *method;
    const char *path;
    const char *query;
    const char *client;
    protocol::Decision decision;
    uint16_t status;
    const char *reason;
    const char *route;
    const char *resource_type;
    const char *interaction;
};

constexpr auto kPermit = protocol::Decision::Permit;
constexpr auto kDeny = protocol::Decision::Deny;

const DecisionCase kSandboxDecisions[] = {
    // Permitted interactions on permitted types, with and without a registered client.
    {"GET", "/fhir/Patient/123", "", "", kPermit, 200, "permitted", "fhir", "Patient", "read"},
    {"GET", "/fhir/Patient/123", "", "demo-clinician-app", kPermit, 200, "permitted", "fhir",
     "Patient", "read"},
    {"HEAD", "/fhir/Patient/123/_history/4", "", "demo-patient-app", kPermit, 200, "permitted",
     "fhir", "Patient", "vread"},
    {"GET", "/fhir/Observation", "code=8867-4&patient=123", "demo-batch", kPermit, 200, "permitted",
     "fhir", "Observation", "search-type"},
    {"POST", "/fhir/Observation/_search", "", "", kPermit, 200, "permitted", "fhir", "Observation",
     "search-type"},
    {"POST", "/fhir/Encounter", "", "", kPermit, 200, "permitted", "fhir", "Encounter", "create"},
    {"PUT", "/fhir/Condition/c1", "", "", kPermit, 200, "permitted", "fhir", "Condition", "update"},
    {"PATCH", "/fhir/ServiceRequest/s1", "", "", kPermit, 200, "permitted", "fhir",
     "ServiceRequest", "patch"},
    {"DELETE", "/fhir/Consent/k1", "", "", kPermit, 200, "permitted", "fhir", "Consent", "delete"},
    {"GET", "/fhir/MedicationRequest/m1/_history", "", "", kPermit, 200, "permitted", "fhir",
     "MedicationRequest", "history-instance"},
    {"GET", "/fhir/metadata", "", "", kPermit, 200, "permitted", "fhir", "", "capabilities"},
    // No route.
    {"GET", "/other/Patient/123", "", "", kDeny, 404, "no-route", "", "", ""},
    {"GET", "/fhir", "", "", kDeny, 404, "no-route", "", "", ""},
    {"GET", "/", "", "", kDeny, 404, "no-route", "", "", ""},
    {"GET", "", "", "", kDeny, 404, "no-route", "", "", ""},
    // Method not on the route.
    {"OPTIONS", "/fhir/Patient/123", "", "", kDeny, 405, "method-not-allowed", "fhir", "", ""},
    {"get", "/fhir/Patient/123", "", "", kDeny, 405, "method-not-allowed", "fhir", "", ""},
    // Not a FHIR interaction.
    {"GET", "/fhir/Patient/123/", "", "", kDeny, 400, "unrecognized-fhir-request", "fhir", "", ""},
    {"GET", "/fhir/Patient/../Observation", "", "", kDeny, 400, "unrecognized-fhir-request", "fhir",
     "", ""},
    {"GET", "/fhir/Unicorn/1", "", "", kDeny, 400, "unrecognized-fhir-request", "fhir", "", ""},
    {"POST", "/fhir/Patient/123", "", "", kDeny, 400, "unrecognized-fhir-request", "fhir", "", ""},
    {"GET", "/fhir/", "", "", kDeny, 400, "unrecognized-fhir-request", "fhir", "", ""},
    // Resource type not on the route.
    {"GET", "/fhir/AllergyIntolerance", "", "", kDeny, 403, "resource-type-not-permitted", "fhir",
     "AllergyIntolerance", "search-type"},
    {"GET", "/fhir/Practitioner/p1", "", "demo-clinician-app", kDeny, 403,
     "resource-type-not-permitted", "fhir", "Practitioner", "read"},
    {"GET", "/fhir/Group/g/$export", "", "", kDeny, 403, "resource-type-not-permitted", "fhir",
     "Group", "operation-instance"},
    // Interaction not on the route.
    {"GET", "/fhir/$export", "", "demo-batch", kDeny, 403, "interaction-not-permitted", "fhir", "",
     "operation-system"},
    {"GET", "/fhir/Patient/1/$everything", "", "", kDeny, 403, "interaction-not-permitted", "fhir",
     "Patient", "operation-instance"},
    {"POST", "/fhir/", "", "", kDeny, 403, "interaction-not-permitted", "fhir", "", "batch"},
    {"GET", "/fhir/", "name=smith", "", kDeny, 403, "interaction-not-permitted", "fhir", "",
     "search-system"},
    {"GET", "/fhir/Patient/_history", "", "", kDeny, 403, "interaction-not-permitted", "fhir",
     "Patient", "history-type"},
    {"GET", "/fhir/_history", "", "", kDeny, 403, "interaction-not-permitted", "fhir", "",
     "history-system"},
    // Unknown client on an otherwise permitted request.
    {"GET", "/fhir/Patient/123", "", "demo-clinician", kDeny, 403, "unknown-client", "fhir",
     "Patient", "read"},
    {"GET", "/fhir/metadata", "", "DEMO-BATCH", kDeny, 403, "unknown-client", "fhir", "",
     "capabilities"},
};

TEST(PolicyEvaluate, SandboxDecisionTable) {
    const Snapshot snapshot = sandbox_snapshot(9);
    for (const DecisionCase &c : kSandboxDecisions) {
        SCOPED_TRACE(std::string(c.method) + " " + c.path + "?" + c.query + " as " + c.client);
        const protocol::DecideReply reply =
            evaluate(snapshot, request(c.method, c.path, c.query, c.client));
        EXPECT_EQ(reply.decision, c.decision);
        EXPECT_EQ(reply.http_status, c.status);
        EXPECT_EQ(reply.reason, c.reason);
        EXPECT_EQ(reply.route, c.route);
        EXPECT_EQ(reply.resource_type, c.resource_type);
        EXPECT_EQ(reply.interaction, c.interaction);
        EXPECT_EQ(reply.policy_version, kSandboxVersion);
        EXPECT_EQ(reply.policy_serial, 9u);
        EXPECT_FALSE(reply.message.empty());
        // The reply must survive the wire.
        EXPECT_TRUE(protocol::decode_decide_reply(protocol::encode(reply)));
    }
}

TEST(PolicyEvaluate, MessagesNeverEchoThePathOrQuery) {
    const Snapshot snapshot = sandbox_snapshot();
    const char *const kPhi = "SMITH4711";
    const std::string paths[] = {
        std::string("/nope/") + kPhi,         std::string("/fhir/Patient/") + kPhi + "/",
        std::string("/fhir/Flag/") + kPhi,    std::string("/fhir/Patient/") + kPhi + "/$everything",
        std::string("/fhir/Patient/") + kPhi,
    };
    for (const std::string &path : paths) {
        for (const char *method : {"GET", "OPTIONS"}) {
            const protocol::DecideReply reply =
                evaluate(snapshot, request(method, path, std::string("name=") + kPhi, kPhi));
            EXPECT_EQ(reply.message.find(kPhi), std::string::npos) << reply.message;
            EXPECT_EQ(reply.reason.find(kPhi), std::string::npos);
            EXPECT_EQ(reply.resource_type.find(kPhi), std::string::npos);
        }
    }
}

Snapshot routes_snapshot() {
    Snapshot s;
    s.serial = 3;
    s.bundle.schema = std::string(kSchemaV1);
    s.bundle.version = "routes";
    // Deliberately not in prefix order: matching must not depend on it.
    s.bundle.routes.push_back({"deep", "/fhir/r4/admin/", {"GET"}, {"*"}, {"*"}});
    s.bundle.routes.push_back({"root", "/", {"GET"}, {"*"}, {"*"}});
    s.bundle.routes.push_back({"r4", "/fhir/r4/", {"GET", "POST"}, {"Patient"}, {"read"}});
    s.bundle.routes.push_back({"fhir", "/fhir/", {"GET"}, {"*"}, {"*"}});
    return s;
}

TEST(PolicyRoutes, LongestPrefixWins) {
    const Snapshot s = routes_snapshot();
    const struct {
        const char *path;
        const char *route;
    } kCases[] = {
        {"/fhir/r4/admin/Patient", "deep"},
        {"/fhir/r4/admin/", "deep"},
        {"/fhir/r4/adminx/Patient", "r4"},
        {"/fhir/r4/Patient/1", "r4"},
        {"/fhir/r4", "fhir"},
        {"/fhir/r5/Patient/1", "fhir"},
        {"/fhir/", "fhir"},
        {"/fhir", "root"},
        {"/", "root"},
        {"/metadata", "root"},
    };
    for (const auto &c : kCases) {
        const Route *route = s.bundle.match_route(c.path);
        ASSERT_NE(route, nullptr) << c.path;
        EXPECT_EQ(route->name, c.route) << c.path;
    }
    EXPECT_EQ(s.bundle.match_route(""), nullptr);
    EXPECT_EQ(s.bundle.match_route("fhir/"), nullptr);

    Bundle reversed = s.bundle;
    std::reverse(reversed.routes.begin(), reversed.routes.end());
    for (const auto &c : kCases) {
        EXPECT_EQ(reversed.match_route(c.path)->name, c.route) << c.path;
    }
    Bundle none;
    EXPECT_EQ(none.match_route("/"), nullptr);
}

TEST(PolicyRoutes, EvaluateUsesTheMatchedRoute) {
    const Snapshot s = routes_snapshot();
    // r4 allows only Patient read; the deeper and shallower routes allow everything.
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/r4/Patient/1")).reason, "permitted");
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/r4/Observation/1")).reason,
              "resource-type-not-permitted");
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/r4/Patient")).reason, "interaction-not-permitted");
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/r4/admin/Observation/1")).reason, "permitted");
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/Observation/1")).route, "fhir");
    EXPECT_EQ(evaluate(s, request("POST", "/fhir/Observation")).reason, "method-not-allowed");
    const protocol::DecideReply system = evaluate(s, request("GET", "/metadata"));
    EXPECT_EQ(system.reason, "permitted");
    EXPECT_EQ(system.route, "root");
    EXPECT_EQ(system.policy_version, "routes");
    EXPECT_EQ(system.policy_serial, 3u);
}

TEST(PolicyEvaluate, SystemLevelInteractionsIgnoreTheResourceList) {
    Snapshot s;
    s.bundle.routes.push_back(
        {"fhir", "/fhir/", {"GET", "POST"}, {"Patient"}, {"capabilities", "batch"}});
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/metadata")).reason, "permitted");
    EXPECT_EQ(evaluate(s, request("POST", "/fhir/")).reason, "permitted");
    EXPECT_EQ(evaluate(s, request("GET", "/fhir/_history")).reason, "interaction-not-permitted");
}

TEST(PolicyEvaluate, EmptySnapshotDeniesEverything) {
    const Snapshot s;
    const protocol::DecideReply reply = evaluate(s, request("GET", "/fhir/Patient/1"));
    EXPECT_EQ(reply.decision, protocol::Decision::Deny);
    EXPECT_EQ(reply.http_status, 404);
    EXPECT_EQ(reply.reason, "no-route");
    EXPECT_EQ(reply.message, "No gateway route serves this path");
}

TEST(PolicyEvaluate, RouteTenantLimitsWhichClientsMayUseIt) {
    Snapshot s;
    s.serial = 4;
    s.bundle.version = "tenants";
    s.bundle.routes.push_back({"gh", "/gh/", {"GET"}, {"Patient"}, {"read"}, "general-hospital"});
    s.bundle.routes.push_back({"open", "/open/", {"GET"}, {"*"}, {"*"}});
    Client member{"member", "", LaunchContext::User, TrafficClass::Interactive, {}};
    member.tenants = {"clinic-2", "general-hospital"};
    Client outsider{"outsider", "", LaunchContext::User, TrafficClass::Interactive, {}};
    outsider.tenants = {"clinic-2"};
    Client untenanted{"untenanted", "", LaunchContext::System, TrafficClass::Batch, {}};
    s.bundle.clients = {untenanted, outsider, member};
    s.bundle.canonicalize();

    const struct {
        const char *method;
        const char *path;
        const char *client;
        const char *reason;
    } kCases[] = {
        {"GET", "/gh/Patient/1", "member", "permitted"},
        {"GET", "/gh/Patient/1", "outsider", "tenant-not-permitted"},
        {"GET", "/gh/Patient/1", "untenanted", "tenant-not-permitted"},
        // No client id: nothing to compare (authentication, in nginx, decides about those).
        {"GET", "/gh/Patient/1", "", "permitted"},
        {"GET", "/gh/Patient/1", "ghost", "unknown-client"},
        // The route's own rules come first.
        {"POST", "/gh/Patient", "outsider", "method-not-allowed"},
        {"GET", "/gh/Observation/1", "outsider", "resource-type-not-permitted"},
        {"GET", "/gh/Patient", "outsider", "interaction-not-permitted"},
        // A route without a tenant serves every registered client.
        {"GET", "/open/Patient/1", "outsider", "permitted"},
        {"GET", "/open/Patient/1", "untenanted", "permitted"},
    };
    for (const auto &c : kCases) {
        SCOPED_TRACE(std::string(c.method) + " " + c.path + " as " + c.client);
        const protocol::DecideReply reply = evaluate(s, request(c.method, c.path, "", c.client));
        EXPECT_EQ(reply.reason, c.reason);
        EXPECT_EQ(reply.policy_serial, 4u);
    }
    const protocol::DecideReply denied =
        evaluate(s, request("GET", "/gh/Patient/1", "", "outsider"));
    EXPECT_EQ(denied.decision, protocol::Decision::Deny);
    EXPECT_EQ(denied.http_status, 403);
    EXPECT_EQ(denied.route, "gh");
    EXPECT_EQ(denied.resource_type, "Patient");
    EXPECT_EQ(denied.interaction, "read");
    EXPECT_EQ(denied.message, "The client is not registered for the tenant this route serves");
    EXPECT_TRUE(protocol::decode_decide_reply(protocol::encode(denied)));
}

TEST(PolicyBundle, FindClientNeedsCanonicalOrder) {
    Bundle b;
    for (const char *id : {"zeta", "alpha", "mid", "beta"}) {
        b.clients.push_back({id, "", LaunchContext::System, TrafficClass::Batch, {}});
    }
    b.canonicalize();
    for (const char *id : {"zeta", "alpha", "mid", "beta"}) {
        const Client *c = b.find_client(id);
        ASSERT_NE(c, nullptr) << id;
        EXPECT_EQ(c->id, id);
    }
    for (const char *id : {"", "a", "alph", "alphaa", "zz", "MID"}) {
        EXPECT_EQ(b.find_client(id), nullptr) << id;
    }
    EXPECT_EQ(Bundle{}.find_client("x"), nullptr);
}

// ---- Throttling ------------------------------------------------------------------------------

// kMinimal (9 lines) followed by `tail`, which starts on line 10.
std::string with_tail(std::string_view tail) {
    return std::string(kMinimal) + std::string(tail);
}

// A valid throttling section: lines 10 to 17 after kMinimal.
constexpr const char *kThrottling = R"(rate_plans:
  - name: fast
    rate: 10/s
    burst: 20
  - name: slow
    rate: 60/m
    burst: 5
throttling: {interactive_plan: fast, batch_plan: slow, unclassified_plan: slow}
)";

// One rate plan named p, whose fields after `name` (lines 12..) the caller gives, and the
// throttling section that uses it.
std::string with_plan(std::string_view fields) {
    return std::string(kMinimal) + "rate_plans:\n  - name: p\n" + std::string(fields) +
           "throttling: {interactive_plan: p, batch_plan: p, unclassified_plan: p}\n";
}

// kThrottling and one upstream named u, whose fields after `name` (lines 20..) the caller gives.
std::string with_upstream(std::string_view fields) {
    return std::string(kMinimal) + kThrottling + "upstreams:\n  - name: u\n" + std::string(fields);
}

TEST(PolicyThrottling, AbsentMeansOff) {
    for (const std::string &yaml : {std::string(kMinimal), with_tail("rate_plans: []\n"),
                                    with_tail("rate_plans: []\nupstreams: []\n")}) {
        const ParseResult result = parse(yaml);
        ASSERT_TRUE(result.bundle) << yaml << dump(result.diagnostics);
        EXPECT_TRUE(result.bundle->rate_plans.empty());
        EXPECT_TRUE(result.bundle->upstreams.empty());
        EXPECT_EQ(result.bundle->throttling, Throttling{});
        EXPECT_EQ(result.bundle->plan_for(nullptr), nullptr);
    }
}

TEST(PolicyThrottling, PlansUpstreamsAndDefaults) {
    const ParseResult result = parse(with_tail(std::string(kThrottling) + R"(upstreams:
  - name: ehr
    capacity: 100
    interactive_reserve: 99
  - {name: archive, capacity: 1}
  - {name: lab, capacity: 1000000}
)"));
    ASSERT_TRUE(result.bundle) << dump(result.diagnostics);
    const Bundle &b = *result.bundle;
    ASSERT_EQ(b.rate_plans.size(), 2u);
    // rate_units_per_second is derived from the rate: tokens per second times a million.
    EXPECT_EQ(b.rate_plans[0], (RatePlan{"fast", "10/s", 10'000'000, 20, 0, false}));
    EXPECT_EQ(b.rate_plans[1], (RatePlan{"slow", "60/m", 1'000'000, 5, 0, false}));
    EXPECT_EQ(b.throttling, (Throttling{"fast", "slow", "slow"}));
    ASSERT_EQ(b.upstreams.size(), 3u);  // by name
    EXPECT_EQ(b.upstreams[0], (Upstream{"archive", 1, 0}));
    EXPECT_EQ(b.upstreams[1], (Upstream{"ehr", 100, 99}));
    EXPECT_EQ(b.upstreams[2], (Upstream{"lab", 1'000'000, 0}));

    // Every field at its bounds.
    const ParseResult bounds = parse(with_plan(
        "    rate: 10000000/s\n    burst: 1000000\n    concurrency: 100000\n    dry_run: true\n"));
    ASSERT_TRUE(bounds.bundle) << dump(bounds.diagnostics);
    EXPECT_EQ(bounds.bundle->rate_plans[0],
              (RatePlan{"p", "10000000/s", 10'000'000'000'000, 1'000'000, 100'000, true}));
    const ParseResult low =
        parse(with_plan("    rate: 1/h\n    burst: 1\n    concurrency: 0\n    dry_run: false\n"));
    ASSERT_TRUE(low.bundle) << dump(low.diagnostics);
    EXPECT_EQ(low.bundle->rate_plans[0], (RatePlan{"p", "1/h", 277, 1, 0, false}));
}

TEST(PolicyThrottling, RatePlanFields) {
    const std::string kRate =
        "expected N/s, N/m or N/h (N requests per second, minute or hour, "
        "1 to 10000000), e.g. 50/s";
    for (const char *rate : {"0/s", "10/d", "10/sec", "10 /s", "1.5/s", "-1/s", "/s", "10",
                             "10000001/s", "1e3/s", "ten/s"}) {
        expect_one(with_plan(std::string("    rate: \"") + rate + "\"\n    burst: 1\n"), 12, 11,
                   "rate_plans[0].rate",
                   "invalid rate " + std::string("\"") + rate + "\": " + kRate);
    }
    expect_one(with_plan("    rate: 50r/s\n    burst: 1\n"), 12, 11, "rate_plans[0].rate",
               "invalid rate \"50r/s\": write \"50/s\", not nginx's \"50r/s\"; " + kRate);
    expect_one(with_plan("    rate: 300r/m\n    burst: 1\n"), 12, 11, "rate_plans[0].rate",
               "write \"300/m\", not nginx's \"300r/m\"");
    expect_one(with_plan("    rate: [10/s]\n    burst: 1\n"), 12, 11, "rate_plans[0].rate",
               "expected a string, got a list");

    for (const char *burst :
         {"0", "1000001", "-1", "1e3", "0x10", "1_000", "+5", "", "9999999999999999999"}) {
        expect_one(with_plan(std::string("    rate: 1/s\n    burst: \"") + burst + "\"\n"), 13, 12,
                   "rate_plans[0].burst",
                   "invalid burst \"" + std::string(burst) +
                       "\": expected a whole number of tokens from 1 to 1000000");
    }
    for (const char *concurrency : {"100001", "-1", "many"}) {
        expect_one(with_plan(std::string("    rate: 1/s\n    burst: 1\n    concurrency: ") +
                             concurrency + "\n"),
                   14, 18, "rate_plans[0].concurrency",
                   "invalid concurrency \"" + std::string(concurrency) +
                       "\": expected a whole number of requests from 0 (no cap) to 100000");
    }
    // Only YAML 1.2's spelling: YAML 1.1 tools read yes/on/y as true, others as strings.
    for (const char *dry_run : {"yes", "on", "1", "True", "\"\""}) {
        expect_one(
            with_plan(std::string("    rate: 1/s\n    burst: 1\n    dry_run: ") + dry_run + "\n"),
            14, 14, "rate_plans[0].dry_run", "expected true or false");
    }

    expect_one(with_plan("    burst: 1\n"), 11, 5, "rate_plans[0].rate",
               "missing required field \"rate\"");
    expect_one(with_plan("    rate: 1/s\n"), 11, 5, "rate_plans[0].burst",
               "missing required field \"burst\"");
    expect_one(with_plan("    rate: 1/s\n    burst: 1\n    concurency: 2\n"), 14, 5,
               "rate_plans[0].concurency",
               "unknown field \"concurency\"; did you mean \"concurrency\"?");
    expect_one(with_plan("    rate: 1/s\n    burst: 1\n    rate: 2/s\n"), 14, 5,
               "rate_plans[0].rate", "duplicate key \"rate\"; first given at line 12");
    expect_one(
        with_tail("rate_plans:\n  - fast\n  - {name: p, rate: 1/s, burst: 1}\n"
                  "throttling: {interactive_plan: p, batch_plan: p, unclassified_plan: p}\n"),
        11, 5, "rate_plans[0]", "expected a mapping, got a string");
}

TEST(PolicyThrottling, NamesAreValidAndUnique) {
    const std::string throttling =
        "throttling: {interactive_plan: p, batch_plan: p, unclassified_plan: p}\n";
    expect_one(with_tail("rate_plans:\n  - {name: p, rate: 1/s, burst: 1}\n"
                         "  - {name: p, rate: 2/s, burst: 1}\n" +
                         throttling),
               12, 12, "rate_plans[1].name",
               "duplicate rate plan name \"p\"; first defined at line 11");
    expect_one(with_tail("rate_plans:\n  - {name: \"a/b\", rate: 1/s, burst: 1}\n"
                         "  - {name: p, rate: 2/s, burst: 1}\n" +
                         throttling),
               11, 12, "rate_plans[0].name",
               "invalid rate plan name \"a/b\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    expect_one(
        with_tail("rate_plans:\n  - {name: " + std::string(65, 'n') +
                  ", rate: 1/s, burst: 1}\n  - {name: p, rate: 2/s, burst: 1}\n" + throttling),
        11, 12, "rate_plans[0].name", "invalid rate plan name");
    EXPECT_TRUE(parse(with_tail("rate_plans:\n  - {name: A-z_0.9, rate: 1/s, burst: 1}\n"
                                "throttling: {interactive_plan: A-z_0.9, batch_plan: A-z_0.9, "
                                "unclassified_plan: A-z_0.9}\n"))
                    .bundle);

    expect_one(with_upstream("    capacity: 1\n  - {name: u, capacity: 2}\n"), 21, 12,
               "upstreams[1].name", "duplicate upstream name \"u\"; first defined at line 19");
    expect_one(
        with_tail(std::string(kThrottling) + "upstreams:\n  - {name: \"u u\", capacity: 1}\n"), 19,
        12, "upstreams[0].name",
        "invalid upstream name \"u u\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
}

TEST(PolicyThrottling, UpstreamFields) {
    expect_one(with_upstream("    capacity: 0\n"), 20, 15, "upstreams[0].capacity",
               "invalid capacity \"0\": expected a whole number of requests from 1 to 1000000");
    expect_one(with_upstream("    capacity: 1000001\n"), 20, 15, "upstreams[0].capacity",
               "invalid capacity \"1000001\"");
    expect_one(with_upstream("    interactive_reserve: 1\n"), 19, 5, "upstreams[0].capacity",
               "missing required field \"capacity\"");
    expect_one(with_upstream("    capacity: 10\n    interactive_reserve: -1\n"), 21, 26,
               "upstreams[0].interactive_reserve",
               "invalid interactive_reserve \"-1\": expected a whole number of requests from 0 to "
               "1000000");
    expect_one(with_upstream("    capacity: 10\n    interactive_reserve: 10\n"), 21, 26,
               "upstreams[0].interactive_reserve",
               "interactive_reserve (10) must be less than capacity (10): batch traffic is "
               "refused once capacity - interactive_reserve requests are in flight, so this "
               "would refuse all of it");
    // Whatever the field order, the reserve is what is pointed at.
    expect_one(with_upstream("    interactive_reserve: 11\n    capacity: 10\n"), 20, 26,
               "upstreams[0].interactive_reserve",
               "interactive_reserve (11) must be less than capacity (10)");
    // A bad capacity is reported once, not again as a reserve problem.
    expect_one(with_upstream("    capacity: none\n    interactive_reserve: 10\n"), 20, 15,
               "upstreams[0].capacity", "invalid capacity \"none\"");
    expect_one(with_upstream("    capacity: 10\n    reserve: 2\n"), 21, 5, "upstreams[0].reserve",
               "unknown field \"reserve\"; expected one of name, capacity, interactive_reserve");
    EXPECT_TRUE(parse(with_upstream("    capacity: 10\n    interactive_reserve: 9\n")).bundle);
}

TEST(PolicyThrottling, ThrottlingIsRequiredExactlyWithPlans) {
    expect_one(with_tail("rate_plans:\n  - {name: p, rate: 1/s, burst: 1}\n"), 1, 1, "throttling",
               "missing required field \"throttling\": rate_plans (line 10) turns throttling on, "
               "so throttling must name the plan for interactive, batch and unclassified traffic");
    // Without plans, the section is reported once, not each plan it names.
    expect_one(with_tail("throttling:\n  interactive_plan: p\n  batch_plan: p\n"
                         "  unclassified_plan: p\n"),
               10, 1, "throttling",
               "the bundle defines no rate_plans, so throttling is off and this section would do "
               "nothing; define the plans it names in rate_plans, or remove it");
    expect_one(
        with_tail("rate_plans: []\n"
                  "throttling: {interactive_plan: p, batch_plan: p, unclassified_plan: p}\n"),
        11, 1, "throttling", "rate_plans is empty, so throttling is off");
    // Upstream capacities are enforced by the limiter, which runs only with throttling on.
    expect_one(with_tail("upstreams:\n  - {name: u, capacity: 1}\n"), 10, 1, "upstreams",
               "upstream capacities are enforced only when throttling is on; add rate_plans and "
               "throttling, or remove upstreams");

    const std::string plans = "rate_plans:\n  - {name: p, rate: 1/s, burst: 1}\n";
    expect_one(with_tail(plans + "throttling: {interactive_plan: p, batch_plan: p}\n"), 12, 13,
               "throttling.unclassified_plan", "missing required field \"unclassified_plan\"");
    expect_one(with_tail(plans + "throttling: p\n"), 12, 13, "throttling",
               "expected a mapping, got a string");
    expect_one(
        with_tail(plans + "throttling: {interactive_plan: p, batch_plans: p, unclassified_plan: "
                          "p, batch_plan: p}\n"),
        12, 35, "throttling.batch_plans",
        "unknown field \"batch_plans\"; did you mean \"batch_plan\"?");
    expect_one(with_tail(plans + "throttling: {interactive_plan: \"p q\", batch_plan: p, "
                                 "unclassified_plan: p}\n"),
               12, 32, "throttling.interactive_plan", "invalid rate plan name \"p q\"");
}

TEST(PolicyThrottling, ReferencesMustResolve) {
    const ParseResult result = parse(with_tail(R"(rate_plans:
  - {name: fast, rate: 1/s, burst: 1}
  - {name: slow, rate: 1/s, burst: 1}
throttling:
  interactive_plan: fsat
  batch_plan: slow
  unclassified_plan: anonymous
)"));
    ASSERT_EQ(result.diagnostics.size(), 2u) << dump(result.diagnostics);
    EXPECT_EQ(result.diagnostics[0].to_string(),
              "test.yaml:14:21: throttling.interactive_plan: unknown rate plan \"fsat\"; did you "
              "mean \"fast\"?");
    EXPECT_EQ(result.diagnostics[1].to_string(),
              "test.yaml:16:22: throttling.unclassified_plan: unknown rate plan \"anonymous\"; "
              "defined in rate_plans: fast, slow");

    // A client's rate_plan; with_client puts the client on line 4 and the routes after it.
    const std::string throttling =
        "rate_plans:\n  - {name: fast, rate: 1/s, burst: 1}\n"
        "throttling: {interactive_plan: fast, batch_plan: fast, unclassified_plan: fast}\n";
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, rate_plan: fsat}\n") +
                   throttling,
               4, 61, "clients[0].rate_plan", "unknown rate plan \"fsat\"; did you mean \"fast\"?");
    expect_one(with_client("  - {id: a, context: user, traffic_class: batch, rate_plan: fast}\n"),
               4, 61, "clients[0].rate_plan",
               "unknown rate plan \"fast\"; the bundle defines no rate_plans");
    expect_one(
        with_client("  - {id: a, context: user, traffic_class: batch, rate_plan: \"a b\"}\n") +
            throttling,
        4, 61, "clients[0].rate_plan",
        "invalid rate plan name \"a b\": must be 1-64 characters from A-Z a-z 0-9 . _ -");
    const ParseResult overridden =
        parse(with_client("  - {id: a, context: user, traffic_class: batch, rate_plan: fast}\n") +
              throttling);
    ASSERT_TRUE(overridden.bundle) << dump(overridden.diagnostics);
    EXPECT_EQ(overridden.bundle->clients[0].rate_plan, "fast");

    // A route's upstream.
    const std::string route =
        "    methods: [GET]\n    resources: [\"*\"]\n    interactions: [\"*\"]\n";
    expect_one(with_route_tail(route + "    upstream: ehr\n"), 10, 15, "routes[0].upstream",
               "unknown upstream \"ehr\"; the bundle defines no upstreams");
    expect_one(with_route_tail(route + "    upstream: sandbox_ehr\n" + kThrottling +
                               "upstreams: [{name: sandbox-ehr, capacity: 1}]\n"),
               10, 15, "routes[0].upstream",
               "unknown upstream \"sandbox_ehr\"; did you mean \"sandbox-ehr\"?");
    expect_one(with_route_tail(route + "    upstream: \"\"\n"), 10, 15, "routes[0].upstream",
               "invalid upstream name \"\"");
    const ParseResult routed = parse(with_route_tail(route + "    upstream: ehr\n" + kThrottling +
                                                     "upstreams: [{name: ehr, capacity: 1}]\n"));
    ASSERT_TRUE(routed.bundle) << dump(routed.diagnostics);
    EXPECT_EQ(routed.bundle->routes[0].upstream, "ehr");
}

TEST(PolicyThrottling, OrderDoesNotMatter) {
    const ParseResult a = parse(R"(schema: ehrgate.policy/v1
version: v1
clients:
  - {id: a, context: system, traffic_class: batch, rate_plan: slow}
routes:
  - {name: r, prefix: /, methods: [GET], resources: ["*"], interactions: ["*"], upstream: u2}
rate_plans:
  - {name: slow, rate: 1/s, burst: 1}
  - {name: fast, rate: 9/s, burst: 9, concurrency: 3, dry_run: true}
upstreams:
  - {name: u2, capacity: 2}
  - {name: u1, capacity: 5, interactive_reserve: 1}
throttling: {interactive_plan: fast, batch_plan: slow, unclassified_plan: slow}
)");
    const ParseResult b =
        parse(R"(throttling: {unclassified_plan: slow, batch_plan: slow, interactive_plan: fast}
upstreams:
  - {interactive_reserve: 1, capacity: 5, name: u1}
  - {name: u2, capacity: 2}
rate_plans:
  - {dry_run: true, concurrency: 3, burst: 9, rate: 9/s, name: fast}
  - {name: slow, rate: 1/s, burst: 1}
clients:
  - {rate_plan: slow, id: a, context: system, traffic_class: batch}
routes:
  - {upstream: u2, name: r, prefix: /, methods: [GET], resources: ["*"], interactions: ["*"]}
version: v1
schema: ehrgate.policy/v1
)");
    ASSERT_TRUE(a.bundle && b.bundle) << dump(a.diagnostics) << dump(b.diagnostics);
    EXPECT_EQ(*a.bundle, *b.bundle);
    EXPECT_EQ(bundle_digest(*a.bundle), bundle_digest(*b.bundle));
    EXPECT_EQ(a.bundle->rate_plans[0].name, "fast");
    EXPECT_EQ(a.bundle->upstreams[0].name, "u1");
}

// A hand-built bundle with every throttling feature, deliberately out of canonical order.
Bundle throttled_bundle() {
    Bundle b = small_bundle();  // client "app": interactive
    b.clients.push_back({"job", "Job", LaunchContext::System, TrafficClass::Batch, {"HOPERAT"}});
    Client vip{"vip", "VIP", LaunchContext::System, TrafficClass::Batch, {}};
    vip.rate_plan = "clinical";  // a batch client held to the clinical plan
    b.clients.push_back(vip);
    Client kiosk{"kiosk", "Kiosk", LaunchContext::Patient, TrafficClass::Interactive, {}};
    kiosk.rate_plan = "unclassified";  // an override may lower a client, too
    b.clients.push_back(kiosk);
    b.rate_plans = {{"unclassified", "5/s", 5'000'000, 10, 2, false},
                    {"clinical", "2000/s", 2'000'000'000, 2000, 128, false},
                    {"batch", "100/m", 1'666'666, 100, 16, true}};
    b.upstreams = {{"ehr", 256, 64}, {"archive", 8, 0}};
    b.throttling = {"clinical", "batch", "unclassified"};
    b.routes[0].upstream = "ehr";
    return b;
}

TEST(PolicyThrottling, PlanFor) {
    Bundle b = throttled_bundle();
    b.canonicalize();
    const auto plan = [&](const Client *client) {
        const RatePlan *p = b.plan_for(client);
        return p != nullptr ? p->name : std::string("(none)");
    };
    EXPECT_EQ(plan(b.find_client("app")), "clinical");        // interactive
    EXPECT_EQ(plan(b.find_client("job")), "batch");           // batch
    EXPECT_EQ(plan(b.find_client("vip")), "clinical");        // override up
    EXPECT_EQ(plan(b.find_client("kiosk")), "unclassified");  // override down
    EXPECT_EQ(plan(nullptr), "unclassified");                 // unidentified
    EXPECT_EQ(b.plan_for(nullptr), &b.rate_plans[2]);

    ASSERT_NE(b.find_rate_plan("batch"), nullptr);
    EXPECT_EQ(b.find_rate_plan("batch")->rate_units_per_second, 1'666'666);
    EXPECT_EQ(b.find_rate_plan("Batch"), nullptr);
    EXPECT_EQ(b.find_rate_plan(""), nullptr);
    ASSERT_NE(b.find_upstream("ehr"), nullptr);
    EXPECT_EQ(b.find_upstream("ehr")->interactive_reserve, 64u);
    EXPECT_EQ(b.find_upstream("archive")->capacity, 8u);
    EXPECT_EQ(b.find_upstream("nope"), nullptr);

    // A name that resolves nowhere (only a hand-built bundle can have one) has no plan: callers
    // with throttling on refuse then, they do not wave the request through.
    Client ghost = *b.find_client("job");
    ghost.rate_plan = "ghost";
    EXPECT_EQ(b.plan_for(&ghost), nullptr);

    // Throttling off: no plan for anyone.
    Bundle off = b;
    off.rate_plans.clear();
    off.throttling = {};
    EXPECT_EQ(off.plan_for(nullptr), nullptr);
    EXPECT_EQ(off.plan_for(off.find_client("app")), nullptr);
    EXPECT_EQ(off.plan_for(off.find_client("vip")), nullptr);
    EXPECT_EQ(Bundle{}.plan_for(nullptr), nullptr);
}

TEST(PolicySnapshot, RoundTripWithThrottling) {
    Snapshot snapshot{12, "", throttled_bundle()};
    snapshot.digest_hex = bundle_digest(snapshot.bundle);
    const std::string encoded = encode_snapshot(snapshot);
    const std::optional<Snapshot> decoded = decode_snapshot(encoded);
    ASSERT_TRUE(decoded);
    Snapshot canonical = snapshot;
    canonical.bundle.canonicalize();
    EXPECT_EQ(*decoded, canonical);
    EXPECT_EQ(encode_snapshot(*decoded), encoded);

    const Bundle &b = decoded->bundle;
    ASSERT_EQ(b.rate_plans.size(), 3u);
    EXPECT_EQ(b.rate_plans[0], (RatePlan{"batch", "100/m", 1'666'666, 100, 16, true}));
    EXPECT_EQ(b.rate_plans[1].name, "clinical");
    EXPECT_EQ(b.rate_plans[2].name, "unclassified");
    ASSERT_EQ(b.upstreams.size(), 2u);
    EXPECT_EQ(b.upstreams[0], (Upstream{"archive", 8, 0}));
    EXPECT_EQ(b.upstreams[1], (Upstream{"ehr", 256, 64}));
    EXPECT_EQ(b.throttling, (Throttling{"clinical", "batch", "unclassified"}));
    EXPECT_EQ(b.find_client("vip")->rate_plan, "clinical");
    EXPECT_EQ(b.routes[0].upstream, "ehr");
    EXPECT_EQ(b.plan_for(b.find_client("vip"))->name, "clinical");

    // The sandbox bundle, which has throttling too.
    const Snapshot sandbox = sandbox_snapshot();
    ASSERT_FALSE(sandbox.bundle.rate_plans.empty());
    EXPECT_EQ(decode_snapshot(encode_snapshot(sandbox)), sandbox);

    // Every throttling field is content: it changes the digest.
    const std::string digest = bundle_digest(snapshot.bundle);
    const auto changed = [&](auto &&edit) {
        Bundle copy = snapshot.bundle;
        edit(copy);
        return bundle_digest(copy) != digest;
    };
    EXPECT_TRUE(changed([](Bundle &c) { c.rate_plans[0].name = "anonymous"; }));
    EXPECT_TRUE(changed([](Bundle &c) {
        c.rate_plans[0].rate = "6/s";
        c.rate_plans[0].rate_units_per_second = 6'000'000;
    }));
    EXPECT_TRUE(changed([](Bundle &c) { c.rate_plans[0].burst = 11; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.rate_plans[0].concurrency = 0; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.rate_plans[0].dry_run = true; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.rate_plans.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.upstreams[0].capacity = 257; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.upstreams[0].interactive_reserve = 0; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.upstreams.pop_back(); }));
    EXPECT_TRUE(changed([](Bundle &c) { c.throttling.interactive_plan = "batch"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.throttling.batch_plan = "clinical"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.throttling.unclassified_plan = "batch"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.clients[1].rate_plan = "batch"; }));
    EXPECT_TRUE(changed([](Bundle &c) { c.routes[0].upstream.clear(); }));
    // Order is not content.
    EXPECT_FALSE(changed([](Bundle &c) { std::swap(c.rate_plans[0], c.rate_plans[2]); }));
    EXPECT_FALSE(changed([](Bundle &c) { std::swap(c.upstreams[0], c.upstreams[1]); }));
}

TEST(PolicySnapshot, BundlesWithoutThrottlingKeepTheirEncoding) {
    // The throttling keys are written only when set, so the digest of a bundle that does not use
    // throttling is what it was before throttling existed (see the golden digest above): policyd
    // ties every version label to one digest for good, and an upgrade must not break that.
    const std::string encoded = encode_snapshot({1, "", small_bundle()});
    for (const char *key : {"rate_plans", "upstreams", "throttling", "upstream", "rate_plan"}) {
        EXPECT_EQ(encoded.find(key), std::string::npos) << key;
    }
    const std::optional<Snapshot> decoded = decode_snapshot(encoded);
    ASSERT_TRUE(decoded);
    EXPECT_TRUE(decoded->bundle.rate_plans.empty());
    EXPECT_EQ(decoded->bundle.throttling, Throttling{});
}

TEST(PolicySnapshot, DecoderRefusesBrokenThrottling) {
    const auto decodes = [](const Bundle &bundle) {
        return decode_snapshot(encode_snapshot({1, "", bundle})).has_value();
    };
    ASSERT_TRUE(decodes(throttled_bundle()));
    const auto edited = [](auto &&edit) {
        Bundle b = throttled_bundle();
        b.canonicalize();  // rate_plans: batch, clinical, unclassified; upstreams: archive, ehr
        edit(b);
        return b;
    };
    // The rate a worker enforces must be the rate the operator wrote.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].rate_units_per_second += 1; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].rate = "101/m"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].rate = "100r/m"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) {
        b.rate_plans[0].rate = "";
        b.rate_plans[0].rate_units_per_second = 0;
    })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) {
        b.rate_plans[0].rate = "101/m";
        b.rate_plans[0].rate_units_per_second = 1'683'333;
    })));
    // Ranges, as the parser enforces them.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].burst = 0; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].burst = -5; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].burst = kMaxBurst + 1; })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) { b.rate_plans[0].burst = kMaxBurst; })));
    EXPECT_FALSE(
        decodes(edited([](Bundle &b) { b.rate_plans[0].concurrency = kMaxConcurrency + 1; })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) { b.rate_plans[0].concurrency = kMaxConcurrency; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.upstreams[0].capacity = 0; })));
    EXPECT_FALSE(
        decodes(edited([](Bundle &b) { b.upstreams[0].capacity = kMaxUpstreamCapacity + 1; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.upstreams[1].interactive_reserve = 256; })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) { b.upstreams[1].interactive_reserve = 255; })));
    // Names: present, unique, and every reference resolves.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[0].name.clear(); })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.upstreams[0].name.clear(); })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.rate_plans[1].name = "batch"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.upstreams[0].name = "ehr"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.throttling.interactive_plan = "ghost"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.throttling.batch_plan.clear(); })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.throttling.unclassified_plan.clear(); })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.clients[0].rate_plan = "ghost"; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.routes[0].upstream = "ghost"; })));
    // Throttling exactly when there are plans.
    EXPECT_FALSE(decodes(edited([](Bundle &b) { b.throttling = {}; })));
    EXPECT_FALSE(decodes(edited([](Bundle &b) {
        b.rate_plans.clear();
        for (Client &c : b.clients) {
            c.rate_plan.clear();
        }
    })));
    EXPECT_TRUE(decodes(edited([](Bundle &b) {
        b.rate_plans.clear();
        b.throttling = {};
        for (Client &c : b.clients) {
            c.rate_plan.clear();
        }
    })));

    // dry_run is a msgpack boolean, not a number.
    std::string encoded = encode_snapshot({1, "", throttled_bundle()});
    const size_t at = encoded.find("dry_run");
    ASSERT_NE(at, std::string::npos);
    ASSERT_EQ(static_cast<uint8_t>(encoded[at + 7]), 0xc3);  // true
    EXPECT_TRUE(decode_snapshot(encoded));
    encoded[at + 7] = '\x01';
    EXPECT_FALSE(decode_snapshot(encoded));

    // A snapshot from before throttling: it is off, and nothing else changes.
    const std::optional<Snapshot> old = decode_snapshot(body());
    ASSERT_TRUE(old);
    EXPECT_TRUE(old->bundle.rate_plans.empty());
    EXPECT_TRUE(old->bundle.upstreams.empty());
    EXPECT_EQ(old->bundle.throttling, Throttling{});
    EXPECT_EQ(old->bundle.clients[0].rate_plan, "");
    EXPECT_EQ(old->bundle.routes[0].upstream, "");
    EXPECT_EQ(old->bundle.plan_for(nullptr), nullptr);
}

}  // namespace
}  // namespace ehrgate::policy
