"""Which quantized tensors hurt most: :func:`rank_tensors` scores every tensor a QDQ model
quantizes by the error its own int8 round trip adds on fp32 values (step 2 of
:mod:`sdk.quantize.accuracy_aware`), so the search keeps the worst ones' nodes in float first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import Dataset, sample_count
from sdk.errors import ModelFormatError, QuantizationError

if TYPE_CHECKING:
    import onnx


__all__ = ["TensorSensitivity", "load", "rank_tensors"]

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def rank_tensors(
    quantized: ModelArtifact | str | Path,
    calibration: Dataset,
    fp32: ModelArtifact | str | Path,
    *,
    batch_size: int = 32,
    notes: list[str] | None = None,
) -> list[TensorSensitivity]:
    """Every quantized tensor of a QDQ model, most sensitive first (see the module docstring).

    ``fp32`` is the model ``quantized`` was made from: its node names are the ones
    :class:`~sdk.quantize.QuantizeConfig` ``exclude_nodes`` accepts, and its weights are the
    reference for weight errors.
    """
    q_path = quantized.path if isinstance(quantized, ModelArtifact) else Path(quantized)
    f_path = fp32.path if isinstance(fp32, ModelArtifact) else Path(fp32)
    reference = load(f_path)
    graph = _QdqGraph(load(q_path).graph, [n.name for n in reference.graph.node if n.name])
    unranked: list[str] = []
    activations = graph.activations(reference, unranked)
    results = _activation_errors(reference, activations, calibration, batch_size)
    results += graph.weight_errors(reference)
    if unranked and notes is not None:
        notes.append(f"quantized tensors {unranked} have no fp32 counterpart and were not ranked")
    if graph.unmapped and notes is not None:
        notes.append(
            f"quantized nodes {sorted(graph.unmapped)} have no counterpart in the fp32 model "
            "(renamed by pre-processing) and cannot be excluded by name"
        )
    return sorted(results, key=lambda t: (-t.error, t.tensor))


class _QdqGraph:
    """A QDQ model's graph, indexed: initializers, producers, consumers, and the fp32 model's
    node names its nodes map to (those it cannot map are collected in ``unmapped``)."""

    def __init__(self, graph: onnx.GraphProto, fp32_nodes: list[str]) -> None:
        self.graph = graph
        self.fp32_nodes = fp32_nodes
        self.inits = {i.name: i for i in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.unmapped: set[str] = set()

    def fp32_names(self, nodes: Sequence[onnx.NodeProto]) -> tuple[str, ...]:
        out: list[str] = []
        for node in nodes:
            name = _fp32_name(node.name, self.fp32_nodes)
            if name is None:
                self.unmapped.add(node.name)
            elif name not in out:
                out.append(name)
        return tuple(out)

    def ops_after(self, tensor: str) -> list[onnx.NodeProto]:
        """The compute nodes reading the dequantized ``tensor`` (through its DQ nodes)."""
        found: list[onnx.NodeProto] = []
        for node in self.consumers.get(tensor, []):
            if node.op_type in _QDQ:
                for out in node.output:
                    found.extend(self.ops_after(out))
            else:
                found.append(node)
        return found

    def activations(
        self, reference: onnx.ModelProto, unranked: list[str]
    ) -> list[_ActivationQuant]:
        """How each activation is quantized, under its fp32 name (``unranked``: those with none).

        Activations: x -> QuantizeLinear(scale, zero point) -> DequantizeLinear. The error is
        measured on the fp32 model's own values of x, quantized with the int8 model's scale:
        the quantized model's x may differ (the quantizer drops a ReLU whose clamp the uint8
        range performs, and upstream layers add their own errors).
        """
        from onnx import numpy_helper

        graph, inits = self.graph, self.inits
        consumers, producers = self.consumers, self.producers
        fp32_names, ops_after = self.fp32_names, self.ops_after
        fp32_tensors = {o for n in reference.graph.node for o in n.output}
        fp32_tensors |= {i.name for i in reference.graph.input}
        activations: list[_ActivationQuant] = []
        for node in graph.node:
            if node.op_type != "QuantizeLinear" or node.input[0] in inits:
                continue
            dqs = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
            # The quantized tensor under its fp32 name: the Q input, else the DQ output (an
            # output quantized at the end of the graph keeps its name after the DequantizeLinear).
            names = [node.input[0], *(d.output[0] for d in dqs)]
            fp32_name = next((n for n in names if n in fp32_tensors), None)
            if fp32_name is None or len(node.input) < 2 or node.input[1] not in inits:
                unranked.append(node.input[0])
                continue
            producer = producers.get(node.input[0])
            touching = [producer] if producer is not None and producer.op_type not in _QDQ else []
            touching += ops_after(node.output[0])
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zero = (
                numpy_helper.to_array(inits[node.input[2]])
                if len(node.input) > 2 and node.input[2] in inits
                else np.zeros((), np.uint8)
            )
            info = np.iinfo(zero.dtype) if zero.dtype.kind in "iu" else np.iinfo(np.uint8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            activations.append(
                _ActivationQuant(
                    fp32_name,
                    scale,
                    zero.astype(np.float64),
                    float(info.min),
                    float(info.max),
                    axis,
                    fp32_names(touching),
                )
            )
        return activations

    def weight_errors(self, reference: onnx.ModelProto) -> list[TensorSensitivity]:
        """Each int8 weight against the fp32 model's, per output channel."""
        from onnx import numpy_helper

        graph, inits = self.graph, self.inits
        fp32_names, ops_after = self.fp32_names, self.ops_after
        fp32_weights = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
        results: list[TensorSensitivity] = []
        # Weights: int8 initializer -> DequantizeLinear; compare with the fp32 model's weight.
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            stored = numpy_helper.to_array(inits[node.input[0]])
            if stored.dtype not in (np.int8, np.uint8) or stored.ndim < 2:
                continue  # int32 biases and scalars carry no useful sensitivity
            original_name = node.input[0].removesuffix("_quantized")
            original = fp32_weights.get(original_name)
            if original is None or original.shape != stored.shape:
                continue
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zero = (
                numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] in inits
                else np.zeros_like(scale)
            )
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * stored.ndim
                shape[axis] = scale.size
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            else:
                axis = 0
            dequantized = (stored.astype(np.float64) - zero) * scale
            err, sq = _channel_sums(dequantized, original.astype(np.float64), axis)
            mean, worst = _channel_error(err, sq, per_channel=scale.size > 1)
            results.append(
                TensorSensitivity(
                    original_name,
                    "weight",
                    mean,
                    worst,
                    len(err),
                    fp32_names(ops_after(node.output[0])),
                )
            )
        return results


