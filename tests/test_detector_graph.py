"""The detector merged into the model graph (sdk.detector_graph) and the agent's scoring path.

The numpy detectors in device_agent.detectors are the reference: the graph's score must equal
theirs (to ~1e-5 relative) on real digits and on obvious outliers, for every kind and opset,
and the agent must give the same predictions and scores from a bundle with the graph score as
from one without it (old bundles keep working).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from device_agent import Agent, AgentConfig
from device_agent.bundle import load_bundle
from device_agent.contracts.bundle import Manifest
from device_agent.detectors import (
    CombinedDetector,
    Detector,
    EnergyDetector,
    MaxSoftmaxDetector,
    TailCalibration,
    load_detector,
)
from device_agent.errors import BundleError, InputError
from device_agent.runtime import FeedChecker
from sdk.detect import DetectorOptions, fit_unthresholded, model_outputs
from sdk.detector_graph import SCORE_OUTPUT, NotExportable, merge_detector
from sdk.package import package
from tests.helpers import write_mlp_onnx

RTOL = 1e-5


def _run(model: Path, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return list(session.run(None, dict(feed)))


def _assert_same_scores(graph: np.ndarray, reference: np.ndarray) -> None:
    assert graph.dtype == np.float64 and graph.shape == reference.shape
    np.testing.assert_allclose(graph, reference, rtol=RTOL, atol=1e-12)


def _fit(kind: str, inputs: dict[str, np.ndarray], model: Any, options: DetectorOptions) -> Any:
    return fit_unthresholded(kind, inputs, model_outputs(model, inputs), options)


def _digits_inputs(splits: Any) -> dict[str, np.ndarray]:
    """Real test digits, then obvious outliers (uniform noise, inverted and blank images)."""
    rng = np.random.default_rng(1)
    x = splits.x_test[:200]
    odd = np.concatenate(
        [
            rng.random((20, 1, 8, 8), dtype=np.float32) * float(x.max()),
            float(x.max()) - x[:20],
            np.zeros((4, 1, 8, 8), np.float32),
        ]
    )
    return {"image": np.concatenate([x, odd]).astype(np.float32)}


DIGITS_DETECTORS = {
    "mahalanobis": ("mahalanobis", DetectorOptions(source="input:image")),
    "mahalanobis-pooled": ("mahalanobis", DetectorOptions(source="input:image", pool=2)),
    "mahalanobis-outputs": ("mahalanobis", DetectorOptions(source="output:0")),
    "max_softmax": ("max_softmax", DetectorOptions(temperature=2.0)),
    "energy": ("energy", DetectorOptions()),
    "combined-max": ("combined", DetectorOptions(source="input:image")),
    "combined-sum": (
        "combined",
        DetectorOptions(
            source="input:image",
            combine=("mahalanobis", "energy", "max_softmax"),
            weights=(1.0, 0.5, 2.0),
            reduce="sum",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(DIGITS_DETECTORS))
def test_graph_score_equals_numpy_on_real_digits(
    name: str, digits_onnx: Any, digits_splits: Any, tmp_path: Path
) -> None:
    kind, options = DIGITS_DETECTORS[name]
    detector = _fit(kind, {"image": digits_splits.x_cal}, digits_onnx, options)
    merged = merge_detector(digits_onnx.path, detector, tmp_path / "merged.onnx")
    feed = _digits_inputs(digits_splits)
    plain = _run(digits_onnx.path, feed)
    *outputs, score = _run(merged, feed)
    assert len(outputs) == len(plain)
    for got, want in zip(outputs, plain, strict=True):
        np.testing.assert_array_equal(got, want)  # the model's own outputs are untouched
    reference = detector.score(feed, plain)
    _assert_same_scores(score, reference)
    # The comparison means something: the scores spread, and (for the detectors that read
    # the pixels) the outliers are among the top.
    assert np.ptp(reference) > 0
    if options.source == "input:image":
        assert np.median(reference[200:]) > np.quantile(reference[:200], 0.9)


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("kind", ["mahalanobis", "energy", "max_softmax", "combined"])
def test_every_kind_at_old_and_new_opsets(opset: int, kind: str, tmp_path: Path) -> None:
    """Reductions take their axes as an attribute before opset 18 and as an input after."""
    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=12, classes=5, opset=opset)
    rng = np.random.default_rng(0)
    cal = {"x": rng.normal(size=(400, 12)).astype(np.float32)}
    detector = _fit(kind, cal, model, DetectorOptions())
    merged = merge_detector(model, detector, tmp_path / "merged.onnx")
    feed = {"x": np.concatenate([rng.normal(size=(50, 12)), rng.normal(0, 6, (10, 12))])}
    feed = {"x": feed["x"].astype(np.float32)}
    *_, score = _run(merged, feed)
    _assert_same_scores(score, detector.score(feed, _run(model, feed)))


def test_tied_calibration_quantiles_step_as_np_interp_does(tmp_path: Path) -> None:
    """Tied quantiles (a zero-width segment) jump at the tie, from below and from above."""
    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=6, classes=3)
    tied = TailCalibration(np.array([-3.0, -2.0, -2.0, -2.0, -1.5, -1.0, -1.0, 0.5]), 7, 0.25)
    detector = CombinedDetector(
        [EnergyDetector(), MaxSoftmaxDetector()],
        [tied, TailCalibration(np.array([0.0, 0.1, 0.1, 0.4, 0.6]), 5, 0.1)],
        reduce="sum",
    )
    merged = merge_detector(model, detector, tmp_path / "merged.onnx")
    rng = np.random.default_rng(3)
    feed = {"x": (rng.normal(size=(400, 6)) * rng.choice([0.1, 1.0, 4.0], (400, 1)))}
    feed = {"x": feed["x"].astype(np.float32)}
    plain = _run(model, feed)
    energies = EnergyDetector().score(feed, plain)
    assert energies.min() < -2.0 < energies.max()  # the inputs straddle the ties
    *_, score = _run(merged, feed)
    _assert_same_scores(score, detector.score(feed, plain))


def test_what_has_no_graph_form_is_refused(tmp_path: Path, digits_onnx: Any) -> None:
    import onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=6, classes=3)
    merged = merge_detector(model, EnergyDetector(), tmp_path / "merged.onnx")
    with pytest.raises(NotExportable, match="already holds"):
        merge_detector(merged, EnergyDetector(), tmp_path / "twice.onnx")
    # A feature axis without a fixed size cannot be flattened to the fitted width.
    dynamic = onnx.load(str(model))
    dim = dynamic.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "features"
    onnx.save(dynamic, str(tmp_path / "dynamic.onnx"))
    cal = {"x": np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)}
    det = _fit("mahalanobis", cal, tmp_path / "dynamic.onnx", DetectorOptions(source="input:x"))
    with pytest.raises(NotExportable, match="no fixed size"):
        merge_detector(tmp_path / "dynamic.onnx", det, tmp_path / "out.onnx")


# --------------------------------------------------------------------------------------------
# Bundles and the agent


def _digits_bundles(digits_onnx: Any, digits_splits: Any, root: Path) -> tuple[Path, Path]:
    from sdk.detect import default_detector, fit_detector

    choice = default_detector(digits_onnx.io)
    assert choice is not None
    spec = fit_detector(
        choice.kind,
        {"image": digits_splits.x_cal},
        digits_onnx,
        target_fpr=0.05,
        options=choice.options,
        out=root / "det.npz",
    )
    labels = [str(i) for i in range(10)]
    graph = package(digits_onnx, root / "graph", labels=labels, detector=spec).root
    numpy_ = package(
        digits_onnx, root / "numpy", labels=labels, detector=spec, detector_in_graph=False
    ).root
    return graph, numpy_


def test_bundle_names_the_score_output_and_the_agent_hides_it(
    digits_onnx: Any, digits_splits: Any, tmp_path: Path
) -> None:
    graph, numpy_ = _digits_bundles(digits_onnx, digits_splits, tmp_path)
    manifest = load_bundle(graph).manifest
    assert manifest.detector is not None and manifest.detector.graph_output == SCORE_OUTPUT
    assert [o.name for o in manifest.io.outputs] == ["logits"]
    # A bundle without it (and every bundle written before it existed) has no such key.
    raw = json.loads((numpy_ / "manifest.json").read_text())
    assert "graph_output" not in raw["detector"]

    session = load_bundle(graph).open_model()
    assert [o.name for o in session.io.outputs] == ["logits"]
    assert len(session.run({"image": digits_splits.x_test[:3]})) == 1

    feed = _digits_inputs(digits_splits)
    config = AgentConfig(device_id="graph", state_dir=tmp_path / "state")
    with Agent.from_bundle(graph, config) as a, Agent.from_bundle(numpy_, config) as b:
        assert a.slot.loaded.score_in_graph and not b.slot.loaded.score_in_graph
        batch_a, batch_b = a.predict(feed), b.predict(feed)
        assert len(batch_a.outputs) == len(batch_b.outputs) == 1
        np.testing.assert_array_equal(batch_a.outputs[0], batch_b.outputs[0])
        assert batch_a.scores is not None and batch_b.scores is not None
        _assert_same_scores(batch_a.scores, batch_b.scores)
        np.testing.assert_array_equal(batch_a.is_outlier, batch_b.is_outlier)
        assert batch_a.labels == batch_b.labels
        assert batch_a.is_outlier[200:].mean() > 0.9 > batch_a.is_outlier[:200].mean()
        # Batches of one take the scalar path: the same answers, sample by sample.
        for i in (0, 1, 205, 210):
            one = a.predict({"image": feed["image"][i : i + 1]})
            assert one.is_outlier.dtype == np.bool_ and one.is_outlier.shape == (1,)
            assert one.is_outlier[0] == batch_a.is_outlier[i]
            assert one.labels == [batch_a.labels[i]] if batch_a.labels else one.labels is None
            assert one.score == pytest.approx(float(batch_a.scores[i]), rel=RTOL)
        a.close()
        window = a.last_window
        assert window is not None
        assert window["inferences"] == len(feed["image"]) + 4
        assert window["outliers"] == int(batch_a.is_outlier.sum()) + int(
            batch_a.is_outlier[[0, 1, 205, 210]].sum()
        )


def test_manifest_refuses_a_graph_output_it_cannot_honour(
    digits_onnx: Any, digits_splits: Any, tmp_path: Path
) -> None:
    graph, _ = _digits_bundles(digits_onnx, digits_splits, tmp_path)
    raw = json.loads((graph / "manifest.json").read_text())
    clash = json.loads(json.dumps(raw))
    clash["detector"]["graph_output"] = "logits"
    with pytest.raises(BundleError, match="graph_output"):
        Manifest.from_json(json.dumps(clash))
    litert = json.loads(json.dumps(raw))
    litert["model"]["runtime"] = "litert"
    with pytest.raises(BundleError, match="graph_output"):
        Manifest.from_json(json.dumps(litert))
    assert Manifest.from_json(json.dumps(raw)).detector is not None


def test_a_detector_without_graph_form_keeps_numpy_scoring(tmp_path: Path) -> None:
    """The bundle still ships, says why in the manifest, and the agent scores with numpy."""
    from sdk.artifact import read_artifact
    from sdk.detect import fit_detector

    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=6, classes=3)
    merge_detector(model, EnergyDetector(), tmp_path / "merged.onnx")
    # A model that already holds a detector output cannot take a second one.
    art = read_artifact(tmp_path / "merged.onnx")
    cal = {"x": np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)}
    spec = fit_detector("energy", cal, tmp_path / "merged.onnx", out=tmp_path / "det.npz")
    bundle = package(art, tmp_path / "bundle", detector=spec)
    shipped = bundle.manifest.detector
    assert shipped is not None and shipped.graph_output is None
    assert "already holds" in shipped.options["graph_output_skipped"]
    with Agent.from_bundle(bundle.root, AgentConfig(state_dir=tmp_path / "s")) as agent:
        assert not agent.slot.loaded.score_in_graph
        result = agent.predict({"x": cal["x"][:4]})
        det: Detector = load_detector(shipped, bundle.path_of(shipped.params_file))
        want = det.score({"x": cal["x"][:4]}, _run(tmp_path / "merged.onnx", {"x": cal["x"][:4]}))
        assert result.scores is not None
        np.testing.assert_allclose(result.scores, want, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The input check's fast path


def test_feed_checker_fast_path_passes_arrays_through_and_falls_back_for_the_rest() -> None:
    from device_agent.contracts.bundle import IOSpec, TensorSpec

    io = IOSpec(
        inputs=(
            TensorSpec("image", "float32", ("batch", 1, 8, 8)),
            TensorSpec("ids", "int64", ("batch", 3)),
        ),
        outputs=(TensorSpec("y", "float32", ("batch", 2)),),
    )
    check = FeedChecker(io)
    image, ids = np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 3), np.int64)
    out = check({"image": image, "ids": ids})
    assert out["image"] is image and out["ids"] is ids  # no copies on the happy path
    # Casts, copies of non-contiguous arrays and non-dict mappings still work.
    from types import MappingProxyType

    wide = np.zeros((2, 1, 8, 16), np.float64)[..., ::2]
    out = check(MappingProxyType({"image": wide, "ids": ids.astype(np.int32)}))
    assert out["image"].dtype == np.float32 and out["image"].flags.c_contiguous
    assert out["ids"].dtype == np.int64
    for bad, needle in (
        ({"image": image, "ids": np.zeros((2, 4), np.int64)}, "shape (2, 4)"),
        ({"image": image[0], "ids": ids}, "shape (1, 8, 8)"),
        ({"image": image}, "missing ['ids']"),
        ({"image": image, "ids": ids, "extra": ids}, "unknown ['extra']"),
        ({"image": image.astype(np.int32), "ids": ids}, "dtype int32"),
    ):
        with pytest.raises(InputError, match=re.escape(needle)):
            check(bad)


def test_runner_for_checked_feeds_gives_run_s_outputs_and_wraps_errors(tmp_path: Path) -> None:
    """The agent's direct call into ONNX Runtime: same arrays as run(), edgeship errors."""
    from device_agent.errors import RuntimeLoadError
    from device_agent.runtime import OnnxSession

    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=6, classes=3)
    merged = merge_detector(model, EnergyDetector(), tmp_path / "merged.onnx")
    session = OnnxSession(merged, threads=1, hidden_outputs=[SCORE_OUTPUT])
    feed = {"x": np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)}
    plain, with_score = session.runner(), session.runner(hidden=True)
    np.testing.assert_array_equal(plain(feed)[0], session.run(feed)[0])
    *outputs, score = with_score(feed)
    assert len(plain(feed)) == 1 and len(outputs) == 1
    _assert_same_scores(score, EnergyDetector().score(feed, outputs))
    with pytest.raises(RuntimeLoadError, match="failed to run"):
        plain({"x": np.zeros((4, 5), np.float32)})
