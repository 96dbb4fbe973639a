"""Budgeted search: make candidates, measure each, choose one, bundle it.

This module is the search and the choice. Each kind of candidate below is a stage of its own
(:mod:`sdk.optimize.stages`, one module each, registered once in that order): the search asks
every stage for its recipes, skips those the time limit or their own early-stopping rule rule
out, and makes, gates, evaluates and benchmarks the rest.

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
6. ``ort-static-int8-accuracy-aware``: :func:`sdk.quantize.accuracy_aware_quantize` keeps
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
9. with a PyTorch model and :attr:`OptimizeConfig.litert_recipes` (none by default):
   ``litert-<recipe>`` for each, the model exported to TFLite and quantized for LiteRT with that
   ai-edge-quantizer recipe.

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
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.artifact import ModelArtifact, read_artifact
from sdk.bench import BenchConfig, BenchReport, benchmark
from sdk.budget import check_budget
from sdk.data import Dataset, DataSource, load_dataset, take_samples
from sdk.errors import ConfigError, EdgeshipError
from sdk.evaluate import Quality, accuracy_drop, drop_basis, evaluate
from sdk.optimize.bundling import bundle_benchmark, fit_detector, isa_note, write_reference
from sdk.optimize.config import OptimizeConfig
from sdk.optimize.report import Candidate, OptimizeReport, SkippedRecipe
from sdk.optimize.stages import Recipe, SearchContext, default_registry
from sdk.optimize.stages.fp32 import FP32
from sdk.optimize.stages.ort_static import ALL_OPS_SUFFIX
from sdk.optimize.stages.torch_inputs import check_torch_inputs
from sdk.package import package
from sdk.remote import RemoteError
from sdk.targets import TargetProfile, get_target

if TYPE_CHECKING:
    import torch

    from sdk.optimize.on_device import DeviceRun
    from sdk.training import TrainData

__all__ = ["optimize"]

log = logging.getLogger(__name__)

EVAL_BATCH = 64


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
    ctx = _context(model, calibration, eval_data, cfg, torch_model, train_data, student)
    cal, ev = ctx.calibration, ctx.eval_data
    boards = None
    if cfg.on_device is not None:  # the devices are online before the search starts
        from sdk.optimize.on_device import boards_of

        boards = boards_of(cfg.on_device)
    out_dir = Path(out)
    work = out_dir.with_name(out_dir.name + "-candidates")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    notes: list[str] = list(ctx.fp32.details.get("notes") or [])  # what reading it changed
    sample = _bench_sample(ev if ev is not None else cal, ctx.fp32)
    if cfg.on_device is not None and boards is not None:
        from sdk.optimize.on_device import probe

        try:  # ... and each takes a candidate (the fp32 model), or the search does not start
            cannot = probe(
                cfg.on_device, boards, ctx.fp32.path, _input_spec(sample, ctx.fp32), work
            )
        except EdgeshipError:
            shutil.rmtree(work, ignore_errors=True)
            raise
        notes.extend(f"{d} could not time the fp32 model: {why}" for d, why in cannot.items())

    recipes, skipped = default_registry().plan(ctx)
    if cal is None and ctx.nothing_to_quantize is None:
        notes.append("no calibration data: static int8 was not tried (pass --calibration)")
    if ev is None:
        notes.append("no eval data: quality was not measured, so a 'drop' budget line fails")
    gate_on_check = cfg.min_cosine is not None and (
        ev is None or cfg.budget.max_accuracy_drop is None
    )
    search = _Search(
        ctx, work, gate_on_check, _Measure(_bench_config(cfg, ctx.target), sample), started
    )
    bar = _progress(len(recipes) + 1, progress)
    devices: dict[str, Any] | None = None
    try:
        candidates = search.run(recipes, skipped, calibration, bar)
        if cfg.on_device is not None and boards is not None:
            chosen, bundle_root, devices = _choose_on_devices(
                ctx, candidates, boards, sample, work, out_dir, notes, bar, search.measure
            )
        else:
            bar.set_description("confirm the choice against fp32")
            chosen = _choose(
                candidates,
                cfg.confirm_rounds,
                lambda art: search.measure(art).latency_ms["p95"],
                notes,
            )
            bundle_root = _bundle(ctx, chosen, work, out_dir, notes, bar)
        if ctx.nothing_to_quantize is not None:
            kept = "fp32 kept" if chosen.name == FP32 else "int8 was not tried"
            notes.append(f"{ctx.nothing_to_quantize}; {kept}")
        bar.update(1)
    finally:
        bar.close()
    isa = None if ctx.nothing_to_quantize else isa_note(ctx.target)
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
        bundle=bundle_root,
        target=ctx.target,
        budget=cfg.budget,
        notes=notes,
        quality_gate=_describe_gate(cfg, ev is not None, cal is not None, gate_on_check),
        skipped=skipped,
        elapsed_s=time.monotonic() - started,
        time_limit_s=cfg.time_limit_s,
        calibration_cache=ctx.calibration_cache,
        devices=devices,
    )


def _input_spec(
    sample: dict[str, np.ndarray] | None, art: ModelArtifact
) -> dict[str, dict[str, Any]]:
    """The shapes the device times a candidate on: the search's real sample's, else the
    model's with symbolic dimensions as 1."""
    if sample is not None:
        return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sample.items()}
    return {
        t.name: {"shape": [d if isinstance(d, int) else 1 for d in t.shape], "dtype": t.dtype}
        for t in art.io.inputs
    }


