"""optimize's search: cached calibration, calibration variants and early stopping, the time
limit, the accuracy-aware candidate, fp16's skip rule and the PyTorch recipes (pruned and
distilled candidates), on real models run by ONNX Runtime."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdk
from sdk.budget import parse_budget
from sdk.errors import ConfigError
from sdk.optimize import OptimizeConfig, optimize
from sdk.quantize import QuantizeConfig
from tests.helpers import write_mlp_onnx
from tests.int8_host import HOST_REDUCE_RANGE

QUICK: dict[str, Any] = {
    "min_runs": 20,
    "min_seconds": 0.05,
    "confirm_rounds": 1,
    "detector": None,
}


def _mlp(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An MLP, calibration inputs, and eval data labelled with the fp32 model's predictions."""
    import onnxruntime as ort

    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    return model, {"x": x[:100]}, {"x": x[100:], "labels": logits[100:].argmax(1)}


def _scales(path: Path) -> dict[str, float]:
    """Activation scales of a QDQ model (QuantizeLinear nodes' scale initializers)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        n.input[0]: float(inits[n.input[1]].reshape(-1)[0])
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] in inits
    }


def test_quantize_reuses_cached_calibration_across_per_channel_and_exclusions(
    tmp_path: Path,
) -> None:
    model, cal, _ = _mlp(tmp_path)
    cache = tmp_path / "cache"
    first = sdk.quantize(model, cal, out=tmp_path / "a.onnx", calibration_cache=cache)
    files = list(cache.iterdir())
    assert first.details["calibration_cache"] == {"path": str(files[0]), "hit": False}
    per_tensor = sdk.quantize(
        model,
        cal,
        out=tmp_path / "b.onnx",
        config=QuantizeConfig(per_channel=False, exclude_nodes=("fc2",)),
        calibration_cache=cache,
    )
    assert per_tensor.details["calibration_cache"]["hit"] is True
    assert list(cache.iterdir()) == files  # one file serves both
    shared = _scales(first.path).keys() & _scales(per_tensor.path).keys()
    assert shared and all(_scales(first.path)[k] == _scales(per_tensor.path)[k] for k in shared)
    # Other data, another method: another key.
    other = sdk.quantize(
        model,
        {"x": cal["x"][:50]},
        out=tmp_path / "c.onnx",
        config=QuantizeConfig(method="percentile"),
        calibration_cache=cache,
    )
    assert other.details["calibration_cache"]["hit"] is False and len(list(cache.iterdir())) == 2
    # Without a cache nothing is cached, and the same ranges come out.
    plain = sdk.quantize(model, cal, out=tmp_path / "d.onnx")
    assert plain.details["calibration_cache"] is None
    assert _scales(plain.path) == _scales(first.path)
    # A hit really uses the cached ranges: doctored ones change the model's scales.
    files[0].write_text(json.dumps(_widen(json.loads(files[0].read_text()))))
    doctored = sdk.quantize(model, cal, out=tmp_path / "e.onnx", calibration_cache=cache)
    assert doctored.details["calibration_cache"]["hit"] is True
    wide, normal = _scales(doctored.path), _scales(first.path)
    assert all(wide[k] == pytest.approx(10 * normal[k], rel=0.05) for k in shared)
    # A cache file cut short (a crash while copying a cache around) is a miss, not an error.
    files[0].write_text('{"CLS": "TensorsData", "data": {')
    redone = sdk.quantize(model, cal, out=tmp_path / "f.onnx", calibration_cache=cache)
    assert redone.details["calibration_cache"]["hit"] is False
    assert _scales(redone.path) == normal and json.loads(files[0].read_text())


def _widen(node: Any) -> Any:
    """Every calibrated range (``lowest``/``highest``) of an ORT calibration cache, times 10."""
    if isinstance(node, dict):
        return {
            k: (_times10(v) if k in ("lowest", "highest") else _widen(v)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_widen(v) for v in node]
    return node


def _times10(value: Any) -> Any:
    if isinstance(value, int | float):
        return value * 10
    if isinstance(value, dict) and "data" in value:
        return {**value, "data": np.asarray(value["data"]).__mul__(10).tolist()}
    return _widen(value)


def test_second_run_hits_the_calibration_cache_and_variants_stop_early(tmp_path: Path) -> None:
    model, cal, ev = _mlp(tmp_path)
    config = OptimizeConfig(
        budget=parse_budget("p95<=100ms,drop<=5%"),
        calibration_cache=tmp_path / "cache",
        target="rpi4",
        reduce_range=HOST_REDUCE_RANGE,  # where this host's int8 saturates: tests/int8_host.py
        **QUICK,
    )
    first = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "one", config=config)
    print("\n" + first.summary())
    by = {c.name: c for c in first.candidates}
    static = by["ort-static-int8-minmax"]
    assert static.meets_budget and static.calibration_cache_hit is False
    assert first.calibration_cache_misses >= 1
    skipped = {s.name: s.reason for s in first.skipped}
    # minmax meets every line: the other methods and per-tensor weights cannot be smaller or
    # faster, and accuracy-aware int8 would only keep more of the model in float.
    for name in (
        "ort-static-int8-entropy",
        "ort-static-int8-percentile",
        "ort-static-int8-minmax-per-tensor",
    ):
        assert name not in by and "calibration variant of ort-static-int8-minmax" in skipped[name]
    assert "already meets every budget line" in skipped["ort-static-int8-accuracy-aware"]
    assert "CPU execution provider" in skipped["fp16"]
    assert all(c.elapsed_s is not None and c.elapsed_s > 0 for c in first.candidates)

    second = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "two", config=config)
    again = {c.name: c for c in second.candidates}
    assert again["ort-static-int8-minmax"].calibration_cache_hit is True
    assert second.calibration_cache_hits >= 1 and second.calibration_cache_misses == 0
    assert len(list((tmp_path / "cache").iterdir())) == first.calibration_cache_misses
    data = second.to_dict()
    assert data["calibration_cache"]["hits"] == second.calibration_cache_hits
    # The smallest model cannot be dominated (dominating it takes a size at least as small).
    smallest = min(data["candidates"], key=lambda c: c["size_bytes"])
    assert smallest["name"] in data["pareto_front"] and set(data["pareto_front"]) <= set(again)
    assert {s["name"] for s in data["skipped"]} >= {"fp16", "ort-static-int8-entropy"}
    assert "calibration cache" in second.summary() and "skipped:" in second.summary()
    assert again["fp32"].reproduce is None
    _reproduces(again["ort-static-int8-minmax"], tmp_path, cal)
    _reproduces(again["ort-dynamic-int8"], tmp_path, cal)


def _reproduces(candidate: Any, tmp_path: Path, cal: dict[str, np.ndarray]) -> None:
    """The candidate's ``reproduce`` command, run, writes the same model (same bytes)."""
    import shlex

    np.savez(tmp_path / "cal.npz", **cal)
    args = shlex.split(candidate.reproduce)
    assert args[:2] == ["edgeship", "quantize"] and args[-2] == "-o"
    args = [a if a != "CALIBRATION.npz" else str(tmp_path / "cal.npz") for a in args[2:-1]]
    again = tmp_path / f"again-{candidate.name}.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "quantize", *args, str(again)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert again.read_bytes() == candidate.artifact.path.read_bytes()


