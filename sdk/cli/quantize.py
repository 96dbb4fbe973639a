"""``edgeship quantize``: int8-quantize an ONNX model with ONNX Runtime (``sdk.quantize``), or
a float ``.tflite`` with ai-edge-quantizer (``sdk.quantize.litert``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from sdk.cli.common import EXIT_OK, require_file

__all__ = ["add_reduce_range_arg", "register", "run"]


def register(sub: Any) -> None:
    """Add ``quantize`` to the ``edgeship`` subparsers."""
    p = sub.add_parser(
        "quantize",
        help="int8-quantize an ONNX model with ONNX Runtime, or a .tflite with ai-edge-quantizer",
        description="Quantize an ONNX model to int8. Static mode (the default) calibrates "
        "activation ranges on --calibration data and writes a QDQ model with per-channel "
        "weights; dynamic mode needs no data and quantizes weights ahead and activations at "
        "run time (best for transformers and LSTMs). A float .tflite is quantized with "
        "ai-edge-quantizer's --recipe (default static_wi8_ai8, which calibrates on "
        "--calibration; --mode dynamic means dynamic_wi8_afp32). --mode int4 writes 4-bit "
        "MatMul weights (ONNX Runtime's MatMulNBits, blocks of 32; Gemm with a constant "
        "weight is rewritten to MatMul first) with float activations: about a sixth of fp32's "
        "size, for models whose weights are MatMul/Gemm (MLPs, transformers).",
        epilog="examples:\n  edgeship quantize model.onnx --calibration cal.npz -o int8.onnx\n"
        "  edgeship quantize mlp.onnx --mode int4 --calibration cal.npz -o int4.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="the fp32 .onnx file, or a float .tflite")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="where to write the int8 .onnx (.tflite for a .tflite model)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help=".npz of representative inputs (static mode: calibrates; both modes: the check "
        "of the int8 model against fp32 runs on it, else on generated random inputs)",
    )
    p.add_argument(
        "--mode",
        choices=["static", "dynamic", "int4"],
        default="static",
        help="static int8 (default), dynamic int8, or int4 MatMul weights (ONNX models)",
    )
    p.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="static calibration method (default: minmax)",
    )
    p.add_argument(
        "--per-tensor", action="store_true", help="one scale per weight tensor, not per channel"
    )
    p.add_argument("--exclude", default="", help="comma-separated node names to keep in float")
    p.add_argument(
        "--op-types",
        default=None,
        help="comma-separated operator types to quantize (default: "
        + ",".join(_default_op_types())
        + "); 'all' for every type ONNX Runtime can quantize",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="static mode: after quantizing, move each Conv's int32 bias so its output "
        "channels' means on the calibration data match the float Conv's (helps depthwise "
        "nets such as EfficientNet-Lite; same speed and size)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="quantize the graph as it is: by default constant Mul/Add nodes after a Conv are "
        "folded into its weights and written-out hard-swishes (Add, Clip, Mul, Div) become "
        "x * HardSigmoid(x) first (exact rewrites; fewer tensors to quantize)",
    )
    add_reduce_range_arg(p)
    p.add_argument(
        "--recipe",
        choices=sorted(_litert_recipes()),
        default=None,
        help="a .tflite model only: the ai-edge-quantizer recipe (default static_wi8_ai8; "
        "dynamic_wi8_afp32 with --mode dynamic); int4 weights: dynamic_wi4_afp32, "
        "weight_only_wi4_afp32",
    )
    p.set_defaults(handler=run)


def add_reduce_range_arg(p: argparse.ArgumentParser, *, auto: bool = False) -> None:
    """``--reduce-range``; with ``auto`` (``edgeship optimize``, which passes it to every ONNX
    Runtime int8 candidate) also ``--no-reduce-range``, and neither means "decide"."""
    why = (
        "x86 CPUs without VNNI (AVX2 or AVX-512 without avx512_vnni/avx_vnni in /proc/cpuinfo) "
        "saturate with 8-bit weights (ONNX Runtime's advice: 7-bit weights there); VNNI x86 and "
        "Arm boards do not"
    )
    if not auto:
        p.add_argument(
            "--reduce-range", action="store_true", help=f"quantize weights to 7 bits: {why}"
        )
        return
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"7-bit (--reduce-range) or 8-bit (--no-reduce-range) int8 weights; default: 7 bits "
        f"where the target's or this host's int8 kernels saturate, 8 elsewhere. {why}",
    )


def run(args: argparse.Namespace) -> int:
    from sdk.quantize import QuantizeConfig, quantize

    if args.model.suffix.lower() == ".tflite":
        if args.mode == "int4":
            raise ConfigError(
                "--mode int4 is for an ONNX model; a .tflite takes int4 weights with "
                "--recipe weight_only_wi4_afp32 (or dynamic_wi4_afp32)"
            )
        return _run_tflite(args)
    if args.recipe is not None:
        raise ConfigError("--recipe is for a .tflite model; ONNX models take --mode and --method")
    if args.mode == "int4":
        return _run_int4(args)
    excluded = tuple(n.strip() for n in args.exclude.split(",") if n.strip())
    op_types: tuple[str, ...] | None = _default_op_types()
    if args.op_types is not None:
        named = tuple(n.strip() for n in args.op_types.split(",") if n.strip())
        if not named:
            raise ConfigError("--op-types: give operator types such as Conv,MatMul, or 'all'")
        op_types = None if named == ("all",) else named
    config = QuantizeConfig(
        mode=args.mode,
        method=args.method,
        per_channel=not args.per_tensor,
        exclude_nodes=excluded,
        op_types=op_types,
        reduce_range=args.reduce_range,
        bias_correction=args.bias_correction,
        fuse=not args.no_fuse,
    )
    require_file(args.model, "model")
    if args.calibration is not None:
        require_file(args.calibration, "calibration data")
    art = quantize(args.model, args.calibration, out=args.output, config=config)
    src = args.model.stat().st_size
    print(
        f"wrote {art.path} ({art.recipe}): {art.size_bytes / 1024:.1f} KiB, "
        f"{art.size_bytes / src:.2f}x the input's {src / 1024:.1f} KiB"
    )
    for note in [*art.details.get("input_notes", []), *art.details.get("fallbacks", [])]:
        print(f"  note: {note}")
    corrected = art.details.get("bias_correction")
    if corrected:
        from sdk.quantize.bias_correction import describe

        print(f"  bias correction: {describe(corrected)}")
    print(_check_line(art.details.get("check") or {}))
    return EXIT_OK


def _int8_flags(args: argparse.Namespace) -> list[str]:
    """The ONNX Runtime int8 options given: neither int4 weights nor a .tflite take them."""
    return [
        flag
        for flag, used in (
            ("--method", args.method != "minmax"),
            ("--per-tensor", args.per_tensor),
            ("--exclude", bool(args.exclude.strip())),
            ("--op-types", args.op_types is not None),
            ("--reduce-range", args.reduce_range),
            ("--bias-correction", args.bias_correction),
            ("--no-fuse", args.no_fuse),
        )
        if used
    ]


def _run_int4(args: argparse.Namespace) -> int:
    """An ONNX model's MatMul weights in 4 bits (``sdk.quantize.nbits.quantize_int4``)."""
    from sdk.quantize.nbits import quantize_int4

    int8_only = _int8_flags(args)
    if int8_only:
        raise ConfigError(f"{', '.join(int8_only)}: int8 options; --mode int4 takes none")
    require_file(args.model, "model")
    if args.calibration is not None:
        require_file(args.calibration, "calibration data")
    art = quantize_int4(args.model, args.calibration, out=args.output)
    src = args.model.stat().st_size
    print(
        f"wrote {art.path} ({art.recipe}, {art.details['quantized_nodes']} MatMul weights in "
        f"4 bits): {art.size_bytes / 1024:.1f} KiB, {art.size_bytes / src:.2f}x the input's "
        f"{src / 1024:.1f} KiB"
    )
    print(_check_line(art.details.get("check") or {}))
    return EXIT_OK


