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


# --- limits that keep a manifest from exhausting a board or breaking the wire (issue 11) ------


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        # Finding 3: the self-test would allocate 4 TB for this input (MemoryError).
        (["io", "inputs", 0, "shape"], [1, 10**12], "io.inputs[0].shape"),
        (["io", "inputs", 0, "shape"], ["batch", 2**16, 2**16], "over the limit"),
        (["io", "outputs", 0, "shape"], [2**40], "io.outputs[0].shape[0]"),
        (["io", "inputs", 0, "shape"], [1] * 17, "at most 16"),
        (["io", "inputs", 0, "shape"], ["batch", ""], "io.inputs[0].shape[1]"),
        (["io", "inputs", 0, "name"], "a\x00b", "io.inputs[0].name"),
        (["io", "outputs", 0, "labels", 3], "\ud800", "lone surrogate"),
        (["io", "outputs", 0, "labels", 3], "x" * 129, "io.outputs[0].labels[3]"),
        (["model", "name"], "digits\nINFO forged log line", "model.name"),
        (["model", "name"], "n" * 129, "model.name"),
        (["model", "version"], "v" * 65, "model.version"),
        (["model", "file"], "a" * 256, "255 bytes"),
        (["format_version"], 0, "positive int"),
        (["detector", "threshold"], float("nan"), "finite"),
        (["detector", "threshold"], float("inf"), "finite"),
        (["detector", "threshold"], 10**400, "finite"),
        (["benchmark", "deep"], json.loads("[" * 70 + "]" * 70), "nested more than"),
        (["tools", "\ud800"], "1", "lone surrogate"),
    ],
)
def test_rejects_what_a_board_or_the_wire_cannot_take(
    path: list[Any], value: Any, needle: str
) -> None:
    with pytest.raises(BundleError) as info:
        Manifest.from_json(_mutated(path, value))
    assert needle in str(info.value), str(info.value)
    str(info.value).encode("utf-8")  # the message itself always encodes


def test_two_inputs_of_one_name_are_refused() -> None:
    data = json.loads(_manifest().to_json())
    data["io"]["inputs"].append(dict(data["io"]["inputs"][0]))
    with pytest.raises(BundleError, match=r"\['image'\] are given more than once"):
        Manifest.from_json(json.dumps(data))


def test_all_inputs_together_are_bounded() -> None:
    data = json.loads(_manifest().to_json())
    big = {"name": "a", "dtype": "float32", "shape": [2**25]}
    data["io"]["inputs"] = [big, {**big, "name": "b"}, {**big, "name": "c"}]
    with pytest.raises(BundleError, match="the inputs hold 100663296 elements together"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"a": 1, "a": 2}', "the key 'a' twice"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (b'{"format": "\xff"}', "not valid JSON"),
        (" " * (16 * 2**20 + 1), "over the limit"),
    ],
)
def test_rejects_json_that_readers_could_disagree_on_or_choke_on(
    text: str | bytes, needle: str
) -> None:
    with pytest.raises(BundleError, match=needle):
        Manifest.from_json(text)


def test_names_at_the_limits_fit_the_telemetry_messages() -> None:
    """model.name, model.version and labels at their longest still encode in telemetry, which
    the collector decodes: the manifest limits are the wire's."""
    import dataclasses

    from device_agent.contracts import messages as msg

    m = _manifest()
    label = "L" * 128
    m = dataclasses.replace(
        m,
        model=dataclasses.replace(m.model, name="n" * 128, version="v" * 64),
        io=dataclasses.replace(
            m.io, outputs=(dataclasses.replace(m.io.outputs[0], labels=(label,) * 10),)
        ),
    )
    again = Manifest.from_json(m.to_json())
    event = msg.DeployEvent(
        id="d1", state="applied", ts=1.0, model=again.model.name, to_version=again.model.version
    )
    status = msg.StatusMessage(
        device="pi", boot="b", seq=1, ts=1.0, state="online", agent_version="1",
        model=again.model.name, model_version=again.model.version, deploy=event,
    )  # fmt: skip
    assert msg.decode(msg.topic("f", "pi", "status"), msg.encode(status)) == status
