"""Int8 quantization of ONNX models with ONNX Runtime's quantizer.

This module owns the ``quantize`` pipeline stage: it takes an fp32 ONNX artifact and returns an
int8 one, static (QDQ format, calibrated on user data) or dynamic (weights only). Every step that
ONNX Runtime's tooling can fail at has a fallback or an edgeship error that names the step:

1. the model is read and, if its opset is older than :data:`sdk.onnx_tools.MIN_QUANT_OPSET`,
   upgraded (ORT's QDQ per-channel quantization needs opset 13);
2. ORT's pre-processing (symbolic shape inference, graph optimization, ONNX shape inference) runs,
   retried without symbolic shape inference, then without optimization, then skipped;
3. calibration streams the data one batch at a time (ORT's strided calibration), so memory holds
   one batch of activations whatever the size of the calibration set;
4. the quantized model is loaded and run by the runtime the board uses, and compared with the fp32
   model on the same inputs; a node the runtime refuses is excluded and quantization retried.

Each fallback is logged and listed in the returned artifact's ``details["fallbacks"]``.

Only the operators in :data:`DEFAULT_OP_TYPES` are quantized unless ``op_types`` says otherwise:
the ones that hold the weights and do the arithmetic (and the activations ORT folds into them).
Quantizing every operator ORT can (``op_types=None``) also puts element-wise math, reductions
and normalisations on int8 grids, which broke or degraded real models (magika, silero-vad,
PaddleOCR) while adding little speed.

The check in step 4 is in ``details["check"]``: the worst per-sample cosine similarity of the
outputs with fp32's and the largest absolute error, on calibration samples when there are any,
else on generated random inputs (which only shows that the model runs). Below
:data:`CHECK_MIN_COSINE` on real data, a warning is logged. ORT's own printing and logging
during quantization is sent to this module's logger at INFO level (``edgeship -v`` shows it).
With ``calibration_cache`` (a directory), static calibration's activation ranges are kept
there in ONNX Runtime's JSON calibration cache, one file per (fp32 model, calibration data,
calibration method, operator types, batch size, ONNX Runtime version): another quantization of
the same model and data (a re-run, per-channel on or off, other excluded nodes) loads the
ranges instead of running the model over the data again. ``details["calibration_cache"]`` says
whether it was a hit. See docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from device_agent.errors import RuntimeLoadError
from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource, load_dataset, sample_count, take_samples
from sdk.errors import ConfigError, DataError, ModelFormatError, QuantizationError

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec, TensorSpec
    from device_agent.runtime import ModelSession

__all__ = [
    "CHECK_MIN_COSINE",
    "DEFAULT_OP_TYPES",
    "CalibMethod",
    "QuantMode",
    "QuantizeConfig",
    "quantize",
]

log = logging.getLogger(__name__)

QuantMode = Literal["static", "dynamic"]
CalibMethod = Literal["minmax", "entropy", "percentile"]
IntType = Literal["int8", "uint8"]

_MODES = ("static", "dynamic")
_METHODS = ("minmax", "entropy", "percentile")
_INT_TYPES = ("int8", "uint8")

# A runtime refusal that names a node gets the node excluded and quantization retried; a model
# that still fails after this many exclusions has a deeper problem, reported as an error.
_MAX_EXCLUSION_RETRIES = 4

# Samples used to check that the quantized model runs (taken from the calibration data).
_CHECK_SAMPLES = 16

#: Operators quantized by default: those that carry weights and most of the arithmetic (Conv,
#: ConvTranspose, MatMul, Gemm; Gather for embedding tables; ORT's Attention, LSTM and
#: EmbedLayerNormalization, which only dynamic mode has kernels for). Each mode keeps the ones
#: it quantizes natively. Relu and Clip are left out: static QDQ folds them into the op before
#: them, which is faster on CNNs but broke silero-vad (speech decisions agreeing with fp32 on
#: 68% of chunks instead of 96%); optimize's "-all-ops" candidate gets that speed where it is
#: safe.
DEFAULT_OP_TYPES: tuple[str, ...] = (
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Gather",
    "Attention",
    "LSTM",
    "EmbedLayerNormalization",
)

#: Below this worst-sample cosine similarity with fp32 (on real inputs), quantize() warns.
CHECK_MIN_COSINE = 0.99


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    ``mode``: ``"static"`` calibrates activation ranges on data and stores weights and activations
    as int8 (QDQ format); ``"dynamic"`` stores int8 weights and quantizes activations at run time
    (no data needed; suits transformers and MLPs, not CNNs).
    ``method``: how static calibration picks activation ranges: ``"minmax"`` (observed range),
    ``"entropy"`` (KL-divergence threshold) or ``"percentile"`` (99.999th percentile).
    ``per_channel``: one weight scale per output channel, which keeps accuracy on convolutions.
    ``batch_size``: calibration batch size, which bounds calibration memory.
    ``max_calibration_samples``: use at most this many calibration samples (the first ones).
    ``exclude_nodes``: node names kept in float (names in the model or in its pre-processed
    form, whose fused nodes ORT renames); ``op_types``: quantize only these operator types
    (default :data:`DEFAULT_OP_TYPES`; ``None``: every type ORT can quantize, element-wise math
    and normalisations included, which often costs accuracy).
    ``activation_type``: uint8 by default: asymmetric uint8 activations with int8 weights (U8S8)
    are what ONNX Runtime's CPU kernels support best on both x86 and Arm, and they spend the whole
    range on non-negative post-ReLU activations.
    ``reduce_range``: 7-bit weights, for x86 CPUs without VNNI where 8-bit products can saturate.
    """

    mode: QuantMode = "static"
    method: CalibMethod = "minmax"
    per_channel: bool = True
    batch_size: int = 32
    max_calibration_samples: int | None = None
    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = DEFAULT_OP_TYPES
    weight_type: IntType = "int8"
    activation_type: IntType = "uint8"
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"quantization mode {self.mode!r} is not one of {list(_MODES)}")
        if self.method not in _METHODS:
            raise ConfigError(f"calibration method {self.method!r} is not one of {list(_METHODS)}")
        for name in ("weight_type", "activation_type"):
            if getattr(self, name) not in _INT_TYPES:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {list(_INT_TYPES)}"
                )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ConfigError(
                f"max_calibration_samples must be at least 1, got {self.max_calibration_samples}"
            )
        if isinstance(self.exclude_nodes, str) or isinstance(self.op_types, str):
            raise ConfigError("exclude_nodes and op_types take a tuple of names, not a string")
        # Lists (from a CLI or JSON) become tuples so the config stays hashable.
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))

    @property
    def recipe(self) -> str:
        suffix = "-all-ops" if self.op_types is None else ""
        if self.mode == "dynamic":
            return f"ort-dynamic-int8{suffix}"
        return f"ort-static-int8-qdq-{self.method}{suffix}"


