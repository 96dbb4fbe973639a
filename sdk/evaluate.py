"""Model quality on a dataset: accuracy, and agreement with a reference model.

:func:`evaluate` runs an ONNX or TFLite model through the same sessions the board uses
(:func:`device_agent.runtime.open_session`) and returns a :class:`Quality`: top-1 accuracy when
the data has labels and, against a reference model (usually the fp32 original of an int8
candidate), top-1 agreement, per-sample cosine similarity of the outputs and the mean and largest
absolute difference. :func:`accuracy_drop` turns two qualities into the single number a budget
checks, and :func:`drop_basis` says which measurement it came from.

How an output is scored depends on its shape:

* ``(samples, classes)`` with two or more classes: top-1 is the arg-max over the classes;
* ``(samples, 1)`` or ``(samples,)``, one score per sample: a binary decision, ``score >
  threshold``. The threshold is 0.5 when the scores (the reference's when there is one, else
  the model's) all lie in [0, 1], i.e. look like probabilities, and 0 otherwise (logits); pass
  ``threshold=`` to choose. A per-sample cosine of a single value is only its sign, so these
  outputs get no cosine: the mean and largest absolute errors measure them instead;
* ``(samples, steps, classes)`` with *sequence labels* (a 2-D ``labels`` array, one padded
  row of class ids per sample): a CTC model's text, greedy-decoded, scored as character
  accuracy (:mod:`sdk.ctc`); agreement is then the share of samples whose text matches the
  reference's;
* anything else (sequences, maps, embeddings of rank 3 and up): no top-1; cosine and errors
  only, and :func:`accuracy_drop` falls back to ``1 - cosine_mean``. One flattened cosine
  lets an output's largest values speak for all of it (a detector's pixel coordinates for
  its [0, 1] scores): give such models labelled eval data, or check them with a task metric.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from device_agent.errors import InputError, RuntimeLoadError
from sdk.errors import ConfigError, DataError

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec
    from device_agent.runtime import ModelSession
    from sdk.artifact import ModelArtifact
    from sdk.data import Dataset

__all__ = [
    "Quality",
    "accuracy_drop",
    "cosine_rows",
    "drop_basis",
    "evaluate",
    "max_abs_difference",
]

DropBasis = Literal["accuracy", "agreement", "cosine"]


@dataclass(frozen=True)
class Quality:
    """What :func:`evaluate` measured; a field is ``None`` when it could not be measured.

    ``accuracy`` needs labels (character accuracy with sequence labels); ``agreement`` (share
    of samples whose top-1 class, binary decision or decoded text matches the reference's)
    needs a reference and a ``(samples, classes)`` or ``(samples, 1)`` output, or sequence
    labels; ``cosine_*`` (not for one value per sample), ``mean_abs_error`` and
    ``max_abs_error`` compare each sample's output with the reference's.
    ``decision_threshold`` is the threshold used for a one-score-per-sample output.
    """

    samples: int
    accuracy: float | None = None
    agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    decision_threshold: float | None = None

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
    threshold: float | None = None,
) -> Quality:
    """Run ``model`` over ``data`` in batches and measure its quality.

    ``output`` picks the output to score, by index or name; the reference's output is found by
    the same name when it has one, else by the same index. Models whose batch axis is fixed run
    one fixed-size batch at a time (the last one padded). ``threshold`` is the decision
    threshold for a one-score-per-sample output (default: see the module docstring).

    A dynamically quantized model computes its activation scales on each run's whole batch, so
    its outputs depend on what else is in the batch: evaluate it with ``batch_size=1`` to score
    what a board that runs one sample at a time gets.
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
    labels = data.labels
    name = session.io.outputs[index].name
    correct = agree = 0
    cosines: list[np.ndarray] = []
    scores: list[np.ndarray] = []  # one-score-per-sample outputs: the model's scores...
    ref_scores: list[np.ndarray] = []  # ...and the reference's, thresholded at the end
    max_abs = abs_sum = 0.0
    abs_count = 0
    kind: str | None = None
    start = 0
    text = _Text(labels) if labels is not None and labels.ndim == 2 else None
    for feed in data.batches(run.fixed or batch_size):
        got = run(feed)
        n = got.shape[0]
        kind = _batch_kind(got, labels, text, (name, data.name), start, _samples(feed))
        if kind == "binary":
            scores.append(got.reshape(n).astype(np.float64))
        elif text is None and labels is not None:
            correct += int((got.argmax(axis=1) == labels[start : start + n]).sum())
        if run_ref is not None:
            ref = run_ref(feed)
            if ref.shape != got.shape:
                raise DataError(
                    f"the model's output {name!r} has shape {got.shape} "
                    f"but the reference's has {ref.shape}; they cannot be compared"
                )
            if kind == "binary":
                ref_scores.append(ref.reshape(n).astype(np.float64))
            else:
                cosines.append(cosine_rows(got, ref))
                if kind == "classes":
                    agree += int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
                elif text is not None:
                    agree += text.agree(ref)
            max_abs = max(max_abs, max_abs_difference(got, ref))
            abs_sum += _abs_sum(got, ref)
            abs_count += got.size
        start += n

    total = len(data)
    quality = Quality(samples=total)
    cut = None
    if kind == "binary":
        cut, correct, agree = _binary_decisions(scores, ref_scores, labels, threshold)
        quality = replace(quality, decision_threshold=cut)
    if text is not None:
        quality = replace(quality, accuracy=text.accuracy())
    elif labels is not None:
        quality = replace(quality, accuracy=correct / total)
    if ref_session is not None:
        cos = np.concatenate(cosines) if cosines else np.zeros(0)
        quality = replace(
            quality,
            agreement=agree / total if kind in ("classes", "binary", "sequence") else None,
            cosine_mean=float(cos.mean()) if cos.size else None,
            cosine_min=float(cos.min()) if cos.size else None,
            max_abs_error=max_abs,
            mean_abs_error=abs_sum / abs_count if abs_count else None,
        )
    return quality


def _batch_kind(
    got: np.ndarray,
    labels: np.ndarray | None,
    text: _Text | None,
    names: tuple[str, str],
    start: int,
    samples: int,
) -> str:
    """How a batch's output is scored (``classes``, ``binary``, ``sequence`` or ``other``);
    labels are checked against it on the first batch, sequence labels scored as it goes.
    ``names``: the output's and the data's."""
    output, data_name = names
    if text is not None:
        text.score(got, start, samples, output, data_name)
        return "sequence"
    kind = _output_kind(got)
    if kind == "classes" and labels is None and _EMBEDDING_NAME.search(output):
        return "other"  # an embedding's largest coordinate means nothing: compare vectors
    if labels is not None and kind == "other":
        raise DataError(
            f"the data has labels, but the model's output {output!r} has shape {got.shape}; "
            "top-1 accuracy needs a (samples, classes) output or one score per sample"
        )
    if labels is not None and start == 0:
        _check_eval_labels(labels, kind, got, data_name, output)
    return kind


class _Text:
    """Character accuracy of a CTC output against sequence labels, batch by batch."""

    def __init__(self, labels: np.ndarray) -> None:
        from sdk.ctc import rows

        self.truth = rows(labels)
        self.labels = labels
        self.edits = 0
        self.read: list[np.ndarray] = []  # the texts of the batch last scored

    def score(self, got: np.ndarray, start: int, samples: int, output: str, data_name: str) -> None:
        from sdk.ctc import check_sequence_labels, edit_distance, greedy_decode

        if got.ndim == 3 and got.shape[0] != samples:
            raise DataError(
                f"the model's output {output!r} has shape {got.shape} for a batch of {samples} "
                f"samples: sequence labels score a CTC output laid out (samples, steps, "
                f"classes); a time-major (steps, samples, classes) output needs a Transpose "
                f"(perm 1, 0, 2) at the end of the model"
            )
        if got.ndim != 3:
            raise DataError(
                f"eval data ({data_name}) has sequence labels (a 2-D 'labels' array), which "
                f"score a CTC output of shape (samples, steps, classes); the model's output "
                f"{output!r} has shape {got.shape}"
            )
        if start == 0:
            check_sequence_labels(self.labels, got.shape[2], f"eval data ({data_name})")
        self.read = greedy_decode(got)
        for i, seq in enumerate(self.read):
            self.edits += edit_distance(seq, self.truth[start + i])

    def agree(self, ref: np.ndarray) -> int:
        """How many texts of the batch just scored match the reference's."""
        from sdk.ctc import greedy_decode

        pairs = zip(self.read, greedy_decode(ref), strict=True)
        return sum(int(np.array_equal(a, b)) for a, b in pairs)

    def accuracy(self) -> float:
        length = sum(t.size for t in self.truth)
        return max(0.0, 1.0 - self.edits / length) if length else 0.0


def _check_eval_labels(
    labels: np.ndarray, kind: str, got: np.ndarray, data_name: str, output: str
) -> None:
    """Labels outside the output's classes would score 0% for fp32 and every candidate alike,
    and a drop of 0 passes any quality gate: refuse them."""
    from sdk.data import check_labels

    if kind == "binary":
        where = (
            f"eval data ({data_name}), for the model's output {output!r} of one score "
            "per sample (a binary decision: binary labels are 0 and 1)"
        )
        check_labels(labels, 2, where)
    else:
        check_labels(labels, got.shape[1], f"eval data ({data_name})")


def _binary_decisions(
    scores: list[np.ndarray],
    ref_scores: list[np.ndarray],
    labels: np.ndarray | None,
    threshold: float | None,
) -> tuple[float, int, int]:
    """A one-score-per-sample output thresholded: the cut, the decisions matching the labels
    (checked to be 0 and 1 on the first batch) and those matching the reference's."""
    pooled = ref_scores or scores
    cut = _decision_threshold(np.concatenate(pooled) if pooled else np.zeros(0), threshold)
    decided = np.concatenate(scores) > cut
    correct = 0 if labels is None else int((decided == (labels == 1)).sum())
    agree = int((decided == (np.concatenate(ref_scores) > cut)).sum()) if ref_scores else 0
    return cut, correct, agree


def accuracy_drop(candidate: Quality, baseline: Quality) -> float:
    """How much worse ``candidate`` is than ``baseline``, as a fraction (0.01 = one point).

    Uses accuracy when both have it (negative when the candidate is better), else
    ``1 - agreement`` of the candidate with its reference, else, for outputs without classes
    (sequences, maps), ``1 - cosine_mean`` with the reference: a continuous stand-in that
    :func:`drop_basis` names so a report can say what the number is.
    """
    basis = drop_basis(candidate, baseline)
    if basis == "accuracy":
        assert candidate.accuracy is not None and baseline.accuracy is not None
        drop = baseline.accuracy - candidate.accuracy
    elif basis == "agreement":
        assert candidate.agreement is not None
        drop = 1.0 - candidate.agreement
    else:
        assert candidate.cosine_mean is not None
        drop = 1.0 - candidate.cosine_mean
    # Rounded so that 2 of 200 samples is 1% exactly, not 1.0000000000000009% (which a
    # 'drop<=1%' budget line would fail).
    return round(drop, 12)


def drop_basis(candidate: Quality, baseline: Quality) -> DropBasis:
    """Which measurement :func:`accuracy_drop` uses for these two qualities.

    Raises :class:`ConfigError` when there is none: the candidate was evaluated without labels
    (or its baseline was) and without a reference model to compare with.
    """
    if candidate.accuracy is not None and baseline.accuracy is not None:
        return "accuracy"
    if candidate.agreement is not None:
        return "agreement"
    if candidate.cosine_mean is not None:
        return "cosine"
    raise ConfigError(
        "cannot compute an accuracy drop: the candidate's quality has no accuracy to compare "
        "(both models need labelled data for that) and no comparison with a reference model; "
        "evaluate the candidate with reference= its fp32 original"
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


# Output names that say "this is a vector, not class scores" (the detectors use the same cue).
_EMBEDDING_NAME = re.compile(r"embed|pool|feature|hidden|encod|represent|sentence", re.IGNORECASE)


def _output_kind(out: np.ndarray) -> Literal["classes", "binary", "other"]:
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        return "binary"
    if out.ndim == 2:
        return "classes"
    return "other"


def _decision_threshold(scores: np.ndarray, given: float | None) -> float:
    """``given``, else 0.5 for probabilities (every score in [0, 1]), else 0 (logits)."""
    if given is not None:
        return float(given)
    if scores.size and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0:
        return 0.5
    return 0.0


def _abs_sum(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(diff.sum()) if not np.isnan(diff).any() else float("inf")


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
        self.fixed = session.io.fixed_batch
        self.one_by_one = False

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        from sdk.data import sample_count, take_samples

        n = sample_count(feed)
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
            part = take_samples(feed, start, start + chunk)
            real = sample_count(part)
            if real < chunk:
                # Repeat the last sample to fill the fixed batch; the padding is sliced off.
                part = {
                    k: v if v.ndim == 0 else np.concatenate([v, np.repeat(v[-1:], chunk - real, 0)])
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


def _samples(feed: Any) -> int:
    from sdk.data import sample_count

    return sample_count(feed)
