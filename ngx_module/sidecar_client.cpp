#include "sidecar_client.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

namespace ehrgate::ngx {

namespace {

constexpr unsigned kWedgedAfterTimeouts = 3;
constexpr uint32_t kMaxSlots = 0xfffe;  // ids are (generation << 16) | (index + 1)

uint32_t make_id(uint16_t generation, uint32_t index) {
    return (uint32_t{generation} << 16) | (index + 1);
}

}  // namespace

SidecarClient::SidecarClient(const SidecarSettings &settings, ngx_log_t *log)
    : settings_(settings),
      log_(log),
      backoff_(settings.reconnect_min),
      decoder_(std::make_unique<protocol::FrameDecoder>(settings.max_frame)) {
    const uint32_t slots = std::min(settings.max_pending, kMaxSlots);
    slots_.resize(slots);
    free_slots_.reserve(slots);
    for (uint32_t i = slots; i > 0; --i) {
        free_slots_.push_back(i - 1);
    }
    flush_event_.handler = on_flush_event;
    flush_event_.data = this;
    flush_event_.log = log_;
    reconnect_timer_.handler = on_reconnect_timer;
    reconnect_timer_.data = this;
    reconnect_timer_.log = log_;
    // A pending reconnect must not keep a gracefully exiting worker alive.
    reconnect_timer_.cancelable = 1;
}

SidecarClient::~SidecarClient() {
    if (flush_event_.posted) {
        ngx_delete_posted_event(&flush_event_);
    }
    if (reconnect_timer_.timer_set) {
        ngx_del_timer(&reconnect_timer_);
    }
    if (connection_ != nullptr) {
        ngx_close_connection(connection_);
        connection_ = nullptr;
    }
}

void SidecarClient::start() {
    connect();
}

// Unix-socket connects complete (or fail) immediately, so there is no in-progress state. We do
// the connect ourselves rather than through ngx_event_connect_peer so that a policyd that is
// down is logged once per outage, not at "crit" on every retry.
void SidecarClient::connect() {
    const ngx_socket_t fd = ngx_socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd == (ngx_socket_t)-1) {
        ngx_log_error(NGX_LOG_ERR, log_, ngx_socket_errno, "ehrgate: socket() for policyd failed");
        schedule_reconnect();
        return;
    }
    if (ngx_nonblocking(fd) == -1 ||
        ::connect(fd, settings_.address.sockaddr, settings_.address.socklen) == -1) {
        const ngx_err_t err = ngx_socket_errno;
        ngx_close_socket(fd);
        if (!logged_unreachable_) {
            ngx_log_error(NGX_LOG_ERR, log_, err,
                          "ehrgate: policyd unreachable at \"%V\"; protected locations answer 503 "
                          "until it is back",
                          &settings_.address.name);
            logged_unreachable_ = true;
        }
        schedule_reconnect();
        return;
    }
    ngx_connection_t *c = ngx_get_connection(fd, log_);
    if (c == nullptr) {
        ngx_close_socket(fd);
        schedule_reconnect();
        return;
    }
    c->recv = ngx_recv;
    c->send = ngx_send;
    c->log = log_;
    c->read->log = log_;
    c->write->log = log_;
    c->data = this;
    c->read->handler = on_read_event;
    c->write->handler = on_write_event;
    // Connected unix stream sockets are writable at once; reads wait for the event loop.
    c->write->ready = 1;
    if (ngx_handle_read_event(c->read, 0) != NGX_OK ||
        ngx_handle_write_event(c->write, 0) != NGX_OK) {
        ngx_close_connection(c);
        schedule_reconnect();
        return;
    }
    connection_ = c;
    state_ = State::Connected;
    backoff_ = settings_.reconnect_min;
    consecutive_timeouts_ = 0;
    logged_unreachable_ = false;
    const ngx_uint_t level = ever_connected_ ? NGX_LOG_NOTICE : NGX_LOG_INFO;
    ngx_log_error(level, log_, 0, "ehrgate: connected to policyd at \"%V\"",
                  &settings_.address.name);
    ever_connected_ = true;
    snapshot_requested_ = false;
    request_snapshot();
    // Revocations pushed while we were away are unknown: refuse bearer tokens until the current
    // list is in (it arrives on this connection before any decision reply we wait for).
    revocations_current_ = false;
    call(protocol::MessageType::RevocationFetch, protocol::empty_body(), on_revocations, this);
    // Send now: connect() runs from init_process and from timers, and an event posted there
    // would wait for the next epoll wakeup, which on an idle worker may be much later.
    flush();
}

void SidecarClient::schedule_reconnect() {
    state_ = State::Disconnected;
    if (!reconnect_timer_.timer_set) {
        ngx_add_timer(&reconnect_timer_, backoff_);
    }
    backoff_ = std::min(backoff_ * 2, settings_.reconnect_max);
}

void SidecarClient::on_reconnect_timer(ngx_event_t *ev) {
    auto *self = static_cast<SidecarClient *>(ev->data);
    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }
    self->connect();
}