def quantize(
    model: ModelArtifact | str | Path,
    calibration: DataSource | Dataset | None = None,
    *,
    out: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    calibration_cache: str | Path | None = None,
) -> ModelArtifact:
    """Quantize an ONNX model to int8 and write it to ``out``.

    ``calibration`` (an ``.npz`` path, a dict of arrays, an array, an iterable of input dicts or
    a :class:`~sdk.data.Dataset`) is required in static mode; in dynamic mode it is optional and
    only used to check the result (without it the check runs on generated random inputs, which
    shows the model runs but not how accurate it is). The returned artifact has been loaded and
    run by ONNX Runtime; ``details["check"]`` holds the comparison with fp32. ``calibration_cache``
    is a directory where static calibration ranges are cached and reused (module docstring);
    ``details["calibration_cache"]`` holds the file and whether it was a hit.

    Raises :class:`DataError` for calibration data that does not fit the model,
    :class:`ConfigError` for bad settings and :class:`QuantizationError` naming the failed step.
    """
    source = _source_artifact(model)
    target = Path(out)
    if target.suffix.lower() != ".onnx":
        raise ConfigError(f"{target.name}: the quantized model must be written to a .onnx file")
    if target.resolve() == source.path.resolve():
        raise ConfigError(f"{target}: writing the quantized model over its fp32 source is refused")

    data = _calibration_data(calibration, source.io, config)
    batch = _calibration_batch(source.io, config, data)
    fallbacks: list[str] = []
    cache = _cache_file(calibration_cache, source, data, config, batch)
    cache_hit = cache is not None and cache.is_file()
    with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as tmp_dir:
        tmp = Path(tmp_dir).resolve()
        proto = _read_model(source.path)
        prepared = _prepare(proto, tmp, fallbacks)
        _check_node_names(proto, prepared, config.exclude_nodes)
        excluded = _map_exclusions(config.exclude_nodes, prepared, fallbacks)
        for attempt in range(_MAX_EXCLUSION_RETRIES + 1):
            candidate = tmp / f"quantized-{attempt}.onnx"
            _run_quantizer(
                prepared,
                candidate,
                data,
                source.io,
                batch,
                config,
                excluded,
                fallbacks,
                cache=cache,
            )
            quantized_nodes = _count_quantized_nodes(candidate)
            if quantized_nodes == 0:
                raise QuantizationError(_nothing_quantized(prepared, config, excluded))
            try:
                quantized_io, check = _verify(candidate, source, data, batch)
                break
            except _RuntimeRefusal as refusal:
                nodes = _nodes_behind(refusal.node, prepared) if refusal.node else []
                nodes = [n for n in nodes if n not in excluded]
                if not nodes or attempt == _MAX_EXCLUSION_RETRIES:
                    where = f" at node {refusal.node!r}" if refusal.node else ""
                    raise QuantizationError(
                        f"{refusal.step}{where}: {refusal.message}; try excluding that node "
                        "(exclude_nodes) or dynamic mode"
                    ) from refusal.__cause__
                note = (
                    f"ONNX Runtime refused quantized node {refusal.node!r} ({refusal.message}); "
                    f"kept {nodes} in float and quantized again"
                )
                log.warning(note)
                fallbacks.append(note)
                excluded.extend(nodes)
        size_fp32 = source.size_bytes
        _publish(candidate, target)
    _warn_on_check(check, config)

    details: dict[str, Any] = {
        "mode": config.mode,
        "method": config.method if config.mode == "static" else None,
        "per_channel": config.per_channel,
        "weight_type": config.weight_type,
        "activation_type": config.activation_type if config.mode == "static" else None,
        "reduce_range": config.reduce_range,
        "calibration_samples": 0 if data is None else len(data),
        "calibration_batch_size": batch if config.mode == "static" else None,
        "excluded_nodes": excluded,
        "quantized_nodes": quantized_nodes,
        "op_types": None if config.op_types is None else list(config.op_types),
        "fallbacks": fallbacks,
        "source": str(source.path),
        "source_size_bytes": size_fp32,
        "size_ratio": target.stat().st_size / size_fp32 if size_fp32 else None,
        "check": check,
        "calibration_cache": None if cache is None else {"path": str(cache), "hit": cache_hit},
    }
    log.info(
        "quantized %s -> %s (%s, %d -> %d bytes, %d fallbacks)",
        source.path.name,
        target,
        config.recipe,
        size_fp32,
        target.stat().st_size,
        len(fallbacks),
    )
    return ModelArtifact(
        path=target,
        format="onnx",
        io=quantized_io,
        precision="int8",
        recipe=config.recipe,
        details=details,
    )


