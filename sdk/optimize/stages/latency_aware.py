"""The ``ort-static-int8-latency-aware`` stage: static int8 with the nodes that are slower in
int8 than in fp32 kept in float, found by measuring, not guessing.

On depthwise-separable nets with hard-swish and squeeze-excite blocks (PP-OCR's detector and
line classifier, PP-LCNet, MobileNet) every static int8 form is slower than fp32 at one thread
on x86: the int8 convolutions are cheap, but the QuantizeLinear/DequantizeLinear pairs around
every float operator between them, and the layout changes int8 kernels bring, cost more. Which
nodes lose is a property of the runtime and the CPU, so it is measured
(:mod:`sdk.quantize.node_profile`, ORT's per-node profiler at :data:`PROFILE_THREADS` thread,
:data:`~sdk.quantize.node_profile.PROFILE_RUNS` runs, on one real sample: the eval data's
first, else the calibration data's):

1. profile fp32; quantize as plain static int8 does (round 0) and profile that;
2. every quantized node whose int8 cost (its fused kernel plus its share of the Q/DQ pairs
   around it) is above its fp32 cost is kept in float, and the model quantized again;
3. repeat while a round is faster than the one before (whole-run time under the profiler) and
   finds new slower nodes, at most :data:`MAX_ROUNDS` re-quantizations.

The candidate is the fastest round after the first exclusions (round 0 itself only when no
node was slower: then it is plain static int8). It then goes through the search like any
other: quality gates, benchmark, and the alternating confirmation against fp32, so it is only
chosen when it is really faster. ``details["latency_aware"]`` carries the evidence: every
quantized node's fp32 and int8 µs from the last round that measured it before the chosen one,
and whether it is kept in float (exactly the nodes that evidence shows slower in int8), plus
each round's exclusions and time. It is only tried when plain static int8 was made and is not
already faster than fp32; ``OptimizeConfig.try_latency_aware=False`` (``--no-latency-aware``)
turns it off.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import Dataset, take_samples
from sdk.errors import QuantizationError
from sdk.optimize.report import Candidate, SkippedRecipe
from sdk.optimize.stages.base import Recipe, SearchContext
from sdk.optimize.stages.fp32 import FLOAT_MODELS
from sdk.optimize.stages.ort_static import STATIC_PREFIX, base_name
from sdk.quantize import QuantizeConfig, quantize
from sdk.quantize.node_profile import (
    PROFILE_RUNS,
    NodeProfile,
    compute_node_names,
    int8_costs,
    profile_nodes,
)

__all__ = [
    "LATENCY_AWARE",
    "MAX_ROUNDS",
    "PROFILE_THREADS",
    "LatencyAwareRecipe",
    "LatencyAwareStage",
    "NodeEvidence",
    "latency_aware_quantize",
]

LATENCY_AWARE = f"{STATIC_PREFIX}-latency-aware"
#: Re-quantizations after plain int8 at most (each one quantizes and profiles once).
MAX_ROUNDS = 3
#: Threads the per-node profile runs with (one: where int8 has to pay on a small board).
PROFILE_THREADS = 1


@dataclass(frozen=True)
class NodeEvidence:
    """One quantized node: what it cost in fp32 and in int8 (µs per run), in which round that
    was measured, and whether the candidate keeps it in float."""

    node: str
    op_type: str
    fp32_us: float | None  # None: the fp32 run has no kernel for this node (fused elsewhere)
    int8_us: float
    round: int
    kept_in_float: bool = False

    @property
    def slower(self) -> bool:
        return self.fp32_us is not None and self.int8_us > self.fp32_us

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "fp32_us": self.fp32_us,
            "int8_us": self.int8_us,
            "slower_in_int8": self.slower,
            "kept_in_float": self.kept_in_float,
            "round": self.round,
        }


@dataclass(frozen=True)
class _Round:
    index: int
    excluded: tuple[str, ...]
    artifact: ModelArtifact
    profile: NodeProfile
    evidence: tuple[NodeEvidence, ...]

    @property
    def slower(self) -> list[str]:
        return [e.node for e in self.evidence if e.slower]


def latency_aware_quantize(
    fp32: ModelArtifact,
    calibration: Dataset,
    feed: Mapping[str, np.ndarray],
    *,
    out: Path,
    config: QuantizeConfig,
    calibration_cache: Path | None = None,
    max_rounds: int = MAX_ROUNDS,
    runs: int = PROFILE_RUNS,
    threads: int = PROFILE_THREADS,
) -> ModelArtifact:
    """Static int8 of ``fp32`` with the nodes slower in int8 kept in float (module docstring),
    written to ``out``; the evidence is in ``details["latency_aware"]``. Raises
    :class:`QuantizationError` when no round can be made, or when every quantized node is
    slower in int8 (the float model is the one to ship)."""
    reference = profile_nodes(fp32.path, feed, runs=runs, threads=threads)
    rounds: list[_Round] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeship-latency-") as tmp:
        cache = calibration_cache or Path(tmp) / "calibration"
        excluded: tuple[str, ...] = tuple(config.exclude_nodes)
        for index in range(max_rounds + 1):
            try:
                artifact = quantize(
                    fp32,
                    calibration,
                    out=Path(tmp) / f"round-{index}.onnx",
                    config=replace(config, exclude_nodes=excluded),
                    calibration_cache=cache,
                )
            except QuantizationError as exc:
                if index == 0:
                    raise
                notes.append(f"round {index} (excluding {len(excluded)} nodes) failed: {exc}")
                break
            rounds.append(
                _measure(index, excluded, artifact, reference, config, feed, runs, threads)
            )
            new = [n for n in rounds[-1].slower if n not in excluded]
            if not new:
                break
            if index >= 1 and rounds[-1].profile.wall_us >= rounds[-2].profile.wall_us:
                notes.append(f"round {index} was not faster than round {index - 1}: stopped")
                break
            excluded = (*excluded, *new)
        chosen = _choose(rounds)
        result = rounds[chosen]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(result.artifact.path.read_bytes())
    details = _details(rounds, chosen, reference, threads, notes)
    return replace(result.artifact, path=out, recipe=LATENCY_AWARE).with_details(
        latency_aware=details
    )


def _measure(
    index: int,
    excluded: tuple[str, ...],
    artifact: ModelArtifact,
    reference: NodeProfile,
    config: QuantizeConfig,
    feed: Mapping[str, np.ndarray],
    runs: int,
    threads: int,
) -> _Round:
    profile = profile_nodes(artifact.path, feed, runs=runs, threads=threads)
    op_types = None if config.op_types is None else list(config.op_types)
    costs = int8_costs(profile, artifact.path, op_types)
    skip = set(excluded) | set(artifact.details.get("excluded_nodes") or [])
    evidence = tuple(
        NodeEvidence(node, op, _fp32_us(node, reference), costs[node], index)
        for node, op in compute_node_names(artifact.path, op_types).items()
        if node not in skip
    )
    return _Round(index, excluded, artifact, profile, evidence)


def _fp32_us(node: str, reference: NodeProfile) -> float | None:
    """The fp32 cost of a node of the pre-processed model: its own, or that of the fp32 nodes
    ORT's pre-processing fused into it (named ``<fp32 node>/<fusion>``)."""
    if node in reference.nodes:
        return reference.nodes[node].us
    parts = [t.us for n, t in reference.nodes.items() if n and node.startswith(n + "/")]
    return sum(parts) if parts else None


