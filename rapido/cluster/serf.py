"""An asyncio client for the Serf agent's RPC (msgpack over TCP, on loopback).

Why this is one module (over ~500 lines): the framing, the one reader task, the typed
records and the validation of every answer are one protocol; split, each part would have
to know the others' state.

The wire: each request is a header map ``{"Command", "Seq"}`` followed, for commands with
one, by a body map; each answer is a header ``{"Seq", "Error"}`` followed by a body for
commands that return one. Serf is not consistent about bodies on errors (``join`` sends
its body with an error, ``members`` with "Authentication required" does not), so the
reader frames by shape: a map with a ``Seq`` key is a header, anything else is the body
of the header before it. Streaming commands (``stream``, ``monitor``, ``query``) answer
with one header (the ack), then one header + body per record, under the same Seq.

The agent runs a connection's commands one after another: a slow command (``tags``,
``join``, ``leave``, ``force-leave`` wait for gossip, up to the agent's broadcast timeout)
holds back the commands sent after it on that connection, ``respond`` included. Streams
keep flowing meanwhile. Give slow work its own client where that matters.

Every answer is checked here: a malformed one fails the call it belongs to with
``SerfProtocolError``; one that breaks the framing (undecodable bytes, an answer for a
Seq never sent, a body without a header) fails every pending call and closes the
connection. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack

from rapido.aio import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Serf's own limits (serf/serf/config.go, memberlist MetaMaxSize), checked before sending.
USER_EVENT_SIZE_LIMIT: Final = 512
QUERY_SIZE_LIMIT: Final = 1024
QUERY_RESPONSE_SIZE_LIMIT: Final = 1024
TAGS_SIZE_LIMIT: Final = 512

#: What an agent's answer may be at most (a member list of a large cluster fits).
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 10.0
#: Commands that wait for gossip (the agent's broadcast timeout is 5 s by default).
SLOW_TIMEOUT_S: Final = 20.0
#: How long after its own timeout a query's "done" record may take to arrive.
QUERY_GRACE_S: Final = 5.0

MEMBER_EVENT_TYPES: Final = frozenset(
    {"member-join", "member-leave", "member-failed", "member-update", "member-reap"})
MEMBER_STATUSES: Final = frozenset({"none", "alive", "leaving", "left", "failed"})
_STREAM_TYPE = re.compile(
    r"\*|member-(join|leave|failed|update|reap)|user(:[^,\s]+)?|query(:[^,\s]+)?")
_UINT64_MAX: Final = 2**64 - 1


class SerfError(Exception):
    """A Serf RPC call failed: the agent refused it, or it could not be made."""


class SerfCommandError(SerfError):
    """The agent answered a command with an error (its ``Error`` string)."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"serf {command}: {message}")
        self.command = command
        self.message = message


class SerfAuthError(SerfCommandError):
    """The agent refused the RPC auth key (or wants one and none was given)."""


class SerfProtocolError(SerfError):
    """The agent's answer broke the protocol (malformed, unexpected, undecodable)."""


class SerfConnectionError(SerfError):
    """The connection to the agent is gone (closed by either side, or never made)."""


class SerfTimeoutError(SerfError, TimeoutError):
    """The agent did not answer in time."""


class SerfStreamOverflow(SerfError):
    """A stream's reader fell behind and records were lost: resync (``members()``)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Member:
    name: str
    addr: str
    port: int
    tags: dict[str, str]
    status: str
    protocol_min: int = 0
    protocol_max: int = 0
    protocol_cur: int = 0
    delegate_min: int = 0
    delegate_max: int = 0
    delegate_cur: int = 0


@dataclass(frozen=True)
class MemberEvent:
    type: str  # one of MEMBER_EVENT_TYPES
    members: tuple[Member, ...]


@dataclass(frozen=True)
class UserEvent:
    name: str
    payload: bytes
    ltime: int
    coalesce: bool


@dataclass(frozen=True)
class QueryEvent:
    """A query another node asked: answer with ``respond(id, ...)`` on the client whose
    stream delivered it, before the query's deadline."""
    id: int
    name: str
    payload: bytes
    ltime: int


