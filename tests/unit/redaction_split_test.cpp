// The redaction engine reads a value in place when the chunk holds all of it and gathers it
// across chunks otherwise; these tests hold the two ways to the same verdict, byte for byte, on
// compact and pretty-printed documents, on faults (seeded mutations), at the size, token and
// depth limits, and across engines reused on one thread.
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ehrgate/redaction.hpp"

namespace ehrgate::redaction {
namespace {

constexpr std::string_view kSsn = "http://hl7.org/fhir/sid/us-ssn";

Config sandbox_config() {
    Config config;
    for (int n = 10; n <= 19; ++n) {
        config.inference.push_back(
            {"http://hl7.org/fhir/sid/icd-10-cm", "F" + std::to_string(n), true, "SUD"});
    }
    config.inference.push_back({"http://loinc.org", "75622-1", false, "HIV"});
    config.masks.push_back({"Patient", "identifier", std::string(kSsn)});
    return config;
}

Request treating() {
    Request request;
    request.withheld = split_labels("PSY,ETH,SUD,HIV,SEX");
    return request;
}

struct Outcome {
    Status status = Status::Ok;
    std::string reason;
    std::string out;
    uint64_t removed = 0;
    uint64_t masked = 0;
    std::string last_updated;
    bool single_resource = false;
    bool complete = false;
    size_t peak = 0;

    bool operator==(const Outcome &other) const {
        return status == other.status && reason == other.reason && out == other.out &&
               removed == other.removed && masked == other.masked &&
               last_updated == other.last_updated && single_resource == other.single_resource &&
               complete == other.complete;
    }
};

std::ostream &operator<<(std::ostream &os, const Outcome &o) {
    return os << "status " << static_cast<int>(o.status) << " reason '" << o.reason << "' removed "
              << o.removed << " masked " << o.masked << " last updated '" << o.last_updated
              << "' single " << o.single_resource << " complete " << o.complete << " out "
              << o.out.size() << " bytes";
}

// Feeds `body` in pieces of the given sizes (cycled; empty: whole), then finishes.
Outcome run(const Config &config, std::string_view body, const std::vector<size_t> &pieces = {},
            const Request &request = treating()) {
    Redactor redactor(config, request);
    Outcome outcome;
    size_t pos = 0, k = 0;
    Status status = Status::Ok;
    while (pos < body.size() && status == Status::Ok) {
        const size_t n =
            std::min(pieces.empty() ? body.size() : pieces[k++ % pieces.size()], body.size() - pos);
        status = redactor.feed(body.substr(pos, n), outcome.out);
        pos += n;
    }
    if (status == Status::Ok) {
        status = redactor.finish(outcome.out);
    }
    outcome.status = status;
    outcome.reason = std::string(redactor.reason());
    outcome.removed = redactor.counters().resources_removed;
    outcome.masked = redactor.counters().resources_masked;
    outcome.last_updated = std::string(redactor.last_updated());
    outcome.single_resource = redactor.single_resource();
    outcome.complete = redactor.complete();
    outcome.peak = redactor.peak_memory();
    return outcome;
}

// Whole, every two-piece split, pieces of 1 to 17 bytes and random splittings: all alike.
void expect_same_for_every_split(const Config &config, std::string_view body,
                                 const std::string &what, bool every_cut = true) {
    const Outcome whole = run(config, body);
    if (every_cut) {
        for (size_t cut = 1; cut < body.size(); ++cut) {
            ASSERT_EQ(run(config, body, {cut, body.size()}), whole) << what << ", cut at " << cut;
        }
    }
    for (size_t piece = 1; piece <= 17; ++piece) {
        ASSERT_EQ(run(config, body, {piece}), whole) << what << ", pieces of " << piece;
    }
    std::mt19937 rng(7);
    for (int round = 0; round < 20; ++round) {
        std::vector<size_t> pieces;
        for (int i = 0; i < 40; ++i) {
            pieces.push_back(1 + rng() % 300);
        }
        ASSERT_EQ(run(config, body, pieces), whole) << what << ", random round " << round;
    }
}

// The sandbox EHR's first fixture Patient, as it serves it (compact).
const std::string kPatient =
    R"({"resourceType":"Patient","id":"erXuFYUfucBZaryVksYEcMg3","meta":{"versionId":"1",)"
    R"("lastUpdated":"2025-11-03T14:02:00Z","security":[{"system":"http://terminology.hl7.org/)"
    R"(CodeSystem/v3-Confidentiality","code":"N","display":"normal"}]},"identifier":[{"use":)"
    R"("usual","system":"urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14","value":"7004211"},)"
    R"({"use":"official","system":"http://hl7.org/fhir/sid/us-ssn","value":"900-55-0142"}],)"
    R"("active":true,"deceasedBoolean":false,"multipleBirthInteger":2,"photo":null,)"
    R"("name":[{"text":"Th\u00e9odora \"Teddy\" Quill","family":"Quill","given":["Th√©odora"]}],)"
    R"("gender":"female","birthDate":"1987-09-12"})";