def _choose_on_devices(
    ctx: SearchContext,
    candidates: list[Candidate],
    boards: Mapping[str, list[str]],
    sample: dict[str, np.ndarray] | None,
    work: Path,
    out_dir: Path,
    notes: list[str],
    bar: Any,
    host_measure: Callable[[ModelArtifact], BenchReport],
) -> tuple[Candidate, Path, dict[str, Any]]:
    """Time the candidates on the devices (host figures as the first filter), then choose and
    bundle once per board model from that board's figures. The first board (of the first
    ``--device``) is bundled into ``out_dir``, each other into ``<out_dir>-<board>``."""
    from sdk.optimize.on_device import Job, clean_up, inline_for_device, time_on_devices

    cfg = ctx.config
    target = cfg.on_device
    assert target is not None
    made = [c for c in candidates if c.error is None and c.artifact and c.bench]
    fp32 = next(c for c in made if c.name == FP32)
    assert fp32.bench is not None
    base = fp32.bench.latency_ms["p95"]
    jobs: list[Job] = []
    for c in made:
        assert c.artifact is not None and c.bench is not None
        c.host_bench = c.bench
        ratio = c.bench.latency_ms["p95"] / base if base > 0 else 1.0
        if c is not fp32 and ratio > target.hopeless_ratio:
            c.device_note = (
                f"not sent to the devices: host p95 {ratio:.2f}x fp32's, over "
                f"{target.hopeless_ratio:g}x (hopeless)"
            )
            continue
        path = inline_for_device(c.artifact.path, work)
        jobs.append(Job(c.name, path, c.bench, _input_spec(sample, c.artifact)))
    bar.set_description(f"time {len(jobs)} candidates on {len(target.devices)} device(s)")
    run = time_on_devices(jobs, target, say=log.info, boards=boards)
    paths = {job.name: job.path for job in jobs}
    try:
        return _choose_per_board(
            ctx, made, run, sample, work, out_dir, notes, bar, paths, host_measure
        )
    finally:
        clean_up(jobs, target, run)


