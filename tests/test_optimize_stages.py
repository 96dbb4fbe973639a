"""optimize's stage registry: every registered stage keeps the contract the search relies on.

Plans only: nothing is quantized or trained here (the searches themselves are in
tests/test_optimize*.py), so these run in a second and pin what each stage plans for a given
model, data and config, and in which order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdk.artifact import ModelArtifact, read_artifact
from sdk.budget import BudgetLine, parse_budget
from sdk.data import Dataset, load_dataset
from sdk.errors import ConfigError
from sdk.optimize import Candidate, OptimizeConfig, SkippedRecipe
from sdk.optimize.stages import Recipe, SearchContext, StageRegistry, default_registry
from sdk.optimize.stages.fp32 import Fp32Stage
from sdk.targets import get_target
from tests.helpers import write_mlp_onnx

ORDER = [
    "fp32",
    "fp32-fused",
    "ort-static",
    "ort-dynamic",
    "ort-static-all-ops",
    "ort-static-bias-corrected",
    "latency-aware",
    "ort-weight-int4",
    "ort-static-variants",
    "accuracy-aware",
    "pruned",
    "distilled",
    "fp16",
    "litert",
    "litert-tflite",
]


def _context(
    tmp_path: Path, *, calibration: bool = True, evaluation: bool = True, **config: object
) -> SearchContext:
    fp32 = read_artifact(write_mlp_onnx(tmp_path / "mlp.onnx"))
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    cal: Dataset | None = load_dataset({"x": x}, fp32.io) if calibration else None
    ev = load_dataset({"x": x, "labels": np.zeros(32, np.int64)}, fp32.io) if evaluation else None
    cfg = OptimizeConfig(**config)  # type: ignore[arg-type]
    return SearchContext(cfg, fp32, cal, ev, get_target("host"), tmp_path / "cache")


def _names(ctx: SearchContext) -> tuple[list[str], list[str]]:
    recipes, skipped = default_registry().plan(ctx)
    return [r.name for r in recipes], [s.name for s in skipped]


def test_every_kind_is_registered_once_in_the_documented_order() -> None:
    registry = default_registry()
    assert registry.names() == ORDER
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Fp32Stage())


def test_the_default_plan_is_the_documented_candidate_order(tmp_path: Path) -> None:
    ctx = _context(tmp_path, budget=parse_budget("drop<=1%"), try_fp16=True)
    recipes, skipped = _names(ctx)
    assert recipes == [
        "fp32",
        "ort-static-int8-minmax",
        "ort-dynamic-int8",
        "ort-static-int8-minmax-all-ops",  # the MLP's Add and Relu are beyond the defaults
        "ort-static-int8-latency-aware",
        "ort-static-int8-entropy",
        "ort-static-int8-percentile",
        "ort-static-int8-minmax-per-tensor",
        "ort-static-int8-accuracy-aware",
        "fp16",
    ]
    assert skipped == []


def test_without_calibration_only_fp32_dynamic_and_the_fp16_reason_remain(tmp_path: Path) -> None:
    recipes, skipped = _names(_context(tmp_path, calibration=False))
    assert recipes == ["fp32", "ort-dynamic-int8"]
    assert skipped == ["fp16"]  # on a CPU target, with its reason in the report


def test_options_turn_stages_off(tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        try_dynamic=False,
        try_all_ops=False,
        static_methods=("entropy",),
        per_tensor_variant=False,
        try_accuracy_aware=False,
        try_latency_aware=False,
        try_fp16=False,
    )
    assert _names(ctx) == (["fp32", "ort-static-int8-entropy"], [])


def test_every_recipe_has_a_unique_name_and_only_fp32_is_the_baseline(tmp_path: Path) -> None:
    recipes, _ = default_registry().plan(_context(tmp_path, try_fp16=True))
    names = [r.name for r in recipes]
    assert len(names) == len(set(names))
    assert [r.name for r in recipes if r.baseline] == ["fp32"]
    assert [r.name for r in recipes if r.one_by_one] == ["ort-dynamic-int8"]


def _made(name: str, art: ModelArtifact, lines: list[BudgetLine]) -> Candidate:
    return Candidate(name=name, artifact=art, budget_lines=lines)


def test_calibration_variants_stop_once_the_first_static_meets_the_budget(tmp_path: Path) -> None:
    ctx = _context(tmp_path, budget=parse_budget("drop<=1%,p95<=5ms"))
    recipes, _ = default_registry().plan(ctx)
    variant = next(r for r in recipes if r.name == "ort-static-int8-entropy")
    aware = next(r for r in recipes if r.name == "ort-static-int8-accuracy-aware")
    drop_ok = BudgetLine("drop", 0.5, 1.0, "pts", True)
    slow = BudgetLine("p95", 9.0, 5.0, "ms", False)
    drop_missed = BudgetLine("drop", 3.0, 1.0, "pts", False)

    meets = [_made("ort-static-int8-minmax", ctx.fp32, [drop_ok])]
    assert "already meets every budget line" in (variant.skip_reason(ctx, meets) or "")
    assert "already meets every budget line" in (aware.skip_reason(ctx, meets) or "")

    too_slow = [_made("ort-static-int8-minmax", ctx.fp32, [drop_ok, slow])]
    assert "misses only p95" in (variant.skip_reason(ctx, too_slow) or "")
    assert "already meets the drop line" in (aware.skip_reason(ctx, too_slow) or "")

    inaccurate = [_made("ort-static-int8-minmax", ctx.fp32, [drop_missed])]
    assert variant.skip_reason(ctx, inaccurate) is None
    assert aware.skip_reason(ctx, inaccurate) is None


def test_accuracy_aware_needs_eval_data_and_a_drop_line(tmp_path: Path) -> None:
    ctx = _context(tmp_path, evaluation=False)
    recipes, _ = default_registry().plan(ctx)
    aware = next(r for r in recipes if r.name == "ort-static-int8-accuracy-aware")
    assert "needs eval data" in (aware.skip_reason(ctx, []) or "")


def test_a_registry_must_start_with_the_baseline(tmp_path: Path) -> None:
    class OnlyFp16:
        name = "fp16-only"

        def plan(self, ctx: SearchContext) -> list[Recipe | SkippedRecipe]:
            return [SkippedRecipe("fp16", "no")]

    registry = StageRegistry()
    registry.register(OnlyFp16())
    with pytest.raises(ValueError, match="baseline"):
        registry.plan(_context(tmp_path))


def test_litert_candidates_are_opt_in_and_need_the_pytorch_model(tmp_path: Path) -> None:
    assert "litert-static_wi8_ai8" not in _names(_context(tmp_path))[0]
    ctx = _context(tmp_path, litert_recipes=("static_wi8_ai8",))
    recipes, skipped = default_registry().plan(ctx)
    assert "litert-static_wi8_ai8" not in [r.name for r in recipes]
    reason = next(s.reason for s in skipped if s.name == "litert-static_wi8_ai8")
    assert "torch_model" in reason
    with pytest.raises(ConfigError, match="unknown ai-edge-quantizer recipes"):
        OptimizeConfig(litert_recipes=("int3",))
