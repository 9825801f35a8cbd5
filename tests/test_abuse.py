"""Attacks on a real node, as a hostile client would make them, each against a bound.

The node runs in a subprocess (its own memory is what is measured: VmHWM, the peak RSS,
from /proc) with one honest neighbour: a session fed speech in real time over its
WebSocket, whose delivered frame rate (``frames_out`` per second, read from the API) must
stay at 24 fps or more in every second of the attack, unless the hypervisor took the
machine's CPU in that second (steal time, ``/proc/stat``: this project's CI runs on a
shared 2-core VM where a spell of steal stops the node, the client and the model alike),
and at 24.5 fps or more over the whole attack whatever the steal.

Starting a node (the model warmed up) is the costly part: the nodes of the selected
tests (``on_node``: their settings) start all at once, and are all ready before the
first attack (``AbuseNodes``); tests with the same settings share a node (the upload
tests do, the WHEP tests, the timeout tests), each getting it without sessions and with
its peak RSS reset to the current RSS, so a test measures its own attack as on a fresh
node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest

from tests.conftest import speech
from tests.test_ws import next_event

ROOT = Path(__file__).resolve().parents[1]
#: The honest neighbour's floor, every second of an attack.
MIN_FPS = 24.0
#: A second in which the VM lost at least this much CPU to steal (summed over its CPUs;
#: one frame interval) is not held against the node: the hypervisor, not the attack,
#: stopped it. The mean rate over the attack is still judged in full.
STEAL_EXCUSE_S = 0.04


def steal_s() -> float:
    """CPU time the hypervisor has taken from this machine, all CPUs, since boot
    (proc(5): the 8th field of /proc/stat's ``cpu`` line, in USER_HZ ticks)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0

pytestmark = pytest.mark.slow


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)

    def status_kb(self, key: str) -> int:
        """A /proc/<pid>/status figure in KiB (VmHWM: peak RSS; VmRSS: now)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        assert m, f"{key} not in /proc/{self.proc.pid}/status"
        return int(m.group(1))

    def reset_peak(self) -> None:
        """VmHWM back to the current RSS (proc(5): clear_refs "5", Linux >= 4.0)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        assert self.status_kb("VmHWM") <= self.status_kb("VmRSS") + 16 * 1024, \
            "the peak RSS was not reset"


def spawn_node(tmp_path: Path, model_dir: Path, **settings: Any) -> NodeProcess:
    """``python -m rapido serve`` on a free port with ``settings`` (as RAPIDO_* env), not
    waited for (:func:`wait_ready`)."""
    env = {**os.environ, "RAPIDO_PORT": "0", "RAPIDO_LOG_LEVEL": "warning",
           "RAPIDO_MODEL_DIR": str(model_dir), "RAPIDO_RECORDINGS_DIR": str(tmp_path / "rec"),
           "RAPIDO_AVATARS_DIR": str(tmp_path / "avatars"), "PYTHONUNBUFFERED": "1"}
    env.update({f"RAPIDO_{k.upper()}": str(v) for k, v in settings.items()})
    return NodeProcess(_spawn(env), "")


def _read_url(node: NodeProcess, deadline: float) -> None:
    proc = node.proc
    assert proc.stdout is not None
    while not node.url:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the node exited early:\n{''.join(node.output)}")
        node.output.append(line)
        m = re.search(r"rapido serving at (http://\S+?)/ ", line)
        if m:
            node.url = m.group(1)
        assert time.monotonic() < deadline, "the node never said where it serves"
    # Keep reading its output so a chatty node never blocks on a full pipe (a thread of
    # its own: a node shared by several tests outlives the loop that started it).
    threading.Thread(target=_drain, args=(proc, node.output), daemon=True).start()


async def wait_ready(node: NodeProcess) -> NodeProcess:
    """Until the node says where it serves and answers /ready with 200."""
    deadline = time.monotonic() + 120
    await asyncio.to_thread(_read_url, node, deadline)
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{node.url}/ready") as r:
                if r.status == 200:
                    return node
            assert time.monotonic() < deadline, "the node never became ready"
            await asyncio.sleep(0.2)


async def start_node(tmp_path: Path, model_dir: Path, **settings: Any) -> NodeProcess:
    return await wait_ready(spawn_node(tmp_path, model_dir, **settings))


def _spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rapido", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _drain(proc: subprocess.Popen[str], out: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)


def stop_node(node: NodeProcess) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


Settings = dict[str, Any]
TestFn = TypeVar("TestFn", bound=Callable[..., Any])


def on_node(settings: Settings) -> Callable[[TestFn], TestFn]:
    """The settings of the node a test attacks (its ``abuse_node`` fixture)."""
    def mark(test: TestFn) -> TestFn:
        setattr(test, "abuse_node_settings", settings)  # noqa: B010 - a Callable to mypy
        return test
    return mark


def _key(settings: Settings) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(settings.items()))


