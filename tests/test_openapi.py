"""A bounded schemathesis run against /api/openapi.json of a real server finds no 5xx."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_node import ROOT, start_server

KEY = "schemathesis-key"


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is part of the dev extra"
    proc, url = start_server(tmp_path, "--api-key", KEY, "--max-streams", "100000",
                             "--log-level", "warning")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.st_hooks", "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            [st, "run", f"{url}/api/openapi.json", "-H", f"Authorization: Bearer {KEY}",
             "--checks", "not_a_server_error,status_code_conformance",
             # Under --max-time this schemathesis fuzzes until the time is up (past
             # --max-examples): 20 s give ~1100 cases, every operation well over 20.
             "--phases", "examples,coverage,fuzzing", "--max-examples", "20",
             "--max-time", "20", "--seed", "7", "--generation-deterministic",
             "--exclude-path", "/ws/sessions/{session_id}",
             # It would drain and stop the server under test (tests/test_drain.py).
             "--exclude-path", "/api/admin/drain", "--workers", "1"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    finally:
        proc.terminate()
        server_out, _ = proc.communicate(timeout=30)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "Traceback" not in server_out, server_out[-4000:]
    assert "internal server error" not in report.lower()
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 100, report[-3000:]
