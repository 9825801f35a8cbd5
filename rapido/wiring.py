"""Builds a node's parts from the one :class:`Config`. Only the builders (the CLI,
``node.py``, the bench) and this module read the Config; every component takes its own
typed settings (the jitter buffer's, the engine's, the model's, each sink's) and is
handed ready-made collaborators. This module maps the one to the other and wires the
parts together, for the node and for the bench alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from rapido.cluster.health import (
    ERROR_REASONS,
    Health,
    HealthWindow,
    NodeFigures,
    scale_signals,
)
from rapido.cluster.placement import Affinity
from rapido.cluster.release import Release, ReleaseSettings
from rapido.cluster.service import Cluster, ClusterSettings, LocalState
from rapido.config import Config, ConfigError
from rapido.engine import (
    Engine,
    EngineSettings,
    FrameHook,
    RenderLoader,
    RenderSetup,
    SessionHook,
)
from rapido.gpu.memory import device_memory
from rapido.gpu.portrait import default_avatar
from rapido.gpu.registry import (
    BatchSettings,
    ModelOpener,
    ModelSettings,
    open_model,
    open_renderer,
)
from rapido.http.routing import Router, RouterSettings
from rapido.http.settings import HttpSettings
from rapido.livekit.publisher import LiveKitPublisher, LiveKitSettings
from rapido.livekit.regions import Region, parse_regions
from rapido.metrics import Metrics
from rapido.pipeline.avatar import Avatar, load_avatar_dir
from rapido.pipeline.provider import SinkFactory, SinkProvider
from rapido.pipeline.render import FrameRenderer, IdleRenderer
from rapido.pipeline.session import SessionSpec, StreamSession
from rapido.pipeline.sinks.null import NullSink
from rapido.pipeline.sinks.pool import EncoderPool
from rapido.pipeline.sinks.recorder import RecorderSink
from rapido.webrtc import WebRtcSink
from rapido.webrtc.ice import parse_ice_urls

log = logging.getLogger(__name__)


def engine_settings(config: Config) -> EngineSettings:
    return EngineSettings(
        fps=config.fps, max_streams=config.max_streams,
        max_queued_audio_s=config.max_queued_audio_s,
        session_idle_timeout_s=config.session_idle_timeout_s, jitter=config.jitter(),
        node_id=config.node_id, cores=_cores())


def http_settings(config: Config) -> HttpSettings:
    return HttpSettings(
        api_key=config.api_key, public_url=config.public_url,
        max_body_bytes=config.max_body_bytes,
        max_ws_message_bytes=config.max_ws_message_bytes,
        max_concurrent_uploads=config.max_concurrent_uploads, default_sink=config.default_sink,
        webrtc_token_ttl_s=config.webrtc_token_ttl_s, ws_token_ttl_s=config.ws_token_ttl_s,
        http_read_timeout_s=config.http_read_timeout_s, demo_grace_s=config.demo_grace_s,
        cluster_redirect=config.cluster_redirect,
        region=config.region, node_version=config.node_version,
        health_drills=config.health_drills, width=config.width, height=config.height,
        fps=config.fps)


def model_settings(config: Config) -> ModelSettings:
    return ModelSettings(
        model=config.model, model_dir=Path(config.model_dir) if config.model_dir else None,
        backend=config.backend, device=config.device, dtype=config.dtype,
        intra_op_threads=config.intra_op_threads,
        trt_cache_dir=Path(config.trt_cache_dir) if config.trt_cache_dir else None)


def batch_settings(config: Config) -> BatchSettings:
    return BatchSettings(max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                         batch_workers=config.batch_workers,
                         frame_budget_ms=config.frame_budget_ms)


def load_regions(config: Config) -> list[Region]:
    """The LiveKit regions: from ``livekit_regions_file``, else one from ``livekit_url``."""
    if config.livekit_regions_file:
        path = Path(config.livekit_regions_file)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"livekit_regions_file: cannot read {str(path)!r}: {exc}") from None
        try:
            return parse_regions(data.get("regions"))
        except ValueError as exc:
            raise ConfigError(f"livekit_regions_file: {exc}") from None
    if config.livekit_url:
        return [Region(name=config.region, url=config.livekit_url, capacity=10**6)]
    return []


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def sink_providers(config: Config, metrics: Metrics, *,
                   regions: list[Region] | None = None) -> dict[str, SinkProvider]:
    """The sinks a node offers, by the names sessions ask for."""
    cfg = config
    threads = cfg.encoder_threads or _cores()
    # Every encoding sink's work runs on a few shared threads (see sinks/pool.py).
    # Recorders get their own: they write to disk, and a stalled disk must not hold up
    # the live streams' encoders.
    encoders = EncoderPool(threads)
    recorders = EncoderPool(threads, name="rapido-record")
    ice_servers = parse_ice_urls(cfg.webrtc_ice_servers)  # checked by Config already

    def record(spec: SessionSpec, sid: str) -> RecorderSink:
        path = Path(cfg.recordings_dir) / f"{spec.lesson_id}_{sid}.mp4"
        # One thread per encode: the pool's threads are the parallelism, across streams
        # rather than inside one.
        return RecorderSink(path, width=cfg.width, height=cfg.height, fps=cfg.fps,
                            preset=cfg.record_preset, crf=cfg.record_crf, threads=1,
                            pool=recorders)

    def webrtc(spec: SessionSpec, sid: str) -> WebRtcSink:
        return WebRtcSink(width=cfg.width, height=cfg.height, fps=cfg.fps,
                          video_bitrate=cfg.webrtc_video_bitrate,
                          min_bitrate=cfg.webrtc_min_bitrate, min_fps=cfg.min_fps,
                          warm=cfg.webrtc_warm_encoders, pool=encoders,
                          warm_codec=f"video/{cfg.webrtc_warm_codec}",
                          x264_preset=cfg.webrtc_x264_preset,
                          threads=cfg.webrtc_encoder_threads,
                          max_viewers=cfg.webrtc_max_viewers,
                          connect_timeout_s=cfg.whep_connect_timeout_s,
                          ice_servers=ice_servers, turn_username=cfg.webrtc_turn_username,
                          turn_password=cfg.webrtc_turn_password,
                          on_connect_timeout=metrics.whep_connect_timeouts.inc)

    errors = metrics.session_errors.labels("livekit_degraded")
    livekit = LiveKitPublisher(
        LiveKitSettings(
            api_key=cfg.livekit_api_key, api_secret=cfg.livekit_api_secret,
            token_ttl_s=cfg.livekit_token_ttl_s, width=cfg.width, height=cfg.height,
            fps=cfg.fps, queue_size_ms=cfg.livekit_queue_size_ms,
            video_codec=cfg.livekit_video_codec, max_bitrate=cfg.livekit_max_bitrate,
            min_bitrate=cfg.livekit_min_bitrate, simulcast=cfg.livekit_simulcast,
            min_fps=cfg.min_fps, max_queued_audio_s=cfg.max_queued_audio_s),
        load_regions(cfg) if regions is None else regions,
        on_connect=metrics.livekit_connection.observe, on_degraded=errors.inc)
    return {
        "null": SinkFactory(lambda spec, sid: NullSink()),
        # Last to close: sinks whose close is still running elsewhere (a DELETE) finish
        # their lanes inside the pool's close, which runs what is left before it returns.
        "record": SinkFactory(record, close=lambda: asyncio.to_thread(recorders.close)),
        "webrtc": SinkFactory(webrtc, close=lambda: asyncio.to_thread(encoders.close)),
        "livekit": livekit,
    }


def render_loader(config: Config, metrics: Metrics,
                  opener: ModelOpener = open_model) -> RenderLoader:
    """Draws the default avatar, loads imported ones and opens the model (``opener``:
    the bench may pass its free stand-in), off the loop, before the node says it is
    ready."""
    cfg = config

    async def load(on_quality: Callable[[float], None]) -> RenderSetup:
        loop = asyncio.get_running_loop()
        avatars: dict[str, Avatar] = {"default": await loop.run_in_executor(
            None, default_avatar, cfg.width, cfg.height, cfg.fps)}
        avatars.update(await loop.run_in_executor(
            None, load_avatar_dir, Path(cfg.avatars_dir)))
        chosen: FrameRenderer
        if cfg.model == "none":
            chosen = IdleRenderer()
        else:
            # Building a model (first use) and opening a session take seconds.
            chosen = await loop.run_in_executor(
                None, lambda: open_renderer(model_settings(cfg), batch_settings(cfg),
                                            metrics=metrics.batcher, on_quality=on_quality,
                                            opener=opener))
        # Per-avatar precomputation takes a moment: ready before /ready says yes.
        for avatar in avatars.values():
            await loop.run_in_executor(None, chosen.prepare, avatar)
        return RenderSetup(chosen, avatars)

    return load


def build_engine(config: Config, metrics: Metrics, *, on_frame: FrameHook | None = None,
                 on_session: SessionHook | None = None,
                 opener: ModelOpener = open_model) -> Engine:
    return Engine(engine_settings(config), metrics, sinks=sink_providers(config, metrics),
                  load=render_loader(config, metrics, opener), on_frame=on_frame,
                  on_session=on_session)


def cluster_settings(config: Config) -> ClusterSettings:
    return ClusterSettings(
        join=config.join_addresses(), bind=config.cluster_bind, rpc_port=config.rpc_port(),
        keyring_file=Path(config.cluster_key_file) if config.cluster_key_file else None,
        region=config.region, location=config.location(), version=config.node_version,
        capacity=config.max_streams, profile=config.cluster_profile,
        reconnect_interval_s=config.cluster_reconnect_s,
        serf_rpc=config.serf_rpc, serf_rpc_auth=config.serf_rpc_auth())


class NodeHealth:
    """This node's health over the last five minutes (:class:`HealthWindow`), fed by
    the engine's closed sessions and read from its metrics; and its memory in use."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        bounds, counts = metrics.frame_latency_counts()
        self.window = HealthWindow(bounds)
        # The baseline: what the window's first figures are counted from.
        self.window.sample(time.monotonic(), counts, metrics.gpu_memory_errors())

    def on_session(self, session: StreamSession, created: bool) -> None:
        if not created:
            self.window.session_ended(time.monotonic(), session.close_reason in ERROR_REASONS,
                                      session.jb.stats.underruns)

    def figures(self) -> Health:
        now = time.monotonic()
        _, counts = self.metrics.frame_latency_counts()
        self.window.sample(now, counts, self.metrics.gpu_memory_errors())
        return self.window.figures(now)

    def gpu_memory(self) -> float | None:
        used = device_memory()
        if used is None:
            return None
        self.metrics.gpu_memory_used.set(used[0])
        return used[0] / used[1] if used[1] else None


