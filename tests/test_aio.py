"""cancel_and_wait: the one way services stop their background tasks."""

from __future__ import annotations

import asyncio

import pytest

from rapido.aio import cancel_and_wait


async def test_cancels_and_waits_for_every_task() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            ended.append(name)

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks = [asyncio.create_task(forever("a")), asyncio.create_task(fails()),
             asyncio.create_task(forever("b"))]
    await asyncio.sleep(0)
    await cancel_and_wait([*tasks, None])
    assert sorted(ended) == ["a", "b"] and all(t.done() for t in tasks)
    assert tasks[0].cancelled() and isinstance(tasks[1].exception(), RuntimeError)
    await cancel_and_wait([])  # nothing to do
    await cancel_and_wait(tasks)  # already ended: no-op


async def test_the_callers_own_cancel_propagates() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait([inner]))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    release.set()
    await asyncio.gather(inner, return_exceptions=True)
    assert inner.cancelled()
