"""Authentication and authorization end to end: forged tokens, SMART scopes, the patient
compartment, revocation, client certificates and reload, against the real nginx + policyd stack.

Tokens come from a test identity provider ("test-idp") whose keys are generated here and minted
with PyJWT, an implementation independent of the gateway's. Every refusal is also checked to have
stayed at the gateway: the sandbox EHR's request counter must not move.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from authkit import (AUDIENCE, IDP_ISSUER, SANDBOX_ISSUER, Certificates, Keys, b64u, b64u_json, claims,
                     hs256_with_secret, mint, payload_of, sign_raw, tls_server_block, write_bundle)
from stack import DEMO_PATIENT, ROOT, Stack, free_port

OTHER_PATIENT = "eq081-VQEgP8drUUqCWzHfw3"
OTHER_CONDITION = "Condition/fx-p2-alcohol-eth-sud"   # F10.20, belongs to OTHER_PATIENT
OWN_CONDITION = "Condition/fx-p1-pregnancy-sex"       # belongs to DEMO_PATIENT
FHIR_JSON = "application/fhir+json"
VERSION = "auth-test-1"
# requests asks for gzip by default; these tests look at the plain protocol unless they say so.
PLAIN = {"Accept-Encoding": "identity"}


def extra_clients(certs: Certificates) -> list[dict]:
    return [
        {"id": "narrow-app", "display_name": "Lab viewer (test)", "context": "patient",
         "traffic_class": "interactive", "purposes": ["PATRQT"], "auth": ["bearer"],
         "scope_ceiling": "patient/Observation.rs launch/patient", "issuers": ["test-idp"],
         "tenants": ["general-hospital"]},
        {"id": "mtls-service", "display_name": "Certificate-only service (test)", "context": "system",
         "traffic_class": "batch", "purposes": ["HOPERAT"], "auth": ["mtls"],
         "scope_ceiling": "system/*.rs", "tenants": ["general-hospital"],
         "certificates": [certs.sha256_hex("client-a")]},
        {"id": "bound-app", "display_name": "Certificate-bound app (test)", "context": "user",
         "traffic_class": "interactive", "purposes": ["TREAT"], "auth": ["cert-bound"],
         "scope_ceiling": "user/*.rs", "tenants": ["general-hospital"],
         "certificates": [certs.sha256_hex("client-b")]},
    ]


def _build_dir() -> Path:
    return Path(os.environ.get("EHRGATE_BUILD_DIR", ROOT / "build"))


class Env:
    """Everything the module's tests share: keys, certificates, bundle and a running stack."""

    def __init__(self, tmp: Path):
        self.keys = Keys()
        self.certs = Certificates(tmp / "certs")
        self.bundle_dir = tmp / "bundle"
        self.policy = write_bundle(self.bundle_dir, ROOT / "conf" / "policy.yaml", ROOT / "conf" / "sandbox",
                                   self.keys, version=VERSION, extra_clients=extra_clients(self.certs))
        self.tls_port = free_port()
        # Room for the too-large token case, which the gateway (not nginx) must refuse.
        self.extra_http = "large_client_header_buffers 4 32k;\n" + tls_server_block(self.tls_port, self.certs)
        sandbox_pem = (ROOT / "conf" / "sandbox" / "dev-issuer-es256.key.pem").read_bytes()
        self.sandbox_key = load_pem_private_key(sandbox_pem, None)
        jwks = json.loads((ROOT / "conf" / "sandbox" / "dev-issuer-jwks.json").read_text())
        self.sandbox_kid = jwks["keys"][0]["kid"]
        self.stack: Stack | None = None

    def new_stack(self, run_dir: Path, policy: Path | None = None) -> Stack:
        return Stack(_build_dir(), run_dir, policy_file=policy or self.policy, extra_http=self.extra_http, workers=2)

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    # ---- tokens ----
    def idp(self, alg: str = "RS256", **claim_args) -> str:
        return mint(self.keys, alg, claims(**claim_args))

    def sandbox_token(self, **claim_args) -> str:
        """A sandbox-issuer token minted with PyJWT and the sandbox's (development) key."""
        claim_args.setdefault("issuer", SANDBOX_ISSUER)
        return jwt.encode(claims(**claim_args), self.sandbox_key, algorithm="ES256",
                          headers={"kid": self.sandbox_kid})

    def patient_token(self, patient: str = DEMO_PATIENT, scope: str = "patient/*.rs launch/patient") -> str:
        return self.idp("ES256", client="demo-patient-app", scope=scope, patient=patient)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("auth"))
    e.stack = e.new_stack(tmp_path_factory.mktemp("auth-stack"))
    try:
        e.stack.start()
        yield e
    finally:
        e.stack.stop()
    alerts = e.stack.error_log_alerts()
    assert not alerts, "nginx logged alerts/emergencies:\n" + "\n".join(alerts)


# ---- helpers ------------------------------------------------------------------------------------

def ehr_stats(stack) -> dict:
    return requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()


def ehr_count(stack) -> int:
    return ehr_stats(stack)["requests"]


def call(stack, path: str, token: str | None = None, method: str = "GET", headers: dict | None = None,
         base: str | None = None, **kwargs) -> requests.Response:
    h = dict(PLAIN)
    if token is not None:
        h["Authorization"] = "Bearer " + token
    h.update(headers or {})
    return requests.request(method, (base or stack.base_url) + path, headers=h, timeout=5, **kwargs)


def reason_of(response) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def assert_refused(response, status: int, reason: str, *, secrets: tuple[str, ...] = (),
                   bearer_error: str | None = "auto") -> dict:
    """The gateway's own refusal: status, reason, an OperationOutcome with the correlation id,
    the RFC 6750 header, and none of the credential echoed back."""
    assert response.status_code == status, f"{response.status_code} {response.text[:300]}"
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    correlation = response.headers["X-Request-ID"]
    assert body["id"] == correlation and correlation in body["issue"][0]["diagnostics"]
    assert reason_of(response) == reason, body
    if bearer_error == "auto":
        bearer_error = {401: "invalid_token", 403: None}.get(status)
    challenge = response.headers.get("WWW-Authenticate")
    if status == 401:
        assert challenge is not None and challenge.startswith('Bearer realm="ehrgate"'), challenge
    if bearer_error:
        assert f'error="{bearer_error}"' in challenge, challenge
    everything = response.text + json.dumps(dict(response.headers))
    for secret in secrets:
        for piece in [secret] + [p for p in secret.split(".") if len(p) >= 16]:
            assert piece not in everything, "the response echoes the credential"
    return body


