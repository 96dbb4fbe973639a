"""Knowledge distillation: train a small student to imitate a larger teacher's outputs.

The student's loss on a batch is Hinton et al.'s (2015)::

    loss = alpha * T^2 * KL( softmax(teacher / T) || softmax(student / T) )
         + (1 - alpha) * cross_entropy(student, labels)

The temperature ``T`` softens both distributions so the student learns how the teacher ranks
the wrong classes too (the "dark knowledge"); ``T^2`` keeps the soft term's gradients on the
same scale as the hard term's whatever ``T`` is. The teacher runs once, in eval mode, over the
training inputs before training starts (its logits do not change), so distillation costs about
what training the student alone costs. Any ``nn.Module`` with ``(N, classes)`` logits works as
teacher or student, including a pruned student from :func:`sdk.prune.prune_structured`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk.errors import ConfigError
from sdk.training import TrainData, TrainHistory, as_tensors, torch_threads, train_loop

if TYPE_CHECKING:
    import torch

__all__ = ["distill", "distillation_loss"]


def distill(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    data: TrainData,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 30,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    eval_data: TrainData | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> tuple[torch.nn.Module, TrainHistory]:
    """Train ``student`` (in place) on ``data = (x_train, y_train)`` to match ``teacher``.

    ``alpha`` weighs the soft (teacher) term against the hard-label cross-entropy: 1 learns
    from the teacher alone, 0 is ordinary training. Batches are shuffled with ``seed`` exactly
    as :func:`sdk.prune.fine_tune` shuffles them, so a student trained with ``alpha=0`` or
    with ``fine_tune`` on the same data and seed is the fair baseline. ``eval_data`` adds
    per-epoch accuracy to the history; ``progress`` shows a tqdm bar; ``threads`` torch
    threads are used while training. Returns the student (in eval mode) and the history.
    """
    import torch

    if not isinstance(teacher, torch.nn.Module) or not isinstance(student, torch.nn.Module):
        raise ConfigError("teacher and student must both be torch.nn.Module instances")
    if teacher is student:
        raise ConfigError("the teacher and the student are the same model")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    with torch_threads(threads):
        x, y = as_tensors(data, what="distillation data")
        soft_targets = _teacher_logits(teacher, x, batch_size=max(batch_size, 256))
        with torch.no_grad():
            student.eval()
            probe = student(x[:2])
        if not isinstance(probe, torch.Tensor) or probe.shape[1:] != soft_targets.shape[1:]:
            got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ConfigError(
                f"the student's output {got} does not match the teacher's "
                f"{tuple(soft_targets.shape)}; both must return (N, classes) logits"
            )

        def batch_loss(outputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return distillation_loss(
                outputs, soft_targets[idx], y[idx], temperature=temperature, alpha=alpha
            )

        history = train_loop(
            student,
            x,
            batch_loss,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            weight_decay=weight_decay,
            eval_data=eval_data,
            progress=progress,
            desc="distill",
        )
    return student, history


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """``alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``, with
    the KL averaged over the batch (``batchmean``, the true KL divergence per sample)."""
    from torch.nn import functional

    hard = functional.cross_entropy(student_logits, labels)
    if alpha == 0.0:
        return hard
    soft = functional.kl_div(
        functional.log_softmax(student_logits / temperature, dim=1),
        functional.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    loss: torch.Tensor = alpha * temperature**2 * soft + (1.0 - alpha) * hard
    return loss


def _teacher_logits(teacher: torch.nn.Module, x: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    import torch

    was_training = teacher.training
    teacher.eval()
    parts: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out = teacher(x[start : start + batch_size])
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    raise ConfigError(
                        f"the teacher returns {got}; distillation needs (N, classes) logits"
                    )
                parts.append(out.float())
    finally:
        teacher.train(was_training)
    return torch.cat(parts)