void SidecarClient::disconnect(const char *why) {
    if (state_ != State::Connected) {
        return;
    }
    ngx_log_error(NGX_LOG_WARN, log_, 0, "ehrgate: dropping policyd connection: %s", why);
    ngx_close_connection(connection_);
    connection_ = nullptr;
    state_ = State::Disconnected;
    heard_since_connect_ = false;
    output_.clear();
    output_sent_ = 0;
    decoder_ = std::make_unique<protocol::FrameDecoder>(settings_.max_frame);
    if (flush_event_.posted) {
        ngx_delete_posted_event(&flush_event_);
    }
    // Complete the calls only after the table is consistent: a completion resumes its request,
    // which may well call back into this object.
    std::vector<std::pair<CallCompletion, void *>> orphans;
    for (uint32_t i = 0; i < slots_.size(); ++i) {
        Slot &slot = slots_[i];
        if (slot.in_use) {
            orphans.emplace_back(slot.completion, slot.data);
            slot.in_use = false;
            ++slot.generation;
            free_slots_.push_back(i);
        }
    }
    schedule_reconnect();
    for (const auto &[completion, data] : orphans) {
        completion(data, CallOutcome::Disconnected, nullptr);
    }
}

SidecarClient::Slot *SidecarClient::slot_for(uint32_t id) {
    const uint32_t index = (id & 0xffff) - 1;
    if ((id & 0xffff) == 0 || index >= slots_.size()) {
        return nullptr;
    }
    Slot &slot = slots_[index];
    if (!slot.in_use || slot.generation != static_cast<uint16_t>(id >> 16)) {
        return nullptr;
    }
    return &slot;
}

uint32_t SidecarClient::call(protocol::MessageType type, std::string_view body,
                             CallCompletion completion, void *data) {
    if (state_ != State::Connected || free_slots_.empty() ||
        output_.size() - output_sent_ > settings_.max_output_bytes) {
        return 0;
    }
    const uint32_t index = free_slots_.back();
    free_slots_.pop_back();
    Slot &slot = slots_[index];
    slot.in_use = true;
    slot.completion = completion;
    slot.data = data;
    const uint32_t id = make_id(slot.generation, index);
    protocol::encode_frame(output_, type, id, body);
    // Batch: every call made while handling this round of events goes out in one send().
    if (!flush_event_.posted) {
        ngx_post_event(&flush_event_, &ngx_posted_events);
    }
    return id;
}

void SidecarClient::cancel(uint32_t id) {
    Slot *slot = slot_for(id);
    if (slot == nullptr) {
        return;
    }
    slot->in_use = false;
    ++slot->generation;
    free_slots_.push_back(static_cast<uint32_t>(slot - slots_.data()));
}

void SidecarClient::note_timeout() {
    if (++consecutive_timeouts_ >= kWedgedAfterTimeouts) {
        disconnect("policyd stopped answering");
    }
}

void SidecarClient::on_flush_event(ngx_event_t *ev) {
    static_cast<SidecarClient *>(ev->data)->flush();
}

void SidecarClient::on_write_event(ngx_event_t *ev) {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    static_cast<SidecarClient *>(c->data)->flush();
}

void SidecarClient::flush() {
    if (state_ != State::Connected) {
        return;
    }
    while (output_sent_ < output_.size()) {
        const ssize_t n = connection_->send(
            connection_, reinterpret_cast<u_char *>(output_.data()) + output_sent_,
            output_.size() - output_sent_);
        if (n == NGX_AGAIN) {
            // The write event fires when the socket drains.
            if (ngx_handle_write_event(connection_->write, 0) != NGX_OK) {
                disconnect("cannot wait for the socket to drain");
            }
            return;
        }
        if (n == NGX_ERROR || n <= 0) {
            disconnect("write failed");
            return;
        }
        output_sent_ += static_cast<size_t>(n);
    }
    output_.clear();
    output_sent_ = 0;
}

void SidecarClient::on_read_event(ngx_event_t *ev) {
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    static_cast<SidecarClient *>(c->data)->read_available();
}

void SidecarClient::read_available() {
    u_char buffer[64 * 1024];
    for (;;) {
        if (state_ != State::Connected) {
            return;
        }
        const ssize_t n = connection_->recv(connection_, buffer, sizeof buffer);
        if (n == NGX_AGAIN) {
            break;
        }
        if (n == 0) {
            disconnect("policyd closed the connection");
            return;
        }
        if (n == NGX_ERROR) {
            disconnect("read failed");
            return;
        }
        decoder_->feed(std::string_view(reinterpret_cast<char *>(buffer), static_cast<size_t>(n)));
        consecutive_timeouts_ = 0;
        last_heard_ = ngx_current_msec;
        heard_since_connect_ = true;
        // Completions may disconnect (and replace the decoder); hold the one we are reading.
        protocol::FrameDecoder *decoder = decoder_.get();
        while (std::optional<protocol::FrameView> frame = decoder->next()) {
            dispatch(*frame);
            if (state_ != State::Connected || decoder != decoder_.get()) {
                return;
            }
        }
        if (decoder->error() != protocol::FrameError::None) {
            ngx_log_error(NGX_LOG_ERR, log_, 0, "ehrgate: policyd sent a bad frame: %s",
                          protocol::frame_error_name(decoder->error()));
            disconnect("protocol error");
            return;
        }
    }
    if (ngx_handle_read_event(connection_->read, 0) != NGX_OK) {
        disconnect("cannot wait for more data");
    }
}