def _run_tflite(args: argparse.Namespace) -> int:
    """A float .tflite through ai-edge-quantizer (``sdk.quantize.litert.quantize_tflite``)."""
    from sdk.optimize.stages.litert_tflite import RUNTIME_UNSAFE
    from sdk.quantize.litert import quantize_tflite

    onnx_only = _int8_flags(args)
    if onnx_only:
        raise ConfigError(
            f"{', '.join(onnx_only)}: ONNX Runtime options; a .tflite is quantized with "
            "ai-edge-quantizer: choose its --recipe"
        )
    recipe = args.recipe or ("dynamic_wi8_afp32" if args.mode == "dynamic" else "static_wi8_ai8")
    require_file(args.model, "model")
    if args.calibration is not None:
        require_file(args.calibration, "calibration data")
    elif _litert_recipes()[recipe]:
        raise ConfigError(
            f"recipe {recipe} calibrates activation ranges: pass --calibration DATA.npz, or "
            "choose a recipe without calibration (--recipe weight_only_wi8_afp32)"
        )
    art = quantize_tflite(args.model, args.calibration, args.output, recipe=recipe)
    src = args.model.stat().st_size
    print(
        f"wrote {art.path} ({art.recipe}, {art.precision}): {art.size_bytes / 1024:.1f} KiB, "
        f"{art.size_bytes / src:.2f}x the input's {src / 1024:.1f} KiB"
    )
    for note in art.details.get("input_notes", []):
        print(f"  note: {note}")
    if recipe in RUNTIME_UNSAFE:
        print(f"  note: {recipe}: {RUNTIME_UNSAFE[recipe]}")
    print(_check_line(art.details.get("check") or {}))
    return EXIT_OK


def _litert_recipes() -> dict[str, bool]:
    """ai-edge-quantizer's recipes: whether each calibrates."""
    from sdk.quantize.litert import RECIPES

    return {name: r.calibrated for name, r in RECIPES.items()}


def _default_op_types() -> tuple[str, ...]:
    from sdk.quantize import DEFAULT_OP_TYPES

    return DEFAULT_OP_TYPES


def _check_line(check: dict[str, Any]) -> str:
    """The quantized model's check against fp32, as one line (quantize() logs the warning)."""
    from sdk.quantize import CHECK_MIN_COSINE

    cos, err = check.get("cosine_min"), check.get("max_abs_error")
    figures = (
        f"worst-sample cosine {'n/a' if cos is None else f'{cos:.5g}'}, "
        f"max |error| {'n/a' if err is None else f'{err:.4g}'}"
    )
    if check.get("inputs") != "calibration":
        return (
            f"check vs fp32 on {check.get('samples', '?')} generated random inputs: {figures} "
            "(random inputs show the model runs, not its accuracy; pass --calibration for a "
            "real check)"
        )
    verdict = ""
    if cos is not None:
        verdict = (
            " (ok)" if cos >= CHECK_MIN_COSINE else f" (BELOW {CHECK_MIN_COSINE}: see warning)"
        )
    return f"check vs fp32 on {check.get('samples', '?')} calibration samples: {figures}{verdict}"
