"""The small PyTorch training loop behind fine-tuning (:mod:`sdk.prune`) and distillation
(:mod:`sdk.distill`), and what it reports.

Both stages train a classifier on in-memory arrays ``(x, y)`` with Adam, in shuffled
mini-batches whose order depends only on ``seed``: a student distilled from a teacher and the
same student trained on labels alone see the same batches, so their difference is the loss.
Training runs with ``threads`` torch threads (one by default: small models train several times
faster single-threaded on a shared machine) and restores the caller's setting afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from sdk.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

__all__ = ["EpochRecord", "TrainData", "TrainHistory", "accuracy", "torch_threads"]

# (inputs, integer labels): numpy arrays or tensors, samples along the first axis.
TrainData: TypeAlias = "tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]"

# The loss of one batch: (model outputs, indices of the batch's samples) -> scalar tensor.
BatchLoss: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]"


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss, accuracy on the eval data (when given), wall time."""

    epoch: int
    loss: float
    accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class TrainHistory:
    """Every epoch of a training run, in order."""

    epochs: tuple[EpochRecord, ...]

    @property
    def final_loss(self) -> float | None:
        return self.epochs[-1].loss if self.epochs else None

    @property
    def final_accuracy(self) -> float | None:
        return self.epochs[-1].accuracy if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": [
                {"epoch": e.epoch, "loss": e.loss, "accuracy": e.accuracy, "seconds": e.seconds}
                for e in self.epochs
            ]
        }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (``None``: leave torch's setting alone)."""
    import torch

    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def accuracy(model: torch.nn.Module, data: TrainData, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``data``."""
    import torch

    x, y = as_tensors(data, what="eval data")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size])
            correct += int((out.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def as_tensors(data: TrainData, *, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as a float32 input tensor and an int64 label tensor, checked."""
    import torch

    if not isinstance(data, tuple | list) or len(data) != 2:
        raise DataError(f"{what}: expected a pair (inputs, labels), got {type(data).__name__}")
    x = torch.as_tensor(data[0])
    y = torch.as_tensor(data[1])
    if x.dim() < 1 or len(x) == 0:
        raise DataError(f"{what}: the inputs hold no samples (shape {tuple(x.shape)})")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(
            f"{what}: labels must be a 1-D array with one label per sample ({len(x)}), "
            f"got shape {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{what}: labels must hold integer class ids, got {y.dtype}")
    if x.dtype.is_floating_point:
        x = x.to(torch.float32)
    return x, y.to(torch.int64)


def check_schedule(epochs: int, lr: float, batch_size: int) -> None:
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def train_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    eval_data: TrainData | None,
    progress: bool,
    desc: str,
) -> TrainHistory:
    """Adam over shuffled mini-batches of ``x``; ``batch_loss(outputs, indices)`` is the loss."""
    import torch

    check_schedule(epochs, lr, batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    records: list[EpochRecord] = []
    with _epoch_bar(epochs, desc, progress) as bar:
        for epoch in range(epochs):
            started = time.perf_counter()
            model.train()
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = batch_loss(model(x[idx]), idx)
                torch.autograd.backward(loss)
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            acc = accuracy(model, eval_data) if eval_data is not None else None
            record = EpochRecord(epoch + 1, total / len(x), acc, time.perf_counter() - started)
            records.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {record.loss:.4f}" + ("" if acc is None else f", acc {acc:.4f}")
                )
    model.eval()
    return TrainHistory(tuple(records))


def epoch_callback_loop(
    model: torch.nn.Module,
    train_fn: Callable[[torch.nn.Module, int], float],
    *,
    epochs: int,
    eval_data: TrainData | None,
    progress: bool,
    desc: str,
) -> TrainHistory:
    """Call ``train_fn(model, epoch)`` once per epoch; it trains and returns the epoch's loss."""
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    records: list[EpochRecord] = []
    with _epoch_bar(epochs, desc, progress) as bar:
        for epoch in range(epochs):
            started = time.perf_counter()
            model.train()
            loss = float(train_fn(model, epoch))
            acc = accuracy(model, eval_data) if eval_data is not None else None
            records.append(EpochRecord(epoch + 1, loss, acc, time.perf_counter() - started))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4f}")
    model.eval()
    return TrainHistory(tuple(records))


@contextlib.contextmanager
def _epoch_bar(epochs: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled or epochs == 0:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
