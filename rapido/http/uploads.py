"""How many audio uploads a node reads and checks at once.

An upload holds its body in memory while it is read and checked; this bounds how many
do so together. A request past the limit is answered 429 before its body is read."""

from __future__ import annotations


class UploadSlots:
    """A counter of uploads in progress, used on the event loop only."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.in_use = 0

    def try_take(self) -> bool:
        """Takes a slot if one is free; the caller gives it back with :meth:`release`."""
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        assert self.in_use > 0, "release without take"
        self.in_use -= 1
