// ehrgate-loadgen: HTTP/1.1 keep-alive load generator for the benchmarks.
//
// Closed loop (no --rate) measures the maximum request rate. Open loop
// (--rate R) sends on a fixed schedule and measures each request's latency
// from the time it was *scheduled*, so a server that stalls is charged for
// the whole queue that builds up behind the stall instead of the generator
// politely waiting for it (coordinated omission, the problem wrk2 fixed).
//
// Each --threads worker is an independent epoll loop over its share of the
// connections; per-worker statistics are merged when all have stopped.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <queue>
#include <string>
#include <thread>
#include <vector>

#include "loadgen_core.h"

namespace ehrgate::loadgen {
namespace {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;
using std::chrono::nanoseconds;

// A connection whose connect or request failed waits this long before
// reconnecting, so a dead server costs a few errors per second per connection
// rather than a busy loop.
constexpr auto kErrorBackoff = std::chrono::milliseconds(20);
// Timeouts are found by a periodic scan instead of one timer per request; a
// 10 ms granularity is irrelevant next to a seconds-long timeout.
constexpr auto kTimeoutScanInterval = std::chrono::milliseconds(10);
constexpr std::size_t kReadBufferBytes = 64 * 1024;
constexpr int kMaxEvents = 256;
constexpr std::uint32_t kTimerTag = UINT32_MAX;

// Immutable run plan shared by all workers.
struct Plan {
    TimePoint start;           // first request
    TimePoint window_begin;    // end of warmup
    TimePoint window_end;      // no request is started at or after this
    TimePoint drain_deadline;  // hard stop for collecting in-flight responses
    bool open_loop = false;
    double spacing_ns = 0;   // open loop: gap between consecutive arrivals overall
    double interval_ns = 0;  // open loop: gap between one connection's requests
    nanoseconds timeout{};
    sockaddr_storage address{};
    socklen_t address_len = 0;
    std::string request;
};

struct Stats {
    LatencyHistogram latency;
    std::array<std::uint64_t, 4> status{};  // 2xx..5xx
    std::uint64_t errors = 0;
    std::uint64_t timeouts = 0;
    std::string fatal;  // a worker could not run at all (epoll/timerfd failure)

    void merge(const Stats &other) {
        latency.merge(other.latency);
        for (std::size_t i = 0; i < status.size(); ++i)
            status[i] += other.status[i];
        errors += other.errors;
        timeouts += other.timeouts;
        if (fatal.empty())
            fatal = other.fatal;
    }
};

enum class ConnState { Disconnected, Connecting, Idle, Sending, Receiving };

struct Connection {
    int fd = -1;
    std::uint64_t global_index = 0;  // position in the open-loop arrival order
    ConnState state = ConnState::Disconnected;
    bool want_write = false;  // EPOLLOUT currently in the interest set
    TimePoint reconnect_at{};
    TimePoint connect_started{};
    // Start of the current (or next) request for latency purposes: the
    // scheduled time in open loop, the actual send time in closed loop.
    TimePoint intended{};
    TimePoint sent_at{};         // when the current request was first written (timeouts)
    std::uint64_t sequence = 0;  // open loop: index in this connection's schedule
    std::size_t write_offset = 0;
    std::uint32_t requests_on_fd = 0;
    bool retried = false;  // the current request was already resent once
    bool timer_armed = false;
    TimePoint timer_at{};
    ResponseParser parser;
};

struct TimerEntry {
    TimePoint at;
    std::uint32_t connection;
    bool operator>(const TimerEntry &other) const { return at > other.at; }
};

std::uint64_t to_micros_rounded(nanoseconds d) {
    const auto ns = d.count();
    return ns <= 0 ? 0 : static_cast<std::uint64_t>((ns + 500) / 1000);
}

class Worker {
  public:
    Worker(const Plan &plan, std::uint64_t first_global_index, std::size_t connection_count)
        : plan_(plan), connections_(connection_count), read_buffer_(kReadBufferBytes) {
        for (std::size_t i = 0; i < connections_.size(); ++i) {
            connections_[i].global_index = first_global_index + i;
        }
    }

    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;

