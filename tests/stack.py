"""Start and stop a whole ehrgate stack: policyd, the sandbox EHR and the stock nginx with our module.

One implementation serves `./build.sh run` (the `run` command below) and the integration tests
(tests/integration/conftest.py), so the tests exercise exactly what a developer runs.
Run with Debian's /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX = "/usr/sbin/nginx"
SANDBOX = ROOT / "tests" / "sandbox_ehr" / "sandbox_ehr.py"
TEMPLATE = ROOT / "conf" / "nginx" / "ehrgate-sandbox.conf.in"
DEMO_PATIENT = "erXuFYUfucBZaryVksYEcMg3"
# The purpose of use each demo client's tokens state (conf/policy.yaml, docs/consent.md).
DEMO_PURPOSES = {"demo-clinician-app": "TREAT", "demo-patient-app": "PATRQT", "demo-batch": "HOPERAT"}


def sandbox_policy_version() -> str:
    """The `version` of conf/policy.yaml, so tests follow the bundle instead of copying it."""
    for line in (ROOT / "conf" / "policy.yaml").read_text().splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].split("#", 1)[0].strip()
    raise RuntimeError("conf/policy.yaml has no version line")


SANDBOX_POLICY_VERSION = sandbox_policy_version()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
    raise RuntimeError(f"{what} not ready within {timeout} s")


class Stack:
    """A running (or runnable) stack in `run_dir`. Every process is a child of this object."""

    template = TEMPLATE  # the nginx configuration; the benchmark substitutes its own

    def __init__(self, build_dir: Path, run_dir: Path, *, port: int | None = None,
                 ehr_port: int | None = None, workers: int = 2, decision_timeout: str = "250ms",
                 policy_file: Path | None = None, error_log_level: str = "notice", extra_http: str = ""):
        self.build_dir = Path(build_dir).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.port = port or free_port()
        self.ehr_port = ehr_port or free_port()
        self.workers = workers
        self.decision_timeout = decision_timeout
        self.policy_file = Path(policy_file or ROOT / "conf" / "policy.yaml").resolve()
        self.error_log_level = error_log_level
        self.extra_http = extra_http  # directives tests add to the http block
        self.as_root = os.geteuid() == 0
        # nginx workers must reach the data socket. As root they run as www-data, and a run dir
        # under a private home or pytest's 0700 tmp would block them, so the socket gets its own
        # traversable directory.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="ehrgate-sock-", dir="/tmp"))
        self.socket_dir.chmod(0o711)
        self.data_socket = self.socket_dir / "policyd.sock"
        self.admin_socket = self.run_dir / "policyd-admin.sock"
        self.data_dir = self.run_dir / "policyd-data"
        self.policyd: subprocess.Popen | None = None
        self.sandbox: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None

    # ---- paths -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ehr_url(self) -> str:
        return f"http://127.0.0.1:{self.ehr_port}"

    @property
    def error_log(self) -> Path:
        return self.run_dir / "error.log"

    @property
    def nginx_conf(self) -> Path:
        return self.run_dir / "nginx.conf"

    def bin(self, name: str) -> str:
        return str(self.build_dir / "bin" / name)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Stack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "tmp").mkdir(exist_ok=True)
        self.start_policyd()
        self.start_sandbox()
        self.start_nginx()
        return self

    def stop(self) -> None:
        for proc in (self.nginx, self.sandbox, self.policyd):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc is self.nginx else signal.SIGTERM)
        for proc in (self.nginx, self.sandbox, self.policyd):
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def policyd_command(self) -> list[str]:
        cmd = [self.bin("policyd"), "--policy", str(self.policy_file), "--data-dir", str(self.data_dir),
               "--socket", str(self.data_socket), "--admin-socket", str(self.admin_socket)]
        if self.as_root:
            cmd += ["--socket-group", "www-data", "--socket-mode", "0660"]
        return cmd

    def start_policyd(self, timeout: float = 10) -> subprocess.Popen:
        log = open(self.run_dir / "policyd.log", "ab")
        self.policyd = subprocess.Popen(self.policyd_command(), stdout=subprocess.PIPE, stderr=log,
                                        text=True, bufsize=1)
        _wait_for_line(self.policyd, "POLICYD READY", timeout, "policyd")
        return self.policyd

    def stop_policyd(self, sig: int = signal.SIGTERM) -> int:
        assert self.policyd is not None
        self.policyd.send_signal(sig)
        return self.policyd.wait(timeout=15)

    def start_sandbox(self, timeout: float = 15) -> None:
        log = open(self.run_dir / "sandbox-ehr.log", "ab")
        self.sandbox = subprocess.Popen(
            ["/usr/bin/python3", str(SANDBOX), "--host", "127.0.0.1", "--port", str(self.ehr_port)],
            stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        _wait_for_line(self.sandbox, "SANDBOX_EHR READY", timeout, "sandbox EHR")

    def render_nginx_conf(self) -> Path:
        values = {
            "MODULE_PATH": str(self.build_dir / "ngx_http_ehrgate_module.so"),
            "USER_LINE": "user www-data www-data;" if self.as_root else "",
            "WORKERS": str(self.workers),
            "RUN_DIR": str(self.run_dir),
            "ERROR_LOG_LEVEL": self.error_log_level,
            "DATA_SOCKET": str(self.data_socket),
            "DECISION_TIMEOUT": self.decision_timeout,
            "EHR_PORT": str(self.ehr_port),
            "PORT": str(self.port),
            "EXTRA_HTTP": self.extra_http,
        }
        text = self.template.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        self.nginx_conf.write_text(text)
        return self.nginx_conf

    def nginx_test_config(self) -> subprocess.CompletedProcess:
        self.render_nginx_conf()
        return subprocess.run([NGINX, "-t", "-p", str(self.run_dir), "-c", str(self.nginx_conf)],
                              capture_output=True, text=True)

    def start_nginx(self, timeout: float = 10, wait_for_policy: bool = True) -> None:
        self.render_nginx_conf()
        # The run dir may hold an error.log from earlier runs: only what this nginx writes counts.
        self._log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0
        self.nginx = subprocess.Popen([NGINX, "-p", str(self.run_dir), "-c", str(self.nginx_conf)],
                                      stdout=subprocess.DEVNULL, stderr=open(self.run_dir / "nginx.stderr", "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nginx.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.nginx.returncode}; see {self.error_log}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as response:
                    if response.status == 200 and (not wait_for_policy or self._workers_have_policy()):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nginx not ready within {timeout} s; see {self.error_log}")

    def _workers_have_policy(self) -> bool:
        """Every worker has connected to policyd and applied its snapshot."""
        if not self.error_log.exists():
            return False
        with open(self.error_log, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace").count("active in worker") >= self.workers

    # ---- helpers for tests and the run command -----------------------------------------------
    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin("ehrgatectl"), "--socket", str(self.admin_socket), *args],
                              capture_output=True, text=True, check=check, cwd=ROOT)

    def mint(self, client: str = "demo-clinician-app", scope: str = "user/*.read",
             purpose: str | None = "demo", **claims: str) -> str:
        args = ["token", "mint", "--client", client, "--scope", scope]
        # Consent (docs/consent.md): tokens of the demo clients state the purpose each is
        # registered for, as a real authorization server would; purpose=None mints none.
        if purpose == "demo":
            purpose = DEMO_PURPOSES.get(client)
        if purpose:
            args += ["--purpose", purpose]
        for name, value in claims.items():
            args += [f"--{name}", value]
        return self.ctl(*args, check=True).stdout.strip()

    def error_log_alerts(self) -> list[str]:
        if not self.error_log.exists():
            return []
        return [line for line in self.error_log.read_text(errors="replace").splitlines()
                if "[alert]" in line or "[emerg]" in line]


def run(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.build_dir), Path(args.run_dir), port=args.port, ehr_port=args.ehr_port,
                  workers=args.workers)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except Exception as exc:  # noqa: BLE001 - report and clean up whatever did start
        print(f"ehrgate: start failed: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    token_cmd = ("./build/bin/ehrgatectl token mint --client demo-clinician-app "
                 "--scope 'user/*.read' --user Practitioner/demo-clinician --purpose TREAT")
    print(f"""
