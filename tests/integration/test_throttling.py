"""Throttling end to end (docs/throttling.md): the shared-memory limiter in the nginx workers,
against the real nginx + policyd stack.

- accuracy of the token bucket across two workers and many connections;
- no concurrency slot leaks, whatever way a request ends;
- interactive traffic keeps its reserved share of an upstream under a batch flood;
- unidentified callers get the unclassified plan, never an open default;
- dry-run plans report but never refuse;
- counters survive `nginx -s reload` and a policy reload.

Slow upstream answers come from `SlowUpstream`, a threaded HTTP server started by the test on a
free loopback port; extra gateway server blocks (same policyd, same limiter zone) proxy to it.
Each test runs its own stack with a private bundle whose plans are tight enough to measure.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import yaml

from stack import DEMO_PATIENT, NGINX, ROOT, free_port

FHIR_JSON = "application/fhir+json"
BATCH = "demo-batch"
CLINICIAN = "demo-clinician-app"
# A second access log with millisecond times, so the gateway's own view of when requests
# arrived gives the measured interval (relative to the nginx prefix, i.e. the run dir).
TIMING_LOG = ("log_format ehrgate_timing '$msec $request_time $status $ehrgate_client "
              "$ehrgate_limit_status';\n"
              "access_log timing.log ehrgate_timing;\n")


# ---- helpers ---------------------------------------------------------------------------------

def private_policy(tmp_path: Path, version: str, plans: dict[str, dict],
                   upstream: dict | None = None) -> Path:
    """A copy of the sandbox bundle (with the JWKS it names beside it) with the given plans.

    `plans` maps a plan name (clinical, batch, unclassified) to its new fields."""
    shutil.copytree(ROOT / "conf" / "sandbox", tmp_path / "sandbox", dirs_exist_ok=True)
    bundle = yaml.safe_load((ROOT / "conf" / "policy.yaml").read_text())
    bundle["version"] = version
    names = {plan["name"] for plan in bundle["rate_plans"]}
    assert set(plans) <= names, f"the sandbox bundle has plans {names}"
    bundle["rate_plans"] = [{"name": plan["name"], **plans.get(plan["name"], {})}
                            if plan["name"] in plans else plan for plan in bundle["rate_plans"]]
    if upstream is not None:
        assert len(bundle["upstreams"]) == 1 and bundle["upstreams"][0]["name"] == "sandbox-ehr"
        bundle["upstreams"][0].update(upstream)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(bundle, sort_keys=False))
    return path


def bump_version(path: Path, version: str) -> None:
    bundle = yaml.safe_load(path.read_text())
    bundle["version"] = version
    path.write_text(yaml.safe_dump(bundle, sort_keys=False))


def bearer(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def limiter(stack) -> dict:
    return requests.get(stack.base_url + "/ehrgate/status", timeout=5).json()["limiter"]


def wait_quiet(stack, timeout: float = 10.0) -> float:
    """Polls until no concurrency slot is held; returns how long that took. Bounded."""
    started = time.monotonic()
    while True:
        in_flight = limiter(stack)["in_flight"]
        if in_flight == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, \
            f"limiter.in_flight still {in_flight} after {timeout} s of quiet: a leaked slot"
        time.sleep(0.05)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def assert_refusal(response, status: int, reason: str, plan: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == reason, body
    assert int(response.headers["Retry-After"]) >= 1, response.headers
    assert "RateLimit" in response.headers and "RateLimit-Policy" in response.headers, response.headers
    if plan is not None:
        assert response.headers["RateLimit-Policy"].startswith(f'"{plan}";'), response.headers


def timing_lines(stack, client: str) -> list[tuple[float, int, str]]:
    """(arrival time in s, status, limit status) of every logged request of `client`."""
    rows = []
    for line in (stack.run_dir / "timing.log").read_text().splitlines():
        msec, request_time, status, who, limit = line.split()
        if who == client:
            rows.append((float(msec) - float(request_time), int(status), limit))
    return rows


def access_lines(stack, client: str) -> list[str]:
    return [line for line in (stack.run_dir / "access.log").read_text().splitlines()
            if f" client={client} " in line]


def active_lines(stack) -> int:
    return stack.error_log.read_text(errors="replace").count("active in worker")


class SlowUpstream:
    """A FHIR-ish upstream whose answers take as long as the id says: GET /fhir/Patient/<kind>-<ms>.

    Tracks requests in progress per kind and in total, and their maxima. A request counts until
    just before its response is written, so the gateway cannot have released its slot first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current: dict[str, int] = {}
        self.maximum: dict[str, int] = {}
        self.total = 0
        self.max_total = 0
        self.served = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                rid = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
                kind, _, ms = rid.rpartition("-")
                upstream.enter(kind)
                try:
                    time.sleep(min(int(ms) if ms.isdigit() else 0, 10_000) / 1000)
                finally:
                    upstream.leave(kind)
                body = json.dumps({"resourceType": "Patient", "id": rid}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", FHIR_JSON)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway gave up on us (client abort, read timeout)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def enter(self, kind: str) -> None:
        with self.lock:
            self.current[kind] = self.current.get(kind, 0) + 1
            self.maximum[kind] = max(self.maximum.get(kind, 0), self.current[kind])
            self.total += 1
            self.max_total = max(self.max_total, self.total)

    def leave(self, kind: str) -> None:
        with self.lock:
            self.current[kind] -= 1
            self.total -= 1
            self.served += 1

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def gateway_block(port: int, upstream_port: int, read_timeout: str = "15s") -> str:
    """A second gateway server: same module, same policyd, same limiter zone."""
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location /fhir/ {{
            ehrgate on;
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_connect_timeout 2s;
            proxy_read_timeout {read_timeout};
        }}
    }}
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ---- 1. accuracy across workers --------------------------------------------------------------

