"""Tensor shapes in the bundle manifest: ``shape`` and ``sample_shape`` decoded and bounded.

A manifest's ``shape`` mixes fixed sizes and symbolic names (``"batch"``, ``"height"``); the
agent cannot run a model on a name, so for its self-test (``edgeship-agent check``, the
hot-swap test before a deploy is accepted, a candidate's benchmark) it needs a concrete shape.
An input may carry one in ``sample_shape``: the shape of one calibration sample at batch 1,
written by the SDK when the input has a symbolic dimension past the batch axis. Without it a
symbolic dimension becomes 1, which a detector whose spatial size is free cannot run on.

Both are bounded here so that no manifest can make a board allocate more than
:data:`MAX_TENSOR_ELEMENTS` elements for one input (see ``docs/bundle.md``, Limits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from device_agent.contracts.errors import BundleError

__all__ = ["MAX_DIM", "MAX_RANK", "MAX_TENSOR_ELEMENTS", "parse_sample_shape", "parse_shape"]

MAX_RANK = 16  # the outlier events' input summaries carry at most 16 dimensions
MAX_DIM = 2**31 - 1
# The fixed dimensions of one tensor may hold at most this many elements (2**26: 256 MiB of
# float32), and so may all the inputs together: the agent builds inputs of these shapes for its
# self-test, and a board has a few GiB at most. A sample shape obeys the same limits.
MAX_TENSOR_ELEMENTS = 2**26


def parse_shape(raw: Any, where: str, name: Callable[[Any, str], str]) -> tuple[int | str, ...]:
    """``shape``: at most :data:`MAX_RANK` sizes (ints in ``0..MAX_DIM``) or names (checked by
    ``name``), whose fixed sizes hold at most :data:`MAX_TENSOR_ELEMENTS` elements."""
    if not isinstance(raw, list):
        raise BundleError(f"{where}: expected a list, got {type(raw).__name__}")
    if len(raw) > MAX_RANK:
        raise BundleError(f"{where}: {len(raw)} dimensions; at most {MAX_RANK} are supported")
    shape: list[int | str] = []
    for i, d in enumerate(raw):
        if isinstance(d, bool) or not isinstance(d, int | str):
            raise BundleError(f"{where}[{i}]: expected an int or a name, got {_short(d)}")
        shape.append(name(d, f"{where}[{i}]") if isinstance(d, str) else _size(d, f"{where}[{i}]"))
    elements = math.prod(d for d in shape if isinstance(d, int))
    if elements > MAX_TENSOR_ELEMENTS:
        raise BundleError(
            f"{where}: {raw} holds {elements} elements, over the limit of "
            f"{MAX_TENSOR_ELEMENTS} per tensor; no board can hold such a tensor: check "
            'the shape (use a name such as "batch" for a dynamic dimension)'
        )
    return tuple(shape)


def parse_sample_shape(raw: Any, shape: Sequence[int | str], where: str) -> tuple[int, ...]:
    """``sample_shape`` for an input of ``shape``: one int per dimension, equal to ``shape``'s
    where that is fixed, 1 on a symbolic first (batch) axis, at least 1 elsewhere, and at most
    :data:`MAX_TENSOR_ELEMENTS` elements in all."""
    if not isinstance(raw, list):
        raise BundleError(f"{where}: expected a list of ints, got {type(raw).__name__}")
    if len(raw) != len(shape):
        raise BundleError(
            f"{where}: {len(raw)} dimensions, but shape {list(shape)} has {len(shape)}"
        )
    sample: list[int] = []
    for i, (d, dim) in enumerate(zip(raw, shape, strict=True)):
        at = f"{where}[{i}]"
        if isinstance(d, bool) or not isinstance(d, int):
            raise BundleError(f"{at}: expected an int, got {_short(d)}")
        _size(d, at)
        if isinstance(dim, int) and d != dim:
            raise BundleError(f"{at}: {d}, but the shape fixes this dimension at {dim}")
        if isinstance(dim, str) and i == 0 and d != 1:
            raise BundleError(f"{at}: {d}; a sample is one item, so the batch axis must be 1")
        if isinstance(dim, str) and d < 1:
            raise BundleError(f"{at}: {d}; a sample's free dimension must be at least 1")
        sample.append(d)
    elements = math.prod(sample)
    if elements > MAX_TENSOR_ELEMENTS:
        raise BundleError(
            f"{where}: {sample} holds {elements} elements, over the limit of "
            f"{MAX_TENSOR_ELEMENTS} per tensor; the agent builds an input of this shape"
        )
    return tuple(sample)


def _size(d: int, where: str) -> int:
    if d < 0:
        raise BundleError(f"{where}: negative size {d}")
    if d > MAX_DIM:
        raise BundleError(f"{where}: size {_short(d)} is over the limit {MAX_DIM}")
    return d


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, ASCII only (safe in any message)."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