void SidecarClient::dispatch(const protocol::FrameView &frame) {
    if (frame.header.request_id == protocol::kPushRequestId) {
        if (frame.header.type == protocol::MessageType::PolicySnapshot) {
            apply_snapshot(frame.body);
        } else if (frame.header.type == protocol::MessageType::RevocationList) {
            apply_revocations(frame.body);
        } else if (frame.header.type == protocol::MessageType::ConsentEpoch) {
            const std::optional<protocol::ConsentEpoch> epoch =
                protocol::decode_consent_epoch(frame.body);
            if (!epoch) {
                // Cached decisions could now be stale and nothing says which: start over.
                disconnect("undecodable consent epoch");
                return;
            }
            if (consent_epoch_callback_ != nullptr) {
                consent_epoch_callback_(epoch->epoch);
            }
        } else if (frame.header.type == protocol::MessageType::Error) {
            const std::optional<protocol::ErrorBody> error = protocol::decode_error(frame.body);
            ngx_log_error(NGX_LOG_ERR, log_, 0, "ehrgate: policyd reported: %s",
                          error ? error->message.c_str() : "(undecodable error)");
        }
        return;
    }
    Slot *slot = slot_for(frame.header.request_id);
    if (slot == nullptr) {
        return;  // cancelled (timed out or finalized) before the reply came
    }
    const CallCompletion completion = slot->completion;
    void *data = slot->data;
    cancel(frame.header.request_id);
    completion(data, CallOutcome::Reply, &frame);
}

void SidecarClient::request_snapshot() {
    if (snapshot_requested_) {
        return;
    }
    snapshot_requested_ =
        call(protocol::MessageType::PolicyFetch, protocol::empty_body(), on_snapshot, this) != 0;
}

void SidecarClient::on_snapshot(void *data, CallOutcome outcome, const protocol::FrameView *frame) {
    auto *self = static_cast<SidecarClient *>(data);
    self->snapshot_requested_ = false;
    if (outcome == CallOutcome::Reply &&
        frame->header.type == protocol::MessageType::PolicySnapshot) {
        self->apply_snapshot(frame->body);
    }
}

void SidecarClient::on_revocations(void *data, CallOutcome outcome,
                                   const protocol::FrameView *frame) {
    auto *self = static_cast<SidecarClient *>(data);
    if (outcome == CallOutcome::Reply &&
        frame->header.type == protocol::MessageType::RevocationList) {
        self->apply_revocations(frame->body);
    }
}

void SidecarClient::apply_revocations(std::string_view body) {
    std::optional<protocol::RevocationList> list = protocol::decode_revocation_list(body);
    if (!list) {
        ngx_log_error(NGX_LOG_ERR, log_, 0, "ehrgate: policyd sent an undecodable revocation list");
        disconnect("protocol error");
        return;
    }
    // Lists arrive in order on one connection; the last one received is the current one.
    revocations_ = RevocationSet(*list);
    revocations_current_ = true;
}

void SidecarClient::saw_policy_serial(uint64_t serial) {
    if (snapshot_ == nullptr || serial > snapshot_->serial) {
        request_snapshot();
    }
}

void SidecarClient::apply_snapshot(std::string_view body) {
    std::optional<policy::Snapshot> decoded = policy::decode_snapshot(body);
    if (!decoded) {
        ngx_log_error(
            NGX_LOG_ERR, log_, 0,
            "ehrgate: policyd sent an undecodable policy snapshot; keeping the current one");
        return;
    }
    if (snapshot_ != nullptr && decoded->serial <= snapshot_->serial) {
        return;  // a fetch reply overtaken by a newer push
    }
    snapshot_ = std::make_shared<const policy::Snapshot>(std::move(*decoded));
    std::string error;
    auth_policy_ = auth::AuthPolicy::compile(snapshot_, &error);
    if (auth_policy_ == nullptr) {
        ngx_log_error(NGX_LOG_ERR, log_, 0,
                      "ehrgate: cannot compile the authentication policy: %s; bearer tokens are "
                      "refused until the next snapshot",
                      error.c_str());
    }
    if (policy_change_callback_ != nullptr) {
        policy_change_callback_(snapshot_->serial);
    }
    ngx_log_error(NGX_LOG_NOTICE, log_, 0,
                  "ehrgate: policy \"%s\" (serial %uL) active in worker %P",
                  snapshot_->bundle.version.c_str(), snapshot_->serial, ngx_pid);
    // Tell policyd, so `ehrgatectl status` shows which worker runs which policy.
    protocol::PolicyAck ack{snapshot_->serial, static_cast<uint32_t>(ngx_pid)};
    protocol::encode_frame(output_, protocol::MessageType::PolicyAck, protocol::kPushRequestId,
                           protocol::encode(ack));
    if (!flush_event_.posted) {
        ngx_post_event(&flush_event_, &ngx_posted_events);
    }
}

}  // namespace ehrgate::ngx
