"""sdk.quantize and sdk.evaluate on real models: the digits CNN and small hand-built ONNX graphs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import load_dataset
from sdk.errors import ConfigError, DataError
from sdk.evaluate import Quality, accuracy_drop, evaluate
from sdk.quantize import QuantizeConfig, quantize
from sdk.zoo.digits import INPUT_NAME
from tests.int8_host import HOST_REDUCE_RANGE

RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _op_types(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    from device_agent.runtime import open_session

    return open_session(path, threads=1).run(feed)


@pytest.fixture(scope="module")
def eval_set(digits_onnx: ModelArtifact, digits_npz: dict[str, Path]) -> Any:
    return load_dataset(digits_npz["eval"], digits_onnx.io, what="eval data")


@pytest.fixture(scope="module")
def fp32_quality(digits_onnx: ModelArtifact, eval_set: Any) -> Quality:
    quality = evaluate(digits_onnx, eval_set)
    assert quality.accuracy is not None and quality.accuracy >= 0.95
    return quality


# --- acceptance: the digits CNN -----------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_digits_is_small_and_accurate(
    method: str,
    digits_onnx: ModelArtifact,
    digits_npz: dict[str, Path],
    eval_set: Any,
    fp32_quality: Quality,
    tmp_path: Path,
) -> None:
    config = QuantizeConfig(method=method)  # type: ignore[arg-type]
    int8 = quantize(digits_onnx, digits_npz["calibration"], out=tmp_path / "q.onnx", config=config)

    quality = evaluate(int8, eval_set, reference=digits_onnx)
    drop = accuracy_drop(quality, fp32_quality)
    ratio = int8.size_bytes / digits_onnx.size_bytes
    print(
        f"\n[digits static {method}] fp32 {digits_onnx.size_bytes} B"
        f" acc {fp32_quality.accuracy:.4f}"
        f" | int8 {int8.size_bytes} B ({ratio:.3f}x) acc {quality.accuracy:.4f}"
        f" drop {drop * 100:+.2f} pts agreement {quality.agreement:.4f}"
        f" cosine mean/min {quality.cosine_mean:.5f}/{quality.cosine_min:.5f}"
    )
    assert ratio <= 0.30
    assert drop <= 0.01
    assert int8.precision == "int8"
    assert int8.recipe == f"ort-static-int8-qdq-{method}"
    assert int8.details["method"] == method
    assert int8.details["per_channel"] is True
    assert int8.details["calibration_samples"] == len(
        np.load(digits_npz["calibration"])[INPUT_NAME]
    )
    assert int8.details["fallbacks"] == []
    assert int8.details["check"]["inputs"] == "calibration"
    assert int8.io.input_names == digits_onnx.io.input_names

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8.path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # QDQ format
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv_weight_scales = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and inits.get(n.input[0]) is not None
        and inits[n.input[0]].dtype == np.int8
        and inits[n.input[0]].ndim == 4
    ]
    assert conv_weight_scales and all(s.size > 1 for s in conv_weight_scales)  # per channel


def test_dynamic_int8_digits_needs_no_data(
    digits_onnx: ModelArtifact, eval_set: Any, fp32_quality: Quality, tmp_path: Path
) -> None:
    int8 = quantize(digits_onnx, out=tmp_path / "dyn.onnx", config=QuantizeConfig(mode="dynamic"))
    quality = evaluate(int8, eval_set, reference=digits_onnx)
    drop = accuracy_drop(quality, fp32_quality)
    print(
        f"\n[digits dynamic] int8 {int8.size_bytes} B "
        f"({int8.size_bytes / digits_onnx.size_bytes:.3f}x) acc {quality.accuracy:.4f} "
        f"drop {drop * 100:+.2f} pts agreement {quality.agreement:.4f}"
    )
    assert int8.recipe == "ort-dynamic-int8" and int8.precision == "int8"
    assert int8.details["calibration_samples"] == 0
    assert int8.details["check"]["inputs"] == "generated"
    assert "MatMulInteger" in _op_types(int8.path) or "ConvInteger" in _op_types(int8.path)
    assert drop <= 0.02


# --- calibration sources ------------------------------------------------------------------


def _per_sample(x: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for sample in x:  # (1, 8, 8): rank one less than the model's input
        yield {INPUT_NAME: sample}


@pytest.mark.parametrize("kind", ["npz", "dict", "iterable"])
def test_calibration_sources_give_the_same_loadable_model(
    kind: str,
    digits_onnx: ModelArtifact,
    digits_npz: dict[str, Path],
    digits_splits: Any,
    tmp_path: Path,
) -> None:
    x_cal = digits_splits.x_cal
    source: Any = {
        "npz": digits_npz["calibration"],
        "dict": {INPUT_NAME: x_cal},
        "iterable": _per_sample(x_cal),
    }[kind]
    int8 = quantize(digits_onnx, source, out=tmp_path / f"{kind}.onnx")
    reference = quantize(digits_onnx, {INPUT_NAME: x_cal}, out=tmp_path / "ref.onnx")

    assert int8.details["calibration_samples"] == len(x_cal)
    feed = {INPUT_NAME: digits_splits.x_test[:32]}
    got = _run(int8.path, feed)[0]
    assert got.shape == (32, 10)
    np.testing.assert_array_equal(got, _run(reference.path, feed)[0])


def test_batched_calibration_matches_one_pass(
    digits_onnx: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    """Calibrating 7 samples at a time gives the ranges of one pass over all of them."""
    import onnx
    from onnx import numpy_helper

    data = {INPUT_NAME: digits_splits.x_cal}
    small = quantize(
        digits_onnx, data, out=tmp_path / "b7.onnx", config=QuantizeConfig(batch_size=7)
    )
    whole = quantize(
        digits_onnx, data, out=tmp_path / "all.onnx", config=QuantizeConfig(batch_size=10_000)
    )

    def scales(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        return {
            i.name: numpy_helper.to_array(i) for i in model.graph.initializer if "scale" in i.name
        }

    a, b = scales(small.path), scales(whole.path)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
    assert small.details["calibration_batch_size"] == 7


def test_max_calibration_samples_caps_the_data(
    digits_onnx: ModelArtifact, digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    config = QuantizeConfig(max_calibration_samples=50, batch_size=16)
    int8 = quantize(digits_onnx, digits_npz["calibration"], out=tmp_path / "q.onnx", config=config)
    assert int8.details["calibration_samples"] == 50


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"pixels": np.zeros((8, 1, 8, 8), np.float32)}, "missing input 'image'"),
        ({INPUT_NAME: np.zeros((8, 1, 9, 9), np.float32)}, "input 'image' has shape (8, 1, 9, 9)"),
        ({INPUT_NAME: np.zeros((8, 64), np.float32)}, "input 'image' has shape (8, 64) (rank 2)"),
        ({INPUT_NAME: np.array([["a"] * 8] * 8)}, "input 'image' has dtype"),
        ({INPUT_NAME: np.zeros((8, 1, 8, 8), np.complex64)}, "input 'image' has dtype complex64"),
    ],
)
def test_calibration_data_that_does_not_fit_names_the_input(
    data: dict[str, np.ndarray], needle: str, digits_onnx: ModelArtifact, tmp_path: Path
) -> None:
    with pytest.raises(DataError) as info:
        quantize(digits_onnx, data, out=tmp_path / "q.onnx")
    print(f"\n[DataError] {info.value}")
    assert str(info.value).startswith("calibration data:")
    assert needle in str(info.value)
    assert not (tmp_path / "q.onnx").exists()


def test_static_without_calibration_says_what_to_do(
    digits_onnx: ModelArtifact, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"--calibration.*dynamic"):
        quantize(digits_onnx, out=tmp_path / "q.onnx")


def test_bad_settings_are_config_errors(digits_onnx: ModelArtifact, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method"):
        QuantizeConfig(method="kl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        QuantizeConfig(batch_size=0)
    with pytest.raises(ConfigError, match="has a node named 'nope'"):
        quantize(
            digits_onnx,
            out=tmp_path / "q.onnx",
            config=QuantizeConfig(mode="dynamic", exclude_nodes=("nope",)),
        )
    with pytest.raises(ConfigError, match="over its fp32 source"):
        quantize(digits_onnx, out=digits_onnx.path, config=QuantizeConfig(mode="dynamic"))


def test_excluded_nodes_stay_float(
    digits_onnx: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    import onnx

    fp32 = onnx.load(str(digits_onnx.path))
    last = [n.name for n in fp32.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    config = QuantizeConfig(exclude_nodes=(last,))
    int8 = quantize(
        digits_onnx, {INPUT_NAME: digits_splits.x_cal}, out=tmp_path / "q.onnx", config=config
    )
    node = next(n for n in onnx.load(str(int8.path)).graph.node if n.name == last)
    weights = {i.name for i in onnx.load(str(int8.path)).graph.initializer}
    assert node.input[1] in weights  # still a float initializer, not a DequantizeLinear output
    assert int8.details["excluded_nodes"] == [last]


# --- models ORT's tooling finds hard ------------------------------------------------------


def _opset11_model(path: Path) -> Path:
    """Conv -> Relu -> Flatten -> MatMul -> Add -> Relu at opset 11."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu1"),
            helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
            helper.make_node("MatMul", ["f", "M"], ["m"], name="matmul"),
            helper.make_node("Add", ["m", "b2"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["y"], name="relu2"),
        ],
        "opset11",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(_f32(4, 1, 3, 3), "W"),
            numpy_helper.from_array(_f32(4), "B"),
            numpy_helper.from_array(_f32(256, 10), "M"),
            numpy_helper.from_array(_f32(10), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return _save(model, path)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_old_opset_is_upgraded(mode: str, tmp_path: Path) -> None:
    from sdk.onnx_tools import MIN_QUANT_OPSET, load_onnx, opset_of

    source = read_artifact(_opset11_model(tmp_path / "op11.onnx"))
    x = _f32(64, 1, 8, 8)
    # 7-bit weights where this host's int8 kernels saturate (tests/int8_host.py).
    config = QuantizeConfig(mode=mode, reduce_range=HOST_REDUCE_RANGE)  # type: ignore[arg-type]
    int8 = quantize(source, {"x": x}, out=tmp_path / "q.onnx", config=config)

    print(
        f"\n[opset 11 {mode}] fallbacks {int8.details['fallbacks']} check {int8.details['check']}"
    )
    assert any("opset 11 to 13" in f for f in int8.details["fallbacks"])
    assert opset_of(load_onnx(int8.path)) >= MIN_QUANT_OPSET
    assert int8.details["check"]["cosine_min"] > 0.99
    quality = evaluate(int8, load_dataset({"x": x}, source.io), reference=source)
    assert quality.cosine_mean is not None and quality.cosine_mean > 0.99


def test_runtime_refusal_excludes_the_node_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantized at opset 11, ORT's per-channel weight DequantizeLinear carries an ``axis``
    attribute that opset 11 lacks, so ONNX Runtime refuses the model and names the node: the
    quantizer must keep the node behind it in float and try again (the activation-only Gram
    MatMul stays quantized) rather than hand over a model that does not load."""
    from onnx import TensorProto, helper, numpy_helper

    import sdk.onnx_tools

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"),
            helper.make_node("Relu", ["m"], ["r"], name="relu"),
            helper.make_node("Transpose", ["r"], ["rt"], name="transpose", perm=[1, 0]),
            helper.make_node("MatMul", ["r", "rt"], ["y"], name="gram"),
        ],
        "gram",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "N"])],
        [numpy_helper.from_array(_f32(16, 16), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    # Stop the opset upgrade, the very fallback that normally prevents this refusal.
    monkeypatch.setattr(sdk.onnx_tools, "MIN_QUANT_OPSET", 11)
    source = read_artifact(_save(model, tmp_path / "gram.onnx"))
    int8 = quantize(source, {"x": _f32(40, 16)}, out=tmp_path / "q.onnx")

    print(f"\n[refusal] excluded {int8.details['excluded_nodes']}")
    for note in int8.details["fallbacks"]:
        print(f"  fallback: {note}")
    assert int8.details["excluded_nodes"] == ["dense"]
    assert any(
        "refused quantized node 'W_DequantizeLinear'" in f for f in int8.details["fallbacks"]
    )
    assert not any("/tmp/" in f for f in int8.details["fallbacks"])  # no temporary paths
    assert int8.details["quantized_nodes"] > 0
    assert int8.details["check"]["cosine_min"] > 0.99
    assert _run(int8.path, {"x": _f32(3, 16)})[0].shape == (3, 3)


def _token_model(path: Path) -> Path:
    """int64 token ids -> Gather (embedding) -> ReduceMean -> MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["e"], axis=0, name="embed"),
            helper.make_node("ReduceMean", ["e"], ["p"], axes=[1], keepdims=0, name="pool"),
            helper.make_node("MatMul", ["p", "W"], ["y"], name="proj"),
        ],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(_f32(500, 64), "E"), numpy_helper.from_array(_f32(64, 16), "W")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_integer_inputs_stay_integer(mode: str, tmp_path: Path) -> None:
    source = read_artifact(_token_model(tmp_path / "tokens.onnx"))
    ids = RNG.integers(0, 500, size=(96, 12)).astype(np.int64)
    config = QuantizeConfig(mode=mode)  # type: ignore[arg-type]
    calibration = {"ids": ids} if mode == "static" else None
    int8 = quantize(source, calibration, out=tmp_path / "q.onnx", config=config)

    assert [(s.name, s.dtype) for s in int8.io.inputs] == [("ids", "int64")]
    ops = _op_types(int8.path)
    assert ("DequantizeLinear" in ops) if mode == "static" else ("MatMulInteger" in ops)
    quality = evaluate(int8, load_dataset({"ids": ids}, source.io), reference=source)
    ratio = int8.size_bytes / source.size_bytes
    print(f"\n[tokens {mode}] {ops} size {ratio:.3f}x cosine {quality.cosine_mean:.5f}")
    assert quality.cosine_mean is not None and quality.cosine_mean > 0.99
    assert ratio < 0.5  # the embedding table and the projection are stored as int8


