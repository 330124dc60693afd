#include "syslog_forwarder.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>

#include "ehrgate/json_text.hpp"
#include "log.hpp"

namespace ehrgate::policyd {

namespace {

constexpr size_t kBatchRecords = 1000;
constexpr auto kPollInterval = std::chrono::milliseconds(100);
constexpr auto kRetryInterval = std::chrono::milliseconds(1000);
// A receiver (or network) that stalls this long fails the connection instead of holding the
// forwarder thread, and with it policyd's shutdown, indefinitely.
constexpr int kIoTimeoutSeconds = 5;
constexpr auto kAckWait = std::chrono::milliseconds(5);

// facility 10 (authpriv: security/authorization messages), severity 5 (notice)
constexpr int kPri = 10 * 8 + 5;

std::string rfc3339(int64_t time_us) {
    const time_t secs = static_cast<time_t>(time_us / 1000000);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[40];
    const size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    char frac[16];
    std::snprintf(frac, sizeof frac, ".%06dZ", static_cast<int>(time_us % 1000000));
    return std::string(buf, n) + frac;
}

// RFC 5424 PARAM-VALUE escaping: '"', '\' and ']' are escaped with a backslash.
std::string sd_escape(std::string_view value) {
    std::string out;
    for (const char c : value) {
        if (c == '"' || c == '\\' || c == ']') {
            out.push_back('\\');
        }
        out.push_back(c);
    }
    return out;
}

struct SslCtxFree {
    void operator()(SSL_CTX *p) const { SSL_CTX_free(p); }
};
struct SslFree {
    void operator()(SSL *p) const { SSL_free(p); }
};

std::string ssl_error() {
    const unsigned long e = ERR_get_error();
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    return e == 0 ? std::string("TLS error") : std::string(buf);
}

// One TLS connection to the receiver, blocking I/O on the forwarder's own thread.
class TlsStream {
  public:
    ~TlsStream() { close(); }

    bool open(const SyslogOptions &o, std::string *error) {
        close();
        ctx_.reset(SSL_CTX_new(TLS_client_method()));
        if (!ctx_ || SSL_CTX_set_min_proto_version(ctx_.get(), TLS1_2_VERSION) != 1 ||
            SSL_CTX_load_verify_locations(ctx_.get(), o.ca_file.c_str(), nullptr) != 1) {
            *error = "cannot load CA " + o.ca_file + ": " + ssl_error();
            return false;
        }
        SSL_CTX_set_verify(ctx_.get(), SSL_VERIFY_PEER, nullptr);
        if (!o.cert_file.empty() &&
            (SSL_CTX_use_certificate_chain_file(ctx_.get(), o.cert_file.c_str()) != 1 ||
             SSL_CTX_use_PrivateKey_file(ctx_.get(), o.key_file.c_str(), SSL_FILETYPE_PEM) != 1)) {
            *error = "cannot load client certificate: " + ssl_error();
            return false;
        }
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo *res = nullptr;
        const std::string port = std::to_string(o.port);
        if (getaddrinfo(o.host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
            *error = "cannot resolve " + o.host;
            return false;
        }
        for (addrinfo *ai = res; ai != nullptr && fd_ < 0; ai = ai->ai_next) {
            fd_ = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (fd_ < 0) {
                continue;
            }
            // Bounds connect(), the handshake and every write (Linux applies SO_SNDTIMEO to
            // connect too).
            const timeval timeout{kIoTimeoutSeconds, 0};
            ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
            ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
            if (::connect(fd_, ai->ai_addr, ai->ai_addrlen) != 0) {
                ::close(fd_);
                fd_ = -1;
            }
        }
        freeaddrinfo(res);
        if (fd_ < 0) {
            *error = "cannot connect to " + o.host + ":" + port + ": " + std::strerror(errno);
            return false;
        }
        ssl_.reset(SSL_new(ctx_.get()));
        const std::string &name = o.server_name.empty() ? o.host : o.server_name;
        in6_addr ip6{};
        in_addr ip4{};
        const bool is_ip = inet_pton(AF_INET, name.c_str(), &ip4) == 1 ||
                           inet_pton(AF_INET6, name.c_str(), &ip6) == 1;
        X509_VERIFY_PARAM *param = ssl_ ? SSL_get0_param(ssl_.get()) : nullptr;
        if (!ssl_ || param == nullptr ||
            (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str())
                   : SSL_set1_host(ssl_.get(), name.c_str())) != 1 ||
            (!is_ip && SSL_set_tlsext_host_name(ssl_.get(), name.c_str()) != 1) ||
            SSL_set_fd(ssl_.get(), fd_) != 1 || SSL_connect(ssl_.get()) != 1) {
            *error = "TLS handshake with " + name + " failed: " + ssl_error();
            close();
            return false;
        }
        return true;
    }

