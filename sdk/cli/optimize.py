"""``edgeship optimize``: the budgeted search over recipes, then a bundle of the choice
(``sdk.optimize``), optionally signed and reported as JSON and HTML."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.errors import ConfigError
from sdk.cli.common import (
    EXIT_BUDGET,
    EXIT_OK,
    add_broker_password_arg,
    add_target_args,
    broker_password,
    require_file,
    write_json,
)
from sdk.cli.quantize import add_reduce_range_arg

if TYPE_CHECKING:
    from sdk.optimize import OptimizeConfig

__all__ = ["argv_is_cli", "register", "run"]


def register(sub: Any) -> None:
    """Add ``optimize`` to the ``edgeship`` subparsers."""
    p = sub.add_parser(
        "optimize",
        help="try fp32/int8 recipes, benchmark each, bundle the best that meets the budget",
        description="Try fp32, dynamic int8 and static int8 versions of an ONNX model (LiteRT "
        "int8 and int4 recipes for a float .tflite), measure "
        "each one's quality on --eval data and its speed and memory under --target, choose "
        "the fastest (p95) candidate that meets every budget line, and write it as a bundle. "
        "Calibration variants and accuracy-aware int8 run only when plain static int8 misses "
        "the quality line; recipes not tried are listed with the reason (docs/quantization.md, "
        "'How optimize searches'). Candidate models are kept in OUTPUT-candidates/. When no "
        "candidate meets the "
        "budget, the best effort is still bundled and the report names each failing line; "
        "the exit code is then 1.",
    )
    p.add_argument(
        "model",
        type=Path,
        help="the fp32 .onnx file (skl2onnx's defaults too: a ZipMap output becomes the "
        "probability tensor, said in a note), a float .tflite (LiteRT recipes then: "
        "docs/quantization.md, 'A .tflite model'), or a PyTorch program saved with "
        "torch.export.save (.pt2), a Keras model (.keras, .h5) or a TensorFlow SavedModel "
        "folder (these need --calibration, whose keys name the inputs): converted to ONNX and "
        "to TFLite, and both runtimes' candidates searched (--runtime; Keras and SavedModel "
        "need pip install 'edgeship[tf]')",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--calibration", type=Path, help=".npz of representative inputs")
    p.add_argument("--eval", type=Path, help=".npz of eval inputs, optionally with 'labels'")
    add_target_args(p)
    p.add_argument("--name", default=None, help="model name in the bundle (default: file stem)")
    p.add_argument("--model-version", default="1", help="model version in the bundle")
    p.add_argument("--labels", default=None, help="comma-separated class labels for output 0")
    _add_measure_args(p)
    _add_search_args(p)
    p.add_argument(
        "--sign-key",
        type=Path,
        metavar="PRIVATE.pem",
        help="sign the bundle with this Ed25519 key when it meets the budget (edgeship sign)",
    )
    p.add_argument("--html", type=Path, help="also write the report as an HTML page here")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    _add_device_args(p)
    p.set_defaults(handler=run)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "on your own boards (docs/agent.md, 'Timing candidates')",
        "Time every candidate that passed the quality gate on real devices, through their "
        "agents over MQTT, and choose from those figures (one choice, and one bundle, per "
        "board model: OUTPUT for the first --device's board, OUTPUT-<board> for the others). "
        "Host figures stay in the report and skip hopeless candidates.",
    )
    g.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="a device to time candidates on, repeatable; devices of the same board model "
        "share the work",
    )
    g.add_argument("--broker", help="the broker the devices' agents use: mqtt[s]://[user@]host")
    g.add_argument("--fleet", default="default", help="the devices' fleet (default: default)")
    add_broker_password_arg(g)
    g.add_argument("--ca-file", help="CA certificate for mqtts://")
    g.add_argument(
        "--device-key",
        type=Path,
        metavar="PRIVATE.pem",
        help="sign each candidate for devices that only run what a trusted key signed",
    )
    g.add_argument(
        "--device-runs", type=int, default=100, help="timed runs per candidate on a device"
    )
    g.add_argument(
        "--device-seconds",
        type=float,
        default=2.0,
        help="minimum seconds of timed runs per candidate on a device",
    )
    g.add_argument(
        "--device-threads", type=int, default=1, help="runtime threads on the device (1)"
    )
    g.add_argument(
        "--device-timeout",
        type=float,
        default=300.0,
        help="seconds a device has to receive and time one candidate before it counts as "
        "gone and the candidate moves to another device (default 300)",
    )


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    """How each candidate is measured: timing, the outlier detector, the quality gate."""
    p.add_argument("--runs", type=int, default=200, help="minimum timed runs per candidate")
    p.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="timed seconds per candidate; a benchmark stops sooner (after --runs) once its p95 "
        "is known within 2%% (95%% confidence)",
    )
    p.add_argument(
        "--detector",
        default="auto",
        choices=["auto", "none", "combined", "mahalanobis", "energy", "max_softmax"],
        help="outlier detector fitted on --calibration and shipped in the bundle (default: "
        "auto, chosen from the model's inputs and outputs)",
    )
    p.add_argument(
        "--outlier-fpr",
        type=float,
        default=0.01,
        help="false-positive rate the detector's threshold is calibrated for (default 0.01)",
    )
    p.add_argument(
        "--min-cosine",
        default="0.99",
        help="quality gate without eval data (or without a drop line): an int8 candidate needs "
        "this worst-sample cosine with fp32 on calibration samples (default 0.99; 'off' to "
        "disable)",
    )


def _add_search_args(p: argparse.ArgumentParser) -> None:
    """Which candidates the search tries, and how long it may take."""
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no new candidate after this many seconds; the ones not started are "
        "reported as skipped (fp32 always runs, the choice and bundle always follow)",
    )
    p.add_argument(
        "--methods",
        default="minmax,entropy,percentile",
        help="static int8 calibration methods: the first is always tried, the others (and "
        "per-tensor weights) only when it misses the quality line (default "
        "minmax,entropy,percentile)",
    )
    p.add_argument(
        "--no-fused-fp32",
        action="store_true",
        help="do not measure fp32 with exact rewrites (constant scales folded into Convs, "
        "written-out hard-swishes made x * HardSigmoid(x)): candidate fp32-fused, same outputs",
    )
    p.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="do not try static int8 with bias correction (tried only when the all-ops, else "
        "the plain, static int8 candidate misses the drop line alone)",
    )
    p.add_argument(
        "--no-accuracy-aware",
        action="store_true",
        help="do not try accuracy-aware int8 (nodes kept in float until the drop line is met; "
        "tried only when plain static int8 misses that line)",
    )
    p.add_argument(
        "--calibration-cache",
        type=Path,
        metavar="DIR",
        help="where calibration ranges are cached per (model, data, method) and reused "
        "(default ~/.cache/edgeship/calibration, or $EDGESHIP_CACHE_DIR/calibration)",
    )
    p.add_argument(
        "--no-calibration-cache", action="store_true", help="calibrate every candidate afresh"
    )
    p.add_argument(
        "--fp16",
        choices=["auto", "on", "off"],
        default="auto",
        help="fp16 candidate: auto tries it only where the runtime benefits (not on CPU "
        "boards, where it is listed as skipped with the reason)",
    )
    p.add_argument(
        "--no-latency-aware",
        action="store_true",
        help="do not try latency-aware int8 (nodes whose int8 form the per-node profile "
        "measures slower kept in float; tried only when plain static int8 is slower than fp32)",
    )
    p.add_argument(
        "--no-weight-int4",
        action="store_true",
        help="with a size line, do not try 4-bit MatMul weights (ort-weight-int4)",
    )
    p.add_argument(
        "--runtime",
        choices=["auto", "onnxruntime", "litert"],
        default="auto",
        help="the runtime the bundle may name: auto searches every runtime the target has "
        "(this host: the ones installed; a board profile: both) and lets the measurements "
        "choose; litert with a .pt2 measures everything against its float TFLite export",
    )
    add_reduce_range_arg(p, auto=True)


def run(args: argparse.Namespace) -> int:
    from sdk.optimize import optimize

    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is not None and (path.is_dir() or any(p.is_file() for p in path.parents)):
            raise ConfigError(f"{flag} {path}: not a file that can be written (a folder is there)")
    config = _config(args)
    if args.sign_key is not None:  # a bad key fails now, not after the search
        from device_agent.signing import load_private_key

        load_private_key(args.sign_key)
    report = optimize(
        args.model,
        calibration=args.calibration,
        eval_data=args.eval,
        out=args.output,
        config=config,
        progress=True,
    )
    print(report.summary())
    if args.sign_key is not None:
        if report.meets_budget:
            from sdk.signing import sign_bundle

            _, key_id = sign_bundle(args.output, args.sign_key)
            print(f"signed {args.output} with {key_id}")
        else:
            print(
                f"not signed: the bundle misses its budget; to ship it anyway: "
                f"edgeship sign {args.output} --key {args.sign_key}"
            )
    if args.json is not None:
        write_json(args.json, report.to_dict())
    if args.html is not None:
        from sdk.report_html import write_report

        write_report(
            args.html,
            report.to_dict(),
            command="edgeship "
            + " ".join(sys.argv[1:] if argv_is_cli() else ["optimize", str(args.model), "..."]),
        )
        print(f"HTML report written to {args.html}")
    unchosen = (report.devices or {}).get("unchosen") or {}
    for board, why in unchosen.items():
        print(f"no choice for {board}: nothing could be timed there ({why})", file=sys.stderr)
    return EXIT_OK if report.meets_budget and not unchosen else EXIT_BUDGET


def _config(args: argparse.Namespace) -> OptimizeConfig:
    """The arguments as an ``OptimizeConfig``, every input file checked first."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig
    from sdk.targets import get_target

    budget = parse_budget(args.budget)
    target = get_target(args.target, latency_scale=args.latency_scale)
    from sdk.optimize.tf_source import is_saved_model_dir

    if not is_saved_model_dir(args.model):  # a SavedModel is a folder
        require_file(args.model, "model")
    for what, path in (("calibration data", args.calibration), ("eval data", args.eval)):
        if path is not None:
            require_file(path, what)
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    return OptimizeConfig(
        target=target,
        budget=budget,
        name=args.name or args.model.stem,
        version=args.model_version,
        labels=None if labels is None else tuple(labels),
        min_runs=args.runs,
        min_seconds=args.seconds,
        detector=args.detector,
        outlier_fpr=args.outlier_fpr,
        min_cosine=_min_cosine(args.min_cosine),
        time_limit_s=args.time_limit,
        static_methods=_methods(args.methods),
        try_accuracy_aware=not args.no_accuracy_aware,
        try_bias_correction=not args.no_bias_correction,
        try_fused_fp32=not args.no_fused_fp32,
        calibration_cache=args.calibration_cache,
        use_calibration_cache=not args.no_calibration_cache,
        try_fp16={"auto": None, "on": True, "off": False}[args.fp16],
        reduce_range=args.reduce_range,
        runtime=args.runtime,
        try_weight_int4=not args.no_weight_int4,
        try_latency_aware=not args.no_latency_aware,
        on_device=_on_device(args),
    )


