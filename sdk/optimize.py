"""Budgeted search: make candidates, measure each, choose one, bundle it.

The recipes, in the order they are tried (expected pay-off first: the cheap recipes most
likely to win on a CPU board, then the ones that only matter when those miss, then the ones
that train for minutes):

1. ``fp32``: the model as given (always measured: the baseline every drop is measured from);
2. ``ort-static-int8-<method>``: static int8 (QDQ, per-channel) with the first calibration
   method of :attr:`OptimizeConfig.static_methods`, quantizing the default operator types
   (:data:`sdk.quantize.DEFAULT_OP_TYPES`);
3. ``ort-dynamic-int8``: ONNX Runtime dynamic int8 (scored one sample at a time, as a board
   runs it, since its activation scales depend on the batch);
4. ``ort-static-int8-<method>-all-ops``: static int8 over every operator type ORT can
   quantize, when the model has operators that would add;
5. calibration variants of (2): the other methods of ``static_methods`` and per-tensor weight
   scales (``-per-tensor``). They quantize the same operators, so they are no smaller and no
   faster than (2): they only run when (2) failed on quality (the ``drop`` line or the
   ``min_cosine`` gate) or could not be made;
6. ``ort-static-int8-accuracy-aware``: :func:`sdk.sensitivity.accuracy_aware_quantize` keeps
   the most quantization-sensitive nodes in float until the drop fits the budget's ``drop``
   line. It needs eval data and a ``drop`` line and only runs when no static candidate so far
   meets every line and plain static int8 missed the ``drop`` line (otherwise it would return
   plain static int8 unchanged, or be beaten by a candidate with more of the model in int8);
7. with a PyTorch model (``torch_model``, ``train_data``): ``pruned-<pct>-int8`` for each of
   :attr:`OptimizeConfig.prune_ratios` (structured pruning with :func:`sdk.prune.prune_structured`,
   fine-tuning, ONNX export, static int8), and with a ``student``: ``distilled-int8``
   (:func:`sdk.distill.distill` from ``torch_model``, export, static int8);
8. ``fp16``: only where the runtime benefits. Boards run ONNX Runtime's CPU execution
   provider, whose fp16 support is a handful of kernels (it casts around the rest), so on a
   CPU target fp16 is listed as skipped with that reason; ``try_fp16=True`` forces it.

Every candidate is evaluated on the eval data (top-1 accuracy with labels, else agreement with
fp32, else, for outputs without classes, cosine similarity with fp32) and benchmarked in its
own process under the target profile, on one real sample of the eval (else calibration) data.
A candidate that cannot be made is recorded with its error; the search goes on. A recipe that
is not tried is listed in :attr:`OptimizeReport.skipped` with the reason: its rule above, or
the time limit (:attr:`OptimizeConfig.time_limit_s`: once that much time has passed, no new
candidate is started; fp32 always is, and the choice, detector and bundle always follow).

Calibration is cached (:attr:`OptimizeConfig.calibration_cache`): static int8's activation
ranges are stored per (model, calibration data, method, operator types), so per-channel
variants, accuracy-aware steps and re-runs reuse them instead of calibrating again; the
report counts the hits.

Quality gate: with eval data and a ``drop`` budget line, that line judges quality. Otherwise an
int8 candidate must pass the check :func:`~sdk.quantize.quantize` ran against fp32 on
calibration samples: its worst-sample cosine similarity must reach
:attr:`OptimizeConfig.min_cosine` (0.99), or the candidate fails. The report says which gate
applied.

The objective, in order:

1. Among candidates that meet every budget line, the lowest p95 latency wins; file size breaks
   ties. When fp32 meets the budget and another candidate wins, fp32 and the winner are
   benchmarked again, alternately, and the winner is kept only if its median p95 is not above
   fp32's: a candidate slower than fp32 is never chosen because of measurement noise. An
   ``-all-ops`` winner is settled the same way against its default-op-types sibling, and kept
   only if it is faster: quantizing more operators must earn its extra risk.
2. When no candidate meets the budget, the best effort is the one with the smallest total
   relative excess over the failing lines; it is bundled all the same, and the report says how
   far each line is off.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.contracts.bundle import DetectorSpec
from sdk.artifact import ModelArtifact, read_artifact
from sdk.bench import BenchConfig, BenchReport, benchmark
from sdk.budget import Budget, BudgetLine, check_budget
from sdk.data import Dataset, DataSource, load_dataset, take_samples
from sdk.errors import ConfigError, EdgeshipError
from sdk.evaluate import Quality, accuracy_drop, drop_basis, evaluate
from sdk.package import package
from sdk.quantize import DEFAULT_OP_TYPES, CalibMethod, QuantizeConfig, quantize
from sdk.targets import TargetProfile, get_target

if TYPE_CHECKING:
    import torch

    from sdk.training import TrainData

__all__ = [
    "Candidate",
    "OptimizeConfig",
    "OptimizeReport",
    "SkippedRecipe",
    "default_calibration_cache",
    "optimize",
]

log = logging.getLogger(__name__)

FP32 = "fp32"
FP16 = "fp16"
DYNAMIC = "ort-dynamic-int8"
STATIC_PREFIX = "ort-static-int8"
ALL_OPS_SUFFIX = "-all-ops"
PER_TENSOR_SUFFIX = "-per-tensor"
ACCURACY_AWARE = f"{STATIC_PREFIX}-accuracy-aware"
DISTILLED = "distilled-int8"
EVAL_BATCH = 64


def default_calibration_cache() -> Path:
    """``$EDGESHIP_CACHE_DIR/calibration``, else ``$XDG_CACHE_HOME/edgeship/calibration``,
    else ``~/.cache/edgeship/calibration``."""
    root = os.environ.get("EDGESHIP_CACHE_DIR")
    if root:
        return Path(root) / "calibration"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "edgeship" / "calibration"


@dataclass(frozen=True)
class OptimizeConfig:
    """What to try and what to aim for.

    ``static_methods`` lists the calibration methods tried for static int8: the first one
    always, the others (and ``per_tensor_variant``) as calibration variants when the first
    fails on quality (module docstring). ``confirm_rounds`` is how many alternating
    re-benchmarks settle a winner against fp32. ``detector`` is the outlier detector fitted on
    the calibration data and shipped in the bundle: ``"auto"`` (what
    :func:`sdk.detect.default_detector` recommends for the model), a detector kind, or None; its
    threshold is calibrated on held-out calibration samples for a false-positive rate of
    ``outlier_fpr``.

    ``min_cosine``: the quality gate used when there is no eval data with a ``drop`` budget
    line: an int8 candidate whose check against fp32 on calibration samples (worst-sample
    cosine similarity of the outputs) is below it fails; None turns the gate off.
    ``try_all_ops``: also try static int8 over every operator type ORT can quantize (when the
    model has such operators beyond the default ones); it is chosen only if it is faster.
    ``try_accuracy_aware``: the accuracy-aware candidate (at most ``max_excluded_nodes`` nodes
    kept in float). ``try_fp16``: None decides from the target (skipped on CPU boards), True
    forces the candidate, False leaves it out.

    ``time_limit_s``: no new candidate starts once this many seconds have passed since the
    search began (None: no limit). ``bench_ci_stop``: a benchmark stops timing before
    ``min_seconds`` (never before ``min_runs``) once the 95% confidence interval of its p95 is
    within this fraction of it (:attr:`sdk.bench.BenchConfig.ci_stop`; None: always run
    ``min_seconds``). ``calibration_cache``: directory of cached calibration
    ranges (None: :func:`default_calibration_cache`); ``use_calibration_cache=False``
    calibrates every candidate afresh.

    With a PyTorch model: ``prune_ratios`` (one ``pruned-<pct>-int8`` candidate each; empty:
    none), ``fine_tune_epochs`` after pruning and ``distill_epochs`` for the student.
    """

    target: str | TargetProfile = "host"
    budget: Budget = field(default_factory=Budget)
    name: str = "model"
    version: str = "1"
    labels: tuple[str, ...] | None = None
    try_dynamic: bool = True
    static_methods: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")
    per_tensor_variant: bool = True
    min_runs: int = 200
    min_seconds: float = 3.0
    confirm_rounds: int = 2
    keep_candidates: bool = True
    detector: str | None = "auto"
    outlier_fpr: float = 0.01
    min_cosine: float | None = 0.99
    try_all_ops: bool = True
    try_accuracy_aware: bool = True
    max_excluded_nodes: int = 8
    try_fp16: bool | None = None
    time_limit_s: float | None = None
    bench_ci_stop: float | None = 0.02
    calibration_cache: str | Path | None = None
    use_calibration_cache: bool = True
    prune_ratios: tuple[float, ...] = (0.3, 0.5)
    fine_tune_epochs: int = 5
    distill_epochs: int = 15

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be between -1 and 1, got {self.min_cosine}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ConfigError(f"time_limit_s must be positive, got {self.time_limit_s}")
        if isinstance(self.static_methods, str) or isinstance(self.prune_ratios, float | int):
            raise ConfigError("static_methods and prune_ratios take a tuple, not a single value")
        object.__setattr__(self, "static_methods", tuple(self.static_methods))
        object.__setattr__(self, "prune_ratios", tuple(self.prune_ratios))
        for ratio in self.prune_ratios:
            if not 0.0 < ratio < 1.0:
                raise ConfigError(f"prune_ratios must be between 0 and 1, got {ratio}")
        if self.fine_tune_epochs < 0 or self.distill_epochs < 1:
            raise ConfigError("fine_tune_epochs must be >= 0 and distill_epochs >= 1")
        if self.max_excluded_nodes < 1:
            raise ConfigError(
                f"max_excluded_nodes must be at least 1, got {self.max_excluded_nodes}"
            )

    def cache_dir(self) -> Path | None:
        if not self.use_calibration_cache:
            return None
        if self.calibration_cache is None:
            return default_calibration_cache()
        return Path(self.calibration_cache)


@dataclass
class Candidate:
    """One recipe's outcome: its model, quality, benchmark and budget verdict, or its error."""

    name: str
    artifact: ModelArtifact | None = None
    quality: Quality | None = None
    accuracy_drop: float | None = None
    drop_basis: str | None = None
    bench: BenchReport | None = None
    budget_lines: list[BudgetLine] = field(default_factory=list)
    error: str | None = None
    confirm_p95_ms: list[float] = field(default_factory=list)
    elapsed_s: float | None = None
    reproduce: str | None = None

    @property
    def meets_budget(self) -> bool:
        return self.error is None and all(line.passed for line in self.budget_lines)

    @property
    def p95_ms(self) -> float:
        if self.confirm_p95_ms:
            return statistics.median(self.confirm_p95_ms)
        return float("inf") if self.bench is None else self.bench.latency_ms["p95"]

    @property
    def violations(self) -> list[str]:
        if self.error is not None:
            return [f"candidate failed: {self.error}"]
        return [line.describe() for line in self.budget_lines if not line.passed]

    @property
    def calibration_cache_hit(self) -> bool | None:
        """Whether its static calibration came from the cache (None: no cached calibration)."""
        cache = None if self.artifact is None else self.artifact.details.get("calibration_cache")
        return None if not cache else bool(cache.get("hit"))

    def excess(self) -> float:
        """Sum of relative excess over the failing lines (0 when all pass)."""
        if self.error is not None:
            return float("inf")
        total = 0.0
        for line in self.budget_lines:
            if line.measured is None:
                total += 1e6
            elif not line.passed:
                total += (line.measured - line.limit) / max(line.limit, 1e-9)
        return total

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "path": None if self.artifact is None else str(self.artifact.path),
            "recipe": None if self.artifact is None else self.artifact.recipe,
            "precision": None if self.artifact is None else self.artifact.precision,
            "size_bytes": None if self.artifact is None else self.artifact.size_bytes,
            "error": self.error,
            "meets_budget": self.meets_budget,
            "violations": self.violations,
            "budget": [line.to_dict() for line in self.budget_lines],
            "accuracy_drop": self.accuracy_drop,
            "drop_basis": self.drop_basis,
            "elapsed_s": self.elapsed_s,
            "calibration_cache_hit": self.calibration_cache_hit,
            "reproduce": self.reproduce,
        }
        if self.artifact is not None:
            excluded = self.artifact.details.get("excluded_nodes")
            out["excluded_nodes"] = list(excluded) if excluded else []
        if self.quality is not None:
            q = self.quality.to_dict()
            out["quality"] = q
            out["accuracy"] = q.get("accuracy")
            out["agreement"] = q.get("agreement")
        if self.bench is not None:
            b = self.bench.to_dict()
            out["latency_ms"] = b["latency_ms"]
            out["peak_rss_mb"] = b["peak_rss_mb"]
            out["rss_increase_mb"] = b["rss_increase_mb"]
            out["benchmark"] = b
        if self.confirm_p95_ms:
            out["confirm_p95_ms"] = self.confirm_p95_ms
        if self.artifact is not None and self.artifact.details:
            out["details"] = dict(self.artifact.details)
        return out


