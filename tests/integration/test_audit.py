"""Audit through the real stack: records for permitted and refused requests, audit-before-release,
the worker's outbox, policyd's own events, search/export, and `audit verify` against tampering
with the LMDB file itself."""

from __future__ import annotations

import json
import signal
import time

import pytest
import requests

from audit_helpers import (audit_dir, ctl_audit, dump, load, search, section, seq_key, verify,
                           wait_for_records)
from stack import DEMO_PATIENT

FHIR = "application/fhir+json"


def auth(stack, **claims) -> dict:
    return {"Authorization": "Bearer " + stack.mint(**claims)}


def get(stack, path: str, headers: dict | None = None) -> requests.Response:
    return requests.get(stack.base_url + path, headers=headers or {}, timeout=10)


def by_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def test_permitted_read_has_access_and_outcome_records(make_stack):
    stack = make_stack()
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = get(stack, f"/fhir/Patient/{DEMO_PATIENT}",
                   {**auth(stack, patient=DEMO_PATIENT), "X-Request-ID": "audit-test-1",
                    "traceparent": trace})
    assert response.status_code == 200, response.text
    records = wait_for_records(stack, lambda rs: len(rs) >= 2, "--correlation-id", "audit-test-1")
    access = by_kind(records, "access")
    outcome = by_kind(records, "outcome")
    assert len(access) == 1 and len(outcome) == 1, records
    a, o = access[0], outcome[0]
    assert a["decision"] == "permit" and a["client_id"] == "demo-clinician-app"
    assert a["traceparent"] == trace
    assert a["policy_version"] == response.headers["X-Ehrgate-Policy-Version"]
    assert a["resource_type"] == "Patient" and a["method"] == "GET"
    assert DEMO_PATIENT in a["patient_ids"]
    assert a["client_address"] == "127.0.0.1"
    assert len(a["jti_hash"]) == 64
    assert a["seq"] < o["seq"]  # durable before the response existed
    assert o["http_status"] == 200 and o["bytes"] > 0
    assert o["upstream"].startswith("127.0.0.1:")
    assert o["record_id"] != a["record_id"]
    # The patient index finds it too, and the FHIR export is a BALP AuditEvent.
    assert any(r["correlation_id"] == "audit-test-1" for r in search(stack, "--patient", DEMO_PATIENT))
    fhir = ctl_audit(stack, "export", "--format", "fhir", "--correlation-id", "audit-test-1")
    assert fhir.returncode == 0, fhir.stderr
    events = [json.loads(line) for line in fhir.stdout.splitlines()]
    assert events[0]["resourceType"] == "AuditEvent"
    assert "IHE.BasicAudit.PatientRead" in events[0]["meta"]["profile"][0]
    assert {"reference": f"Patient/{DEMO_PATIENT}"} in [e.get("what") for e in events[0]["entity"]]
    result = verify(stack)
    assert result.returncode == 0, result.stderr


def test_a_clinicians_access_is_found_by_the_patient_it_named(make_stack):
    """A user-context token carries no patient: the record takes the one the URL names, with
    the consent decision's purpose, and the outcome counts what redaction withheld."""
    stack = make_stack()
    headers = auth(stack)  # demo-clinician-app, purpose TREAT, no patient claim
    read = get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**headers, "X-Request-ID": "audit-read"})
    search_ = get(stack, f"/fhir/Condition?patient={DEMO_PATIENT}",
                  {**headers, "X-Request-ID": "audit-search"})
    assert read.status_code == 200 and search_.status_code == 200, (read.text, search_.text)
    found = wait_for_records(
        stack, lambda rs: {"audit-read", "audit-search"} <= {r["correlation_id"] for r in rs
                                                               if r["kind"] == "outcome"},
        "--patient", DEMO_PATIENT)
    for correlation in ("audit-read", "audit-search"):
        mine = [r for r in found if r["correlation_id"] == correlation]
        assert {r["kind"] for r in mine} == {"access", "outcome"}, mine
        for r in mine:
            assert r["patient_ids"] == [DEMO_PATIENT]
            assert r["purpose_of_use"] == "TREAT" and r["break_glass"] is False
    # The sandbox patient's sensitive Conditions are withheld from treatment without consent.
    (outcome,) = [r for r in found if r["correlation_id"] == "audit-search" and r["kind"] == "outcome"]
    assert outcome["redaction_count"] >= 1, outcome


def test_refused_requests_are_recorded(make_stack):
    stack = make_stack()
    no_token = get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {"X-Request-ID": "audit-refused-1"})
    assert no_token.status_code == 401
    denied = get(stack, "/fhir/Basic/x", {**auth(stack), "X-Request-ID": "audit-refused-2"})
    assert denied.status_code in (400, 403, 404, 405)
    for corr, status in (("audit-refused-1", 401), ("audit-refused-2", denied.status_code)):
        records = wait_for_records(stack, lambda rs: len(rs) >= 1, "--correlation-id", corr)
        assert [r["kind"] for r in records] == ["outcome"], records  # nothing was released
        assert records[0]["decision"] == "deny" and records[0]["http_status"] == status
        assert records[0]["reason"]


