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
#include <array>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/audit.hpp"
#include "ehrgate/msgpack.hpp"
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

// The number of record ids an ok=true AuditAck carries, without copying them out as
// decode_audit_ack does: the client must not be what limits the figures. nullopt when the ack
// says ok=false or does not parse.
std::optional<size_t> count_ok_ack(std::string_view body) {
    msgpack::Reader r(body);
    bool ok = false;
    std::optional<size_t> ids;
    static constexpr std::array<std::string_view, 2> kKeys = {"ok", "record_ids"};
    const bool parsed = msgpack::read_fields(r, kKeys, 0b11, [&](size_t field) {
        if (field == 0) {
            ok = r.read_bool().value_or(false);
            return true;
        }
        const std::optional<uint32_t> n = r.read_array();
        for (uint32_t i = 0; n && i < *n; ++i) {
            r.read_str();
        }
        ids = n;
        return n.has_value();
    });
    if (!parsed || !ok || !r.at_end()) {
        return std::nullopt;
    }
    return ids;
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
                if (const std::optional<size_t> acked = count_ok_ack(frame->body)) {
                    return *acked;
                }
                const std::optional<protocol::AuditAck> ack =
                    protocol::decode_audit_ack(frame->body);
                die("append refused: " + (ack ? ack->error : std::string("bad ack")));
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

// Access records like a gateway's, each unique (record id, correlation id, time). The records
// of a frame are kept and refilled in place, so building frames allocates next to nothing.
class RecordSource {
  public:
    explicit RecordSource(std::string prefix) : prefix_(std::move(prefix)) {}

    // The frame of one AuditAppend of `count` fresh records.
    std::string frame(size_t count, bool sync, uint32_t id) {
        append_.sync = sync;
        if (append_.records.size() != count) {
            append_.records.assign(count, base());
        }
        for (audit::Record &r : append_.records) {
            refill(r);
        }
        std::string frame;
        protocol::encode_frame(frame, protocol::MessageType::AuditAppend, id,
                               protocol::encode(append_));
        return frame;
    }

  private:
    static audit::Record base() {
        audit::Record r;
        r.kind = audit::Kind::Access;
        r.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        r.client_id = "demo-clinician-app";
        r.user = "Practitioner/bench";
        r.patient_ids = {"bench-patient-0"};
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

    void refill(audit::Record &r) {
        ++counter_;
        r.time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
        char digits[24];
        const std::string_view n = number(digits, counter_);
        r.record_id.assign(prefix_).append(n);
        r.correlation_id.assign("bench-").append(n);
        r.patient_ids[0].assign("bench-patient-").append(number(digits, counter_ % 50));
    }

    static std::string_view number(char (&digits)[24], uint64_t value) {
        const auto [end, ec] = std::to_chars(digits, digits + sizeof digits, value);
        return {digits, static_cast<size_t>(end - digits)};
    }

    std::string prefix_;
    uint64_t counter_ = 0;
    protocol::AuditAppend append_;
};

double throughput(Connection &c, RecordSource &source, size_t per_append, size_t window, bool sync,
                  double seconds) {
    uint32_t id = 1;
    for (size_t i = 0; i < window; ++i) {
        c.send(source.frame(per_append, sync, id++));
    }
    uint64_t acked = 0;
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration<double>(seconds);
    size_t outstanding = window;
    while (outstanding > 0) {
        acked += c.next_ack();
        --outstanding;
        if (Clock::now() < end) {
            c.send(source.frame(per_append, sync, id++));
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
    RecordSource source("bench-" + std::to_string(::getpid()) + "-" +
                        std::to_string(Clock::now().time_since_epoch().count()) + "-");
    Connection c(socket_path);
    auto runs = [&](const char *phase) { return only.empty() || only == phase; };
    const double durable = runs("durable") ? throughput(c, source, 1, window, true, duration) : 0;
    const double async = runs("async") ? throughput(c, source, batch, 4, false, duration) : 0;
    std::vector<double> latencies;
    for (size_t i = 0; runs("latency") && i < latency_count; ++i) {
        const auto start = Clock::now();
        c.send(source.frame(1, true, static_cast<uint32_t>(i + 1)));
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
