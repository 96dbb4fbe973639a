"""`edgeship optimize` end to end on the digits CNN, and the choice rule on its own."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle import load_bundle
from device_agent.contracts.bundle import IOSpec, TensorSpec
from sdk.artifact import ModelArtifact
from sdk.budget import BudgetLine
from sdk.optimize import Candidate
from sdk.optimize.search import _choose

FAST = ["--runs", "30", "--seconds", "0.3"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_optimize_meets_budget_and_never_picks_slower_than_fp32(
    digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    out = _cli(
        "optimize",
        str(digits_onnx.path),
        "--calibration",
        str(digits_npz["calibration"]),
        "--eval",
        str(digits_npz["eval"]),
        "--target",
        "rpi4",
        "--budget",
        "p95<=50ms,rss<=200MB,drop<=1%,size<=1MB",
        "-o",
        str(tmp_path / "bundle"),
        "--json",
        str(report_path),
        *FAST,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names[0] == "fp32" and "ort-dynamic-int8" in names and "ort-static-int8-minmax" in names
    by = {c["name"]: c for c in report["candidates"]}
    for c in report["candidates"]:
        assert c["error"] is None, c["error"]
        assert set(c["latency_ms"]) >= {"p50", "p90", "p95", "p99"}
        assert c["size_bytes"] > 0 and c["peak_rss_mb"] > 0 and Path(c["path"]).is_file()
        assert c["accuracy"] >= 0.95 and c["meets_budget"] and c["violations"] == []
    static = by["ort-static-int8-minmax"]
    assert static["size_bytes"] <= 0.30 * by["fp32"]["size_bytes"]
    chosen = by[report["chosen"]]
    if report["chosen"] != "fp32":
        # The winner was re-measured alternately with fp32; its median p95 (statistics.median,
        # the mean of the middle two for an even count, as the rule computes it) is not slower.
        # Taking the upper middle value instead failed CI once (0.0303 > 0.0278 ms) on a choice
        # the rule had made correctly.
        fp32_runs, win_runs = by["fp32"]["confirm_p95_ms"], chosen["confirm_p95_ms"]
        assert fp32_runs and win_runs
        assert statistics.median(win_runs) <= statistics.median(fp32_runs)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.model.recipe == chosen["recipe"]
    assert bundle.manifest.benchmark is not None
    assert bundle.manifest.budget == {
        "p95_ms": 50.0,
        "peak_rss_mb": 200.0,
        "max_accuracy_drop": 0.01,
        "max_size_mb": 1.0,
    }
    assert "meets every budget line" in out.stdout


# Which failing line is furthest off depends on the machine's speed; both limits make p95 and
# size fail everywhere. With 0.1 us size was furthest here, p95 on a Xeon with AVX-512 VNNI
# (fp32 +46057% against +28049%); 0.00001 us puts p95 furthest on any machine.
@pytest.mark.parametrize("p95_limit", ["0.1us", "0.00001us"])
def test_impossible_budget_writes_best_effort_and_exits_1(
    digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path, p95_limit: str
) -> None:
    report_path = tmp_path / "report.json"
    out = _cli(
        "optimize",
        str(digits_onnx.path),
        "--calibration",
        str(digits_npz["calibration"]),
        "--eval",
        str(digits_npz["eval"]),
        "--budget",
        f"p95<={p95_limit},size<=1KB,drop<=1%",
        "-o",
        str(tmp_path / "bundle"),
        "--json",
        str(report_path),
        *FAST,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    assert report["meets_budget"] is False
    assert all(not c["meets_budget"] for c in report["candidates"])
    # Every candidate that was made reports every line with its verdict. No model of this CNN
    # is 1 KB and none runs in 0.1 us: both lines fail on any machine. Which candidate is the
    # best effort follows from which line is furthest off: not asserted.
    by = {c["name"]: c for c in report["candidates"]}
    for c in report["candidates"]:
        if c["error"] is None:
            verdicts = {line["name"]: line["passed"] for line in c["budget"]}
            assert verdicts.keys() == {"p95", "size", "drop"}, c["budget"]
            assert verdicts["p95"] is False and verdicts["size"] is False, c["budget"]
    assert {line["name"]: line["passed"] for line in by["fp32"]["budget"]}["drop"] is True
    # The failing lines are named with their distance, in the report and on the terminal.
    violations = report["violations"]
    assert any(v.startswith("p95") and "over by" in v for v in violations)
    assert any(v.startswith("size") and "over by" in v for v in violations)
    assert "NO candidate meets the budget" in out.stdout and "over by" in out.stdout
    # The best effort is one of the candidates that were made, and it is bundled.
    chosen = by[report["chosen"]]
    assert chosen["error"] is None and Path(chosen["path"]).is_file()
    bundle = load_bundle(tmp_path / "bundle")  # written and verifiable all the same
    assert bundle.manifest.model.recipe == chosen["recipe"]


# --- the choice rule, with measurements supplied by the test -------------------------------

IO = IOSpec(
    (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 2)),)
)


class _Bench:
    def __init__(self, p95: float) -> None:
        self.latency_ms = {"p50": p95 / 2, "p95": p95}


def _cand(tmp_path: Path, name: str, p95: float, size: int, passed: bool = True) -> Candidate:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(b"\0" * size)
    c = Candidate(name=name, artifact=ModelArtifact(path, "onnx", IO, recipe=name))
    c.bench = _Bench(p95)  # type: ignore[assignment]
    c.budget_lines = [BudgetLine("p95", p95, 1.0 if passed else p95 / 2, "ms", passed)]
    return c


def test_choice_is_settled_against_fp32_by_alternating_reruns(tmp_path: Path) -> None:
    fp32 = _cand(tmp_path, "fp32", 1.00, 400)
    int8 = _cand(tmp_path, "int8", 0.90, 100)  # looked faster in its single run...
    truth = {"fp32": 1.0, "int8": 1.2}  # ...but is slower when measured side by side
    notes: list[str] = []
    chosen = _choose([fp32, int8], 3, lambda art: truth[art.path.stem], notes)
    assert chosen is fp32 and len(int8.confirm_p95_ms) == 3 and "fp32 chosen" in notes[0]
    truth["int8"] = 0.8
    fp32.confirm_p95_ms.clear()
    int8.confirm_p95_ms.clear()
    assert _choose([fp32, int8], 3, lambda art: truth[art.path.stem], []) is int8


def test_a_lossy_winner_is_settled_against_the_rewritten_fp32_too(tmp_path: Path) -> None:
    """fp32-fused has fp32's outputs: an int8 model that looked fastest by noise must beat it
    in alternating re-runs too, not only fp32 as given (a review found it never re-timed)."""
    fp32 = _cand(tmp_path, "fp32", 1.00, 400)
    fused = _cand(tmp_path, "fp32-fused", 0.62, 400)
    int8 = _cand(tmp_path, "int8", 0.58, 100)
    truth = {"fp32": 1.0, "fp32-fused": 0.60, "int8": 0.95}
    notes: list[str] = []
    chosen = _choose([fp32, fused, int8], 3, lambda art: truth[art.path.stem], notes)
    assert chosen is fused and len(int8.confirm_p95_ms) == 3
    assert "fp32-fused chosen" in notes[0]


def test_when_the_first_lossy_winner_loses_its_reruns_the_next_one_gets_its_turn(
    tmp_path: Path,
) -> None:
    """PP-OCRv4 rec: all-ops int8 looked fastest at first, lost its re-runs to fp32-fused by
    noise, and fp32-fused shipped although percentile int8 (same budget lines met, 0.6x
    fp32) was never re-timed. Now the next lossy candidates that looked faster than every float
    model are settled in turn; one that looked slower than a float model is not re-run."""
    fp32 = _cand(tmp_path, "fp32", 1.00, 400)
    fused = _cand(tmp_path, "fp32-fused", 0.80, 400)
    all_ops = _cand(tmp_path, "all-ops", 0.60, 100)
    percentile = _cand(tmp_path, "percentile", 0.70, 100)
    slow = _cand(tmp_path, "slow-int8", 0.90, 100)
    truth = {"fp32": 1.0, "fp32-fused": 0.80, "all-ops": 0.85, "percentile": 0.62}
    truth["slow-int8"] = 0.1  # never measured: it looked slower than fp32-fused
    notes: list[str] = []
    chosen = _choose(
        [fp32, fused, all_ops, percentile, slow], 2, lambda art: truth[art.path.stem], notes
    )
    assert chosen is percentile, notes
    assert len(all_ops.confirm_p95_ms) == 2  # lost to fp32-fused
    assert len(percentile.confirm_p95_ms) == 4  # beat fp32-fused, then fp32
    assert slow.confirm_p95_ms == []
    assert "all-ops looked faster than fp32-fused at first" in notes[0]
    # every contender slower in the re-runs: the float model that beat them ships
    for c in (fp32, fused, all_ops, percentile):
        c.confirm_p95_ms.clear()
    truth["percentile"] = 0.9
    assert (
        _choose([fp32, fused, all_ops, percentile, slow], 2, lambda a: truth[a.path.stem], [])
        is fused
    )


def test_a_sibling_that_lost_to_fp32_is_not_settled_again_and_ties_are_settled(
    tmp_path: Path,
) -> None:
    """A review found the default-op sibling an all-ops winner lost to re-timed against fp32 a
    second time as the next runner-up, and an int8 whose first p95 tied fp32's never settled
    against its sibling."""
    fp32 = _cand(tmp_path, "fp32", 10.0, 400)
    every = _cand(tmp_path, "ort-static-int8-minmax-all-ops", 5.0, 100)
    static = _cand(tmp_path, "ort-static-int8-minmax", 6.0, 100)
    dynamic = _cand(tmp_path, "ort-dynamic-int8", 7.0, 100)
    truth = {"fp32": 4.0, every.name: 5.5, static.name: 5.0, dynamic.name: 3.0}
    notes: list[str] = []
    chosen = _choose([fp32, every, static, dynamic], 2, lambda a: truth[a.path.stem], notes)
    assert chosen is dynamic, notes
    assert len(static.confirm_p95_ms) == 4  # against all-ops, then fp32: once each
    assert sum("ort-static-int8-minmax looked faster than fp32" in n for n in notes) == 1

    fp32 = _cand(tmp_path, "fp32", 5.0, 400)
    every = _cand(tmp_path, "ort-static-int8-minmax-all-ops", 5.0, 100)
    static = _cand(tmp_path, "ort-static-int8-minmax", 5.5, 100)
    truth = {"fp32": 5.0, every.name: 4.9, static.name: 4.0}
    chosen = _choose([fp32, every, static], 2, lambda a: truth[a.path.stem], [])
    assert chosen is static and len(every.confirm_p95_ms) == 2


def test_even_rerun_counts_are_compared_by_their_median_not_their_upper_middle(
    tmp_path: Path,
) -> None:
    # Two rounds give two p95s each; the rule compares statistics.median (the mean of both).
    fp32 = _cand(tmp_path, "fp32", 1.00, 400)
    int8 = _cand(tmp_path, "int8", 0.90, 100)
    runs = {"fp32": iter([1.5, 2.5]), "int8": iter([1.0, 3.0])}  # medians 2.0 and 2.0
    chosen = _choose([fp32, int8], 2, lambda art: next(runs[art.path.stem]), [])
    assert chosen is int8 and int8.p95_ms == fp32.p95_ms == 2.0


def test_no_candidate_passes_best_effort_is_least_excess(tmp_path: Path) -> None:
    a = _cand(tmp_path, "fp32", 10.0, 400, passed=False)  # 100% over
    b = _cand(tmp_path, "int8", 6.0, 100, passed=False)  # also 100% over by construction
    b.budget_lines = [BudgetLine("p95", 6.0, 5.0, "ms", False)]  # 20% over
    failed = Candidate(name="broken", error="quantizer exploded")
    assert _choose([a, b, failed], 2, lambda art: pytest.fail("no re-runs needed"), []) is b


# --- pretrained-model findings: unlabelled eval data, odd outputs and inputs, the gate -------

QUICK = {"min_runs": 20, "min_seconds": 0.05, "confirm_rounds": 1, "detector": None}


def _mixed_magnitude_data(n: int, features: int = 16) -> np.ndarray:
    """Samples whose scales span orders of magnitude: a dynamic-int8 model scales activations
    per run, so in a batch the small samples are crushed by the large ones."""
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0, 1.5, (n, 1)))
    return (rng.standard_normal((n, features)) * scale).astype(np.float32)


def test_unlabelled_eval_data_gives_fp32_no_drop_and_dynamic_int8_is_scored_one_by_one(
    tmp_path: Path,
) -> None:
    """Without labels optimize failed outright ('cannot compute an accuracy drop') because fp32,
    evaluated without a reference, has neither accuracy nor agreement; and dynamic int8 was
    scored in batches of 64, which is not what a board running one sample at a time gets."""
    from sdk.artifact import read_artifact
    from sdk.budget import parse_budget
    from sdk.data import load_dataset
    from sdk.evaluate import evaluate
    from sdk.optimize import OptimizeConfig, optimize
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    x = _mixed_magnitude_data(300)
    config = OptimizeConfig(budget=parse_budget("p95<=100ms,drop<=5%"), **QUICK)  # type: ignore[arg-type]
    report = optimize(
        model,
        calibration={"x": x[:100]},
        eval_data={"x": x[100:]},
        out=tmp_path / "b",
        config=config,
    )
    print("\n" + report.summary())
    by = {c.name: c for c in report.candidates}
    assert by["fp32"].accuracy_drop == 0.0 and by["fp32"].drop_basis == "reference"
    dynamic = by["ort-dynamic-int8"]
    assert dynamic.error is None and dynamic.drop_basis == "agreement"
    fp32 = read_artifact(model)
    ev = load_dataset({"x": x[100:]}, fp32.io)
    one_by_one = evaluate(dynamic.artifact, ev, reference=fp32, batch_size=1)  # type: ignore[arg-type]
    batched = evaluate(dynamic.artifact, ev, reference=fp32, batch_size=64)  # type: ignore[arg-type]
    assert dynamic.quality == one_by_one
    assert batched.agreement is not None and one_by_one.agreement is not None
    assert batched.agreement < one_by_one.agreement  # the batch changes dynamic int8's answers
    assert "ort-static-int8-minmax-all-ops" in by  # the model has Add, which 'all ops' quantizes
    assert report.quality_gate.startswith("the budget's drop line")
    assert any(
        n.startswith("benchmarked on one sample of the eval data (x (1, 16))") for n in report.notes
    )


def _conv_map_model(path: Path) -> Path:
    """x (N, 3, ?, ?) -> Conv 3x3 (padded) -> Relu -> Conv 1x1 -> y (N, 2, H, W): a map output
    (no class axis) and dynamic height and width, like PaddleOCR's text detector."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2"),
        ],
        "map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "h", "w"])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B1"),
            numpy_helper.from_array(rng.standard_normal((2, 8, 1, 1)).astype(np.float32), "W2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_map_outputs_and_dynamic_image_sizes_are_optimized(tmp_path: Path) -> None:
    """An (N, 2, H, W) output has no classes: its drop is 1 - mean cosine, named as such; and
    with dynamic H and W the candidates are benchmarked on a real sample, not generated input."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize

    model = _conv_map_model(tmp_path / "map.onnx")
    x = np.random.default_rng(2).standard_normal((40, 3, 12, 20)).astype(np.float32)
    config = OptimizeConfig(budget=parse_budget("p95<=100ms,drop<=5%"), **QUICK)  # type: ignore[arg-type]
    report = optimize(
        model, calibration={"x": x[:20]}, eval_data={"x": x[20:]}, out=tmp_path / "b", config=config
    )
    print("\n" + report.summary())
    static = next(c for c in report.candidates if c.name == "ort-static-int8-minmax")
    assert static.error is None and static.drop_basis == "cosine"
    assert static.quality is not None and static.quality.cosine_mean is not None
    assert static.accuracy_drop == pytest.approx(1 - static.quality.cosine_mean)
    assert static.bench is not None and static.bench.input_shapes == {"x": (1, 3, 12, 20)}
    assert not static.bench.inputs_generated
    assert "cos" in report.summary()


def test_without_eval_data_int8_is_gated_on_the_calibration_check(tmp_path: Path) -> None:
    """Without eval data optimize picked a broken silero int8 (check cosine 0.027): candidates
    below min_cosine now fail, and the report says which gate was applied."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    budget = parse_budget("p95<=100ms")
    strict = OptimizeConfig(budget=budget, min_cosine=0.9999, **QUICK)  # type: ignore[arg-type]
    report = optimize(model, calibration=cal, out=tmp_path / "strict", config=strict)
    print("\n" + report.summary())
    int8 = [c for c in report.candidates if c.name != "fp32"]
    assert int8 and all(
        c.error and c.error.startswith("quality gate: worst-sample cosine") for c in int8
    )
    assert report.chosen == "fp32"
    assert "worst-sample cosine >= 0.9999" in report.quality_gate
    assert "calibration samples (no eval data)" in report.quality_gate
    assert "quality gate:" in report.summary()

    off = OptimizeConfig(budget=budget, min_cosine=None, **QUICK)  # type: ignore[arg-type]
    ungated = optimize(model, calibration=cal, out=tmp_path / "off", config=off)
    assert all(_made_or_not_worth_it(c) for c in ungated.candidates)
    assert ungated.quality_gate.startswith("none")


def test_an_all_ops_winner_must_beat_its_default_sibling(tmp_path: Path) -> None:
    fp32 = _cand(tmp_path, "fp32", 2.0, 400)
    static = _cand(tmp_path, "ort-static-int8-minmax", 1.0, 100)
    every = _cand(tmp_path, "ort-static-int8-minmax-all-ops", 0.9, 100)  # looked faster...
    truth = {"fp32": 2.0, "ort-static-int8-minmax": 1.0, "ort-static-int8-minmax-all-ops": 1.0}
    notes: list[str] = []
    chosen = _choose([fp32, static, every], 2, lambda art: truth[art.path.stem], notes)
    assert (
        chosen is static and "ort-static-int8-minmax chosen" in notes[0]
    )  # ...a tie is not enough
    for c in (fp32, static, every):
        c.confirm_p95_ms.clear()
    truth["ort-static-int8-minmax-all-ops"] = 0.7
    assert _choose([fp32, static, every], 2, lambda art: truth[art.path.stem], []) is every


def test_a_scalar_input_model_is_optimized(tmp_path: Path) -> None:
    """x (N, 8) and a scalar gain (rank 0, like silero-vad's sample rate) -> Mul -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize

    weight = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "gain"], ["g"], name="scale"),
            helper.make_node("MatMul", ["g", "W"], ["y"], name="dense"),
        ],
        "gain",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = tmp_path / "gain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    x = np.random.default_rng(5).standard_normal((80, 8)).astype(np.float32)
    data = {"x": x, "gain": np.array(0.5, np.float32)}
    options = {**QUICK, "detector": "auto"}
    config = OptimizeConfig(budget=parse_budget("p95<=100ms,drop<=5%"), **options)  # type: ignore[arg-type]
    report = optimize(model, calibration=data, eval_data=data, out=tmp_path / "b", config=config)
    print("\n" + report.summary())
    assert all(_made_or_not_worth_it(c) for c in report.candidates), report.summary()
    bench = report.chosen_candidate.bench
    assert bench is not None and bench.input_shapes == {"x": (1, 8), "gain": ()}
    assert any("scalar inputs (gain)" in n for n in report.notes)
    load_bundle(tmp_path / "b")


def test_cli_optimize_with_unlabelled_eval_data(tmp_path: Path) -> None:
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(6).standard_normal((120, 16)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x[:60])
    np.savez(tmp_path / "eval.npz", x=x[60:])
    report_path = tmp_path / "report.json"
    out = _cli(
        "optimize",
        str(model),
        "--calibration",
        str(tmp_path / "cal.npz"),
        "--eval",
        str(tmp_path / "eval.npz"),
        "--budget",
        "p95<=100ms,drop<=5%",
        "-o",
        str(tmp_path / "bundle"),
        "--json",
        str(report_path),
        "--min-cosine",
        "0.95",
        *FAST,
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr  # 2 before: no drop for fp32
    report = json.loads(report_path.read_text())
    by = {c["name"]: c for c in report["candidates"]}
    assert by["fp32"]["accuracy_drop"] == 0.0
    assert by["ort-static-int8-minmax"]["drop_basis"] == "agreement"
    assert report["quality_gate"].startswith("the budget's drop line")


def _made_or_not_worth_it(candidate: Any) -> bool:
    """Made, or latency-aware int8 finding every quantized node slower in int8 on this CPU
    (machines differ: which nodes int8 speeds up is the CPU's, not the test's, to say)."""
    return candidate.error is None or (
        candidate.name == "ort-static-int8-latency-aware"
        and "the float model is the one to ship" in candidate.error
    )


def test_a_model_with_external_data_is_searched_and_bundled(tmp_path: Path) -> None:
    """The fp32 candidate copied the .onnx file alone, so a model saved with its weights in an
    external data file failed at once ('External data path does not exist'): the copy now holds
    its weights, and the bundle too."""
    import onnx

    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from tests.helpers import write_mlp_onnx

    proto = onnx.load(str(write_mlp_onnx(tmp_path / "mlp.onnx")))
    model = tmp_path / "external" / "mlp.onnx"
    model.parent.mkdir()
    onnx.save(
        proto, str(model), save_as_external_data=True, all_tensors_to_one_file=True,
        location="weights.bin", size_threshold=0,
    )  # fmt: skip
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    config = OptimizeConfig(budget=parse_budget("drop<=5%"), **QUICK)  # type: ignore[arg-type]
    report = optimize(
        model, calibration={"x": x[:100]}, eval_data={"x": x[100:]}, out=tmp_path / "b",
        config=config,
    )  # fmt: skip
    by = {c.name: c for c in report.candidates}
    assert by["fp32"].error is None and by["ort-static-int8-minmax"].error is None
    fp32_copy = by["fp32"].artifact
    assert fp32_copy is not None
    assert not any(
        i.data_location == onnx.TensorProto.EXTERNAL
        for i in onnx.load(str(fp32_copy.path), load_external_data=False).graph.initializer
    )
    assert load_bundle(tmp_path / "b").manifest.model.recipe == report.chosen
