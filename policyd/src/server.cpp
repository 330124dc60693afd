#include "server.hpp"

#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "ehrgate/json_text.hpp"
#include "log.hpp"

namespace ehrgate::policyd {

namespace {

using protocol::MessageType;

// libuv asks for a read buffer before every read; the loop is single-threaded and bytes are
// copied into the connection's decoder right away, so one buffer serves every connection.
constexpr size_t kReadBufferSize = 64 * 1024;
char g_read_buffer[kReadBufferSize];

struct WriteRequest {
    uv_write_t req{};
    std::string bytes;
};

enum class SocketProbe { Absent, Stale, InUse, NotASocket };

// Before binding, find out what is at the path: a live policyd must not be displaced, a stale
// socket from a crash can be replaced, and a regular file is never deleted.
SocketProbe probe_socket_path(const std::string &path) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        return SocketProbe::Absent;
    }
    if (!S_ISSOCK(st.st_mode)) {
        return SocketProbe::NotASocket;
    }
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return SocketProbe::Stale;
    }
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    const bool live = ::connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) == 0;
    ::close(fd);
    return live ? SocketProbe::InUse : SocketProbe::Stale;
}

}  // namespace

// ---- Connection ------------------------------------------------------------------------------

Connection::Connection(Server &server, Kind kind, uint64_t id, uint32_t max_frame)
    : server_(server), kind_(kind), id_(id), decoder_(max_frame) {
    uv_pipe_init(server.loop(), &pipe_, 0);
    pipe_.data = this;
}

bool Connection::start_reading() {
    if (reading_ || state_ != State::Open) {
        return reading_;
    }
    reading_ = uv_read_start(stream(), on_alloc, on_read) == 0;
    return reading_;
}

void Connection::on_alloc(uv_handle_t *, size_t, uv_buf_t *buf) {
    *buf = uv_buf_init(g_read_buffer, kReadBufferSize);
}

void Connection::on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
    auto *self = static_cast<Connection *>(stream->data);
    if (nread < 0) {
        if (nread != UV_EOF) {
            log::warn(std::string("connection read error: ") +
                      uv_strerror(static_cast<int>(nread)));
        }
        self->close();
        return;
    }
    if (nread == 0 || self->state_ != State::Open) {
        return;
    }
    self->decoder_.feed(std::string_view(buf->base, static_cast<size_t>(nread)));
    self->process_frames();
}

void Connection::process_frames() {
    // All replies to one read go out in one write: pipelining workers get batched answers.
    std::string out;
    while (std::optional<protocol::FrameView> frame = decoder_.next()) {
        if (kind_ == Kind::Admin) {
            server_.handle_admin_frame(*this, *frame, out);
            continue;
        }
        if (frame->header.type == MessageType::AuditAppend) {  // audit (issue 7)
            server_.handle_audit_append(*this, *frame, out);
            continue;
        }
        if (handle_data_frame(server_.policy_, *frame, peer_, server_.counters_, out,
                              &server_.revocations_, server_.consents_, server_.signer_,
                              server_.consent_epoch()) == DispatchResult::CloseConnection) {
            write(std::move(out));
            shutdown();
            return;
        }
    }
    if (decoder_.error() != protocol::FrameError::None) {
        // Framing can no longer be trusted: tell the peer why, then hang up.
        ++server_.counters_.rejected_frames;
        log::warn(std::string("closing connection: ") +
                  protocol::frame_error_name(decoder_.error()));
        append_error_frame(out, 0, "bad-frame", protocol::frame_error_name(decoder_.error()));
        write(std::move(out));
        shutdown();
        return;
    }
    if (!out.empty()) {
        write(std::move(out));
    }
}

void Connection::write(std::string bytes) {
    if (bytes.empty() || state_ != State::Open) {
        return;
    }
    auto *request = new WriteRequest;
    request->bytes = std::move(bytes);
    request->req.data = this;
    const uv_buf_t buf =
        uv_buf_init(request->bytes.data(), static_cast<unsigned>(request->bytes.size()));
    if (uv_write(&request->req, stream(), &buf, 1, on_write) != 0) {
        delete request;
        close();
        return;
    }
    if (uv_stream_get_write_queue_size(stream()) > server_.options().max_write_queue && reading_) {
        uv_read_stop(stream());
        reading_ = false;
    }
}

