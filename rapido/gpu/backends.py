"""Model backends: run a contract model on a batch, synchronously, from one worker thread.

Every backend takes float32 numpy ``mel [B, 1, 80, 16]`` and ``face [B, 6, S, S]`` and
returns float32 numpy ``[B, 3, S, S]`` (see :mod:`rapido.gpu.manifest` for the contract).
``run`` validates shapes cheaply and raises ``ValueError``: the batcher fails that batch
with the message and carries on.

* :class:`OnnxBackend`: onnxruntime, trying TensorRT -> CUDA -> CPU (only providers this
  onnxruntime build reports); a provider that fails to create a session is logged and
  the next one tried. On GPU providers outputs are bound on the device with I/O binding
  and copied to the host once.
* :class:`rapido.gpu.torch_backend.TorchBackend` (its own module): any contract
  ``nn.Module``; fp16/bf16 and CUDA graphs (one per batch-size bucket, captured on first
  use) on CUDA; float32 eager on CPU.
* :func:`make_backend`: picks one for a manifest and logs which and why.

The TensorRT, CUDA and CUDA-graph paths only run on a GPU machine; they are kept short.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rapido.gpu.contract import (
    DEFAULT_BATCH_SIZES,
    ModelBackend,
    TorchDtype,
    batch_sizes_for,
    check_batch,
    check_output,
)
from rapido.gpu.manifest import (
    FACE_CHANNELS,
    MEL_BINS,
    MEL_FRAMES,
    ModelError,
    ModelManifest,
    check_onnx,
)

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "BackendKind",
    "DeviceKind",
    "ModelBackend",
    "OnnxBackend",
    "TorchDtype",
    "check_batch",
    "check_output",
    "make_backend",
]

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "onnx", "torch"]
DeviceKind = Literal["auto", "cpu", "cuda"]
TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_GPU_PROVIDERS = (TRT, CUDA)


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxBackend:
    """onnxruntime session for an ONNX manifest; see the module docstring.

    ``providers`` restricts and orders what is tried (default TensorRT, CUDA, CPU).
    ``intra_op_threads`` 0 lets onnxruntime pick (one per physical core).
    ``trt_cache_dir`` enables TensorRT's engine and timing caches there: building an
    engine takes minutes, loading a cached one seconds. ``max_batch`` defaults to the
    manifest's largest batch size and bounds both ``run`` and the TensorRT profile."""

    #: onnxruntime's ``InferenceSession.run`` may be called from several threads, and
    #: ``run`` below makes its I/O binding per call.
    thread_safe = True

    def __init__(self, manifest: ModelManifest, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int = 0, trt_cache_dir: Path | None = None,
                 max_batch: int | None = None, trt_fp16: bool = True, device_id: int = 0,
                 check: bool = True) -> None:
        import onnxruntime as ort

        if manifest.format != "onnx" or manifest.path is None:
            raise ModelError(f"{manifest.where()}: format: OnnxBackend needs format 'onnx'",
                             field="format")
        if check:
            check_onnx(manifest)  # clear messages before onnxruntime's terse ones
        self.manifest = manifest
        self.crop_size = manifest.crop_size
        self.max_batch = max_batch if max_batch is not None else manifest.max_batch
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        self.preferred_batch_sizes = batch_sizes_for(manifest.batch_sizes, self.max_batch)
        self._trt_fp16 = trt_fp16
        self._trt_cache_dir = trt_cache_dir
        self._device_id = device_id
        self._intra_op_threads = intra_op_threads

        available = ort.get_available_providers()
        wanted = list(providers) if providers is not None else [TRT, CUDA, CPU]
        chain = [p for p in wanted if p in available]
        skipped = [p for p in wanted if p not in available]
        if skipped:
            log.debug("onnxruntime %s lacks %s; not trying them", ort.__version__, skipped)
        if not chain:
            raise ModelError(f"none of the providers {wanted} is available in this "
                             f"onnxruntime (available: {available})")
        self._available = available
        self._skipped = skipped
        self._tried: list[dict[str, Any]] = []
        self._session: ort.InferenceSession | None = None
        for i, first in enumerate(chain):
            # Keep the rest of the chain behind the first: TensorRT hands the nodes it
            # cannot run to CUDA, and CUDA to CPU.
            rest = chain[i:]
            try:
                # enable_fallback=0: onnxruntime's own fallback only print()s; this loop
                # logs each failure and keeps info() truthful.
                sess = ort.InferenceSession(
                    str(manifest.path), sess_options=self._session_options(ort),
                    providers=[(p, self._provider_options(p)) for p in rest],
                    enable_fallback=0)
                # Nor may a failing provider be swapped for the CPU mid-serve, silently:
                # a failed batch is reported, and name/info() stay true.
                sess.disable_fallback()
            except Exception as e:
                log.warning("%s: %s failed to create a session, trying the next: %s",
                            manifest.name, first, e)
                self._tried.append({"provider": first, "ok": False, "error": str(e)[:500]})
                continue
            got = sess.get_providers()
            # onnxruntime may itself drop a provider that fails to initialise; what the
            # session reports is what runs.
            if got[0] != first:
                log.warning("%s: %s was dropped by onnxruntime, session runs on %s",
                            manifest.name, first, got[0])
                self._tried.append({"provider": first, "ok": False,
                                    "error": f"dropped by onnxruntime; session has {got}"})
            self._tried.append({"provider": got[0], "ok": True, "error": None})
            self._session = sess
            break
        if self._session is None:
            raise ModelError(f"{manifest.where()}: no execution provider could load "
                             f"{manifest.path}: " + "; ".join(
                                 f"{t['provider']}: {t['error']}" for t in self._tried))
        self.provider: str = self._session.get_providers()[0]
        self.device = "cpu" if self.provider == CPU else f"cuda:{device_id}"
        self.name = f"onnxruntime/{self.provider}"
        self._io_binding = self.provider in _GPU_PROVIDERS

        types = {i.name: i.type for i in self._session.get_inputs()}
        types.update({o.name: o.type for o in self._session.get_outputs()})
        # fp16 graph I/O is allowed by the manifest contract; cast at the boundary.
        self._mel_dtype = np.float16 if types[manifest.mel_input] == "tensor(float16)" \
            else np.float32
        self._face_dtype = np.float16 if types[manifest.face_input] == "tensor(float16)" \
            else np.float32
        self._out_type = types[manifest.output]
        # Many published exports have a fixed batch (often 1). Serve them at that size:
        # smaller batches are padded up, and the batcher is told the only size it fits.
        b0 = next(i.shape[0] for i in self._session.get_inputs()
                  if i.name == manifest.face_input)
        self.fixed_batch: int | None = b0 if isinstance(b0, int) and b0 > 0 else None
        if self.fixed_batch is not None:
            self.max_batch = self.fixed_batch
            self.preferred_batch_sizes = (self.fixed_batch,)
        log.info("%s: onnxruntime session on %s (providers %s)", manifest.name,
                 self.provider, self._session.get_providers())

    def _session_options(self, ort: Any) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Sequential inside a run: parallelism belongs inside each operator (and across
        # runs, when the batcher has several batches in flight).
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self._intra_op_threads
        so.inter_op_num_threads = 1
        # Idle pool threads must sleep, not spin: between batches the event loop, the
        # encoders and the compositor need those cores (a spinning pool burned a whole
        # core of a 2-core machine for a one-stream load).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def _provider_options(self, provider: str) -> dict[str, Any]:
        m = self.manifest
        if provider == TRT:
            opts: dict[str, Any] = {"device_id": self._device_id,
                                    "trt_fp16_enable": self._trt_fp16}
            if self._trt_cache_dir is not None:
                cache = Path(self._trt_cache_dir)
                cache.mkdir(parents=True, exist_ok=True)
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
            # One explicit profile for batch 1..max_batch, tuned at max_batch (the
            # batches that matter under load); without it TensorRT rebuilds the engine
            # whenever a larger batch shows up. Format: "name:1x1x80x16,name2:...".
            s = m.crop_size

            def shapes(b: int) -> str:
                return (f"{m.mel_input}:{b}x1x{MEL_BINS}x{MEL_FRAMES},"
                        f"{m.face_input}:{b}x{FACE_CHANNELS}x{s}x{s}")

            if self._dynamic_batch():
                opts.update(trt_profile_min_shapes=shapes(1),
                            trt_profile_opt_shapes=shapes(self.max_batch),
                            trt_profile_max_shapes=shapes(self.max_batch))
            return opts
        if provider == CUDA:
            # Shapes are few and fixed per batch size: search conv algorithms once.
            return {"device_id": self._device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
        return {}

    def _dynamic_batch(self) -> bool:
        # A static-batch graph must not get a profile (TensorRT refuses one for static
        # inputs); check_onnx has already made the manifest agree with it.
        import onnx

        assert self.manifest.path is not None
        g = onnx.load(str(self.manifest.path), load_external_data=False).graph
        for vi in g.input:
            if vi.name == self.manifest.face_input:
                d = vi.type.tensor_type.shape.dim
                return not (len(d) > 0 and d[0].HasField("dim_value"))
        return True

    def run(self, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
        b = check_batch(mel, face, self.crop_size, self.max_batch)
        sess = self._session
        if sess is None:
            raise RuntimeError(f"{self.name}: backend is closed")
        m = self.manifest
        mel_in = np.ascontiguousarray(mel, dtype=self._mel_dtype)
        face_in = np.ascontiguousarray(face, dtype=self._face_dtype)
        if self.fixed_batch is not None and b < self.fixed_batch:
            pad = self.fixed_batch - b  # zero rows; their outputs are sliced away
            mel_in = np.concatenate([mel_in, np.zeros((pad, *mel_in.shape[1:]), mel_in.dtype)])
            face_in = np.concatenate([face_in,
                                      np.zeros((pad, *face_in.shape[1:]), face_in.dtype)])
        if self._io_binding:
            # Inputs are copied host->device once by the binding; the output is allocated
            # on the device and copied back once, instead of ORT's default of staging
            # every tensor through host memory it owns.
            binding = sess.io_binding()
            binding.bind_cpu_input(m.mel_input, mel_in)
            binding.bind_cpu_input(m.face_input, face_in)
            binding.bind_output(m.output, "cuda", self._device_id)
            sess.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            out = sess.run([m.output], {m.mel_input: mel_in, m.face_input: face_in})[0]
        return check_output(np.asarray(out)[:b], b, self.crop_size)

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        sess = self._session
        return {
            "backend": "onnxruntime",
            "name": self.name,
            "model": self.manifest.name,
            "path": str(self.manifest.path),
            "onnxruntime": ort.__version__,
            "provider": self.provider,
            "session_providers": sess.get_providers() if sess is not None else [],
            "providers_available": list(self._available),
            "providers_unavailable": list(self._skipped),  # wanted, not in this build
            "providers_tried": [dict(t) for t in self._tried],
            "device": self.device,
            "dtype": "float16" if self._face_dtype == np.float16 else "float32",
            "output_type": self._out_type,
            "trt_fp16": self._trt_fp16 if self.provider == TRT else None,
            "trt_cache_dir": str(self._trt_cache_dir) if self._trt_cache_dir else None,
            "io_binding": self._io_binding,
            "intra_op_threads": self._intra_op_threads,
            "crop_size": self.crop_size,
            "max_batch": self.max_batch,
            "fixed_batch": self.fixed_batch,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "closed": sess is None,
        }

    def close(self) -> None:
        # Dropping the session frees its arena (and the GPU memory with it).
        self._session = None


# --------------------------------------------------------------------------- choice


_GPU_DTYPES: dict[str, TorchDtype] = {"auto": "float16", "float16": "float16",
                                      "bfloat16": "bfloat16", "float32": "float32"}


def _ort_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in ort.get_available_providers() for p in _GPU_PROVIDERS)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _choose(manifest: ModelManifest, kind: str, device: str
            ) -> tuple[Literal["onnx", "torch"], Literal["cpu", "cuda"], str]:
    """(kind, device, why) for a manifest; pure apart from probing what is installed."""
    if kind not in ("auto", "onnx", "torch"):
        raise ValueError(f"kind must be 'auto', 'onnx' or 'torch', got {kind!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    ort_gpu, torch_cuda = _ort_gpu(), _torch_cuda()
    has_onnx = manifest.format == "onnx"
    has_torch = manifest.torch_factory is not None
    if kind == "onnx" and not has_onnx:
        raise ModelError(f"{manifest.where()}: format: kind 'onnx' needs an ONNX model, "
                         f"the manifest is format {manifest.format!r}", field="format")
    if kind == "torch" and not has_torch:
        raise ModelError(f"{manifest.where()}: torch_factory: kind 'torch' needs one",
                         field="torch_factory")

    chosen: Literal["onnx", "torch"]
    if kind == "auto":
        if not has_onnx:
            chosen, why = "torch", "the manifest is format 'torch'"
        elif device != "cpu" and not ort_gpu and torch_cuda and has_torch:
            chosen, why = "torch", ("onnxruntime has no GPU provider but torch sees CUDA "
                                    "and the manifest has a torch_factory")
        else:
            chosen, why = "onnx", "the manifest is format 'onnx' (onnxruntime serves it)"
    else:
        chosen = "onnx" if kind == "onnx" else "torch"
        why = f"kind {kind!r} was asked for"

    gpu_ok = ort_gpu if chosen == "onnx" else torch_cuda
    dev: Literal["cpu", "cuda"]
    if device == "auto":
        dev = "cuda" if gpu_ok else "cpu"
        why += "; " + ("a GPU is available" if gpu_ok else f"no GPU available to {chosen}")
    elif device == "cuda" and not gpu_ok:
        raise ModelError("device 'cuda' requested but "
                         + ("onnxruntime has no CUDA/TensorRT provider (install "
                            "onnxruntime-gpu)" if chosen == "onnx"
                            else "torch sees no CUDA device"))
    else:
        dev = "cuda" if device == "cuda" else "cpu"
        why += f"; device {device!r} was asked for"
    return chosen, dev, why


def make_backend(manifest: ModelManifest, *, kind: BackendKind | str = "auto",
                 device: DeviceKind | str = "auto", dtype: str = "auto",
                 intra_op_threads: int = 0, trt_cache_dir: Path | None = None,
                 max_batch: int | None = None, cuda_graphs: bool = True) -> ModelBackend:
    """A backend for ``manifest``; logs which one and why.

    ``kind="auto"`` serves ONNX manifests with onnxruntime (TensorRT/CUDA/CPU) unless
    onnxruntime has no GPU provider while torch has CUDA and the manifest names a
    torch_factory; torch manifests with torch. ``device="auto"`` takes the GPU when the
    chosen runtime can use one. ``dtype`` is the GPU precision: "auto" and "float16"
    mean torch float16 / TensorRT fp16, "bfloat16" torch bfloat16 (TensorRT then stays
    float32), "float32" full precision; the CPU always runs float32. ``kind``, ``device``
    and ``dtype`` are plain strings so config values pass straight through; a bad one is
    a ValueError. ``intra_op_threads`` and ``trt_cache_dir`` apply to onnxruntime only
    (torch's thread count is process-wide; the caller owns it)."""
    if dtype not in _GPU_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_GPU_DTYPES)}, got {dtype!r}")
    k, dev, why = _choose(manifest, kind, device)
    gpu_dtype = _GPU_DTYPES[dtype]
    backend: ModelBackend
    if k == "onnx":
        providers = [CPU] if dev == "cpu" else [TRT, CUDA, CPU]
        backend = OnnxBackend(manifest, providers=providers,
                              intra_op_threads=intra_op_threads, trt_cache_dir=trt_cache_dir,
                              max_batch=max_batch, trt_fp16=gpu_dtype == "float16")
        if dev == "cuda" and backend.provider == CPU:
            why += "; every GPU provider failed, so it runs on CPU"
    else:
        buckets = batch_sizes_for(manifest.batch_sizes, max_batch or manifest.max_batch)
        from rapido.gpu.torch_backend import TorchBackend  # torch loads only when chosen

        backend = TorchBackend.from_manifest(
            manifest, device=dev, dtype=gpu_dtype if dev == "cuda" else "float32",
            cuda_graphs=cuda_graphs, batch_buckets=buckets)
    log.info("model %s: backend %s (%s)", manifest.name, backend.name, why)
    return backend