RATE = 50
BURST = 20
HAMMER_SECONDS = 4.0
CONNECTIONS = 50


def test_bucket_admits_rate_times_interval_plus_burst_across_workers(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-accuracy-1", {
        "batch": {"rate": f"{RATE}/s", "burst": BURST, "concurrency": 0},
    })
    stack = make_stack(policy_file=policy, workers=2, extra_http=TIMING_LOG)
    headers = bearer(stack.mint(BATCH, "system/*.rs"))
    url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    results: list[list[tuple[float, float, int]]] = [[] for _ in range(CONNECTIONS)]
    refusals: list[requests.Response] = []
    problems: list[str] = []
    admitted_sample: list[requests.Response] = []
    start = threading.Event()
    stop = threading.Event()

    def hammer(index: int) -> None:
        session = requests.Session()
        kept = 0
        start.wait(10)
        deadline = time.monotonic() + HAMMER_SECONDS + 10  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                response = session.get(url, headers=headers, timeout=5)
            except requests.RequestException as exc:
                problems.append(repr(exc))
                continue
            results[index].append((sent, time.monotonic(), response.status_code))
            if response.status_code == 429:
                retry = response.headers.get("Retry-After", "")
                if not (retry.isdigit() and int(retry) >= 1 and "RateLimit" in response.headers
                        and "RateLimit-Policy" in response.headers):
                    problems.append(f"429 without proper headers: {dict(response.headers)}")
                if kept < 3:
                    refusals.append(response)
                    kept += 1
            elif response.status_code == 200:
                if not admitted_sample:
                    admitted_sample.append(response)
            else:
                problems.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    start.set()
    time.sleep(HAMMER_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)
    assert not problems, f"{len(problems)} unexpected outcomes, e.g. {problems[:3]}"

    flat = [row for rows in results for row in rows]
    admitted = sum(1 for _, _, status in flat if status == 200)
    refused = sum(1 for _, _, status in flat if status == 429)
    client_span = max(sent for sent, _, _ in flat) - min(sent for sent, _, _ in flat)

    # The gateway's view: when each request arrived (ms resolution, per worker clock).
    server = timing_lines(stack, BATCH)
    assert len(server) == len(flat)
    assert sum(1 for _, status, limit in server if status == 200 and limit == "admitted") == admitted
    assert sum(1 for _, status, limit in server if status == 429 and limit == "rate-limited") == refused
    first = min(at for at, _, _ in server)
    last = max(at for at, _, _ in server)
    span = last - first
    expected = RATE * span + BURST
    print(f"\naccuracy: {len(flat)} requests over {span:.3f} s (client view {client_span:.3f} s) "
          f"from {CONNECTIONS} connections, 2 workers; admitted {admitted}, expected "
          f"{RATE}/s x {span:.3f} s + {BURST} = {expected:.1f} "
          f"({100 * (admitted - expected) / expected:+.2f} %); refused {refused}")

    # The offered load exceeded the rate all along, or the count would prove nothing.
    assert len(flat) / span > 3 * RATE, f"offered only {len(flat) / span:.0f} req/s"
    windows = int((span - 0.1) / 0.25)
    refusal_times = [at for at, status, _ in server if status == 429]
    for w in range(windows):
        lo = first + 0.1 + 0.25 * w
        assert any(lo <= at < lo + 0.25 for at in refusal_times), f"no refusal in [{lo - first:.2f}, +0.25) s"

    assert abs(admitted - expected) <= 0.01 * expected + 1, (admitted, expected)

    assert refusals
    for response in refusals:
        assert_refusal(response, 429, "rate-limited", plan="batch")
    assert admitted_sample and "RateLimit" in admitted_sample[0].headers
    assert admitted_sample[0].headers["RateLimit-Policy"] == f'"batch";q={BURST};w=1'


