"""A CTC recognizer's eval data: sequence labels scored as character accuracy (sdk.ctc,
sdk.evaluate), through real ONNX Runtime sessions of a scores -> Softmax graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk.ctc import edit_distance, greedy_decode
from sdk.data import load_dataset
from sdk.errors import DataError
from sdk.evaluate import accuracy_drop, drop_basis, evaluate

STEPS, CLASSES = 8, 5


def _levenshtein(a: list[int], b: list[int]) -> int:
    """The textbook table, kept apart from sdk.ctc's row-wise version."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1,
                table[i][j - 1] + 1,
                table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return table[len(a)][len(b)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.lists(st.integers(0, 4), max_size=12))
def test_edit_distance_is_levenshtein(a: list[int], b: list[int]) -> None:
    got = edit_distance(np.array(a, np.int64), np.array(b, np.int64))
    assert got == _levenshtein(a, b)
    assert got == edit_distance(np.array(b, np.int64), np.array(a, np.int64))


def test_greedy_decoding_collapses_repeats_and_drops_blanks() -> None:
    path = [1, 1, 0, 1, 2, 2, 0, 0]
    scores = np.eye(CLASSES, dtype=np.float32)[path][None]
    (seq,) = greedy_decode(scores)
    assert seq.tolist() == [1, 1, 2]


