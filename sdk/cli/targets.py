"""``edgeship targets``: the board profiles a benchmark or a search can be run under."""

from __future__ import annotations

import argparse
from typing import Any

from sdk.cli.common import EXIT_OK

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``targets`` to the ``edgeship`` subparsers."""
    p = sub.add_parser("targets", help="list the target profiles")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sdk.targets import PROFILES, host_profile

    rows = [host_profile(), *PROFILES.values()]
    print(f"{'name':<18}{'cores':>6}{'memory':>9}  {'cpu':<22}description")
    for t in rows:
        print(f"{t.name:<18}{t.cores:>6}{t.memory_mb:>7}MB  {t.cpu:<22}{t.description}")
    print("\nBenchmarks run with the board's core count, capped at this host's; latencies are")
    print("measured on this host. --latency-scale adds an estimate of board latency.")
    return EXIT_OK
