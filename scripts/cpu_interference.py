#!/usr/bin/env python3
"""How much one busy CPU slows the work on the other: the GIL, or the machine?

The model worker composites a batch (numpy: matrix products, copies) while the event
loop runs Python. When the worker's batch takes longer under load, two things can be
to blame: the GIL (every numpy call that releases it must take it back behind the
loop) or the machine itself (two vCPUs that share a physical core or a host's memory
bandwidth run slower together). This script tells them apart by timing the same work

* alone,
* beside a thread of this process running pure Python (it holds the GIL), and
* beside another *process* running pure Python (no GIL in common, on the other CPU),

rounds alternated. If the separate process slows the work as much as the thread does,
the GIL is not the cause. Run it on a quiet machine::

    python scripts/cpu_interference.py [--rounds 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

_SPIN = "x = 0\nwhile True:\n    x += 1\n"


def _median_ms(work: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
        time.sleep(0.005)  # as the worker between batches: the other side runs alone too
    return 1000.0 * statistics.median(times)


def _python_loop() -> int:
    x = 0
    for i in range(100_000):
        x += i
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    ap.add_argument("--batch", type=int, default=32, help="crops per composited batch")
    ap.add_argument("--n", type=int, default=30, help="timings per cell (default 30)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.n < 1:
        ap.error("--rounds, --batch and --n must be >= 1")

    from rapido.gpu.compositor import compositor_for
    from rapido.gpu.portrait import default_avatar

    comp = compositor_for(default_avatar(), 96)
    rng = np.random.default_rng(0)
    crops = rng.random((args.batch, 3, 96, 96), dtype=np.float32)
    indices = list(range(args.batch))
    frames = comp.avatar.frames_i420
    cells: dict[str, Callable[[], object]] = {
        f"compose_batch({args.batch})": lambda: comp.compose_batch(indices, crops),
        "its matrix products": lambda: comp._ry_y @ crops[:, 0, :55, :] @ comp._rxt_y,
        # The base frames a batch's pictures start from: ndarray.copy releases the GIL for
        # the memcpy, bytearray keeps it.
        f"{args.batch} frame copies, numpy": lambda: [frames[i].copy() for i in indices],
        f"{args.batch} frame copies, bytes": lambda: [bytearray(frames[i]) for i in indices],
        "pure Python loop": _python_loop,
    }
    for work in cells.values():
        work()  # warm

    def alone() -> Callable[[], None]:
        return lambda: None

    def thread() -> Callable[[], None]:
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                _python_loop()

        t = threading.Thread(target=spin, daemon=True)
        t.start()

        def end() -> None:
            stop.set()
            t.join()
        return end

    def process() -> Callable[[], None]:
        p = subprocess.Popen([sys.executable, "-c", _SPIN])
        time.sleep(0.2)

        def end() -> None:
            p.kill()
            p.wait()
        return end

    beside = {"alone": alone, "beside a GIL-holding thread": thread,
              "beside another process": process}
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for cond, start in beside.items():
            stop = start()
            try:
                for name, work in cells.items():
                    results.setdefault((name, cond), []).append(_median_ms(work, args.n))
            finally:
                stop()
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    print(f"{os.cpu_count()} CPUs; median ms per call, median over {args.rounds} rounds")
    head = f"{'work':<24}" + "".join(f"{c:>30}" for c in beside)
    print(head)
    for name in cells:
        row = [statistics.median(results[(name, c)]) for c in beside]
        base = row[0]
        print(f"{name:<24}" + "".join(f"{v:>22.2f} ({v / base:4.1f}x)" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