def test_symbolic_shape_inference_failure_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two inputs whose dynamic axes have different names ('batch', 'batch_size') defeat ORT's
    symbolic shape inference; pre-processing must go on without it, and the debug model ORT
    saves into the working directory when it fails must not land in the user's."""
    from onnx import TensorProto, helper, numpy_helper

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
            helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
        ],
        "mixed-dims",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch_size", 32]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(_f32(32, 32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = read_artifact(_save(model, tmp_path / "mixed.onnx"))
    data = {"x": _f32(40, 32), "bias": _f32(40, 32)}
    int8 = quantize(source, data, out=tmp_path / "q.onnx")

    print(f"\n[pre-processing] fallbacks {int8.details['fallbacks']}")
    assert any("without symbolic shape inference" in f for f in int8.details["fallbacks"])
    assert int8.details["check"]["cosine_min"] > 0.99
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_model_with_nothing_to_quantize_is_an_error(mode: str, tmp_path: Path) -> None:
    """ORT quantizes float32 tensors only: a float64 model would come back unchanged, and an
    'int8' artifact that is really fp32 would mislead every later stage."""
    from onnx import TensorProto, helper, numpy_helper

    from sdk.errors import QuantizationError

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
        "float64",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 8])],
        [numpy_helper.from_array(_f32(8, 8).astype(np.float64), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = _save(model, tmp_path / "f64.onnx")
    config = QuantizeConfig(mode=mode)  # type: ignore[arg-type]
    with pytest.raises(QuantizationError, match=r"^quantization: .*quantized nothing.*MatMul"):
        quantize(
            source, {"x": _f32(16, 8).astype(np.float64)}, out=tmp_path / "q.onnx", config=config
        )
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_with_nothing_to_collect_says_why(
    method: str, tmp_path: Path
) -> None:
    """Entropy and percentile calibration of a model with none of the quantized op types
    (element-wise float arithmetic only) failed with ORT's internal 'Histogram has not been
    collected. Please run collect() first.': now the same one line as minmax gives."""
    from onnx import TensorProto, helper, numpy_helper

    from sdk.errors import QuantizationError

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "a"], ["m"], name="scale"),
            helper.make_node("Add", ["m", "b"], ["y"], name="shift"),
        ],
        "elementwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(_f32(8), "a"), numpy_helper.from_array(_f32(8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = _save(model, tmp_path / "elementwise.onnx")
    config = QuantizeConfig(method=method)  # type: ignore[arg-type]
    with pytest.raises(QuantizationError) as raised:
        quantize(source, {"x": _f32(16, 8)}, out=tmp_path / "q.onnx", config=config)
    message = str(raised.value)
    assert message.startswith("quantization: ONNX Runtime quantized nothing in this model")
    assert "Add, Mul" in message and "Histogram" not in message
    assert not (tmp_path / "q.onnx").exists()