def _choose(rounds: Sequence[_Round]) -> int:
    """The fastest round after the first exclusions; round 0 only when nothing was slower."""
    if not rounds[0].slower:
        return 0
    later = rounds[1:]
    if not later:
        raise QuantizationError(
            f"every round with nodes kept in float failed; plain int8 had {len(rounds[0].slower)}"
            " nodes slower than fp32: the float model is the one to ship"
        )
    return min(later, key=lambda r: r.profile.wall_us).index


def _details(
    rounds: Sequence[_Round],
    chosen: int,
    reference: NodeProfile,
    threads: int,
    notes: list[str],
) -> dict[str, Any]:
    kept = set(rounds[chosen].excluded)
    latest: dict[str, NodeEvidence] = {}
    for r in rounds[: max(chosen, 1)]:
        for e in r.evidence:
            latest[e.node] = replace(e, kept_in_float=e.node in kept)
    nodes = sorted(
        latest.values(),
        key=lambda e: -(e.int8_us - e.fp32_us) if e.fp32_us is not None else 0.0,
    )
    return {
        "threads": threads,
        "runs": reference.runs,
        "fp32_wall_us": reference.wall_us,
        "fp32_unattributed_us": sum(reference.unattributed.values()),
        "chosen_round": chosen,
        "excluded": sorted(kept),
        "rounds": [
            {
                "round": r.index,
                "excluded": len(r.excluded),
                "wall_us": r.profile.wall_us,
                "slower": len(r.slower),
                "unattributed_us": sum(r.profile.unattributed.values()),
            }
            for r in rounds
        ],
        "nodes": [e.to_dict() for e in nodes],
        "notes": notes,
    }


