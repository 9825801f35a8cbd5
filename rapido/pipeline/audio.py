"""Audio at the edge: parse what clients send (PCM, WAV, L16) and bring it to AUDIO_RATE.

Everything here validates and raises :class:`AudioFormatError` with a message meant for
the client; nothing here knows about HTTP.
"""

from __future__ import annotations

import functools
import struct

import av
import numpy as np

from rapido.pipeline.media import AUDIO_RATE

MIN_RATE = 8_000
MAX_RATE = 48_000


class AudioFormatError(ValueError):
    """Audio a client sent that we cannot take; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_rate(rate: object) -> int:
    if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(
            "invalid_sample_rate",
            f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}",
        )
    return rate


def pcm_s16le(data: bytes) -> np.ndarray:
    """Mono s16le bytes -> int16 array (a read-only view, no copy)."""
    if len(data) % 2:
        raise AudioFormatError(
            "odd_length_pcm",
            f"PCM s16le needs an even number of bytes (2 per sample), got {len(data)}",
        )
    return np.frombuffer(data, dtype="<i2")


#: Taps per polyphase branch of the integer-ratio upsampler (at the input rate). With a
#: Kaiser window for 70 dB this gives a transition band of about 0.14 x the input rate,
#: centred on the input's Nyquist frequency.
_TAPS = 32
_STOP_DB = 70.0
#: Coefficients are rounded to multiples of 2**-_COEF_BITS: every product with an int16
#: sample and every partial sum is then an exact float64, so the result does not depend
#: on how a stream is chunked (or on the BLAS's summation order).
_COEF_BITS = 20


@functools.lru_cache(maxsize=8)
def _polyphase(ratio: int, taps: int = _TAPS) -> np.ndarray:
    """``(taps, ratio)`` float64: column ``p`` is output phase ``p``'s filter, row ``i``
    weighs input sample ``n - taps + 1 + i`` (oldest first). A Kaiser-windowed sinc with
    its cut-off at the input's Nyquist frequency, centred on a whole input sample, so it
    is a Nyquist filter: input samples pass through unchanged."""
    n = ratio * taps
    centre = n // 2  # a whole number of input samples (taps is even)
    j = np.arange(n)
    beta = 0.1102 * (_STOP_DB - 8.7)
    window = np.kaiser(n + 1, beta)[:n]  # tap n would be h[-centre]'s zero-valued partner
    h = np.sinc((j - centre) / ratio) * window
    # Each phase sums to 1 (DC gain 1 per output sample), then the exact-arithmetic grid.
    for p in range(ratio):
        h[p::ratio] /= h[p::ratio].sum()
    scale = float(1 << _COEF_BITS)
    h = np.round(h * scale) / scale
    # y[L*n + p] = sum_k h[p + L*k] * x[n - k]; row i holds x[n - (taps - 1 - i)].
    bank = np.empty((taps, ratio))
    for p in range(ratio):
        bank[:, p] = h[p::ratio][::-1]
    bank.flags.writeable = False
    return bank


class _IntegerUpsampler:
    """Streaming mono int16 upsampling by a whole factor: a polyphase FIR in numpy.

    Delay-compensated (the filter's group delay is dropped at the start and played out
    by :meth:`flush`), so ``n`` samples in give exactly ``ratio * n`` out over a flush,
    aligned with the input. Bit-exact whatever the chunking (see ``_COEF_BITS``)."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio
        self._bank = _polyphase(ratio)
        self._taps = self._bank.shape[0]
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(self._taps - 1, dtype=np.float64)
        self._skip = self._taps // 2  # input samples whose outputs are the filter delay
        self._fed = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        n = len(samples)
        if n == 0:
            return np.zeros(0, dtype=np.int16)
        self._fed = True
        k = self._taps - 1
        buf = np.empty(k + n, dtype=np.float64)
        buf[:k] = self._hist
        buf[k:] = samples
        self._hist = buf[n:]
        # Row i is the K input samples ending at new sample i (overlapping, no copy).
        windows = np.ndarray((n, self._taps), np.float64, buf, 0, (8, 8))
        out = windows.dot(self._bank)  # [n, ratio]: the outputs of each input sample
        if self._skip:
            drop = min(self._skip, n)
            out = out[drop:]
            self._skip -= drop
        return _to_int16(out.reshape(-1))

    def flush(self) -> np.ndarray:
        if not self._fed:
            return np.zeros(0, dtype=np.int16)
        # The tail: what the last input samples still owe, by feeding the delay in zeros.
        tail = self.push(np.zeros(self._taps // 2, dtype=np.int16))
        self.reset()
        return tail


def _to_int16(x: np.ndarray) -> np.ndarray:
    np.rint(x, out=x)
    np.clip(x, -32768, 32767, out=x)
    return x.astype(np.int16)


class Resampler:
    """Streaming mono s16 resampler to AUDIO_RATE.

    Whole ratios (8, 12, 16 and 24 kHz) take a polyphase FIR in numpy (passband flat to
    0.43 x the input rate, images 70 dB down); other rates take PyAV/libswresample. Both
    keep filter state between chunks, so chunk boundaries leave no clicks; ``flush`` at
    the end of an utterance returns the filter's tail so no sample is lost."""

    def __init__(self, in_rate: int) -> None:
        self.in_rate = check_rate(in_rate)
        self._r: av.AudioResampler | None = None
        self._passthrough = in_rate == AUDIO_RATE
        self._int: _IntegerUpsampler | None = None
        if not self._passthrough and AUDIO_RATE % in_rate == 0:
            self._int = _IntegerUpsampler(AUDIO_RATE // in_rate)

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self._passthrough or len(samples) == 0:
            return samples
        if self._int is not None:
            return self._int.push(samples)
        if self._r is None:
            self._r = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
            format="s16", layout="mono",
        )
        frame.sample_rate = self.in_rate
        return _join(self._r.resample(frame))

    def flush(self) -> np.ndarray:
        """The filter's tail; the resampler starts afresh after this."""
        if self._int is not None:
            return self._int.flush()
        if self._r is None:
            return np.zeros(0, dtype=np.int16)
        out = _join(self._r.resample(None))
        self._r = None
        return out


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    r = Resampler(rate)
    head = r.push(samples)
    tail = r.flush()
    return np.concatenate([head, tail]) if len(tail) else head


def _join(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.int16)
    parts = [f.to_ndarray().reshape(-1) for f in frames]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# -- WAV ------------------------------------------------------------------------------

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file -> (mono int16 samples, sample rate).

    Takes integer PCM of 8, 16, 24 or 32 bits and 32-bit float, 1..8 channels (mixed down
    to mono), 8..48 kHz. Anything else is refused with the reason."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError("invalid_wav", "not a WAV file (no RIFF/WAVE header)")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    payload: bytes | None = None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioFormatError("invalid_wav", "WAV fmt chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the GUID
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            payload = body  # a streamed WAV may claim more than it has: take what is there
            break
        pos += 8 + size + (size & 1)
    if fmt is None:
        raise AudioFormatError("invalid_wav", "WAV file has no fmt chunk")
    if payload is None:
        raise AudioFormatError("invalid_wav", "WAV file has no data chunk")
    tag, channels, rate, bits = fmt
    if not 1 <= channels <= 8:
        raise AudioFormatError("unsupported_wav", f"WAV with {channels} channels; 1..8 allowed")
    if tag == _WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
        pass
    elif tag == _WAVE_FORMAT_FLOAT and bits == 32:
        pass
    else:
        kind = {_WAVE_FORMAT_PCM: "PCM", _WAVE_FORMAT_FLOAT: "float"}.get(tag, f"format {tag}")
        raise AudioFormatError(
            "unsupported_wav",
            f"WAV {kind} with {bits} bits per sample is not supported; send integer PCM "
            "(8/16/24/32 bit) or 32-bit float",
        )
    check_rate(rate)
    width = bits // 8
    usable = len(payload) - len(payload) % (width * channels)
    raw = payload[:usable]
    if bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif tag == _WAVE_FORMAT_FLOAT:
        x = np.frombuffer(raw, "<f4").astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise AudioFormatError("invalid_wav", "float WAV contains NaN or infinity")
    else:
        x = np.frombuffer(raw, "<i4").astype(np.float64).astype(np.float32) / float(1 << 31)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if bits == 16 and channels == 1:
        return np.frombuffer(raw, "<i2").copy(), rate  # exact: no float round trip
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16), rate


def parse_l16(content_type: str, data: bytes) -> tuple[np.ndarray, int]:
    """``audio/L16;rate=N[;channels=1][;endian=little]`` -> (int16 mono, rate).

    L16 is big-endian by RFC 3551; ``endian=little`` is accepted for senders that
    stream raw little-endian PCM."""
    params: dict[str, str] = {}
    for part in content_type.split(";")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            params[k.strip().lower()] = v.strip().strip('"')
    if "rate" not in params:
        raise AudioFormatError("invalid_content_type", "audio/L16 needs a rate parameter")
    try:
        rate = int(params["rate"])
    except ValueError:
        raise AudioFormatError("invalid_sample_rate",
                               f"rate {params['rate']!r} is not an integer") from None
    check_rate(rate)
    if params.get("channels", "1") != "1":
        raise AudioFormatError("unsupported_channels", "audio/L16 must be mono (channels=1)")
    endian = params.get("endian", "big").lower()
    if endian not in ("big", "little"):
        raise AudioFormatError("invalid_content_type", "endian must be big or little")
    if len(data) % 2:
        raise AudioFormatError("odd_length_pcm",
                               f"L16 needs an even number of bytes, got {len(data)}")
    dtype = ">i2" if endian == "big" else "<i2"
    return np.frombuffer(data, dtype=dtype).astype(np.int16), rate