# --- inputs -------------------------------------------------------------------------------


def _source_artifact(model: ModelArtifact | str | Path) -> ModelArtifact:
    artifact = model if isinstance(model, ModelArtifact) else read_artifact(model)
    if artifact.format != "onnx":
        raise ConfigError(
            f"{artifact.path.name}: quantize() works on ONNX models; quantize TFLite exports "
            "with sdk.quantize_tflite"
        )
    if not artifact.path.is_file():
        raise ModelFormatError(f"model file not found: {artifact.path}")
    return artifact


def _calibration_data(
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


def _calibration_batch(io: IOSpec, config: QuantizeConfig, data: Dataset | None) -> int:
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


def _has_fixed_batch_spec(spec: TensorSpec) -> bool:
    return bool(spec.shape) and isinstance(spec.shape[0], int)


def _has_fixed_batch(io: IOSpec) -> bool:
    return any(_has_fixed_batch_spec(s) for s in io.inputs)


def _read_model(path: Path) -> Any:
    from sdk.onnx_tools import load_onnx

    try:
        return load_onnx(path)
    except ModelFormatError as exc:
        raise QuantizationError(f"reading the model: {exc}") from exc


def _check_node_names(proto: Any, prepared: Path, names: Sequence[str]) -> None:
    """Every excluded name must be a node of the model or of its pre-processed form (ORT's
    optimizer fuses nodes and names the results itself, e.g. ``mm/MatMulAddFusion``)."""
    if not names:
        return
    import onnx

    original = {n.name for n in proto.graph.node}
    processed = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node}
    unknown = [n for n in names if n not in original | processed]
    if unknown:
        sample = sorted(n for n in processed if n)[:8]
        raise ConfigError(
            f"exclude_nodes: neither the model nor its pre-processed form has a node named "
            f"{unknown[0]!r} (pre-processed node names look like {sample})"
        )


