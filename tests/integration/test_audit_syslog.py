"""Audit forwarding over syslog/TLS (RFC 5424 messages, RFC 5425 framing) to a real rsyslog
receiver (imtcp with the gtls driver) on 127.0.0.1: at least once, resumed from a persisted
cursor after the receiver was down and after policyd was SIGKILLed."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from stack import DEMO_PATIENT, free_port

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
GTLS = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")

pytestmark = pytest.mark.skipif(not Path(RSYSLOGD).exists() or not GTLS.exists(),
                                reason="rsyslog and rsyslog-gnutls are needed (build.sh installs them)")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(directory: Path) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ehrgate test syslog CA",
            cwd=directory)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=directory)


class Receiver:
    def __init__(self, directory: Path, port: int):
        self.directory = directory
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.output = directory / "received.log"
        (directory / "work").mkdir(exist_ok=True)
        (directory / "rsyslog.conf").write_text(f"""
global(workDirectory="{directory}/work"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{directory}/ca.pem"
       DefaultNetstreamDriverCertFile="{directory}/server.pem"
       DefaultNetstreamDriverKeyFile="{directory}/server.key")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.output}" template="raw")
""")

    def start(self) -> None:
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.directory / "rsyslog.conf"),
                                      "-i", str(self.directory / "rsyslogd.pid")],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.directory / "rsyslogd.stderr", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rsyslogd exited: " + (self.directory / "rsyslogd.stderr").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def messages(self) -> list[str]:
        return self.output.read_text().splitlines() if self.output.exists() else []

    def seqs(self) -> list[int]:
        return [int(m.group(1)) for line in self.messages()
                if (m := re.search(r'\[ehrgate@32473 seq="(\d+)"', line))]


@pytest.fixture
def receiver(tmp_path):
    make_certs(tmp_path)
    r = Receiver(tmp_path, free_port())
    r.start()
    yield r
    r.stop()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def head_seq(stack) -> int:
    status = json.loads(stack.ctl("status").stdout.splitlines()[0])
    return status["audit"]["last_seq"]


def test_records_reach_rsyslog_at_least_once_across_outages(make_stack, receiver):
    stack = make_stack(start=False)
    base = stack.policyd_command
    stack.policyd_command = lambda: base() + [
        "--audit-syslog", f"127.0.0.1:{receiver.port}",
        "--audit-syslog-ca", str(receiver.directory / "ca.pem")]
    stack.start()
    headers = {"Authorization": "Bearer " + stack.mint(patient=DEMO_PATIENT)}

    def burst(prefix: str, n: int) -> None:
        for i in range(n):
            r = requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                             headers={**headers, "X-Request-ID": f"{prefix}-{i}"}, timeout=10)
            assert r.status_code == 200

    burst("first", 5)
    assert wait_until(lambda: any("first-4" in m for m in receiver.messages()), timeout=30)
    line = next(m for m in receiver.messages() if '"correlation_id":"first-0"' in m)
    # RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG
    assert re.match(r'<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ ehrgate \d+ (access|outcome) '
                    r'\[ehrgate@32473 seq="\d+" record_id="[^"]+" correlation_id="first-0"\] \{', line), line

    # Receiver down: records wait; nothing is skipped once it is back.
    receiver.stop()
    burst("while-down", 5)
    time.sleep(0.5)
    receiver.start()
    assert wait_until(lambda: set(range(1, head_seq(stack) + 1)) <= set(receiver.seqs()), timeout=30)

    # policyd SIGKILLed: it resumes from the persisted cursor.
    stack.stop_policyd(signal.SIGKILL)
    stack.start_policyd()
    assert wait_until(lambda: requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                                           headers=headers, timeout=10).status_code == 200)
    burst("after-kill", 5)
    assert wait_until(lambda: set(range(1, head_seq(stack) + 1)) <= set(receiver.seqs()), timeout=30)
    # The persisted cursor catches up with what was delivered.
    target = head_seq(stack)

    def forwarding():
        return json.loads(stack.ctl("status").stdout.splitlines()[0])["audit_syslog"]

    assert wait_until(lambda: forwarding()["connected"] and forwarding()["cursor"] >= target)


def test_untrusted_receiver_is_refused(make_stack, receiver, tmp_path_factory):
    other = tmp_path_factory.mktemp("other-ca")
    make_certs(other)  # a CA that did not sign the receiver's certificate
    stack = make_stack(start=False)
    base = stack.policyd_command
    stack.policyd_command = lambda: base() + [
        "--audit-syslog", f"127.0.0.1:{receiver.port}", "--audit-syslog-ca", str(other / "ca.pem")]
    stack.start()
    requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                 headers={"Authorization": "Bearer " + stack.mint(patient=DEMO_PATIENT)}, timeout=10)

    def failed():
        s = json.loads(stack.ctl("status").stdout.splitlines()[0])["audit_syslog"]
        return s["failures"] > 0 and not s["connected"]

    assert wait_until(failed)
    assert receiver.seqs() == []
