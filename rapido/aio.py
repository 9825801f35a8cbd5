"""asyncio helpers shared by the long-lived services."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended,
    however it ends: their own errors and cancellations are collected, not raised, so
    one failed task cannot stop the others from being waited for. A cancellation of the
    caller itself still propagates."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)
