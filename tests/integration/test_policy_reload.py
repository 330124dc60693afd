"""Hot policy reload: no nginx reload, no failed in-flight request, every worker within 1 s."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import requests

from stack import DEMO_PATIENT, ROOT, SANDBOX_POLICY_VERSION

OLD_VERSION = SANDBOX_POLICY_VERSION


def private_policy(tmp_path: Path) -> Path:
    """A copy of the sandbox bundle the test may edit, with the JWKS it names beside it."""
    path = tmp_path / "policy.yaml"
    shutil.copy(ROOT / "conf" / "policy.yaml", path)
    shutil.copytree(ROOT / "conf" / "sandbox", tmp_path / "sandbox", dirs_exist_ok=True)
    return path


def rewrite(path: Path, version: str, drop_resource: str | None = None) -> None:
    text = path.read_text().replace(OLD_VERSION, version)
    if drop_resource:
        lines = [line for line in text.splitlines() if line.strip() != f"- {drop_resource}"]
        text = "\n".join(lines) + "\n"
    path.write_text(text)


def worker_serials(stack) -> list[int]:
    status = json.loads(stack.ctl("status", check=True).stdout.splitlines()[0])
    return [w["policy_serial"] for w in status["workers"]]


def test_reload_under_load_switches_every_worker_within_a_second_with_no_failures(make_stack, tmp_path):
    policy = private_policy(tmp_path)
    assert "    - Observation" in policy.read_text(), "the test edits the Observation line of the bundle"
    stack = make_stack(policy_file=policy, workers=2)
    token = stack.mint()
    patient_url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    failures: list[str] = []
    versions_seen: list[str] = []
    stop = threading.Event()

    def load():
        session = requests.Session()
        deadline = time.monotonic() + 20  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            response = session.get(patient_url, headers={"Authorization": "Bearer " + token}, timeout=5)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
            versions_seen.append(response.headers.get("X-Ehrgate-Policy-Version", ""))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        rewrite(policy, "test-reload-2", drop_resource="Observation")
        started = time.monotonic()
        result = stack.ctl("policy", "reload")
        assert result.returncode == 0, result.stderr
        assert "test-reload-2" in result.stdout + result.stderr
        while set(worker_serials(stack)) != {2}:
            assert time.monotonic() - started < 1.0, f"workers still at {worker_serials(stack)} after 1 s"
            time.sleep(0.02)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert not failures, f"{len(failures)} failed requests during reload, e.g. {failures[:3]}"
    assert versions_seen[-1] == "test-reload-2"
    assert {OLD_VERSION, "test-reload-2"} == set(versions_seen)
    # The new rule is in force.
    denied = requests.get(f"{stack.base_url}/fhir/Observation?patient={DEMO_PATIENT}",
                          headers={"Authorization": "Bearer " + token}, timeout=5)
    assert denied.status_code == 403
    assert denied.headers["X-Ehrgate-Policy-Version"] == "test-reload-2"


def test_invalid_bundle_is_refused_and_old_policy_keeps_serving(make_stack, tmp_path):
    policy = private_policy(tmp_path)
    stack = make_stack(policy_file=policy)
    policy.write_text(policy.read_text().replace(OLD_VERSION, "v2").replace("context: user", "context: robot"))
    result = stack.ctl("policy", "reload")
    assert result.returncode == 1
    assert "refused" in result.stderr
    assert f"{policy}:" in result.stdout and "context" in result.stdout  # file, line and field
    response = requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                            headers={"Authorization": "Bearer " + stack.mint()}, timeout=5)
    assert response.status_code == 200
    assert response.headers["X-Ehrgate-Policy-Version"] == OLD_VERSION


def test_changed_content_under_the_same_version_is_refused(make_stack, tmp_path):
    policy = private_policy(tmp_path)
    stack = make_stack(policy_file=policy)
    rewrite(policy, OLD_VERSION, drop_resource="Observation")
    result = stack.ctl("policy", "reload")
    assert result.returncode == 1
    assert "bump `version`" in result.stderr
    assert worker_serials(stack) == [1, 1]


def test_sighup_reloads_and_unchanged_reload_is_a_no_op(make_stack, tmp_path):
    policy = private_policy(tmp_path)
    stack = make_stack(policy_file=policy)
    unchanged = stack.ctl("policy", "reload")
    assert unchanged.returncode == 0 and "unchanged" in unchanged.stdout + unchanged.stderr

    rewrite(policy, "test-reload-3")
    stack.policyd.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 2
    while set(worker_serials(stack)) != {2}:
        assert time.monotonic() < deadline, "SIGHUP did not reach the workers within 2 s"
        time.sleep(0.05)
    response = requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                            headers={"Authorization": "Bearer " + stack.mint()}, timeout=5)
    assert response.headers["X-Ehrgate-Policy-Version"] == "test-reload-3"


def test_serial_survives_policyd_restart(make_stack, tmp_path):
    policy = private_policy(tmp_path)
    stack = make_stack(policy_file=policy)
    rewrite(policy, "test-reload-4")
    assert stack.ctl("policy", "reload").returncode == 0
    assert stack.stop_policyd() == 0
    stack.start_policyd()
    status = json.loads(stack.ctl("status", check=True).stdout.splitlines()[0])
    assert status["policy"]["serial"] == 2 and status["policy"]["version"] == "test-reload-4"
