"""Helpers for the audit tests: reading the log with ehrgatectl, tampering with the LMDB files."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path


def audit_dir(stack) -> Path:
    return stack.data_dir / "audit"


def ctl_audit(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([stack.bin("ehrgatectl"), "audit", *args, "--data-dir", str(stack.data_dir)],
                          capture_output=True, text=True, timeout=60)


def search(stack, *args: str) -> list[dict]:
    result = ctl_audit(stack, "search", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def wait_for_records(stack, predicate, *args: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = search(stack, *args)
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def verify(stack, *extra: str) -> subprocess.CompletedProcess:
    return ctl_audit(stack, "verify", *extra)


# ---- tampering with the LMDB file itself -----------------------------------------------------
# mdb_dump writes every named database as a section of hex key/value lines; we edit the records
# section and mdb_load the whole dump into a fresh environment that replaces the original.

def dump(directory: Path) -> list[dict]:
    text = subprocess.run(["mdb_dump", "-a", str(directory)], capture_output=True, text=True,
                          check=True).stdout
    sections, current = [], None
    pending_key = None
    for line in text.splitlines():
        if line.startswith("VERSION="):
            current = {"header": [line], "pairs": []}
            sections.append(current)
        elif line == "HEADER=END":
            current["header"].append(line)
        elif line == "DATA=END":
            pass
        elif line.startswith(" "):
            if pending_key is None:
                pending_key = line[1:]
            else:
                current["pairs"].append([bytes.fromhex(pending_key), bytes.fromhex(line[1:])])
                pending_key = None
        else:
            current["header"].append(line)
    return sections


def section(sections: list[dict], name: str) -> dict:
    for s in sections:
        if f"database={name}" in s["header"]:
            return s
    raise KeyError(name)


def load(directory: Path, sections: list[dict]) -> None:
    lines = []
    for s in sections:
        lines += s["header"]
        for key, value in s["pairs"]:
            lines.append(" " + key.hex())
            lines.append(" " + value.hex())
        lines.append("DATA=END")
    fresh = directory.parent / (directory.name + ".tampered")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    subprocess.run(["mdb_load", "-f", "/dev/stdin", str(fresh)], input="\n".join(lines) + "\n",
                   text=True, check=True, capture_output=True)
    for name in ("data.mdb", "lock.mdb"):
        (directory / name).unlink(missing_ok=True)
    shutil.move(str(fresh / "data.mdb"), str(directory / "data.mdb"))
    shutil.rmtree(fresh, ignore_errors=True)


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")