def _softmax_model(path: Path, shift: np.ndarray) -> Path:
    """s (N, STEPS, CLASSES) -> Softmax(s + shift) over the classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["s", "shift"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=2),
        ],
        "ctc",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", STEPS, CLASSES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", STEPS, CLASSES])],
        [numpy_helper.from_array(shift.astype(np.float32), "shift")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _padded(texts: list[list[int]]) -> np.ndarray:
    out = np.full((len(texts), max(len(t) for t in texts)), -1, np.int64)
    for row, t in enumerate(texts):
        out[row, : len(t)] = t
    return out


@pytest.fixture
def case(tmp_path: Path) -> dict[str, object]:
    rng = np.random.default_rng(3)
    paths = rng.integers(0, CLASSES, size=(60, STEPS))
    scores = (np.eye(CLASSES)[paths] * 6 + rng.normal(0, 0.5, (60, STEPS, CLASSES))).astype(
        np.float32
    )
    truth = []
    for seq in greedy_decode(scores):  # what fp32 reads, then a third of them edited
        t = seq.tolist() or [1]
        if rng.random() < 0.35:
            t[int(rng.integers(len(t)))] = int(rng.integers(1, CLASSES))
        if rng.random() < 0.2:
            t.append(int(rng.integers(1, CLASSES)))
        truth.append(t)
    shift = np.zeros((1, STEPS, CLASSES))
    shift[0, 3, 4] = 8.0  # the candidate reads class 4 at step 3, whatever was there
    return {
        "scores": scores,
        "truth": truth,
        "fp32": _softmax_model(tmp_path / "fp32.onnx", np.zeros((1, STEPS, CLASSES))),
        "shifted": _softmax_model(tmp_path / "shifted.onnx", shift),
        "shift": shift,
    }


def _accuracy(scores: np.ndarray, truth: list[list[int]]) -> float:
    read = greedy_decode(scores)
    edits = sum(_levenshtein(r.tolist(), t) for r, t in zip(read, truth, strict=True))
    return 1.0 - edits / sum(len(t) for t in truth)


def test_sequence_labels_score_character_accuracy(case: dict[str, object]) -> None:
    from device_agent.runtime import open_session

    scores, truth = case["scores"], case["truth"]
    assert isinstance(scores, np.ndarray) and isinstance(truth, list)
    fp32, shifted = Path(str(case["fp32"])), Path(str(case["shifted"]))
    data = load_dataset({"s": scores, "labels": _padded(truth)}, open_session(fp32).io)

    base = evaluate(fp32, data, batch_size=16)
    expected = _accuracy(scores, truth)
    assert 0.5 < expected < 0.99  # the fixture edits some texts: neither all right nor all wrong
    assert base.accuracy == pytest.approx(expected)

    moved = scores + np.asarray(case["shift"], np.float32)
    quality = evaluate(shifted, data, reference=fp32, batch_size=16)
    assert quality.accuracy == pytest.approx(_accuracy(moved, truth))
    same = [
        np.array_equal(a, b)
        for a, b in zip(greedy_decode(moved), greedy_decode(scores), strict=True)
    ]
    assert 0 < sum(same) < len(same)
    assert quality.agreement == pytest.approx(float(np.mean(same)))
    assert drop_basis(quality, base) == "accuracy"
    assert accuracy_drop(quality, base) == pytest.approx(expected - _accuracy(moved, truth))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([[1, 0, 2]], "hold 0, the CTC blank"),
        ([[1, -1, 2]], "padded with -1 at the end of each row only"),
        ([[1, 2.5]], "must hold signed integer class ids"),
        ([[-1, -1]], "hold no class ids"),
        ([[1, -3]], "outside"),
    ],
)
def test_bad_sequence_labels_are_refused_on_loading(
    case: dict[str, object], labels: list[list[float]], message: str
) -> None:
    from device_agent.runtime import open_session

    io = open_session(Path(str(case["fp32"]))).io
    scores = np.asarray(case["scores"])[:1]
    with pytest.raises(DataError, match=message):
        load_dataset({"s": scores, "labels": np.array(labels)}, io)


def test_sequence_labels_must_fit_the_output(case: dict[str, object], tmp_path: Path) -> None:
    from device_agent.runtime import open_session

    fp32 = Path(str(case["fp32"]))
    scores = np.asarray(case["scores"])[:4]
    io = open_session(fp32).io
    outside = load_dataset({"s": scores, "labels": np.array([[1, CLASSES]] * 4)}, io)
    with pytest.raises(DataError, match=r"outside \[1, 5\)"):
        evaluate(fp32, outside)
    with pytest.raises(DataError, match="one padded sequence per sample"):
        load_dataset({"s": scores, "labels": np.ones((4, 2, 2), np.int64)}, io)

    from tests.test_evaluate import X, _score_model

    flat = _score_model(tmp_path / "score.onnx", np.ones((4, 1), np.float32), sigmoid=True)
    labelled = load_dataset({"x": X[:4], "labels": np.array([[1, 2]] * 4)}, open_session(flat).io)
    with pytest.raises(DataError, match=r"score a CTC output of shape \(samples, steps, classes\)"):
        evaluate(flat, labelled)


def test_a_time_major_output_and_column_labels_are_refused_with_the_fix(
    case: dict[str, object], tmp_path: Path
) -> None:
    """(steps, samples, classes), as PyTorch's CTCLoss takes it, was indexed as samples and
    crashed (IndexError) or scored quietly wrong; a classifier's (N, 1) labels were read as
    texts and refused as 'the CTC blank' without saying why."""
    import onnx
    from onnx import TensorProto, helper

    from device_agent.runtime import open_session

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["s"], ["probs"], perm=[1, 0, 2])],
        "time_major",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", STEPS, CLASSES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [STEPS, "N", CLASSES])],
    )
    model = tmp_path / "time_major.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    scores = np.asarray(case["scores"])[:10]
    labels = _padded([t for t in list(case["truth"])[:10]])  # type: ignore[call-overload]
    data = load_dataset({"s": scores, "labels": labels}, open_session(model).io)
    with pytest.raises(DataError, match=r"a time-major \(steps, samples, classes\) output"):
        evaluate(model, data, batch_size=10)

    column = np.zeros((4, 1), np.int64)
    with pytest.raises(DataError, match=r"labels.reshape\(-1\)"):
        load_dataset({"s": scores[:4], "labels": column}, open_session(model).io)
