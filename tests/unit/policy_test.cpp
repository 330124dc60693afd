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

// Parses `yaml` and expects exactly one diagnostic, at the given place, whose message contains
// `message`.
void expect_one(std::string_view yaml, int line, int column, std::string_view field,
                std::string_view message) {
    const ParseResult result = parse(yaml);
    SCOPED_TRACE(std::string(yaml));
    EXPECT_FALSE(result.bundle.has_value());
    ASSERT_EQ(result.diagnostics.size(), 1u) << dump(result.diagnostics);
    const Diagnostic &d = result.diagnostics[0];
    EXPECT_EQ(d.file, "test.yaml");
    EXPECT_EQ(d.line, line) << d.to_string();
    EXPECT_EQ(d.column, column) << d.to_string();
    EXPECT_EQ(d.field, field) << d.to_string();
    EXPECT_NE(d.message.find(message), std::string::npos) << d.to_string();
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
    EXPECT_EQ(b.version, "sandbox-2026.11.25-1");
    EXPECT_FALSE(b.description.empty());

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
    }

    ASSERT_EQ(b.routes.size(), 1u);
    const Route &r = b.routes[0];
    EXPECT_EQ(r.name, "fhir");
    EXPECT_EQ(r.prefix, "/fhir/");
    EXPECT_EQ(r.methods,
              (std::vector<std::string>{"DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"}));
    EXPECT_EQ(r.resources,
              (std::vector<std::string>{"Condition", "Consent", "Encounter", "MedicationRequest",
                                        "Observation", "Patient", "ServiceRequest"}));
    EXPECT_EQ(r.interactions,
              (std::vector<std::string>{"capabilities", "create", "delete", "history-instance",
                                        "patch", "read", "search-type", "update", "vread"}));
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
               "unknown field \"extra\"; expected one of schema, version, description, clients, "
               "routes");
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
    EXPECT_EQ(digest, "83ff7a6602750a483fcffb1f080725fe29d370201abc93f2c0ec5962342b5d97");

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
        EXPECT_EQ(reply.policy_version, "sandbox-2026.11.25-1");
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

}  // namespace
}  // namespace ehrgate::policy