# --- evaluate -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_batch_one(
    trained_digits: Any, digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> ModelArtifact:
    """The digits CNN exported with its batch axis fixed at 1."""
    import torch

    import sdk
    from sdk.zoo.digits import OUTPUT_NAME

    model, _ = trained_digits
    artifact = sdk.export(
        model,
        (torch.from_numpy(digits_splits.x_cal[:1]),),
        to="onnx",
        path=tmp_path_factory.mktemp("b1") / "b1.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_batch=False,
    )
    assert artifact.io.inputs[0].shape[0] == 1
    return artifact


def test_evaluate_handles_a_fixed_batch_of_one(
    digits_batch_one: ModelArtifact,
    digits_onnx: ModelArtifact,
    eval_set: Any,
    fp32_quality: Quality,
) -> None:
    # The fixed model as candidate and as reference of the dynamic-batch one.
    pairs = ((digits_batch_one, digits_onnx), (digits_onnx, digits_batch_one))
    for candidate, reference in pairs:
        quality = evaluate(candidate, eval_set, reference=reference, batch_size=50)
        assert quality.samples == len(eval_set)
        assert quality.accuracy == pytest.approx(fp32_quality.accuracy)
        assert quality.agreement == 1.0
        assert quality.max_abs_error is not None and quality.max_abs_error < 1e-3
        assert quality.cosine_min is not None and quality.cosine_min > 0.9999


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fixed_batch_model_quantizes(
    mode: str,
    digits_batch_one: ModelArtifact,
    digits_splits: Any,
    eval_set: Any,
    fp32_quality: Quality,
    tmp_path: Path,
) -> None:
    config = QuantizeConfig(mode=mode, max_calibration_samples=64)  # type: ignore[arg-type]
    calibration = {INPUT_NAME: digits_splits.x_cal}
    int8 = quantize(digits_batch_one, calibration, out=tmp_path / "q.onnx", config=config)
    quality = evaluate(int8, eval_set)
    print(f"\n[batch fixed at 1, {mode}] acc {quality.accuracy:.4f} check {int8.details['check']}")
    assert int8.details["check"]["samples"] == 1
    assert accuracy_drop(quality, fp32_quality) <= 0.01


