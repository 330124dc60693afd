"""Helpers for tests/integration/test_auth.py: a test identity provider, hand-built JWS, certificates.

Tokens are minted with PyJWT (and, for shapes PyJWT refuses to produce, assembled by hand and
signed with PyJWT's algorithm objects), so the gateway is checked against an implementation that
is not its own. Certificates come from the openssl CLI.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
import uuid
from pathlib import Path

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

IDP_ISSUER = "https://idp.test.example"
AUDIENCE = "http://127.0.0.1:8080/fhir"
SANDBOX_ISSUER = "https://sandbox-issuer.ehrgate.local"

_ALGORITHMS = get_default_algorithms()


def b64u(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_json(obj) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")))


def _uint(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def jwk_of(public_key, kid: str, alg: str | None = None) -> dict:
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        jwk = {"kty": "RSA", "n": b64u(_uint(numbers.n, (numbers.n.bit_length() + 7) // 8)),
               "e": b64u(_uint(numbers.e, (numbers.e.bit_length() + 7) // 8))}
    else:
        numbers = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public_key.curve.name]
        jwk = {"kty": "EC", "crv": crv, "x": b64u(_uint(numbers.x, size)), "y": b64u(_uint(numbers.y, size))}
    jwk["kid"] = kid
    jwk["use"] = "sig"
    if alg:
        jwk["alg"] = alg
    return jwk


class Keys:
    """The test IdP's signing keys (published in its JWKS) and an attacker's (published nowhere)."""

    RSA_KID = "idp-rsa-1"
    EC_KID = "idp-ec-1"
    EC384_KID = "idp-ec384-1"

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        # A P-384 key without "alg": usable for ES384, which this issuer does not allow.
        self.ec384 = ec.generate_private_key(ec.SECP384R1())
        self.attacker_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.attacker_ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict:
        return {"keys": [
            jwk_of(self.rsa.public_key(), self.RSA_KID),  # no alg: RS256 and PS256 both use it
            jwk_of(self.ec.public_key(), self.EC_KID, "ES256"),
            jwk_of(self.ec384.public_key(), self.EC384_KID),
        ]}

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def key_for(self, alg: str):
        return {"RS": self.rsa, "PS": self.rsa, "ES": self.ec}[alg[:2]] if alg != "ES384" else self.ec384

    def kid_for(self, alg: str) -> str:
        if alg == "ES384":
            return self.EC384_KID
        return self.EC_KID if alg.startswith("ES") else self.RSA_KID


def claims(client: str = "demo-clinician-app", scope: str = "user/*.read", *, issuer: str = IDP_ISSUER,
           audience=AUDIENCE, ttl: int = 600, **extra) -> dict:
    now = int(time.time())
    body = {"iss": issuer, "sub": "test-user-1", "aud": audience, "exp": now + ttl, "iat": now,
            "jti": uuid.uuid4().hex, "client_id": client, "scope": scope}
    for name, value in extra.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def mint(keys: Keys, alg: str = "RS256", payload: dict | None = None, **headers) -> str:
    """A well-formed token from the test IdP, signed with PyJWT."""
    headers.setdefault("kid", keys.kid_for(alg))
    return jwt.encode(payload if payload is not None else claims(), keys.key_for(alg), algorithm=alg,
                      headers=headers)


def sign_raw(header: str | bytes | dict, payload: str | bytes | dict, key, alg: str) -> str:
    """A JWS from literal segments (for duplicate members, non-JSON, odd spellings), signed with
    PyJWT's implementation of `alg` over exactly those bytes."""
    def segment(part) -> str:
        if isinstance(part, dict):
            return b64u_json(part)
        return b64u(part)
    signing_input = segment(header) + "." + segment(payload)
    signature = _ALGORITHMS[alg].sign(signing_input.encode(), key)
    return signing_input + "." + b64u(signature)


def hs256_with_secret(header: dict, payload: dict, secret: bytes) -> str:
    signing_input = b64u_json(header) + "." + b64u_json(payload)
    return signing_input + "." + b64u(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def segments(token: str) -> list[str]:
    return token.split(".")


def payload_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# ---- certificates (openssl CLI) -------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)


class Certificates:
    """A private CA, a server certificate for 127.0.0.1 and client certificates, in `directory`."""

    def __init__(self, directory: Path, clients: tuple[str, ...] = ("client-a", "client-b", "client-c")):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ehrgate test CA", cwd=d)
        (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        self._issue("server", "/CN=127.0.0.1", "server.ext")
        for name in clients:
            self._issue(name, f"/CN={name}", "client.ext")

    def _issue(self, name: str, subject: str, ext: str) -> None:
        d = self.dir
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", ext, cwd=d)

    def pair(self, name: str) -> tuple[str, str]:
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")

    def der(self, name: str) -> bytes:
        return subprocess.run(["openssl", "x509", "-in", str(self.dir / f"{name}.pem"), "-outform", "DER"],
                              check=True, capture_output=True).stdout

    def sha256_hex(self, name: str) -> str:
        return hashlib.sha256(self.der(name)).hexdigest()

    def x5t_s256(self, name: str) -> str:
        return b64u(hashlib.sha256(self.der(name)).digest())


def tls_server_block(port: int, certs: Certificates) -> str:
    """An HTTPS server with optional client certificates, its /fhir/ location like the template's."""
    d = certs.dir
    return f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        server_tokens off;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/ca.pem;
        ssl_verify_client optional;

        location /fhir/ {{
            ehrgate on;
            proxy_pass http://sandbox_ehr;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host:$server_port;
            proxy_set_header X-Request-ID $ehrgate_correlation_id;
        }}
    }}
"""


# ---- policy bundle ------------------------------------------------------------------------------

def write_bundle(directory: Path, source: Path, sandbox_dir: Path, keys: Keys, *, version: str,
                 extra_clients: list[dict], with_test_idp: bool = True, with_consent: bool = False) -> Path:
    """A copy of the sandbox bundle with the test IdP as a second issuer and extra clients.

    Without `with_consent` the bundle's consent section is left out: these tests are about
    authentication, and tests/integration/test_consent.py covers consent."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(sandbox_dir, directory / "sandbox", dirs_exist_ok=True)
    (directory / "test-idp-jwks.json").write_text(json.dumps(keys.jwks(), indent=2))
    bundle = yaml.safe_load(source.read_text())
    bundle["version"] = version
    if not with_consent:
        bundle.pop("consent", None)
    clients = [dict(c) for c in extra_clients]
    if with_test_idp:
        bundle["issuers"].append({
            "id": "test-idp",
            "issuer": IDP_ISSUER,
            "audience": AUDIENCE,
            "jwks_file": "test-idp-jwks.json",
            "algorithms": ["RS256", "PS256", "ES256"],
            "leeway_seconds": 30,
        })
    else:
        for client in clients:
            client.pop("issuers", None)
    bundle["clients"].extend(clients)
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(bundle, sort_keys=False))
    return path
