"""The request path: nginx worker -> policyd decision -> sandbox EHR, and its failure modes."""

from __future__ import annotations

import re
import signal
import time

import pytest
import requests

from stack import DEMO_PATIENT, SANDBOX_POLICY_VERSION

POLICY_VERSION = SANDBOX_POLICY_VERSION
FHIR_JSON = "application/fhir+json"


def sandbox_count(stack) -> int:
    return requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["requests"]


def sandbox_recent(stack) -> list[dict]:
    return requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["recent"]


def auth(stack) -> dict:
    return {"Authorization": "Bearer " + stack.mint()}


def assert_outcome(response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    correlation = response.headers["X-Request-ID"]
    assert body["id"] == correlation
    assert correlation in body["issue"][0]["diagnostics"]
    assert body["issue"][0]["details"]["coding"][0]["code"] == reason
    return body


def test_nginx_config_test_passes(make_stack):
    stack = make_stack(start=False)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    (stack.run_dir / "tmp").mkdir(exist_ok=True)
    result = stack.nginx_test_config()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def test_read_returns_sandbox_fhir_json(shared_stack):
    response = requests.get(f"{shared_stack.base_url}/fhir/Patient/{DEMO_PATIENT}", headers=auth(shared_stack),
                            timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    assert response.json()["resourceType"] == "Patient"
    assert response.json()["id"] == DEMO_PATIENT
    assert response.headers["X-Ehrgate-Policy-Version"] == POLICY_VERSION
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_search_with_paging_through_gateway(shared_stack):
    response = requests.get(f"{shared_stack.base_url}/fhir/Observation",
                            params={"patient": DEMO_PATIENT, "_count": 2}, headers=auth(shared_stack), timeout=5)
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert len(bundle["entry"]) <= 2
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    # The gateway forwards its own Host, so paging links lead back through the gateway.
    assert links["self"].startswith(f"{shared_stack.base_url}/fhir/Observation")
    if "next" in links:  # Bundle.total is removed by redaction (docs/redaction.md)
        follow = requests.get(links["next"], headers=auth(shared_stack), timeout=5)
        assert follow.status_code == 200 and follow.json()["resourceType"] == "Bundle"


def test_correlation_id_from_client_is_kept_and_forwarded(shared_stack):
    response = requests.get(f"{shared_stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                            headers={**auth(shared_stack), "X-Request-ID": "partner-trace-0042"}, timeout=5)
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "partner-trace-0042"
    seen = [r for r in sandbox_recent(shared_stack) if r["headers"].get("x-request-id") == "partner-trace-0042"]
    assert seen, "the upstream did not receive the correlation id"


def test_unsafe_correlation_id_is_replaced(shared_stack):
    response = requests.get(f"{shared_stack.base_url}/fhir/Patient/{DEMO_PATIENT}",
                            headers={**auth(shared_stack), "X-Request-ID": "x" * 200}, timeout=5)
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


@pytest.mark.parametrize("method,path,status,reason", [
    ("GET", "/fhir/AllergyIntolerance", 403, "resource-type-not-permitted"),
    ("GET", "/fhir/Patient/" + DEMO_PATIENT + "/$everything", 403, "interaction-not-supported"),
    ("POST", "/fhir/$export", 403, "interaction-not-supported"),
    ("GET", "/fhir/Patient/a/b/c/d", 400, "unrecognized-fhir-request"),
    ("GET", "/fhir/NotAResource/1", 400, "unrecognized-fhir-request"),
    ("HEAD", "/fhir/AllergyIntolerance", 403, None),
])
def test_policy_denials_never_reach_the_ehr(shared_stack, method, path, status, reason):
    before = sandbox_count(shared_stack)
    response = requests.request(method, shared_stack.base_url + path, headers=auth(shared_stack), timeout=5)
    if reason is None:
        assert response.status_code == status and response.text == ""
    else:
        assert_outcome(response, status, reason)
        # Errors carry no request data: ids in the path may identify a patient.
        assert DEMO_PATIENT not in response.text
    assert response.headers["X-Ehrgate-Policy-Version"] == POLICY_VERSION
    assert sandbox_count(shared_stack) == before


def test_denied_post_with_body_is_answered_cleanly(shared_stack):
    before = sandbox_count(shared_stack)
    token = shared_stack.mint(scope="user/*.cruds")
    response = requests.post(shared_stack.base_url + "/fhir/AllergyIntolerance", data=b'{"resourceType":"x"}' * 500,
                             headers={"Authorization": "Bearer " + token, "Content-Type": FHIR_JSON}, timeout=5)
    assert_outcome(response, 403, "resource-type-not-permitted")
    # The connection stays usable after the unread body was discarded.
    assert sandbox_count(shared_stack) == before


def test_unprotected_location_needs_no_decision(shared_stack):
    response = requests.get(shared_stack.base_url + "/healthz", timeout=5)
    assert response.status_code == 200 and response.text == "ok\n"
    assert "X-Ehrgate-Policy-Version" not in response.headers


def test_policyd_down_fails_closed_then_recovers_without_nginx_reload(make_stack):
    stack = make_stack(decision_timeout="300ms")
    url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    headers = auth(stack)
    assert requests.get(url, headers=headers, timeout=5).status_code == 200
    nginx_pid = stack.nginx.pid

    stack.stop_policyd(signal.SIGKILL)
    before = sandbox_count(stack)
    for _ in range(5):
        started = time.monotonic()
        response = requests.get(url, headers=headers, timeout=5)
        elapsed = time.monotonic() - started
        assert_outcome(response, 503, response.json()["issue"][0]["details"]["coding"][0]["code"])
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] in {
            "policy-unavailable", "policy-timeout"}
        assert response.headers["Retry-After"] == "1"
        assert elapsed < 1.0, f"503 took {elapsed:.3f}s, beyond the 300 ms decision timeout"
    assert sandbox_count(stack) == before, "a request reached the EHR without a decision"

    stack.start_policyd()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if requests.get(url, headers=headers, timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("gateway did not recover within 5 s of policyd coming back")
    assert stack.nginx.poll() is None and stack.nginx.pid == nginx_pid
    assert sandbox_count(stack) == before + 1


def test_no_phi_in_error_log(make_stack):
    stack = make_stack()
    for path in (f"/fhir/Patient/{DEMO_PATIENT}", "/fhir/AllergyIntolerance?patient=" + DEMO_PATIENT):
        requests.get(stack.base_url + path, headers=auth(stack), timeout=5)
    stack.stop_policyd(signal.SIGKILL)
    requests.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}", headers=auth(stack), timeout=5)
    stack.start_policyd()
    logs = stack.error_log.read_text() + (stack.run_dir / "policyd.log").read_text()
    assert DEMO_PATIENT not in logs
