"""Weight-only int4 for ONNX models: MatMul weights in 4-bit blocks, run by ONNX Runtime's
``MatMulNBits`` (a contrib operator of its CPU execution provider, in every release the agent
accepts: ``onnxruntime>=1.17``).

Why: a size budget that int8 misses. Static int8 stores a weight in a byte; here a weight takes
half a byte plus one float scale and one 4-bit zero point per block of :data:`BLOCK_SIZE`
weights along the reduction axis, so the weights of a MatMul-heavy model (MLPs, transformers)
shrink to about a sixth of fp32. Activations stay float: there are no activation ranges, so
nothing is calibrated, and the calibration data, when given, only checks the result.

The steps:

1. every ``Gemm`` whose weight ``B`` is a constant initializer (``alpha=1``, ``transA=0``)
   becomes ``MatMul`` (+ ``Add`` of ``beta * C``): PyTorch's ``nn.Linear`` on a 2-D input
   exports as ``Gemm``, which ``MatMulNBits`` does not cover. ``transB=1`` (PyTorch's layout)
   stores the weight transposed once, as a new initializer;
2. ONNX Runtime's ``MatMulNBitsQuantizer`` (round to nearest, block-wise along the reduction
   axis, a zero point per block unless ``symmetric``) replaces each ``MatMul`` whose weight is a
   2-D float initializer with ``MatMulNBits``, which multiplies in int8 where the CPU can
   (:data:`ACCURACY_LEVEL`);
3. the result is loaded and run by the runtime the board uses, next to the fp32 model, and
   compared on calibration samples (else generated inputs): ``details["check"]`` holds the
   worst per-sample cosine and the largest error, as :func:`sdk.quantize.quantize` reports them.

A model without a ``MatMul`` or ``Gemm`` with a constant weight (a CNN's compute is in ``Conv``)
has nothing to quantize here: :func:`int4_blocker` says so before any work, and
:func:`quantize_int4` raises it as a :class:`~sdk.errors.QuantizationError`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, ModelFormatError, QuantizationError

__all__ = [
    "ACCURACY_LEVEL",
    "BLOCK_SIZE",
    "INT4_RECIPE",
    "gemm_to_matmul",
    "int4_blocker",
    "quantize_int4",
]

log = logging.getLogger("sdk.quantize")

#: The recipe name a weight-only int4 model carries (and its optimize candidate's name).
INT4_RECIPE = "ort-weight-int4"

#: Weights per scale along the reduction axis. 32 keeps a 64-wide input layer in two blocks
#: per column; ONNX Runtime takes powers of two from 16.
BLOCK_SIZE = 32

#: ``MatMulNBits``' accuracy level: 4 quantizes each block of its input to int8 inside the
#: operator and multiplies in integers, where the CPU has kernels for it (ONNX Runtime falls
#: back to a more exact compute type where it has none). Computing in float (None), the
#: operator was slower than fp32 on the MLPs of benchmarks/int4.py (1.4x on the 1024-wide
#: one); at level 4 it was as fast as fp32 on the 256-wide MLP and 1.8x faster on the
#: 1024-wide one (as fast as static int8), with top-1 within 0.25 points of fp32's.
ACCURACY_LEVEL = 4

_FLOAT = 1  # onnx.TensorProto.FLOAT


def quantize_int4(
    model: ModelArtifact | str | Path,
    calibration: DataSource | Dataset | None = None,
    *,
    out: str | Path,
    block_size: int = BLOCK_SIZE,
    symmetric: bool = False,
    accuracy_level: int | None = ACCURACY_LEVEL,
) -> ModelArtifact:
    """Quantize the MatMul weights of an ONNX model to 4 bits and write it to ``out``.

    ``calibration`` (the forms :func:`sdk.data.load_dataset` takes) is optional and only checks
    the result against fp32 (``details["check"]``; without it, on generated inputs, which only
    shows the model runs). ``accuracy_level`` is ``MatMulNBits``' (:data:`ACCURACY_LEVEL`);
    None computes in float.

    Raises :class:`ConfigError` for bad settings, :class:`QuantizationError` when the model
    has no MatMul or Gemm with a constant weight or ONNX Runtime cannot run the result.
    """
    source = model if isinstance(model, ModelArtifact) else read_artifact(model)
    target = Path(out)
    _check_arguments(source, target, block_size, accuracy_level)
    blocker = int4_blocker(source.path)
    if blocker is not None:
        raise QuantizationError(f"{blocker}; the fp32 model is the one to ship")
    data = None
    if calibration is not None:
        inputs = dict(calibration.inputs) if isinstance(calibration, Dataset) else calibration
        data = load_dataset(inputs, source.io, what="calibration data")

    from sdk.onnx_tools import load_onnx

    try:
        proto = load_onnx(source.path)
    except ModelFormatError as exc:
        raise QuantizationError(f"reading the model: {exc}") from exc
    rewritten = gemm_to_matmul(proto.graph)
    quantized = _quantize_weights(proto, block_size, symmetric, accuracy_level)
    nodes = sum(1 for n in _walk(quantized.graph) if n.op_type == "MatMulNBits")
    if nodes == 0:
        raise QuantizationError(
            "int4 quantization: ONNX Runtime replaced no MatMul with MatMulNBits (its weights "
            "may not be 2-D float initializers); the fp32 model is the one to ship"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeship-int4-") as tmp:
        candidate = Path(tmp) / "int4.onnx"
        _save(quantized, candidate)
        io_spec, check = _verify(candidate, source, data)
        shutil.copyfile(candidate, target)
    cos = check.get("cosine_min")
    if check.get("inputs") == "calibration" and cos is not None and cos < _check_min_cosine():
        log.warning(
            "the int4 model's outputs differ from fp32's on calibration data: worst-sample "
            "cosine %.4g; try a smaller block_size or keep the int8 model",
            cos,
        )
    details: dict[str, Any] = {
        "bits": 4,
        "block_size": block_size,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level,
        "quantized_nodes": nodes,
        "gemm_rewritten": rewritten,
        "calibration_samples": 0 if data is None else len(data),
        "source": str(source.details.get("converted_from") or source.path),
        "input_notes": list(source.details.get("notes") or []),
        "source_size_bytes": source.size_bytes,
        "size_ratio": target.stat().st_size / source.size_bytes if source.size_bytes else None,
        "check": check,
    }
    log.info(
        "quantized %s -> %s (int4 weights in %d MatMulNBits, %d -> %d bytes)",
        source.path.name,
        target,
        nodes,
        source.size_bytes,
        target.stat().st_size,
    )
    return ModelArtifact(
        path=target,
        format="onnx",
        io=io_spec,
        precision="int4",
        recipe=INT4_RECIPE,
        details=details,
    )


def _check_arguments(
    source: ModelArtifact, target: Path, block_size: int, accuracy_level: int | None
) -> None:
    if source.format != "onnx":
        raise ConfigError(
            f"{source.path.name}: int4 MatMul weights are an ONNX Runtime recipe; for a .tflite "
            "use sdk.quantize_tflite with recipe weight_only_wi4_afp32"
        )
    if target.suffix.lower() != ".onnx":
        raise ConfigError(f"{target.name}: the quantized model must be written to a .onnx file")
    if target.resolve() == source.path.resolve():
        raise ConfigError(f"{target}: writing the quantized model over its fp32 source is refused")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size must be a power of two from 16, got {block_size}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be 0 to 4 (MatMulNBits'), got {accuracy_level}")


def _check_min_cosine() -> float:
    from sdk.quantize.config import CHECK_MIN_COSINE

    return CHECK_MIN_COSINE


# --- what can be quantized ------------------------------------------------------------------


def int4_blocker(model: Path) -> str | None:
    """Why ``model`` has nothing for int4 weights, or None: the reason names its operators
    when none of its top-level nodes is a ``MatMul`` with a constant 2-D float weight or a
    ``Gemm`` that :func:`gemm_to_matmul` turns into one."""
    import importlib.util

    import onnx

    if importlib.util.find_spec("onnxruntime.quantization.matmul_nbits_quantizer") is None:
        import onnxruntime

        return (
            "int4 weights need onnxruntime 1.22 or newer (its MatMulNBitsQuantizer); this is "
            f"{onnxruntime.__version__}"
        )
    graph = onnx.load(str(model), load_external_data=False).graph
    weights = _weights(graph)
    if any(_matmul_weight(n, weights) or _gemm_plan(n, weights) for n in graph.node):
        return None
    ops = sorted({n.op_type for n in _walk(graph)})
    summary = ", ".join(ops[:12]) + (", ..." if len(ops) > 12 else "")
    return (
        "nothing to quantize to int4: no MatMul or Gemm with a constant weight in this model "
        f"(its ops: {summary or 'none'})"
    )


def _weights(graph: Any) -> dict[str, Any]:
    """The graph's constant initializers (a name also listed as a graph input can be fed)."""
    fed = {i.name for i in graph.input}
    return {i.name: i for i in graph.initializer if i.name not in fed}


