"""Faults the real policyd cannot produce on demand: silence, garbage, nonsense replies.

A fake policyd stands on the data socket for these only; recovery is then shown against the real
one. Everything else in the suite talks to the real daemon.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time

import msgpack
import pytest
import requests

from stack import DEMO_PATIENT


class FakePolicyd:
    """Reads frames and answers according to `mode`: "silent", "garbage" or "no-decision"."""

    def __init__(self, path, mode: str, snapshot: dict, revocations: dict):
        self.mode = mode
        self.snapshot = snapshot
        self.revocations = revocations
        self.connections = 0
        self.open_sockets: list[socket.socket] = []
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                fake.connections += 1
                sock = self.request
                fake.open_sockets.append(sock)
                sock.settimeout(10)
                buffer = b""
                try:
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                        while len(buffer) >= 4:
                            (length,) = struct.unpack(">I", buffer[:4])
                            if len(buffer) < 4 + length:
                                break
                            envelope = msgpack.unpackb(buffer[4:4 + length], raw=False)
                            buffer = buffer[4 + length:]
                            fake.answer(sock, envelope)
                except OSError:
                    return

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        os.chmod(path, 0o666)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, sock: socket.socket, envelope: list) -> None:
        _, message_type, request_id, _ = envelope
        # The worker's start-up fetches are answered with what the real policyd served, so the
        # worker is fully armed; only decisions misbehave.
        replies = {POLICY_FETCH: (POLICY_SNAPSHOT, self.snapshot),
                   REVOCATION_FETCH: (REVOCATION_LIST, self.revocations)}
        if message_type in replies:
            reply_type, body = replies[message_type]
            payload = msgpack.packb([1, reply_type, request_id, body])
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            return
        if self.mode == "silent" or message_type != DECIDE_REQUEST:
            return
        if self.mode == "garbage":
            sock.sendall(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
        elif self.mode == "no-decision":
            body = {"http_status": 200, "reason": "permitted", "policy_version": "fake"}
            payload = msgpack.packb([1, 2, request_id, body])
            sock.sendall(struct.pack(">I", len(payload)) + payload)

    def close(self) -> None:
        """Like the process exiting: the listener and every connection go away."""
        self.server.shutdown()
        self.server.server_close()
        for sock in self.open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


DECIDE_REQUEST, POLICY_FETCH, POLICY_SNAPSHOT, REVOCATION_FETCH, REVOCATION_LIST = 1, 3, 4, 8, 9


def fetch_from_real_policyd(stack) -> tuple[dict, dict]:
    """What the real policyd serves a worker at start: its snapshot and revocation list."""
    stack.start_policyd()
    bodies = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stack.data_socket))
        for message_type in (POLICY_FETCH, REVOCATION_FETCH):
            payload = msgpack.packb([1, message_type, 1, {}])
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            header = sock.recv(4, socket.MSG_WAITALL)
            (length,) = struct.unpack(">I", header)
            reply = msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL), raw=False)
            bodies[reply[1]] = reply[3]
    stack.stop_policyd()
    return bodies[POLICY_SNAPSHOT], bodies[REVOCATION_LIST]


def start_with_fake(make_stack, mode: str, timeout: str = "200ms", **kwargs):
    stack = make_stack(start=False, decision_timeout=timeout, **kwargs)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    (stack.run_dir / "tmp").mkdir(exist_ok=True)
    snapshot, revocations = fetch_from_real_policyd(stack)
    fake = FakePolicyd(stack.data_socket, mode, snapshot, revocations)
    stack.start_sandbox()
    stack.start_nginx()
    return stack, fake


def get_patient(stack):
    return requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                        headers={"Authorization": "Bearer " + stack.mint()}, timeout=5)


def reason_of(response) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def switch_to_real_policyd_and_recover(stack, fake) -> None:
    fake.close()
    stack.data_socket.unlink()
    stack.start_policyd()
    deadline = time.monotonic() + 5
    while get_patient(stack).status_code != 200:
        assert time.monotonic() < deadline, "no recovery within 5 s of the real policyd starting"
        time.sleep(0.1)


def stats(stack) -> int:
    return requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["requests"]


def test_silent_policyd_times_out_fail_closed_and_connection_is_replaced(make_stack):
    stack, fake = start_with_fake(make_stack, "silent", timeout="200ms")
    for attempt in range(4):
        started = time.monotonic()
        response = get_patient(stack)
        elapsed = time.monotonic() - started
        assert response.status_code == 503 and elapsed < 0.8
        # After three timeouts a worker drops the wedged connection; until it reconnects its
        # requests fail at once instead of waiting.
        if attempt == 0 or reason_of(response) == "policy-timeout":
            assert reason_of(response) == "policy-timeout" and elapsed > 0.15
    assert stats(stack) == 0
    # Three timeouts in a row on one connection mark it wedged: the worker reconnects.
    deadline = time.monotonic() + 3
    while fake.connections <= 2:  # one per worker at start
        assert time.monotonic() < deadline, "worker never replaced the wedged connection"
        get_patient(stack)
    switch_to_real_policyd_and_recover(stack, fake)
    # nginx's own request context (the request line, with its patient id) stays out of the log.
    assert DEMO_PATIENT not in stack.error_log.read_text()


def test_garbage_from_policyd_fails_closed(make_stack):
    stack, fake = start_with_fake(make_stack, "garbage")
    response = get_patient(stack)
    assert response.status_code == 503 and reason_of(response) == "policy-unavailable"
    assert stats(stack) == 0
    assert "bad frame" in stack.error_log.read_text()
    switch_to_real_policyd_and_recover(stack, fake)


def test_reply_without_a_decision_is_never_a_permit(make_stack):
    stack, fake = start_with_fake(make_stack, "no-decision")
    response = get_patient(stack)
    assert response.status_code == 503 and reason_of(response) == "policy-error"
    assert stats(stack) == 0
    switch_to_real_policyd_and_recover(stack, fake)


def test_decision_queue_bound_is_enforced(make_stack):
    """With policyd silent, at most max_pending calls wait; the rest get 503 at once."""
    stack, fake = start_with_fake(make_stack, "silent", timeout="2s", workers=1,
                                  extra_http="ehrgate_policyd_max_pending 2;")
    token = stack.mint()
    results: list[tuple[int, str, float]] = []

    def one():
        started = time.monotonic()
        response = requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                                headers={"Authorization": "Bearer " + token}, timeout=10)
        results.append((response.status_code, reason_of(response), time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Two slots hold requests until their timeout; the start-up fetches were answered.
    reasons = sorted(reason for _, reason, _ in results)
    assert all(status == 503 for status, _, _ in results)
    assert reasons == ["policy-timeout"] * 2 + ["policy-unavailable"] * 4, results
    assert all(elapsed < 1.0 for _, reason, elapsed in results if reason == "policy-unavailable")
    assert stats(stack) == 0
    fake.close()
