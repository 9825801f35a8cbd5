"""The viewer page in a real headless Chromium: Demo plays over WHEP and the mouth moves.

Needs Debian's ``chromium`` (scripts/install-test-deps.sh installs it; without it the
test skips, in CI it fails) and the ``playwright`` Python package (never ``playwright
install``: the system Chromium is used).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapido.gpu.portrait import default_avatar
from rapido.http.demo import SCRIPT
from tests.conftest import API_KEY, NodeFactory, system_tool

SCREENSHOT = Path("/tmp/viewer.png")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream"]
BACKGROUND = (16, 16, 96, 64)  # x, y, w, h in 854x480: far from the head

# Grabs one frame of the <video> at its native size and returns, for each box (x, y, w, h),
# the mean absolute difference of its grey levels from the previous grab (null at first).
GRAB_JS = """(boxes) => {
  const v = document.getElementById("video");
  if (!v.videoWidth) return null;
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage(v, 0, 0);
  const now = boxes.map(([x, y, w, h]) => {
    const d = g.getImageData(x, y, w, h).data, out = new Float32Array(w * h);
    for (let i = 0; i < out.length; i++) out[i] = (d[4 * i] + d[4 * i + 1] + d[4 * i + 2]) / 3;
    return out;
  });
  const prev = window.__grab;
  window.__grab = now;
  if (!prev) return null;
  return now.map((a, k) => {
    let sum = 0;
    for (let i = 0; i < a.length; i++) sum += Math.abs(a[i] - prev[k][i]);
    return sum / a.length;
  });
}"""


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the viewer test needs the 'playwright' Python package "
                    "(pip install playwright; never 'playwright install')")
    chromium = system_tool("chromium")
    async with async_playwright() as pw:
        try:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=chromium, args=ARGS,
                headless=True, viewport={"width": 1200, "height": 900})
        except Exception as exc:  # any launch failure is a test failure
            pytest.fail(f"could not launch {chromium}: {exc}")
        try:
            yield context
        finally:
            await context.close()


def _variation(grabs: list[tuple[float, list[float]]], region: int) -> float:
    """Median change of a region from one grab to the next (mean absolute difference)."""
    return statistics.median(g[1][region] for g in grabs)


@pytest.mark.slow
async def test_demo_plays_in_chromium_and_the_mouth_moves(
        make_node: NodeFactory, browser: Any) -> None:
    # rapido-lite: the real lip-sync model. min_fps = fps: Chromium shares these cores,
    # and the page, not adaptive quality, is under test (the fps panel is checked).
    node = await make_node(min_fps=25.0)
    x, y, w, h = (int(v) for v in default_avatar().mouth_boxes[0])
    boxes = [[x, y, w, h], list(BACKGROUND)]
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(node.url + "/")
    async with page.expect_response("**/api/demo") as response_info:
        await page.click("#demo")
    response = await response_info.value
    t0 = time.monotonic()
    assert response.status == 201, await response.text()
    session = await response.json()
    assert session["whep_url"] and session["viewer_token"]

    # Playing: the native size is the node's, and currentTime advances.
    await page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v.videoWidth === 854 && v.currentTime > 0.2 && !v.paused; }", timeout=15_000)
    before = await page.evaluate("document.getElementById('video').currentTime")

    # Grab frames: idle before the first utterance, then through the speech. Playout is
    # the server's jitter start (~0.13 s) plus WebRTC's delay after each queueing time.
    grabs: list[tuple[float, list[float]]] = []
    first, seconds = SCRIPT[0]
    while (t := time.monotonic() - t0) < first + seconds - 0.1:
        grab = await page.evaluate(GRAB_JS, boxes)
        if grab is not None:
            grabs.append((t, grab))
        await asyncio.sleep(0.06)
    await page.screenshot(path=str(SCREENSHOT))
    idle = [g for g in grabs if g[0] < first - 0.05]
    speaking = [g for g in grabs if first + 0.5 < g[0]]
    assert len(speaking) >= 8, f"only {len(speaking)} grabs during speech"
    if len(idle) < 4:
        # The page began to play too late to see the avatar before it spoke (under CI's
        # load Chromium took 1.54 s to play): the idle reference is then taken after the
        # script, in the demo's grace before the session ends.
        late = [round(g[0], 2) for g in grabs[:3]]
        end = sum(d for d, _ in SCRIPT) + SCRIPT[-1][1] + 0.8
        await asyncio.sleep(max(0.0, end - (time.monotonic() - t0)))
        await page.evaluate("window.__grab = null")
        idle = []
        while (t := time.monotonic() - t0) < end + 1.6:
            grab = await page.evaluate(GRAB_JS, boxes)
            if grab is not None:
                idle.append((t, grab))
            await asyncio.sleep(0.06)
        print(f"the page played from {late[0]} s: idle grabs after the script")
        assert len(idle) >= 4, f"only {len(idle)} idle grabs after the script (page slow " \
                               f"to play: first grabs at {late} s)"

    mouth_idle = _variation(idle, 0)
    mouth_speaking = _variation(speaking, 0)
    background = max(_variation(idle, 1), _variation(speaking, 1))
    summary = (f"mouth idle {mouth_idle:.2f}, mouth speaking {mouth_speaking:.2f}, "
               f"background {background:.2f} (grey levels, median frame-to-frame MAD)")
    print(summary, f"({len(idle)} idle grabs, {len(speaking)} speaking)")
    assert mouth_speaking > 2.0, f"the mouth hardly changes while speaking: {summary}"
    assert mouth_speaking > 2.5 * mouth_idle + 0.5, \
        f"the mouth moves no more while speaking than in idle: {summary}"
    assert mouth_speaking > 4 * background + 0.5, \
        f"the mouth changes no more than the background: {summary}"

    now = await page.evaluate("document.getElementById('video').currentTime")
    assert now > before + 1.5, f"video time went {before:.2f} -> {now:.2f} s"
    # The stats panel: an fps number near the node's 25.
    await page.wait_for_function(
        "() => parseFloat(document.getElementById('st-fps').textContent) > 0", timeout=5_000)
    fps = float(await page.text_content("#st-fps") or "0")
    assert 15 <= fps <= 35, fps
    assert (await page.text_content("#st-underruns") or "").strip().isdigit()
    # The publisher's adaptive quality, from the session's stats: "1.00 · 25 fps · ..".
    await page.wait_for_function(
        "() => document.getElementById('st-quality').textContent.includes('fps')",
        timeout=5_000)
    assert " fps · " in (await page.text_content("#st-quality") or "")
    assert (await page.text_content("#st-av") or "").endswith(")")  # "<n> ms (from ..)"
    assert not errors, errors


@pytest.mark.slow
async def test_page_asks_for_the_api_key(make_node: NodeFactory, browser: Any) -> None:
    node = await make_node(model="none", api_key=API_KEY)
    page = await browser.new_page()
    await page.goto(node.url + "/")
    await page.wait_for_selector("#key-form:not([hidden])", timeout=5_000)
    await page.fill("#key", API_KEY)
    await page.click("#key-form button")
    # With the key: the demo session shows up in the list, and its lesson id is text.
    async with aiohttp.ClientSession() as http, http.post(
            f"{node.url}/api/demo", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 201
        lesson = (await r.json())["lesson_id"]
    await page.wait_for_selector(f"#sessions td:text-is('{lesson}')", timeout=5_000)
    assert await page.evaluate("sessionStorage.getItem('rapido.apiKey')") == API_KEY


async def test_demo_endpoint_speaks_and_needs_the_key(make_node: NodeFactory) -> None:
    node = await make_node(model="none", api_key=API_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/api/demo") as r:
            assert r.status == 401
        async with http.post(f"{node.url}/api/demo", headers=auth) as r:
            assert r.status == 201, await r.text()
            body = await r.json()
        assert body["lesson_id"].startswith("demo-") and body["sink"] == "webrtc"
        assert body["whep_url"].endswith(f"/whep/{body['session_id']}") and body["viewer_token"]
        assert body["state"] == "idle"
        # The first utterance is queued after SCRIPT[0][0] seconds and then plays.
        deadline = time.monotonic() + SCRIPT[0][0] + 3.0
        state = "idle"
        while state != "speaking" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            async with http.get(f"{node.url}/api/sessions/{body['session_id']}",
                                headers=auth) as r:
                state = (await r.json())["state"]
        assert state == "speaking"
        # Another demo is another session; stopping the node with its speech still
        # pending cancels the script cleanly (make_node stops it).
        async with http.post(f"{node.url}/api/demo", headers=auth) as r:
            assert (await r.json())["session_id"] != body["session_id"]


async def test_demo_session_ends_after_its_script(make_node: NodeFactory) -> None:
    """A Demo press costs its script and a grace, not a stream until the idle timeout.
    The page's way in: the session's ws_token on its ws_url (the events end with
    ``closed``)."""
    grace = 0.5
    node = await make_node(model="none", demo_grace_s=grace)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/api/demo") as r:
            assert r.status == 201, await r.text()
            body = await r.json()
        t0 = time.monotonic()
        async with http.ws_connect(f"{body['ws_url']}?token={body['ws_token']}") as ws:
            finished = 0
            while True:
                msg = await ws.receive_json(timeout=30)
                if msg["type"] == "playback_finished":
                    finished += 1
                    t_last = time.monotonic()
                elif msg["type"] == "closed":
                    break
        elapsed = time.monotonic() - t0
    assert msg["reason"] == "demo_finished"
    assert finished == len(SCRIPT)  # the whole script played before it ended
    # Not before the grace (less the time this client's loop, shared with the node, may
    # have taken to read the finish), and not long after it.
    assert grace - 0.3 <= time.monotonic() - t_last <= grace + 2.0
    assert elapsed <= sum(d + s for d, s in SCRIPT) + grace + 5.0
    assert body["session_id"] not in node.engine.sessions