def _matmul_weight(node: Any, weights: dict[str, Any]) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    init = weights.get(node.input[1])
    if init is None or init.data_type != _FLOAT or len(init.dims) < 2:
        return False
    return all(d == 1 for d in init.dims[:-2])


def _gemm_plan(node: Any, weights: dict[str, Any]) -> dict[str, Any] | None:
    """A Gemm's attributes when it can become MatMul (+ Add), else None."""
    from onnx import helper

    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plan = {
        "alpha": float(attrs.get("alpha", 1.0)),
        "beta": float(attrs.get("beta", 1.0)),
        "transA": int(attrs.get("transA", 0)),
        "transB": int(attrs.get("transB", 0)),
        "C": node.input[2] if len(node.input) > 2 else "",
    }
    weight = weights.get(node.input[1])
    if plan["alpha"] != 1.0 or plan["transA"] or weight is None:
        return None
    if weight.data_type != _FLOAT or len(weight.dims) != 2:
        return None
    if plan["C"] and plan["beta"] not in (0.0, 1.0) and plan["C"] not in weights:
        return None  # beta * C needs C's values
    return plan


# --- the Gemm rewrite -----------------------------------------------------------------------


def gemm_to_matmul(graph: Any) -> int:
    """Rewrite, in place, every top-level ``Gemm`` of ``graph`` with a constant weight,
    ``alpha=1`` and ``transA=0`` into ``MatMul`` (+ ``Add`` of ``beta * C`` when there is a
    ``C`` and ``beta`` is not 0); the same outputs, names kept. Returns how many it rewrote."""
    from onnx import helper, numpy_helper

    weights = _weights(graph)
    taken = _names(graph)

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    nodes: list[Any] = []
    replaced: set[str] = set()
    count = 0
    for node in graph.node:
        plan = _gemm_plan(node, weights)
        if plan is None:
            nodes.append(node)
            continue
        count += 1
        label = node.name or node.output[0]
        weight = node.input[1]
        if plan["transB"]:
            values = numpy_helper.to_array(weights[weight]).T
            weight = fresh(f"{node.input[1]}_transposed")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), weight))
            replaced.add(node.input[1])
        out = node.output[0]
        bias = plan["C"] if plan["beta"] != 0.0 else ""
        if bias and plan["beta"] != 1.0:
            scaled = numpy_helper.to_array(weights[bias]) * np.float32(plan["beta"])
            bias = fresh(f"{plan['C']}_scaled")
            graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), bias))
            replaced.add(plan["C"])
        product = fresh(f"{out}_matmul") if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=label))
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], [out], name=fresh(f"{label}_bias"))
            )
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused(graph, replaced)
    return count