def _choose_per_board(
    ctx: SearchContext,
    made: list[Candidate],
    run: DeviceRun,
    sample: dict[str, np.ndarray] | None,
    work: Path,
    out_dir: Path,
    notes: list[str],
    bar: Any,
    paths: Mapping[str, Path],
    host_measure: Callable[[ModelArtifact], BenchReport],
) -> tuple[Candidate, Path, dict[str, Any]]:
    """Choose and bundle for each board model of ``run`` from its figures."""
    cfg = ctx.config
    for board, reports in run.reports.items():
        for name, report in reports.items():
            next(c for c in made if c.name == name).device_benches[board] = report
    choices: dict[str, dict[str, Any]] = {}
    unchosen: dict[str, str] = {}
    boards = list(run.boards)
    dests = _board_dirs(out_dir, boards)
    first: tuple[Candidate, Path] | None = None
    hopeless = {c.name: c.device_note for c in made if c.device_note}
    # The other boards first, the first board last: its figures stay on the candidates.
    for board in [*boards[1:], boards[0]]:
        for c in made:
            c.bench = c.device_benches.get(board)
            c.confirm_p95_ms = []
            c.budget_lines = check_budget(cfg.budget, _metrics(c))
            c.device_note = hopeless.get(c.name) or run.missing.get(board, {}).get(c.name)
        if not any(c.bench for c in made):
            why = [f"{d} lost: {r}" for d, r in run.lost.items() if d in run.boards[board]]
            why += [f"{name}: {r}" for name, r in run.missing.get(board, {}).items()]
            unchosen[board] = "; ".join(why[:3]) or "no candidate was sent"
            notes.append(f"{board}: no candidate was timed there ({unchosen[board]})")
            continue
        bar.set_description(f"confirm the choice on {board}")
        on_board = _OnBoard(ctx, made, run, board, sample, paths, notes)
        chosen = _choose(made, cfg.confirm_rounds, on_board, notes)
        root = _bundle(ctx, chosen, work, dests[board], notes, bar)
        choices[board] = {
            "chosen": chosen.name,
            "bundle": str(root),
            "meets_budget": chosen.meets_budget,
            "devices": run.boards[board],
        }
        if board == boards[0]:
            first = (chosen, root)
    if first is None:
        # Nothing timed on the first board: the choice falls back to the host's figures, and
        # the report says so (the CLI exits 1: a board got no choice).
        for c in made:
            c.bench, c.confirm_p95_ms = c.host_bench, []
            c.budget_lines = check_budget(cfg.budget, _metrics(c))
            c.device_note = c.device_note or run.missing.get(boards[0], {}).get(c.name)
        notes.append(
            f"no candidate could be timed on {boards[0]} (the first --device's board): "
            "chosen from the host's figures instead"
        )
        chosen = _choose(
            made, cfg.confirm_rounds, lambda art: host_measure(art).latency_ms["p95"], notes
        )
        first = (chosen, _bundle(ctx, chosen, work, dests[boards[0]], notes, bar))
    notes.append(
        "latencies and memory measured on the devices (each candidate in a child process of "
        "the agent at low priority, beside the application it serves); host figures were the "
        "first filter"
    )
    return first[0], first[1], {**run.to_dict(), "choices": choices, "unchosen": unchosen}


def _board_dirs(out_dir: Path, boards: Sequence[str]) -> dict[str, Path]:
    """``out_dir`` for the first board, ``<out_dir>-<slug>`` for each other: one folder each
    (slugs made unique), never the search's ``-candidates`` work folder."""
    from sdk.optimize.on_device import board_slug

    dirs = {boards[0]: out_dir}
    taken = {"candidates"}
    for board in boards[1:]:
        slug = board_slug(board)
        n = 1
        while (f"{slug}-{n}" if n > 1 else slug) in taken:
            n += 1
        slug = f"{slug}-{n}" if n > 1 else slug
        taken.add(slug)
        dirs[board] = out_dir.with_name(f"{out_dir.name}-{slug}")
    return dirs


