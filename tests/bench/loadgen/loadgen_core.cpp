#include "loadgen_core.h"

#include <algorithm>
#include <bit>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace ehrgate::loadgen {

namespace {

char to_lower_ascii(char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size())
        return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (to_lower_ascii(a[i]) != to_lower_ascii(b[i]))
            return false;
    }
    return true;
}

bool istarts_with(std::string_view s, std::string_view prefix) {
    return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

std::string_view trim_ows(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
        s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
        s.remove_suffix(1);
    return s;
}

bool is_digits(std::string_view s) {
    return !s.empty() &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// RFC 9110 token characters (header names, transfer codings).
bool is_tchar(char c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return true;
    return std::strchr("!#$%&'*+-.^_`|~", c) != nullptr && c != '\0';
}

bool is_token(std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), is_tchar);
}

// Calls `fn` for each trimmed, non-empty element of a comma-separated list
// (Connection, Transfer-Encoding).
template <typename Fn>
void for_each_list_element(std::string_view value, Fn fn) {
    while (!value.empty()) {
        const std::size_t comma = value.find(',');
        const std::string_view item = trim_ows(value.substr(0, comma));
        if (!item.empty())
            fn(item);
        if (comma == std::string_view::npos)
            break;
        value.remove_prefix(comma + 1);
    }
}