def _names(graph: Any) -> set[str]:
    names = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for node in _walk(graph):
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def _drop_unused(graph: Any, candidates: set[str]) -> None:
    """Remove the initializers in ``candidates`` that no node (in subgraphs too) reads."""
    used = {name for node in _walk(graph) for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in candidates or i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _walk(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub)


# --- quantize, save, check ------------------------------------------------------------------


def _quantize_weights(
    proto: Any, block_size: int, symmetric: bool, accuracy_level: int | None
) -> Any:
    """ONNX Runtime's MatMulNBits quantizer over ``proto``'s MatMul weights; the new model."""
    from sdk.quantize.ort_log import first_line, quiet

    try:
        with quiet():
            # Imported under quiet(): the module calls logging.basicConfig(level=INFO) on import,
            # which would print every INFO record of the process; quiet() gives the root
            # logger a handler first, which makes that call do nothing.
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            from onnxruntime.quantization.quant_utils import QuantFormat

            quantizer = MatMulNBitsQuantizer(
                proto,
                bits=4,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level or None,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=("MatMul",),
            )
            quantizer.process()
    except Exception as exc:  # the quantizer raises anything on graphs it does not handle
        raise QuantizationError(f"int4 quantization: {first_line(exc)}") from exc
    return quantizer.model.model


def _save(proto: Any, path: Path) -> None:
    import onnx

    from sdk.quantize.ort_log import first_line

    try:
        onnx.save(proto, str(path))
    except Exception as exc:  # ValueError for protos over 2 GB, OSError
        raise QuantizationError(f"saving the int4 model: {first_line(exc)}") from exc


def _verify(
    candidate: Path, source: ModelArtifact, data: Dataset | None
) -> tuple[Any, dict[str, Any]]:
    """The int4 model loaded and run next to fp32 (:func:`sdk.quantize.ort_check.verify`)."""
    from sdk.quantize.ort_check import RuntimeRefusal, verify

    batch = source.io.fixed_batch or 32
    try:
        io_spec, check = verify(candidate, source, data, batch)
    except RuntimeRefusal as refusal:
        where = f" at node {refusal.node!r}" if refusal.node else ""
        raise QuantizationError(
            f"{refusal.step} (int4){where}: {refusal.message}"
        ) from refusal.__cause__
    if check.get("inputs") == "generated":
        check["note"] = "generated random inputs: shows the int4 model runs, not how accurate it is"
    return io_spec, check
