"""Reporting for ``rapido bench``: the text table, the JSON document, the cost figure,
the machine description, the progress bar and the plot (matplotlib, imported lazily)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rapido.aio import cancel_and_wait

#: Hours in a month, for the cost per stream-month (365 * 24 / 12).
HOURS_PER_MONTH = 730.0
#: What "real time" means in the bench (kept in one place for the table, plot and search).
REALTIME_FPS_SLACK = 0.5
REALTIME_P99_MS = 40.0

TABLE_COLUMNS = (
    "streams", "max_batch", "jitter", "speech_duty", "fps_min", "fps_median",
    "lateness_p99_ms", "lateness_exact_p99_ms", "onset_p50_ms", "onset_p95_ms", "lipsync_lag_ms",
    "batch_mean",
    "deadline_misses", "underruns", "sink_dropped", "encoded_fps_min", "cpu_percent",
    "cpu_ms_per_stream_second", "loop_cpu_us_per_speaking_frame", "stretch",
    "buffer_delay_ms", "accelerated_ms", "decelerated_ms", "gc_pause_max_ms", "realtime",
)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS,
                file: TextIO | None = None) -> None:
    out = file or sys.stdout
    if not rows:
        print("(no runs measured)", file=out)
        return
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)), file=out)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)), file=out)


def cell(value: Any) -> str:
    """A table cell: "-" for None, floats to two places (whole from 1000 on)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def cost_per_stream_month(per_hour: float, capacity: int) -> float | None:
    """Cost of one concurrent stream for a month at ``capacity`` streams per machine."""
    if capacity <= 0:
        return None
    return per_hour * HOURS_PER_MONTH / capacity


def cost_json(per_hour: float, capacity: int, basis: str) -> dict[str, Any]:
    value = cost_per_stream_month(per_hour, capacity)
    return {
        "gpu_cost_per_hour": per_hour,
        "hours_per_month": HOURS_PER_MONTH,
        "capacity": capacity,
        "capacity_basis": basis,
        "cost_per_stream_month": None if value is None else round(value, 4),
    }


def cost_line(cost: Mapping[str, Any]) -> str:
    value = cost["cost_per_stream_month"]
    if value is None:
        return (f"cost: no real-time capacity measured, so no cost per stream "
                f"(at {cost['gpu_cost_per_hour']}/h)")
    return (f"cost: {value:.2f} per concurrent stream per month "
            f"({cost['gpu_cost_per_hour']}/h x {HOURS_PER_MONTH:.0f} h / "
            f"{cost['capacity']} streams, {cost['capacity_basis']})")