# --- preparation --------------------------------------------------------------------------


def _prepare(proto: Any, tmp: Path, fallbacks: list[str]) -> Path:
    """Upgrade an old opset and run ORT's pre-processing; return the model file to quantize."""
    import onnx

    from sdk.onnx_tools import MIN_QUANT_OPSET, opset_of, upgrade_opset

    opset = opset_of(proto)
    if 0 < opset < MIN_QUANT_OPSET:
        try:
            proto = upgrade_opset(proto, MIN_QUANT_OPSET)
        except ModelFormatError as exc:
            raise QuantizationError(f"opset upgrade: {exc}") from exc
        note = (
            f"upgraded the model from opset {opset} to {MIN_QUANT_OPSET} "
            "(ONNX Runtime's quantizer needs it for per-channel and QDQ quantization)"
        )
        log.info(note)
        fallbacks.append(note)
    raw = tmp / "model.onnx"
    try:
        onnx.save(proto, str(raw))
    except Exception as exc:  # ValueError for protos over 2 GB, OSError
        raise QuantizationError(
            f"opset upgrade: cannot save the upgraded model: {_first_line(exc)}"
        ) from exc
    prepared = _preprocess(raw, tmp, fallbacks)
    _flatten_gemm_bias(prepared)
    return prepared


def _flatten_gemm_bias(model: Path) -> None:
    """Give every Gemm a 1-D bias: ``(1, N)`` becomes ``(N,)``, which broadcasts the same way.

    ORT's optimizer fuses MatMul + Add into a Gemm that keeps the Add's ``(1, N)`` constant, and
    ORT's static quantizer (1.32) cannot adjust per-channel weight scales for a 2-D bias ("The
    truth value of an array with more than one element is ambiguous").
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = False
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        init = inits[node.input[2]]
        if len(init.dims) != 2 or init.dims[0] != 1 or uses.get(init.name, 0) != 1:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        flat = numpy_helper.to_array(init).reshape(-1)
        init.CopyFrom(numpy_helper.from_array(flat, init.name))
        changed = True
    if changed:
        onnx.save(proto, str(model))


_PREPROCESS_ATTEMPTS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("full", {}),
    ("without symbolic shape inference", {"skip_symbolic_shape": True}),
    (
        "without symbolic shape inference and graph optimization",
        {"skip_symbolic_shape": True, "skip_optimization": True},
    ),
)


def _preprocess(raw: Path, tmp: Path, fallbacks: list[str]) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    errors: list[str] = []
    for label, options in _PREPROCESS_ATTEMPTS:
        target = tmp / "preprocessed.onnx"
        try:
            # ORT's symbolic shape inference saves a debug model into the working directory
            # when it fails; keep that litter in our temporary directory.
            with _quiet(), _working_directory(tmp):
                quant_pre_process(str(raw), str(target), **options)
        except Exception as exc:  # symbolic shape inference and ORT's optimizer raise anything
            errors.append(f"{label}: {_first_line(exc)}")
            log.info("ONNX Runtime pre-processing (%s) failed: %s", label, _first_line(exc))
            continue
        if errors:
            note = f"pre-processing ran {label} because the full run failed ({errors[0]})"
            fallbacks.append(note)
            log.info(note)  # a harmless fallback: listed in details["fallbacks"], not alarming
        return target
    note = f"pre-processing skipped: it failed every way ({'; '.join(errors)})"
    fallbacks.append(note)
    log.warning(note)
    return raw


def _map_exclusions(names: Sequence[str], prepared: Path, fallbacks: list[str]) -> list[str]:
    """Node names to exclude in the pre-processed model.

    ORT's optimizer renames the nodes it fuses (``mm`` and ``add`` become
    ``mm/MatMulAddFusion``), so an excluded node that is gone is replaced by the fused nodes
    named after it, or reported when nothing carries its name.
    """
    if not names:
        return []
    import onnx

    present = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node]
    mapped: list[str] = []
    for name in names:
        if name in present:
            mapped.append(name)
            continue
        fused = [n for n in present if n.startswith(name + "/")]
        if fused:
            mapped.extend(fused)
            note = f"excluded node {name!r} was fused by pre-processing; excluded {fused} instead"
        else:
            note = f"excluded node {name!r} was removed by pre-processing (folded or fused)"
        log.warning(note)
        fallbacks.append(note)
    return mapped


# --- quantization -------------------------------------------------------------------------


class _BatchReader:
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


def _run_quantizer(
    model: Path,
    out: Path,
    data: Dataset | None,
    data_io: IOSpec,
    batch: int,
    config: QuantizeConfig,
    excluded: list[str],
    fallbacks: list[str],
    extra: dict[str, Any] | None = None,
    cache: Path | None = None,
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    op_types = _op_types_for(config)
    try:
        with _quiet():
            if config.mode == "dynamic":
                quantize_dynamic(
                    str(model),
                    str(out),
                    op_types_to_quantize=op_types,
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    weight_type=types[config.weight_type],
                    nodes_to_exclude=list(excluded),
                )
                return
            if data is None:  # _calibration_data guarantees data in static mode
                raise DataError("static quantization needs calibration data")
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }
            reader = _BatchReader(data, batch, _has_fixed_batch(data_io))
            if len(reader) == 0:
                raise DataError(f"calibration data: no complete batch of {batch} samples")
            quantize_static(
                str(model),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=types[config.activation_type],
                weight_type=types[config.weight_type],
                nodes_to_exclude=list(excluded),
                calibrate_method=methods[config.method],
                calibration_cache_path=None if cache is None else str(cache),
                # One batch per calibration step, ranges merged between steps. ORT's
                # CalibMaxIntermediateOutputs would be the obvious knob, but its MinMax
                # calibrator (1.32) clears the kept outputs without merging them, silently
                # calibrating on the last partial chunk only or raising "No data is collected"
                # (onnxruntime#18893), and the histogram calibrators ignore it.
                extra_options={"CalibStridedMinMax": 1, **(extra or {})},
            )
    except DataError:
        raise
    except Exception as exc:  # ORT's quantizer raises ValueError, KeyError, RuntimeError, ...
        if extra is None and _raised_in(exc, "_adjust_weight_scale_for_int32_bias"):
            note = (
                "ONNX Runtime could not adjust weight scales for an int32 bias "
                f"({_first_line(exc)}); quantized again without that adjustment"
            )
            log.warning(note)
            fallbacks.append(note)
            disable = {"QDQDisableWeightAdjustForInt32Bias": True}
            _run_quantizer(
                model, out, data, data_io, batch, config, excluded, fallbacks, disable, cache
            )
            return
        step = _failed_step(exc, config.mode)
        node = _node_in_message(str(exc), model)
        where = f" at node {node!r}" if node else ""
        raise QuantizationError(f"{step}{where}: {_first_line(exc)}") from exc


def _cache_file(
    directory: str | Path | None,
    source: ModelArtifact,
    data: Dataset | None,
    config: QuantizeConfig,
    batch: int,
) -> Path | None:
    """Where static calibration's ranges for this model, data and method are cached.

    The key hashes everything the ranges depend on: the fp32 model's bytes, the calibration
    samples (after ``max_calibration_samples``), the method, the operator types whose tensors
    are calibrated, the batch size (ranges are merged per batch) and ONNX Runtime's version.
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
            "op_types": _op_types_for(config),
            "batch": batch,
            "onnxruntime": onnxruntime.__version__,
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


