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
5. ``ort-static-int8-latency-aware``: only when plain static int8 (2) was made and is slower
   than fp32: ONNX Runtime's per-node profile (one thread, medians) of fp32 and int8, and the
   nodes whose int8 form (their share of Q/DQ included) costs more kept in float, re-quantized
   while a round gets faster (:mod:`sdk.optimize.stages.latency_aware`; the per-node evidence
   is in the report);
6. ``ort-weight-int4``: only when the budget has a size line: the MatMul weights (and Gemm's,
   rewritten to MatMul) in 4-bit blocks, run by ONNX Runtime's ``MatMulNBits``
   (:func:`sdk.quantize.nbits.quantize_int4`; about a sixth of fp32's size), gated on
   ``min_cosine`` like int8; a model without such weights lists it as skipped;
7. calibration variants of (2): the other methods of ``static_methods`` and per-tensor weight
   scales (``-per-tensor``). They quantize the same operators, so they are no smaller and no
   faster than (2): they only run when (2) failed on quality (the ``drop`` line or the
   ``min_cosine`` gate) or could not be made;
8. ``ort-static-int8-accuracy-aware``: :func:`sdk.quantize.accuracy_aware_quantize` keeps
   the most quantization-sensitive nodes in float until the drop fits the budget's ``drop``
   line. It needs eval data and a ``drop`` line and only runs when no static candidate so far
   meets every line and plain static int8 missed the ``drop`` line (otherwise it would return
   plain static int8 unchanged, or be beaten by a candidate with more of the model in int8);
9. with a PyTorch model (``torch_model``, ``train_data``): ``pruned-<pct>-int8`` for each of
   :attr:`OptimizeConfig.prune_ratios` (structured pruning with :func:`sdk.prune.prune_structured`,
   fine-tuning, ONNX export, static int8), and with a ``student``: ``distilled-int8``
   (:func:`sdk.distill.distill` from ``torch_model``, export, static int8);
10. ``fp16``: only where the runtime benefits. Boards run ONNX Runtime's CPU execution
   provider, whose fp16 support is a handful of kernels (it casts around the rest), so on a
   CPU target fp16 is listed as skipped with that reason; ``try_fp16=True`` forces it.
11. with a PyTorch model (``torch_model``, or a module or ``.pt2`` as the model) on a board
   that may run LiteRT (:attr:`OptimizeConfig.runtime`, :mod:`sdk.optimize.runtimes`):
   ``litert-<recipe>`` for the recipes a float .tflite gets (or
   :attr:`OptimizeConfig.litert_recipes`), the model exported to TFLite and quantized for
   LiteRT with that ai-edge-quantizer recipe.

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
   only if it is faster: quantizing more operators must earn its extra risk. The float
   models it is settled against are fp32-fused (when made) and fp32. When a float model wins
   the re-runs, the next lossy candidates that met the budget and looked faster than every
   float model get their turn the same way (up to ``choice.RUNNERS_UP``, 2, more), so one
   noisy first measurement cannot hide a faster model that also meets the budget.
2. When no candidate meets the budget, the best effort is the one with the smallest total
   relative excess over the failing lines; it is bundled all the same, and the report says how
   far each line is off.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
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
from sdk.optimize.bundling import isa_note
from sdk.optimize.choice import _bundle, _choose, _metrics, _nothing_to_quantize
from sdk.optimize.config import OptimizeConfig
from sdk.optimize.report import Candidate, OptimizeReport, SkippedRecipe, reproduce_command
from sdk.optimize.stages import Recipe, SearchContext, default_registry
from sdk.optimize.stages.fp32 import FP32
from sdk.optimize.stages.torch_inputs import check_torch_inputs
from sdk.targets import TargetProfile, get_target

if TYPE_CHECKING:
    import torch

    from sdk.training import TrainData

__all__ = ["optimize"]

log = logging.getLogger(__name__)

EVAL_BATCH = 64


def optimize(
    model: ModelArtifact | str | Path | torch.nn.Module,
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
    out_dir = Path(out)
    exports = out_dir.with_name(out_dir.name + "-source")  # models the search starts from
    ours = not exports.exists()  # only a folder this run made is ever removed
    try:
        model = _tf_source(model, calibration, torch_model, exports, cfg.runtime)
        model, torch_model = _torch_source(model, calibration, torch_model, exports)
        ctx = _context(
            model, calibration, eval_data, cfg, torch_model, train_data, student, exports
        )
    except BaseException:
        _remove(exports, ours)
        raise
    cal, ev = ctx.calibration, ctx.eval_data
    work = out_dir.with_name(out_dir.name + "-candidates")
    notes: list[str] = list(ctx.fp32.details.get("notes") or [])  # what reading it changed
    notes += _runtime_notes(ctx)
    sample = _bench_sample(ev if ev is not None else cal, ctx.fp32)
    boards = _devices_ready(ctx, sample, work, notes)

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
        if boards is not None:
            from sdk.optimize.device_choice import choose_on_devices

            chosen, bundle_root, devices = choose_on_devices(
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
            _nothing_to_quantize(ctx, chosen, notes)
            bundle_root = _bundle(ctx, chosen, work, out_dir, notes, bar)
        bar.update(1)
    finally:
        bar.close()
    notes += _closing_notes(ctx, sample)
    if not cfg.keep_candidates:
        shutil.rmtree(work, ignore_errors=True)
        _remove(exports, ours)
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


def _remove(folder: Path, ours: bool) -> None:
    """Remove ``folder`` if this run made it (``ours``), never one the user had."""
    if ours:
        shutil.rmtree(folder, ignore_errors=True)


def _closing_notes(ctx: SearchContext, sample: dict[str, np.ndarray] | None) -> list[str]:
    """The int8 outlook on the target and what every benchmark ran on."""
    notes = []
    isa = None if ctx.nothing_to_quantize else isa_note(ctx.target)
    if isa is not None:
        notes.append(isa)
    if ctx.reduce_range_why is not None and not ctx.nothing_to_quantize:
        notes.append(
            "ONNX Runtime int8 candidates took 7-bit weights (reduce_range): "
            f"{ctx.reduce_range_why}; reduce_range=False (CLI --no-reduce-range) measures "
            "8-bit weights anyway"
        )
    if sample is not None:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sample.items())
        source = "eval" if ctx.eval_data is not None else "calibration"
        notes.append(f"benchmarked on one sample of the {source} data ({shapes})")
    return notes


def _devices_ready(
    ctx: SearchContext, sample: dict[str, np.ndarray] | None, work: Path, notes: list[str]
) -> Mapping[str, list[str]] | None:
    """Make the search's work folder; with ``on_device``, the devices grouped by board, each
    online and each having taken the fp32 model (:func:`sdk.optimize.on_device.probe`), before
    the search starts (None without devices)."""
    boards = None
    target = ctx.config.on_device
    if target is not None:  # the devices are online before the search starts
        from sdk.optimize.on_device import boards_of

        boards = boards_of(target)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if target is None or boards is None:
        return None
    from sdk.optimize.device_choice import input_spec
    from sdk.optimize.on_device import probe

    try:  # ... and each takes a candidate (the fp32 model), or the search does not start
        cannot = probe(target, boards, ctx.fp32.path, input_spec(sample, ctx.fp32), work)
    except EdgeshipError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    notes.extend(f"{d} could not time the fp32 model: {why}" for d, why in cannot.items())
    return boards


def _context(
    model: ModelArtifact | str | Path,
    calibration: DataSource | None,
    eval_data: DataSource | None,
    cfg: OptimizeConfig,
    torch_model: torch.nn.Module | None,
    train_data: TrainData | None,
    student: torch.nn.Module | None,
    source: Path,
) -> SearchContext:
    """The search's inputs, checked and loaded once: the data becomes ``Dataset``s here and
    every stage reads those. A search for LiteRT alone starts from ``torch_model``'s float
    TFLite export, written in ``source``."""
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
    from sdk.optimize.runtimes import allowed_runtimes, litert_baseline
    from sdk.optimize.stages.ort_static import no_default_ops
    from sdk.quantize.ort_check import nothing_to_quantize

    tflite = fp32.details.get("tflite_source")  # a Keras model's or SavedModel's conversion
    runtimes = allowed_runtimes(cfg, target, fp32.format, torch_model or tflite)
    if fp32.format == "onnx" and "onnxruntime" not in runtimes and (torch_model or tflite):
        fp32 = litert_baseline(fp32, torch_model, cal, source / "model.tflite")
        cal = None if cal is None else load_dataset(cal, fp32.io, what="calibration data")
        ev = None if ev is None else load_dataset(ev, fp32.io, what="eval data")

    why_7_bits = None
    # only an ONNX model gets ONNX Runtime int8 candidates (a float .tflite gets LiteRT ones)
    if cfg.reduce_range is None and fp32.format == "onnx" and "onnxruntime" in runtimes:
        from sdk.isa import saturation

        why_7_bits = saturation(target)
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
        no_default_ops=no_default_ops(fp32),
        runtimes=runtimes,
        reduce_range=bool(cfg.reduce_range) or why_7_bits is not None,
        reduce_range_why=why_7_bits,
    )


def _tf_source(
    model: Any, calibration: DataSource | None, torch_model: Any, folder: Path, runtime: str
) -> Any:
    """A Keras model or SavedModel converted to ONNX and TFLite in ``folder``
    (:mod:`sdk.optimize.tf_source`); any other model as it is."""
    from sdk.optimize.tf_source import is_tf_model, tf_source_model

    if not is_tf_model(model):
        return model
    if torch_model is not None:
        raise ConfigError("torch_model goes with an ONNX model, not a Keras model: leave it out")
    return tf_source_model(model, calibration, folder, runtime)


def _torch_source(
    model: ModelArtifact | str | Path | torch.nn.Module,
    calibration: DataSource | None,
    torch_model: torch.nn.Module | None,
    folder: Path,
) -> tuple[ModelArtifact | str | Path, torch.nn.Module | None]:
    """A PyTorch model given as the model (a module, or a ``.pt2`` file) exported to ONNX in
    ``folder``, and the module as ``torch_model``; any other model as it is."""
    import sys

    if isinstance(model, ModelArtifact):
        return model, torch_model
    if isinstance(model, str | Path):
        if Path(model).suffix.lower() != ".pt2":
            return model, torch_model
        from sdk.optimize.runtimes import load_pt2

        module = load_pt2(Path(model))
    elif "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        module = model
    else:
        raise ConfigError(
            "model must be a model file path, a ModelArtifact, a torch.nn.Module or a "
            f"keras.Model, not {type(model).__name__}"
        )
    if torch_model is not None:
        raise ConfigError(
            "the model is a PyTorch model already, and it is the one exported and pruned: "
            "leave torch_model out"
        )
    from sdk.optimize.runtimes import source_model

    return source_model(module, calibration, folder), module


def _runtime_notes(ctx: SearchContext) -> list[str]:
    """What the runtimes allowed changed about the search, in the report's notes."""
    target = ctx.target.name
    made_from = ctx.fp32.details.get("made_from", "the PyTorch model")
    if ctx.fp32.details.get("litert_only"):
        return [
            f"the bundle may name LiteRT only (runtime {ctx.config.runtime}, target {target}): "
            f"every candidate is measured against {made_from}'s float TFLite export"
        ]
    both = ctx.torch_model is not None or "tflite_source" in ctx.fp32.details
    if both and len(ctx.runtimes) > 1:
        return [
            f"ONNX Runtime and LiteRT candidates both searched (target {target} may run "
            "either; --runtime keeps to one): the measurements choose"
        ]
    return []


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
            cand.reproduce = reproduce_command(cand.artifact, calibration)
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
    count = model.io.fixed_batch or 1
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
