"""The inputs a benchmark times when none are given: generated from the model's I/O spec (see
:mod:`sdk.bench`'s docstring for the values and how symbolic dimensions are resolved), or the
given ones checked against it."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from device_agent.contracts.bundle import IOSpec, TensorSpec
from sdk.errors import ConfigError

__all__ = ["INT_INPUT_HIGH", "SEQUENCE_DEFAULT", "make_inputs"]

SEQUENCE_DEFAULT = 128
INT_INPUT_HIGH = 100
_SEQUENCE_WORDS = frozenset(
    {
        "seq",
        "seqlen",
        "sequence",
        "len",
        "length",
        "token",
        "tokens",
        "time",
        "timesteps",
        "step",
        "steps",
    }
)


def make_inputs(
    io: IOSpec,
    *,
    batch_size: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs that fit ``io`` (see the module docstring for values and shapes)."""
    given = dict(shapes or {})
    unknown = sorted(set(given) - set(io.input_names))
    if unknown:
        raise ConfigError(
            f"shapes names inputs {unknown} the model does not have; its inputs "
            f"are {list(io.input_names)}"
        )
    bound: dict[str, int] = {}
    for spec in io.inputs:
        if spec.name in given:
            _bind_given(spec, tuple(given[spec.name]), bound)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in io.inputs:
        shape = (
            tuple(given[spec.name])
            if spec.name in given
            else _resolve_shape(spec, batch_size, bound)
        )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, INT_INPUT_HIGH, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ConfigError(
                f"input {spec.name!r}: cannot generate {spec.dtype} values; pass inputs= explicitly"
            )
    return out


def _bind_given(spec: TensorSpec, shape: tuple[int, ...], bound: dict[str, int]) -> None:
    if len(shape) != len(spec.shape):
        raise ConfigError(
            f"shapes[{spec.name!r}] = {shape} has rank {len(shape)}, but the model's "
            f"input has shape {_fmt_spec_shape(spec)}"
        )
    for dim, size in zip(spec.shape, shape, strict=True):
        if isinstance(dim, int) and dim != size:
            raise ConfigError(
                f"shapes[{spec.name!r}] = {shape} does not fit the model's fixed "
                f"shape {_fmt_spec_shape(spec)}"
            )
        if isinstance(dim, str) and bound.setdefault(dim, size) != size:
            raise ConfigError(f"shapes give dimension {dim!r} two sizes, {bound[dim]} and {size}")


def _resolve_shape(spec: TensorSpec, batch_size: int, bound: Mapping[str, int]) -> tuple[int, ...]:
    shape: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in bound:
            shape.append(bound[dim])
        elif axis == 0:
            shape.append(batch_size)
        elif _is_sequence_dim(dim, spec.name, axis):
            shape.append(SEQUENCE_DEFAULT)
        else:
            example = tuple(1 if isinstance(d, str) else d for d in spec.shape)
            raise ConfigError(
                f"input {spec.name!r} has shape {_fmt_spec_shape(spec)}: cannot choose a size "
                f"for dimension {dim!r} (axis {axis}); give it with "
                f"BenchConfig(shapes={{{spec.name!r}: {example}}}) with real sizes"
            )
    return tuple(shape)


def _is_sequence_dim(dim: str, input_name: str, axis: int) -> bool:
    """Whether a dimension's own name reads as a sequence length (``seq_len``, ``num_tokens``).
    Placeholders the runtime invents for unnamed axes (``dim2``, ``<input>_dim2``) do not,
    even when the input's name would."""
    if dim in (f"dim{axis}", f"{input_name}_dim{axis}"):
        return False
    return any(word in _SEQUENCE_WORDS for word in re.split(r"[^a-z0-9]+", dim.lower()))


def _fmt_spec_shape(spec: TensorSpec) -> str:
    return "(" + ", ".join(str(d) for d in spec.shape) + ")"
