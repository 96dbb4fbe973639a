"""How to quantize an ONNX model (:class:`QuantizeConfig`) and the defaults every ONNX Runtime
quantization shares: which operators are quantized and what the check against fp32 expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sdk.errors import ConfigError

if TYPE_CHECKING:
    from device_agent.contracts.bundle import IOSpec, TensorSpec

__all__ = [
    "CHECK_MIN_COSINE",
    "DEFAULT_OP_TYPES",
    "CalibMethod",
    "IntType",
    "QuantMode",
    "QuantizeConfig",
    "has_fixed_batch",
    "op_types_for",
]

QuantMode = Literal["static", "dynamic"]
CalibMethod = Literal["minmax", "entropy", "percentile"]
IntType = Literal["int8", "uint8"]

_MODES = ("static", "dynamic")
_METHODS = ("minmax", "entropy", "percentile")
_INT_TYPES = ("int8", "uint8")


# Samples used to check that the quantized model runs (taken from the calibration data).
CHECK_SAMPLES = 16


#: Operators quantized by default: those that carry weights and most of the arithmetic (Conv,
#: ConvTranspose, MatMul, Gemm; Gather for embedding tables; ORT's Attention, LSTM and
#: EmbedLayerNormalization, which only dynamic mode has kernels for). Each mode keeps the ones
#: it quantizes natively. Relu and Clip are left out: static QDQ folds them into the op before
#: them, which is faster on CNNs but broke silero-vad (speech decisions agreeing with fp32 on
#: 68% of chunks instead of 96%); optimize's "-all-ops" candidate gets that speed where it is
#: safe.
DEFAULT_OP_TYPES: tuple[str, ...] = (
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Gather",
    "Attention",
    "LSTM",
    "EmbedLayerNormalization",
)


#: Below this worst-sample cosine similarity with fp32 (on real inputs), quantize() warns.
CHECK_MIN_COSINE = 0.99


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    ``mode``: ``"static"`` calibrates activation ranges on data and stores weights and activations
    as int8 (QDQ format); ``"dynamic"`` stores int8 weights and quantizes activations at run time
    (no data needed; suits transformers and MLPs, not CNNs).
    ``method``: how static calibration picks activation ranges: ``"minmax"`` (observed range),
    ``"entropy"`` (KL-divergence threshold) or ``"percentile"`` (99.999th percentile).
    ``per_channel``: one weight scale per output channel, which keeps accuracy on convolutions.
    ``batch_size``: calibration batch size, which bounds calibration memory.
    ``max_calibration_samples``: use at most this many calibration samples (the first ones).
    ``exclude_nodes``: node names kept in float (names in the model or in its pre-processed
    form, whose fused nodes ORT renames); ``op_types``: quantize only these operator types
    (default :data:`DEFAULT_OP_TYPES`; ``None``: every type ORT can quantize, element-wise math
    and normalisations included, which often costs accuracy).
    ``activation_type``: uint8 by default: asymmetric uint8 activations with int8 weights (U8S8)
    are what ONNX Runtime's CPU kernels support best on both x86 and Arm, and they spend the whole
    range on non-negative post-ReLU activations.
    ``reduce_range``: 7-bit weights, for x86 CPUs without VNNI where 8-bit products can saturate.
    ``bias_correction`` (static only): after quantizing, move each Conv's int32 bias so that its
    output channels' means on the calibration data match the float Conv's
    (:mod:`sdk.quantize.bias_correction`); helps depthwise nets whose int8 form drifts.
    ``fuse``: before quantizing, fold constant Mul/Add nodes after a Conv into its weights and
    rewrite written-out hard-swishes as ``x * HardSigmoid(x)`` (:mod:`sdk.quantize.fusions`;
    exact, fewer tensors to quantize); on by default.
    """

    mode: QuantMode = "static"
    method: CalibMethod = "minmax"
    per_channel: bool = True
    batch_size: int = 32
    max_calibration_samples: int | None = None
    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = DEFAULT_OP_TYPES
    weight_type: IntType = "int8"
    activation_type: IntType = "uint8"
    reduce_range: bool = False
    bias_correction: bool = False
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"quantization mode {self.mode!r} is not one of {list(_MODES)}")
        if self.method not in _METHODS:
            raise ConfigError(f"calibration method {self.method!r} is not one of {list(_METHODS)}")
        for name in ("weight_type", "activation_type"):
            if getattr(self, name) not in _INT_TYPES:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {list(_INT_TYPES)}"
                )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ConfigError(
                f"max_calibration_samples must be at least 1, got {self.max_calibration_samples}"
            )
        if self.bias_correction and self.mode != "static":
            raise ConfigError("bias_correction needs static mode: it corrects calibrated biases")
        if isinstance(self.exclude_nodes, str) or isinstance(self.op_types, str):
            raise ConfigError("exclude_nodes and op_types take a tuple of names, not a string")
        # Lists (from a CLI or JSON) become tuples so the config stays hashable.
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))

    @property
    def recipe(self) -> str:
        suffix = "-all-ops" if self.op_types is None else ""
        if self.mode == "dynamic":
            return f"ort-dynamic-int8{suffix}"
        corrected = "-bias-corrected" if self.bias_correction else ""
        return f"ort-static-int8-qdq-{self.method}{suffix}{corrected}"


def _has_fixed_batch_spec(spec: TensorSpec) -> bool:
    return bool(spec.shape) and isinstance(spec.shape[0], int)


def has_fixed_batch(io: IOSpec) -> bool:
    return any(_has_fixed_batch_spec(s) for s in io.inputs)


def op_types_for(config: QuantizeConfig) -> list[str] | None:
    """The operator types to hand ORT: the default ones this mode quantizes natively (static QDQ
    would wrap an LSTM or Attention in generic activation Q/DQ pairs), else what was asked."""
    if config.op_types is None:
        return None
    if config.op_types == DEFAULT_OP_TYPES:
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

        native = IntegerOpsRegistry if config.mode == "dynamic" else QDQRegistry
        return [t for t in DEFAULT_OP_TYPES if t in native]
    return list(config.op_types)
