// Redaction engine throughput per core on generated FHIR search Bundles (1 MB and 50 MB), fed in
// 16 KiB chunks as nginx would, with the engine's peak memory per response; beside a whole-body
// DOM parse of the same bytes by RapidJSON (Debian's rapidjson-dev), the reference library.
// The small case is the gateway's everyday one: a 1.3 KB Patient read (the sandbox EHR's first
// fixture patient, whose SSN identifier the mask removes) through a new Redactor per response,
// as the module does for every proxied response: its fixed cost per response in ns.
//
//   ehrgate-redaction-bench [--seconds S] [--json] [--only 1mb|50mb|small] [--chunk BYTES]
//                           [--no-reference]
//
// --chunk sets the Bundles' chunk size (16 KiB by default; nginx's default proxy buffers are 4
// KiB).
//
// --json prints the Bundle cases as bench.py reads them; the small case joins the JSON output only
// when asked for alone (--only small --json), so that the Bundle rows keep their shape.
#include <rapidjson/document.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ehrgate/redaction.hpp"

namespace {

// Seconds of CPU time of this thread: MB/s per core means bytes per second of the core's time,
// and on a machine shared with other work the wall clock would count their time too.
double cpu_seconds() {
    timespec now{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

std::string make_bundle(size_t target) {
    const std::string observation =
        R"({"fullUrl":"https://ehr.example/fhir/Observation/o%zu","resource":{"resourceType":)"
        R"("Observation","id":"o%zu","meta":{"versionId":"1","lastUpdated":"2024-05-01T10:00:00Z"},)"
        R"("status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/)"
        R"(observation-category","code":"laboratory","display":"Laboratory"}]}],"code":{"coding":)"
        R"([{"system":"http://loinc.org","code":"2339-0","display":"Glucose [Mass/volume] in Blood"}],)"
        R"("text":"Glucose"},"subject":{"reference":"Patient/p1","display":"Jane Doe"},)"
        R"("effectiveDateTime":"2024-05-01T09:30:00Z","valueQuantity":{"value":95.5,"unit":"mg/dL",)"
        R"("system":"http://unitsofmeasure.org","code":"mg/dL"},"referenceRange":[{"low":{"value":70},)"
        R"("high":{"value":99}}]},"search":{"mode":"match"}})";
    const std::string labelled =
        R"({"fullUrl":"https://ehr.example/fhir/Condition/c%zu","resource":{"resourceType":)"
        R"("Condition","id":"c%zu","meta":{"security":[{"system":"http://terminology.hl7.org/)"
        R"(CodeSystem/v3-ActCode","code":"PSY"}]},"code":{"coding":[{"system":)"
        R"("http://hl7.org/fhir/sid/icd-10-cm","code":"F32.1"}]},"subject":{"reference":)"
        R"("Patient/p1"}},"search":{"mode":"match"}})";
    const std::string inferred =
        R"({"fullUrl":"https://ehr.example/fhir/Condition/u%zu","resource":{"resourceType":)"
        R"("Condition","id":"u%zu","code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm",)"
        R"("code":"F11.20","display":"Opioid dependence, uncomplicated"}]},"subject":{"reference":)"
        R"("Patient/p1"}},"search":{"mode":"match"}})";
    std::string out =
        R"({"resourceType":"Bundle","id":"b","type":"searchset","total":1000,"link":[{"relation":)"
        R"("self","url":"https://ehr.example/fhir/Observation?patient=p1"}],"entry":[)";
    char buffer[2048];
    for (size_t n = 0; out.size() < target; ++n) {
        const std::string &pattern = n % 20 == 7 ? labelled : n % 20 == 13 ? inferred : observation;
        std::snprintf(buffer, sizeof buffer, pattern.c_str(), n, n);
        if (n > 0) {
            out.push_back(',');
        }
        out.append(buffer);
    }
    out.append("]}");
    return out;
}

// The sandbox EHR's first fixture Patient as it serves it (tests/sandbox_ehr/sandbox_ehr.py).
constexpr std::string_view kPatient =
    R"({"resourceType":"Patient","id":"erXuFYUfucBZaryVksYEcMg3","meta":{"versionId":"1",)"
    R"("lastUpdated":"2025-11-03T14:02:00Z","security":[{"system":"http://terminology.hl7.org/)"
    R"(CodeSystem/v3-Confidentiality","code":"N","display":"normal"}]},"identifier":[{"use":)"
    R"("usual","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203",)"
    R"("code":"MR","display":"Medical record number"}],"text":"MRN"},"system":)"
    R"("urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14","value":"7004211"},{"use":"official",)"
    R"("type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"SS",)"
    R"("display":"Social Security number"}],"text":"SSN"},"system":)"
    R"("http://hl7.org/fhir/sid/us-ssn","value":"900-55-0142"}],"active":true,"name":[{"use":)"
    R"("official","text":"Theodora Ann Quill","family":"Quill","given":["Theodora","Ann"]}],)"
    R"("telecom":[{"system":"phone","value":"608-555-0142","use":"home"},{"system":"email",)"
    R"("value":"theodora.quill@example.org"}],"gender":"female","birthDate":"1987-09-12",)"
    R"("address":[{"use":"home","line":["417 Alder Lane"],"city":"Madison","state":"WI",)"
    R"("postalCode":"53711","country":"US"}],"generalPractitioner":[{"reference":)"
    R"("Practitioner/eTTxu39AQqzQQ4ttQOnET7tQ","display":"Rosalind Achterberg, MD"}],)"
    R"("managingOrganization":{"reference":"Organization/ew27rgseUKv3GsUdHqXWQlhb","display":)"
    R"("Sandbox General Hospital"}})";

