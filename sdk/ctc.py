"""Character accuracy of a CTC sequence model (a text-line recognizer such as PP-OCR's rec).

A CTC model outputs ``(samples, steps, classes)`` scores; its text is read by greedy decoding:
the best class of each step, repeats collapsed, the blank class (index :data:`BLANK`, 0, as
PaddleOCR, PyTorch's ``CTCLoss`` and most CTC recognizers number it) dropped. Eval data for such
a model carries *sequence labels*: a 2-D integer ``labels`` array, one row per sample, holding
the class indices of its text (``1..classes-1``), padded at the end with :data:`PAD` (-1).

The score is corpus-level character accuracy, ``1 - (sum of edit distances) / (sum of label
lengths)``, floored at 0, so a budget's drop line reads in character points: the measure OCR
users judge a recognizer by, where a cosine of the score tensors is dominated by the blank
steps (PP-OCRv4 rec's all-ops int8 lost 4.61 points of cosine in (m) yet read 96.2% of 5,154
rendered characters right against fp32's 93.5%: docs/benchmarks.md (n)).
"""

from __future__ import annotations

import numpy as np

from sdk.errors import DataError

__all__ = ["BLANK", "PAD", "check_sequence_labels", "edit_distance", "greedy_decode", "rows"]

BLANK = 0
PAD = -1


def greedy_decode(scores: np.ndarray, blank: int = BLANK) -> list[np.ndarray]:
    """Each sample's decoded class sequence from ``(samples, steps, classes)`` scores."""
    best = np.asarray(scores).argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(row.shape[0], dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        seq = row[keep]
        out.append(seq[seq != blank])
    return out


def rows(labels: np.ndarray) -> list[np.ndarray]:
    """The label sequences of a padded 2-D ``labels`` array (padding removed)."""
    return [row[row != PAD] for row in np.asarray(labels)]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two integer sequences (insert, delete, substitute: 1)."""
    if a.size < b.size:
        a, b = b, a
    if b.size == 0:
        return int(a.size)
    previous = np.arange(b.size + 1)
    for i, x in enumerate(a.tolist(), start=1):
        current = np.empty_like(previous)
        current[0] = i
        substitute = previous[:-1] + (b != x)
        delete = previous[1:] + 1
        best = np.minimum(substitute, delete)
        for j in range(1, b.size + 1):  # insertion depends on the cell to the left
            current[j] = min(best[j - 1], current[j - 1] + 1)
        previous = current
    return int(previous[-1])


def check_sequence_labels(labels: np.ndarray, classes: int | None, where: str) -> None:
    """Refuse sequence labels that cannot be a CTC model's text: not integers, the blank (0)
    inside a text, values outside ``[1, classes)``, padding (-1) before the end of a row, no
    class id at all (every model would score 0%, and a drop of 0 passes any gate)."""
    if labels.dtype.kind != "i":
        raise DataError(
            f"{where}: sequence 'labels' must hold signed integer class ids (padded with "
            f"{PAD}), got {labels.dtype}"
        )
    padded = labels == PAD
    if (padded[:, :-1] & ~padded[:, 1:]).any():
        raise DataError(
            f"{where}: sequence 'labels' are padded with {PAD} at the end of each row only; "
            f"a row has {PAD} before a class id"
        )
    values = labels[~padded]
    if not values.size:
        raise DataError(
            f"{where}: sequence 'labels' hold no class ids (every row is padding): every model "
            "would score 0% on them, and a drop of 0 would pass any quality gate"
        )
    if (values == BLANK).any():
        raise DataError(
            f"{where}: sequence 'labels' hold {BLANK}, the CTC blank; a text's class ids are "
            f"1 to classes-1 (pad the end of a row with {PAD})"
        )
    high = classes if classes is not None else None
    bad = values[(values < 1) | ((values >= high) if high is not None else False)]
    if bad.size:
        span = f"[1, {high})" if high is not None else "[1, classes)"
        raise DataError(
            f"{where}: {bad.size} sequence label values are outside {span} (e.g. "
            f"{', '.join(str(v) for v in bad[:5].tolist())}); they must be class ids of the "
            "model's output, padded with -1"
        )