void Connection::on_write(uv_write_t *req, int status) {
    std::unique_ptr<WriteRequest> request(reinterpret_cast<WriteRequest *>(req));
    auto *self = static_cast<Connection *>(req->data);
    if (status != 0) {
        if (status != UV_ECANCELED) {
            log::warn(std::string("connection write error: ") + uv_strerror(status));
        }
        self->close();
        return;
    }
    if (!self->reading_ && uv_stream_get_write_queue_size(self->stream()) == 0) {
        self->start_reading();
    }
}

void Connection::shutdown() {
    if (state_ != State::Open) {
        return;
    }
    state_ = State::Closing;
    if (reading_) {
        uv_read_stop(stream());
        reading_ = false;
    }
    auto *request = new uv_shutdown_t;
    request->data = this;
    if (uv_shutdown(request, stream(), on_shutdown) != 0) {
        delete request;
        close();
    }
}

void Connection::on_shutdown(uv_shutdown_t *req, int) {
    auto *self = static_cast<Connection *>(req->data);
    delete req;
    self->close();
}

void Connection::close() {
    if (uv_is_closing(reinterpret_cast<uv_handle_t *>(&pipe_))) {
        return;
    }
    state_ = State::Closing;
    reading_ = false;
    uv_close(reinterpret_cast<uv_handle_t *>(&pipe_), on_close);
}

void Connection::on_close(uv_handle_t *handle) {
    std::unique_ptr<Connection> self(static_cast<Connection *>(handle->data));
    self->server_.forget(self.get());
}

// ---- Server ----------------------------------------------------------------------------------

Server::Server(uv_loop_t *loop, ServerOptions options, PolicyState &policy,
               Revocations &revocations)
    : loop_(loop), options_(std::move(options)), policy_(policy), revocations_(revocations) {}

Server::~Server() = default;

bool Server::listen_on(uv_pipe_t *listener, const std::string &path, unsigned mode,
                       const std::string &group, uv_connection_cb on_connection) {
    switch (probe_socket_path(path)) {
        case SocketProbe::InUse:
            log::error("socket " + path + " is served by another process (another policyd?)");
            return false;
        case SocketProbe::NotASocket:
            log::error("refusing to replace " + path + ": it exists and is not a socket");
            return false;
        case SocketProbe::Stale:
            ::unlink(path.c_str());
            break;
        case SocketProbe::Absent:
            break;
    }
    uv_pipe_init(loop_, listener, 0);
    listener->data = this;
    // Create the socket file with no access for anyone but us, then widen to the configured
    // mode: there is never a moment when it is more open than asked.
    const mode_t previous_umask = ::umask(0177);
    const int bind_rc = uv_pipe_bind(listener, path.c_str());
    ::umask(previous_umask);
    if (bind_rc != 0) {
        log::error("cannot bind " + path + ": " + uv_strerror(bind_rc));
        uv_close(reinterpret_cast<uv_handle_t *>(listener), nullptr);
        return false;
    }
    if (::chmod(path.c_str(), static_cast<mode_t>(mode)) != 0) {
        log::error("cannot chmod " + path + ": " + std::strerror(errno));
        uv_close(reinterpret_cast<uv_handle_t *>(listener), nullptr);
        return false;
    }
    if (!group.empty()) {
        const struct group *gr = ::getgrnam(group.c_str());
        if (gr == nullptr || ::chown(path.c_str(), static_cast<uid_t>(-1), gr->gr_gid) != 0) {
            log::error("cannot give " + path + " to group " + group);
            uv_close(reinterpret_cast<uv_handle_t *>(listener), nullptr);
            return false;
        }
    }
    const int listen_rc = uv_listen(reinterpret_cast<uv_stream_t *>(listener), 511, on_connection);
    if (listen_rc != 0) {
        log::error("cannot listen on " + path + ": " + uv_strerror(listen_rc));
        uv_close(reinterpret_cast<uv_handle_t *>(listener), nullptr);
        return false;
    }
    return true;
}

