"""rapido.heap: the start-up heap frozen out of the collector's way; collections timed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import aiohttp
import pytest

from rapido.heap import GcPauses, freeze_heap
from tests.conftest import NodeFactory


class Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    """Whatever a test freezes goes back to the collector after it (the test process is
    not a server: its later tests' garbage must stay collectable)."""
    yield
    gc.unfreeze()


def test_freeze_collects_first_then_keeps_the_rest_out_of_collections(thawed: None) -> None:
    garbage, kept = Cycle(), Cycle()
    dead, alive = weakref.ref(garbage), weakref.ref(kept)
    del garbage
    before = gc.get_freeze_count()
    frozen = freeze_heap()
    assert dead() is None, "garbage made before the freeze was frozen instead of collected"
    assert frozen == gc.get_freeze_count() > before
    # What lived at the freeze is no longer walked: dropped, its cycle waits ...
    del kept
    gc.collect()
    assert alive() is not None
    # ... while cycles made after the freeze are collected as before.
    late = weakref.ref(Cycle())
    gc.collect()
    assert late() is None
    gc.unfreeze()
    gc.collect()
    assert alive() is None


def test_pauses_are_timed_per_generation_until_closed() -> None:
    seen: list[tuple[int, float]] = []
    with GcPauses(lambda g, s: seen.append((g, s))) as pauses:
        for g in (0, 1, 2):
            gc.collect(g)
    assert [c >= 1 for c in pauses.count] == [True, True, True]
    assert {g for g, _ in seen} == {0, 1, 2}
    assert all(s >= 0 for _, s in seen)
    assert len(seen) == sum(pauses.count)
    for g in (0, 1, 2):
        mine = [s for h, s in seen if h == g]
        assert pauses.max_s[g] == max(mine)
        assert pauses.total_s[g] == pytest.approx(sum(mine))
    assert pauses.longest_s == max(s for _, s in seen)
    counted = list(pauses.count)
    gc.collect()
    assert pauses.count == counted and len(seen) == sum(counted), "counted after close"
    assert pauses._callback not in gc.callbacks


def test_install_and_close_are_idempotent() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()
    assert gc.callbacks.count(pauses._callback) == 1
    pauses.close()
    pauses.close()
    assert pauses._callback not in gc.callbacks


async def test_a_node_exports_its_collections(make_node: NodeFactory) -> None:
    node = await make_node(model="none")
    gc.collect(2)
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('gc_pause_seconds_count{generation="2"}'))
    assert float(line.split()[-1]) >= 1
    await node.stop()
    assert node.gc_pauses._callback not in gc.callbacks