def _op_types_for(config: QuantizeConfig) -> list[str] | None:
    """The operator types to hand ORT: the default ones this mode quantizes natively (static QDQ
    would wrap an LSTM or Attention in generic activation Q/DQ pairs), else what was asked."""
    if config.op_types is None:
        return None
    if config.op_types == DEFAULT_OP_TYPES:
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

        native = IntegerOpsRegistry if config.mode == "dynamic" else QDQRegistry
        return [t for t in DEFAULT_OP_TYPES if t in native]
    return list(config.op_types)


_QUANT_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
     "ConvInteger", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul", "QGemm",
     "QAttention", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul"}
)  # fmt: skip


# Operators that hold a model's weights: where its compute is.
_WEIGHT_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN",
     "EmbedLayerNormalization"}
)  # fmt: skip


def _walk(graph: Any, inside: bool = False) -> Iterator[tuple[Any, bool]]:
    """Every node of ``graph`` and of its subgraphs (If branches, Loop and Scan bodies), with
    whether it is inside a subgraph."""
    for node in graph.node:
        yield node, inside
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else []
            for sub in [*subgraphs, *attr.graphs]:
                yield from _walk(sub, True)


def _count_quantized_nodes(model: Path) -> int:
    """Nodes that quantize, dequantize or compute in integers, in subgraphs too."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return sum(1 for n, _ in _walk(graph) if n.op_type in _QUANT_OPS)


def _op_counts(graph: Any, *, inside: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node, nested in _walk(graph):
        if nested == inside:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _op_summary(counts: dict[str, int]) -> str:
    types = sorted(counts)
    return ", ".join(types[:12]) + (", ..." if len(types) > 12 else "")


def _nothing_quantized(prepared: Path, config: QuantizeConfig, excluded: list[str]) -> str:
    """Why ORT quantized nothing, and what to do about it."""
    import onnx

    graph = onnx.load(str(prepared), load_external_data=False).graph
    top = _op_counts(graph, inside=False)
    nested = _op_counts(graph, inside=True)
    compute = {op: n for op, n in nested.items() if op in _WEIGHT_OPS and op not in top}
    head = "quantization: ONNX Runtime quantized nothing in this model" + (
        f" after excluding {excluded}" if excluded else ""
    )
    if compute:
        holders = sorted({op for op in top if op in ("If", "Loop", "Scan")}) or ["control-flow"]
        found = ", ".join(f"{n} {op}" for op, n in sorted(compute.items()))
        return (
            f"{head}: its compute ({found}) is inside the subgraphs of {'/'.join(holders)} "
            f"nodes, which ONNX Runtime's quantizer leaves in float (the top-level graph holds "
            f"only {_op_summary(top)}). Quantize a version of the model without control flow: "
            "export it with the input the If tests fixed so that one branch is inlined, or "
            "fold the If on a constant condition (e.g. onnxsim with that input given)"
        )
    wanted = "every type ORT can" if config.op_types is None else ", ".join(config.op_types)
    hint = (
        "" if config.op_types is None else "; try op_types=None (CLI: --op-types all) to allow more"
    )
    return (
        f"{head} (its operators: {_op_summary(top)}; quantized types: {wanted}); ORT quantizes "
        f"float32 tensors only, so the int8 model would be the fp32 one{hint}"
    )


def _raised_in(exc: BaseException, function: str) -> bool:
    return any(frame.name == function for frame in traceback.extract_tb(exc.__traceback__))


def _failed_step(exc: BaseException, mode: str) -> str:
    """Name the quantizer's step from where the exception was raised."""
    files = [Path(frame.filename).name for frame in traceback.extract_tb(exc.__traceback__)]
    if "calibrate.py" in files:
        return "calibration"
    if mode == "dynamic":
        return "dynamic quantization"
    return "static quantization (inserting QDQ nodes)"


