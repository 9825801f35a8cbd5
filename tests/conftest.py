"""Shared fixtures: real nodes on loopback, real HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from rapido.config import Config
from rapido.http.locate import Locate
from rapido.node import Node
from rapido.pipeline.jitter import JitterStats
from rapido.pipeline.speech import speech_like

API_KEY = "test-key-123"
REPO = Path(__file__).resolve().parents[1]
INSTALL_TEST_DEPS = REPO / "scripts" / "install-test-deps.sh"

#: CI sets this (.ci/run): a test whose system tool is missing fails instead of skipping.
REQUIRE_SYSTEM_TOOLS = os.environ.get("RAPIDO_TEST_REQUIRE_SYSTEM_TOOLS") == "1"


def system_tools() -> dict[str, str]:
    """command -> Debian package, as scripts/install-test-deps.sh lists them (one list)."""
    text = INSTALL_TEST_DEPS.read_text()
    return dict(re.findall(r'^\s*"([\w.-]+):([\w.+-]+)"', text, re.MULTILINE))


def system_tool(name: str) -> str:
    """The path of a system tool a test runs for real. Missing: the test skips naming the
    package (or fails, in CI). Only tools the install script knows may be asked for."""
    package = system_tools().get(name)
    assert package is not None, f"{name} is not in {INSTALL_TEST_DEPS.name}: add it there"
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    msg = (f"{name} not found: install the Debian package {package} "
           f"(bash scripts/install-test-deps.sh does, as root)")
    if REQUIRE_SYSTEM_TOOLS:
        pytest.fail(msg + "; RAPIDO_TEST_REQUIRE_SYSTEM_TOOLS=1 requires it")
    pytest.skip(msg)

NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are built once per test run (as a node does on first use)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
async def make_node(tmp_path: Path, model_dir: Path) -> AsyncIterator[NodeFactory]:
    """Start real nodes on 127.0.0.1 with a free port; all are stopped after the test.
    They run the real lip-sync model (rapido-lite) unless a test says otherwise.
    ``locate`` makes a node relay sessions elsewhere (``rapido.http.proxy``)."""
    nodes: list[Node] = []

    async def factory(*, locate: Locate | None = None, **overrides: Any) -> Node:
        base = Config(port=0, recordings_dir=str(tmp_path / "rec"), log_level="warning",
                      model_dir=str(model_dir), avatars_dir=str(tmp_path / "avatars"))
        node = Node(dataclasses.replace(base, **overrides), locate=locate)
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in reversed(nodes):
        await node.stop()


@pytest.fixture
async def node(make_node: NodeFactory) -> Node:
    return await make_node()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create_session(http: aiohttp.ClientSession, node: Node, lesson: str,
                         headers: dict[str, str] | None = None, **fields: Any
                         ) -> dict[str, Any]:
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": lesson, **fields},
                         headers=headers) as r:
        assert r.status in (200, 201), await r.text()
        body: dict[str, Any] = await r.json()
        return body


def speech(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    return speech_like(seconds, rate=rate, seed=seed)


def stretched_total(js: JitterStats) -> int:
    """The samples a jitter buffer must have played when it lost none: what it received,
    less what time-stretching removed, plus what it inserted (stretching is on by
    default and acts whenever the buffer runs off its target)."""
    return (js.received_samples - js.removed_samples_for_acceleration
            + js.inserted_samples_for_deceleration)


async def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail saying ``what`` after ``timeout_s``. For "the
    stream goes on" checks: a fixed sleep then a count fails when a slow spell of the
    machine lands at the sleep's end, before the node's clock has caught up."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
        await asyncio.sleep(0.02)
