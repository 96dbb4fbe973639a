"""Int8 quantization of ONNX models with ONNX Runtime's quantizer.

This module owns the ``quantize`` pipeline stage: it takes an fp32 ONNX artifact and returns an
int8 one, static (QDQ format, calibrated on user data) or dynamic (weights only). Every step that
ONNX Runtime's tooling can fail at has a fallback or an edgeship error that names the step:

1. the model is read and, if its opset is older than :data:`sdk.onnx_tools.MIN_QUANT_OPSET`,
   upgraded (ORT's QDQ per-channel quantization needs opset 13);
2. ORT's pre-processing (symbolic shape inference, graph optimization, ONNX shape inference) runs,
   retried without symbolic shape inference, then without optimization, then skipped; then
   (``fuse``) constant Mul/Add nodes after Convs are folded into them and written-out
   hard-swishes made ``x * HardSigmoid(x)`` (:mod:`sdk.quantize.fusions`, exact);
3. calibration streams the data one batch at a time (ORT's strided calibration), so memory holds
   one batch of activations whatever the size of the calibration set;
4. the quantized model is loaded and run by the runtime the board uses, and compared with the fp32
   model on the same inputs; a node the runtime refuses is excluded and quantization retried.
   With ``bias_correction``, each Conv's int32 bias is first moved to cancel the mean error its
   outputs show on the calibration data (:mod:`sdk.quantize.bias_correction`).

Each fallback is logged and listed in the returned artifact's ``details["fallbacks"]``, with
the rewrites of step 2.

Only the operators in :data:`DEFAULT_OP_TYPES` are quantized unless ``op_types`` says otherwise:
the ones that hold the weights and do the arithmetic (and the activations ORT folds into them).
Quantizing every operator ORT can (``op_types=None``) also puts element-wise math, reductions
and normalisations on int8 grids, which broke or degraded real models (magika, silero-vad,
PaddleOCR) while adding little speed.

The check in step 4 is in ``details["check"]``: the worst per-sample cosine similarity of the
outputs with fp32's and the largest absolute error, on calibration samples when there are any,
else on generated random inputs (which only shows that the model runs). Below
:data:`CHECK_MIN_COSINE` on real data, a warning is logged. ORT's own printing and logging
during quantization is sent to the ``sdk.quantize`` logger at INFO level (``edgeship -v`` shows it).
With ``calibration_cache`` (a directory), static calibration's activation ranges are kept
there in ONNX Runtime's JSON calibration cache, one file per (fp32 model, calibration data,
calibration method, operator types, batch size, ONNX Runtime version): another quantization of
the same model and data (a re-run, per-channel on or off, other excluded nodes) loads the
ranges instead of running the model over the data again. ``details["calibration_cache"]`` says
whether it was a hit. See docs/quantization.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource
from sdk.errors import ConfigError, DataError, ModelFormatError, QuantizationError
from sdk.quantize.calibration import BatchReader, cache_file, calibration_batch, calibration_data
from sdk.quantize.config import (
    QuantizeConfig,
    has_fixed_batch,
    op_types_for,
)
from sdk.quantize.ort_check import (
    MIXED_SCALE_RATIO,
    RuntimeRefusal,
    count_quantized_nodes,
    failed_step,
    mixed_scale_concats,
    node_in_message,
    nodes_behind,
    nothing_quantized,
    nothing_to_quantize,
    quantized_heads,
    raised_in,
    verify,
    warn_on_check,
)
from sdk.quantize.ort_log import (
    first_line,
    quiet,
    working_directory,
)

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec

__all__ = ["quantize"]

# The logger docs/quantization.md names, shared by the ONNX Runtime quantization modules.
log = logging.getLogger("sdk.quantize")


# A runtime refusal that names a node gets the node excluded and quantization retried; a model
# that still fails after this many exclusions has a deeper problem, reported as an error.
_MAX_EXCLUSION_RETRIES = 4


_DEFAULT_CONFIG = QuantizeConfig()


def quantize(
    model: ModelArtifact | str | Path,
    calibration: DataSource | Dataset | None = None,
    *,
    out: str | Path,
    config: QuantizeConfig = _DEFAULT_CONFIG,
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
    :class:`ConfigError` for bad settings and :class:`QuantizationError` naming the failed step,
    or, before calibrating, saying that there is nothing to quantize: no operator of the model
    has an int8 form (a scikit-learn tree ensemble or linear classifier).
    """
    source = _source_artifact(model)
    target = Path(out)
    if target.suffix.lower() != ".onnx":
        raise ConfigError(f"{target.name}: the quantized model must be written to a .onnx file")
    if target.resolve() == source.path.resolve():
        raise ConfigError(f"{target}: writing the quantized model over its fp32 source is refused")
    blocker = nothing_to_quantize(source.path, config.op_types)
    if blocker is not None:
        raise QuantizationError(f"{blocker}; the fp32 model is the one to ship")

    data = calibration_data(calibration, source.io, config)
    batch = calibration_batch(source.io, config, data)
    fallbacks: list[str] = []
    cache = cache_file(calibration_cache, source, data, config, batch)
    cache_hit = cache is not None and cache.is_file()
    with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as tmp_dir:
        tmp = Path(tmp_dir).resolve()
        proto = _read_model(source.path)
        prepared = _prepare(proto, tmp, fallbacks, fuse=config.fuse)
        if config.bias_correction:
            from sdk.quantize.bias_correction import prepare_for_correction

            prepare_for_correction(prepared)
        _check_node_names(proto, prepared, config.exclude_nodes)
        excluded = _map_exclusions(config.exclude_nodes, prepared, fallbacks)
        run = _Run(source, data, batch, config, fallbacks, cache)
        candidate, quantized_nodes, quantized_io, check = _quantize_until_it_runs(
            run, prepared, tmp, excluded
        )
        size_fp32 = source.size_bytes
        _publish(candidate, target)
    warn_on_check(check, config)

    details: dict[str, Any] = {
        "mode": config.mode,
        "method": config.method if config.mode == "static" else None,
        "per_channel": config.per_channel,
        "weight_type": config.weight_type,
        "activation_type": config.activation_type if config.mode == "static" else None,
        "reduce_range": config.reduce_range,
        "fuse": config.fuse,
        "calibration_samples": 0 if data is None else len(data),
        "calibration_batch_size": batch if config.mode == "static" else None,
        "excluded_nodes": excluded,
        "quantized_nodes": quantized_nodes,
        "op_types": None if config.op_types is None else list(config.op_types),
        "fallbacks": fallbacks,
        "source": str(source.details.get("converted_from") or source.path),
        "input_notes": list(source.details.get("notes") or []),
        "source_size_bytes": size_fp32,
        "size_ratio": target.stat().st_size / size_fp32 if size_fp32 else None,
        "check": check,
        "calibration_cache": None if cache is None else {"path": str(cache), "hit": cache_hit},
        "bias_correction": run.corrections or None,
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


@dataclass(frozen=True)
class _Run:
    """What one quantize() call quantizes with, handed to each attempt."""

    source: ModelArtifact
    data: Dataset | None
    batch: int
    config: QuantizeConfig
    fallbacks: list[str]
    cache: Path | None
    corrections: dict[str, Any] = field(default_factory=dict)  # bias correction's record


def _correct(prepared: Path, candidate: Path, run: _Run) -> dict[str, Any]:
    from sdk.quantize.bias_correction import correct_biases

    assert run.data is not None  # static mode always has calibration data
    fixed = has_fixed_batch(run.source.io)
    done = correct_biases(prepared, candidate, run.data, run.batch, fixed)
    log.info("bias correction: %s", done)
    return done


def _quantize_until_it_runs(
    run: _Run, prepared: Path, tmp: Path, excluded: list[str]
) -> tuple[Path, int, IOSpec, dict[str, Any]]:
    """Quantize, then load and run the result; a node the runtime refuses, or a Concat whose
    inputs' scales are too far apart to share one (:func:`mixed_scale_concats`), is kept in
    float and quantization retried (at most ``_MAX_EXCLUSION_RETRIES`` times). Returns the
    model file, its quantized node count, its I/O and the check against fp32."""
    for attempt in range(_MAX_EXCLUSION_RETRIES + 1):
        candidate = tmp / f"quantized-{attempt}.onnx"
        _run_quantizer(
            prepared,
            candidate,
            run.data,
            run.source.io,
            run.batch,
            run.config,
            excluded,
            run.fallbacks,
            cache=run.cache,
        )
        quantized_nodes = count_quantized_nodes(candidate)
        if quantized_nodes == 0:
            raise QuantizationError(nothing_quantized(prepared, run.config, excluded))
        if attempt < _MAX_EXCLUSION_RETRIES and _keep_heads_in_float(candidate, excluded, run):
            continue
        if run.config.bias_correction and run.data is not None:
            run.corrections.clear()
            run.corrections.update(_correct(prepared, candidate, run))
        try:
            quantized_io, check = verify(candidate, run.source, run.data, run.batch)
            return candidate, quantized_nodes, quantized_io, check
        except RuntimeRefusal as refusal:
            nodes = nodes_behind(refusal.node, prepared) if refusal.node else []
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
            run.fallbacks.append(note)
            excluded.extend(nodes)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _keep_heads_in_float(candidate: Path, excluded: list[str], run: _Run) -> bool:
    """Exclude what would be quantized to no purpose at the model's end: Concats joining
    tensors whose scales are far apart, and weightless ops making an output (a note for each
    kind); whether anything was excluded."""
    import onnx

    graph = onnx.load(str(candidate), load_external_data=False).graph  # read once for both
    mixed = mixed_scale_concats(graph, excluded)
    notes = []
    if mixed:
        named = "; ".join(f"{name!r} ({ratio:.0f}x)" for name, ratio in mixed)
        notes.append(
            f"Concat joining tensors whose int8 scales differ by more than "
            f"{MIXED_SCALE_RATIO:.0f}x ({named}): quantized together, the finer ones round "
            "to a few levels"
        )
        excluded.extend(name for name, _ in mixed)
    heads = quantized_heads(graph, excluded)
    if heads:
        notes.append(
            f"weightless ops making the model's outputs ({', '.join(map(repr, heads))}): "
            "their int8 outputs are dequantized at once, so int8 only rounds them"
        )
        excluded.extend(heads)
    for note in notes:
        note = f"{note}; kept in float and quantized again"
        log.info(note)
        run.fallbacks.append(note)
    return bool(notes)


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


def _prepare(proto: Any, tmp: Path, fallbacks: list[str], *, fuse: bool) -> Path:
    """Upgrade an old opset, run ORT's pre-processing and (``fuse``) :mod:`sdk.quantize.fusions`;
    return the model file to quantize."""
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
            f"opset upgrade: cannot save the upgraded model: {first_line(exc)}"
        ) from exc
    prepared = _preprocess(raw, tmp, fallbacks)
    _rewrite(prepared, fallbacks, fuse=fuse)
    return prepared


