"""After quantizing: what was quantized, and whether the runtime the board uses loads and runs the
result with outputs close to fp32's (the check in ``details["check"]``). A node the runtime
refuses is named here, so quantize can keep it in float and try again."""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.errors import RuntimeLoadError
from sdk.artifact import ModelArtifact
from sdk.data import Dataset, sample_count
from sdk.errors import DataError, QuantizationError
from sdk.quantize.ort_log import (
    native_stderr_to_log,
    strip_prefix,
)

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec, TensorSpec
    from device_agent.runtime import ModelSession
from sdk.quantize.config import CHECK_MIN_COSINE, CHECK_SAMPLES, QuantizeConfig, has_fixed_batch

# The logger docs/quantization.md names, shared by the ONNX Runtime quantization modules.
log = logging.getLogger("sdk.quantize")


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


def holds_op_types(model: Path, op_types: Iterable[str]) -> bool:
    """Whether an operator of ``op_types`` is anywhere in ``model``, subgraphs included, that
    int8 could reach: a Gather only when it reads a float initializer (a table; a Gather of
    a Shape's int64 output has nothing to quantize)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    tables = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    wanted = set(op_types)
    for node, _ in _walk(graph):
        if node.op_type not in wanted:
            continue
        if node.op_type != "Gather" or (node.input and node.input[0] in tables):
            return True
    return False


def count_quantized_nodes(model: Path) -> int:
    """Nodes that quantize, dequantize or compute in integers, in subgraphs too."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return sum(1 for n, _ in _walk(graph) if n.op_type in _QUANT_OPS)


#: A quantized Concat whose inputs' int8 scales differ by more than this is kept in float: at
#: the output's (the largest) scale, an input with a scale this much finer keeps at most
#: 256 / 16 = 16 levels. NudeNet's YOLOv8n head joins box coordinates in pixels and class
#: scores in [0, 1] (scales 395x apart: every score became 0); the other Concats of the
#: PaddleOCR, YOLO and EfficientNet-Lite nets measured were within 2.4x.
MIXED_SCALE_RATIO = 16.0


def mixed_scale_concats(graph: Any, excluded: Sequence[str] = ()) -> list[tuple[str, float]]:
    """Concat nodes of a QDQ model's graph fed by DequantizeLinear outputs whose per-tensor
    scales differ by more than :data:`MIXED_SCALE_RATIO`, with that ratio (named nodes only,
    those in ``excluded`` left out)."""
    from onnx import numpy_helper

    scales = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 0}
    made_by = {out: node for node in graph.node for out in node.output}
    found: list[tuple[str, float]] = []
    for node in graph.node:
        if node.op_type != "Concat" or not node.name or node.name in excluded:
            continue
        feeds = [made_by.get(name) for name in node.input]
        seen = [
            float(scales[d.input[1]])
            for d in feeds
            if d is not None and d.op_type == "DequantizeLinear" and d.input[1] in scales
        ]
        seen = [v for v in seen if np.isfinite(v) and v > 0]
        if len(seen) >= 2 and max(seen) / min(seen) > MIXED_SCALE_RATIO:
            found.append((node.name, max(seen) / min(seen)))
    return found


