"""Per-node latency of an ONNX model under ONNX Runtime, keyed by the model's own node names.

Whether int8 pays is a question about kernels, not models: on depthwise-separable nets with
hard-swish and squeeze-excite blocks (PP-OCR, PP-LCNet, MobileNet) ORT's int8 convolutions can
be faster than fp32's while the QuantizeLinear/DequantizeLinear pairs around every float
operator, and the layout changes int8 kernels bring, cost more than they save. This module
measures where the time goes, so a quantizer can keep the nodes that lose in float
(:mod:`sdk.optimize.stages.latency_aware`).

:func:`profile_nodes` runs the model in an ``InferenceSession`` set up as the board's
(:class:`device_agent.runtime.OnnxSession`: CPU provider, sequential, ``threads`` intra-op
threads, every graph optimization) with ORT's profiler on, and reads the JSON trace: each
``Node`` event ``<runtime node>_kernel_time`` has its ``dur`` (µs) and ``args.op_name``. Only
the timed runs count (the events inside the last ``runs`` ``model_run`` events); times are
medians over those runs (a stall of a busy machine lands on one node of one run). ORT
optimizes the graph before it runs it, so the runtime's nodes are not the model's. They are
mapped back (the optimized graph is saved next to the trace to read tensors):

1. a runtime node with a model node's name is that node;
2. ``<tensor>_nchwc`` (x86's blocked-layout convolution, named after its output tensor) is the
   node that produced that tensor;
3. otherwise the model node whose name is the longest prefix of the runtime name followed by
   ``_`` or ``/`` (``/c0/Conv_token_1`` is the QLinearConv fused from ``/c0/Conv``;
   ``..._DequantizeLinear/duplicated`` is a copy of that DequantizeLinear); and a convolution
   kernel found under an operator that is not one (ORT folds BatchNormalization, activations
   and a residual Add into the convolution and names it after the last of them) is the
   convolution that chain starts from;
4. a layout node ORT inserted (``Transpose``, ``ReorderInput``, ``ReorderOutput``) belongs to
   the node it feeds from or, failing that, the node it feeds: it exists for that node's kernel;
5. anything else is ``unattributed`` (kept by runtime name, with its time).

:func:`int8_costs` turns a profile of a QDQ int8 model into what each quantized node costs: its
fused int8 kernel plus an equal share of every QuantizeLinear/DequantizeLinear node around it
(a Q/DQ pair on a tensor is shared by the quantized producer and the quantized consumers of
that tensor; a weight's DequantizeLinear belongs to its consumer).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.errors import ConfigError, QuantizationError

__all__ = [
    "NodeProfile",
    "NodeTime",
    "compute_node_names",
    "int8_costs",
    "profile_nodes",
]

#: Timed runs per profile and untimed runs before them (module defaults, read by the stage).
PROFILE_RUNS = 10
WARMUP_RUNS = 3

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_LAYOUT = ("Transpose", "ReorderInput", "ReorderOutput")
# Operators whose int8 form is a fused kernel (QLinearConv, QGemm, MatMulInteger, ...) and
# into which ORT folds a following activation.
_COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm")
# The runtime's kernels for those (fp32 and int8 forms).
_KERNELS = (
    *_COMPUTE,
    "FusedMatMul",
    "NchwcConv",
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
)
_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class NodeTime:
    """One model node's share of a run: µs per run (medians) of the kernels mapped to it."""

    node: str
    op_type: str
    us: float
    kernels: tuple[str, ...]  # the runtime's op types that ran for it (QLinearConv, ...)


@dataclass(frozen=True)
class NodeProfile:
    """Per-node times of one model (``nodes``, keyed by the model's node names), the runtime
    nodes no model node could be found for (``unattributed``, runtime name -> µs), and the
    median wall time of one run (``wall_us``, ORT's ``model_run`` event) over ``runs`` runs."""

    nodes: dict[str, NodeTime]
    unattributed: dict[str, float]
    wall_us: float
    runs: int
    threads: int
    kernels_us: float = field(default=0.0)  # the sum of every kernel's median

    def us(self, node: str) -> float:
        found = self.nodes.get(node)
        return 0.0 if found is None else found.us


