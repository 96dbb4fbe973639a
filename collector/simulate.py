"""``python -m collector.simulate``: a fleet of simulated devices from the command line.

The fleet itself is :mod:`collector.sim_fleet` (imported by tests and benchmarks through this
module too); the options are :func:`collector.cli.simulate_main`'s, beside the collector's own.
Keeping the command apart from the library is what lets the command line import the library
without the library importing the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from collector.cli import simulate_main
from collector.sim_fleet import (
    FD_SETSIZE,
    FDS_PER_DEVICE,
    MAX_DEVICES_PER_PROCESS,
    SimConfig,
    SimulatedFleet,
)

__all__ = [
    "FDS_PER_DEVICE",
    "FD_SETSIZE",
    "MAX_DEVICES_PER_PROCESS",
    "SimConfig",
    "SimulatedFleet",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Simulate a fleet until ``--duration`` is over; see ``--help``."""
    return simulate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