    ~Worker() {
        for (Connection &c : connections_) {
            if (c.fd >= 0)
                ::close(c.fd);
        }
        if (timer_fd_ >= 0)
            ::close(timer_fd_);
        if (epoll_fd_ >= 0)
            ::close(epoll_fd_);
    }

    const Stats &stats() const { return stats_; }

    void run() {
        // The default 50 us timer slack would make every open-loop send late by
        // up to that much, and lateness is charged to the measured latency.
        ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
        if (!init())
            return;

        TimePoint now = Clock::now();
        for (Connection &c : connections_) {
            c.intended = first_intended(c);
            c.reconnect_at = now;
            drive(c, now);
        }
        next_timeout_scan_ = now + kTimeoutScanInterval;

        std::vector<epoll_event> events(kMaxEvents);
        for (;;) {
            now = Clock::now();
            if (!sending_stopped_ && now >= plan_.window_end)
                sending_stopped_ = true;
            if (sending_stopped_ && (busy_connections() == 0 || now >= plan_.drain_deadline))
                break;
            process_timers(now);
            if (now >= next_timeout_scan_) {
                scan_timeouts(now);
                next_timeout_scan_ = now + kTimeoutScanInterval;
            }
            if (!arm_wakeup(next_wakeup()))
                return;

            const int n = ::epoll_wait(epoll_fd_, events.data(), kMaxEvents, -1);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                stats_.fatal = std::string("epoll_wait: ") + std::strerror(errno);
                return;
            }
            now = Clock::now();
            for (int i = 0; i < n; ++i) {
                if (events[i].data.u32 == kTimerTag) {
                    std::uint64_t expirations = 0;
                    [[maybe_unused]] const ssize_t r =
                        ::read(timer_fd_, &expirations, sizeof expirations);
                    armed_wakeup_ = TimePoint::max();
                    continue;
                }
                handle_event(connections_[events[i].data.u32], events[i].events, now);
            }
        }

        // Still unanswered at the drain deadline: they have been waiting for at
        // least the timeout, so that is what they are.
        for (Connection &c : connections_) {
            if (c.state == ConnState::Sending || c.state == ConnState::Receiving) {
                if (counted(c.intended))
                    ++stats_.timeouts;
            }
        }
    }