std::string entry(const std::string &resource) {
    return R"({"fullUrl":"urn:x","resource":)" + resource + R"(,"search":{"mode":"match"}})";
}

std::string condition(const std::string &id, const std::string &icd) {
    return R"({"resourceType":"Condition","id":")" + id +
           R"(","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":")" + icd +
           R"("}]},"subject":{"reference":"Patient/p1"}})";
}

std::string labelled(const std::string &id, const std::string &label) {
    return R"({"resourceType":"Observation","id":")" + id + R"(","meta":{"security":[{"code":")" +
           label + R"("}]},"valueQuantity":{"value":-1.5e3,"unit":"mg"},"flag":[true,null]})";
}

// A search Bundle with members before and after its entries, dropped, masked and kept entries.
std::string compact_bundle() {
    return R"({"resourceType":"Bundle","id":"b","type":"searchset","total":5,"link":[{"relation":)"
           R"("self","url":"http://x/fhir/Condition"}],"entry":[)" +
           entry(condition("c1", "E11.9")) + "," + entry(labelled("o1", "PSY")) + "," +
           entry(kPatient) + "," + entry(condition("c2", "F11.20")) + "," +
           entry(labelled("o2", "R")) + R"(],"meta":{"lastUpdated":"2024-01-01T00:00:00Z"},)" +
           R"("signature":{"data":"AA=="},"timestamp":"2024-01-01T00:00:00Z"})";
}

// The same with blanks wherever JSON allows them.
std::string pretty(const std::string &compact) {
    std::string out;
    bool in_string = false, escape = false;
    for (const char c : compact) {
        out.push_back(c);
        if (in_string) {
            if (escape) {
                escape = false;
            } else if (c == '\\') {
                escape = true;
            } else if (c == '"') {
                in_string = false;
            }
            continue;
        }
        if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[' || c == ',' || c == ':') {
            out += "\n  ";
        }
    }
    return "\r\n " + out + " \t\n";
}

TEST(RedactionSplits, CompactAndPrettyDocumentsGiveTheSameOutputForEverySplit) {
    const Config config = sandbox_config();
    const std::vector<std::pair<std::string, std::string>> documents = {
        {"patient", kPatient},
        {"bundle", compact_bundle()},
        {"bundle without entries", R"({"resourceType":"Bundle","type":"searchset","total":0})"},
        {"emptied bundle", R"({"resourceType":"Bundle","total":1,"entry":[)" +
                               entry(condition("c9", "F12.1")) + "],\"total\":1}"},
        {"late type", R"({"id":"x","entry":[)" + entry(condition("c1", "E11")) +
                          R"(],"resourceType":"Bundle"})"},
        {"escaped key", R"({"resource\u0054ype":"Observation","id":"e","n":12345,"z":0})"},
        {"two metas", R"({"resourceType":"Basic","meta":{"lastUpdated":"1"},"meta":{"lastUpdated":)"
                      R"("2"}})"},
        {"late bundle type", R"({"entry":[],"resourceType":"Bundle","id":"x"})"},
        {"blank after a comma", R"({"resourceType":"Basic", "id":"x"})"},
        {"blank after a colon", R"({"resourceType": "Basic","id":"x"})"},
        {"blank before the end", R"({"resourceType":"Basic","id":"x" } )"},
        {"bundle type second", R"({"id":"b","resourceType":"Bundle","entry":[)" +
                                   entry(condition("c1", "F10.1")) + "," +
                                   entry(condition("c2", "E10.1")) + "]}"},
    };
    for (const auto &[name, body] : documents) {
        const Outcome whole = run(config, body);
        ASSERT_EQ(whole.status, Status::Ok) << name << ": " << whole.reason;
        expect_same_for_every_split(config, body, name);
        const std::string spaced = pretty(body);
        ASSERT_EQ(run(config, spaced).status, whole.status) << name;
        expect_same_for_every_split(config, spaced, name + " (pretty)");
    }
    EXPECT_EQ(run(config, documents[6].second).last_updated, "2");  // the last one seen
    // The masked Patient: identifier of the SSN system gone, REDACTED added, the rest as it was.
    const Outcome patient = run(config, kPatient);
    EXPECT_EQ(patient.out.find("900-55-0142"), std::string::npos);
    EXPECT_NE(patient.out.find("\"code\":\"REDACTED\""), std::string::npos);
    EXPECT_NE(patient.out.find(R"("name":[{"text":"Th\u00e9odora \"Teddy\" Quill")"),
              std::string::npos);
    EXPECT_EQ(patient.masked, 1u);
    // The Bundle: its members after the entries follow them, total goes, dropped entries go.
    const Outcome bundle = run(config, compact_bundle());
    EXPECT_EQ(bundle.removed, 2u);
    EXPECT_EQ(bundle.out.find("\"total\""), std::string::npos);
    EXPECT_NE(bundle.out.find(R"(],"meta":{"lastUpdated":"2024-01-01T00:00:00Z"},"signature")"),
              std::string::npos);
}

