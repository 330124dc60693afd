// Cold JWT verification rate per CPU second: what a worker pays for a token it has not seen before
// (the token cache is bypassed). Keys are generated here; each token is verified in full
// (structure, header, key lookup, signature, claims) through jose::verify_jwt, exactly as the
// gateway does. Prints one JSON line per algorithm, for tests/bench/bench.py to set beside
// `openssl speed` on the same machine.
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "ehrgate/base64url.hpp"
#include "ehrgate/jose.hpp"

namespace {

using ehrgate::base64url::encode;

double cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

struct KeyDeleter {
    void operator()(EVP_PKEY *key) const { EVP_PKEY_free(key); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyDeleter>;

Key generate(bool rsa) {
    return Key(rsa ? EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048})
                   : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
}

std::string bn_b64(const BIGNUM *bn, int width) {
    std::string bytes(static_cast<size_t>(width > 0 ? width : BN_num_bytes(bn)), '\0');
    BN_bn2binpad(bn, reinterpret_cast<unsigned char *>(bytes.data()),
                 static_cast<int>(bytes.size()));
    return encode(bytes);
}

std::string jwks_for(EVP_PKEY *key, bool rsa) {
    if (rsa) {
        BIGNUM *n = nullptr;
        BIGNUM *e = nullptr;
        EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_RSA_N, &n);
        EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_RSA_E, &e);
        std::string jwks = R"({"keys":[{"kty":"RSA","kid":"bench","alg":"RS256","n":")" +
                           bn_b64(n, 0) + R"(","e":")" + bn_b64(e, 0) + R"("}]})";
        BN_free(n);
        BN_free(e);
        return jwks;
    }
    BIGNUM *x = nullptr;
    BIGNUM *y = nullptr;
    EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_EC_PUB_X, &x);
    EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_EC_PUB_Y, &y);
    std::string jwks = R"({"keys":[{"kty":"EC","crv":"P-256","kid":"bench","alg":"ES256","x":")" +
                       bn_b64(x, 32) + R"(","y":")" + bn_b64(y, 32) + R"("}]})";
    BN_free(x);
    BN_free(y);
    return jwks;
}

std::string sign(EVP_PKEY *key, bool rsa, const std::string &input) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    size_t len = 0;
    EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key);
    EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char *>(input.data()),
                   input.size());
    std::string sig(len, '\0');
    EVP_DigestSign(ctx, reinterpret_cast<unsigned char *>(sig.data()), &len,
                   reinterpret_cast<const unsigned char *>(input.data()), input.size());
    sig.resize(len);
    EVP_MD_CTX_free(ctx);
    if (rsa) {
        return sig;
    }
    // JWS wants r||s, OpenSSL gives DER.
    const auto *p = reinterpret_cast<const unsigned char *>(sig.data());
    ECDSA_SIG *ecdsa = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(sig.size()));
    unsigned char raw[64];
    BN_bn2binpad(ECDSA_SIG_get0_r(ecdsa), raw, 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(ecdsa), raw + 32, 32);
    ECDSA_SIG_free(ecdsa);
    return std::string(reinterpret_cast<char *>(raw), sizeof raw);
}

void run(bool rsa, double seconds) {
    Key key = generate(rsa);
    std::string error;
    const std::optional<ehrgate::jose::KeySet> keys =
        ehrgate::jose::KeySet::parse(jwks_for(key.get(), rsa), &error);
    if (!keys) {
        std::fprintf(stderr, "jose_bench: %s\n", error.c_str());
        std::exit(1);
    }
    const int64_t now = static_cast<int64_t>(std::time(nullptr));
    // Distinct tokens, as cold verification means: nothing is reused between iterations.
    std::vector<std::string> tokens;
    for (int i = 0; i < 64; ++i) {
        const std::string header = std::string(R"({"alg":")") + (rsa ? "RS256" : "ES256") +
                                   R"(","typ":"JWT","kid":"bench"})";
        const std::string claims =
            R"({"iss":"https://bench.example","aud":"bench","sub":"s","client_id":"c","scope":"user/*.rs","jti":"j)" +
            std::to_string(i) + R"(","iat":)" + std::to_string(now) + R"(,"exp":)" +
            std::to_string(now + 3600) + "}";
        const std::string input = encode(header) + "." + encode(claims);
        tokens.push_back(input + "." + encode(sign(key.get(), rsa, input)));
    }
    ehrgate::jose::VerifyOptions options;
    options.allowed_algorithms = {rsa ? ehrgate::jose::Algorithm::RS256
                                      : ehrgate::jose::Algorithm::ES256};
    options.issuer = "https://bench.example";
    options.audience = "bench";
    options.now = now;
    // Rates are per CPU second of this process, as `openssl speed` divides by CPU time unless
    // told -elapsed: on a shared machine, wall time would charge us for other processes.
    uint64_t verified = 0;
    const double cpu_start = cpu_seconds();
    const auto wall_start = std::chrono::steady_clock::now();
    double cpu = 0;
    while (cpu < seconds) {
        for (const std::string &token : tokens) {
            if (!ehrgate::jose::verify_jwt(token, *keys, options).ok()) {
                std::fprintf(stderr, "jose_bench: a bench token failed to verify\n");
                std::exit(1);
            }
            ++verified;
        }
        cpu = cpu_seconds() - cpu_start;
    }
    const std::chrono::duration<double> wall = std::chrono::steady_clock::now() - wall_start;
    std::printf(
        "{\"alg\":\"%s\",\"verifications\":%llu,\"cpu_seconds\":%.3f,"
        "\"wall_seconds\":%.3f,\"per_second\":%.0f}\n",
        rsa ? "RS256" : "ES256", static_cast<unsigned long long>(verified), cpu, wall.count(),
        static_cast<double>(verified) / cpu);
}

}  // namespace

int main(int argc, char **argv) {
    const double seconds = argc > 1 ? std::atof(argv[1]) : 2.0;
    if (!(seconds > 0 && seconds <= 60)) {
        std::fprintf(stderr, "usage: ehrgate-jose-bench [SECONDS (0-60], default 2)]\n");
        return 2;
    }
    run(true, seconds);
    run(false, seconds);
    return 0;
}
