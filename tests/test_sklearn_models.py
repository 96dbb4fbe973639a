"""scikit-learn models through the main path: skl2onnx-shaped ONNX (ZipMap output, ai.onnx.ml
operators) -> ``edgeship optimize`` -> bundle -> ``edgeship-agent check`` / ``run`` and the
in-process Agent.

The estimators are trained here on scikit-learn's bundled datasets and written as the graphs
skl2onnx's defaults make (tests/sklearn_onnx.py; skl2onnx itself is not installed in the dev
venv): a GradientBoostingClassifier on iris (TreeEnsembleClassifier: nothing to quantize), a
LogisticRegression on digits (LinearClassifier: nothing either) and an MLPClassifier on digits
(MatMul: int8 candidates).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import sdk
from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from tests.brokers import Collector, Mosquitto, wait_for
from tests.sklearn_onnx import (
    calibrated_linear_onnx,
    gradient_boosting_onnx,
    logistic_regression_onnx,
    mlp_onnx,
    nearest_neighbors_onnx,
)

BIN = Path(sys.executable).parent
ZIPMAP_NOTE = "output_probability: ZipMap removed, the output is the (N, {}) probability tensor"
LABEL_NOTE = "output_label: dropped (the predicted class is output_probability's argmax"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rewritten models go to the test's own cache, not the user's."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGESHIP_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def iris() -> dict[str, Any]:
    from sklearn.datasets import load_iris
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:75], order[75:]
    model = GradientBoostingClassifier(n_estimators=30, random_state=0).fit(x[train], y[train])
    return {"model": model, "x_train": x[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}


def _npz(path: Path, x: np.ndarray, labels: np.ndarray | None = None) -> Path:
    if labels is None:
        np.savez(path, X=x)
    else:
        np.savez(path, X=x, labels=labels)
    return path


def _cli(*args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / args[0]), *(str(a) for a in args[1:])]
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )


def _optimize(model: Path, cal: Path, ev: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return _cli(
        "edgeship",
        "optimize",
        model,
        "--calibration",
        cal,
        "--eval",
        ev,
        "--budget",
        "drop<=1%",
        "--seconds",
        "0.2",
        "--runs",
        "20",
        "-o",
        out,
        "--json",
        out.with_suffix(".json"),
        cwd=out.parent,
    )


def _rows(stdout: str) -> list[str]:
    """The candidate table's rows (each starts with ' ' or '*' then a name)."""
    return [line for line in stdout.splitlines() if line[:1] in " *" and line[1:2].strip()]