class _OnBoard:
    """The confirmation re-runs on a board: a candidate's p95 timed again on a live device of
    it (the next one when one refuses, stops answering or answers what cannot be), checked as
    the first timings were; its first-round figure, said in a note, when no device of the
    board can time it any more."""

    def __init__(
        self,
        ctx: SearchContext,
        made: list[Candidate],
        run: DeviceRun,
        board: str,
        sample: dict[str, np.ndarray] | None,
        paths: Mapping[str, Path],
        notes: list[str],
    ) -> None:
        self.target = ctx.config.on_device
        self.made, self.run, self.board, self.sample = made, run, board, sample
        self.paths, self.notes = paths, notes

    def __call__(self, art: ModelArtifact) -> float:
        from sdk.optimize.on_device import device_alive, device_report
        from sdk.remote_bench import benchmark_candidate

        target = self.target
        assert target is not None
        cand = next(c for c in self.made if c.artifact is art)
        assert cand.host_bench is not None
        path = self.paths.get(cand.name, art.path)
        for device in [d for d in self.run.boards[self.board] if d not in self.run.lost]:
            try:
                rep = benchmark_candidate(
                    target.broker_url, target.fleet, device, path,
                    min_runs=target.min_runs, min_seconds=target.min_seconds,
                    threads=target.threads, inputs=_input_spec(self.sample, art),
                    key=target.key, timeout_s=target.timeout_s, remove=False, **target.auth(),
                )  # fmt: skip
                return device_report(cand.host_bench, rep, device, self.board).latency_ms["p95"]
            except Exception as exc:  # refused, no answer, or an answer that cannot be
                log.warning("confirming %s on %s: %s", cand.name, device, exc)
                if isinstance(exc, RemoteError) and not device_alive(target, device):
                    self.run.lost.setdefault(device, f"during the confirmation re-runs: {exc}")
        self.notes.append(
            f"{cand.name}: no device of {self.board} could time it again for the confirmation; "
            "its first figure stands in"
        )
        return cand.device_benches[self.board].latency_ms["p95"]


def _context(
    model: ModelArtifact | str | Path,
    calibration: DataSource | None,
    eval_data: DataSource | None,
    cfg: OptimizeConfig,
    torch_model: torch.nn.Module | None,
    train_data: TrainData | None,
    student: torch.nn.Module | None,
) -> SearchContext:
    """The search's inputs, checked and loaded once: the data becomes ``Dataset``s here and
    every stage reads those."""
    target = cfg.target if isinstance(cfg.target, TargetProfile) else get_target(cfg.target)
    fp32 = model if isinstance(model, ModelArtifact) else read_artifact(model, recipe=FP32)
    if fp32.format not in ("onnx", "tflite"):
        raise ConfigError(
            f"optimize takes an ONNX or a float .tflite model; {fp32.path.name} is {fp32.format}"
        )
    cal = (
        None if calibration is None else load_dataset(calibration, fp32.io, what="calibration data")
    )
    ev = None if eval_data is None else load_dataset(eval_data, fp32.io, what="eval data")
    check_torch_inputs(cfg, fp32, cal, ev, torch_model, train_data, student)
    from sdk.quantize.ort_check import nothing_to_quantize

    return SearchContext(
        config=cfg,
        fp32=fp32,
        calibration=cal,
        eval_data=ev,
        target=target,
        calibration_cache=cfg.cache_dir() if cal is not None else None,
        torch_model=torch_model,
        train_data=train_data,
        student=student,
        nothing_to_quantize=nothing_to_quantize(fp32.path) if fp32.format == "onnx" else None,
    )


class _Measure:
    """Benchmarks a candidate under the target profile on the search's one real sample."""

    def __init__(self, config: BenchConfig, sample: dict[str, np.ndarray] | None) -> None:
        self.config = config
        self.sample = sample

    def __call__(self, art: ModelArtifact) -> BenchReport:
        try:
            return benchmark(art, self.config, inputs=self.sample)
        except ConfigError as exc:
            if self.sample is not None:
                raise
            raise ConfigError(
                f"{exc}; or pass --eval/--calibration data, and optimize benchmarks every "
                "candidate on one real sample of it"
            ) from exc