def profile_nodes(
    model: str | Path,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = PROFILE_RUNS,
    warmup: int = WARMUP_RUNS,
    threads: int = 1,
) -> NodeProfile:
    """Profile ``model`` on ``feed`` (one real sample, batch as the board runs it) and return
    its per-node times (module docstring). Raises :class:`ConfigError` for bad settings and
    :class:`QuantizationError` when ONNX Runtime cannot load or run the model."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError(
            f"profile_nodes: runs >= 1, warmup >= 0, threads >= 1 (got {runs}, {warmup}, {threads})"
        )
    import onnxruntime as ort

    path = Path(model)
    with tempfile.TemporaryDirectory(prefix="edgeship-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "trace")
        optimized = Path(tmp) / "optimized.onnx"
        opts.optimized_model_filepath = str(optimized)
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for _ in range(warmup + runs):
                session.run(None, dict(feed))
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text(encoding="utf-8"))
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QuantizationError(f"profiling {path.name}: {first}") from exc
        runtime = _runtime_graph(optimized)
    kernels, wall = _timed_kernels(events, runs)
    return _attribute(path, runtime, kernels, wall, runs, threads)


def _timed_kernels(
    events: Sequence[Mapping[str, Any]], runs: int
) -> tuple[dict[str, tuple[str, float]], float]:
    """Runtime node -> (op, median µs per timed run), and the median wall µs of a run. Medians,
    not means: a busy machine's occasional stall would otherwise land on whichever node ran."""
    model_runs = sorted(
        (e for e in events if e.get("name") == "model_run"), key=lambda e: int(e["ts"])
    )[-runs:]
    if not model_runs:
        raise QuantizationError("the profiler recorded no model_run event")
    windows = [(int(e["ts"]), int(e["ts"]) + int(e["dur"])) for e in model_runs]
    per_run: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(_SUFFIX):
            continue
        ts = int(e["ts"])
        window = next((i for i, (lo, hi) in enumerate(windows) if lo <= ts <= hi), None)
        if window is None:
            continue
        node = name[: -len(_SUFFIX)]
        ops[node] = str((e.get("args") or {}).get("op_name", "?"))
        per_run.setdefault(node, [0.0] * len(windows))[window] += float(e["dur"])
    kernels = {n: (ops[n], float(np.median(times))) for n, times in per_run.items()}
    wall = float(np.median([hi - lo for lo, hi in windows]))
    return kernels, wall


@dataclass(frozen=True)
class _Graph:
    ops: dict[str, str]  # node -> op type
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    producer: dict[str, str]  # tensor -> node
    consumers: dict[str, list[str]]  # tensor -> nodes


def _graph(proto: Any) -> _Graph:
    ops: dict[str, str] = {}
    inputs: dict[str, list[str]] = {}
    outputs: dict[str, list[str]] = {}
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        ops[node.name] = node.op_type
        inputs[node.name] = [t for t in node.input if t]
        outputs[node.name] = [t for t in node.output if t]
        for t in node.output:
            producer[t] = node.name
        for t in node.input:
            consumers.setdefault(t, []).append(node.name)
    return _Graph(ops, inputs, outputs, producer, consumers)


def _runtime_graph(optimized: Path) -> _Graph:
    import onnx

    if not optimized.is_file():
        return _Graph({}, {}, {}, {}, {})
    return _graph(onnx.load(str(optimized), load_external_data=False))


def _model_graph(path: Path) -> _Graph:
    import onnx

    return _graph(onnx.load(str(path), load_external_data=False))


def _source(name: str, op: str, model: _Graph, by_length: Sequence[str]) -> str | None:
    """Rules 1-3 of the module docstring: the model node a runtime node was made from."""
    found = name if name in model.ops else None
    if found is None and name.endswith("_nchwc"):
        found = model.producer.get(name[: -len("_nchwc")])
    if found is None:
        found = next((c for c in by_length if name.startswith(c) and name[len(c)] in "_/"), None)
    if found is not None and op in _KERNELS and model.ops[found] not in _COMPUTE:
        return _fused_into(found, model) or found
    return found


def _fused_into(node: str, model: _Graph, steps: int = 4) -> str | None:
    """The convolution (or Gemm, MatMul) a chain of operators ending at ``node`` was fused
    into: ORT folds BatchNormalization, activations and a residual Add into the kernel and
    names it after the last of them. Walks back through single inputs; at a node fed by
    several, only a directly feeding compute node is taken."""
    for _ in range(steps):
        feeds = [
            model.producer[t]
            for t in model.inputs.get(node, [])
            if t in model.producer and model.ops[model.producer[t]] != "Constant"
        ]
        compute = [f for f in feeds if model.ops[f] in _COMPUTE]
        if len(feeds) != 1:
            return compute[0] if len(compute) == 1 else None
        node = feeds[0]
        if compute:
            return node
    return None


