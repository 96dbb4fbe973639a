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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, QuantizationError
from sdk.evaluate import Quality, accuracy_drop, evaluate
from sdk.quantize.config import QuantizeConfig
from sdk.quantize.ort import quantize
from sdk.quantize.ranking import TensorSensitivity, load, rank_tensors

if TYPE_CHECKING:
    pass

__all__ = [
    "ExclusionStep",
    "NodeSensitivity",
    "SensitivityReport",
    "accuracy_aware_quantize",
]

log = logging.getLogger(__name__)


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
    _check_settings(config, max_drop, max_excluded, ranking_samples)
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

    with tempfile.TemporaryDirectory(prefix="edgeship-aaq-") as tmp_dir:
        tmp = Path(tmp_dir)
        cache_dir = tmp / "calibration" if calibration_cache is None else Path(calibration_cache)
        search = _Steps(source, cal_data, eval_data, fp32_quality, config, base, tmp, cache_dir)
        tensors = search.run(max_drop, max_excluded, ranking_samples, notes)
        steps = search.steps
        chosen = _choose(steps, max_drop)
        result = search.artifacts[chosen]
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


# --- helpers ------------------------------------------------------------------------------


def _check_settings(
    config: QuantizeConfig, max_drop: float, max_excluded: int, ranking_samples: int
) -> None:
    if config.mode != "static":
        raise ConfigError("accuracy-aware quantization searches static int8; got mode='dynamic'")
    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"max_drop must be a fraction in [0, 1), got {max_drop}")
    if max_excluded < 0:
        raise ConfigError(f"max_excluded must be >= 0, got {max_excluded}")
    if ranking_samples < 1:
        raise ConfigError(f"ranking_samples must be at least 1, got {ranking_samples}")


@dataclass
class _Steps:
    """The exclusion steps of one search: plain static int8 first, then one step per ranked
    tensor whose nodes are added to the excluded ones, each quantized and measured."""

    source: ModelArtifact
    cal_data: Dataset
    eval_data: Dataset
    fp32_quality: Quality
    config: QuantizeConfig
    base: tuple[str, ...]  # the config's own exclusions, always kept
    tmp: Path
    cache_dir: Path
    chosen_nodes: list[str] = field(default_factory=list)  # excluded so far, beyond ``base``
    steps: list[ExclusionStep] = field(default_factory=list)
    artifacts: list[ModelArtifact | None] = field(default_factory=list)

    def attempt(
        self, index: int, added: tuple[str, ...], because: str | None
    ) -> tuple[ExclusionStep, ModelArtifact | None]:
        excluded = (*self.base, *self.chosen_nodes, *added)
        try:
            art = quantize(
                self.source,
                self.cal_data,
                out=self.tmp / f"step-{index}.onnx",
                config=replace(self.config, exclude_nodes=excluded),
                calibration_cache=self.cache_dir,
            )
        except QuantizationError as exc:
            return ExclusionStep(excluded, added, because, None, None, str(exc)), None
        quality = evaluate(art, self.eval_data, reference=self.source)
        drop = accuracy_drop(quality, self.fp32_quality)
        log.info("accuracy-aware int8 step %d: excluded %s, drop %.4f", index, excluded, drop)
        return ExclusionStep(excluded, added, because, quality, drop), art

    def run(
        self, max_drop: float, max_excluded: int, ranking_samples: int, notes: list[str]
    ) -> list[TensorSensitivity]:
        """Plain static int8, then exclusions in ranked order until the drop fits or
        ``max_excluded`` nodes are excluded; returns the ranking (empty when plain fits)."""
        step, art = self.attempt(0, (), None)
        if art is None:
            raise QuantizationError(f"plain static int8 failed: {step.error}")
        self.steps.append(step)
        self.artifacts.append(art)
        if step.drop is None or step.drop <= max_drop:
            return []
        tensors = rank_tensors(art, self.cal_data.head(ranking_samples), self.source, notes=notes)
        for sensitivity in tensors:
            added = tuple(n for n in sensitivity.nodes if n not in (*self.base, *self.chosen_nodes))
            if not added:
                continue
            if len(self.chosen_nodes) + len(added) > max_excluded:
                notes.append(
                    f"stopped before {sensitivity.tensor}: excluding {list(added)} would "
                    f"exceed max_excluded={max_excluded}"
                )
                break
            step, art = self.attempt(len(self.steps), added, sensitivity.tensor)
            self.steps.append(step)
            self.artifacts.append(art)
            if art is None:
                notes.append(f"excluding {list(added)} failed ({step.error}); skipped")
                continue
            self.chosen_nodes.extend(added)
            if step.drop is not None and step.drop <= max_drop:
                break
        return tensors


def _rank_nodes(
    tensors: Sequence[TensorSensitivity], fp32: ModelArtifact
) -> tuple[NodeSensitivity, ...]:
    if not tensors:
        return ()
    ops = {n.name: n.op_type for n in load(fp32.path).graph.node}
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


def _pts(drop: float | None) -> str:
    return "n/a" if drop is None else f"{drop * 100:.2f} pts"
