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

#include "consent_signer.hpp"
#include "consent_store.hpp"
#include "log.hpp"
#include "policy_state.hpp"
#include "revocations.hpp"
#include "server.hpp"
#include "store.hpp"

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
  --help                   this text

signals: SIGHUP reloads the policy bundle (as `ehrgatectl policy reload` does);
         SIGTERM / SIGINT stop accepting, flush replies and exit 0.
)";

struct Options {
    std::string policy;
    std::string data_dir;
    size_t map_size_mb = 1024;
    ServerOptions server;
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

    uv_loop_t loop;
    uv_loop_init(&loop);
    int exit_code = 0;
    {
        Server server(&loop, options.server, policy, revocations);
        server.set_consent_store(&consents);
        server.set_consent_signer(signer.get());
        if (server.start()) {
            // READY goes to stdout so supervisors and tests can wait for it.
            std::printf("POLICYD READY socket=%s admin=%s\n", options.server.data_socket.c_str(),
                        options.server.admin_socket.c_str());
            std::fflush(stdout);
        } else {
            exit_code = 1;
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
