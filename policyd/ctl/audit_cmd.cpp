// `ehrgatectl audit ...`: verify, search, export and purge the audit log. These read (or, for
// purge, write) the LMDB environment directly rather than asking policyd: an auditor must be
// able to verify a log whose daemon is down, and LMDB readers never block policyd's writer.
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "audit_log.hpp"
#include "ehrgate/audit.hpp"

namespace ehrgate::ctl {

namespace {

using policyd::AuditStore;
using policyd::StoreError;
using policyd::StoreStatus;

constexpr const char *kDefaultDataDir = "run/policyd-data";

[[noreturn]] void die(int code, const std::string &message) {
    std::fprintf(stderr, "ehrgatectl: %s\n", message.c_str());
    std::exit(code);
}

// Accepts unix seconds, or an ISO-8601 UTC time (2026-11-29T20:00:00Z, seconds optional).
std::optional<int64_t> parse_time_us(const std::string &text) {
    char *end = nullptr;
    errno = 0;
    const long long secs = std::strtoll(text.c_str(), &end, 10);
    if (errno == 0 && end != text.c_str() && *end == '\0') {
        return static_cast<int64_t>(secs) * 1000000;
    }
    std::tm tm{};
    const char *rest = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
    if (rest == nullptr) {
        rest = strptime(text.c_str(), "%Y-%m-%dT%H:%M", &tm);
    }
    if (rest == nullptr) {
        rest = strptime(text.c_str(), "%Y-%m-%d", &tm);
    }
    if (rest == nullptr || (*rest != '\0' && std::string(rest) != "Z")) {
        return std::nullopt;
    }
    return static_cast<int64_t>(timegm(&tm)) * 1000000;
}

struct CommonArgs {
    std::string data_dir;
    std::string public_key;  // hex, or a file holding it
    AuditStore::Query query;
    std::string format = "ndjson";
    long older_than_days = -1;
};

CommonArgs parse(const std::vector<std::string> &args, size_t from, bool filters, bool format,
                 bool purge) {
    CommonArgs out;
    if (const char *env = std::getenv("EHRGATE_DATA_DIR"); env != nullptr && *env != '\0') {
        out.data_dir = env;
    } else {
        out.data_dir = kDefaultDataDir;
    }
    for (size_t i = from; i < args.size(); i += 2) {
        const std::string &flag = args[i];
        if (i + 1 >= args.size()) {
            die(2, flag + " needs a value");
        }
        const std::string &value = args[i + 1];
        if (flag == "--data-dir") {
            out.data_dir = value;
        } else if (flag == "--public-key" && !filters) {
            out.public_key = value;
        } else if (filters && flag == "--patient") {
            out.query.patient = value;
        } else if (filters && flag == "--client") {
            out.query.client = value;
        } else if (filters && flag == "--user") {
            out.query.user = value;
        } else if (filters && flag == "--correlation-id") {
            out.query.correlation_id = value;
        } else if (filters && (flag == "--since" || flag == "--until")) {
            const std::optional<int64_t> t = parse_time_us(value);
            if (!t) {
                die(2,
                    flag + " expects unix seconds or YYYY-MM-DDTHH:MM:SSZ, got \"" + value + "\"");
            }
            (flag == "--since" ? out.query.since_us : out.query.until_us) = *t;
        } else if (format && flag == "--format") {
            if (value != "ndjson" && value != "fhir") {
                die(2, "--format expects ndjson or fhir");
            }
            out.format = value;
        } else if (purge && flag == "--older-than-days") {
            char *end = nullptr;
            out.older_than_days = std::strtol(value.c_str(), &end, 10);
            if (*end != '\0' || out.older_than_days < 0) {
                die(2, "--older-than-days expects a non-negative number of days");
            }
        } else {
            die(2, "unknown option \"" + flag + "\" (see ehrgatectl --help)");
        }
    }
    return out;
}

std::unique_ptr<AuditStore> open_store(const std::string &data_dir, bool read_only) {
    StoreError error;
    std::unique_ptr<AuditStore> store =
        AuditStore::open({data_dir + "/audit", size_t{1} << 30, read_only}, &error);
    if (!store) {
        die(1, "cannot open the audit log in " + data_dir + "/audit: " +
                   policyd::store_status_name(error.status) + " (" + error.detail + ")");
    }
    return store;
}

std::string load_public_key(const CommonArgs &args) {
    if (!args.public_key.empty()) {
        if (std::optional<std::string> raw = audit::unhex(args.public_key);
            raw && raw->size() == audit::kPublicKeySize) {
            return *raw;
        }
        if (std::optional<std::string> raw = policyd::read_public_key_hex(args.public_key)) {
            return *raw;
        }
        die(2, "--public-key expects 64 hex digits or a file holding them");
    }
    const std::string path = args.data_dir + "/audit-signing.pub";
    std::optional<std::string> raw = policyd::read_public_key_hex(path);
    if (!raw) {
        die(1, "no checkpoint public key at " + path + " (pass --public-key)");
    }
    return *raw;
}

int verify(const CommonArgs &args) {
    const std::string public_raw = load_public_key(args);
    std::unique_ptr<AuditStore> store = open_store(args.data_dir, true);
    std::vector<audit::Checkpoint> checkpoints;
    StoreError error;
    if (store->checkpoints(checkpoints, &error) != StoreStatus::Ok) {
        die(1, "cannot read checkpoints: " + error.detail);
    }
    audit::ChainVerifier verifier(public_raw, std::move(checkpoints));
    if (store->scan_records(
            [&](uint64_t seq, std::string_view value) { return verifier.add(seq, value); },
            &error) != StoreStatus::Ok) {
        die(1, "cannot read records: " + error.detail);
    }
    const audit::VerifyResult result = verifier.finish();
    std::printf(
        "{\"ok\":%s,\"records\":%llu,\"first_seq\":%llu,\"last_seq\":%llu,\"checkpoints\":%llu,"
        "\"last_checkpoint_seq\":%llu,\"key_id\":\"%s\"",
        result.ok ? "true" : "false", static_cast<unsigned long long>(result.records),
        static_cast<unsigned long long>(result.first_seq),
        static_cast<unsigned long long>(result.last_seq),
        static_cast<unsigned long long>(result.checkpoints),
        static_cast<unsigned long long>(result.last_checkpoint_seq),
        audit::hex(audit::sha256(public_raw)).c_str());
    if (!result.ok) {
        std::printf(",\"first_bad_seq\":%llu",
                    static_cast<unsigned long long>(result.first_bad_seq));
    }
    std::printf("}\n");
    if (!result.ok) {
        std::fprintf(stderr, "ehrgatectl: audit log verification FAILED at record %llu: %s\n",
                     static_cast<unsigned long long>(result.first_bad_seq), result.problem.c_str());
        return 1;
    }
    if (result.last_seq > result.last_checkpoint_seq) {
        // Not a failure: a running policyd checkpoints the head within --audit-checkpoint-ms.
        std::fprintf(stderr,
                     "ehrgatectl: note: records %llu..%llu are chained but not yet covered by a "
                     "signed checkpoint\n",
                     static_cast<unsigned long long>(result.last_checkpoint_seq + 1),
                     static_cast<unsigned long long>(result.last_seq));
    }
    return 0;
}

int search(const CommonArgs &args, bool fhir) {
    std::unique_ptr<AuditStore> store = open_store(args.data_dir, true);
    StoreError error;
    const StoreStatus status = store->search(
        args.query,
        [&](const audit::ChainedRecord &entry) {
            const std::string line =
                fhir ? audit::to_fhir_audit_event(entry) : audit::to_json(entry);
            std::fwrite(line.data(), 1, line.size(), stdout);
            std::fputc('\n', stdout);
            return true;
        },
        &error);
    if (status != StoreStatus::Ok) {
        die(1, "search failed: " + error.detail);
    }
    return std::fflush(stdout) == 0 ? 0 : 1;
}

int purge(const CommonArgs &args) {
    if (args.older_than_days < 0) {
        die(2, "audit purge needs --older-than-days N");
    }
    std::unique_ptr<AuditStore> store = open_store(args.data_dir, false);
    // Microseconds, not seconds: "older than 0 days" must include what was written a moment ago.
    const int64_t now_us = std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
    const int64_t cutoff = now_us - int64_t{args.older_than_days} * 86400 * 1000000;
    uint64_t removed = 0;
    StoreError error;
    if (store->purge_before(cutoff, &removed, &error) != StoreStatus::Ok) {
        die(1, "purge failed: " + error.detail);
    }
    std::printf("{\"removed\":%llu}\n", static_cast<unsigned long long>(removed));
    return 0;
}

}  // namespace

int audit_command(const std::vector<std::string> &args) {
    // args[0] == "audit"
    if (args.size() < 2) {
        die(2, "usage: ehrgatectl audit verify|search|export|purge ... (see ehrgatectl --help)");
    }
    const std::string &sub = args[1];
    if (sub == "verify") {
        return verify(parse(args, 2, false, false, false));
    }
    if (sub == "search") {
        return search(parse(args, 2, true, false, false), false);
    }
    if (sub == "export") {
        const CommonArgs parsed = parse(args, 2, true, true, false);
        return search(parsed, parsed.format == "fhir");
    }
    if (sub == "purge") {
        return purge(parse(args, 2, false, false, true));
    }
    die(2, "unknown audit command \"" + sub + "\" (verify, search, export, purge)");
}

}  // namespace ehrgate::ctl
