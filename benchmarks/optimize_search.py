"""What optimize's search shortcuts save, on the digits CNN with outlier channels (where plain
static int8 loses about 30 points, so calibration variants and accuracy-aware int8 all run).

0. **What a cache hit saves in one quantization**: ``sdk.quantize`` of a wider digits CNN
   (``width=64, hidden=512``, untrained) calibrated on 1,347 digits with each method, cold and
   then from the cache.
1. **Cached calibration**: the same search twice with one cache directory. The first run
   calibrates each (method, operator set) once and every later quantization of it (per-tensor
   weights, the accuracy-aware steps) reuses the ranges; the second run calibrates nothing.
   Printed: wall time and cache hits/misses of each run, and per candidate its search time.
2. **Benchmark repetitions stopped by the p95's confidence interval**
   (``OptimizeConfig.bench_ci_stop``, 0.02 by default) against always running ``min_seconds``
   (3 s) per benchmark: search wall time, timed runs per candidate, and the chosen candidate.
3. **A time limit** of 8 s with ``min_seconds`` always run: which candidates ran, which were
   skipped, what was chosen.

    .venv/bin/python benchmarks/optimize_search.py [--json benchmarks/results/optimize_search.json]

Wall times depend on the host (2 shared cores in CI): read them as ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    import sdk
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, OptimizeReport, optimize
    from sdk.training import torch_threads
    from sdk.zoo.digits import (
        INPUT_NAME,
        OUTPUT_NAME,
        add_outlier_channels,
        load_digits_splits,
        train_digits_cnn,
    )

    s = load_digits_splits(seed=0)
    with torch_threads(1):
        model, _ = train_digits_cnn(s, seed=0)
    outliers = add_outlier_channels(copy.deepcopy(model), channels=(0, 1), scale=300.0)
    tmp = Path(tempfile.mkdtemp(prefix="optimize-search-"))
    fp32 = sdk.export(
        outliers,
        (torch.from_numpy(s.x_cal[:4]),),
        to="onnx",
        path=tmp / "outliers.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    cal = {INPUT_NAME: s.x_cal}
    ev = {INPUT_NAME: s.x_test, "labels": s.y_test}
    max_mb = 0.5 * fp32.size_bytes / 2**20
    budget = parse_budget(f"p95<=50ms,drop<=1%,size<={max_mb:.4f}MB")
    results: dict[str, Any] = {}

    def run(label: str, **overrides: Any) -> tuple[OptimizeReport, float]:
        settings: dict[str, Any] = {
            "target": "rpi4",
            "budget": budget,
            "detector": None,
            "calibration_cache": tmp / "cache",
        }
        settings.update(overrides)
        start = time.monotonic()
        report = optimize(
            fp32, calibration=cal, eval_data=ev, out=tmp / label, config=OptimizeConfig(**settings)
        )
        wall = time.monotonic() - start
        print(f"\n== {label}: {wall:.1f} s wall\n{report.summary()}")
        results[label] = {
            "wall_s": wall,
            "chosen": report.chosen,
            "cache_hits": report.calibration_cache_hits,
            "cache_misses": report.calibration_cache_misses,
            "candidates": {
                c.name: {
                    "elapsed_s": c.elapsed_s,
                    "runs": None if c.bench is None else c.bench.runs,
                    "stopped_by_ci": None if c.bench is None else c.bench.stopped_by_ci,
                    "cache_hit": c.calibration_cache_hit,
                }
                for c in report.candidates
            },
            "skipped": [s.to_dict() for s in report.skipped],
        }
        return report, wall

    import numpy as np

    from sdk.quantize import QuantizeConfig
    from sdk.zoo.digits import build_digits_cnn

    wide = sdk.export(
        build_digits_cnn(width=64, hidden=512).eval(),
        (torch.from_numpy(s.x_cal[:4]),),
        to="onnx",
        path=tmp / "wide.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    many = {INPUT_NAME: np.concatenate([s.x_train, s.x_cal])}
    quantize_s: dict[str, dict[str, float]] = {}
    for method in ("minmax", "entropy", "percentile"):
        for state in ("cold", "cached"):
            start = time.monotonic()
            art = sdk.quantize(
                wide,
                many,
                out=tmp / f"wide-{method}-{state}.onnx",
                config=QuantizeConfig(method=method),
                calibration_cache=tmp / "wide-cache",
            )
            assert art.details["calibration_cache"]["hit"] is (state == "cached")
            quantize_s.setdefault(method, {})[state] = time.monotonic() - start
        print(
            f"quantize {method:<10} cold {quantize_s[method]['cold']:.2f} s, "
            f"cached {quantize_s[method]['cached']:.2f} s"
        )
    results["quantize_wide_cnn_s"] = quantize_s

    fast = {"min_runs": 50, "min_seconds": 0.3, "confirm_rounds": 1}
    run("cold-cache", **fast)
    run("warm-cache", **fast)
    run("min-seconds-always", bench_ci_stop=None)
    run("ci-stop-0.02")
    run("time-limit-8s", time_limit_s=8.0, bench_ci_stop=None)

    print("\nsummary:")
    for label, r in results.items():
        if label == "quantize_wide_cnn_s":
            continue
        runs = [c["runs"] for c in r["candidates"].values() if c["runs"]]
        print(
            f"  {label:<20} {r['wall_s']:6.1f} s  chosen {r['chosen']:<32} cache "
            f"{r['cache_hits']} hit / {r['cache_misses']} miss  candidates "
            f"{len(r['candidates'])}, skipped {len(r['skipped'])}, timed runs {runs}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
