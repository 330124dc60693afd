// Forwards the audit log to an ATNA-style audit repository: syslog over TLS (RFC 5425 framing,
// RFC 5424 messages), at least once, with a persisted cursor.
//
// A dedicated thread reads records after the cursor from the audit LMDB (read transactions
// never block the writer) and sends them. Syslog has no application-level ack, and a write to a
// peer that just went away succeeds locally, so a written batch is confirmed only when the
// receiver's TCP has acknowledged all of it (the socket's SIOCOUTQ is 0) and the connection is
// still seen alive afterwards; then the cursor is stored
// (<data-dir>/audit-syslog.cursor, written to a temporary file, fsynced, renamed). After a crash
// or a lost connection it resumes from the stored cursor, so a record may be sent twice but is
// not skipped; the receiver can deduplicate by the record id in the structured data.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "audit_log.hpp"

namespace ehrgate::policyd {

struct SyslogOptions {
    std::string host;  // empty: forwarding off
    uint16_t port = 6514;
    std::string ca_file;    // verifies the receiver's certificate (required)
    std::string cert_file;  // optional client certificate (mutual TLS)
    std::string key_file;
    std::string server_name;  // name or IP the receiver's certificate must carry; default host
    std::string cursor_path;
    std::string hostname;  // HOSTNAME field; default gethostname()
};

// "HOST:PORT" -> options.host/port. False when malformed.
bool parse_syslog_target(const std::string &text, SyslogOptions &options);

// One RFC 5424 message for a record: <PRI>1 TIMESTAMP HOSTNAME ehrgate PROCID KIND [SD] JSON.
std::string syslog_message(const audit::ChainedRecord &entry, const std::string &hostname, int pid);
// RFC 5425 octet-counting frame: "LEN SP MSG".
std::string syslog_frame(const std::string &message);

class SyslogForwarder {
  public:
    SyslogForwarder(AuditStore &store, SyslogOptions options);
    ~SyslogForwarder();
    SyslogForwarder(const SyslogForwarder &) = delete;
    SyslogForwarder &operator=(const SyslogForwarder &) = delete;

    void start();
    void stop();
    std::string status_json() const;

  private:
    void run();
    bool load_cursor();
    bool store_cursor(uint64_t seq);
    void set_error(const std::string &error);

    AuditStore &store_;
    SyslogOptions options_;
    std::thread thread_;
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    bool stopping_ = false;
    std::atomic<uint64_t> cursor_{0};  // persisted: everything up to here was delivered
    uint64_t written_seq_ = 0;         // written on the current connection, not yet confirmed
    std::atomic<uint64_t> forwarded_{0};
    std::atomic<uint64_t> failures_{0};
    std::atomic<bool> connected_{false};
    std::string last_error_;
};

}  // namespace ehrgate::policyd
