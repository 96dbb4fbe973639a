"""Knowledge distillation on digits: the same small student trained alone and distilled, per seed.

A teacher (``build_digits_cnn(width=32, hidden=256)``, 283,786 parameters) trains on the whole
training split. For each seed, a student (``width=8, hidden=32``, 9,802 parameters: 3.5% of
the teacher) starts from the same initial weights twice and sees the same labelled subset in
the same batch order: once trained on the labels alone (``sdk.prune.fine_tune``), once
distilled from the teacher (``sdk.distill.distill``, T=4, alpha=0.7). Test accuracy of both
is printed per seed, with the means.

Three regimes are run by default, because the answer depends on the training budget:
``converged`` (200 labelled digits, 100 epochs: the acceptance configuration of
tests/test_distill.py), ``short`` (200 digits, 20 epochs: the student is still learning, and
the softened targets, which carry weaker gradients toward the right class, slow it down) and
``full`` (all 1,077 training digits, 30 epochs, as the teacher was trained).

    .venv/bin/python benchmarks/distill_digits.py [--seeds 5] [--regime converged|short|full|all]

Exits 1 if, in the converged regime, the distilled mean is below the alone mean.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (labelled digits, epochs); 0 digits: the whole training split (1,077).
REGIMES = {"converged": (200, 100), "short": (200, 20), "full": (0, 30)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    args = parser.parse_args(argv)

    import torch

    from sdk.distill import distill
    from sdk.prune import fine_tune
    from sdk.training import accuracy, torch_threads
    from sdk.zoo.digits import build_digits_cnn, load_digits_splits, train_digits_cnn

    s = load_digits_splits(seed=0)
    test = (s.x_test, s.y_test)
    with torch_threads(1):
        teacher, teacher_acc = train_digits_cnn(s, seed=0, width=32, hidden=256, epochs=30)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: {teacher_params:,} params, test accuracy {teacher_acc:.4f}")
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    ok = True
    for regime in regimes:
        subset, epochs = REGIMES[regime]
        started = time.perf_counter()
        rows = []
        for seed in range(args.seeds):
            count = subset or len(s.x_train)
            idx = np.random.default_rng(seed).choice(len(s.x_train), count, replace=False)
            data = (s.x_train[idx], s.y_train[idx])
            torch.manual_seed(seed)
            alone = build_digits_cnn(width=8, hidden=32)
            taught = copy.deepcopy(alone)
            fine_tune(alone, data, epochs=epochs, lr=2e-3, seed=seed, progress=False)
            distill(
                teacher,
                taught,
                data,
                temperature=args.temperature,
                alpha=args.alpha,
                epochs=epochs,
                lr=2e-3,
                seed=seed,
                progress=False,
            )
            rows.append((seed, accuracy(alone, test), accuracy(taught, test)))
        student_params = sum(p.numel() for p in alone.parameters())
        a = np.array([r[1] for r in rows])
        d = np.array([r[2] for r in rows])
        print(
            f"\n{regime}: student {student_params:,} params "
            f"({student_params / teacher_params:.1%} of the teacher), "
            f"{subset or len(s.x_train)} labelled digits, "
            f"{epochs} epochs, T={args.temperature:g}, alpha={args.alpha:g} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        print("seed  alone   distilled")
        for seed, x, y in rows:
            print(f"{seed:>4}  {x:.4f}  {y:.4f}")
        print(
            f"mean  {a.mean():.4f}  {d.mean():.4f}  (std {a.std():.4f} / {d.std():.4f}; "
            f"distilled better on {int((d > a).sum())} of {len(rows)} seeds)"
        )
        if regime == "converged" and d.mean() < a.mean():
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
