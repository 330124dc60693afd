// ehrgatectl: the operator's command line for a running ehrgate stack.
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ehrgate/base64url.hpp"
#include "ehrgate/json_text.hpp"
#include "ehrgate/policy.hpp"
#include "ehrgate/protocol.hpp"

namespace ehrgate::ctl {
int audit_command(const std::vector<std::string> &args);  // audit_cmd.cpp (issue 7)
}

namespace {

using namespace ehrgate;

constexpr const char *kUsage = R"(usage: ehrgatectl [--socket PATH] COMMAND ...

commands:
  status                      policyd's active policy, connected workers and counters (JSON)
  policy validate FILE        check a policy bundle without loading it (no daemon needed)
  policy reload               make policyd reload its bundle; workers switch within a second
  token mint --client ID --scope "SCOPES" [--patient ID] [--user REF] [--ttl SECONDS]
             [--purpose CODE] [--break-glass-reason TEXT]
             [--key PEM] [--issuer URL] [--audience AUD]
                              print a JWT signed by the sandbox issuer's DEVELOPMENT key
  token revoke --jti ID [--until UNIX_TIME] | --client ID
                              refuse a token (by jti) or every token of a client issued so
                              far; every nginx worker refuses it within a second

  audit verify [--data-dir DIR] [--public-key HEX|FILE]
                              walk the audit hash chain and its signed checkpoints; exits 1
                              naming the first bad record (modified, deleted, inserted, moved)
  audit search [--patient ID] [--client ID] [--user ID] [--correlation-id ID]
               [--since TIME] [--until TIME] [--data-dir DIR]
                              matching records from the indexes, one JSON object per line;
                              TIME is unix seconds or YYYY-MM-DDTHH:MM:SSZ
  audit export --format ndjson|fhir [search options]
                              the same records as NDJSON or FHIR AuditEvent (IHE BALP), one
                              per line
  audit purge --older-than-days N [--data-dir DIR]
                              retention: remove old records up to a signed checkpoint, which
                              stays as the anchor the rest verifies from
  consent grant --patient ID --client ID --purpose CODE [--deny-label LABEL]... [--until TIME]
                              record a patient's consent for a client and purpose (HL7 v3
                              PurposeOfUse); prints the new consent id. TIME: 2027-01-31,
                              2027-01-31T12:00:00Z or unix seconds
  consent revoke ID           revoke it; every request decided afterwards sees it
  consent list --patient ID   the patient's consents (JSON)
  consent show ID             one consent and its change history (JSON)
  consent import FILE         import FHIR R4 Consent JSON (a Consent, an array, or a Bundle):
                              all of them or, on any error, none
  consent jwks                the JWKS that verifies X-Ehrgate-Consent (for downstream hops)

--socket PATH overrides the admin socket; default $EHRGATE_ADMIN_SOCKET, else
./run/policyd-admin.sock (where `./build.sh run` puts it, so run from the repo root).
audit commands read the LMDB files directly (policyd need not run): --data-dir defaults to
$EHRGATE_DATA_DIR, else ./run/policyd-data; the key defaults to DIR/audit-signing.pub. Pin the
key with --public-key: whoever can rewrite the files could also replace that file.
)";

constexpr const char *kDefaultSocket = "run/policyd-admin.sock";
constexpr const char *kDefaultKey = "conf/sandbox/dev-issuer-es256.key.pem";
constexpr const char *kDefaultIssuer = "https://sandbox-issuer.ehrgate.local";
constexpr const char *kDefaultAudience = "http://127.0.0.1:8080/fhir";

[[noreturn]] void fail(int code, const std::string &message) {
    std::fprintf(stderr, "ehrgatectl: %s\n", message.c_str());
    std::exit(code);
}

// ---- talking to policyd ------------------------------------------------------------------------

class AdminClient {
  public:
    explicit AdminClient(std::string path) : path_(std::move(path)) {}
    ~AdminClient() {
        if (fd_ >= 0)
            ::close(fd_);
    }

