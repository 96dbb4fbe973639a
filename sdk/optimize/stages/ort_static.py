"""ONNX Runtime static int8 (QDQ, calibrated on the calibration data), as three registered
stages because the search tries them at three points (module docstring of
:mod:`sdk.optimize.search`):

* ``ort-static``: ``ort-static-int8-<method>``, the first calibration method of
  :attr:`~sdk.optimize.OptimizeConfig.static_methods`, per-channel weights, the default
  operator types (:data:`sdk.quantize.DEFAULT_OP_TYPES`);
* ``ort-static-all-ops``: ``ort-static-int8-<method>-all-ops``, every operator type ORT can
  quantize, when the model has operators that would add;
* ``ort-static-bias-corrected``: ``<that all-ops name, else the first>-bias-corrected``, the
  same quantization with each Conv's int32 bias corrected on the calibration data
  (:mod:`sdk.quantize.bias_correction`); as fast and as small, so only tried when the one it
  corrects misses the drop line alone;
* ``ort-static-variants``: the other calibration methods and per-tensor weight scales
  (``-per-tensor``). They quantize the same operators as the first, so they are no smaller and
  no faster: they are only tried when it failed on quality or could not be made.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.artifact import ModelArtifact
from sdk.optimize.report import Candidate, SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.quantize import DEFAULT_OP_TYPES, QuantizeConfig, quantize

__all__ = [
    "ALL_OPS_SUFFIX",
    "BIAS_CORRECTED_SUFFIX",
    "PER_TENSOR_SUFFIX",
    "STATIC_PREFIX",
    "AllOpsStage",
    "BiasCorrectedRecipe",
    "BiasCorrectionStage",
    "CalibrationVariantRecipe",
    "CalibrationVariantsStage",
    "StaticRecipe",
    "StaticStage",
    "base_name",
    "no_default_ops",
]

STATIC_PREFIX = "ort-static-int8"
ALL_OPS_SUFFIX = "-all-ops"
PER_TENSOR_SUFFIX = "-per-tensor"
BIAS_CORRECTED_SUFFIX = "-bias-corrected"


def base_name(ctx: SearchContext) -> str | None:
    """The first static candidate's name, or None when static int8 is not tried at all."""
    if ctx.calibration is None or not ctx.config.static_methods or ctx.nothing_to_quantize:
        return None
    return f"{STATIC_PREFIX}-{ctx.config.static_methods[0]}"


@dataclass(frozen=True)
class StaticRecipe(Recipe):
    """Static int8 of the fp32 model with ``config``."""

    label: str
    config: QuantizeConfig

    @property
    def name(self) -> str:
        return self.label

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        return quantize(
            ctx.fp32,
            ctx.require_calibration(),
            out=path,
            config=self.config,
            calibration_cache=ctx.calibration_cache,
        )


@dataclass(frozen=True)
class CalibrationVariantRecipe(StaticRecipe):
    """A calibration variant of the first static candidate ``base``: tried only while that one
    failed on quality (the ``drop`` line) or could not be made."""

    base: str

    def skip_reason(self, ctx: SearchContext, done: Sequence[Candidate]) -> str | None:
        base = next((c for c in done if c.name == self.base), None)
        if base is None or base.error is not None:
            return None
        if base.meets_budget:
            return (
                f"calibration variant of {base.name}, which already meets every budget line: "
                "it quantizes the same operators, so it can be neither smaller nor faster"
            )
        missed = [line.name for line in base.budget_lines if not line.passed]
        if "drop" not in missed:
            return (
                f"calibration variant of {base.name}, which misses only {', '.join(missed)}: "
                "a variant with the same operators quantized cannot meet those lines"
            )
        return None


class StaticStage:
    name = "ort-static"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        base = base_name(ctx)
        if base is None:
            return []
        reason = ctx.no_default_ops
        if reason is not None:
            if ctx.config.try_all_ops and more_ops_to_quantize(ctx.fp32):
                reason += f"; {base}{ALL_OPS_SUFFIX} quantizes the other types"
            return [SkippedRecipe(base, reason)]
        return [
            StaticRecipe(
                base,
                QuantizeConfig(method=ctx.config.static_methods[0], reduce_range=ctx.reduce_range),
            )
        ]