# ---- 1/2. Forged and malformed tokens -----------------------------------------------------------

def _flip(token: str) -> str:
    h, p, s = token.split(".")
    raw = bytearray(jwt.utils.base64url_decode(s))
    raw[len(raw) // 2] ^= 0x01
    return f"{h}.{p}.{b64u(bytes(raw))}"


def _truncate(token: str) -> str:
    h, p, s = token.split(".")
    return f"{h}.{p}.{b64u(jwt.utils.base64url_decode(s)[:-10])}"


def _std_alphabet(e: Env) -> str:
    for _ in range(50):
        token = e.idp()
        h, p, s = token.split(".")
        if "-" in s or "_" in s:
            return f"{h}.{p}." + s.replace("-", "+").replace("_", "/")
    raise AssertionError("no signature with - or _ in 50 tries")


def _splice(e: Env) -> str:
    a, b = e.idp(), e.idp(scope="user/*.cruds")
    return a.rsplit(".", 1)[0] + "." + b.rsplit(".", 1)[1]


def _raw_idp(e: Env, header: str | dict, payload: str | dict | None = None, alg: str = "RS256") -> str:
    return sign_raw(header, payload if payload is not None else claims(), e.keys.key_for(alg), alg)


def _dup_claim(e: Env, name: str) -> str:
    """The claim twice, hand-written JSON: parsers that keep the last value see the second one."""
    body = claims()
    second = body["exp"] + 86400 if name == "exp" else "someone-else"
    text = json.dumps(body)[:-1] + f', "{name}": {json.dumps(second)}}}'
    return _raw_idp(e, {"alg": "RS256", "typ": "JWT", "kid": Keys.RSA_KID}, text)


def _ec_der_signature(e: Env) -> str:
    token = e.idp("ES256")
    h, p, _ = token.split(".")
    der = e.keys.ec.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
    return f"{h}.{p}.{b64u(der)}"


def _zero_ecdsa(e: Env) -> str:
    h, p, _ = e.idp("ES256").split(".")
    return f"{h}.{p}.{b64u(bytes(64))}"


def _x5c(e: Env) -> str:
    cert_b64 = base64.b64encode(e.certs.der("client-c")).decode()
    return jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256", headers={"kid": "attacker", "x5c": [cert_b64]})


def _attacker_jwk(e: Env) -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(e.keys.attacker_rsa.public_key()))
    return jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256", headers={"jwk": jwk})


def _too_large(e: Env) -> str:
    token = e.idp(padding="x" * 8300)
    assert len(token) > 8192
    return token


