"""sdk.reference: a bundle's reference statistics, computed the way the board counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.drift import load_reference_spec
from device_agent.agent import Agent
from device_agent.contracts.messages import SCORE_BUCKETS
from device_agent.errors import ConfigError
from device_agent.telemetry import WindowAggregator
from sdk.artifact import read_artifact
from sdk.detect import fit_detector
from sdk.package import package
from sdk.reference import (
    REFERENCE_FORMAT,
    ReferenceStats,
    load_reference,
    reference_stats,
    write_reference,
)
from tests.helpers import write_mlp_onnx

LABELS = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reference")
    model = write_mlp_onnx(root / "mlp.onnx", features=16, classes=4)
    rng = np.random.default_rng(0)
    cal = rng.normal(0, 1, (600, 16)).astype(np.float32)
    held_out = rng.normal(0, 1, (400, 16)).astype(np.float32)
    artifact = read_artifact(model)
    detector = fit_detector(
        "mahalanobis", {"x": cal}, artifact, target_fpr=0.05, out=root / "d.npz"
    )
    return {
        "root": root,
        "model": model,
        "artifact": artifact,
        "detector": detector,
        "data": held_out,
    }


def test_reference_matches_what_the_agent_counts(mlp: dict[str, Any], tmp_path: Path) -> None:
    """Prediction and score histograms of the reference are exactly the agent's window on the
    same inputs: same labels, same argmax, same score binning (bisect_left on SCORE_BUCKETS)."""
    data = mlp["data"]
    assert isinstance(data, np.ndarray)
    doc = reference_stats(
        mlp["model"], mlp["detector"], {"x": data}, LABELS, model="mlp", model_version="3"
    )
    assert doc["format"] == REFERENCE_FORMAT and doc["version"] == 1
    assert doc["samples"] == 400 and doc["model"] == "mlp" and doc["model_version"] == "3"
    assert set(doc["predictions"]) == set(LABELS)  # every label listed, zeros included
    assert sum(doc["predictions"].values()) == pytest.approx(1.0)

    bundle = package(mlp["artifact"], tmp_path / "bundle", name="mlp", labels=LABELS,
                     detector=mlp["detector"])  # fmt: skip
    agent = Agent.from_bundle(bundle.root)
    window = WindowAggregator(labels=LABELS)
    for start in range(0, len(data), 7):  # odd batch sizes, as a board sees them
        p = agent.predict({"x": data[start : start + 7]})
        assert p.labels is not None and p.scores is not None
        for label, score, flag in zip(p.labels, p.scores, p.is_outlier, strict=True):
            window.record(0.001, label, float(score), bool(flag))
    fields = window.close_window()
    assert doc["prediction_counts"] == {k: fields["predictions"].get(k, 0) for k in LABELS}
    assert doc["scores"]["counts"] == list(fields["scores"].counts)
    assert doc["scores"]["bounds"] == list(SCORE_BUCKETS)
    assert doc["scores"]["outlier_rate"] == pytest.approx(fields["outliers"] / 400)
    q = doc["scores"]["quantiles"]
    assert q["0.5"] <= q["0.95"] <= q["0.999"]
    # Held-out in-distribution data: the outlier rate is near the calibrated 5%.
    assert 0.0 < doc["scores"]["outlier_rate"] < 0.15


def test_written_reference_travels_in_the_bundle(mlp: dict[str, Any], tmp_path: Path) -> None:
    doc = reference_stats(mlp["model"], mlp["detector"], {"x": mlp["data"]}, LABELS)
    path = write_reference(tmp_path / "reference.json", doc)
    stats = load_reference(path)
    assert isinstance(stats, ReferenceStats) and stats.samples == 400 and stats.scored == 400
    assert ReferenceStats.from_dict(stats.to_dict()) == stats  # round trip
    bundle = package(mlp["artifact"], tmp_path / "bundle", name="mlp", version="7",
                     labels=LABELS, detector=mlp["detector"], reference=path)  # fmt: skip
    assert bundle.manifest.reference_file == "reference.json"
    ref = load_reference_spec(str(bundle.root))
    assert (ref.model, ref.version) == ("mlp", "7")
    assert ref.stats == stats
    renamed = load_reference_spec(f"other={bundle.root}")
    assert (renamed.model, renamed.version) == ("other", "7")
    bare = load_reference_spec(f"mlp@2={path}")
    assert (bare.model, bare.version) == ("mlp", "2")


def test_without_detector_or_classes(mlp: dict[str, Any]) -> None:
    doc = reference_stats(mlp["model"], None, {"x": mlp["data"]})
    assert doc["scores"] is None
    assert set(doc["predictions"]) == {"0", "1", "2", "3"}  # the class index, as on the board
    with pytest.raises(ConfigError, match="3 labels for a model with 4 classes"):
        reference_stats(mlp["model"], None, {"x": mlp["data"]}, ["a", "b", "c"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "something"}, "not an edgeship reference file"),
        ({"version": 2}, "newer than this edgeship"),
        ({"predictions": {"a": 0.5, "b": 0.2}}, "add up to 0.7"),
        ({"samples": -1}, "samples: expected a non-negative integer"),
    ],
)
def test_bad_reference_files_are_refused(
    mlp: dict[str, Any], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    doc = reference_stats(mlp["model"], None, {"x": mlp["data"]})
    doc.update(change)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message):
        load_reference(path)
    with pytest.raises(ConfigError, match=message):
        write_reference(tmp_path / "out.json", doc)
    with pytest.raises(ConfigError, match="not a bundle directory"):
        load_reference_spec(str(path))


def test_fixed_batch_model_is_padded_not_truncated(mlp: dict[str, Any], tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(mlp["model"]))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4  # a batch axis baked in as 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    data = mlp["data"][:398]  # not a multiple of 4: the last batch is padded
    doc = reference_stats(fixed, None, {"x": data}, LABELS)
    dynamic = reference_stats(mlp["model"], None, {"x": data}, LABELS)
    assert doc["samples"] == 398 and sum(doc["prediction_counts"].values()) == 398
    assert doc["prediction_counts"] == dynamic["prediction_counts"]


def test_the_format_is_the_contract_modules_and_sdk_re_exports_it(tmp_path: Path) -> None:
    """The collector reads reference.json through device_agent.contracts.reference (standard
    library only); sdk.reference writes it and keeps the names it had."""
    import sdk.reference
    from device_agent.contracts import reference as contract

    for name in contract.__all__:
        assert getattr(sdk.reference, name) is getattr(contract, name), name
    doc = ReferenceStats(samples=2, predictions={"a": 1.0}, prediction_counts={"a": 2}).to_dict()
    path = write_reference(tmp_path / contract.REFERENCE_NAME, doc)
    assert contract.load_reference(path).prediction_counts == {"a": 2}
