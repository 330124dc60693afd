"""Consent end to end: purpose of use, the patient's consents in policyd's store, break-glass,
revocation under load, and the `ehrgatectl consent` commands, against the real nginx + policyd +
sandbox EHR stack with the sandbox bundle (conf/policy.yaml).

Refusals are also checked to have stayed at the gateway: the sandbox EHR's request counter must
not move. The obligations (labels to withhold) are read from the access log, which the sandbox
nginx configuration writes with $ehrgate_obligations and friends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

from stack import DEMO_PATIENT, ROOT, Stack, free_port

OTHER_PATIENT = "eq081-VQEgP8drUUqCWzHfw3"
SENSITIVE = "ETH,HIV,PSY,SEX,SUD"
FHIR_JSON = "application/fhir+json"


def _build_dir() -> Path:
    return Path(os.environ.get("EHRGATE_BUILD_DIR", ROOT / "build"))


def _testdata_dir() -> Path:
    if os.environ.get("EHRGATE_TESTDATA"):
        return Path(os.environ["EHRGATE_TESTDATA"])
    return ROOT.parent / "shared" / "testdata"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(_build_dir(), tmp_path_factory.mktemp("consent-stack"), workers=2)
    try:
        s.start()
    except Exception:
        s.stop()
        raise
    yield s
    s.stop()
    alerts = s.error_log_alerts()
    assert not alerts, "nginx logged alerts/emergencies:\n" + "\n".join(alerts)


@pytest.fixture(scope="module")
def patients(stack) -> list[str]:
    """Synthetic patients other than the two fixtures, one per test that changes consents."""
    bundle = requests.get(stack.ehr_url + "/fhir/Patient?_count=40", timeout=5).json()
    ids = [e["resource"]["id"] for e in bundle["entry"]]
    return [i for i in ids if i not in (DEMO_PATIENT, OTHER_PATIENT)]


def ehr_count(stack) -> int:
    return requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["requests"]


def clinician(stack, purpose: str | None = "TREAT", **claims) -> dict:
    token = stack.mint("demo-clinician-app", "user/*.rs", purpose=purpose,
                       user="Practitioner/e0hz1I60SHusIONqCNngJqVK", **claims)
    return {"Authorization": "Bearer " + token, "Accept-Encoding": "identity"}


def patient_app(stack, patient: str, purpose: str | None = "PATRQT") -> dict:
    token = stack.mint("demo-patient-app", "patient/*.rs launch/patient", purpose=purpose, patient=patient)
    return {"Authorization": "Bearer " + token, "Accept-Encoding": "identity"}


def get(stack, path: str, headers: dict) -> requests.Response:
    return requests.get(f"{stack.base_url}/fhir/{path}", headers=headers, timeout=5)


def log_line(stack, correlation_id: str) -> str:
    """The access-log line of one request (nginx writes it after the response: poll briefly)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for line in (stack.run_dir / "access.log").read_text().splitlines():
            if f"corr={correlation_id}" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {correlation_id}")


def log_field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S*)", line)
    assert match, line
    return match.group(1)