def test_evaluate_rejects_an_unknown_output(digits_onnx: ModelArtifact, eval_set: Any) -> None:
    with pytest.raises(ConfigError, match="no output 'probs'"):
        evaluate(digits_onnx, eval_set, output="probs")


def test_accuracy_drop_prefers_accuracy_then_agreement() -> None:
    assert accuracy_drop(Quality(10, accuracy=0.9), Quality(10, accuracy=0.95)) == pytest.approx(
        0.05
    )
    assert accuracy_drop(Quality(10, agreement=0.97), Quality(10)) == pytest.approx(0.03)
    with pytest.raises(ConfigError):
        accuracy_drop(Quality(10), Quality(10))


# --- the default operator set, ORT's quirks, and the check (pretrained-model findings) ------


def _layer_norm_mlp(path: Path) -> Path:
    """x -> MatMul -> layer norm written out (ReduceMean, Sub, Mul, Add, Sqrt, Div) -> MatMul:
    the element-wise math around the weights that quantizing 'every op' puts on int8 grids."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1], name="mean"),
            helper.make_node("Sub", ["h", "mu"], ["d"], name="center"),
            helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
            helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], name="var"),
            helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
            helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
            helper.make_node("Div", ["d", "sd"], ["n"], name="normalize"),
            helper.make_node("MatMul", ["n", "W2"], ["y"], name="fc2"),
        ],
        "layer-norm-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "W1"),
            numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
            numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "W2"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _fed_by_dequantize(path: Path) -> set[str]:
    """Names of the nodes that have an input coming out of a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if any(i in dq for i in n.input)}


