"""sdk.evaluate on small real ONNX models: how each output shape is scored.

One score per sample (a VAD's speech probability, a detector's logit) is a binary decision, not
a one-class arg-max: an int8 model that answers the opposite of fp32 must not score agreement 1.
Outputs without classes (sequences, maps) get a continuous drop instead of an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdk.data import load_dataset
from sdk.errors import ConfigError, DataError
from sdk.evaluate import Quality, accuracy_drop, drop_basis, evaluate

RNG = np.random.default_rng(0)
X = RNG.standard_normal((200, 4)).astype(np.float32)
W = np.array([[1.0], [-2.0], [0.5], [1.5]], np.float32)


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # type: ignore[arg-type]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _score_model(path: Path, weight: np.ndarray, *, sigmoid: bool) -> Path:
    """x (N, 4) -> MatMul -> [Sigmoid] -> y (N, 1): one score per sample."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["z" if sigmoid else "y"])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "score",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)


def _sequence_model(path: Path, weight: np.ndarray) -> Path:
    """x (N, 4) -> MatMul (4, 6) -> Reshape -> y (N, 2, 3): no single class axis."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["y"]),
        ],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
        ],
    )
    return _save(graph, path)


def _io(path: Path) -> object:
    from device_agent.runtime import open_session

    return open_session(path).io


@pytest.mark.parametrize("sigmoid", [True, False], ids=["probabilities", "logits"])
def test_one_score_per_sample_is_a_binary_decision(sigmoid: bool, tmp_path: Path) -> None:
    """The 'broken int8' here answers the opposite of fp32 on every sample; the old arg-max over
    one column scored it 100% agreement, 0.00 pt drop and cosine 1."""
    fp32 = _score_model(tmp_path / "fp32.onnx", W, sigmoid=sigmoid)
    broken = _score_model(tmp_path / "broken.onnx", -W, sigmoid=sigmoid)
    labels = (X @ W[:, 0] > 0).astype(np.int64)  # what fp32 decides: its accuracy is 1
    data = load_dataset({"x": X, "labels": labels}, _io(fp32))  # type: ignore[arg-type]

    base = evaluate(fp32, data)
    same = evaluate(fp32, data, reference=fp32)
    bad = evaluate(broken, data, reference=fp32)
    print(f"\n[binary sigmoid={sigmoid}] fp32 {base}\n  broken {bad}")
    threshold = 0.5 if sigmoid else 0.0
    assert base.decision_threshold == bad.decision_threshold == threshold
    assert base.accuracy == 1.0 and same.agreement == 1.0
    assert bad.accuracy == 0.0 and bad.agreement == 0.0
    assert accuracy_drop(bad, base) == pytest.approx(1.0)
    assert drop_basis(bad, base) == "accuracy"
    # Without labels the drop is the decision disagreement, still 100 points.
    unlabelled = load_dataset({"x": X}, _io(fp32))  # type: ignore[arg-type]
    bad_nolabels = evaluate(broken, unlabelled, reference=fp32)
    assert accuracy_drop(bad_nolabels, evaluate(fp32, unlabelled)) == pytest.approx(1.0)
    # A per-sample cosine of one value is only its sign: not reported; errors are.
    assert bad.cosine_mean is None and bad.cosine_min is None
    assert bad.mean_abs_error is not None and bad.mean_abs_error > 0.1
    assert bad.max_abs_error is not None and bad.max_abs_error >= bad.mean_abs_error
    assert same.mean_abs_error == 0.0


def test_threshold_can_be_chosen_and_labels_must_be_binary(tmp_path: Path) -> None:
    fp32 = _score_model(tmp_path / "fp32.onnx", W, sigmoid=True)
    io = _io(fp32)
    data = load_dataset({"x": X}, io)  # type: ignore[arg-type]
    assert evaluate(fp32, data, threshold=0.9).decision_threshold == 0.9
    three = load_dataset({"x": X, "labels": np.arange(len(X)) % 3}, io)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"binary labels are 0 and 1\): 66 of 200 labels are "):
        evaluate(fp32, three)


def test_labels_outside_the_output_classes_are_refused(tmp_path: Path) -> None:
    """Labels the model has no class for scored 0% for fp32 and for every candidate, so the
    accuracy drop was 0 and optimize's quality gate passed."""
    from sdk.data import Dataset
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=4, classes=4)
    io = _io(model)
    ok = load_dataset({"x": X, "labels": np.arange(len(X)) % 4}, io)  # type: ignore[arg-type]
    assert evaluate(model, ok).accuracy is not None
    too_big = load_dataset({"x": X, "labels": np.arange(len(X)) % 5 + 1}, io)  # type: ignore[arg-type]
    with pytest.raises(DataError) as info:
        evaluate(model, too_big, reference=model)
    assert str(info.value).startswith(
        "eval data (dict): 80 of 200 labels are outside [0, 4) (4 classes: 0 to 3): they range "
        "from 1 to 5"
    )
    # The Python API's own Dataset, built without load_dataset, is checked as well.
    direct = Dataset({"x": X}, np.full(len(X), -1), "held-out.npz")
    with pytest.raises(DataError, match=r"eval data \(held-out\.npz\): 200 of 200 labels"):
        evaluate(model, direct)
    floats = Dataset({"x": X}, np.zeros(len(X)), "held-out.npz")
    with pytest.raises(DataError, match="integer class ids, got float64"):
        evaluate(model, floats)


