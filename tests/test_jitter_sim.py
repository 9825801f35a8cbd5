"""scripts/jitter_sim.py: the rule it is given changes what it measures; bad arguments
exit 2 with the reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "jitter_sim.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120)


def _figures(out: str) -> tuple[int, float, float]:
    m = re.search(r"underruns (\d+), onset p50/p95 (\d+)/(\d+) ms, mean delay ([\d.]+) ms", out)
    assert m, out
    return int(m[1]), float(m[3]), float(m[4])


def test_the_tail_rule_from_the_command_line_moves_moderate_jitters_start() -> None:
    off = _run("--profile", "moderate", "--sessions", "3", "--tail-factor", "0")
    on = _run("--profile", "moderate", "--sessions", "3")
    assert off.returncode == on.returncode == 0, off.stderr + on.stderr
    assert "moderate, 3 min" in on.stdout and "tail 1.5x up to 0.8" in on.stdout
    (_, onset_off, delay_off), (_, onset_on, delay_on) = _figures(off.stdout), _figures(on.stdout)
    assert onset_on > onset_off and delay_on > delay_off  # it waits for the tail


def test_bad_arguments_exit_2_and_say_which() -> None:
    for args, name in ((("--sessions", "0"), "--sessions"),
                       (("--late-ms", "-1"), "--late-ms"),
                       (("--tail-max-frac", "2"), "--tail-max-frac"),
                       (("--session-s", "0"), "--session-s"),
                       (("--profile", "nope"), "--profile")):
        proc = _run(*args)
        assert proc.returncode == 2, args
        assert name in proc.stderr, proc.stderr