    bool write_all(const std::string &bytes) {
        size_t off = 0;
        while (off < bytes.size()) {
            size_t written = 0;
            if (SSL_write_ex(ssl_.get(), bytes.data() + off, bytes.size() - off, &written) != 1) {
                return false;
            }
            off += written;
        }
        return true;
    }

    bool is_open() const { return ssl_ != nullptr; }

    // Bytes written to the socket that the receiver's TCP has not acknowledged yet (SIOCOUTQ);
    // -1 when unknown.
    int unacknowledged_bytes() const {
        int pending = 0;
        if (fd_ < 0 || ::ioctl(fd_, SIOCOUTQ, &pending) != 0) {
            return -1;
        }
        return pending;
    }

    // A syslog receiver never sends: anything readable, a hang-up or an error means it closed
    // or reset the connection, and what was written since the last check may be lost.
    bool alive() const {
        if (fd_ < 0) {
            return false;
        }
        pollfd pfd{fd_, POLLIN | POLLRDHUP, 0};
        return ::poll(&pfd, 1, 0) == 0;
    }

    void close() {
        if (ssl_) {
            SSL_shutdown(ssl_.get());
        }
        ssl_.reset();
        if (fd_ >= 0) {
            ::close(fd_);
            fd_ = -1;
        }
    }

  private:
    std::unique_ptr<SSL_CTX, SslCtxFree> ctx_;
    std::unique_ptr<SSL, SslFree> ssl_;
    int fd_ = -1;
};

}  // namespace

bool parse_syslog_target(const std::string &text, SyslogOptions &options) {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 >= text.size()) {
        return false;
    }
    char *end = nullptr;
    const unsigned long port = std::strtoul(text.c_str() + colon + 1, &end, 10);
    if (*end != '\0' || port == 0 || port > 65535) {
        return false;
    }
    options.host = text.substr(0, colon);
    if (options.host.size() > 2 && options.host.front() == '[' && options.host.back() == ']') {
        options.host = options.host.substr(1, options.host.size() - 2);
    }
    options.port = static_cast<uint16_t>(port);
    return true;
}

std::string syslog_message(const audit::ChainedRecord &entry, const std::string &hostname,
                           int pid) {
    const audit::Record &r = entry.record;
    std::string out = "<" + std::to_string(kPri) + ">1 " + rfc3339(r.time_us) + " " +
                      (hostname.empty() ? "-" : hostname) + " ehrgate " + std::to_string(pid) +
                      " " + audit::kind_name(r.kind) + " [ehrgate@32473 seq=\"" +
                      std::to_string(entry.seq) + "\" record_id=\"" + sd_escape(r.record_id) +
                      "\" correlation_id=\"" + sd_escape(r.correlation_id) + "\"] ";
    out += audit::to_json(entry);
    return out;
}

std::string syslog_frame(const std::string &message) {
    return std::to_string(message.size()) + " " + message;
}

SyslogForwarder::SyslogForwarder(AuditStore &store, SyslogOptions options)
    : store_(store), options_(std::move(options)) {
    if (options_.hostname.empty()) {
        char name[256] = {};
        ::gethostname(name, sizeof name - 1);
        options_.hostname = name;
    }
}

SyslogForwarder::~SyslogForwarder() {
    stop();
}

void SyslogForwarder::start() {
    load_cursor();
    thread_ = std::thread([this] { run(); });
}

void SyslogForwarder::stop() {
    {
        std::lock_guard lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) {
        thread_.join();
    }
}

bool SyslogForwarder::load_cursor() {
    std::ifstream in(options_.cursor_path);
    uint64_t seq = 0;
    if (in >> seq) {
        cursor_ = seq;
        return true;
    }
    return false;
}