  private:
    bool init() {
        epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
        if (epoll_fd_ < 0) {
            stats_.fatal = std::string("epoll_create1: ") + std::strerror(errno);
            return false;
        }
        timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (timer_fd_ < 0) {
            stats_.fatal = std::string("timerfd_create: ") + std::strerror(errno);
            return false;
        }
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u32 = kTimerTag;
        if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, timer_fd_, &ev) < 0) {
            stats_.fatal = std::string("epoll_ctl(timerfd): ") + std::strerror(errno);
            return false;
        }
        return true;
    }

    // ---- schedule ----------------------------------------------------------

    TimePoint scheduled(const Connection &c, std::uint64_t sequence) const {
        // Connection g sends at start + g*spacing + k*interval: all connections
        // together produce one arrival every `spacing`, i.e. the requested rate.
        // Capped (at ~11 days, far past any run) so an absurdly low --rate cannot
        // overflow the int64 nanosecond count.
        const double offset = std::min(static_cast<double>(c.global_index) * plan_.spacing_ns +
                                           static_cast<double>(sequence) * plan_.interval_ns,
                                       1e15);
        return plan_.start + nanoseconds(static_cast<std::int64_t>(offset));
    }

    TimePoint first_intended(const Connection &c) const {
        return plan_.open_loop ? scheduled(c, 0) : plan_.start;
    }

    void advance_schedule(Connection &c, TimePoint now) {
        if (plan_.open_loop) {
            c.intended = scheduled(c, ++c.sequence);
        } else {
            c.intended = now;
        }
    }

    // Statistics cover requests whose (intended) start lies in the window, so
    // warmup traffic is excluded and requests started just before the end are
    // still collected during the drain.
    bool counted(TimePoint intended) const {
        return intended >= plan_.window_begin && intended < plan_.window_end;
    }
    bool in_window(TimePoint now) const {
        return now >= plan_.window_begin && now < plan_.window_end;
    }

    std::size_t busy_connections() const {
        return static_cast<std::size_t>(
            std::count_if(connections_.begin(), connections_.end(), [](const Connection &c) {
                return c.state == ConnState::Sending || c.state == ConnState::Receiving;
            }));
    }

    // ---- timers ------------------------------------------------------------

    // At most one live heap entry per connection: a newer, earlier entry makes
    // the older one stale (detected by comparing with timer_at when popped).
    void arm_timer(Connection &c, TimePoint at) {
        if (c.timer_armed && c.timer_at <= at)
            return;
        c.timer_armed = true;
        c.timer_at = at;
        timers_.push({at, static_cast<std::uint32_t>(&c - connections_.data())});
    }

    void process_timers(TimePoint now) {
        while (!timers_.empty() && timers_.top().at <= now) {
            const TimerEntry entry = timers_.top();
            timers_.pop();
            Connection &c = connections_[entry.connection];
            if (!c.timer_armed || c.timer_at != entry.at)
                continue;
            c.timer_armed = false;
            drive(c, now);
        }
    }

    TimePoint next_wakeup() const {
        TimePoint at = std::min(next_timeout_scan_,
                                sending_stopped_ ? plan_.drain_deadline : plan_.window_end);
        if (!timers_.empty())
            at = std::min(at, timers_.top().at);
        return at;
    }

    // One timerfd per worker gives nanosecond wakeups; epoll_wait's millisecond
    // timeout would make open-loop sends up to 1 ms late.
    bool arm_wakeup(TimePoint at) {
        if (at == armed_wakeup_)
            return true;
        const auto ns = std::max<std::int64_t>(at.time_since_epoch().count(), 1);  // 0 would disarm
        itimerspec spec{};
        spec.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
        spec.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
        if (::timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr) < 0) {
            stats_.fatal = std::string("timerfd_settime: ") + std::strerror(errno);
            return false;
        }
        armed_wakeup_ = at;
        return true;
    }

    void scan_timeouts(TimePoint now) {
        for (Connection &c : connections_) {
            if ((c.state == ConnState::Sending || c.state == ConnState::Receiving) &&
                now - c.sent_at >= plan_.timeout) {
                fail_request(c, now, /*timed_out=*/true);
            } else if (c.state == ConnState::Connecting &&
                       now - c.connect_started >= plan_.timeout) {
                if (in_window(now))
                    ++stats_.errors;
                reconnect_later(c, now);
            }
        }
    }

    // ---- connection state machine -----------------------------------------

    // Moves a connection forward as far as time allows; safe to call at any
    // moment (stale timers and spurious events just return).
    void drive(Connection &c, TimePoint now) {
        if (sending_stopped_)
            return;
        if (c.state == ConnState::Disconnected) {
            if (now < c.reconnect_at) {
                arm_timer(c, c.reconnect_at);
                return;
            }
            open_connection(c, now);
        }
        if (c.state == ConnState::Idle) {
            if (now < c.intended) {
                arm_timer(c, c.intended);
                return;
            }
            begin_request(c, now);
        }
    }

    void open_connection(Connection &c, TimePoint now) {
        const int fd = ::socket(plan_.address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                                IPPROTO_TCP);
        if (fd < 0) {
            // Out of descriptors or similar: count it and retry later.
            if (in_window(now))
                ++stats_.errors;
            c.reconnect_at = now + kErrorBackoff;
            arm_timer(c, c.reconnect_at);
            return;
        }
        // Requests are one small write each; Nagle would only add delay.
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c.fd = fd;
        c.requests_on_fd = 0;
        c.connect_started = now;
        c.parser.reset();

        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
        ev.data.u32 = static_cast<std::uint32_t>(&c - connections_.data());
        if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) < 0) {
            if (in_window(now))
                ++stats_.errors;
            reconnect_later(c, now);
            return;
        }
        c.want_write = true;

        if (::connect(fd, reinterpret_cast<const sockaddr *>(&plan_.address), plan_.address_len) ==
            0) {
            connected(c);
        } else if (errno == EINPROGRESS) {
            c.state = ConnState::Connecting;
        } else {
            if (in_window(now))
                ++stats_.errors;
            reconnect_later(c, now);
        }
    }

    void connected(Connection &c) {
        c.state = ConnState::Idle;
        set_want_write(c, false);
    }

    // Level-triggered epoll: EPOLLOUT is only in the interest set while there
    // is something to write (connect in progress or a partially sent request),
    // otherwise an idle socket would wake the loop continuously.
    void set_want_write(Connection &c, bool want) {
        if (c.want_write == want || c.fd < 0)
            return;
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u);
        ev.data.u32 = static_cast<std::uint32_t>(&c - connections_.data());
        ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, c.fd, &ev);
        c.want_write = want;
    }

    void close_connection(Connection &c) {
        if (c.fd >= 0)
            ::close(c.fd);  // also removes it from the epoll set
        c.fd = -1;
        c.state = ConnState::Disconnected;
        c.want_write = false;
        c.requests_on_fd = 0;
        c.parser.reset();
    }

    // The server ended a healthy connection (keep-alive limit, Connection:
    // close): replace it right away, this is not an error.
    void reconnect_now(Connection &c, TimePoint now) {
        close_connection(c);
        c.reconnect_at = now;
        drive(c, now);
    }

    void reconnect_later(Connection &c, TimePoint now) {
        close_connection(c);
        c.reconnect_at = now + kErrorBackoff;
        arm_timer(c, c.reconnect_at);
    }

    void begin_request(Connection &c, TimePoint now) {
        c.state = ConnState::Sending;
        c.write_offset = 0;
        c.sent_at = now;
        c.parser.reset();
        try_write(c, now);
    }

    void try_write(Connection &c, TimePoint now) {
        const std::string &request = plan_.request;
        while (c.write_offset < request.size()) {
            const ssize_t n = ::send(c.fd, request.data() + c.write_offset,
                                     request.size() - c.write_offset, MSG_NOSIGNAL);
            if (n > 0) {
                c.write_offset += static_cast<std::size_t>(n);
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                set_want_write(c, true);
                return;
            }
            connection_lost(c, now);
            return;
        }
        set_want_write(c, false);
        c.state = ConnState::Receiving;
    }

    void handle_event(Connection &c, std::uint32_t events, TimePoint now) {
        if (c.state == ConnState::Connecting) {
            if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) == 0)
                return;
            int error = 0;
            socklen_t len = sizeof error;
            if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0)
                error = errno;
            if (error != 0) {
                if (in_window(now))
                    ++stats_.errors;
                reconnect_later(c, now);
                return;
            }
            connected(c);
            drive(c, now);
            return;  // anything else on the new socket shows up on the next wait
        }
        if (c.state == ConnState::Disconnected)
            return;
        if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) {
            on_readable(c, now);
            if (c.state != ConnState::Sending)
                return;
        }
        if ((events & EPOLLOUT) != 0 && c.state == ConnState::Sending)
            try_write(c, now);
    }

    void on_readable(Connection &c, TimePoint now) {
        const ssize_t n = ::recv(c.fd, read_buffer_.data(), read_buffer_.size(), 0);
        if (n > 0) {
            on_bytes(c, std::string_view(read_buffer_.data(), static_cast<std::size_t>(n)), now);
        } else if (n == 0) {
            on_eof(c, now);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            // ECONNRESET and friends: same handling as an orderly close, except a
            // close-delimited body cannot be trusted to be complete.
            if (c.state == ConnState::Idle) {
                reconnect_now(c, now);
            } else {
                connection_lost(c, now);
            }
        }
    }

    void on_bytes(Connection &c, std::string_view data, TimePoint now) {
        if (c.state != ConnState::Sending && c.state != ConnState::Receiving) {
            // Bytes nobody asked for (we never pipeline): the stream is unusable.
            if (in_window(now))
                ++stats_.errors;
            reconnect_later(c, now);
            return;
        }
        const ResponseParser::Progress progress = c.parser.feed(data);
        switch (progress.status) {
            case ResponseParser::Status::NeedMore:
                return;
            case ResponseParser::Status::Error:
                fail_request(c, now, /*timed_out=*/false);
                return;
            case ResponseParser::Status::Complete:
                break;
        }
        const bool request_fully_sent = c.state == ConnState::Receiving;
        const bool keep_alive = c.parser.keep_alive();
        finish_response(c, now);
        if (progress.consumed < data.size()) {
            // Trailing garbage after a complete response: the response counted,
            // the connection cannot be reused.
            if (in_window(now))
                ++stats_.errors;
            reconnect_later(c, now);
        } else if (!keep_alive || !request_fully_sent) {
            reconnect_now(c, now);
        } else {
            drive(c, now);
        }
    }

    void on_eof(Connection &c, TimePoint now) {
        if (c.state == ConnState::Idle) {
            reconnect_now(c, now);  // idle keep-alive connection closed by the server
            return;
        }
        if (c.parser.finish_on_eof() == ResponseParser::Status::Complete) {
            finish_response(c, now);
            reconnect_now(c, now);
            return;
        }
        connection_lost(c, now);
    }

    // The connection died while a request was outstanding. If the server had
    // not answered anything on a reused connection, it most likely closed the
    // idle connection just as we sent (the keep-alive race every HTTP client
    // retries once); otherwise it is an error.
    void connection_lost(Connection &c, TimePoint now) {
        if (!c.parser.started() && c.requests_on_fd > 0 && !c.retried) {
            c.retried = true;  // keeps `intended`, so the retry's cost is measured
            reconnect_now(c, now);
            return;
        }
        fail_request(c, now, /*timed_out=*/false);
    }

    void finish_response(Connection &c, TimePoint now) {
        if (counted(c.intended)) {
            stats_.latency.record(to_micros_rounded(now - c.intended));
            const int status_class = c.parser.status_code() / 100;  // 2..5, parser guarantees
            if (status_class >= 2 && status_class <= 5)
                ++stats_.status[static_cast<std::size_t>(status_class - 2)];
        }
        ++c.requests_on_fd;
        c.retried = false;
        c.state = ConnState::Idle;
        advance_schedule(c, now);
    }

    void fail_request(Connection &c, TimePoint now, bool timed_out) {
        if (counted(c.intended))
            ++(timed_out ? stats_.timeouts : stats_.errors);
        c.retried = false;
        advance_schedule(c, now);
        reconnect_later(c, now);
    }

    const Plan &plan_;
    std::vector<Connection> connections_;
    std::vector<char> read_buffer_;
    std::priority_queue<TimerEntry, std::vector<TimerEntry>, std::greater<>> timers_;
    int epoll_fd_ = -1;
    int timer_fd_ = -1;
    TimePoint armed_wakeup_ = TimePoint::max();
    TimePoint next_timeout_scan_{};
    bool sending_stopped_ = false;
    Stats stats_;
};

