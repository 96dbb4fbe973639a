"""The choice among a search's candidates, and its bundle: the objective (the lowest p95 of
those that meet every budget line, settled against fp32 by alternating re-runs; else the
smallest excess), shared by the host search (:mod:`sdk.optimize.search`) and the choice per
board (:mod:`sdk.optimize.device_choice`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdk.artifact import ModelArtifact
from sdk.optimize.bundling import bundle_benchmark, fit_detector, write_reference
from sdk.optimize.report import Candidate
from sdk.optimize.stages import SearchContext
from sdk.optimize.stages.fp32 import FLOAT_MODELS, FP32
from sdk.optimize.stages.ort_static import ALL_OPS_SUFFIX
from sdk.package import package

__all__ = ["_bundle", "_choose", "_metrics", "_nothing_to_quantize", "_settle"]


def _nothing_to_quantize(ctx: SearchContext, chosen: Candidate, notes: list[str]) -> None:
    if ctx.nothing_to_quantize is not None:
        kept = "fp32 kept" if chosen.name == FP32 else "int8 was not tried"
        notes.append(f"{ctx.nothing_to_quantize}; {kept}")


def _bundle(
    ctx: SearchContext,
    chosen: Candidate,
    work: Path,
    out_dir: Path,
    notes: list[str],
    bar: Any,
) -> Path:
    """Bundle the chosen model with its detector and reference statistics; the bundle's root."""
    cfg, cal, ev = ctx.config, ctx.calibration, ctx.eval_data
    winner = chosen.artifact
    if winner is None:  # _choose only returns candidates that were made
        raise AssertionError("the chosen candidate has no model")
    bar.set_description("fit the outlier detector")
    detector = None if cal is None else fit_detector(cfg, cal, winner, work, notes)
    bar.set_description("reference statistics")
    reference = write_reference(cfg, ev if ev is not None else cal, winner, detector, work, notes)
    bar.set_description("bundle")
    bundle = package(
        winner,
        out_dir,
        name=cfg.name,
        version=cfg.version,
        labels=cfg.labels if cfg.labels is not None else ctx.fp32.details.get("class_labels"),
        budget=cfg.budget,
        benchmark=bundle_benchmark(chosen),
        detector=detector,
        reference=reference,
        samples=None if cal is None else cal.inputs,
    )
    return bundle.root


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
    if confirm_rounds <= 0:
        return passing[0]
    floats = [c for name in FLOAT_MODELS for c in passing if c.name == name]
    fastest_float = min((c.p95_ms for c in floats), default=float("inf"))
    # Lossy candidates measured no slower than every float model at first sight, fastest first,
    # each settled in turn: when a float model beats one in the re-runs, the next gets its
    # turn (up to RUNNERS_UP more), so one noisy measurement cannot hide a faster int8 that
    # also meets the budget.
    contenders = [c for c in passing if c not in floats and c.p95_ms <= fastest_float]
    tried: list[Candidate] = []
    settled = None
    turns = 0
    for contender in contenders:
        if contender in tried:
            continue
        if turns > RUNNERS_UP:
            break
        turns += 1
        settled = _settle_lossy(contender, passing, floats, confirm_rounds, measure_p95, notes)
        tried += [contender, *_siblings(contender, passing), settled]
        if settled not in floats:
            return settled
    if settled is not None:  # a float model beat every contender, settled against the rest
        return settled
    # no contender: passing[0] is the fastest float model, settled against the other
    return _settle_lossy(passing[0], passing, floats, confirm_rounds, measure_p95, notes)


#: How many more lossy candidates that meet the budget are settled against the float models
#: when the fastest at first sight loses its re-runs to one of them.
RUNNERS_UP = 2


def _siblings(winner: Candidate, passing: list[Candidate]) -> list[Candidate]:
    """The default-op-types sibling an ``-all-ops`` winner is settled against, if it passed."""
    if not winner.name.endswith(ALL_OPS_SUFFIX):
        return []
    name = winner.name.removesuffix(ALL_OPS_SUFFIX)
    return [c for c in passing if c.name == name]


def _settle_lossy(
    winner: Candidate,
    passing: list[Candidate],
    floats: list[Candidate],
    rounds: int,
    measure_p95: Callable[[ModelArtifact], float],
    notes: list[str],
) -> Candidate:
    """Settle ``winner`` with alternating re-runs so noise cannot pick a slower or riskier
    model: an all-ops winner against its default-op-types sibling, then against the float
    models, the rewritten fp32 (same outputs, often faster) first, fp32 as given last."""
    for sibling in _siblings(winner, passing):
        winner = _settle(winner, sibling, rounds, measure_p95, notes, strict=True)
    for reference in floats:
        if winner is not reference:
            winner = _settle(winner, reference, rounds, measure_p95, notes, strict=False)
    return winner


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