def assert_refused(stack, response: requests.Response, reason: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == reason
    assert body["id"] == response.headers["X-Request-ID"]


def ctl_ok(stack, *args: str) -> str:
    result = stack.ctl(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def status(stack) -> dict:
    return json.loads(ctl_ok(stack, "status").splitlines()[0])


# ---- Purpose of use and the defaults ----------------------------------------------------------

def test_treatment_default_permits_and_withholds_sensitive_classes(stack):
    response = get(stack, f"Condition?patient={DEMO_PATIENT}", clinician(stack))
    assert response.status_code == 200, response.text
    assert response.json()["resourceType"] == "Bundle"
    line = log_line(stack, response.headers["X-Request-ID"])
    assert log_field(line, "purpose") == "TREAT"
    assert log_field(line, "withhold") == SENSITIVE
    assert log_field(line, "consent") == "-"
    assert log_field(line, "break_glass") == "-"


def test_purpose_from_header_when_the_token_has_none(stack):
    before = ehr_count(stack)
    # No purpose at all: the fallback, consent-required.
    assert_refused(stack, get(stack, f"Patient/{DEMO_PATIENT}", clinician(stack, None)), "consent-required")
    # Not a PurposeOfUse code: treated as none.
    headers = clinician(stack, None) | {"X-Purpose-Of-Use": "TRAET"}
    assert_refused(stack, get(stack, f"Patient/{DEMO_PATIENT}", headers), "consent-required")
    # A valid code the client is not registered for.
    headers = clinician(stack, None) | {"X-Purpose-Of-Use": "HPAYMT"}
    assert_refused(stack, get(stack, f"Patient/{DEMO_PATIENT}", headers), "purpose-not-allowed")
    assert ehr_count(stack) == before, "a refused request reached the EHR"
    headers = clinician(stack, None) | {"X-Purpose-Of-Use": "TREAT"}
    response = get(stack, f"Patient/{DEMO_PATIENT}", headers)
    assert response.status_code == 200, response.text
    assert log_field(log_line(stack, response.headers["X-Request-ID"]), "purpose") == "TREAT"


def test_claim_wins_over_header(stack):
    headers = clinician(stack, "TREAT") | {"X-Purpose-Of-Use": "HPAYMT"}
    response = get(stack, f"Patient/{DEMO_PATIENT}", headers)
    assert response.status_code == 200, response.text
    assert log_field(log_line(stack, response.headers["X-Request-ID"]), "purpose") == "TREAT"
    headers = clinician(stack, "HPAYMT") | {"X-Purpose-Of-Use": "TREAT"}
    assert_refused(stack, get(stack, f"Patient/{DEMO_PATIENT}", headers), "purpose-not-allowed")


def test_metadata_needs_no_purpose(stack):
    response = requests.get(f"{stack.base_url}/fhir/metadata", headers=clinician(stack, None), timeout=5)
    assert response.status_code == 200, response.text


# ---- The patient's consents -------------------------------------------------------------------

def test_third_party_app_needs_consent_then_gets_data(stack, patients):
    patient = patients[0]
    before = ehr_count(stack)
    response = get(stack, f"Observation?patient={patient}", patient_app(stack, patient))
    assert_refused(stack, response, "consent-required")
    assert ehr_count(stack) == before

    consent_id = ctl_ok(stack, "consent", "grant", "--patient", patient, "--client", "demo-patient-app",
                        "--purpose", "PATRQT", "--deny-label", "PSY")
    assert re.fullmatch(r"c-[0-9a-f]{24}", consent_id)
    response = get(stack, f"Observation?patient={patient}", patient_app(stack, patient))
    assert response.status_code == 200, response.text
    assert response.json()["resourceType"] == "Bundle"
    line = log_line(stack, response.headers["X-Request-ID"])
    assert log_field(line, "consent") == consent_id
    # Its nested deny withholds PSY; ETH/SUD (42 CFR Part 2) need a consent naming them.
    assert log_field(line, "withhold") == "ETH,PSY,SUD"
    # The consent is for the patient app only: another patient is still refused.
    other = patients[1]
    assert_refused(stack, get(stack, f"Observation?patient={other}", patient_app(stack, other)),
                   "consent-required")
    # And for PATRQT only: another purpose is refused.
    assert_refused(stack, get(stack, f"Observation?patient={patient}", patient_app(stack, patient, "HPAYMT")),
                   "purpose-not-allowed")


def test_imported_deny_refuses_the_clinician(stack, patients, tmp_path):
    patient = patients[2]
    consent = {
        "resourceType": "Consent", "id": "deny-clinician-1", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"actor": [{"reference": {"identifier": {"system": "urn:ehrgate:client",
                                                              "value": "demo-clinician-app"}}}]},
    }
    path = tmp_path / "deny.json"
    path.write_text(json.dumps(consent))
    assert ctl_ok(stack, "consent", "import", str(path)) == "deny-clinician-1"
    before = ehr_count(stack)
    response = get(stack, f"Patient/{patient}", clinician(stack))
    assert_refused(stack, response, "consent-denied")
    response = get(stack, f"Observation?subject=Patient/{patient}", clinician(stack))
    assert_refused(stack, response, "consent-denied")
    assert ehr_count(stack) == before
    # Another patient is unaffected.
    assert get(stack, f"Patient/{patients[3]}", clinician(stack)).status_code == 200


def test_revocation_under_load_denies_within_one_second(stack, patients):
    patient = patients[4]
    consent_id = ctl_ok(stack, "consent", "grant", "--patient", patient, "--client", "demo-patient-app",
                        "--purpose", "PATRQT")
    headers = patient_app(stack, patient)
    assert get(stack, f"Patient/{patient}", headers).status_code == 200

    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer():
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            status_code = session.get(f"{stack.base_url}/fhir/Patient/{patient}", headers=headers,
                                      timeout=5).status_code
            with lock:
                results.append((sent, status_code))

    log_offset = (stack.run_dir / "access.log").stat().st_size
    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ctl_ok(stack, "consent", "revoke", consent_id)
    revoked_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()

    before = [code for sent, code in results if sent < revoked_at - 0.5]
    after_bound = [code for sent, code in results if sent >= revoked_at + 1.0]
    after_return = [code for sent, code in results if sent >= revoked_at + 0.05]
    assert before and all(code == 200 for code in before), set(before)
    assert len(after_bound) > 20, "the load did not continue after the bound"
    assert after_bound.count(200) == 0
    # policyd pushes the new consent epoch to every worker before the command returns, so in
    # practice the cached permits die at once, not only by the bound.
    assert after_return.count(200) == 0
    assert set(after_return) == {403}
    # The permits before the revocation came from the workers' decision cache: the revocation
    # was tested against cached decisions, not only against policyd.
    time.sleep(0.2)  # nginx writes a request's log line after its response
    with open(stack.run_dir / "access.log") as log:
        log.seek(log_offset)
        sources = [log_field(line, "dcache") for line in log
                   if "client=demo-patient-app" in line and " GET 200 " in line]
    assert sources.count("hit") > 20, sources[:20]


def test_expired_grant_no_longer_permits(stack, patients):
    patient = patients[5]
    until = str(int(time.time()) + 2)
    ctl_ok(stack, "consent", "grant", "--patient", patient, "--client", "demo-patient-app",
           "--purpose", "PATRQT", "--until", until)
    headers = patient_app(stack, patient)
    assert get(stack, f"Patient/{patient}", headers).status_code == 200
    time.sleep(max(0.0, int(until) - time.time()) + 0.2)
    assert_refused(stack, get(stack, f"Patient/{patient}", headers), "consent-required")


# ---- The signed consent context -----------------------------------------------------------------

def forwarded_consent_header(stack, correlation_id: str) -> str | None:
    recent = requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["recent"]
    for entry in reversed(recent):
        if entry["headers"].get("x-request-id") == correlation_id:
            return entry["headers"].get("x-ehrgate-consent")
    raise AssertionError(f"the EHR did not see request {correlation_id}")


def verify_context(stack, token: str) -> dict:
    jwks = json.loads(ctl_ok(stack, "consent", "jwks"))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["typ"] == "ehrgate-consent+jwt"
    (key,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    return jwt.decode(token, jwt.PyJWK.from_dict(key).key, algorithms=["ES256"],
                      options={"require": ["exp", "iat"]})


def test_forwarded_request_carries_a_verifiable_consent_context(stack):
    forged = "eyJhbGciOiJub25lIn0.eyJkZWNpc2lvbiI6InBlcm1pdCJ9."
    headers = clinician(stack) | {"X-Ehrgate-Consent": forged}
    response = get(stack, f"Condition?patient={DEMO_PATIENT}", headers)
    assert response.status_code == 200, response.text
    correlation = response.headers["X-Request-ID"]
    token = forwarded_consent_header(stack, correlation)
    assert token and forged not in token, "the client's copy reached the EHR"
    claims = verify_context(stack, token)
    assert claims["decision"] == "permit"
    assert claims["purpose_of_use"] == "TREAT"
    assert claims["obligations"] == SENSITIVE.split(",")
    assert claims["consent_ids"] == []
    assert claims["patient"] == DEMO_PATIENT
    assert claims["resource_type"] == "Condition" and claims["interaction"] == "search-type"
    assert claims["client_id"] == "demo-clinician-app"
    assert claims["break_glass"] is False
    assert 0 < claims["exp"] - claims["iat"] <= 5
    # A tampered token does not verify.
    head, body, signature = token.split(".")
    tampered = json.loads(jwt.utils.base64url_decode(body))
    tampered["obligations"] = []
    forged_body = jwt.utils.base64url_encode(json.dumps(tampered).encode()).decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verify_context(stack, f"{head}.{forged_body}.{signature}")


def test_the_gateway_publishes_the_consent_jwks(stack):
    response = requests.get(f"{stack.base_url}/.well-known/ehrgate-consent-jwks.json", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/jwk-set+json"
    assert "max-age" in response.headers["Cache-Control"]
    published = response.json()
    assert published == json.loads(ctl_ok(stack, "consent", "jwks"))
    (key,) = published["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-256" and key["alg"] == "ES256" and "d" not in key
    # A hop behind the gateway verifies the forwarded context with what it fetched.
    forwarded = get(stack, f"Patient/{DEMO_PATIENT}", clinician(stack))
    token = forwarded_consent_header(stack, forwarded.headers["X-Request-ID"])
    claims = jwt.decode(token, jwt.PyJWK.from_dict(key).key, algorithms=["ES256"],
                        options={"require": ["exp", "iat"]})
    assert claims["decision"] == "permit"


def test_consent_context_names_the_consents_and_break_glass(stack, patients):
    patient = patients[9]
    consent_id = ctl_ok(stack, "consent", "grant", "--patient", patient, "--client", "demo-patient-app",
                        "--purpose", "PATRQT")
    response = get(stack, f"Patient/{patient}", patient_app(stack, patient))
    assert response.status_code == 200, response.text
    claims = verify_context(stack, forwarded_consent_header(stack, response.headers["X-Request-ID"]))
    assert claims["consent_ids"] == [consent_id]
    assert claims["obligations"] == ["ETH", "SUD"]
    response = get(stack, f"Patient/{patient}", clinician(stack, "ETREAT") | {"X-Break-Glass-Reason": "r"})
    assert response.status_code == 200, response.text
    claims = verify_context(stack, forwarded_consent_header(stack, response.headers["X-Request-ID"]))
    assert claims["break_glass"] is True and claims["purpose_of_use"] == "ETREAT"


# ---- Break-glass ------------------------------------------------------------------------------

def test_break_glass_with_reason_gets_data_and_is_flagged(stack, patients):
    patient = patients[6]
    before = status(stack)["consent"]["break_glass"]
    headers = clinician(stack, "ETREAT")
    # No reason: refused.
    assert_refused(stack, get(stack, f"Patient/{patient}", headers), "break-glass-reason-required")
    response = get(stack, f"Condition?patient={patient}",
                   headers | {"X-Break-Glass-Reason": "unresponsive patient in ED"})
    assert response.status_code == 200, response.text
    line = log_line(stack, response.headers["X-Request-ID"])
    assert log_field(line, "break_glass") == "1"
    assert log_field(line, "purpose") == "ETREAT"
    assert log_field(line, "withhold") == "-"
    assert status(stack)["consent"]["break_glass"] == before + 1
    # The alert names no patient and not the reason.
    warnings = [l for l in stack.error_log.read_text().splitlines() if "break-glass" in l]
    assert warnings
    assert all(patient not in l and "unresponsive" not in l for l in warnings)
    policyd_log = (stack.run_dir / "policyd.log").read_text()
    assert "break-glass access by client demo-clinician-app" in policyd_log
    assert patient not in policyd_log and "unresponsive" not in policyd_log


def test_break_glass_reason_from_the_token_claim(stack, patients):
    headers = clinician(stack, "ETREAT", **{"break-glass-reason": "mass casualty triage"})
    response = get(stack, f"Patient/{patients[10]}", headers)
    assert response.status_code == 200, response.text
    assert log_field(log_line(stack, response.headers["X-Request-ID"]), "break_glass") == "1"


def test_break_glass_only_for_named_clients(stack):
    # The patient app is registered for PATRQT only.
    headers = patient_app(stack, DEMO_PATIENT, "BTG") | {"X-Break-Glass-Reason": "x"}
    assert_refused(stack, get(stack, f"Patient/{DEMO_PATIENT}", headers), "purpose-not-allowed")


# ---- The CLI ----------------------------------------------------------------------------------

def test_cli_list_show_and_history(stack, patients):
    patient = patients[7]
    consent_id = ctl_ok(stack, "consent", "grant", "--patient", patient, "--client", "demo-patient-app",
                        "--purpose", "PATRQT", "--until", "2099-12-31")
    listed = json.loads(ctl_ok(stack, "consent", "list", "--patient", patient))
    assert [c["id"] for c in listed["consents"]] == [consent_id]
    resource = listed["consents"][0]["resource"]
    assert resource["resourceType"] == "Consent" and resource["status"] == "active"
    assert resource["patient"]["reference"] == f"Patient/{patient}"
    assert resource["provision"]["period"]["end"] == "2100-01-01T00:00:00Z"
    assert ctl_ok(stack, "consent", "revoke", consent_id) == f"consent {consent_id} revoked"
    shown = json.loads(ctl_ok(stack, "consent", "show", consent_id))
    assert shown["status"] == "inactive"
    assert [h["action"] for h in shown["history"]] == ["create", "revoke"]
    assert all(h["actor"].startswith(f"uid:{os.getuid()}") for h in shown["history"])
    assert all(h["patient"] == patient for h in shown["history"])


@pytest.mark.parametrize("args, message", [
    (["grant", "--patient", "p1", "--client", "no-such-app", "--purpose", "TREAT"], "not a client"),
    (["grant", "--patient", "p1", "--client", "demo-patient-app", "--purpose", "TRAET"], "PurposeOfUse"),
    (["grant", "--patient", "bad id!", "--client", "demo-patient-app", "--purpose", "PATRQT"], "FHIR id"),
    (["grant", "--patient", "p1", "--client", "demo-patient-app", "--purpose", "PATRQT", "--until", "2001-01-01"],
     "future"),
    (["grant", "--patient", "p1", "--client", "demo-patient-app", "--purpose", "PATRQT", "--deny-label", "P S"],
     "security label"),
    (["grant", "--patient", "p1", "--client", "demo-patient-app"], "--purpose is required"),
    (["revoke", "c-000000000000000000000000"], "no consent"),
    (["show", "c-000000000000000000000000"], "no consent"),
    (["frobnicate"], "usage"),
])
def test_cli_errors(stack, args, message):
    result = stack.ctl("consent", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert result.stdout == ""


def test_import_is_all_or_nothing(stack, patients, tmp_path):
    patient = patients[8]
    good = {"resourceType": "Consent", "id": "imp-good", "status": "active",
            "patient": {"reference": f"Patient/{patient}"},
            "provision": {"actor": [{"reference": {"reference": "Device/demo-patient-app"}}]}}
    bad = dict(good, id="imp-bad", provision={"purpose": [{"code": "NOPE"}]})
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": good}, {"resource": bad}]}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    result = stack.ctl("consent", "import", str(path))
    assert result.returncode == 1
    assert "Bundle.entry[1].resource: Consent.provision.purpose[0].code" in result.stderr
    assert "nothing was imported" in result.stderr
    (tmp_path / "garbage.json").write_text("{not json")
    result = stack.ctl("consent", "import", str(tmp_path / "garbage.json"))
    assert result.returncode == 1 and "not valid JSON" in result.stderr
    assert json.loads(ctl_ok(stack, "consent", "list", "--patient", patient))["consents"] == []
    # The good one alone imports; importing it again is refused.
    path.write_text(json.dumps(good))
    assert ctl_ok(stack, "consent", "import", str(path)) == "imp-good"
    result = stack.ctl("consent", "import", str(path))
    assert result.returncode == 1 and "already exists" in result.stderr
    assert get(stack, f"Patient/{patient}", patient_app(stack, patient)).status_code == 200


def test_import_r4_examples(stack):
    examples = sorted((_testdata_dir() / "fhir" / "r4-core").glob("Consent-*.json"))
    if not examples:
        pytest.skip(f"FHIR R4 Consent examples not found under {_testdata_dir()}")
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": json.loads(p.read_text())} for p in examples]}
    path = Path(stack.run_dir) / "r4-examples.json"
    path.write_text(json.dumps(bundle))
    assert ctl_ok(stack, "consent", "import", str(path)) == f"{len(examples)} consents imported"
    listed = json.loads(ctl_ok(stack, "consent", "list", "--patient", "f001"))
    assert {c["id"] for c in listed["consents"]} >= {"consent-example-basic", "consent-example-notOrg"}


def test_consents_survive_a_policyd_restart(make_stack):
    s = make_stack()
    consent_id = s.ctl("consent", "grant", "--patient", DEMO_PATIENT, "--client", "demo-patient-app",
                       "--purpose", "PATRQT", check=True).stdout.strip()
    kid = json.loads(ctl_ok(s, "consent", "jwks"))["keys"][0]["kid"]
    s.stop_policyd()
    s.start_policyd()
    shown = json.loads(ctl_ok(s, "consent", "show", consent_id))
    assert shown["status"] == "active"
    # The signing key is kept in the data directory: downstream JWKS caches stay valid.
    assert json.loads(ctl_ok(s, "consent", "jwks"))["keys"][0]["kid"] == kid
    deadline = time.monotonic() + 5
    while True:
        response = get(s, f"Patient/{DEMO_PATIENT}", patient_app(s, DEMO_PATIENT))
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text


def test_policy_validate_reports_consent_problems(stack, tmp_path):
    import shutil
    shutil.copytree(ROOT / "conf" / "sandbox", tmp_path / "sandbox")
    text = (ROOT / "conf" / "policy.yaml").read_text()
    bad = text.replace("    - purpose: PATRQT\n", "    - purpose: PATRQ\n", 1)
    bad = bad.replace("  fallback:\n    access: consent-required\n", "  fallback:\n    access: permit\n", 1)
    assert bad.count("PATRQ\n") == 1 and "  fallback:\n    access: permit\n" in bad
    path = tmp_path / "policy.yaml"
    path.write_text(bad)
    result = stack.ctl("policy", "validate", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    purpose_line = bad.splitlines().index("    - purpose: PATRQ") + 1
    fallback_line = bad.splitlines().index("  fallback:") + 2
    assert any(l.startswith(f"{path}:{purpose_line}:") and "consent.purposes[1].purpose" in l
               and 'did you mean "PATRQT"?' in l for l in lines), lines
    assert any(l.startswith(f"{path}:{fallback_line}:") and "consent.fallback.access" in l
               and "must be consent-required" in l for l in lines), lines
    assert "is invalid (2 problem(s))" in lines[-1]


def test_client_copies_are_emptied_even_where_the_location_forgets_to_replace_them(make_stack):
    """The module itself empties a client's X-Ehrgate-Consent: a location configured without
    `proxy_set_header X-Ehrgate-Consent $ehrgate_consent_token;` forwards no forged context."""
    port = free_port()
    plain_location = f"""
    server {{
        listen 127.0.0.1:{port};
        location /fhir/ {{
            ehrgate on;
            proxy_pass http://127.0.0.1:@EHR_PORT@;
            proxy_set_header X-Request-ID $ehrgate_correlation_id;
            proxy_set_header Accept-Encoding "";
        }}
    }}
"""
    s = make_stack(start=False)
    s.extra_http = plain_location.replace("@EHR_PORT@", str(s.ehr_port))
    s.start()
    forged = "eyJhbGciOiJub25lIn0.eyJkZWNpc2lvbiI6InBlcm1pdCJ9."
    headers = {"Authorization": f"Bearer {s.mint()}", "X-Ehrgate-Consent": forged}
    response = requests.get(f"http://127.0.0.1:{port}/fhir/Patient/{DEMO_PATIENT}", headers=headers,
                            timeout=5)
    assert response.status_code == 200, response.text
    assert forwarded_consent_header(s, response.headers["X-Request-ID"]) in (None, "")


# ---- The decision cache -----------------------------------------------------------------------

def cached_location_stack(make_stack, cache: str):
    """A stack with a second server whose /fhir/ writes its access record asynchronously (so a
    stalled policyd does not already fail requests through audit-before-release) and logs where
    each decision came from."""
    port = free_port()
    location = f"""
    log_format dcache '$ehrgate_correlation_id $status $ehrgate_decision_cache';
    server {{
        listen 127.0.0.1:{port};
        access_log dcache.log dcache;
        location /fhir/ {{
            ehrgate on;
            ehrgate_audit async;
            ehrgate_decision_cache {cache};
            proxy_pass http://127.0.0.1:@EHR_PORT@;
            proxy_set_header X-Request-ID $ehrgate_correlation_id;
            proxy_set_header X-Ehrgate-Consent $ehrgate_consent_token;
            proxy_set_header Accept-Encoding "";
        }}
    }}
"""
    s = make_stack(start=False)
    s.extra_http = location.replace("@EHR_PORT@", str(s.ehr_port))
    s.start()
    return s, f"http://127.0.0.1:{port}/fhir/Patient/{DEMO_PATIENT}"


def decision_sources(s, responses: list[requests.Response]) -> list[str]:
    time.sleep(0.2)  # nginx writes a request's log line after its response
    by_id = dict(line.split()[0::2] for line in (s.run_dir / "dcache.log").read_text().splitlines())
    return [by_id[r.headers["X-Request-ID"]] for r in responses]


def test_repeated_requests_reuse_the_decision_until_policyd_goes_quiet(make_stack):
    s, url = cached_location_stack(make_stack, "on")
    headers = clinician(s)
    session = requests.Session()
    responses = [session.get(url, headers=headers, timeout=5) for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert decision_sources(s, responses) == ["miss"] + ["hit"] * 4
    # The decision and its signed context are reused as they are.
    tokens = {forwarded_consent_header(s, r.headers["X-Request-ID"]) for r in responses}
    assert len(tokens) == 1 and verify_context(s, tokens.pop())["decision"] == "permit"
    # A stalled policyd could not push a consent change: after a second without a word from it,
    # no worker answers from the cache any more. The request waits for a decision and fails
    # closed when none comes.
    os.kill(s.policyd.pid, signal.SIGSTOP)
    try:
        time.sleep(1.1)
        stalled = session.get(url, headers=headers, timeout=5)
        assert stalled.status_code == 503, stalled.text
        assert decision_sources(s, [stalled]) == ["miss"]
    finally:
        os.kill(s.policyd.pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while session.get(url, headers=headers, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "no recovery after policyd resumed"
        time.sleep(0.1)


def test_break_glass_is_decided_every_time(make_stack):
    s, url = cached_location_stack(make_stack, "on")
    session = requests.Session()
    headers = clinician(s, "ETREAT") | {"X-Break-Glass-Reason": "unconscious patient"}
    responses = [session.get(url, headers=headers, timeout=5) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert decision_sources(s, responses) == ["bypass"] * 3
    # Each one has its own decision (and so its own flagged audit record and alert).
    tokens = [verify_context(s, forwarded_consent_header(s, r.headers["X-Request-ID"])) for r in responses]
    assert len({claims["decision_id"] for claims in tokens}) == 3
    assert all(claims["break_glass"] for claims in tokens)


def test_the_cache_can_be_switched_off_per_location(make_stack):
    s, url = cached_location_stack(make_stack, "off")
    session = requests.Session()
    responses = [session.get(url, headers=clinician(s), timeout=5) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert decision_sources(s, responses) == ["bypass"] * 3