// Seeded mutations of valid documents: whatever the fault (or none), every split gives the same
// status, reason, counters and output, and no byte of a broken entry is released.
TEST(RedactionSplits, MutatedDocumentsGiveTheSameVerdictForEverySplit) {
    const Config config = sandbox_config();
    const std::string alphabet = "{}[]\",:\\ 0-1.e5tfnu\x01\x7f\x80\xc3\xa9\xed\xff";
    std::mt19937 rng(2024);
    int faulty = 0, fine = 0;
    for (const std::string &base : {compact_bundle(), pretty(compact_bundle()), kPatient}) {
        for (int round = 0; round < 150; ++round) {
            std::string body = base;
            const int edits = 1 + static_cast<int>(rng() % 3);
            for (int e = 0; e < edits; ++e) {
                const size_t at = rng() % body.size();
                const char c = alphabet[rng() % alphabet.size()];
                switch (rng() % 3) {
                    case 0:
                        body[at] = c;
                        break;
                    case 1:
                        body.insert(body.begin() + static_cast<std::ptrdiff_t>(at), c);
                        break;
                    default:
                        body.erase(at, 1 + rng() % 4);
                        break;
                }
            }
            const Outcome whole = run(config, body);
            (whole.status == Status::Ok ? fine : faulty)++;
            ASSERT_EQ(run(config, body, {1}), whole) << "round " << round << ": " << body;
            ASSERT_EQ(run(config, body, {5, 1, 13}), whole) << "round " << round << ": " << body;
            for (int split = 0; split < 6; ++split) {
                const size_t cut = 1 + rng() % (body.size() - 1);
                ASSERT_EQ(run(config, body, {cut, body.size()}), whole)
                    << "round " << round << ", cut at " << cut << ": " << body;
            }
        }
    }
    // Both kinds were exercised.
    EXPECT_GT(faulty, 100);
    EXPECT_GT(fine, 10);
}

std::string numbers(size_t count) {
    std::string out = "[";
    for (size_t i = 0; i < count; ++i) {
        out += i ? ",7" : "7";
    }
    return out + "]";
}

