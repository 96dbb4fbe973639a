"""Empirical bias correction of a static int8 (QDQ) model: each quantized Conv's int32 bias is
shifted so that, on calibration data, the mean of each of its output channels is what the float
Conv gives on the same input.

Why: int8 rounding of weights and activations is not zero-mean per channel. A depthwise conv's
3x3 kernels round coarsely, and an activation channel far narrower than the others in its
per-tensor range rounds to a few levels, or all to zero (a "lost" channel): the next conv then
sees a constant where a small signal was, and every output channel it feeds is shifted. The
shifts add up through the network (EfficientNet-Lite0 all-ops int8 flips 6% of fp32's top-1
answers on photo crops; docs/benchmarks.md (m)). Moving each bias by the mean error it sees
removes the shift without changing the graph, the kernels or the speed.

How, for each Conv of the quantized model whose bias is an int32 initializer behind a
DequantizeLinear (ORT's QDQ form) and which has a float twin of the same name in the
pre-processed fp32 model:

* the *local* error is measured, not the error against the fp32 model's own tensors: a float
  Conv with the fp32 weights and bias is added beside the int8 one and fed the same float input
  the int8 Conv's input was quantized from (clipped to that input's int8 range, as the
  runtime's QuantizeLinear does). Comparing with the fp32 model's tensors would count every
  upstream error again at every layer, and correcting all layers at once then overshoots and
  diverges (tried: EfficientNet-Lite0 went to 0% agreement in three passes);
* both outputs are clipped to the int8 range of the Conv's output (where ORT folded a Relu or
  Clip into the Conv, that range is the activation's), averaged over samples and positions per
  channel, and the int32 bias is moved by the difference over its scale;
* the pass repeats (:data:`PASSES`): each Conv's input changes once the Convs before it are
  corrected.

The DFQ paper (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction") corrects the weight rounding's expected error analytically; this module measures it
on the calibration data, activation rounding and clipping included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdk.data import Dataset, take_samples
from sdk.errors import QuantizationError

__all__ = ["PASSES", "SAMPLES", "correct_biases", "describe", "prepare_for_correction"]

#: Correction passes over the calibration samples (EfficientNet-Lite0's worst per-channel shift:
#: 0.35, 0.068, 0.024, 0.011 after passes 1-4; its agreement with fp32 was the same after 2 and 4).
PASSES = 3
#: At most this many calibration samples are used: a per-channel mean settles long before.
SAMPLES = 64


@dataclass(frozen=True)
class _Conv:
    output: str  # the int8 Conv's output tensor
    bias: str  # its int32 bias initializer
    scale: str  # the bias's dequantization scale initializer
    node: Any  # the int8 Conv NodeProto
    weight: np.ndarray  # the fp32 twin's weight
    fp32_bias: np.ndarray
    source: str  # the float tensor the int8 Conv's input was quantized from


def prepare_for_correction(prepared: Path) -> None:
    """Make every Conv of the pre-processed fp32 model correctable before it is quantized: an
    unnamed Conv gets a name (its float twin is found by name) and a Conv without a bias gets a
    zero one (ORT then quantizes it to an int32 bias that can be moved). Neither changes what
    the model computes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(prepared))
    inits = {i.name: i for i in model.graph.initializer}
    taken = {n.name for n in model.graph.node}
    changed = False
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv":
            continue
        if not node.name:
            name = f"edgeship_conv_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if len(node.input) == 2 and weight is not None and weight.dims:
            bias = f"{node.name}_edgeship_zero_bias"
            model.graph.initializer.append(
                numpy_helper.from_array(np.zeros(weight.dims[0], np.float32), bias)
            )
            node.input.append(bias)
            changed = True
    if changed:
        onnx.save(model, str(prepared))


