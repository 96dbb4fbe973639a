"""What optimize tries and aims for (:class:`OptimizeConfig`), and where it caches calibration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdk.budget import Budget
from sdk.cache_dirs import edgeship_cache
from sdk.errors import ConfigError
from sdk.quantize import CalibMethod
from sdk.targets import RUNTIMES, TargetProfile

if TYPE_CHECKING:
    from sdk.optimize.on_device import OnDevice


def default_calibration_cache() -> Path:
    """``$EDGESHIP_CACHE_DIR/calibration``, else ``$XDG_CACHE_HOME/edgeship/calibration``,
    else ``~/.cache/edgeship/calibration``."""
    return edgeship_cache("calibration")


@dataclass(frozen=True)
class OptimizeConfig:
    """What to try and what to aim for.

    ``static_methods`` lists the calibration methods tried for static int8: the first one
    always, the others (and ``per_tensor_variant``) as calibration variants when the first
    fails on quality (module docstring). ``confirm_rounds`` is how many alternating
    re-benchmarks settle a winner against fp32. ``detector`` is the outlier detector fitted on
    the calibration data and shipped in the bundle: ``"auto"`` (what
    :func:`sdk.detect.default_detector` recommends for the model), a detector kind, or None; its
    threshold is calibrated on held-out calibration samples for a false-positive rate of
    ``outlier_fpr``.

    ``min_cosine``: the quality gate used when there is no eval data with a ``drop`` budget
    line: an int8 candidate whose check against fp32 on calibration samples (worst-sample
    cosine similarity of the outputs) is below it fails; None turns the gate off.
    ``try_fused_fp32``: also measure the fp32 model with the exact rewrites of
    :mod:`sdk.quantize.fusions` (candidate ``fp32-fused``, when they find something).
    ``try_all_ops``: also try static int8 over every operator type ORT can quantize (when the
    model has such operators beyond the default ones); it is chosen only if it is faster.
    ``try_bias_correction``: when that candidate (else plain static int8) misses the drop line
    and no other, try it again with bias correction
    (:attr:`sdk.quantize.QuantizeConfig.bias_correction`).
    ``try_accuracy_aware``: the accuracy-aware candidate (at most ``max_excluded_nodes`` nodes
    kept in float). ``try_fp16``: None decides from the target (skipped on CPU boards), True
    forces the candidate, False leaves it out. ``reduce_range``: True makes every ONNX Runtime
    int8 candidate quantize with 7-bit weights (:attr:`sdk.quantize.QuantizeConfig.reduce_range`),
    False with 8-bit ones; None (default) takes 7 bits where the target's int8 kernels or this
    host's saturate with 8-bit weights (x86 without VNNI: :func:`sdk.isa.saturation`), and a
    note says so. On this host the search measures every candidate's quality, so 8-bit weights
    would score lower here than on a board that does not saturate.

    ``time_limit_s``: no new candidate starts once this many seconds have passed since the
    search began (None: no limit). ``bench_ci_stop``: a benchmark stops timing before
    ``min_seconds`` (never before ``min_runs``) once the 95% confidence interval of its p95 is
    within this fraction of it (:attr:`sdk.bench.BenchConfig.ci_stop`; None: always run
    ``min_seconds``). ``calibration_cache``: directory of cached calibration
    ranges (None: :func:`default_calibration_cache`); ``use_calibration_cache=False``
    calibrates every candidate afresh.

    With a PyTorch model: ``prune_ratios`` (one ``pruned-<pct>-int8`` candidate each; empty:
    none), ``fine_tune_epochs`` after pruning and ``distill_epochs`` for the student;
    ``litert_recipes``: ai-edge-quantizer recipes (:data:`sdk.quantize.RECIPES`, e.g.
    ``"static_wi8_ai8"``), one ``litert-<recipe>`` candidate each: the PyTorch model exported
    to TFLite and quantized for LiteRT. Empty (the default): with ``runtime`` ``"auto"`` or
    ``"litert"`` and a board that has LiteRT, the recipes a float ``.tflite`` gets
    (:data:`sdk.optimize.stages.litert.TFLITE_RECIPES`); otherwise none.

    ``try_latency_aware``: the ``ort-static-int8-latency-aware`` candidate (nodes whose int8
    form measured slower than their float one kept in float,
    :mod:`sdk.optimize.stages.latency_aware`), tried when plain static int8 is slower than fp32.
    ``try_weight_int4``: with a size line in the budget, the ``ort-weight-int4`` candidate
    (4-bit MatMul weights, :mod:`sdk.optimize.stages.weight4`); False leaves it out.

    ``runtime``: the runtime the bundle may name. ``"auto"`` searches every runtime the target
    has (:attr:`sdk.targets.TargetProfile.runtimes`; ONNX Runtime and LiteRT when it does not
    say) and lets the measurements choose; ``"onnxruntime"`` or ``"litert"`` keeps to one. A
    board with LiteRT only gets a float TFLite baseline exported from ``torch_model``
    (:mod:`sdk.optimize.runtimes`).
    """

    target: str | TargetProfile = "host"
    budget: Budget = field(default_factory=Budget)
    name: str = "model"
    version: str = "1"
    labels: tuple[str, ...] | None = None
    try_dynamic: bool = True
    static_methods: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")
    per_tensor_variant: bool = True
    min_runs: int = 200
    min_seconds: float = 3.0
    confirm_rounds: int = 2
    keep_candidates: bool = True
    detector: str | None = "auto"
    outlier_fpr: float = 0.01
    min_cosine: float | None = 0.99
    try_all_ops: bool = True
    try_fused_fp32: bool = True
    try_bias_correction: bool = True
    try_accuracy_aware: bool = True
    max_excluded_nodes: int = 8
    try_fp16: bool | None = None
    reduce_range: bool | None = None
    time_limit_s: float | None = None
    bench_ci_stop: float | None = 0.02
    calibration_cache: str | Path | None = None
    use_calibration_cache: bool = True
    prune_ratios: tuple[float, ...] = (0.3, 0.5)
    fine_tune_epochs: int = 5
    distill_epochs: int = 15
    litert_recipes: tuple[str, ...] = ()
    runtime: str = "auto"
    try_weight_int4: bool = True
    try_latency_aware: bool = True
    # Time the candidates on real devices over MQTT and choose from their figures
    # (sdk.optimize.on_device.OnDevice; None: on this host).
    on_device: OnDevice | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be between -1 and 1, got {self.min_cosine}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ConfigError(f"time_limit_s must be positive, got {self.time_limit_s}")
        if isinstance(self.static_methods, str) or isinstance(self.prune_ratios, float | int):
            raise ConfigError("static_methods and prune_ratios take a tuple, not a single value")
        object.__setattr__(self, "static_methods", tuple(self.static_methods))
        object.__setattr__(self, "prune_ratios", tuple(self.prune_ratios))
        if isinstance(self.litert_recipes, str):
            raise ConfigError("litert_recipes takes a tuple of recipe names, not a string")
        object.__setattr__(self, "litert_recipes", tuple(self.litert_recipes))
        from sdk.quantize.litert import RECIPES

        unknown = [r for r in self.litert_recipes if r not in RECIPES]
        if unknown:
            raise ConfigError(
                f"litert_recipes: unknown ai-edge-quantizer recipes {unknown}; "
                f"known: {list(RECIPES)}"
            )
        if self.runtime not in ("auto", *RUNTIMES):
            raise ConfigError(f"runtime must be auto, onnxruntime or litert, got {self.runtime!r}")
        if self.runtime == "onnxruntime" and self.litert_recipes:
            raise ConfigError(
                "litert_recipes make LiteRT candidates, and runtime is onnxruntime: "
                "drop one of them"
            )
        for ratio in self.prune_ratios:
            if not 0.0 < ratio < 1.0:
                raise ConfigError(f"prune_ratios must be between 0 and 1, got {ratio}")
        if self.fine_tune_epochs < 0 or self.distill_epochs < 1:
            raise ConfigError("fine_tune_epochs must be >= 0 and distill_epochs >= 1")
        if self.max_excluded_nodes < 1:
            raise ConfigError(
                f"max_excluded_nodes must be at least 1, got {self.max_excluded_nodes}"
            )

    def cache_dir(self) -> Path | None:
        if not self.use_calibration_cache:
            return None
        if self.calibration_cache is None:
            return default_calibration_cache()
        return Path(self.calibration_cache)