def host_memory() -> float | None:
    """The share of this host's memory in use (MemAvailable counted free), or None where
    /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in fh)
                    if v.strip()}
        total, available = info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None
    return (total - available) / total if total > 0 else None


def build_cluster(config: Config, engine: Engine, metrics: Metrics,
                  health: NodeHealth, epoch: Callable[[], int]) -> Cluster | None:
    """The node's cluster service; None for a single node (no ``join`` and no
    ``serf_rpc``: no agent). ``epoch()``: the rollout state's epoch this node holds."""
    if not config.clustered:
        return None

    def local() -> LocalState:
        return LocalState(free_slots=config.max_streams - len(engine.sessions),
                          load=engine.load, draining=engine.draining,
                          streams=len(engine.sessions), memory=host_memory(),
                          gpu_memory=health.gpu_memory(), health=health.figures(),
                          rollout_epoch=epoch())

    return Cluster(cluster_settings(config), local, on_bad_tags=metrics.cluster_bad_tags.inc,
                   on_restart=metrics.cluster_agent_restarts.inc)


def build_release(config: Config, cluster: Cluster, metrics: Metrics,
                  health: NodeHealth) -> Release:
    return Release(ReleaseSettings(version=config.node_version), cluster, health.figures,
                   on_rollback=metrics.rollout_rollbacks.inc,
                   on_percent=metrics.rollout_percent.set)