std::string quoted(std::string_view s) {
    std::string out = "\"";
    out.append(s);
    out.push_back('"');
    return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// URL
// ---------------------------------------------------------------------------

Parsed<Target> parse_url(std::string_view url) {
    Parsed<Target> result;
    auto fail = [&](std::string message) {
        result.error = std::move(message);
        return result;
    };

    constexpr std::string_view kScheme = "http://";
    if (istarts_with(url, "https://")) {
        return fail("--url: https is not supported, use http:// to a loopback address, got " +
                    quoted(url));
    }
    if (!istarts_with(url, kScheme)) {
        return fail("--url must start with http://, got " + quoted(url));
    }
    std::string_view rest = url.substr(kScheme.size());
    const std::size_t authority_end = rest.find_first_of("/?#");
    const std::string_view authority = rest.substr(0, authority_end);
    std::string_view path =
        authority_end == std::string_view::npos ? std::string_view{} : rest.substr(authority_end);

    if (authority.find('@') != std::string_view::npos) {
        return fail("--url must not contain user information, got " + quoted(url));
    }

    Target target;
    std::string_view host;
    std::string_view port_text;
    bool has_port = false;
    if (!authority.empty() && authority.front() == '[') {
        const std::size_t close = authority.find(']');
        if (close == std::string_view::npos)
            return fail("--url has an unterminated [IPv6] host: " + quoted(url));
        host = authority.substr(1, close - 1);
        const std::string_view after = authority.substr(close + 1);
        if (!after.empty()) {
            if (after.front() != ':')
                return fail("--url has garbage after the [IPv6] host: " + quoted(url));
            port_text = after.substr(1);
            has_port = true;
        }
        target.ipv6 = true;
    } else {
        const std::size_t colon = authority.find(':');
        host = authority.substr(0, colon);
        if (colon != std::string_view::npos) {
            port_text = authority.substr(colon + 1);
            has_port = true;
        }
    }
    if (host.empty())
        return fail("--url has no host: " + quoted(url));

    // Loopback only, by exact literal: a load generator pointed at a shared or
    // production host by mistake is an outage, so there is no override.
    if (target.ipv6) {
        if (host != "::1") {
            return fail(
                "--url host must be 127.0.0.1, localhost or [::1] (load tests target loopback "
                "only), got " +
                quoted(host));
        }
        target.connect_address = "::1";
    } else if (host == "127.0.0.1" || iequals(host, "localhost")) {
        target.connect_address = "127.0.0.1";
    } else {
        return fail(
            "--url host must be 127.0.0.1, localhost or [::1] (load tests target loopback only), "
            "got " +
            quoted(host));
    }
    target.host = std::string(host);

    if (has_port && !port_text.empty()) {
        unsigned value = 0;
        const auto [ptr, ec] =
            std::from_chars(port_text.data(), port_text.data() + port_text.size(), value);
        if (!is_digits(port_text) || ec != std::errc{} ||
            ptr != port_text.data() + port_text.size() || value == 0 || value > 65535) {
            return fail("--url port must be 1-65535, got " + quoted(port_text));
        }
        target.port = static_cast<std::uint16_t>(value);
    }

    // The fragment never goes on the wire.
    if (const std::size_t hash = path.find('#'); hash != std::string_view::npos)
        path = path.substr(0, hash);
    for (const char c : path) {
        const auto u = static_cast<unsigned char>(c);
        if (u <= 0x20 || u == 0x7f) {
            return fail(
                "--url path must not contain spaces or control characters (percent-encode them), "
                "got " +
                quoted(url));
        }
    }
    target.path = path.empty() || path.front() != '/' ? "/" + std::string(path) : std::string(path);

    target.host_header = target.ipv6 ? "[" + target.host + "]" : target.host;
    if (target.port != 80)
        target.host_header += ":" + std::to_string(target.port);

    result.value = std::move(target);
    return result;
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

namespace {

bool parse_double(std::string_view text, double &out) {
    if (text.empty())
        return false;
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    return ec == std::errc{} && ptr == text.data() + text.size() && std::isfinite(out);
}

bool parse_u32(std::string_view text, std::uint32_t &out) {
    if (!is_digits(text))
        return false;
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    return ec == std::errc{} && ptr == text.data() + text.size();
}

// Header names the generator owns: it never sends a body, so letting these
// through would make the server wait for one and every request time out.
constexpr std::array<std::string_view, 4> kReservedHeaders = {"content-length", "transfer-encoding",
                                                              "expect", "upgrade"};

std::string validate_header(std::string_view header) {
    const std::size_t colon = header.find(':');
    if (colon == std::string_view::npos) {
        return "--header must look like \"Name: value\", got " + quoted(header);
    }
    const std::string_view name = header.substr(0, colon);
    if (!is_token(name)) {
        return "--header name must be a token (no spaces), got " + quoted(header);
    }
    for (const char c : header.substr(colon + 1)) {
        const auto u = static_cast<unsigned char>(c);
        if ((u < 0x20 && c != '\t') || u == 0x7f) {
            return "--header value must not contain control characters, got " + quoted(header);
        }
    }
    for (const std::string_view reserved : kReservedHeaders) {
        if (iequals(name, reserved)) {
            return "--header " + std::string(name) +
                   " is not allowed (loadgen sends body-less GETs)";
        }
    }
    return {};
}

}  // namespace

std::string usage_text() {
    return R"(usage: ehrgate-loadgen --url http://127.0.0.1:PORT/PATH [options]

HTTP/1.1 keep-alive load generator for the ehrgate benchmarks (loopback only).

  --url URL            target; host must be 127.0.0.1, localhost or [::1]
  --connections N      concurrent keep-alive connections (default 64, max 10000)
  --duration S         measured seconds after the warmup (default 10, max 300)
  --warmup S           seconds run before measuring, not counted (default 2, max 60)
  --rate R             open loop: R requests/s in total, evenly spread over the
                       connections; latency counts from each request's scheduled
                       send time (no coordinated omission). Without --rate: closed
                       loop, each connection sends as soon as its last response ends.
  --threads N          event-loop threads, connections split between them (default 1)
  --timeout S          per-request timeout in seconds (default 5, max 60)
  --header "N: V"      extra request header, repeatable
  --json               print one JSON object line instead of the summary
  --help               this text

Runs for warmup + duration seconds, plus at most --timeout to collect responses
still in flight. Exit status: 0 ok, 1 runtime failure or no response at all,
2 usage error.
)";
}

CliResult parse_cli(const std::vector<std::string_view> &args) {
    CliResult result;
    Options &o = result.options;
    auto fail = [&](std::string message) {
        result.error = std::move(message);
        return result;
    };

    bool have_url = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string_view arg = args[i];
        if (arg == "--help" || arg == "-h") {
            result.help = true;
            return result;
        }
        if (arg == "--json") {
            o.json = true;
            continue;
        }
        if (!arg.starts_with("--"))
            return fail("unexpected argument " + quoted(arg));

        // Accept both "--name value" and "--name=value".
        std::string_view name = arg;
        std::string_view value;
        bool inline_value = false;
        if (const std::size_t eq = arg.find('='); eq != std::string_view::npos) {
            name = arg.substr(0, eq);
            value = arg.substr(eq + 1);
            inline_value = true;
        }
        static constexpr std::array<std::string_view, 8> kValued = {
            "--url",  "--connections", "--duration", "--warmup",
            "--rate", "--threads",     "--timeout",  "--header"};
        if (name == "--json")
            return fail("--json takes no value");
        if (std::find(kValued.begin(), kValued.end(), name) == kValued.end()) {
            return fail("unknown option " + quoted(name));
        }
        if (!inline_value) {
            if (i + 1 >= args.size())
                return fail(std::string(name) + " needs a value");
            value = args[++i];
        }

        if (name == "--url") {
            auto target = parse_url(value);
            if (!target)
                return fail(target.error);
            o.url = std::string(value);
            o.target = std::move(*target.value);
            have_url = true;
        } else if (name == "--connections") {
            if (!parse_u32(value, o.connections) || o.connections == 0 ||
                o.connections > kMaxConnections) {
                return fail("--connections must be an integer in [1, 10000], got " + quoted(value));
            }
        } else if (name == "--threads") {
            if (!parse_u32(value, o.threads) || o.threads == 0 || o.threads > kMaxThreads) {
                return fail("--threads must be an integer in [1, 64], got " + quoted(value));
            }
        } else if (name == "--duration") {
            if (!parse_double(value, o.duration_s) || o.duration_s <= 0 ||
                o.duration_s > kMaxDurationSeconds) {
                return fail("--duration must be a number of seconds in (0, 300], got " +
                            quoted(value));
            }
        } else if (name == "--warmup") {
            if (!parse_double(value, o.warmup_s) || o.warmup_s < 0 ||
                o.warmup_s > kMaxWarmupSeconds) {
                return fail("--warmup must be a number of seconds in [0, 60], got " +
                            quoted(value));
            }
        } else if (name == "--timeout") {
            if (!parse_double(value, o.timeout_s) || o.timeout_s <= 0 ||
                o.timeout_s > kMaxTimeoutSeconds) {
                return fail("--timeout must be a number of seconds in (0, 60], got " +
                            quoted(value));
            }
        } else if (name == "--rate") {
            double rate = 0;
            if (!parse_double(value, rate) || rate <= 0) {
                return fail("--rate must be a positive number, got " + quoted(value));
            }
            o.rate = rate;
        } else if (name == "--header") {
            if (std::string message = validate_header(value); !message.empty())
                return fail(message);
            o.headers.emplace_back(value);
        }
    }

    if (!have_url)
        return fail("--url is required");
    if (o.threads > o.connections) {
        return fail("--threads (" + std::to_string(o.threads) +
                    ") must not exceed --connections (" + std::to_string(o.connections) + ")");
    }
    return result;
}

