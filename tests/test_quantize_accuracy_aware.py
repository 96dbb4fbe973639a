"""Accuracy-aware int8: tensor ranking, the exclusion search, and the acceptance run on a digits
CNN whose first activation has outlier channels (plain static int8 loses points there)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdk
from sdk.errors import ConfigError
from sdk.quantize import QuantizeConfig
from sdk.quantize.accuracy_aware import accuracy_aware_quantize
from sdk.quantize.ranking import rank_tensors
from tests.helpers import write_mlp_onnx
from tests.int8_host import HOST_REDUCE_RANGE


def _mlp_data(model: Path, n: int = 128) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration inputs and eval data labelled with the fp32 model's own predictions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    import onnxruntime as ort

    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    return {"x": x}, {"x": x, "labels": logits.argmax(1).astype(np.int64)}


def test_ranks_every_quantized_tensor_of_an_mlp(tmp_path: Path) -> None:
    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal, _ = _mlp_data(model)
    int8 = sdk.quantize(model, cal, out=tmp_path / "mlp.int8.onnx")
    ranked = rank_tensors(int8, sdk.load_dataset(cal, int8.io), model)
    by_name = {t.tensor: t for t in ranked}
    assert {"w1", "w2"} <= set(by_name)  # weights, named as in the fp32 model
    assert by_name["w1"].kind == "weight" and by_name["w1"].nodes == ("fc1",)
    activations = [t for t in ranked if t.kind == "activation"]
    assert activations and all(t.nodes for t in activations)
    assert [t.error for t in ranked] == sorted((t.error for t in ranked), reverse=True)
    assert all(0 <= t.error < 0.05 for t in ranked)  # a well-behaved model quantizes well


def test_ranks_a_model_exported_at_a_fixed_batch(tmp_path: Path) -> None:
    """EfficientNet-Lite0 exported at batch 1 (benchmarks/conv_int8.py): the ranking probe ran
    32 samples at a time and ONNX Runtime refused them ('Got: 32 Expected: 1'), so the
    accuracy-aware candidate failed. The probe now takes the batch the model was exported at."""
    import onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal, _ = _mlp_data(model)
    proto = onnx.load(str(model))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(model))
    int8 = sdk.quantize(model, cal, out=tmp_path / "mlp.int8.onnx")
    ranked = rank_tensors(int8, sdk.load_dataset(cal, int8.io), model)
    assert {"w1", "w2"} <= {t.tensor for t in ranked}
    assert all(0 <= t.error < 0.05 for t in ranked)
    # A second input with a free batch beside the fixed one: the fixed one decides.
    from sdk.quantize.ranking import _fixed_batch

    proto.graph.input.append(onnx.helper.make_tensor_value_info("m", 1, ["N", 4]))
    assert _fixed_batch(proto, {"x", "m"}) == 1
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert _fixed_batch(proto, {"x", "m"}) is None


def test_within_budget_at_once_excludes_nothing(tmp_path: Path) -> None:
    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal, ev = _mlp_data(model)
    # 7-bit weights where this host's int8 kernels saturate (tests/int8_host.py): plain int8
    # of this MLP is within the budget on every CPU then.
    art, report = accuracy_aware_quantize(
        model,
        cal,
        ev,
        max_drop=0.05,
        out=tmp_path / "out" / "mlp.aaq.onnx",
        config=QuantizeConfig(reduce_range=HOST_REDUCE_RANGE),
    )
    assert report.met and report.excluded == () and len(report.steps) == 1
    assert report.tensors == ()  # no ranking needed
    assert art.path == tmp_path / "out" / "mlp.aaq.onnx" and art.path.is_file()
    assert art.precision == "int8" and art.details["accuracy_aware"]["met"] is True
    assert "plain int8" in report.summary()


def test_bad_settings(tmp_path: Path) -> None:
    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal, ev = _mlp_data(model, 16)
    out = tmp_path / "x.onnx"
    with pytest.raises(ConfigError, match="static"):
        accuracy_aware_quantize(model, cal, ev, out=out, config=QuantizeConfig(mode="dynamic"))
    with pytest.raises(ConfigError, match="max_drop"):
        accuracy_aware_quantize(model, cal, ev, out=out, max_drop=-0.1)
    with pytest.raises(ConfigError, match=r"\.onnx"):
        accuracy_aware_quantize(model, cal, ev, out=tmp_path / "x.tflite")


@pytest.mark.slow
def test_acceptance_outlier_channels_recovered_within_a_point(
    digits_splits: Any, tmp_path: Path
) -> None:
    import torch

    from sdk.training import torch_threads
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, add_outlier_channels, train_digits_cnn

    s = digits_splits
    with torch_threads(1):
        model, _ = train_digits_cnn(s, seed=0)
    outliers = add_outlier_channels(copy.deepcopy(model), channels=(0, 1), scale=300.0)
    example = torch.from_numpy(s.x_cal[:4])
    with torch.no_grad():  # the rescaling does not change what the model computes
        torch.testing.assert_close(outliers(example), model(example), rtol=1e-4, atol=1e-4)
        act = torch.relu(outliers[0](torch.from_numpy(s.x_cal))).amax(dim=(0, 2, 3))
    typical = float(act.median())
    fp32 = sdk.export(
        outliers,
        (example,),
        to="onnx",
        path=tmp_path / "outliers.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    cal = {INPUT_NAME: s.x_cal}
    ev = {INPUT_NAME: s.x_test, "labels": s.y_test}

    art, report = accuracy_aware_quantize(
        fp32, cal, ev, max_drop=0.01, out=tmp_path / "outliers.aaq.onnx"
    )
    print(
        f"\nfirst activation: channel maxima {float(act.max()):.0f} (outliers) vs median "
        f"{typical:.2f}\nfp32 accuracy {report.fp32_quality.accuracy:.4f}\n{report.summary()}"
    )
    assert float(act.max()) > 100 * typical
    assert report.plain_drop is not None and report.plain_drop > 0.01
    assert report.met and report.drop <= 0.01
    # The convs around the outlier activation stay in float (and the Relu between them,
    # which the default op set leaves unquantized anyway).
    assert {"/0/Conv", "/2/Conv"} <= set(report.excluded) <= {"/0/Conv", "/1/Relu", "/2/Conv"}
    # The outlier activation, read before or after its ReLU (whichever the op set quantizes).
    outlier = {"/0/Conv_output_0", "/1/Relu_output_0"}  # the same activation around its ReLU
    top = [t for t in report.tensors if t.tensor in outlier]
    rest = [t for t in report.tensors if t.tensor not in outlier]
    assert report.tensors[0].tensor in outlier
    assert rest and min(t.error for t in top) > 100 * max(t.error for t in rest)
    assert {n.node for n in report.nodes[:3]} == {"/0/Conv", "/1/Relu", "/2/Conv"}
    assert art.details["excluded_nodes"] == list(report.excluded)
    assert art.details["quantized_nodes"] > 0  # the rest of the model is still int8
    again = sdk.evaluate(art.path, sdk.load_dataset(ev, art.io))
    assert again.accuracy is not None and report.fp32_quality.accuracy is not None
    assert report.fp32_quality.accuracy - again.accuracy <= 0.01

    # A budget that cannot be met is a result: the best model found, met=False, a note.
    capped, unmet = accuracy_aware_quantize(
        fp32, cal, ev, max_drop=0.01, max_excluded=1, out=tmp_path / "capped.onnx"
    )
    assert not unmet.met and unmet.excluded == () and unmet.drop == unmet.plain_drop
    assert any("max_excluded=1" in n for n in unmet.notes)
    assert capped.details["accuracy_aware"]["met"] is False
