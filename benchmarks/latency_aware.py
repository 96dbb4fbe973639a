#!/usr/bin/env python
"""fp32 against plain static int8 against latency-aware int8 on real pretrained conv nets.

The nets are PaddleOCR's, from the ``rapidocr-onnxruntime`` wheel (see
``benchmarks/pretrained_models.py`` for how to get it with ``pip download --no-deps``):

* the PP-OCRv4 text detector (DBNet on a MobileNetV3-like backbone: depthwise-separable,
  hard-swish, squeeze-excite), H and W fixed;
* the mobile v2.0 0/180-degree line classifier (MobileNetV3-small-like);
* the PP-OCRv4 text recogniser (PP-LCNetV3 backbone with an SVTR neck), 48x320.

Data is rendered on this machine with PIL in the DejaVu fonts, exactly as
``pretrained_models.py`` renders it (its functions are imported). For each net it prints the
p50/p95 at one thread (``sdk.benchmark``, its own pinned process, on one real eval sample),
the file size, quality against fp32 on the eval samples (mean and worst cosine of the raw
outputs, and the task metric of ``pretrained_models.py``: top-1 agreement, CTC text identical,
mask IoU) and the latency-aware candidate's per-node evidence (top 10 by int8 minus fp32 µs)
with a sum per operator type.

    python benchmarks/latency_aware.py --packages .cache/latency-aware/pkgs \
        --json .cache/latency-aware/result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrained_models as pm


def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and worst per-sample cosine similarity of two output batches."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12
    c = num / den
    return float(c.mean()), float(c.min())


def bench(path: Path, sample: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    from sdk import BenchConfig, benchmark

    cfg = BenchConfig(threads=1, min_runs=30, min_seconds=seconds, warmup_runs=5)
    report = benchmark(path, cfg, inputs=sample)
    return {"p50_ms": report.latency_ms["p50"], "p95_ms": report.latency_ms["p95"]}


def by_op(nodes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for n in nodes:
        if n["fp32_us"] is None:
            continue
        row = out.setdefault(
            n["op_type"], {"nodes": 0, "slower": 0, "fp32_us": 0.0, "int8_us": 0.0}
        )
        row["nodes"] += 1
        row["slower"] += int(n["slower_in_int8"])
        row["fp32_us"] += n["fp32_us"]
        row["int8_us"] += n["int8_us"]
    return out


def run_case(case: pm.Case, work: Path, seconds: float) -> dict[str, Any]:
    from sdk.artifact import read_artifact
    from sdk.data import load_dataset
    from sdk.optimize.stages.latency_aware import latency_aware_quantize
    from sdk.quantize import QuantizeConfig, quantize

    fp32 = read_artifact(case.model)
    cal = load_dataset(case.cal, fp32.io, what="calibration data")
    sample = {k: v[:1] for k, v in case.eval.items() if k != "labels"}
    made: dict[str, Path] = {"fp32": case.model}
    timing: dict[str, float] = {}
    t = time.monotonic()
    made["static int8"] = quantize(fp32, cal, out=work / "static.onnx").path
    timing["static int8"] = time.monotonic() - t
    t = time.monotonic()
    la = latency_aware_quantize(
        fp32, cal, sample, out=work / "latency.onnx", config=QuantizeConfig()
    )
    timing["latency-aware int8"] = time.monotonic() - t
    made["latency-aware int8"] = la.path
    evidence = la.details["latency_aware"]
    feed = {k: v for k, v in case.eval.items() if k != "labels"}
    ref = pm.run_batched(case.model, feed, batch=4)[0]
    rows = {}
    for label, path in made.items():
        row: dict[str, Any] = bench(path, sample, seconds)
        row["size_kib"] = path.stat().st_size / 1024
        if label != "fp32":
            out = pm.run_batched(path, feed, batch=4)[0]
            row["cosine_mean"], row["cosine_min"] = cosine(ref, out)
            row["task"] = case.check(case.model, path)
            row["make_s"] = timing[label]
        rows[label] = row
    return {
        "name": case.name,
        "data": case.data_note,
        "rows": rows,
        "evidence": {k: v for k, v in evidence.items() if k != "nodes"},
        "top_nodes": evidence["nodes"][:10],
        "by_op": by_op(evidence["nodes"]),
        "nodes": evidence["nodes"],
    }


def show(result: dict[str, Any]) -> None:
    print(f"\n== {result['name']}: {result['data']}")
    print(
        f"{'candidate':<20} {'p50 ms':>8} {'p95 ms':>8} {'KiB':>8} {'cos mean':>9} {'cos min':>8}"
    )
    for label, r in result["rows"].items():
        cm = f"{r['cosine_mean']:.5f}" if "cosine_mean" in r else "-"
        cn = f"{r['cosine_min']:.5f}" if "cosine_min" in r else "-"
        print(
            f"{label:<20} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['size_kib']:>8.0f} "
            f"{cm:>9} {cn:>8}"
        )
        if "task" in r:
            task = {k: v for k, v in r["task"].items() if not isinstance(v, list)}
            print(f"{'':<20} task vs fp32: {task}")
    ev = result["evidence"]
    print(
        f"rounds: {ev['rounds']} chosen {ev['chosen_round']}, "
        f"{len(ev['excluded'])} node(s) kept in float; fp32 wall {ev['fp32_wall_us']:.0f} us"
    )
    print(f"{'node':<48} {'op':<10} {'fp32 us':>9} {'int8 us':>9} {'float':>6}")
    for n in result["top_nodes"]:
        fp = "-" if n["fp32_us"] is None else f"{n['fp32_us']:.1f}"
        print(
            f"{n['node'][:48]:<48} {n['op_type']:<10} {fp:>9} {n['int8_us']:>9.1f} "
            f"{'yes' if n['kept_in_float'] else 'no':>6}"
        )
    print("by op type (nodes, slower in int8, fp32 us, int8 us):")
    for op, r in result["by_op"].items():
        print(
            f"  {op:<10} {r['nodes']:>4.0f} {r['slower']:>4.0f} {r['fp32_us']:>10.1f} "
            f"{r['int8_us']:>10.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", type=Path, required=True, help="unzipped wheels")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cases", default="cls,det,rec")
    parser.add_argument("--det-side", type=int, default=320)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    pkg = pm.find_package_dir("rapidocr_onnxruntime", [args.packages])
    if pkg is None:
        print(f"rapidocr_onnxruntime not found under {args.packages}", file=sys.stderr)
        return 2
    version = pm.dist_version(pkg, "rapidocr_onnxruntime")
    results = []
    with tempfile.TemporaryDirectory(prefix="latency-aware-") as tmp:
        work = Path(tmp)
        builders = {
            "cls": lambda: pm.build_ocr_cls(pkg, version, 64, 64, 0, fixed=work),
            "det": lambda: pm.build_ocr_det(pkg, version, 16, 8, args.det_side, 0, fixed=work),
            "rec": lambda: pm.build_ocr_rec(pkg, version, 64, 32, 0, fixed=work),
        }
        for key in args.cases.split(","):
            case = builders[key]()
            case_dir = work / key
            case_dir.mkdir()
            result = run_case(case, case_dir, args.seconds)
            show(result)
            results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