def test_default_op_types_leave_elementwise_math_in_float(tmp_path: Path) -> None:
    """Quantizing every type ORT can (Mul, Add, Sqrt, ReduceMean, ...) broke magika and
    silero-vad and hurt PaddleOCR rec; the default quantizes the weight-bearing ops only."""
    from sdk.quantize import DEFAULT_OP_TYPES
    from sdk.quantize.config import op_types_for as _op_types_for

    source = read_artifact(_layer_norm_mlp(tmp_path / "ln.onnx"))
    x = {"x": np.random.default_rng(2).standard_normal((200, 32)).astype(np.float32)}
    # 7-bit weights where this host's int8 kernels saturate (tests/int8_host.py): the cosine
    # bounds below are the model's, not the CPU's.
    rr = HOST_REDUCE_RANGE
    default = quantize(
        source, x, out=tmp_path / "default.onnx", config=QuantizeConfig(reduce_range=rr)
    )
    every = quantize(
        source, x, out=tmp_path / "all.onnx", config=QuantizeConfig(op_types=None, reduce_range=rr)
    )

    print(
        f"\n[op types] default cosine {default.details['check']['cosine_min']:.5f}, "
        f"all ops {every.details['check']['cosine_min']:.5f}"
    )
    assert QuantizeConfig().op_types == DEFAULT_OP_TYPES
    assert {"Conv", "MatMul", "Gemm"} <= set(DEFAULT_OP_TYPES)
    assert not {"Mul", "Add", "Sqrt", "ReduceMean", "Div", "Transpose"} & set(DEFAULT_OP_TYPES)
    # Folding Relu into the op before it broke silero-vad: only weight-bearing ops by default,
    # and each mode gets the ones it has kernels for (static QDQ has none for LSTM).
    assert "Relu" not in DEFAULT_OP_TYPES and "Clip" not in DEFAULT_OP_TYPES
    assert _op_types_for(QuantizeConfig()) == ["Conv", "ConvTranspose", "MatMul", "Gemm", "Gather"]
    assert "LSTM" in (_op_types_for(QuantizeConfig(mode="dynamic")) or [])
    # (fc1's output is quantized, so whatever reads it reads a DequantizeLinear: look further.)
    quantized = _fed_by_dequantize(default.path)
    assert {"fc1", "fc2"} <= quantized
    assert not quantized & {"square", "var", "add_eps", "sqrt"}
    assert {"square", "var", "add_eps", "sqrt"} <= _fed_by_dequantize(every.path)
    assert default.recipe == "ort-static-int8-qdq-minmax"
    assert every.recipe == "ort-static-int8-qdq-minmax-all-ops"
    assert default.details["check"]["cosine_min"] > every.details["check"]["cosine_min"]
    assert default.details["check"]["cosine_min"] > 0.999