@dataclass(frozen=True)
class SkippedRecipe:
    """A recipe the search did not try, and why (early stopping, the time limit, no data)."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass
class OptimizeReport:
    """The whole search: every candidate, the choice and why, and where the bundle is."""

    candidates: list[Candidate]
    chosen: str
    meets_budget: bool
    bundle: Path
    target: TargetProfile
    budget: Budget
    notes: list[str] = field(default_factory=list)
    quality_gate: str = ""
    skipped: list[SkippedRecipe] = field(default_factory=list)
    elapsed_s: float = 0.0
    time_limit_s: float | None = None
    calibration_cache: Path | None = None

    @property
    def chosen_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def calibration_cache_hits(self) -> int:
        return sum(1 for c in self.candidates if c.calibration_cache_hit)

    @property
    def calibration_cache_misses(self) -> int:
        return sum(1 for c in self.candidates if c.calibration_cache_hit is False)

    def to_dict(self) -> dict[str, Any]:
        from sdk.report_html import pareto_front

        chosen = self.chosen_candidate
        candidates = [c.to_dict() for c in self.candidates]
        return {
            "candidates": candidates,
            "pareto_front": pareto_front(candidates),
            "skipped": [s.to_dict() for s in self.skipped],
            "chosen": self.chosen,
            "meets_budget": self.meets_budget,
            "bundle": str(self.bundle),
            "target": {
                "name": self.target.name,
                "description": self.target.description,
                "cores": self.target.cores,
                "memory_mb": self.target.memory_mb,
            },
            "measured_on": None if chosen.bench is None else chosen.bench.measured_on,
            "budget": self.budget.to_dict(),
            "budget_text": self.budget.describe(),
            "violations": chosen.violations,
            "quality_gate": self.quality_gate,
            "elapsed_s": self.elapsed_s,
            "time_limit_s": self.time_limit_s,
            "calibration_cache": {
                "dir": None if self.calibration_cache is None else str(self.calibration_cache),
                "hits": self.calibration_cache_hits,
                "misses": self.calibration_cache_misses,
            },
            "notes": self.notes,
        }

    def summary(self) -> str:
        width = max(26, *(len(c.name) + 2 for c in self.candidates))
        rows = [
            f"{'candidate':<{width}}{'size KiB':>9}{'p50 ms':>9}{'p95 ms':>9}{'rss+ MB':>9}"
            f"{'quality':>11}{'drop pts':>9}{'time s':>8}  budget"
        ]
        for c in self.candidates:
            if c.error is not None:
                rows.append(f" {c.name:<{width - 1}}  failed: {c.error}")
                continue
            size = c.artifact.size_bytes / 1024 if c.artifact else float("nan")
            lat = c.bench.latency_ms if c.bench else {}
            rss = c.bench.rss_increase_mb if c.bench else float("nan")
            q = c.quality
            qual = "-"
            if q is not None and q.accuracy is not None:
                qual = f"{q.accuracy:.2%}"
            elif q is not None and q.agreement is not None:
                qual = f"{q.agreement:.2%}agr"
            elif q is not None and q.cosine_mean is not None:
                qual = f"{q.cosine_mean:.4f}cos"
            elif c.drop_basis == "reference":
                qual = "ref"
            drop = "-" if c.accuracy_drop is None else f"{c.accuracy_drop * 100:.2f}"
            spent = float("nan") if c.elapsed_s is None else c.elapsed_s
            verdict = "ok" if c.meets_budget else "MISS"
            mark = "*" if c.name == self.chosen else " "
            rows.append(
                f"{mark}{c.name:<{width - 1}}{size:>9.1f}{lat.get('p50', float('nan')):>9.3f}"
                f"{lat.get('p95', float('nan')):>9.3f}{rss:>9.1f}{qual:>11}{drop:>9}"
                f"{spent:>8.1f}  {verdict}"
            )
            excluded = c.artifact.details.get("excluded_nodes") if c.artifact else None
            if excluded:
                rows.append(f"  {'':<{width - 2}}kept in float: {', '.join(excluded)}")
        rows.extend(f" {s.name:<{width - 1}}  skipped: {s.reason}" for s in self.skipped)
        chosen = self.chosen_candidate
        head = (
            f"target {self.target.name} ({self.target.description}); budget "
            f"{self.budget.describe()}"
        )
        if chosen.bench is not None:
            head += f"\nlatencies measured on {chosen.bench.measured_on}"
        if self.quality_gate:
            head += f"\nquality gate: {self.quality_gate}"
        tail = [f"chosen: {self.chosen} -> bundle {self.bundle}"]
        if self.meets_budget:
            tail.append("meets every budget line")
        else:
            tail.append("NO candidate meets the budget; bundled the best effort. Off by:")
            tail.extend(f"  - {v}" for v in chosen.violations)
        limit = "" if self.time_limit_s is None else f" (time limit {self.time_limit_s:g} s)"
        cache = ""
        if self.calibration_cache is not None:
            cache = (
                f"; calibration cache: {self.calibration_cache_hits} hit(s), "
                f"{self.calibration_cache_misses} miss(es)"
            )
        tail.append(f"search took {self.elapsed_s:.1f} s{limit}{cache}")
        tail.extend(f"note: {n}" for n in self.notes)
        return "\n".join([head, *rows, *tail])


@dataclass
class _Recipe:
    """A candidate to make: its name, how to make it, and what its skip rule looks at."""

    name: str
    make: Callable[[Path], ModelArtifact] | None  # None: fp32, copied as given
    kind: str  # fp32, static, dynamic, all-ops, variant, accuracy-aware, torch, fp16
    one_by_one: bool = False  # evaluate at batch 1 (dynamic int8)
    base: str | None = None  # a variant's base candidate


def optimize(
    model: ModelArtifact | str | Path,
    *,
    calibration: DataSource | None = None,
    eval_data: DataSource | None = None,
    out: str | Path,
    config: OptimizeConfig | None = None,
    progress: bool = False,
    torch_model: torch.nn.Module | None = None,
    train_data: TrainData | None = None,
    student: torch.nn.Module | None = None,
) -> OptimizeReport:
    """Search the recipes for ``model`` and bundle the chosen candidate into ``out``.

    ``torch_model`` is the PyTorch module ``model`` was exported from; with ``train_data``
    (``(x, y)``: inputs and integer class labels) the search adds pruned and fine-tuned
    candidates, and with a ``student`` module a distilled one (module docstring). They need
    eval data and a ``drop`` budget line, which is what judges them.

    Raises only for bad input (unreadable model, data not matching it, bad config); a missed
    budget is reported, with the best effort bundled.
    """
    started = time.monotonic()
    cfg = config or OptimizeConfig()
    target = cfg.target if isinstance(cfg.target, TargetProfile) else get_target(cfg.target)
    fp32 = model if isinstance(model, ModelArtifact) else read_artifact(model, recipe=FP32)
    if fp32.format != "onnx":
        raise ConfigError(f"optimize takes an ONNX model; {fp32.path.name} is {fp32.format}")
    cal = (
        None if calibration is None else load_dataset(calibration, fp32.io, what="calibration data")
    )
    ev = None if eval_data is None else load_dataset(eval_data, fp32.io, what="eval data")
    _check_torch_inputs(cfg, fp32, cal, ev, torch_model, train_data, student)
    out_dir = Path(out)
    work = out_dir.with_name(out_dir.name + "-candidates")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cache_dir = cfg.cache_dir() if cal is not None else None

    notes: list[str] = []
    skipped: list[SkippedRecipe] = []
    plan = _plan(cfg, fp32, cal, ev, target, cache_dir, torch_model, train_data, student, skipped)
    if cal is None:
        notes.append("no calibration data: static int8 was not tried (pass --calibration)")
    if ev is None:
        notes.append("no eval data: quality was not measured, so a 'drop' budget line fails")
    gate_on_check = cfg.min_cosine is not None and (
        ev is None or cfg.budget.max_accuracy_drop is None
    )
    gate = _describe_gate(cfg, ev is not None, cal is not None, gate_on_check)
    sample = _bench_sample(ev if ev is not None else cal, fp32)
    bench_config = _bench_config(cfg, target)

    def measure(art: ModelArtifact) -> BenchReport:
        try:
            return benchmark(art, bench_config, inputs=sample)
        except ConfigError as exc:
            if sample is not None:
                raise
            raise ConfigError(
                f"{exc}; or pass --eval/--calibration data, and optimize benchmarks every "
                "candidate on one real sample of it"
            ) from exc

    bar = _progress(len(plan) + 1, progress)
    candidates: list[Candidate] = []
    baseline_quality: Quality | None = None
    try:
        for recipe in plan:
            if recipe.kind != "fp32":
                reason = _skip_reason(recipe, candidates, cfg, ev, time.monotonic() - started)
                if reason is not None:
                    skipped.append(SkippedRecipe(recipe.name, reason))
                    log.info("skipped %s: %s", recipe.name, reason)
                    bar.update(1)
                    continue
            cand = Candidate(name=recipe.name)
            candidates.append(cand)
            began = time.monotonic()
            try:
                _run_candidate(
                    cand, recipe, fp32, ev, work, cfg, gate_on_check, baseline_quality, measure, bar
                )
            finally:
                cand.elapsed_s = time.monotonic() - began
            cand.reproduce = _reproduce(cand.artifact, calibration)
            if recipe.kind == "fp32":
                baseline_quality = cand.quality
            cand.budget_lines = [] if cand.error else check_budget(cfg.budget, _metrics(cand))
            bar.update(1)

        bar.set_description("confirm the choice against fp32")
        chosen = _choose(
            candidates,
            cfg.confirm_rounds,
            lambda art: measure(art).latency_ms["p95"],
            notes,
        )
        winner = chosen.artifact
        assert winner is not None  # _choose only returns candidates that were made
        bar.set_description("fit the outlier detector")
        detector = None if cal is None else _fit_detector(cfg, cal, winner, work, notes)
        bar.set_description("reference statistics")
        reference = _write_reference(
            cfg, ev if ev is not None else cal, winner, detector, work, notes
        )
        bar.set_description("bundle")
        bundle = package(
            winner,
            out_dir,
            name=cfg.name,
            version=cfg.version,
            labels=cfg.labels,
            budget=cfg.budget,
            benchmark=_bundle_benchmark(chosen),
            detector=detector,
            reference=reference,
        )
        bar.update(1)
    finally:
        bar.close()
    isa = _isa_note(target)
    if isa is not None:
        notes.append(isa)
    if sample is not None:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sample.items())
        source = "eval" if ev is not None else "calibration"
        notes.append(f"benchmarked on one sample of the {source} data ({shapes})")
    if not cfg.keep_candidates:
        shutil.rmtree(work, ignore_errors=True)
    return OptimizeReport(
        candidates=candidates,
        chosen=chosen.name,
        meets_budget=chosen.meets_budget,
        bundle=bundle.root,
        target=target,
        budget=cfg.budget,
        notes=notes,
        quality_gate=gate,
        skipped=skipped,
        elapsed_s=time.monotonic() - started,
        time_limit_s=cfg.time_limit_s,
        calibration_cache=cache_dir,
    )


def _run_candidate(
    cand: Candidate,
    recipe: _Recipe,
    fp32: ModelArtifact,
    ev: Dataset | None,
    work: Path,
    cfg: OptimizeConfig,
    gate_on_check: bool,
    baseline_quality: Quality | None,
    measure: Callable[[ModelArtifact], BenchReport],
    bar: Any,
) -> None:
    """Make, gate, evaluate and benchmark one candidate; failures are recorded on it (fp32's
    raise: without a baseline there is no search)."""
    is_fp32 = recipe.make is None
    path = work / f"{recipe.name}.onnx"
    bar.set_description(f"{recipe.name}: make")
    try:
        if recipe.make is None:
            shutil.copyfile(fp32.path, path)
            cand.artifact = ModelArtifact(path=path, format="onnx", io=fp32.io, recipe=FP32)
        else:
            cand.artifact = recipe.make(path)
    except EdgeshipError as exc:
        if is_fp32:
            raise
        cand.error = str(exc)
        log.warning("candidate %s failed: %s", recipe.name, exc)
        return
    if not is_fp32 and gate_on_check and cand.artifact.precision == "int8":
        cand.error = _check_gate(cand.artifact, cfg)
        if cand.error is not None:
            log.info("candidate %s failed the quality gate: %s", recipe.name, cand.error)
            return
    bar.set_description(f"{recipe.name}: evaluate")
    if ev is not None:
        try:
            _evaluate_candidate(cand, ev, fp32, baseline_quality, recipe)
        except EdgeshipError as exc:
            if is_fp32:
                raise
            cand.error = f"evaluation failed: {exc}"
            return
    bar.set_description(f"{recipe.name}: benchmark")
    try:
        cand.bench = measure(cand.artifact)
    except EdgeshipError as exc:
        if is_fp32:
            raise
        cand.error = f"benchmark failed: {exc}"


def _plan(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset | None,
    ev: Dataset | None,
    target: TargetProfile,
    cache: Path | None,
    torch_model: torch.nn.Module | None,
    train_data: TrainData | None,
    student: torch.nn.Module | None,
    skipped: list[SkippedRecipe],
) -> list[_Recipe]:
    """The recipes in the order of the module docstring; the ones that cannot apply at all
    go straight to ``skipped``."""

    def quantized(
        qconfig: QuantizeConfig, source: ModelArtifact | None = None
    ) -> Callable[[Path], ModelArtifact]:
        return lambda path: quantize(
            source or fp32, cal, out=path, config=qconfig, calibration_cache=cache
        )

    plan = [_Recipe(FP32, None, "fp32")]
    first = cfg.static_methods[0] if cfg.static_methods else None
    base = f"{STATIC_PREFIX}-{first}"
    if cal is not None and first is not None:
        plan.append(_Recipe(base, quantized(QuantizeConfig(method=first)), "static"))
    if cfg.try_dynamic:
        plan.append(_Recipe(DYNAMIC, quantized(QuantizeConfig(mode="dynamic")), "dynamic", True))
    if cal is not None and first is not None:
        if cfg.try_all_ops and _more_ops_to_quantize(fp32):
            plan.append(
                _Recipe(
                    f"{base}{ALL_OPS_SUFFIX}",
                    quantized(QuantizeConfig(method=first, op_types=None)),
                    "all-ops",
                )
            )
        for method in cfg.static_methods[1:]:
            qconfig = QuantizeConfig(method=method)
            plan.append(
                _Recipe(f"{STATIC_PREFIX}-{method}", quantized(qconfig), "variant", base=base)
            )
        if cfg.per_tensor_variant:
            qconfig = QuantizeConfig(method=first, per_channel=False)
            plan.append(
                _Recipe(f"{base}{PER_TENSOR_SUFFIX}", quantized(qconfig), "variant", base=base)
            )
        if cfg.try_accuracy_aware:
            plan.append(
                _Recipe(ACCURACY_AWARE, _accuracy_aware(cfg, fp32, cal, ev, first, cache), "aaq")
            )
    if torch_model is not None and cal is not None and train_data is not None:
        for ratio in cfg.prune_ratios:
            plan.append(
                _Recipe(
                    f"pruned-{ratio * 100:g}-int8",
                    _pruned(cfg, fp32, cal, torch_model, train_data, ratio, cache),
                    "torch",
                )
            )
        if student is not None:
            plan.append(
                _Recipe(
                    DISTILLED,
                    _distilled(cfg, fp32, cal, torch_model, student, train_data, cache),
                    "torch",
                )
            )
    fp16_reason = _fp16_skip_reason(cfg, target)
    if fp16_reason is None:
        plan.append(_Recipe(FP16, lambda path: _to_fp16(fp32, path), "fp16"))
    elif cfg.try_fp16 is not False:
        skipped.append(SkippedRecipe(FP16, fp16_reason))
    return plan


def _skip_reason(
    recipe: _Recipe,
    done: Sequence[Candidate],
    cfg: OptimizeConfig,
    ev: Dataset | None,
    elapsed: float,
) -> str | None:
    """Why ``recipe`` is not tried (early stopping, module docstring), or None to try it."""
    if cfg.time_limit_s is not None and elapsed >= cfg.time_limit_s:
        return (
            f"time limit: {elapsed:.1f} s of the {cfg.time_limit_s:g} s allowed had passed "
            "before it could start"
        )
    by_name = {c.name: c for c in done}
    if recipe.kind == "variant" and recipe.base is not None:
        base = by_name.get(recipe.base)
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
    if recipe.kind == "aaq":
        if ev is None or cfg.budget.max_accuracy_drop is None:
            return "accuracy-aware int8 needs eval data and a 'drop' budget line to aim for"
        static = [c for c in done if c.name.startswith(STATIC_PREFIX) and c.error is None]
        meeting = next(
            (c for c in static if c.meets_budget and not c.name.endswith(ALL_OPS_SUFFIX)), None
        )
        if meeting is not None:
            return (
                f"{meeting.name} already meets every budget line with every default operator "
                "in int8: keeping nodes in float cannot make it smaller or faster"
            )
        quality_ok = [
            c
            for c in static
            if all(line.passed for line in c.budget_lines if line.name == "drop")
            and not c.name.endswith(ALL_OPS_SUFFIX)
        ]
        if quality_ok:
            return (
                f"{quality_ok[0].name} already meets the drop line: the accuracy-aware search "
                "would return plain static int8 unchanged"
            )
    return None


def _evaluate_candidate(
    cand: Candidate,
    ev: Dataset,
    fp32: ModelArtifact,
    baseline: Quality | None,
    recipe: _Recipe,
) -> None:
    """Quality on the eval data and the drop against fp32 (0 for fp32 itself)."""
    assert cand.artifact is not None
    is_fp32 = recipe.kind == "fp32"
    # Dynamic int8 scales activations per run: score it one sample at a time, as a board runs.
    batch = 1 if recipe.one_by_one else EVAL_BATCH
    cand.quality = evaluate(
        cand.artifact, ev, reference=None if is_fp32 else fp32, batch_size=batch
    )
    if is_fp32:
        cand.accuracy_drop = 0.0
        cand.drop_basis = "accuracy" if cand.quality.accuracy is not None else "reference"
    elif baseline is not None:
        cand.drop_basis = drop_basis(cand.quality, baseline)
        cand.accuracy_drop = accuracy_drop(cand.quality, baseline)


def _accuracy_aware(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset,
    ev: Dataset | None,
    method: CalibMethod,
    cache: Path | None,
) -> Callable[[Path], ModelArtifact]:
    def make(path: Path) -> ModelArtifact:
        from sdk.sensitivity import accuracy_aware_quantize

        if ev is None or cfg.budget.max_accuracy_drop is None:  # _skip_reason rules this out
            raise ConfigError("accuracy-aware int8 needs eval data and a 'drop' budget line")
        artifact, report = accuracy_aware_quantize(
            fp32,
            cal,
            ev,
            max_drop=cfg.budget.max_accuracy_drop,
            max_excluded=cfg.max_excluded_nodes,
            out=path,
            config=QuantizeConfig(method=method),
            calibration_cache=cache,
        )
        details = dict(artifact.details.get("accuracy_aware") or {})
        details["most_sensitive"] = [t.to_dict() for t in report.tensors[:5]]
        details["notes"] = list(report.notes)
        return replace(artifact, recipe=ACCURACY_AWARE).with_details(accuracy_aware=details)

    return make


def _reproduce(artifact: ModelArtifact | None, calibration: DataSource | None) -> str | None:
    """The ``edgeship quantize`` command that makes this int8 model again from the ONNX model
    it was quantized from (for pruned and distilled candidates, their fp32 export in the
    candidates directory), or None for a model quantize did not make."""
    import shlex

    details = {} if artifact is None else artifact.details
    if artifact is None or "mode" not in details or "source" not in details:
        return None
    cal = str(calibration) if isinstance(calibration, str | Path) else "CALIBRATION.npz"
    parts = ["edgeship", "quantize", str(details["source"])]
    if details.get("calibration_samples") or details["mode"] == "static":
        parts += ["--calibration", cal]
    if details["mode"] == "dynamic":
        parts += ["--mode", "dynamic"]
    elif details.get("method") not in (None, "minmax"):
        parts += ["--method", str(details["method"])]
    if details.get("per_channel") is False:
        parts.append("--per-tensor")
    if details.get("op_types") is None:
        parts += ["--op-types", "all"]
    excluded = details.get("excluded_nodes") or []
    if excluded:
        parts += ["--exclude", ",".join(excluded)]
    parts += ["-o", str(artifact.path)]
    return shlex.join(parts)


def _check_torch_inputs(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset | None,
    ev: Dataset | None,
    torch_model: torch.nn.Module | None,
    train_data: TrainData | None,
    student: torch.nn.Module | None,
) -> None:
    """Refuse PyTorch recipes that cannot work or could not be judged, before any search."""
    if torch_model is None:
        if student is not None or train_data is not None:
            raise ConfigError(
                "student and train_data need torch_model (the PyTorch model the ONNX file was "
                "exported from): it is pruned, and it teaches the student"
            )
        return
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise ConfigError(
            f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}"
        )
    if student is not None and not isinstance(student, torch.nn.Module):
        raise ConfigError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if train_data is None:
        raise ConfigError("torch_model needs train_data=(x, y) to fine-tune or distil with")
    if cal is None:
        raise ConfigError("torch_model recipes end in static int8: pass calibration data")
    if ev is None or cfg.budget.max_accuracy_drop is None:
        raise ConfigError(
            "pruning and distillation change what the model computes: pass eval data and a "
            "'drop' budget line so their accuracy is judged"
        )
    example = _torch_example(fp32, cal)
    from device_agent.runtime import open_session

    expected = open_session(fp32.path).run(
        {s.name: t.numpy() for s, t in zip(fp32.io.inputs, example, strict=True)}
    )
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            got = torch_model(*example)
    finally:
        torch_model.train(was_training)
    first = got[0] if isinstance(got, tuple | list) else got
    a = first.detach().numpy().reshape(-1).astype(np.float64)
    b = np.asarray(expected[0]).reshape(-1).astype(np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"torch_model does not compute what {fp32.path.name} computes on calibration "
            "samples: pass the module the ONNX model was exported from"
        )


def _torch_example(fp32: ModelArtifact, cal: Dataset) -> tuple[torch.Tensor, ...]:
    import torch

    feed = take_samples(cal.inputs, 0, min(4, len(cal)))
    return tuple(torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in fp32.io.inputs)


def _export_and_quantize(
    module: torch.nn.Module,
    fp32: ModelArtifact,
    cal: Dataset,
    path: Path,
    recipe: str,
    cache: Path | None,
    details: dict[str, Any],
) -> ModelArtifact:
    """Export ``module`` next to ``path`` as ONNX and quantize it (static int8) to ``path``."""
    from sdk.export import export

    exported = export(
        module,
        _torch_example(fp32, cal),
        to="onnx",
        path=path.with_name(path.stem + ".fp32.onnx"),
        input_names=[s.name for s in fp32.io.inputs],
        output_names=[s.name for s in fp32.io.outputs],
    )
    art = quantize(exported, cal, out=path, calibration_cache=cache)
    return replace(art, recipe=recipe).with_details(**details)


def _pruned(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset,
    torch_model: torch.nn.Module,
    train_data: TrainData,
    ratio: float,
    cache: Path | None,
) -> Callable[[Path], ModelArtifact]:
    def make(path: Path) -> ModelArtifact:
        from sdk.prune import fine_tune, prune_structured

        result = prune_structured(torch_model, _torch_example(fp32, cal), ratio)
        pruned = result.model
        history = None
        if cfg.fine_tune_epochs:
            history = fine_tune(pruned, train_data, epochs=cfg.fine_tune_epochs, progress=False)
        pruned.eval()
        details = {
            "pruning": {
                "ratio": ratio,
                "fine_tune_epochs": cfg.fine_tune_epochs,
                "params_before": result.params_before,
                "params_after": result.params_after,
                "macs_before": result.macs_before,
                "macs_after": result.macs_after,
                "final_train_loss": None if history is None else history.final_loss,
            }
        }
        return _export_and_quantize(
            pruned, fp32, cal, path, f"pruned-{ratio * 100:g}+fine-tune+static-int8", cache, details
        )

    return make


def _distilled(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    train_data: TrainData,
    cache: Path | None,
) -> Callable[[Path], ModelArtifact]:
    def make(path: Path) -> ModelArtifact:
        import copy

        from sdk.distill import distill

        trained, history = distill(
            teacher, copy.deepcopy(student), train_data, epochs=cfg.distill_epochs, progress=False
        )
        details = {
            "distillation": {
                "epochs": cfg.distill_epochs,
                "student_params": sum(p.numel() for p in trained.parameters()),
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "final_train_loss": history.final_loss,
            }
        }
        return _export_and_quantize(
            trained, fp32, cal, path, "distilled+static-int8", cache, details
        )

    return make


def _sort_nodes(graph: Any) -> None:
    """Put ``graph``'s nodes in topological order (stable otherwise)."""
    import onnx

    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        pending.append(copy)
    ordered: list[Any] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest for the checker to name
            ordered.extend(pending)
            break
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)