    protocol::AdminReply call(const protocol::AdminRequest &request) {
        connect_or_fail();
        std::string frame;
        protocol::encode_frame(frame, protocol::MessageType::AdminRequest, 1,
                               protocol::encode(request));
        for (size_t sent = 0; sent < frame.size();) {
            const ssize_t n = ::send(fd_, frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                fail(1, "write to policyd failed: " + std::string(std::strerror(errno)));
            }
            sent += static_cast<size_t>(n);
        }
        protocol::FrameDecoder decoder;
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        char buffer[65536];
        for (;;) {
            if (std::optional<protocol::FrameView> reply = decoder.next()) {
                if (reply->header.type == protocol::MessageType::Error) {
                    const auto error = protocol::decode_error(reply->body);
                    fail(1, "policyd refused the request: " + (error ? error->message : "?"));
                }
                std::optional<protocol::AdminReply> decoded =
                    protocol::decode_admin_reply(reply->body);
                if (reply->header.type != protocol::MessageType::AdminReply || !decoded) {
                    fail(1, "policyd sent an unexpected reply");
                }
                return *decoded;
            }
            if (decoder.error() != protocol::FrameError::None) {
                fail(1, std::string("bad frame from policyd: ") +
                            protocol::frame_error_name(decoder.error()));
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            pollfd pfd{fd_, POLLIN, 0};
            if (left.count() <= 0 || ::poll(&pfd, 1, static_cast<int>(left.count())) == 0) {
                fail(1, "policyd did not answer within 10 s");
            }
            const ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                fail(1, "policyd closed the connection");
            decoder.feed(std::string_view(buffer, static_cast<size_t>(n)));
        }
    }

  private:
    void connect_or_fail() {
        sockaddr_un addr{};
        if (path_.size() >= sizeof(addr.sun_path)) {
            fail(1, "socket path too long: " + path_);
        }
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        addr.sun_family = AF_UNIX;
        std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);
        if (::connect(fd_, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0) {
            fail(1, "cannot reach policyd at " + path_ + ": " + std::strerror(errno) +
                        " (start the stack with ./build.sh run from the repo root, or pass "
                        "--socket PATH)");
        }
    }

    std::string path_;
    int fd_ = -1;
};

int print_reply(const protocol::AdminReply &reply) {
    if (!reply.json.empty() && reply.json != "{}") {
        std::printf("%s\n", reply.json.c_str());
    }
    std::fprintf(reply.ok ? stdout : stderr, "%s\n", reply.message.c_str());
    return reply.ok ? 0 : 1;
}

// ---- policy validate ---------------------------------------------------------------------------

int policy_validate(const std::string &file) {
    const policy::ParseResult result = policy::load_bundle_file(file);
    if (!result.bundle) {
        for (const policy::Diagnostic &d : result.diagnostics) {
            std::fprintf(stderr, "%s\n", d.to_string().c_str());
        }
        std::fprintf(stderr, "ehrgatectl: %s is invalid (%zu problem(s))\n", file.c_str(),
                     result.diagnostics.size());
        return 1;
    }
    std::printf("%s: valid, version %s, %zu client(s), %zu route(s), digest %s\n", file.c_str(),
                result.bundle->version.c_str(), result.bundle->clients.size(),
                result.bundle->routes.size(), policy::bundle_digest(*result.bundle).c_str());
    return 0;
}

// ---- token mint --------------------------------------------------------------------------------

struct EvpKeyDeleter {
    void operator()(EVP_PKEY *key) const { EVP_PKEY_free(key); }
};
using EvpKey = std::unique_ptr<EVP_PKEY, EvpKeyDeleter>;

EvpKey load_private_key(const std::string &path) {
    FILE *file = std::fopen(path.c_str(), "r");
    if (file == nullptr) {
        fail(1, "cannot open signing key " + path + ": " + std::strerror(errno) +
                    " (run from the repo root or pass --key)");
    }
    EvpKey key(PEM_read_PrivateKey(file, nullptr, nullptr, nullptr));
    std::fclose(file);
    if (!key || EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_EC ||
        EVP_PKEY_get_bits(key.get()) != 256) {
        fail(1, "signing key " + path + " is not a P-256 EC private key");
    }
    return key;
}

// RFC 7638 thumbprint of the public key: the `kid` the sandbox JWKS publishes.
std::string key_thumbprint(EVP_PKEY *key) {
    unsigned char point[65];
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY, point, sizeof point, &len) !=
            1 ||
        len != 65 || point[0] != 0x04) {
        fail(1, "cannot read the public point of the signing key");
    }
    const std::string x =
        base64url::encode(std::string_view(reinterpret_cast<char *>(point + 1), 32));
    const std::string y =
        base64url::encode(std::string_view(reinterpret_cast<char *>(point + 33), 32));
    const std::string canonical =
        R"({"crv":"P-256","kty":"EC","x":")" + x + R"(","y":")" + y + "\"}";
    unsigned char digest[32];
    EVP_Digest(canonical.data(), canonical.size(), digest, nullptr, EVP_sha256(), nullptr);
    return base64url::encode(std::string_view(reinterpret_cast<char *>(digest), sizeof digest));
}

