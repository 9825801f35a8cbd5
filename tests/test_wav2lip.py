"""The reference Wav2Lip architecture: size, contract, determinism, ONNX export served by
onnxruntime agreeing with torch, and checkpoint loading as the released files need."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rapido.gpu.backends import OnnxBackend, make_backend
from rapido.gpu.manifest import ModelError, ModelManifest, check_onnx, load_manifest
from rapido.gpu.models import wav2lip
from rapido.gpu.models.wav2lip import Wav2Lip96, build, load_checkpoint
from rapido.gpu.torch_backend import TorchBackend

S = 96


def batch(b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-4, 4, (b, 1, 80, 16)).astype(np.float32)  # Wav2Lip's mel range
    face = rng.random((b, 6, S, S), dtype=np.float32)
    face[:, :3, S // 2:] = 0
    return mel, face


@pytest.fixture(scope="module")
def model() -> Wav2Lip96:
    return build(0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    """Export through the CLI entry point, once for the module."""
    out = tmp_path_factory.mktemp("wav2lip")
    assert wav2lip.main(["--out", str(out), "--seed", "0"]) == 0
    return load_manifest(out / "wav2lip.json")


@pytest.fixture(scope="module")
def torch_backend(model: Wav2Lip96) -> TorchBackend:
    return TorchBackend(model, crop_size=S)


def test_size_matches_the_paper(model: Wav2Lip96) -> None:
    n = wav2lip.count_parameters(model)
    assert abs(n - 36e6) / 36e6 < 0.10, n
    assert n == 36_298_035  # the original generator's count
    flops = wav2lip.count_flops(model)  # multiply-add = 2 FLOPs
    assert abs(flops - 7.9e9) / 7.9e9 < 0.05, flops


def test_state_dict_keys_match_the_original_layout(model: Wav2Lip96) -> None:
    keys = set(model.state_dict())
    for k in ("face_encoder_blocks.0.0.conv_block.0.weight",
              "face_encoder_blocks.6.1.conv_block.1.running_var",
              "audio_encoder.0.conv_block.0.weight",
              "audio_encoder.12.conv_block.1.num_batches_tracked",
              "face_decoder_blocks.0.0.conv_block.0.weight",
              "face_decoder_blocks.6.2.conv_block.1.bias",
              "output_block.0.conv_block.0.weight",
              "output_block.1.weight", "output_block.1.bias"):
        assert k in keys, k
    assert not any("order" in k for k in keys)  # channel reorders are not persistent
    assert model.state_dict()["face_decoder_blocks.1.0.conv_block.0.weight"].shape == (
        1024, 512, 3, 3)  # ConvTranspose2d: [in, out, k, k]


@pytest.mark.parametrize("b", [1, 2])
def test_output_follows_the_contract(torch_backend: TorchBackend, b: int) -> None:
    out = torch_backend.run(*batch(b))
    assert out.shape == (b, 3, S, S) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 0.05  # not a constant grey: the init is calibrated


def test_output_depends_on_audio_and_face(torch_backend: TorchBackend) -> None:
    mel, face = batch(2)
    base = torch_backend.run(mel, face)
    assert np.abs(torch_backend.run(mel[::-1].copy(), face) - base).mean() > 1e-3
    assert np.abs(torch_backend.run(mel, face[::-1].copy()) - base).mean() > 1e-3


def test_build_is_deterministic_and_leaves_the_global_rng_alone(model: Wav2Lip96) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = build(0)
    assert torch.equal(torch.rand(3), before)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build(1).state_dict()
    assert not torch.equal(a["output_block.1.weight"], other["output_block.1.weight"])
    assert not again.training and not any(p.requires_grad for p in again.parameters())


def test_bgr_flag_reorders_channels_only(model: Wav2Lip96) -> None:
    rgb = Wav2Lip96(bgr=False)
    rgb.load_state_dict(model.state_dict())
    rgb.eval()
    mel, face = batch(1)
    m, f = torch.from_numpy(mel), torch.from_numpy(face)
    with torch.inference_mode():
        want = rgb(m, f[:, [2, 1, 0, 5, 4, 3]])[:, [2, 1, 0]]
        torch.testing.assert_close(model(m, f), want, atol=1e-6, rtol=0)


def test_export_passes_the_contract_check(exported: ModelManifest) -> None:
    assert exported.name == "wav2lip" and exported.format == "onnx"
    assert exported.crop_size == 96 and exported.torch_factory == wav2lip.FACTORY
    check_onnx(exported)


def test_export_is_byte_identical_for_the_same_seed(exported: ModelManifest,
                                                   tmp_path: Path) -> None:
    assert exported.path is not None
    again = wav2lip.export_onnx(build(0), tmp_path / "again.onnx")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (exported.path, again)]
    assert digest[0] == digest[1]


@pytest.fixture(scope="module")
def onnx_backend(exported: ModelManifest) -> OnnxBackend:
    return OnnxBackend(exported)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_onnxruntime_agrees_with_torch(onnx_backend: OnnxBackend,
                                       torch_backend: TorchBackend, b: int) -> None:
    mel, face = batch(b, seed=b)
    got = onnx_backend.run(mel, face)
    want = torch_backend.run(mel, face)
    assert got.shape == (b, 3, S, S)
    # BatchNorm is folded into the convolutions in the export; ~1e-5 in practice.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_make_backend_serves_the_export(exported: ModelManifest) -> None:
    b = make_backend(exported, device="cpu")
    assert b.name == "onnxruntime/CPUExecutionProvider" and b.crop_size == 96
    b.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_cuda_graphs_stay_close_to_float32(torch_backend: TorchBackend) -> None:
    gpu = TorchBackend(build(0), crop_size=S, device="cuda", dtype="float16")
    for n in (1, 3, 8):
        mel, face = batch(n, seed=n)
        np.testing.assert_allclose(gpu.run(mel, face), torch_backend.run(mel, face),
                                   atol=2e-2, rtol=0)
    gpu.close()


# --------------------------------------------------------------------------- checkpoints


def fresh() -> Wav2Lip96:
    """Unseeded, uncalibrated weights: different every call, and cheaper than build()."""
    return Wav2Lip96().eval()


def test_checkpoint_round_trips_with_prefix_and_wrapper(model: Wav2Lip96,
                                                        tmp_path: Path) -> None:
    # What Wav2Lip's training script saves: DataParallel keys inside a dict.
    source = fresh()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
               "global_step": 250000, "global_epoch": 42}
    torch.save(wrapped, tmp_path / "wav2lip.pth")
    target = fresh()
    load_checkpoint(target, tmp_path / "wav2lip.pth")
    sd = target.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in source.state_dict().items())
    # A bare state dict loads too, and build() takes the checkpoint directly.
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    loaded = build(0, checkpoint=tmp_path / "bare.pt")
    assert torch.equal(loaded.state_dict()["output_block.1.weight"],
                       source.state_dict()["output_block.1.weight"])
    assert not loaded.training


def test_checkpoint_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    sd = {k: v for k, v in fresh().state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": sd}, tmp_path / "old.pth")
    load_checkpoint(fresh(), tmp_path / "old.pth")


def test_wrong_checkpoint_is_explained(tmp_path: Path) -> None:
    sd = dict(fresh().state_dict())
    del sd["output_block.1.weight"]
    del sd["audio_encoder.0.conv_block.0.bias"]
    sd["lip_sync_expert.weight"] = torch.zeros(3)
    sd["output_block.1.bias"] = torch.zeros(4)
    torch.save({"state_dict": sd}, tmp_path / "wrong.pth")
    with pytest.raises(ModelError) as e:
        load_checkpoint(fresh(), tmp_path / "wrong.pth")
    msg = str(e.value)
    assert e.value.field == "checkpoint" and str(tmp_path / "wrong.pth") in msg
    assert "2 missing keys: audio_encoder.0.conv_block.0.bias, output_block.1.weight" in msg
    assert "1 unexpected keys: lip_sync_expert.weight" in msg
    assert "1 shape mismatches: output_block.1.bias (4,) vs model (3,)" in msg


def test_another_models_checkpoint_lists_a_few_keys(tmp_path: Path) -> None:
    torch.save({"state_dict": {f"layer{i}.weight": torch.zeros(1) for i in range(20)}},
               tmp_path / "other.pth")
    with pytest.raises(ModelError, match=r"20 unexpected keys: .*and 12 more"):
        load_checkpoint(fresh(), tmp_path / "other.pth")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"\x00garbage" * 10,
                                     pickle.dumps({"state_dict": _Evil()})],
                         ids=["garbage", "arbitrary-pickle"])
def test_unreadable_checkpoint(tmp_path: Path, content: bytes,
                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(ModelError, match="cannot be read as a torch checkpoint"):
        load_checkpoint(fresh(), tmp_path / "bad.pth")
    assert "must never run" not in capsys.readouterr().out  # weights_only held
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(fresh(), tmp_path / "missing.pth")


def test_torch_backend_from_a_manifest_with_checkpoint(tmp_path: Path) -> None:
    source = fresh()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    m = wav2lip.write_wav2lip_manifest(tmp_path / "w.json", checkpoint=tmp_path / "w.pth")
    assert m.format == "torch" and load_manifest(tmp_path / "w.json") == m
    b = TorchBackend.from_manifest(m)
    mel, face = batch(1)
    with torch.inference_mode():
        want = source(torch.from_numpy(mel), torch.from_numpy(face)).numpy()
    np.testing.assert_allclose(b.run(mel, face), want, atol=1e-6)
