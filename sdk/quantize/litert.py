"""Quantize a float TFLite model with Google's ai-edge-quantizer, and check the result runs.

This is the LiteRT counterpart of :mod:`sdk.quantize.ort` (which quantizes ONNX models with ONNX
Runtime). Recipes are ai-edge-quantizer's own, by name:

============================  ===========  ===========  ================================
recipe                        weights      activations  needs calibration data
============================  ===========  ===========  ================================
``static_wi8_ai8``            int8         int8         yes
``static_wi8_ai16``           int8         int16        yes
``dynamic_wi8_afp32``         int8         float32 [*]  no
``dynamic_wi4_afp32``         int4         float32 [*]  no
``weight_only_wi8_afp32``     int8         float32      no
``weight_only_wi4_afp32``     int4         float32      no
============================  ===========  ===========  ================================

[*] quantized on the fly inside each op (dynamic range quantization).

Static recipes make int8/int16 model inputs and outputs; :class:`device_agent.runtime.LiteRTSession`
quantizes and dequantizes them, so the quantized model takes the same float feed as the original.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import EdgeshipError
from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, DataError, ModelFormatError, QuantizationError

__all__ = ["RECIPES", "LiteRTRecipe", "quantize_tflite"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiteRTRecipe:
    """One ai-edge-quantizer recipe: the precision it produces and whether it calibrates."""

    name: str
    precision: str
    calibrated: bool
    description: str


RECIPES: Mapping[str, LiteRTRecipe] = {
    r.name: r
    for r in (
        LiteRTRecipe("static_wi8_ai8", "int8", True, "int8 weights and activations"),
        LiteRTRecipe("static_wi8_ai16", "int16x8", True, "int8 weights, int16 activations"),
        LiteRTRecipe("dynamic_wi8_afp32", "int8", False, "int8 weights, dynamic-range int8 ops"),
        LiteRTRecipe("dynamic_wi4_afp32", "int4", False, "int4 weights, dynamic-range ops"),
        LiteRTRecipe("weight_only_wi8_afp32", "int8", False, "int8 weights, float compute"),
        LiteRTRecipe("weight_only_wi4_afp32", "int4", False, "int4 weights, float compute"),
    )
}

# Samples checked on the quantized model before it is returned.
_CHECK_SAMPLES = 16


def quantize_tflite(
    model: ModelArtifact | str | Path,
    calibration: DataSource | None,
    out: str | Path,
    *,
    recipe: str = "static_wi8_ai8",
) -> ModelArtifact:
    """Quantize the float TFLite ``model`` with ``recipe`` and write it to ``out``.

    ``calibration`` is checked against the model's inputs (see :func:`sdk.data.load_dataset`);
    static recipes need it, the others only check on it (pass ``None``). The quantized model is
    loaded and run in LiteRT next to the float model before it is returned, on up to 16
    calibration samples (else generated inputs): ``details["check"]`` holds the figures, as
    :func:`sdk.quantize.quantize` reports them (``cosine_min``, the worst per-sample cosine with
    the float model's outputs; ``max_abs_error``; ``inputs``, ``samples``), and
    ``details["max_abs_diff_vs_float"]`` the largest difference.
    """
    spec = RECIPES.get(recipe)
    if spec is None:
        known = ", ".join(f"{r.name} ({r.description})" for r in RECIPES.values())
        raise ConfigError(f"unknown LiteRT quantization recipe {recipe!r}; known recipes: {known}")
    float_art = _float_artifact(model)
    target = Path(out)
    if target.suffix.lower() != ".tflite":
        raise ConfigError(f"{target.name}: the quantized model must be written to a .tflite file")
    if target.resolve() == float_art.path.resolve():
        raise ConfigError(f"{target}: the output would overwrite the float model")

    data: Dataset | None = None
    if calibration is not None:
        data = load_dataset(calibration, float_art.io, what="calibration data")
    elif spec.calibrated:
        raise DataError(
            f"calibration data: recipe {recipe!r} calibrates activation ranges, so it "
            "needs calibration data (an .npz file or arrays keyed by input name)"
        )

    try:
        from ai_edge_quantizer import quantizer as aeq_quantizer
        from ai_edge_quantizer import recipe as aeq_recipe
    except ImportError as exc:
        raise QuantizationError(
            "LiteRT quantization needs ai-edge-quantizer; install it with: "
            "pip install 'edgeship[tflite-export]'"
        ) from exc

    target.parent.mkdir(parents=True, exist_ok=True)
    fixes = _run_quantizer(aeq_quantizer, aeq_recipe, float_art, recipe, spec, data, target)
    check = _check_against_float(float_art, target, data)
    details = {
        "float_model": str(float_art.path),
        "recipe": recipe,
        "calibration_samples": 0 if data is None or not spec.calibrated else len(data),
        "calibration_ranges": "min-max" if spec.calibrated else None,
        "max_abs_diff_vs_float": check["max_abs_error"],
        "check": check,
        "float_size_bytes": float_art.size_bytes,
    }
    if fixes:
        details["input_notes"] = [
            f"{float_art.path.name} was given to ai-edge-quantizer as a copy with "
            + "; ".join(fixes)
            + " (every weight's value unchanged)"
        ]
    session_io = _open(target).io
    art = ModelArtifact(
        path=target,
        format="tflite",
        io=session_io,
        precision=spec.precision,
        recipe=f"litert-{recipe}",
        details=details,
    )
    log.info(
        "quantized %s with %s: %d -> %d bytes, max |diff| vs float %.3g",
        float_art.path.name,
        recipe,
        float_art.size_bytes,
        art.size_bytes,
        check["max_abs_error"],
    )
    return art


def _run_quantizer(
    aeq_quantizer: Any,
    aeq_recipe: Any,
    float_art: ModelArtifact,
    recipe: str,
    spec: LiteRTRecipe,
    data: Dataset | None,
    target: Path,
) -> list[str]:
    """Quantize ``float_art`` into ``target`` with ai-edge-quantizer (calibrated on ``data``
    when the recipe needs it); what had to be filled in for the quantizer to read it."""
    source, fixes = _readable_by_the_quantizer(float_art.path, target)
    source_art = float_art if source == float_art.path else replace(float_art, path=source)
    with warnings.catch_warnings():
        # The calibrator keeps every intermediate tensor on purpose and LiteRT warns about it.
        warnings.simplefilter("ignore")
        recipe_obj = getattr(aeq_recipe, recipe)()
        quantizer = _step("loading the model", lambda: aeq_quantizer.Quantizer(source, recipe_obj))
        calibration_result = None
        if spec.calibrated and data is not None:
            feeds = _calibration_feeds(source_art, data)
            calibration_result = _step("calibrating", lambda: _calibrate(source, recipe_obj, feeds))
        result = _step(
            "quantizing",
            lambda: quantizer.quantize(calibration_result, enable_progress_report=False),
        )
        target.unlink(missing_ok=True)  # else the quantizer logs a warning while overwriting
        _step("writing the model", lambda: result.export_model(target))
    if source != float_art.path:
        source.unlink(missing_ok=True)
    return fixes


def _float_artifact(model: ModelArtifact | str | Path) -> ModelArtifact:
    art = model if isinstance(model, ModelArtifact) else read_artifact(model)
    if art.format != "tflite":
        raise ModelFormatError(
            f"{art.path.name}: LiteRT quantization takes a .tflite model, got {art.format}; "
            "use sdk.quantize for ONNX models"
        )
    if art.precision != "fp32":
        raise ModelFormatError(
            f"{art.path.name} is already quantized ({art.precision}); quantize the float model"
        )
    return art


def _step(what: str, action: Any) -> Any:
    """Run one ai-edge-quantizer step, turning its failures into QuantizationError."""
    try:
        return action()
    except EdgeshipError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else ""
        message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise QuantizationError(f"ai-edge-quantizer failed while {what}: {message}") from exc


def _calibrate(model: Path, recipe: Any, feeds: dict[str, list[dict[str, Any]]]) -> Any:
    """Activation ranges over all of the calibration data.

    ``Quantizer.calibrate`` keeps a moving average of each batch's min/max, so the range depends
    on the batch size; with the one-sample batches of a batch-1 model it clipped the digits CNN's
    logits to [-19, 15] while they reach -38, and logits came out wrong by up to 17. The true
    min/max over the calibration set does not depend on how it is batched.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    calib = calibrator.Calibrator(
        str(model), num_threads=os.cpu_count() or 1, qsv_update_func=qsv_utils.min_max_update
    )
    calib.calibrate(feeds, manager)
    return calib.get_model_qsvs()


def _open(path: Path) -> Any:
    from device_agent.runtime import open_session

    try:
        return open_session(path, threads=1)
    except EdgeshipError as exc:
        raise QuantizationError(f"the quantized model {path.name} does not load: {exc}") from exc


def _readable_by_the_quantizer(path: Path, target: Path) -> tuple[Path, list[str]]:
    """``path``, or a copy beside ``target`` that ai-edge-quantizer reads as the runtimes do,
    and what was changed: files written by older converters (MediaPipe's, for one) keep each
    operator's code only in ``deprecated_builtin_code``, which the quantizer does not read (it
    takes every operator for ADD and quantizes nothing), and may have no signature, which its
    calibration runs the model through. Weights and graph are left as they are."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        return path, []
    try:
        model = flatbuffer_utils.read_model(str(path))
    except Exception as exc:  # not a flatbuffer: the quantizer says so in its own words
        log.debug("cannot read %s as a TFLite flatbuffer: %s", path, exc)
        return path, []
    fixes = []
    stale = [c for c in model.operatorCodes if c.builtinCode < c.deprecatedBuiltinCode]
    for code in stale:
        code.builtinCode = code.deprecatedBuiltinCode
    if stale:
        fixes.append(f"{len(stale)} operator codes read from the old deprecated_builtin_code field")
    folded = _fold_fp16_weights(model, schema)
    if folded:
        fixes.append(
            f"{folded} float16 weight tensors behind DEQUANTIZE ops stored as float32 "
            "(the quantizer reads no weights behind them and failed on their convolutions)"
        )
    if not model.signatureDefs and len(model.subgraphs) == 1:
        graph = model.subgraphs[0]

        def tensor_map(index: int) -> Any:
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = graph.tensors[index].name, index
            return entry

        signature = schema.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = b"serving_default", 0
        signature.inputs = [tensor_map(int(i)) for i in graph.inputs]
        signature.outputs = [tensor_map(int(i)) for i in graph.outputs]
        model.signatureDefs = [signature]
        fixes.append("a serving_default signature over the graph's inputs and outputs added")
    if not fixes:
        return path, []
    copy = target.with_name(target.stem + ".float-for-quantizer.tflite")
    flatbuffer_utils.write_model(model, str(copy))
    return copy, fixes


def _fold_fp16_weights(model: Any, schema: Any) -> int:
    """Replace each DEQUANTIZE of a constant float16 tensor by its float32 result, stored as a
    constant (converters' fp16 export, as in MediaPipe's models); how many were folded."""
    codes = model.operatorCodes
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    folded = 0
    for graph in model.subgraphs:
        kept = []
        for op in graph.operators:
            code = codes[op.opcodeIndex]
            source = graph.tensors[op.inputs[0]] if len(op.inputs) == 1 else None
            data = None if source is None else model.buffers[source.buffer].data
            if (
                max(code.builtinCode, code.deprecatedBuiltinCode) != dequantize
                or source is None
                or source.type != schema.TensorType.FLOAT16
                or data is None
                or len(data) == 0
            ):
                kept.append(op)
                continue
            values = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype=np.float16)
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(values.astype(np.float32).tobytes(), dtype=np.uint8)
            model.buffers.append(buffer)
            graph.tensors[op.outputs[0]].buffer = len(model.buffers) - 1
            folded += 1
        graph.operators = kept
        _drop_unread_fp16(model, graph, schema)
    return folded


def _drop_unread_fp16(model: Any, graph: Any, schema: Any) -> None:
    """Remove the float16 constants no operator reads any more (else the int8 file keeps a
    float16 copy of every weight: MediaPipe's selfie model came out at 443 KB from 244 KB),
    renumbering the tensor indices that ops, the graph and its signatures hold."""
    read = {int(i) for op in graph.operators for i in (*op.inputs, *(op.intermediates or []))}
    read |= {int(i) for i in (*graph.inputs, *graph.outputs)}
    dead = {
        i
        for i, t in enumerate(graph.tensors)
        if i not in read and t.type == schema.TensorType.FLOAT16
    }
    if not dead:
        return
    new_index: dict[int, int] = {}
    for old in range(len(graph.tensors)):
        if old not in dead:
            new_index[old] = len(new_index)

    def remap(indices: Any) -> list[int]:
        return [-1 if int(i) < 0 else new_index[int(i)] for i in indices]

    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None:
            op.intermediates = remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    index = model.subgraphs.index(graph)
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == index:
            for entry in (*signature.inputs, *signature.outputs):
                entry.tensorIndex = new_index[entry.tensorIndex]
    kept_buffers = {t.buffer for i, t in enumerate(graph.tensors) if i not in dead}
    kept_buffers |= {t.buffer for g in model.subgraphs if g is not graph for t in g.tensors}
    for i in dead:
        if graph.tensors[i].buffer not in kept_buffers:
            model.buffers[graph.tensors[i].buffer].data = None  # emptied, kept in place
    graph.tensors = [t for i, t in enumerate(graph.tensors) if i not in dead]


def _calibration_feeds(art: ModelArtifact, data: Dataset) -> dict[str, list[dict[str, Any]]]:
    """Calibration batches keyed the way ai-edge-quantizer wants them.

    The quantizer runs the model through its signature, so inputs are keyed by signature input
    names (matched to the model's tensors by tensor index) and batches have the model's batch
    size when that is fixed.
    """
    from device_agent.runtime import litert_interpreter_class

    interpreter_cls, _pkg, _version = litert_interpreter_class()
    interp = interpreter_cls(model_path=str(art.path))
    signatures = list(interp.get_signature_list())
    if len(signatures) != 1:
        raise QuantizationError(
            f"{art.path.name} has {len(signatures)} signatures; calibration needs exactly one "
            "(export with sdk.export, which writes one)"
        )
    key = signatures[0]
    runner = interp.get_signature_runner(key)
    by_index = {int(d["index"]): name for name, d in runner.get_input_details().items()}
    sig_names = {}
    for spec, detail in zip(art.io.inputs, interp.get_input_details(), strict=True):
        sig_name = by_index.get(int(detail["index"]))
        if sig_name is None:
            raise QuantizationError(
                f"{art.path.name}: input {spec.name!r} is not part of signature {key!r}"
            )
        sig_names[spec.name] = sig_name

    first = art.io.inputs[0].shape
    batch = first[0] if first and isinstance(first[0], int) else 1
    usable = len(data) - len(data) % batch
    if usable == 0:
        raise DataError(
            f"calibration data: {len(data)} samples, but the model takes batches of {batch}"
        )
    if usable < len(data):
        log.info(
            "calibration uses %d of %d samples (whole batches of %d)", usable, len(data), batch
        )
    feeds = [
        {sig_names[name]: arr for name, arr in part.items()}
        for part in data.head(usable).batches(batch)
    ]
    return {key: feeds}


def _check_against_float(
    art: ModelArtifact, quant_path: Path, data: Dataset | None
) -> dict[str, Any]:
    """Both models on the same inputs: up to 16 real samples (whole batches of a fixed batch
    size) when there are enough, else generated ones; the figures of the comparison."""
    from sdk.detect import model_outputs
    from sdk.quantize.ort_check import _compare

    first = art.io.inputs[0].shape
    batch = first[0] if first and isinstance(first[0], int) else None
    step = batch or _CHECK_SAMPLES
    if data is not None and len(data) >= (batch or 1):
        count = min(len(data), max(_CHECK_SAMPLES, step))
        count -= count % (batch or 1)
        feed, kind = dict(data.head(count).inputs), "calibration"
    else:
        feed, kind = _generated_feed(art), "generated"
    expected = model_outputs(_open(art.path), feed, batch_size=step)
    try:
        quant = _open(quant_path)
        got = model_outputs(quant, feed, batch_size=step)
    except EdgeshipError as exc:
        raise QuantizationError(
            f"the quantized model {quant_path.name} fails to run: {exc}"
        ) from exc
    for ref, out in zip(expected, got, strict=True):
        if ref.shape != out.shape:
            raise QuantizationError(
                f"the quantized model returns shape {out.shape} where the float model returns "
                f"{ref.shape}"
            )
        if not np.isfinite(out).all():
            raise QuantizationError("the quantized model returns NaN or infinite values")
    samples = len(next(iter(feed.values())))
    return _compare(quant.io, got, expected, kind, samples)


def _generated_feed(art: ModelArtifact) -> dict[str, np.ndarray]:
    """Standard-normal floats (zeros for other types) of the model's input shapes."""
    rng = np.random.default_rng(0)
    feed = {}
    for spec in art.io.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        values = rng.standard_normal(shape) if dtype.kind == "f" else np.zeros(shape)
        feed[spec.name] = values.astype(dtype)
    return feed
