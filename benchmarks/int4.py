"""int4 MatMul weights next to fp32 and int8 on MatMul-heavy models, measured side by side.

Two MLPs on scikit-learn's digits (``sdk.zoo.digits``: flatten, then 64 -> H -> H -> 10 with
ReLU, trained with one torch thread), H 256 and 1024, exported with ``sdk.export`` (their
``nn.Linear`` layers become ``Gemm``), each in four versions:

* ``fp32``: the export;
* ``ort-static-int8``: ``sdk.quantize`` (ONNX Runtime static QDQ, per-channel int8 weights,
  MinMax on the 270 calibration digits), the int8 candidate optimize tries first;
* ``ort-weight-int4``: ``sdk.quantize.nbits.quantize_int4`` with its defaults (``Gemm``
  rewritten to ``MatMul``, 4-bit weights in blocks of 32, ``MatMulNBits`` at accuracy level 4:
  its input quantized to int8 inside the operator), what optimize's ``ort-weight-int4``
  candidate is;
* ``int4 float compute``: the same weights, ``MatMulNBits`` computing in float
  (``accuracy_level=None``), the other setting ``quantize_int4`` offers.

Quality comes from ``sdk.evaluate`` on the 450 test digits: top-1 accuracy, the drop in points
against fp32 and the agreement with fp32's top-1; ``cos`` is the quantizer's check (worst
per-sample cosine with fp32 on calibration digits). Latency comes from ``sdk.benchmark``: each
run in its own pinned worker process through ``device_agent.runtime``'s session (the board's
code), at 1 thread, on one test digit, the four versions in alternating order, ``--rounds``
times; the table shows the medians of the rounds' p50 and p95.

    .venv/bin/python benchmarks/int4.py [--rounds 3] [--hidden 256,1024] [--json PATH]

Writes benchmarks/results/int4.json. Exit code: 0 when every version was made and ran, the int4
files are under 0.35x fp32's and the int4 models lost at most 1 accuracy point; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("fp32", "ort-static-int8", "ort-weight-int4", "int4 float compute")
MAX_DROP_PTS = 1.0
MAX_SIZE_RATIO = 0.35


def make_models(hidden: int, work: Path, data: Any) -> dict[str, Any]:
    """Train one MLP and return its four versions, keyed by :data:`VARIANTS`."""
    import torch
    from torch import nn

    import sdk
    from sdk.quantize.nbits import quantize_int4
    from sdk.training import torch_threads
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, train_digits_cnn

    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    with torch_threads(1):
        net, _ = train_digits_cnn(data, seed=0, epochs=20, model=mlp)
        fp32 = sdk.export(
            net,
            (torch.from_numpy(data.x_cal[:4]),),
            to="onnx",
            path=work / f"mlp{hidden}.onnx",
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    cal = {INPUT_NAME: data.x_cal}
    return {
        "fp32": fp32,
        "ort-static-int8": sdk.quantize(fp32, cal, out=work / f"mlp{hidden}.int8.onnx"),
        "ort-weight-int4": quantize_int4(fp32, cal, out=work / f"mlp{hidden}.int4.onnx"),
        "int4 float compute": quantize_int4(
            fp32, cal, out=work / f"mlp{hidden}.int4-float.onnx", accuracy_level=None
        ),
    }


def run_model(hidden: int, args: argparse.Namespace, work: Path, data: Any) -> dict[str, Any]:
    import sdk
    from sdk.zoo.digits import INPUT_NAME

    print(f"\n== mlp-{hidden}", flush=True)
    started = time.perf_counter()
    arts = make_models(hidden, work, data)
    made_s = time.perf_counter() - started
    evaluation = sdk.load_dataset({INPUT_NAME: data.x_test, "labels": data.y_test}, arts["fp32"].io)
    rows: dict[str, dict[str, Any]] = {}
    for variant, art in arts.items():
        q = sdk.evaluate(art, evaluation, reference=arts["fp32"])
        check = art.details.get("check") or {}
        rows[variant] = {
            "precision": art.precision,
            "recipe": art.recipe,
            "size_bytes": art.size_bytes,
            "size_ratio": art.size_bytes / arts["fp32"].size_bytes,
            "accuracy": q.accuracy,
            "agreement_with_fp32": q.agreement,
            "check_cosine_min": check.get("cosine_min"),
        }
    for row in rows.values():
        row["drop_pts"] = (rows["fp32"]["accuracy"] - row["accuracy"]) * 100

    feed = {INPUT_NAME: data.x_test[:1]}
    config = sdk.BenchConfig(
        target="host", threads=1, min_runs=args.min_runs, min_seconds=args.min_seconds
    )
    p50: dict[str, list[float]] = {v: [] for v in VARIANTS}
    p95: dict[str, list[float]] = {v: [] for v in VARIANTS}
    measured_on = "?"
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
            report = sdk.benchmark(arts[variant], config, inputs=feed)
            p50[variant].append(report.latency_ms["p50"])
            p95[variant].append(report.latency_ms["p95"])
            measured_on = report.measured_on
        print(
            f"  round {r + 1}: "
            + ", ".join(f"{v} {p50[v][-1]:.4g}" for v in VARIANTS)
            + " (p50 ms)",
            flush=True,
        )
    for variant in VARIANTS:
        rows[variant]["p50_ms"] = statistics.median(p50[variant])
        rows[variant]["p95_ms"] = statistics.median(p95[variant])
        rows[variant]["rounds_p50_ms"] = p50[variant]
        rows[variant]["rounds_p95_ms"] = p95[variant]
    return {
        "hidden": hidden,
        "measured_on": measured_on,
        "variants": rows,
        "make_s": made_s,
        "seconds": time.perf_counter() - started,
    }


def print_table(results: dict[str, Any]) -> None:
    first = next(iter(results["models"].values()))
    print(
        f"\nmedian of {results['rounds']} alternating rounds at 1 thread, one test digit per "
        f"call; measured on {first['measured_on']}; accuracy on 450 test digits"
    )
    head = (
        f"{'model':<10}{'version':<23}{'size MB':>9}{'x fp32':>8}{'top-1':>8}{'drop':>7}"
        f"{'agree':>8}{'cos':>9}{'p50 ms':>9}{'p95 ms':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, m in results["models"].items():
        for variant, row in m["variants"].items():
            cos = row["check_cosine_min"]
            print(
                f"{name:<10}{variant:<23}{row['size_bytes'] / 2**20:>9.3f}"
                f"{row['size_ratio']:>8.3f}{row['accuracy']:>8.2%}{row['drop_pts']:>7.2f}"
                f"{row['agreement_with_fp32']:>8.2%}{'-' if cos is None else f'{cos:.5f}':>9}"
                f"{row['p50_ms']:>9.4f}{row['p95_ms']:>9.4f}"
            )


def machine() -> dict[str, Any]:
    from benchmarks.machine_facts import machine_facts

    return machine_facts(("onnxruntime", "onnx", "torch"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--min-runs", type=int, default=300, help="per benchmark")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per benchmark")
    parser.add_argument("--hidden", default="256,1024", help="hidden widths, comma-separated")
    parser.add_argument("--json", type=Path, default=RESULTS / "int4.json")
    args = parser.parse_args(argv)
    widths = [int(h) for h in args.hidden.split(",") if h.strip()]

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
    with tempfile.TemporaryDirectory(prefix="int4-") as tmp:
        for hidden in widths:
            name = f"mlp-{hidden}"
            try:
                results["models"][name] = run_model(hidden, args, Path(tmp), data)
            except EdgeshipError as exc:
                print(f"{name}: FAILED: {exc}")
                results.setdefault("failures", {})[name] = str(exc)
                ok = False
                continue
            rows = results["models"][name]["variants"]
            int4 = [rows[v] for v in VARIANTS[2:]]
            ok = ok and all(
                r["drop_pts"] <= MAX_DROP_PTS and r["size_ratio"] < MAX_SIZE_RATIO for r in int4
            )
    results["seconds"] = time.perf_counter() - started
    if results["models"]:
        print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.json}")
    print(f"took {results['seconds']:.0f} s")
    print(
        f"every version ran; int4 under {MAX_SIZE_RATIO:g}x fp32's size and within "
        f"{MAX_DROP_PTS:g} point of its accuracy"
        if ok
        else "NOT every int4 version ran within the size and accuracy limits"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
