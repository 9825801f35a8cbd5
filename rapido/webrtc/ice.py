"""ICE servers for the viewers' peer connections, checked when the configuration loads.

Pure (no aiortc import), so the configuration checks with the same function the sink's
builder uses. aiortc, when given no servers at all, looks up a public STUN host
(``stun.l.google.com``) for every peer connection; the sink always passes the list from
here instead, which is empty by default: host candidates only, no lookup anywhere.

What aiortc (1.16) does with a list, and so what is accepted: the first ``stun:`` URL is
used, ``stuns:`` never; the first ``turn:`` (``?transport=udp`` or ``tcp``) or
``turns:`` (``tcp`` only) URL is used with a username and password. Anything it would
skip silently is refused here instead, with the reason.
"""

from __future__ import annotations

import re

# A name or an IPv4 address: aiortc's parser takes no IPv6 literal ([::1]).
_HOST = r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_PORT = r"(?::(?P<port>[0-9]{1,5}))?"
_STUN = re.compile(rf"stun:{_HOST}{_PORT}")
_TURN = re.compile(rf"(?P<scheme>turns?):{_HOST}{_PORT}(?:\?transport=(?P<transport>udp|tcp))?")


def parse_ice_urls(text: str) -> tuple[str, ...]:
    """``text``: comma-separated ``stun:``/``turn:``/``turns:`` URLs (blank: none).
    Returns them in order; raises ValueError naming the first one not usable."""
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    seen: set[str] = set()
    for url in urls:
        kind = _kind(url)
        if kind in seen:
            raise ValueError(f"{url!r}: a second {kind.upper()} server; aiortc uses only "
                             f"the first one")
        seen.add(kind)
    return urls


def is_turn(url: str) -> bool:
    return url.startswith(("turn:", "turns:"))


def _kind(url: str) -> str:
    if url.startswith("stuns:"):
        raise ValueError(f"{url!r}: stuns: is not supported by aiortc; use stun:")
    m = _STUN.fullmatch(url) or _TURN.fullmatch(url)
    if m is None:
        raise ValueError(f"{url!r} is not a stun:host[:port], turn:host[:port]"
                         "[?transport=udp|tcp] or turns:host[:port] URL")
    port = m.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"{url!r}: port {port} is out of range")
    if url.startswith("turns:") and m.group("transport") == "udp":
        raise ValueError(f"{url!r}: turns: runs over tcp only")
    return "stun" if url.startswith("stun:") else "turn"
