"""Calibration and evaluation data: loading, validation against a model, batching.

Data comes as an ``.npz`` file keyed by input name (plus an optional ``labels`` array), a
mapping of input name to array, a bare array for single-input models, or an iterable of
input dicts. Arrays hold samples along their first axis. An input the model takes as a scalar
(rank 0, such as a sample rate) is given as one rank-0 value: a constant fed, unchanged, with
every sample and every batch. Every source is checked against the model's inputs before any
work starts, and mismatches raise :class:`DataError` naming the input, what was given and what
the model expects. Other layouts (a batch on an axis other than the first, per-sample values
for a scalar input) are refused with a :class:`DataError` that says so.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from device_agent.contracts.bundle import IOSpec, TensorSpec
from sdk.errors import DataError

__all__ = [
    "LABELS_KEY",
    "DataSource",
    "Dataset",
    "check_labels",
    "load_dataset",
    "read_npz",
    "sample_count",
    "take_samples",
]

LABELS_KEY = "labels"

DataSource = Union["Dataset", str, Path, np.ndarray, Mapping[str, Any], Iterable[Mapping[str, Any]]]


@dataclass(frozen=True)
class Dataset:
    """Validated samples for a model: one array per input (samples on axis 0), maybe labels.

    A rank-0 array is a constant for a scalar input: every batch carries it unchanged.
    """

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    name: str

    def __len__(self) -> int:
        return sample_count(self.inputs)

    @property
    def constants(self) -> list[str]:
        """The inputs given as one rank-0 value shared by every sample."""
        return [k for k, v in self.inputs.items() if v.ndim == 0]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of at most ``batch_size`` samples (the last may be smaller)."""
        n = len(self)
        for start in range(0, n, batch_size):
            yield take_samples(self.inputs, start, start + batch_size)

    def head(self, count: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(take_samples(self.inputs, 0, count), labels, self.name)


def sample_count(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in a feed: the first axis of its per-sample arrays (1 if all are constants)."""
    sizes = [int(np.shape(v)[0]) for v in feed.values() if np.ndim(v) > 0]
    return sizes[0] if sizes else 1


def take_samples(feed: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of every per-sample array; rank-0 constants as they are."""
    return {k: v if v.ndim == 0 else v[start:stop] for k, v in feed.items()}


def load_dataset(source: DataSource, io: IOSpec, *, what: str = "data") -> Dataset:
    """Read ``source`` and check it against the model's inputs ``io``.

    ``what`` ("calibration data", "eval data") prefixes every error message.
    """
    name = str(source) if isinstance(source, str | Path) else type(source).__name__
    if isinstance(source, Dataset):
        arrays = dict(source.inputs)
        if source.labels is not None:
            arrays[LABELS_KEY] = source.labels
        name = source.name
    elif isinstance(source, str | Path):
        arrays = read_npz(Path(source), what)
    elif isinstance(source, np.ndarray):
        if len(io.inputs) != 1:
            raise DataError(
                f"{what}: a bare array only works for single-input models; this model takes "
                f"{list(io.input_names)}, so pass a dict keyed by input name"
            )
        arrays = {io.inputs[0].name: source}
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
    elif isinstance(source, Iterable):
        arrays = _stack_iterable(source, io, what)
    else:
        raise DataError(
            f"{what}: unsupported source {type(source).__name__}; pass an .npz path, "
            "a dict of arrays, an array or an iterable of input dicts"
        )
    labels = arrays.pop(LABELS_KEY, None)
    inputs = _validate(arrays, io, what)
    n = sample_count(inputs)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim not in (1, 2) or labels.shape[0] != n:
            raise DataError(
                f"{what}: 'labels' must be a 1-D array with one class id per sample "
                f"({n}), or a 2-D array with one padded sequence per sample for a CTC "
                f"model, got shape {labels.shape}"
            )
        # The class count is the model output's, known here only when the output is
        # (batch, classes) with a fixed count; evaluate() checks against the output it scores.
        if labels.ndim == 2:
            from sdk.ctc import check_sequence_labels

            try:
                check_sequence_labels(labels, None, f"{what} ({name})")
            except DataError as exc:
                if labels.shape[1] != 1:
                    raise
                raise DataError(
                    f"{exc} (a ({n}, 1) 'labels' array is read as one-character texts; class "
                    "ids for a classifier are a 1-D array: labels.reshape(-1))"
                ) from None
        else:
            check_labels(labels, None, f"{what} ({name})")
    return Dataset(inputs=inputs, labels=labels, name=name)


def check_labels(labels: np.ndarray, classes: int | None, where: str) -> None:
    """Refuse labels that are not class ids in ``[0, classes)`` (``classes`` None: only
    ``>= 0``) with a :class:`DataError` that starts with ``where`` (the data and its file).

    Labels outside the model's classes match no prediction: both fp32 and every candidate
    would score 0% on them, and a drop of 0 would pass any quality gate.
    """
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{where}: 'labels' must hold integer class ids, got {labels.dtype}"
            + (f" (values such as {_first(labels)})" if labels.size else "")
        )
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and (classes is None or high < classes):
        return
    bad = labels[(labels < 0) | (labels >= (classes if classes is not None else high + 1))]
    span = f"[0, {classes})" if classes is not None else "[0, classes)"
    count = f" ({classes} classes: 0 to {classes - 1})" if classes is not None else ""
    raise DataError(
        f"{where}: {bad.size} of {labels.size} labels are outside {span}{count}: they range "
        f"from {low} to {high} (e.g. {_first(bad)}); labels must be class ids of the model's "
        "output"
    )


def _first(values: np.ndarray, count: int = 5) -> str:
    return ", ".join(str(v) for v in values.reshape(-1)[:count].tolist())


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (no pickles); ``what`` prefixes every error."""
    if not path.exists():
        raise DataError(f"{what}: file not found: {path}")
    if path.suffix.lower() != ".npz":
        raise DataError(
            f"{what}: {path.name} is not an .npz file; save arrays keyed by input "
            "name with numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what}: cannot read {path.name} as .npz: {exc}") from exc


def _stack_iterable(
    source: Iterable[Mapping[str, Any]], io: IOSpec, what: str
) -> dict[str, np.ndarray]:
    """Stack an iterable of per-sample or per-batch dicts along axis 0."""
    parts: dict[str, list[np.ndarray]] = {}
    constants: dict[str, np.ndarray] = {}
    count = 0
    for i, item in enumerate(source):
        if not isinstance(item, Mapping):
            raise DataError(
                f"{what}: item {i} is a {type(item).__name__}, expected a dict of "
                f"input name to array ({list(io.input_names)})"
            )
        for key, value in item.items():
            arr = np.asarray(value)
            spec = _spec(io, str(key))
            if spec is not None and not spec.shape and arr.ndim == 0:
                # A scalar input is one constant for the whole data set, not one per sample.
                first = constants.setdefault(str(key), arr)
                if not np.array_equal(first, arr):
                    raise DataError(
                        f"{what}: scalar input {key!r} changes between items ({first} in the "
                        f"first, {arr} in item {i}); a scalar input takes one value shared by "
                        "every sample"
                    )
                continue
            # A single sample (rank one less than the model's input) gets a batch axis.
            if spec is not None and arr.ndim == len(spec.shape) - 1:
                arr = arr[None, ...]
            parts.setdefault(str(key), []).append(arr)
        count += 1
    if count == 0:
        raise DataError(f"{what}: the iterable yielded no samples")
    try:
        return {**{k: np.concatenate(v, axis=0) for k, v in parts.items()}, **constants}
    except ValueError as exc:
        raise DataError(f"{what}: samples have inconsistent shapes: {exc}") from exc


def _spec(io: IOSpec, name: str) -> TensorSpec | None:
    return next((t for t in io.inputs if t.name == name), None)


def _validate(arrays: Mapping[str, np.ndarray], io: IOSpec, what: str) -> dict[str, np.ndarray]:
    names = list(io.input_names)
    missing = [n for n in names if n not in arrays]
    unknown = [k for k in arrays if k not in names]
    if missing:
        hint = f"; it has {unknown}" if unknown else ""
        raise DataError(
            f"{what}: missing input {missing[0]!r} (the model's inputs are {names}{hint})"
        )
    if unknown:
        raise DataError(
            f"{what}: unknown key {unknown[0]!r}; the model's inputs are {names} "
            f"(and '{LABELS_KEY}' for class labels)"
        )
    out: dict[str, np.ndarray] = {}
    counts = set()
    for spec in io.inputs:
        arr = np.asarray(arrays[spec.name])
        want = np.dtype(spec.dtype)
        same_kind = arr.dtype.kind == want.kind or (arr.dtype.kind in "iub" and want.kind in "iu")
        if arr.dtype.kind in "OUSV" or not same_kind:
            raise DataError(
                f"{what}: input {spec.name!r} has dtype {arr.dtype}, but the model "
                f"takes {spec.dtype}"
            )
        if not spec.shape:
            if arr.ndim != 0:
                raise DataError(
                    f"{what}: input {spec.name!r} is a scalar (rank 0) in the model, but the "
                    f"data gives shape {arr.shape}; give one rank-0 value (numpy.array(v)): "
                    "it is fed, unchanged, with every sample (per-sample values for a scalar "
                    "input are not supported: the model cannot take them as a batch)"
                )
            out[spec.name] = np.array(arr, dtype=want)  # ascontiguousarray would make it 1-D
            continue
        if arr.ndim != len(spec.shape):
            raise DataError(
                f"{what}: input {spec.name!r} has shape {arr.shape} (rank {arr.ndim}), "
                f"but the model takes rank {len(spec.shape)} {_fmt(spec)} with samples "
                "along the first axis"
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if axis > 0 and isinstance(dim, int) and dim != size:
                raise DataError(
                    f"{what}: input {spec.name!r} has shape {arr.shape}, but the model "
                    f"takes {_fmt(spec)} (axis {axis} must be {dim})"
                )
        if arr.shape[0] == 0:
            raise DataError(f"{what}: input {spec.name!r} holds no samples")
        counts.add(arr.shape[0])
        out[spec.name] = np.ascontiguousarray(arr.astype(want, copy=False))
    if len(counts) > 1:
        sizes = {k: v.shape[0] for k, v in out.items() if v.ndim}
        raise DataError(
            f"{what}: inputs hold different numbers of samples: {sizes}{_layout_hint(io)}"
        )
    return out


def _layout_hint(io: IOSpec) -> str:
    """What the data format supports, and which input looks batched on another axis."""
    hint = (
        "; every input holds samples along its first axis (a rank-0 input is one constant "
        "shared by every sample)"
    )
    for spec in io.inputs:
        dynamic_later = any(isinstance(d, str) for d in spec.shape[1:])
        if spec.shape and isinstance(spec.shape[0], int) and dynamic_later:
            hint += (
                f"; input {spec.name!r} {_fmt(spec)} has a fixed first axis and a dynamic one "
                "after it, so its batch is probably not on the first axis, which edgeship's "
                "data cannot express: re-export the model with that input's batch axis first"
            )
            break
    return hint


def _fmt(spec: TensorSpec) -> str:
    return "(" + ", ".join(str(d) for d in spec.shape) + ")"
