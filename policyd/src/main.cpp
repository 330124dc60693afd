// policyd: ehrgate's sidecar. Owns the policy bundle (and, as the product grows, consent, audit,
// replay records) and answers nginx workers over a Unix socket.
#include <uv.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>

#include "audit_log.hpp"
#include "consent_signer.hpp"
#include "consent_store.hpp"
#include "log.hpp"
#include "policy_state.hpp"
#include "revocations.hpp"
#include "server.hpp"
#include "store.hpp"
#include "syslog_forwarder.hpp"

namespace {

using namespace ehrgate::policyd;

constexpr const char *kUsage =
    R"(usage: policyd --policy FILE --data-dir DIR --socket PATH --admin-socket PATH [options]

ehrgate's policy daemon. nginx workers running ngx_http_ehrgate_module ask it for decisions over
--socket; ehrgatectl administers it over --admin-socket.

required:
  --policy FILE            policy bundle (YAML, schema ehrgate.policy/v1)
  --data-dir DIR           LMDB environment directory (created if missing)
  --socket PATH            Unix socket for nginx workers
  --admin-socket PATH      Unix socket for ehrgatectl

options:
  --socket-mode MODE       octal permissions of --socket (default 0660)
  --socket-group NAME      group owning --socket, e.g. the nginx worker's group
  --admin-socket-mode MODE octal permissions of --admin-socket (default 0600)
  --map-size-mb N          LMDB map size in MiB (default 1024)
  --max-frame-bytes N      largest accepted protocol frame (default 4194304)
  --log-level LEVEL        debug | info | warn | error (default info)
  --audit-map-size-mb N    audit log LMDB map size in MiB, <data-dir>/audit (default 1024);
                           when full, audited requests are refused (503), never unrecorded
  --audit-checkpoint-records N  sign a checkpoint at least every N records (default 1000)
  --audit-checkpoint-ms N  ... and at least every N ms while records arrive (default 10000)
  --audit-syslog HOST:PORT forward every audit record over syslog/TLS (RFC 5424/5425), at
                           least once, cursor in <data-dir>/audit-syslog.cursor
  --audit-syslog-ca FILE   CA that must have signed the receiver's certificate (required)
  --audit-syslog-name NAME name/IP the receiver's certificate must carry (default HOST)
  --audit-syslog-cert FILE --audit-syslog-key FILE  client certificate for mutual TLS
  --help                   this text

signals: SIGHUP reloads the policy bundle (as `ehrgatectl policy reload` does);
         SIGTERM / SIGINT stop accepting, flush replies and exit 0.
)";

struct Options {
    std::string policy;
    std::string data_dir;
    size_t map_size_mb = 1024;
    ServerOptions server;
    // audit (issue 7)
    size_t audit_map_size_mb = 1024;
    AuditLog::Options audit;
    SyslogOptions syslog;
};

[[noreturn]] void usage_error(const std::string &message) {
    std::fprintf(stderr, "policyd: %s\n(see policyd --help)\n", message.c_str());
    std::exit(2);
}

unsigned long parse_number(std::string_view flag, const char *text, int base, unsigned long max) {
    char *end = nullptr;
    errno = 0;
    const unsigned long value = std::strtoul(text, &end, base);
    if (errno != 0 || end == text || *end != '\0' || value > max || text[0] == '-') {
        usage_error(std::string(flag) + " expects " + (base == 8 ? "an octal mode" : "a number") +
                    " up to " + std::to_string(max) + ", got \"" + text + "\"");
    }
    return value;
}

Options parse_options(int argc, char **argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        }
        if (i + 1 >= argc) {
            usage_error(flag.starts_with("--")
                            ? std::string(flag) + " needs a value"
                            : "unexpected argument \"" + std::string(flag) + "\"");
        }
        const char *value = argv[++i];
        if (flag == "--policy")
            options.policy = value;
        else if (flag == "--data-dir")
            options.data_dir = value;
        else if (flag == "--socket")
            options.server.data_socket = value;
        else if (flag == "--admin-socket")
            options.server.admin_socket = value;
        else if (flag == "--socket-group")
            options.server.data_socket_group = value;
        else if (flag == "--socket-mode")
            options.server.data_socket_mode =
                static_cast<unsigned>(parse_number(flag, value, 8, 0777));
        else if (flag == "--admin-socket-mode")
            options.server.admin_socket_mode =
                static_cast<unsigned>(parse_number(flag, value, 8, 0777));
        else if (flag == "--map-size-mb")
            options.map_size_mb = parse_number(flag, value, 10, 1 << 20);
        else if (flag == "--max-frame-bytes")
            options.server.max_frame =
                static_cast<uint32_t>(parse_number(flag, value, 10, 64u << 20));
        else if (flag == "--audit-map-size-mb")
            options.audit_map_size_mb = parse_number(flag, value, 10, 1 << 20);
        else if (flag == "--audit-checkpoint-records")
            options.audit.checkpoint_every_records = parse_number(flag, value, 10, 1u << 30);
        else if (flag == "--audit-checkpoint-ms")
            options.audit.checkpoint_every_ms = parse_number(flag, value, 10, 1u << 30);
        else if (flag == "--audit-syslog") {
            if (!parse_syslog_target(value, options.syslog)) {
                usage_error("--audit-syslog expects HOST:PORT, got \"" + std::string(value) + "\"");
            }
        } else if (flag == "--audit-syslog-ca")
            options.syslog.ca_file = value;
        else if (flag == "--audit-syslog-name")
            options.syslog.server_name = value;
        else if (flag == "--audit-syslog-cert")
            options.syslog.cert_file = value;
        else if (flag == "--audit-syslog-key")
            options.syslog.key_file = value;
        else if (flag == "--log-level") {
            log::Level level;
            if (!log::parse_level(value, &level)) {
                usage_error("--log-level expects debug, info, warn or error, got \"" +
                            std::string(value) + "\"");
            }
            log::set_level(level);
        } else {
            usage_error("unknown option \"" + std::string(flag) + "\"");
        }
    }
    if (options.policy.empty())
        usage_error("--policy is required");
    if (options.data_dir.empty())
        usage_error("--data-dir is required");
    if (options.server.data_socket.empty())
        usage_error("--socket is required");
    if (options.server.admin_socket.empty())
        usage_error("--admin-socket is required");
    if (options.audit_map_size_mb == 0 || options.audit.checkpoint_every_records == 0 ||
        options.audit.checkpoint_every_ms == 0) {
        usage_error("--audit-map-size-mb and --audit-checkpoint-* must be positive");
    }
    if (!options.syslog.host.empty() && options.syslog.ca_file.empty()) {
        usage_error("--audit-syslog needs --audit-syslog-ca (the receiver is always verified)");
    }
    if (options.syslog.cert_file.empty() != options.syslog.key_file.empty()) {
        usage_error("--audit-syslog-cert and --audit-syslog-key go together");
    }
    if (options.server.data_socket == options.server.admin_socket) {
        usage_error("--socket and --admin-socket must differ");
    }
    return options;
}

}  // namespace

