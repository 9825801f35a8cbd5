"""Limits of the LiveKit SDK that must be checked before a value reaches it: pure, and
cheap to import (the configuration checks with the same function the sink does)."""

from __future__ import annotations


def validate_queue_size_ms(queue_size_ms: int) -> int:
    """The native side ASSERTS (aborting the whole process, no Python exception) on a
    queue size that is not a multiple of 10 ms, so check before it gets there."""
    if isinstance(queue_size_ms, bool) or not isinstance(queue_size_ms, int):
        raise ValueError(f"queue_size_ms must be an integer, got {queue_size_ms!r}")
    if queue_size_ms <= 0 or queue_size_ms % 10:
        raise ValueError(f"queue_size_ms must be a positive multiple of 10, got {queue_size_ms}")
    return queue_size_ms