bool Server::start() {
    started_at_ms_ = uv_now(loop_);
    consent_epoch_base_ =
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count());
    data_listening_ = listen_on(&data_listener_, options_.data_socket, options_.data_socket_mode,
                                options_.data_socket_group, on_data_connection);
    if (!data_listening_) {
        return false;
    }
    admin_listening_ = listen_on(&admin_listener_, options_.admin_socket,
                                 options_.admin_socket_mode, "", on_admin_connection);
    if (!admin_listening_) {
        stop();
        return false;
    }
    struct {
        uv_signal_t *handle;
        int signum;
    } const signals[] = {{&sigterm_, SIGTERM}, {&sigint_, SIGINT}, {&sighup_, SIGHUP}};
    for (const auto &s : signals) {
        uv_signal_init(loop_, s.handle);
        s.handle->data = this;
        uv_signal_start(s.handle, on_signal, s.signum);
    }
    log::info("listening on " + options_.data_socket + " (data) and " + options_.admin_socket +
              " (admin)");
    return true;
}

void Server::stop() {
    if (stopping_) {
        return;
    }
    stopping_ = true;
    // Audit first: records already accepted are written and acknowledged while the connections
    // are still open to carry the acks; then a final checkpoint covers the head.
    if (audit_ != nullptr) {
        audit_->stop();
    }
    if (data_listening_) {
        uv_close(reinterpret_cast<uv_handle_t *>(&data_listener_), nullptr);
        ::unlink(options_.data_socket.c_str());
        data_listening_ = false;
    }
    if (admin_listening_) {
        uv_close(reinterpret_cast<uv_handle_t *>(&admin_listener_), nullptr);
        ::unlink(options_.admin_socket.c_str());
        admin_listening_ = false;
    }
    // Replies already computed are flushed by shutdown(); nothing new is read.
    for (Connection *connection : std::list<Connection *>(connections_)) {
        connection->shutdown();
    }
    for (uv_signal_t *handle : {&sigterm_, &sigint_, &sighup_}) {
        if (handle->data != nullptr && !uv_is_closing(reinterpret_cast<uv_handle_t *>(handle))) {
            uv_close(reinterpret_cast<uv_handle_t *>(handle), nullptr);
        }
    }
}

void Server::on_signal(uv_signal_t *handle, int signum) {
    auto *self = static_cast<Server *>(handle->data);
    if (signum == SIGHUP) {
        self->reload_policy();
        return;
    }
    log::info(std::string("received ") + (signum == SIGTERM ? "SIGTERM" : "SIGINT") +
              ", draining and exiting");
    self->stop();
}

void Server::on_data_connection(uv_stream_t *listener, int status) {
    auto *self = static_cast<Server *>(listener->data);
    if (status == 0) {
        self->accept(listener, Connection::Kind::Data);
    }
}

void Server::on_admin_connection(uv_stream_t *listener, int status) {
    auto *self = static_cast<Server *>(listener->data);
    if (status == 0) {
        self->accept(listener, Connection::Kind::Admin);
    }
}

void Server::accept(uv_stream_t *listener, Connection::Kind kind) {
    auto *connection = new Connection(*this, kind, next_connection_id_++, options_.max_frame);
    connections_.push_back(connection);
    if (uv_accept(listener, connection->stream()) != 0 || !connection->start_reading()) {
        connection->close();
        return;
    }
    if (kind == Connection::Kind::Data) {
        log::debug("worker connected");
    }
}

void Server::forget(Connection *connection) {
    connections_.remove(connection);
}

