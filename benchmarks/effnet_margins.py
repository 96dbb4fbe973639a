#!/usr/bin/env python
"""Where do EfficientNet-Lite0's int8 candidates disagree with fp32? After
``benchmarks/conv_int8.py --only effnet`` (docs/benchmarks.md (m)), each int8 candidate optimize
made is run on the same 256 eval crops, one at a time, and its disagreements with fp32's top-1
are set against fp32's own margin (top-1 minus top-2 softmax probability) on that crop: a flip
where fp32 itself is split between two classes is a near-tie, not a lost answer. Prints, per
candidate, the disagreements with their fp32 margins and the agreement on the crops where fp32
leads by at least 0.05 / 0.1 / 0.2.

It also measures the labels' own resolution, the noise floor: fp32 itself run on the same crops
with random +-0.5 and +-1 gray levels added to every pixel (the model's input is (x/255 - 0.5) /
0.5, so one gray level is 2/255), three draws each. The share of crops whose top-1 changes under
input noise a camera makes on every frame is the least any model judged on these labels loses.

    .venv/bin/python benchmarks/effnet_margins.py [--workdir .cache/conv-int8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

MARGINS = (0.05, 0.1, 0.2)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "conv-int8")
    args = ap.parse_args()
    folder = args.workdir / "effnet" / "bundle-candidates"
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        raise SystemExit(f"{fp32} is missing: run benchmarks/conv_int8.py --only effnet first")
    x = np.load(args.workdir / "effnet" / "eval.npz")["x"]
    ref = softmax_rows(run(fp32, x))
    ranked = np.sort(ref, axis=1)[:, ::-1]
    margin = ranked[:, 0] - ranked[:, 1]
    print(f"{len(x)} crops; fp32 top-1 probability median {np.median(ranked[:, 0]):.2f}")
    print("  " + ", ".join(f"{(margin >= m).sum()} crops with margin >= {m}" for m in MARGINS))
    for model in sorted(folder.glob("ort-static-int8-*.onnx")):
        flips = run(model, x).argmax(axis=1) != ref.argmax(axis=1)
        where = ", ".join(f"{(1 - flips[margin >= m].mean()) * 100:.2f}%" for m in MARGINS)
        print(f"\n{model.stem}: {flips.sum()} flips ({(1 - flips.mean()) * 100:.2f}% agreement)")
        print(f"  agreement where fp32 leads by >= {'/'.join(map(str, MARGINS))}: {where}")
        shown = [round(float(m), 3) for m in np.sort(margin[flips])[:20]]
        more = f" and {flips.sum() - 20} more" if flips.sum() > 20 else ""
        print(f"  fp32 margins at the flips: {shown}{more}")
    noise_floor(fp32, x, ref.argmax(axis=1))
    return 0


def noise_floor(fp32: Path, x: np.ndarray, labels: np.ndarray) -> None:
    """fp32's agreement with its own labels when each pixel moves by +-k gray levels."""
    rng = np.random.default_rng(0)
    print("\nnoise floor: fp32 on the same crops, each pixel moved by +-k gray levels at random")
    for k in (0.5, 1.0):
        kept = []
        for _ in range(3):
            step = rng.choice(np.array([-1.0, 1.0], np.float32), size=x.shape) * (k * 2 / 255)
            kept.append(float((run(fp32, x + step).argmax(axis=1) == labels).mean()))
        shown = ", ".join(f"{a * 100:.2f}%" for a in kept)
        print(f"  +-{k} gray level: agreement {shown} (three draws)")


if __name__ == "__main__":
    sys.exit(main())