std::string build_request(const Options &options) {
    std::string request = "GET " + options.target.path + " HTTP/1.1\r\n";
    bool has_host = false;
    bool has_user_agent = false;
    for (const std::string &header : options.headers) {
        const std::string_view name = std::string_view(header).substr(0, header.find(':'));
        has_host = has_host || iequals(name, "host");
        has_user_agent = has_user_agent || iequals(name, "user-agent");
    }
    // A user-supplied Host only changes virtual-host selection, never where we
    // connect, so it is allowed to replace ours.
    if (!has_host)
        request += "Host: " + options.target.host_header + "\r\n";
    if (!has_user_agent)
        request += "User-Agent: ehrgate-loadgen\r\n";
    for (const std::string &header : options.headers) {
        const std::size_t colon = header.find(':');
        request.append(header, 0, colon);
        request += ": ";
        request += trim_ows(std::string_view(header).substr(colon + 1));
        request += "\r\n";
    }
    request += "\r\n";
    return request;
}

// ---------------------------------------------------------------------------
// Response parser
// ---------------------------------------------------------------------------

void ResponseParser::reset() {
    reset_message();
    state_ = State::StatusLine;
    line_.clear();
    bytes_seen_ = 0;
    body_bytes_ = 0;
    remaining_ = 0;
    error_.clear();
}

// Per-message state, also cleared between an interim 1xx and the final response.
void ResponseParser::reset_message() {
    header_bytes_ = 0;
    status_ = 0;
    http10_ = false;
    connection_close_ = false;
    connection_keep_alive_ = false;
    transfer_encoding_ = false;
    chunked_last_ = false;
    content_length_.reset();
    close_delimited_ = false;
}

bool ResponseParser::fail(std::string message) {
    state_ = State::Failed;
    error_ = std::move(message);
    return false;
}

bool ResponseParser::keep_alive() const {
    if (connection_close_)
        return false;
    if (http10_ && !connection_keep_alive_)
        return false;
    // A body delimited by close, or a message framed ambiguously (both
    // Transfer-Encoding and Content-Length), must not be followed by another.
    if (transfer_encoding_ && (!chunked_last_ || content_length_.has_value()))
        return false;
    if (close_delimited_)
        return false;
    return true;
}

