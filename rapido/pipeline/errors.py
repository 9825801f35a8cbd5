"""Why a session cannot be created: raised below the HTTP layer, answered by it."""

from __future__ import annotations


class AdmissionError(RuntimeError):
    """Not now, or not here: the node is full or draining, or a resource a session needs
    (a LiveKit region with room) is exhausted. HTTP answers 503 with Retry-After."""

    def __init__(self, code: str, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class UnknownAvatar(LookupError):
    """The session asks for an avatar this node does not have."""


class SinkUnavailable(ValueError):
    """The session asks for a sink this node is not set up to provide."""