ReloadOutcome Server::reload_policy() {
    ReloadOutcome outcome = policy_.reload();
    switch (outcome.kind) {
        case ReloadOutcome::Kind::Activated:
            ++reloads_ok_;
            log::info(outcome.message);
            push_snapshot();
            if (audit_ != nullptr) {
                audit_->append_event(audit::Kind::PolicyReload,
                                     "activated version " + policy_.snapshot().bundle.version +
                                         " serial " + std::to_string(policy_.snapshot().serial) +
                                         " digest " + policy_.snapshot().digest_hex);
            }
            break;
        case ReloadOutcome::Kind::Unchanged:
            log::info(outcome.message);
            if (audit_ != nullptr) {
                audit_->append_event(audit::Kind::PolicyReload,
                                     "unchanged version " + policy_.snapshot().bundle.version);
            }
            break;
        case ReloadOutcome::Kind::Refused:
            ++reloads_refused_;
            log::error(outcome.message + "; previous policy keeps serving");
            if (audit_ != nullptr) {
                audit_->append_event(audit::Kind::PolicyReload, "refused: " + outcome.message);
            }
            for (const policy::Diagnostic &d : outcome.diagnostics) {
                log::error("  " + d.to_string());
            }
            break;
    }
    return outcome;
}

void Server::push_snapshot() {
    std::string frame;
    protocol::encode_frame(frame, MessageType::PolicySnapshot, protocol::kPushRequestId,
                           policy_.encoded());
    for (Connection *connection : connections_) {
        if (connection->kind() == Connection::Kind::Data) {
            connection->write(frame);
        }
    }
}

void Server::push_consent_epoch() {
    std::string frame;
    protocol::encode_frame(frame, MessageType::ConsentEpoch, protocol::kPushRequestId,
                           protocol::encode(protocol::ConsentEpoch{consent_epoch()}));
    for (Connection *connection : connections_) {
        if (connection->kind() == Connection::Kind::Data) {
            connection->write(frame);
        }
    }
}

void Server::push_revocations() {
    std::string frame;
    protocol::encode_frame(frame, MessageType::RevocationList, protocol::kPushRequestId,
                           revocations_.encoded());
    for (Connection *connection : connections_) {
        if (connection->kind() == Connection::Kind::Data) {
            connection->write(frame);
        }
    }
}

namespace {

// Token ids and client ids are opaque, but they end up in logs and JSON: printable ASCII only.
bool valid_identifier(std::string_view value) {
    if (value.empty() || value.size() > 256)
        return false;
    for (const char ch : value) {
        if (ch <= 0x20 || ch >= 0x7f || ch == '"' || ch == '\\')
            return false;
    }
    return true;
}

}  // namespace

void Server::revoke_token(const protocol::AdminRequest &request, protocol::AdminReply &reply) {
    const std::string_view jti = request.arg("jti");
    const std::string_view client = request.arg("client");
    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    if (jti.empty() == client.empty()) {
        reply.message = "token-revoke needs exactly one of jti or client";
        return;
    }
    if (!valid_identifier(jti.empty() ? client : jti)) {
        reply.message =
            "invalid identifier: 1-256 printable ASCII characters without spaces or quotes";
        return;
    }
    StoreError error;
    StoreStatus status;
    if (!jti.empty()) {
        int64_t until = now + Revocations::kDefaultJtiRetentionSeconds;
        if (const std::string_view text = request.arg("until"); !text.empty()) {
            char *end = nullptr;
            const std::string owned(text);
            until = std::strtoll(owned.c_str(), &end, 10);
            if (*end != '\0' || until <= now) {
                reply.message = "until must be a future unix time in seconds";
                return;
            }
        }
        status = revocations_.revoke_jti(std::string(jti), until, &error);
    } else {
        status = revocations_.revoke_client(std::string(client), now, &error);
    }
    if (status != StoreStatus::Ok) {
        // Not recorded durably means not revoked: say so rather than pretend.
        reply.message = std::string("revocation not recorded: ") + store_status_name(status) +
                        " (" + error.detail + ")";
        return;
    }
    push_revocations();
    if (audit_ != nullptr) {
        // The jti is recorded as its hash, like on access records, so the two can be joined.
        audit_->append_event(
            audit::Kind::Revocation,
            jti.empty() ? "revoked every token of the client issued until now"
                        : "revoked one token (jti_hash " + audit::hex(audit::sha256(jti)) + ")",
            std::string(client));
    }
    log::info(std::string("token revocation recorded (") + (jti.empty() ? "client" : "jti") +
              "), pushed to workers");
    reply.ok = true;
    reply.message = jti.empty() ? "every token of client " + std::string(client) +
                                      " issued until now is revoked"
                                : "token " + std::string(jti) + " revoked";
    reply.json = "{\"revocations_serial\":" + std::to_string(revocations_.serial()) +
                 ",\"revoked_jtis\":" + std::to_string(revocations_.jti_count()) +
                 ",\"revoked_clients\":" + std::to_string(revocations_.client_count()) + "}";
}

