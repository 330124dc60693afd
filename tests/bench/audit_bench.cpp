// audit_bench: how many audit records policyd makes durable per second, the way nginx workers
// send them.
//
// durable: AuditAppend frames of one record each (an access record per request on a sync
//          location), --window of them outstanding, as many requests waiting at once would be.
// async:   AuditAppend frames of --batch records (the worker outbox's flush), a few outstanding.
// latency: one single-record append at a time: the wait audit-before-release adds to a request
//          when nothing else is queued.
// Every ack is after policyd's group commit synced; a failed ack aborts the run.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/audit.hpp"
#include "ehrgate/protocol.hpp"

namespace {

using namespace ehrgate;
using Clock = std::chrono::steady_clock;

constexpr const char *kUsage = R"(usage: audit_bench --socket PATH [options]

  --socket PATH        policyd's data socket
  --duration S         length of each throughput phase in seconds (default 3)
  --window N           single-record appends outstanding in the durable phase (default 256)
  --batch N            records per append in the async phase (default 512)
  --latency-count N    single appends, one at a time, for the latency phase (default 300)
  --only PHASE         run one phase: durable, async or latency (default: all three)
  --json               one JSON line instead of the summary
)";

[[noreturn]] void die(const std::string &message) {
    std::fprintf(stderr, "audit_bench: %s\n", message.c_str());
    std::exit(1);
}

class Connection {
  public:
    explicit Connection(const std::string &path) {
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
        if (fd_ < 0 || ::connect(fd_, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0) {
            die("cannot connect to " + path + ": " + std::strerror(errno));
        }
    }
    ~Connection() { ::close(fd_); }

    void send(const std::string &bytes) {
        for (size_t sent = 0; sent < bytes.size();) {
            const ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("send failed");
            sent += static_cast<size_t>(n);
        }
    }
    // Blocks for the next ack; returns how many records it acknowledged.
    size_t next_ack() {
        for (;;) {
            if (std::optional<protocol::FrameView> frame = decoder_.next()) {
                if (frame->header.type != protocol::MessageType::AuditAck) {
                    continue;  // pushes (policy snapshots) are not for us
                }
                const std::optional<protocol::AuditAck> ack =
                    protocol::decode_audit_ack(frame->body);
                if (!ack || !ack->ok) {
                    die("append refused: " + (ack ? ack->error : std::string("bad ack")));
                }
                return ack->record_ids.size();
            }
            char buffer[65536];
            const ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("policyd closed the connection");
            decoder_.feed(std::string_view(buffer, static_cast<size_t>(n)));
        }
    }

  private:
    int fd_ = -1;
    protocol::FrameDecoder decoder_;
};

uint64_t g_counter = 0;
std::string g_prefix;

audit::Record sample() {
    audit::Record r;
    r.kind = audit::Kind::Access;
    r.time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
    r.record_id = g_prefix + std::to_string(++g_counter);
    r.correlation_id = "bench-" + std::to_string(g_counter);
    r.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    r.client_id = "demo-clinician-app";
    r.user = "Practitioner/bench";
    r.patient_ids = {"bench-patient-" + std::to_string(g_counter % 50)};
    r.method = "GET";
    r.resource_type = "Observation";
    r.interaction = "search-type";
    r.query = "patient=bench&category=laboratory";
    r.policy_version = "bench";
    r.decision = "permit";
    r.client_address = "127.0.0.1";
    r.jti_hash = std::string(64, 'a');
    return r;
}

std::string append_frame(size_t records, bool sync, uint32_t id) {
    protocol::AuditAppend append;
    append.sync = sync;
    for (size_t i = 0; i < records; ++i) {
        append.records.push_back(sample());
    }
    std::string frame;
    protocol::encode_frame(frame, protocol::MessageType::AuditAppend, id, protocol::encode(append));
    return frame;
}

double throughput(Connection &c, size_t per_append, size_t window, bool sync, double seconds) {
    uint32_t id = 1;
    for (size_t i = 0; i < window; ++i) {
        c.send(append_frame(per_append, sync, id++));
    }
    uint64_t acked = 0;
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration<double>(seconds);
    size_t outstanding = window;
    while (outstanding > 0) {
        acked += c.next_ack();
        --outstanding;
        if (Clock::now() < end) {
            c.send(append_frame(per_append, sync, id++));
            ++outstanding;
        }
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    return static_cast<double>(acked) / elapsed;
}

}  // namespace

int main(int argc, char **argv) {
    std::string socket_path;
    double duration = 3;
    size_t window = 256, batch = 512, latency_count = 300;
    bool json = false;
    std::string only;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc)
                die(std::string(flag) + " needs a value");
            return argv[++i];
        };
        if (flag == "--help") {
            std::fputs(kUsage, stdout);
            return 0;
        } else if (flag == "--socket") {
            socket_path = value();
        } else if (flag == "--duration") {
            duration = std::atof(value().c_str());
        } else if (flag == "--window") {
            window = std::max<size_t>(1, std::strtoul(value().c_str(), nullptr, 10));
        } else if (flag == "--batch") {
            batch = std::clamp<size_t>(std::strtoul(value().c_str(), nullptr, 10), 1,
                                       protocol::kMaxAuditRecordsPerAppend);
        } else if (flag == "--latency-count") {
            latency_count = std::strtoul(value().c_str(), nullptr, 10);
        } else if (flag == "--only") {
            only = value();
            if (only != "durable" && only != "async" && only != "latency") {
                die("--only takes durable, async or latency");
            }
        } else if (flag == "--json") {
            json = true;
        } else {
            die("unknown option " + std::string(flag));
        }
    }
    if (socket_path.empty()) {
        die("--socket is required");
    }
    g_prefix = "bench-" + std::to_string(::getpid()) + "-" +
               std::to_string(Clock::now().time_since_epoch().count()) + "-";
    Connection c(socket_path);
    auto runs = [&](const char *phase) { return only.empty() || only == phase; };
    const double durable = runs("durable") ? throughput(c, 1, window, true, duration) : 0;
    const double async = runs("async") ? throughput(c, batch, 4, false, duration) : 0;
    std::vector<double> latencies;
    for (size_t i = 0; runs("latency") && i < latency_count; ++i) {
        const auto start = Clock::now();
        c.send(append_frame(1, true, static_cast<uint32_t>(i + 1)));
        c.next_ack();
        latencies.push_back(
            std::chrono::duration<double, std::micro>(Clock::now() - start).count());
    }
    std::sort(latencies.begin(), latencies.end());
    auto pct = [&](double p) {
        return latencies.empty() ? 0.0
                                 : latencies[std::min(latencies.size() - 1,
                                                      static_cast<size_t>(p * latencies.size()))];
    };
    if (json) {
        std::printf(
            "{\"durable_records_per_s\":%.0f,\"async_records_per_s\":%.0f,"
            "\"single_append_p50_us\":%.0f,\"single_append_p99_us\":%.0f}\n",
            durable, async, pct(0.5), pct(0.99));
    } else {
        std::printf("durable (1 record/append, window %zu): %10.0f records/s\n", window, durable);
        std::printf("async   (%zu records/append):          %10.0f records/s\n", batch, async);
        std::printf("single durable append latency:        p50 %.0f us, p99 %.0f us\n", pct(0.5),
                    pct(0.99));
    }
    return 0;
}