@dataclass(frozen=True)
class _ActivationQuant:
    """How the int8 model quantizes one activation, and the fp32 tensor it stands for."""

    tensor: str
    scale: np.ndarray
    zero: np.ndarray
    qmin: float
    qmax: float
    axis: int
    nodes: tuple[str, ...]

    def round_trip(self, x: np.ndarray) -> np.ndarray:
        """``dequantize(quantize(x))`` as ONNX defines them (round half to even, saturate)."""
        scale, zero = self.scale, self.zero
        if scale.ndim == 1 and scale.size > 1 and x.ndim > self.axis:
            shape = [1] * x.ndim
            shape[self.axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        q = np.clip(np.rint(x / scale) + zero, self.qmin, self.qmax)
        out: np.ndarray = (q - zero) * scale
        return out


def _activation_errors(
    reference: onnx.ModelProto,
    activations: Sequence[_ActivationQuant],
    data: Dataset,
    batch_size: int,
) -> list[TensorSensitivity]:
    """Run the fp32 model with every quantized activation exposed as an output, put each
    through its int8 round trip, and accumulate per-channel squared error and energy."""
    if not activations:
        return []
    import onnx
    from onnx import helper

    from sdk.quantize.ort_check import probe_session

    probe = onnx.ModelProto()
    probe.CopyFrom(reference)
    graph_inputs = {i.name for i in probe.graph.input}
    existing = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(a.tensor for a in activations if a.tensor not in graph_inputs))
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    session = probe_session(
        probe, "ranking tensors: ONNX Runtime cannot load the fp32 probe", threads=1
    )
    weights = {t.name for t in probe.graph.initializer}
    fixed = _fixed_batch(probe, graph_inputs - weights)
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for feed in data.batches(fixed or batch_size):
        if fixed and sample_count(feed) != fixed:
            continue  # a model exported at batch N takes whole batches of N only
        try:
            values = dict(zip(wanted, session.run(wanted, feed), strict=True))
        except Exception as exc:
            raise QuantizationError(
                f"ranking tensors: running the fp32 probe failed: {exc}"
            ) from exc
        values.update({k: v for k, v in feed.items() if k in graph_inputs})
        for act in activations:
            x = np.asarray(values[act.tensor], dtype=np.float64)
            err, sq = _channel_sums(act.round_trip(x), x, 1)
            if act.tensor in sums:
                e0, s0 = sums[act.tensor]
                err, sq = e0 + err, s0 + sq
            sums[act.tensor] = (err, sq)
    if not sums:
        raise QuantizationError(
            f"ranking tensors: the model takes batches of {fixed} samples and the ranking data "
            f"has {len(data)}"
        )
    out = []
    for act in activations:
        err, sq = sums[act.tensor]
        mean, worst = _channel_error(err, sq)
        out.append(TensorSensitivity(act.tensor, "activation", mean, worst, len(err), act.nodes))
    return out


