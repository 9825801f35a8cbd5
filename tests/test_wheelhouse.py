"""An air-gapped GPU host: scripts/wheelhouse.sh (wheels for another Python and platform)
and scripts/gpu_bench.sh with WHEELHOUSE=dir.

Only what needs no network and no GPU runs here: argument handling, the refusals that
come before anything is downloaded or installed, the no-GPU exit in wheelhouse mode, the
time bound (an interrupted bench keeps its JSON), and shellcheck. The wheelhouse itself
is checked by hand into a clean venv with `pip install --no-index` (a package index and,
for the bench, a GPU are needed): see the README's "An air-gapped GPU host".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import system_tool

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / "scripts" / "wheelhouse.sh"
GPU_BENCH = REPO / "scripts" / "gpu_bench.sh"


def run(script: Path, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          cwd=cwd, timeout=30, check=False)


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, nothing on stdout, and a message naming each word on stderr."""
    assert proc.returncode == 2, proc
    assert proc.stdout == "", proc.stdout
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


def fake_bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """Executables on PATH (nvidia-smi, a host python) written as shell scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name.replace("_", "-")
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


GPU = "echo 'GPU 0: Fake H200 (UUID: GPU-0)'\n"


# -- wheelhouse.sh ---------------------------------------------------------------------------


def test_wheelhouse_help() -> None:
    proc = run(WHEELHOUSE, "--help")
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith("usage: scripts/wheelhouse.sh --python X.Y")
    for flag in ("--python", "--platform", "--extras", "--out", "torch"):
        assert flag in proc.stdout


@pytest.mark.parametrize(("args", "words"), [
    ((), ("--python X.Y is required",)),
    (("--python",), ("--python needs a value",)),
    (("--python", "3.12", "--out"), ("--out needs a value",)),
    (("--python", "3"), ("'3' is not a version like 3.12",)),
    (("--python=python3.12",), ("not a version",)),
    (("--python", "3.10"), ("Python >= 3.11",)),
    (("--python", "3.12", "--bogus"), ("unknown argument: --bogus",)),
    (("--python", "3.12", "--platform", "many linux"), ("--platform", "not a wheel platform")),
    (("--python", "3.12", "--platform", "manylinux_2_5_x86_64"), ("older than manylinux2014",)),
    (("--python", "3.12", "--extras", "bench gpu"), ("--extras", "comma-separated")),
])
def test_wheelhouse_refuses_bad_arguments(tmp_path: Path, args: tuple[str, ...],
                                          words: tuple[str, ...]) -> None:
    err = refused(run(WHEELHOUSE, *args, cwd=tmp_path), *words)
    assert err.count("usage:") == 1, err
    assert list(tmp_path.iterdir()) == []  # no ./wheelhouse made


def test_wheelhouse_keeps_off_a_folder_that_is_not_a_wheelhouse(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    refused(run(WHEELHOUSE, "--python", "3.12", "--out", str(tmp_path)),
            "notes.txt", "not a wheel")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_wheelhouse_needs_a_python_with_pip(tmp_path: Path) -> None:
    refused(run(WHEELHOUSE, "--python", "3.12", "--out", str(tmp_path / "wh"),
                env={"PYTHON": str(tmp_path / "nope")}), "cannot run")


# -- gpu_bench.sh ----------------------------------------------------------------------------


def test_gpu_bench_help() -> None:
    proc = run(GPU_BENCH, "--help")
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith("usage: [WHEELHOUSE=dir]")
    assert "scripts/wheelhouse.sh" in proc.stdout and "590 s" in proc.stdout


@pytest.mark.parametrize(("args", "env", "words"), [
    (("--bogus",), {}, ("unrecognized arguments: --bogus",)),
    (("--streams", "0"), {}, ("gpu_bench: --streams must be >= 1",)),
    (("--speech", "2"), {}, ("--speech must be within 0..1",)),
    ((), {"STREAMS": "eight"}, ("STREAMS=eight is not a whole number",)),
    ((), {"TIME_LIMIT_S": "-1"}, ("TIME_LIMIT_S=-1",)),
    ((), {"WHEELHOUSE": "/nonexistent/wheelhouse"}, ("WHEELHOUSE=/nonexistent/wheelhouse",
                                                      "is not a folder")),
])
def test_gpu_bench_refuses_bad_arguments_before_anything_runs(
        tmp_path: Path, args: tuple[str, ...], env: dict[str, str],
        words: tuple[str, ...]) -> None:
    """Checked before the GPU, so a typo is told at once even on a GPU host (here the
    fake GPU would let the run go on)."""
    env = {**fake_bin(tmp_path, nvidia_smi=GPU), "OUT": str(tmp_path / "out"), **env}
    refused(run(GPU_BENCH, *args, env=env), *words)
    assert not (tmp_path / "out").exists()


def test_gpu_bench_wheelhouse_without_rapido_or_gpu(tmp_path: Path) -> None:
    """An empty wheelhouse is refused; one with a rapido wheel on a machine without a GPU
    (or whose host torch cannot see CUDA) exits 2 before a venv is made."""
    wh = tmp_path / "wh"
    wh.mkdir()
    venv = tmp_path / "venv"
    env = {"WHEELHOUSE": str(wh), "VENV": str(venv), "OUT": str(tmp_path / "out")}
    refused(run(GPU_BENCH, env=env), "holds no rapido-*.whl", "scripts/wheelhouse.sh")
    (wh / "rapido-0.1.0-py3-none-any.whl").write_bytes(b"")
    no_smi = {**env, "PATH": "/usr/bin:/bin"}  # no nvidia-smi: the real refusal
    if not (Path("/usr/bin/nvidia-smi").exists() or Path("/bin/nvidia-smi").exists()):
        refused(run(GPU_BENCH, env=no_smi), "no GPU", "nvidia-smi")
    no_cuda = {**env, **fake_bin(tmp_path, nvidia_smi=GPU, python="exit 1\n"),
               "PYTHON": str(tmp_path / "bin" / "python")}
    refused(run(GPU_BENCH, env=no_cuda), "no GPU", "cannot use CUDA")
    assert not venv.exists() and not (tmp_path / "out").exists()


def test_gpu_bench_stays_within_its_time_limit(tmp_path: Path) -> None:
    """The bench gets what is left of TIME_LIMIT_S; at its limit it is interrupted
    (SIGINT), the JSON it writes then is kept, and the script exits 124."""
    python = ('[ "$1" = -c ] && exit 0\n'
              'trap \'echo "{\\"interrupted\\": true}"; exit 130\' INT\n'
              'while :; do sleep 0.05; done\n')
    env = {**fake_bin(tmp_path, nvidia_smi=GPU, python=python),
           "PYTHON": str(tmp_path / "bin" / "python"), "OUT": str(tmp_path / "out")}
    short = run(GPU_BENCH, env={**env, "TIME_LIMIT_S": "40"})
    # 40 s less the 20 s the bench needs to finish, less what the script spent so far
    # (a second on a loaded machine).
    assert short.returncode == 2 and re.search(r"only (19|20)s of TIME_LIMIT_S=40s",
                                                short.stderr), short
    proc = run(GPU_BENCH, env={**env, "BENCH_TIMEOUT_S": "1"})
    assert proc.returncode == 124, proc
    assert "limit 1s" in proc.stdout and "interrupted" in proc.stderr
    assert json.loads((tmp_path / "out" / "gpu_bench.json").read_text()) == {
        "interrupted": True}
    assert not (tmp_path / "out" / "gpu_bench.json.part").exists()


# -- the scripts themselves ------------------------------------------------------------------


def test_scripts_parse_and_pass_shellcheck() -> None:
    for script in (WHEELHOUSE, GPU_BENCH):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
    proc = subprocess.run([system_tool("shellcheck"), str(WHEELHOUSE), str(GPU_BENCH)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
