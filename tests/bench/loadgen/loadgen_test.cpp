// Unit tests for the pure parts of ehrgate-loadgen: URL and CLI parsing, the
// incremental response parser (fed every possible two-chunk split, since the
// socket decides where chunks end) and the latency histogram.

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

#include "loadgen_core.h"

namespace ehrgate::loadgen {
namespace {

// ---------------------------------------------------------------------------
// URL
// ---------------------------------------------------------------------------

TEST(ParseUrl, LoopbackIpv4WithPortAndPath) {
    const auto r = parse_url("http://127.0.0.1:8080/fhir/Patient/abc");
    ASSERT_TRUE(r) << r.error;
    EXPECT_EQ(r.value->connect_address, "127.0.0.1");
    EXPECT_FALSE(r.value->ipv6);
    EXPECT_EQ(r.value->port, 8080);
    EXPECT_EQ(r.value->path, "/fhir/Patient/abc");
    EXPECT_EQ(r.value->host_header, "127.0.0.1:8080");
}

TEST(ParseUrl, LocalhostDefaultsAndQuery) {
    auto r = parse_url("http://localhost");
    ASSERT_TRUE(r) << r.error;
    EXPECT_EQ(r.value->connect_address, "127.0.0.1");
    EXPECT_EQ(r.value->port, 80);
    EXPECT_EQ(r.value->path, "/");
    EXPECT_EQ(r.value->host_header, "localhost");

    r = parse_url("HTTP://LocalHost:9000?_count=10#fragment");
    ASSERT_TRUE(r) << r.error;
    EXPECT_EQ(r.value->port, 9000);
    EXPECT_EQ(r.value->path, "/?_count=10");
    EXPECT_EQ(r.value->host_header, "LocalHost:9000");

    r = parse_url("http://127.0.0.1:/x");  // empty port means the default
    ASSERT_TRUE(r) << r.error;
    EXPECT_EQ(r.value->port, 80);
}

TEST(ParseUrl, LoopbackIpv6) {
    const auto r = parse_url("http://[::1]:8443/metadata");
    ASSERT_TRUE(r) << r.error;
    EXPECT_TRUE(r.value->ipv6);
    EXPECT_EQ(r.value->connect_address, "::1");
    EXPECT_EQ(r.value->port, 8443);
    EXPECT_EQ(r.value->host_header, "[::1]:8443");
}

TEST(ParseUrl, RefusesNonLoopbackHosts) {
    for (const char *url : {"http://example.com/", "http://10.0.0.1:8080/", "http://127.0.0.2/",
                            "http://0.0.0.0/", "http://localhost.example.com/", "http://[::2]/",
                            "http://[::ffff:127.0.0.1]/", "http://127.0.0.1.nip.io/"}) {
        const auto r = parse_url(url);
        EXPECT_FALSE(r) << url;
        EXPECT_NE(r.error.find("loopback only"), std::string::npos) << r.error;
    }
}

TEST(ParseUrl, RefusesMalformed) {
    for (const char *url :
         {"https://127.0.0.1/", "ftp://127.0.0.1/", "127.0.0.1:8080/", "http://",
          "http://user@127.0.0.1/", "http://127.0.0.1:0/", "http://127.0.0.1:65536/",
          "http://127.0.0.1:80a/", "http://[::1/", "http://[::1]x/", "http://127.0.0.1/a b",
          "http://127.0.0.1/a\r\nX: y"}) {
        EXPECT_FALSE(parse_url(url)) << url;
    }
    EXPECT_EQ(parse_url("http://127.0.0.1:99999/").error,
              "--url port must be 1-65535, got \"99999\"");
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

CliResult cli(std::vector<std::string_view> args) {
    return parse_cli(args);
}

TEST(ParseCli, Defaults) {
    const auto r = cli({"--url", "http://127.0.0.1:8080/"});
    ASSERT_TRUE(r.error.empty()) << r.error;
    EXPECT_EQ(r.options.connections, 64u);
    EXPECT_DOUBLE_EQ(r.options.duration_s, 10.0);
    EXPECT_DOUBLE_EQ(r.options.warmup_s, 2.0);
    EXPECT_FALSE(r.options.rate.has_value());
    EXPECT_EQ(r.options.threads, 1u);
    EXPECT_DOUBLE_EQ(r.options.timeout_s, 5.0);
    EXPECT_FALSE(r.options.json);
}

TEST(ParseCli, AllOptionsBothSyntaxes) {
    const auto r = cli({"--url=http://localhost:1/", "--connections", "8", "--duration=3.5",
                        "--warmup", "0", "--rate", "1500.5", "--threads=2", "--timeout", "1",
                        "--header", "Authorization: Bearer x", "--header=X-Trace: 1", "--json"});
    ASSERT_TRUE(r.error.empty()) << r.error;
    EXPECT_EQ(r.options.connections, 8u);
    EXPECT_DOUBLE_EQ(r.options.duration_s, 3.5);
    EXPECT_DOUBLE_EQ(r.options.warmup_s, 0.0);
    ASSERT_TRUE(r.options.rate.has_value());
    EXPECT_DOUBLE_EQ(*r.options.rate, 1500.5);
    EXPECT_EQ(r.options.threads, 2u);
    EXPECT_EQ(r.options.headers,
              (std::vector<std::string>{"Authorization: Bearer x", "X-Trace: 1"}));
    EXPECT_TRUE(r.options.json);
}

TEST(ParseCli, PreciseUsageErrors) {
    const std::string url = "http://127.0.0.1:8080/";
    EXPECT_EQ(cli({"--url", url, "--rate", "abc"}).error,
              "--rate must be a positive number, got \"abc\"");
    EXPECT_EQ(cli({"--url", url, "--rate", "0"}).error,
              "--rate must be a positive number, got \"0\"");
    EXPECT_EQ(cli({"--url", url, "--rate", "-5"}).error,
              "--rate must be a positive number, got \"-5\"");
    EXPECT_EQ(cli({"--url", url, "--rate", "inf"}).error,
              "--rate must be a positive number, got \"inf\"");
    EXPECT_EQ(cli({"--url", url, "--rate", "10x"}).error,
              "--rate must be a positive number, got \"10x\"");
    EXPECT_EQ(cli({"--url", url, "--duration", "301"}).error,
              "--duration must be a number of seconds in (0, 300], got \"301\"");
    EXPECT_TRUE(cli({"--url", url, "--duration", "300"}).error.empty());
    EXPECT_EQ(cli({"--url", url, "--connections", "0"}).error,
              "--connections must be an integer in [1, 10000], got \"0\"");
    EXPECT_EQ(cli({"--url", url, "--connections", "+4"}).error,
              "--connections must be an integer in [1, 10000], got \"+4\"");
    EXPECT_EQ(cli({"--url", url, "--connections", "2", "--threads", "3"}).error,
              "--threads (3) must not exceed --connections (2)");
    EXPECT_EQ(cli({"--url", url, "--rate"}).error, "--rate needs a value");
    EXPECT_EQ(cli({"--url", url, "--bogus", "1"}).error, "unknown option \"--bogus\"");
    EXPECT_EQ(cli({"--url", url, "stray"}).error, "unexpected argument \"stray\"");
    EXPECT_EQ(cli({"--url", url, "--json=1"}).error, "--json takes no value");
    EXPECT_EQ(cli({"--rate", "10"}).error, "--url is required");
    EXPECT_EQ(
        cli({"--url", "http://example.com/"}).error,
        "--url host must be 127.0.0.1, localhost or [::1] (load tests target loopback only), got "
        "\"example.com\"");
    EXPECT_EQ(cli({"--url", url, "--header", "NoColon"}).error,
              "--header must look like \"Name: value\", got \"NoColon\"");
    EXPECT_EQ(cli({"--url", url, "--header", "Bad Name: x"}).error,
              "--header name must be a token (no spaces), got \"Bad Name: x\"");
    EXPECT_EQ(cli({"--url", url, "--header", "Content-Length: 5"}).error,
              "--header Content-Length is not allowed (loadgen sends body-less GETs)");
    EXPECT_TRUE(cli({"--url", url, "--help"}).help);
}

TEST(BuildRequest, DefaultAndCustomHeaders) {
    auto r = cli({"--url", "http://127.0.0.1:8080/fhir/Patient/abc?x=1"});
    ASSERT_TRUE(r.error.empty());
    EXPECT_EQ(build_request(r.options),
              "GET /fhir/Patient/abc?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: "
              "ehrgate-loadgen\r\n\r\n");

    r = cli({"--url", "http://127.0.0.1/", "--header", "Authorization:   Bearer x  ", "--header",
             "host: fhir.test"});
    ASSERT_TRUE(r.error.empty());
    EXPECT_EQ(build_request(r.options),
              "GET / HTTP/1.1\r\nUser-Agent: ehrgate-loadgen\r\nAuthorization: Bearer x\r\nhost: "
              "fhir.test\r\n\r\n");
}

// ---------------------------------------------------------------------------
// Response parser
// ---------------------------------------------------------------------------

struct Seen {
    int status;
    std::uint64_t body_bytes;
    bool keep_alive;
    bool operator==(const Seen &) const = default;
};

std::ostream &operator<<(std::ostream &os, const Seen &s) {
    return os << "{" << s.status << ", " << s.body_bytes << ", " << s.keep_alive << "}";
}

struct StreamResult {
    std::vector<Seen> responses;
    bool error = false;
    bool pending = false;  // a response was started but not finished
};

// Feeds `chunks` in order, the way the event loop does: reset after each
// complete response and continue with the leftover bytes.
StreamResult parse_stream(const std::vector<std::string_view> &chunks, bool eof = false) {
    StreamResult out;
    ResponseParser parser;
    for (std::string_view chunk : chunks) {
        while (!chunk.empty()) {
            const auto progress = parser.feed(chunk);
            if (progress.status == ResponseParser::Status::Error) {
                out.error = true;
                return out;
            }
            EXPECT_LE(progress.consumed, chunk.size());
            chunk.remove_prefix(progress.consumed);
            if (progress.status == ResponseParser::Status::Complete) {
                out.responses.push_back(
                    {parser.status_code(), parser.body_bytes(), parser.keep_alive()});
                parser.reset();
            } else {
                EXPECT_TRUE(chunk.empty()) << "NeedMore must consume everything";
            }
        }
    }
    if (eof && parser.started()) {
        if (parser.finish_on_eof() == ResponseParser::Status::Complete) {
            out.responses.push_back(
                {parser.status_code(), parser.body_bytes(), parser.keep_alive()});
        } else {
            out.error = true;
        }
    } else {
        out.pending = parser.started();
    }
    return out;
}

// Every way the socket could hand `stream` over in two reads, plus one byte
// per read, must give the same responses.
void expect_all_splits(std::string_view stream, const std::vector<Seen> &expected) {
    for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
        const auto r = parse_stream({stream.substr(0, cut), stream.substr(cut)});
        ASSERT_FALSE(r.error) << "split at " << cut;
        ASSERT_FALSE(r.pending) << "split at " << cut;
        ASSERT_EQ(r.responses, expected) << "split at " << cut;
    }
    std::vector<std::string_view> bytes;
    for (std::size_t i = 0; i < stream.size(); ++i)
        bytes.push_back(stream.substr(i, 1));
    const auto r = parse_stream(bytes);
    ASSERT_FALSE(r.error);
    ASSERT_EQ(r.responses, expected);
}

constexpr std::string_view kContentLength =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
constexpr std::string_view kChunked =
    "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
    "5;ext=\"x\"\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-Checksum: abc\r\n\r\n";
constexpr std::string_view kNoContent = "HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n";
constexpr std::string_view kContinueThenOk =
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
constexpr std::string_view kCloseAfter =
    "HTTP/1.1 503 Service Unavailable\r\nConnection: keep-alive, Close\r\nContent-Length: "
    "0\r\n\r\n";
constexpr std::string_view kHttp10 = "HTTP/1.0 302 Found\nLocation: /x\nContent-Length: 3\n\nabc";

TEST(ResponseParser, ContentLengthEverySplit) {
    expect_all_splits(kContentLength, {{200, 11, true}});
}

TEST(ResponseParser, ChunkedWithExtensionsAndTrailersEverySplit) {
    expect_all_splits(kChunked, {{404, 15, true}});
}

TEST(ResponseParser, BodylessAndInterimEverySplit) {
    expect_all_splits(kNoContent, {{204, 0, true}});
    expect_all_splits(kContinueThenOk, {{201, 2, true}});
    expect_all_splits(kCloseAfter, {{503, 0, false}});
    expect_all_splits(kHttp10, {{302, 3, false}});  // bare LF line ends, HTTP/1.0 default close
}

TEST(ResponseParser, PipelinedResponsesEverySplit) {
    std::string stream;
    for (std::string_view part :
         {kContentLength, kChunked, kNoContent, kContinueThenOk, kChunked, kCloseAfter}) {
        stream += part;
    }
    expect_all_splits(stream, {{200, 11, true},
                               {404, 15, true},
                               {204, 0, true},
                               {201, 2, true},
                               {404, 15, true},
                               {503, 0, false}});
}

TEST(ResponseParser, StopsExactlyAtResponseEnd) {
    std::string stream(kContentLength);
    stream += "HTTP/1.1 200";
    ResponseParser parser;
    const auto progress = parser.feed(stream);
    EXPECT_EQ(progress.status, ResponseParser::Status::Complete);
    EXPECT_EQ(progress.consumed, kContentLength.size());
    // Without reset the parser stays complete and takes nothing more.
    const auto again = parser.feed("more");
    EXPECT_EQ(again.status, ResponseParser::Status::Complete);
    EXPECT_EQ(again.consumed, 0u);
}

TEST(ResponseParser, LargeBodyIsCountedNotBuffered) {
    const std::string head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
    const std::string body(1'000'000, 'x');
    ResponseParser parser;
    EXPECT_EQ(parser.feed(head).status, ResponseParser::Status::NeedMore);
    for (std::size_t off = 0; off < body.size(); off += 65536) {
        const auto piece = std::string_view(body).substr(off, 65536);
        const auto p = parser.feed(piece);
        EXPECT_EQ(p.consumed, piece.size());
        EXPECT_EQ(p.status, off + 65536 >= body.size() ? ResponseParser::Status::Complete
                                                       : ResponseParser::Status::NeedMore);
    }
    EXPECT_EQ(parser.body_bytes(), 1'000'000u);
}

TEST(ResponseParser, BodyDelimitedByClose) {
    constexpr std::string_view kUntilClose =
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabcdef";
    for (std::size_t cut = 0; cut <= kUntilClose.size(); ++cut) {
        const auto r =
            parse_stream({kUntilClose.substr(0, cut), kUntilClose.substr(cut)}, /*eof=*/true);
        ASSERT_FALSE(r.error) << cut;
        ASSERT_EQ(r.responses, (std::vector<Seen>{{200, 6, false}})) << cut;
    }
    const auto r = parse_stream({"HTTP/1.1 200 OK\r\n\r\n"}, /*eof=*/true);
    EXPECT_EQ(r.responses, (std::vector<Seen>{{200, 0, false}}));
}

TEST(ResponseParser, EofBeforeEndIsAnError) {
    for (std::string_view stream : {kContentLength, kChunked}) {
        for (std::size_t cut = 1; cut < stream.size(); ++cut) {
            const auto r = parse_stream({stream.substr(0, cut)}, /*eof=*/true);
            ASSERT_TRUE(r.error) << cut;
        }
    }
    ResponseParser parser;
    EXPECT_EQ(parser.finish_on_eof(), ResponseParser::Status::Error);
    EXPECT_FALSE(parser.started());
}

TEST(ResponseParser, RejectsMalformedResponses) {
    const std::vector<std::string_view> bad = {
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 20 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 099 Odd\r\n\r\n",
        "HTTP/1.1 600 Odd\r\n\r\n",
        "ICY 200 OK\r\n\r\n",
        "\r\nHTTP/1.1 200 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n",
    };
    for (std::string_view stream : bad) {
        const auto r = parse_stream({stream});
        EXPECT_TRUE(r.error) << stream;
    }
}

TEST(ResponseParser, RejectsOversizedHeaders) {
    std::string huge =
        "HTTP/1.1 200 OK\r\nX-Big: " + std::string(ResponseParser::kMaxLineBytes, 'a') + "\r\n\r\n";
    EXPECT_TRUE(parse_stream({huge}).error);

    std::string many = "HTTP/1.1 200 OK\r\n";
    while (many.size() <= ResponseParser::kMaxHeaderBytes)
        many += "X-Filler: " + std::string(1000, 'b') + "\r\n";
    many += "\r\n";
    ResponseParser parser;
    const auto progress = parser.feed(many);
    EXPECT_EQ(progress.status, ResponseParser::Status::Error);
    EXPECT_EQ(parser.error(), "header section larger than 64 KiB");
}

TEST(ResponseParser, AmbiguousFramingIsNotReused) {
    // Transfer-Encoding wins over Content-Length, and the connection must not
    // be reused afterwards (request smuggling territory).
    const auto r =
        parse_stream({"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: "
                      "chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"});
    ASSERT_FALSE(r.error);
    EXPECT_EQ(r.responses, (std::vector<Seen>{{200, 2, false}}));
}

TEST(ResponseParser, Http10KeepAlive) {
    const auto r =
        parse_stream({"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"});
    EXPECT_EQ(r.responses, (std::vector<Seen>{{200, 0, true}}));
}

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

TEST(LatencyHistogram, EmptyIsAllZero) {
    const LatencyHistogram h;
    EXPECT_EQ(h.count(), 0u);
    EXPECT_EQ(h.value_at_percentile(50), 0u);
    EXPECT_EQ(h.max(), 0u);
    EXPECT_EQ(h.min(), 0u);
    EXPECT_DOUBLE_EQ(h.mean(), 0.0);
}

TEST(LatencyHistogram, PercentilesOfOneToHundred) {
    LatencyHistogram h;
    for (std::uint64_t v = 100; v >= 1; --v)
        h.record(v);  // order must not matter
    EXPECT_EQ(h.count(), 100u);
    EXPECT_EQ(h.value_at_percentile(0), 1u);
    EXPECT_EQ(h.value_at_percentile(50), 50u);
    EXPECT_EQ(h.value_at_percentile(90), 90u);
    EXPECT_EQ(h.value_at_percentile(99), 99u);
    EXPECT_EQ(h.value_at_percentile(99.9), 100u);
    EXPECT_EQ(h.value_at_percentile(100), 100u);
    EXPECT_EQ(h.min(), 1u);
    EXPECT_EQ(h.max(), 100u);
    EXPECT_DOUBLE_EQ(h.mean(), 50.5);
}

TEST(LatencyHistogram, PercentilesOfOneToThousand) {
    LatencyHistogram h;
    for (std::uint64_t v = 1; v <= 1000; ++v)
        h.record(v);
    EXPECT_EQ(h.value_at_percentile(50), 500u);
    EXPECT_EQ(h.value_at_percentile(90), 900u);
    EXPECT_EQ(h.value_at_percentile(99), 990u);
    EXPECT_EQ(h.value_at_percentile(99.9), 999u);
    EXPECT_EQ(h.max(), 1000u);
}

TEST(LatencyHistogram, SkewedDistribution) {
    // 990 fast requests and 10 slow ones: p99 is still fast, p99.9 is slow.
    LatencyHistogram h;
    for (int i = 0; i < 990; ++i)
        h.record(100);
    for (int i = 0; i < 10; ++i)
        h.record(250'000);
    EXPECT_EQ(h.value_at_percentile(50), 100u);
    EXPECT_EQ(h.value_at_percentile(99), 100u);
    EXPECT_EQ(h.value_at_percentile(99.9), 250'000u);  // clamped to the true max
    EXPECT_DOUBLE_EQ(h.mean(), (990.0 * 100 + 10.0 * 250'000) / 1000);
}

TEST(LatencyHistogram, BucketsTileTheRangeWithBoundedError) {
    const std::size_t n = LatencyHistogram::bucket_count();
    EXPECT_EQ(LatencyHistogram::bucket_lowest(0), 0u);
    for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t lo = LatencyHistogram::bucket_lowest(i);
        const std::uint64_t hi = LatencyHistogram::bucket_highest(i);
        ASSERT_LE(lo, hi);
        ASSERT_EQ(LatencyHistogram::bucket_index(lo), i);
        if (hi <= LatencyHistogram::kMaxTrackableUs) {
            ASSERT_EQ(LatencyHistogram::bucket_index(hi), i);
        }
        if (i + 1 < n) {
            ASSERT_EQ(LatencyHistogram::bucket_lowest(i + 1), hi + 1) << i;
        }
        // Relative resolution better than 0.1%.
        ASSERT_LE(static_cast<double>(hi - lo), static_cast<double>(lo) / 1024.0 + 1e-9) << i;
    }
    EXPECT_GE(LatencyHistogram::bucket_highest(n - 1), LatencyHistogram::kMaxTrackableUs);
    EXPECT_LT(n, 20'000u);  // stays a small fixed table
}

TEST(LatencyHistogram, LargeValuesWithinResolution) {
    LatencyHistogram h;
    const std::vector<std::uint64_t> values = {3'000, 47'123, 1'234'567, 9'999'999, 59'999'999};
    for (const std::uint64_t v : values) {
        LatencyHistogram one;
        one.record(v);
        one.record(1);  // so that clamping to max does not hide the bucket width
        const std::uint64_t p100 = one.value_at_percentile(100);
        EXPECT_EQ(p100, v);
        const std::size_t idx = LatencyHistogram::bucket_index(v);
        EXPECT_LE(LatencyHistogram::bucket_lowest(idx), v);
        EXPECT_GE(LatencyHistogram::bucket_highest(idx), v);
        EXPECT_LE(static_cast<double>(LatencyHistogram::bucket_highest(idx) - v),
                  static_cast<double>(v) / 1024.0);
    }
    // Two clusters: the p50 is reported as the top of its bucket.
    for (int i = 0; i < 50; ++i)
        h.record(1'000'000);
    for (int i = 0; i < 50; ++i)
        h.record(2'000'000);
    const std::uint64_t p50 = h.value_at_percentile(50);
    EXPECT_GE(p50, 1'000'000u);
    EXPECT_LE(p50, 1'000'000u + 1'000'000u / 1024);
    EXPECT_EQ(h.value_at_percentile(51), 2'000'000u);
}

TEST(LatencyHistogram, ValuesAboveCeilingKeepTrueMax) {
    LatencyHistogram h;
    h.record(90'000'000);
    EXPECT_EQ(h.max(), 90'000'000u);
    EXPECT_EQ(h.value_at_percentile(50), 90'000'000u);
    EXPECT_DOUBLE_EQ(h.mean(), 90'000'000.0);
}

TEST(LatencyHistogram, MergeEqualsRecordingTogether) {
    LatencyHistogram a, b, all;
    for (std::uint64_t v = 1; v <= 5000; v += 7) {
        (v % 2 ? a : b).record(v * 13);
        all.record(v * 13);
    }
    a.merge(b);
    EXPECT_EQ(a.count(), all.count());
    EXPECT_EQ(a.min(), all.min());
    EXPECT_EQ(a.max(), all.max());
    EXPECT_DOUBLE_EQ(a.mean(), all.mean());
    for (const double p : {0.0, 10.0, 50.0, 90.0, 99.0, 99.9, 100.0}) {
        EXPECT_EQ(a.value_at_percentile(p), all.value_at_percentile(p)) << p;
    }
    LatencyHistogram empty;
    empty.merge(all);
    EXPECT_EQ(empty.value_at_percentile(50), all.value_at_percentile(50));
    EXPECT_EQ(empty.min(), all.min());
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

TEST(Report, JsonLine) {
    LatencyHistogram h;
    for (std::uint64_t v = 1; v <= 1000; ++v)
        h.record(v);
    const Report r = make_report(h, {990, 1, 2, 7}, 3, 4, 2.0);
    EXPECT_EQ(r.requests, 1000u);
    EXPECT_DOUBLE_EQ(r.rps, 500.0);
    EXPECT_EQ(
        format_json(r),
        "{\"requests\":1000,\"duration_s\":2.000,\"rps\":500.0,\"p50_us\":500,\"p90_us\":900,"
        "\"p99_us\":990,\"p999_us\":999,\"max_us\":1000,\"mean_us\":500.5,"
        "\"status\":{\"2xx\":990,\"3xx\":1,\"4xx\":2,\"5xx\":7},\"errors\":3,\"timeouts\":4}");
}

}  // namespace
}  // namespace ehrgate::loadgen
