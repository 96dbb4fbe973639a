"""Latency-aware int8: per-node profiles of a real conv net under ONNX Runtime, the mapping of
ORT's fused int8 kernels back to the model's nodes, and the stage's model and evidence.

The net is a small MobileNetV3-like block built here (a stem conv with hard-swish, a wide
pointwise conv, a depthwise conv with hard-swish, a squeeze-excite gate, a linear head),
exported with :func:`sdk.export`, calibrated on 32 samples. Nothing here asserts which nodes
are faster in int8: that is the machine's answer. What is asserted is that the answer is
measured, mapped to real node names, and acted on consistently.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.runtime import open_session
from sdk.artifact import ModelArtifact
from sdk.data import Dataset, load_dataset
from sdk.errors import QuantizationError
from sdk.optimize import Candidate, OptimizeConfig
from sdk.optimize.stages import SearchContext
from sdk.optimize.stages.latency_aware import (
    LATENCY_AWARE,
    LatencyAwareRecipe,
    LatencyAwareStage,
)
from sdk.quantize import DEFAULT_OP_TYPES, quantize
from sdk.quantize.node_profile import NodeProfile, compute_node_names, int8_costs, profile_nodes
from sdk.report_html import render_report
from sdk.targets import get_target

_COMPUTE = ("Conv", "Gemm", "MatMul")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _net() -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, 1, 1)
            self.pw1 = nn.Conv2d(32, 128, 1)
            self.dw = nn.Conv2d(128, 128, 3, 1, 1, groups=128)
            self.pw2 = nn.Conv2d(128, 128, 1)
            self.se1 = nn.Conv2d(128, 32, 1)
            self.se2 = nn.Conv2d(32, 128, 1)
            self.head = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.hardswish(self.stem(x))
            x = F.hardswish(self.dw(torch.relu(self.pw1(x))))
            x = self.pw2(x)
            gate = F.hardsigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
            return self.head((x * gate).mean((2, 3)))

    torch.manual_seed(0)
    return Block().eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latency-aware")


@pytest.fixture(scope="module")
def fp32(work: Path) -> ModelArtifact:
    import torch

    from sdk.export import export

    return export(_net(), torch.randn(2, 3, 48, 48), "onnx", work / "block.onnx")


@pytest.fixture(scope="module")
def calibration(fp32: ModelArtifact) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 48, 48)).astype(np.float32)
    return load_dataset({"input": x}, fp32.io, what="calibration data")


@pytest.fixture(scope="module")
def sample(calibration: Dataset) -> dict[str, np.ndarray]:
    return {"input": calibration.inputs["input"][:1]}


@pytest.fixture(scope="module")
def static(fp32: ModelArtifact, calibration: Dataset, work: Path) -> ModelArtifact:
    return quantize(fp32, calibration, out=work / "static.onnx")


@pytest.fixture(scope="module")
def candidate(fp32: ModelArtifact, calibration: Dataset, work: Path) -> ModelArtifact:
    cfg = OptimizeConfig()
    ctx = SearchContext(cfg, fp32, calibration, None, get_target("host"), work / "cache")
    (recipe,) = LatencyAwareStage().plan(ctx)
    assert isinstance(recipe, LatencyAwareRecipe) and recipe.name == LATENCY_AWARE
    try:
        return recipe.make(ctx, work / "latency-aware.onnx")
    except QuantizationError as exc:  # a CPU whose int8 loses on every node: nothing to keep
        assert "the float model is the one to ship" in str(exc), exc
        pytest.skip(f"every node is slower in int8 on this CPU: {exc}")


def _nodes(path: Path) -> dict[str, str]:
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


def test_the_fp32_profile_times_every_compute_node(
    fp32: ModelArtifact, sample: dict[str, np.ndarray]
) -> None:
    profile = profile_nodes(fp32.path, sample, runs=5, warmup=2)
    nodes = _nodes(fp32.path)
    compute = {n for n, op in nodes.items() if op in _COMPUTE}
    assert len(compute) == 7
    assert compute <= set(profile.nodes)  # every conv and the head, by its model name
    assert set(profile.nodes) <= set(nodes)
    assert all(t.us >= 0 for t in profile.nodes.values())
    assert all(t.op_type == nodes[t.node] for t in profile.nodes.values())
    total = sum(t.us for t in profile.nodes.values()) + sum(profile.unattributed.values())
    # per-node medians against the median whole run: a margin for a busy machine
    assert 0 < total < 1.2 * profile.wall_us
    assert profile.threads == 1 and profile.runs == 5


def test_int8_kernels_map_back_to_every_quantized_node(
    static: ModelArtifact, sample: dict[str, np.ndarray]
) -> None:
    profile = profile_nodes(static.path, sample, runs=5, warmup=2)
    quantized = compute_node_names(static.path, DEFAULT_OP_TYPES)
    assert set(quantized) == {n for n, op in _nodes(static.path).items() if op in _COMPUTE}
    for node in quantized:  # its fused int8 kernel, found under the original node name
        kernels = profile.nodes[node].kernels
        assert any(k.startswith(("QLinear", "QGemm", "MatMulInteger")) for k in kernels), kernels
    # every Quantize/DequantizeLinear that ran is attributed to a node, not left over
    assert not [r for r in profile.unattributed if "QuantizeLinear" in r]
    costs = int8_costs(profile, static.path, DEFAULT_OP_TYPES)
    assert set(costs) == set(quantized)
    qdq = sum(t.us for t in profile.nodes.values() if t.op_type in _QDQ)
    own = sum(profile.us(n) for n in quantized)
    assert all(costs[n] >= profile.us(n) for n in quantized)
    assert sum(costs.values()) == pytest.approx(own + qdq, rel=1e-6)


def test_the_candidate_keeps_exactly_the_nodes_its_evidence_shows_slower(
    candidate: ModelArtifact, fp32: ModelArtifact, sample: dict[str, np.ndarray]
) -> None:
    session = open_session(candidate.path, threads=1)
    (out,) = session.run(sample)
    assert out.shape == (1, 10) and np.isfinite(out).all()
    evidence = candidate.details["latency_aware"]
    nodes = evidence["nodes"]
    compute = {n for n, op in _nodes(fp32.path).items() if op in _COMPUTE}
    assert {n["node"] for n in nodes} == compute  # each measured, by its model name
    for n in nodes:
        assert n["fp32_us"] is not None and n["fp32_us"] >= 0 and n["int8_us"] >= 0
        assert n["slower_in_int8"] == (n["int8_us"] > n["fp32_us"])
        assert n["kept_in_float"] == n["slower_in_int8"], n
    kept = {n["node"] for n in nodes if n["kept_in_float"]}
    assert kept == set(evidence["excluded"])
    assert kept <= set(candidate.details["excluded_nodes"])
    # a node kept in float has no int8 kernel left in the model: its inputs are float
    still_quantized = set(compute_node_names(candidate.path, DEFAULT_OP_TYPES))
    assert not kept & still_quantized
    assert len(still_quantized) == 7 - len(kept)
    assert evidence["threads"] == 1 and evidence["rounds"][0]["excluded"] == 0
    assert candidate.recipe == LATENCY_AWARE and candidate.precision == "int8"


def test_the_evidence_renders_in_the_html_report(candidate: ModelArtifact) -> None:
    report = {
        "chosen": "fp32",
        "candidates": [
            {"name": "fp32", "latency_ms": {"p50": 1.0, "p95": 1.2}, "size_bytes": 10},
            {
                "name": LATENCY_AWARE,
                "latency_ms": {"p50": 0.9, "p95": 1.1},
                "size_bytes": 5,
                "details": dict(candidate.details),
            },
        ],
    }
    page = render_report(report)
    assert "Latency-aware int8: per-node evidence" in page
    top = candidate.details["latency_aware"]["nodes"][:10]
    for n in top:
        assert n["node"] in page
    kept = sum(1 for n in top if n["kept_in_float"])
    section = page.split("per-node evidence", 1)[1].split("<h2>", 1)[0]
    assert section.count("kept in float") == kept
    assert "Latency-aware" not in render_report({"candidates": report["candidates"][:1]})


def _done(
    static_p95: float | None, fp32_p95: float = 2.0, fused_p95: float | None = None
) -> list[Candidate]:
    static = Candidate("ort-static-int8-minmax")
    if static_p95 is None:
        static.error = "calibration: no data"
    else:
        static.confirm_p95_ms = [static_p95]
    floats = [Candidate("fp32", confirm_p95_ms=[fp32_p95])]
    if fused_p95 is not None:
        floats.append(Candidate("fp32-fused", confirm_p95_ms=[fused_p95]))
    return [*floats, static]


def test_it_is_tried_only_while_plain_static_int8_is_made_and_not_faster(
    fp32: ModelArtifact, calibration: Dataset, tmp_path: Path
) -> None:
    ctx = SearchContext(OptimizeConfig(), fp32, calibration, None, get_target("host"), None)
    (recipe,) = LatencyAwareStage().plan(ctx)
    assert recipe.skip_reason(ctx, _done(3.0)) is None
    faster = recipe.skip_reason(ctx, _done(1.0))
    assert faster is not None and "already faster than fp32 (" in faster
    # int8 faster than fp32 but not than fp32-fused, the float model that would ship: tried
    assert recipe.skip_reason(ctx, _done(1.0, fused_p95=0.8)) is None
    fused = recipe.skip_reason(ctx, _done(0.5, fused_p95=0.8))
    assert fused is not None and "already faster than fp32-fused (" in fused
    failed = recipe.skip_reason(ctx, _done(None))
    assert failed is not None and "failed" in failed
    missing = recipe.skip_reason(ctx, _done(3.0)[:1])
    assert missing is not None and "not made" in missing
    assert LatencyAwareStage().plan(replace(ctx, calibration=None)) == []
    off = replace(ctx, config=OptimizeConfig(try_latency_aware=False))
    assert LatencyAwareStage().plan(off) == []


def test_profile_settings_are_checked(fp32: ModelArtifact, sample: dict[str, np.ndarray]) -> None:
    from sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="runs >= 1"):
        profile_nodes(fp32.path, sample, runs=0)
    assert isinstance(profile_nodes(fp32.path, sample, runs=1, warmup=0), NodeProfile)


def test_a_whole_search_tries_it_or_says_why_not(
    fp32: ModelArtifact, calibration: Dataset, work: Path
) -> None:
    """Through optimize: which branch runs depends on this machine (whether plain static int8
    is slower than fp32 here), so both are checked: made, with its evidence and exclusions
    consistent (or refused because every node is slower in int8), else skipped with the
    measured reason."""
    from sdk.budget import parse_budget
    from sdk.optimize import optimize

    config = OptimizeConfig(
        budget=parse_budget("p95<=1000ms"),
        static_methods=("minmax",),
        try_dynamic=False,
        try_all_ops=False,
        min_runs=20,
        min_seconds=0.05,
        confirm_rounds=1,
        detector=None,
        use_calibration_cache=False,
    )
    report = optimize(fp32, calibration=calibration, out=work / "search" / "b", config=config)
    by = {c.name: c for c in report.candidates}
    static, base = by["ort-static-int8-minmax"], by["fp32"]
    assert static.bench is not None and base.bench is not None
    skipped = {s.name: s.reason for s in report.skipped}
    if LATENCY_AWARE in by:
        made = by[LATENCY_AWARE]
        if made.error is not None:
            assert "the float model is the one to ship" in made.error, made.error
        else:
            assert made.artifact is not None and made.bench is not None
            evidence = made.artifact.details["latency_aware"]
            kept = {n["node"] for n in evidence["nodes"] if n["kept_in_float"]}
            assert kept == set(evidence["excluded"])
            assert kept <= set(made.artifact.details["excluded_nodes"])
    else:
        assert "already faster than fp32" in skipped[LATENCY_AWARE], skipped
        floats = [c for c in (base, by.get("fp32-fused")) if c is not None and c.bench]
        # the first measurements, which the skip compared (the choice's re-runs come after)
        first = min(c.bench.latency_ms["p95"] for c in floats if c.bench is not None)
        assert static.bench.latency_ms["p95"] < first


def test_a_model_with_unnamed_nodes_is_skipped_with_the_reason(
    fp32: ModelArtifact, calibration: Dataset, work: Path
) -> None:
    import onnx

    proto = onnx.load(str(fp32.path))
    for node in proto.graph.node[:2]:
        node.name = ""
    unnamed = work / "unnamed.onnx"
    onnx.save(proto, str(unnamed))
    art = replace(fp32, path=unnamed)
    ctx = SearchContext(OptimizeConfig(), art, calibration, None, get_target("host"), None)
    (recipe,) = LatencyAwareStage().plan(ctx)
    reason = recipe.skip_reason(ctx, _done(static_p95=3.0))
    assert reason is not None and "2 nodes of the model have no name" in reason
    assert recipe.skip_reason(replace(ctx, fp32=fp32), _done(static_p95=3.0)) is None
    # Unnamed Constant nodes (Paddle2ONNX leaves hundreds) are folded by ONNX Runtime, never
    # timed nor quantized: they do not stop the candidate.
    from onnx import helper, numpy_helper

    proto = onnx.load(str(fp32.path))
    value = numpy_helper.from_array(np.zeros(1, np.float32))
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["spare"], value=value))
    constants = work / "unnamed-constant.onnx"
    onnx.save(proto, str(constants))
    named_ctx = replace(ctx, fp32=replace(fp32, path=constants))
    assert recipe.skip_reason(named_ctx, _done(static_p95=3.0)) is None
