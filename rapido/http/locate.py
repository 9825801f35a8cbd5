"""Where a session lives, as the proxy asks it: the types of the node's ``Locate``.

They live apart from :mod:`rapido.http.proxy` (which re-exports them) so that
:mod:`rapido.http.keys` can name them for its ``LOCATE`` key while ``proxy`` reads the
other keys: no import cycle between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class Remote:
    """The session lives on another live node."""

    node_id: str
    url: str  # that node's base URL, e.g. "http://127.0.0.1:8123" (from its Serf tags)


@dataclass(frozen=True)
class Lost:
    """The session's node is failed, has left, or is unknown to this node's view."""

    node_id: str


#: None: serve here (this node's session, or not a cluster session id).
Where: TypeAlias = Remote | Lost | None
#: Session id -> where it lives. Called on every session-scoped request (and every
#: ~0.5 s for a relayed WebSocket), so it must be cheap and must not block.
Locate: TypeAlias = Callable[[str], Where]
