"""Acceptance: a structurally pruned wide digits CNN runs at <= 0.7x the unpruned model's p50.

The script trains the wide digits CNN (``build_digits_cnn(width=64, hidden=256)``), removes
half of the channels of every layer but the classifier head (``sdk.prune.prune_structured``),
fine-tunes it, exports both models to ONNX with ``sdk.export`` and checks the accuracy drop on
the test digits. Then it benchmarks both with ``sdk.benchmark`` (each run in its own pinned
worker process, same thread count, same batch), alternating the order round by round so
drifting load on a shared machine hits both sides alike, and prints every round's p50, the
per-round ratios and their median. It exits 1 if the median ratio is above ``--max-ratio``
(0.7) or the accuracy drop above ``--max-drop`` (1 point).

With ``--int8`` it also quantizes both models (static QDQ) and benchmarks them in the same
rounds; with ``--unstructured 0.8`` it adds the unpruned model with 80% of its weights zeroed
(magnitude pruning, fine-tuned). Both are for information: the acceptance ratio is always
fp32 pruned vs fp32 unpruned.

    .venv/bin/python benchmarks/prune_speedup.py [--rounds 5] [--threads 1] [--int8]
        [--unstructured 0.8] [--json PATH]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5, help="channels to remove per layer")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (unpruned)")
    parser.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-ratio", type=float, default=0.7)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--int8", action="store_true", help="also benchmark int8 of both")
    parser.add_argument(
        "--unstructured",
        type=float,
        default=None,
        metavar="AMOUNT",
        help="also benchmark the model with AMOUNT of its weights zeroed (magnitude, global) "
        "and fine-tuned, to show that sparsity alone does not make a dense runtime faster",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    import sdk
    from sdk.bench import BenchConfig
    from sdk.prune import (
        fine_tune,
        model_stats,
        prune_structured,
        prune_unstructured,
        remove_pruning_masks,
    )
    from sdk.training import torch_threads
    from sdk.zoo.digits import (
        INPUT_NAME,
        OUTPUT_NAME,
        load_digits_splits,
        train_digits_cnn,
    )

    s = load_digits_splits(seed=0)
    started = time.perf_counter()
    with torch_threads(1):
        wide, _ = train_digits_cnn(s, seed=0, width=64, hidden=256, epochs=args.epochs)
    example = torch.from_numpy(s.x_cal[:4])
    result = prune_structured(wide, example, args.ratio)
    fine_tune(result.model, (s.x_train, s.y_train), epochs=args.ft_epochs, lr=1e-3, seed=0)
    print(result.summary())
    sparse = None
    if args.unstructured is not None:
        sparse = prune_unstructured(wide, args.unstructured).model
        fine_tune(sparse, (s.x_train, s.y_train), epochs=args.ft_epochs, lr=1e-3, seed=0)
        remove_pruning_masks(sparse)
        stats = model_stats(sparse, example)
        dense = model_stats(wide, example)
        print(
            f"unstructured pruning ({args.unstructured:.0%} of weights): non-zero params "
            f"{dense.nonzero_params:,} -> {stats.nonzero_params:,}, MACs {dense.macs:,} -> "
            f"{stats.macs:,} (dense kernels multiply the zeros), zlib-compressed parameters "
            f"{dense.compressed_bytes:,} -> {stats.compressed_bytes:,} B"
        )
    print(f"training and pruning took {time.perf_counter() - started:.0f} s")

    with tempfile.TemporaryDirectory(prefix="prune-speedup-") as tmp_dir:
        tmp = Path(tmp_dir)
        names: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
        models = {
            "unpruned": sdk.export(wide, (example,), to="onnx", path=tmp / "wide.onnx", **names),
            "pruned": sdk.export(
                result.model, (example,), to="onnx", path=tmp / "pruned.onnx", **names
            ),
        }
        if sparse is not None:
            models["unstructured"] = sdk.export(
                sparse, (example,), to="onnx", path=tmp / "sparse.onnx", **names
            )
        if args.int8:
            cal = {INPUT_NAME: s.x_cal}
            for name in ("unpruned", "pruned"):
                models[f"{name} int8"] = sdk.quantize(
                    models[name], cal, out=tmp / f"{name.replace(' ', '-')}.int8.onnx"
                )
        eval_data = sdk.load_dataset(
            {INPUT_NAME: s.x_test, "labels": s.y_test}, models["unpruned"].io
        )
        accuracy = {name: sdk.evaluate(art, eval_data).accuracy for name, art in models.items()}
        config = BenchConfig(
            target="host",
            threads=args.threads,
            batch_size=args.batch_size,
            min_runs=300,
            min_seconds=args.min_seconds,
        )
        p50: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else reversed(order):
                report = sdk.benchmark(models[name], config)
                p50[name].append(report.latency_ms["p50"])
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{name} p50 {p50[name][-1]:.4f} ms" for name in models),
                flush=True,
            )
        sizes = {name: art.size_bytes for name, art in models.items()}
        measured_on = report.measured_on

    ratios = [p / u for p, u in zip(p50["pruned"], p50["unpruned"], strict=True)]
    median_ratio = statistics.median(ratios)
    base_acc = accuracy["unpruned"] or 0.0
    drop = base_acc - (accuracy["pruned"] or 0.0)
    print(f"\nmeasured on {measured_on}, {args.threads} thread(s), batch {args.batch_size}")
    print(f"{'model':<16}{'median p50 ms':>14}{'size B':>12}{'accuracy':>10}")
    for name in models:
        print(
            f"{name:<16}{statistics.median(p50[name]):>14.4f}{sizes[name]:>12,}"
            f"{accuracy[name] or 0.0:>10.4f}"
        )
    print(
        f"pruned/unpruned p50 per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"median {median_ratio:.3f} (limit {args.max_ratio})"
    )
    print(f"accuracy drop {drop * 100:.2f} points (limit {args.max_drop * 100:.2f})")
    ok = median_ratio <= args.max_ratio and drop <= args.max_drop
    print("PASS" if ok else "FAIL")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "measured_on": measured_on,
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                    "prune": result.to_dict(),
                    "p50_ms": p50,
                    "size_bytes": sizes,
                    "accuracy": accuracy,
                    "ratios": ratios,
                    "median_ratio": median_ratio,
                    "accuracy_drop": drop,
                    "pass": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
