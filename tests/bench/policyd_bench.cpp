// policyd_bench: how many decisions policyd answers on one connection, used the way one nginx
// worker uses it, and how long a single decision takes when nothing else is in flight.
//
// Phase 1 (throughput) keeps --window DecideRequests outstanding for --duration seconds: every
// reply is answered by a new request, as a busy worker with many requests waiting would. policyd
// is single-threaded, so this is the rate of one core. With --policyd-pid, policyd's CPU time
// (utime + stime from /proc/PID/stat) over the phase, divided by wall time, says how much of a
// core it took to get there.
//
// Phase 2 (latency) sends one request at a time for --latency-duration seconds, so each round
// trip is measured without queueing behind the others.
//
// Blocking I/O on purpose: one connection, and at most a window of requests in flight each way
// (a few KiB), far below the socket buffers, so a blocking write cannot deadlock with policyd.
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/protocol.hpp"

namespace ehrgate::bench {
namespace {

using Clock = std::chrono::steady_clock;
using protocol::MessageType;

constexpr const char *kUsage =
    R"(usage: policyd_bench --socket PATH [options]

Decisions per second from policyd over one connection (pipelined), then the latency of single
unpipelined decisions.

  --socket PATH            policyd's data socket
  --duration S             pipelined phase length in seconds (default 5)
  --window N               requests kept outstanding in that phase (default 64, max 4096)
  --latency-duration S     unpipelined phase length in seconds (default 2; 0 skips it)
  --policyd-pid PID        report policyd's CPU use over the pipelined phase
  --json                   print one JSON object line instead of the summary
  --consent                requests as demo-clinician-app with purpose TREAT: the consent
                           decision and the signed consent context run on every permit
  --help                   this text
)";

// A decision mix with the sandbox policy (conf/policy.yaml) in mind: mostly permitted reads and
// writes, with a quarter refused for different reasons, so both reply paths are exercised.
struct Sample {
    std::string_view method;
    std::string_view path;
    std::string_view query;
    bool permit;  // what conf/policy.yaml decides; a mismatch is reported, not fatal
};

constexpr Sample kMix[] = {
    {"GET", "/fhir/Patient/erXuFYUfucBZaryVksYEcMg3", "", true},
    {"GET", "/fhir/Observation", "patient=erXuFYUfucBZaryVksYEcMg3&category=vital-signs", true},
    {"GET", "/fhir/Patient/erXuFYUfucBZaryVksYEcMg3/_history/2", "", true},
    {"POST", "/fhir/Observation", "", true},
    {"GET", "/fhir/AllergyIntolerance/e1", "", false},  // resource type not listed
    {"GET", "/fhir/Encounter", "patient=erXuFYUfucBZaryVksYEcMg3", true},
    {"GET", "/fhir/$export", "", false},  // interaction not permitted
    {"PUT", "/fhir/Condition/c42", "", true},
};
constexpr size_t kMixSize = std::size(kMix);

struct Options {
    std::string socket_path;
    double duration_s = 5;
    uint32_t window = 64;
    double latency_duration_s = 2;
    std::optional<int> policyd_pid;
    bool json = false;
    // Consent (issue 5): requests as demo-clinician-app with purpose TREAT, so every permitted
    // one also runs the consent decision and signs a consent context.
    bool consent = false;
};

struct Counts {
    uint64_t replies = 0;
    uint64_t permits = 0;
    uint64_t denies = 0;
    uint64_t errors = 0;      // Error frames or undecodable replies
    uint64_t unexpected = 0;  // a decision other than the one the mix expects
};

struct Result {
    Counts counts;
    double throughput_elapsed_s = 0;
    double round_trips_per_s = 0;
    std::optional<double> policyd_cpu_cores;
    double client_cpu_cores = 0;
    std::vector<uint32_t> latencies_ns;
};

class BenchError : public std::exception {
  public:
    explicit BenchError(std::string message) : message_(std::move(message)) {}
    const char *what() const noexcept override { return message_.c_str(); }

  private:
    std::string message_;
};

std::string errno_text(std::string_view what) {
    return std::string(what) + ": " + std::strerror(errno);
}

template <typename T>
bool parse_number(std::string_view text, T &out) {
    const char *end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, out);
    return ec == std::errc() && ptr == end;
}

