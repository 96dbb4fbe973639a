"""``edgeship bench``: benchmark a model or bundle here under a target profile
(``sdk.benchmark``), or on a board through its agent (``--device``, ``sdk.remote``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from sdk.cli.common import (
    EXIT_BUDGET,
    EXIT_OK,
    add_broker_password_arg,
    add_target_args,
    broker_password,
    model_from_path,
    parse_shapes,
    write_json,
)

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``bench`` to the ``edgeship`` subparsers."""
    p = sub.add_parser(
        "bench",
        help="benchmark a model or bundle under a target profile",
        description="Benchmark a .onnx/.tflite model or a bundle in its own process, pinned to "
        "the target's core count (capped at this host's). Latencies are measured on this "
        "host and labelled so. The rss budget line is the model's peak RSS increase over a "
        "runtime-only baseline.",
        epilog="example, timing the bundle on the board itself: edgeship bench --device pi-07 "
        "--fleet greenhouse --broker mqtt://operator@hub.local:1883 "
        "--broker-password-file ~/.edgeship/broker.pw",
    )
    p.add_argument(
        "model", type=Path, nargs="?", help=".onnx or .tflite file, or a bundle directory"
    )
    add_target_args(p)
    p.add_argument(
        "--device",
        help="benchmark on this device instead: its agent times its bundle on the board "
        "(needs --broker)",
    )
    p.add_argument(
        "--broker",
        help="the broker the device's agent is connected to: mqtt://[user@]host[:port] or "
        "mqtts://...",
    )
    add_broker_password_arg(p)
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sdk.bench import BenchConfig, benchmark
    from sdk.budget import parse_budget
    from sdk.targets import get_target

    budget = parse_budget(args.budget)
    if args.device is not None:
        return _bench_remote(args, budget)
    if args.model is None:
        raise ConfigError("give a model or bundle to benchmark, or --device ID --broker URL")
    target = get_target(args.target, latency_scale=args.latency_scale)
    from sdk.artifact import read_artifact

    model = read_artifact(model_from_path(args.model))
    config = BenchConfig(
        target=target,
        min_runs=args.runs,
        min_seconds=args.seconds,
        threads=args.threads,
        shapes=parse_shapes(args.shape) or None,
    )
    try:
        report = benchmark(
            model, config, budget=None if budget.is_empty() else budget, progress=True
        )
    except ConfigError as exc:
        if "cannot choose a size for dimension" not in str(exc):
            raise
        raise ConfigError(f"{exc}; on the command line: --shape NAME=D0,D1,...") from exc
    print(report.summary())
    for note in model.details.get("notes", []):
        print(f"note: {note}")
    if args.json is not None:
        write_json(args.json, report.to_dict())
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
        password=broker_password(args),
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
        write_json(args.json, report)
    return code