def test_sync_audit_failure_refuses_and_forwards_nothing(make_stack):
    """The decision succeeds but policyd refuses the access record: 503, nothing proxied."""
    stack = make_stack(start=False)
    base = stack.policyd_command
    stack.policyd_command = lambda: base() + ["--audit-map-size-mb", "1"]
    stack.start()
    headers = auth(stack, patient=DEMO_PATIENT)
    statuses = []
    sandbox_before = requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["requests"]
    refused = None
    big_query = "&_elements=" + "x" * 3000  # large records fill the 1 MiB map quickly
    for i in range(2000):
        r = get(stack, f"/fhir/Observation?patient={DEMO_PATIENT}{big_query}",
                {**headers, "X-Request-ID": f"fill-{i}"})
        statuses.append(r.status_code)
        if r.status_code == 503:
            refused = r
            break
    assert refused is not None, "the audit map never filled"
    body = refused.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == "audit-unavailable"
    released = len(statuses) - 1
    assert released > 0 and 503 not in statuses[:-1]
    sandbox_after = requests.get(stack.ehr_url + "/__sandbox/stats", timeout=5).json()["requests"]
    # Every proxied request had a durable access record first; the refused one never reached
    # the EHR.
    assert sandbox_after - sandbox_before == released
    permitted = [r for r in search(stack, "--patient", DEMO_PATIENT) if r["kind"] == "access"]
    assert {r["correlation_id"] for r in permitted} == {f"fill-{i}" for i in range(released)}
    status = json.loads(stack.ctl("status").stdout.splitlines()[0])
    assert status["audit"]["storage_errors"]["map_full"] >= 1
    assert status["audit"]["storage_errors"]["failed_records"] >= 1
    assert verify(stack).returncode == 0


def test_outcome_records_survive_a_policyd_outage_exactly_once(make_stack):
    stack = make_stack()
    headers = auth(stack, patient=DEMO_PATIENT)
    stack.stop_policyd(signal.SIGKILL)
    ids = [f"outage-{i}" for i in range(5)]
    for corr in ids:
        r = get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**headers, "X-Request-ID": corr})
        assert r.status_code == 503
    stack.start_policyd()
    for corr in ids:
        records = wait_for_records(stack, lambda rs: len(rs) >= 1, "--correlation-id", corr)
        assert [(r["kind"], r["http_status"]) for r in records] == [("outcome", 503)], records
    # Redelivery is deduplicated: a while later there is still exactly one record each.
    time.sleep(1.0)
    for corr in ids:
        assert len(search(stack, "--correlation-id", corr)) == 1
    assert verify(stack).returncode == 0


def test_async_location_releases_without_waiting_but_still_records(make_stack):
    stack = make_stack(extra_http="ehrgate_audit async;")
    r = get(stack, f"/fhir/Patient/{DEMO_PATIENT}",
            {**auth(stack, patient=DEMO_PATIENT), "X-Request-ID": "async-1"})
    assert r.status_code == 200
    records = wait_for_records(stack, lambda rs: len(rs) >= 2, "--correlation-id", "async-1")
    assert sorted(x["kind"] for x in records) == ["access", "outcome"]


def test_reload_revocation_and_admin_commands_are_recorded(make_stack):
    stack = make_stack()
    assert stack.ctl("policy", "reload").returncode == 0
    assert stack.ctl("token", "revoke", "--jti", "jti-to-revoke").returncode == 0
    assert stack.ctl("status").returncode == 0

    def kinds(rs):
        return {r["kind"] for r in rs}

    records = wait_for_records(stack, lambda rs: {"policy-reload", "revocation", "admin"} <= kinds(rs))
    assert {"policy-reload", "revocation", "admin"} <= kinds(records)
    revocation = by_kind(records, "revocation")[0]
    assert "jti-to-revoke" not in json.dumps(records)  # only its hash
    assert revocation["detail"].startswith("revoked one token")


def test_since_until_search(make_stack):
    stack = make_stack()
    start = int(time.time()) - 1
    get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**auth(stack), "X-Request-ID": "time-1"})
    wait_for_records(stack, lambda rs: len(rs) >= 2, "--correlation-id", "time-1")
    assert len(search(stack, "--since", str(start), "--correlation-id", "time-1")) == 2
    assert search(stack, "--until", str(start - 3600), "--correlation-id", "time-1") == []
    assert len(search(stack, "--since", str(start))) >= 2


# ---- tampering with the LMDB file ------------------------------------------------------------