# ---- 2. no leaked concurrency slots ------------------------------------------------------------

def raw_request(port: int, text: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(text.encode())
    return sock


def abort(sock: socket.socket, reset: bool) -> None:
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_no_concurrency_slot_leaks_whatever_way_requests_end(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-leaks-1", {
        "clinical": {"rate": "1000/s", "burst": 1000, "concurrency": 4},
        "batch": {"rate": "1000/s", "burst": 1000, "concurrency": 4},
    })
    upstream = SlowUpstream()
    slow_port, timeout_port, refused_port = free_port(), free_port(), free_port()
    dead_port = free_port()  # nothing listens here: connection refused
    extra = (gateway_block(slow_port, upstream.port)
             + gateway_block(timeout_port, upstream.port, read_timeout="2s")
             + gateway_block(refused_port, dead_port))
    try:
        stack = make_stack(policy_file=policy, workers=2, extra_http=extra)
        batch_token = stack.mint(BATCH, "system/*.rs")
        clinician_token = stack.mint(CLINICIAN, "user/*.cruds")
        patient_only = stack.mint(CLINICIAN, "user/Patient.rs")
        main = stack.base_url
        slow = f"http://127.0.0.1:{slow_port}"

        # -- The cap works: 4 slow requests in flight, the 5th is refused, then room again.
        statuses: list[int] = []

        def slow_get(base: str, rid: str, token: str) -> None:
            statuses.append(requests.get(f"{base}/fhir/Patient/{rid}", headers=bearer(token),
                                         timeout=15).status_code)

        held = [threading.Thread(target=slow_get, args=(slow, "cap-1500", batch_token)) for _ in range(4)]
        for thread in held:
            thread.start()
        wait_for(lambda: upstream.current.get("cap", 0) == 4, 5, "4 slow requests at the upstream")
        # in_flight counts slots: each request holds one of its client's and one of its upstream's.
        assert limiter(stack)["in_flight"] == 2 * 4
        fifth = requests.get(f"{slow}/fhir/Patient/cap-10", headers=bearer(batch_token), timeout=5)
        assert_refusal(fifth, 429, "concurrency-limited", plan="batch")
        # Per client, across server blocks and workers.
        other_server = requests.get(f"{main}/fhir/Patient/{DEMO_PATIENT}", headers=bearer(batch_token), timeout=5)
        assert_refusal(other_server, 429, "concurrency-limited", plan="batch")
        # Another client is not affected.
        assert requests.get(f"{main}/fhir/Patient/{DEMO_PATIENT}", headers=bearer(clinician_token),
                            timeout=5).status_code == 200
        for thread in held:
            thread.join(timeout=15)
        assert statuses == [200] * 4
        wait_quiet(stack)
        assert requests.get(f"{slow}/fhir/Patient/cap-10", headers=bearer(batch_token), timeout=5).status_code == 200

        # -- Every way a request can end, at once.
        ended: dict[str, list[int]] = {}

        def record(name: str, status: int) -> None:
            ended.setdefault(name, []).append(status)

        def timed_out() -> None:
            response = requests.get(f"http://127.0.0.1:{timeout_port}/fhir/Patient/timeout-5000",
                                    headers=bearer(batch_token), timeout=15)
            record("upstream timeout", response.status_code)

        get_slow = ("GET /fhir/Patient/abort-3000 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Authorization: Bearer {token}\r\n\r\n")
        aborting = [raw_request(slow_port, get_slow.format(token=batch_token)) for _ in range(2)]
        timeouts = [threading.Thread(target=timed_out) for _ in range(2)]
        for thread in timeouts:
            thread.start()
        aborting.append(raw_request(slow_port, get_slow.format(token=clinician_token)))
        wait_for(lambda: upstream.current.get("abort", 0) == 3 and upstream.current.get("timeout", 0) == 2, 5,
                 "aborting and timing-out requests at the upstream")
        # The batch client holds its 4 slots: the limiter refuses it.
        record("limiter refusal", requests.get(f"{main}/fhir/Patient/{DEMO_PATIENT}",
                                               headers=bearer(batch_token), timeout=5).status_code)
        # A create whose body never arrives: admitted, then the client goes away mid-body.
        body_abort = raw_request(stack.port, (
            "POST /fhir/Observation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {clinician_token}\r\nContent-Type: {FHIR_JSON}\r\n"
            "Content-Length: 10000\r\n\r\n" + '{"resourceType":"Observation",'))
        time.sleep(0.3)  # admitted and decided; nginx now waits for the body
        in_flight_before_aborts = limiter(stack)["in_flight"]
        abort(aborting[0], reset=False)
        abort(aborting[1], reset=True)
        abort(aborting[2], reset=False)
        abort(body_abort, reset=True)
        aborted_at = time.monotonic()
        # Aborts give their slots back at once, not when the upstream would have answered (3 s):
        # what is left is the two requests waiting for the 2 s read timeout.
        wait_for(lambda: limiter(stack)["in_flight"] == 2 * 2, 1.2, "slots of aborted requests back")
        abort_release = time.monotonic() - aborted_at

        patient = f"{main}/fhir/Patient/{DEMO_PATIENT}"
        session = requests.Session()  # keep-alive: several requests on one connection
        clinician = bearer(clinician_token)
        for _ in range(3):
            record("ok", session.get(patient, headers=clinician, timeout=5).status_code)
        # The sandbox EHR has no HEAD: it answers 501 without a JSON body, which a protected
        # route does not release (docs/redaction.md): the gateway answers 502 instead. Either
        # way the request ended after reaching the upstream.
        head = session.head(patient, headers=clinician, timeout=5)
        record("upstream error status", head.status_code)
        for _ in range(2):
            record("upstream refused", requests.get(f"http://127.0.0.1:{refused_port}/fhir/Patient/x-1",
                                                    headers=clinician, timeout=5).status_code)
            record("policy: resource", session.get(f"{main}/fhir/AllergyIntolerance", headers=clinician,
                                                   timeout=5).status_code)
        record("not a FHIR method", session.options(patient, headers=clinician, timeout=5).status_code)
        record("policy: not FHIR", session.get(f"{main}/fhir/Patient/a/b/c/d/e", headers=clinician,
                                               timeout=5).status_code)
        record("scope", session.get(f"{main}/fhir/Observation?patient={DEMO_PATIENT}",
                                    headers=bearer(patient_only), timeout=5).status_code)
        record("bad token", session.get(patient, headers=bearer("not.a.token"), timeout=5).status_code)
        record("no token", session.get(patient, timeout=5).status_code)
        record("public", session.get(f"{main}/fhir/metadata", timeout=5).status_code)
        for thread in timeouts:
            thread.join(timeout=15)
        quiet_after = wait_quiet(stack)
        released_in = time.monotonic() - aborted_at
        print(f"\nleaks: slots in flight before aborts {in_flight_before_aborts}; aborted requests' slots "
              f"back in {abort_release:.3f} s; quiet {released_in:.2f} s after the aborts; endings {ended}")

        # 2 aborting + 2 timing-out batch requests, 1 aborting + 1 body-less clinician one; 2 slots each.
        assert in_flight_before_aborts == 2 * 6
        assert ended == {
            "limiter refusal": [429],
            "ok": [200, 200, 200],
            "upstream error status": [502],
            "upstream refused": [502, 502],
            "policy: resource": [403, 403],
            "not a FHIR method": [400],
            "policy: not FHIR": [400],
            "scope": [403],
            "bad token": [401],
            "no token": [401],
            "public": [200],
            "upstream timeout": [504, 504],
        }, ended
        assert quiet_after < 10
        log = (stack.run_dir / "access.log").read_text()
        assert log.count(" GET 499 ") == 3, "nginx saw the aborted reads as client aborts"
        assert log.count(" POST 400 ") == 1, "and the body that never came as a bad request"
        # All four batch slots are free again: four slow requests at once are all admitted.
        statuses.clear()
        held = [threading.Thread(target=slow_get, args=(slow, "again-300", batch_token)) for _ in range(4)]
        for thread in held:
            thread.start()
        for thread in held:
            thread.join(timeout=15)
        assert statuses == [200] * 4
        assert wait_quiet(stack) < 10
    finally:
        upstream.stop()