def test_outputs_without_classes_fall_back_to_cosine(tmp_path: Path) -> None:
    weight = RNG.standard_normal((4, 6)).astype(np.float32)
    fp32 = _sequence_model(tmp_path / "fp32.onnx", weight)
    noisy = _sequence_model(
        tmp_path / "noisy.onnx", (weight + 0.3 * RNG.standard_normal((4, 6))).astype(np.float32)
    )
    data = load_dataset({"x": X}, _io(fp32))  # type: ignore[arg-type]

    base = evaluate(fp32, data)
    quality = evaluate(noisy, data, reference=fp32)
    assert quality.agreement is None and quality.accuracy is None
    assert quality.cosine_mean is not None and 0.5 < quality.cosine_mean < 0.999
    assert drop_basis(quality, base) == "cosine"
    assert accuracy_drop(quality, base) == pytest.approx(1.0 - quality.cosine_mean)
    labelled = load_dataset({"x": X, "labels": np.zeros(len(X), np.int64)}, _io(fp32))  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"top-1 accuracy needs a \(samples, classes\) output"):
        evaluate(fp32, labelled)


def test_no_drop_without_labels_or_reference_says_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="reference") as info:
        accuracy_drop(Quality(10), Quality(10))
    assert "data" not in str(info.value).split("(")[0]  # does not blame the user's data


def test_scalar_inputs_are_fed_with_every_batch(tmp_path: Path) -> None:
    """A rank-0 input (a sample rate, a gain) is one constant for the whole data set."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["y"])],
        "gain",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = _save(graph, tmp_path / "gain.onnx")
    data = load_dataset({"x": X, "gain": np.array(2.0)}, _io(model))  # type: ignore[arg-type]
    quality = evaluate(model, data, reference=model, batch_size=7)
    assert quality.samples == len(X) and quality.cosine_min == pytest.approx(1.0)


def test_embedding_outputs_are_compared_as_vectors(tmp_path: Path) -> None:
    """An output named like an embedding is judged by cosine, not by its largest coordinate
    (MiniLM's int8 model agreed on the arg-max of only 81% of 384-d vectors at cosine 0.99)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdk.artifact import read_artifact

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 32)).astype(np.float32)

    def write(path: Path, weights: np.ndarray) -> Path:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["embedding"])],
            "emb",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 32])],
            [numpy_helper.from_array(weights, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return path

    ref = write(tmp_path / "ref.onnx", w)
    noisy = write(tmp_path / "noisy.onnx", w + rng.normal(0, 0.05, w.shape).astype(np.float32))
    data = load_dataset({"x": rng.normal(size=(64, 16)).astype(np.float32)}, read_artifact(ref).io)
    q = evaluate(noisy, data, reference=ref)
    base = evaluate(ref, data, reference=ref)
    assert q.agreement is None and q.cosine_mean is not None and q.cosine_mean > 0.99
    assert drop_basis(q, base) == "cosine"
    assert accuracy_drop(q, base) < 0.01


def test_a_drop_on_the_budget_line_is_not_pushed_over_it_by_float_error() -> None:
    """2 of 200 samples disagreeing is a 1% drop, which 'drop<=1%' accepts; 1 - 0.99 in floats
    is 0.010000000000000009, which failed the line (PaddleOCR's classifier, magika)."""
    from sdk.budget import check_budget, parse_budget

    drop = accuracy_drop(Quality(200, agreement=198 / 200), Quality(200))
    assert drop == 0.01
    lines = check_budget(parse_budget("drop<=1%"), {"accuracy_drop": drop})
    assert all(line.passed for line in lines)
    assert accuracy_drop(Quality(200, accuracy=0.98), Quality(200, accuracy=0.985)) == 0.005


def _detector_head(path: Path) -> Path:
    """x (N, 8, 16) -> boxes (N, 4, 16) in pixels (0..~1000) and sigmoid scores (N, 3, 16),
    concatenated on axis 1 as YOLO-style heads are: (N, 7, 16)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    wb = (rng.standard_normal((4, 8)) * 100).astype(np.float32)
    ws = rng.standard_normal((3, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wb"], ["b0"], kernel_shape=[1]),
        helper.make_node("Relu", ["b0"], ["boxes"]),
        helper.make_node("Conv", ["x", "Ws"], ["s0"], kernel_shape=[1]),
        helper.make_node("Sigmoid", ["s0"], ["scores"], name="score"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="join"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 16])],
        [
            numpy_helper.from_array(wb[:, :, None], "Wb"),
            numpy_helper.from_array(ws[:, :, None], "Ws"),
        ],
    )
    return _save(graph, path)
