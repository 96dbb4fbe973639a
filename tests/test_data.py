"""Calibration/eval data loading: every source kind, and clear errors for mismatches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.contracts.bundle import IOSpec, TensorSpec
from sdk.data import load_dataset
from sdk.errors import DataError

IO = IOSpec(
    inputs=(TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
)
TOKENS = IOSpec(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "seq")),
        TensorSpec("attention_mask", "int64", ("batch", "seq")),
    ),
    outputs=(TensorSpec("emb", "float32", ("batch", 4)),),
)


def test_npz_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    x = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    np.savez(path, image=x, labels=np.arange(12) % 10)
    ds = load_dataset(path, IO, what="eval data")
    assert len(ds) == 12 and ds.labels is not None and ds.labels[11] == 1
    assert [b["image"].shape[0] for b in ds.batches(5)] == [5, 5, 2]


def test_dict_array_and_iterable_sources_agree() -> None:
    x = np.random.default_rng(1).random((6, 1, 8, 8))  # float64: cast to the model's float32
    a = load_dataset({"image": x}, IO)
    b = load_dataset(x, IO)
    c = load_dataset(({"image": s} for s in x), IO)  # per-sample dicts gain a batch axis
    for ds in (a, b, c):
        assert ds.inputs["image"].dtype == np.float32
        np.testing.assert_array_equal(ds.inputs["image"], a.inputs["image"])


def test_integer_token_inputs() -> None:
    ids = np.random.default_rng(2).integers(0, 100, (4, 16)).astype(np.int32)
    ds = load_dataset({"input_ids": ids, "attention_mask": np.ones_like(ids)}, TOKENS)
    assert ds.inputs["input_ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"img": np.zeros((2, 1, 8, 8), np.float32)}, "missing input 'image'"),
        (
            {"image": np.zeros((2, 1, 8, 8), np.float32), "extra": np.zeros(2)},
            "unknown key 'extra'",
        ),
        ({"image": np.zeros((2, 1, 7, 7), np.float32)}, "axis 2 must be 8"),
        ({"image": np.zeros((2, 8, 8), np.float32)}, "rank 3"),
        ({"image": np.array([["a"]])}, "dtype <U1"),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
        (
            {"image": np.zeros((3, 1, 8, 8), np.float32), "labels": np.zeros(2, np.int64)},
            "one class id per sample",
        ),
        (
            {"image": np.zeros((2, 1, 8, 8), np.float32), "labels": np.zeros(2, np.float32)},
            "integer class ids",
        ),
        ([], "yielded no samples"),
    ],
)
def test_mismatches_name_the_input(source: object, needle: str) -> None:
    with pytest.raises(DataError, match="calibration data") as info:
        load_dataset(source, IO, what="calibration data")  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_float_data_for_integer_input_is_refused() -> None:
    with pytest.raises(DataError, match="'input_ids' has dtype float64, but the model takes int64"):
        load_dataset(
            {"input_ids": np.zeros((2, 4)), "attention_mask": np.ones((2, 4), np.int64)}, TOKENS
        )


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.npz", IO)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"cannot read bad\.npz"):
        load_dataset(bad, IO)
    txt = tmp_path / "data.csv"
    txt.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"not an \.npz file"):
        load_dataset(txt, IO)


# --- scalar inputs and layouts the format cannot express (silero-vad's inputs) -------------

VAD = IOSpec(
    inputs=(
        TensorSpec("input", "float32", ("batch", 576)),
        TensorSpec("sr", "int64", ()),
    ),
    outputs=(TensorSpec("output", "float32", ("batch", 1)),),
)


def test_a_scalar_input_is_one_constant_shared_by_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "vad.npz"
    x = np.random.default_rng(3).random((10, 576), dtype=np.float32)
    np.savez(path, input=x, sr=np.array(16000))  # rank 0, as numpy.savez stores it
    ds = load_dataset(path, VAD, what="calibration data")
    assert len(ds) == 10 and ds.constants == ["sr"]
    assert ds.inputs["sr"].shape == () and ds.inputs["sr"].dtype == np.int64
    batches = list(ds.batches(4))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)
    assert ds.head(3).inputs["sr"].shape == () and len(ds.head(3)) == 3
    # Per-sample dicts may repeat the constant; it stays one value.
    it = load_dataset(({"input": row, "sr": np.array(16000)} for row in x), VAD)
    assert len(it) == 10 and it.inputs["sr"].shape == ()


@pytest.mark.parametrize(
    ("sr", "needle"),
    [
        (np.full(10, 16000), "is a scalar (rank 0) in the model"),
        (np.array([16000]), "give one rank-0 value"),
    ],
)
def test_per_sample_values_for_a_scalar_input_are_refused(sr: np.ndarray, needle: str) -> None:
    x = np.zeros((10, 576), np.float32)
    with pytest.raises(DataError, match="calibration data") as info:
        load_dataset({"input": x, "sr": sr}, VAD, what="calibration data")
    assert needle in str(info.value)


def test_a_batch_on_the_second_axis_gets_a_clear_error() -> None:
    """silero-vad's recurrent state is (2, batch, 128): the data format holds samples on the
    first axis only, and the error says so and names the input, instead of an IndexError."""
    io = IOSpec(
        inputs=(
            TensorSpec("input", "float32", ("input_dim0", "input_dim1")),
            TensorSpec("state", "float32", (2, "state_dim1", 128)),
            TensorSpec("sr", "int64", ()),
        ),
        outputs=(TensorSpec("output", "float32", ("output_dim0", 1)),),
    )
    data = {
        "input": np.zeros((30, 576), np.float32),
        "state": np.zeros((2, 30, 128), np.float32),
        "sr": np.array(16000),
    }
    with pytest.raises(DataError) as info:
        load_dataset(data, io, what="eval data")
    message = str(info.value)
    print(f"\n[layout] {message}")
    assert message.startswith("eval data: inputs hold different numbers of samples")
    assert "samples along its first axis" in message and "rank-0 input is one constant" in message
    assert "input 'state' (2, state_dim1, 128)" in message and "batch axis first" in message


def test_unnamed_dynamic_axes_get_distinct_names(tmp_path: Path) -> None:
    """ORT reports unnamed dynamic axes as '?' or None; one shared placeholder made a text
    recogniser's height and width (and other inputs' axes) look like a single dimension."""
    import onnx
    from onnx import TensorProto, helper

    from device_agent.runtime import open_session
    from sdk.bench import make_inputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    y.type.tensor_type.shape.dim[0].Clear()  # no value, no name
    out = helper.make_tensor_value_info("s", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["a"], keepdims=0),
            helper.make_node("ReduceSum", ["y"], ["b"], keepdims=0),
            helper.make_node("Add", ["a", "b"], ["s"]),
        ],
        "dims",
        [x, y],
        [out],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "dims.onnx"))

    io = open_session(tmp_path / "dims.onnx").io
    assert io.inputs[0].shape == ("batch", 3, "x_dim2", "x_dim3")
    assert io.inputs[1].shape == ("y_dim0", "y_dim1")
    feed = make_inputs(io, shapes={"x": (1, 3, 48, 192), "y": (1, 5)})
    assert feed["x"].shape == (1, 3, 48, 192) and feed["y"].shape == (1, 5)


def test_negative_labels_are_refused_naming_the_file(tmp_path: Path) -> None:
    """No class id is negative, whatever the model (the classes it has are checked when it
    runs: sdk.evaluate)."""
    path = tmp_path / "eval.npz"
    x = np.zeros((6, 1, 8, 8), np.float32)
    np.savez(path, image=x, labels=np.array([0, 1, -3, 2, -1, 9]))
    with pytest.raises(DataError) as info:
        load_dataset(path, IO, what="eval data")
    message = str(info.value)
    assert message.startswith(f"eval data ({path}): 2 of 6 labels are outside [0, classes)")
    assert "range from -3 to 9" in message and "\n" not in message
    np.savez(path, image=x, labels=np.array([0.0, 1.0, 2.5, 3.0, 4.0, 5.0]))
    with pytest.raises(DataError, match=r"eval\.npz\): 'labels' must hold integer class ids"):
        load_dataset(path, IO, what="eval data")