class AbuseNodes:
    """The nodes of this module's selected tests, one per distinct settings: all started
    at once when the first test asks (a start is mostly imports and the model warming
    up, so together they take far less than one after the other) and all ready before
    any test begins, so none starts beside an attack. A node is stopped when a test
    asks for another (the tests of one node sit together); a test given a node an
    earlier test had gets it emptied of sessions and with its peak RSS reset to the
    current RSS, so it measures its own attack as on a fresh node."""

    def __init__(self, workdir: Path, model_dir: Path, wanted: list[Settings]) -> None:
        self.workdir = workdir
        self.model_dir = model_dir
        self.wanted = wanted
        self.nodes: dict[tuple[tuple[str, Any], ...], NodeProcess] = {}
        self.spawned = 0
        self.current: tuple[tuple[str, Any], ...] | None = None

    def _spawn(self, settings: Settings) -> None:
        self.spawned += 1
        self.nodes[_key(settings)] = spawn_node(self.workdir / f"node{self.spawned}",
                                                self.model_dir, **settings)

    async def take(self, settings: Settings) -> NodeProcess:
        key = _key(settings)
        if self.current is not None and self.current != key:
            stop_node(self.nodes.pop(self.current))
        if key not in self.nodes:
            waiting = [s for s in (self.wanted if self.spawned == 0 else [])
                       if _key(s) != key] + [settings]
            for s in waiting:
                self._spawn(s)
            await asyncio.gather(*(wait_ready(self.nodes[_key(s)]) for s in waiting))
        node = self.nodes[key]
        assert node.proc.poll() is None, f"the node exited:\n{''.join(node.output)}"
        if self.current == key:
            await self._tidy(node)
        self.current = key
        return node

    async def _tidy(self, node: NodeProcess) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{node.url}/api/sessions") as r:
                assert r.status == 200, await r.text()
                left = [s["session_id"] for s in (await r.json())["sessions"]]
            for sid in left:
                async with http.delete(f"{node.url}/api/sessions/{sid}") as r:
                    assert r.status in (200, 404), await r.text()
            async with http.get(f"{node.url}/api/sessions") as r:
                assert (await r.json())["sessions"] == [], "sessions left on the shared node"
        node.reset_peak()

    def close(self) -> None:
        for node in self.nodes.values():
            stop_node(node)
        self.nodes.clear()


@pytest.fixture(scope="module")
def abuse_nodes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                model_dir: Path) -> Iterator[AbuseNodes]:
    wanted: dict[tuple[tuple[str, Any], ...], Settings] = {}
    for item in request.session.items:
        settings = getattr(getattr(item, "function", None), "abuse_node_settings", None)
        if settings is not None and getattr(item, "module", None) is request.module:
            wanted.setdefault(_key(settings), settings)
    nodes = AbuseNodes(tmp_path_factory.mktemp("abuse"), model_dir, list(wanted.values()))
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
async def abuse_node(abuse_nodes: AbuseNodes, request: pytest.FixtureRequest
                     ) -> NodeProcess:
    """The node of this test's settings (:func:`on_node`), ready."""
    return await abuse_nodes.take(request.function.abuse_node_settings)