std::string Server::status_json() const {
    const policy::Snapshot &snapshot = policy_.snapshot();
    std::string out = "{\"policy\":{\"version\":";
    json::append_string(out, snapshot.bundle.version);
    out += ",\"serial\":" + std::to_string(snapshot.serial) + ",\"digest\":";
    json::append_string(out, snapshot.digest_hex);
    out += ",\"source\":";
    json::append_string(out, policy_.source_path());
    out += ",\"activated_at\":" + std::to_string(policy_.activated_at_unix()) +
           ",\"reloads_ok\":" + std::to_string(reloads_ok_) +
           ",\"reloads_refused\":" + std::to_string(reloads_refused_) + "},\"workers\":[";
    bool first = true;
    for (const Connection *connection : connections_) {
        if (connection->kind() != Connection::Kind::Data) {
            continue;
        }
        const DataPeer &peer = connection->peer();
        out += first ? "" : ",";
        first = false;
        out += "{\"pid\":" + std::to_string(peer.worker_pid) +
               ",\"policy_serial\":" + std::to_string(peer.acked_serial) +
               ",\"decisions\":" + std::to_string(peer.decisions) + "}";
    }
    out += "],\"decisions\":{\"permit\":" + std::to_string(counters_.permits) +
           ",\"deny\":" + std::to_string(counters_.denies) +
           "},\"rejected_frames\":" + std::to_string(counters_.rejected_frames) +
           ",\"uptime_ms\":" + std::to_string(uv_now(loop_) - started_at_ms_) +
           // Consent (issue 5): break_glass counts alerts.
           ",\"consent\":{\"records\":" + std::to_string(consents_ ? consents_->size() : 0) +
           ",\"epoch\":" + std::to_string(consents_ ? consents_->epoch() : 0) +
           ",\"changes\":" + std::to_string(consent_changes_) +
           ",\"denies\":" + std::to_string(counters_.consent_denies) +
           ",\"break_glass\":" + std::to_string(counters_.break_glass) + "}";
    // audit (issue 7): storage problems are visible here, not only in the log.
    out += ",\"audit\":" + (audit_ != nullptr ? audit_->status_json() : std::string("null"));
    out +=
        ",\"audit_syslog\":" + (syslog_ != nullptr ? syslog_->status_json() : std::string("null"));
    out += "}";
    return out;
}

namespace {

// Who is on the other end of an admin connection, from the kernel (SO_PEERCRED), for the
// consent history: "uid:1000(alice)".
std::string peer_actor(Connection &connection) {
    uv_os_fd_t fd;
    if (uv_fileno(reinterpret_cast<uv_handle_t *>(connection.pipe()), &fd) != 0) {
        return "unknown";
    }
    struct ucred cred {};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        return "unknown";
    }
    std::string actor = "uid:" + std::to_string(cred.uid);
    char buf[1024];
    struct passwd pw {};
    struct passwd *found = nullptr;
    if (::getpwuid_r(cred.uid, &pw, buf, sizeof buf, &found) == 0 && found != nullptr) {
        actor += "(" + std::string(found->pw_name) + ")";
    }
    return actor;
}

}  // namespace