const std::vector<std::string> kWithheld = {"PSY", "ETH", "SUD", "HIV", "SEX"};

ehrgate::redaction::Config make_config() {
    ehrgate::redaction::Config config;
    for (int n = 10; n <= 19; ++n) {
        config.inference.push_back(
            {"http://hl7.org/fhir/sid/icd-10-cm", "F" + std::to_string(n), true, "SUD"});
    }
    config.inference.push_back({"http://loinc.org", "7917-8", false, "HIV"});
    config.masks.push_back({"Patient", "identifier", "http://hl7.org/fhir/sid/us-ssn"});
    return config;
}

struct Result {
    double mb_per_s = 0;
    size_t peak_bytes = 0;
    uint64_t removed = 0;
};

Result run_redaction(const std::string &body, const ehrgate::redaction::Config &config,
                     size_t chunk, double seconds) {
    Result result;
    size_t bytes = 0;
    const double start = cpu_seconds();
    double elapsed = 0;
    std::string out;
    do {
        ehrgate::redaction::Request request;
        request.withheld = kWithheld;
        ehrgate::redaction::Redactor redactor(config, std::move(request));
        for (size_t pos = 0; pos < body.size(); pos += chunk) {
            out.clear();
            if (redactor.feed(std::string_view(body).substr(pos, chunk), out) !=
                ehrgate::redaction::Status::Ok) {
                std::fprintf(stderr, "redaction failed: %s\n",
                             std::string(redactor.reason()).c_str());
                std::exit(1);
            }
        }
        if (redactor.finish(out) != ehrgate::redaction::Status::Ok) {
            std::fprintf(stderr, "redaction failed at the end\n");
            std::exit(1);
        }
        bytes += body.size();
        // The engine's buffers plus the caller's output buffer (about one chunk).
        result.peak_bytes = std::max(result.peak_bytes, redactor.peak_memory() + out.capacity());
        result.removed = redactor.counters().resources_removed;
        elapsed = cpu_seconds() - start;
    } while (elapsed < seconds);
    result.mb_per_s = static_cast<double>(bytes) / elapsed / 1e6;
    return result;
}

struct SmallResult {
    double ns_per_response = 0;
    double mb_per_s = 0;
    size_t peak_bytes = 0;
    size_t out_bytes = 0;
};

// As the module does per proxied response: a Request copied from the policy, a new Redactor and
// a new output string, the body in one buffer. Timed in batches so the clock stays out of it.
SmallResult run_small(std::string_view body, const ehrgate::redaction::Config &config,
                      double seconds) {
    SmallResult result;
    constexpr size_t kBatch = 1000;
    size_t responses = 0;
    const double start = cpu_seconds();
    double elapsed = 0;
    do {
        for (size_t i = 0; i < kBatch; ++i) {
            ehrgate::redaction::Request request;
            request.withheld = kWithheld;
            ehrgate::redaction::Redactor redactor(config, std::move(request));
            std::string out;
            if (redactor.feed(body, out) != ehrgate::redaction::Status::Ok ||
                redactor.finish(out) != ehrgate::redaction::Status::Ok) {
                std::fprintf(stderr, "redaction failed: %s\n",
                             std::string(redactor.reason()).c_str());
                std::exit(1);
            }
            result.out_bytes = out.size();
            result.peak_bytes =
                std::max(result.peak_bytes, redactor.peak_memory() + out.capacity());
        }
        responses += kBatch;
        elapsed = cpu_seconds() - start;
    } while (elapsed < seconds);
    result.ns_per_response = elapsed * 1e9 / static_cast<double>(responses);
    result.mb_per_s = static_cast<double>(body.size() * responses) / elapsed / 1e6;
    return result;
}