class AllOpsStage:
    name = "ort-static-all-ops"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        base = base_name(ctx)
        if base is None or not ctx.config.try_all_ops or not more_ops_to_quantize(ctx.fp32):
            return []
        config = QuantizeConfig(
            method=ctx.config.static_methods[0], op_types=None, reduce_range=ctx.reduce_range
        )
        return [StaticRecipe(f"{base}{ALL_OPS_SUFFIX}", config)]


@dataclass(frozen=True)
class BiasCorrectedRecipe(StaticRecipe):
    """``base``'s quantization with bias correction: tried only when ``base`` was made and
    misses the drop line and no other (correction changes neither speed nor size)."""

    base: str

    def skip_reason(self, ctx: SearchContext, done: Sequence[Candidate]) -> str | None:
        base = next((c for c in done if c.name == self.base), None)
        if base is None or base.error is not None:  # not made, or refused by the cosine gate
            return None
        if base.meets_budget:
            return f"bias correction of {base.name}, which already meets every budget line"
        missed = [line.name for line in base.budget_lines if not line.passed]
        if missed != ["drop"]:
            return (
                f"bias correction of {base.name}, which misses {', '.join(missed)}: "
                "correcting biases changes accuracy only, not speed or size"
            )
        return None


class BiasCorrectionStage:
    name = "ort-static-bias-corrected"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        base = base_name(ctx)
        if base is None or not ctx.config.try_bias_correction or not _has_conv(ctx.fp32):
            return []
        all_ops = ctx.config.try_all_ops and more_ops_to_quantize(ctx.fp32)
        config = QuantizeConfig(
            method=ctx.config.static_methods[0],
            op_types=None if all_ops else DEFAULT_OP_TYPES,
            reduce_range=ctx.reduce_range,
            bias_correction=True,
        )
        corrected = f"{base}{ALL_OPS_SUFFIX}" if all_ops else base
        return [BiasCorrectedRecipe(f"{corrected}{BIAS_CORRECTED_SUFFIX}", config, corrected)]


class CalibrationVariantsStage:
    name = "ort-static-variants"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        base = base_name(ctx)
        if base is None or ctx.no_default_ops is not None:
            return []
        first, *others = ctx.config.static_methods
        plan: list[Recipe | SkippedRecipe] = [
            CalibrationVariantRecipe(
                f"{STATIC_PREFIX}-{method}",
                QuantizeConfig(method=method, reduce_range=ctx.reduce_range),
                base,
            )
            for method in others
        ]
        if ctx.config.per_tensor_variant:
            config = QuantizeConfig(method=first, per_channel=False, reduce_range=ctx.reduce_range)
            plan.append(CalibrationVariantRecipe(f"{base}{PER_TENSOR_SUFFIX}", config, base))
        return plan


def no_default_ops(model: ModelArtifact) -> str | None:
    """Why the candidates that quantize the default operator types have nothing to do in
    ``model``, or None; the search asks once (:attr:`SearchContext.no_default_ops`).

    A model with no operator of :data:`~sdk.quantize.DEFAULT_OP_TYPES` (a scikit-learn
    k-nearest-neighbours graph: Scan, TopK, ReduceSum), not even inside a subgraph, and no
    Gather from a float table, would make ONNX Runtime quantize nothing in every one of them:
    the search says so once, in the plain static candidate's place, and plans none of the
    others (dynamic, calibration variants, accuracy- and latency-aware). Compute inside an
    If/Loop/Scan body is left to those candidates, whose error says how to export it flat."""
    from sdk.quantize.ort_check import holds_op_types

    if model.format != "onnx" or holds_op_types(model.path, DEFAULT_OP_TYPES):
        return None
    return (
        f"no operator of the default int8 types ({', '.join(DEFAULT_OP_TYPES)}) in this model: "
        "static and dynamic int8 of those types would quantize nothing"
    )


def more_ops_to_quantize(model: ModelArtifact) -> bool:
    """Whether quantizing every type ORT can would touch operators the default types leave."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    broader = (set(QDQRegistry) | set(QLinearOpsRegistry)) - set(DEFAULT_OP_TYPES)
    return bool(_op_types(model.path) & broader)


def _has_conv(model: ModelArtifact) -> bool:
    """Whether the model has a Conv, the only operator bias correction moves."""
    return "Conv" in _op_types(model.path)


def _op_types(path: Path) -> frozenset[str]:
    """The operator types of the model's graph, read once per file version: several stages
    ask while the search plans."""
    stat = path.stat()
    return _op_types_of(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _op_types_of(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return frozenset(n.op_type for n in graph.node)
