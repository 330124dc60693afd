"""policyd on its real sockets, spoken to with an independent msgpack implementation
(Debian's python3-msgpack), and ehrgatectl against it."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import time

import jwt
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from stack import ROOT, SANDBOX_POLICY_VERSION

DECIDE_REQUEST, DECIDE_REPLY, POLICY_FETCH, POLICY_SNAPSHOT, PING, PONG, ERROR = 1, 2, 3, 4, 6, 7, 0
ADMIN_REQUEST = 16


def frame(message_type: int, request_id: int, body: dict, version: int = 1) -> bytes:
    payload = msgpack.packb([version, message_type, request_id, body])
    return struct.pack(">I", len(payload)) + payload


def read_frame(sock: socket.socket) -> list:
    header = _read_exactly(sock, 4)
    (length,) = struct.unpack(">I", header)
    return msgpack.unpackb(_read_exactly(sock, length), raw=False)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def decide(path: str, query: str = "", method: str = "GET") -> dict:
    return {"correlation_id": "t-1", "method": method, "path": path, "query": query, "client_id": "", "host": "x"}


def test_pipelined_decisions_with_an_independent_msgpack(make_stack):
    stack = make_stack()
    with connect(stack.data_socket) as sock:
        sock.sendall(b"".join(frame(DECIDE_REQUEST, 100 + i, decide(p)) for i, p in enumerate(
            ["/fhir/Patient/1", "/fhir/AllergyIntolerance", "/nowhere"])))
        replies = {r[2]: r for r in (read_frame(sock) for _ in range(3))}
    assert replies[100][1] == DECIDE_REPLY and replies[100][3]["decision"] == 1
    assert replies[100][3]["policy_version"] == SANDBOX_POLICY_VERSION
    assert replies[100][3]["resource_type"] == "Patient" and replies[100][3]["interaction"] == "read"
    assert (replies[101][3]["decision"], replies[101][3]["http_status"]) == (0, 403)
    assert (replies[102][3]["decision"], replies[102][3]["reason"]) == (0, "no-route")


def test_ping_and_snapshot_fetch(make_stack):
    stack = make_stack()
    with connect(stack.data_socket) as sock:
        sock.sendall(frame(PING, 7, {}) + frame(POLICY_FETCH, 8, {}))
        pong, snapshot = read_frame(sock), read_frame(sock)
    assert pong[1:3] == [PONG, 7]
    assert snapshot[1:3] == [POLICY_SNAPSHOT, 8]
    assert snapshot[3]["serial"] == 1


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x03\xc1\xc1\xc1",                     # 0xc1 is never valid msgpack
    frame(DECIDE_REQUEST, 1, {}, version=9),             # unknown protocol version
    struct.pack(">I", 64 << 20) + b"x" * 16,             # beyond the frame cap
    b"\x00\x00\x00\x02\x92\x01",                         # envelope of the wrong shape
])
def test_bad_frames_get_an_error_and_a_hang_up_without_hurting_others(make_stack, garbage):
    stack = make_stack()
    with connect(stack.data_socket) as healthy, connect(stack.data_socket) as bad:
        bad.sendall(garbage)
        reply = read_frame(bad)
        assert reply[1] == ERROR and reply[3]["code"] == "bad-frame"
        with pytest.raises((ConnectionError, socket.timeout)):
            read_frame(bad)
        healthy.sendall(frame(PING, 5, {}))
        assert read_frame(healthy)[1] == PONG
    assert stack.policyd.poll() is None


def test_undecodable_decide_body_gets_an_error_reply_on_a_live_connection(make_stack):
    stack = make_stack()
    with connect(stack.data_socket) as sock:
        sock.sendall(frame(DECIDE_REQUEST, 3, {"method": 12}) + frame(PING, 4, {}))
        error, pong = read_frame(sock), read_frame(sock)
    assert error[1:3] == [ERROR, 3] and error[3]["code"] == "bad-request"
    assert pong[1:3] == [PONG, 4]


def test_admin_commands_are_refused_on_the_data_socket(make_stack):
    stack = make_stack()
    with connect(stack.data_socket) as sock:
        sock.sendall(frame(ADMIN_REQUEST, 1, {"command": "policy-reload", "args": {}}))
        reply = read_frame(sock)
    assert reply[1] == ERROR and reply[3]["code"] == "unexpected-message"


def test_socket_modes(make_stack):
    stack = make_stack()
    assert oct(os.stat(stack.admin_socket).st_mode & 0o777) == "0o600"
    assert oct(os.stat(stack.data_socket).st_mode & 0o777) in ("0o660", "0o600")


def test_sigterm_drains_and_exits_cleanly(make_stack):
    stack = make_stack()
    assert stack.stop_policyd() == 0
    assert not stack.data_socket.exists() and not stack.admin_socket.exists()
    assert "stopped" in (stack.run_dir / "policyd.log").read_text()


def test_second_policyd_on_the_same_socket_refuses_to_start(make_stack):
    stack = make_stack()
    result = subprocess.run(stack.policyd_command(), capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert "served by another process" in result.stderr
    assert stack.policyd.poll() is None


def test_policyd_command_line_errors(make_stack):
    stack = make_stack(start=False)
    policyd = stack.bin("policyd")
    assert subprocess.run([policyd, "--help"], capture_output=True, text=True).returncode == 0
    for args, message in [([], "--policy is required"),
                          (["--socket-mode", "999"], "--socket-mode expects an octal mode"),
                          (["--bogus", "1"], 'unknown option "--bogus"')]:
        result = subprocess.run([policyd, *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_policyd_refuses_to_start_with_an_invalid_bundle(make_stack, tmp_path):
    stack = make_stack(start=False, policy_file=ROOT / "conf" / "examples" / "invalid-policy.yaml")
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    with pytest.raises(RuntimeError, match="exited with code 1"):
        stack.start_policyd()
    log = (stack.run_dir / "policyd.log").read_text()
    assert "invalid-policy.yaml:" in log and "refused" in log


def test_ctl_validate(make_stack):
    stack = make_stack(start=False)
    ok = stack.ctl("policy", "validate", str(ROOT / "conf" / "policy.yaml"))
    assert ok.returncode == 0 and f"valid, version {SANDBOX_POLICY_VERSION}," in ok.stdout
    bad = stack.ctl("policy", "validate", str(ROOT / "conf" / "examples" / "invalid-policy.yaml"))
    assert bad.returncode == 1
    assert "invalid-policy.yaml:" in bad.stderr and "problem(s)" in bad.stderr
    missing = stack.ctl("policy", "validate", "/nonexistent.yaml")
    assert missing.returncode == 1 and "/nonexistent.yaml" in missing.stderr


def test_ctl_without_a_running_policyd_says_how_to_start_one(make_stack):
    stack = make_stack(start=False)
    result = stack.ctl("status")
    assert result.returncode == 1
    assert "cannot reach policyd" in result.stderr and "./build.sh run" in result.stderr


def test_minted_token_verifies_with_the_published_sandbox_jwks(make_stack):
    stack = make_stack(start=False)
    token = stack.mint("demo-patient-app", "patient/*.read", patient="erXuFYUfucBZaryVksYEcMg3", ttl="120")
    jwks = json.loads((ROOT / "conf" / "sandbox" / "dev-issuer-jwks.json").read_text())
    key = jwks["keys"][0]
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(base64.urlsafe_b64decode(key["x"] + "=="), "big"),
        int.from_bytes(base64.urlsafe_b64decode(key["y"] + "=="), "big"), ec.SECP256R1()).public_key()
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="http://127.0.0.1:8080/fhir",
                        issuer="https://sandbox-issuer.ehrgate.local")
    assert claims["client_id"] == "demo-patient-app" and claims["patient"] == "erXuFYUfucBZaryVksYEcMg3"
    assert claims["scope"] == "patient/*.read"
    assert 119 <= claims["exp"] - claims["iat"] <= 120 and claims["jti"]
    assert abs(claims["iat"] - time.time()) < 5