double run_rapidjson(std::string_view body, double seconds) {
    size_t bytes = 0;
    const double start = cpu_seconds();
    double elapsed = 0;
    // Small bodies are parsed in batches, like run_small.
    const size_t batch = body.size() < 65536 ? 1000 : 1;
    do {
        for (size_t i = 0; i < batch; ++i) {
            rapidjson::Document document;
            document.Parse(body.data(), body.size());
            if (document.HasParseError()) {
                std::fprintf(stderr, "rapidjson parse failed\n");
                std::exit(1);
            }
        }
        bytes += body.size() * batch;
        elapsed = cpu_seconds() - start;
    } while (elapsed < seconds);
    return static_cast<double>(bytes) / elapsed / 1e6;
}

}  // namespace

int main(int argc, char **argv) {
    double seconds = 2;
    size_t chunk = 16384;
    bool json = false;
    std::string only;
    bool reference_too = true;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = std::atof(argv[++i]);
        } else if (std::strcmp(argv[i], "--json") == 0) {
            json = true;
        } else if (std::strcmp(argv[i], "--no-reference") == 0) {
            reference_too = false;  // for profiling the engine alone
        } else if (std::strcmp(argv[i], "--chunk") == 0 && i + 1 < argc &&
                   std::atoi(argv[i + 1]) > 0) {
            chunk = static_cast<size_t>(std::atoi(argv[++i]));
        } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc &&
                   (std::strcmp(argv[i + 1], "1mb") == 0 || std::strcmp(argv[i + 1], "50mb") == 0 ||
                    std::strcmp(argv[i + 1], "small") == 0)) {
            only = argv[++i];
        } else {
            std::fprintf(stderr,
                         "usage: %s [--seconds S] [--json] [--only 1mb|50mb|small] [--chunk BYTES] "
                         "[--no-reference]\n",
                         argv[0]);
            return 2;
        }
    }
    const ehrgate::redaction::Config config = make_config();
    if (json) {
        std::printf("[");
    }
    bool first = true;
    for (const auto &[name, size] :
         {std::pair<std::string_view, size_t>{"1mb", size_t{1} << 20},
          std::pair<std::string_view, size_t>{"50mb", size_t{50} << 20}}) {
        if (!only.empty() && only != name) {
            continue;
        }
        const std::string body = make_bundle(size);
        const Result redaction = run_redaction(body, config, chunk, seconds);
        const double reference = reference_too ? run_rapidjson(body, seconds) : 0;
        if (json) {
            std::printf(
                "%s{\"bundle_bytes\":%zu,\"redaction_mb_per_s\":%.1f,\"peak_bytes\":%zu,"
                "\"entries_removed\":%llu,\"rapidjson_dom_mb_per_s\":%.1f}",
                first ? "" : ",", body.size(), redaction.mb_per_s, redaction.peak_bytes,
                static_cast<unsigned long long>(redaction.removed), reference);
        } else {
            std::printf(
                "%5.1f MB bundle: redaction %7.1f MB/s per core, peak %zu bytes per response, "
                "%llu entries removed; RapidJSON DOM parse %7.1f MB/s\n",
                static_cast<double>(body.size()) / 1e6, redaction.mb_per_s, redaction.peak_bytes,
                static_cast<unsigned long long>(redaction.removed), reference);
        }
        first = false;
    }
    if (only == "small" || (only.empty() && !json)) {
        const SmallResult small = run_small(kPatient, config, seconds);
        const double reference = reference_too ? run_rapidjson(kPatient, seconds) : 0;
        if (json) {
            std::printf(
                "{\"response_bytes\":%zu,\"ns_per_response\":%.0f,\"redaction_mb_per_s\":%.1f,"
                "\"peak_bytes\":%zu,\"rapidjson_dom_mb_per_s\":%.1f}",
                kPatient.size(), small.ns_per_response, small.mb_per_s, small.peak_bytes,
                reference);
        } else {
            std::printf(
                "%zu B Patient: redaction %7.0f ns per response (%.1f MB/s), peak %zu bytes per "
                "response, %zu B out; RapidJSON DOM parse %7.1f MB/s\n",
                kPatient.size(), small.ns_per_response, small.mb_per_s, small.peak_bytes,
                small.out_bytes, reference);
        }
    }
    if (json) {
        std::printf("]\n");
    }
    return 0;
}