// ES256 wants the raw 64-byte r||s, OpenSSL produces DER: convert.
std::string sign_es256(EVP_PKEY *key, std::string_view input) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    size_t der_len = 0;
    std::string der;
    bool ok =
        EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1 &&
        EVP_DigestSign(ctx, nullptr, &der_len,
                       reinterpret_cast<const unsigned char *>(input.data()), input.size()) == 1;
    if (ok) {
        der.resize(der_len);
        ok = EVP_DigestSign(ctx, reinterpret_cast<unsigned char *>(der.data()), &der_len,
                            reinterpret_cast<const unsigned char *>(input.data()),
                            input.size()) == 1;
        der.resize(der_len);
    }
    EVP_MD_CTX_free(ctx);
    if (!ok)
        fail(1, "signing failed");
    const auto *p = reinterpret_cast<const unsigned char *>(der.data());
    ECDSA_SIG *sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
    if (sig == nullptr)
        fail(1, "signing produced an undecodable signature");
    unsigned char raw[64];
    BN_bn2binpad(ECDSA_SIG_get0_r(sig), raw, 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(sig), raw + 32, 32);
    ECDSA_SIG_free(sig);
    return std::string(reinterpret_cast<char *>(raw), sizeof raw);
}

std::string random_id() {
    unsigned char bytes[16];
    if (RAND_bytes(bytes, sizeof bytes) != 1)
        fail(1, "no randomness available");
    return base64url::encode(std::string_view(reinterpret_cast<char *>(bytes), sizeof bytes));
}

