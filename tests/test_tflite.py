"""TFLite export (litert-torch) and int8 quantization (ai-edge-quantizer), run in LiteRT.

Acceptance: the trained digits CNN exported to TFLite fp32 and quantized to int8 runs in
ai-edge-litert with outputs matching ONNX Runtime's on the fp32 ONNX export:

* fp32 TFLite vs ORT fp32: max |diff| on the logits over the whole test split < ``FP32_TOL``;
* int8 TFLite (static_wi8_ai8, calibrated on ``x_cal``) vs ORT fp32: top-1 agreement on the test
  split >= ``INT8_MIN_AGREEMENT``, accuracy drop <= ``INT8_MAX_ACCURACY_DROP``, and the 99th
  percentile of |logit difference| < ``INT8_P99_LOGIT_TOL`` (test logits span about -40..30).

Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sdk
from device_agent.runtime import ModelSession, litert_interpreter_class, open_session
from sdk.artifact import ModelArtifact
from sdk.errors import ConfigError, DataError, ModelFormatError
from sdk.quantize.litert import RECIPES, quantize_tflite
from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME

pytestmark = [
    pytest.mark.tflite,
    pytest.mark.slow,
    # torch.export inside litert-torch 0.10 uses a pytree API that torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.* is deprecated:FutureWarning"),
]

FP32_TOL = 1e-4
INT8_MIN_AGREEMENT = 0.98
INT8_MAX_ACCURACY_DROP = 0.01
INT8_P99_LOGIT_TOL = 0.5
WEIGHT_ONLY_MIN_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def digits_tflite(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> ModelArtifact:
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    model, _ = trained_digits
    # One sample at a time, as a board runs it.
    example = torch.from_numpy(digits_splits.x_cal[:1])
    out = tmp_path_factory.mktemp("tflite") / "digits.tflite"
    return sdk.export(
        model,
        (example,),
        to="tflite",
        path=out,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )


@pytest.fixture(scope="module")
def digits_int8(digits_tflite: ModelArtifact, digits_splits: Any) -> ModelArtifact:
    pytest.importorskip("ai_edge_quantizer")
    out = digits_tflite.path.with_name("digits.int8.tflite")
    return quantize_tflite(digits_tflite, digits_splits.x_cal, out, recipe="static_wi8_ai8")


def _logits(session: ModelSession, x: np.ndarray) -> np.ndarray:
    """Run all of ``x`` in batches of the model's fixed batch size (or all at once)."""
    first = session.io.inputs[0].shape[0]
    step = first if isinstance(first, int) else len(x)
    parts = [session.run({INPUT_NAME: x[i : i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(parts)


def test_tflite_export_uses_the_given_names(digits_tflite: ModelArtifact) -> None:
    assert digits_tflite.format == "tflite"
    assert digits_tflite.io.input_names == (INPUT_NAME,)
    assert [o.name for o in digits_tflite.io.outputs] == [OUTPUT_NAME]
    interpreter_cls, _, _ = litert_interpreter_class()
    interp = interpreter_cls(model_path=str(digits_tflite.path))
    assert interp.get_signature_list() == {
        "serving_default": {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]}
    }
    assert [d["name"] for d in interp.get_input_details()] == [INPUT_NAME]
    assert [d["name"] for d in interp.get_output_details()] == [OUTPUT_NAME]
    # litert-torch 0.10 cannot keep a batch dynamic through Flatten: the example's batch stays.
    assert digits_tflite.details["dynamic_batch"] is False
    assert digits_tflite.io.inputs[0].shape == (1, 1, 8, 8)
    assert digits_tflite.details["max_abs_diff"] < FP32_TOL


def test_fp32_tflite_matches_onnx_runtime(
    digits_tflite: ModelArtifact,
    digits_onnx: ModelArtifact,
    digits_splits: Any,
    trained_digits: tuple[Any, float],
) -> None:
    x, y = digits_splits.x_test, digits_splits.y_test
    ort = _logits(open_session(digits_onnx.path, threads=1), x)
    tfl = _logits(open_session(digits_tflite.path, threads=1), x)
    diff = float(np.abs(tfl - ort).max())
    acc_ort = float((ort.argmax(1) == y).mean())
    acc_tfl = float((tfl.argmax(1) == y).mean())
    print(
        f"\nfp32 TFLite vs ORT fp32 on {len(x)} test images: max |diff| {diff:.3g} "
        f"(tolerance {FP32_TOL:g}); accuracy ORT {acc_ort:.4f}, TFLite {acc_tfl:.4f}, "
        f"PyTorch {trained_digits[1]:.4f}; sizes ONNX {digits_onnx.size_bytes} B, "
        f"TFLite {digits_tflite.size_bytes} B"
    )
    assert trained_digits[1] >= 0.95
    assert diff < FP32_TOL
    assert acc_tfl == acc_ort


def test_int8_tflite_agrees_with_onnx_runtime_fp32(
    digits_int8: ModelArtifact,
    digits_tflite: ModelArtifact,
    digits_onnx: ModelArtifact,
    digits_splits: Any,
) -> None:
    x, y = digits_splits.x_test, digits_splits.y_test
    assert digits_int8.precision == "int8"
    assert digits_int8.recipe == "litert-static_wi8_ai8"
    assert digits_int8.io == digits_tflite.io
    # Really integer: the interpreter's input and output tensors are int8.
    interpreter_cls, _, _ = litert_interpreter_class()
    interp = interpreter_cls(model_path=str(digits_int8.path))
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8

    ort = _logits(open_session(digits_onnx.path, threads=1), x)
    q = _logits(open_session(digits_int8.path, threads=1), x)
    agreement = float((q.argmax(1) == ort.argmax(1)).mean())
    acc_ort = float((ort.argmax(1) == y).mean())
    acc_q = float((q.argmax(1) == y).mean())
    diff = float(np.abs(q - ort).max())
    p99 = float(np.percentile(np.abs(q - ort), 99))
    print(
        f"\nint8 TFLite (static_wi8_ai8, {digits_int8.details['calibration_samples']} calibration "
        f"images) vs ORT fp32 on {len(x)} test images: top-1 agreement {agreement:.4f} "
        f"(>= {INT8_MIN_AGREEMENT}), accuracy {acc_q:.4f} vs {acc_ort:.4f} "
        f"(drop {acc_ort - acc_q:+.4f}, <= {INT8_MAX_ACCURACY_DROP}), |diff| on logits: 99th "
        f"percentile {p99:.3g} (< {INT8_P99_LOGIT_TOL}), max {diff:.3g}; "
        f"size {digits_int8.size_bytes} B vs fp32 {digits_tflite.size_bytes} B "
        f"({digits_tflite.size_bytes / digits_int8.size_bytes:.2f}x smaller)"
    )
    assert agreement >= INT8_MIN_AGREEMENT
    assert acc_ort - acc_q <= INT8_MAX_ACCURACY_DROP
    assert p99 < INT8_P99_LOGIT_TOL
    assert digits_int8.size_bytes < digits_tflite.size_bytes / 3


@pytest.mark.parametrize("recipe", ["dynamic_wi8_afp32", "weight_only_wi4_afp32"])
def test_calibration_free_recipes(
    recipe: str,
    digits_tflite: ModelArtifact,
    digits_onnx: ModelArtifact,
    digits_splits: Any,
    tmp_path: Path,
) -> None:
    pytest.importorskip("ai_edge_quantizer")
    art = quantize_tflite(digits_tflite, None, tmp_path / f"{recipe}.tflite", recipe=recipe)
    assert art.recipe == f"litert-{recipe}"
    assert art.precision == RECIPES[recipe].precision
    x = digits_splits.x_test
    ort = _logits(open_session(digits_onnx.path, threads=1), x)
    q = _logits(open_session(art.path, threads=1), x)
    agreement = float((q.argmax(1) == ort.argmax(1)).mean())
    print(
        f"\n{recipe}: top-1 agreement with ORT fp32 {agreement:.4f}, size {art.size_bytes} B "
        f"(fp32 {digits_tflite.size_bytes} B)"
    )
    assert agreement >= WEIGHT_ONLY_MIN_AGREEMENT
    assert art.size_bytes < digits_tflite.size_bytes


def test_dynamic_batch_tflite_export(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    art = sdk.export(
        model,
        torch.randn(3, 1, 8, 8),
        to="tflite",
        path=tmp_path / "conv.tflite",
        input_names=["image"],
        output_names=["features"],
    )
    assert art.details["dynamic_batch"] is True
    assert art.io.inputs[0].shape == ("batch", 1, 8, 8)
    assert art.io.outputs[0].shape == ("batch", 4, 6, 6)
    assert sdk.read_artifact(art.path).io == art.io  # the file itself records the batch axis
    session = open_session(art.path, threads=1)
    for n in (1, 5):
        x = torch.randn(n, 1, 8, 8)
        (got,) = session.run({"image": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


def test_unknown_recipe_lists_the_known_ones(digits_tflite: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown .*'int3'.*static_wi8_ai8.*weight_only_wi4"):
        quantize_tflite(digits_tflite, None, tmp_path / "q.tflite", recipe="int3")


def test_bad_calibration_data_is_a_data_error(
    digits_tflite: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    out = tmp_path / "q.tflite"
    with pytest.raises(DataError, match="needs calibration data"):
        quantize_tflite(digits_tflite, None, out)
    with pytest.raises(DataError, match=r"calibration data: input 'image' has shape \(5, 64\)"):
        quantize_tflite(digits_tflite, digits_splits.x_cal[:5].reshape(5, 64), out)
    with pytest.raises(DataError, match="missing input 'image'"):
        quantize_tflite(digits_tflite, {"pixels": digits_splits.x_cal}, out)
    assert not out.exists()


def test_onnx_model_is_refused(digits_onnx: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"takes a \.tflite model, got onnx"):
        quantize_tflite(digits_onnx, None, tmp_path / "q.tflite", recipe="dynamic_wi8_afp32")