@pytest.fixture
def stopped_log(make_stack):
    """A stack that wrote a few dozen records, then stopped cleanly (head checkpointed)."""
    stack = make_stack()
    headers = auth(stack, patient=DEMO_PATIENT)
    for i in range(10):
        assert get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**headers, "X-Request-ID": f"t-{i}"}).status_code == 200
    wait_for_records(stack, lambda rs: len(rs) >= 20, "--patient", DEMO_PATIENT)
    stack.stop()
    result = verify(stack)
    assert result.returncode == 0, result.stderr
    return stack


def tamper(stack, edit) -> str:
    sections = dump(audit_dir(stack))
    edit(section(sections, "records")["pairs"])
    load(audit_dir(stack), sections)
    result = verify(stack)
    assert result.returncode == 1, result.stdout
    return result.stderr


def test_verify_detects_modified_record(stopped_log):
    def edit(pairs):
        key, value = pairs[4]
        assert b"demo-clinician-app" in value
        pairs[4][1] = value.replace(b"demo-clinician-app", b"demo-clinician-apq")
    assert "record 5" in tamper(stopped_log, edit)


def test_verify_detects_deleted_record(stopped_log):
    assert "record 7" in tamper(stopped_log, lambda pairs: pairs.pop(6))


def test_verify_detects_deleted_tail(stopped_log):
    # The last records gone: the signed checkpoint of the head says they existed.
    def edit(pairs):
        del pairs[-3:]
    assert "checkpoint" in tamper(stopped_log, edit)


def test_verify_detects_inserted_record(stopped_log):
    def edit(pairs):
        # A copy of record 3 slotted in as 4; the rest renumbered to keep keys contiguous.
        values = [v for _, v in pairs]
        values.insert(3, values[2])
        pairs[:] = [[seq_key(i + 1), v] for i, v in enumerate(values)]
    assert "record 4" in tamper(stopped_log, edit)


def test_verify_detects_reordered_records(stopped_log):
    def edit(pairs):
        pairs[1][1], pairs[2][1] = pairs[2][1], pairs[1][1]
    assert "record 2" in tamper(stopped_log, edit)


def test_verify_refuses_a_foreign_public_key(stopped_log):
    result = verify(stopped_log, "--public-key", "00" * 32)
    assert result.returncode == 1
    assert "checkpoint" in result.stderr


def test_retention_purge_keeps_a_verifiable_chain(make_stack):
    stack = make_stack(start=False)
    base = stack.policyd_command
    stack.policyd_command = lambda: base() + ["--audit-checkpoint-records", "4"]
    stack.start()
    headers = auth(stack, patient=DEMO_PATIENT)
    for i in range(6):
        assert get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**headers, "X-Request-ID": f"old-{i}"}).status_code == 200
    wait_for_records(stack, lambda rs: len(rs) >= 12, "--patient", DEMO_PATIENT)
    stack.stop()
    before = json.loads(verify(stack).stdout)
    purge = ctl_audit(stack, "purge", "--older-than-days", "0")
    assert purge.returncode == 0, purge.stderr
    removed = json.loads(purge.stdout)["removed"]
    assert 0 < removed < before["records"]
    result = verify(stack)
    assert result.returncode == 0, result.stderr
    after = json.loads(result.stdout)
    assert after["first_seq"] == removed + 1 and after["last_seq"] == before["last_seq"]
    # Deleting the first remaining record is still caught: the anchor no longer fits.
    sections = dump(audit_dir(stack))
    section(sections, "records")["pairs"].pop(0)
    load(audit_dir(stack), sections)
    assert verify(stack).returncode == 1


def test_outbox_bound_drops_and_counts_instead_of_growing(make_stack):
    """With policyd down, each worker holds at most ehrgate_audit_queue outcome records; the rest
    are dropped and counted, and what was held is delivered once policyd is back."""
    stack = make_stack(workers=1, extra_http="ehrgate_audit_queue 5;")
    headers = auth(stack, patient=DEMO_PATIENT)
    stack.stop_policyd(signal.SIGKILL)
    ids = [f"bound-{i}" for i in range(20)]
    for corr in ids:
        assert get(stack, f"/fhir/Patient/{DEMO_PATIENT}", {**headers, "X-Request-ID": corr}).status_code == 503
    # One worker, so the status endpoint answers for the worker that holds the records.
    audit = requests.get(stack.base_url + "/ehrgate/status", timeout=5).json()["audit"]
    assert audit["queued"] + audit["inflight"] == 5
    assert audit["dropped"] == 15
    stack.start_policyd()
    delivered = wait_for_records(stack, lambda rs: len([r for r in rs if r["correlation_id"].startswith("bound-")]) >= 5)
    held = sorted(r["correlation_id"] for r in delivered if r["correlation_id"].startswith("bound-"))
    assert held == sorted(ids[:5])  # the first five were kept, the later ones dropped