class Honest:
    """One honest lesson: speech sent in real time (40 ms chunks, 3 s utterances with
    short pauses), its delivered frame rate sampled once a second from the API."""

    def __init__(self, http: aiohttp.ClientSession, url: str,
                 headers: dict[str, str] | None = None) -> None:
        self.http = http
        self.url = url
        self.headers = headers or {}
        self.samples: list[tuple[float, float]] = []  # (time, frames_out)
        self.steal: list[float] = []  # steal_s() at each sample
        self._tasks: list[asyncio.Task[None]] = []
        self.session: dict[str, Any] = {}

    async def __aenter__(self) -> Honest:
        async with self.http.post(f"{self.url}/api/sessions", headers=self.headers,
                                  json={"lesson_id": "honest", "sample_rate": 16000}) as r:
            assert r.status == 201, await r.text()
            self.session = await r.json()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._speak(), name="honest-speak"),
                       loop.create_task(self._watch(), name="honest-watch")]
        # Speaking and delivering before the attack starts.
        deadline = time.monotonic() + 10
        while len(self.samples) < 3:
            assert time.monotonic() < deadline, "the honest stream never got going"
            await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Ended here, so that stopping the node has no speech in flight to wait for and
        # a later test on the same node starts its own honest lesson.
        with contextlib.suppress(aiohttp.ClientError):
            async with self.http.delete(
                    f"{self.url}/api/sessions/{self.session['session_id']}",
                    headers=self.headers) as r:
                await r.read()

    async def _speak(self) -> None:
        audio = speech(3.0, seed=7)
        chunk = 640  # 40 ms at 16 kHz
        ws_url = self.session["ws_url"]
        async with self.http.ws_connect(ws_url, headers=self.headers) as ws:
            loop = asyncio.get_running_loop()
            t = loop.time()
            while True:
                await ws.send_json({"type": "start"})
                for i in range(0, len(audio), chunk):
                    await ws.send_bytes(audio[i:i + chunk].astype("<i2").tobytes())
                    t += 0.04
                    await asyncio.sleep(max(0.0, t - loop.time()))
                await ws.send_json({"type": "end"})
                t += 0.3
                await asyncio.sleep(max(0.0, t - loop.time()))

    async def _watch(self) -> None:
        url = f"{self.url}/api/sessions/{self.session['session_id']}"
        loop = asyncio.get_running_loop()
        while True:
            sent = loop.time()
            async with self.http.get(url, headers=self.headers) as r:
                body = await r.json()
            # The count was read somewhere between send and reply: take the midpoint,
            # so a slow reply does not stretch one window and shrink the next.
            self.samples.append(((sent + loop.time()) / 2,
                                 float(body["stats"]["frames_out"])))
            self.steal.append(steal_s())
            await asyncio.sleep(1.0)

    def mark(self) -> float:
        return asyncio.get_running_loop().time()

    def fps_since(self, t0: float) -> list[float]:
        """Frames per second between consecutive samples taken after ``t0``."""
        pts = [(t, n) for t, n in self.samples if t >= t0]
        return [(n1 - n0) / (t1 - t0_) for (t0_, n0), (t1, n1) in itertools.pairwise(pts)]

    def assert_kept_up(self, t0: float) -> None:
        kept = [k for k, (t, _) in enumerate(self.samples) if t >= t0]
        pts = [self.samples[k] for k in kept]
        stolen = [self.steal[k1] - self.steal[k0] for k0, k1 in itertools.pairwise(kept)]
        fps = self.fps_since(t0)
        assert len(fps) >= 2, f"too few samples to judge the honest stream: {fps}"
        # Every second: a one-second window over a 25 fps stream holds 24, 25 or 26
        # frames depending on where its edges fall (and the edges are read over HTTP),
        # so each window may miss MIN_FPS by one frame's phase, never by more: a stall
        # of two frames or more in any second still fails, unless the VM lost a frame
        # interval or more of CPU to steal in it (then the mean below still judges it).
        windows = zip(fps, itertools.pairwise(pts), stolen, strict=True)
        short = [(round(f, 2), round(t1 - t0_, 3), round(st, 2))
                 for f, ((t0_, _), (t1, _)), st in windows
                 if f * (t1 - t0_) < MIN_FPS * (t1 - t0_) - 1.0]
        judged = [w for w in short if w[2] < STEAL_EXCUSE_S]
        assert not judged, (f"the honest stream fell below {MIN_FPS} fps (fps, window s, "
                            f"steal s): {judged}; every second: {fps}")
        if short:
            print(f"windows short while the VM lost CPU to steal (fps, window s, steal s): "
                  f"{short}")
        # Over the whole attack the phase evens out: the rate itself must hold.
        mean = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
        assert mean >= MIN_FPS + 0.5, f"the honest stream averaged {mean:.2f} fps: {fps}"


async def settle(seconds: float = 2.0) -> None:
    """Let the honest stream's watcher take samples after the attack too."""
    await asyncio.sleep(seconds)


def pcm(seconds: float, rate: int = 16_000) -> bytes:
    x = speech(seconds, rate=rate)
    return np.asarray(x, dtype="<i2").tobytes()


@contextlib.asynccontextmanager
async def honest_neighbour(node: NodeProcess, http: aiohttp.ClientSession,
                           headers: dict[str, str] | None = None) -> AsyncIterator[Honest]:
    async with Honest(http, node.url, headers) as h:
        yield h


#: Each attack's node; attacks whose bounds can be set side by side share one (the WHEP
#: tests; the read- and idle-timeout tests; the upload tests: UPLOADS).
WHEP_NODE: Settings = {"webrtc_max_viewers": 10, "whep_connect_timeout_s": 2.0}
DEMO_NODE: Settings = {"demo_grace_s": 1.0}
TIMEOUTS_NODE: Settings = {"http_read_timeout_s": 1.5, "session_idle_timeout_s": 2.0}