def publish_scale_signals(cluster: Cluster, metrics: Metrics) -> Callable[[], None]:
    """A view listener that sets the cluster gauges from the members' tags (this node's
    from its own figures, fresher than its gossiped ones)."""

    def publish() -> None:
        own = cluster.local_tags()
        nodes = [NodeFigures(status=p.view.status, capacity=p.view.capacity,
                             streams=p.streams, cpu=p.view.load, memory=p.memory,
                             gpu_memory=p.gpu_memory)
                 for p in cluster.view() if p.view.node_id != own.node_id]
        nodes.append(NodeFigures(status="alive", capacity=own.capacity, streams=own.streams,
                                 cpu=own.load, memory=own.memory, gpu_memory=own.gpu_memory))
        signals = scale_signals(nodes)
        metrics.cluster_members.clear()
        for state, n in signals.members.items():
            metrics.cluster_members.labels(state).set(n)
        metrics.cluster_capacity.set(signals.capacity)
        metrics.cluster_streams.set(signals.streams)
        metrics.cluster_cpu.set(signals.cpu)
        metrics.cluster_memory.set(signals.memory)
        metrics.cluster_gpu_memory.set(signals.gpu_memory)
        metrics.cluster_recommended_nodes.set(signals.recommended_nodes)

    return publish


def remember_lessons(affinity: Affinity) -> SessionHook:
    """The engine's session hook that keeps a clustered node's affinity records."""

    def hook(session: StreamSession, created: bool) -> None:
        now = time.monotonic()
        if created:
            affinity.remember(session.lesson_id, now)
        else:
            affinity.ended(session.lesson_id, now)

    return hook


def build_router(config: Config, engine: Engine, cluster: Cluster,
                 affinity: Affinity, release: Release | None = None) -> Router:
    return Router(RouterSettings(api_key=config.api_key, epsilon=config.placement_epsilon,
                                 query_timeout_s=1.0, reclaim_s=600.0),
                  engine, cluster, affinity, release)
