"""The Python heap and its cyclic garbage collector, seen from a real-time server.

CPython's collector stops every thread while it walks the objects of the generations it
collects. After the imports (torch, aiortc, PyAV, onnxruntime) and the model's warm-up a
node holds ~200 000 tracked objects, and a full (generation 2) collection walks all of
them: 100-200 ms on this project's 2-core machines. One comes whenever about a quarter of
that many new objects have survived: during start-up and warm-up, and while serving
every few hundred sessions made (their sinks, encoders and peer connections; steady
speech makes none). Each is a stall of the event loop (every stream's clock, feeds and
sinks) and of the model worker at once (``scripts/gc_churn.py``, BENCHMARKS.md).

Nearly all of those objects live as long as the process: modules, functions, classes,
the model's and avatars' Python objects. :func:`freeze_heap` moves them to the
collector's permanent generation once the node is warm (``gc.freeze``, the pattern
CPython documents for long-lived servers), so a full collection walks only what was made
since (sessions and their state): a fraction of a millisecond. Objects freed by their
reference counts are still freed at once; only reference cycles among the frozen objects
would wait, and those are made at start-up, not per request.

:class:`GcPauses` times each collection (``gc.callbacks``) so the pauses are visible:
the node exports them (``gc_pause_seconds{generation}``), the bench reports the longest
in its measured window.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def freeze_heap() -> int:
    """Collect what is garbage now, then move every object the collector tracks into its
    permanent generation; returns how many objects are frozen in all. Call it once the
    process is warm (model loaded, avatars prepared), again after another large warm-up."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("heap frozen: %d objects out of the collector's way", frozen)
    return frozen


class GcPauses:
    """How long the collector stopped the process, per generation, from :meth:`install`
    to :meth:`close` (or a ``with`` block). ``observe(generation, seconds)``, if given,
    is called after each collection (a Prometheus histogram's ``observe``, say).

    Counts every collection of the process, whichever thread triggered it. The callback
    runs inside the collector with the GIL held: it only reads a clock and adds."""

    def __init__(self, observe: Callable[[int, float], None] | None = None) -> None:
        self._observe = observe
        self._started: float | None = None
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._installed = False

    def install(self) -> GcPauses:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def close(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False
            self._started = None

    def __enter__(self) -> GcPauses:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed mid-collection: no start to measure from
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        g = int(info["generation"])
        self.count[g] += 1
        self.total_s[g] += seconds
        if seconds > self.max_s[g]:
            self.max_s[g] = seconds
        if self._observe is not None:
            self._observe(g, seconds)

    @property
    def longest_s(self) -> float:
        """The longest pause of any generation so far."""
        return max(self.max_s)