def _fp16_skip_reason(cfg: OptimizeConfig, target: TargetProfile) -> str | None:
    """Why no fp16 candidate is made for ``target`` (None: make one)."""
    if cfg.try_fp16 is True:
        return None
    if cfg.try_fp16 is False:
        return "try_fp16=False"
    has_fp16 = "asimdhp" in target.isa
    isa = (
        f"{target.name} has fp16 arithmetic (asimdhp), but "
        if has_fp16
        else f"{target.name} has no fp16 arithmetic listed, and "
    )
    return (
        f"{isa}boards run ONNX Runtime's CPU execution provider, which has fp16 kernels for "
        "few operators and casts around the rest: fp16 would be slower than fp32 there "
        "(try_fp16=True to measure it anyway)"
    )


def _to_fp16(fp32: ModelArtifact, path: Path) -> ModelArtifact:
    """fp16 weights and arithmetic with fp32 inputs and outputs (the same I/O as fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from sdk.errors import QuantizationError

    try:
        converted = convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True)
        _sort_nodes(converted.graph)  # the converter appends the input casts at the end
        onnx.save(converted, str(path))
    except Exception as exc:  # the converter raises anything on graphs it does not handle
        raise QuantizationError(f"fp16 conversion: {exc}") from exc
    art = read_artifact(path, precision="fp16", recipe=FP16)
    return art


def _check_gate(artifact: ModelArtifact, cfg: OptimizeConfig) -> str | None:
    """The reason an int8 candidate fails the calibration-data check, or None if it passes."""
    check = artifact.details.get("check") or {}
    cos = check.get("cosine_min")
    if cfg.min_cosine is None or cos is None or cos >= cfg.min_cosine:
        return None
    inputs = "calibration" if check.get("inputs") == "calibration" else "generated"
    return (
        f"quality gate: worst-sample cosine {cos:.4g} with fp32 on {check.get('samples')} "
        f"{inputs} samples is below min_cosine {cfg.min_cosine:g}"
    )


def _describe_gate(cfg: OptimizeConfig, has_eval: bool, has_cal: bool, on_check: bool) -> str:
    if has_eval and cfg.budget.max_accuracy_drop is not None:
        return (
            f"the budget's drop line (<= {cfg.budget.max_accuracy_drop * 100:g} pts) on the eval "
            "data"
        )
    if not on_check:
        return "none (min_cosine is None)"
    inputs = "calibration samples" if has_cal else "generated random inputs (no calibration data)"
    why = "no eval data" if not has_eval else "the budget has no drop line"
    return (
        f"int8 candidates need worst-sample cosine >= {cfg.min_cosine:g} with fp32 in the "
        f"quantizer's check on {inputs} ({why})"
    )


def _more_ops_to_quantize(model: ModelArtifact) -> bool:
    """Whether quantizing every type ORT can would touch operators the default types leave."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    graph = onnx.load(str(model.path), load_external_data=False).graph
    present = {n.op_type for n in graph.node}
    broader = (set(QDQRegistry) | set(QLinearOpsRegistry)) - set(DEFAULT_OP_TYPES)
    return bool(present & broader)