# (id, token builder, status, reason). Each must stop at the gateway with that status and reason.
FORGED = [
    # alg "none", in several spellings, with and without a signature
    ("alg-none-unsigned", lambda e: b64u_json({"alg": "none", "typ": "JWT"}) + "." + b64u_json(claims()) + ".",
     401, "alg-none"),
    ("alg-None-unsigned", lambda e: b64u_json({"alg": "None"}) + "." + b64u_json(claims()) + ".", 401, "alg-none"),
    ("alg-NONE-garbage-sig", lambda e: b64u_json({"alg": "NONE"}) + "." + b64u_json(claims()) + "." + b64u(b"sig"),
     401, "alg-none"),
    ("alg-nOnE-real-rs256-sig", lambda e: b64u_json({"alg": "nOnE", "kid": Keys.RSA_KID}) + "." +
     e.idp().split(".", 1)[1], 401, "alg-none"),
    ("alg-none-pyjwt", lambda e: jwt.encode(claims(), None, algorithm="none"), 401, "alg-none"),
    # algorithm confusion: HS256 keyed with the issuer's RSA public key
    ("hs256-public-key-as-secret", lambda e: hs256_with_secret({"alg": "HS256", "typ": "JWT", "kid": Keys.RSA_KID},
                                                              claims(), e.keys.rsa_public_pem()),
     401, "alg-not-allowed"),
    ("hs256-no-kid", lambda e: hs256_with_secret({"alg": "HS256"}, claims(), e.keys.rsa_public_pem()),
     401, "alg-not-allowed"),
    # algorithms outside the issuer's allow-list, with valid keys of the right type
    ("rs512-valid-rsa-key", lambda e: jwt.encode(claims(), e.keys.rsa, algorithm="RS512",
                                                 headers={"kid": Keys.RSA_KID}), 401, "alg-not-allowed"),
    ("ps512-valid-rsa-key", lambda e: jwt.encode(claims(), e.keys.rsa, algorithm="PS512",
                                                 headers={"kid": Keys.RSA_KID}), 401, "alg-not-allowed"),
    ("es384-valid-p384-key", lambda e: jwt.encode(claims(), e.keys.ec384, algorithm="ES384",
                                                  headers={"kid": Keys.EC384_KID}), 401, "alg-not-allowed"),
    ("alg-lowercase-rs256", lambda e: b64u_json({"alg": "rs256", "kid": Keys.RSA_KID}) + "." +
     e.idp().split(".", 1)[1], 401, "alg-not-allowed"),
    # the token choosing its own key
    ("embedded-jwk", _attacker_jwk, 401, "forbidden-header"),
    ("jku", lambda e: jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256",
                                 headers={"kid": Keys.RSA_KID, "jku": "https://evil.example/jwks.json"}),
     401, "forbidden-header"),
    ("x5u", lambda e: jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256",
                                 headers={"kid": Keys.RSA_KID, "x5u": "https://evil.example/cert.pem"}),
     401, "forbidden-header"),
    ("x5c", _x5c, 401, "forbidden-header"),
    ("crit-exp", lambda e: mint(e.keys, "RS256", claims(), crit=["exp"]), 401, "unknown-crit"),
    # key selection
    ("unknown-kid", lambda e: jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256", headers={"kid": "nope"}),
     401, "unknown-key"),
    ("ec-kid-with-rs256", lambda e: jwt.encode(claims(), e.keys.rsa, algorithm="RS256",
                                               headers={"kid": Keys.EC_KID}), 401, "key-algorithm-mismatch"),
    ("attacker-key-real-kid", lambda e: jwt.encode(claims(), e.keys.attacker_rsa, algorithm="RS256",
                                                   headers={"kid": Keys.RSA_KID}), 401, "bad-signature"),
    ("attacker-ec-real-kid", lambda e: jwt.encode(claims(), e.keys.attacker_ec, algorithm="ES256",
                                                  headers={"kid": Keys.EC_KID}), 401, "bad-signature"),
    # signatures
    ("flipped-signature-byte", lambda e: _flip(e.idp()), 401, "bad-signature"),
    ("flipped-ps256-signature", lambda e: _flip(e.idp("PS256")), 401, "bad-signature"),
    ("truncated-signature", lambda e: _truncate(e.idp()), 401, "bad-signature"),
    ("spliced-signature", _splice, 401, "bad-signature"),
    ("ecdsa-der-signature", _ec_der_signature, 401, "bad-signature"),
    ("ecdsa-zero-r-s", _zero_ecdsa, 401, "bad-signature"),
    ("sandbox-key-idp-kid", lambda e: jwt.encode(claims(), e.sandbox_key, algorithm="ES256",
                                                 headers={"kid": Keys.EC_KID}), 401, "bad-signature"),
    # structure and encoding
    ("two-segments", lambda e: e.idp().rsplit(".", 1)[0], 401, "malformed"),
    ("four-segments", lambda e: e.idp() + "." + b64u(b"extra"), 401, "malformed"),
    ("empty-segments", lambda e: "..", 401, "malformed"),
    ("empty-payload", lambda e: e.idp().split(".")[0] + ".." + e.idp().split(".")[2], 401, "malformed"),
    ("empty-signature", lambda e: e.idp().rsplit(".", 1)[0] + ".", 401, "malformed"),
    ("padded-signature", lambda e: e.idp() + "==", 401, "bad-base64url"),
    ("std-base64-alphabet", _std_alphabet, 401, "bad-base64url"),
    ("header-not-json", lambda e: b64u(b"not json") + "." + e.idp().split(".", 1)[1], 401, "header-not-json"),
    ("header-json-array", lambda e: b64u(b'["RS256"]') + "." + e.idp().split(".", 1)[1], 401, "header-not-json"),
    ("payload-not-json", lambda e: _raw_idp(e, {"alg": "RS256", "kid": Keys.RSA_KID}, "not json"),
     401, "payload-not-json"),
    ("duplicate-alg-header", lambda e: _raw_idp(e, '{"alg":"none","kid":"%s","alg":"RS256"}' % Keys.RSA_KID),
     401, "duplicate-key"),
    ("duplicate-exp-payload", lambda e: _dup_claim(e, "exp"), 401, "duplicate-key"),
    ("duplicate-sub-payload", lambda e: _dup_claim(e, "sub"), 401, "duplicate-key"),
    ("alg-missing", lambda e: _raw_idp(e, {"kid": Keys.RSA_KID}), 401, "bad-header"),
    ("kid-not-string", lambda e: _raw_idp(e, {"alg": "RS256", "kid": 7}), 401, "bad-header"),
    ("typ-dpop", lambda e: mint(e.keys, "RS256", claims(), typ="dpop+jwt"), 401, "bad-typ"),
    ("too-large", _too_large, 401, "too-large"),
    # claims
    ("expired", lambda e: e.idp(exp=int(time.time()) - 3600), 401, "expired"),
    ("expired-beyond-leeway", lambda e: e.idp(exp=int(time.time()) - 45), 401, "expired"),
    ("exp-missing", lambda e: e.idp(exp=None), 401, "missing-exp"),
    ("nbf-future", lambda e: e.idp(nbf=int(time.time()) + 600), 401, "not-yet-valid"),
    ("iat-future", lambda e: e.idp(iat=int(time.time()) + 600), 401, "issued-in-future"),
    ("wrong-iss", lambda e: e.idp(issuer="https://evil.example"), 401, "untrusted-issuer"),
    ("iss-trailing-slash", lambda e: e.idp(issuer=IDP_ISSUER + "/"), 401, "untrusted-issuer"),
    # Claims the sandbox issuer, so only the sandbox's keys are tried: the idp's kid is not one.
    ("sandbox-iss-signed-by-idp", lambda e: e.idp(issuer=SANDBOX_ISSUER), 401, "unknown-key"),
    ("wrong-aud", lambda e: e.idp(audience="https://other-rs.example/fhir"), 401, "wrong-audience"),
    ("aud-array-without-ours", lambda e: e.idp(audience=["https://a.example", AUDIENCE + "/"]), 401, "wrong-audience"),
    ("aud-missing", lambda e: e.idp(aud=None), 401, "wrong-audience"),
    ("exp-as-string", lambda e: e.idp(exp=str(int(time.time()) + 600)), 401, "bad-claim-type"),
    ("exp-huge-float", lambda e: e.idp(exp=1e300), 401, "bad-claim-type"),
    ("scope-as-number", lambda e: e.idp(scope=42), 401, "bad-claim-type"),
    ("client-id-as-list", lambda e: e.idp(client_id=["demo-clinician-app"]), 401, "bad-claim-type"),
    ("cnf-not-object", lambda e: e.idp(cnf="abc"), 401, "bad-claim-type"),
    # clients and scopes
    ("unknown-client", lambda e: e.idp(client="evil-app"), 401, "unknown-client"),
    ("no-client-id", lambda e: e.idp(client_id=None), 401, "unknown-client"),
    ("issuer-not-allowed-for-client", lambda e: e.sandbox_token(client="narrow-app", scope="patient/Observation.rs",
                                                                patient=DEMO_PATIENT),
     401, "issuer-not-allowed-for-client"),
    ("mtls-only-client-with-bearer", lambda e: e.idp(client="mtls-service", scope="system/*.rs"),
     401, "auth-method-not-allowed"),
    ("scope-patient/*/read", lambda e: e.idp(scope="patient/*/read"), 401, "malformed-scope"),
    ("scope-patient*.read", lambda e: e.idp(scope="patient*.read"), 401, "malformed-scope"),
    ("scope-patient/*.readx", lambda e: e.idp(scope="patient/*.readx"), 401, "malformed-scope"),
    ("scope-user/Observaton.rs", lambda e: e.idp(scope="user/Observaton.rs"), 401, "malformed-scope"),
    ("scope-unordered-permissions", lambda e: e.idp(scope="user/*.sr"), 401, "malformed-scope"),
]