bool SyslogForwarder::store_cursor(uint64_t seq) {
    const std::string tmp = options_.cursor_path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        return false;
    }
    const std::string text = std::to_string(seq) + "\n";
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                    ::fsync(fd) == 0;
    ::close(fd);
    if (!ok || ::rename(tmp.c_str(), options_.cursor_path.c_str()) != 0) {
        return false;
    }
    cursor_ = seq;
    return true;
}

void SyslogForwarder::set_error(const std::string &error) {
    ++failures_;
    bool changed;
    {
        std::lock_guard lock(mutex_);
        changed = last_error_ != error;
        last_error_ = error;
    }
    if (changed) {
        log::warn("audit syslog forwarding: " + error);
    }
}

void SyslogForwarder::run() {
    TlsStream stream;
    const int pid = static_cast<int>(::getpid());
    for (;;) {
        {
            std::unique_lock lock(mutex_);
            if (stopping_) {
                return;
            }
        }
        // The previous batch counts as delivered only once the receiver's TCP has acknowledged
        // every byte of it and the connection is still alive (a write to a peer that just went
        // away succeeds locally): then the cursor moves. Until then nothing more is sent, so a
        // slow receiver holds the forwarder back instead of the cursor running ahead of it.
        if (stream.is_open() && written_seq_ > cursor_.load()) {
            const int unacknowledged = stream.unacknowledged_bytes();
            if (stream.alive() && unacknowledged > 0) {
                std::unique_lock lock(mutex_);
                wake_.wait_for(lock, kAckWait, [&] { return stopping_; });
                continue;
            }
            if (stream.alive()) {
                if (!store_cursor(written_seq_)) {
                    set_error("cannot persist the cursor at " + options_.cursor_path);
                }
            } else {
                set_error("receiver closed the connection; resending from seq " +
                          std::to_string(cursor_.load() + 1));
                stream.close();
            }
        }
        if (stream.is_open() && !stream.alive()) {
            stream.close();
        }
        if (!stream.is_open()) {
            written_seq_ = cursor_.load();
            std::string error;
            if (!stream.open(options_, &error)) {
                connected_ = false;
                set_error(error);
                std::unique_lock lock(mutex_);
                wake_.wait_for(lock, kRetryInterval, [&] { return stopping_; });
                continue;
            }
            connected_ = true;
            log::info("audit syslog forwarding connected to " + options_.host + ":" +
                      std::to_string(options_.port) + ", from seq " +
                      std::to_string(cursor_.load() + 1));
        }
        std::string batch;
        uint64_t last = written_seq_;
        size_t count = 0;
        StoreError store_error;
        store_.scan_after(
            last,
            [&](uint64_t seq, std::string_view value) {
                if (value.size() > audit::kHashSize) {
                    if (std::optional<audit::ChainedRecord> entry =
                            audit::canonical_decode(value.substr(audit::kHashSize))) {
                        batch += syslog_frame(syslog_message(*entry, options_.hostname, pid));
                    }
                }
                last = seq;
                return ++count < kBatchRecords;
            },
            &store_error);
        if (count == 0) {
            std::unique_lock lock(mutex_);
            wake_.wait_for(lock, kPollInterval, [&] { return stopping_; });
            continue;
        }
        if (!stream.write_all(batch)) {
            connected_ = false;
            set_error("send failed: " + ssl_error() + "; resending from seq " +
                      std::to_string(cursor_.load() + 1));
            stream.close();
            continue;
        }
        written_seq_ = last;
        forwarded_ += count;
        // Give the receiver a moment to reset a dead connection before the liveness check.
        std::unique_lock lock(mutex_);
        wake_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_; });
    }
}

std::string SyslogForwarder::status_json() const {
    std::string error;
    {
        std::lock_guard lock(mutex_);
        error = last_error_;
    }
    std::string out = "{\"target\":";
    json::append_string(out, options_.host + ":" + std::to_string(options_.port));
    out += ",\"connected\":" + std::string(connected_ ? "true" : "false") +
           ",\"cursor\":" + std::to_string(cursor_.load()) +
           ",\"forwarded\":" + std::to_string(forwarded_.load()) +
           ",\"failures\":" + std::to_string(failures_.load()) + ",\"last_error\":";
    json::append_string(out, error);
    return out + "}";
}

}  // namespace ehrgate::policyd