int token_mint(const std::vector<std::string> &args) {
    std::string client, scope, patient, user, key_path = kDefaultKey, issuer = kDefaultIssuer,
                                              audience = kDefaultAudience, purpose, reason;
    long ttl = 300;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string &flag = args[i];
        if (i + 1 >= args.size())
            fail(2, flag + " needs a value");
        const std::string &value = args[++i];
        if (flag == "--client")
            client = value;
        else if (flag == "--scope")
            scope = value;
        else if (flag == "--patient")
            patient = value;
        else if (flag == "--user")
            user = value;
        else if (flag == "--key")
            key_path = value;
        else if (flag == "--purpose")  // consent (issue 5)
            purpose = value;
        else if (flag == "--break-glass-reason")
            reason = value;
        else if (flag == "--issuer")
            issuer = value;
        else if (flag == "--audience")
            audience = value;
        else if (flag == "--ttl") {
            char *end = nullptr;
            ttl = std::strtol(value.c_str(), &end, 10);
            if (*end != '\0' || ttl <= 0 || ttl > 86400) {
                fail(2, "--ttl expects seconds between 1 and 86400, got \"" + value + "\"");
            }
        } else {
            fail(2, "token mint: unknown option \"" + flag + "\"");
        }
    }
    if (client.empty())
        fail(2, "token mint: --client is required");
    if (scope.empty())
        fail(2, "token mint: --scope is required");

    EvpKey key = load_private_key(key_path);
    const long now = static_cast<long>(std::time(nullptr));
    std::string header =
        R"({"alg":"ES256","typ":"JWT","kid":)" + json::quote(key_thumbprint(key.get())) + "}";
    std::string claims =
        "{\"iss\":" + json::quote(issuer) +
        ",\"sub\":" + json::quote(user.empty() ? client : user) +
        ",\"aud\":" + json::quote(audience) + ",\"client_id\":" + json::quote(client) +
        ",\"scope\":" + json::quote(scope) + ",\"iat\":" + std::to_string(now) +
        ",\"nbf\":" + std::to_string(now) + ",\"exp\":" + std::to_string(now + ttl) +
        ",\"jti\":" + json::quote(random_id());
    if (!patient.empty())
        claims += ",\"patient\":" + json::quote(patient);
    if (!user.empty())
        claims += ",\"fhirUser\":" + json::quote(user);
    if (!purpose.empty())
        claims += ",\"purpose_of_use\":" + json::quote(purpose);
    if (!reason.empty())
        claims += ",\"break_glass_reason\":" + json::quote(reason);
    claims += "}";
    const std::string signing_input = base64url::encode(header) + "." + base64url::encode(claims);
    std::printf("%s.%s\n", signing_input.c_str(),
                base64url::encode(sign_es256(key.get(), signing_input)).c_str());
    return 0;
}

// ---- consent (issue 5) -------------------------------------------------------------------------

std::string read_file(const std::string &path) {
    FILE *file = std::fopen(path.c_str(), "rb");
    if (file == nullptr) {
        fail(1, "cannot open " + path + ": " + std::strerror(errno));
    }
    std::string text;
    char buffer[65536];
    size_t n;
    while ((n = std::fread(buffer, 1, sizeof buffer, file)) > 0) {
        text.append(buffer, n);
        if (text.size() > (size_t{3} << 20)) {
            std::fclose(file);
            fail(1, path + " is larger than 3 MiB; split it");
        }
    }
    std::fclose(file);
    return text;
}