# Operators without weights whose int8 form at a graph output only loses precision: the
# output is dequantized anyway, and they cost little in float.
_HEAD_OPS = frozenset(
    {"Sigmoid", "Softmax", "Mul", "Add", "Sub", "Div", "Concat", "LeakyRelu", "Tanh",
     "HardSigmoid", "Clip", "Relu"}
)  # fmt: skip
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ai.onnx.ml operators that only re-label or re-shape (skl2onnx's ZipMap, a label lookup):
# they are not a model's compute
_NO_COMPUTE = frozenset({"ZipMap", "ArrayFeatureExtractor", "CastMap", "LabelEncoder"})


def quantized_heads(graph: Any, excluded: Sequence[str] = ()) -> list[str]:
    """Named weightless nodes (:data:`_HEAD_OPS`) of a QDQ model's graph that make an output,
    through Q/DQ pairs and Concats, whose output is quantized: YOLOv8n's class scores, an
    int8 Sigmoid on a 1/255 grid, left every score below 0.002 at exactly 0."""
    made_by = {out: node for node in graph.node for out in node.output}
    quantized_tensors = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    heads: list[str] = []
    todo = [o.name for o in graph.output]
    seen: set[str] = set()
    while todo:
        node = made_by.get(todo.pop())
        if node is None or node.output[0] in seen:  # unnamed nodes are many
            continue
        seen.add(node.output[0])
        if node.op_type in _QDQ or (node.op_type == "Concat" and node.name in excluded):
            todo.extend(node.input[:1] if node.op_type in _QDQ else node.input)
            continue
        quantized = any(out in quantized_tensors for out in node.output)
        if node.op_type in _HEAD_OPS and node.name and node.name not in excluded and quantized:
            heads.append(node.name)
    return heads


def _op_counts(graph: Any, *, inside: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node, nested in _walk(graph):
        if nested == inside:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _op_summary(counts: dict[str, int]) -> str:
    types = sorted(counts)
    return ", ".join(types[:12]) + (", ..." if len(types) > 12 else "")


def nothing_to_quantize(model: Path, op_types: Iterable[str] | None = ()) -> str | None:
    """Why there is nothing to quantize in ``model``, said before any calibration. Either none
    of its operators, in subgraphs too, is a type ONNX Runtime quantizes in any mode or format
    (tree ensembles and linear classifiers from scikit-learn) nor one of ``op_types`` (the types
    a user asked for: ORT's QDQ quantizer takes others too); or its compute is classical-ML
    operators (``ai.onnx.ml``: LinearClassifier, TreeEnsemble..., which have no int8 form) and
    no operator holds a weight (:data:`_WEIGHT_OPS`, or a Gather from a float table): int8
    could only reach the arithmetic around them (a calibrated classifier's sigmoids), where
    Q/DQ pairs add work and error and there is nothing to shrink. The second rule holds only
    when the user named none of the model's op types and did not ask for every type
    (``op_types=None``). None otherwise (whether something gets quantized is then the
    quantizer's business)."""
    import onnx
    from onnxruntime.quantization.registry import (
        IntegerOpsRegistry,
        QDQRegistry,
        QLinearOpsRegistry,
    )

    graph = onnx.load(str(model), load_external_data=False).graph
    tables = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    counts: dict[str, int] = {}
    classical: set[str] = set()
    weighted = False
    for node, _ in _walk(graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain == "ai.onnx.ml":
            classical.add(node.op_type)
        embedding = node.op_type == "Gather" and node.input and node.input[0] in tables
        weighted = weighted or node.op_type in _WEIGHT_OPS or bool(embedding)
    asked = set(counts) & set(op_types or ())
    known = set(QDQRegistry) | set(QLinearOpsRegistry) | set(IntegerOpsRegistry)
    if not asked and not set(counts) & known:
        return (
            f"nothing to quantize in this model: its ops ({_op_summary(counts) or 'none'}) "
            "have no int8 form"
        )
    compute = {op: n for op, n in counts.items() if op in classical and op not in _NO_COMPUTE}
    if op_types is None or asked or weighted or not compute:
        return None
    rest = {op: n for op, n in counts.items() if op not in classical}
    return (
        f"nothing to quantize in this model: its compute ({_op_summary(compute)}) has no int8 "
        f"form and no operator holds a weight to shrink; int8 could only reach the arithmetic "
        f"around it ({_op_summary(rest) or 'none'}), which it would slow down (name op types "
        "to quantize them anyway: --op-types)"
    )


def nothing_quantized(prepared: Path, config: QuantizeConfig, excluded: list[str]) -> str:
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


def raised_in(exc: BaseException, function: str) -> bool:
    return any(frame.name == function for frame in traceback.extract_tb(exc.__traceback__))


def failed_step(exc: BaseException, mode: str) -> str:
    """Name the quantizer's step from where the exception was raised."""
    files = [Path(frame.filename).name for frame in traceback.extract_tb(exc.__traceback__)]
    if "calibrate.py" in files:
        return "calibration"
    if mode == "dynamic":
        return "dynamic quantization"
    return "static quantization (inserting QDQ nodes)"


class RuntimeRefusal(Exception):
    """ONNX Runtime could not load or run a quantized model (internal: retried or converted)."""

    def __init__(self, step: str, message: str, node: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.node = node


def probe_session(probe: Any, what: str, threads: int | None = None) -> Any:
    """A quiet ONNX Runtime CPU session of ``probe`` (a ModelProto given extra outputs to read
    tensors inside it); one ORT cannot load is a :class:`QuantizationError` led by ``what``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own exception types
        raise QuantizationError(f"{what}: {exc}") from exc


def verify(
    candidate: Path, source: ModelArtifact, data: Dataset | None, batch: int
) -> tuple[IOSpec, dict[str, Any]]:
    """Load and run the quantized model next to the fp32 one; return its I/O and a summary."""
    from device_agent.runtime import open_session

    try:
        session = open_session(candidate)
    except RuntimeLoadError as exc:
        raise RuntimeRefusal(
            "loading the quantized model", strip_prefix(str(exc)), node_in_message(str(exc))
        ) from exc
    try:
        reference = open_session(source.path)
    except RuntimeLoadError as exc:
        raise QuantizationError(f"checking the quantized model: the fp32 model: {exc}") from exc
    feed, kind, expected = _check_inputs(reference, data, batch)
    try:
        outputs = session.run(feed)
    except RuntimeLoadError as exc:
        raise RuntimeRefusal(
            "running the quantized model", strip_prefix(str(exc)), node_in_message(str(exc))
        ) from exc
    return session.io, _compare(session.io, outputs, expected, kind, sample_count(feed))


def _check_inputs(
    reference: ModelSession, data: Dataset | None, batch: int
) -> tuple[dict[str, np.ndarray], str, list[np.ndarray]]:
    """Inputs for the check and the fp32 outputs on them: calibration samples when there are
    any, else generated inputs the fp32 model accepts."""
    fixed = has_fixed_batch(reference.io)
    if data is not None and (not fixed or len(data) >= batch):
        count = batch if fixed else min(len(data), CHECK_SAMPLES)
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
            with native_stderr_to_log():
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


def saturation_note(config: QuantizeConfig, host_saturates: bool) -> str:
    """What to add to a low check's warning when this host's int8 arithmetic, not the model,
    may be what fell short: ONNX Runtime's x86 kernels without VNNI saturate with 8-bit
    weights, so the figure can understate what a board with VNNI or Arm dot-product kernels
    computes. Empty when the host does not saturate or 7-bit weights are already in use."""
    if not host_saturates or config.reduce_range:
        return ""
    return (
        "; this host's int8 arithmetic saturates (x86 without VNNI: ONNX Runtime's VPMADDUBSW "
        "kernels sum 8-bit products in 16 bits), so this figure may understate the model on a "
        "board with VNNI or Arm dot-product kernels; try --reduce-range "
        "(QuantizeConfig(reduce_range=True): 7-bit weights)"
    )


def warn_on_check(
    check: dict[str, Any], config: QuantizeConfig, host_saturates: bool | None = None
) -> None:
    """Warn when the int8 model's check on calibration data is below
    :data:`CHECK_MIN_COSINE`. ``host_saturates``: whether this host's int8 kernels saturate
    (None: from its CPU flags, :func:`sdk.isa.int8_outlook`)."""
    cos = check.get("cosine_min")
    if check.get("inputs") != "calibration" or cos is None or cos >= CHECK_MIN_COSINE:
        return
    if config.op_types is None:
        hint = "quantize only the default op_types"
    elif config.mode == "dynamic":
        hint = "exclude sensitive nodes, or use static mode"
    else:
        hint = "exclude sensitive nodes, or try another calibration method"
    if host_saturates is None:
        from sdk.isa import int8_outlook

        host_saturates = int8_outlook("host").reduce_range
    log.warning(
        "the int8 model's outputs differ from fp32's on calibration data: worst-sample cosine "
        "%.4g (below %.2f); %s%s",
        cos,
        CHECK_MIN_COSINE,
        hint,
        saturation_note(config, host_saturates),
    )


_NODE_PATTERNS = (
    re.compile(r"node with name '([^']+)'"),
    re.compile(r"[Nn]ode\. Name:'([^']+)'"),
    re.compile(r"In Node, \(\"([^\"]+)\""),
    re.compile(r"Node \(([^)]+)\)"),
    re.compile(r"node ([^\s,:]+) of type"),
)


def node_in_message(message: str, model: Path | None = None) -> str | None:
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


def nodes_behind(failed: str, prepared: Path) -> list[str]:
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
