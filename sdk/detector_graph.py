"""The outlier detector as ONNX nodes, merged into the model graph at packaging time.

On the board, scoring with numpy costs tens of microseconds per call at batch size 1 (each
small numpy call costs about a microsecond); the same arithmetic as a few ONNX nodes inside
the model's own graph costs a few microseconds and comes out of the same ``session.run`` as
the model's outputs. :func:`merge_detector` appends those nodes to an ONNX model and adds one
graph output (:data:`SCORE_OUTPUT`, float64, one score per sample); the bundle manifest names
it in ``detector.graph_output`` so the agent hides it from the user's outputs (see
``docs/bundle.md``). The numpy detector (``device_agent.detectors``) stays the reference: the
nodes compute the same formulas in float64, and :func:`merge_detector` checks the merged
model's score against numpy's on random inputs before it returns.

Only what has a faithful graph form is exported: every registered kind, with a source tensor
whose non-batch dimensions are fixed. Anything else raises :class:`NotExportable` and the
bundle keeps numpy scoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.detectors import (
    CombinedDetector,
    Detector,
    EnergyDetector,
    FeatureSource,
    MahalanobisDetector,
    MaxSoftmaxDetector,
)
from sdk.errors import EdgeshipError

__all__ = ["SCORE_OUTPUT", "NotExportable", "merge_detector"]

SCORE_OUTPUT = "edgeship_outlier_score"
_PREFIX = "edgeship_det/"


class NotExportable(EdgeshipError):
    """The detector (or the model it reads) has no graph form here; numpy scoring remains."""


class _Builder:
    """Appends named nodes and float64 constants to a graph, under one name prefix."""

    def __init__(self, graph: Any, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{_PREFIX}{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float64) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str = "", **attrs: Any) -> str:
        from onnx import helper

        out = self._name(hint or op.lower())
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def reduce(self, op: str, x: str, axis: int | list[int], keepdims: int) -> str:
        axes = [axis] if isinstance(axis, int) else axis
        # ReduceSum took its axes as an input from opset 13, the other reductions from 18.
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.const(axes, "axes", np.int64)], keepdims=keepdims)
        return self.node(op, [x], axes=axes, keepdims=keepdims)


def _source_tensor(b: _Builder, src: FeatureSource, graph_io: dict[str, Any]) -> tuple[str, Any]:
    """The graph tensor a feature source reads, and its ONNX value info."""
    if src.kind == "input":
        if src.name not in graph_io["inputs"]:
            raise NotExportable(f"the detector reads input {src.name!r}, not in the graph")
        return src.name, graph_io["inputs"][src.name]
    outputs = graph_io["outputs"]
    if src.index >= len(outputs):
        raise NotExportable(f"the detector reads output {src.index}; the graph has {len(outputs)}")
    info = outputs[src.index]
    return info.name, info


def _fixed_shape(info: Any) -> list[int]:
    """Dims of a value info; the batch axis as -1, every other axis must be a fixed size."""
    dims = info.type.tensor_type.shape.dim
    if not dims:
        raise NotExportable(f"{info.name}: unknown rank")
    shape = [-1]
    for d in list(dims)[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise NotExportable(f"{info.name}: a non-batch axis has no fixed size")
        shape.append(int(d.dim_value))
    return shape


def _features(b: _Builder, src: FeatureSource, graph_io: dict[str, Any]) -> tuple[str, int]:
    """``FeatureSource.features`` as nodes: (batch, d) float64, and d."""
    name, info = _source_tensor(b, src, graph_io)
    shape = _fixed_shape(info)
    x = b.node("Cast", [name], "cast", to=11)  # 11 = DOUBLE
    if src.pool > 1:
        f, rank = src.pool, len(shape)
        if rank < 3:
            raise NotExportable("pooling needs an image batch (rank >= 3)")
        ax_h, ax_w = (rank - 3, rank - 2) if src.channels_last else (rank - 2, rank - 1)
        if ax_h == 0:
            raise NotExportable("pooling over the batch axis has no graph form")
        h, w = shape[ax_h] // f, shape[ax_w] // f
        if h == 0 or w == 0:
            raise NotExportable(f"pool factor {f} is larger than the image")
        starts = b.const([0, 0], "starts", np.int64)
        ends = b.const([h * f, w * f], "ends", np.int64)
        axes = b.const([ax_h, ax_w], "axes", np.int64)
        x = b.node("Slice", [x, starts, ends, axes], "crop")
        split = list(shape)
        split[ax_w : ax_w + 1] = [w, f]
        split[ax_h : ax_h + 1] = [h, f]
        x = b.node("Reshape", [x, b.const(split, "shape", np.int64)], "split")
        x = b.reduce("ReduceMean", x, [ax_h + 1, ax_w + 2], keepdims=0)
        pooled = list(shape)
        pooled[ax_h], pooled[ax_w] = h, w
        shape = pooled
    d = int(np.prod(shape[1:]))
    return b.node("Flatten", [x], "flat", axis=1), d


@dataclass(frozen=True)
class _Raw:
    """A detector's raw score as ``a * t + b``, ``t`` a graph tensor of shape (batch, 1).

    Keeping the affine part symbolic lets the calibration fold it into its constants instead
    of spending a node (a fraction of a microsecond each at batch size 1) on it.
    """

    tensor: str
    a: float = 1.0
    b: float = 0.0


# Up to this many features the Mahalanobis precision matrix's square root (d x d, float64)
# is stored whole, which turns the score into one product and one sum of squares.
_DENSE_FEATURES = 512


def _mahalanobis(b: _Builder, det: MahalanobisDetector, graph_io: dict[str, Any]) -> _Raw:
    x, d = _features(b, det.source, graph_io)
    if d != det.mean.shape[0]:
        raise NotExportable(f"the detector expects {det.mean.shape[0]} features, the graph has {d}")
    w, lam, s2 = det.components, det.variances, det.residual_variance
    orthonormal = np.allclose(w.T @ w, np.eye(w.shape[1]), rtol=0.0, atol=1e-9)
    if d <= _DENSE_FEATURES and orthonormal:
        # score = c^T P c / d with P = W diag(1/lam) W^T + (I - W W^T) / s2; P = L L with the
        # symmetric square root L = I / sqrt(s2) + W diag(1/sqrt(lam) - 1/sqrt(s2)) W^T, and
        # (x - mu) L = x L - mu L is one Gemm.
        root = (np.eye(d) / math.sqrt(s2) + (w * (lam**-0.5 - s2**-0.5)) @ w.T) / math.sqrt(d)
        shift = b.const((-(det.mean @ root)).reshape(1, -1), "shift")
        y = b.node("Gemm", [x, b.const(root, "root"), shift], "whitened")
        return _Raw(b.reduce("ReduceSumSquare", y, 1, keepdims=1))
    centred = b.node("Sub", [x, b.const(det.mean, "mean")], "centred")
    # score * d = ||c||^2 / s2 + sum_i z_i^2 (1/lam_i - 1/s2), z = W^T c
    z = b.node("MatMul", [centred, b.const(w, "components")], "z")
    coef = (1.0 / lam - 1.0 / s2) / d
    inside = b.node("MatMul", [b.node("Mul", [z, z]), b.const(coef.reshape(-1, 1), "coef")])
    total = b.reduce("ReduceSumSquare", centred, 1, keepdims=1)
    scaled = b.node("Mul", [total, b.const(1.0 / (s2 * d), "inv_res")])
    return _Raw(b.node("Add", [scaled, inside], "mahalanobis"))


def _scaled_logits(b: _Builder, output: int, temperature: float, graph_io: dict[str, Any]) -> str:
    name, info = _source_tensor(b, FeatureSource("output", index=output), graph_io)
    if len(_fixed_shape(info)) != 2:
        raise NotExportable(f"{info.name}: logits detectors need (batch, classes) logits")
    s = b.node("Cast", [name], "logits", to=11)
    if temperature != 1.0:
        s = b.node("Div", [s, b.const(temperature, "t")], "scaled")
    return s


def _energy(b: _Builder, det: EnergyDetector, graph_io: dict[str, Any]) -> _Raw:
    s = _scaled_logits(b, det.output, det.temperature, graph_io)
    lse = b.reduce("ReduceLogSumExp", s, 1, keepdims=1)
    return _Raw(lse, a=-det.temperature)


def _max_softmax(b: _Builder, det: MaxSoftmaxDetector, graph_io: dict[str, Any]) -> _Raw:
    s = _scaled_logits(b, det.output, det.temperature, graph_io)
    top = b.reduce("ReduceMax", s, 1, keepdims=1)
    total = b.reduce("ReduceSum", b.node("Exp", [b.node("Sub", [s, top])]), 1, keepdims=1)
    return _Raw(b.node("Reciprocal", [total]), a=-1.0, b=1.0)  # 1 - 1 / sum exp(s - max)


def _combined(b: _Builder, det: CombinedDetector, graph_io: dict[str, Any]) -> str:
    """``det.score``: every component's weighted surprise, then their max or sum.

    Each surprise (np.interp over the calibration quantiles plus the exponential tail) is a
    sum of hinges, ``f(s) = sum_j dslope_j * relu(s - xp_j)`` (``f(xp_0) = 0``), plus a step
    ``rise_j * [s >= xp_j]`` at each tie (a zero-width segment, taken as np.interp takes it).
    The raw scores' affine maps and the weights fold into the constants, and all components
    share one Gemm (``t_i - knot`` per column), one Relu and one product, so the whole
    calibration is about five nodes whatever the number of components.
    """
    raws = [_raw_nodes(b, c, graph_io) for c in det.components]
    signs, knots, coeffs, owner, jumps = [], [], [], [], []
    for i, (raw, cal, w) in enumerate(zip(raws, det.calibrations, det.weights, strict=True)):
        xp, fp = cal.quantiles, cal._nodes
        if fp[0] != 0.0 or raw.a == 0.0:
            raise NotExportable("calibration nodes that do not start at 0")
        width, rise = np.diff(xp), np.diff(fp)
        ramp = width > 0
        slopes = np.append(np.where(ramp, rise / np.where(ramp, width, 1.0), 0.0), cal._inv_tail)
        dslope = np.diff(slopes, prepend=0.0)
        sign = 1.0 if raw.a > 0 else -1.0
        # relu(a t + c - x) = |a| relu(sign (t - (x - c) / a))
        signs.append(np.full(xp.shape[0], sign))
        knots.append(-sign * (xp - raw.b) / raw.a)
        coeffs.append(float(w) * abs(raw.a) * dslope)
        owner.append(np.full(xp.shape[0], i))
        jumps.append(float(w) * np.append(np.where(ramp, 0.0, rise), 0.0))
    n, cols = len(raws), np.concatenate(owner)
    select = np.zeros((n, cols.shape[0]))
    select[cols, np.arange(cols.shape[0])] = np.concatenate(signs)
    per_part = np.zeros((cols.shape[0], n))
    per_part[np.arange(cols.shape[0]), cols] = np.concatenate(coeffs)
    t = raws[0].tensor if n == 1 else b.node("Concat", [r.tensor for r in raws], axis=1)
    g = b.node("Gemm", [t, b.const(select), b.const(np.concatenate(knots).reshape(1, -1))])
    parts = b.node("MatMul", [b.node("Relu", [g]), b.const(per_part, "coeffs")], "surprise")
    step = np.concatenate(jumps)
    if step.any():
        step_matrix = np.zeros((cols.shape[0], n))
        step_matrix[np.arange(cols.shape[0]), cols] = step
        reached = b.node("Cast", [b.node("GreaterOrEqual", [g, b.const(0.0)])], to=11)
        parts = b.node("Add", [parts, b.node("MatMul", [reached, b.const(step_matrix)])])
    if det.reduce == "max":
        return b.reduce("ReduceMax", parts, 1, keepdims=0)
    return b.reduce("ReduceSum", parts, 1, keepdims=0)


def _raw_nodes(b: _Builder, det: Detector, graph_io: dict[str, Any]) -> _Raw:
    if isinstance(det, MahalanobisDetector):
        return _mahalanobis(b, det, graph_io)
    if isinstance(det, EnergyDetector):
        return _energy(b, det, graph_io)
    if isinstance(det, MaxSoftmaxDetector):
        return _max_softmax(b, det, graph_io)
    raise NotExportable(f"no graph form for the {det.kind!r} detector")


def _detector_nodes(b: _Builder, det: Detector, graph_io: dict[str, Any]) -> str:
    """Nodes computing ``det.score``; returns the (batch,) float64 score tensor."""
    if isinstance(det, CombinedDetector):
        return _combined(b, det, graph_io)
    raw = _raw_nodes(b, det, graph_io)
    out = raw.tensor
    if raw.a != 1.0:
        out = b.node("Mul", [out, b.const(raw.a, "a")])
    if raw.b != 0.0:
        out = b.node("Add", [out, b.const(raw.b, "b")])
    return b.node("Reshape", [out, b.const([-1], "shape", np.int64)], "score")


def merge_detector(
    model_path: str | Path,
    detector: Detector,
    out_path: str | Path,
    *,
    output_name: str = SCORE_OUTPUT,
    check_rtol: float = 1e-6,
) -> Path:
    """Write ``model_path`` with ``detector``'s score as an extra last output to ``out_path``.

    The score output is float64, shape ``(batch,)``. Before returning, the merged model is run
    with ONNX Runtime on a few random inputs and its score compared with
    ``detector.score`` (relative tolerance ``check_rtol``); the model's own outputs must be
    unchanged. Raises :class:`NotExportable` when the detector or the model has no graph form
    (an unsupported kind, a source with dynamic non-batch axes, a model with external data).
    """
    import onnx
    from onnx import TensorProto, helper

    src = Path(model_path)
    model = onnx.load(str(src), load_external_data=False)
    if any(
        t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
    ):  # large models keep numpy scoring rather than a second multi-GB copy
        raise NotExportable(f"{src.name} keeps its weights in external data files")
    graph = model.graph
    if any(o.name == output_name for o in graph.output) or any(
        n.name.startswith(_PREFIX) for n in graph.node
    ):
        raise NotExportable(f"{src.name} already holds an edgeship detector")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise NotExportable(f"{src.name} uses opset {opset}; the detector graph needs 13 or later")
    initializers = {t.name for t in graph.initializer}
    graph_io = {
        "inputs": {i.name: i for i in graph.input if i.name not in initializers},
        "outputs": list(graph.output),
    }
    b = _Builder(graph, opset)
    score = _detector_nodes(b, detector, graph_io)
    last = graph.node[-1]
    assert list(last.output) == [score]
    last.output[0] = output_name  # the last node writes the graph output itself
    graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.DOUBLE, ["batch"]))
    out = Path(out_path)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    _check_merged(src, out, detector, graph_io, output_name, check_rtol)
    return out


def _check_merged(
    original: Path,
    merged: Path,
    detector: Detector,
    graph_io: dict[str, Any],
    output_name: str,
    rtol: float,
) -> None:
    """The merged model's outputs equal the original's, and its score numpy's."""
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    feed: dict[str, np.ndarray] = {}
    for name, info in graph_io["inputs"].items():
        try:
            shape = _fixed_shape(info)
        except NotExportable:
            return  # no shape to draw a check input from; the tests cover the formulas
        dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        batch = info.type.tensor_type.shape.dim[0]
        # three samples, or the batch a fixed-batch model (exported at batch 1) takes
        shape[0] = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else 3
        if np.dtype(dtype).kind != "f":
            return  # integer inputs (token ids, ...) need real data to mean anything
        feed[name] = rng.standard_normal(shape).astype(dtype)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    plain = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
    both = ort.InferenceSession(str(merged), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    expected = plain.run(names, feed)
    got = both.run([*names, output_name], feed)
    for name, e, g in zip(names, expected, got, strict=False):
        if not np.array_equal(e, g, equal_nan=True):
            raise NotExportable(f"merging the detector changed output {name!r}")
    want = detector.score(feed, expected)
    score = np.asarray(got[-1])
    if score.shape != want.shape or not np.allclose(score, want, rtol=rtol, atol=1e-12):
        raise NotExportable(
            f"the detector graph's scores {score.tolist()} differ from numpy's {want.tolist()}"
        )