ehrgate sandbox is up (run state in {stack.run_dir}):
  gateway      {stack.base_url}/fhir/   (nginx + ngx_http_ehrgate_module)
  sandbox EHR  {stack.ehr_url}/fhir/   (simulated Epic-style FHIR R4, synthetic data)
  policyd      {stack.data_socket} (admin: {stack.admin_socket})

Try:
  curl -s -H "Authorization: Bearer $({token_cmd})" {stack.base_url}/fhir/Patient/{DEMO_PATIENT}

Operate:  ./build/bin/ehrgatectl status | policy reload | policy validate conf/policy.yaml
Ctrl-C stops all three.
""", flush=True)
    try:
        while not stopping:
            for name, proc in (("policyd", stack.policyd), ("sandbox EHR", stack.sandbox), ("nginx", stack.nginx)):
                if proc is not None and proc.poll() is not None:
                    print(f"ehrgate: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        stack.stop()
        print("ehrgate: stopped", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the sandbox stack in the foreground")
    run_parser.add_argument("--build-dir", default=str(ROOT / "build"))
    run_parser.add_argument("--run-dir", default=str(ROOT / "run"))
    run_parser.add_argument("--port", type=int, default=8080)
    run_parser.add_argument("--ehr-port", type=int, default=8090)
    run_parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