def _fixed_batch(model: onnx.ModelProto, inputs: set[str]) -> int | None:
    """The batch size a model exported at a fixed batch takes (the smallest fixed first axis
    of its inputs, as evaluate does), else None. EfficientNet-Lite0 exported at batch 1
    failed ranking at 32 samples a run."""
    sizes = {
        i.type.tensor_type.shape.dim[0].dim_value
        for i in model.graph.input
        if i.name in inputs and i.type.tensor_type.shape.dim
    }
    fixed = sizes - {0}  # 0: a symbolic first axis
    return min(fixed) if fixed else None


def _channel_sums(
    approx: np.ndarray, exact: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums of squared error and of squared value (channels along ``axis``)."""
    if exact.ndim < 2:
        diff = float(((approx - exact) ** 2).sum())
        return np.array([diff]), np.array([float((exact**2).sum())])
    moved_err = np.moveaxis((approx - exact) ** 2, axis, 0).reshape(exact.shape[axis], -1)
    moved_sq = np.moveaxis(exact**2, axis, 0).reshape(exact.shape[axis], -1)
    return moved_err.sum(axis=1), moved_sq.sum(axis=1)


def _channel_error(
    err: np.ndarray, sq: np.ndarray, *, per_channel: bool = False
) -> tuple[float, float]:
    """The tensor's score and its worst channel's relative error.

    With one scale for the tensor, the score is the mean per-channel squared error over the
    energy of a typical (median) live channel: a shared scale that rounds the ordinary
    channels away, or adds noise as large as they are, scores near 1 or far more, while a
    well-quantized tensor scores ~1e-4 whatever a few weak channels lose (they carry little of
    the signal). With a scale per channel (weights), each channel's error is relative to its
    own energy and the score is their mean. Silent (all-zero) channels are left out.
    """
    floor = 1e-9 * float(sq.mean()) + 1e-30
    live = sq > floor
    if not live.any():
        return 0.0, 0.0
    relative = err[live] / sq[live]
    if per_channel:
        return float(relative.mean()), float(relative.max())
    typical = float(np.median(sq[live]))
    return float(err[live].mean() / typical), float(relative.max())


def _fp32_name(name: str, fp32_nodes: Sequence[str]) -> str | None:
    """The fp32 node a quantized-model node comes from: the same name, or the longest fp32
    name that prefixes it (pre-processing names fused nodes ``<name>/<Fusion>``)."""
    if name in fp32_nodes:
        return name
    prefixed = [n for n in fp32_nodes if name.startswith(n + "/")]
    return max(prefixed, key=len) if prefixed else None


def load(path: Path) -> onnx.ModelProto:
    from sdk.onnx_tools import load_onnx

    try:
        model: onnx.ModelProto = load_onnx(path)
    except ModelFormatError as exc:
        raise QuantizationError(f"reading {path.name}: {exc}") from exc
    return model


@dataclass(frozen=True)
class TensorSensitivity:
    """How badly one quantized tensor quantizes, and the nodes that keep it in float.

    ``error``: the mean per-channel squared error of its quantize-dequantize round trip over
    the energy of its median channel; ``worst_channel``: the largest single channel's error
    relative to that channel's own energy; ``nodes``: the fp32 model's
    node names to exclude so the tensor is no longer quantized.
    """

    tensor: str
    kind: Literal["activation", "weight"]
    error: float
    worst_channel: float
    channels: int
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "error": self.error,
            "worst_channel": self.worst_channel,
            "channels": self.channels,
            "nodes": list(self.nodes),
        }
