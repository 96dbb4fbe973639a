"""Budgeted search: make candidates, measure each, choose one, bundle it.

For an ONNX model this tries fp32, ONNX Runtime dynamic int8 and static int8 (QDQ,
per-channel, one candidate per calibration method asked for), quantizing the default operator
types (:data:`sdk.quantize.DEFAULT_OP_TYPES`), plus one static candidate that quantizes every
operator type ORT can (``-all-ops``) when the model has operators that would add. Each
candidate is evaluated on the eval data (top-1 accuracy with labels, else agreement with fp32,
else, for outputs without classes, cosine similarity with fp32; dynamic int8 one sample at a
time, as a board runs it, since its activation scales depend on the batch) and benchmarked in
its own process under the target profile, on one real sample of the eval (else calibration)
data. A candidate that cannot be made is recorded with its error; the search goes on.

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
import shutil
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

__all__ = ["Candidate", "OptimizeConfig", "OptimizeReport", "optimize"]

log = logging.getLogger(__name__)

FP32 = "fp32"
DYNAMIC = "ort-dynamic-int8"
STATIC_PREFIX = "ort-static-int8"
ALL_OPS_SUFFIX = "-all-ops"
EVAL_BATCH = 64


@dataclass(frozen=True)
class OptimizeConfig:
    """What to try and what to aim for.

    ``static_methods`` lists the calibration methods tried for static int8 (each is one
    candidate). ``confirm_rounds`` is how many alternating re-benchmarks settle a winner
    against fp32. ``detector`` is the outlier detector fitted on the calibration data and
    shipped in the bundle: ``"auto"`` (what :func:`sdk.detect.default_detector` recommends
    for the model), a detector kind, or None; its threshold is calibrated on held-out
    calibration samples for a false-positive rate of ``outlier_fpr``.

    ``min_cosine``: the quality gate used when there is no eval data with a ``drop`` budget
    line: an int8 candidate whose check against fp32 on calibration samples (worst-sample
    cosine similarity of the outputs) is below it fails; None turns the gate off.
    ``try_all_ops``: also try static int8 over every operator type ORT can quantize (when the
    model has such operators beyond the default ones); it is chosen only if it is faster.
    """

    target: str | TargetProfile = "host"
    budget: Budget = field(default_factory=Budget)
    name: str = "model"
    version: str = "1"
    labels: tuple[str, ...] | None = None
    try_dynamic: bool = True
    static_methods: tuple[CalibMethod, ...] = ("minmax",)
    min_runs: int = 200
    min_seconds: float = 3.0
    confirm_rounds: int = 2
    keep_candidates: bool = True
    detector: str | None = "auto"
    outlier_fpr: float = 0.01
    min_cosine: float | None = 0.99
    try_all_ops: bool = True

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be between -1 and 1, got {self.min_cosine}")


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
        }
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

    @property
    def chosen_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen_candidate
        return {
            "candidates": [c.to_dict() for c in self.candidates],
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
            "notes": self.notes,
        }

    def summary(self) -> str:
        width = max(26, *(len(c.name) + 2 for c in self.candidates))
        rows = [
            f"{'candidate':<{width}}{'size KiB':>9}{'p50 ms':>9}{'p95 ms':>9}{'rss+ MB':>9}"
            f"{'quality':>11}{'drop pts':>9}  budget"
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
            verdict = "ok" if c.meets_budget else "MISS"
            mark = "*" if c.name == self.chosen else " "
            rows.append(
                f"{mark}{c.name:<{width - 1}}{size:>9.1f}{lat.get('p50', float('nan')):>9.3f}"
                f"{lat.get('p95', float('nan')):>9.3f}{rss:>9.1f}{qual:>11}{drop:>9}  {verdict}"
            )
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
        tail.extend(f"note: {n}" for n in self.notes)
        return "\n".join([head, *rows, *tail])


def optimize(
    model: ModelArtifact | str | Path,
    *,
    calibration: DataSource | None = None,
    eval_data: DataSource | None = None,
    out: str | Path,
    config: OptimizeConfig | None = None,
    progress: bool = False,
) -> OptimizeReport:
    """Search the recipes for ``model`` and bundle the chosen candidate into ``out``.

    Raises only for bad input (unreadable model, data not matching it, bad config); a missed
    budget is reported, with the best effort bundled.
    """
    cfg = config or OptimizeConfig()
    target = cfg.target if isinstance(cfg.target, TargetProfile) else get_target(cfg.target)
    fp32 = model if isinstance(model, ModelArtifact) else read_artifact(model, recipe=FP32)
    if fp32.format != "onnx":
        raise ConfigError(f"optimize takes an ONNX model; {fp32.path.name} is {fp32.format}")
    cal = (
        None if calibration is None else load_dataset(calibration, fp32.io, what="calibration data")
    )
    ev = None if eval_data is None else load_dataset(eval_data, fp32.io, what="eval data")
    out_dir = Path(out)
    work = out_dir.with_name(out_dir.name + "-candidates")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    notes: list[str] = []
    plan: list[tuple[str, QuantizeConfig | None]] = [(FP32, None)]
    if cfg.try_dynamic:
        plan.append((DYNAMIC, QuantizeConfig(mode="dynamic")))
    if cal is not None:
        for method in cfg.static_methods:
            plan.append((f"{STATIC_PREFIX}-{method}", QuantizeConfig(mode="static", method=method)))
        if cfg.try_all_ops and cfg.static_methods and _more_ops_to_quantize(fp32):
            method = cfg.static_methods[0]
            plan.append(
                (
                    f"{STATIC_PREFIX}-{method}{ALL_OPS_SUFFIX}",
                    QuantizeConfig(mode="static", method=method, op_types=None),
                )
            )
    else:
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

    steps = len(plan) * 3 + 1
    bar = _progress(steps, progress)
    candidates: list[Candidate] = []
    baseline_quality: Quality | None = None
    try:
        for name, qconfig in plan:
            cand = Candidate(name=name)
            candidates.append(cand)
            bar.set_description(f"{name}: make")
            try:
                if qconfig is None:
                    shutil.copyfile(fp32.path, work / f"{name}.onnx")
                    cand.artifact = ModelArtifact(
                        path=work / f"{name}.onnx", format="onnx", io=fp32.io, recipe=FP32
                    )
                else:
                    cand.artifact = quantize(fp32, cal, out=work / f"{name}.onnx", config=qconfig)
            except EdgeshipError as exc:
                if qconfig is None:
                    raise
                cand.error = str(exc)
                log.warning("candidate %s failed: %s", name, exc)
                bar.update(3)
                continue
            if qconfig is not None and gate_on_check:
                cand.error = _check_gate(cand.artifact, cfg)
                if cand.error is not None:
                    log.info("candidate %s failed the quality gate: %s", name, cand.error)
                    bar.update(3)
                    continue
            bar.update(1)
            bar.set_description(f"{name}: evaluate")
            if ev is not None:
                try:
                    _evaluate_candidate(cand, ev, fp32, qconfig, baseline_quality)
                except EdgeshipError as exc:
                    if qconfig is None:
                        raise
                    cand.error = f"evaluation failed: {exc}"
                    bar.update(2)
                    continue
                if qconfig is None:
                    baseline_quality = cand.quality
            bar.update(1)
            bar.set_description(f"{name}: benchmark")
            try:
                cand.bench = measure(cand.artifact)
            except EdgeshipError as exc:
                if qconfig is None:
                    raise
                cand.error = f"benchmark failed: {exc}"
            bar.update(1)
            cand.budget_lines = check_budget(cfg.budget, _metrics(cand))

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
    )


def _evaluate_candidate(
    cand: Candidate,
    ev: Dataset,
    fp32: ModelArtifact,
    qconfig: QuantizeConfig | None,
    baseline: Quality | None,
) -> None:
    """Quality on the eval data and the drop against fp32 (0 for fp32 itself)."""
    assert cand.artifact is not None
    # Dynamic int8 scales activations per run: score it one sample at a time, as a board runs.
    batch = 1 if qconfig is not None and qconfig.mode == "dynamic" else EVAL_BATCH
    cand.quality = evaluate(
        cand.artifact, ev, reference=None if qconfig is None else fp32, batch_size=batch
    )
    if qconfig is None:
        cand.accuracy_drop = 0.0
        cand.drop_basis = "accuracy" if cand.quality.accuracy is not None else "reference"
    elif baseline is not None:
        cand.drop_basis = drop_basis(cand.quality, baseline)
        cand.accuracy_drop = accuracy_drop(cand.quality, baseline)


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
    return BenchConfig(target=target, min_runs=cfg.min_runs, min_seconds=cfg.min_seconds)


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