// Text and tape share the cap: the verdict at the edge is the same however the bytes arrive.
TEST(RedactionSplits, TheCapIsDecidedAlikeForEverySplit) {
    Config config = sandbox_config();
    config.max_held_bytes = kMinHeldBytes;
    struct Shape {
        std::string name;
        std::string (*make)(size_t);
    };
    const std::vector<Shape> shapes = {
        {"single resource, tokens",
         [](size_t n) { return R"({"resourceType":"Observation","v":)" + numbers(n) + "}"; }},
        // Too large and also cut short, or also broken: the verdict must not depend on which
        // is seen first.
        {"single resource, tokens, truncated",
         [](size_t n) {
             const std::string body = R"({"resourceType":"Observation","v":)" + numbers(n);
             return body.substr(0, body.size() - 1);
         }},
        {"single resource, tokens, broken",
         [](size_t n) { return R"({"resourceType":"Observation","v":)" + numbers(n) + ",]}"; }},
        {"bundle entry, truncated",
         [](size_t n) {
             return R"({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Basic","v":)" +
                    numbers(n);
         }},
        {"single resource, bytes",
         [](size_t n) {
             return R"({"resourceType":"Observation","v":")" + std::string(n * 22, 'a') + "\"}";
         }},
        {"bundle entry",
         [](size_t n) {
             return R"({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Basic"}},)"
                    R"({"resource":{"resourceType":"Basic","v":)" +
                    numbers(n) + "}}]}";
         }},
        {"member after the entries",
         [](size_t n) {
             return R"({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Basic"}}],)"
                    R"("v":)" +
                    numbers(n) + "}";
         }},
    };
    for (const Shape &shape : shapes) {
        std::set<std::string> reasons;  // "" for Ok
        for (size_t n = 700; n <= 800; n += 3) {
            const std::string body = shape.make(n);
            const Outcome whole = run(config, body);
            reasons.insert(whole.reason);
            EXPECT_LT(whole.peak, size_t{1} << 20);
            for (const size_t piece : {size_t{1}, size_t{7}, size_t{4096}, body.size() / 2}) {
                ASSERT_EQ(run(config, body, {piece}), whole)
                    << shape.name << ", n " << n << ", pieces of " << piece;
            }
        }
        // The range crosses the cap: below it the verdict is Ok (or the fault), above it
        // too-large; a cut-short value's tokens are not counted, as it never completes.
        const std::set<std::string> expected =
            shape.name.find(", truncated") != std::string::npos
                ? std::set<std::string>{"truncated-json"}
            : shape.name.find(", broken") != std::string::npos
                ? std::set<std::string>{"malformed-json", "too-large"}
                : std::set<std::string>{"", "too-large"};
        EXPECT_EQ(reasons, expected) << shape.name;
    }
}

// Under the default cap, whatever the shape near or over it, and whether it comes in small
// chunks or in one large one, the engine's buffers stay under 1 MiB.
TEST(RedactionSplits, MemoryStaysUnderOneMebibyteWhateverTheShape) {
    const Config config;  // default cap
    size_t worst = 0;
    for (size_t n = 4000; n <= 400000; n = n * 3 / 2) {
        std::string strings = "[";
        for (size_t i = 0; i < n / 4; ++i) {
            strings += i ? ",\"abcdefghij\"" : "\"abcdefghij\"";
        }
        strings += "]";
        for (const std::string &value : {numbers(n), strings}) {
            const std::string resource = R"({"resourceType":"Basic","v":)" + value + "}";
            for (const std::string &body :
                 {resource, R"({"resourceType":"Bundle","entry":[{"resource":)" + resource + "}]}",
                  R"({"resourceType":"Bundle","entry":[],"v":)" + value + "}"}) {
                for (const size_t piece : {size_t{4096}, size_t{16384}, body.size()}) {
                    Redactor redactor(config, treating());
                    std::string out;
                    for (size_t pos = 0; pos < body.size() && redactor.status() == Status::Ok;
                         pos += piece) {
                        out.clear();
                        redactor.feed(std::string_view(body).substr(pos, piece), out);
                    }
                    worst = std::max(worst, redactor.peak_memory());
                    ASSERT_LT(redactor.peak_memory(), size_t{1} << 20)
                        << body.size() << " bytes in pieces of " << piece;
                }
            }
        }
    }
    EXPECT_GT(worst, config.max_held_bytes);  // the shapes did reach the cap
}

TEST(RedactionSplits, DepthAndKeyLimitsAreDecidedAlikeForEverySplit) {
    const Config config = sandbox_config();
    for (size_t depth = 124; depth <= 130; ++depth) {
        const std::string nested = std::string(depth, '[') + std::string(depth, ']');
        for (const std::string &body :
             {R"({"resourceType":"Basic","v":)" + nested + "}",
              R"({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Basic","v":)" +
                  nested + "}}]}"}) {
            expect_same_for_every_split(config, body, "depth " + std::to_string(depth), false);
        }
    }
    EXPECT_EQ(run(config, R"({"resourceType":"Basic","v":)" + std::string(127, '[') +
                              std::string(127, ']') + "}")
                  .status,
              Status::Ok);
    EXPECT_EQ(run(config, R"({"resourceType":"Basic","v":)" + std::string(128, '[') +
                              std::string(128, ']') + "}")
                  .reason,
              "too-deep");
    for (const size_t length : {size_t{255}, size_t{256}, size_t{257}}) {
        const std::string body =
            R"({"resourceType":"Basic",")" + std::string(length, 'k') + R"(":1})";
        expect_same_for_every_split(config, body, "key of " + std::to_string(length));
        EXPECT_EQ(run(config, body).status, length <= 256 ? Status::Ok : Status::Error);
    }
}

