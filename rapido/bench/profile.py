"""``bench --profile FILE``: where the GIL goes, per stage, over the measured window.

py-spy samples this process from outside (``py-spy record --gil``: only the thread that
holds the GIL is sampled, so every sample is GIL-held time). py-spy pauses the process
for each sample, some tens of microseconds 100 times a second: without the pause
(``--nonblocking``) stacks came back torn (a policy call "calling" a batch's completion),
which would put time in the wrong stage. Each
sample's stack is given to one stage by its innermost frame in rapido (:data:`STAGES`);
samples with no rapido frame are the event loop and the libraries under it. GIL-held
time per stage is samples / rate, and per speaking stream-frame it is that over the
speaking frames the streams delivered meanwhile: the figure that says how many streams
one process can drive when the model costs its CPU nothing.

FILE gets the collapsed stacks (``frame;frame;... count``: flamegraph.pl, inferno and
speedscope read them) and ``FILE.svg`` a flame graph drawn from them here: py-spy writes
one format per recording, and two recorders on one process get in each other's way
(tried: the second one's samples fail), so the SVG cannot come from py-spy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import shutil
import signal
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: py-spy's sampling rate, per second.
RATE_HZ = 100

#: (stage, file under rapido/, function name pattern or None): the first rule that
#: matches a stack's innermost rapido frame names its stage.
STAGES: tuple[tuple[str, str, str | None], ...] = (
    ("feed/resample", "pipeline/audio.py", None),
    ("feed/resample", "pipeline/session.py",
     r"enqueue_utterance|start_utterance|check_queue|_finish_input|_decode.*|_resample.*"),
    ("jitter pull", "pipeline/jitter.py", None),
    ("mel", "pipeline/features.py", None),
    ("model call", "gpu/backends.py", None),
    ("model call", "gpu/torch_backend.py", None),
    ("model call", "gpu/models/", None),
    ("model call", "bench/standin.py", None),
    ("batch assembly", "gpu/batcher.py", None),
    ("batch assembly", "gpu/lipsync.py", None),
    ("compositing", "gpu/compositor.py", None),
    ("compositing", "gpu/paint.py", None),
    ("colour conversion", "pipeline/media.py", r"rgb_to_i420|i420_.*"),
    ("sink hand-off", "pipeline/sinks/", None),
    ("sink hand-off", "webrtc/", None),
    ("sink hand-off", "livekit/", None),
    ("clock pass", "engine.py", None),
    ("clock pass", "pipeline/", None),
    ("bench driver", "bench/", None),
    ("other rapido", "", None),
)
#: Samples whose stack holds no rapido frame.
LOOP = "event loop, libraries"
ORDER = (*dict.fromkeys(s for s, _, _ in STAGES), LOOP)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):\d+\)$")


class ProfileUnavailable(RuntimeError):
    """py-spy is missing or cannot attach: the message says what to do."""


def classify(stack: str) -> str:
    """The stage of one collapsed stack (``outer;...;inner``)."""
    for frame in reversed(stack.split(";")):
        m = _FRAME.match(frame.strip())
        if m is None:
            continue
        path = m["file"].replace("\\", "/")
        at = path.rfind("rapido/")
        if at < 0 or "/site-packages/" in path[:at]:
            continue
        inner = path[at + len("rapido/"):]
        func = m["func"].rsplit(".", 1)[-1]
        for stage, where, pattern in STAGES:
            if inner.startswith(where) and (pattern is None or re.fullmatch(pattern, func)):
                return stage
    return LOOP


def parse_collapsed(text: str) -> Counter[str]:
    """Samples per stage from py-spy's raw output. A malformed line is an error."""
    by_stage: Counter[str] = Counter()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"line {n} is not 'stack count': {line[:80]!r}")
        by_stage[classify(stack)] += int(count)
    return by_stage


@dataclass(frozen=True)
class GilRow:
    stage: str
    samples: int
    gil_ms: float
    share: float  # of all GIL-held samples
    us_per_speaking_frame: float | None


