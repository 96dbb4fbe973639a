"""The ``edgeship`` program: the root parser, one subcommand per module, and the dispatch that
turns every outcome into an exit code.

Each command module (``sdk/cli/<command>.py``) has ``register(subparsers)``, which adds its
parser and sets its handler, and imports its library inside the handler, so ``edgeship --help``
stays fast. ``COMMANDS`` is the order ``edgeship --help`` lists them in.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from device_agent.errors import EdgeshipError
from sdk.cli import bench, collect, demo, deploy, fleet, inspect, optimize, quantize, targets
from sdk.cli.common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (quantize, bench, optimize, deploy, inspect, targets, demo, collect, fleet)

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
    """The whole ``edgeship`` parser: global options, then every command's subparser."""
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
    for command in COMMANDS:
        command.register(sub)

    from sdk.trust_cli import add_trust_parsers

    add_trust_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgeship`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
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