// ---------------------------------------------------------------------------

std::string format_us(std::uint64_t us) {
    char buffer[32];
    if (us < 1000) {
        std::snprintf(buffer, sizeof buffer, "%llu us", static_cast<unsigned long long>(us));
    } else if (us < 1'000'000) {
        std::snprintf(buffer, sizeof buffer, "%.2f ms", static_cast<double>(us) / 1e3);
    } else {
        std::snprintf(buffer, sizeof buffer, "%.2f s", static_cast<double>(us) / 1e6);
    }
    return buffer;
}

void print_human(const Options &o, const Report &r) {
    std::printf("ehrgate-loadgen %s\n", o.url.c_str());
    if (o.rate) {
        std::printf("  mode         open loop, target %.1f req/s\n", *o.rate);
    } else {
        std::printf("  mode         closed loop\n");
    }
    std::printf("  setup        %u connections, %u thread%s, %.1f s measured after %.1f s warmup\n",
                o.connections, o.threads, o.threads == 1 ? "" : "s", o.duration_s, o.warmup_s);
    std::printf("  requests     %llu  (%.1f req/s)\n", static_cast<unsigned long long>(r.requests),
                r.rps);
    std::printf("  latency      p50 %s  p90 %s  p99 %s  p99.9 %s  max %s  mean %s\n",
                format_us(r.p50_us).c_str(), format_us(r.p90_us).c_str(),
                format_us(r.p99_us).c_str(), format_us(r.p999_us).c_str(),
                format_us(r.max_us).c_str(),
                format_us(static_cast<std::uint64_t>(r.mean_us + 0.5)).c_str());
    std::printf(
        "  status       2xx %llu  3xx %llu  4xx %llu  5xx %llu\n",
        static_cast<unsigned long long>(r.status[0]), static_cast<unsigned long long>(r.status[1]),
        static_cast<unsigned long long>(r.status[2]), static_cast<unsigned long long>(r.status[3]));
    std::printf("  errors       %llu socket/protocol, %llu timeouts\n",
                static_cast<unsigned long long>(r.errors),
                static_cast<unsigned long long>(r.timeouts));
}

