"""Built-in models are built once into a shared folder, even by processes starting together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rapido.gpu.registry import BUILD_VERSION, resolve_model

RESOLVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from rapido.gpu.registry import resolve_model
m = resolve_model("rapido-lite", __import__("pathlib").Path(sys.argv[1]))
print("resolved", m.path)
"""


def test_processes_starting_together_build_once_and_all_load(tmp_path: Path) -> None:
    # Each one checks the graph it loads; a second builder replacing the folder under a
    # reader made one fail with "Unable to open proto file" (seen in CI with 3 nodes).
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    builds = sum(out.count("building the built-in model") for out in outputs)
    assert builds == 1, outputs
    assert all(f"{tmp_path}/rapido-lite/model.onnx" in out for out in outputs), outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rapido-lite.lock",
                                                          "rapido-lite"]


def test_a_stale_build_version_is_rebuilt_in_place(tmp_path: Path) -> None:
    resolve_model("rapido-lite", tmp_path)
    (tmp_path / "rapido-lite" / "VERSION").write_text("0\n")
    manifest = resolve_model("rapido-lite", tmp_path)
    assert (tmp_path / "rapido-lite" / "VERSION").read_text().strip() == BUILD_VERSION
    assert manifest.path == tmp_path / "rapido-lite" / "model.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rapido-lite-")]
