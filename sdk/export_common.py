"""What the exporters (and pruning) share: the example inputs as a tuple of tensors, a foreign
exception as one clean line for an :class:`~sdk.errors.ExportError`, and example batches of
other sizes (at least two samples, so an exporter cannot specialise the batch axis to 1; another
size, to check the batch is dynamic)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sdk.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["at_least_two", "example_tuple", "one_line", "other_batch"]

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch's exporter colours its messages


def at_least_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """torch.export specialises a size-1 axis to the constant 1, so a batch of one cannot be
    traced as dynamic; a batch of one is traced as two copies instead."""
    if all(t.dim() for t in inputs) and inputs[0].shape[0] == 1:
        return other_batch(inputs)
    return inputs


def example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors (one tensor is a tuple of one), refused with a
    ConfigError when it is anything else: export and pruning accept the same loose form."""
    import torch

    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, Sequence) or not items:
        raise ConfigError("example_inputs must be a tensor or a non-empty tuple of tensors")
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise ConfigError(f"example_inputs[{i}] is a {type(item).__name__}, not a torch.Tensor")
    return tuple(items)


def one_line(exc: BaseException) -> str:
    text = ANSI.sub("", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    name = type(exc).__name__
    return f"{name}: {first[:300]}" if first else name


def other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs at another batch size: the first sample alone, or the sample twice."""
    import torch

    if inputs[0].shape[0] > 1:
        return tuple(t[:1] for t in inputs)
    return tuple(torch.cat([t, t]) for t in inputs)
