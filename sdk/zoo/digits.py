"""A small CNN for scikit-learn's bundled 8x8 handwritten digits (``load_digits``).

Trains in seconds on a CPU and reaches about 98% test accuracy. Inputs are float32 images of
shape (N, 1, 8, 8) scaled to [0, 1]; the output is (N, 10) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DigitsSplits",
    "add_outlier_channels",
    "build_digits_cnn",
    "load_digits_splits",
    "train_digits_cnn",
]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class DigitsSplits:
    """Train / calibration / test splits of ``load_digits``, images as (N, 1, 8, 8) float32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_splits(seed: int = 0, holdout_class: int | None = None) -> DigitsSplits:
    """Split the 1,797 digits 60/15/25 (stratified). ``holdout_class`` removes one class from
    train and calibration (for out-of-distribution experiments); it stays in test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    x_train, x_cal, y_train, y_cal = train_test_split(
        x_rest, y_rest, test_size=0.2, random_state=seed, stratify=y_rest
    )
    if holdout_class is not None:
        keep_tr, keep_cal = y_train != holdout_class, y_cal != holdout_class
        x_train, y_train = x_train[keep_tr], y_train[keep_tr]
        x_cal, y_cal = x_cal[keep_cal], y_cal[keep_cal]
    return DigitsSplits(x_train, y_train, x_cal, y_cal, x_test, y_test)


def build_digits_cnn(width: int = 16, hidden: int = 128) -> torch.nn.Module:
    """conv(width) -> conv(2*width) -> maxpool -> fc(hidden) -> fc(10)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def train_digits_cnn(
    splits: DigitsSplits | None = None,
    *,
    seed: int = 0,
    epochs: int = 30,
    width: int = 16,
    hidden: int = 128,
    model: Any = None,
) -> tuple[torch.nn.Module, float]:
    """Train the CNN (or ``model``) with Adam; return it in eval mode and its test accuracy."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    data = splits or load_digits_splits(seed)
    net = model if model is not None else build_digits_cnn(width, hidden)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(data.x_test)).argmax(1).numpy()
    return net, float((pred == data.y_test).mean())


def add_outlier_channels(
    model: torch.nn.Module, channels: tuple[int, ...] = (0, 1), scale: float = 300.0
) -> torch.nn.Module:
    """Give the first convolution's activations a few huge channels, without changing what the
    model computes (in place; returns ``model``).

    Output ``channels`` of the first convolution (weights and bias) are multiplied by
    ``scale`` and the second convolution's weights that read them are divided by it. ReLU
    commutes with a positive scale, so the fp32 model's outputs are unchanged up to rounding,
    but its first activation tensor now holds a few channels ``scale`` times larger than the
    rest: the outlier features that per-tensor activation quantization handles badly (one
    scale for the whole tensor leaves the ordinary channels less than one int8 step once
    ``scale`` is a few hundred). For :func:`build_digits_cnn`'s layout.
    """
    import torch
    from torch import nn

    layers = list(model.children())
    first, second = (layers[0], layers[2]) if len(layers) > 2 else (None, None)
    if not isinstance(first, nn.Conv2d) or not isinstance(second, nn.Conv2d):
        raise TypeError("add_outlier_channels expects build_digits_cnn's layout (conv, relu, conv)")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    bad = [c for c in channels if not 0 <= c < first.out_channels]
    if bad:
        raise ValueError(f"channels {bad} are out of range for {first.out_channels} channels")
    with torch.no_grad():
        for c in channels:
            first.weight[c] *= scale
            if first.bias is not None:
                first.bias[c] *= scale
            second.weight[:, c] /= scale
    return model
