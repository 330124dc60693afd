"""nginx configuration errors name the file, the line and what is wrong (`nginx -t`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stack import NGINX


def nginx_t(build_dir: Path, tmp_path: Path, http_block: str) -> subprocess.CompletedProcess:
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""load_module {build_dir / 'ngx_http_ehrgate_module.so'};
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
{http_block}
}}
""")
    return subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)


@pytest.fixture
def build_dir() -> Path:
    return Path(os.environ.get("EHRGATE_BUILD_DIR", Path(__file__).resolve().parents[2] / "build")).resolve()


def test_valid_minimal_config(build_dir, tmp_path):
    result = nginx_t(build_dir, tmp_path, """
    ehrgate_policyd unix:/run/ehrgate/policyd.sock;
    ehrgate_policyd_timeout 300ms;
    server { listen 127.0.0.1:1; location /fhir/ { ehrgate on; return 204; } }""")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("block,message,line", [
    ("    server { listen 127.0.0.1:1;\n    location /fhir/ { ehrgate on; } }",
     '"ehrgate on" in {conf}:12 needs "ehrgate_policyd unix:/path;" in the http block', None),
    ("    ehrgate_policyd 127.0.0.1:9000;",
     'invalid policyd address "127.0.0.1:9000": expected "unix:/path/to/policyd.sock"', 11),
    ("    ehrgate_policyd unix:/a.sock;\n    ehrgate_policyd unix:/b.sock;",
     '"ehrgate_policyd" directive is duplicate', 12),
    ("    ehrgate_policyd unix:/a.sock;\n    ehrgate_policyd_max_pending 0;",
     'value must be between 1 and 65534', 12),
    ("    ehrgate_policyd unix:/a.sock;\n    ehrgate_policyd_timeout soon;",
     '"ehrgate_policyd_timeout" directive invalid value', 12),
    ("    ehrgate_policyd unix:/a.sock;\n    server { ehrgate maybe; }",
     'invalid value "maybe" in "ehrgate" directive, it must be "on" or "off"', 12),
])
def test_config_errors_name_file_and_line(build_dir, tmp_path, block, message, line):
    result = nginx_t(build_dir, tmp_path, block)
    conf = tmp_path / "nginx.conf"
    assert result.returncode != 0
    assert "[emerg]" in result.stderr
    assert message.format(conf=conf) in result.stderr, result.stderr
    if line is not None:
        assert f"in {conf}:{line}" in result.stderr, result.stderr