def _bench_sample(data: Dataset | None, model: ModelArtifact) -> dict[str, np.ndarray] | None:
    """One real sample (a whole batch for a model whose batch axis is fixed) to time."""
    if data is None:
        return None
    fixed = [s.shape[0] for s in model.io.inputs if s.shape and isinstance(s.shape[0], int)]
    count = min(fixed) if fixed else 1
    if len(data) < count:
        return None
    return take_samples(data.inputs, 0, count)


def _write_reference(
    cfg: OptimizeConfig,
    data: Dataset | None,
    model: ModelArtifact,
    detector: tuple[DetectorSpec, Path] | None,
    work: Path,
    notes: list[str],
) -> Path | None:
    """The reference statistics a collector compares the fleet's predictions and outlier
    scores with (drift), from in-distribution data through the chosen model and detector."""
    from sdk.reference import reference_stats, write_reference

    if data is None:
        return None
    # Dynamic int8 scales activations per batch: count at batch 1, as the board runs it.
    batch = 1 if model.recipe.startswith(DYNAMIC) else 256
    try:
        stats = reference_stats(
            model.path,
            detector,
            data,
            cfg.labels,
            model=cfg.name,
            model_version=cfg.version,
            batch_size=batch,
        )
    except EdgeshipError as exc:
        notes.append(f"no reference statistics for drift: {exc}")
        return None
    return write_reference(work / "reference.json", stats)


