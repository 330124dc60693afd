"""Tests for the sandbox EHR.

Run with Debian's interpreter:  /usr/bin/python3 -m pytest tests/sandbox_ehr -q

Each test talks to a real sandbox process started on a free port, exactly as
the integration tests and demos do.
"""

import contextlib
import gzip
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

SANDBOX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_ehr.py")
PYTHON = "/usr/bin/python3"
P1 = "erXuFYUfucBZaryVksYEcMg3"
P2 = "eq081-VQEgP8drUUqCWzHfw3"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


class Sandbox:
    """A sandbox subprocess on a free port; stderr goes to a file so tests can
    assert that nothing (e.g. a traceback) was printed.  Used as a context
    manager, it always stops the process and records `exit_code`."""

    def __init__(self, *args):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([PYTHON, SANDBOX, "--port", "0", "--quiet", *args],
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("SANDBOX_EHR READY port="):
            self.stop()
            raise RuntimeError(f"sandbox did not start: {line!r} {self.stderr_text()!r}")
        self.port = int(line.strip().split("=", 1)[1])
        self.root = f"http://127.0.0.1:{self.port}"
        self.session = requests.Session()

    def base(self, base_path="/fhir"):
        return self.root + base_path

    def connection(self):
        """Raw HTTP/1.1 connection, for checks that requests would hide (encodings, reuse)."""
        return contextlib.closing(http.client.HTTPConnection("127.0.0.1", self.port, timeout=10))

    def get(self, path, **kwargs):
        return self.session.get(self.base() + path, **kwargs)

    def stderr_text(self):
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self, sig=signal.SIGTERM):
        """Signal the process and return its exit status; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()                  # never leak a process; the status shows the failure
            code = self.proc.wait()
        self.proc.stdout.close()
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.session.close()
        self.exit_code = self.stop()


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox("--seed", "7") as server:
        yield server
    assert server.exit_code == 0
    assert server.stderr_text() == ""


def labels(resource):
    return {(c["system"], c["code"]) for c in resource["meta"].get("security", [])}


def search_all(sandbox, path):
    """Follow next links; returns (total, entries)."""
    url, entries, total = sandbox.base() + path, [], None
    while url:
        bundle = sandbox.session.get(url).json()
        total = bundle["total"]
        entries += bundle.get("entry", [])
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return total, entries


# -- data ---------------------------------------------------------------------

def test_stable_patients_come_first(sandbox):
    bundle = sandbox.get("/Patient", params={"_count": 2}).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [P1, P2]
    assert bundle["total"] == 36


def test_same_seed_gives_identical_data_other_seed_differs(sandbox):
    with Sandbox("--seed", "7") as twin, Sandbox("--seed", "8") as other:
        generated = [e["resource"]["id"] for e in sandbox.get("/Patient", params={"_count": 5}).json()["entry"]][2:]
        paths = [f"/Patient/{P1}", f"/Patient/{P2}", "/Condition/fx-p1-depression-psy"] + \
                [f"/Patient/{pid}" for pid in generated]
        for path in paths:
            assert sandbox.get(path).content == twin.get(path).content, path
        observations = sandbox.get("/Observation", params={"patient": P2, "_count": 200}).json()
        twin_observations = twin.get("/Observation", params={"patient": P2, "_count": 200}).json()
        assert [e["resource"] for e in observations["entry"]] == [e["resource"] for e in twin_observations["entry"]]
        # Another seed changes the generated patients but not the documented fixtures.
        assert other.get(f"/Patient/{generated[0]}").status_code == 404
        assert sandbox.get(f"/Patient/{P1}").content == other.get(f"/Patient/{P1}").content
        assert other.get("/Condition/fx-p2-opioid-unlabelled").json() == \
            sandbox.get("/Condition/fx-p2-opioid-unlabelled").json()
    assert twin.exit_code == other.exit_code == 0


def test_every_resource_has_meta(sandbox):
    for rtype in ("Patient", "Encounter", "Observation", "MedicationRequest", "ServiceRequest",
                  "Condition", "Consent"):
        total, entries = search_all(sandbox, f"/{rtype}?_count=200")
        assert total == len(entries) > 0
        for entry in entries:
            assert entry["resource"]["meta"]["versionId"] and entry["resource"]["meta"]["lastUpdated"]
            assert entry["search"] == {"mode": "match"}


@pytest.mark.parametrize("path, expected", [
    (f"/Patient/{P1}", {(CONFIDENTIALITY, "N")}),
    (f"/Patient/{P2}", {(CONFIDENTIALITY, "R")}),
    ("/Condition/fx-p1-depression-psy", {(ACTCODE, "PSY"), (CONFIDENTIALITY, "R")}),
    ("/Observation/fx-p1-hiv-viral-load", {(ACTCODE, "HIV"), (CONFIDENTIALITY, "R")}),
    ("/Condition/fx-p1-pregnancy-sex", {(ACTCODE, "SEX")}),
    ("/MedicationRequest/fx-p1-contraception-sex", {(ACTCODE, "SEX")}),
    ("/Consent/fx-p1-consent-deny-psy", {(CONFIDENTIALITY, "N")}),
    ("/Condition/fx-p2-alcohol-eth-sud", {(ACTCODE, "ETH"), (ACTCODE, "SUD")}),
    ("/MedicationRequest/fx-p2-naltrexone-eth-sud", {(ACTCODE, "ETH"), (ACTCODE, "SUD")}),
    ("/Condition/fx-p2-opioid-unlabelled", set()),
    ("/Observation/fx-p2-hiv-ab-unlabelled", set()),
    ("/Observation/fx-p2-phq9-unlabelled", set()),
])
def test_documented_fixture_labels(sandbox, path, expected):
    assert labels(sandbox.get(path).json()) == expected


def test_ssn_identifier_on_first_patient_only_mrn_on_second(sandbox):
    systems = lambda pid: [i["system"] for i in sandbox.get(f"/Patient/{pid}").json()["identifier"]]
    assert systems(P1) == ["urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14", "http://hl7.org/fhir/sid/us-ssn"]
    assert systems(P2) == ["urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"]


# -- read / search ----------------------------------------------------------------

def test_metadata(sandbox):
    response = sandbox.get("/metadata")
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Condition", "Consent", "MedicationRequest"} <= types


def test_read_vread_and_not_found(sandbox):
    patient = sandbox.get(f"/Patient/{P2}").json()
    version = patient["meta"]["versionId"]
    assert sandbox.get(f"/Patient/{P2}/_history/{version}").json() == patient
    for path in (f"/Patient/{P2}/_history/99", "/Patient/does-not-exist"):
        response = sandbox.get(path)
        assert response.status_code == 404
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "not-found"


def test_unknown_type_and_unknown_parameter(sandbox):
    response = sandbox.get("/Spaceship")
    assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"
    response = sandbox.get("/Observation", params={"patient": P1, "_sort": "date"})
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "not-supported"
    assert sandbox.get("/Observation", params={"date": "yesterday"}).status_code == 400
    assert sandbox.get("/Observation", params={"_count": "-1"}).status_code == 400


def test_paging_covers_all_matches_once(sandbox):
    first = sandbox.get("/Observation", params={"patient": P1, "_count": 5}).json()
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert links["self"].startswith(sandbox.base() + "/Observation?")
    assert parse_qs(urlsplit(links["next"]).query)["_offset"] == ["5"]
    total, entries = search_all(sandbox, f"/Observation?patient={P1}&_count=5")
    ids = [e["resource"]["id"] for e in entries]
    assert total == first["total"] == len(ids) == len(set(ids)) > 5
    assert all(e["fullUrl"] == f"{sandbox.base()}/Observation/{e['resource']['id']}" for e in entries)
    second = sandbox.session.get(links["next"]).json()
    assert any(link["relation"] == "previous" for link in second["link"])
    assert len(sandbox.get("/Observation", params={"_count": 1000}).json()["entry"]) == 200   # capped


def test_links_follow_host_header(sandbox):
    bundle = sandbox.get("/Patient", params={"_count": 1},
                         headers={"Host": "gateway.example:8443"}).json()
    assert bundle["link"][0]["url"].startswith("http://gateway.example:8443/fhir/Patient?")
    assert bundle["entry"][0]["fullUrl"] == f"http://gateway.example:8443/fhir/Patient/{P1}"


def test_token_and_date_search(sandbox):
    def ids(path, **params):
        return {e["resource"]["id"] for e in sandbox.get(path, params=params).json().get("entry", [])}
    assert ids("/Observation", patient=P1, code="http://loinc.org|20447-9") == {"fx-p1-hiv-viral-load"}
    assert ids("/Observation", patient=P1, code="20447-9") == {"fx-p1-hiv-viral-load"}
    assert ids("/Observation", patient=P1, code="http://snomed.info/sct|20447-9") == set()
    assert ids("/Condition", code="http://hl7.org/fhir/sid/icd-10-cm|F11.20") == {"fx-p2-opioid-unlabelled"}
    assert "fx-p2-hiv-ab-unlabelled" in ids("/Observation", subject=f"Patient/{P2}", category="laboratory",
                                            _count=200)
    survey = sandbox.get("/Observation", params={
        "patient": P2, "category": "http://terminology.hl7.org/CodeSystem/observation-category|survey"}).json()
    assert [e["resource"]["id"] for e in survey["entry"]] == ["fx-p2-phq9-unlabelled"]
    assert ids("/Observation", patient=P2, date="2025-04-01") >= {"fx-p2-phq9-unlabelled", "fx-p2-hiv-ab-unlabelled"}
    assert "fx-p2-phq9-unlabelled" not in ids("/Observation", patient=P2, date="ge2025-04-02", _count=200)
    assert ids("/Patient", identifier="http://hl7.org/fhir/sid/us-ssn|900-55-0142") == {P1}
    assert ids("/Patient", family="oKaF", birthdate="1974-03-05") == {P2}


def test_patient_reference_match_is_exact(sandbox):
    for pid in ("12", "123"):
        response = sandbox.session.put(f"{sandbox.base()}/Patient/{pid}",
                                       json={"resourceType": "Patient", "id": pid})
        assert response.status_code in (200, 201)
    created = {}
    for pid in ("12", "123"):
        response = sandbox.session.post(f"{sandbox.base()}/Observation", json={
            "resourceType": "Observation", "status": "final", "code": {"text": "test"},
            "subject": {"reference": f"Patient/{pid}"}})
        assert response.status_code == 201
        created[pid] = response.json()["id"]
    for query in ("12", "Patient/12"):
        bundle = sandbox.get("/Observation", params={"patient": query}).json()
        assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["id"] == created["12"]
    bundle = sandbox.get("/Observation", params={"subject": "Patient/123"}).json()
    assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["id"] == created["123"]
    assert sandbox.get("/Observation", params={"patient": "1"}).json()["total"] == 0
    assert sandbox.get("/Observation", params={"patient": P1[:-1]}).json()["total"] == 0


def test_post_search_matches_get(sandbox):
    get = sandbox.get("/Condition", params={"patient": P2, "_count": 3}).json()
    post = sandbox.session.post(f"{sandbox.base()}/Condition/_search",
                                data={"patient": P2, "_count": "3"}).json()
    assert post["total"] == get["total"] and post["entry"] == get["entry"]


# -- writes -----------------------------------------------------------------------

def test_create_update_delete(sandbox):
    url = f"{sandbox.base()}/Condition"
    response = sandbox.session.post(url, json={"resourceType": "Condition", "subject": {"reference": f"Patient/{P1}"},
                                               "code": {"text": "sprained ankle"}})
    assert response.status_code == 201
    created = response.json()
    assert response.headers["Location"] == f"{url}/{created['id']}/_history/1"
    assert created["meta"]["versionId"] == "1" and created["meta"]["lastUpdated"]
    assert sandbox.get(f"/Condition/{created['id']}").json() == created

    created["code"]["text"] = "sprained left ankle"
    response = sandbox.session.put(f"{url}/{created['id']}", json=created)
    assert response.status_code == 200 and response.json()["meta"]["versionId"] == "2"
    assert sandbox.get(f"/Condition/{created['id']}/_history/1").status_code == 404

    assert sandbox.session.delete(f"{url}/{created['id']}").status_code == 204
    assert sandbox.get(f"/Condition/{created['id']}").status_code == 404
    assert sandbox.session.delete(f"{url}/{created['id']}").status_code == 404


def test_invalid_writes_are_rejected(sandbox):
    url = f"{sandbox.base()}/Condition"
    response = sandbox.session.post(url, data=b"{not json", headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400 and response.json()["issue"][0]["code"] == "invalid"
    assert sandbox.session.post(url, json={"resourceType": "Patient"}).status_code == 400
    assert sandbox.session.put(f"{url}/a", json={"resourceType": "Condition", "id": "b"}).status_code == 400


def test_chunked_request_body(sandbox):
    body = json.dumps({"resourceType": "Patient", "name": [{"family": "Chunked"}]}).encode()
    with sandbox.connection() as conn:
        conn.request("POST", "/fhir/Patient", body=iter([body[:10], body[10:]]),
                     headers={"Content-Type": "application/fhir+json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 201 and json.loads(response.read())["name"][0]["family"] == "Chunked"
        conn.request("GET", "/fhir/metadata")       # connection is still in sync
        assert conn.getresponse().status == 200


# -- transport --------------------------------------------------------------------

def test_gzip_only_when_asked(sandbox):
    path = f"/fhir/Patient/{P1}"
    with sandbox.connection() as conn:
        conn.request("GET", path)
        plain = conn.getresponse()
        plain_body = plain.read()
        assert plain.getheader("Content-Encoding") is None and json.loads(plain_body)["id"] == P1

        conn.request("GET", path, headers={"Accept-Encoding": "gzip, deflate"})
        zipped = conn.getresponse()
        zipped_body = zipped.read()
        assert zipped.getheader("Content-Encoding") == "gzip"
        assert int(zipped.getheader("Content-Length")) == len(zipped_body)
        assert gzip.decompress(zipped_body) == plain_body

        conn.request("GET", path, headers={"Accept-Encoding": "gzip;q=0, identity"})
        refused = conn.getresponse()
        assert refused.getheader("Content-Encoding") is None and refused.read() == plain_body


def test_keep_alive_reuses_one_connection(sandbox):
    with sandbox.connection() as conn:
        conn.connect()
        sock = conn.sock
        for _ in range(20):
            conn.request("GET", f"/fhir/Observation?patient={P1}&_count=3")
            response = conn.getresponse()
            assert response.status == 200 and response.read()
        assert conn.sock is sock


def test_hundreds_of_concurrent_keep_alive_connections(sandbox):
    barrier = threading.Barrier(300, timeout=20)

    def client(_):
        with sandbox.connection() as conn:
            conn.connect()
            barrier.wait()                           # all 300 are open at once
            for path in (f"/fhir/Patient/{P1}", f"/fhir/Observation?patient={P2}&_count=2"):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    return response.status
        return 200

    with ThreadPoolExecutor(max_workers=300) as pool:
        assert set(pool.map(client, range(300))) == {200}


def test_stats_and_reset(sandbox):
    assert sandbox.session.post(f"{sandbox.root}/__sandbox/reset").json() == {"reset": True}
    sandbox.get("/metadata", headers={"X-Test-Marker": "alpha"})
    sandbox.get("/Observation", params={"patient": P1})
    sandbox.session.get(f"{sandbox.root}/__sandbox/slow", params={"ms": 1})
    stats = sandbox.session.get(f"{sandbox.root}/__sandbox/stats").json()
    assert stats["requests"] == 2
    first, second = stats["recent"]
    assert (first["method"], first["path"], first["headers"]["x-test-marker"]) == ("GET", "/fhir/metadata", "alpha")
    assert second["path"] == "/fhir/Observation" and second["query"] == f"patient={P1}"
    sandbox.session.post(f"{sandbox.root}/__sandbox/reset")
    assert sandbox.session.get(f"{sandbox.root}/__sandbox/stats").json() == {"requests": 0, "recent": []}


def test_slow_hook(sandbox):
    started = time.monotonic()
    assert sandbox.session.get(f"{sandbox.root}/__sandbox/slow", params={"ms": 300}).json() == {"slept_ms": 300}
    assert time.monotonic() - started >= 0.3


def test_bulk_stream_is_chunked_and_about_the_right_size(sandbox):
    with sandbox.connection() as conn:
        conn.request("GET", "/fhir/Observation?_sandbox_bulk_mb=2")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.getheader("Content-Length") is None
        body = response.read()
        assert abs(len(body) - 2 * 1024 * 1024) < 0.05 * 2 * 1024 * 1024

        conn.request("GET", "/fhir/Observation?_sandbox_bulk_mb=2", headers={"Accept-Encoding": "gzip"})
        zipped = conn.getresponse()
        assert zipped.getheader("Content-Encoding") == "gzip"
        assert gzip.decompress(zipped.read()) == body      # deterministic content

    bundle = json.loads(body)
    assert bundle["type"] == "searchset" and bundle["total"] == len(bundle["entry"])
    resources = [e["resource"] for e in bundle["entry"]]
    codes = {(r["code"]["coding"][0]["code"], frozenset(c["code"] for c in r["meta"].get("security", [])))
             for r in resources}
    assert ("20447-9", frozenset({"HIV", "R"})) in codes
    assert ("44261-6", frozenset({"PSY"})) in codes
    assert ("7917-8", frozenset()) in codes


def test_bulk_over_http_1_0_is_close_delimited(sandbox):
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=10) as sock:
        sock.sendall(b"GET /fhir/Observation?_sandbox_bulk_mb=0.1 HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
    assert json.loads(body)["total"] > 0


def test_bulk_rejects_bad_sizes(sandbox):
    for value in ("0", "201", "abc"):
        assert sandbox.get("/Observation", params={"_sandbox_bulk_mb": value}).status_code == 400
    assert sandbox.get("/Observation", params={"_sandbox_bulk_mb": "1", "patient": P1}).status_code == 400


# -- lifecycle --------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly_with_open_connection(sig):
    with Sandbox("--base-path", "/api/FHIR/R4/") as server, \
            socket.create_connection(("127.0.0.1", server.port)):   # an idle keep-alive client
        assert server.session.get(server.base("/api/FHIR/R4") + "/metadata").status_code == 200
        assert server.stop(sig) == 0
    assert server.stderr_text() == ""
