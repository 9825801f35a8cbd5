"""Every Prometheus metric of a node, in one place, on the node's own registry.

Names from the plan are kept as they are (``concurrent_streams_total`` is a gauge despite
its suffix: dashboards were drawn against that name). A registry per node, not the
global one, so several nodes can live in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0)
_GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5,
                       1.0)
_BATCH_RUN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12,
                      0.2, 0.5, 1.0)


class BatcherMetrics:
    """The batchers' Prometheus series on one registry, labelled by model name. Make one
    per registry and share it between batchers: a second one would clash on the names."""

    def __init__(self, registry: CollectorRegistry, *, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        r = registry
        self.batch_size = Histogram(
            "batch_size", "Requests per model batch", ["model"],
            buckets=tuple(float(i) for i in range(1, max_batch + 1)), registry=r)
        self.queue_wait = Histogram(
            "batch_queue_wait_seconds", "Time a request queued before its batch started",
            ["model"], buckets=_BATCH_WAIT_BUCKETS, registry=r)
        self.run = Histogram(
            "batch_run_seconds", "Model time of one batch, in the worker thread", ["model"],
            buckets=_BATCH_RUN_BUCKETS, registry=r)
        self.deadline_misses = Counter(
            "batch_deadline_misses", "Requests whose deadline passed while queued", ["model"],
            registry=r)  # exported as batch_deadline_misses_total
        self.failures = Counter(
            "batch_failures", "Batches that raised or returned the wrong number of results",
            ["model"], registry=r)
        self.memory_errors = Counter(
            "gpu_memory_errors", "Batches that failed because the device ran out of memory "
            "(CUDA/ROCm/ONNX Runtime allocation failures); any one rolls a rollout back",
            ["model"], registry=r)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        # -- the plan's names -----------------------------------------------------------
        self.concurrent_streams = Gauge(
            "concurrent_streams_total", "Live avatar streams on this node", registry=r)
        self.speaking_streams = Gauge(
            "speaking_streams", "Streams playing speech right now", registry=r)
        self.gpu_utilization = Gauge(
            "gpu_utilization_percent", "GPU utilisation (0 on a CPU-only node)", registry=r)
        self.gpu_memory_used = Gauge(
            "gpu_memory_used_bytes", "GPU memory in use (0 on a CPU-only node)", registry=r)
        self.underruns = Counter(
            "audio_buffer_underruns", "Playout needed speech mid-utterance and had none",
            registry=r)  # exported as audio_buffer_underruns_total
        self.frame_latency = Histogram(
            "frame_processing_latency_seconds",
            "How late a frame left for its sink, against its place on the stream's clock",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.livekit_connection = Histogram(
            "livekit_connection_seconds", "Time to connect to a LiveKit room", registry=r)
        self.video_quality = Gauge(
            "video_quality_score",
            "1.0 = full quality; lower while the node degrades on purpose", registry=r)
        self.video_quality.set(1.0)
        # -- pipeline ------------------------------------------------------------------
        self.frames = Counter("frames", "Video frames sent to sinks", ["kind"], registry=r)
        self.late_frames = Counter(
            "late_frames", "Frames more than one frame interval late", registry=r)
        self.audio_in = Counter(
            "audio_received_seconds", "Speech received, after resampling", registry=r)
        self.concealed = Counter(
            "audio_concealed_seconds", "Silence inserted during underruns", registry=r)
        # Time-stretching (jitter_stretch), as WebRTC counts it.
        self.accelerated = Counter(
            "audio_removed_for_acceleration_seconds",
            "Speech removed by the jitter buffer's accelerate (whole pitch periods)",
            registry=r)
        self.decelerated = Counter(
            "audio_inserted_for_deceleration_seconds",
            "Speech inserted by the jitter buffer's preemptive expand (whole pitch periods)",
            registry=r)
        self.utterances = Counter(
            "utterances", "Utterances finished", ["outcome"], registry=r)
        self.sessions_created = Counter(
            "sessions_created", "Sessions created", registry=r)
        self.sessions_closed = Counter(
            "sessions_closed", "Sessions ended, by why (the close reason clients get)",
            ["reason"], registry=r)
        self.sessions_rejected = Counter(
            "sessions_rejected", "Session creates refused", ["reason"], registry=r)
        self.session_errors = Counter(
            "session_errors", "Faults that ended or degraded a session", ["kind"], registry=r)
        self.clock_tick = Histogram(
            "clock_tick_seconds", "CPU time of one clock tick over all streams",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.gc_pause = Histogram(
            "gc_pause_seconds", "How long each collection of Python's cyclic garbage "
            "collector stopped the process (every stream's clock and the model worker)",
            ["generation"], buckets=_GC_BUCKETS, registry=r)
        self.bad_input = Counter(
            "bad_input", "Rejected inputs from outside", ["where", "code"], registry=r)
        self.batcher = BatcherMetrics(r)
        # -- HTTP ------------------------------------------------------------------------
        self.http_requests = Counter(
            "http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request duration", ["route", "method"],
            buckets=_HTTP_BUCKETS, registry=r)
        self.ws_connections = Gauge(
            "websocket_connections", "Open WebSocket connections", registry=r)
        # -- cluster: sessions on other nodes -------------------------------------------
        self.proxy_requests = Counter(
            "proxy_requests", "Requests for a session on another node, once each, by how "
            "this node answered (kind: http, ws, redirect) and how it ended (outcome: ok, "
            "unreachable, lost, loop)", ["kind", "outcome"], registry=r)
        self.proxy_first_byte = Histogram(
            "proxy_first_byte_seconds", "From forwarding a request to the session's node "
            "to its response headers (http) or its accepted upgrade (ws): the time the hop "
            "adds before the first byte", ["kind"], buckets=_HTTP_BUCKETS, registry=r)
        self.proxy_websockets = Gauge(
            "proxy_websockets", "Open WebSockets this node relays to their session's node",
            registry=r)
        # -- sinks -----------------------------------------------------------------------
        # Read at scrape time from the sessions (the webrtc layer sets its function).
        self.webrtc_encoders = Gauge(
            "webrtc_encoders", "Encoders running in webrtc sinks (one per codec per stream, "
            "however many viewers)", registry=r)
        self.whep_connect_timeouts = Counter(
            "whep_connect_timeouts", "WHEP viewers closed for not connecting within "
            "whep_connect_timeout_s (their slots freed)", registry=r)
        self.cluster_bad_tags = Counter(
            "cluster_bad_tags", "Cluster members left out of this node's view because "
            "their Serf tags could not be read (counted on every read of the members)",
            registry=r)
        # -- cluster: the rollout and the scale signals (the same on every node) ------
        self.rollout_rollbacks = Counter(
            "rollout_rollbacks", "Rollouts this node rolled back (each once, whichever node "
            "decided)", registry=r)
        self.rollout_percent = Gauge(
            "rollout_percent", "Share of users whose new sessions go to the rollout's "
            "version (0: no rollout running)", registry=r)
        self.cluster_members = Gauge(
            "cluster_members", "Members of the cluster by Serf status", ["state"], registry=r)
        self.cluster_capacity = Gauge(
            "cluster_capacity_streams", "Streams the alive members can hold", registry=r)
        self.cluster_streams = Gauge(
            "cluster_streams", "Streams on the alive members", registry=r)
        self.cluster_cpu = Gauge(
            "cluster_cpu_nodes", "CPU in use over the alive members, in nodes' worth "
            "(each node's load is a share of its own cores)", registry=r)
        self.cluster_memory = Gauge(
            "cluster_memory_nodes", "Host memory in use over the alive members, in nodes' "
            "worth", registry=r)
        self.cluster_gpu_memory = Gauge(
            "cluster_gpu_memory_nodes", "GPU memory in use over the alive members, in "
            "nodes' worth", registry=r)
        self.cluster_recommended_nodes = Gauge(
            "cluster_recommended_nodes", "Nodes the cluster should have: ceil(max(streams / "
            "(0.8 x capacity per node), cpu / 0.7, GPU memory / 0.8)), at least 1",
            registry=r)
        self.cluster_agent_restarts = Counter(
            "cluster_agent_restarts", "Restarts of this node's Serf agent after it exited "
            "or its RPC connection broke (each try counted)", registry=r)

    def frame_latency_counts(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The frame-latency histogram's bucket bounds (s, the last +Inf) and cumulative
        counts, read as a scrape would."""
        bounds: list[float] = []
        counts: list[int] = []
        for family in self.frame_latency.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bounds.append(float(sample.labels["le"]))
                    counts.append(int(sample.value))
        return tuple(bounds), tuple(counts)

    def gpu_memory_errors(self) -> int:
        """GPU memory errors so far, all models together."""
        return int(sum(s.value for family in self.batcher.memory_errors.collect()
                       for s in family.samples if s.name.endswith("_total")))

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's metrics less the ``*_created`` series, which double the exposition
    for no use on our dashboards. Filtered per node at scrape time: prometheus_client's
    own switch (``disable_created_metrics``) is process-wide."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            kept = [s for s in family.samples if s.name != created]
            if len(kept) != len(family.samples):
                family.samples = kept
            yield family