ResponseParser::Progress ResponseParser::feed(std::string_view data) {
    std::size_t pos = 0;
    while (pos < data.size() && state_ != State::Done && state_ != State::Failed) {
        switch (state_) {
            case State::FixedBody:
            case State::ChunkData: {
                const std::uint64_t take = std::min<std::uint64_t>(remaining_, data.size() - pos);
                pos += static_cast<std::size_t>(take);
                remaining_ -= take;
                body_bytes_ += take;
                if (remaining_ == 0)
                    state_ = state_ == State::FixedBody ? State::Done : State::ChunkDataEnd;
                break;
            }
            case State::BodyUntilClose:
                body_bytes_ += data.size() - pos;
                pos = data.size();
                break;
            default: {
                // Line-oriented states: gather up to and including '\n'.
                const std::size_t newline = data.find('\n', pos);
                const std::size_t end =
                    newline == std::string_view::npos ? data.size() : newline + 1;
                const std::size_t piece = end - pos;
                if (line_.size() + piece > kMaxLineBytes) {
                    bytes_seen_ += end;
                    fail("line longer than 16 KiB");
                    return {Status::Error, end};
                }
                const bool in_header_section = state_ == State::StatusLine ||
                                               state_ == State::HeaderLine ||
                                               state_ == State::Trailer;
                if (in_header_section) {
                    header_bytes_ += piece;
                    if (header_bytes_ > kMaxHeaderBytes) {
                        bytes_seen_ += end;
                        fail("header section larger than 64 KiB");
                        return {Status::Error, end};
                    }
                }
                line_.append(data.substr(pos, piece));
                pos = end;
                if (newline == std::string_view::npos)
                    break;
                std::string_view line = line_;
                line.remove_suffix(1);  // '\n'
                if (!line.empty() && line.back() == '\r')
                    line.remove_suffix(1);
                const bool ok = on_line(line);
                line_.clear();
                if (!ok) {
                    bytes_seen_ += pos;
                    return {Status::Error, pos};
                }
                break;
            }
        }
    }
    bytes_seen_ += pos;
    switch (state_) {
        case State::Done:
            return {Status::Complete, pos};
        case State::Failed:
            return {Status::Error, pos};
        default:
            return {Status::NeedMore, pos};
    }
}

ResponseParser::Status ResponseParser::finish_on_eof() {
    if (state_ == State::BodyUntilClose || state_ == State::Done) {
        state_ = State::Done;
        return Status::Complete;
    }
    if (state_ != State::Failed) {
        fail(bytes_seen_ == 0 ? "connection closed before any response byte"
                              : "connection closed in the middle of a response");
    }
    return Status::Error;
}

bool ResponseParser::on_line(std::string_view line) {
    switch (state_) {
        case State::StatusLine:
            return on_status_line(line);
        case State::HeaderLine:
            return on_header_line(line);
        case State::ChunkSize:
            return on_chunk_size_line(line);
        case State::ChunkDataEnd:
            if (!line.empty())
                return fail("chunk data not followed by CRLF");
            state_ = State::ChunkSize;
            return true;
        case State::Trailer:
            // Trailer fields are read and ignored; the empty line ends the message.
            if (line.empty())
                state_ = State::Done;
            return true;
        default:
            return fail("internal: line in a body state");
    }
}

bool ResponseParser::on_status_line(std::string_view line) {
    // status-line = HTTP-version SP 3DIGIT SP [reason-phrase]
    if (line.size() < 12 || !line.starts_with("HTTP/1.") || (line[7] != '0' && line[7] != '1') ||
        line[8] != ' ' || !is_digits(line.substr(9, 3)) || (line.size() > 12 && line[12] != ' ')) {
        return fail("malformed status line: " + quoted(line.substr(0, 80)));
    }
    http10_ = line[7] == '0';
    status_ = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    if (status_ < 100 || status_ > 599)
        return fail("status code out of range: " + std::to_string(status_));
    state_ = State::HeaderLine;
    return true;
}

