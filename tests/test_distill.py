"""Knowledge distillation: the loss, its checks, a pruned student, and the digits acceptance run
(a student with under 1/4 of the teacher's parameters, distilled vs trained alone, 5 seeds)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdk.distill import distill, distillation_loss  # noqa: E402
from sdk.errors import ConfigError  # noqa: E402
from sdk.zoo.digits import build_digits_cnn  # noqa: E402

# The acceptance configuration: a teacher trained on the whole training split, a student
# that sees a labelled subset of it and trains to convergence. (With few epochs the soft
# targets slow the student down instead: see benchmarks/distill_digits.py.)
TEACHER = {"width": 32, "hidden": 256}
STUDENT = {"width": 8, "hidden": 32}
SUBSET = 200
EPOCHS = 100
SEEDS = (0, 1, 2, 3, 4)


def test_loss_terms() -> None:
    torch.manual_seed(0)
    student = torch.randn(8, 10)
    teacher = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(distillation_loss(student, teacher, labels, alpha=0.0), ce)
    # Identical logits: the KL term is zero and only the hard term remains.
    same = distillation_loss(student, student, labels, temperature=3.0, alpha=0.5)
    assert torch.allclose(same, 0.5 * ce, atol=1e-6)
    # The soft term is T² times the KL of the softened distributions (batch mean).
    t = 4.0
    kl = (
        (
            torch.softmax(teacher / t, 1)
            * (torch.log_softmax(teacher / t, 1) - torch.log_softmax(student / t, 1))
        )
        .sum(1)
        .mean()
    )
    soft_only = distillation_loss(student, teacher, labels, temperature=t, alpha=1.0)
    assert torch.allclose(soft_only, t * t * kl, atol=1e-5)


def test_checks_its_inputs() -> None:
    teacher = build_digits_cnn(8, 32)
    data = (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="temperature"):
        distill(teacher, build_digits_cnn(4, 16), data, temperature=0, progress=False)
    with pytest.raises(ConfigError, match="alpha"):
        distill(teacher, build_digits_cnn(4, 16), data, alpha=1.5, progress=False)
    with pytest.raises(ConfigError, match="same model"):
        distill(teacher, teacher, data, progress=False)
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    with pytest.raises(ConfigError, match="does not match the teacher"):
        distill(teacher, wrong, data, progress=False)


def test_distills_into_a_pruned_student(digits_splits: Any) -> None:
    from sdk.prune import fine_tune, prune_structured
    from sdk.training import accuracy

    s = digits_splits
    torch.manual_seed(0)
    teacher = build_digits_cnn(16, 64)
    fine_tune(teacher, (s.x_train, s.y_train), epochs=5, lr=2e-3, progress=False)
    student = prune_structured(teacher, torch.from_numpy(s.x_cal[:2]), 0.6).model
    _, history = distill(
        teacher,
        student,
        (s.x_train, s.y_train),
        epochs=3,
        eval_data=(s.x_test, s.y_test),
        progress=False,
    )
    assert len(history.epochs) == 3 and history.final_accuracy is not None
    assert accuracy(student, (s.x_test, s.y_test)) > 0.8


@pytest.mark.slow
def test_acceptance_distilled_student_beats_the_same_student_alone(digits_splits: Any) -> None:
    from sdk.prune import fine_tune
    from sdk.training import accuracy, torch_threads
    from sdk.zoo.digits import train_digits_cnn

    s = digits_splits
    test = (s.x_test, s.y_test)
    with torch_threads(1):
        teacher, teacher_acc = train_digits_cnn(s, seed=0, epochs=30, **TEACHER)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    rows = []
    for seed in SEEDS:
        idx = np.random.default_rng(seed).choice(len(s.x_train), SUBSET, replace=False)
        data = (s.x_train[idx], s.y_train[idx])
        torch.manual_seed(seed)
        alone = build_digits_cnn(**STUDENT)
        taught = copy.deepcopy(alone)  # same initial weights, same batches (same seed)
        fine_tune(alone, data, epochs=EPOCHS, lr=2e-3, seed=seed, progress=False)
        distill(teacher, taught, data, epochs=EPOCHS, lr=2e-3, seed=seed, progress=False)
        rows.append((seed, accuracy(alone, test), accuracy(taught, test)))
    student_params = sum(p.numel() for p in alone.parameters())
    alone_acc = np.array([r[1] for r in rows])
    taught_acc = np.array([r[2] for r in rows])
    lines = [
        f"\nteacher {TEACHER}: {teacher_params:,} params, test accuracy {teacher_acc:.4f}",
        f"student {STUDENT}: {student_params:,} params "
        f"({student_params / teacher_params:.1%} of the teacher); {SUBSET} labelled training "
        f"digits, {EPOCHS} epochs, T=4, alpha=0.7",
        "seed  alone   distilled",
        *(f"{seed:>4}  {a:.4f}  {d:.4f}" for seed, a, d in rows),
        f"mean  {alone_acc.mean():.4f}  {taught_acc.mean():.4f}  "
        f"(distilled better on {int((taught_acc > alone_acc).sum())} of {len(rows)} seeds)",
    ]
    print("\n".join(lines))
    assert student_params <= teacher_params / 4
    assert taught_acc.mean() >= alone_acc.mean()