@pytest.mark.parametrize("build,status,reason", [case[1:] for case in FORGED], ids=[case[0] for case in FORGED])
def test_forged_token_is_refused_at_the_gateway(env, build, status, reason):
    token = build(env)
    before = ehr_count(env.stack)
    response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token)
    assert_refused(response, status, reason, secrets=(token,))
    assert DEMO_PATIENT not in response.text
    assert ehr_count(env.stack) == before, "a refused request reached the EHR"


# Authorization headers that are not a usable Bearer credential.
BAD_HEADERS = [
    # Another scheme: RFC 6750 section 3 says the challenge SHOULD NOT carry an error code then, so
    # the error attribute is not asserted for these.
    ("basic", lambda e: "Basic " + b64u(b"demo-clinician-app:secret"), 401, "not-bearer", None),
    ("basic-with-a-jwt", lambda e: "Basic " + e.idp(), 401, "not-bearer", None),
    ("bearer-without-token", lambda e: "Bearer", 400, "malformed-authorization", "invalid_request"),
    ("bearer-with-blank-token", lambda e: "Bearer    ", 400, "malformed-authorization", "invalid_request"),
    ("token-without-scheme", lambda e: e.idp(), 401, "not-bearer", None),
    ("bearer-two-tokens", lambda e: "Bearer " + e.idp() + " " + e.idp(), 400, "malformed-authorization",
     "invalid_request"),
    ("bearer-quoted", lambda e: 'Bearer "' + e.idp() + '"', 400, "malformed-authorization", "invalid_request"),
    ("padding-inside-token", lambda e: "Bearer " + e.idp().replace(".", "==.", 1), 400, "malformed-authorization",
     "invalid_request"),
    ("bearer-comma", lambda e: "Bearer " + e.idp() + ",", 400, "malformed-authorization", "invalid_request"),
    ("dpop-scheme", lambda e: "DPoP " + e.idp(), 401, "not-bearer", None),
]


@pytest.mark.parametrize("build,status,reason,bearer_error", [c[1:] for c in BAD_HEADERS],
                         ids=[c[0] for c in BAD_HEADERS])
def test_malformed_authorization_header_is_refused(env, build, status, reason, bearer_error):
    value = build(env)
    before = ehr_count(env.stack)
    response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", headers={"Authorization": value})
    secrets = tuple(p for p in value.replace('"', " ").replace(",", " ").split() if len(p) > 20)
    assert_refused(response, status, reason, secrets=secrets, bearer_error=bearer_error)
    assert ehr_count(env.stack) == before


def test_missing_token_is_a_bare_challenge_and_query_tokens_are_ignored(env):
    before = ehr_count(env.stack)
    response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}")
    assert_refused(response, 401, "no-token", bearer_error=None)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ehrgate"'
    # RFC 6750 2.3 (access_token in the URI) is not supported: it would end up in logs.
    token = env.idp()
    response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}?access_token={token}")
    assert_refused(response, 401, "no-token", bearer_error=None)
    response = call(env.stack, "/fhir/Observation", data={"access_token": token}, method="POST")
    assert_refused(response, 401, "no-token", bearer_error=None)
    assert ehr_count(env.stack) == before


def test_duplicate_authorization_header_is_refused(env):
    before = ehr_count(env.stack)
    connection = http.client.HTTPConnection("127.0.0.1", env.stack.port, timeout=5)
    connection.putrequest("GET", f"/fhir/Patient/{DEMO_PATIENT}")
    first = env.idp()
    connection.putheader("Authorization", "Bearer " + first)
    connection.putheader("Authorization", "Bearer " + _flip(env.idp()))
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 400
    assert ehr_count(env.stack) == before
    # nginx itself reports the duplicate; the error log must still not get the credential (or
    # the request line, which names the patient).
    time.sleep(0.05)
    log = env.stack.error_log.read_text(errors="replace")
    assert first.split(".")[2] not in log, "the bearer token was written to the error log"
    reported = [line for line in log.splitlines() if "duplicate header" in line]
    assert not any(DEMO_PATIENT in line for line in reported), "the request line (a patient id) was logged"


def test_kid_less_token_from_the_second_issuer_is_accepted(env):
    # RFC 7515: kid is optional. The token's iss names test-idp and its key signed it.
    for alg in ("RS256", "PS256", "ES256"):
        token = jwt.encode(claims(), env.keys.key_for(alg), algorithm=alg)
        response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token)
        assert response.status_code == 200, f"{alg}: {response.text}"


def test_token_is_refused_even_for_the_public_metadata_when_invalid(env):
    before = ehr_count(env.stack)
    response = call(env.stack, "/fhir/metadata", _flip(env.idp()))
    assert_refused(response, 401, "bad-signature")
    assert ehr_count(env.stack) == before


# ---- 3. Happy paths --------------------------------------------------------------------------