def _matmul_add_2d_bias(path: Path) -> Path:
    """MatMul + Add with a (1, N) bias, which ORT's pre-processing fuses into one Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="add"),
        ],
        "gemm-2d-bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(_f32(8, 4), "W"), numpy_helper.from_array(_f32(1, 4), "b")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_fused_gemm_with_a_2d_bias_quantizes_per_channel(tmp_path: Path) -> None:
    """magika: ORT 1.32's int32-bias weight-scale adjustment raised 'The truth value of an array
    with more than one element is ambiguous' on the (1, 214) bias of a fused Gemm."""
    source = _matmul_add_2d_bias(tmp_path / "gemm.onnx")
    x = {"x": _f32(64, 8)}
    # 7-bit weights where this host's int8 saturates (0.9892 here without, AVX2 and no VNNI).
    config = QuantizeConfig(reduce_range=HOST_REDUCE_RANGE)
    int8 = quantize(source, x, out=tmp_path / "q.onnx", config=config)
    print(f"\n[gemm 2-D bias] check {int8.details['check']} fallbacks {int8.details['fallbacks']}")
    assert int8.details["fallbacks"] == []
    assert int8.details["check"]["cosine_min"] > 0.99
    assert "Gemm" in _op_types(int8.path)


def test_a_failing_bias_adjustment_is_retried_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a bias still trip ORT's adjustment, quantization retries without it (a fallback)."""
    import importlib

    module = importlib.import_module("sdk.quantize.ort")  # sdk.quantize is also the function
    monkeypatch.setattr(module, "_flatten_gemm_bias", lambda model: None)
    source = _matmul_add_2d_bias(tmp_path / "gemm.onnx")
    config = QuantizeConfig(reduce_range=HOST_REDUCE_RANGE)  # 0.9521 on AVX2 without VNNI
    int8 = quantize(source, {"x": _f32(64, 8)}, out=tmp_path / "q.onnx", config=config)
    assert any("without that adjustment" in f for f in int8.details["fallbacks"])
    assert int8.details["check"]["cosine_min"] > 0.99