int consent_command(const std::string &socket_path, const std::vector<std::string> &args) {
    const std::string &sub = args[0];
    protocol::AdminRequest request;
    if (sub == "grant") {
        request.command = "consent-grant";
        std::string deny_labels;
        for (size_t i = 1; i < args.size(); i += 2) {
            const std::string &flag = args[i];
            if (i + 1 >= args.size()) {
                fail(2, "consent grant: " + flag + " needs a value");
            }
            const std::string &value = args[i + 1];
            if (flag == "--deny-label") {
                if (value.find(',') != std::string::npos) {
                    fail(2, "consent grant: one label per --deny-label");
                }
                deny_labels += (deny_labels.empty() ? "" : ",") + value;
            } else if (flag == "--patient" || flag == "--client" || flag == "--purpose" ||
                       flag == "--until") {
                if (!request.arg(flag.substr(2)).empty()) {
                    fail(2, "consent grant: " + flag + " given twice");
                }
                request.args.emplace_back(flag.substr(2), value);
            } else {
                fail(2, "consent grant: unknown option \"" + flag + "\"");
            }
        }
        for (const char *required : {"patient", "client", "purpose"}) {
            if (request.arg(required).empty()) {
                fail(2, std::string("consent grant: --") + required + " is required");
            }
        }
        if (!deny_labels.empty()) {
            request.args.emplace_back("deny_labels", deny_labels);
        }
        const protocol::AdminReply reply = AdminClient(socket_path).call(request);
        if (!reply.ok) {
            fail(1, reply.message);
        }
        std::printf("%s\n", reply.message.c_str());  // the new consent id, alone, for scripts
        return 0;
    }
    if (sub == "revoke" && args.size() == 2) {
        request = {"consent-revoke", {{"id", args[1]}}};
    } else if (sub == "show" && args.size() == 2) {
        request = {"consent-show", {{"id", args[1]}}};
    } else if (sub == "list" && args.size() == 3 && args[1] == "--patient") {
        request = {"consent-list", {{"patient", args[2]}}};
    } else if (sub == "jwks" && args.size() == 1) {
        request = {"consent-jwks", {}};
    } else if (sub == "import" && args.size() == 2) {
        request = {"consent-import", {{"json", read_file(args[1])}}};
    } else {
        fail(2,
             "usage: ehrgatectl consent grant|revoke ID|list --patient ID|show ID|import FILE|jwks "
             "(see ehrgatectl --help)");
    }
    const protocol::AdminReply reply = AdminClient(socket_path).call(request);
    if (!reply.ok) {
        fail(1, reply.message);
    }
    if (sub == "show" || sub == "list" || sub == "jwks") {
        std::printf("%s\n", reply.json.c_str());
    } else {
        std::printf("%s\n", reply.message.c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    std::string socket_path;
    if (const char *env = std::getenv("EHRGATE_ADMIN_SOCKET"); env != nullptr && *env != '\0') {
        socket_path = env;
    } else {
        socket_path = kDefaultSocket;
    }
    while (!args.empty() && args[0].starts_with("--")) {
        if (args[0] == "--help" || args[0] == "-h") {
            std::fputs(kUsage, stdout);
            return 0;
        }
        if (args[0] != "--socket" || args.size() < 2) {
            fail(2, "unknown or incomplete option \"" + args[0] + "\" (see ehrgatectl --help)");
        }
        socket_path = args[1];
        args.erase(args.begin(), args.begin() + 2);
    }
    if (args.empty()) {
        std::fputs(kUsage, stderr);
        return 2;
    }
    const std::string &command = args[0];
    if (command == "status" && args.size() == 1) {
        return print_reply(AdminClient(socket_path).call({"status", {}}));
    }
    if (command == "policy" && args.size() == 3 && args[1] == "validate") {
        return policy_validate(args[2]);
    }
    if (command == "policy" && args.size() == 2 && args[1] == "reload") {
        return print_reply(AdminClient(socket_path).call({"policy-reload", {}}));
    }
    if (command == "token" && args.size() >= 2 && args[1] == "revoke") {
        protocol::AdminRequest request{"token-revoke", {}};
        for (size_t i = 2; i < args.size(); i += 2) {
            if (i + 1 >= args.size() ||
                (args[i] != "--jti" && args[i] != "--client" && args[i] != "--until")) {
                fail(2,
                     "usage: ehrgatectl token revoke --jti ID [--until UNIX_TIME] | --client ID");
            }
            request.args.emplace_back(args[i].substr(2), args[i + 1]);
        }
        if (request.arg("jti").empty() == request.arg("client").empty()) {
            fail(2, "token revoke: give exactly one of --jti or --client");
        }
        return print_reply(AdminClient(socket_path).call(request));
    }
    if (command == "consent" && args.size() >= 2) {  // consent (issue 5)
        return consent_command(socket_path, std::vector<std::string>(args.begin() + 1, args.end()));
    }
    if (command == "token" && args.size() >= 2 && args[1] == "mint") {
        return token_mint(std::vector<std::string>(args.begin() + 2, args.end()));
    }
    if (command == "audit") {  // audit (issue 7)
        return ctl::audit_command(args);
    }
    fail(2, "unknown command \"" + command + "\" (see ehrgatectl --help)");
}
