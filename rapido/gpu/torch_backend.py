"""TorchBackend: a contract ``nn.Module`` served by torch (see :mod:`rapido.gpu.backends`
for the contract every backend keeps and :func:`rapido.gpu.backends.make_backend`, which
picks one). fp16/bf16 and CUDA graphs (one per batch-size bucket, captured on first use)
on CUDA; float32 eager on CPU. The CUDA and CUDA-graph paths only run on a GPU machine.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from rapido.gpu.contract import (
    DEFAULT_BATCH_SIZES,
    TorchDtype,
    check_batch,
    check_output,
    check_output_shape,
)
from rapido.gpu.manifest import (
    FACE_CHANNELS,
    MEL_BINS,
    MEL_FRAMES,
    ModelError,
    ModelManifest,
    import_factory,
)

if TYPE_CHECKING:
    import torch

__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

_TORCH_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


class _Graph:
    """One captured CUDA graph for a batch bucket, with its static input/output tensors."""

    def __init__(self, graph: Any, mel: torch.Tensor, face: torch.Tensor,
                 out: torch.Tensor) -> None:
        self.graph, self.mel, self.face, self.out = graph, mel, face, out


class TorchBackend:
    """A contract ``nn.Module`` served by torch; see the module docstring.

    Not thread-safe: a captured CUDA graph replays from static input buffers.

    On CPU the dtype is forced to float32 (half-precision convolutions on CPU are slow
    or missing) and ``info()`` says so. On CUDA with ``cuda_graphs`` a batch is padded
    up to the smallest bucket that holds it, the bucket's graph (captured on first use)
    is replayed and the result sliced; the padding rows hold stale inputs, which is
    harmless because contract models treat batch rows independently (eval-mode
    BatchNorm uses running statistics).

    The backend takes the module over: it is moved and cast in place (``Module.to``),
    put in eval mode and its gradients switched off."""

    thread_safe = False


    def __init__(self, module: torch.nn.Module, *, crop_size: int, device: str = "cpu",
                 dtype: TorchDtype = "float32", cuda_graphs: bool = True,
                 batch_buckets: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 label: str = "") -> None:
        import torch

        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
        if not batch_buckets or any(b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {batch_buckets!r}")
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ModelError(f"device {device!r} requested but torch "
                                 f"{torch.__version__} sees no CUDA device")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.notes: list[str] = []
        self.dtype_requested: str = dtype
        if dev.type == "cpu" and dtype != "float32":
            self.notes.append(f"{dtype} requested; CPU runs float32")
            log.info("TorchBackend: %s requested on CPU; using float32", dtype)
            dtype = "float32"
        self.crop_size = crop_size
        self.label = label or type(module).__name__
        self.dtype: str = dtype
        self._torch_dtype = getattr(torch, dtype)
        self._dev = dev
        self.device = str(dev)
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.max_batch = self.batch_buckets[-1]
        self.preferred_batch_sizes = self.batch_buckets
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self._graphs: dict[int, _Graph] = {}
        self._graph_error: str | None = None
        if dev.type == "cuda":
            # Few fixed shapes: let cuDNN benchmark its algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        self._module: torch.nn.Module | None = (
            module.to(device=dev, dtype=self._torch_dtype).eval().requires_grad_(False))
        self.name = f"torch/{self.device}/{self.dtype}" + ("+cudagraphs" if
                                                           self.cuda_graphs else "")

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, *, device: str = "cpu",
                      dtype: TorchDtype = "float32", cuda_graphs: bool = True,
                      batch_buckets: tuple[int, ...] | None = None) -> TorchBackend:
        """Build the module with ``manifest.torch_factory``. A checkpoint is passed as the
        factory's ``checkpoint`` keyword when it has one; otherwise it is loaded with
        :func:`rapido.gpu.models.load_checkpoint` after building."""
        import torch

        if manifest.torch_factory is None:
            raise ModelError(f"{manifest.where()}: torch_factory: needed to serve the model "
                             f"with torch", field="torch_factory")
        factory = import_factory(manifest.torch_factory)
        ckpt = manifest.checkpoint
        try:
            takes_ckpt = "checkpoint" in inspect.signature(factory).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_ckpt = False
        module = factory(checkpoint=str(ckpt)) if ckpt is not None and takes_ckpt \
            else factory()
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"torch_factory {manifest.torch_factory} returned "
                             f"{type(module).__name__}, not an nn.Module",
                             field="torch_factory")
        if ckpt is not None and not takes_ckpt:
            from rapido.gpu.models import load_checkpoint

            load_checkpoint(module, ckpt)
        return cls(module, crop_size=manifest.crop_size, device=device, dtype=dtype,
                   cuda_graphs=cuda_graphs, label=manifest.name,
                   batch_buckets=batch_buckets or manifest.batch_sizes)

    def _bucket(self, b: int) -> int:
        return next(x for x in self.batch_buckets if x >= b)

    def _capture(self, bucket: int) -> _Graph:
        import torch

        module = self._module
        assert module is not None
        s = self.crop_size
        mel = torch.zeros(bucket, 1, MEL_BINS, MEL_FRAMES, device=self._dev,
                          dtype=self._torch_dtype)
        face = torch.zeros(bucket, FACE_CHANNELS, s, s, device=self._dev,
                           dtype=self._torch_dtype)
        # Warm up on a side stream first (cuDNN autotuning, lazy allocations must not
        # happen during capture), as the CUDA graphs documentation prescribes.
        side = torch.cuda.Stream(self._dev)
        side.wait_stream(torch.cuda.current_stream(self._dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                module(mel, face)
        torch.cuda.current_stream(self._dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = module(mel, face)
        log.info("%s: captured a CUDA graph for batch bucket %d", self.label, bucket)
        return _Graph(graph, mel, face, out)

    def run(self, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
        b, out = self._forward(mel, face)
        # .cpu() always makes a fresh host tensor (the graph's static output is reused by
        # the next replay); the half -> float cast happens on the host, after copying half
        # the bytes.
        return check_output(out.cpu().float().numpy(), b, self.crop_size)

    def run_device(self, mel: np.ndarray, face: np.ndarray) -> torch.Tensor:
        """The batch's crops left on this backend's device as float32 ``[B, 3, S, S]``
        (:class:`rapido.gpu.contract.DeviceOutput`): compositing runs there too and the
        finished pictures come down once per batch."""
        import torch

        b, out = self._forward(mel, face)
        check_output_shape(tuple(out.shape), b, self.crop_size)
        # A copy: a captured graph's static output is overwritten by the next replay.
        return out.to(torch.float32, copy=True)

    def _forward(self, mel: np.ndarray, face: np.ndarray) -> tuple[int, torch.Tensor]:
        import torch

        b = check_batch(mel, face, self.crop_size, self.max_batch)
        module = self._module
        if module is None:
            raise RuntimeError(f"{self.name}: backend is closed")
        # from_numpy shares memory (no copy for contiguous float32) but refuses negative
        # strides; ascontiguousarray is a no-op for what the batcher normally sends.
        mel_t = torch.from_numpy(np.ascontiguousarray(mel))
        face_t = torch.from_numpy(np.ascontiguousarray(face))
        on_gpu = self._dev.type == "cuda"
        # Capture and replay must happen on this backend's GPU, whatever is current.
        with torch.inference_mode(), (torch.cuda.device(self._dev) if on_gpu
                                      else contextlib.nullcontext()):
            g = self._graph_for(b) if self.cuda_graphs else None
            if g is not None:
                g.mel[:b].copy_(mel_t)  # host -> device (and cast) into the static input
                g.face[:b].copy_(face_t)
                g.graph.replay()
                return b, g.out[:b]
            return b, module(mel_t.to(self._dev, self._torch_dtype),
                             face_t.to(self._dev, self._torch_dtype))

    def _graph_for(self, b: int) -> _Graph | None:
        """The CUDA graph of b's bucket, captured on first use; None to run eagerly."""
        if self._graph_error is not None:
            return None
        bucket = self._bucket(b)
        g = self._graphs.get(bucket)
        if g is None:
            try:
                g = self._graphs[bucket] = self._capture(bucket)
            except Exception as e:  # a module that cannot be captured still runs, eagerly
                self._graph_error = f"{type(e).__name__}: {e}"
                self.name = self.name.removesuffix("+cudagraphs")
                log.warning("%s: CUDA graph capture failed, running eagerly: %s",
                            self.label, self._graph_error)
                return None
        return g

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "backend": "torch",
            "name": self.name,
            "model": self.label,
            "torch": torch.__version__,
            "device": self.device,
            "dtype": self.dtype,
            "dtype_requested": self.dtype_requested,
            "notes": list(self.notes),
            "cuda_graphs": self.cuda_graphs and self._graph_error is None,
            "cuda_graph_buckets_captured": sorted(self._graphs),
            "cuda_graph_error": self._graph_error,
            "crop_size": self.crop_size,
            "max_batch": self.max_batch,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "closed": self._module is None,
        }

    def close(self) -> None:
        self._graphs.clear()
        self._module = None
        if self._dev.type == "cuda":
            import torch

            torch.cuda.empty_cache()