# ---- 3. priority under a batch flood -------------------------------------------------------

CAPACITY = 12
RESERVE = 6
UPSTREAM_MS = 200
FLOOD_SECONDS = 8
CLINICIANS = 4
REQUESTS_PER_CLINICIAN = 10  # about 2.5 s each; the flood must outlast them


def test_interactive_traffic_keeps_its_reserve_under_a_batch_flood(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-flood-1", {
        "clinical": {"rate": "2000/s", "burst": 2000, "concurrency": 64},
        "batch": {"rate": "100000/s", "burst": 100000, "concurrency": 0},
    }, upstream={"capacity": CAPACITY, "interactive_reserve": RESERVE})
    upstream = SlowUpstream()
    gateway_port = free_port()
    try:
        stack = make_stack(policy_file=policy, workers=2, extra_http=gateway_block(gateway_port, upstream.port))
        batch_token = stack.mint(BATCH, "system/*.rs")
        clinician_token = stack.mint(CLINICIAN, "user/*.read")
        gateway = f"http://127.0.0.1:{gateway_port}"
        flood = subprocess.Popen(
            [stack.bin("ehrgate-loadgen"), "--url", f"{gateway}/fhir/Patient/batch-{UPSTREAM_MS}",
             "--header", f"Authorization: Bearer {batch_token}", "--connections", "30",
             "--duration", str(FLOOD_SECONDS), "--warmup", "0", "--timeout", "5", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        latencies: list[float] = []
        failures: list[str] = []

        def clinician() -> None:
            # A fixed number of requests, not a fixed time: on a busy machine a timed loop
            # would make fewer requests and prove less.
            session = requests.Session()
            for _ in range(REQUESTS_PER_CLINICIAN):
                started = time.monotonic()
                try:
                    response = session.get(f"{gateway}/fhir/Patient/clinical-{UPSTREAM_MS}",
                                           headers=bearer(clinician_token), timeout=5)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)

        time.sleep(0.5)  # the flood has filled the batch share
        interactive = [threading.Thread(target=clinician) for _ in range(CLINICIANS)]
        for thread in interactive:
            thread.start()
        # A batch request in the middle of the flood is shed, with the 503 a client can act on.
        shed = None
        for _ in range(20):
            response = requests.get(f"{gateway}/fhir/Patient/batch-{UPSTREAM_MS}", headers=bearer(batch_token),
                                    timeout=5)
            if response.status_code == 503:
                shed = response
                break
        for thread in interactive:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in interactive)
        flood_outlasted_clinicians = flood.poll() is None
        out, err = flood.communicate(timeout=30)
        assert flood.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])

        batch_log = access_lines(stack, BATCH)
        batch_ok = sum(1 for line in batch_log if " GET 200 " in line and " limit=admitted " in line)
        batch_shed = sum(1 for line in batch_log if " GET 503 " in line and " limit=upstream-shed " in line)
        total = len(latencies)
        success = (total - len(failures)) / total if total else 0.0
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        print(f"\nflood: batch {len(batch_log)} requests ({report['status']} from loadgen), "
              f"{batch_ok} admitted, {batch_shed} shed ({100 * batch_shed / max(len(batch_log), 1):.1f} %); "
              f"interactive {total} requests, success {100 * success:.1f} %, p50 {1000 * p50:.0f} ms, "
              f"p95 {1000 * p95:.0f} ms, max {1000 * max(latencies):.0f} ms (upstream {UPSTREAM_MS} ms); "
              f"upstream max in flight {upstream.max_total} (batch {upstream.maximum.get('batch', 0)}, "
              f"interactive {upstream.maximum.get('clinical', 0)}), capacity {CAPACITY}, "
              f"batch share {CAPACITY - RESERVE}")

        assert shed is not None, "no batch request was shed during the flood"
        assert_refusal(shed, 503, "upstream-shed", plan="batch")
        assert batch_ok > 0, "batch traffic still gets its share"
        assert batch_shed >= 0.5 * len(batch_log)
        assert batch_ok + batch_shed == len(batch_log), "only admitted or shed"
        assert flood_outlasted_clinicians, "every interactive request must have met the flood"
        assert total == CLINICIANS * REQUESTS_PER_CLINICIAN and success >= 0.99, failures[:3]
        assert p95 < 3 * UPSTREAM_MS / 1000
        assert upstream.max_total <= CAPACITY
        assert upstream.maximum.get("batch", 0) <= CAPACITY - RESERVE
        assert wait_quiet(stack) < 10
    finally:
        upstream.stop()