def _if_model(path: Path) -> Path:
    """silero-vad's shape: the top-level graph is Equal + If on a scalar input; the MatMuls (with
    their weights as Constant nodes) live in the branches."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(name: str) -> Any:
        weight = numpy_helper.from_array(_f32(16, 8), f"W_{name}")
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"W_{name}"], value=weight),
                helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"], name=f"mm_{name}"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 8])],
        )

    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["sr", "k"], ["is16k"], name="is16k"),
            helper.make_node(
                "If",
                ["is16k"],
                ["y"],
                name="by_rate",
                then_branch=branch("then"),
                else_branch=branch("else"),
            ),
        ],
        "if-model",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(np.array(16000, np.int64), "k")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_compute_inside_if_branches_is_named(mode: str, tmp_path: Path) -> None:
    from sdk.errors import QuantizationError

    source = _if_model(tmp_path / "if.onnx")
    data = {"x": _f32(40, 16), "sr": np.array(16000)}  # a scalar input: one shared constant
    config = QuantizeConfig(mode=mode)  # type: ignore[arg-type]
    with pytest.raises(QuantizationError) as info:
        quantize(source, data, out=tmp_path / "q.onnx", config=config)
    message = str(info.value)
    print(f"\n[If] {message}")
    assert "its compute (2 MatMul) is inside the subgraphs of If nodes" in message
    assert "without control flow" in message
    assert "(Equal, If)" not in message  # the old, literal and useless operator list


def test_quantized_nodes_in_subgraphs_are_counted(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from sdk.quantize.ort_check import count_quantized_nodes as _count_quantized_nodes

    then = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "then",
        [],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, ["N"])],
    )
    other = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.UINT8)],
        "else",
        [],
        [helper.make_tensor_value_info("c", TensorProto.UINT8, ["N"])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _count_quantized_nodes(_save(model, tmp_path / "nested.onnx")) == 1


def test_exclude_accepts_a_node_named_by_preprocessing(tmp_path: Path) -> None:
    """ORT's optimizer fuses mm1 + add1 into 'mm1/MatMulAddFusion', a node that exists only in
    the pre-processed model: it can be excluded by that name (it used to be refused)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
            helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
            helper.make_node("Relu", ["a1"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["m2"], name="mm2"),
            helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
        ],
        "two-dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(_f32(8, 16), "W1"),
            numpy_helper.from_array(_f32(16), "b1"),
            numpy_helper.from_array(_f32(16, 4), "W2"),
            numpy_helper.from_array(_f32(4), "b2"),
        ],
    )
    source = _save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "two.onnx",
    )
    fused = "mm1/MatMulAddFusion"
    assert fused not in [n.name for n in onnx.load(str(source)).graph.node]
    config = QuantizeConfig(exclude_nodes=(fused,))
    int8 = quantize(source, {"x": _f32(64, 8)}, out=tmp_path / "q.onnx", config=config)

    model = onnx.load(str(int8.path))
    node = next(n for n in model.graph.node if n.name == fused)
    assert node.input[1] in {i.name for i in model.graph.initializer}  # a float weight
    assert int8.details["excluded_nodes"] == [fused] and int8.details["quantized_nodes"] > 0
    with pytest.raises(ConfigError, match="neither the model nor its pre-processed form"):
        quantize(
            source,
            {"x": _f32(64, 8)},
            out=tmp_path / "q2.onnx",
            config=QuantizeConfig(exclude_nodes=("mm1/NoSuchFusion",)),
        )


def test_the_check_says_what_it_ran_on(tmp_path: Path) -> None:
    """Without calibration data the dynamic-mode check runs on random inputs, which shows the
    model runs but not its accuracy; with calibration data it runs on that."""
    source = _matmul_add_2d_bias(tmp_path / "gemm.onnx")
    config = QuantizeConfig(mode="dynamic")
    blind = quantize(source, out=tmp_path / "blind.onnx", config=config)
    real = quantize(source, {"x": _f32(40, 8)}, out=tmp_path / "real.onnx", config=config)
    assert blind.details["check"]["inputs"] == "generated"
    assert "not how accurate it is" in blind.details["check"]["note"]
    assert real.details["check"]["inputs"] == "calibration"
    assert real.details["check"]["samples"] == 16 and "note" not in real.details["check"]


def test_a_one_value_output_is_checked_across_samples() -> None:
    """silero-vad's speech probability is (N, 1): a per-sample cosine of one positive value is
    always 1, so the check compares the column across samples instead."""
    from device_agent.contracts.bundle import IOSpec, TensorSpec
    from sdk.quantize.ort_check import _compare

    io = IOSpec((TensorSpec("x", "float32", ("N", 4)),), (TensorSpec("p", "float32", ("N", 1)),))
    fp32 = np.array([[0.9], [0.1], [0.8], [0.2]], np.float32)
    int8 = np.array([[0.1], [0.9], [0.2], [0.8]], np.float32)  # every decision flipped
    check = _compare(io, [int8], [fp32], "calibration", 4)
    assert check["cosine_min"] == pytest.approx(0.5 / 1.5)
    assert _compare(io, [fp32], [fp32], "calibration", 4)["cosine_min"] == pytest.approx(1.0)


def test_a_bad_check_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sdk.quantize.ort_check import warn_on_check as _warn_on_check

    caplog.set_level(logging.WARNING, logger="sdk.quantize")
    _warn_on_check({"inputs": "calibration", "cosine_min": 0.027}, QuantizeConfig())
    _warn_on_check({"inputs": "generated", "cosine_min": 0.5}, QuantizeConfig())  # says little
    _warn_on_check({"inputs": "calibration", "cosine_min": 0.999}, QuantizeConfig())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "worst-sample cosine 0.027" in warnings[0]