// Engines are reused on a thread: engines alive at once keep apart, and one that failed, or
// that held a large resource, leaves nothing behind for the next.
TEST(RedactionSplits, EnginesAliveAtOnceAndReusedEnginesKeepApart) {
    const Config config = sandbox_config();
    const std::vector<std::string> bodies = {kPatient, compact_bundle(), pretty(compact_bundle()),
                                             labelled("o", "PSY")};
    std::vector<Outcome> alone;
    for (const std::string &body : bodies) {
        alone.push_back(run(config, body));
    }
    // Interleaved, 11 bytes at a time.
    std::vector<std::unique_ptr<Redactor>> engines;
    const Request request = treating();
    for (size_t i = 0; i < bodies.size(); ++i) {
        engines.push_back(std::make_unique<Redactor>(config, request));
    }
    std::vector<Outcome> together(bodies.size());
    for (size_t pos = 0;; pos += 11) {
        bool any = false;
        for (size_t i = 0; i < bodies.size(); ++i) {
            if (pos < bodies[i].size() && engines[i]->status() == Status::Ok) {
                engines[i]->feed(std::string_view(bodies[i]).substr(pos, 11), together[i].out);
                any = true;
            }
        }
        if (!any) {
            break;
        }
    }
    for (size_t i = 0; i < bodies.size(); ++i) {
        together[i].status = engines[i]->status() == Status::Ok
                                 ? engines[i]->finish(together[i].out)
                                 : engines[i]->status();
        together[i].reason = std::string(engines[i]->reason());
        together[i].removed = engines[i]->counters().resources_removed;
        together[i].masked = engines[i]->counters().resources_masked;
        together[i].last_updated = std::string(engines[i]->last_updated());
        together[i].single_resource = engines[i]->single_resource();
        together[i].complete = engines[i]->complete();
        EXPECT_EQ(together[i], alone[i]) << i;
    }
    engines.clear();
    // After a failure mid-value and after a resource near the cap, a small response is judged
    // afresh and its engine's buffers are small again.
    EXPECT_EQ(run(config, kPatient.substr(0, 300)).status, Status::Error);
    EXPECT_EQ(run(config, R"({"resourceType":"Basic","v":)" + numbers(12000) + "}").status,
              Status::Ok);
    const Outcome again = run(config, kPatient);
    EXPECT_EQ(again, alone[0]);
    EXPECT_LT(again.peak, size_t{64} * 1024);
    const Outcome streamed = run(config, compact_bundle(), {64});
    EXPECT_EQ(streamed, alone[1]);
}

// Each thread keeps its own engines; a Redactor that outlives its thread's kept engines (a
// thread_local destroyed after them) still ends cleanly.
TEST(RedactionSplits, EnginesOnOtherThreadsAndAtThreadExit) {
    const Config config = sandbox_config();
    const std::vector<std::string> bodies = {kPatient, compact_bundle(), pretty(compact_bundle())};
    std::vector<Outcome> expected;
    for (const std::string &body : bodies) {
        expected.push_back(run(config, body, {333}));
    }
    std::vector<std::thread> threads;
    std::vector<int> mismatches(4, 0);
    for (size_t t = 0; t < mismatches.size(); ++t) {
        threads.emplace_back([&, t] {
            thread_local std::unique_ptr<Redactor> outliving;
            outliving.reset();  // constructed before this thread's kept engines, destroyed after
            for (int round = 0; round < 50; ++round) {
                for (size_t i = 0; i < bodies.size(); ++i) {
                    mismatches[t] += run(config, bodies[i], {333}) == expected[i] ? 0 : 1;
                }
            }
            outliving = std::make_unique<Redactor>(config, treating());
            std::string out;
            outliving->feed(kPatient, out);
        });
    }
    for (std::thread &thread : threads) {
        thread.join();
    }
    EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

}  // namespace
}  // namespace ehrgate::redaction