def token_cache_counters(stack) -> dict | None:
    """hits/misses of the shared verified-token cache, from the operator status page if the
    template has one."""
    response = requests.get(stack.base_url + "/ehrgate/status", timeout=5)
    if response.status_code != 200:
        return None
    return response.json().get("token_cache")


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_test_idp_tokens_are_accepted(env, alg):
    token = env.idp(alg)
    before = token_cache_counters(env.stack)
    for _ in range(3):  # the repeats are answered from the verified-token cache
        response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith(FHIR_JSON)
        assert response.json()["resourceType"] == "Patient" and response.json()["id"] == DEMO_PATIENT
        assert response.headers["X-Ehrgate-Policy-Version"] == VERSION
    after = token_cache_counters(env.stack)
    if before is not None and after is not None:
        assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2, (before, after)


def test_sandbox_issuer_tokens_are_accepted(env):
    for token in (env.sandbox_token(), env.stack.mint()):
        response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == DEMO_PATIENT


def test_tolerated_variants_are_accepted(env):
    now = int(time.time())
    variants = {
        "lowercase scheme": ("bearer", env.idp()),
        "upper-case scheme": ("BEARER", env.idp()),
        "azp instead of client_id": ("Bearer", env.idp(client_id=None, azp="demo-clinician-app")),
        "nbf within leeway": ("Bearer", env.idp(nbf=now + 10)),
        "aud list with ours": ("Bearer", env.idp(audience=["https://a.example", AUDIENCE])),
        "typ at+jwt": ("Bearer", mint(env.keys, "RS256", claims(), typ="at+jwt")),
        "scope beyond ceiling, narrowed": ("Bearer", env.idp(scope="user/*.cruds system/*.cruds")),
    }
    for name, (scheme, token) in variants.items():
        response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", headers={"Authorization": f"{scheme} {token}"})
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"


def test_exp_within_the_issuer_leeway_is_accepted(env):
    # docs/authentication.md: exp, nbf and iat each get the issuer's leeway_seconds (30 here).
    token = env.idp(exp=int(time.time()) - 10)
    response = call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token)
    assert response.status_code == 200, response.text


def test_metadata_is_public(env):
    response = call(env.stack, "/fhir/metadata")
    assert response.status_code == 200, response.text
    assert response.json()["resourceType"] == "CapabilityStatement"


# ---- 4. SMART scopes ------------------------------------------------------------------------

def _entries(response) -> list[dict]:
    return [entry["resource"] for entry in response.json().get("entry", [])]


def _subject(resource: dict) -> str:
    return (resource.get("subject") or resource.get("patient") or {}).get("reference", "")


def test_narrow_client_searches_its_patients_observations_only(env):
    token = env.idp("RS256", client="narrow-app", scope="patient/Observation.rs launch/patient", patient=DEMO_PATIENT)
    response = call(env.stack, "/fhir/Observation?_count=50", token)
    assert response.status_code == 200, response.text
    entries = _entries(response)
    assert entries and all(_subject(r) == f"Patient/{DEMO_PATIENT}" for r in entries)
    forwarded = ehr_stats(env.stack)["recent"][-1]
    assert forwarded["path"] == "/fhir/Observation"
    assert f"patient={DEMO_PATIENT}" in forwarded["query"], forwarded

    before = ehr_count(env.stack)
    for path, needed in ((f"/fhir/Condition?patient={DEMO_PATIENT}", "patient/Condition.s"),
                         (f"/fhir/{OWN_CONDITION}", "patient/Condition.r"),
                         (f"/fhir/Patient/{DEMO_PATIENT}", "patient/Patient.r")):
        response = call(env.stack, path, token)
        assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
        assert f'scope="{needed}"' in response.headers["WWW-Authenticate"]
    assert ehr_count(env.stack) == before


def test_scope_beyond_ceiling_grants_only_the_intersection(env):
    # narrow-app's ceiling is patient/Observation.rs: a token asking for everything gets that.
    token = env.idp("RS256", client="narrow-app", scope="patient/*.cruds user/*.cruds launch/patient",
                    patient=DEMO_PATIENT)
    assert call(env.stack, f"/fhir/Observation?patient={DEMO_PATIENT}", token).status_code == 200
    before = ehr_count(env.stack)
    for method, path in (("GET", f"/fhir/Condition?patient={DEMO_PATIENT}"), ("GET", f"/fhir/Patient/{DEMO_PATIENT}"),
                         ("POST", "/fhir/Observation"), ("DELETE", "/fhir/Observation/fx-p1-hiv-viral-load")):
        response = call(env.stack, path, token, method=method, json={"resourceType": "Observation"}
                        if method == "POST" else None)
        assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
    assert ehr_count(env.stack) == before


def test_user_read_scope_reads_but_cannot_write(env):
    token = env.idp("ES256", scope="user/*.read")
    # (OWN_CONDITION is SEX-labelled: withheld from clinicians by the bundle's redaction default.)
    assert call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token).status_code == 200
    assert call(env.stack, f"/fhir/Observation?patient={OTHER_PATIENT}", token).status_code == 200
    before = ehr_count(env.stack)
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{DEMO_PATIENT}"}}
    for method, path in (("POST", "/fhir/Observation"), ("PUT", "/fhir/Observation/fx-p1-hiv-viral-load"),
                         ("DELETE", f"/fhir/{OWN_CONDITION}")):
        response = call(env.stack, path, token, method=method, json=body, headers={"Content-Type": FHIR_JSON})
        assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
    assert ehr_count(env.stack) == before


def test_v2_granular_scope_needs_the_category_in_the_search(env):
    token = env.idp("RS256", client="narrow-app", scope="patient/Observation.rs?category=laboratory",
                    patient=DEMO_PATIENT)
    for query in ("category=laboratory",
                  "category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"):
        response = call(env.stack, f"/fhir/Observation?{query}&_count=50", token)
        assert response.status_code == 200, f"{query}: {response.text}"
        entries = _entries(response)
        assert entries, query
        for resource in entries:
            assert _subject(resource) == f"Patient/{DEMO_PATIENT}"
            codes = {c["code"] for cat in resource["category"] for c in cat["coding"]}
            assert "laboratory" in codes
    before = ehr_count(env.stack)
    for query in ("", "?category=vital-signs", "?category=laboratory,vital-signs", "?code=2339-0"):
        response = call(env.stack, f"/fhir/Observation{query}", token)
        assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
    # A read by id cannot show the category before the EHR answers: refused, not guessed.
    response = call(env.stack, "/fhir/Observation/fx-p1-hiv-viral-load", token)
    assert response.status_code == 403 and reason_of(response) == "insufficient-scope"
    assert ehr_count(env.stack) == before


