"""Accuracy-aware int8: find the tensors that quantize badly and keep their nodes in float
until the accuracy drop fits the budget.

Plain static int8 gives every activation tensor one scale (per tensor). When a few channels of
a tensor are hundreds of times larger than the rest (outlier features, common in transformers
and in networks whose layers were rescaled), that scale leaves the ordinary channels less
than one quantization step: they become zeros and the accuracy collapses, while the model's
other layers quantize well. :func:`accuracy_aware_quantize` fixes such a model with as few
float nodes as it can:

1. quantize the fp32 model (static QDQ, :func:`sdk.quantize`) and measure its accuracy drop on
   the eval data; if it fits ``max_drop``, that is the answer;
2. rank every quantized tensor by the error its own quantization adds (:func:`rank_tensors`):
   the fp32 model runs on calibration data with every tensor the int8 model quantizes exposed
   as a graph output, each goes through its int8 round trip ``dq(q(x))`` with the int8
   model's scale and zero point, and the score is the mean per-channel squared error
   ``||dq(q(x))_c - x_c||²`` over the energy of a typical (median) channel. Measuring against
   a typical channel is what exposes a shared scale that crushes most channels: the
   whole-tensor error is dominated by the few large channels, which quantize well. Working
   on fp32 values isolates each tensor: the score is the error that tensor adds, not what it
   inherits from upstream. Weights are scored from their stored int8 values against the fp32
   weights, per output channel;
3. exclude, in that order, the nodes that quantize each tensor (its producer and its consumers:
   a tensor stays in float only when none of them asks for it), quantize again and measure,
   until the drop fits or ``max_excluded`` nodes are excluded.

The report (:class:`SensitivityReport`) lists the ranked tensors and nodes, every step's
exclusions and drop, and the nodes finally excluded. A budget that cannot be met is a result
(``met=False``, with the best model found), not an exception.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, ModelFormatError, QuantizationError
from sdk.evaluate import Quality, accuracy_drop, evaluate
from sdk.quantize import QuantizeConfig, quantize

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ExclusionStep",
    "NodeSensitivity",
    "SensitivityReport",
    "TensorSensitivity",
    "accuracy_aware_quantize",
    "rank_tensors",
]

log = logging.getLogger(__name__)

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


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


@dataclass(frozen=True)
class NodeSensitivity:
    """A node of the fp32 model and the worst error among the tensors quantized for it."""

    node: str
    op_type: str
    score: float
    tensor: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "score": self.score,
            "tensor": self.tensor,
        }


@dataclass(frozen=True)
class ExclusionStep:
    """One quantization of the search: the nodes kept in float and what that cost.

    Step 0 is plain int8 (nothing excluded). ``because`` names the tensor whose nodes this
    step added; ``error`` holds the quantizer's message when this step could not be built.
    """

    excluded: tuple[str, ...]
    added: tuple[str, ...]
    because: str | None
    quality: Quality | None
    drop: float | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "excluded": list(self.excluded),
            "added": list(self.added),
            "because": self.because,
            "accuracy": None if self.quality is None else self.quality.accuracy,
            "agreement": None if self.quality is None else self.quality.agreement,
            "drop": self.drop,
            "error": self.error,
        }


@dataclass(frozen=True)
class SensitivityReport:
    """What :func:`accuracy_aware_quantize` measured and chose.

    ``drop`` is the returned model's accuracy drop against the fp32 model (fraction: 0.01 is
    one point); ``met`` whether it is within ``max_drop``; ``excluded`` the nodes it keeps in
    float; ``chosen_step`` its index in ``steps``.
    """

    fp32_quality: Quality
    max_drop: float
    max_excluded: int
    tensors: tuple[TensorSensitivity, ...]
    nodes: tuple[NodeSensitivity, ...]
    steps: tuple[ExclusionStep, ...]
    chosen_step: int
    excluded: tuple[str, ...]
    drop: float
    met: bool
    notes: tuple[str, ...] = ()

    @property
    def plain_drop(self) -> float | None:
        """The accuracy drop of plain static int8 (step 0)."""
        return self.steps[0].drop if self.steps else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32_accuracy": self.fp32_quality.accuracy,
            "max_drop": self.max_drop,
            "max_excluded": self.max_excluded,
            "plain_drop": self.plain_drop,
            "drop": self.drop,
            "met": self.met,
            "excluded": list(self.excluded),
            "chosen_step": self.chosen_step,
            "steps": [s.to_dict() for s in self.steps],
            "tensors": [t.to_dict() for t in self.tensors],
            "nodes": [n.to_dict() for n in self.nodes],
            "notes": list(self.notes),
        }

    def summary(self, *, top: int = 5) -> str:
        lines = [
            f"accuracy-aware int8: drop {_pts(self.drop)} with {len(self.excluded)} node(s) in "
            f"float {list(self.excluded)} (budget {_pts(self.max_drop)}: "
            f"{'met' if self.met else 'NOT met'}); plain int8 drop {_pts(self.plain_drop)}",
            "  most sensitive tensors (quantization noise / typical channel energy):",
        ]
        lines.extend(
            f"    {t.error:.3g} (worst channel {t.worst_channel:.3g}) {t.kind} {t.tensor} "
            f"-> nodes {list(t.nodes)}"
            for t in self.tensors[:top]
        )
        lines.append("  steps:")
        for i, step in enumerate(self.steps):
            what = "plain int8" if i == 0 else f"+{list(step.added)} (for {step.because})"
            result = step.error if step.error else f"drop {_pts(step.drop)}"
            lines.append(f"    {i}: {what}: {result}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def accuracy_aware_quantize(
    fp32_artifact: ModelArtifact | str | Path,
    calibration: DataSource | Dataset,
    eval_dataset: DataSource | Dataset,
    *,
    max_drop: float = 0.01,
    max_excluded: int = 8,
    out: str | Path,
    config: QuantizeConfig | None = None,
    ranking_samples: int = 256,
    calibration_cache: str | Path | None = None,
) -> tuple[ModelArtifact, SensitivityReport]:
    """Static int8 that keeps the most quantization-sensitive nodes in float until the accuracy
    drop on ``eval_dataset`` is at most ``max_drop`` (a fraction: 0.01 is one point).
    Every step calibrates once: the steps differ only in excluded nodes, which leave the
    activation ranges alone, so they share a calibration cache (``calibration_cache``, a
    directory as in :func:`sdk.quantize.quantize`; a temporary one when None).

    ``eval_dataset`` should carry labels (the drop is then in accuracy); without labels the
    drop is ``1 - agreement`` with the fp32 model's top-1. ``config`` is the base static
    recipe (default: :class:`~sdk.quantize.QuantizeConfig`'s; its own ``exclude_nodes`` are
    always kept); at most ``max_excluded`` more nodes are
    excluded. Ranking uses up to ``ranking_samples`` calibration samples. The chosen model is
    written to ``out``: the first step that meets the budget, else the step with the smallest
    drop. Returns it and the :class:`SensitivityReport`.
    """
    config = config or QuantizeConfig()
    if config.mode != "static":
        raise ConfigError("accuracy-aware quantization searches static int8; got mode='dynamic'")
    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"max_drop must be a fraction in [0, 1), got {max_drop}")
    if max_excluded < 0:
        raise ConfigError(f"max_excluded must be >= 0, got {max_excluded}")
    if ranking_samples < 1:
        raise ConfigError(f"ranking_samples must be at least 1, got {ranking_samples}")
    source = (
        fp32_artifact if isinstance(fp32_artifact, ModelArtifact) else read_artifact(fp32_artifact)
    )
    if source.format != "onnx":
        raise ConfigError(f"{source.path.name}: accuracy-aware quantization works on ONNX models")
    target = Path(out)
    if target.suffix.lower() != ".onnx":
        raise ConfigError(f"{target.name}: the quantized model must be written to a .onnx file")
    eval_data = load_dataset(eval_dataset, source.io, what="eval data")
    cal_data = load_dataset(calibration, source.io, what="calibration data")
    fp32_quality = evaluate(source, eval_data)
    base = tuple(config.exclude_nodes)
    notes: list[str] = []

    chosen_nodes: list[str] = []  # excluded so far, beyond the config's own
    steps: list[ExclusionStep] = []
    artifacts: list[ModelArtifact | None] = []
    with tempfile.TemporaryDirectory(prefix="edgeship-aaq-") as tmp_dir:
        tmp = Path(tmp_dir)
        cache_dir = tmp / "calibration" if calibration_cache is None else Path(calibration_cache)

        def attempt(
            index: int, added: tuple[str, ...], because: str | None
        ) -> tuple[ExclusionStep, ModelArtifact | None]:
            excluded = (*base, *chosen_nodes, *added)
            try:
                art = quantize(
                    source,
                    cal_data,
                    out=tmp / f"step-{index}.onnx",
                    config=replace(config, exclude_nodes=excluded),
                    calibration_cache=cache_dir,
                )
            except QuantizationError as exc:
                return ExclusionStep(excluded, added, because, None, None, str(exc)), None
            quality = evaluate(art, eval_data, reference=source)
            drop = accuracy_drop(quality, fp32_quality)
            log.info("accuracy-aware int8 step %d: excluded %s, drop %.4f", index, excluded, drop)
            return ExclusionStep(excluded, added, because, quality, drop), art

        step, art = attempt(0, (), None)
        if art is None:
            raise QuantizationError(f"plain static int8 failed: {step.error}")
        steps.append(step)
        artifacts.append(art)
        tensors: list[TensorSensitivity] = []
        if step.drop is not None and step.drop > max_drop:
            tensors = rank_tensors(art, cal_data.head(ranking_samples), source, notes=notes)
            for sensitivity in tensors:
                added = tuple(n for n in sensitivity.nodes if n not in (*base, *chosen_nodes))
                if not added:
                    continue
                if len(chosen_nodes) + len(added) > max_excluded:
                    notes.append(
                        f"stopped before {sensitivity.tensor}: excluding {list(added)} would "
                        f"exceed max_excluded={max_excluded}"
                    )
                    break
                step, art = attempt(len(steps), added, sensitivity.tensor)
                steps.append(step)
                artifacts.append(art)
                if art is None:
                    notes.append(f"excluding {list(added)} failed ({step.error}); skipped")
                    continue
                chosen_nodes.extend(added)
                if step.drop is not None and step.drop <= max_drop:
                    break
        chosen = _choose(steps, max_drop)
        result = artifacts[chosen]
        if result is None:  # _choose only picks steps that produced a model
            raise QuantizationError("accuracy-aware quantization produced no model")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.path, target)

    final = steps[chosen]
    drop = final.drop if final.drop is not None else float("inf")
    report = SensitivityReport(
        fp32_quality=fp32_quality,
        max_drop=max_drop,
        max_excluded=max_excluded,
        tensors=tuple(tensors),
        nodes=_rank_nodes(tensors, source),
        steps=tuple(steps),
        chosen_step=chosen,
        excluded=tuple(n for n in final.excluded if n not in base),
        drop=drop,
        met=drop <= max_drop,
        notes=tuple(notes),
    )
    artifact = replace(result, path=target).with_details(
        accuracy_aware={
            "max_drop": max_drop,
            "drop": drop,
            "met": report.met,
            "plain_drop": report.plain_drop,
            "excluded": list(report.excluded),
            "steps": len(steps),
        }
    )
    return artifact, report


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
    from onnx import numpy_helper

    q_path = quantized.path if isinstance(quantized, ModelArtifact) else Path(quantized)
    f_path = fp32.path if isinstance(fp32, ModelArtifact) else Path(fp32)
    model = _load(q_path)
    reference = _load(f_path)
    fp32_nodes = [n.name for n in reference.graph.node if n.name]
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    unmapped: set[str] = set()
    unranked: list[str] = []

    def fp32_names(nodes: Sequence[onnx.NodeProto]) -> tuple[str, ...]:
        out: list[str] = []
        for node in nodes:
            name = _fp32_name(node.name, fp32_nodes)
            if name is None:
                unmapped.add(node.name)
            elif name not in out:
                out.append(name)
        return tuple(out)

    def ops_after(tensor: str) -> list[onnx.NodeProto]:
        """The compute nodes reading the dequantized ``tensor`` (through its DQ nodes)."""
        found: list[onnx.NodeProto] = []
        for node in consumers.get(tensor, []):
            if node.op_type in _QDQ:
                for out in node.output:
                    found.extend(ops_after(out))
            else:
                found.append(node)
        return found

    # Activations: x -> QuantizeLinear(scale, zero point) -> DequantizeLinear. The error is
    # measured on the fp32 model's own values of x, quantized with the int8 model's scale:
    # the quantized model's x may differ (the quantizer drops a ReLU whose clamp the uint8
    # range performs, and upstream layers add their own errors).
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

    results = _activation_errors(reference, activations, calibration, batch_size)

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
    if unranked and notes is not None:
        notes.append(f"quantized tensors {unranked} have no fp32 counterpart and were not ranked")
    if unmapped and notes is not None:
        notes.append(
            f"quantized nodes {sorted(unmapped)} have no counterpart in the fp32 model "
            "(renamed by pre-processing) and cannot be excluded by name"
        )
    return sorted(results, key=lambda t: (-t.error, t.tensor))


# --- helpers ------------------------------------------------------------------------------


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
    import onnxruntime as ort
    from onnx import helper

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
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own exception types
        raise QuantizationError(
            f"ranking tensors: ONNX Runtime cannot load the fp32 probe: {exc}"
        ) from exc
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for feed in data.batches(batch_size):
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
    out = []
    for act in activations:
        err, sq = sums[act.tensor]
        mean, worst = _channel_error(err, sq)
        out.append(TensorSensitivity(act.tensor, "activation", mean, worst, len(err), act.nodes))
    return out


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


def _rank_nodes(
    tensors: Sequence[TensorSensitivity], fp32: ModelArtifact
) -> tuple[NodeSensitivity, ...]:
    if not tensors:
        return ()
    ops = {n.name: n.op_type for n in _load(fp32.path).graph.node}
    best: dict[str, NodeSensitivity] = {}
    for t in tensors:
        for node in t.nodes:
            if node not in best or t.error > best[node].score:
                best[node] = NodeSensitivity(node, ops.get(node, "?"), t.error, t.tensor)
    return tuple(sorted(best.values(), key=lambda n: (-n.score, n.node)))


def _choose(steps: Sequence[ExclusionStep], max_drop: float) -> int:
    """The first step within budget, else the smallest drop (fewer exclusions on a tie)."""
    built = [i for i, s in enumerate(steps) if s.drop is not None]
    for i in built:
        drop = steps[i].drop
        if drop is not None and drop <= max_drop:
            return i
    return min(built, key=lambda i: (steps[i].drop or 0.0, len(steps[i].excluded)))


def _load(path: Path) -> onnx.ModelProto:
    from sdk.onnx_tools import load_onnx

    try:
        model: onnx.ModelProto = load_onnx(path)
    except ModelFormatError as exc:
        raise QuantizationError(f"reading {path.name}: {exc}") from exc
    return model


def _pts(drop: float | None) -> str:
    return "n/a" if drop is None else f"{drop * 100:.2f} pts"