def gil_table(by_stage: Counter[str], *, rate_hz: float, speaking_frames: int
              ) -> list[GilRow]:
    """One row per stage (in :data:`ORDER`, stages with samples), then ``total``."""
    total = sum(by_stage.values())
    rows = []
    for stage in [*ORDER, "total"]:
        n = total if stage == "total" else by_stage.get(stage, 0)
        if n == 0 and stage != "total":
            continue
        seconds = n / rate_hz
        rows.append(GilRow(stage, n, round(seconds * 1000, 1),
                           round(n / total, 3) if total else 0.0,
                           round(seconds * 1e6 / speaking_frames, 1)
                           if speaking_frames else None))
    return rows


def table_text(rows: Sequence[GilRow]) -> str:
    lines = [f"{'stage':<22}{'samples':>8}{'GIL ms':>10}{'share':>8}"
             f"{'µs / speaking stream-frame':>28}"]
    for r in rows:
        per = "-" if r.us_per_speaking_frame is None else f"{r.us_per_speaking_frame:.1f}"
        lines.append(f"{r.stage:<22}{r.samples:>8}{r.gil_ms:>10.1f}{r.share:>8.1%}{per:>28}")
    return "\n".join(lines)


def py_spy() -> str:
    path = shutil.which("py-spy")
    if path is None:
        # The venv's scripts folder may not be on PATH (python -m rapido from a venv).
        import sys

        candidate = Path(sys.executable).with_name("py-spy")
        if candidate.exists():
            return str(candidate)
        raise ProfileUnavailable("--profile needs py-spy: pip install py-spy "
                                 "(or the bench extra)")
    return path


class GilRecorder:
    """``py-spy record --gil`` over this process from :meth:`start` to :meth:`stop`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            py_spy(), "record", "--gil", "--full-filenames",
            "--rate", str(RATE_HZ), "--format", "raw", "--output", str(self.out),
            "--pid", str(os.getpid()),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def stop(self) -> str:
        """Ends the recording (py-spy writes its file on SIGINT) and returns the collapsed
        stacks. Raises :class:`ProfileUnavailable` if py-spy failed."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.wait_for(self.proc.communicate(), 30)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise
        if not self.out.exists():
            text = err.decode(errors="replace").strip().splitlines()
            raise ProfileUnavailable("py-spy could not record this process: "
                                     + (text[-1] if text else f"exit {self.proc.returncode}"))
        return self.out.read_text()


def flame_svg(text: str, path: Path, *, title: str, min_share: float = 0.003) -> Path:
    """A flame graph (root at the bottom) of collapsed stacks, as a standalone SVG with a
    tooltip per frame; frames under ``min_share`` of all samples are left out."""
    root: dict[str, Any] = {"n": 0, "kids": {}}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        node = root
        node["n"] += int(count)
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += int(count)
    total = max(root["n"], 1)
    width, row = 1200.0, 17
    rects: list[str] = []
    depth_max = 0

    def draw(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        for name, kid in sorted(node["kids"].items()):
            w = width * kid["n"] / total
            if kid["n"] / total >= min_share:
                depth_max = max(depth_max, depth)
                rects.append(_rect(name, kid["n"], total, x, depth, w))
                draw(kid, x, depth + 1)
            x += w

    draw(root, 0.0, 0)
    height = (depth_max + 1) * row + 40
    body = "\n".join(r.replace("{Y}", str(height - 10 - row * (int(r.split('"')[1]) + 1)))
                     for r in rects)
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace" font-size="11">\n'
        f'<text x="4" y="16" font-size="13">{html.escape(title)} ({total} samples)</text>\n'
        f"{body}\n</svg>\n")
    return path


def _rect(name: str, n: int, total: int, x: float, depth: int, w: float) -> str:
    func = name.split(" (")[0]
    hue = zlib.crc32(func.rsplit(".", 1)[0].encode()) % 40 + 10  # same colour each run
    label = html.escape(func[: int(w / 7)]) if w > 30 else ""
    tip = html.escape(f"{name}: {n} samples, {100 * n / total:.1f} %")
    return (f'<g data-depth="{depth}"><title>{tip}</title>'
            f'<rect x="{x:.1f}" y="{{Y}}" width="{max(w - 0.5, 0.5):.1f}" height="16" '
            f'fill="hsl({hue},85%,60%)"/>'
            f'<text x="{x + 3:.1f}" y="{{Y}}" dy="12">{label}</text></g>')
