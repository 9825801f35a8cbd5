"""One typed Config: defaults <- TOML file <- ``RAPIDO_*`` environment <- command-line flags.

Every field is also an environment variable (``RAPIDO_`` + the upper-cased name) and a
flag (``--`` + the name with dashes). A bad value raises :class:`ConfigError` naming the
key and what is allowed; the CLI turns that into one line and exit code 2.

Why one module over 500 lines: it is the one place every setting is declared, with its
default, help, bounds and cross-field checks; each setting is a few lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rapido import __version__
from rapido.cluster.agent import SerfAgentConfigError, parse_host_port, read_keyring
from rapido.cluster.external import check_rpc_addr, read_rpc_auth
from rapido.cluster.placement import NODE_ID
from rapido.livekit.limits import validate_queue_size_ms
from rapido.pipeline.jitter import JitterConfig
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.sinks import SINK_NAMES as SINKS
from rapido.webrtc.ice import is_turn, parse_ice_urls

ENV_PREFIX = "RAPIDO_"
#: The shortest API key a node listening beyond loopback accepts.
MIN_API_KEY_LEN = 16
BUILTIN_MODELS = ("rapido-lite", "wav2lip-96", "none")


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the key."""


def _opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return field(default=default, metadata=meta)


#: The jitter buffer's own defaults: its settings are the one place they are written.
_JB: dict[str, Any] = {f.name: f.default for f in fields(JitterConfig)}