StreamEvent = MemberEvent | UserEvent | QueryEvent


@dataclass(frozen=True)
class QueryAck:
    from_node: str


@dataclass(frozen=True)
class QueryResponse:
    from_node: str
    payload: bytes


@dataclass(frozen=True)
class Coordinate:
    vec: tuple[float, ...]
    error: float
    adjustment: float
    height: float


@dataclass(frozen=True)
class LogLine:
    line: str


# ----------------------------------------------------------------- validation helpers


def _map(obj: Any, what: str) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise SerfProtocolError(f"{what}: expected a map, got {_short(obj)}")
    return obj


def _field(obj: dict[Any, Any], key: str, kind: type[T] | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise SerfProtocolError(f"{what}: field {key!r} missing in {_short(obj)}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise SerfProtocolError(f"{what}: field {key!r} has the wrong type: {_short(value)}")
    return value


def _opt_int(obj: dict[Any, Any], key: str, what: str) -> int:
    value = obj.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SerfProtocolError(f"{what}: field {key!r} has the wrong type: {_short(value)}")
    return value


def _payload(obj: dict[Any, Any], key: str, what: str) -> bytes:
    value = obj.get(key)
    if value is None:  # Serf sends nil for an empty payload
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # an agent encoding raw as str: take its bytes
        return value.encode()
    raise SerfProtocolError(f"{what}: field {key!r} has the wrong type: {_short(value)}")


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SerfProtocolError(f"{what}: expected a map of strings, got {_short(value)}")
    return dict(value)


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _addr(raw: Any, what: str) -> str:
    if not isinstance(raw, bytes) or len(raw) not in (4, 16):
        raise SerfProtocolError(f"{what}: field 'Addr' is not an IP address: {_short(raw)}")
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)  # Go's 16-byte form of an IPv4 address
    return str(ip)


def parse_member(obj: Any) -> Member:
    what = "member"
    m = _map(obj, what)
    name = _field(m, "Name", str, what)
    what = f"member {name!r}"
    port = _field(m, "Port", int, what)
    if not 0 <= port <= 65535:
        raise SerfProtocolError(f"{what}: port {port} out of range")
    status = _field(m, "Status", str, what)
    if status not in MEMBER_STATUSES:
        raise SerfProtocolError(f"{what}: unknown status {status!r}")
    if "Tags" not in m:
        raise SerfProtocolError(f"{what}: field 'Tags' missing")
    return Member(
        name=name, addr=_addr(m.get("Addr"), what), port=port,
        tags=_str_map(m["Tags"], f"{what} tags"), status=status,
        protocol_min=_opt_int(m, "ProtocolMin", what),
        protocol_max=_opt_int(m, "ProtocolMax", what),
        protocol_cur=_opt_int(m, "ProtocolCur", what),
        delegate_min=_opt_int(m, "DelegateMin", what),
        delegate_max=_opt_int(m, "DelegateMax", what),
        delegate_cur=_opt_int(m, "DelegateCur", what))


def _parse_members(obj: Any) -> list[Member]:
    body = _map(obj, "members answer")
    members = body.get("Members", [])
    if members is None:
        return []
    if not isinstance(members, list):
        raise SerfProtocolError(f"members answer: 'Members' is not a list: {_short(members)}")
    return [parse_member(m) for m in members]


def parse_stream_event(obj: Any) -> StreamEvent:
    rec = _map(obj, "stream record")
    kind = _field(rec, "Event", str, "stream record")
    what = f"{kind} record"
    if kind in MEMBER_EVENT_TYPES:
        members = _field(rec, "Members", list, what)
        return MemberEvent(kind, tuple(parse_member(m) for m in members))
    if kind == "user":
        coalesce = rec.get("Coalesce", False)
        if not isinstance(coalesce, bool):
            raise SerfProtocolError(f"{what}: field 'Coalesce' has the wrong type")
        return UserEvent(name=_field(rec, "Name", str, what),
                         payload=_payload(rec, "Payload", what),
                         ltime=_field(rec, "LTime", int, what), coalesce=coalesce)
    if kind == "query":
        return QueryEvent(id=_field(rec, "ID", int, what), name=_field(rec, "Name", str, what),
                          payload=_payload(rec, "Payload", what),
                          ltime=_field(rec, "LTime", int, what))
    raise SerfProtocolError(f"stream record: unknown event type {kind!r}")


#: A query record; None is the "done" record that ends the query.
QueryRecord = QueryAck | QueryResponse


def _parse_query_record(obj: Any) -> QueryRecord | None:
    rec = _map(obj, "query record")
    kind = _field(rec, "Type", str, "query record")
    if kind == "done":
        return None
    sender = _field(rec, "From", str, f"query {kind} record")
    if kind == "ack":
        return QueryAck(sender)
    if kind == "response":
        return QueryResponse(sender, _payload(rec, "Payload", "query response record"))
    raise SerfProtocolError(f"query record: unknown type {kind!r}")


def _parse_log(obj: Any) -> LogLine:
    return LogLine(_field(_map(obj, "monitor record"), "Log", str, "monitor record"))


def _parse_coordinate(obj: Any) -> Coordinate | None:
    body = _map(obj, "get-coordinate answer")
    if not _field(body, "Ok", bool, "get-coordinate answer"):
        return None
    coord = _map(body.get("Coord"), "get-coordinate answer 'Coord'")
    vec = _field(coord, "Vec", list, "coordinate")
    numbers = (int, float)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in vec):
        raise SerfProtocolError(f"coordinate: 'Vec' is not a list of numbers: {_short(vec)}")
    return Coordinate(vec=tuple(float(v) for v in vec),
                      error=float(_field(coord, "Error", numbers, "coordinate")),
                      adjustment=float(_field(coord, "Adjustment", numbers, "coordinate")),
                      height=float(_field(coord, "Height", numbers, "coordinate")))