# ---- 4. failure-safe default -----------------------------------------------------------------

def test_unidentified_callers_get_the_unclassified_plan(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-unclassified-1", {
        "unclassified": {"rate": "2/s", "burst": 2, "concurrency": 2},
    })
    stack = make_stack(policy_file=policy)
    url = f"{stack.base_url}/fhir/metadata"
    session = requests.Session()
    first, second, third = (session.get(url, timeout=5) for _ in range(3))
    assert first.status_code == 200 and second.status_code == 200, (first.text[:200], second.text[:200])
    assert first.headers["RateLimit-Policy"].startswith('"unclassified";')
    assert_refusal(third, 429, "rate-limited", plan="unclassified")
    # A forwarded-for header does not buy a fresh bucket: the key is the connection's address.
    spoofed = requests.get(url, headers={"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}, timeout=5)
    assert_refusal(spoofed, 429, "rate-limited", plan="unclassified")
    # Identified clients have their own buckets.
    clinician = requests.get(url, headers=bearer(stack.mint()), timeout=5)
    assert clinician.status_code == 200
    assert clinician.headers["RateLimit-Policy"].startswith('"clinical";')
    limits = [line.split(" limit=")[1].split()[0] for line in access_lines(stack, "-")]
    limits = [limit for limit in limits if limit != "-"]  # /healthz and the status page are not counted
    assert limits == ["admitted", "admitted", "rate-limited", "rate-limited"], limits


# ---- 5. dry run ------------------------------------------------------------------------------

def test_dry_run_plan_reports_but_never_refuses(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-dry-run-1", {
        "batch": {"rate": "1/m", "burst": 1, "concurrency": 1, "dry_run": True},
    })
    stack = make_stack(policy_file=policy)
    headers = bearer(stack.mint(BATCH, "system/*.rs"))
    session = requests.Session()
    responses = [session.get(f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}", headers=headers, timeout=5)
                 for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert all("Retry-After" not in r.headers for r in responses)
    limits = [line.split(" limit=")[1].split()[0] for line in access_lines(stack, BATCH)]
    assert limits == ["admitted"] + ["dry-run:rate-limited"] * 4, limits
    assert all(" GET 200 " in line for line in access_lines(stack, BATCH))
    assert wait_quiet(stack) < 10


# ---- 6. counters survive reloads -------------------------------------------------------------

def test_counters_survive_nginx_and_policy_reloads(make_stack, tmp_path):
    policy = private_policy(tmp_path, "throttle-reload-1", {
        "batch": {"rate": "1/m", "burst": 3, "concurrency": 4},
    })
    stack = make_stack(policy_file=policy, workers=2)
    batch = bearer(stack.mint(BATCH, "system/*.rs"))
    clinician = bearer(stack.mint())
    url = f"{stack.base_url}/fhir/Patient/{DEMO_PATIENT}"
    # Fresh connections each time: old workers must not answer after a reload.
    assert [requests.get(url, headers=batch, timeout=5).status_code for _ in range(3)] == [200] * 3
    assert_refusal(requests.get(url, headers=batch, timeout=5), 429, "rate-limited", plan="batch")

    before = active_lines(stack)
    old_pids = {requests.get(stack.base_url + "/ehrgate/status", timeout=5).json()["worker_pid"]
                for _ in range(4)}
    result = subprocess.run([NGINX, "-p", str(stack.run_dir), "-c", str(stack.nginx_conf), "-s", "reload"],
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: active_lines(stack) >= before + stack.workers, 10, "new workers with the policy")

    def served_by_new_worker() -> bool:
        return requests.get(stack.base_url + "/ehrgate/status", timeout=5).json()["worker_pid"] not in old_pids

    wait_for(served_by_new_worker, 10, "a new worker answering")
    after_nginx = requests.get(url, headers=batch, timeout=5)
    assert_refusal(after_nginx, 429, "rate-limited", plan="batch")
    assert requests.get(url, headers=clinician, timeout=5).status_code == 200

    before = active_lines(stack)
    bump_version(policy, "throttle-reload-2")
    result = stack.ctl("policy", "reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: active_lines(stack) >= before + stack.workers, 5, "workers on the new policy")
    after_policy = requests.get(url, headers=batch, timeout=5)
    assert after_policy.headers["X-Ehrgate-Policy-Version"] == "throttle-reload-2"
    assert_refusal(after_policy, 429, "rate-limited", plan="batch")
    other = requests.get(url, headers=clinician, timeout=5)
    assert other.status_code == 200 and other.headers["X-Ehrgate-Policy-Version"] == "throttle-reload-2"
    assert wait_quiet(stack) < 10
