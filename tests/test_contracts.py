"""The bundle manifest contract: round-trips, and rejects malformed manifests by field name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from device_agent.contracts.bundle import (
    FORMAT_ID,
    FORMAT_VERSION,
    READABLE_FORMAT_VERSION,
    DetectorSpec,
    IOSpec,
    Manifest,
    ModelInfo,
    TensorSpec,
)
from device_agent.errors import BundleError

DIGEST = "ab" * 32


def _manifest() -> Manifest:
    return Manifest(
        model=ModelInfo("digits", "3", "model.onnx", "onnxruntime", "int8", "ort-static-int8"),
        io=IOSpec(
            inputs=(TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
            outputs=(TensorSpec("logits", "float32", ("batch", 10), labels=tuple("0123456789")),),
        ),
        files={"model.onnx": DIGEST, "detector.npz": "cd" * 32},
        tools={"onnxruntime": "1.32.0"},
        created="2026-11-27T00:00:00+00:00",
        detector=DetectorSpec("mahalanobis", "detector.npz", 3.5, 0.01, {"on": "input"}),
        budget={"p95_ms": 5.0},
        benchmark={"latency_ms": {"p95": 1.2}},
    )


def test_round_trip_is_lossless() -> None:
    m = _manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.to_json() == m.to_json()
    data = json.loads(m.to_json())
    assert data["format"] == FORMAT_ID and data["format_version"] == FORMAT_VERSION


def _mutated(path: list[Any], value: Any) -> str:
    data = json.loads(_manifest().to_json())
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (["format"], "something.else", "manifest.format"),
        (["format_version"], READABLE_FORMAT_VERSION + 1, "newer than this agent"),
        (["format_version"], "1", "format_version"),
        (["model", "runtime"], "tensorflow", "model.runtime"),
        (["model", "file"], "../etc/passwd", "model.file"),
        (["model", "file"], "other.onnx", "has no hash"),
        (["model", "name"], KeyError, "model.name"),
        (["io", "inputs"], [], "at least one input"),
        (["io", "inputs", 0, "dtype"], "complex128", "io.inputs[0].dtype"),
        (["io", "inputs", 0, "shape"], [1, -3], "io.inputs[0].shape[1]"),
        (["io", "inputs", 0, "shape"], [1.5], "io.inputs[0].shape[0]"),
        (["files", "model.onnx"], "xyz", "SHA-256"),
        (["detector", "target_fpr"], 1.5, "detector.target_fpr"),
        (["detector", "params_file"], "missing.npz", "detector file"),
        (["detector", "threshold"], "high", "detector.threshold"),
    ],
)
def test_rejects_malformed_fields(path: list[Any], value: Any, needle: str) -> None:
    with pytest.raises(BundleError, match=None) as info:
        Manifest.from_json(_mutated(path, value))
    assert needle in str(info.value)


def test_rejects_non_json() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.from_json(b"\x00\x01 not json")


def test_shape_matching_accepts_symbolic_dims_only() -> None:
    spec = TensorSpec("x", "float32", ("batch", 3))
    assert spec.matches_shape((7, 3))
    assert not spec.matches_shape((7, 4))
    assert not spec.matches_shape((7, 3, 1))
