"""Benchmarks run real worker processes with ONNX Runtime (and LiteRT where it converts).

No timing thresholds: the host is shared, so tests check structure, internal consistency,
pinning, budgets and errors, never speed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.contracts.bundle import IOSpec, TensorSpec
from sdk.artifact import ModelArtifact, read_artifact
from sdk.bench import (
    BenchConfig,
    BenchReport,
    _launch_worker,
    _write_request,
    benchmark,
    make_inputs,
)
from sdk.budget import Budget
from sdk.errors import BenchmarkError, ConfigError, InputError, ModelFormatError
from sdk.targets import TargetProfile, get_target

FAST = BenchConfig(min_runs=30, min_seconds=0.1, warmup_runs=3)


def _save(
    graph_nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], path: Path
) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(graph_nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def matmul_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = relu(x @ w): x is (batch, 64) float32."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32), np.float32), "w")
    return _save(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [w],
        tmp_path_factory.mktemp("bench") / "matmul.onnx",
    )


@pytest.fixture(scope="module")
def tokens_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding lookup: ids (batch, seq) int64 -> (batch, seq, 8), vocabulary of 100."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((100, 8), np.float32), "table")
    return _save(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 8])],
        [table],
        tmp_path_factory.mktemp("bench") / "tokens.onnx",
    )


@pytest.fixture(scope="module")
def matmul_report(matmul_onnx: Path) -> BenchReport:
    return benchmark(matmul_onnx, FAST)


def _one_cpu_profile() -> TargetProfile:
    return TargetProfile(
        "one-core", "a single-core board", cores=1, memory_mb=512, arch="aarch64", cpu="test"
    )


def _assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text


# --- report structure and consistency -----------------------------------------------------------


def test_report_is_consistent(matmul_report: BenchReport, matmul_onnx: Path) -> None:
    r = matmul_report
    lat = r.latency_ms
    assert r.runs >= FAST.min_runs and r.runs == len(r.latencies_ms)
    assert r.duration_s >= FAST.min_seconds
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
    assert r.latency_ms["p50"] == pytest.approx(float(np.median(r.latencies_ms)))
    assert r.inferences_per_s == pytest.approx(r.runs / (sum(r.latencies_ms) / 1e3))
    assert r.samples_per_s == pytest.approx(r.inferences_per_s * r.batch_size)
    assert r.batch_size == 1 and dict(r.input_shapes) == {"x": (1, 64)}
    assert r.init_ms > 0 and r.first_inference_ms > 0
    assert r.warmup_runs == FAST.warmup_runs and r.warmup_mean_ms is not None
    assert r.size_bytes == matmul_onnx.stat().st_size
    assert r.runtime == "onnxruntime" and r.runtime_version
    assert r.model_format == "onnx" and r.inputs_generated


def test_memory_figures_are_consistent(matmul_report: BenchReport) -> None:
    r = matmul_report
    assert r.baseline_rss_mb is not None and r.baseline_rss_mb > 0
    assert r.peak_rss_mb is not None and r.peak_rss_mb >= r.baseline_rss_mb
    assert r.rss_increase_mb is not None and 0 <= r.rss_increase_mb <= r.peak_rss_mb
    assert r.init_rss_increase_mb is not None


def test_report_is_labelled_as_a_host_measurement(matmul_report: BenchReport) -> None:
    import platform

    r = matmul_report
    assert r.measured_on.startswith(f"host: {platform.machine()} ")
    assert r.measured_on.endswith(f"{r.host['cores']} cores")
    assert "measured on host:" in r.summary()
    assert r.estimated_board_latency_ms is None and "ESTIMATE" not in r.summary()


def test_to_dict_is_json_and_complete(matmul_report: BenchReport) -> None:
    d = json.loads(json.dumps(matmul_report.to_dict()))
    for key in (
        "schema",
        "model",
        "size_bytes",
        "size_mb",
        "runtime",
        "runtime_version",
        "target",
        "threads",
        "affinity",
        "measured_on",
        "host",
        "init_ms",
        "first_inference_ms",
        "warmup_mean_ms",
        "runs",
        "latency_ms",
        "inferences_per_s",
        "samples_per_s",
        "baseline_rss_mb",
        "peak_rss_mb",
        "rss_increase_mb",
        "budget_lines",
        "meets_budget",
    ):
        assert key in d, key
    assert set(d["latency_ms"]) == {"p50", "p90", "p95", "p99", "min", "max", "mean", "std"}
    assert set(d["host"]) >= {"arch", "cpu", "cores"}
    assert "latencies_ms" not in d
    assert len(matmul_report.to_dict(include_latencies=True)["latencies_ms"]) == d["runs"]
    assert d["meets_budget"] is None and d["budget_lines"] == []


# --- pinning --------------------------------------------------------------------------------------


def test_threads_and_affinity_follow_the_target(matmul_onnx: Path) -> None:
    profile = get_target("host")
    r = benchmark(matmul_onnx, FAST)
    assert r.threads == profile.threads_on_host()
    assert r.affinity == tuple(profile.affinity_on_host())


def test_one_core_target_pins_every_thread(matmul_onnx: Path) -> None:
    profile = _one_cpu_profile()
    r = benchmark(matmul_onnx, BenchConfig(target=profile, min_runs=20, min_seconds=0.05))
    expected = tuple(profile.affinity_on_host())
    assert len(expected) == 1
    assert r.threads == 1 and r.affinity == expected
    # Read from every thread of the worker after the runs, ONNX Runtime's pool included.
    assert r.affinity_observed == expected
    assert r.target == "one-core"


def test_explicit_threads_override_the_profile(matmul_onnx: Path) -> None:
    r = benchmark(matmul_onnx, BenchConfig(threads=1, min_runs=20, min_seconds=0.05))
    assert r.threads == 1
    assert r.affinity == tuple(get_target("host").affinity_on_host())


# --- budgets --------------------------------------------------------------------------------------


def test_generous_budget_passes_every_line(matmul_onnx: Path) -> None:
    budget = Budget(p50_ms=1e4, p95_ms=1e4, p99_ms=1e4, peak_rss_mb=1e4, max_size_mb=100)
    r = benchmark(matmul_onnx, FAST, budget=budget)
    assert [line.name for line in r.budget_lines] == ["p50", "p95", "p99", "rss", "size"]
    assert all(line.passed for line in r.budget_lines) and r.meets_budget is True
    assert "budget" in r.summary() and ": met" in r.summary()


def test_impossible_budget_is_a_result_with_the_measured_figures(matmul_onnx: Path) -> None:
    budget = Budget(p95_ms=0.0, peak_rss_mb=0.0, max_size_mb=0.0)
    r = benchmark(matmul_onnx, FAST, budget=budget)
    lines = {line.name: line for line in r.budget_lines}
    assert set(lines) == {"p95", "rss", "size"}
    assert r.meets_budget is False and "NOT met" in r.summary()
    assert lines["p95"].measured == r.latency_ms["p95"] and not lines["p95"].passed
    # rss compares the model's peak increase over the runtime-only baseline, not the process peak.
    assert lines["rss"].measured == r.rss_increase_mb
    assert lines["size"].measured == pytest.approx(matmul_onnx.stat().st_size / 2**20)
    assert not lines["size"].passed
    d = json.loads(json.dumps(r.to_dict()))
    assert d["meets_budget"] is False and len(d["budget_lines"]) == 3


def test_accuracy_line_is_not_measured_by_a_benchmark(matmul_onnx: Path) -> None:
    r = benchmark(matmul_onnx, FAST, budget=Budget(max_accuracy_drop=0.5))
    (line,) = r.budget_lines
    assert line.name == "drop" and line.measured is None and not line.passed


def test_latency_scale_adds_a_labelled_estimate(matmul_onnx: Path) -> None:
    target = get_target("rpi4", latency_scale=3.0)
    r = benchmark(matmul_onnx, BenchConfig(target=target, min_runs=20, min_seconds=0.05))
    assert r.estimated_board_latency_ms is not None
    assert r.estimated_board_latency_ms["p95"] == pytest.approx(3.0 * r.latency_ms["p95"])
    assert "ESTIMATE" in r.summary()
    d = r.to_dict()
    assert "estimate" in d["estimate_note"] and d["latency_scale"] == 3.0


# --- the worker's imports -------------------------------------------------------------------------


def test_worker_imports_neither_torch_nor_the_rest_of_sdk(
    matmul_onnx: Path, tmp_path: Path
) -> None:
    art = read_artifact(matmul_onnx)
    feed = make_inputs(art.io)
    request = _write_request(tmp_path, art, feed, FAST, 1, None, False)
    result = _launch_worker(request, timeout_s=120, progress=False, label="matmul")
    modules: Sequence[str] = result["modules"]
    assert "onnxruntime" in modules and "numpy" in modules
    assert not [m for m in modules if m == "torch" or m.startswith("torch.")]
    assert "onnx" not in modules
    assert {m for m in modules if m == "sdk" or m.startswith("sdk.")} <= {"sdk", "sdk.bench_worker"}


# --- inputs ---------------------------------------------------------------------------------------


def test_generated_inputs_resolve_batch_and_sequence() -> None:
    io = IOSpec(
        inputs=(
            TensorSpec("ids", "int64", ("batch", "seq_len")),
            TensorSpec("mask", "int64", ("batch", "seq_len")),
            TensorSpec("x", "float32", ("batch", 3)),
        ),
        outputs=(TensorSpec("y", "float32", ("batch", 2)),),
    )
    feed = make_inputs(io, batch_size=4)
    assert feed["ids"].shape == (4, 128) and feed["mask"].shape == (4, 128)
    assert feed["x"].shape == (4, 3) and feed["x"].dtype == np.float32
    assert feed["ids"].dtype == np.int64 and feed["ids"].min() >= 0 and feed["ids"].max() < 100
    given = make_inputs(io, shapes={"ids": (2, 16)})
    assert given["ids"].shape == (2, 16) and given["mask"].shape == (2, 16)
    assert np.array_equal(make_inputs(io)["x"], make_inputs(io)["x"])


def test_unresolvable_dimension_asks_for_shapes() -> None:
    io = IOSpec(
        inputs=(TensorSpec("img", "float32", ("batch", 3, "height", "width")),),
        outputs=(TensorSpec("y", "float32", ("batch", 2)),),
    )
    with pytest.raises(ConfigError, match="shapes") as info:
        make_inputs(io)
    _assert_one_line(info.value)
    assert make_inputs(io, shapes={"img": (1, 3, 32, 32)})["img"].shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="fixed"):
        make_inputs(io, shapes={"img": (1, 4, 32, 32)})
    with pytest.raises(ConfigError, match="does not have"):
        make_inputs(io, shapes={"image": (1, 3, 32, 32)})


def test_unnamed_axes_are_not_guessed_from_the_input_name() -> None:
    io = IOSpec(
        inputs=(TensorSpec("token_ids", "int64", ("token_ids_dim0", "token_ids_dim1")),),
        outputs=(TensorSpec("y", "float32", ("batch", 2)),),
    )
    with pytest.raises(ConfigError, match="token_ids_dim1"):
        make_inputs(io)
    assert make_inputs(io, batch_size=3, shapes={"token_ids": (3, 7)})["token_ids"].shape == (3, 7)


def test_integer_inputs_with_a_sequence_dimension_run(tokens_onnx: Path) -> None:
    r = benchmark(tokens_onnx, BenchConfig(min_runs=20, min_seconds=0.05, batch_size=2))
    assert dict(r.input_shapes) == {"ids": (2, 128)}
    assert r.batch_size == 2 and r.samples_per_s == pytest.approx(2 * r.inferences_per_s)


def test_given_inputs_are_used_and_checked(matmul_onnx: Path) -> None:
    x = np.zeros((8, 64), np.float32)
    r = benchmark(matmul_onnx, FAST, inputs={"x": x})
    assert dict(r.input_shapes) == {"x": (8, 64)} and r.batch_size == 8
    assert not r.inputs_generated
    with pytest.raises(InputError, match="'x'"):
        benchmark(matmul_onnx, FAST, inputs={"x": np.zeros((8, 63), np.float32)})


# --- errors ---------------------------------------------------------------------------------------


def test_missing_model_is_a_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not found") as info:
        benchmark(tmp_path / "nope.onnx", FAST)
    _assert_one_line(info.value)


def test_corrupt_model_file_is_a_model_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    with pytest.raises(ModelFormatError) as info:
        benchmark(bad, FAST)
    _assert_one_line(info.value)


def test_worker_failure_is_a_one_line_benchmark_error(matmul_onnx: Path, tmp_path: Path) -> None:
    good = read_artifact(matmul_onnx)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(matmul_onnx.read_bytes()[:100])
    art = ModelArtifact(path=truncated, format="onnx", io=good.io)
    with pytest.raises(BenchmarkError, match=r"truncated\.onnx") as info:
        benchmark(art, FAST)
    _assert_one_line(info.value)


def test_timeout_is_a_benchmark_error(matmul_onnx: Path) -> None:
    config = BenchConfig(min_runs=10, min_seconds=60, timeout_s=1)
    with pytest.raises(BenchmarkError, match="timed out after 1 s") as info:
        benchmark(matmul_onnx, config)
    _assert_one_line(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_runs": 0},
        {"min_seconds": -1.0},
        {"warmup_runs": -1},
        {"threads": 0},
        {"batch_size": 0},
        {"timeout_s": 0},
        {"shapes": {"x": (1, -2)}},
    ],
)
def test_bad_config_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        BenchConfig(**kwargs)


def test_unknown_target_is_a_config_error(matmul_onnx: Path) -> None:
    with pytest.raises(ConfigError, match="unknown target"):
        benchmark(matmul_onnx, BenchConfig(target="rpi9"))


def test_progress_goes_to_stderr(matmul_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benchmark(matmul_onnx, BenchConfig(min_runs=20, min_seconds=0.3), progress=True)
    captured = capsys.readouterr()
    assert "bench matmul.onnx" in captured.err and captured.out == ""


# --- other model sources --------------------------------------------------------------------------


@pytest.mark.tflite
def test_tflite_model_runs_under_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    litert_torch = pytest.importorskip("litert_torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    path = tmp_path / "tiny.tflite"
    litert_torch.convert(model, (torch.randn(1, 16),)).export(str(path))
    r = benchmark(path, FAST, budget=Budget(max_size_mb=10))
    assert r.runtime == "litert" and r.model_format == "tflite"
    assert r.runs >= FAST.min_runs and r.latency_ms["p50"] <= r.latency_ms["p99"]
    assert r.meets_budget is True
    assert r.threads == get_target("host").threads_on_host()


@pytest.mark.slow
def test_digits_cnn_benchmark(digits_onnx: ModelArtifact) -> None:
    r = benchmark(
        digits_onnx,
        BenchConfig(target="rpi4", min_runs=50, min_seconds=0.2),
        budget=Budget(p95_ms=1e4, peak_rss_mb=1e4),
    )
    assert r.meets_budget is True and r.target == "rpi4"
    assert r.input_shapes[next(iter(r.input_shapes))] == (1, 1, 8, 8)
