"""scripts/cpu_interference.py: its table, and a clear exit on bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cpu_interference.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120)


def test_one_short_round_prints_every_cell_against_alone() -> None:
    proc = _run("--rounds", "1", "--n", "2", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "beside another process" in lines[1]
    rows = {line.split("  ")[0]: line for line in lines[2:]}
    assert set(rows) == {"compose_batch(2)", "its matrix products", "2 frame copies, numpy",
                         "2 frame copies, bytes", "pure Python loop"}
    for row in rows.values():
        assert row.count("x)") == 3 and "( 1.0x)" in row  # alone is the 1.0x column


def test_bad_arguments_exit_2_and_say_which() -> None:
    proc = _run("--rounds", "0")
    assert proc.returncode == 2
    assert "--rounds" in proc.stderr