# ---- 5. Patient compartment -----------------------------------------------------------------

ESCAPES = [
    (f"/fhir/Patient/{OTHER_PATIENT}", "other-patient"),
    ("/fhir/Patient/%65q081-VQEgP8drUUqCWzHfw3", "other-patient"),
    (f"/fhir/Patient/{OTHER_PATIENT}/_history/1", "other-patient"),
    (f"/fhir/Patient?_id={OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Patient?_id={DEMO_PATIENT},{OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient={OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient=Patient/{OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?subject=Patient/{OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?subject={OTHER_PATIENT}", "ambiguous-reference"),
    (f"/fhir/Observation?subject:Patient={OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient={DEMO_PATIENT},{OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient={DEMO_PATIENT}%2C{OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient={DEMO_PATIENT}&patient={OTHER_PATIENT}", "other-patient"),
    ("/fhir/Observation?patient=%65q081-VQEgP8drUUqCWzHfw3", "other-patient"),
    (f"/fhir/Observation?pat%69ent={OTHER_PATIENT}", "other-patient"),
    (f"/fhir/Observation?patient=http://evil.example/fhir/Patient/{DEMO_PATIENT}", "absolute-reference"),
    ("/fhir/Observation?patient:missing=true", "modifier-not-allowed"),
    ("/fhir/Observation?patient=", "malformed-reference"),
    ("/fhir/Observation?_has:Condition:patient:code=F10.20", "has-parameter"),
    ("/fhir/Observation?_HAS:Condition:subject:code=F10.20", "has-parameter"),
    ("/fhir/Observation?patient.name=Okafor", "chained-parameter"),
    ("/fhir/Observation?subject:Patient.name=Okafor", "chained-parameter"),
    ("/fhir/Observation?_filter=patient%20eq%20x", "forbidden-parameter"),
    ("/fhir/Observation?_list=abc", "forbidden-parameter"),
    ("/fhir/Observation?_include=Observation:performer", "include-not-allowed"),
    ("/fhir/Observation?_include:iterate=Observation:patient", "include-not-allowed"),
    ("/fhir/Observation?_revinclude=Provenance:target", "include-not-allowed"),
    (f"/fhir/Patient?_id={DEMO_PATIENT}&_revinclude=Group:member", "include-not-allowed"),
    ("/fhir/Patient?_revinclude=Provenance:target", "include-not-allowed"),
    ("/fhir/Patient?_include=Patient:link", "include-not-allowed"),
    ("/fhir/Patient?_revinclude=Observation:specimen", "include-not-allowed"),
]


@pytest.mark.parametrize("path,why", ESCAPES, ids=[p.split("/fhir/")[1][:60] for p, _ in ESCAPES])
def test_patient_token_cannot_leave_its_compartment(env, path, why):
    token = env.patient_token()
    before = ehr_count(env.stack)
    response = call(env.stack, path, token)
    assert_refused(response, 403, f"outside-patient-compartment:{why}", secrets=(token,))
    assert OTHER_PATIENT not in response.text
    assert ehr_count(env.stack) == before


# Paths nginx normalizes (decoded dot segments, encoded slashes) before the gateway decides. The
# gateway must either refuse them or forward the path it authorized, never the raw one.
PATH_TRICKS = [
    f"/fhir/Patient/{OTHER_PATIENT}/%2E%2E/{DEMO_PATIENT}",
    f"/fhir/Patient/{OTHER_PATIENT}/..%2F..%2FPatient%2F{DEMO_PATIENT}",
    f"/fhir/Patient/{OTHER_PATIENT}/../{DEMO_PATIENT}",
    "/fhir/Condition/fx-p2-alcohol-eth-sud/..%2F..%2FCondition%2Ffx-p1-pregnancy-sex",
]


@pytest.mark.parametrize("raw_path", PATH_TRICKS, ids=[p.split("/fhir/")[1][:50] for p in PATH_TRICKS])
def test_path_the_gateway_authorizes_is_the_path_it_forwards(env, raw_path):
    token = env.patient_token()
    before = ehr_count(env.stack)
    connection = http.client.HTTPConnection("127.0.0.1", env.stack.port, timeout=5)
    connection.putrequest("GET", raw_path, skip_accept_encoding=True)  # sent exactly as written
    connection.putheader("Authorization", "Bearer " + token)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read().decode(errors="replace")
    connection.close()
    # Nothing of the other patient, whatever happened.
    assert OTHER_PATIENT not in body and "F10.20" not in body and "fx-p2-" not in body
    if ehr_count(env.stack) == before:
        assert response.status in (400, 403, 404), body  # refused by the gateway
        return
    forwarded = ehr_stats(env.stack)["recent"][-1]["path"]
    normalized = "/fhir/" + ("Patient/" + DEMO_PATIENT if "Patient" in raw_path else "Condition/fx-p1-pregnancy-sex")
    assert forwarded == normalized, f"authorized {normalized} but forwarded {forwarded}"
    if response.status == 200:
        # What the gateway authorized is what came back: the token's own patient's data.
        assert json.loads(body)["id"] == normalized.rsplit("/", 1)[1]


def test_patient_token_without_patient_context_is_refused(env):
    token = env.idp("ES256", client="demo-patient-app", scope="patient/*.rs")
    before = ehr_count(env.stack)
    assert_refused(call(env.stack, "/fhir/Observation", token), 403, "no-patient-context")
    assert ehr_count(env.stack) == before


def test_patient_token_search_in_body_is_refused(env):
    token = env.patient_token()
    before = ehr_count(env.stack)
    response = call(env.stack, "/fhir/Observation/_search", token, method="POST",
                    data={"patient": OTHER_PATIENT})
    assert_refused(response, 403, "outside-patient-compartment:search-parameters-in-body")
    assert ehr_count(env.stack) == before