def correct_biases(
    reference: Path, candidate: Path, data: Dataset, batch: int, fixed_batch: bool
) -> dict[str, Any]:
    """Correct ``candidate``'s Conv biases in place against ``reference`` (the fp32 model it was
    quantized from, after pre-processing) on ``data``; returns what was done: ``convs``
    corrected, ``samples`` and ``passes`` used, and ``worst_shift`` per pass (the largest
    per-channel mean error measured before that pass's correction)."""
    import onnx

    model = onnx.load(str(candidate))
    convs = _corrigible(model, onnx.load(str(reference)))
    if not convs:
        return {"convs": 0, "note": "no Conv with an int32 bias and a float twin to correct"}
    step = batch if fixed_batch else 1  # one sample at a time: every conv output is kept
    count = min(len(data) // step, max(SAMPLES // step, 1)) * step
    if count == 0:
        return {"convs": 0, "note": f"fewer than one batch of {step} calibration samples"}
    feeds = [take_samples(data.inputs, lo, lo + step) for lo in range(0, count, step)]
    ranges = _ranges(model)  # QuantizeLinear scales stay as they are: only biases move
    shifts = []
    for _ in range(PASSES):
        shifts.append(_correct_once(model, convs, feeds, ranges))
    try:
        onnx.save(model, str(candidate))
    except (OSError, ValueError) as exc:
        raise QuantizationError(f"bias correction: writing the corrected model: {exc}") from exc
    return {
        "convs": len(convs),
        "samples": count,
        "passes": PASSES,
        "worst_shift": [round(s, 6) for s in shifts],
    }


def describe(done: Any) -> str:
    """One line on what :func:`correct_biases` did (its returned dict, as kept in a quantized
    artifact's ``details["bias_correction"]``)."""
    if not isinstance(done, dict):
        return "nothing corrected"
    shifts = done.get("worst_shift")
    if not done.get("convs") or not isinstance(shifts, list):
        return str(done.get("note", "nothing corrected"))
    moved = " -> ".join(f"{float(v):.3g}" for v in shifts)
    return (
        f"{done['convs']} Conv biases moved on {done.get('samples')} calibration samples "
        f"(worst channel mean error per pass: {moved})"
    )


def _corrigible(model: Any, reference: Any) -> list[_Conv]:
    from onnx import TensorProto, numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    twins = {n.name: n for n in reference.graph.node if n.op_type == "Conv" and n.name}
    ref_inits = {i.name: i for i in reference.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not node.name:
            continue
        dq = producer.get(node.input[2])
        twin = twins.get(node.name)
        if dq is None or dq.op_type != "DequantizeLinear" or twin is None or len(twin.input) < 3:
            continue
        bias, scale = inits.get(dq.input[0]), inits.get(dq.input[1])
        w, b = ref_inits.get(twin.input[1]), ref_inits.get(twin.input[2])
        if bias is None or scale is None or bias.data_type != TensorProto.INT32 or not w or not b:
            continue
        fp32_bias = numpy_helper.to_array(b).astype(np.float32)
        if fp32_bias.shape != numpy_helper.to_array(bias).shape:
            continue
        weight = numpy_helper.to_array(w).astype(np.float32)
        source = _source(node, producer)
        found.append(_Conv(node.output[0], bias.name, scale.name, node, weight, fp32_bias, source))
    return found


def _source(node: Any, producer: dict[str, Any]) -> str:
    """The float tensor the Conv's first input was quantized from (the input itself when it was
    not quantized)."""
    dq = producer.get(node.input[0])
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return str(q.input[0])
    return str(node.input[0])


def _ranges(model: Any) -> dict[str, tuple[float, float]]:
    """Each quantized tensor's representable float range, from its QuantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    ranges = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        if scale.size != 1:
            continue
        zp = (
            numpy_helper.to_array(inits[node.input[2]])
            if len(node.input) > 2 and node.input[2] in inits
            else np.zeros((), np.uint8)
        )
        info = np.iinfo(zp.dtype)
        s, z = float(scale.reshape(())), float(zp.reshape(()))
        ranges[node.input[0]] = ((info.min - z) * s, (info.max - z) * s)
    return ranges


def _correct_once(
    model: Any,
    convs: list[_Conv],
    feeds: list[dict[str, np.ndarray]],
    ranges: dict[str, tuple[float, float]],
) -> float:
    """One pass: measure every Conv's per-channel mean error, move its bias; the worst error."""
    from onnx import numpy_helper

    probe, names = _probe(model, convs, ranges)
    means = _channel_means(probe, names, feeds, ranges)
    inits = {i.name: i for i in model.graph.initializer}
    worst = 0.0
    for conv in convs:
        error = means[conv.output] - means[_ref(conv)]
        if not np.isfinite(error).all():
            raise QuantizationError(
                f"bias correction: Conv {conv.node.name!r} gives non-finite outputs on the "
                "calibration data (NaN or inf in the inputs?); check the data or quantize "
                "without bias correction"
            )
        scale = numpy_helper.to_array(inits[conv.scale]).astype(np.float64)
        bias = numpy_helper.to_array(inits[conv.bias]).astype(np.int64)
        moved = bias - np.round(error / scale).astype(np.int64)
        fixed = np.clip(moved, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        inits[conv.bias].CopyFrom(numpy_helper.from_array(fixed.reshape(bias.shape), conv.bias))
        worst = max(worst, float(np.abs(error).max()))
    return worst


def _ref(conv: _Conv) -> str:
    return f"{conv.output}__edgeship_fp32"


def _probe(
    model: Any, convs: list[_Conv], ranges: dict[str, tuple[float, float]]
) -> tuple[Any, list[str]]:
    """A copy of ``model`` with each Conv's float twin beside it and both outputs exposed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    names: list[str] = []
    for i, conv in enumerate(convs):
        tag = f"__edgeship_bc{i}"
        source = conv.source
        if source in ranges:  # the runtime sees the input clipped to its int8 range
            lo, hi = ranges[source]
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(lo, np.float32), f"{tag}_lo"),
                    numpy_helper.from_array(np.array(hi, np.float32), f"{tag}_hi"),
                ]
            )
            graph.node.append(
                helper.make_node("Clip", [source, f"{tag}_lo", f"{tag}_hi"], [f"{tag}_x"])
            )
            source = f"{tag}_x"
        graph.initializer.extend(
            [
                numpy_helper.from_array(conv.weight, f"{tag}_w"),
                numpy_helper.from_array(conv.fp32_bias, f"{tag}_b"),
            ]
        )
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.node.attribute}
        graph.node.append(
            helper.make_node("Conv", [source, f"{tag}_w", f"{tag}_b"], [_ref(conv)], **attrs)
        )
        names += [conv.output, _ref(conv)]
    have = {o.name for o in graph.output}
    graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have
    )
    return probe, names


def _channel_means(
    probe: Any,
    names: list[str],
    feeds: list[dict[str, np.ndarray]],
    ranges: dict[str, tuple[float, float]],
) -> dict[str, np.ndarray]:
    from sdk.quantize.ort_check import probe_session

    session = probe_session(probe, "bias correction: loading the probe model")
    sums: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, y in zip(names, session.run(names, feed), strict=True):
            bounds = ranges.get(name.removesuffix("__edgeship_fp32"))
            if bounds is not None:
                y = np.clip(y, *bounds)
            axes = tuple(a for a in range(y.ndim) if a != 1)
            total = y.astype(np.float64).sum(axis=axes) / (y.size / y.shape[1])
            sums[name] = sums[name] + total if name in sums else total
    return {name: total / len(feeds) for name, total in sums.items()}
