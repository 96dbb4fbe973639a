"""``edgeship targets``: the board profiles a benchmark or a search can be run under; with
``--json``, the same profiles as one JSON object for scripts."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from sdk.cli.common import EXIT_OK

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``targets`` to the ``edgeship`` subparsers."""
    p = sub.add_parser(
        "targets",
        help="list the target profiles",
        description="List the board profiles --target accepts: cores, memory, CPU. The first, "
        "host, is this machine, with the runtimes installed here (JSON key runtimes; empty "
        "for a board: not known, so optimize searches ONNX Runtime and LiteRT).",
        epilog="example: edgeship targets --json | jq -r '.targets[].name'",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of the table (keys in README.md, "
        "CLI quick start)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sdk.targets import PROFILES, host_profile

    rows = [host_profile(), *PROFILES.values()]
    if args.json:
        from device_agent.httpjson import dumps_json

        targets = [
            {
                **dataclasses.asdict(t),
                "isa": list(t.isa),
                "runtimes": list(t.runtimes),
                "threads_on_host": t.threads_on_host(),
            }
            for t in rows
        ]
        sys.stdout.write(dumps_json({"targets": targets}).decode("ascii") + "\n")
        return EXIT_OK
    print(f"{'name':<18}{'cores':>6}{'memory':>9}  {'cpu':<22}description")
    for t in rows:
        print(f"{t.name:<18}{t.cores:>6}{t.memory_mb:>7}MB  {t.cpu:<22}{t.description}")
    print("\nBenchmarks run with the board's core count, capped at this host's; latencies are")
    print("measured on this host. --latency-scale adds an estimate of board latency.")
    host = rows[0].runtimes
    print(
        f"Runtimes: this host has {', '.join(host) or 'none installed'}; a board profile does "
        "not say, so optimize\nsearches both unless --runtime keeps to one."
    )
    return EXIT_OK