def comparison_json(batched: Mapping[str, Any], unbatched: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Batched vs ``max_batch=1``: ratios < 1 mean batching costs less."""
    return {
        "batched_max_batch": batched["max_batch"],
        "streams": batched["streams"],
        "cpu_per_stream_ratio": _ratio(batched["cpu_ms_per_stream_second"],
                                       unbatched["cpu_ms_per_stream_second"]),
        "lateness_p99_ratio": _ratio(batched["lateness_exact_p99_ms"],
                                     unbatched["lateness_exact_p99_ms"]),
        "batched": dict(batched),
        "unbatched": dict(unbatched),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def comparison_line(comp: Mapping[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (f"batched (max_batch {comp['batched_max_batch']}) / unbatched (max_batch 1), "
            f"{comp['streams']} streams: CPU per stream x{fmt(comp['cpu_per_stream_ratio'])}"
            f", p99 lateness x{fmt(comp['lateness_p99_ratio'])}")


# -- machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str | None:
    torch = _torch()
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # a broken driver is "no GPU" here, not a failed bench
        return None
    return None


def gpu_snapshot() -> tuple[float | None, float | None]:
    """(utilisation %, device memory in use MiB), or (None, None) without CUDA."""
    torch = _torch()
    if torch is None:
        return None, None
    try:
        if not torch.cuda.is_available():
            return None, None
        try:
            util: float | None = float(torch.cuda.utilization())
        except Exception:  # needs pynvml; memory still works without it
            util = None
        free, total = torch.cuda.mem_get_info()
        return util, round((total - free) / 2**20, 1)
    except Exception:
        return None, None


def _torch() -> Any:
    try:
        import torch
    except Exception:
        return None
    return torch


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def host_summary() -> dict[str, Any]:
    """Cores, CPU model and memory: the machine line of the cluster bench's JSON."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu_model": cpu_model()}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def process_cpu_s() -> float:
    """This process's CPU time (user + system), seconds."""
    t = os.times()
    return t.user + t.system


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A one-line text bar on stderr, redrawn once a second while a phase runs."""

    def __init__(self, enabled: bool, file: TextIO | None = None, width: int = 30) -> None:
        self.enabled = enabled
        self.file = file or sys.stderr
        self.width = width
        self.label = ""
        self.length = 0.0
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._drawn = False

    def phase(self, label: str, length_s: float) -> None:
        self.label, self.length, self.started = label, max(length_s, 1e-6), time.monotonic()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="progress")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._drawn:
            print(file=self.file, flush=True)
            self._drawn = False

    def render(self) -> str:
        done = min(time.monotonic() - self.started, self.length)
        fill = int(self.width * done / self.length)
        bar = "#" * fill + "." * (self.width - fill)
        return f"[{bar}] {done:5.1f}/{self.length:.1f} s  {self.label}"

    async def _run(self) -> None:
        while True:
            if self.label:
                print("\r" + self.render(), end="", file=self.file, flush=True)
                self._drawn = True
            await asyncio.sleep(1.0)


# -- plot -----------------------------------------------------------------------------------


class PlotUnavailable(RuntimeError):
    pass


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, fps: int,
         machine: Mapping[str, Any], subtitle: str = "") -> Path:
    """Delivered fps (min, median) and p99 lateness against stream count, one point per
    run (sorted by streams), with the real-time thresholds drawn in."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise PlotUnavailable("pip install matplotlib (or the bench extra)") from exc
    pts = sorted((r for r in rows if r.get("streams")), key=lambda r: r["streams"])
    x = [r["streams"] for r in pts]
    fig, (ax_fps, ax_lat) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax_fps.plot(x, [r["fps_min"] for r in pts], "o-", label="fps min (per stream)")
    ax_fps.plot(x, [r["fps_median"] for r in pts], "s--", label="fps median")
    ax_fps.axhline(fps - REALTIME_FPS_SLACK, color="red", lw=1, ls=":",
                   label=f"real time ({fps - REALTIME_FPS_SLACK:g} fps)")
    ax_fps.set_ylabel("delivered fps")
    ax_fps.set_ylim(bottom=0, top=max([fps * 1.15, *(r["fps_median"] for r in pts)]))
    ax_fps.grid(alpha=0.3)
    ax_fps.legend(loc="lower left", fontsize=8)
    lat = [r.get("lateness_exact_p99_ms", r["lateness_p99_ms"]) for r in pts]
    ax_lat.plot(x, lat, "o-", color="tab:purple", label="lateness p99 (exact)")
    ax_lat.plot(x, [r["lateness_p99_ms"] for r in pts], "x:", color="tab:gray",
                label="lateness p99 (histogram bound)")
    ax_lat.axhline(REALTIME_P99_MS, color="red", lw=1, ls=":",
                   label=f"real-time limit ({REALTIME_P99_MS:g} ms)")
    ax_lat.set_ylabel("frame lateness p99 (ms)")
    ax_lat.set_xlabel("concurrent streams")
    ax_lat.set_ylim(bottom=0, top=max([REALTIME_P99_MS * 1.5, *lat]))
    ax_lat.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lat.grid(alpha=0.3)
    ax_lat.legend(loc="upper left", fontsize=8)
    gpu = machine.get("gpu")
    title = (f"rapido bench: {machine.get('cores')} cores, {machine.get('cpu_model')}"
             + (f", GPU {gpu}" if gpu else ", no GPU"))
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