int main(int argc, char **argv) {
    const Options options = parse_options(argc, argv);
    // A worker that disconnects mid-reply must not kill the daemon.
    std::signal(SIGPIPE, SIG_IGN);

    StoreError store_error;
    std::unique_ptr<Store> store =
        Store::open({options.data_dir, options.map_size_mb << 20, 16}, &store_error);
    if (!store) {
        log::error("cannot open data directory " + options.data_dir + ": " +
                   store_status_name(store_error.status) + " (" + store_error.detail + ")");
        return 1;
    }

    PolicyState policy(*store, options.policy);
    const ReloadOutcome initial = policy.reload();
    if (!policy.loaded()) {
        log::error(initial.message);
        for (const ehrgate::policy::Diagnostic &d : initial.diagnostics) {
            log::error("  " + d.to_string());
        }
        return 1;
    }
    log::info(initial.message);

    Revocations revocations(*store);
    if (revocations.load(static_cast<int64_t>(std::time(nullptr)), &store_error) !=
        StoreStatus::Ok) {
        log::error(std::string("cannot read revocations: ") +
                   store_status_name(store_error.status));
        return 1;
    }

    // audit (issue 7): its own environment, see audit_log.hpp for why.
    std::unique_ptr<AuditStore> audit_store = AuditStore::open(
        {options.data_dir + "/audit", options.audit_map_size_mb << 20, false}, &store_error);
    if (!audit_store) {
        log::error("cannot open the audit log in " + options.data_dir + "/audit: " +
                   store_status_name(store_error.status) + " (" + store_error.detail + ")");
        return 1;
    }
    std::string key_problem;
    std::unique_ptr<ehrgate::audit::SigningKey> audit_key =
        load_or_create_signing_key(options.data_dir, &key_problem);
    if (!audit_key) {
        log::error("audit checkpoint key: " + key_problem);
        return 1;
    }
    log::info("audit log at seq " + std::to_string(audit_store->last_seq()) + ", checkpoint key " +
              audit_key->key_id().substr(0, 16));

    std::unique_ptr<SyslogForwarder> syslog;
    if (!options.syslog.host.empty()) {
        SyslogOptions syslog_options = options.syslog;
        syslog_options.cursor_path = options.data_dir + "/audit-syslog.cursor";
        syslog = std::make_unique<SyslogForwarder>(*audit_store, syslog_options);
        syslog->start();
    }
    // Consent (issue 5): a record that cannot be read stops the start, as revocations do.
    ConsentStore consents(*store);
    if (consents.load(&store_error) != StoreStatus::Ok) {
        log::error(std::string("cannot read consents: ") + store_status_name(store_error.status) +
                   " (" + store_error.detail + ")");
        return 1;
    }

    std::string signer_error;
    const std::unique_ptr<ConsentSigner> signer =
        ConsentSigner::load_or_create(options.data_dir, &signer_error);
    if (!signer) {
        log::error("consent signing key: " + signer_error);
        return 1;
    }
    policy.set_consent_jwks(signer->jwks());

    uv_loop_t loop;
    uv_loop_init(&loop);
    int exit_code = 0;
    {
        AuditLog audit(&loop, *audit_store, *audit_key, options.audit);
        audit.start();
        Server server(&loop, options.server, policy, revocations);
        server.set_audit(&audit);
        server.set_syslog(syslog.get());
        server.set_consent_store(&consents);
        server.set_consent_signer(signer.get());
        if (server.start()) {
            // READY goes to stdout so supervisors and tests can wait for it.
            std::printf("POLICYD READY socket=%s admin=%s\n", options.server.data_socket.c_str(),
                        options.server.admin_socket.c_str());
            std::fflush(stdout);
        } else {
            exit_code = 1;
            audit.stop();
        }
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    // Every handle must be closed by now; a busy loop here is a leak worth failing loudly on.
    if (uv_loop_close(&loop) != 0) {
        log::error("event loop closed with live handles");
        return exit_code == 0 ? 1 : exit_code;
    }
    log::info("stopped");
    return exit_code;
}