// Returns the options, or nullopt after printing why (or the help text) with `exit_code` set.
std::optional<Options> parse_cli(int argc, char **argv, int &exit_code) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--help") {
            std::fputs(kUsage, stdout);
            exit_code = 0;
            return std::nullopt;
        }
        if (arg == "--json") {
            o.json = true;
            continue;
        }
        if (arg == "--consent") {
            o.consent = true;
            continue;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "policyd_bench: %s needs a value\n", argv[i]);
            exit_code = 2;
            return std::nullopt;
        }
        const std::string_view value = argv[++i];
        bool ok = true;
        if (arg == "--socket") {
            o.socket_path = value;
        } else if (arg == "--duration") {
            ok = parse_number(value, o.duration_s) && o.duration_s > 0 && o.duration_s <= 300;
        } else if (arg == "--window") {
            ok = parse_number(value, o.window) && o.window >= 1 && o.window <= 4096;
        } else if (arg == "--latency-duration") {
            ok = parse_number(value, o.latency_duration_s) && o.latency_duration_s >= 0 &&
                 o.latency_duration_s <= 300;
        } else if (arg == "--policyd-pid") {
            int pid = 0;
            ok = parse_number(value, pid) && pid > 0;
            o.policyd_pid = pid;
        } else {
            std::fprintf(stderr, "policyd_bench: unknown option %s\n%s", argv[i - 1], kUsage);
            exit_code = 2;
            return std::nullopt;
        }
        if (!ok) {
            std::fprintf(stderr, "policyd_bench: invalid value \"%s\" for %s\n", argv[i],
                         argv[i - 1]);
            exit_code = 2;
            return std::nullopt;
        }
    }
    if (o.socket_path.empty()) {
        std::fprintf(stderr, "policyd_bench: --socket is required\n%s", kUsage);
        exit_code = 2;
        return std::nullopt;
    }
    return o;
}

// utime + stime of a process, in seconds.
double process_cpu_seconds(int pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The command name (field 2) may hold spaces and parentheses; fields after the last ')'
    // start with field 3 (state). utime and stime are fields 14 and 15.
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) {
        throw BenchError("cannot read /proc/" + std::to_string(pid) + "/stat");
    }
    std::istringstream fields(stat.substr(close + 2));
    std::string field;
    uint64_t utime = 0;
    uint64_t stime = 0;
    for (int index = 3; index <= 15 && fields >> field; ++index) {
        if (index == 14) {
            utime = std::stoull(field);
        } else if (index == 15) {
            stime = std::stoull(field);
        }
    }
    return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double self_cpu_seconds() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    auto seconds = [](const timeval &tv) {
        return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
    };
    return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

class Connection {
  public:
    explicit Connection(const std::string &path) {
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        if (path.size() >= sizeof address.sun_path) {
            throw BenchError("socket path too long: " + path);
        }
        std::memcpy(address.sun_path, path.data(), path.size());
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd_ < 0) {
            throw BenchError(errno_text("socket"));
        }
        if (::connect(fd_, reinterpret_cast<sockaddr *>(&address), sizeof address) != 0) {
            const std::string error = errno_text("connect " + path);
            ::close(fd_);
            throw BenchError(error);
        }
    }
    Connection(const Connection &) = delete;
    Connection &operator=(const Connection &) = delete;
    ~Connection() { ::close(fd_); }

    void write_all(std::string_view data) {
        while (!data.empty()) {
            const ssize_t n = ::write(fd_, data.data(), data.size());
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                throw BenchError(errno_text("write to policyd"));
            }
            data.remove_prefix(static_cast<size_t>(n));
        }
    }

    // Blocks until policyd sends something, feeds it to `decoder`.
    void read_into(protocol::FrameDecoder &decoder) {
        for (;;) {
            const ssize_t n = ::read(fd_, buffer_, sizeof buffer_);
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n < 0) {
                throw BenchError(errno_text("read from policyd"));
            }
            if (n == 0) {
                throw BenchError("policyd closed the connection");
            }
            decoder.feed(std::string_view(buffer_, static_cast<size_t>(n)));
            return;
        }
    }

  private:
    int fd_ = -1;
    char buffer_[64 * 1024];
};