def _isa_note(target: TargetProfile) -> str | None:
    from sdk.isa import int8_outlook

    try:
        outlook = int8_outlook(target)
    except EdgeshipError:
        return None
    return f"int8 outlook on {target.name}: {outlook.reason}"


def _fit_detector(
    cfg: OptimizeConfig, cal: Dataset, model: ModelArtifact, work: Path, notes: list[str]
) -> tuple[DetectorSpec, Path] | None:
    """Fit the configured detector on the calibration data, or explain in a note why not."""
    from sdk.detect import DetectorOptions, default_detector, fit_detector

    if cfg.detector is None or cfg.detector == "none":
        return None
    if cal.constants:
        notes.append(
            f"no outlier detector: the model takes scalar inputs ({', '.join(cal.constants)}), "
            "which the detectors do not handle yet"
        )
        return None
    if cfg.detector == "auto":
        choice = default_detector(model.io)
        if choice is None:
            notes.append(
                "no outlier detector: the model has no float input or embedding "
                "output to watch (choose one with --detector)"
            )
            return None
        kind, options = choice.kind, choice.options
    else:
        kind, options = cfg.detector, DetectorOptions()
    try:
        spec, path = fit_detector(
            kind, cal, model, target_fpr=cfg.outlier_fpr, options=options, out=work / "detector.npz"
        )
    except EdgeshipError as exc:
        notes.append(f"no outlier detector: fitting {kind} failed: {exc}")
        return None
    measured = spec.options.get("fpr_holdout")
    extra = "" if measured is None else f", {float(measured):.1%} on held-out calibration data"
    notes.append(
        f"outlier detector {kind}: threshold {spec.threshold:.4g} for a target "
        f"false-positive rate of {cfg.outlier_fpr:.1%}{extra}"
    )
    return spec, path