bool make_address(const Target &target, sockaddr_storage &address, socklen_t &length) {
    address = {};
    if (target.ipv6) {
        auto *a = reinterpret_cast<sockaddr_in6 *>(&address);
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(target.port);
        length = sizeof *a;
        return ::inet_pton(AF_INET6, target.connect_address.c_str(), &a->sin6_addr) == 1;
    }
    auto *a = reinterpret_cast<sockaddr_in *>(&address);
    a->sin_family = AF_INET;
    a->sin_port = htons(target.port);
    length = sizeof *a;
    return ::inet_pton(AF_INET, target.connect_address.c_str(), &a->sin_addr) == 1;
}

// A refused connection up front gets one clear message instead of a run
// full of connect errors.
std::string probe(const sockaddr_storage &address, socklen_t length) {
    const int fd = ::socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0)
        return std::string("socket: ") + std::strerror(errno);
    std::string error;
    if (::connect(fd, reinterpret_cast<const sockaddr *>(&address), length) < 0)
        error = std::strerror(errno);
    ::close(fd);
    return error;
}

bool ensure_fd_limit(std::uint32_t connections, std::string &error) {
    const rlim_t needed = static_cast<rlim_t>(connections) + 64;
    rlimit limit{};
    if (::getrlimit(RLIMIT_NOFILE, &limit) < 0)
        return true;
    if (limit.rlim_cur >= needed)
        return true;
    if (limit.rlim_max != RLIM_INFINITY && limit.rlim_max < needed) {
        error = "--connections " + std::to_string(connections) + " needs " +
                std::to_string(needed) + " file descriptors, the hard limit is " +
                std::to_string(limit.rlim_max);
        return false;
    }
    limit.rlim_cur = needed;
    if (::setrlimit(RLIMIT_NOFILE, &limit) < 0) {
        error = std::string("setrlimit(RLIMIT_NOFILE): ") + std::strerror(errno);
        return false;
    }
    return true;
}