def _parse_stats(obj: Any) -> dict[str, dict[str, str]]:
    body = _map(obj, "stats answer")
    if not all(isinstance(k, str) for k in body):
        raise SerfProtocolError(f"stats answer: keys are not strings: {_short(body)}")
    return {k: _str_map(v, f"stats answer {k!r}") for k, v in body.items()}


def _parse_join(obj: Any) -> int:
    num: int = _field(_map(obj, "join answer"), "Num", int, "join answer")
    return num


# ------------------------------------------------------------------------- size checks


def _old_spec(obj: Any) -> bytes:
    """msgpack as Serf's gossip encodes it (go-codec's default handle: no str8, no bin)."""
    return msgpack.packb(obj, use_bin_type=False)


def tags_size(tags: Mapping[str, str]) -> int:
    """Bytes the tags take in the gossip (Serf's encodeTags: a magic byte + msgpack)."""
    return 1 + len(_old_spec(dict(tags)))


def check_tags(tags: Mapping[str, str]) -> None:
    for k, v in tags.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ValueError(f"tags must map non-empty str to str, got {k!r}: {v!r}")
    size = tags_size(tags)
    if size > TAGS_SIZE_LIMIT:
        raise ValueError(f"tags take {size} bytes encoded, over Serf's limit of "
                         f"{TAGS_SIZE_LIMIT} bytes (all of a node's tags together)")


def user_event_size(name: str, payload: bytes, coalesce: bool) -> int:
    """An upper bound of the encoded event (the Lamport time counted at its widest)."""
    return 1 + len(_old_spec({"LTime": _UINT64_MAX, "Name": name, "Payload": payload,
                              "CC": coalesce}))