def _on_device(args: argparse.Namespace) -> Any:
    """``--device ...`` as an OnDevice (None without --device); ConfigError for bad input."""
    if not args.device:
        return None
    from device_agent.contracts.broker import BrokerUrl
    from sdk.optimize.on_device import OnDevice

    if not args.broker:
        raise ConfigError("--device needs --broker URL (the broker the devices' agents use)")
    BrokerUrl.parse(args.broker)
    if args.device_key is not None:
        from device_agent.signing import load_private_key

        load_private_key(args.device_key)  # a bad key fails now, not after the search
    from device_agent.contracts.commands import BenchmarkArgs

    try:  # the device's own limits, checked here rather than after the search
        BenchmarkArgs.parse(
            {
                "min_runs": args.device_runs,
                "min_seconds": args.device_seconds,
                "threads": args.device_threads,
                "candidate": "c" + "0" * 32,  # any candidate: threads apply to one
                "max_seconds": 120.0,  # what sdk.remote_bench gives each timing
            }
        )
    except ConfigError as exc:
        raise ConfigError(f"--device-runs/--device-seconds/--device-threads: {exc}") from None
    if not args.device_seconds + 10 <= args.device_timeout < math.inf:
        raise ConfigError(
            f"--device-timeout must leave time for the transfer and --device-seconds "
            f"({args.device_seconds:g} s) of timing: at least {args.device_seconds + 10:g} s, "
            f"got {args.device_timeout:g}"
        )
    return OnDevice(
        broker_url=args.broker,
        devices=tuple(args.device),
        fleet=args.fleet,
        key=args.device_key,
        password=broker_password(args),
        ca_file=args.ca_file,
        min_runs=args.device_runs,
        min_seconds=args.device_seconds,
        threads=args.device_threads,
        timeout_s=args.device_timeout,
    )


def _methods(text: str) -> tuple[Any, ...]:
    """``--methods``: calibration methods, checked against sdk.quantize.CalibMethod's values."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    known = ("minmax", "entropy", "percentile")
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ConfigError(f"--methods {text!r}: give a comma-separated list of {', '.join(known)}")
    return methods


def _min_cosine(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--min-cosine {text!r}: give a number such as 0.99, or 'off'") from None


def argv_is_cli() -> bool:
    """Whether sys.argv is this command's (not a test runner's calling main() directly)."""
    return len(sys.argv) > 1 and sys.argv[1] == "optimize"