def _attribute(
    path: Path,
    runtime: _Graph,
    kernels: Mapping[str, tuple[str, float]],
    wall: float,
    runs: int,
    threads: int,
) -> NodeProfile:
    model = _model_graph(path)
    by_length = sorted((n for n in model.ops if n), key=len, reverse=True)
    mapped: dict[str, str | None] = {
        r: _source(r, op, model, by_length) for r, (op, _) in kernels.items()
    }
    for r, (op, _) in kernels.items():  # rule 4: layout nodes inherit a neighbour's node
        if mapped[r] is None and op in _LAYOUT:
            mapped[r] = _neighbour(r, runtime, mapped)
    totals: dict[str, float] = {}
    ran: dict[str, list[str]] = {}
    unattributed: dict[str, float] = {}
    for r, (op, us) in kernels.items():
        node = mapped[r]
        if node is None:
            unattributed[r] = us
            continue
        totals[node] = totals.get(node, 0.0) + us
        ran.setdefault(node, []).append(op)
    nodes = {n: NodeTime(n, model.ops[n], t, tuple(sorted(set(ran[n])))) for n, t in totals.items()}
    kernels_us = sum(us for _, us in kernels.values())
    return NodeProfile(nodes, unattributed, wall, runs, threads, kernels_us)


def _neighbour(r: str, runtime: _Graph, mapped: Mapping[str, str | None]) -> str | None:
    for t in runtime.inputs.get(r, []):
        source = runtime.producer.get(t)
        if source is not None and mapped.get(source):
            return mapped[source]
    for t in runtime.outputs.get(r, []):
        for consumer in runtime.consumers.get(t, []):
            if mapped.get(consumer):
                return mapped[consumer]
    return None


# --- int8: what each quantized node costs -------------------------------------------------


def compute_node_names(qdq_model: str | Path, op_types: Sequence[str] | None) -> dict[str, str]:
    """The quantized nodes of a QDQ model (name -> op type, in graph order): nodes of
    ``op_types`` (any type when None), other than Q/DQ, with an input that a DequantizeLinear
    produces."""
    graph = _model_graph(Path(qdq_model))
    return {n: op for n, op in graph.ops.items() if _is_quantized(n, graph, op_types)}


def _is_quantized(node: str, graph: _Graph, op_types: Sequence[str] | None) -> bool:
    op = graph.ops[node]
    if op in _QDQ or (op_types is not None and op not in op_types):
        return False
    return any(
        graph.ops.get(graph.producer.get(t, ""), "") == "DequantizeLinear"
        for t in graph.inputs[node]
    )


def int8_costs(
    profile: NodeProfile, qdq_model: str | Path, op_types: Sequence[str] | None
) -> dict[str, float]:
    """Each quantized node's µs per run in ``profile`` (a profile of ``qdq_model``): its own
    kernels plus an equal share of every Q/DQ node around it (module docstring)."""
    graph = _model_graph(Path(qdq_model))
    quantized = set(compute_node_names(qdq_model, op_types))
    costs = {n: profile.us(n) for n in quantized}
    for name, timed in profile.nodes.items():
        if graph.ops.get(name) not in _QDQ:
            continue
        owners = sorted(_pair_owners(name, graph) & quantized)
        for owner in owners:
            costs[owner] += timed.us / len(owners)
    return costs


def _pair_owners(qdq: str, graph: _Graph) -> set[str]:
    """The nodes a Q or DQ node serves: the producer of the tensor its pair quantizes and every
    consumer of that pair's DequantizeLinear outputs."""
    start = qdq
    if graph.ops[qdq] == "DequantizeLinear":
        before = graph.producer.get(graph.inputs[qdq][0]) if graph.inputs[qdq] else None
        if before is None:  # a weight's or a constant's DQ: its consumers own it
            return set(_consumers_of(qdq, graph))
        if graph.ops[before] == "QuantizeLinear":
            start = before
    tensor = graph.inputs[start][0] if graph.inputs[start] else ""
    owners: set[str] = set()
    if tensor in graph.producer:
        owners.add(graph.producer[tensor])
    for dq in (c for t in graph.outputs[start] for c in graph.consumers.get(t, [])):
        owners.update(_consumers_of(dq, graph) if graph.ops[dq] == "DequantizeLinear" else [dq])
    return owners


def _consumers_of(node: str, graph: _Graph) -> list[str]:
    return [c for t in graph.outputs[node] for c in graph.consumers.get(t, [])]
