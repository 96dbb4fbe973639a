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
            "one label per sample",
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
