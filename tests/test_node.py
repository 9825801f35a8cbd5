"""A node as a real process: `make run`, SIGTERM, draining, exit code 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from tests.conftest import speech
from tests.test_api import wav_bytes

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()}")
        try:
            if request("GET", f"{url}/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError("server never answered /health")


def spawn_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``rapido serve`` on a free port, not waited for."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapido", "serve", "--port", str(port),
         "--recordings-dir", str(tmp_path / "rec"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def start_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc, url = spawn_server(tmp_path, *extra)
    wait_healthy(url, proc)
    return proc, url


#: The servers of the two SIGTERM tests, by their drain timeout.
SIGTERM_SERVERS = {"drains": ("--drain-timeout-s", "20"), "cuts": ("--drain-timeout-s", "0.5")}


@pytest.fixture(scope="module")
def sigterm_servers(tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[dict[str, tuple[subprocess.Popen[str], str, Path]]]:
    """Both SIGTERM tests' servers, started at once when the first of those tests
    starts (a server's start is mostly waiting for imports and the model: two overlap
    well); each test waits for its own to be healthy and stops it."""
    servers = {}
    for name, extra in SIGTERM_SERVERS.items():
        tmp = tmp_path_factory.mktemp(name)
        servers[name] = (*spawn_server(tmp, *extra), tmp)
    try:
        yield servers
    finally:
        for proc, _, _ in servers.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


@pytest.mark.slow
def test_sigterm_drains_then_exits_0(
        sigterm_servers: dict[str, tuple[subprocess.Popen[str], str, Path]]) -> None:
    proc, url, tmp_path = sigterm_servers["drains"]
    wait_healthy(url, proc)
    try:
        status, s = request("POST", f"{url}/api/sessions",
                            json.dumps({"lesson_id": "drain", "sink": "record"}).encode(),
                            {"Content-Type": "application/json"})
        assert status == 201
        status, _ = request("POST", f"{url}/api/sessions/{s['session_id']}/audio",
                            wav_bytes(speech(2.0), 16_000), {"Content-Type": "audio/wav"})
        assert status == 202
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, body = request("GET", f"{url}/ready")
        assert status == 503 and body["reason"] == "draining"
        status, body = request("POST", f"{url}/api/sessions",
                               json.dumps({"lesson_id": "late"}).encode(),
                               {"Content-Type": "application/json"})
        assert status == 503 and body["error"] == "draining"
        # The running session is still served while it finishes its utterance.
        status, body = request("GET", f"{url}/api/sessions/{s['session_id']}")
        assert status == 200 and body["state"] == "speaking"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "draining" in out and "stopped" in out
    # Once warm, the start-up heap left the collector's way (gc_freeze, on by default).
    assert re.search(r"heap frozen: \d{5,} objects", out), out
    # The utterance played to its end before the session closed: the recording holds it.
    (mp4,) = (tmp_path / "rec").glob("drain_*.mp4")
    with av.open(str(mp4)) as c:
        audio_s = sum(f.samples for f in c.decode(audio=0)) / 48_000
    assert audio_s >= 2.0


@pytest.mark.slow
def test_drain_timeout_cuts_long_speech(
        sigterm_servers: dict[str, tuple[subprocess.Popen[str], str, Path]]) -> None:
    proc, url, _ = sigterm_servers["cuts"]
    wait_healthy(url, proc)
    try:
        _, s = request("POST", f"{url}/api/sessions", json.dumps({"lesson_id": "x"}).encode(),
                       {"Content-Type": "application/json"})
        request("POST", f"{url}/api/sessions/{s['session_id']}/audio",
                wav_bytes(speech(20.0), 16_000), {"Content-Type": "audio/wav"})
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "drain timeout" in out
    assert waited < 15  # it did not wait for the 20 s utterance


@pytest.mark.slow
def test_make_run_answers_health(tmp_path: Path) -> None:
    """The README's `make run`, on the venv `make test` made."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPIDO_")}
    proc = subprocess.Popen(["make", "-s", "run", f"ARGS=--port {port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=600)
        status, body = request("GET", f"http://127.0.0.1:{port}/health")
        assert status == 200 and body["status"] == "ok"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/" in out