@dataclass(frozen=True)
class Config:
    # -- network ------------------------------------------------------------------
    host: str = _opt("127.0.0.1", "address to listen on (non-loopback needs api_key)")
    port: int = _opt(8080, "HTTP port (0 picks a free one)", lo=0, hi=65535)
    public_url: str = _opt("", "URL clients use to reach this node (default: from host:port)")
    api_key: str = _opt("", "bearer key for /api and /ws; empty = loopback only", secret=True)
    node_id: str = _opt("", "this node's id (default: hostname-port)")
    region: str = _opt("local", "region this node serves, reported in session JSON")
    # -- cluster (empty join: a single node, no Serf agent) -------------------------
    join: str = _opt("", "comma-separated HOST:PORT gossip addresses of other nodes to join "
                     "(IP literals, IPv6 in brackets); empty = a single node, no Serf agent")
    cluster_bind: str = _opt("127.0.0.1:7946", "HOST:PORT this node's Serf agent gossips "
                             "on (TCP and UDP)")
    cluster_key_file: str = _opt("", "Serf keyring file (a JSON list of base64 keys, the "
                                 "first encrypts); required with join")
    cluster_rpc_port: int = _opt(0, "port of the Serf agent's RPC on 127.0.0.1 (0 = the "
                                 "cluster_bind port + 1)", lo=0, hi=65535)
    cluster_profile: str = _opt("lan", "Serf's timings: lan (one region: failures seen in "
                                "~6 s) or wan (a pool across regions: slower to declare a "
                                "node failed, tolerant of 100+ ms round trips)",
                                choices=("lan", "wan"))
    cluster_reconnect_s: float = _opt(30.0, "how often the Serf agent tries to reach a "
                                      "failed member again (Serf's reconnect_interval): a "
                                      "healed partition rejoins within about twice this",
                                      lo=0.1, hi=3600)
    cluster_url: str = _opt("", "URL the other nodes reach this node's HTTP at (e.g. "
                            "http://10.0.0.5:8080); default: public_url, else host:port")
    serf_rpc: str = _opt("", "HOST:PORT (loopback) of the RPC of a Serf agent you run "
                         "(e.g. rapido-serf@.service) for the node to use instead of "
                         "starting its own; empty = the node starts its own with join")
    serf_rpc_auth_file: str = _opt("", "file holding that agent's RPC auth token (or the "
                                   "agent's JSON config file with its rpc_auth)")
    node_location: str = _opt("", "this node's location, 'lat,lon' in degrees (empty: none)")
    cluster_redirect: bool = _opt(False, "answer REST and WHEP requests for a session on "
                                  "another node with a 307 to that node instead of proxying "
                                  "them (WebSockets are always proxied)")
    node_version: str = _opt(__version__, "the version this node announces to the cluster")
    health_drills: bool = _opt(False, "allow POST /api/admin/health/drill: made-up health "
                               "figures (errors, underruns, late frames, GPU memory errors) "
                               "added to this node's window, to rehearse an automatic "
                               "rollback; never on in production")
    placement_epsilon: float = _opt(0.25, "bounded loads: a node above (1 + this) x the "
                                    "mean load passes a new lesson to its next choice",
                                    lo=0.0, hi=100.0)
    log_level: str = _opt("info", "logging level",
                          choices=("debug", "info", "warning", "error"))
    gc_freeze: bool = _opt(True, "once warm, move the start-up heap out of the garbage "
                           "collector's way (gc.freeze): a full collection then takes "
                           "well under a millisecond instead of stalling every stream "
                           "~100 ms")
    # -- capacity and limits ----------------------------------------------------
    max_streams: int = _opt(64, "concurrent sessions this node admits", lo=1, hi=100_000)
    max_body_bytes: int = _opt(16 * 1024 * 1024, "largest HTTP request body",
                               lo=1024, hi=1 << 30)
    max_ws_message_bytes: int = _opt(256 * 1024, "largest WebSocket message",
                                     lo=1024, hi=64 * 1024 * 1024)
    max_queued_audio_s: float = _opt(120.0, "speech a session may hold queued (HTTP uploads)",
                                     lo=1, hi=3600)
    max_concurrent_uploads: int = _opt(4, "audio uploads the node reads and checks at once "
                                       "(429 too_many_uploads above)", lo=1, hi=1024)
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, how long running sessions may finish",
                                  lo=0, hi=3600)
    session_idle_timeout_s: float = _opt(300.0, "close sessions with no audio and no listener "
                                         "(WebSocket, WHEP viewer, LiveKit subscriber) this "
                                         "long (0 = never)", lo=0, hi=86400)
    http_read_timeout_s: float = _opt(30.0, "a request's headers, and then its body, must "
                                      "arrive within this long (slower clients are cut off)",
                                      lo=0.5, hi=3600)
    ws_token_ttl_s: float = _opt(300.0, "lifetime of a session's WebSocket token (ws_token: "
                                 "what a browser connects with; checked at connect)",
                                 lo=10, hi=86400)
    demo_grace_s: float = _opt(10.0, "a demo session (POST /api/demo) ends this long after "
                               "its script has played out", lo=0, hi=30)
    # -- media --------------------------------------------------------------------
    width: int = _opt(854, "video width", lo=64, hi=3840)
    height: int = _opt(480, "video height", lo=64, hi=2160)
    fps: int = _opt(25, "video frame rate (must divide 48000)", lo=1, hi=60)
    default_sink: str = _opt("null", "sink for sessions that name none", choices=SINKS)
    recordings_dir: str = _opt("recordings", "where the record sink writes MP4 files")
    record_crf: int = _opt(23, "libx264 quality of the record sink (0 = lossless)", lo=0, hi=51)
    record_preset: str = _opt("ultrafast", "libx264 preset of the record sink",
                              choices=("ultrafast", "superfast", "veryfast", "faster",
                                       "fast", "medium"))
    livekit_url: str = _opt("", "LiveKit server URL (ws:// or wss://), a one-region shortcut")
    livekit_regions_file: str = _opt("", "TOML file with [[regions]] {name, url, capacity, "
                                     "priority, location} for LiveKit region selection")
    livekit_api_key: str = _opt("", "LiveKit API key (tokens are minted by the node)")
    livekit_api_secret: str = _opt("", "LiveKit API secret", secret=True)
    livekit_video_codec: str = _opt("h264", "codec published to LiveKit", choices=("h264", "vp8"))
    livekit_max_bitrate: int = _opt(1_500_000, "LiveKit video max bitrate (bits/s)",
                                    lo=100_000, hi=20_000_000)
    livekit_min_bitrate: int = _opt(150_000, "the LiveKit video bitrate (libwebrtc's own "
                                    "estimate, read from its stats) that scores as the lowest "
                                    "quality", lo=30_000, hi=20_000_000)
    livekit_simulcast: bool = _opt(False, "publish simulcast layers to LiveKit")
    livekit_queue_size_ms: int = _opt(100, "LiveKit AudioSource queue (a multiple of 10 ms)",
                                      lo=10, hi=5000)
    livekit_token_ttl_s: float = _opt(3600.0, "lifetime of LiveKit tokens the node mints",
                                      lo=60, hi=86400)
    webrtc_video_bitrate: int = _opt(1_000_000, "bits/s of each webrtc sink video encoder",
                                     lo=50_000, hi=20_000_000)
    webrtc_x264_preset: str = _opt("veryfast", "libx264 preset of the webrtc sink's H.264",
                                   choices=("ultrafast", "superfast", "veryfast", "faster",
                                            "fast", "medium"))
    webrtc_encoder_threads: int = _opt(1, "threads per webrtc video encoder (0 = codec "
                                       "default)", lo=0, hi=64)
    webrtc_min_bitrate: int = _opt(150_000, "adaptive quality: lowest bits/s a webrtc video "
                                   "encoder drops to on a lossy connection", lo=50_000,
                                   hi=20_000_000)
    min_fps: float = _opt(12.5, "adaptive quality: lowest frame rate a publisher (webrtc or "
                          "LiveKit) sheds to while the node is overloaded (= fps: never)",
                          lo=1, hi=60)
    webrtc_warm_codec: str = _opt("h264", "the video codec webrtc_warm_encoders keeps running",
                                  choices=("h264", "vp8"))
    webrtc_warm_encoders: bool = _opt(False, "keep a video (webrtc_warm_codec) and an Opus "
                                      "encoder running per "
                                      "webrtc stream even with no viewer")
    encoder_threads: int = _opt(0, "threads shared by the webrtc sinks' encoders, and as many "
                                "for the record sinks'; 0 = one per core", lo=0, hi=256)
    webrtc_token_ttl_s: float = _opt(3600.0, "lifetime of a session's WHEP viewer token",
                                     lo=10, hi=7 * 86400)
    webrtc_max_viewers: int = _opt(100, "WHEP viewers per webrtc session (503 above)",
                                   lo=1, hi=10_000)
    whep_connect_timeout_s: float = _opt(20.0, "a WHEP viewer not connected this long after "
                                         "its offer is closed and its slot freed",
                                         lo=1, hi=600)
    webrtc_ice_servers: str = _opt("", "comma-separated stun:/turn:/turns: URLs for WHEP "
                                   "viewers' ICE (one STUN, one TURN); empty = host "
                                   "candidates only, no STUN lookup")
    webrtc_turn_username: str = _opt("", "username for the TURN server in webrtc_ice_servers")
    webrtc_turn_password: str = _opt("", "password for the TURN server in webrtc_ice_servers",
                                     secret=True)
    # -- model --------------------------------------------------------------------------
    model: str = _opt("rapido-lite", "lip-sync model: rapido-lite, wav2lip-96, a manifest "
                      "file (.json), or none (idle frames only)")
    backend: str = _opt("auto", "model backend", choices=("auto", "onnx", "torch"))
    device: str = _opt("auto", "model device", choices=("auto", "cpu", "cuda"))
    dtype: str = _opt("auto", "torch backend precision on CUDA",
                      choices=("auto", "float32", "float16", "bfloat16"))
    max_batch: int = _opt(8, "largest model batch", lo=1, hi=256)
    max_wait_ms: float = _opt(30.0, "longest a frame waits for its batch to fill", lo=0, hi=1000)
    batch_workers: int = _opt(1, "model batches running at once, each in its own thread "
                              "(ONNX backends; torch always runs one)", lo=1, hi=16)
    frame_budget_ms: float = _opt(120.0, "a speaking frame not rendered this long after its "
                                  "tick is shown idle (a deadline miss)", lo=10, hi=5000)
    intra_op_threads: int = _opt(0, "ONNX Runtime CPU threads (0 = its default)", lo=0, hi=256)
    model_dir: str = _opt("", "where built-in models are built and cached "
                          "(default: $XDG_CACHE_HOME/rapido/models)")
    trt_cache_dir: str = _opt("", "TensorRT engine cache (default: under model_dir)")
    avatars_dir: str = _opt("avatars", "imported avatars (python -m rapido avatar import)")
    # -- jitter buffer (the plan's defaults, kept once: in JitterConfig) -------------
    jitter_target_ms: float = _opt(_JB["target_ms"], "initial jitter buffer target",
                                   lo=10, hi=5000)
    jitter_min_target_ms: float = _opt(_JB["min_target_ms"], "lowest adaptive target",
                                       lo=10, hi=5000)
    jitter_start_ms: float = _opt(_JB["start_ms"], "start playback at this level (at the "
                                  "initial target; scales with it)", lo=1, hi=5000)
    jitter_resume_ms: float = _opt(_JB["resume_ms"], "resume after an underrun at this level",
                                   lo=1, hi=5000)
    jitter_max_ms: float = _opt(_JB["max_ms"], "highest target; back-pressure above it",
                                lo=20, hi=10000)
    jitter_refill_pct: float = _opt(_JB["refill_pct"], "refill signal below this %% of target",
                                    lo=1, hi=99)
    jitter_quantile: float = _opt(_JB["quantile"], "quantile of relative arrival delay the "
                                  "adaptive target covers (NetEQ uses 0.95)", lo=0.5, hi=0.999)
    jitter_stall_timeout_ms: float = _opt(_JB["stall_timeout_ms"], "end an utterance whose "
                                          "audio stopped this long without an end",
                                          lo=100, hi=600000)
    jitter_stretch: bool = _opt(_JB["stretch"], "time-stretch speech by whole pitch periods "
                                "(NetEQ's accelerate / preemptive expand) to keep the buffer "
                                "near its target")
    jitter_stretch_rate_pct: float = _opt(_JB["stretch_rate_pct"], "sustained bound on "
                                          "time-stretching, %% of speech played",
                                          lo=0.1, hi=50)
    jitter_stretch_burst_pct: float = _opt(_JB["stretch_burst_pct"], "short-term bound on "
                                           "time-stretching, %% of speech played",
                                           lo=0.1, hi=50)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if _type_of(f) is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # 200 means 200.0
            _check_bounds(f, getattr(self, f.name))
        if AUDIO_RATE % self.fps:
            raise ConfigError(f"fps: {self.fps} is not allowed; it must divide {AUDIO_RATE} "
                              "(e.g. 20, 24, 25, 30, 40, 50, 60)")
        if self.min_fps > self.fps:
            raise ConfigError(f"min_fps: {self.min_fps} is above fps ({self.fps})")
        if self.webrtc_min_bitrate > self.webrtc_video_bitrate:
            raise ConfigError(f"webrtc_min_bitrate: {self.webrtc_min_bitrate} is above "
                              f"webrtc_video_bitrate ({self.webrtc_video_bitrate})")
        if self.livekit_min_bitrate > self.livekit_max_bitrate:
            raise ConfigError(f"livekit_min_bitrate: {self.livekit_min_bitrate} is above "
                              f"livekit_max_bitrate ({self.livekit_max_bitrate})")
        try:
            ice = parse_ice_urls(self.webrtc_ice_servers)
        except ValueError as exc:
            raise ConfigError(f"webrtc_ice_servers: {exc}") from None
        if any(map(is_turn, ice)) and not (self.webrtc_turn_username
                                           and self.webrtc_turn_password):
            raise ConfigError("webrtc_ice_servers: a TURN server needs webrtc_turn_username "
                              "and webrtc_turn_password")
        if self.width % 2 or self.height % 2:
            raise ConfigError("width/height: must be even (I420 video)")
        try:
            self.jitter()
        except ValueError as exc:
            raise ConfigError(f"jitter_*: {exc}") from None
        if self.model == "standin":
            raise ConfigError(
                "model: 'standin' is the bench's free-model stand-in (python -m rapido "
                f"bench --model standin); a server serves a real one: {', '.join(BUILTIN_MODELS)} "
                "or the path of a model manifest (.json)")
        if self.model not in BUILTIN_MODELS and not self.model.endswith(".json"):
            raise ConfigError(
                f"model: {self.model!r} is not allowed; use {', '.join(BUILTIN_MODELS)} "
                "or the path of a model manifest (.json)")
        try:
            validate_queue_size_ms(self.livekit_queue_size_ms)
        except ValueError as exc:
            raise ConfigError(f"livekit_queue_size_ms: {self.livekit_queue_size_ms} is not "
                              f"allowed: {exc}") from None
        if not self.api_key and not is_loopback(self.host):
            raise ConfigError(
                f"host: {self.host!r} is not a loopback address and no api_key is set; "
                "set RAPIDO_API_KEY (or --api-key) to listen beyond this machine"
            )
        if self.api_key and len(self.api_key) < MIN_API_KEY_LEN and not is_loopback(self.host):
            raise ConfigError(
                f"api_key: {len(self.api_key)} characters is too short to listen on "
                f"{self.host!r}; use at least {MIN_API_KEY_LEN} random characters (e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))')")

        self._check_cluster()

    def _check_cluster(self) -> None:
        joins = self.join_addresses()
        self._check_serf_rpc()
        try:
            for addr in joins:
                parse_host_port(addr, "join")
            parse_host_port(self.cluster_bind, "cluster_bind")
        except SerfAgentConfigError as exc:
            key = "join" if str(exc).startswith("join") else "cluster_bind"
            raise ConfigError(f"{key}: {str(exc).removeprefix(key).lstrip(' :')}") from None
        if self.join and not joins:
            raise ConfigError(f"join: {self.join!r} names no address")
        if self.cluster_rpc_port == 0 and self.rpc_port() > 65535:
            raise ConfigError("cluster_rpc_port: the cluster_bind port + 1 is over 65535; "
                              "set cluster_rpc_port")
        try:
            self.location()
        except ValueError as exc:
            raise ConfigError(f"node_location: {exc}") from None
        if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,32}", self.node_version):
            raise ConfigError(f"node_version: {self.node_version!r} is not allowed; "
                              "1-32 of A-Z a-z 0-9 _ . + -")
        if not self.clustered:
            return
        if not self.serf_rpc:  # (the operator's agent has its own keyring)
            if not self.cluster_key_file:
                raise ConfigError("cluster_key_file: required with join (the gossip is "
                                  "encrypted with its keys; create one with "
                                  "python -c 'import base64,os; print(base64.b64encode("
                                  "os.urandom(32)).decode())', as a JSON list)")
            try:
                read_keyring(Path(self.cluster_key_file))
            except SerfAgentConfigError as exc:
                raise ConfigError(f"cluster_key_file: {exc}") from None
        if self.cluster_url:
            parts = urlsplit(self.cluster_url)
            if (parts.scheme not in ("http", "https") or not parts.hostname
                    or parts.path.strip("/") or parts.query or parts.fragment
                    or parts.username or len(self.cluster_url) > 100):
                raise ConfigError(f"cluster_url: {self.cluster_url!r} is not an http(s) "
                                  "URL of a host (and port), at most 100 characters")
        if self.host in ("0.0.0.0", "::") and not (self.public_url or self.cluster_url):
            raise ConfigError(f"cluster_url: required in a cluster when host is {self.host!r} "
                              "(the URL the other nodes reach this one at)")
        if self.node_id and not (NODE_ID.fullmatch(self.node_id)
                                 and self.node_id[0].isalnum()):
            raise ConfigError(f"node_id: {self.node_id!r} is not allowed in a cluster; 1-64 "
                              "of A-Z a-z 0-9 _ . -, starting alphanumeric")
        if not NODE_ID.fullmatch(self.region):
            raise ConfigError(f"region: {self.region!r} is not allowed in a cluster; 1-64 "
                              "of A-Z a-z 0-9 _ . -")

    def _check_serf_rpc(self) -> None:
        if not self.serf_rpc:
            if self.serf_rpc_auth_file:
                raise ConfigError("serf_rpc_auth_file: only with serf_rpc (the agent the "
                                  "node starts itself gets a fresh token every time)")
            return
        try:
            check_rpc_addr(self.serf_rpc)
        except SerfAgentConfigError as exc:
            raise ConfigError(f"serf_rpc: {str(exc).removeprefix('serf_rpc').lstrip(' :')}"
                              ) from None
        # The agent's own settings are the operator's agent's: refuse ours rather than
        # silently ignore them.
        own = {"cluster_key_file": bool(self.cluster_key_file),
               "cluster_rpc_port": bool(self.cluster_rpc_port),
               "cluster_bind": self.cluster_bind != _FIELD_DEFAULTS["cluster_bind"],
               "cluster_reconnect_s":
                   self.cluster_reconnect_s != _FIELD_DEFAULTS["cluster_reconnect_s"]}
        for key, set_ in own.items():
            if set_:
                raise ConfigError(
                    f"{key}: not with serf_rpc: the node then uses the agent you run, "
                    "which has its own gossip address, RPC port and keyring (set them in "
                    f"its config file); unset {key}, or unset serf_rpc to have the node "
                    "start its own agent")
        if self.serf_rpc_auth_file:
            try:
                read_rpc_auth(Path(self.serf_rpc_auth_file))
            except SerfAgentConfigError as exc:
                raise ConfigError(f"serf_rpc_auth_file: {exc}") from None

    # -- derived ----------------------------------------------------------------------

    @property
    def clustered(self) -> bool:
        """A member of a cluster: it joins others, or uses an agent the operator runs."""
        return bool(self.join_addresses() or self.serf_rpc)

    def serf_rpc_auth(self) -> str | None:
        """The token in ``serf_rpc_auth_file`` (checked at load), or None."""
        if not self.serf_rpc_auth_file:
            return None
        try:
            return read_rpc_auth(Path(self.serf_rpc_auth_file))
        except SerfAgentConfigError as exc:  # gone since the load
            raise ConfigError(f"serf_rpc_auth_file: {exc}") from None

    def join_addresses(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.join.split(",") if a.strip())

    def rpc_port(self) -> int:
        """The Serf agent's RPC port: configured, or the gossip port + 1."""
        if self.cluster_rpc_port:
            return self.cluster_rpc_port
        return int(self.cluster_bind.rpartition(":")[2]) + 1

    def location(self) -> tuple[float, float] | None:
        """``node_location`` as (lat, lon); ValueError when it is not one."""
        if not self.node_location.strip():
            return None
        lat_s, sep, lon_s = self.node_location.partition(",")
        try:
            lat, lon = float(lat_s), float(lon_s)
        except ValueError:
            lat = lon = math.nan
        if not sep or not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise ValueError(f"{self.node_location!r} must be 'lat,lon' in degrees "
                             "(e.g. '52.37,4.90')")
        return (lat, lon)

    def jitter(self) -> JitterConfig:
        return JitterConfig(
            sample_rate=AUDIO_RATE,
            frame_samples=AUDIO_RATE // self.fps,
            target_ms=self.jitter_target_ms,
            min_target_ms=self.jitter_min_target_ms,
            start_ms=self.jitter_start_ms,
            resume_ms=self.jitter_resume_ms,
            max_ms=self.jitter_max_ms,
            refill_pct=self.jitter_refill_pct,
            stall_timeout_ms=self.jitter_stall_timeout_ms,
            quantile=self.jitter_quantile,
            stretch=self.jitter_stretch,
            stretch_rate_pct=self.jitter_stretch_rate_pct,
            stretch_burst_pct=self.jitter_stretch_burst_pct,
        )

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key)

    def redacted(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for f in fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "***"
        return out

    # -- loading ------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        *,
        toml_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """defaults <- TOML <- environment <- overrides (flags); later ones win."""
        values: dict[str, Any] = {}
        if toml_path is not None:
            values.update(_from_toml(Path(toml_path)))
        values.update(_from_env(os.environ if env is None else env))
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = _coerce(key, value)
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - keys are filtered above
            raise ConfigError(str(exc)) from None


_FIELDS = {f.name: f for f in fields(Config)}
_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Config)}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _type_of(f: dataclasses.Field[Any]) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def _coerce(key: str, raw: Any) -> Any:
    f = _FIELDS.get(key)
    if f is None:
        raise ConfigError(f"{key}: unknown setting; known: {', '.join(sorted(_FIELDS))}")
    typ = _type_of(f)
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
            if typ is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
        except ValueError:
            pass
        else:
            return text
    raise ConfigError(f"{key}: {raw!r} is not a valid {typ.__name__}")


def _check_bounds(f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    typ = _type_of(f)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{f.name}: {value!r} is not a valid {typ.__name__}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{f.name}: {value!r} is not allowed; choose one of {', '.join(choices)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None and not (lo <= value <= hi):
        raise ConfigError(f"{f.name}: {value!r} is out of range; allowed {lo}..{hi}")


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML: {exc}") from None
    # Allow both a flat file and one with a [rapido] table.
    table = data.get("rapido", data)
    if not isinstance(table, dict):
        raise ConfigError("config: [rapido] must be a table")
    return {key.replace("-", "_"): _coerce(key.replace("-", "_"), v) for key, v in table.items()}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            out[name] = _coerce(name, raw)
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; every flag defaults to None so unset flags don't override."""
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        shown = "" if f.metadata.get("secret") else f" (default {f.default!r})"
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{f.metadata['help']}{shown}; env {env}")


def flag_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(ns, name) for name in _FIELDS if getattr(ns, name, None) is not None}