def _bench_config(cfg: OptimizeConfig, target: TargetProfile) -> BenchConfig:
    return BenchConfig(
        target=target,
        min_runs=cfg.min_runs,
        min_seconds=cfg.min_seconds,
        ci_stop=cfg.bench_ci_stop,
    )


def _metrics(c: Candidate) -> Mapping[str, float | None]:
    metrics: dict[str, float | None] = {"accuracy_drop": c.accuracy_drop}
    if c.artifact is not None:
        metrics["size_mb"] = c.artifact.size_bytes / 2**20
    if c.bench is not None:
        for key, value in c.bench.latency_ms.items():
            metrics[f"{key}_ms"] = value
        metrics["peak_rss_mb"] = c.bench.rss_increase_mb
    return metrics


def _choose(
    candidates: list[Candidate],
    confirm_rounds: int,
    measure_p95: Callable[[ModelArtifact], float],
    notes: list[str],
) -> Candidate:
    """Apply the objective in the module docstring; ``measure_p95`` re-benchmarks a model."""
    made = [c for c in candidates if c.error is None and c.artifact is not None and c.bench]
    passing = sorted(
        (c for c in made if c.meets_budget),
        key=lambda c: (c.p95_ms, c.artifact.size_bytes if c.artifact else 0),
    )
    if not passing:
        return min(made, key=lambda c: (c.excess(), c.p95_ms))
    winner = passing[0]
    if confirm_rounds <= 0:
        return winner
    # Settle the choice with alternating re-runs so noise cannot pick a slower or riskier model:
    # an all-ops winner against its default-op-types sibling, then the winner against fp32.
    if winner.name.endswith(ALL_OPS_SUFFIX):
        sibling_name = winner.name.removesuffix(ALL_OPS_SUFFIX)
        sibling = next((c for c in passing if c.name == sibling_name), None)
        if sibling is not None:
            winner = _settle(winner, sibling, confirm_rounds, measure_p95, notes, strict=True)
    fp32 = next((c for c in passing if c.name == FP32), None)
    if fp32 is None or winner is fp32:
        return winner
    return _settle(winner, fp32, confirm_rounds, measure_p95, notes, strict=False)


def _settle(
    winner: Candidate,
    preferred: Candidate,
    rounds: int,
    measure_p95: Callable[[ModelArtifact], float],
    notes: list[str],
    *,
    strict: bool,
) -> Candidate:
    """Re-benchmark both alternately; keep ``winner`` only if its median p95 is below
    ``preferred``'s (``strict``) or not above it."""
    for _ in range(rounds):
        for c in (preferred, winner):
            assert c.artifact is not None
            c.confirm_p95_ms.append(measure_p95(c.artifact))
    if winner.p95_ms < preferred.p95_ms or (not strict and winner.p95_ms <= preferred.p95_ms):
        return winner
    notes.append(
        f"{winner.name} looked faster than {preferred.name} at first, but alternating re-runs "
        f"measured p95 {winner.p95_ms:.3f} ms vs {preferred.name} {preferred.p95_ms:.3f} ms: "
        f"{preferred.name} chosen"
    )
    return preferred


def _bundle_benchmark(c: Candidate) -> dict[str, Any]:
    data = c.to_dict()
    data.pop("path", None)
    return data


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True, disable=None)