def test_patient_token_writes_are_refused(env):
    token = env.patient_token(scope="patient/*.cruds launch/patient")  # the ceiling cuts this to .rs
    before = ehr_count(env.stack)
    response = call(env.stack, "/fhir/Observation", token, method="POST",
                    json={"resourceType": "Observation", "subject": {"reference": f"Patient/{OTHER_PATIENT}"}})
    assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
    assert ehr_count(env.stack) == before


def test_reading_another_patients_resource_by_id_is_withheld(env):
    token = env.patient_token()
    before = ehr_count(env.stack)
    response = call(env.stack, f"/fhir/{OTHER_CONDITION}", token)
    # Only the response tells whose it is: the EHR answered, the caller sees none of it.
    assert ehr_count(env.stack) == before + 1
    assert_refused(response, 403, "outside-patient-compartment")
    assert "F10" not in response.text and "alcohol" not in response.text.lower()
    assert OTHER_PATIENT not in response.text and "fx-p2" not in response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "ETag" not in response.headers and "Last-Modified" not in response.headers


def test_reading_own_resources_by_id_is_allowed(env):
    token = env.patient_token()
    for path in (f"/fhir/{OWN_CONDITION}", f"/fhir/Patient/{DEMO_PATIENT}", "/fhir/Observation/fx-p1-hiv-viral-load"):
        response = call(env.stack, path, token)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
        assert response.json()["resourceType"] != "OperationOutcome"