def test_ort_output_is_kept_off_the_terminal(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """ORT's quantizer calls logging.warning() on the root logger ('Axis 1 is out-of-range for
    weight ...') and its C++ code writes '[E:onnxruntime ...]' lines to stderr: both go to
    sdk.quantize's log at INFO level (edgeship -v shows them)."""
    import logging
    import os

    from sdk.quantize.ort_log import quiet as _quiet

    caplog.set_level(logging.INFO, logger="sdk.quantize")
    with _quiet():
        logging.warning("Axis 1 is out-of-range for weight 'w' with rank 1")
        logging.getLogger("onnxruntime.quantization.quant_utils").warning("from a child logger")
        os.write(2, b"[E:onnxruntime:, sequential_executor.cc:677] Non-zero status code\n")
        print("printed by a quantization tool")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
    relayed = " | ".join(r.getMessage() for r in caplog.records if r.name == "sdk.quantize")
    assert "Axis 1 is out-of-range" in relayed and "from a child logger" in relayed
    assert "Non-zero status code" in relayed
    assert not any(r.name == "root" for r in caplog.records)


@pytest.mark.slow
def test_quantization_doc_example_runs(tmp_path: Path) -> None:
    """docs/quantization.md's Python example runs as written."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "quantization.md").read_text()
    blocks = re.findall(r"```python\n(# quantization-doc-example.*?)```", text, flags=re.S)
    assert blocks, "docs/quantization.md lost its runnable example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ort-static-int8-qdq-minmax: check on 16 calibration samples" in out.stdout
    assert "ort-static-int8-qdq-minmax-all-ops" in out.stdout
    assert "quality gate: int8 candidates need worst-sample cosine >= 0.99" in out.stdout


def test_low_check_on_a_saturating_host_says_the_host_may_be_to_blame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On x86 without VNNI ONNX Runtime's int8 kernels saturate with 8-bit weights: a low
    check there may be the host's arithmetic, not the model, and the warning must say so and
    name the remedy (the host is injected, so this runs the same on every CPU)."""
    import logging

    from sdk.quantize.ort_check import warn_on_check

    low = {"inputs": "calibration", "samples": 16, "cosine_min": 0.95}

    def warning(config: QuantizeConfig, saturates: bool) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sdk.quantize"):
            warn_on_check(low, config, host_saturates=saturates)
        [record] = caplog.records
        return record.getMessage()

    text = warning(QuantizeConfig(), saturates=True)
    assert "worst-sample cosine 0.95 (below 0.99)" in text
    assert "this host's int8 arithmetic saturates (x86 without VNNI" in text
    assert "may understate the model on a board with VNNI or Arm dot-product kernels" in text
    assert "--reduce-range" in text and "reduce_range=True" in text
    # Not said where the host does not saturate, nor once 7-bit weights are in use.
    assert "saturates" not in warning(QuantizeConfig(), saturates=False)
    assert "saturates" not in warning(QuantizeConfig(reduce_range=True), saturates=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdk.quantize"):  # a passing check: silent
        warn_on_check({**low, "cosine_min": 0.999}, QuantizeConfig(), host_saturates=True)
    assert not caplog.records


def test_a_concat_of_far_apart_scales_is_kept_in_float(tmp_path: Path) -> None:
    """Quantizing every op type put NudeNet's head Concat (box pixels beside [0, 1] class
    scores, scales 395x apart) on one int8 scale and every score became 0. Such a Concat is
    now kept in float, with a note, and so is the Sigmoid making the scores (an int8 Sigmoid
    at an output only rounds: YOLOv8n's scores below 0.002 became exactly 0)."""
    import onnxruntime as ort

    from sdk.evaluate import cosine_rows
    from tests.test_evaluate import _detector_head

    fp32 = _detector_head(tmp_path / "head.onnx")
    x = {"x": np.random.default_rng(4).standard_normal((64, 8, 16)).astype(np.float32)}
    # 7-bit weights where this host's int8 saturates: the scores were 0.43 off on AVX2 (no VNNI)
    config = QuantizeConfig(op_types=None, reduce_range=HOST_REDUCE_RANGE)
    every = quantize(fp32, x, out=tmp_path / "all.onnx", config=config)
    print(f"\n[concat] {every.details['fallbacks']}")
    assert every.details["excluded_nodes"] == ["join", "score"]
    notes = every.details["fallbacks"]
    assert any("Concat joining tensors" in f and "'join'" in f for f in notes)
    assert any("making the model's outputs ('score')" in f for f in notes)
    assert every.details["check"]["cosine_min"] > 0.99
    s_fp32 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    s_int8 = ort.InferenceSession(str(every.path), providers=["CPUExecutionProvider"])
    ref, got = s_fp32.run(None, x)[0], s_int8.run(None, x)[0]
    assert cosine_rows(got[:, 4:], ref[:, 4:]).min() > 0.99  # the scores alone
    assert np.abs(got[:, 4:] - ref[:, 4:]).max() < 0.05  # the scores, to a few int8 steps
    assert np.ptp(got[:, 4:], axis=(1, 2)).min() > 0  # float Sigmoid: no score flattened