class Bench {
  public:
    explicit Bench(const Options &options) : options_(options), connection_(options.socket_path) {
        for (const Sample &sample : kMix) {
            protocol::DecideRequest request;
            // nginx sends a 32-hex-digit correlation id; the same length keeps frames realistic.
            request.correlation_id = "0f3c9a6e2b7d4e18a5c1f0d2e3b4a596";
            request.method = sample.method;
            request.path = sample.path;
            request.query = sample.query;
            request.host = "127.0.0.1:8080";
            if (options.consent) {
                request.client_id = "demo-clinician-app";
                request.user = "Practitioner/demo-clinician";
                request.purpose_of_use = "TREAT";
            }
            bodies_.push_back(protocol::encode(request));
        }
    }

    Result run() {
        Result result;
        throughput_phase(result);
        if (options_.latency_duration_s > 0) {
            latency_phase(result);
        }
        result.counts = counts_;
        return result;
    }

  private:
    // Request ids run from 1 and never wrap within a run, so (id - 1) picks the sample.
    void append_request(std::string &out) {
        const uint32_t id = next_id_++;
        protocol::encode_frame(out, MessageType::DecideRequest, id, bodies_[(id - 1) % kMixSize]);
    }

    // Returns true for a reply to one of our requests, false for a frame to skip (a push).
    bool handle(const protocol::FrameView &frame) {
        if (frame.header.request_id == protocol::kPushRequestId) {
            return false;  // a policy snapshot pushed after a reload: not an answer
        }
        ++counts_.replies;
        if (frame.header.type != MessageType::DecideReply) {
            ++counts_.errors;
            return true;
        }
        const std::optional<protocol::DecideReply> reply =
            protocol::decode_decide_reply(frame.body);
        if (!reply) {
            ++counts_.errors;
            return true;
        }
        const bool permit = reply->decision == protocol::Decision::Permit;
        ++(permit ? counts_.permits : counts_.denies);
        if (permit != kMix[(frame.header.request_id - 1) % kMixSize].permit) {
            ++counts_.unexpected;
        }
        return true;
    }

    void check_stream() const {
        if (decoder_.error() != protocol::FrameError::None) {
            throw BenchError(std::string("bad frame from policyd: ") +
                             protocol::frame_error_name(decoder_.error()));
        }
    }

    void throughput_phase(Result &result) {
        const double policyd_cpu_before =
            options_.policyd_pid ? process_cpu_seconds(*options_.policyd_pid) : 0;
        const double self_cpu_before = self_cpu_seconds();
        const Clock::time_point start = Clock::now();
        const Clock::time_point deadline =
            start + std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double>(options_.duration_s));
        std::string out;
        for (uint32_t i = 0; i < options_.window; ++i) {
            append_request(out);
        }
        uint64_t outstanding = options_.window;
        connection_.write_all(out);
        out.clear();
        while (outstanding > 0) {
            connection_.read_into(decoder_);
            // One clock read per batch of replies: enough resolution, and cheap.
            const bool refill = Clock::now() < deadline;
            while (std::optional<protocol::FrameView> frame = decoder_.next()) {
                if (!handle(*frame)) {
                    continue;
                }
                --outstanding;
                if (refill) {
                    append_request(out);
                    ++outstanding;
                }
            }
            check_stream();
            if (!out.empty()) {
                connection_.write_all(out);
                out.clear();
            }
        }
        const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
        result.throughput_elapsed_s = elapsed;
        result.round_trips_per_s = static_cast<double>(counts_.replies) / elapsed;
        result.client_cpu_cores = (self_cpu_seconds() - self_cpu_before) / elapsed;
        if (options_.policyd_pid) {
            result.policyd_cpu_cores =
                (process_cpu_seconds(*options_.policyd_pid) - policyd_cpu_before) / elapsed;
        }
    }

    void latency_phase(Result &result) {
        const Clock::time_point deadline =
            Clock::now() + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(options_.latency_duration_s));
        std::string out;
        result.latencies_ns.reserve(1 << 18);
        for (Clock::time_point now = Clock::now(); now < deadline;) {
            out.clear();
            append_request(out);
            connection_.write_all(out);
            bool answered = false;
            while (!answered) {
                connection_.read_into(decoder_);
                while (std::optional<protocol::FrameView> frame = decoder_.next()) {
                    answered = handle(*frame) || answered;
                }
                check_stream();
            }
            const Clock::time_point done = Clock::now();
            const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(done - now);
            result.latencies_ns.push_back(
                static_cast<uint32_t>(std::min<int64_t>(ns.count(), UINT32_MAX)));
            now = done;
        }
    }

    const Options &options_;
    Connection connection_;
    protocol::FrameDecoder decoder_;
    std::vector<std::string> bodies_;
    uint32_t next_id_ = 1;
    Counts counts_;
};