# --- verification -------------------------------------------------------------------------


class _RuntimeRefusal(Exception):
    """ONNX Runtime could not load or run a quantized model (internal: retried or converted)."""

    def __init__(self, step: str, message: str, node: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.node = node


def _verify(
    candidate: Path, source: ModelArtifact, data: Dataset | None, batch: int
) -> tuple[IOSpec, dict[str, Any]]:
    """Load and run the quantized model next to the fp32 one; return its I/O and a summary."""
    from device_agent.runtime import open_session

    try:
        session = open_session(candidate)
    except RuntimeLoadError as exc:
        raise _RuntimeRefusal(
            "loading the quantized model", _strip_prefix(str(exc)), _node_in_message(str(exc))
        ) from exc
    try:
        reference = open_session(source.path)
    except RuntimeLoadError as exc:
        raise QuantizationError(f"checking the quantized model: the fp32 model: {exc}") from exc
    feed, kind, expected = _check_inputs(reference, data, batch)
    try:
        outputs = session.run(feed)
    except RuntimeLoadError as exc:
        raise _RuntimeRefusal(
            "running the quantized model", _strip_prefix(str(exc)), _node_in_message(str(exc))
        ) from exc
    return session.io, _compare(session.io, outputs, expected, kind, sample_count(feed))


def _check_inputs(
    reference: ModelSession, data: Dataset | None, batch: int
) -> tuple[dict[str, np.ndarray], str, list[np.ndarray]]:
    """Inputs for the check and the fp32 outputs on them: calibration samples when there are
    any, else generated inputs the fp32 model accepts."""
    fixed = _has_fixed_batch(reference.io)
    if data is not None and (not fixed or len(data) >= batch):
        count = batch if fixed else min(len(data), _CHECK_SAMPLES)
        feed = dict(data.head(count).inputs)
        try:
            return feed, "calibration", reference.run(feed)
        except RuntimeLoadError as exc:
            raise DataError(f"calibration data: the fp32 model cannot run on it: {exc}") from exc
    errors = []
    for size in (8, 32, 1, 224):
        feed = _generated_feed(reference.io.inputs, size)
        try:
            # A size the model refuses makes ORT log an error line of its own: keep it quiet.
            with _native_stderr_to_log():
                return feed, "generated", reference.run(feed)
        except RuntimeLoadError as exc:
            errors.append(str(exc))
    raise QuantizationError(
        "checking the quantized model: could not generate inputs the fp32 model accepts "
        f"({errors[0]}); pass calibration data so the check can use real inputs"
    )


def _generated_feed(specs: Sequence[TensorSpec], free_size: int) -> dict[str, np.ndarray]:
    """Inputs matching ``specs``: batch 2 on a dynamic first axis, ``free_size`` on other
    dynamic axes; ones for integer inputs (a valid token id, index and mask everywhere)."""
    rng = np.random.default_rng(0)
    feed = {}
    for spec in specs:
        shape = tuple(
            d if isinstance(d, int) else (2 if axis == 0 else free_size)
            for axis, d in enumerate(spec.shape)
        )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feed[spec.name] = np.ones(shape, dtype=dtype)
    return feed


def _compare(
    io_spec: IOSpec, got: list[np.ndarray], expected: list[np.ndarray], kind: str, samples: int
) -> dict[str, Any]:
    """The check's figures: the worst per-sample cosine over the outputs, the largest error.

    An output with one value per sample is compared as one vector across the samples: a
    per-sample cosine of a single value is only its sign, and would hide a broken model.
    """
    from sdk.evaluate import cosine_rows, max_abs_difference

    summary: dict[str, Any] = {"inputs": kind, "samples": samples}
    if kind == "generated":
        summary["note"] = (
            "generated random inputs: shows the int8 model runs, not how accurate it is; "
            "pass calibration data for a real check"
        )
    worst_cos: float | None = None
    worst_abs = 0.0
    for spec, q, f in zip(io_spec.outputs, got, expected, strict=False):
        q = np.asarray(q)
        f = np.asarray(f)
        if q.dtype.kind != "f" or q.shape != f.shape:
            continue
        if not np.isfinite(q).all() and np.isfinite(f).all():
            raise QuantizationError(
                f"checking the quantized model: output {spec.name!r} holds NaN or infinity where "
                "the fp32 model's does not; try another calibration method or dynamic mode"
            )
        if q.size:
            per_sample = q.ndim >= 1 and q.size > len(q)
            if per_sample:
                cos = float(cosine_rows(q, f).min())
            else:
                cos = float(cosine_rows(q.reshape(1, -1), f.reshape(1, -1))[0])
            worst_cos = cos if worst_cos is None else min(worst_cos, cos)
        worst_abs = max(worst_abs, max_abs_difference(q, f))
    summary["cosine_min"] = worst_cos
    summary["max_abs_error"] = worst_abs
    return summary


def _warn_on_check(check: dict[str, Any], config: QuantizeConfig) -> None:
    cos = check.get("cosine_min")
    if check.get("inputs") != "calibration" or cos is None or cos >= CHECK_MIN_COSINE:
        return
    if config.op_types is None:
        hint = "quantize only the default op_types"
    elif config.mode == "dynamic":
        hint = "exclude sensitive nodes, or use static mode"
    else:
        hint = "exclude sensitive nodes, or try another calibration method"
    log.warning(
        "the int8 model's outputs differ from fp32's on calibration data: worst-sample cosine "
        "%.4g (below %.2f); %s",
        cos,
        CHECK_MIN_COSINE,
        hint,
    )


# --- finding nodes in ORT's messages ------------------------------------------------------

_NODE_PATTERNS = (
    re.compile(r"node with name '([^']+)'"),
    re.compile(r"[Nn]ode\. Name:'([^']+)'"),
    re.compile(r"In Node, \(\"([^\"]+)\""),
    re.compile(r"Node \(([^)]+)\)"),
    re.compile(r"node ([^\s,:]+) of type"),
)


def _node_in_message(message: str, model: Path | None = None) -> str | None:
    """The node an ORT error message names, if any.

    With ``model``, quoted names in the message are also matched against the model's node and
    tensor names (a tensor stands for the node that produces it).
    """
    for pattern in _NODE_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    if model is None:
        return None
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # the model is only read to improve the message
        return None
    producers = {o: n.name for n in proto.graph.node for o in n.output}
    names = {n.name for n in proto.graph.node}
    for quoted in re.findall(r"['\"]([^'\"]+)['\"]", message):
        if quoted in names:
            return str(quoted)
        producer = producers.get(quoted)
        if producer:
            return str(producer)
    return None


def _nodes_behind(failed: str, prepared: Path) -> list[str]:
    """The nodes of the model being quantized that produced quantized node ``failed``.

    ORT names quantized nodes after their source (``conv`` -> ``conv_quant``) and QDQ nodes
    after their tensor (``x_DequantizeLinear``): the longest source node name that prefixes the
    failed name wins, else the nodes that consume the tensor a Q/DQ node wraps.
    """
    import onnx

    source = onnx.load(str(prepared), load_external_data=False)
    names = [n.name for n in source.graph.node if n.name]
    if failed in names:
        return [failed]
    prefixed = [n for n in names if failed.startswith(n)]
    if prefixed:
        return [max(prefixed, key=len)]
    for suffix in ("_DequantizeLinear", "_QuantizeLinear"):
        if suffix in failed:
            tensor = failed.split(suffix)[0]
            return [n.name for n in source.graph.node if n.name and tensor in n.input]
    return []


# --- helpers ------------------------------------------------------------------------------


class _RelayFilter(logging.Filter):
    """Drops ORT's records logged on the root logger after re-logging them on this module's
    logger at INFO level."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.info("onnxruntime: %s", record.getMessage())
        return False


class _RelayHandler(logging.Handler):
    """The same for records of the ``onnxruntime.*`` loggers."""

    def emit(self, record: logging.LogRecord) -> None:
        log.info("onnxruntime: %s", record.getMessage())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep ORT's quantization tools off the terminal: what they print (stdout, and native
    stderr) and log (``logging.warning`` on the root logger, e.g. "Axis 1 is out-of-range for
    weight ...") goes to this module's logger at INFO level (``edgeship -v`` shows it)."""
    root = logging.getLogger()
    ort_logger = logging.getLogger("onnxruntime")
    relay = _RelayFilter()
    relay_handler = _RelayHandler()
    # logging.warning() on a root logger without handlers would install one (basicConfig).
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(relay)
    ort_logger.addHandler(relay_handler)
    propagate = ort_logger.propagate
    ort_logger.propagate = False
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), _native_stderr_to_log():
            yield
    finally:
        ort_logger.propagate = propagate
        ort_logger.removeHandler(relay_handler)
        root.removeFilter(relay)
        if placeholder is not None:
            root.removeHandler(placeholder)
        text = buffer.getvalue().strip()
        if text:
            log.debug("onnxruntime.quantization: %s", text)


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 (ORT's ``[E:onnxruntime ...]``
    lines) and log it at INFO level instead of showing it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, closed)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.info("onnxruntime (native): %s", text[-4000:])


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _publish(candidate: Path, target: Path) -> None:
    """Copy the verified model to ``target`` without leaving a half-written file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(candidate, partial)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise QuantizationError(f"writing {target}: {exc}") from exc


_ORT_NOISE = (
    re.compile(r"^ONNX Runtime failed to run the model: "),
    re.compile(r"^ONNX Runtime cannot load [^:]+: "),
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"Load model from \S+ failed:\s*"),
)


def _strip_prefix(message: str) -> str:
    """ORT's message without the wrapper text and temporary paths that mean nothing to a user."""
    for pattern in _ORT_NOISE:
        message = pattern.sub("", message)
    return message.strip()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = next(ln for ln in text.splitlines() if ln.strip())
    return line[:400]