def one_sample(data: Dataset, model: ModelArtifact) -> dict[str, np.ndarray]:
    """The first sample (a whole batch for a model whose batch axis is fixed), as timed by
    the benchmark."""
    count = model.io.fixed_batch or 1
    if len(data) < count:
        raise QuantizationError(f"need {count} samples to profile a fixed batch; have {len(data)}")
    return take_samples(data.inputs, 0, count)


@dataclass(frozen=True)
class LatencyAwareRecipe(Recipe):
    config: QuantizeConfig
    base: str

    @property
    def name(self) -> str:
        return LATENCY_AWARE

    def skip_reason(self, ctx: SearchContext, done: Sequence[Candidate]) -> str | None:
        static = next((c for c in done if c.name == self.base), None)
        if static is None:
            return f"plain static int8 ({self.base}) was not made: nothing to make faster"
        if static.error is not None:
            return f"plain static int8 ({self.base}) failed: keeping nodes in float cannot fix it"
        floats = [c for c in done if c.name in FLOAT_MODELS and c.error is None]
        fastest = min(floats, key=lambda c: c.p95_ms, default=None)
        if fastest is not None and static.p95_ms < fastest.p95_ms:
            return (
                f"{self.base} is already faster than {fastest.name} (p95 {static.p95_ms:.3g} ms "
                f"against {fastest.p95_ms:.3g} ms)"
            )
        return _unnamed(ctx.fp32.path)

    def make(self, ctx: SearchContext, path: Path) -> ModelArtifact:
        cal = ctx.require_calibration()
        feed = one_sample(ctx.eval_data or cal, ctx.fp32)
        return latency_aware_quantize(
            ctx.fp32,
            cal,
            feed,
            out=path,
            config=self.config,
            calibration_cache=ctx.calibration_cache,
        )


def _unnamed(model: Path) -> str | None:
    """Why per-node evidence cannot be had: nodes without a name (ONNX allows any number)
    cannot be told apart in the profile, nor kept in float by name. Constant nodes do not
    count: ONNX Runtime folds them into initializers, so they are never timed nor quantized
    (Paddle2ONNX leaves all of its own unnamed: 308 in PP-OCR's line classifier, 420 in its
    recognizer, and nothing else)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    unnamed = [n.op_type for n in graph.node if not n.name and n.op_type != "Constant"]
    if not unnamed:
        return None
    return (
        f"{len(unnamed)} nodes of the model have no name ({', '.join(sorted(set(unnamed))[:6])}): "
        "per-node timings cannot be told apart nor kept in float by name"
    )


class LatencyAwareStage:
    name = "latency-aware"

    def plan(self, ctx: SearchContext) -> Sequence[Recipe | SkippedRecipe]:
        base = base_name(ctx)
        if base is None or not ctx.config.try_latency_aware or ctx.no_default_ops:
            return []
        config = QuantizeConfig(method=ctx.config.static_methods[0], reduce_range=ctx.reduce_range)
        return [LatencyAwareRecipe(config, base)]