def _rewrite(model: Path, notes: list[str], *, fuse: bool) -> None:
    """Gemm biases flattened and (``fuse``) the exact rewrites, in one read and one write of
    the pre-processed model."""
    import onnx

    from sdk.quantize import fusions

    proto = onnx.load(str(model), load_external_data=False)
    changed = _flatten_gemm_bias(proto)
    done = fusions.fuse(proto) if fuse else fusions.Fusions()
    if changed or done:
        onnx.save(proto, str(model))
    if done:
        note = done.describe("fewer tensors to quantize")
        log.info(note)
        notes.append(note)


def _flatten_gemm_bias(proto: Any) -> bool:
    """Give every Gemm of ``proto`` a 1-D bias: ``(1, N)`` becomes ``(N,)``, which broadcasts
    the same way (True when one changed).

    ORT's optimizer fuses MatMul + Add into a Gemm that keeps the Add's ``(1, N)`` constant, and
    ORT's static quantizer (1.32) cannot adjust per-channel weight scales for a 2-D bias ("The
    truth value of an array with more than one element is ambiguous").
    """
    import onnx
    from onnx import numpy_helper

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
    return changed


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
            with quiet(), working_directory(tmp):
                quant_pre_process(str(raw), str(target), **options)
        except Exception as exc:  # symbolic shape inference and ORT's optimizer raise anything
            errors.append(f"{label}: {first_line(exc)}")
            log.info("ONNX Runtime pre-processing (%s) failed: %s", label, first_line(exc))
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
    op_types = op_types_for(config)
    try:
        with quiet():
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
            if data is None:  # calibration_data guarantees data in static mode
                raise DataError("static quantization needs calibration data")
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }
            reader = BatchReader(data, batch, has_fixed_batch(data_io))
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
        if extra is None and raised_in(exc, "_adjust_weight_scale_for_int32_bias"):
            note = (
                "ONNX Runtime could not adjust weight scales for an int32 bias "
                f"({first_line(exc)}); quantized again without that adjustment"
            )
            log.warning(note)
            fallbacks.append(note)
            disable = {"QDQDisableWeightAdjustForInt32Bias": True}
            _run_quantizer(
                model, out, data, data_io, batch, config, excluded, fallbacks, disable, cache
            )
            return
        if "Histogram has not been collected" in str(exc):
            # entropy/percentile calibration found no tensor of the quantized op types
            raise QuantizationError(nothing_quantized(model, config, excluded)) from exc
        step = failed_step(exc, config.mode)
        node = node_in_message(str(exc), model)
        where = f" at node {node!r}" if node else ""
        raise QuantizationError(f"{step}{where}: {first_line(exc)}") from exc


# --- verification -------------------------------------------------------------------------


# --- finding nodes in ORT's messages ------------------------------------------------------


# --- helpers ------------------------------------------------------------------------------


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