def test_variants_run_when_the_first_method_fails_on_quality(tmp_path: Path) -> None:
    model, cal, _ = _mlp(tmp_path)
    config = OptimizeConfig(
        budget=parse_budget("p95<=100ms"),
        min_cosine=0.99999,  # no int8 model of this MLP gets that close to fp32
        use_calibration_cache=False,
        **QUICK,
    )
    report = optimize(model, calibration=cal, out=tmp_path / "b", config=config)
    by = {c.name: c for c in report.candidates}
    for name in ("ort-static-int8-entropy", "ort-static-int8-percentile"):
        assert by[name].error is not None and by[name].error.startswith("quality gate")
    assert by["ort-static-int8-minmax"].calibration_cache_hit is None  # cache off
    assert report.chosen == "fp32" and report.calibration_cache is None
    skipped = {s.name: s.reason for s in report.skipped}
    assert "needs eval data and a 'drop' budget line" in skipped["ort-static-int8-accuracy-aware"]


def test_a_time_limit_cuts_the_search_and_still_bundles(tmp_path: Path) -> None:
    model, cal, ev = _mlp(tmp_path)
    config = OptimizeConfig(budget=parse_budget("p95<=100ms,drop<=5%"), time_limit_s=0.001, **QUICK)
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    assert [c.name for c in report.candidates] == ["fp32"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert {"ort-static-int8-minmax", "ort-dynamic-int8"} <= set(reasons)
    assert all(r.startswith("time limit") for n, r in reasons.items() if n != "fp16")
    assert report.chosen == "fp32" and report.meets_budget
    assert (report.bundle / "manifest.json").is_file()
    assert "time limit 0.001 s" in report.summary()


def test_fp16_is_made_when_forced(tmp_path: Path) -> None:
    model, cal, ev = _mlp(tmp_path)
    config = OptimizeConfig(
        budget=parse_budget("drop<=5%"),
        try_fp16=True,
        try_dynamic=False,
        static_methods=(),
        **QUICK,
    )
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    fp16 = next(c for c in report.candidates if c.name == "fp16")
    assert fp16.error is None and fp16.artifact is not None
    assert fp16.artifact.precision == "fp16" and fp16.bench is not None
    assert fp16.accuracy_drop is not None and fp16.accuracy_drop <= 0.05
    assert not any(s.name == "fp16" for s in report.skipped)


def test_cli_teaches_and_checks_the_search_options(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "optimize", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for option in ("--time-limit", "--methods", "--calibration-cache", "--no-accuracy-aware"):
        assert option in help_text
    model, cal, ev = _mlp(tmp_path)
    np.savez(tmp_path / "cal.npz", **cal)
    np.savez(tmp_path / "ev.npz", **ev)
    common = [sys.executable, "-m", "sdk.cli", "optimize", str(model), "-o", str(tmp_path / "b")]
    data = ["--calibration", str(tmp_path / "cal.npz"), "--eval", str(tmp_path / "ev.npz")]
    bad = subprocess.run(
        [*common, *data, "--methods", "minmax,kl"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--methods" in bad.stderr and "Traceback" not in bad.stderr
    run = subprocess.run(
        [*common, *data, "--budget", "drop<=5%", "--time-limit", "0.001", "--runs", "10",
         "--seconds", "0.05", "--detector", "none", "--calibration-cache",
         str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["fp32"]
    assert report["time_limit_s"] == 0.001 and len(report["skipped"]) >= 2


# --- the accuracy-aware candidate and the PyTorch recipes on the digits CNN ------------------


@pytest.mark.slow
def test_accuracy_aware_candidate_is_chosen_when_static_int8_misses_the_drop_line(
    digits_splits: Any, trained_digits: tuple[Any, float], tmp_path: Path
) -> None:
    import torch

    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, add_outlier_channels

    s = digits_splits
    outliers = add_outlier_channels(copy.deepcopy(trained_digits[0]), channels=(0, 1), scale=300.0)
    fp32 = sdk.export(
        outliers,
        (torch.from_numpy(s.x_cal[:4]),),
        to="onnx",
        path=tmp_path / "outliers.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    max_mb = 0.5 * fp32.size_bytes / 2**20  # fp32 misses the size line: int8 must win
    config = OptimizeConfig(
        budget=parse_budget(f"p95<=200ms,drop<=1%,size<={max_mb:.4f}MB"),
        static_methods=("minmax",),
        per_tensor_variant=False,
        try_dynamic=False,
        try_all_ops=False,
        try_weight_int4=False,  # it would meet this size line too (tests/test_int4.py)
        try_latency_aware=False,  # where int8 loses on the outlier conv it keeps it in float
        calibration_cache=tmp_path / "cache",
        **QUICK,
    )
    report = optimize(
        fp32,
        calibration={INPUT_NAME: s.x_cal},
        eval_data={INPUT_NAME: s.x_test, "labels": s.y_test},
        out=tmp_path / "bundle",
        config=config,
    )
    print("\n" + report.summary())
    by = {c.name: c for c in report.candidates}
    static = by["ort-static-int8-minmax"]
    assert static.accuracy_drop is not None and static.accuracy_drop > 0.01
    aaq = by["ort-static-int8-accuracy-aware"]
    assert aaq.error is None and aaq.meets_budget and aaq.artifact is not None
    assert aaq.accuracy_drop is not None and aaq.accuracy_drop <= 0.01
    assert {"/0/Conv", "/2/Conv"} <= set(aaq.artifact.details["excluded_nodes"])
    assert aaq.calibration_cache_hit is True  # plain static int8 calibrated it already
    assert report.chosen == "ort-static-int8-accuracy-aware" and report.meets_budget
    data = report.to_dict()
    entry = next(c for c in data["candidates"] if c["name"] == report.chosen)
    assert "/0/Conv" in entry["excluded_nodes"]
    assert entry["details"]["accuracy_aware"]["met"] is True
    assert "kept in float: " in report.summary()
    from sdk.report_html import render_report

    page = render_report(data)
    assert "kept in float: " in page and "cached" in page and "Skipped recipes" in page
    assert "--exclude" in aaq.reproduce and "edgeship quantize" in page
    _reproduces(aaq, tmp_path, {INPUT_NAME: s.x_cal})


@pytest.mark.slow
def test_pytorch_recipes_add_pruned_and_distilled_candidates(
    digits_splits: Any,
    trained_digits: tuple[Any, float],
    digits_onnx: Any,
    tmp_path: Path,
) -> None:
    from sdk.zoo.digits import INPUT_NAME, build_digits_cnn

    s = digits_splits
    teacher = trained_digits[0]
    config = OptimizeConfig(
        budget=parse_budget("p95<=200ms,drop<=30%"),
        prune_ratios=(0.5,),
        fine_tune_epochs=2,
        distill_epochs=10,
        try_dynamic=False,
        try_all_ops=False,
        calibration_cache=tmp_path / "cache",
        runtime="onnxruntime",  # LiteRT candidates: tests/test_optimize_runtime.py
        **QUICK,
    )
    cal = {INPUT_NAME: s.x_cal}
    ev = {INPUT_NAME: s.x_test, "labels": s.y_test}
    report = optimize(
        digits_onnx,
        calibration=cal,
        eval_data=ev,
        out=tmp_path / "bundle",
        config=config,
        torch_model=teacher,
        train_data=(s.x_train, s.y_train),
        student=build_digits_cnn(width=4, hidden=32),
    )
    print("\n" + report.summary())
    by = {c.name: c for c in report.candidates}
    pruned, distilled, static = (
        by["pruned-50-int8"],
        by["distilled-int8"],
        by["ort-static-int8-minmax"],
    )
    for c in (pruned, distilled):
        assert c.error is None and c.artifact is not None and c.bench is not None
        assert c.artifact.precision == "int8" and c.quality is not None
        assert c.quality.accuracy is not None and c.quality.accuracy > 0.5
        assert static.artifact is not None and c.artifact.size_bytes < static.artifact.size_bytes
    assert pruned.artifact is not None and distilled.artifact is not None
    info = pruned.artifact.details["pruning"]
    assert info["ratio"] == 0.5 and info["params_after"] < 0.5 * info["params_before"]
    assert (
        distilled.artifact.details["distillation"]["student_params"]
        < (distilled.artifact.details["distillation"]["teacher_params"])
    )
    names = [c["name"] for c in report.to_dict()["candidates"]]
    assert "pruned-50-int8" in names and "distilled-int8" in names
    assert teacher.training is False  # the caller's model was pruned as a copy, left as given


def test_pytorch_recipes_refuse_what_they_cannot_judge(
    digits_splits: Any, digits_onnx: Any, tmp_path: Path
) -> None:
    from sdk.zoo.digits import INPUT_NAME, build_digits_cnn

    s = digits_splits
    cal = {INPUT_NAME: s.x_cal[:64]}
    ev = {INPUT_NAME: s.x_test[:64], "labels": s.y_test[:64]}
    config = OptimizeConfig(budget=parse_budget("drop<=1%"), **QUICK)
    out = tmp_path / "b"
    with pytest.raises(ConfigError, match="torch_model"):
        optimize(digits_onnx, calibration=cal, out=out, config=config, student=build_digits_cnn())
    with pytest.raises(ConfigError, match="a student needs train_data"):
        optimize(
            digits_onnx, calibration=cal, eval_data=ev, out=out, config=config,
            torch_model=build_digits_cnn(), student=build_digits_cnn(),
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"does not compute what digits\.onnx computes"):
        optimize(
            digits_onnx, calibration=cal, eval_data=ev, out=out, config=config,
            torch_model=build_digits_cnn(), train_data=(s.x_train, s.y_train),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="'drop' budget line"):
        optimize(
            digits_onnx, calibration=cal, eval_data=ev, out=out,
            config=OptimizeConfig(budget=parse_budget("p95<=10ms"), **QUICK),
            torch_model=build_digits_cnn(), train_data=(s.x_train, s.y_train),
        )  # fmt: skip


# --- benchmark repetitions stop when the p95 is pinned down ---------------------------------


def test_p95_confidence_interval_from_order_statistics() -> None:
    from sdk.bench_worker import p95_ci_relative

    assert p95_ci_relative([5] * 10) == float("inf")  # too few runs to say
    assert p95_ci_relative([5] * 500) == 0.0
    ramp = list(range(1, 1001))  # p95 = 950; the CI spans ranks 950 -+ 13.5
    assert p95_ci_relative(ramp) == pytest.approx(14 / 950, abs=2 / 950)
    assert p95_ci_relative(list(range(1, 101))) > p95_ci_relative(ramp)  # fewer runs: wider


def test_benchmark_stops_early_once_the_p95_is_tight(tmp_path: Path) -> None:
    from sdk.bench import BenchConfig, benchmark

    model, cal, _ = _mlp(tmp_path)
    sample = {"x": cal["x"][:1]}
    # min_seconds far beyond the worker's timeout: only the CI rule can end the timed runs.
    config = BenchConfig(min_runs=50, min_seconds=3600, ci_stop=0.5, timeout_s=120)
    report = benchmark(model, config, inputs=sample)
    assert report.stopped_by_ci and report.runs >= 50 and report.duration_s < 3600
    assert report.to_dict()["stopped_by_ci"] is True
    plain = benchmark(model, BenchConfig(min_runs=30, min_seconds=0.05), inputs=sample)
    assert not plain.stopped_by_ci
    with pytest.raises(ConfigError, match="ci_stop"):
        BenchConfig(ci_stop=1.5)


@pytest.mark.slow
def test_litert_candidates_are_measured_and_bundled_like_onnx_ones(
    digits_splits: Any,
    trained_digits: tuple[Any, float],
    digits_onnx: Any,
    tmp_path: Path,
) -> None:
    """A LiteRT candidate (the PyTorch model exported to TFLite, quantized by ai-edge-quantizer)
    goes through the same search: evaluated against fp32, benchmarked in LiteRT, and bundled
    for LiteRT when it is the one chosen."""
    from sdk.zoo.digits import INPUT_NAME

    s = digits_splits
    config = OptimizeConfig(
        budget=parse_budget("p95<=200ms,drop<=5%"),
        litert_recipes=("static_wi8_ai8",),
        prune_ratios=(),
        static_methods=(),
        try_dynamic=False,
        **QUICK,
    )
    report = optimize(
        digits_onnx,
        calibration={INPUT_NAME: s.x_cal},
        eval_data={INPUT_NAME: s.x_test, "labels": s.y_test},
        out=tmp_path / "bundle",
        config=config,
        torch_model=trained_digits[0],
        train_data=(s.x_train, s.y_train),
    )
    print("\n" + report.summary())
    litert = next(c for c in report.candidates if c.name == "litert-static_wi8_ai8")
    assert litert.error is None and litert.artifact is not None and litert.bench is not None
    assert litert.artifact.format == "tflite" and litert.artifact.path.suffix == ".tflite"
    assert litert.bench.to_dict()["runtime"] == "litert"
    assert litert.accuracy_drop is not None and litert.accuracy_drop < 0.05
    from device_agent.bundle import load_bundle

    chosen = report.chosen_candidate
    assert chosen.artifact is not None
    model = load_bundle(report.bundle).manifest.model  # written and verifiable
    assert model.runtime == ("litert" if chosen.artifact.format == "tflite" else "onnxruntime")
    assert model.recipe == chosen.artifact.recipe


@pytest.mark.parametrize(
    ("flags", "setting", "seven_bits"),
    [
        ({"avx2", "fma"}, None, True),  # saturating host, default: 7-bit weights, said in a note
        ({"avx2", "avx512_vnni"}, None, False),
        ({"avx2", "fma"}, False, False),  # the user asked for 8-bit weights
    ],
)
def test_int8_weights_take_7_bits_where_the_host_saturates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: set[str], setting: Any, seven_bits: bool
) -> None:
    """The default decides from the CPU flags the search reads (faked here; every model is
    quantized and run for real): each ONNX Runtime int8 candidate, dynamic included, and its
    reproduce command carry the choice."""
    import sdk.isa

    monkeypatch.setattr(sdk.isa, "cpu_flags", lambda root="/": frozenset(flags))
    model, cal, ev = _mlp(tmp_path)
    config = OptimizeConfig(
        budget=parse_budget("drop<=50%"),
        reduce_range=setting,
        try_all_ops=False,
        try_accuracy_aware=False,
        try_bias_correction=False,
        try_fused_fp32=False,
        **QUICK,
    )
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    int8 = [c for c in report.candidates if c.name.startswith("ort-")]
    assert {c.name for c in int8} >= {"ort-static-int8-minmax", "ort-dynamic-int8"}
    for c in int8:
        assert c.artifact is not None, c.error
        assert c.artifact.details["reduce_range"] is seven_bits, c.name
        assert ("--reduce-range" in (c.reproduce or "")) is seven_bits, c.reproduce
    noted = [n for n in report.notes if "took 7-bit weights" in n]
    assert len(noted) == (1 if seven_bits and setting is None else 0), report.notes
    if noted:
        assert "this host's int8 kernels saturate" in noted[0] and "avx2" in noted[0]
