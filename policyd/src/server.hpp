// policyd's libuv side: two Unix-socket listeners (the data socket nginx workers use, and the
// admin socket ehrgatectl uses), one Connection object per peer, signal handling.
//
// Handle ownership follows Node's HandleWrap: a C++ object owns its uv handle, handle->data
// points back at it, close() is idempotent, and the object is deleted only in the close callback,
// when libuv no longer references the handle's memory.
#pragma once

#include <uv.h>

#include <cstdint>
#include <list>
#include <memory>
#include <string>

#include "audit_log.hpp"
#include "dispatcher.hpp"
#include "ehrgate/protocol.hpp"
#include "policy_state.hpp"
#include "syslog_forwarder.hpp"

namespace ehrgate::policyd {

struct ServerOptions {
    std::string data_socket;
    unsigned data_socket_mode = 0660;
    std::string data_socket_group;  // empty: keep the process's group
    std::string admin_socket;
    unsigned admin_socket_mode = 0600;
    uint32_t max_frame = protocol::kDefaultMaxFrame;
    // Stop reading from a peer that does not drain its replies past this many queued bytes.
    size_t max_write_queue = size_t{64} << 20;
};

class Server;

class Connection {
  public:
    enum class Kind { Data, Admin };
    enum class State { Open, Closing };

    Connection(Server &server, Kind kind, uint64_t id, uint32_t max_frame);
    Connection(const Connection &) = delete;
    Connection &operator=(const Connection &) = delete;

    uv_stream_t *stream() { return reinterpret_cast<uv_stream_t *>(&pipe_); }
    uv_pipe_t *pipe() { return &pipe_; }
    Kind kind() const { return kind_; }
    uint64_t id() const { return id_; }
    const DataPeer &peer() const { return peer_; }

    bool start_reading();
    // Queues bytes for writing; the buffer is owned by the write request until its callback.
    void write(std::string bytes);
    // Flushes queued writes, then closes. Idempotent.
    void shutdown();
    // Closes at once. Idempotent; the object is deleted in the close callback.
    void close();

  private:
    static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
    static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
    static void on_write(uv_write_t *req, int status);
    static void on_shutdown(uv_shutdown_t *req, int status);
    static void on_close(uv_handle_t *handle);

    void process_frames();

    Server &server_;
    uv_pipe_t pipe_{};
    Kind kind_;
    uint64_t id_;
    State state_ = State::Open;
    bool reading_ = false;
    protocol::FrameDecoder decoder_;
    DataPeer peer_;
};

class Server {
  public:
    Server(uv_loop_t *loop, ServerOptions options, PolicyState &policy, Revocations &revocations);
    ~Server();

    // Binds both sockets and installs signal handlers. Returns false (after logging why) when a
    // socket cannot be bound, e.g. another policyd already serves it.
    bool start();
    // SIGTERM/SIGINT: stop accepting, flush replies, close every handle so uv_run returns.
    void stop();
    // SIGHUP and `ehrgatectl policy reload`.
    ReloadOutcome reload_policy();

    // Consent (issue 5): the store decisions and admin commands use; null: consent commands
    // fail and bundles with a consent section refuse patient requests.
    void set_consent_store(ConsentStore *consents) { consents_ = consents; }
    void set_consent_signer(const ConsentSigner *signer) { signer_ = signer; }

    uv_loop_t *loop() { return loop_; }
    const ServerOptions &options() const { return options_; }
    // audit (issue 7): where AuditAppend frames and policyd's own events go. Without it, appends
    // are refused (the worker answers 503 on audited locations) rather than silently dropped.
    void set_audit(AuditLog *audit) { audit_ = audit; }
    void set_syslog(const SyslogForwarder *syslog) { syslog_ = syslog; }
    AuditLog *audit() { return audit_; }

  private:
    friend class Connection;

    static void on_data_connection(uv_stream_t *listener, int status);
    static void on_admin_connection(uv_stream_t *listener, int status);
    static void on_signal(uv_signal_t *handle, int signum);

    bool listen_on(uv_pipe_t *listener, const std::string &path, unsigned mode,
                   const std::string &group, uv_connection_cb on_connection);
    void accept(uv_stream_t *listener, Connection::Kind kind);
    void forget(Connection *connection);
    void handle_admin_frame(Connection &connection, const protocol::FrameView &frame,
                            std::string &out);
    std::string status_json() const;
    void push_snapshot();
    void push_revocations();
    // Decision cache (issue 5): moves forward with every consent change, and across restarts
    // (it starts from the wall clock), so a worker never keeps a decision made before a change.
    uint64_t consent_epoch() const {
        return consent_epoch_base_ + (consents_ != nullptr ? consents_->epoch() : 0);
    }
    void push_consent_epoch();
    void revoke_token(const protocol::AdminRequest &request, protocol::AdminReply &reply);
    // audit (issue 7)
    void handle_audit_append(Connection &connection, const protocol::FrameView &frame,
                             std::string &out);
    Connection *find_connection(uint64_t id);
    // Consent admin commands (consent_admin.cpp). `actor` names the admin socket peer.
    bool handle_consent_admin(const protocol::AdminRequest &request, const std::string &actor,
                              protocol::AdminReply &reply);
    // Every durable consent change passes here once: log, counters, and a consent-change
    // record in the audit log.
    void on_consent_change(const ConsentChange &change);

    uv_loop_t *loop_;
    ServerOptions options_;
    PolicyState &policy_;
    Revocations &revocations_;
    uv_pipe_t data_listener_{};
    uv_pipe_t admin_listener_{};
    bool data_listening_ = false;
    bool admin_listening_ = false;
    uv_signal_t sigterm_{};
    uv_signal_t sigint_{};
    uv_signal_t sighup_{};
    bool stopping_ = false;
    uint64_t next_connection_id_ = 1;
    std::list<Connection *> connections_;
    DataCounters counters_;
    uint64_t reloads_ok_ = 0;
    uint64_t reloads_refused_ = 0;
    uint64_t started_at_ms_ = 0;
    AuditLog *audit_ = nullptr;  // audit (issue 7)
    const SyslogForwarder *syslog_ = nullptr;
    ConsentStore *consents_ = nullptr;  // consent (issue 5)
    const ConsentSigner *signer_ = nullptr;
    uint64_t consent_changes_ = 0;
    uint64_t consent_epoch_base_ = 0;  // wall clock µs at start
};

}  // namespace ehrgate::policyd
