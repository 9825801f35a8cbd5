"""Model backends on CPU: provider choice, info(), input validation, and ONNX Runtime
agreeing with torch on a small contract-following model.

The TensorRT/CUDA/CUDA-graph paths need a GPU machine; here we check that they are
skipped cleanly when onnxruntime or torch cannot offer them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rapido.gpu.backends import (
    CPU,
    ModelBackend,
    OnnxBackend,
    check_batch,
    make_backend,
)
from rapido.gpu.manifest import ModelError, ModelManifest, write_manifest
from rapido.gpu.models import export_onnx
from rapido.gpu.torch_backend import TorchBackend

S = 32
SEED = 7


class ToyLipSync(nn.Module):
    """Follows the contract with a few thousand weights: the reference crop blended
    with a mel-driven colour and a conv of both crops, through a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Linear(80 * 16, 3)
        self.mix = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        tint = self.audio(mel.flatten(1))[:, :, None, None]
        return 0.5 * torch.sigmoid(self.mix(face) + tint) + 0.5 * face[:, 3:]


def build_toy(checkpoint: str | None = None) -> ToyLipSync:
    """torch_factory for the toy: seeded, so every build has the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        m = ToyLipSync()
    if checkpoint is not None:
        m.load_state_dict(torch.load(checkpoint, weights_only=True))
    return m.eval()


def build_toy_plain() -> ToyLipSync:
    """A factory without a ``checkpoint`` parameter: the backend loads it generically."""
    return build_toy()


def not_a_model() -> str:
    return "a factory that forgot to return its module"


def batch(b: int, seed: int = 0, s: int = S) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-4, 4, (b, 1, 80, 16)).astype(np.float32)
    face = rng.random((b, 6, s, s), dtype=np.float32)
    face[:, :3, s // 2:] = 0  # the masked crop, as the pipeline sends it
    return mel, face


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    d = tmp_path_factory.mktemp("toy")
    path = export_onnx(build_toy(), d / "toy.onnx", crop_size=S)
    m = ModelManifest(name="toy", format="onnx", crop_size=S, path=path,
                      torch_factory="tests.test_backends:build_toy")
    write_manifest(m, d / "toy.json")
    return m


@pytest.fixture(scope="module")
def onnx_backend(toy_manifest: ModelManifest) -> OnnxBackend:
    return OnnxBackend(toy_manifest, intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_backend() -> TorchBackend:
    return TorchBackend(build_toy(), crop_size=S)


# --------------------------------------------------------------------------- ONNX Runtime


def test_onnx_backend_on_cpu_picks_the_cpu_provider(onnx_backend: OnnxBackend) -> None:
    assert isinstance(onnx_backend, ModelBackend)
    assert onnx_backend.name == "onnxruntime/CPUExecutionProvider"
    assert onnx_backend.provider == CPU and onnx_backend.device == "cpu"
    assert onnx_backend.crop_size == S
    assert onnx_backend.preferred_batch_sizes == (1, 2, 4, 8)


def test_onnx_backend_info(onnx_backend: OnnxBackend, toy_manifest: ModelManifest) -> None:
    info = onnx_backend.info()
    assert info["backend"] == "onnxruntime"
    assert info["name"] == "onnxruntime/CPUExecutionProvider"
    assert info["provider"] == CPU and info["session_providers"][0] == CPU
    assert info["providers_available"] == ort.get_available_providers()
    # Only what this onnxruntime offers was tried; on this machine that is the CPU.
    tried = [t["provider"] for t in info["providers_tried"]]
    assert tried[-1] == CPU and info["providers_tried"][-1]["ok"] is True
    assert all(p in ort.get_available_providers() for p in tried)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["io_binding"] is False and info["trt_fp16"] is None
    assert info["model"] == "toy" and info["path"] == str(toy_manifest.path)
    assert info["max_batch"] == 8 and info["preferred_batch_sizes"] == [1, 2, 4, 8]
    assert info["intra_op_threads"] == 1 and info["closed"] is False
    assert info["onnxruntime"] == ort.__version__


def test_unavailable_providers_are_skipped(toy_manifest: ModelManifest) -> None:
    b = OnnxBackend(toy_manifest, providers=["TensorrtExecutionProvider",
                                             "CUDAExecutionProvider", CPU])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert [t["provider"] for t in b.info()["providers_tried"]] == [CPU]
        assert "CUDAExecutionProvider" in b.info()["providers_unavailable"]
    assert b.provider in ort.get_available_providers()
    b.close()


def test_no_usable_provider_is_a_model_error(toy_manifest: ModelManifest) -> None:
    with pytest.raises(ModelError, match="none of the providers"):
        OnnxBackend(toy_manifest, providers=["NoSuchExecutionProvider"])


def test_max_batch_bounds_preferred_sizes(toy_manifest: ModelManifest) -> None:
    b = OnnxBackend(toy_manifest, max_batch=3)
    assert b.preferred_batch_sizes == (1, 2, 3)
    b.run(*batch(3))
    with pytest.raises(ValueError, match=r"batch of 4 is outside 1\.\.3"):
        b.run(*batch(4))


def test_corrupt_model_is_refused_before_onnxruntime(tmp_path: Path,
                                                     toy_manifest: ModelManifest) -> None:
    assert toy_manifest.path is not None
    p = tmp_path / "cut.onnx"
    p.write_bytes(toy_manifest.path.read_bytes()[:100])
    m = ModelManifest(name="cut", format="onnx", crop_size=S, path=p)
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        OnnxBackend(m)


def slice_graph(path: Path, *, elem: int = TensorProto.FLOAT, batch: int | str = "B") -> Path:
    """A contract graph built by hand: out = face[:, 3:6] (the reference crop)."""
    inits = [numpy_helper.from_array(np.array([v], np.int64), n)
             for n, v in (("starts", 3), ("ends", 6), ("axes", 1))]
    node = helper.make_node("Slice", ["face", "starts", "ends", "axes"], ["out"])
    graph = helper.make_graph(
        [node], "slice",
        [helper.make_tensor_value_info("mel", elem, [batch, 1, 80, 16]),
         helper.make_tensor_value_info("face", elem, [batch, 6, S, S])],
        [helper.make_tensor_value_info("out", elem, [batch, 3, S, S])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_float16_graph_io_is_cast_at_the_boundary(tmp_path: Path) -> None:
    p = slice_graph(tmp_path / "half.onnx", elem=TensorProto.FLOAT16)
    b = OnnxBackend(ModelManifest(name="half", format="onnx", crop_size=S, path=p))
    assert b.info()["dtype"] == "float16"
    mel, face = batch(2)
    out = b.run(mel, face)
    assert out.dtype == np.float32 and out.shape == (2, 3, S, S)
    np.testing.assert_allclose(out, face[:, 3:], atol=1e-3)  # fp16 rounding of 0..1


def test_fixed_batch_graph_is_padded_up(tmp_path: Path) -> None:
    p = slice_graph(tmp_path / "fixed.onnx", batch=4)
    m = ModelManifest(name="fixed", format="onnx", crop_size=S, path=p, batch_sizes=(4,))
    b = OnnxBackend(m, max_batch=8)  # a config's max_batch cannot exceed the graph's
    assert b.preferred_batch_sizes == (4,) and b.max_batch == 4
    assert b.info()["fixed_batch"] == 4
    for n in (1, 3, 4):
        mel, face = batch(n, seed=n)
        np.testing.assert_array_equal(b.run(mel, face), face[:, 3:])
    with pytest.raises(ValueError, match=r"batch of 5 is outside 1\.\.4"):
        b.run(*batch(5))


# --------------------------------------------------------------------------- both


@pytest.fixture(params=["onnx", "torch"])
def backend(request: pytest.FixtureRequest, onnx_backend: OnnxBackend,
            torch_backend: TorchBackend) -> ModelBackend:
    return onnx_backend if request.param == "onnx" else torch_backend


@pytest.mark.parametrize("b", [1, 3, 8])
def test_torch_and_onnx_agree(onnx_backend: OnnxBackend, torch_backend: TorchBackend,
                              b: int) -> None:
    mel, face = batch(b, seed=b)
    got_onnx = onnx_backend.run(mel, face)
    got_torch = torch_backend.run(mel, face)
    for out in (got_onnx, got_torch):
        assert out.dtype == np.float32 and out.shape == (b, 3, S, S)
        assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(got_onnx, got_torch, atol=1e-4, rtol=0)
    # Rows are independent: row i of a batch equals running row i alone.
    np.testing.assert_allclose(onnx_backend.run(mel[-1:], face[-1:]), got_onnx[-1:],
                               atol=1e-5, rtol=0)


def test_outputs_depend_on_mel_and_face(backend: ModelBackend) -> None:
    mel, face = batch(2)
    base = backend.run(mel, face)
    assert np.abs(backend.run(-mel, face) - base).max() > 1e-3
    assert np.abs(backend.run(mel, face[::-1].copy()) - base).max() > 1e-3


def test_non_contiguous_inputs_are_accepted(backend: ModelBackend) -> None:
    mel, face = batch(4)
    expected = backend.run(mel[::2].copy(), face[::2].copy())
    np.testing.assert_allclose(backend.run(mel[::2], face[::2]), expected, atol=1e-6)
    flipped = backend.run(mel[::-1].copy(), face[::-1].copy())
    np.testing.assert_allclose(backend.run(mel[::-1], face[::-1]), flipped, atol=1e-6)


BAD_INPUTS: list[tuple[str, Any, Any, str]] = [
    ("mel float64", batch(2)[0].astype(np.float64), batch(2)[1],
     r"mel must be float32 \[B, 1, 80, 16\], got float64 \[2, 1, 80, 16\]"),
    ("mel 15 frames", batch(2)[0][..., :15], batch(2)[1],
     r"mel must be float32 \[B, 1, 80, 16\], got float32 \[2, 1, 80, 15\]"),
    ("mel rank 3", batch(2)[0][:, 0], batch(2)[1], r"mel must be float32"),
    ("face 3 channels", batch(2)[0], batch(2)[1][:, :3],
     rf"face must be float32 \[B, 6, {S}, {S}\], got float32 \[2, 3, {S}, {S}\]"),
    ("face wrong crop", batch(2)[0], batch(2, s=2 * S)[1], r"face must be float32"),
    ("face list", batch(2)[0], [[0.0]], "face must be a numpy array, got list"),
    ("batch mismatch", batch(2)[0], batch(3)[1], "mel has batch 2 but face has batch 3"),
    ("empty batch", batch(2)[0][:0], batch(2)[1][:0], r"batch of 0 is outside 1\.\.8"),
    ("batch too big", batch(9)[0], batch(9)[1], r"batch of 9 is outside 1\.\.8"),
]


@pytest.mark.parametrize(("what", "mel", "face", "says"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_run_validates_inputs(backend: ModelBackend, what: str, mel: Any, face: Any,
                              says: str) -> None:
    with pytest.raises(ValueError, match=says):
        backend.run(mel, face)
    backend.run(*batch(1))  # and the backend still works afterwards


def test_check_batch_returns_the_batch_size() -> None:
    assert check_batch(*batch(5), crop_size=S, max_batch=8) == 5


def test_closed_backend_refuses_to_run(toy_manifest: ModelManifest) -> None:
    for b in (OnnxBackend(toy_manifest), TorchBackend(build_toy(), crop_size=S)):
        b.close()
        assert b.info()["closed"] is True
        with pytest.raises(RuntimeError, match="closed"):
            b.run(*batch(1))


# --------------------------------------------------------------------------- torch


def test_torch_backend_info_on_cpu(torch_backend: TorchBackend) -> None:
    assert isinstance(torch_backend, ModelBackend)
    info = torch_backend.info()
    assert torch_backend.name == info["name"] == "torch/cpu/float32"
    assert info["backend"] == "torch" and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["cuda_graphs"] is False
    assert info["preferred_batch_sizes"] == [1, 2, 4, 8] and info["max_batch"] == 8
    assert info["torch"] == torch.__version__


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_is_cuda_only(dtype: Any) -> None:
    b = TorchBackend(build_toy(), crop_size=S, dtype=dtype)
    info = b.info()
    assert b.name == "torch/cpu/float32" and info["dtype"] == "float32"
    assert info["dtype_requested"] == dtype
    assert any("CPU runs float32" in n for n in info["notes"])
    assert b.run(*batch(2)).dtype == np.float32


def test_torch_backend_buckets_bound_the_batch() -> None:
    b = TorchBackend(build_toy(), crop_size=S, batch_buckets=(4, 1, 2))
    assert b.preferred_batch_sizes == (1, 2, 4) and b.max_batch == 4
    with pytest.raises(ValueError, match=r"batch of 5 is outside 1\.\.4"):
        b.run(*batch(5))


def test_torch_backend_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        TorchBackend(build_toy(), crop_size=S, dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        TorchBackend(build_toy(), crop_size=S, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            TorchBackend(build_toy(), crop_size=S, device="cuda")


def test_model_breaking_the_contract_is_reported() -> None:
    class Wrong(nn.Module):
        def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
            return face[:, :4]

    with pytest.raises(RuntimeError, match=rf"model returned \[1, 4, {S}, {S}\], the "
                                           rf"contract wants \[1, 3, {S}, {S}\]"):
        TorchBackend(Wrong(), crop_size=S).run(*batch(1))


def test_from_manifest_passes_the_checkpoint_to_the_factory(tmp_path: Path) -> None:
    other = ToyLipSync()  # different (unseeded) weights
    torch.save(other.state_dict(), tmp_path / "w.pt")
    for factory in ("tests.test_backends:build_toy", "tests.test_backends:build_toy_plain"):
        m = ModelManifest(name="toy", format="torch", crop_size=S, torch_factory=factory,
                          checkpoint=tmp_path / "w.pt")
        b = TorchBackend.from_manifest(m)
        mel, face = batch(2)
        with torch.inference_mode():
            want = other.eval()(torch.from_numpy(mel), torch.from_numpy(face)).numpy()
        np.testing.assert_allclose(b.run(mel, face), want, atol=1e-6)
        assert b.info()["model"] == "toy"


def test_from_manifest_refuses_a_factory_that_returns_no_module() -> None:
    m = ModelManifest(name="x", format="torch", crop_size=S,
                      torch_factory="tests.test_backends:not_a_model")
    with pytest.raises(ModelError, match=r"returned str, not an nn\.Module"):
        TorchBackend.from_manifest(m)


# --------------------------------------------------------------------------- make_backend


def test_make_backend_auto_on_cpu_serves_onnx_with_onnxruntime(
        toy_manifest: ModelManifest, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rapido.gpu.backends"):
        b = make_backend(toy_manifest)
    assert isinstance(b, OnnxBackend)
    if not any(p in ort.get_available_providers()
               for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")):
        assert b.name == "onnxruntime/CPUExecutionProvider"
    line = next(r.getMessage() for r in caplog.records if "backend" in r.getMessage())
    assert "model toy: backend onnxruntime/" in line and "format 'onnx'" in line
    b.close()


def test_make_backend_kinds(toy_manifest: ModelManifest) -> None:
    tb = make_backend(toy_manifest, kind="torch", device="cpu")
    assert isinstance(tb, TorchBackend) and tb.name == "torch/cpu/float32"
    ob = make_backend(toy_manifest, kind="onnx", device="cpu")
    assert isinstance(ob, OnnxBackend) and ob.provider == CPU
    mel, face = batch(3)
    np.testing.assert_allclose(ob.run(mel, face), tb.run(mel, face), atol=1e-4)

    torch_only = ModelManifest(name="t", format="torch", crop_size=S,
                               torch_factory="tests.test_backends:build_toy")
    assert isinstance(make_backend(torch_only, device="cpu"), TorchBackend)
    with pytest.raises(ModelError, match="kind 'onnx' needs an ONNX model"):
        make_backend(torch_only, kind="onnx")
    no_factory = ModelManifest(name="o", format="onnx", crop_size=S,
                               path=toy_manifest.path)
    with pytest.raises(ModelError, match="torch_factory"):
        make_backend(no_factory, kind="torch")
    # Config strings pass straight through; bad ones are ValueErrors.
    with pytest.raises(ValueError, match="kind"):
        make_backend(toy_manifest, kind="tensorflow")
    with pytest.raises(ValueError, match="device"):
        make_backend(toy_manifest, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        make_backend(toy_manifest, dtype="int8")
    # GPU precision does not apply on the CPU.
    half = make_backend(torch_only, device="cpu", dtype="float16")
    assert half.name == "torch/cpu/float32"
    # The configured max_batch is served by either kind, beyond the manifest's sizes.
    for k in ("onnx", "torch"):
        big = make_backend(toy_manifest, kind=k, device="cpu", max_batch=12)
        assert big.preferred_batch_sizes == (1, 2, 4, 8, 12)
        assert big.run(*batch(12)).shape == (12, 3, S, S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_make_backend_cuda_without_a_gpu_is_refused(toy_manifest: ModelManifest) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            make_backend(toy_manifest, device="cuda")
    with pytest.raises(ModelError, match="torch sees no CUDA device"):
        make_backend(toy_manifest, kind="torch", device="cuda")


# --------------------------------------------------------------------------- GPU only
# Skipped on CPU-only machines; they run wherever torch or onnxruntime sees a GPU.

_ORT = ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cuda_graphs_agree_with_cpu(torch_backend: TorchBackend, dtype: Any) -> None:
    b = TorchBackend(build_toy(), crop_size=S, device="cuda", dtype=dtype)
    assert b.name == f"torch/cuda:0/{dtype}+cudagraphs"
    for n in (1, 3, 8, 3, 2):  # 3 pads up to bucket 4; the second 3 replays that graph
        mel, face = batch(n, seed=n)
        # TF32 convolutions make even float32 differ from the CPU at ~1e-3.
        np.testing.assert_allclose(b.run(mel, face), torch_backend.run(mel, face),
                                   atol=2e-3 if dtype == "float32" else 1e-2, rtol=0)
    info = b.info()
    assert info["cuda_graphs"] is True and info["cuda_graph_error"] is None
    assert info["cuda_graph_buckets_captured"] == [1, 2, 4, 8]
    b.close()


@pytest.mark.skipif("CUDAExecutionProvider" not in _ORT, reason="needs onnxruntime-gpu")
def test_onnx_cuda_uses_io_binding(toy_manifest: ModelManifest,
                                   torch_backend: TorchBackend) -> None:
    b = OnnxBackend(toy_manifest, providers=["CUDAExecutionProvider", CPU])
    assert b.name == "onnxruntime/CUDAExecutionProvider" and b.device == "cuda:0"
    assert b.info()["io_binding"] is True
    for n in (1, 3, 8):
        mel, face = batch(n, seed=n)
        np.testing.assert_allclose(b.run(mel, face), torch_backend.run(mel, face),
                                   atol=2e-3, rtol=0)
    b.close()


@pytest.mark.skipif("TensorrtExecutionProvider" not in _ORT, reason="needs TensorRT")
def test_onnx_tensorrt_with_engine_cache(toy_manifest: ModelManifest, tmp_path: Path,
                                         torch_backend: TorchBackend) -> None:
    b = OnnxBackend(toy_manifest, trt_cache_dir=tmp_path / "trt", trt_fp16=False)
    if b.provider != "TensorrtExecutionProvider":
        pytest.skip(f"TensorRT did not load here: {b.info()['providers_tried']}")
    for n in (1, 3, 8):  # one engine serves every batch size through the profile
        mel, face = batch(n, seed=n)
        np.testing.assert_allclose(b.run(mel, face), torch_backend.run(mel, face),
                                   atol=2e-3, rtol=0)
    assert any((tmp_path / "trt").iterdir())  # the engine was cached
    b.close()
