"""What a search found: each candidate's model, quality, benchmark and budget verdict
(:class:`Candidate`), the recipes it did not try (:class:`SkippedRecipe`), and the whole
report with the choice (:class:`OptimizeReport`: ``to_dict`` is the report JSON, ``summary``
the table the CLI prints)."""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.artifact import ModelArtifact
from sdk.bench import BenchReport
from sdk.budget import Budget, BudgetLine
from sdk.data import DataSource
from sdk.evaluate import Quality
from sdk.quantize.bias_correction import describe
from sdk.targets import TargetProfile

if TYPE_CHECKING:
    pass


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
    # With optimize --device: ``bench`` holds the first board's figures, ``host_bench`` the
    # host's, ``device_benches`` every board's, ``device_note`` why a board has none.
    host_bench: BenchReport | None = None
    device_benches: dict[str, BenchReport] = field(default_factory=dict)
    device_note: str | None = None

    @property
    def meets_budget(self) -> bool:
        """No error, every budget line passed, and (with ``optimize --device``) timed on the
        board it is judged for."""
        untimed = self.host_bench is not None and self.bench is None
        passed = all(line.passed for line in self.budget_lines)
        return self.error is None and not untimed and passed

    @property
    def p95_ms(self) -> float:
        if self.confirm_p95_ms:
            return statistics.median(self.confirm_p95_ms)
        return float("inf") if self.bench is None else self.bench.latency_ms["p95"]

    @property
    def violations(self) -> list[str]:
        if self.error is not None:
            return [f"candidate failed: {self.error}"]
        if self.host_bench is not None and self.bench is None:
            return [f"not timed on the device's board: {self.device_note or 'not sent'}"]
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
        if self.host_bench is not None:
            out["host_benchmark"] = self.host_bench.to_dict()
            out["device_benchmarks"] = {b: r.to_dict() for b, r in self.device_benches.items()}
            out["device_note"] = self.device_note
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
    devices: dict[str, Any] | None = None  # optimize --device: boards, choices, who timed what

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
            "devices": self.devices,
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
            if c.host_bench is not None and c.bench is None:
                verdict = "untimed"
            mark = "*" if c.name == self.chosen else " "
            rows.append(
                f"{mark}{c.name:<{width - 1}}{size:>9.1f}{lat.get('p50', float('nan')):>9.3f}"
                f"{lat.get('p95', float('nan')):>9.3f}{rss:>9.1f}{qual:>11}{drop:>9}"
                f"{spent:>8.1f}  {verdict}"
            )
            excluded = c.artifact.details.get("excluded_nodes") if c.artifact else None
            if excluded:
                rows.append(f"  {'':<{width - 2}}kept in float: {', '.join(excluded)}")
            fusions = c.artifact.details.get("fusions") if c.artifact else None
            if fusions:
                rows.append(f"  {'':<{width - 2}}rewritten: {fusions}")
            corrected = c.artifact.details.get("bias_correction") if c.artifact else None
            if corrected:
                rows.append(f"  {'':<{width - 2}}bias correction: {describe(corrected)}")
            if c.host_bench is not None:
                h = c.host_bench.latency_ms
                rows.append(
                    f"  {'':<{width - 2}}on the host: p50 {h['p50']:.3f} ms, p95 {h['p95']:.3f} ms"
                    + (f"; {c.device_note}" if c.device_note else "")
                )
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
        if self.devices is not None:
            for board, choice in self.devices.get("choices", {}).items():
                tail.append(
                    f"  for {board}: {choice['chosen']} -> bundle {choice['bundle']} "
                    f"({'meets' if choice['meets_budget'] else 'misses'} the budget)"
                )
            counts = ", ".join(f"{d} {n}" for d, n in self.devices.get("counts", {}).items())
            tail.append(f"  candidates timed per device: {counts or 'none'}")
            for device, why in self.devices.get("lost", {}).items():
                tail.append(f"  {device} was lost mid-search: {why}")
            for device, app in self.devices.get("application", {}).items():
                worst = "".join(
                    f", {label} {app[key]:.3g} ms"
                    for key, label in (("p95_ms", "p95 up to"), ("max_ms", "max"))
                    if app.get(key) is not None
                )
                tail.append(
                    f"  the application on {device} while it timed: {app['calls']} calls, "
                    f"{app['failed']} failed{worst}"
                )
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


def reproduce_command(artifact: ModelArtifact | None, calibration: DataSource | None) -> str | None:
    """The ``edgeship quantize`` command that makes this int8 model again from the ONNX model
    it was quantized from (for pruned and distilled candidates, their fp32 export in the
    candidates directory), or None for a model quantize did not make."""
    details = {} if artifact is None else artifact.details
    if artifact is not None and "recipe" in details and "float_model" in details:
        # A LiteRT candidate: edgeship quantize on the float .tflite with its recipe.
        cal = str(calibration) if isinstance(calibration, str | Path) else "CALIBRATION.npz"
        parts = ["edgeship", "quantize", str(details["float_model"])]
        parts += ["--recipe", str(details["recipe"])]
        if details.get("calibration_samples"):
            parts += ["--calibration", cal]
        return shlex.join([*parts, "-o", str(artifact.path)])
    if artifact is not None and details.get("bits") == 4 and "source" in details:
        # ort-weight-int4: edgeship quantize --mode int4 (its defaults are the search's)
        parts = ["edgeship", "quantize", str(details["source"]), "--mode", "int4"]
        if details.get("calibration_samples"):
            cal = str(calibration) if isinstance(calibration, str | Path) else "CALIBRATION.npz"
            parts += ["--calibration", cal]
        return shlex.join([*parts, "-o", str(artifact.path)])
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
    if details.get("reduce_range"):
        parts.append("--reduce-range")
    if details.get("op_types") is None:
        parts += ["--op-types", "all"]
    if details.get("bias_correction"):
        parts.append("--bias-correction")
    if details.get("fuse") is False:
        parts.append("--no-fuse")
    excluded = details.get("excluded_nodes") or []
    if excluded:
        parts += ["--exclude", ",".join(excluded)]
    parts += ["-o", str(artifact.path)]
    return shlex.join(parts)