bool ResponseParser::on_header_line(std::string_view line) {
    if (line.empty())
        return on_headers_complete();
    if (line.front() == ' ' || line.front() == '\t') {
        return fail("obsolete header line folding is not accepted");
    }
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos || !is_token(line.substr(0, colon))) {
        return fail("malformed header line: " + quoted(line.substr(0, 80)));
    }
    const std::string_view name = line.substr(0, colon);
    const std::string_view value = trim_ows(line.substr(colon + 1));

    if (iequals(name, "content-length")) {
        std::uint64_t length = 0;
        const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), length);
        if (!is_digits(value) || ec != std::errc{} || ptr != value.data() + value.size()) {
            return fail("invalid Content-Length: " + quoted(value));
        }
        if (content_length_.has_value() && *content_length_ != length) {
            return fail("conflicting Content-Length headers");
        }
        content_length_ = length;
    } else if (iequals(name, "transfer-encoding")) {
        // Only the last coding decides the framing; "gzip, chunked" is chunked.
        for_each_list_element(value, [&](std::string_view coding) {
            transfer_encoding_ = true;
            chunked_last_ = iequals(coding, "chunked");
        });
    } else if (iequals(name, "connection")) {
        for_each_list_element(value, [&](std::string_view option) {
            if (iequals(option, "close"))
                connection_close_ = true;
            if (iequals(option, "keep-alive"))
                connection_keep_alive_ = true;
        });
    }
    return true;
}

bool ResponseParser::on_headers_complete() {
    if (status_ == 101)
        return fail("unexpected 101 Switching Protocols");
    if (status_ < 200) {
        // Interim response (100 Continue, 103 Early Hints): the real one follows.
        reset_message();
        state_ = State::StatusLine;
        return true;
    }
    // RFC 9112 section 6.3: these never have a body, whatever the headers say.
    // (HEAD would too, but loadgen only sends GET.)
    if (status_ == 204 || status_ == 304) {
        state_ = State::Done;
        return true;
    }
    if (transfer_encoding_) {
        state_ = chunked_last_ ? State::ChunkSize : State::BodyUntilClose;
        close_delimited_ = !chunked_last_;
        return true;
    }
    if (content_length_.has_value()) {
        remaining_ = *content_length_;
        state_ = remaining_ == 0 ? State::Done : State::FixedBody;
        return true;
    }
    state_ = State::BodyUntilClose;
    close_delimited_ = true;
    return true;
}

bool ResponseParser::on_chunk_size_line(std::string_view line) {
    // chunk-size [ chunk-ext ]; extensions are ignored.
    std::size_t digits = 0;
    std::uint64_t size = 0;
    while (digits < line.size() && std::isxdigit(static_cast<unsigned char>(line[digits]))) {
        if (digits == 15)
            return fail("chunk size too large");
        const char c = line[digits];
        const int nibble = c <= '9' ? c - '0' : (to_lower_ascii(c) - 'a' + 10);
        size = (size << 4) | static_cast<std::uint64_t>(nibble);
        ++digits;
    }
    if (digits == 0)
        return fail("malformed chunk size line: " + quoted(line.substr(0, 80)));
    const std::string_view rest = trim_ows(line.substr(digits));
    if (!rest.empty() && rest.front() != ';')
        return fail("malformed chunk size line: " + quoted(line.substr(0, 80)));
    if (size == 0) {
        state_ = State::Trailer;
        header_bytes_ = 0;  // trailers get their own 64 KiB allowance
    } else {
        remaining_ = size;
        state_ = State::ChunkData;
    }
    return true;
}

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

namespace {

// Values below kSubBucketCount get one bucket each; above, each power of two
// [2^k, 2^(k+1)) is split into kHalfCount equal buckets.
constexpr unsigned kSubBucketBits = 11;
constexpr std::uint64_t kSubBucketCount = 1ULL << kSubBucketBits;  // 2048
constexpr std::uint64_t kHalfCount = kSubBucketCount / 2;          // 1024

}  // namespace

std::size_t LatencyHistogram::bucket_index(std::uint64_t value) {
    value = std::min(value, kMaxTrackableUs);
    if (value < kSubBucketCount)
        return static_cast<std::size_t>(value);
    const unsigned shift = static_cast<unsigned>(std::bit_width(value)) - kSubBucketBits;  // >= 1
    return static_cast<std::size_t>(kSubBucketCount + (shift - 1) * kHalfCount +
                                    ((value >> shift) - kHalfCount));
}

std::uint64_t LatencyHistogram::bucket_lowest(std::size_t index) {
    if (index < kSubBucketCount)
        return index;
    const std::uint64_t offset = index - kSubBucketCount;
    const unsigned shift = static_cast<unsigned>(offset / kHalfCount) + 1;
    const std::uint64_t mantissa = kHalfCount + offset % kHalfCount;
    return mantissa << shift;
}