@dataclass
class _Search:
    """Tries the recipes in order: skip, or make, gate, evaluate and benchmark each."""

    ctx: SearchContext
    work: Path
    gate_on_check: bool
    measure: _Measure
    started: float
    baseline_quality: Quality | None = None

    def run(
        self,
        recipes: Sequence[Recipe],
        skipped: list[SkippedRecipe],
        calibration: DataSource | None,
        bar: Any,
    ) -> list[Candidate]:
        """The candidates made (or failed), in order; skipped recipes go to ``skipped``."""
        cfg = self.ctx.config
        candidates: list[Candidate] = []
        for recipe in recipes:
            if not recipe.baseline:
                reason = self._skip_reason(recipe, candidates)
                if reason is not None:
                    skipped.append(SkippedRecipe(recipe.name, reason))
                    log.info("skipped %s: %s", recipe.name, reason)
                    bar.update(1)
                    continue
            cand = Candidate(name=recipe.name)
            candidates.append(cand)
            began = time.monotonic()
            try:
                self._run_candidate(cand, recipe, bar)
            finally:
                cand.elapsed_s = time.monotonic() - began
            cand.reproduce = _reproduce(cand.artifact, calibration)
            if recipe.baseline:
                self.baseline_quality = cand.quality
            cand.budget_lines = [] if cand.error else check_budget(cfg.budget, _metrics(cand))
            bar.update(1)
        return candidates

    def _skip_reason(self, recipe: Recipe, done: Sequence[Candidate]) -> str | None:
        """The search's own rule (the time limit), then the recipe's early stopping."""
        limit = self.ctx.config.time_limit_s
        elapsed = time.monotonic() - self.started
        if limit is not None and elapsed >= limit:
            return (
                f"time limit: {elapsed:.1f} s of the {limit:g} s allowed had passed "
                "before it could start"
            )
        return recipe.skip_reason(self.ctx, done)

    def _run_candidate(self, cand: Candidate, recipe: Recipe, bar: Any) -> None:
        """Make, gate, evaluate and benchmark one candidate; failures are recorded on it (the
        baseline's raise: without a baseline there is no search)."""
        ev = self.ctx.eval_data
        path = self.work / f"{recipe.name}{recipe.suffix}"
        bar.set_description(f"{recipe.name}: make")
        try:
            cand.artifact = recipe.make(self.ctx, path)
        except EdgeshipError as exc:
            if recipe.baseline:
                raise
            cand.error = str(exc)
            log.warning("candidate %s failed: %s", recipe.name, exc)
            return
        if not recipe.baseline and self.gate_on_check and cand.artifact.precision == "int8":
            cand.error = _check_gate(cand.artifact, self.ctx.config)
            if cand.error is not None:
                log.info("candidate %s failed the quality gate: %s", recipe.name, cand.error)
                return
        bar.set_description(f"{recipe.name}: evaluate")
        if ev is not None:
            try:
                self._evaluate(cand, ev, recipe)
            except EdgeshipError as exc:
                if recipe.baseline:
                    raise
                cand.error = f"evaluation failed: {exc}"
                return
        bar.set_description(f"{recipe.name}: benchmark")
        try:
            cand.bench = self.measure(cand.artifact)
        except EdgeshipError as exc:
            if recipe.baseline:
                raise
            cand.error = f"benchmark failed: {exc}"

    def _evaluate(self, cand: Candidate, ev: Dataset, recipe: Recipe) -> None:
        """Quality on the eval data and the drop against fp32 (0 for fp32 itself)."""
        if cand.artifact is None:
            raise AssertionError("evaluated before it was made")
        # Dynamic int8 scales activations per run: score it one sample at a time, as a board runs.
        batch = 1 if recipe.one_by_one else EVAL_BATCH
        reference = None if recipe.baseline else self.ctx.fp32
        cand.quality = evaluate(cand.artifact, ev, reference=reference, batch_size=batch)
        if recipe.baseline:
            cand.accuracy_drop = 0.0
            cand.drop_basis = "accuracy" if cand.quality.accuracy is not None else "reference"
        elif self.baseline_quality is not None:
            cand.drop_basis = drop_basis(cand.quality, self.baseline_quality)
            cand.accuracy_drop = accuracy_drop(cand.quality, self.baseline_quality)


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
    )
    return bundle.root


def _reproduce(artifact: ModelArtifact | None, calibration: DataSource | None) -> str | None:
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
    excluded = details.get("excluded_nodes") or []
    if excluded:
        parts += ["--exclude", ",".join(excluded)]
    parts += ["-o", str(artifact.path)]
    return shlex.join(parts)


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


def _bench_sample(data: Dataset | None, model: ModelArtifact) -> dict[str, np.ndarray] | None:
    """One real sample (a whole batch for a model whose batch axis is fixed) to time."""
    if data is None:
        return None
    fixed = [s.shape[0] for s in model.io.inputs if s.shape and isinstance(s.shape[0], int)]
    count = min(fixed) if fixed else 1
    if len(data) < count:
        return None
    return take_samples(data.inputs, 0, count)


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
