"""``edgeship collect``: the fleet collector, run from the workstation's command.

The collector is its own program (``edgeship-collector``, ``collector/cli.py``); its options
and handler live there, and this command only mounts them, so both spell the same flags, help
and exit codes.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``collect`` to the ``edgeship`` subparsers, with ``collector.cli``'s options."""
    from collector.cli import COLLECT_DESCRIPTION, COLLECT_EPILOG, add_collect_arguments

    p = sub.add_parser(
        "collect",
        help="subscribe to a fleet's MQTT topics, store its history, serve its state",
        description=COLLECT_DESCRIPTION,
        epilog=COLLECT_EPILOG.replace("edgeship-collector", "edgeship collect", 1),
    )
    add_collect_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from collector.cli import run_collect

    return run_collect(args)
