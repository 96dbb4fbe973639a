"""``io.inputs[].sample_shape``: the concrete shape the agent's self-test builds for an input
whose height and width are free (found by benchmarks/pretrained_path.py on NudeNet's YOLOv8n).

Before it, ``sample_inputs`` made every symbolic dimension past the batch axis 1, and a model
that halves then doubles its spatial size and joins the result with a skip branch (any U-Net,
FPN or YOLO neck) fails at 1x1 inside ONNX Runtime: ``edgeship-agent check`` exited 2 and a
deploy of such a bundle was refused by the hot-swap self-test. The model here does that with a
stride-2 Conv, a Resize x2 and a Concat; it is bundled through ``optimize`` with calibration
data at 32x32, and real ONNX Runtime runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.benchmark import sample_inputs
from device_agent.bundle import load_bundle
from device_agent.errors import BundleError

CHANNELS = 3
SIDE = 32


def _write_neck_onnx(path: Path) -> Path:
    """x[batch, 3, height, width] -> stride-2 Conv -> Resize x2 -> Concat with a 1x1 Conv of x:
    runs at any even size, fails at 1x1 (the Resize gives 2x2 against the skip's 1x1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, CHANNELS, 3, 3)).astype(np.float32), "wd"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, CHANNELS, 1, 1)).astype(np.float32), "ws"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wd"], ["down"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["down"], ["down_r"]),
        helper.make_node("Resize", ["down_r", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["x", "ws"], ["skip"]),
        helper.make_node("Concat", ["up", "skip"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "neck",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, "h", "w"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdk.optimize import OptimizeConfig, optimize

    root = tmp_path_factory.mktemp("sample-shape")
    model = _write_neck_onnx(root / "neck.onnx")
    x = np.random.default_rng(1).random((24, CHANNELS, SIDE, SIDE), dtype=np.float32)
    config = OptimizeConfig(min_runs=5, min_seconds=0.01, confirm_rounds=0, detector=None)
    optimize(model, calibration={"x": x}, out=root / "bundle", config=config)
    return root / "bundle"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "check", str(root), "--runs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _with_sample_shape(bundle: Path, dest: Path, value: Any) -> Path:
    """A copy of ``bundle`` whose input's sample_shape is ``value`` (deleted when None)."""
    root = Path(shutil.copytree(bundle, dest))
    manifest = json.loads((root / "manifest.json").read_text())
    spec = manifest["io"]["inputs"][0]
    if value is None:
        del spec["sample_shape"]
    else:
        spec["sample_shape"] = value
    (root / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
    return root


def test_the_bundle_records_a_calibration_sample_shape_and_checks(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["io"]["inputs"][0]
    assert spec["shape"] == ["batch", CHANNELS, "h", "w"]
    assert spec["sample_shape"] == [1, CHANNELS, SIDE, SIDE]
    assert "sample_shape" not in manifest["io"]["outputs"][0]
    io = load_bundle(bundle).manifest.io
    assert sample_inputs(io)["x"].shape == (1, CHANNELS, SIDE, SIDE)
    assert sample_inputs(io, batch=3)["x"].shape == (3, CHANNELS, SIDE, SIDE)
    done = _check(bundle)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_without_sample_shape_the_old_1x1_input_still_fails_in_onnxruntime(
    bundle: Path, tmp_path: Path
) -> None:
    """An old bundle keeps today's behaviour, which is what made check exit 2: proof that the
    model above needs the field."""
    old = _with_sample_shape(bundle, tmp_path / "old", None)
    assert sample_inputs(load_bundle(old).manifest.io)["x"].shape == (1, CHANNELS, 1, 1)
    done = _check(old)
    assert done.returncode == 2, done.stderr
    # ONNX Runtime logs the failed kernel to stderr itself; the agent's own word is one line.
    last = done.stderr.splitlines()[-1]
    assert last.startswith("edgeship-agent: error: ") and "Traceback" not in done.stderr
    assert "mismatched dimensions" in last


def test_the_hot_swap_self_test_passes_with_the_sample_shape(bundle: Path, tmp_path: Path) -> None:
    from device_agent import AgentConfig
    from device_agent.slot import LoadedModel

    cfg = AgentConfig(device_id="t", state_dir=tmp_path / "state")
    LoadedModel.open_tested(load_bundle(bundle), cfg)
    old = _with_sample_shape(bundle, tmp_path / "old", None)
    with pytest.raises(BundleError, match="self-test inference failed"):
        LoadedModel.open_tested(load_bundle(old), cfg)


BAD = [
    ([1, CHANNELS, -32, SIDE], "negative size"),
    ([1, CHANNELS, 2**31, SIDE], "over the limit"),
    ([1, CHANNELS, 10**400, SIDE], "over the limit"),
    ([1, CHANNELS, 8192, 8192], "over the limit of 67108864"),
    ([1, CHANNELS, 32.0, SIDE], "expected an int"),
    ([1, CHANNELS, float("nan"), SIDE], "expected an int"),
    ([1, CHANNELS, True, SIDE], "expected an int"),
    ([1, CHANNELS, "h", SIDE], "expected an int"),
    ([1, CHANNELS, [[SIDE]], SIDE], "expected an int"),
    ([1, CHANNELS, SIDE], "3 dimensions, but shape"),
    ([1, 4, SIDE, SIDE], "fixes this dimension at 3"),
    ([2, CHANNELS, SIDE, SIDE], "batch axis must be 1"),
    ([1, CHANNELS, 0, SIDE], "at least 1"),
    ({"h": SIDE}, "expected a list"),
    ("1x3x32x32", "expected a list"),
]


@pytest.mark.parametrize(("value", "says"), BAD, ids=[repr(v)[:40] for v, _ in BAD])
def test_a_bad_sample_shape_is_a_one_line_manifest_error(
    bundle: Path, tmp_path: Path, value: Any, says: str
) -> None:
    bad = _with_sample_shape(bundle, tmp_path / "bad", value)
    with pytest.raises(BundleError, match=r"io\.inputs\[0\]\.sample_shape") as caught:
        load_bundle(bad)
    assert says in str(caught.value)
    done = _check(bad)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "sample_shape" in done.stderr


def test_a_sample_shape_on_an_output_is_refused(bundle: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(bundle, tmp_path / "out"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["io"]["outputs"][0]["sample_shape"] = [1, 16, SIDE, SIDE]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"io\.outputs\[0\]\.sample_shape: only inputs"):
        load_bundle(root)


def test_the_signature_covers_the_sample_shape(bundle: Path, tmp_path: Path) -> None:
    from sdk.signing import generate_signing_key, sign_bundle

    key = generate_signing_key(tmp_path / "keys")
    assert key.public is not None
    signed = Path(shutil.copytree(bundle, tmp_path / "signed"))
    sign_bundle(signed, key.private)
    loaded = load_bundle(signed, trusted_keys=[key.public])
    assert loaded.manifest.io.inputs[0].sample_shape == (1, CHANNELS, SIDE, SIDE)
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["io"]["inputs"][0]["sample_shape"] = [1, CHANNELS, SIDE * 2, SIDE * 2]
    (signed / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(BundleError, match="signature"):
        load_bundle(signed, trusted_keys=[key.public])
