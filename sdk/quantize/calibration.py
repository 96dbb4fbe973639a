"""Static calibration's data and its cache: the calibration samples as one ``Dataset``, the batches
ONNX Runtime's calibrator reads one at a time (so memory holds one batch of activations), and the
file where the activation ranges are kept for the next quantization of the same model and data."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import Dataset, DataSource, load_dataset, take_samples
from sdk.errors import DataError, QuantizationError
from sdk.quantize.config import (
    QuantizeConfig,
)
from sdk.quantize.fusions import REWRITES

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec
from sdk.quantize.config import op_types_for

# The logger docs/quantization.md names, shared by the ONNX Runtime quantization modules.
log = logging.getLogger("sdk.quantize")


def calibration_data(
    calibration: DataSource | Dataset | None, io: IOSpec, config: QuantizeConfig
) -> Dataset | None:
    if calibration is None:
        if config.mode == "static":
            raise DataError(
                "static quantization needs calibration data: pass --calibration (an .npz keyed by "
                "input name, or a dict of arrays) or use dynamic mode (--mode dynamic)"
            )
        return None
    # A Dataset is re-validated: it may have been loaded for another model.
    source = dict(calibration.inputs) if isinstance(calibration, Dataset) else calibration
    data = load_dataset(source, io, what="calibration data")
    if config.max_calibration_samples is not None and len(data) > config.max_calibration_samples:
        data = data.head(config.max_calibration_samples)
    return data


def calibration_batch(io: IOSpec, config: QuantizeConfig, data: Dataset | None) -> int:
    """The batch size the model accepts: ``config.batch_size`` unless the batch axis is fixed."""
    fixed = {d for d in (s.shape[0] for s in io.inputs if s.shape) if isinstance(d, int)}
    if not fixed:
        return config.batch_size
    if len(fixed) > 1:
        raise QuantizationError(
            f"reading the model: its inputs fix different batch sizes {sorted(fixed)}; "
            "re-export it with a dynamic batch axis"
        )
    size = fixed.pop()
    if data is not None and config.mode == "static" and len(data) < size:
        raise DataError(
            f"calibration data: the model's batch axis is fixed at {size} but the data holds "
            f"only {len(data)} samples"
        )
    return size


class BatchReader:
    """ORT's ``CalibrationDataReader`` protocol over a dataset, one batch per ``get_next``.

    ``__len__`` and ``set_range`` count batches, so ORT's strided calibration
    (``CalibStridedMinMax=1``) calibrates one batch at a time and merges the results.
    """

    def __init__(self, data: Dataset, batch_size: int, fixed: bool) -> None:
        self._data = data
        self._size = batch_size
        n = len(data)
        # A fixed batch axis cannot take a short last batch: drop the remainder.
        self._count = n // batch_size if fixed else -(-n // batch_size)
        self._next = 0
        self._end = self._count

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = start_index
        self._end = min(end_index, self._count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        lo = self._next * self._size
        self._next += 1
        return take_samples(self._data.inputs, lo, lo + self._size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def cache_file(
    directory: str | Path | None,
    source: ModelArtifact,
    data: Dataset | None,
    config: QuantizeConfig,
    batch: int,
) -> Path | None:
    """Where static calibration's ranges for this model, data and method are cached.

    The key hashes everything the ranges depend on: the fp32 model's bytes, the calibration
    samples (after ``max_calibration_samples``), the method, the operator types whose tensors
    are calibrated, the batch size (ranges are merged per batch), ONNX Runtime's version and
    whether (and by which rules) :mod:`sdk.quantize.fusions` rewrote the graph.
    Excluded nodes, per-channel weights and the integer types do not change the activation
    ranges, so the variants that differ only in those share one file. None (no caching) with
    an ONNX Runtime whose ``quantize_static`` has no ``calibration_cache_path`` (older releases).
    """
    if directory is None or config.mode != "static" or data is None:
        return None
    import inspect

    import onnxruntime
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        log.info("ONNX Runtime %s has no calibration cache: calibrating", onnxruntime.__version__)
        return None

    digest = hashlib.sha256()
    with source.path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    model_hash = digest.hexdigest()
    digest = hashlib.sha256()
    for name in sorted(data.inputs):
        array = np.ascontiguousarray(data.inputs[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    data_hash = digest.hexdigest()
    key = json.dumps(
        {
            "model": model_hash,
            "data": data_hash,
            "method": config.method,
            "op_types": op_types_for(config),
            "batch": batch,
            "onnxruntime": onnxruntime.__version__,
            # the rewrites rename and remove tensors: ranges of an unfused graph lack theirs
            "fusions": REWRITES if config.fuse else None,
        },
        sort_keys=True,
    )
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = Path(directory) / f"calibration-{config.method}-{name}.json"
    if path.is_file():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            log.warning("calibration cache %s is unreadable: calibrating again", path)
            path.unlink(missing_ok=True)
    return path
