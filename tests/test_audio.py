"""Audio at the edge: WAV and L16 parsing, streaming resampling."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from rapido.pipeline.audio import (
    MAX_WAV_CHUNKS,
    AudioFormatError,
    Pcm,
    Resampler,
    check_rate,
    decode_wav,
    l16_pcm,
    parse_l16,
    parse_wav,
    pcm_s16le,
    resample,
)
from rapido.pipeline.media import AUDIO_RATE
from tests.conftest import speech
from tests.test_api import wav_bytes


def test_wav_16bit_mono_is_exact() -> None:
    x = speech(0.3)
    got, rate = decode_wav(wav_bytes(x, 16_000, width=2))
    assert rate == 16_000 and np.array_equal(got, x)


def test_wav_other_widths_and_stereo() -> None:
    x = speech(0.2).astype(np.int32)
    # 8-bit unsigned
    u8 = ((x >> 8) + 128).astype(np.uint8)
    got, _ = decode_wav(wav_bytes(u8, 8_000, width=1))
    assert np.max(np.abs(got.astype(np.int32) - (x >> 8 << 8))) <= 300
    # 24-bit little-endian
    v = x << 8
    b24 = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
    got, _ = decode_wav(wav_bytes(b24, 16_000, width=3))
    assert np.max(np.abs(got.astype(np.int32) - x)) <= 1
    # stereo 16-bit: left = x, right = -x/2 -> mean
    st = np.stack([x, -x // 2], axis=1).astype(np.int16)
    got, _ = decode_wav(wav_bytes(st, 16_000, width=2, channels=2))
    assert np.max(np.abs(got.astype(np.int32) - (x - x // 2) // 2)) <= 2


def test_wav_float32() -> None:
    x = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    data = x.tobytes()
    blob = (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    got, rate = decode_wav(blob)
    assert rate == 16000 and abs(int(got[0]) + 16384) <= 1 and abs(int(got[-1]) - 16384) <= 1
    nan = np.array([0.1, np.nan], dtype=np.float32).tobytes()
    bad = blob[:40] + struct.pack("<I", len(nan)) + nan
    with pytest.raises(AudioFormatError, match="NaN"):
        decode_wav(bad)


def test_l16() -> None:
    x = speech(0.1)
    got, rate = parse_l16("audio/L16; rate=16000; channels=1", x.astype(">i2").tobytes())
    assert rate == 16000 and np.array_equal(got, x)
    got, _ = parse_l16("audio/L16;rate=16000;endian=little", x.tobytes())
    assert np.array_equal(got, x)
    for ctype, code in (("audio/L16", "invalid_content_type"),
                        ("audio/L16;rate=abc", "invalid_sample_rate"),
                        ("audio/L16;rate=4000", "invalid_sample_rate"),
                        ("audio/L16;rate=16000;channels=2", "unsupported_channels")):
        with pytest.raises(AudioFormatError) as info:
            parse_l16(ctype, b"\x00\x00")
        assert info.value.code == code


def test_rates_and_odd_pcm() -> None:
    assert check_rate(8000) == 8000 and check_rate(48000) == 48000
    for bad in (7999, 48001, 16000.0, True, None, "16000"):
        with pytest.raises(AudioFormatError):
            check_rate(bad)
    with pytest.raises(AudioFormatError, match="even"):
        pcm_s16le(b"\x00\x01\x02")
    assert len(pcm_s16le(b"\x00\x01\x02\x03")) == 2


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 24_000, 44_100, 48_000])
def test_streaming_resampler_matches_one_shot_and_keeps_length(rate: int) -> None:
    x = speech(1.0, rate=rate)
    r = Resampler(rate)
    parts = [r.push(x[i : i + 317]) for i in range(0, len(x), 317)]  # odd chunk sizes
    parts.append(r.flush())
    streamed = np.concatenate(parts)
    whole = resample(x, rate)
    assert abs(len(streamed) - AUDIO_RATE) <= 1
    assert np.array_equal(streamed, whole)


def _pyav_resample(x: np.ndarray, rate: int) -> np.ndarray:
    import av

    r = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    parts = [f.to_ndarray().reshape(-1) for f in r.resample(frame) + r.resample(None)]
    return np.concatenate(parts)


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000])
def test_integer_ratio_resampler_agrees_with_pyav_in_time_and_level(rate: int) -> None:
    x = speech(1.0, rate=rate)
    ours, ref = resample(x, rate).astype(np.float64), _pyav_resample(x, rate).astype(np.float64)
    assert len(ours) == len(ref) == len(x) * (AUDIO_RATE // rate)
    # Same alignment (no lag) and nearly the same signal: only the filters differ.
    err = ours[500:-500] - ref[500:-500]
    snr = 10 * np.log10(np.sum(ref[500:-500] ** 2) / np.sum(err**2))
    assert snr > 35, snr


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000])
def test_integer_ratio_resampler_is_flat_and_suppresses_images(rate: int) -> None:
    t = np.arange(rate) / rate
    for f in (0.05 * rate, 0.4 * rate):
        tone = np.round(np.sin(2 * np.pi * f * t) * 16000).astype(np.int16)
        y = resample(tone, rate).astype(np.float64)[2000:-2000]
        spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        freqs = np.fft.rfftfreq(len(y), 1 / AUDIO_RATE)
        peak = spec.max()
        assert abs(freqs[np.argmax(spec)] - f) < 5
        # Passband level kept: +-0.1 dB in RMS against the input tone.
        level = np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(tone.astype(np.float64) ** 2))
        assert abs(20 * np.log10(level)) < 0.1
        # Images (at k * rate +- f) and everything else: more than 60 dB down.
        assert 20 * np.log10(spec[np.abs(freqs - f) > 100].max() / peak) < -60


def test_integer_ratio_resampler_passes_input_samples_through() -> None:
    # A Nyquist filter: every third output of 16 kHz -> 48 kHz is the input sample itself.
    x = speech(0.2)
    y = resample(x, 16_000)
    assert np.array_equal(y[::3], x)


# -- uploads: the length from the header, decoding and resampling block by block --------


def _float_wav(x: np.ndarray, rate: int, channels: int = 1) -> bytes:
    data = np.asarray(x, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def test_header_duration_is_data_size_over_block_align_over_rate() -> None:
    u8 = np.full(8_000 * 3, 128, dtype=np.uint8)  # 3 s of 8-bit 8 kHz
    pcm = parse_wav(wav_bytes(u8, 8_000, width=1))
    assert (pcm.frames, pcm.rate, pcm.block_align) == (24_000, 8_000, 1)
    assert pcm.duration_s == 3.0 and pcm.samples48 == 3 * AUDIO_RATE
    st = np.zeros((16_000, 2), dtype=np.int16)  # 1 s of 16-bit stereo
    pcm = parse_wav(wav_bytes(st, 16_000, width=2, channels=2))
    assert (pcm.frames, pcm.block_align, pcm.samples48) == (16_000, 4, AUDIO_RATE)
    pcm = parse_wav(_float_wav(np.zeros(11_025), 22_050))
    assert pcm.duration_s == 0.5 and pcm.samples48 == AUDIO_RATE // 2
    # L16: body size / 2 / rate.
    pcm = l16_pcm("audio/L16;rate=24000", b"\x00\x00" * 12_000)
    assert pcm.duration_s == 0.5 and pcm.samples48 == AUDIO_RATE // 2
    # A streamed WAV that claims more than it holds: what is there counts.
    blob = bytearray(wav_bytes(np.zeros(800, dtype=np.int16), 8_000))
    struct.pack_into("<I", blob, 40, 0xFFFFFFFF)
    assert parse_wav(blob).frames == 800


def test_header_is_read_without_decoding_and_without_copying() -> None:
    # NaN samples: the header says how long it is; only check() (the samples) refuses.
    blob = _float_wav(np.full(16_000, np.nan), 16_000)
    pcm = parse_wav(blob)
    assert pcm.duration_s == 1.0
    with pytest.raises(AudioFormatError, match="NaN"):
        pcm.check()
    with pytest.raises(AudioFormatError, match="NaN"):
        pcm.check(block_s=0.01)
    # A view of the body, not a copy of it.
    body = bytearray(wav_bytes(speech(0.1), 16_000))
    pcm = parse_wav(body)
    body[44:46] = b"\x34\x12"
    assert pcm.decode(0, 1)[0] == 0x1234


def test_wav_chunk_walk_is_bounded() -> None:
    x = speech(0.1)
    good = wav_bytes(x, 16_000)
    junk = b"JUNK" + struct.pack("<I", 2) + b"\x00\x00"
    ok = good[:36] + junk * (MAX_WAV_CHUNKS - 2) + good[36:]  # fmt + junk + data
    assert np.array_equal(decode_wav(ok)[0], x)
    crafted = good[:36] + junk * MAX_WAV_CHUNKS + good[36:]
    with pytest.raises(AudioFormatError, match="chunks") as info:
        parse_wav(crafted)
    assert info.value.code == "invalid_wav"


def _formats(x: np.ndarray, rate: int) -> list[tuple[str, Pcm]]:
    x32 = x.astype(np.int32)
    u8 = ((x32 >> 8) + 128).astype(np.uint8)
    st = np.stack([x, -x // 2], axis=1).astype(np.int16)
    v = x32 << 8
    b24 = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
    return [
        ("u8", parse_wav(wav_bytes(u8, rate, width=1))),
        ("s16", parse_wav(wav_bytes(x, rate))),
        ("s16 stereo", parse_wav(wav_bytes(st, rate, channels=2))),
        ("s24", parse_wav(wav_bytes(b24, rate, width=3))),
        ("s32", parse_wav(wav_bytes(x32 << 16, rate, width=4))),
        ("f32", parse_wav(_float_wav(x / 32768.0, rate))),
        ("L16", l16_pcm(f"audio/L16;rate={rate}", x.astype(">i2").tobytes())),
        ("L16 little", l16_pcm(f"audio/L16;rate={rate};endian=little", x.tobytes())),
    ]


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_blockwise_decode_and_resample_equals_the_whole(rate: int) -> None:
    x = speech(2.3, rate=rate)
    for name, pcm in _formats(x, rate):
        whole = pcm.decode()
        assert np.array_equal(np.concatenate([pcm.decode(i, i + 999)
                                              for i in range(0, pcm.frames, 999)]), whole)
        want = resample(whole, rate)
        blocks = list(pcm.blocks48())  # 1 s of input a block: 3 blocks, tail in the last
        assert len(blocks) == 3, name
        assert all(len(b) <= AUDIO_RATE + 64 for b in blocks), name
        assert np.array_equal(np.concatenate(blocks), want), name
        odd = np.concatenate(list(pcm.blocks48(block_s=0.0137)))
        assert np.array_equal(odd, want), name
        assert abs(len(want) - pcm.samples48) <= 1, name
        small = pcm.compact(block_s=0.0137)  # what a queued upload holds
        assert small.block_align <= 2 and small.frames == pcm.frames, name
        assert small is pcm or small.block_align < pcm.block_align, name
        assert np.array_equal(np.concatenate(list(small.blocks48())), want), name


def test_compact_checks_float_samples() -> None:
    with pytest.raises(AudioFormatError, match="NaN"):
        parse_wav(_float_wav(np.r_[np.zeros(20_000), np.inf], 16_000)).compact()
