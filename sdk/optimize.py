"""Budgeted search: make candidates, measure each, choose one, bundle it.

For an ONNX model this tries fp32, ONNX Runtime dynamic int8 and static int8 (QDQ,
per-channel, one candidate per calibration method asked for). Each candidate is evaluated on
the eval data (top-1 accuracy with labels, else agreement with fp32) and benchmarked in its own
process under the target profile. A candidate that cannot be made is recorded with its error;
the search goes on.

The objective, in order:

1. Among candidates that meet every budget line, the lowest p95 latency wins; file size breaks
   ties. When fp32 meets the budget and another candidate wins, fp32 and the winner are
   benchmarked again, alternately, and the winner is kept only if its median p95 is not above
   fp32's: a candidate slower than fp32 is never chosen because of measurement noise.
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

from device_agent.contracts.bundle import DetectorSpec
from sdk.artifact import ModelArtifact, read_artifact
from sdk.bench import BenchConfig, BenchReport, benchmark
from sdk.budget import Budget, BudgetLine, check_budget
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, EdgeshipError
from sdk.evaluate import Quality, accuracy_drop, evaluate
from sdk.package import package
from sdk.quantize import CalibMethod, QuantizeConfig, quantize
from sdk.targets import TargetProfile, get_target

__all__ = ["Candidate", "OptimizeConfig", "OptimizeReport", "optimize"]

log = logging.getLogger(__name__)

FP32 = "fp32"
DYNAMIC = "ort-dynamic-int8"
STATIC_PREFIX = "ort-static-int8"


@dataclass(frozen=True)
class OptimizeConfig:
    """What to try and what to aim for.

    ``static_methods`` lists the calibration methods tried for static int8 (each is one
    candidate). ``confirm_rounds`` is how many alternating re-benchmarks settle a winner
    against fp32. ``detector`` is the outlier detector fitted on the calibration data and
    shipped in the bundle: ``"auto"`` (what :func:`sdk.detect.default_detector` recommends
    for the model), a detector kind, or None; its threshold is calibrated on held-out
    calibration samples for a false-positive rate of ``outlier_fpr``.
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


@dataclass
class Candidate:
    """One recipe's outcome: its model, quality, benchmark and budget verdict, or its error."""

    name: str
    artifact: ModelArtifact | None = None
    quality: Quality | None = None
    accuracy_drop: float | None = None
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
            "notes": self.notes,
        }

    def summary(self) -> str:
        rows = [
            f"{'candidate':<26}{'size KiB':>9}{'p50 ms':>9}{'p95 ms':>9}{'rss+ MB':>9}"
            f"{'quality':>10}{'drop pts':>9}  budget"
        ]
        for c in self.candidates:
            if c.error is not None:
                rows.append(f"{c.name:<26}  failed: {c.error}")
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
            drop = "-" if c.accuracy_drop is None else f"{c.accuracy_drop * 100:.2f}"
            verdict = "ok" if c.meets_budget else "MISS"
            mark = "*" if c.name == self.chosen else " "
            rows.append(
                f"{mark}{c.name:<25}{size:>9.1f}{lat.get('p50', float('nan')):>9.3f}"
                f"{lat.get('p95', float('nan')):>9.3f}{rss:>9.1f}{qual:>10}{drop:>9}  {verdict}"
            )
        chosen = self.chosen_candidate
        head = (
            f"target {self.target.name} ({self.target.description}); budget "
            f"{self.budget.describe()}"
        )
        if chosen.bench is not None:
            head += f"\nlatencies measured on {chosen.bench.measured_on}"
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
    plan: list[tuple[str, Any]] = [(FP32, None)]
    if cfg.try_dynamic:
        plan.append((DYNAMIC, QuantizeConfig(mode="dynamic")))
    if cal is not None:
        for method in cfg.static_methods:
            plan.append((f"{STATIC_PREFIX}-{method}", QuantizeConfig(mode="static", method=method)))
    else:
        notes.append("no calibration data: static int8 was not tried (pass --calibration)")
    if ev is None:
        notes.append("no eval data: quality was not measured, so a 'drop' budget line fails")

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
            bar.update(1)
            bar.set_description(f"{name}: evaluate")
            if ev is not None:
                cand.quality = evaluate(
                    cand.artifact, ev, reference=None if qconfig is None else fp32
                )
                if qconfig is None:
                    baseline_quality = cand.quality
                if baseline_quality is not None:
                    cand.accuracy_drop = accuracy_drop(cand.quality, baseline_quality)
            bar.update(1)
            bar.set_description(f"{name}: benchmark")
            try:
                cand.bench = benchmark(cand.artifact, _bench_config(cfg, target))
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
            lambda art: benchmark(art, _bench_config(cfg, target)).latency_ms["p95"],
            notes,
        )
        winner = chosen.artifact
        assert winner is not None  # _choose only returns candidates that were made
        bar.set_description("fit the outlier detector")
        detector = None if cal is None else _fit_detector(cfg, cal, winner, work, notes)
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
        )
        bar.update(1)
    finally:
        bar.close()
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
    )


def _fit_detector(
    cfg: OptimizeConfig, cal: Dataset, model: ModelArtifact, work: Path, notes: list[str]
) -> tuple[DetectorSpec, Path] | None:
    """Fit the configured detector on the calibration data, or explain in a note why not."""
    from sdk.detect import DetectorOptions, default_detector, fit_detector

    if cfg.detector is None or cfg.detector == "none":
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
    fp32 = next((c for c in passing if c.name == FP32), None)
    if fp32 is None or winner is fp32 or confirm_rounds <= 0:
        return winner
    # Settle the choice with alternating re-runs so noise cannot pick a slower model.
    for _ in range(confirm_rounds):
        for c in (fp32, winner):
            assert c.artifact is not None
            c.confirm_p95_ms.append(measure_p95(c.artifact))
    if winner.p95_ms <= fp32.p95_ms:
        return winner
    notes.append(
        f"{winner.name} looked faster than fp32 at first, but alternating re-runs measured p95 "
        f"{winner.p95_ms:.3f} ms vs fp32 {fp32.p95_ms:.3f} ms: fp32 chosen"
    )
    return fp32


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