void on_watchdog(int) {
    static const char kMessage[] =
        "ehrgate-loadgen: watchdog: run exceeded its time bound, aborting\n";
    [[maybe_unused]] const ssize_t r = ::write(STDERR_FILENO, kMessage, sizeof kMessage - 1);
    ::_exit(1);
}

int run(int argc, char **argv) {
    std::vector<std::string_view> args(argv + 1, argv + argc);
    const CliResult cli = parse_cli(args);
    if (cli.help) {
        std::fputs(usage_text().c_str(), stdout);
        return 0;
    }
    if (!cli.error.empty()) {
        std::fprintf(stderr, "ehrgate-loadgen: %s\n(see ehrgate-loadgen --help)\n",
                     cli.error.c_str());
        return 2;
    }
    const Options &o = cli.options;

    Plan plan;
    if (!make_address(o.target, plan.address, plan.address_len)) {
        std::fprintf(stderr, "ehrgate-loadgen: bad address %s\n", o.target.connect_address.c_str());
        return 1;
    }
    if (std::string error; !ensure_fd_limit(o.connections, error)) {
        std::fprintf(stderr, "ehrgate-loadgen: %s\n", error.c_str());
        return 1;
    }
    if (const std::string error = probe(plan.address, plan.address_len); !error.empty()) {
        std::fprintf(stderr, "ehrgate-loadgen: cannot connect to %s port %u: %s\n",
                     o.target.connect_address.c_str(), static_cast<unsigned>(o.target.port),
                     error.c_str());
        return 1;
    }

    // Bounded by design: even a bug in the event loop cannot keep a benchmark
    // hanging. The loops stop on their own after warmup + duration + timeout.
    const double bound_s = o.warmup_s + o.duration_s + o.timeout_s + 10.0;
    std::signal(SIGALRM, on_watchdog);
    ::alarm(static_cast<unsigned>(bound_s) + 1);

    auto to_ns = [](double seconds) {
        return nanoseconds(static_cast<std::int64_t>(seconds * 1e9));
    };
    plan.request = build_request(o);
    plan.timeout = to_ns(o.timeout_s);
    plan.open_loop = o.rate.has_value();
    if (plan.open_loop) {
        plan.spacing_ns = 1e9 / *o.rate;
        plan.interval_ns = plan.spacing_ns * static_cast<double>(o.connections);
    }
    // A short lead lets every worker open its connections before the first
    // scheduled request.
    plan.start = Clock::now() + std::chrono::milliseconds(50);
    plan.window_begin = plan.start + to_ns(o.warmup_s);
    plan.window_end = plan.window_begin + to_ns(o.duration_s);
    plan.drain_deadline = plan.window_end + plan.timeout;

    std::vector<std::unique_ptr<Worker>> workers;
    std::uint64_t next_index = 0;
    for (std::uint32_t t = 0; t < o.threads; ++t) {
        const std::size_t share =
            o.connections / o.threads + (t < o.connections % o.threads ? 1 : 0);
        workers.push_back(std::make_unique<Worker>(plan, next_index, share));
        next_index += share;
    }
    std::vector<std::thread> threads;
    for (std::size_t t = 1; t < workers.size(); ++t)
        threads.emplace_back([&w = *workers[t]] { w.run(); });
    workers[0]->run();
    for (std::thread &thread : threads)
        thread.join();
    ::alarm(0);

    Stats total;
    for (const auto &worker : workers)
        total.merge(worker->stats());
    if (!total.fatal.empty()) {
        std::fprintf(stderr, "ehrgate-loadgen: %s\n", total.fatal.c_str());
        return 1;
    }

    const Report report =
        make_report(total.latency, total.status, total.errors, total.timeouts, o.duration_s);
    if (o.json) {
        std::printf("%s\n", format_json(report).c_str());
    } else {
        print_human(o, report);
    }
    if (o.rate && report.rps < 0.95 * *o.rate) {
        std::fprintf(stderr,
                     "ehrgate-loadgen: warning: achieved %.1f req/s, below the %.1f req/s target; "
                     "the server (or "
                     "this generator) is saturated and latencies include queueing\n",
                     report.rps, *o.rate);
    }
    if (report.requests == 0) {
        std::fprintf(stderr, "ehrgate-loadgen: no response was received in the measured window\n");
        return 1;
    }
    return 0;
}

}  // namespace
}  // namespace ehrgate::loadgen

int main(int argc, char **argv) {
    return ehrgate::loadgen::run(argc, argv);
}
