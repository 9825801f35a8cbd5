"""Config: defaults <- TOML <- environment <- flags, and one clear line for a bad value."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from rapido.config import Config, ConfigError, add_flags, flag_overrides


def test_defaults_are_the_plans() -> None:
    c = Config()
    j = c.jitter()
    assert (c.width, c.height, c.fps) == (854, 480, 25)
    assert (j.target_ms, j.start_ms, j.resume_ms, j.max_ms, j.refill_pct) == (
        160.0, 96.0, 40.0, 240.0, 30.0)
    assert j.stretch  # the 96 ms start leans on it (BENCHMARKS.md)
    assert c.host == "127.0.0.1" and not c.auth_required


def test_layering(tmp_path: Path) -> None:
    toml = tmp_path / "rapido.toml"
    toml.write_text('[rapido]\nport = 9000\nmax_streams = 10\nregion = "eu"\n')
    env = {"RAPIDO_MAX_STREAMS": "20", "RAPIDO_REGION": "us"}
    c = Config.load(toml_path=toml, env=env, overrides={"region": "ap"})
    assert c.port == 9000  # from the file
    assert c.max_streams == 20  # env beats the file
    assert c.region == "ap"  # flags beat env
    flat = tmp_path / "flat.toml"
    flat.write_text("jitter-target-ms = 200\n")
    assert Config.load(toml_path=flat, env={}).jitter_target_ms == 200.0


@pytest.mark.parametrize(("source", "key", "fragment"), [
    ({"RAPIDO_PORT": "eighty"}, "port", "not a valid int"),
    ({"RAPIDO_PORT": "70000"}, "port", "0..65535"),
    ({"RAPIDO_LOG_LEVEL": "loud"}, "log_level", "debug, info"),
    ({"RAPIDO_FPS": "7"}, "fps", "divide 48000"),
    ({"RAPIDO_HOST": "0.0.0.0"}, "host", "api_key"),
    ({"RAPIDO_JITTER_MIN_TARGET_MS": "500"}, "jitter_", "min_target_ms"),
    ({"RAPIDO_WIDTH": "853"}, "width", "even"),
    ({"RAPIDO_LIVEKIT_QUEUE_SIZE_MS": "105"}, "livekit_queue_size_ms", "multiple of 10"),
    ({"RAPIDO_MODEL": "gpt"}, "model", "rapido-lite"),
    ({"RAPIDO_MODEL": "standin"}, "model", "the bench's free-model stand-in"),
    ({"RAPIDO_MIN_FPS": "30"}, "min_fps", "above fps"),
    ({"RAPIDO_MIN_FPS": "0"}, "min_fps", "1"),
    ({"RAPIDO_WEBRTC_MIN_BITRATE": "2000000"}, "webrtc_min_bitrate", "above"),
    ({"RAPIDO_LIVEKIT_MIN_BITRATE": "2000000"}, "livekit_min_bitrate", "above"),
    ({"RAPIDO_CLUSTER_REDIRECT": "maybe"}, "cluster_redirect", "not a valid bool"),
    ({"RAPIDO_CLUSTER_RECONNECT_S": "0"}, "cluster_reconnect_s", "0.1..3600"),
    ({"RAPIDO_CLUSTER_RECONNECT_S": "soon"}, "cluster_reconnect_s", "not a valid float"),
])
def test_bad_values_name_the_key(source: dict[str, str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env=source)
    assert str(info.value).startswith(key)
    assert fragment in str(info.value)


def test_cluster_redirect_is_a_flag_an_env_var_and_a_toml_key(tmp_path: Path) -> None:
    assert Config().cluster_redirect is False
    assert Config.load(env={"RAPIDO_CLUSTER_REDIRECT": "true"}).cluster_redirect is True
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = flag_overrides(parser.parse_args(["--cluster-redirect", "1"]))
    assert Config.load(env={}, overrides=flags).cluster_redirect is True
    toml = tmp_path / "rapido.toml"
    toml.write_text("cluster_redirect = true\n")
    assert Config.load(toml_path=toml, env={"RAPIDO_CLUSTER_REDIRECT": "off"}) \
        .cluster_redirect is False  # the environment beats the file


def test_non_loopback_with_key_is_allowed() -> None:
    c = Config.load(env={"RAPIDO_HOST": "0.0.0.0", "RAPIDO_API_KEY": "k" * 16})
    assert c.auth_required and c.redacted()["api_key"] == "***"


def test_short_api_key_is_refused_beyond_loopback() -> None:
    with pytest.raises(ConfigError, match=r"^api_key: 15 characters is too short"):
        Config.load(env={"RAPIDO_HOST": "0.0.0.0", "RAPIDO_API_KEY": "k" * 15})
    # On loopback a short key is the owner's business (tests, a laptop).
    assert Config.load(env={"RAPIDO_API_KEY": "k"}).auth_required


def test_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(toml_path=bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 3\n")
    with pytest.raises(ConfigError, match="prot: unknown setting"):
        Config.load(toml_path=unknown, env={})
    with pytest.raises(ConfigError, match="not found"):
        Config.load(toml_path=tmp_path / "missing.toml", env={})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapido", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_bad_value_exits_2_with_one_line() -> None:
    r = _cli("serve", "--port", "notaport")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "port" in lines[0] and "int" in lines[0]
    r = _cli("serve", "--host", "0.0.0.0")
    assert r.returncode == 2 and "RAPIDO_API_KEY" in r.stderr
    r = _cli("serve", "--host", "0.0.0.0", "--api-key", "short")
    assert r.returncode == 2 and "config error: api_key:" in r.stderr, r.stderr
    r = _cli("serve", "--model", "standin")  # the bench's, never served
    assert r.returncode == 2 and "config error: model: 'standin'" in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", [[], ["serve"], ["bench"]])
def test_cli_help(cmd: list[str]) -> None:
    r = _cli(*cmd, "--help")
    assert r.returncode == 0 and "usage: rapido" in r.stdout
    if cmd == ["serve"]:
        assert "--max-streams" in r.stdout and "RAPIDO_MAX_STREAMS" in r.stdout


def test_cluster_reconnect_s_reaches_the_serf_agent() -> None:
    from rapido.wiring import cluster_settings
    assert Config().cluster_reconnect_s == 30.0  # Serf's own reconnect_interval
    c = Config.load(env={"RAPIDO_CLUSTER_RECONNECT_S": "2.5"})
    assert c.cluster_reconnect_s == 2.5
    assert cluster_settings(c).reconnect_interval_s == 2.5
    with pytest.raises(ConfigError, match=r"^cluster_reconnect_s: not with serf_rpc"):
        Config.load(env={"RAPIDO_SERF_RPC": "127.0.0.1:7373",
                         "RAPIDO_CLUSTER_RECONNECT_S": "5"})
