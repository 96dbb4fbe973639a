"""The ``edgeship`` command: arguments in, one library call, a report out.

Exit codes (stable; scripts rely on them):

* 0 — success (for ``bench``/``optimize`` with a budget: the budget is met)
* 1 — the work ran, but no candidate / the model does not meet the budget (report written)
* 2 — bad input: a missing file, malformed budget, unknown target, data not matching the model
* 3 — an unexpected internal error (a bug: rerun with ``--debug`` and report the traceback)
* 130 — interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError, EdgeshipError

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUDGET", "EXIT_INTERNAL", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_BUDGET = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

_EPILOG = """\
examples:
  edgeship targets
  edgeship quantize model.onnx --calibration cal.npz -o model.int8.onnx
  edgeship bench model.int8.onnx --target rpi4 --budget "p95<=20ms,rss<=64MB"
  edgeship optimize model.onnx --calibration cal.npz --eval eval.npz \\
      --target rpi4 --budget "p95<=20ms,drop<=1%" -o bundle/ --json report.json
  edgeship inspect bundle/

Data files are .npz archives keyed by the model's input names (numpy.savez); an eval
file may add a 'labels' array of class ids (integers from 0 to classes - 1).
Exit codes: 0 ok, 1 budget not met, 2 bad input, 3 internal error. Docs: README.md and
docs/ in the repository.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship",
        description="Ship ML models to Raspberry Pi and Jetson boards: quantize to int8, "
        "benchmark against a budget, and package a verified bundle.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeship {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "quantize",
        help="int8-quantize an ONNX model with ONNX Runtime",
        description="Quantize an ONNX model to int8. Static mode (the default) calibrates "
        "activation ranges on --calibration data and writes a QDQ model with per-channel "
        "weights; dynamic mode needs no data and quantizes weights ahead and activations at "
        "run time (best for transformers and LSTMs).",
    )
    p.add_argument("model", type=Path, help="the fp32 .onnx file")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the int8 .onnx")
    p.add_argument(
        "--calibration",
        type=Path,
        help=".npz of representative inputs (static mode: calibrates; both modes: the check "
        "of the int8 model against fp32 runs on it, else on generated random inputs)",
    )
    p.add_argument("--mode", choices=["static", "dynamic"], default="static")
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
    p.set_defaults(handler=_cmd_quantize)

    p = sub.add_parser(
        "bench",
        help="benchmark a model or bundle under a target profile",
        description="Benchmark a .onnx/.tflite model or a bundle in its own process, pinned to "
        "the target's core count (capped at this host's). Latencies are measured on this "
        "host and labelled so. The rss budget line is the model's peak RSS increase over a "
        "runtime-only baseline.",
    )
    p.add_argument(
        "model", type=Path, nargs="?", help=".onnx or .tflite file, or a bundle directory"
    )
    _add_target_args(p)
    p.add_argument(
        "--device",
        help="benchmark on this device instead: its agent times its bundle on the board "
        "(needs --broker)",
    )
    p.add_argument(
        "--broker",
        help="the broker the device's agent is connected to: mqtt://[user:password@]host[:port] "
        "or mqtts://...",
    )
    p.add_argument("--ca-file", help="CA certificate for mqtts:// (with --device)")
    p.add_argument("--fleet", default="default", help="the device's fleet (default: default)")
    p.add_argument("--runs", type=int, default=200, help="minimum timed runs (default 200)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds (default 3)")
    p.add_argument("--threads", type=int, help="override the profile's thread count")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="full shape of the generated input NAME, e.g. x=1,3,48,320 (repeatable); needed "
        "for dynamic dimensions other than the batch",
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser(
        "optimize",
        help="try fp32/int8 recipes, benchmark each, bundle the best that meets the budget",
        description="Try fp32, dynamic int8 and static int8 versions of an ONNX model, measure "
        "each one's quality on --eval data and its speed and memory under --target, choose "
        "the fastest (p95) candidate that meets every budget line, and write it as a bundle. "
        "Calibration variants and accuracy-aware int8 run only when plain static int8 misses "
        "the quality line; recipes not tried are listed with the reason (docs/quantization.md, "
        "'How optimize searches'). Candidate models are kept in OUTPUT-candidates/. When no "
        "candidate meets the "
        "budget, the best effort is still bundled and the report names each failing line; "
        "the exit code is then 1.",
    )
    p.add_argument("model", type=Path, help="the fp32 .onnx file")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--calibration", type=Path, help=".npz of representative inputs")
    p.add_argument("--eval", type=Path, help=".npz of eval inputs, optionally with 'labels'")
    _add_target_args(p)
    p.add_argument("--name", default=None, help="model name in the bundle (default: file stem)")
    p.add_argument("--model-version", default="1", help="model version in the bundle")
    p.add_argument("--labels", default=None, help="comma-separated class labels for output 0")
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
        "--sign-key",
        type=Path,
        metavar="PRIVATE.pem",
        help="sign the bundle with this Ed25519 key when it meets the budget (edgeship sign)",
    )
    p.add_argument("--html", type=Path, help="also write the report as an HTML page here")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.set_defaults(handler=_cmd_optimize)

    p = sub.add_parser(
        "deploy",
        help="send a bundle to a device over MQTT; it swaps in after checks, or rolls back",
        description="Send a bundle to a device's agent over MQTT in chunks. The device "
        "verifies it (hashes, and the signature when it has trusted keys), loads it, runs a "
        "self-test, swaps it in without failing an inference, and rolls back to the previous "
        "bundle if one of its first inferences fails. Exit 0 when the bundle is applied, 1 "
        "when the device refused or rolled it back (the reason is printed) or did not "
        "answer, 2 for bad input (the broker unreachable or refusing the credentials included: "
        "nothing was sent). See docs/agent.md, 'Remote deploy'.",
        epilog="example: edgeship deploy bundle-v2/ --device pi-07 --fleet greenhouse "
        "--broker mqtts://operator:PASSWORD@hub.local:8883 --ca-file ca.crt",
    )
    p.add_argument("bundle", type=Path, help="the bundle directory to send")
    p.add_argument("--device", required=True, help="the device id")
    p.add_argument(
        "--broker",
        required=True,
        help="the broker the device's agent is connected to: mqtt://[user:password@]host[:port] "
        "or mqtts://... (a user allowed to write the device's cmd topic)",
    )
    p.add_argument("--fleet", default="default", help="the device's fleet (default: default)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the whole deploy, probation included (default 300)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the bundle is swapped in, without waiting for its probation",
    )
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.set_defaults(handler=_cmd_deploy)

    p = sub.add_parser("inspect", help="verify a bundle and print its manifest")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("targets", help="list the target profiles")
    p.set_defaults(handler=_cmd_targets)

    p = sub.add_parser(
        "demo",
        help="the main job end to end on the bundled digits data",
        description="Train a small CNN on scikit-learn's bundled digits, export it to ONNX, "
        "optimize it under a Raspberry Pi 4 budget, bundle it with its outlier detector and "
        "sign the bundle with an Ed25519 key kept in WORKDIR/keys; then start an MQTT broker "
        "(embedded, unless --broker), the collector with its dashboard, and several agents "
        "that only accept that key's signature and replay held-out digits mixed with corrupted "
        "inputs, and report what the fleet saw. Everything is local; nothing is downloaded.",
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-out"), help="default: ./demo-out")
    p.add_argument("--target", default="rpi4")
    p.add_argument("--budget", default="p95<=5ms,rss<=64MB,drop<=1%,size<=1MB")
    p.add_argument("--duration", type=float, default=60.0, help="seconds the fleet runs (60)")
    p.add_argument("--agents", type=int, default=3, help="agent processes (default 3)")
    p.add_argument("--broker", help="use this MQTT broker instead of starting an embedded one")
    p.add_argument("--http", default="127.0.0.1:9108", help="collector dashboard/API address")
    p.add_argument(
        "--keep-running", action="store_true", help="keep the collector serving after the run"
    )
    p.add_argument(
        "--host-only", action="store_true", help="only train, optimize, bundle and sign (no fleet)"
    )
    p.set_defaults(handler=_cmd_demo)

    from collector.cli import COLLECT_DESCRIPTION, add_collect_arguments

    p = sub.add_parser(
        "collect",
        help="subscribe to a fleet's MQTT topics, store its history, serve its state",
        description=COLLECT_DESCRIPTION,
    )
    add_collect_arguments(p)
    p.set_defaults(handler=_cmd_collect)

    from sdk.fleet_cli import add_fleet_parser

    add_fleet_parser(sub)

    from sdk.trust_cli import add_trust_parsers

    add_trust_parsers(sub)
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="host",
        help="board profile: rpi3, rpi4, rpi5, rpi-zero2w, jetson-nano, jetson-orin-nano, "
        "host (default: host; see 'edgeship targets')",
    )
    p.add_argument(
        "--budget",
        default="",
        help='limits, e.g. "p95<=20ms,rss<=64MB,drop<=1%%,size<=2MB" (MB = MiB)',
    )
    p.add_argument(
        "--latency-scale",
        type=float,
        default=None,
        help="host-to-board latency factor, to print an ESTIMATE of board latency",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from sdk.terminal import guard_stdio

    # Devices, bundles, models and data files put text in what commands print: no control
    # character in it may reach the terminal (sdk.terminal).
    with guard_stdio():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    from sdk.terminal import printable

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return handler(args)
    except EdgeshipError as exc:
        if args.debug:  # the traceback, with the foreign error it was converted from
            traceback.print_exception(exc, file=sys.stderr)
        print(f"edgeship: error: {printable(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("edgeship: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"edgeship: internal error: {type(exc).__name__}: {printable(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _version() -> str:
    from sdk import __version__

    return __version__


def _cmd_targets(args: argparse.Namespace) -> int:
    from sdk.targets import PROFILES, host_profile

    rows = [host_profile(), *PROFILES.values()]
    print(f"{'name':<18}{'cores':>6}{'memory':>9}  {'cpu':<22}description")
    for t in rows:
        print(f"{t.name:<18}{t.cores:>6}{t.memory_mb:>7}MB  {t.cpu:<22}{t.description}")
    print("\nBenchmarks run with the board's core count, capped at this host's; latencies are")
    print("measured on this host. --latency-scale adds an estimate of board latency.")
    return EXIT_OK


def _cmd_quantize(args: argparse.Namespace) -> int:
    from sdk.quantize import QuantizeConfig, quantize

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
    )
    _require_file(args.model, "model")
    if args.calibration is not None:
        _require_file(args.calibration, "calibration data")
    art = quantize(args.model, args.calibration, out=args.output, config=config)
    src = args.model.stat().st_size
    print(
        f"wrote {art.path} ({art.recipe}): {art.size_bytes / 1024:.1f} KiB, "
        f"{art.size_bytes / src:.2f}x the input's {src / 1024:.1f} KiB"
    )
    for note in art.details.get("fallbacks", []):
        print(f"  note: {note}")
    print(_check_line(art.details.get("check") or {}))
    return EXIT_OK


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


def _cmd_bench(args: argparse.Namespace) -> int:
    from sdk.bench import BenchConfig, benchmark
    from sdk.budget import parse_budget
    from sdk.targets import get_target

    budget = parse_budget(args.budget)
    if args.device is not None:
        return _bench_remote(args, budget)
    if args.model is None:
        raise ConfigError("give a model or bundle to benchmark, or --device ID --broker URL")
    target = get_target(args.target, latency_scale=args.latency_scale)
    model_path = _model_from_path(args.model)
    config = BenchConfig(
        target=target,
        min_runs=args.runs,
        min_seconds=args.seconds,
        threads=args.threads,
        shapes=_parse_shapes(args.shape) or None,
    )
    try:
        report = benchmark(
            model_path, config, budget=None if budget.is_empty() else budget, progress=True
        )
    except ConfigError as exc:
        if "cannot choose a size for dimension" not in str(exc):
            raise
        raise ConfigError(f"{exc}; on the command line: --shape NAME=D0,D1,...") from exc
    print(report.summary())
    if args.json is not None:
        _write_json(args.json, report.to_dict())
    if not budget.is_empty() and not report.meets_budget:
        return EXIT_BUDGET
    return EXIT_OK


def _bench_remote(args: argparse.Namespace, budget: Any) -> int:
    from sdk.budget import check_budget
    from sdk.remote import remote_benchmark

    if args.broker is None:
        raise ConfigError("--device needs --broker URL (the broker the device reports to)")
    report = remote_benchmark(
        args.broker,
        args.fleet,
        args.device,
        min_runs=args.runs,
        min_seconds=args.seconds,
        ca_file=args.ca_file,
    )
    from sdk.terminal import printable

    lat = report["latency_ms"]
    # runtime, its version and measured_on are the device's own text.
    print(
        f"{printable(args.device)}: {printable(report.get('runtime'))} "
        f"{printable(report.get('runtime_version'))}"
    )
    print(f"measured on {printable(report['measured_on'])}")
    print(
        f"  latency (ms) over {report['runs']} runs: "
        + "  ".join(f"{k} {lat[k]:.4g}" for k in ("p50", "p90", "p95", "p99", "min", "max"))
    )
    print(
        f"  throughput {report['inferences_per_s']:.4g} inferences/s; agent peak RSS "
        f"{report.get('peak_rss_mb') or float('nan'):.1f} MiB"
    )
    code = EXIT_OK
    if not budget.is_empty():
        metrics = {f"{k}_ms": lat[k] for k in ("p50", "p90", "p95", "p99")}
        metrics["size_mb"] = (report.get("size_bytes") or 0) / 2**20
        lines = check_budget(budget, metrics)
        report["budget_lines"] = [line.to_dict() for line in lines]
        report["meets_budget"] = all(line.passed for line in lines)
        for line in lines:
            print(f"    {line.describe()}")
        code = EXIT_OK if report["meets_budget"] else EXIT_BUDGET
    if args.json is not None:
        _write_json(args.json, report)
    return code


def _cmd_optimize(args: argparse.Namespace) -> int:
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from sdk.targets import get_target

    budget = parse_budget(args.budget)
    target = get_target(args.target, latency_scale=args.latency_scale)
    _require_file(args.model, "model")
    for what, path in (("calibration data", args.calibration), ("eval data", args.eval)):
        if path is not None:
            _require_file(path, what)
    labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    config = OptimizeConfig(
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
        calibration_cache=args.calibration_cache,
        use_calibration_cache=not args.no_calibration_cache,
        try_fp16={"auto": None, "on": True, "off": False}[args.fp16],
    )
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
        _write_json(args.json, report.to_dict())
    if args.html is not None:
        from sdk.report_html import write_report

        write_report(
            args.html,
            report.to_dict(),
            command="edgeship "
            + " ".join(sys.argv[1:] if argv_is_cli() else ["optimize", str(args.model), "..."]),
        )
        print(f"HTML report written to {args.html}")
    return EXIT_OK if report.meets_budget else EXIT_BUDGET


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


def _cmd_deploy(args: argparse.Namespace) -> int:
    from sdk.deploy import deploy_bundle
    from sdk.remote import BrokerUnavailableError, RemoteError
    from sdk.terminal import printable, raw_stream

    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    if not args.bundle.is_dir():
        raise ConfigError(f"bundle directory not found: {args.bundle}")
    tty = sys.stderr.isatty()
    shown = [-1]

    def progress(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        line = f"sending [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks"
        if tty:
            # "\r" redraws the bar: written on purpose, past the terminal guard.
            out = raw_stream(sys.stderr)
            print(f"\r{line}", end="\n" if done == total else "", file=out, flush=True)
        elif done == total or 10 * done // max(total, 1) > shown[0]:  # every 10% in a log
            shown[0] = 10 * done // max(total, 1)
            print(line, file=sys.stderr, flush=True)

    try:
        result = deploy_bundle(
            args.bundle,
            args.broker,
            args.fleet,
            args.device,
            timeout_s=args.timeout,
            wait_probation=not args.no_wait,
            progress=progress,
            ca_file=args.ca_file,
        )
    except BrokerUnavailableError:
        raise  # nothing was sent: bad input, exit 2 with one line
    except RemoteError as exc:
        print(f"edgeship: deploy failed: {printable(exc)}", file=sys.stderr)
        return EXIT_BUDGET
    # The versions, the state and the reason come from the device's replies.
    versions = printable(f"v{result.from_version} -> v{result.to_version}")
    state = printable(result.state.replace("_", " "))
    print(
        f"{printable(args.device)}: deploy {printable(result.deploy_id)} {state} ({versions}); "
        f"{result.archive_bytes / 1024:.1f} KiB in {result.chunks} chunks "
        f"({result.chunks_sent} sent) in {result.seconds:.1f} s"
    )
    if result.reason:
        print(f"  reason: {printable(result.reason)}")
    if result.state == "probation":
        print("  still on probation: it rolls back if one of its first inferences fails")
    if args.json is not None:
        _write_json(args.json, result.to_dict())
    return EXIT_OK if result.ok or (args.no_wait and result.state == "probation") else EXIT_BUDGET


def _cmd_inspect(args: argparse.Namespace) -> int:
    from device_agent.bundle import load_bundle
    from sdk.terminal import printable as p

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if args.json:
        print(m.to_json(), end="")
        return EXIT_OK
    # Every string of the manifest is whoever made the bundle's: escaped (sdk.terminal).
    print(
        f"bundle {p(bundle.root)}  (format v{m.format_version}, verified: all {len(m.files)} "
        "file hashes match)"
    )
    print(
        f"model      {p(m.model.name)} v{p(m.model.version)}: {p(m.model.file)} "
        f"[{p(m.model.runtime)}, {p(m.model.precision)}, {p(m.model.recipe)}]"
    )
    for t in m.io.inputs:
        print(f"input      {p(t.name)}: {p(t.dtype)} {p(list(t.shape))}")
    for t in m.io.outputs:
        labels = f" labels={list(t.labels)}" if t.labels else ""
        print(f"output     {p(t.name)}: {p(t.dtype)} {p(list(t.shape))}{p(labels)}")
    if m.detector is not None:
        d = m.detector
        print(f"detector   {p(d.kind)}: threshold {d.threshold:.4g} (target FPR {d.target_fpr:g})")
    if m.budget:
        print(f"budget     {json.dumps(m.budget)}")
    if m.benchmark:
        lat = m.benchmark.get("latency_ms", {})
        if lat:
            print(
                "benchmark  "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in lat.items() if isinstance(v, int | float))
            )
        if "measured_on" in m.benchmark:
            print(f"           measured on {p(m.benchmark['measured_on'])}")
    for name, digest in m.files.items():
        size = bundle.path_of(name).stat().st_size
        print(f"file       {p(name)}  {size / 1024:.1f} KiB  sha256 {p(digest[:16])}…")
    print(f"tools      {p(', '.join(f'{k} {v}' for k, v in m.tools.items()))}")
    print(f"signature  {p(bundle.signature.describe())}")
    if m.model.encryption is not None:
        enc = m.model.encryption
        print(f"encrypted  {p(m.model.file)}: {p(enc.algorithm)}, key {p(enc.key_id)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from sdk.demo import run_fleet_demo, run_host_demo

    if args.host_only:
        return run_host_demo(args.workdir, target=args.target, budget=args.budget)
    if args.agents < 1 or args.duration <= 0:
        raise ConfigError("--agents must be at least 1 and --duration positive")
    return run_fleet_demo(
        args.workdir,
        target=args.target,
        budget=args.budget,
        duration_s=args.duration,
        agents=args.agents,
        broker_url=args.broker,
        http=args.http,
        keep_running=args.keep_running,
    )


def _cmd_collect(args: argparse.Namespace) -> int:
    from collector.cli import run_collect

    return run_collect(args)


def _parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,48,320", ...]`` -> ``{"x": (1, 3, 48, 320)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name.strip() or not shape or any(d < 0 for d in shape):
            raise ConfigError(
                f"--shape {item!r}: expected NAME=D0,D1,... with the input's full shape, "
                "e.g. x=1,3,48,320"
            )
        shapes[name.strip()] = shape
    return shapes


def _model_from_path(path: Path) -> Path:
    """A model file, or the model inside a bundle directory (verified first)."""
    if path.is_dir():
        from device_agent.bundle import load_bundle

        bundle = load_bundle(path)
        if bundle.encrypted:
            raise ConfigError(
                f"bundle {path}'s model is encrypted; benchmark the plain model (before "
                "'edgeship encrypt'), or the bundle on a board with 'edgeship bench --device'"
            )
        return bundle.model_path
    _require_file(path, "model")
    return path


def _require_file(path: Path, what: str) -> None:
    from sdk.errors import DataError, ModelFormatError

    if not path.exists():
        cls = ModelFormatError if what == "model" else DataError
        raise cls(f"{what} file not found: {path}")
    if path.is_dir():
        raise DataError(f"{what}: {path} is a directory, expected a file")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"report written to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