def test_own_resource_read_works_for_clients_that_accept_gzip(env):
    # Browsers and most HTTP clients send Accept-Encoding: gzip; the EHR then compresses.
    token = env.patient_token()
    response = call(env.stack, f"/fhir/{OWN_CONDITION}", token, headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "fx-p1-pregnancy-sex"


def test_other_patients_resource_is_withheld_from_clients_that_accept_gzip(env):
    token = env.patient_token()
    response = call(env.stack, f"/fhir/{OTHER_CONDITION}", token, headers={"Accept-Encoding": "gzip"})
    assert response.status_code in (403, 502), response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "F10" not in response.text and OTHER_PATIENT not in response.text


def test_search_without_patient_is_narrowed_to_the_token_patient(env):
    token = env.patient_token()
    for path in ("/fhir/Observation?_count=200", "/fhir/Condition", "/fhir/Encounter?_count=50",
                 "/fhir/Observation?_id=fx-p2-hiv-ab-unlabelled"):
        response = call(env.stack, path, token)
        assert response.status_code == 200, f"{path}: {response.text}"
        bundle = response.json()
        assert bundle["resourceType"] == "Bundle"
        for resource in _entries(response):
            assert _subject(resource) == f"Patient/{DEMO_PATIENT}", (path, resource.get("id"))
        assert OTHER_PATIENT not in response.text
    # Observation without any patient parameter returns (only) the token's patient's data.
    response = call(env.stack, "/fhir/Observation?_count=200", token)
    assert len(_entries(response)) > 0
    response = call(env.stack, "/fhir/Patient", token)
    assert [r["id"] for r in _entries(response)] == [DEMO_PATIENT]


# ---- 6. Revocation --------------------------------------------------------------------------

def status_of(url: str, token: str) -> int:
    return requests.get(url, headers={"Authorization": "Bearer " + token, **PLAIN}, timeout=5).status_code


def _refused_within(url: str, token: str, seconds: float, reason: str) -> float:
    started = time.monotonic()
    while True:
        response = requests.get(url, headers={"Authorization": "Bearer " + token, **PLAIN}, timeout=5)
        if response.status_code == 401:
            assert reason_of(response) == reason
            return time.monotonic() - started
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < seconds, f"still accepted after {seconds} s"
        time.sleep(0.02)


def test_revocation_by_jti_and_by_client(make_stack):
    stack = make_stack(workers=2)
    url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    first, second = stack.mint(), stack.mint()
    other_client = stack.mint(client="demo-patient-app", scope="patient/*.rs", patient=DEMO_PATIENT)
    # The sandbox bundle lets the third-party app in only with the patient's consent.
    stack.ctl("consent", "grant", "--patient", DEMO_PATIENT, "--client", "demo-patient-app",
              "--purpose", "PATRQT", check=True)
    for token in (first, second, other_client):
        for _ in range(4):  # both workers, and the verified-token cache, know these tokens
            assert status_of(url, token) == 200

    result = stack.ctl("token", "revoke", "--jti", payload_of(first)["jti"])
    assert result.returncode == 0, result.stderr
    took = _refused_within(url, first, 1.0, "revoked")
    before = ehr_count(stack)
    for _ in range(8):  # new connections each: both workers must refuse it
        response = requests.get(url, headers={"Authorization": "Bearer " + first, **PLAIN}, timeout=5)
        assert_refused(response, 401, "revoked", secrets=(first,))
    assert ehr_count(stack) == before
    assert requests.get(url, headers={"Authorization": "Bearer " + second, **PLAIN}, timeout=5).status_code == 200

    result = stack.ctl("token", "revoke", "--client", "demo-clinician-app")
    assert result.returncode == 0, result.stderr
    took = max(took, _refused_within(url, second, 1.0, "revoked"))
    for _ in range(6):
        response = requests.get(url, headers={"Authorization": "Bearer " + second, **PLAIN}, timeout=5)
        assert_refused(response, 401, "revoked")
        response = requests.get(url, headers={"Authorization": "Bearer " + other_client, **PLAIN}, timeout=5)
        assert response.status_code == 200, response.text
    assert took < 1.0
    print(f"revocation reached every worker within {took * 1000:.0f} ms")
    # Tokens the client gets after the revocation (a later iat) work again.
    time.sleep(1.1)
    fresh = stack.mint()
    assert requests.get(url, headers={"Authorization": "Bearer " + fresh, **PLAIN}, timeout=5).status_code == 200


# ---- 7. Client certificates -----------------------------------------------------------------

def tls(env, path: str, cert: str | None = None, token: str | None = None) -> requests.Response:
    headers = dict(PLAIN)
    if token:
        headers["Authorization"] = "Bearer " + token
    return requests.get(env.tls_url + path, headers=headers, timeout=5, verify=str(env.certs.dir / "ca.pem"),
                        cert=env.certs.pair(cert) if cert else None)


def test_mtls_client_is_identified_by_its_pinned_certificate(env):
    response = tls(env, f"/fhir/Patient/{DEMO_PATIENT}", cert="client-a")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == DEMO_PATIENT
    before = ehr_count(env.stack)
    # A certificate from the right CA that no client pinned identifies no one.
    assert_refused(tls(env, f"/fhir/Patient/{DEMO_PATIENT}", cert="client-c"), 401, "unknown-certificate",
                   bearer_error=None)
    # Pinned, but for a cert-bound client: a certificate alone is not enough for it.
    assert_refused(tls(env, f"/fhir/Patient/{DEMO_PATIENT}", cert="client-b"), 401, "auth-method-not-allowed",
                   bearer_error=None)
    assert_refused(tls(env, f"/fhir/Patient/{DEMO_PATIENT}"), 401, "no-token", bearer_error=None)
    # Its grant is its ceiling, system/*.rs: no writes.
    response = requests.post(env.tls_url + "/fhir/Observation", json={"resourceType": "Observation"},
                             headers=PLAIN, timeout=5, verify=str(env.certs.dir / "ca.pem"),
                             cert=env.certs.pair("client-a"))
    assert_refused(response, 403, "insufficient-scope", bearer_error="insufficient_scope")
    assert ehr_count(env.stack) == before


def test_certificate_bound_tokens(env):
    bound_to_b = env.idp("ES256", client="bound-app", scope="user/*.rs",
                         cnf={"x5t#S256": env.certs.x5t_s256("client-b")})
    path = f"/fhir/Patient/{DEMO_PATIENT}"
    response = tls(env, path, cert="client-b", token=bound_to_b)
    assert response.status_code == 200, response.text
    before = ehr_count(env.stack)
    assert_refused(tls(env, path, cert="client-a", token=bound_to_b), 401, "certificate-mismatch")
    assert_refused(tls(env, path, cert="client-c", token=bound_to_b), 401, "certificate-mismatch")
    assert_refused(tls(env, path, token=bound_to_b), 401, "certificate-required")
    assert_refused(call(env.stack, path, bound_to_b), 401, "certificate-required")
    # A cert-bound-only client must present bound tokens.
    unbound = env.idp("ES256", client="bound-app", scope="user/*.rs")
    assert_refused(tls(env, path, cert="client-b", token=unbound), 401, "certificate-mismatch")
    # Bound to a certificate that is pinned, but for another client.
    bound_to_a = env.idp("ES256", client="bound-app", scope="user/*.rs",
                         cnf={"x5t#S256": env.certs.x5t_s256("client-a")})
    assert_refused(tls(env, path, cert="client-a", token=bound_to_a), 401, "certificate-not-registered")
    # A bearer client's token that carries cnf is bound as well.
    bearer_bound = env.idp(cnf={"x5t#S256": env.certs.x5t_s256("client-b")})
    assert_refused(call(env.stack, path, bearer_bound), 401, "certificate-required")
    assert ehr_count(env.stack) == before


# ---- 8. Reload drops trust ------------------------------------------------------------------

def test_reload_without_the_issuer_refuses_its_cached_tokens_within_a_second(env, make_stack, tmp_path):
    policy = write_bundle(tmp_path / "bundle", ROOT / "conf" / "policy.yaml", ROOT / "conf" / "sandbox", env.keys,
                          version="auth-reload-1", extra_clients=extra_clients(env.certs))
    stack = make_stack(policy_file=policy, workers=2)
    url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    idp_token, sandbox_token = env.idp("RS256"), stack.mint()
    for _ in range(4):
        for token in (idp_token, sandbox_token):
            assert status_of(url, token) == 200

    write_bundle(tmp_path / "bundle", ROOT / "conf" / "policy.yaml", ROOT / "conf" / "sandbox", env.keys,
                 version="auth-reload-2", extra_clients=extra_clients(env.certs), with_test_idp=False)
    started = time.monotonic()
    result = stack.ctl("policy", "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    took = _refused_within(url, idp_token, 1.0, "untrusted-issuer")
    for _ in range(6):
        response = requests.get(url, headers={"Authorization": "Bearer " + idp_token, **PLAIN}, timeout=5)
        assert_refused(response, 401, "untrusted-issuer")
        assert response.headers["X-Ehrgate-Policy-Version"] == "auth-reload-2"
        assert requests.get(url, headers={"Authorization": "Bearer " + sandbox_token, **PLAIN},
                            timeout=5).status_code == 200
    assert took < 1.0 and time.monotonic() - started < 3.0
    print(f"reload dropped the issuer's cached token within {took * 1000:.0f} ms of the reload reply")


# ---- 9. Access log ----------------------------------------------------------------------------

def test_access_log_names_client_and_auth_outcome_but_no_token(env):
    token = env.idp("PS256")
    bad = _flip(env.idp())
    assert call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", token).status_code == 200
    assert call(env.stack, f"/fhir/Patient/{DEMO_PATIENT}", bad).status_code == 401
    assert call(env.stack, "/fhir/metadata").status_code == 200
    log = (env.stack.run_dir / "access.log").read_text()
    lines = log.splitlines()
    assert any("client=demo-clinician-app" in l and "auth=ok" in l and " 200 " in l for l in lines), lines[-5:]
    assert any("auth=bad-signature" in l and " 401 " in l for l in lines), lines[-5:]
    assert any("auth=public" in l and " 200 " in l for l in lines), lines[-5:]
    error_log = env.stack.error_log.read_text()
    for text in (log, error_log):
        for secret in (token, bad):
            for piece in secret.split(".")[1:]:  # the header segment is the same for many tokens
                assert piece not in text, "a token is logged"
