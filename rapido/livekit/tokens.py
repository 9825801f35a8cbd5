"""LiveKit access tokens: the narrowest grants each participant needs.

The avatar only publishes (it never needs anyone's media), a viewer only subscribes, and
both are limited to one room and a short TTL, so a leaked token is worth little.
"""

from __future__ import annotations

import datetime
import re
import secrets

from livekit import api

_LESSON_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Attribute the LiveKit Agents framework reads to tie an avatar's tracks to its agent.
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"


def room_name(lesson_id: str) -> str:
    """One room per lesson, so the tutor, the avatar and the viewers meet there."""
    if not _LESSON_RE.match(lesson_id):
        raise ValueError(f"lesson_id must match [A-Za-z0-9_-]{{1,64}}, got {lesson_id!r}")
    return f"lesson_{lesson_id}"


def publisher_identity(node_id: str, session_id: str) -> str:
    """Unique per node and session: the SDK keys handlers by identity across all rooms
    of a process, and a reconnecting session must not kick out a newer one elsewhere."""
    return f"rapido-{node_id}-{session_id}"


def _check(key: str, secret: str, room: str, identity: str, ttl_s: float) -> None:
    # AccessToken silently falls back to LIVEKIT_API_KEY/SECRET from the environment when
    # given empty values; a server that mints tokens must never do that by accident.
    if not key or not secret:
        raise ValueError("LiveKit API key and secret are required")
    if not room:
        raise ValueError("room is required")
    if not identity:
        raise ValueError("identity is required")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")


def publisher_token(key: str, secret: str, *, room: str, identity: str,
                    name: str | None = None, ttl_s: float = 3600.0,
                    agent_identity: str | None = None, can_publish_data: bool = False) -> str:
    """A token that may join ``room`` and publish, never subscribe.

    With ``agent_identity`` (the LiveKit Agents avatar case) the token is of kind
    ``agent`` and carries ``lk.publish_on_behalf`` so the agent framework treats our
    tracks as its own; data publishing is then granted, because the avatar answers and
    places RPCs on the agent.
    """
    _check(key, secret, room, identity, ttl_s)
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=False,
        can_publish_data=can_publish_data or agent_identity is not None,
    )
    tok = (api.AccessToken(key, secret).with_identity(identity).with_grants(grants)
           .with_ttl(datetime.timedelta(seconds=ttl_s)))
    if name:
        tok = tok.with_name(name)
    if agent_identity is not None:
        if not agent_identity:
            raise ValueError("agent_identity must not be empty")
        tok = tok.with_kind("agent").with_attributes({PUBLISH_ON_BEHALF: agent_identity})
    return tok.to_jwt()


def viewer_token(key: str, secret: str, *, room: str, identity: str | None = None,
                 ttl_s: float = 3600.0) -> str:
    """A token that may join ``room`` and subscribe only: a viewer can neither publish
    media nor send data into the lesson, and is hidden from the other participants.
    Without ``identity`` every minting gets a random one: two viewers holding tokens
    from two reads of the session never kick each other out of the room."""
    if identity is None:
        identity = f"viewer-{secrets.token_hex(8)}"
    _check(key, secret, room, identity, ttl_s)
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=False,
        can_subscribe=True,
        can_publish_data=False,
        hidden=True,
    )
    return (api.AccessToken(key, secret).with_identity(identity).with_grants(grants)
            .with_ttl(datetime.timedelta(seconds=ttl_s)).to_jwt())
