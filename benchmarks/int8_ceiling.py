#!/usr/bin/env python
"""How fast can ONNX Runtime's int8 make each of (m)'s conv nets on this CPU, at best? After
``benchmarks/conv_int8.py`` (docs/benchmarks.md (m)), each net's fp32 model and its
every-op-type static int8 model (the most quantized one optimize made) are profiled node by
node (``sdk.quantize.node_profile``: ORT's profiler, 1 thread, median of 10 runs, the first eval
sample). A node's int8 cost is its fused kernel plus its share of the Q/DQ pairs around it
(``int8_costs``), the accounting latency-aware int8 uses. The ceiling keeps every node in
whichever precision is cheaper for it:

    ceiling = sum over fp32's nodes of min(fp32 us, int8 us) / sum of fp32's node times

It is optimistic (the Q/DQ pairs a float/int8 boundary adds are not charged; accuracy is
ignored), so a net whose ceiling is above a speed line cannot meet that line with any mix of
int8 and float nodes on this runtime and CPU.

    .venv/bin/python benchmarks/int8_ceiling.py [--only det,cls,nudenet,effnet,rec]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

NETS = ("det", "cls", "nudenet", "effnet", "rec")
INT8 = ("ort-static-int8-minmax-all-ops.onnx", "ort-static-int8-minmax.onnx")


def ceiling(folder: Path) -> dict[str, object]:
    from sdk.quantize.node_profile import int8_costs, profile_nodes

    candidates = folder / "bundle-candidates"
    fp32 = candidates / "fp32.onnx"
    int8 = next((candidates / n for n in INT8 if (candidates / n).exists()), None)
    if not fp32.exists() or int8 is None:
        raise SystemExit(f"{candidates}: run benchmarks/conv_int8.py first")
    data = np.load(folder / "eval.npz")
    feed = {k: data[k][:1] for k in data.files if k != "labels"}
    ref = profile_nodes(fp32, feed, runs=10)
    got = profile_nodes(int8, feed, runs=10)
    costs = int8_costs(got, int8, None)
    total = sum(t.us for t in ref.nodes.values())
    best = sum(min(t.us, costs.get(n, t.us)) for n, t in ref.nodes.items())
    slower = sum(1 for n, c in costs.items() if c > ref.us(n))
    return {
        "int8": int8.stem,
        "fp32_us": total,
        "int8_us": sum(t.us for t in got.nodes.values()) + sum(got.unattributed.values()),
        "ceiling_us": best,
        "quantized": len(costs),
        "slower": slower,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "conv-int8")
    ap.add_argument("--only", default=",".join(NETS), help=f"a subset of {','.join(NETS)}")
    args = ap.parse_args()
    print(f"{'net':8} {'int8 model':32} {'fp32 us':>9} {'int8 us':>9} {'ratio':>6} "
          f"{'ceiling':>8} {'slower nodes':>13}")  # fmt: skip
    for key in [k.strip() for k in args.only.split(",") if k.strip()]:
        r = ceiling(args.workdir / key)
        fp32, int8, best = (float(r[k]) for k in ("fp32_us", "int8_us", "ceiling_us"))  # type: ignore[arg-type]
        print(
            f"{key:8} {r['int8']!s:32} {fp32:9.0f} {int8:9.0f} {int8 / fp32:6.2f} "
            f"{best / fp32:8.2f} {r['slower']!s:>6} of {r['quantized']!s:<4}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