std::uint64_t LatencyHistogram::bucket_highest(std::size_t index) {
    if (index < kSubBucketCount)
        return index;
    const std::uint64_t offset = index - kSubBucketCount;
    const unsigned shift = static_cast<unsigned>(offset / kHalfCount) + 1;
    const std::uint64_t mantissa = kHalfCount + offset % kHalfCount;
    return ((mantissa + 1) << shift) - 1;
}

std::size_t LatencyHistogram::bucket_count() {
    return bucket_index(kMaxTrackableUs) + 1;
}

LatencyHistogram::LatencyHistogram() : counts_(bucket_count(), 0) {}

void LatencyHistogram::record(std::uint64_t value_us) {
    ++counts_[bucket_index(value_us)];
    ++count_;
    sum_ += value_us;
    min_ = std::min(min_, value_us);
    max_ = std::max(max_, value_us);
}

void LatencyHistogram::merge(const LatencyHistogram &other) {
    for (std::size_t i = 0; i < counts_.size(); ++i)
        counts_[i] += other.counts_[i];
    count_ += other.count_;
    sum_ += other.sum_;
    min_ = std::min(min_, other.min_);
    max_ = std::max(max_, other.max_);
}

double LatencyHistogram::mean() const {
    return count_ == 0 ? 0.0 : static_cast<double>(sum_) / static_cast<double>(count_);
}

std::uint64_t LatencyHistogram::value_at_percentile(double percentile) const {
    if (count_ == 0)
        return 0;
    percentile = std::clamp(percentile, 0.0, 100.0);
    // Rank of the wanted value, 1-based: the smallest r with r >= p% of count.
    // The tiny relative epsilon keeps 99.9% of 1000 at rank 999 although
    // 0.999 * 1000 is 999.0000000000001 in binary floating point.
    const double exact_rank = percentile / 100.0 * static_cast<double>(count_);
    auto rank = static_cast<std::uint64_t>(std::ceil(exact_rank * (1.0 - 1e-12)));
    rank = std::clamp<std::uint64_t>(rank, 1, count_);
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < counts_.size(); ++i) {
        seen += counts_[i];
        if (seen >= rank)
            return std::clamp(bucket_highest(i), min(), max_);
    }
    return max_;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

Report make_report(const LatencyHistogram &latency, const std::array<std::uint64_t, 4> &status,
                   std::uint64_t errors, std::uint64_t timeouts, double duration_s) {
    Report r;
    for (const std::uint64_t n : status)
        r.requests += n;
    r.duration_s = duration_s;
    r.rps = duration_s > 0 ? static_cast<double>(r.requests) / duration_s : 0.0;
    r.p50_us = latency.value_at_percentile(50);
    r.p90_us = latency.value_at_percentile(90);
    r.p99_us = latency.value_at_percentile(99);
    r.p999_us = latency.value_at_percentile(99.9);
    r.max_us = latency.max();
    r.mean_us = latency.mean();
    r.status = status;
    r.errors = errors;
    r.timeouts = timeouts;
    return r;
}

std::string format_json(const Report &r) {
    char buffer[512];
    const int n = std::snprintf(
        buffer, sizeof buffer,
        "{\"requests\":%llu,\"duration_s\":%.3f,\"rps\":%.1f,\"p50_us\":%llu,\"p90_us\":%llu,"
        "\"p99_us\":%llu,\"p999_us\":%llu,\"max_us\":%llu,\"mean_us\":%.1f,"
        "\"status\":{\"2xx\":%llu,\"3xx\":%llu,\"4xx\":%llu,\"5xx\":%llu},"
        "\"errors\":%llu,\"timeouts\":%llu}",
        static_cast<unsigned long long>(r.requests), r.duration_s, r.rps,
        static_cast<unsigned long long>(r.p50_us), static_cast<unsigned long long>(r.p90_us),
        static_cast<unsigned long long>(r.p99_us), static_cast<unsigned long long>(r.p999_us),
        static_cast<unsigned long long>(r.max_us), r.mean_us,
        static_cast<unsigned long long>(r.status[0]), static_cast<unsigned long long>(r.status[1]),
        static_cast<unsigned long long>(r.status[2]), static_cast<unsigned long long>(r.status[3]),
        static_cast<unsigned long long>(r.errors), static_cast<unsigned long long>(r.timeouts));
    return std::string(buffer, static_cast<std::size_t>(std::max(n, 0)));
}

}  // namespace ehrgate::loadgen
