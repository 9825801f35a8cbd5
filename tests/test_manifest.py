"""Model manifests: loading, validation of every field, and the ONNX contract check."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rapido.gpu.manifest import (
    ModelError,
    ModelManifest,
    check_onnx,
    import_factory,
    load_manifest,
    manifest_dict,
    write_manifest,
)

S = 32  # a small crop keeps these graphs tiny; the check is the same for 96


def make_onnx(path: Path, *, mel: tuple[Any, ...] = ("B", 1, 80, 16),
              face: tuple[Any, ...] = ("B", 6, S, S), out: tuple[Any, ...] = ("B", 3, S, S),
              names: tuple[str, str, str] = ("mel", "face", "out"),
              elem: int = TensorProto.FLOAT, extra_input: bool = False) -> Path:
    """A valid ONNX graph with the given interface: out = sigmoid(face[:, 3:6]).

    Declared shapes are what check_onnx reads; the checker does not need them to agree
    with the computation, so one body serves every interface under test."""
    mel_n, face_n, out_n = names
    inits = [numpy_helper.from_array(np.array([3], np.int64), "starts"),
             numpy_helper.from_array(np.array([6], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Slice", [face_n, "starts", "ends", "axes"], ["ref"]),
             helper.make_node("Sigmoid", ["ref"], [out_n])]
    inputs = [helper.make_tensor_value_info(mel_n, elem, list(mel)),
              helper.make_tensor_value_info(face_n, elem, list(face))]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("speaker", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(nodes, "contract", inputs,
                              [helper.make_tensor_value_info(out_n, elem, list(out))],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def good_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "toy", "format": "onnx", "path": "toy.onnx", "crop_size": S}
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    make_onnx(tmp_path / "toy.onnx")
    (tmp_path / "weights.pt").write_bytes(b"not read by load_manifest")
    return tmp_path


def write_json(d: Any, folder: Path, name: str = "toy.json") -> Path:
    p = folder / name
    p.write_text(json.dumps(d))
    return p


# --------------------------------------------------------------------------- loading


def test_minimal_manifest_gets_the_contract_defaults(model_dir: Path) -> None:
    m = load_manifest(write_json(good_dict(), model_dir))
    assert m.name == "toy" and m.format == "onnx" and m.crop_size == S
    assert m.path == (model_dir / "toy.onnx").resolve()  # relative to the manifest
    assert (m.fps, m.audio_features) == (25, "mel80_16k_wav2lip")
    assert (m.mel_input, m.face_input, m.output) == ("mel", "face", "out")
    assert m.value_range == (0.0, 1.0)
    assert m.batch_sizes == (1, 2, 4, 8) and m.max_batch == 8
    assert m.torch_factory is None and m.checkpoint is None
    assert m.source == (model_dir / "toy.json").resolve()
    check_onnx(m)


def test_the_blend_region_is_stated_or_lower_half(model_dir: Path) -> None:
    """A model says which part of the face it redraws; Wav2Lip-style (the lower half)
    unless it says so. A rapido-lite manifest written before the field existed keeps the
    mouth it always had."""
    assert load_manifest(write_json(good_dict(), model_dir)).blend == "lower_half"
    assert load_manifest(write_json(good_dict(blend="mouth"), model_dir)).blend == "mouth"
    old_lite = write_json(good_dict(name="rapido-lite"), model_dir, "lite.json")
    assert load_manifest(old_lite).blend == "mouth"
    stated = write_json(good_dict(name="rapido-lite", blend="lower_half"), model_dir, "l.json")
    assert load_manifest(stated).blend == "lower_half"


def test_the_mel_window_is_stated_or_wav2lips_training_window(model_dir: Path) -> None:
    """Where a frame's mel window starts: -1 frame (Wav2Lip's training loader, what its
    weights expect) unless the manifest says otherwise; a rapido-lite manifest written
    before the field existed keeps the window its graph was drawn for (0)."""
    assert load_manifest(write_json(good_dict(), model_dir)).mel_offset_frames == -1
    stated = write_json(good_dict(mel_offset_frames=0), model_dir, "z.json")
    assert load_manifest(stated).mel_offset_frames == 0
    old_lite = write_json(good_dict(name="rapido-lite"), model_dir, "lite.json")
    assert load_manifest(old_lite).mel_offset_frames == 0
    new_lite = write_json(good_dict(name="rapido-lite", mel_offset_frames=-1), model_dir,
                          "lite2.json")
    assert load_manifest(new_lite).mel_offset_frames == -1


def test_full_manifest_round_trips_through_write(model_dir: Path, tmp_path: Path) -> None:
    d = good_dict(fps=30, mel_input="audio", face_input="img", output="pred",
                  value_range=[0, 1], torch_factory="tests.test_backends:build_toy",
                  checkpoint="weights.pt", batch_sizes=[1, 4, 16], description="x",
                  mel_offset_frames=-2)
    m = load_manifest(write_json(d, model_dir))
    assert m.checkpoint == (model_dir / "weights.pt").resolve()
    assert m.batch_sizes == (1, 4, 16) and m.max_batch == 16
    out = write_manifest(m, model_dir / "copy.json")
    written = json.loads(out.read_text())
    assert written["path"] == "toy.onnx" and written["checkpoint"] == "weights.pt"
    assert load_manifest(out) == m
    # Written elsewhere, paths stay correct (relative to the new folder).
    far = write_manifest(m, tmp_path / "a" / "b" / "m.json")
    assert json.loads(far.read_text())["path"] == "../../toy.onnx"
    assert load_manifest(far) == m
    assert manifest_dict(m)["path"] == str(m.path)


def test_torch_manifest_needs_no_file(tmp_path: Path) -> None:
    m = load_manifest(write_json({"name": "lite", "format": "torch", "crop_size": 96,
                                  "torch_factory": "rapido.gpu.models.wav2lip:build"},
                                 tmp_path))
    assert m.path is None and m.torch_factory == "rapido.gpu.models.wav2lip:build"
    with pytest.raises(ModelError, match="format"):
        check_onnx(m)


def test_programmatic_manifest_is_validated_too() -> None:
    with pytest.raises(ModelError) as e:
        ModelManifest(name="x", format="onnx", crop_size=96)
    assert e.value.field == "path"


BAD: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("name", lambda: good_dict(name=""), "name"),
    ("name", lambda: good_dict(name="has space"), "name"),
    ("name", lambda: good_dict(name=5), "name"),
    ("name", lambda: good_dict(name=_DROP), "required"),
    ("format", lambda: good_dict(format="tflite"), "'onnx' or 'torch'"),
    ("format", lambda: good_dict(format=_DROP), "required"),
    ("crop_size", lambda: good_dict(crop_size=95), "even integer"),
    ("crop_size", lambda: good_dict(crop_size="96"), "even integer"),
    ("crop_size", lambda: good_dict(crop_size=True), "even integer"),
    ("crop_size", lambda: good_dict(crop_size=0), "even integer"),
    ("crop_size", lambda: good_dict(crop_size=2048), "even integer"),
    ("crop_size", lambda: good_dict(crop_size=_DROP), "required"),
    ("path", lambda: good_dict(path=_DROP), "required for format 'onnx'"),
    ("path", lambda: good_dict(path="missing.onnx"), "does not exist"),
    ("path", lambda: good_dict(path=""), "non-empty path"),
    ("path", lambda: good_dict(path=7), "non-empty path"),
    ("path", lambda: good_dict(format="torch", torch_factory="a.b:c"), "needs format 'onnx'"),
    ("fps", lambda: good_dict(fps=0), "integer from 1 to 120"),
    ("fps", lambda: good_dict(fps="25"), "integer from 1 to 120"),
    ("fps", lambda: good_dict(fps=25.0), "integer from 1 to 120"),
    ("audio_features", lambda: good_dict(audio_features="mfcc13"), "mel80_16k_wav2lip"),
    ("mel_input", lambda: good_dict(mel_input=""), "tensor name"),
    ("face_input", lambda: good_dict(face_input=3), "tensor name"),
    ("face_input", lambda: good_dict(face_input="mel"), "must differ"),
    ("output", lambda: good_dict(output=None), "tensor name"),
    ("value_range", lambda: good_dict(value_range=[-1, 1]), "only [0, 1]"),
    ("value_range", lambda: good_dict(value_range=[0, 1, 2]), "only [0, 1]"),
    ("value_range", lambda: good_dict(value_range="0..1"), "JSON list"),
    ("torch_factory", lambda: good_dict(torch_factory="no_colon"), "package.module:callable"),
    ("torch_factory", lambda: good_dict(torch_factory="a.b:c:d"), "package.module:callable"),
    ("torch_factory", lambda: good_dict(format="torch", path=_DROP), "required for format"),
    ("checkpoint", lambda: good_dict(torch_factory="a:b", checkpoint="nope.pt"),
     "does not exist"),
    ("checkpoint", lambda: good_dict(checkpoint="weights.pt"), "set torch_factory"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[4, 2]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[1, 1]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[0, 1]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[1.5]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=[1, 1024]), "strictly increasing"),
    ("batch_sizes", lambda: good_dict(batch_sizes=8), "JSON list"),
    ("description", lambda: good_dict(description=["x"]), "string"),
    ("blend", lambda: good_dict(blend="face"), "lower_half, mouth"),
    ("blend", lambda: good_dict(blend=None), "lower_half, mouth"),
    ("mel_offset_frames", lambda: good_dict(mel_offset_frames=9), "from -8 to 8"),
    ("mel_offset_frames", lambda: good_dict(mel_offset_frames=-0.5), "from -8 to 8"),
    ("mel_offset_frames", lambda: good_dict(mel_offset_frames=True), "from -8 to 8"),
    ("crop_szie", lambda: good_dict(crop_szie=96), "unknown key"),
]


@pytest.mark.parametrize(("field", "make", "says"), BAD,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_each_bad_field_is_named(model_dir: Path, field: str,
                                 make: Callable[[], dict[str, Any]], says: str) -> None:
    with pytest.raises(ModelError) as e:
        load_manifest(write_json(make(), model_dir))
    msg = str(e.value)
    assert e.value.field == field
    assert f": {field}: " in msg  # "manifest /x/toy.json: crop_size: must be ..."
    assert says in msg
    assert str(model_dir / "toy.json") in msg


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe\x00", "not UTF-8"),
])
def test_unreadable_manifest(tmp_path: Path, content: bytes, says: str) -> None:
    p = tmp_path / "m.json"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=says):
        load_manifest(p)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load_manifest(tmp_path / "nope.json")


def test_import_factory() -> None:
    from rapido.gpu.models.wav2lip import build

    assert import_factory("rapido.gpu.models.wav2lip:build") is build
    with pytest.raises(ModelError, match=r"cannot import module 'rapido\.nope'"):
        import_factory("rapido.nope:build")
    with pytest.raises(ModelError, match="no callable 'nope'"):
        import_factory("rapido.gpu.models.wav2lip:nope")
    with pytest.raises(ModelError, match=r"package\.module:callable"):
        import_factory("bad spec")


# --------------------------------------------------------------------------- check_onnx


def manifest_for(path: Path, **over: Any) -> ModelManifest:
    base = ModelManifest(name="toy", format="onnx", crop_size=S, path=path.resolve())
    return dataclasses.replace(base, **over)


@pytest.fixture
def good_onnx(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "good.onnx")


def test_check_onnx_accepts_a_contract_graph(good_onnx: Path) -> None:
    check_onnx(manifest_for(good_onnx))


def test_check_onnx_accepts_float16_io(tmp_path: Path) -> None:
    check_onnx(manifest_for(make_onnx(tmp_path / "h.onnx", elem=TensorProto.FLOAT16)))


def test_check_onnx_accepts_fully_symbolic_dims(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "sym.onnx", face=("B", 6, "H", "W"), out=("B", 3, "H", "W"))
    check_onnx(manifest_for(p))


def expect(m: ModelManifest, *fragments: str) -> str:
    with pytest.raises(ModelError) as e:
        check_onnx(m)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_check_onnx_refuses_a_truncated_file(good_onnx: Path, tmp_path: Path) -> None:
    data = good_onnx.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 10):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        expect(manifest_for(p), "not a readable ONNX file", str(p))


def test_check_onnx_refuses_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "noise.onnx"
    for seed in range(5):
        p.write_bytes(np.random.default_rng(seed).bytes(4096))
        expect(manifest_for(p), "not a readable ONNX file")


def test_check_onnx_refuses_empty_and_missing_files(tmp_path: Path, good_onnx: Path) -> None:
    m = manifest_for(good_onnx)
    good_onnx.write_bytes(b"")
    expect(m, "file is empty")
    good_onnx.unlink()
    expect(m, "does not exist")


def test_check_onnx_refuses_a_graph_the_checker_rejects(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "x.onnx")
    model = onnx.load(str(p))
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, str(p))
    expect(manifest_for(p), "the ONNX checker rejects the graph")


def test_check_onnx_wrong_input_names(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "names.onnx", names=("audio", "image", "out"))
    expect(manifest_for(p), "input 'mel' (mel_input) is not in the graph",
           "input 'face' (face_input) is not in the graph", "['audio', 'image']")
    # The same graph is fine once the manifest names its tensors.
    check_onnx(manifest_for(p, mel_input="audio", face_input="image"))


def test_check_onnx_wrong_output_name(good_onnx: Path) -> None:
    expect(manifest_for(good_onnx, output="pred"), "output 'pred' is not in the graph",
           "['out']")


def test_check_onnx_wrong_channel_count(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "c3.onnx", face=("B", 3, S, S))
    expect(manifest_for(p), "input 'face' has 3 channels (dim 1), manifest wants 6")
    p = make_onnx(tmp_path / "o4.onnx", out=("B", 4, S, S))
    expect(manifest_for(p), "output 'out' has 4 channels (dim 1), the contract wants 3")


def test_check_onnx_wrong_crop_size(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "s.onnx", face=("B", 6, 64, 64), out=("B", 3, 64, 64))
    msg = expect(manifest_for(p), "input 'face' has 64 rows (dim 2), manifest crop_size "
                                  f"wants {S}", "output 'out' has 64 columns (dim 3)")
    assert msg.count(";") >= 3  # every mismatch is listed, not just the first
    check_onnx(manifest_for(p, crop_size=64))


def test_check_onnx_wrong_mel_window(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "m.onnx", mel=("B", 1, 40, 16))
    expect(manifest_for(p), "input 'mel' has 40 mel bins (dim 2), the contract wants 80")
    p = make_onnx(tmp_path / "m2.onnx", mel=("B", 1, 80, 20))
    expect(manifest_for(p), "input 'mel' has 20 mel frames (dim 3)")


def test_check_onnx_wrong_rank(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "r.onnx", face=(6, S, S))
    expect(manifest_for(p), "input 'face' has rank 3, the contract wants 4")
    p = make_onnx(tmp_path / "r5.onnx", mel=("B", "T", 1, 80, 16))
    expect(manifest_for(p), "input 'mel' has rank 5")


def test_check_onnx_wrong_dtype(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "d.onnx", elem=TensorProto.DOUBLE)
    expect(manifest_for(p), "input 'face' is float64, the contract wants float32")


def test_check_onnx_extra_input(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "e.onnx", extra_input=True)
    expect(manifest_for(p), "inputs the manifest does not feed: ['speaker']")


def test_check_onnx_static_batch_must_match_manifest(tmp_path: Path) -> None:
    p = make_onnx(tmp_path / "b1.onnx", mel=(1, 1, 80, 16), face=(1, 6, S, S),
                  out=(1, 3, S, S))
    expect(manifest_for(p), "fixed batch of 1", "set batch_sizes to [1]")
    check_onnx(manifest_for(p, batch_sizes=(1,)))
    p = make_onnx(tmp_path / "b2.onnx", mel=(1, 1, 80, 16), face=(2, 6, S, S))
    expect(manifest_for(p), "fixed batch sizes disagree")
