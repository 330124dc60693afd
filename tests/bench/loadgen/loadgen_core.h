// ehrgate-loadgen: the pure, unit-testable parts of the benchmark load
// generator (URL/CLI parsing, an incremental HTTP/1.1 response parser and a
// log-linear latency histogram). Everything that touches sockets, clocks or
// threads lives in loadgen_main.cpp so that this file can be tested with
// byte-exact inputs.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::loadgen {

// Result of a parse that can fail with a human-readable message. (std::expected
// is C++23; this keeps the call sites just as explicit.)
template <typename T>
struct Parsed {
    std::optional<T> value;
    std::string error;

    explicit operator bool() const { return value.has_value(); }
};

// ---------------------------------------------------------------------------
// Target URL
// ---------------------------------------------------------------------------

// Where the load goes. Load tests must never leave the machine, so only the
// loopback names are accepted and `localhost` is mapped to 127.0.0.1 by us
// rather than by the resolver (an /etc/hosts entry must not be able to send
// benchmark traffic elsewhere).
struct Target {
    std::string host;             // as written, without brackets: "localhost", "::1"
    std::string connect_address;  // numeric literal actually dialled: "127.0.0.1" or "::1"
    bool ipv6 = false;
    std::uint16_t port = 80;
    std::string host_header;  // value for the Host header, e.g. "127.0.0.1:8080"
    std::string path;         // origin-form request target, e.g. "/fhir/Patient/abc?x=1"
};

Parsed<Target> parse_url(std::string_view url);

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

inline constexpr double kMaxDurationSeconds = 300.0;
inline constexpr double kMaxWarmupSeconds = 60.0;
inline constexpr double kMaxTimeoutSeconds = 60.0;
inline constexpr std::uint32_t kMaxConnections = 10000;
inline constexpr std::uint32_t kMaxThreads = 64;

struct Options {
    std::string url;
    Target target;
    std::uint32_t connections = 64;
    double duration_s = 10.0;    // measured window, after the warmup
    double warmup_s = 2.0;       // run but not measured
    std::optional<double> rate;  // total requests/s; unset means closed loop
    std::uint32_t threads = 1;
    double timeout_s = 5.0;            // per request, from the moment it is written
    std::vector<std::string> headers;  // validated "Name: value" lines
    bool json = false;
};

struct CliResult {
    Options options;
    bool help = false;  // --help was given; print usage_text() and exit 0
    std::string error;  // non-empty: usage error, exit 2
};

// `args` excludes argv[0].
CliResult parse_cli(const std::vector<std::string_view> &args);
std::string usage_text();

// The single request every connection sends over and over (GET, no body).
std::string build_request(const Options &options);

// ---------------------------------------------------------------------------
// HTTP/1.1 response parser
// ---------------------------------------------------------------------------

// Incremental parser for one response at a time, fed arbitrary byte chunks as
// they come off the socket. It never buffers bodies (only the current status,
// header or chunk-size line), so multi-megabyte responses cost nothing.
//
// feed() stops at the end of a response and reports how many bytes it used,
// so the caller can tell pipelined/extra bytes from the response itself.
class ResponseParser {
  public:
    enum class Status { NeedMore, Complete, Error };
    struct Progress {
        Status status;
        std::size_t consumed;  // bytes of `data` that belong to this response
    };

    // Header section and single-line limits: a misbehaving server must produce
    // an error, not unbounded memory growth in the load generator.
    static constexpr std::size_t kMaxLineBytes = 16 * 1024;
    static constexpr std::size_t kMaxHeaderBytes = 64 * 1024;

    Progress feed(std::string_view data);
    // The peer closed the connection: completes a body delimited by close, any
    // other unfinished response is an error.
    Status finish_on_eof();
    void reset();

    bool started() const { return bytes_seen_ > 0; }
    bool complete() const { return state_ == State::Done; }
    int status_code() const { return status_; }
    // Whether the connection may carry another request after this response.
    bool keep_alive() const;
    std::uint64_t body_bytes() const { return body_bytes_; }
    const std::string &error() const { return error_; }

  private:
    enum class State {
        StatusLine,
        HeaderLine,
        FixedBody,
        ChunkSize,
        ChunkData,
        ChunkDataEnd,
        Trailer,
        BodyUntilClose,
        Done,
        Failed,
    };

    bool on_line(std::string_view line);
    bool on_status_line(std::string_view line);
    bool on_header_line(std::string_view line);
    bool on_headers_complete();
    bool on_chunk_size_line(std::string_view line);
    void reset_message();
    bool fail(std::string message);

    State state_ = State::StatusLine;
    std::string line_;
    std::size_t header_bytes_ = 0;
    std::uint64_t bytes_seen_ = 0;
    std::uint64_t remaining_ = 0;
    std::uint64_t body_bytes_ = 0;
    int status_ = 0;
    bool http10_ = false;
    bool connection_close_ = false;
    bool connection_keep_alive_ = false;
    bool transfer_encoding_ = false;
    bool chunked_last_ = false;
    bool close_delimited_ = false;  // body ends when the server closes
    std::optional<std::uint64_t> content_length_;
    std::string error_;
};

// ---------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------

// HDR-style log-linear histogram of microsecond values: exact below 2048 us,
// then 1024 linear sub-buckets per power of two, i.e. a relative error below
// 0.1% everywhere up to the 60 s ceiling, in a fixed ~140 KiB table. Fixed
// buckets make recording O(1) and merging the per-thread histograms exact.
class LatencyHistogram {
  public:
    static constexpr std::uint64_t kMaxTrackableUs = 60'000'000;

    LatencyHistogram();

    // Values above kMaxTrackableUs land in the top bucket; max() still reports
    // the true value.
    void record(std::uint64_t value_us);
    void merge(const LatencyHistogram &other);

    std::uint64_t count() const { return count_; }
    std::uint64_t min() const { return count_ == 0 ? 0 : min_; }
    std::uint64_t max() const { return max_; }
    double mean() const;
    // Smallest recorded value v such that at least `percentile`% of the values
    // are <= v, reported as the top of v's bucket (as HdrHistogram does) and
    // clamped to [min, max]. 0 when empty.
    std::uint64_t value_at_percentile(double percentile) const;

    // Exposed for tests.
    static std::size_t bucket_index(std::uint64_t value_us);
    static std::uint64_t bucket_lowest(std::size_t index);
    static std::uint64_t bucket_highest(std::size_t index);
    static std::size_t bucket_count();

  private:
    std::vector<std::uint64_t> counts_;
    std::uint64_t count_ = 0;
    std::uint64_t sum_ = 0;
    std::uint64_t min_ = UINT64_MAX;
    std::uint64_t max_ = 0;
};

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Report {
    std::uint64_t requests = 0;  // responses received in the measured window
    double duration_s = 0;
    double rps = 0;
    std::uint64_t p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
    double mean_us = 0;
    std::array<std::uint64_t, 4> status{};  // 2xx, 3xx, 4xx, 5xx
    std::uint64_t errors = 0;
    std::uint64_t timeouts = 0;
};

Report make_report(const LatencyHistogram &latency, const std::array<std::uint64_t, 4> &status,
                   std::uint64_t errors, std::uint64_t timeouts, double duration_s);

// One line, no trailing newline; the key set is the contract with
// `./build.sh bench`, keep it stable.
std::string format_json(const Report &report);

}  // namespace ehrgate::loadgen