// Nearest-rank percentile in microseconds; sorts `samples`.
double percentile_us(std::vector<uint32_t> &samples, double p) {
    if (samples.empty()) {
        return 0;
    }
    std::sort(samples.begin(), samples.end());
    const size_t rank = static_cast<size_t>(p / 100.0 * static_cast<double>(samples.size()));
    return static_cast<double>(samples[std::min(rank, samples.size() - 1)]) / 1000.0;
}

void report(const Options &o, Result &r) {
    const double p50 = percentile_us(r.latencies_ns, 50);
    const double p99 = percentile_us(r.latencies_ns, 99);
    const Counts &c = r.counts;
    if (o.json) {
        std::printf(
            "{\"round_trips_per_s\":%.1f,\"replies\":%llu,\"permits\":%llu,\"denies\":%llu,"
            "\"errors\":%llu,\"unexpected\":%llu,\"window\":%u,\"duration_s\":%.3f,"
            "\"policyd_cpu_cores\":%s,\"client_cpu_cores\":%.3f,"
            "\"latency_p50_us\":%.1f,\"latency_p99_us\":%.1f,\"latency_samples\":%zu}\n",
            r.round_trips_per_s, static_cast<unsigned long long>(c.replies),
            static_cast<unsigned long long>(c.permits), static_cast<unsigned long long>(c.denies),
            static_cast<unsigned long long>(c.errors),
            static_cast<unsigned long long>(c.unexpected), o.window, r.throughput_elapsed_s,
            r.policyd_cpu_cores ? std::to_string(*r.policyd_cpu_cores).c_str() : "null",
            r.client_cpu_cores, p50, p99, r.latencies_ns.size());
        return;
    }
    std::printf("policyd_bench: 1 connection, window %u, %.1f s\n", o.window,
                r.throughput_elapsed_s);
    std::printf("  round trips/s   %.0f  (%llu permit, %llu deny, %llu errors, %llu unexpected)\n",
                r.round_trips_per_s, static_cast<unsigned long long>(c.permits),
                static_cast<unsigned long long>(c.denies),
                static_cast<unsigned long long>(c.errors),
                static_cast<unsigned long long>(c.unexpected));
    if (r.policyd_cpu_cores) {
        std::printf("  policyd CPU     %.2f cores (utime+stime / wall)\n", *r.policyd_cpu_cores);
    }
    std::printf("  this client CPU %.2f cores\n", r.client_cpu_cores);
    if (!r.latencies_ns.empty()) {
        std::printf("  unpipelined     p50 %.1f us  p99 %.1f us  (%zu round trips)\n", p50, p99,
                    r.latencies_ns.size());
    }
}

int run(int argc, char **argv) {
    int exit_code = 0;
    const std::optional<Options> options = parse_cli(argc, argv, exit_code);
    if (!options) {
        return exit_code;
    }
    try {
        Bench bench(*options);
        Result result = bench.run();
        report(*options, result);
        if (result.counts.errors > 0) {
            std::fprintf(stderr, "policyd_bench: %llu error replies\n",
                         static_cast<unsigned long long>(result.counts.errors));
            return 1;
        }
        if (result.counts.unexpected > 0) {
            std::fprintf(stderr,
                         "policyd_bench: warning: %llu decisions differ from what the sandbox "
                         "policy (conf/policy.yaml) gives\n",
                         static_cast<unsigned long long>(result.counts.unexpected));
        }
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "policyd_bench: %s\n", e.what());
        return 1;
    }
}

}  // namespace
}  // namespace ehrgate::bench

int main(int argc, char **argv) {
    return ehrgate::bench::run(argc, argv);
}
