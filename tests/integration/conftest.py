"""Fixtures for the integration tests: real nginx + our module, real policyd, sandbox EHR.

Only the EHR is simulated. A stack per test that needs a private one (kill, reload, faults);
a shared one per module for read-only checks. Every stack's error.log is checked for [alert] and
[emerg] when it stops.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from stack import Stack  # noqa: E402


def _build_dir() -> Path:
    build = Path(os.environ.get("EHRGATE_BUILD_DIR", ROOT / "build"))
    module = build / "ngx_http_ehrgate_module.so"
    if not module.exists():
        pytest.fail(f"{module} is missing: run ./build.sh build first")
    return build


@pytest.fixture
def make_stack(tmp_path_factory):
    stacks: list[Stack] = []

    def factory(start: bool = True, **kwargs) -> Stack:
        run_dir = tmp_path_factory.mktemp("stack")
        stack = Stack(_build_dir(), run_dir, **kwargs)
        stacks.append(stack)
        if start:
            stack.start()
        return stack

    yield factory
    problems = []
    for stack in stacks:
        stack.stop()
        problems += stack.error_log_alerts()
    assert not problems, "nginx logged alerts/emergencies:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory):
    stack = Stack(_build_dir(), tmp_path_factory.mktemp("shared-stack"))
    try:
        stack.start()
    except Exception:
        stack.stop()  # whatever did start must not outlive the test run
        raise
    yield stack
    stack.stop()
    alerts = stack.error_log_alerts()
    assert not alerts, "nginx logged alerts/emergencies:\n" + "\n".join(alerts)