@on_node(WHEP_NODE)
async def test_whep_offers_without_candidates_are_reaped_then_a_viewer_connects(
        abuse_node: NodeProcess) -> None:
    """Offers with no ICE candidate from clients that then do nothing fill a webrtc
    session's viewer slots; ``whep_connect_timeout_s`` later they are gone, a real
    viewer connects and decodes frames, and the honest neighbour never stutters."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    from tests.test_webrtc import watch
    from tests.test_whep import without_candidates

    timeout_s, slots = WHEP_NODE["whep_connect_timeout_s"], WHEP_NODE["webrtc_max_viewers"]
    node = abuse_node
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = without_candidates(pc.localDescription.sdp)
    await pc.close()
    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        async with http.post(f"{node.url}/api/sessions",
                             json={"lesson_id": "watched", "sink": "webrtc"}) as r:
            assert r.status == 201, await r.text()
            s = await r.json()
        headers = {"Content-Type": "application/sdp",
                   "Authorization": f"Bearer {s['viewer_token']}"}
        stats_url = f"{node.url}/api/sessions/{s['session_id']}"

        async def post() -> tuple[int, float]:
            async with http.post(s["whep_url"], data=offer, headers=headers) as r:
                return r.status, asyncio.get_running_loop().time()

        t0 = honest.mark()
        flood = await asyncio.gather(*(post() for _ in range(3 * slots)))
        accepted = [t for status, t in flood if status == 201]
        assert len(accepted) == slots
        assert sorted(status for status, _ in flood) == [201] * slots + [503] * 2 * slots
        # Full: a real viewer is turned away (503) until the flood is reaped.
        assert (await post())[0] == 503
        loop = asyncio.get_running_loop()
        while True:
            async with http.get(stats_url) as r:
                sink = (await r.json())["stats"]["sink"]
            if sink["viewers"] == 0:
                free = loop.time()
                break
            assert loop.time() < max(accepted) + timeout_s + 5, sink
            await asyncio.sleep(0.02)
        assert sink["connect_timeouts"] == slots
        # From the last silent viewer's deadline (its 201 + the timeout; the server's
        # deadline is a little earlier) to the API showing every slot free.
        print(f"\nWHEP reaping: {slots} silent viewers, timeout {timeout_s} s: all slots "
              f"free {1e3 * (free - max(accepted) - timeout_s):.0f} ms after the last "
              f"deadline ({1e3 * (free - min(accepted) - timeout_s):.0f} ms after the first)")
        viewer = await watch(http, s["whep_url"], s["viewer_token"])
        try:
            deadline = loop.time() + 15
            while len(viewer.of("video")) < 10:
                assert loop.time() < deadline, "the real viewer decoded no frames"
                await asyncio.sleep(0.1)
        finally:
            await viewer.close()
        async with http.get(f"{node.url}/metrics") as r:
            assert f"whep_connect_timeouts_total {float(slots)}" in await r.text()
        await settle()
        honest.assert_kept_up(t0)


@on_node(WHEP_NODE)
async def test_oversized_whep_offers_get_413_and_reserve_no_viewer_slot(
        abuse_node: NodeProcess) -> None:
    """A flood of SDP offers over MAX_OFFER_BYTES (64 KiB) to a webrtc session: one byte
    over, 1 MiB with a Content-Length, 1 MiB chunked (counted as read): each gets 413
    body_too_large; no viewer slot is taken, even for a moment (the sink's viewers,
    joining and total stay 0 throughout), so all of the session's slots still take
    offers afterwards; the honest neighbour never stutters."""
    from rapido.http.whep import MAX_OFFER_BYTES
    from tests.test_whep import client_offer, without_candidates

    slots = WHEP_NODE["webrtc_max_viewers"]
    node = abuse_node
    pc, sdp = await client_offer()
    await pc.close()
    offer = without_candidates(sdp)

    def padded(size: int) -> bytes:
        """The offer with an attribute line padding it to exactly ``size`` bytes."""
        head = (offer + "a=x-pad:").encode()
        return head + b"p" * (size - len(head) - 2) + b"\r\n"

    just_over, big = padded(MAX_OFFER_BYTES + 1), padded(1024 * 1024)
    assert (len(just_over), len(big)) == (MAX_OFFER_BYTES + 1, 1024 * 1024)

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 16 * 1024):
            yield big[i:i + 16 * 1024]

    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        async with http.post(f"{node.url}/api/sessions",
                             json={"lesson_id": "watched", "sink": "webrtc"}) as r:
            assert r.status == 201, await r.text()
            s = await r.json()
        headers = {"Content-Type": "application/sdp",
                   "Authorization": f"Bearer {s['viewer_token']}"}
        stats_url = f"{node.url}/api/sessions/{s['session_id']}"

        async def sink_stats() -> dict[str, Any]:
            async with http.get(stats_url) as r:
                assert r.status == 200, await r.text()
                return dict((await r.json())["stats"]["sink"])

        async def post(body: Any) -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as attacker, \
                    attacker.post(s["whep_url"], data=body, headers=headers) as r:
                return r.status, await r.json()

        seen: list[dict[str, Any]] = []

        async def watch_slots() -> None:
            while True:
                seen.append(await sink_stats())
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_slots())
        t0 = honest.mark()
        flood: list[tuple[int, dict[str, Any]]] = []
        try:
            # Rounds of 30 at once for 3 s: long enough to judge the neighbour by.
            while not flood or honest.mark() - t0 < 3.0:
                flood += await asyncio.gather(*(post(body) for _ in range(10)
                                                for body in (just_over, big, chunked())))
                # A breath between rounds: this client also sends the honest stream,
                # and the node, not the client's own loop, is what is under test.
                await asyncio.sleep(0.02)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        print(f"\noversized WHEP offers: {len(flood)} in {honest.mark() - t0:.1f} s")
        for status, body in flood:
            assert (status, body["error"]) == (413, "body_too_large"), body
            assert str(MAX_OFFER_BYTES) in body["message"]
        seen.append(await sink_stats())
        assert len(seen) >= 2
        assert all(st["viewers"] == st["viewers_joining"] == st["viewers_total"] == 0
                   for st in seen), [st for st in seen if st["viewers_total"]]
        assert seen[-1]["connect_timeouts"] == 0
        # Every slot is still free: `slots` offers are answered, one more is turned away.
        async with aiohttp.ClientSession() as attacker:
            async def offer_ok() -> int:
                async with attacker.post(s["whep_url"], data=offer, headers=headers) as r:
                    return r.status
            assert await asyncio.gather(*(offer_ok() for _ in range(slots))) == [201] * slots
            assert await offer_ok() == 503
        async with http.delete(stats_url) as r:
            assert r.status == 200
        await settle()
        honest.assert_kept_up(t0)


# -- sessions are reaped; slow clients are cut off -----------------------------------------


@on_node(DEMO_NODE)
async def test_demo_presses_leave_no_session_open(abuse_node: NodeProcess) -> None:
    """Five Demo presses: five sessions that each end by themselves once their script
    has played out and a grace has passed, while the honest lesson plays on."""
    from rapido.http.demo import SCRIPT

    grace = DEMO_NODE["demo_grace_s"]
    node = abuse_node
    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        t0 = honest.mark()
        demos = []
        for _ in range(5):
            async with http.post(f"{node.url}/api/demo") as r:
                assert r.status == 201, await r.text()
                demos.append((await r.json())["session_id"])
        # Script (queueing delays, the last utterance's playout) + grace + slack.
        deadline = time.monotonic() + sum(d for d, _ in SCRIPT) + SCRIPT[-1][1] + grace + 6
        while True:
            async with http.get(f"{node.url}/api/sessions") as r:
                live = {s["session_id"] for s in (await r.json())["sessions"]}
            if not live & set(demos):
                break
            assert time.monotonic() < deadline, f"demo sessions still open: {live & set(demos)}"
            await asyncio.sleep(0.5)
        assert live == {honest.session["session_id"]}
        await settle()
        honest.assert_kept_up(t0)


@on_node(TIMEOUTS_NODE)
async def test_a_client_trickling_its_request_is_cut_off(abuse_node: NodeProcess) -> None:
    """Bodies and headers sent slower than http_read_timeout_s: the body gets 408 and the
    connection closes; headers that never finish get the connection closed. Twenty of
    each at once, while the honest lesson plays on."""
    timeout = TIMEOUTS_NODE["http_read_timeout_s"]
    node = abuse_node
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST /api/sessions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\n")

    async def trickle(first: bytes, drip: bytes) -> tuple[bytes, float]:
        """Send ``first``, then ``drip`` every 0.25 s; what came back and when the
        connection closed (seconds after connecting)."""
        reader, writer = await asyncio.open_connection(host, int(port))
        t = time.monotonic()
        writer.write(first)

        async def drip_forever() -> None:
            with contextlib.suppress(OSError):
                while True:
                    await asyncio.sleep(0.25)
                    writer.write(drip)
                    await writer.drain()

        dripper = asyncio.create_task(drip_forever())

        async def read_to_close() -> bytes:
            got = b""
            try:
                while chunk := await reader.read(65536):
                    got += chunk
                    dripper.cancel()  # answered: more drips would only meet a closed socket
            except ConnectionResetError:
                # A drip that met the closed socket makes the close a reset, not a FIN
                # (seen in CI under load): closed all the same; keep what came before it.
                pass
            return got

        try:
            got = await asyncio.wait_for(read_to_close(), timeout * 2 + 10)
            return got, time.monotonic() - t
        finally:
            dripper.cancel()
            await asyncio.gather(dripper, return_exceptions=True)
            writer.close()

    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        t0 = honest.mark()
        bodies = [trickle((head + "Content-Length: 100000\r\n\r\n{").encode(), b" ")
                  for _ in range(20)]
        headers = [trickle(head.encode(), b"X-Slow: 1\r\n") for _ in range(20)]
        results = await asyncio.gather(*bodies, *headers)
        for got, closed_after in results[:20]:
            assert got.startswith(b"HTTP/1.1 408 "), got[:200]
            assert b'"request_timeout"' in got and b"http_read_timeout_s" in got
            # Answered at the timeout, closed at most a lingering timeout later.
            assert timeout - 0.2 <= closed_after <= 2 * timeout + 3, closed_after
        for got, closed_after in results[20:]:
            assert got == b"", got[:200]  # nothing to answer: the request never arrived
            assert timeout - 0.2 <= closed_after <= timeout + 3, closed_after
        await settle()
        honest.assert_kept_up(t0)
        async with http.get(f"{node.url}/api/sessions") as r:
            assert [s["lesson_id"] for s in (await r.json())["sessions"]] == ["honest"]


@on_node(TIMEOUTS_NODE)
async def test_sessions_nobody_feeds_or_watches_are_reaped(abuse_node: NodeProcess) -> None:
    """Ten sessions created at once and then left alone (nobody sends audio or listens)
    are closed, for idle_timeout, no sooner than session_idle_timeout_s after they were
    asked for and at most a sweep (1 s) and some slack after that; a silent session with
    a WebSocket listening stays, and the honest neighbour plays on at 24 fps."""
    timeout = TIMEOUTS_NODE["session_idle_timeout_s"]
    node = abuse_node
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "listened"}) as r:
            assert r.status == 201, await r.text()
            listened = await r.json()
        async with http.ws_connect(listened["ws_url"]) as ws:
            await next_event(ws, "ready")  # subscribed: a listener from now on
            t0 = honest.mark()

            async def idle_closed() -> float:
                async with http.get(f"{node.url}/metrics") as r:
                    text = await r.text()
                m = re.search(r'^sessions_closed_total\{reason="idle_timeout"\} (\S+)$',
                              text, re.MULTILINE)
                return float(m[1]) if m else 0.0

            idle_before = await idle_closed()

            async def abandon(i: int) -> tuple[str, float, float]:
                """A session asked for and left: its id, when asked, when answered."""
                sent = loop.time()
                async with http.post(f"{node.url}/api/sessions",
                                     json={"lesson_id": f"forgotten-{i}"}) as r:
                    assert r.status == 201, await r.text()
                    return str((await r.json())["session_id"]), sent, loop.time()

            forgotten = await asyncio.gather(*(abandon(i) for i in range(10)))
            gone: dict[str, float] = {}
            deadline = max(t for _, _, t in forgotten) + timeout + 10
            while len(gone) < len(forgotten):
                async with http.get(f"{node.url}/api/sessions") as r:
                    live = {s["session_id"] for s in (await r.json())["sessions"]}
                now = loop.time()
                gone.update({sid: now for sid, _, _ in forgotten
                             if sid not in live and sid not in gone})
                assert now < deadline, f"never reaped: {set(live) - set(gone)}"
                await asyncio.sleep(0.1)
            assert live == {honest.session["session_id"], listened["session_id"]}
            lived = {sid: (gone[sid] - sent, gone[sid] - answered)
                     for sid, sent, answered in forgotten}
            print(f"\nidle sessions, timeout {timeout} s: closed "
                  f"{min(a for _, a in lived.values()):.2f}-"
                  f"{max(a for _, a in lived.values()):.2f} s after their 201")
            for sid, (since_sent, since_answered) in lived.items():
                # Never before the timeout; within a sweep (once a second) and slack after.
                assert since_sent >= timeout, (sid, since_sent)
                assert since_answered <= timeout + 1.0 + 1.5, (sid, since_answered)
                async with http.get(f"{node.url}/api/sessions/{sid}") as r:
                    assert r.status == 404, await r.text()
            # The reason, as the node counts it: ten more closed for idle_timeout.
            assert await idle_closed() == idle_before + len(forgotten)
            assert not ws.closed
        async with http.delete(f"{node.url}/api/sessions/{listened['session_id']}") as r:
            assert r.status == 200, await r.text()
        await settle()
        honest.assert_kept_up(t0)


# -- item 1: maximum-size audio uploads ---------------------------------------------------

MAX_BODY = 16 * 1024 * 1024  # max_body_bytes' default
#: The node of both upload tests: the queue holds an hour; ten uploads may be read at
#: once (the one-at-a-time test sends one at a time either way).
UPLOADS: dict[str, Any] = {"max_queued_audio_s": 3600, "max_concurrent_uploads": 10}
#: Each format at 8 kHz, the rate whose upsampling costs most per byte; 8-bit WAV is the
#: worst case (most samples per byte: 16 MiB is 2097 s of speech, 201 MB at 48 kHz).
UPLOAD_KINDS = ("wav-u8", "wav-s16", "wav-f32", "l16")
UPLOAD_RATE = 8_000


def max_upload(kind: str, size: int = MAX_BODY) -> tuple[bytes, str]:
    """A body of exactly ``size`` bytes of speech-like audio, and its Content-Type."""
    x = speech(2.0, rate=UPLOAD_RATE).astype(np.int32)
    if kind == "l16":
        return np.resize(x.astype(">i2"), size // 2).tobytes(), \
            f"audio/L16;rate={UPLOAD_RATE}"
    tag, width, samples = {
        "wav-u8": (1, 1, ((x >> 8) + 128).astype(np.uint8)),
        "wav-s16": (1, 2, x.astype("<i2")),
        "wav-f32": (3, 4, (x / 32768.0).astype("<f4")),
    }[kind]
    n = (size - 44) // width
    data = np.resize(samples, n).tobytes()
    fmt = struct.pack("<HHIIHH", tag, 1, UPLOAD_RATE, UPLOAD_RATE * width, width, 8 * width)
    head = (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(data)))
    return head + data, "audio/wav"


async def upload(http: aiohttp.ClientSession, url: str, session_id: str, body: bytes,
                 ctype: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/api/sessions/{session_id}/audio", data=body,
                         headers={"Content-Type": ctype}) as r:
        return r.status, await r.json()


async def create(http: aiohttp.ClientSession, url: str, lesson: str) -> str:
    async with http.post(f"{url}/api/sessions", json={"lesson_id": lesson}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["session_id"])


async def played_ms(http: aiohttp.ClientSession, url: str, session_id: str) -> float:
    async with http.get(f"{url}/api/sessions/{session_id}") as r:
        return float((await r.json())["stats"]["played_ms"])


@on_node(UPLOADS)
async def test_max_size_upload_of_each_format_keeps_memory_bounded(
        abuse_node: NodeProcess) -> None:
    """One maximum-size upload of each format, accepted (the queue holds an hour) and
    played, so it is really decoded and resampled: the node's peak RSS rises by less
    than 100 MB, and the honest neighbour keeps 24 fps. The same 8-bit upload again does
    not fit what is left of the queue: 429 at once, from its header."""
    node = abuse_node
    growth: dict[str, float] = {}
    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        t0 = honest.mark()
        base = node.status_kb("VmHWM")
        for kind in UPLOAD_KINDS:
            body, ctype = max_upload(kind)
            sid = await create(http, node.url, kind)
            status, answer = await upload(http, node.url, sid, body, ctype)
            assert status == 202, answer
            if kind == "wav-u8":
                assert answer["duration_ms"] > 2000_000
                start = time.monotonic()
                status, answer = await upload(http, node.url, sid, body, ctype)
                assert status == 429 and answer["error"] == "queue_full", answer
                assert time.monotonic() - start < 2.0
            await asyncio.sleep(1.5)  # playing: decoded and resampled block by block
            assert await played_ms(http, node.url, sid) > 0
            growth[kind] = (node.status_kb("VmHWM") - base) / 1024
            async with http.delete(f"{node.url}/api/sessions/{sid}") as r:
                assert r.status == 200
        await settle()
        print(f"\nVmHWM growth over {base / 1024:.0f} MiB, MiB: {growth}")
        honest.assert_kept_up(t0)
    assert max(growth.values()) < 100, growth


@on_node(UPLOADS)
async def test_ten_max_size_uploads_at_once_keep_memory_bounded(
        abuse_node: NodeProcess) -> None:
    """Ten maximum-size 8-bit 8 kHz uploads at once to ten sessions, all accepted and
    playing: the peak RSS rises by less than 400 MB; the honest neighbour keeps 24 fps."""
    node = abuse_node
    body, ctype = max_upload("wav-u8")
    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest:
        sids = [await create(http, node.url, f"upload-{i}") for i in range(10)]
        t0 = honest.mark()
        base = node.status_kb("VmHWM")
        answers = await asyncio.gather(*(upload(http, node.url, sid, body, ctype)
                                         for sid in sids))
        assert [status for status, _ in answers] == [202] * 10, answers
        await asyncio.sleep(2.0)
        assert all([await played_ms(http, node.url, sid) > 0 for sid in sids])
        growth = (node.status_kb("VmHWM") - base) / 1024
        for sid in sids:
            async with http.delete(f"{node.url}/api/sessions/{sid}") as r:
                assert r.status == 200
        await settle()
        print(f"\nVmHWM growth over {base / 1024:.0f} MiB: {growth:.0f} MiB")
        honest.assert_kept_up(t0)
    assert growth < 400, growth


@on_node(UPLOADS)
async def test_uploads_beyond_max_concurrent_uploads_get_429_unread(
        abuse_node: NodeProcess) -> None:
    """Three times max_concurrent_uploads uploads at once, each body sent in two halves
    with the second held back: as many as the bound are admitted and wait for their
    bodies; every other one gets 429 too_many_uploads with Retry-After while its body is
    still unfinished (refused unread). Once the bodies go, the admitted ones are queued
    (202) and the slots are free again; the honest neighbour keeps 24 fps."""
    limit = UPLOADS["max_concurrent_uploads"]
    node = abuse_node
    half = pcm(0.1)  # 0.1 s of L16 at 16 kHz
    headers = {"Content-Type": "audio/L16;rate=16000"}
    release = asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield half
        await release.wait()
        yield half

    async with aiohttp.ClientSession() as http, honest_neighbour(node, http) as honest, \
            aiohttp.ClientSession() as attacker:
        sid = await create(http, node.url, "flooded")
        url = f"{node.url}/api/sessions/{sid}/audio"

        async def attempt() -> tuple[int, dict[str, Any], str | None]:
            async with attacker.post(url, data=held_body(), headers=headers) as r:
                return r.status, await r.json(), r.headers.get("Retry-After")

        t0 = honest.mark()
        tasks = [asyncio.create_task(attempt()) for _ in range(3 * limit)]
        try:
            refused: set[asyncio.Task[tuple[int, dict[str, Any], str | None]]] = set()
            deadline = time.monotonic() + 20
            while len(refused) < 2 * limit:
                done, _ = await asyncio.wait(set(tasks) - refused, timeout=0.5,
                                             return_when=asyncio.FIRST_COMPLETED)
                refused |= done
                assert time.monotonic() < deadline, f"{len(refused)} answered"
            # While the admitted hold every slot, more waves for 3 s: all refused too.
            while honest.mark() - t0 < 3.0:
                wave = [asyncio.create_task(attempt()) for _ in range(limit)]
                tasks += wave
                done, _ = await asyncio.wait(wave, timeout=10)
                assert len(done) == limit, f"{len(done)} of a wave answered"
                refused |= done
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)  # none of the admitted answers while its body waits
            assert sum(t.done() for t in tasks) == len(refused) == len(tasks) - limit
            for t in refused:
                status, body, retry_after = t.result()
                assert (status, body["error"]) == (429, "too_many_uploads"), body
                assert retry_after is not None and int(retry_after) > 0
            admitted = [t for t in tasks if t not in refused]
            release.set()
            for status, body, _ in await asyncio.gather(*admitted):
                assert status == 202 and body["duration_ms"] == 200.0, body
        finally:
            release.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # The slots are free again: a whole upload is taken at once.
        status, answer = await upload(http, node.url, sid, half + half, headers["Content-Type"])
        assert status == 202 and answer["queued_ms"] > 0, answer
        async with http.delete(f"{node.url}/api/sessions/{sid}") as r:
            assert r.status == 200
        await settle()
        honest.assert_kept_up(t0)


# -- the node's own stall (issue 13: the underruns at utterance boundaries) ----------------

@on_node(UPLOADS)  # any node will do: the one the tests before it left running
async def test_speech_that_arrives_while_the_node_stalls_is_played_without_underruns(
        abuse_node: NodeProcess) -> None:
    """The node's process stopped for 170 ms (SIGSTOP: the loop stalls, as it did when 30
    utterances began at once) while 8 clients go on sending 40 ms chunks on time. The
    speech waits in the sockets; the clock, catching up, must let it in before it takes
    each late frame, or every playing stream's buffer drains and underruns (it did: 8 of
    8 before the fix). Each utterance then plays whole, without an underrun."""
    node = abuse_node
    loop = asyncio.get_running_loop()
    chunk = np.asarray(speech(0.04), dtype="<i2").tobytes()
    chunks = 50

    async def attempt(n: int, http: aiohttp.ClientSession) -> list[tuple[float, dict[str, Any]]]:
        """One run: per client, its worst send lateness (s) and its session's stats."""
        ready = asyncio.Event()
        t0 = loop.time() + 1.0

        async def client(i: int) -> tuple[float, str]:
            async with http.post(f"{node.url}/api/sessions",
                                 json={"lesson_id": f"stall-{n}-{i}",
                                       "sample_rate": 16_000}) as r:
                assert r.status == 201, await r.text()
                s = await r.json()
            late = 0.0
            async with http.ws_connect(s["ws_url"]) as ws:
                await next_event(ws, "ready")
                await ready.wait()
                await ws.send_str(json.dumps({"type": "start"}))
                for k in range(chunks):
                    await asyncio.sleep(max(0.0, t0 + 0.04 * k - loop.time()))
                    late = max(late, loop.time() - (t0 + 0.04 * k))
                    await ws.send_bytes(chunk)
                await ws.send_str(json.dumps({"type": "end"}))
                await next_event(ws, "playback_finished")
            return late, str(s["session_id"])

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        ready.set()
        # 1.5 s into the utterances, halfway between two chunks: the last one is 20 ms
        # old, so the buffers hold no more than their usual level when the node stops.
        await asyncio.sleep(t0 + 1.5 - loop.time())
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.17)  # the clients send on meanwhile
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        out = []
        for late, sid in await asyncio.wait_for(asyncio.gather(*clients), 30):
            async with http.get(f"{node.url}/api/sessions/{sid}") as r:
                out.append((late, (await r.json())["stats"]))
            async with http.delete(f"{node.url}/api/sessions/{sid}") as r:
                assert r.status == 200
        return out

    # The clients share this machine: a slow spell of the test's own loop sends speech
    # late, and the node rightly underruns on it. Such a run proves nothing either way;
    # it is run again (up to three times) until the clients sent on time (within 60 ms).
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            runs = await attempt(n, http)
            worst = max(late for late, _ in runs)
            if worst < 0.06:
                for _, stats in runs:
                    assert stats["underruns"] == 0, stats
                return
            print(f"\nstall test: run {n + 1}: the clients sent up to {1000 * worst:.0f} ms "
                  f"late; underruns {[st['underruns'] for _, st in runs]}")
    pytest.fail("in three runs the test's own clients could not send on time")