def _query_size(name: str, payload: bytes, filter_nodes: list[str],
                filter_tags: dict[str, str], request_ack: bool) -> int:
    """A lower bound of the encoded query (the sender's node name is not counted: the
    client does not know it; the agent checks the rest)."""
    filters = []
    if filter_nodes:
        filters.append(b"\x00" + _old_spec(filter_nodes))
    for tag, expr in filter_tags.items():
        filters.append(b"\x01" + _old_spec({"Tag": tag, "Expr": expr}))
    return 1 + len(_old_spec({
        "LTime": 0, "ID": 0, "Addr": b"\x00" * 4, "Port": 0, "SourceNode": "",
        "Filters": filters, "Flags": int(request_ack), "RelayFactor": 0, "Timeout": 0,
        "Name": name, "Payload": payload}))


def _query_response_size(payload: bytes) -> int:
    """A lower bound of an encoded response (the responder's name not counted)."""
    return 1 + len(_old_spec({"LTime": 0, "ID": 0, "From": "", "Flags": 0,
                              "Payload": payload}))


def _check_bytes(payload: Any, what: str) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, got {type(payload).__name__}")
    return bytes(payload)


# ------------------------------------------------------------------------ the reader


class _Discard:
    """The body (if any) after the header of a call nobody waits for any more."""


_DISCARD: Final = _Discard()


@dataclass
class _Call:
    command: str
    seq: int
    future: asyncio.Future[Any]
    #: The body's parser; None: the command answers with a header alone.
    parse: Callable[[Any], Any] | None
    #: For streaming commands, where records go after the ack.
    records: _Records[Any] | None = None
    acked: bool = False