def test_gradient_boosting_with_zipmap_is_optimized_bundled_checked_and_predicts(
    iris: dict[str, Any], tmp_path: Path
) -> None:
    model = gradient_boosting_onnx(iris["model"], tmp_path / "gbc.onnx")
    original = model.read_bytes()
    cal = _npz(tmp_path / "cal.npz", iris["x_train"])
    ev = _npz(tmp_path / "eval.npz", iris["x_test"], iris["y_test"])
    bundle = tmp_path / "bundle"

    done = _optimize(model, cal, ev, bundle)

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"note: {ZIPMAP_NOTE.format(3)}, columns in class order 0, 1, 2" in out
    assert f"note: {LABEL_NOTE}" in out
    assert (
        "note: nothing to quantize in this model: its ops (TreeEnsembleClassifier) have no int8 "
        "form; fp32 kept" in out
    )
    # One line instead of a list of failed int8 candidates or ONNX Runtime's internals.
    assert [r.split()[0] for r in _rows(out)] == ["*fp32", "fp16"], out
    assert "failed" not in out and "Histogram" not in out + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert model.read_bytes() == original  # the user's file is never changed
    # fp32's top-1 on the eval data is the estimator's own accuracy.
    accuracy = iris["model"].score(iris["x_test"], iris["y_test"])
    assert f"{accuracy * 100:.2f}%" in _rows(out)[0], (accuracy, out)

    check = _cli("edgeship-agent", "check", bundle, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "outputs output_probability (1, 3)" in check.stdout

    with Agent.from_bundle(
        bundle, AgentConfig(device_id="iris-1", fleet="lab", state_dir=tmp_path / "state")
    ) as agent:
        result = agent.predict({"X": iris["x_test"]})
        wild = agent.predict({"X": iris["x_test"][:20] * 10})
    np.testing.assert_allclose(
        result.outputs[0], iris["model"].predict_proba(iris["x_test"]), atol=1e-5
    )
    assert result.labels == [str(c) for c in iris["model"].predict(iris["x_test"])]
    assert result.is_outlier is not None and result.is_outlier.mean() < 0.1
    assert wild.is_outlier is not None and wild.is_outlier.all()


def test_agent_run_replays_the_sklearn_bundle_with_telemetry(
    iris: dict[str, Any], tmp_path: Path
) -> None:
    model = gradient_boosting_onnx(iris["model"], tmp_path / "gbc.onnx")
    cal = _npz(tmp_path / "cal.npz", iris["x_train"])
    bundle = tmp_path / "bundle"
    made = sdk.optimize(
        model,
        calibration=cal,
        out=bundle,
        config=sdk.OptimizeConfig(name="gbc", min_seconds=0.2, min_runs=20, confirm_rounds=0),
    )
    assert made.chosen == "fp32"
    replay = _npz(tmp_path / "replay.npz", iris["x_test"])
    expected = np.bincount(iris["model"].predict(iris["x_test"]), minlength=3)
    with Mosquitto(tmp_path / "broker") as broker:
        collector = Collector(broker.port, "edgeship/#", persistent=False).start()
        log = tmp_path / "agent.log"
        with open(log, "wb") as sink:
            agent = subprocess.Popen(
                [
                    str(BIN / "edgeship-agent"),
                    "run",
                    "--bundle",
                    str(bundle),
                    "--broker",
                    broker.url,
                    "--fleet",
                    "lab",
                    "--device-id",
                    "iris-1",
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--http",
                    "off",
                    "--replay",
                    str(replay),
                    "--replay-rate",
                    "200",
                    "--replay-loops",
                    "1",
                    "--window",
                    "1",
                ],
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:

            def telemetry() -> list[msg.TelemetryMessage]:
                return [m for _, m in collector.decoded() if isinstance(m, msg.TelemetryMessage)]

            # One pass over the replay file, then the agent publishes its last window and exits.
            assert agent.wait(120) == 0, log.read_text()
            assert wait_for(
                lambda: sum(t.inferences for t in telemetry()) >= len(iris["x_test"]), 30
            ), (telemetry(), log.read_text())
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(10)
            collector.stop()
    windows = telemetry()
    assert all(t.errors == 0 and t.model == "gbc" for t in windows), windows
    counts: dict[str, int] = {}
    for t in windows:
        for label, n in t.predictions.items():
            counts[label] = counts.get(label, 0) + n
    assert counts == {str(c): int(n) for c, n in enumerate(expected) if n}, counts


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_with_zipmap_still_gets_int8_candidates(digits: dict[str, Any], tmp_path: Path) -> None:
    from sklearn.neural_network import MLPClassifier

    estimator = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=0)
    estimator.fit(digits["x_train"], digits["y_train"])
    model = mlp_onnx(estimator, tmp_path / "mlp.onnx")
    cal = _npz(tmp_path / "cal.npz", digits["x_train"][:300])
    ev = _npz(tmp_path / "eval.npz", digits["x_test"], digits["y_test"])
    bundle = tmp_path / "bundle"

    done = _optimize(model, cal, ev, bundle)

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"note: {ZIPMAP_NOTE.format(10)}" in done.stdout
    assert "nothing to quantize" not in done.stdout
    rows = {r[1:].split()[0]: r for r in _rows(done.stdout)}
    for name in ("ort-static-int8-minmax", "ort-dynamic-int8"):
        assert "failed" not in rows[name] and "skipped" not in rows[name], done.stdout
    accuracy = estimator.score(digits["x_test"], digits["y_test"])
    assert f"{accuracy * 100:.2f}%" in rows["fp32"], (accuracy, done.stdout)
    check = _cli("edgeship-agent", "check", bundle, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "outputs output_probability (1, 10)" in check.stdout

    quantized = _cli(
        "edgeship", "quantize", model, "--calibration", cal, "-o", "mlp.int8.onnx", cwd=tmp_path
    )
    assert quantized.returncode == 0, quantized.stdout + quantized.stderr
    assert f"note: {ZIPMAP_NOTE.format(10)}" in quantized.stdout
    int8 = sdk.read_artifact(tmp_path / "mlp.int8.onnx")
    assert [(o.name, o.dtype, o.shape[1]) for o in int8.io.outputs] == [
        ("output_probability", "float32", 10)
    ]


def test_linear_classifier_has_nothing_to_quantize(digits: dict[str, Any], tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    estimator = LogisticRegression(max_iter=500).fit(digits["x_train"], digits["y_train"])
    model = logistic_regression_onnx(estimator, tmp_path / "logreg.onnx")
    report = sdk.optimize(
        model,
        calibration={"X": digits["x_train"][:200]},
        eval_data={"X": digits["x_test"], "labels": digits["y_test"]},
        out=tmp_path / "bundle",
        config=sdk.OptimizeConfig(
            budget=sdk.parse_budget("drop<=1%"), min_seconds=0.2, min_runs=20
        ),
    )
    assert [c.name for c in report.candidates] == ["fp32"]
    assert report.notes[:3] == [
        f"{ZIPMAP_NOTE.format(10)}, columns in class order 0, 1, 2, 3, 4, 5, 6, 7, 8, 9",
        f"{LABEL_NOTE}; edgeship scores float outputs)",
        "nothing to quantize in this model: its ops (LinearClassifier, Normalizer) have no int8 "
        "form; fp32 kept",
    ]
    quality = report.candidates[0].quality
    assert quality is not None and quality.accuracy == pytest.approx(
        estimator.score(digits["x_test"], digits["y_test"])
    )


def test_calibrated_linear_svm_has_nothing_to_quantize(tmp_path: Path) -> None:
    """alt-profanity-check's shape (a pretrained CalibratedClassifierCV(LinearSVC) in a PyPI
    wheel): the SVM is an ai.onnx.ml operator and only Platt's sigmoid arithmetic is left for
    int8. optimize tried it and printed five failed candidates, two with ONNX Runtime's internal
    'Histogram has not been collected': now fp32 and one note, and quantize refuses in one
    line."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import load_breast_cancer
    from sklearn.svm import LinearSVC

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    svm = LinearSVC(dual=False)
    estimator = CalibratedClassifierCV(svm, ensemble=False).fit(x[:400], y[:400])
    model = calibrated_linear_onnx(estimator, tmp_path / "svm.onnx")
    expected = estimator.predict_proba(x[400:])
    report = sdk.optimize(
        model,
        calibration={"X": x[:200]},
        eval_data={"X": x[400:], "labels": y[400:]},
        out=tmp_path / "bundle",
        config=sdk.OptimizeConfig(
            budget=sdk.parse_budget("drop<=1%"), min_seconds=0.2, min_runs=20
        ),
    )
    assert [c.name for c in report.candidates] == ["fp32"]
    assert (
        "nothing to quantize in this model: its compute (LinearRegressor) has no int8 form and "
        "no operator holds a weight to shrink; int8 could only reach the arithmetic around it "
        "(Add, Concat, Div, Exp, Mul, Sub), which it would slow down (name op types to quantize "
        "them anyway: --op-types); fp32 kept"
    ) in report.notes
    quality = report.candidates[0].quality
    assert quality is not None
    assert quality.accuracy == pytest.approx(float((expected.argmax(axis=1) == y[400:]).mean()))

    cal = _npz(tmp_path / "cal.npz", x[:200])
    refused = _cli(
        "edgeship", "quantize", model, "--calibration", cal, "-o", "q.onnx", cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.count("\n") == 1 and "nothing to quantize" in refused.stderr
    asked = _cli(
        "edgeship", "quantize", model, "--calibration", cal, "--op-types", "Mul,Add",
        "-o", "q.onnx", cwd=tmp_path,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stdout + asked.stderr


def test_knn_says_once_that_the_default_op_types_have_nothing_to_quantize(
    digits: dict[str, Any], tmp_path: Path
) -> None:
    """skl2onnx's k-nearest-neighbours graph has no Conv, MatMul, Gemm...: optimize printed six
    failed candidates, each 'ONNX Runtime quantized nothing'. Now one skipped line, and the
    all-ops candidate (which quantizes the distance arithmetic) is still made."""
    from sklearn.neighbors import KNeighborsClassifier

    estimator = KNeighborsClassifier(5).fit(digits["x_train"][:400], digits["y_train"][:400])
    model = nearest_neighbors_onnx(estimator, tmp_path / "knn.onnx")
    report = sdk.optimize(
        model,
        calibration={"X": digits["x_train"][400:600]},
        eval_data={"X": digits["x_test"], "labels": digits["y_test"]},
        out=tmp_path / "bundle",
        config=sdk.OptimizeConfig(
            budget=sdk.parse_budget("drop<=1%"), min_seconds=0.2, min_runs=20
        ),
    )
    assert [(c.name, c.error) for c in report.candidates] == [
        ("fp32", None),
        ("ort-static-int8-minmax-all-ops", None),
    ]
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped.pop("ort-static-int8-minmax") == (
        "no operator of the default int8 types (Conv, ConvTranspose, MatMul, Gemm, Gather, "
        "Attention, LSTM, EmbedLayerNormalization) in this model: static and dynamic int8 of "
        "those types would quantize nothing; ort-static-int8-minmax-all-ops quantizes the other "
        "types"
    )
    assert not [name for name in skipped if name.startswith("ort-")], skipped
    quality = report.candidates[0].quality
    assert quality is not None and quality.accuracy == pytest.approx(
        estimator.score(digits["x_test"], digits["y_test"])
    )


def test_quantize_and_bench_on_a_tree_model(iris: dict[str, Any], tmp_path: Path) -> None:
    model = gradient_boosting_onnx(iris["model"], tmp_path / "gbc.onnx")
    cal = _npz(tmp_path / "cal.npz", iris["x_train"])

    refused = _cli(
        "edgeship", "quantize", model, "--calibration", cal, "-o", "q.onnx", cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip() == (
        "edgeship: error: nothing to quantize in this model: its ops (TreeEnsembleClassifier) "
        "have no int8 form; the fp32 model is the one to ship"
    )
    assert not (tmp_path / "q.onnx").exists()

    bench = _cli("edgeship", "bench", model, "--seconds", "0.2", "--runs", "20", cwd=tmp_path)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "Traceback" not in bench.stderr
    assert f"note: {ZIPMAP_NOTE.format(3)}" in bench.stdout
    assert "latency (ms)" in bench.stdout


def test_zipmap_false_models_lose_the_label_output_too(
    iris: dict[str, Any], tmp_path: Path, cache_dir: Path
) -> None:
    plain = gradient_boosting_onnx(iris["model"], tmp_path / "gbc.onnx", zipmap=False)
    art = sdk.read_artifact(plain)
    assert [o.name for o in art.io.outputs] == ["probabilities_out"]
    assert art.details["notes"] == [
        "label_int64: dropped (the predicted class is probabilities_out's argmax; edgeship scores "
        "float outputs)"
    ]
    assert art.path.is_relative_to(cache_dir) and art.path.name == "gbc.onnx"
    assert art.details["converted_from"] == str(plain)
    assert sdk.read_artifact(plain).path == art.path  # keyed by content: written once
    graph = onnx.load(str(art.path)).graph
    assert [n.op_type for n in graph.node] == ["TreeEnsembleClassifier", "Identity"]


def test_a_model_without_zipmap_or_labels_is_used_as_it_is(tmp_path: Path) -> None:
    from tests.helpers import write_mlp_onnx

    path = write_mlp_onnx(tmp_path / "mlp.onnx")
    art = sdk.read_artifact(path)
    assert art.path == path and art.details == {}


def test_a_label_beside_floats_is_kept_when_the_graph_does_not_classify(
    tmp_path: Path, cache_dir: Path
) -> None:
    """skl2onnx's KMeans (label + distances) or IsolationForest (label + scores) have an integer
    output beside a float one, but no classifier: the label is the answer, and the floats'
    argmax is not the class. Such a model is used as it is."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["X"], ["scores"]),
            helper.make_node("ArgMin", ["X"], ["label"], axis=1, keepdims=0),
        ],
        "kmeans_like",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3]),
        ],
    )
    model = helper.make_model(graph, producer_name="skl2onnx",
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    path = tmp_path / "kmeans.onnx"
    onnx.save(model, str(path))
    art = sdk.read_artifact(path)
    assert art.path == path and art.details == {}
    assert {o.name for o in art.io.outputs} == {"label", "scores"}


def test_nothing_to_quantize_counts_the_op_types_a_user_asked_for(tmp_path: Path) -> None:
    """ORT's QDQ quantizer takes op types outside its registries when they are asked for
    (QuantizeConfig.op_types): a model of only those is not 'nothing to quantize'."""
    from onnx import TensorProto, helper

    from sdk.quantize.ort_check import nothing_to_quantize

    graph = helper.make_graph(
        [helper.make_node("Tanh", ["X"], ["Y"])],
        "tanh",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "tanh.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert "its ops (Tanh) have no int8 form" in (nothing_to_quantize(path) or "")
    assert nothing_to_quantize(path, ("Tanh",)) is None


def test_a_classical_model_with_an_embedding_table_still_quantizes(tmp_path: Path) -> None:
    """A Gather from a float table is a weight (int8 makes it 4x smaller): a model whose other
    compute is ai.onnx.ml is not 'nothing to quantize' (a review found optimize refusing it)."""
    from onnx import TensorProto, helper, numpy_helper

    from sdk.quantize.ort_check import nothing_to_quantize

    table = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node(
            "LinearRegressor", ["pooled"], ["y"], domain="ai.onnx.ml",
            coefficients=[0.1] * 8, intercepts=[0.0],
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(table, "table")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    path = tmp_path / "embedding.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    assert nothing_to_quantize(path) is None


def test_every_op_type_asked_for_is_not_refused(tmp_path: Path) -> None:
    """--op-types all (op_types=None) lets the quantizer try the arithmetic around a classical
    op, as nothing_quantized's own hint suggests."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import load_breast_cancer
    from sklearn.svm import LinearSVC

    from sdk.quantize.ort_check import nothing_to_quantize

    x, y = load_breast_cancer(return_X_y=True)
    estimator = CalibratedClassifierCV(LinearSVC(dual=False), ensemble=False).fit(x, y)
    model = calibrated_linear_onnx(estimator, tmp_path / "svm.onnx")
    assert "nothing to quantize" in (nothing_to_quantize(model) or "")
    assert nothing_to_quantize(model, None) is None
    assert nothing_to_quantize(model, ("Mul",)) is None


def _graph_model(path: Path, nodes: list[Any], inits: list[Any]) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_the_default_op_types_rule_counts_subgraphs_and_only_gathers_from_tables(
    tmp_path: Path,
) -> None:
    """A review found the rule reading top-level nodes only: a MatMul inside an If body got
    'no operator of the default int8 types' (false; ORT's own error there says how to export
    it flat), and a Gather of a Shape's int64 output counted as something to quantize."""
    from onnx import helper, numpy_helper

    from sdk.optimize.stages import SearchContext
    from sdk.optimize.stages.ort_static import StaticStage, no_default_ops
    from sdk.targets import get_target

    def plan(model: Path) -> list[Any]:
        art = sdk.read_artifact(model)
        cal = sdk.load_dataset({"X": np.ones((8, 4), np.float32)}, art.io)
        reason = no_default_ops(art)  # as the search asks, once
        ctx = SearchContext(
            sdk.OptimizeConfig(), art, cal, None, get_target("host"), None, no_default_ops=reason
        )
        return list(StaticStage().plan(ctx))

    ones = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    index = numpy_helper.from_array(np.array(0, np.int64), "i")
    shape_gather = _graph_model(
        tmp_path / "gather.onnx",
        [
            helper.make_node("Shape", ["X"], ["s"]),
            helper.make_node("Gather", ["s", "i"], ["n"]),
            helper.make_node("Cast", ["n"], ["nf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", ["X", "nf"], ["Y"]),
        ],
        [index],
    )
    (skipped,) = plan(shape_gather)
    assert "no operator of the default int8 types" in skipped.reason

    branch = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["b"])],
        "then",
        [],
        [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [None, 4])],
    )
    cond = numpy_helper.from_array(np.array(True), "c")
    nested = _graph_model(
        tmp_path / "nested.onnx",
        [helper.make_node("If", ["c"], ["Y"], then_branch=branch, else_branch=branch)],
        [ones, cond],
    )
    (static,) = plan(nested)
    assert static.name == "ort-static-int8-minmax" and not hasattr(static, "reason")
