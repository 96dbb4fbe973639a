"""``edgeship demo``: the main job end to end on the bundled digits (``sdk.demo`` for the
model and its bundle, ``sdk.demo_fleet`` for the fleet that runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``demo`` to the ``edgeship`` subparsers."""
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sdk.demo import run_host_demo
    from sdk.demo_fleet import run_fleet_demo

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
