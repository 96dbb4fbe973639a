"""LiteRT next to ONNX Runtime on the same model, fp32 and int8, timed side by side.

The digits CNN (``sdk.zoo.digits``, trained with one torch thread) and, unless ``--models``
says otherwise, a wider variant (width 96, hidden 512: more compute per call, so per-call
overhead weighs less) are exported with ``sdk.export`` to ONNX and to TFLite (litert-torch),
then int8-quantized on the same 270 calibration digits:

* ONNX int8: ``sdk.quantize`` (ONNX Runtime static QDQ, per-channel int8 weights, uint8
  activations, MinMax);
* TFLite int8: ``sdk.quantize_tflite`` with ai-edge-quantizer's ``static_wi8_ai8`` (int8
  weights and activations, min-max ranges).

Each model's top-1 accuracy on the 450 test digits and its agreement with the fp32 ONNX model
come from ``sdk.evaluate``. Latency comes from ``sdk.benchmark``: each run in its own pinned
worker process, through ``device_agent.runtime``'s sessions (the board's code: for an int8
TFLite model that includes quantizing the float input and dequantizing the output), on one
real test digit, at 1 thread and at this host's thread count, the four models of a thread
count in alternating order, ``--rounds`` times. The table shows medians over the rounds; the
LiteRT/ORT ratios are medians of per-round ratios, which is what a shared machine lets one
compare.

    .venv/bin/python benchmarks/litert_vs_ort.py [--rounds 3] [--models digits,digits-wide]
        [--json PATH] [--plot PATH]

Writes benchmarks/results/litert_vs_ort.json and .png. Exit code: 0 when every model was made,
ran and its int8 versions lost at most 1 accuracy point against fp32; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"digits": (16, 128, 30), "digits-wide": (96, 512, 15)}  # width, hidden, epochs
VARIANTS = ("onnx fp32", "tflite fp32", "onnx int8", "tflite int8")
MAX_DROP_PTS = 1.0


def make_models(name: str, work: Path, data: Any) -> dict[str, Any]:
    """Train one digits CNN and return its four artifacts, keyed by :data:`VARIANTS`."""
    import torch

    import sdk
    from sdk.training import torch_threads
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, train_digits_cnn

    width, hidden, epochs = MODELS[name]
    names: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    cal = {INPUT_NAME: data.x_cal}
    with torch_threads(1):
        net, _ = train_digits_cnn(data, seed=0, width=width, hidden=hidden, epochs=epochs)
        onnx_fp32 = sdk.export(
            net, (torch.from_numpy(data.x_cal[:4]),), to="onnx", path=work / f"{name}.onnx", **names
        )
        with warnings.catch_warnings():
            # litert-torch 0.10's torch.export uses pytree APIs torch 2.13 deprecates.
            warnings.simplefilter("ignore", FutureWarning)
            tflite_fp32 = sdk.export(
                net,
                (torch.from_numpy(data.x_cal[:1]),),  # one sample per call, as a board runs it
                to="tflite",
                path=work / f"{name}.tflite",
                **names,
            )
    return {
        "onnx fp32": onnx_fp32,
        "tflite fp32": tflite_fp32,
        "onnx int8": sdk.quantize(onnx_fp32, cal, out=work / f"{name}.int8.onnx"),
        "tflite int8": sdk.quantize_tflite(
            tflite_fp32, cal, work / f"{name}.int8.tflite", recipe="static_wi8_ai8"
        ),
    }


def run_model(name: str, args: argparse.Namespace, work: Path, data: Any) -> dict[str, Any]:
    import sdk
    from sdk.zoo.digits import INPUT_NAME

    print(f"\n== {name}", flush=True)
    started = time.perf_counter()
    arts = make_models(name, work, data)
    made_s = time.perf_counter() - started
    evaluation = sdk.load_dataset(
        {INPUT_NAME: data.x_test, "labels": data.y_test}, arts["onnx fp32"].io
    )
    rows: dict[str, dict[str, Any]] = {}
    for variant, art in arts.items():
        q = sdk.evaluate(art, evaluation, reference=arts["onnx fp32"], batch_size=1)
        rows[variant] = {
            "runtime": "LiteRT" if art.format == "tflite" else "ONNX Runtime",
            "precision": art.precision,
            "recipe": art.recipe,
            "size_bytes": art.size_bytes,
            "accuracy": q.accuracy,
            "agreement_with_onnx_fp32": q.agreement,
            "latency": {},
        }
    for variant in ("onnx int8", "tflite int8"):
        fp32 = rows[variant.replace("int8", "fp32")]["accuracy"]
        rows[variant]["drop_pts"] = (fp32 - rows[variant]["accuracy"]) * 100

    feed = {INPUT_NAME: data.x_test[:1]}
    host_threads = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, host_threads})
    measured_on = "?"
    ratios: dict[str, dict[str, list[float]]] = {}
    for threads in thread_counts:
        config = sdk.BenchConfig(
            target="host", threads=threads, min_runs=args.min_runs, min_seconds=args.min_seconds
        )
        p50: dict[str, list[float]] = {v: [] for v in VARIANTS}
        p95: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                report = sdk.benchmark(arts[variant], config, inputs=feed)
                p50[variant].append(report.latency_ms["p50"])
                p95[variant].append(report.latency_ms["p95"])
                measured_on = report.measured_on
            print(
                f"  {threads} thread(s), round {r + 1}: "
                + ", ".join(f"{v} {p50[v][-1]:.4g}" for v in VARIANTS)
                + " (p50 ms)",
                flush=True,
            )
        for variant in VARIANTS:
            rows[variant]["latency"][str(threads)] = {
                "p50_ms": statistics.median(p50[variant]),
                "p95_ms": statistics.median(p95[variant]),
                "rounds_p50_ms": p50[variant],
                "rounds_p95_ms": p95[variant],
            }
        ratios[str(threads)] = {
            precision: [
                t / o
                for t, o in zip(p50[f"tflite {precision}"], p50[f"onnx {precision}"], strict=True)
            ]
            for precision in ("fp32", "int8")
        }
    return {
        "width_hidden_epochs": MODELS[name],
        "measured_on": measured_on,
        "threads": thread_counts,
        "variants": rows,
        "litert_over_ort_p50": {
            t: {p: statistics.median(v) for p, v in by_p.items()} for t, by_p in ratios.items()
        },
        "litert_over_ort_p50_rounds": ratios,
        "make_s": made_s,
        "seconds": time.perf_counter() - started,
    }


def print_table(results: dict[str, Any]) -> None:
    first = next(iter(results["models"].values()))
    threads = [str(t) for t in first["threads"]]
    print(
        f"\nmedian of {results['rounds']} alternating rounds, one test digit per call; "
        f"measured on {first['measured_on']}; accuracy on 450 test digits"
    )
    lat_head = "".join(f"{f'p50@{t}t':>10}{f'p95@{t}t':>10}" for t in threads)
    head = (
        f"{'model':<13}{'variant':<13}{'size KiB':>9}{'accuracy':>10}{'agree':>8}"
        f"{'drop':>7}{lat_head}"
    )
    print(head)
    print("-" * len(head))
    for name, m in results["models"].items():
        for variant, row in m["variants"].items():
            drop = row.get("drop_pts")
            lat = "".join(
                f"{row['latency'][t]['p50_ms']:>10.4f}{row['latency'][t]['p95_ms']:>10.4f}"
                for t in threads
            )
            print(
                f"{name:<13}{variant:<13}{row['size_bytes'] / 1024:>9.1f}"
                f"{row['accuracy']:>10.2%}{row['agreement_with_onnx_fp32']:>8.2%}"
                f"{'-' if drop is None else f'{drop:.2f}':>7}{lat}"
            )
    print("\nLiteRT p50 / ONNX Runtime p50 (median of per-round ratios; < 1: LiteRT faster)")
    print(f"{'model':<13}" + "".join(f"{f'fp32@{t}t':>11}{f'int8@{t}t':>11}" for t in threads))
    for name, m in results["models"].items():
        r = m["litert_over_ort_p50"]
        print(
            f"{name:<13}" + "".join(f"{r[t]['fp32']:>11.2f}{r[t]['int8']:>11.2f}" for t in threads)
        )


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    models = list(results["models"].items())
    threads = [str(t) for t in models[0][1]["threads"]]
    colours = {
        "onnx fp32": "#7570b3",
        "tflite fp32": "#e7298a",
        "onnx int8": "#1b9e77",
        "tflite int8": "#d95f02",
    }
    cols = len(threads) + 1
    fig, axes = plt.subplots(len(models), cols, figsize=(4.4 * cols, 2.8 * len(models)))
    axes = np.atleast_2d(axes)
    for row_axes, (name, m) in zip(axes, models, strict=True):
        rows = m["variants"]
        ys = np.arange(len(VARIANTS))
        for ax, t in zip(row_axes, threads, strict=False):
            p50 = [rows[v]["latency"][t]["p50_ms"] for v in VARIANTS]
            ax.barh(ys, p50, color=[colours[v] for v in VARIANTS])
            for y, value in zip(ys, p50, strict=True):
                ax.text(value, y, f" {value:.3g}", va="center", fontsize=8)
            ax.set_xlim(0, max(p50) * 1.25)
            ax.set_title(f"{name}: p50 ms at {t} thread(s)", fontsize=9)
            labels = [f"{v}\n{rows[v]['accuracy']:.2%}" for v in VARIANTS]
            ax.set_yticks(ys, labels if ax is row_axes[0] else [""] * len(ys), fontsize=8)
            ax.invert_yaxis()
        ax = row_axes[-1]
        pairs = [(t, p) for t in threads for p in ("fp32", "int8")]
        values = [m["litert_over_ort_p50"][t][p] for t, p in pairs]
        ys = np.arange(len(pairs))
        ax.barh(ys, values, color=[colours[f"tflite {p}"] for _, p in pairs])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [f"{p} @{t}t" for t, p in pairs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{name}: LiteRT p50 / ORT p50 (<1: LiteRT faster)", fontsize=9)
        for a in row_axes:
            a.tick_params(axis="x", labelsize=8)
            a.xaxis.set_major_locator(MaxNLocator(5))
    fig.suptitle(
        f"LiteRT vs ONNX Runtime, same digits CNN (measured on {results['machine']['cpu']}, "
        "sdk.benchmark, one test digit per call; labels: top-1 accuracy)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"written {path}")


def machine() -> dict[str, Any]:
    from benchmarks.machine_facts import machine_facts

    return machine_facts(
        ("onnxruntime", "ai-edge-litert", "ai-edge-quantizer", "litert-torch", "torch")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--min-runs", type=int, default=300, help="per benchmark")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per benchmark")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {list(MODELS)}")
    parser.add_argument("--json", type=Path, default=RESULTS / "litert_vs_ort.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "litert_vs_ort.png")
    args = parser.parse_args(argv)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(wanted) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")

    from device_agent.errors import EdgeshipError
    from sdk.zoo.digits import load_digits_splits

    started = time.perf_counter()
    data = load_digits_splits(seed=0)
    results: dict[str, Any] = {
        "rounds": args.rounds,
        "min_runs": args.min_runs,
        "min_seconds": args.min_seconds,
        "machine": machine(),
        "models": {},
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="litert-vs-ort-") as tmp:
        for name in wanted:
            try:
                results["models"][name] = run_model(name, args, Path(tmp), data)
            except EdgeshipError as exc:
                print(f"{name}: FAILED: {exc}")
                results.setdefault("failures", {})[name] = str(exc)
                ok = False
                continue
            drops = [results["models"][name]["variants"][v]["drop_pts"] for v in VARIANTS[2:]]
            ok = ok and all(d <= MAX_DROP_PTS for d in drops)
    results["seconds"] = time.perf_counter() - started
    if results["models"]:
        print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.json}")
    if results["models"]:
        plot(results, args.plot)
    print(f"took {results['seconds']:.0f} s")
    print(
        f"every model ran; int8 within {MAX_DROP_PTS:g} point of fp32 on both runtimes"
        if ok
        else "NOT every model ran within the accuracy limit"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