class _Records(AsyncIterator[T]):
    """A bounded queue of a streaming command's records, read by one consumer."""

    def __init__(self, limit: int) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._end: BaseException | None = None
        self._wake = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self._end is not None

    def push(self, item: T) -> bool:
        """False when the reader fell behind: the records end with an overflow error."""
        if self._end is not None:
            return True
        if len(self._items) >= self._limit:
            self.finish(SerfStreamOverflow(
                f"more than {self._limit} records waited to be read: some were dropped"))
            return False
        self._items.append(item)
        self._wake.set()
        return True

    def finish(self, error: BaseException | None = None) -> None:
        if self._end is None:
            self._end = error if error is not None else StopAsyncIteration()
            self._wake.set()

    def __aiter__(self) -> _Records[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self._end is not None:
                raise self._end
            self._wake.clear()
            await self._wake.wait()


class SerfStream(AsyncIterator[T]):
    """Records of a ``stream`` (StreamEvent) or ``monitor`` (LogLine) command, in order.
    ``stop()`` (or leaving an ``async with``) ends it; an overflow
    (SerfStreamOverflow) or a lost connection ends it with that error."""

    def __init__(self, client: SerfClient, seq: int, records: _Records[T]) -> None:
        self._client = client
        self.seq = seq
        self._records = records
        self._stopped = False

    def __aiter__(self) -> SerfStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._records.__anext__()

    async def stop(self) -> None:
        """Tell the agent to stop (when the connection is still up) and end the records
        (an overflowed stream too: the agent still sends until told)."""
        self._records.finish()
        if not self._stopped:
            self._stopped = True
            await self._client._stop_stream(self.seq)

    async def __aenter__(self) -> SerfStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SerfQuery(AsyncIterator[QueryRecord]):
    """The acks and responses to a query, as they come, until the query's timeout; the
    iteration ends at the agent's "done" record, or raises ``SerfTimeoutError`` when
    that does not come within ``QUERY_GRACE_S`` after the timeout."""

    def __init__(self, client: SerfClient, seq: int, records: _Records[QueryRecord],
                 deadline: float) -> None:
        self._client = client
        self.seq = seq
        self._records = records
        self._deadline = deadline

    def __aiter__(self) -> SerfQuery:
        return self

    async def __anext__(self) -> QueryRecord:
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                return await self._records.__anext__()
        except TimeoutError:
            self._client._retire(self.seq)
            raise SerfTimeoutError(
                f"query (seq {self.seq}): no 'done' record by its deadline") from None

    async def collect(self) -> list[QueryRecord]:
        return [record async for record in self]

    async def responses(self) -> list[QueryResponse]:
        return [r for r in await self.collect() if isinstance(r, QueryResponse)]

    def close(self) -> None:
        """Stop waiting for records (the agent keeps none: there is nothing to stop)."""
        self._records.finish()
        self._client._retire(self.seq)


class SerfClient:
    """One RPC connection to a Serf agent. ``await SerfClient.connect(addr, auth_key)``;
    ``aclose()`` when done. Safe for many concurrent calls on one event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 addr: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 stream_limit: int = 1024) -> None:
        self.addr = addr
        self.timeout_s = timeout_s
        self.stream_limit = stream_limit
        self._reader = reader
        self._writer = writer
        self._seqs = itertools.count(1)
        self._last_seq = 0
        self._pending: dict[int, _Call] = {}
        #: The call whose body the next non-header message is, _DISCARD, or None.
        self._expect: _Call | _Discard | None = None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_ANSWER_BYTES)
        self._closed: SerfError | None = None
        self._task = asyncio.create_task(self._read_loop(), name=f"serf-rpc-reader {addr}")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, addr: str | tuple[str, int], auth_key: str | None = None, *,
                      timeout_s: float = DEFAULT_TIMEOUT_S,
                      stream_limit: int = 1024) -> SerfClient:
        """Connect to ``host:port`` (or ``(host, port)``), handshake and authenticate."""
        host, port = _split_addr(addr)
        text = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise SerfTimeoutError(f"serf RPC {text}: no connection in {timeout_s}s") from None
        except OSError as e:
            raise SerfConnectionError(f"serf RPC {text}: cannot connect: {e}") from e
        client = cls(reader, writer, text, timeout_s=timeout_s, stream_limit=stream_limit)
        try:
            await client._call("handshake", {"Version": 1})
            if auth_key is not None:
                try:
                    await client._call("auth", {"AuthKey": auth_key})
                except SerfCommandError as e:
                    raise SerfAuthError("auth", e.message) from None
        except BaseException:
            await client.aclose()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def wait_closed(self) -> None:
        """Until the connection is gone, however (the agent closed it, it broke, or
        :meth:`aclose`)."""
        await asyncio.wait([self._task])

    async def aclose(self) -> None:
        """Close the connection; pending calls and streams fail with SerfConnectionError."""
        self._fail_all(SerfConnectionError(f"serf RPC {self.addr}: the client was closed"))
        await cancel_and_wait([self._task])
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> SerfClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ commands

    async def members(self) -> list[Member]:
        """Every member this agent knows, failed and left ones included (for 24 h)."""
        result: list[Member] = await self._call("members", None, _parse_members)
        return result

    async def members_filtered(self, tags: Mapping[str, str] | None = None,
                               status: str | None = None,
                               name: str | None = None) -> list[Member]:
        """Members matching all of the given regular expressions (anchored by Serf):
        tag values by tag name, the status, the name."""
        body: dict[str, Any] = {"Tags": dict(tags or {}), "Status": status or "",
                                "Name": name or ""}
        for value in (*body["Tags"].keys(), *body["Tags"].values(), body["Status"],
                      body["Name"]):
            if not isinstance(value, str):
                raise TypeError(f"members_filtered takes strings, got {value!r}")
        result: list[Member] = await self._call("members-filtered", body, _parse_members)
        return result

    async def tags(self, set: Mapping[str, str] | None = None,
                   delete: Iterable[str] = ()) -> None:
        """Set and delete this agent's tags. The size of all its tags together is checked
        first (one ``stats`` call reads the current ones)."""
        new = dict(set or {})
        gone = list(delete)
        if not all(isinstance(k, str) for k in gone):
            raise TypeError(f"tag names to delete must be str, got {gone!r}")
        check_tags(new)
        current = (await self.stats()).get("tags", {})
        merged = {k: v for k, v in {**current, **new}.items() if k not in gone}
        check_tags(merged)
        await self._call("tags", {"Tags": new, "DeleteTags": gone}, timeout_s=SLOW_TIMEOUT_S)

    async def event(self, name: str, payload: bytes = b"", coalesce: bool = True) -> None:
        """Send a user event to the cluster (name + payload: about 470 bytes at most)."""
        payload = _check_bytes(payload, "payload")
        if not isinstance(name, str) or not name:
            raise ValueError(f"event name must be a non-empty str, got {name!r}")
        size = user_event_size(name, payload, coalesce)
        if size > USER_EVENT_SIZE_LIMIT:
            raise ValueError(f"user event {name!r} takes up to {size} bytes encoded, over "
                             f"Serf's limit of {USER_EVENT_SIZE_LIMIT} bytes")
        await self._call("event", {"Name": name, "Payload": payload, "Coalesce": coalesce})

    async def query(self, name: str, payload: bytes = b"", *, timeout_s: float,
                    filter_nodes: Iterable[str] = (),
                    filter_tags: Mapping[str, str] | None = None,
                    request_ack: bool = False, relay_factor: int = 0) -> SerfQuery:
        """Ask the cluster (or the nodes filtered by name or tag regex); the answer is an
        async iterator of QueryAck / QueryResponse records until ``timeout_s``, which
        the agent always waits out in full."""
        payload = _check_bytes(payload, "payload")
        if not isinstance(name, str) or not name:
            raise ValueError(f"query name must be a non-empty str, got {name!r}")
        if not timeout_s > 0:
            raise ValueError(f"a query needs a timeout > 0 s, got {timeout_s!r}")
        nodes = list(filter_nodes)
        ftags = dict(filter_tags or {})
        if not 0 <= relay_factor <= 5:
            raise ValueError(f"relay_factor must be 0..5, got {relay_factor}")
        size = _query_size(name, payload, nodes, ftags, request_ack)
        if size > QUERY_SIZE_LIMIT:
            raise ValueError(f"query {name!r} takes at least {size} bytes encoded, over "
                             f"Serf's limit of {QUERY_SIZE_LIMIT} bytes")
        body = {"FilterNodes": nodes, "FilterTags": ftags, "RequestAck": request_ack,
                "RelayFactor": relay_factor, "Timeout": int(timeout_s * 1e9),
                "Name": name, "Payload": payload}
        records: _Records[QueryRecord] = _Records(self.stream_limit)
        seq = await self._call("query", body, records=records, parse=_parse_query_record)
        deadline = asyncio.get_running_loop().time() + timeout_s + QUERY_GRACE_S
        return SerfQuery(self, seq, records, deadline)

    async def respond(self, query_id: int, payload: bytes = b"") -> None:
        """Answer a query this client's stream delivered, before its deadline."""
        payload = _check_bytes(payload, "payload")
        size = _query_response_size(payload)
        if size > QUERY_RESPONSE_SIZE_LIMIT:
            raise ValueError(f"query response takes at least {size} bytes encoded, over "
                             f"Serf's limit of {QUERY_RESPONSE_SIZE_LIMIT} bytes")
        await self._call("respond", {"ID": query_id, "Payload": payload})

    async def stream(self, types: Iterable[str] = ("*",)) -> SerfStream[StreamEvent]:
        """Subscribe to events: member-join, member-leave, member-failed, member-update,
        member-reap, user[:name], query[:name], or * for all."""
        kinds = list(types)
        if not kinds or not all(isinstance(t, str) and _STREAM_TYPE.fullmatch(t)
                                for t in kinds):
            raise ValueError(f"unknown stream event types: {kinds!r}")
        records: _Records[StreamEvent] = _Records(self.stream_limit)
        seq = await self._call("stream", {"Type": ",".join(kinds)}, records=records,
                               parse=parse_stream_event)
        return SerfStream(self, seq, records)

    async def monitor(self, log_level: str = "info") -> SerfStream[LogLine]:
        """The agent's log lines from ``log_level`` up."""
        records: _Records[LogLine] = _Records(self.stream_limit)
        seq = await self._call("monitor", {"LogLevel": log_level}, records=records,
                               parse=_parse_log)
        return SerfStream(self, seq, records)

    async def join(self, addrs: Iterable[str], replay: bool = False) -> int:
        """Join the cluster through these ``host:port`` addresses; returns how many
        answered. Fails (SerfCommandError) when none did."""
        existing = list(addrs)
        if not existing or not all(isinstance(a, str) and a for a in existing):
            raise ValueError(f"join needs addresses, got {existing!r}")
        num: int = await self._call("join", {"Existing": existing, "Replay": replay},
                                    _parse_join, timeout_s=SLOW_TIMEOUT_S)
        return num

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent then shuts down."""
        await self._call("leave", None, timeout_s=SLOW_TIMEOUT_S)

    async def force_leave(self, node: str, prune: bool = False) -> None:
        """Move a failed member to left (prune: forget it at once)."""
        await self._call("force-leave", {"Node": node, "Prune": prune},
                         timeout_s=SLOW_TIMEOUT_S)

    async def stats(self) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = await self._call("stats", None, _parse_stats)
        return result

    async def get_coordinate(self, node: str) -> Coordinate | None:
        """The network coordinate this agent holds for ``node``; None if it has none."""
        result: Coordinate | None = await self._call("get-coordinate", {"Node": node},
                                                     _parse_coordinate)
        return result

    # ------------------------------------------------------------------ plumbing

    async def _call(self, command: str, body: dict[str, Any] | None,
                    parse: Callable[[Any], Any] | None = None, *,
                    records: _Records[Any] | None = None,
                    timeout_s: float | None = None) -> Any:
        """Send a command and wait for its answer: the parsed body, None for a
        header-only answer, or (streaming commands) the seq once the agent acked."""
        if self._closed is not None:
            raise self._closed
        seq = next(self._seqs)
        self._last_seq = seq
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[seq] = _Call(command, seq, future, parse, records)
        data = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            data += msgpack.packb(body, use_bin_type=True)
        wait = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            self._writer.write(data)
            async with asyncio.timeout(wait):
                await self._writer.drain()
                result = await future
            done = True
            return seq if records is not None else result
        except TimeoutError:
            raise SerfTimeoutError(
                f"serf {command} (seq {seq}): no answer from {self.addr} in {wait}s") from None
        except (ConnectionError, OSError) as e:
            error = SerfConnectionError(f"serf RPC {self.addr}: {command} not sent: {e}")
            self._fail_all(error)
            raise error from e
        finally:
            if not (done and records is not None):
                self._retire(seq)

    async def _stop_stream(self, seq: int) -> None:
        if self._closed is not None:
            self._retire(seq)
            return
        try:
            await self._call("stop", {"Stop": seq})
        finally:
            self._retire(seq)

    def _retire(self, seq: int) -> None:
        """Nobody waits for this seq any more: what still comes for it is dropped."""
        call = self._pending.pop(seq, None)
        if call is not None and call.records is not None:
            call.records.finish()
        if self._expect is call and call is not None:
            self._expect = _DISCARD

    def _fail_all(self, error: SerfError) -> None:
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        self._expect = None
        for call in pending.values():
            if not call.future.done():
                call.future.set_exception(error)
                call.future.exception()  # the caller may have timed out: no "never retrieved"
            if call.records is not None:
                call.records.finish(error)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise SerfConnectionError(
                        f"serf RPC {self.addr}: the agent closed the connection")
                try:
                    self._unpacker.feed(data)
                except msgpack.UnpackException as e:  # BufferFull: an answer over the limit
                    raise SerfProtocolError(f"serf RPC {self.addr}: an answer over "
                                            f"{MAX_ANSWER_BYTES} bytes") from e
                while True:
                    try:
                        message = next(self._unpacker)
                    except StopIteration:
                        break
                    except (ValueError, TypeError, msgpack.UnpackException) as e:
                        raise SerfProtocolError(
                            f"serf RPC {self.addr}: undecodable answer from the agent: "
                            f"{type(e).__name__}: {e}") from e
                    self._dispatch(message)
        except SerfError as e:
            if self._closed is None and self._pending:
                log.warning("%s", e)
            self._fail_all(e)
        except OSError as e:
            self._fail_all(SerfConnectionError(f"serf RPC {self.addr}: {e}"))
        except Exception as e:
            log.exception("serf RPC reader %s failed", self.addr)
            self._fail_all(SerfProtocolError(f"serf RPC {self.addr}: reader failed: {e!r}"))
        finally:
            # Whatever ended the reader, nothing may wait for an answer any more.
            self._fail_all(SerfConnectionError(f"serf RPC {self.addr}: connection closed"))
            self._writer.close()

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, dict) and "Seq" in message:
            self._on_header(message)
            return
        target, self._expect = self._expect, None
        if target is None:
            raise SerfProtocolError(
                f"serf RPC {self.addr}: a message without a header: {_short(message)}")
        if isinstance(target, _Discard):
            return
        self._on_body(target, message)

    def _on_header(self, header: dict[Any, Any]) -> None:
        seq, error = header.get("Seq"), header.get("Error")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(error, str):
            raise SerfProtocolError(
                f"serf RPC {self.addr}: malformed answer header {_short(header)}")
        previous = self._expect
        if isinstance(previous, _Call):
            # The header before this one promised a body that did not come.
            self._expect = None
            self._fail_call(previous, SerfProtocolError(
                f"serf {previous.command}: the agent's answer came without its body"))
        call = self._pending.get(seq)
        if call is None:
            if 0 < seq <= self._last_seq:
                self._expect = _DISCARD  # a late answer to a call that gave up
                return
            raise SerfProtocolError(
                f"serf RPC {self.addr}: an answer for seq {seq}, which no command was sent "
                f"with (last sent: {self._last_seq})")
        if error:
            kind = SerfAuthError if error in (
                "Authentication required", "Invalid authentication token") else SerfCommandError
            self._expect = _DISCARD  # some commands send a body with an error, some not
            self._fail_call(call, kind(call.command, error))
            return
        if call.records is not None and not call.acked:
            # Serf sends a streaming command's ack before it registers the stream, so
            # the first header is the ack, with no body; every later one has a record.
            call.acked = True
            if not call.future.done():
                call.future.set_result(None)
            return
        if call.parse is None:
            self._pending.pop(seq, None)
            if not call.future.done():
                call.future.set_result(None)
            return
        self._expect = call

    def _on_body(self, call: _Call, body: Any) -> None:
        assert call.parse is not None
        if call.records is None:
            self._pending.pop(call.seq, None)
            try:
                result = call.parse(body)
            except SerfProtocolError as e:
                self._fail_call(call, e)
                return
            if not call.future.done():
                call.future.set_result(result)
            return
        try:
            record = call.parse(body)
        except SerfProtocolError as e:
            self._fail_call(call, e)
            return
        if record is None:  # a query's "done"
            call.records.finish()
            self._drop(call)
        elif not call.records.push(record):
            self._drop(call)

    def _drop(self, call: _Call) -> None:
        if self._pending.get(call.seq) is call:
            del self._pending[call.seq]

    def _fail_call(self, call: _Call, error: SerfError) -> None:
        self._drop(call)
        if not call.future.done():
            call.future.set_exception(error)
        if call.records is not None:
            call.records.finish(error)


def _split_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        host, port = addr
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"serf RPC address must be host:port, got {addr!r}")
        port = int(port_text)
        host = host.strip("[]")
    if not isinstance(port, int) or not 0 < port < 65536 or not host:
        raise ValueError(f"bad serf RPC address {addr!r}")
    return host, port