void Server::handle_admin_frame(Connection &connection, const protocol::FrameView &frame,
                                std::string &out) {
    const uint32_t id = frame.header.request_id;
    std::optional<protocol::AdminRequest> request;
    if (frame.header.type == MessageType::AdminRequest) {
        request = protocol::decode_admin_request(frame.body);
    }
    if (!request) {
        append_error_frame(out, id, "bad-request", "the admin socket accepts admin requests only");
        connection.write(std::move(out));
        out.clear();
        connection.shutdown();
        return;
    }
    protocol::AdminReply reply;
    // audit (issue 7): operator commands are part of the record (reloads and revocations get
    // their own kinds as well). ping is liveness, not an action.
    if (audit_ != nullptr && request->command != "ping") {
        std::string detail = "command " + request->command;
        for (const auto &[name, value] : request->args) {
            detail += " " + name +
                      (name == "jti" ? "_sha256=" + audit::hex(audit::sha256(value)) : "=" + value);
        }
        audit_->append_event(audit::Kind::Admin, std::move(detail));
    }
    if (request->command == "ping") {
        reply.ok = true;
        reply.message = "pong";
        reply.json = "{}";
    } else if (request->command == "status") {
        reply.ok = true;
        reply.message = "ok";
        reply.json = status_json();
    } else if (request->command == "policy-reload") {
        const ReloadOutcome outcome = reload_policy();
        reply.ok = outcome.kind != ReloadOutcome::Kind::Refused;
        reply.message = outcome.message;
        reply.json = "{\"outcome\":";
        json::append_string(reply.json, outcome.kind == ReloadOutcome::Kind::Activated ? "activated"
                                        : outcome.kind == ReloadOutcome::Kind::Unchanged
                                            ? "unchanged"
                                            : "refused");
        reply.json += ",\"version\":";
        json::append_string(reply.json, policy_.snapshot().bundle.version);
        reply.json +=
            ",\"serial\":" + std::to_string(policy_.snapshot().serial) + ",\"diagnostics\":[";
        for (size_t i = 0; i < outcome.diagnostics.size(); ++i) {
            reply.json += i == 0 ? "" : ",";
            json::append_string(reply.json, outcome.diagnostics[i].to_string());
        }
        reply.json += "]}";
    } else if (request->command == "token-revoke") {
        revoke_token(*request, reply);
    } else if (handle_consent_admin(*request, peer_actor(connection), reply)) {
        // consent-* (issue 5)
    } else {
        reply.ok = false;
        reply.message = "unknown admin command \"" + request->command +
                        "\"; known: ping, status, policy-reload, token-revoke, consent-grant, "
                        "consent-revoke, consent-list, consent-show, consent-import";
        reply.json = "{}";
    }
    protocol::encode_frame(out, MessageType::AdminReply, id, protocol::encode(reply));
}

// ---- audit (issue 7) --------------------------------------------------------------------------

Connection *Server::find_connection(uint64_t id) {
    for (Connection *connection : connections_) {
        if (connection->id() == id) {
            return connection;
        }
    }
    return nullptr;
}

void Server::handle_audit_append(Connection &connection, const protocol::FrameView &frame,
                                 std::string &out) {
    const uint32_t request_id = frame.header.request_id;
    std::optional<protocol::AuditAppend> append = protocol::decode_audit_append(frame.body);
    if (!append) {
        ++counters_.rejected_frames;
        append_error_frame(out, request_id, "bad-request",
                           "undecodable audit append (every record needs a record_id)");
        return;
    }
    std::vector<std::string> ids;
    ids.reserve(append->records.size());
    for (const audit::Record &r : append->records) {
        ids.push_back(r.record_id);
    }
    if (audit_ == nullptr) {
        protocol::AuditAck ack{false, std::move(ids), "audit-unavailable",
                               "policyd runs without an audit log"};
        protocol::encode_frame(out, MessageType::AuditAck, request_id, protocol::encode(ack));
        return;
    }
    // The connection may be gone when the writer is done: look it up by id, never keep a pointer.
    const uint64_t connection_id = connection.id();
    audit_->append(std::move(append->records),
                   [this, connection_id, request_id,
                    ids = std::move(ids)](const AuditLog::Result &result) mutable {
                       Connection *target = find_connection(connection_id);
                       if (target == nullptr) {
                           return;  // the worker redelivers; the record id deduplicates
                       }
                       protocol::AuditAck ack;
                       ack.ok = result.status == StoreStatus::Ok;
                       ack.record_ids = std::move(ids);
                       if (!ack.ok) {
                           ack.error = store_status_name(result.status);
                           ack.message = "audit records not written: " + ack.error;
                       }
                       std::string frame_bytes;
                       protocol::encode_frame(frame_bytes, MessageType::AuditAck, request_id,
                                              protocol::encode(ack));
                       target->write(std::move(frame_bytes));
                   });
}

}  // namespace ehrgate::policyd
