"""Model quality on a dataset: accuracy, and agreement with a reference model.

:func:`evaluate` runs an ONNX or TFLite model through the same sessions the board uses
(:func:`device_agent.runtime.open_session`) and returns a :class:`Quality`: top-1 accuracy when
the data has labels and, against a reference model (usually the fp32 original of an int8
candidate), top-1 agreement, per-sample cosine similarity of the outputs and the largest absolute
difference. :func:`accuracy_drop` turns two qualities into the single number a budget checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.errors import InputError, RuntimeLoadError
from sdk.errors import ConfigError, DataError

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec
    from device_agent.runtime import ModelSession
    from sdk.artifact import ModelArtifact
    from sdk.data import Dataset

__all__ = ["Quality", "accuracy_drop", "cosine_rows", "evaluate", "max_abs_difference"]


@dataclass(frozen=True)
class Quality:
    """What :func:`evaluate` measured; a field is ``None`` when it could not be measured.

    ``accuracy`` needs labels; ``agreement`` (share of samples whose top-1 class matches the
    reference's) needs a reference and a ``(samples, classes)`` output; ``cosine_*`` and
    ``max_abs_error`` compare each sample's output with the reference's.
    """

    samples: int
    accuracy: float | None = None
    agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    model: ModelArtifact | str | Path,
    data: Dataset,
    *,
    reference: ModelArtifact | str | Path | None = None,
    output: int | str = 0,
    batch_size: int = 64,
    threads: int | None = None,
) -> Quality:
    """Run ``model`` over ``data`` in batches and measure its quality.

    ``output`` picks the output to score, by index or name; the reference's output is found by
    the same name when it has one, else by the same index. Models whose batch axis is fixed run
    one fixed-size batch at a time (the last one padded).
    """
    from device_agent.runtime import open_session

    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    session = open_session(_path_of(model), threads=threads)
    index = _output_index(session.io, output, what="model")
    ref_session = None
    ref_index = 0
    if reference is not None:
        ref_session = open_session(_path_of(reference), threads=threads)
        ref_index = _reference_index(ref_session.io, output, index)

    run = _Runner(session, index, "model")
    run_ref = None if ref_session is None else _Runner(ref_session, ref_index, "reference")
    correct = agree = 0
    cosines: list[np.ndarray] = []
    max_abs = 0.0
    labels = data.labels
    two_d = False
    start = 0
    for feed in data.batches(run.fixed or batch_size):
        got = run(feed)
        n = got.shape[0]
        if labels is not None:
            correct += int((_top1(got, session.io, index) == labels[start : start + n]).sum())
        if run_ref is not None:
            ref = run_ref(feed)
            if ref.shape != got.shape:
                raise DataError(
                    f"the model's output {session.io.outputs[index].name!r} has shape {got.shape} "
                    f"but the reference's has {ref.shape}; they cannot be compared"
                )
            two_d = got.ndim == 2
            if two_d:
                agree += int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
            cosines.append(cosine_rows(got, ref))
            max_abs = max(max_abs, max_abs_difference(got, ref))
        start += n

    total = len(data)
    quality = Quality(samples=total)
    if labels is not None:
        quality = replace(quality, accuracy=correct / total)
    if ref_session is not None:
        cos = np.concatenate(cosines) if cosines else np.zeros(0)
        quality = replace(
            quality,
            agreement=agree / total if two_d else None,
            cosine_mean=float(cos.mean()) if cos.size else None,
            cosine_min=float(cos.min()) if cos.size else None,
            max_abs_error=max_abs,
        )
    return quality


def accuracy_drop(candidate: Quality, baseline: Quality) -> float:
    """How much worse ``candidate`` is than ``baseline``, as a fraction (0.01 = one point).

    Uses accuracy when both have it (negative when the candidate is better), else
    ``1 - agreement`` of the candidate with its reference.
    """
    if candidate.accuracy is not None and baseline.accuracy is not None:
        return baseline.accuracy - candidate.accuracy
    if candidate.agreement is not None:
        return 1.0 - candidate.agreement
    raise ConfigError(
        "cannot compute an accuracy drop: evaluate both models on labelled data, or evaluate the "
        "candidate against a reference model with a (samples, classes) output"
    )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (axis 0) of ``a`` and ``b``, flattened per sample.

    Two all-zero samples count as identical (1.0); a zero against a non-zero as 0.0.
    """
    x = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    y = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.einsum("ij,ij->i", x, y)
    denom = nx * ny
    both_zero = (nx == 0) & (ny == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ``|a - b|``; infinite when either holds NaN where the other does not."""
    if a.size == 0:
        return 0.0
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    if np.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def _path_of(model: ModelArtifact | str | Path) -> Path:
    if isinstance(model, str | Path):
        return Path(model)
    return model.path


def _output_index(io: IOSpec, output: int | str, *, what: str) -> int:
    names = list(io.output_names)
    if isinstance(output, str):
        if output not in names:
            raise ConfigError(f"the {what} has no output {output!r}; its outputs are {names}")
        return names.index(output)
    if not -len(names) <= output < len(names):
        raise ConfigError(
            f"the {what} has {len(names)} outputs ({names}); output {output} is out of range"
        )
    return output % len(names)


def _reference_index(io: IOSpec, output: int | str, index: int) -> int:
    if isinstance(output, str) and output in io.output_names:
        return io.output_names.index(output)
    if index >= len(io.outputs):
        raise ConfigError(
            f"the reference has {len(io.outputs)} outputs ({list(io.output_names)}); "
            f"it has no output {output!r} to compare with"
        )
    return index


def _fixed_batch(session: ModelSession) -> int | None:
    """The batch size baked into the model, or ``None`` when the first axis is dynamic."""
    sizes = {s.shape[0] for s in session.io.inputs if s.shape and isinstance(s.shape[0], int)}
    return min(sizes) if sizes else None


class _Runner:
    """Runs one session on batches of any size and returns one output for the real rows.

    A model with a fixed batch axis gets chunks of exactly that size (the last one padded);
    a model whose spec says the batch is dynamic but whose runtime refuses a batch falls back
    to one sample at a time.
    """

    def __init__(self, session: ModelSession, index: int, what: str) -> None:
        self.session = session
        self.index = index
        self.what = what
        self.fixed = _fixed_batch(session)
        self.one_by_one = False

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(feed.values())))
        chunk = 1 if self.one_by_one else (self.fixed or n)
        if chunk == n:
            try:
                return self._run(feed)
            except RuntimeLoadError:
                if n == 1 or self.fixed is not None:
                    raise
                self.one_by_one = True
                chunk = 1
        parts = []
        for start in range(0, n, chunk):
            part = {k: v[start : start + chunk] for k, v in feed.items()}
            real = len(next(iter(part.values())))
            if real < chunk:
                # Repeat the last sample to fill the fixed batch; the padding is sliced off.
                part = {
                    k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)])
                    for k, v in part.items()
                }
            parts.append(self._run(part)[:real])
        return np.concatenate(parts)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        from device_agent.runtime import check_feed

        try:
            checked = check_feed(self.session.io, feed)
        except InputError as exc:
            raise DataError(f"eval data does not fit the {self.what}: {exc}") from exc
        return self.session.run(checked)[self.index]


def _top1(out: np.ndarray, io: IOSpec, index: int) -> np.ndarray:
    if out.ndim != 2:
        raise DataError(
            f"the data has labels, but the model's output {io.outputs[index].name!r} has shape "
            f"{out.shape}; top-1 accuracy needs a (samples, classes) output"
        )
    top: np.ndarray = out.argmax(axis=1)
    return top
