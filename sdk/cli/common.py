"""What several ``edgeship`` commands share: exit codes, file checks, JSON reports, the
``--target``/``--budget`` options, ``--shape`` parsing and the broker password's options.

Everything heavy is imported inside the functions, so that importing a command module (and
``edgeship --help``) loads no torch, onnx or ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUDGET",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "add_broker_password_arg",
    "add_target_args",
    "broker_password",
    "model_from_path",
    "parse_shapes",
    "require_file",
    "write_json",
]

EXIT_OK = 0
EXIT_BUDGET = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def add_target_args(p: argparse.ArgumentParser) -> None:
    """``--target``, ``--budget`` and ``--latency-scale``: ``bench`` and ``optimize`` alike."""
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


def add_broker_password_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--broker-password-file``: the commands that connect to the broker (``deploy``,
    ``bench --device``; ``collect`` has the same option from ``collector.cli``)."""
    p.add_argument(
        "--broker-password-file",
        type=Path,
        metavar="FILE",
        help="a file holding the broker password for the user in --broker (mode 600; else "
        "EDGESHIP_BROKER_PASSWORD): kept out of ps and shell history, unlike a password in "
        "the URL",
    )


def broker_password(args: argparse.Namespace) -> str | None:
    """The broker password from ``--broker-password-file``, ``EDGESHIP_BROKER_PASSWORD`` or
    ``--broker``'s URL (:mod:`device_agent.contracts.broker_password`); ConfigError for a bad
    file or two passwords."""
    from device_agent.contracts.broker_password import resolve_broker_password

    return resolve_broker_password(args.broker, args.broker_password_file).password


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
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


def model_from_path(path: Path) -> Path:
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
    require_file(path, "model")
    return path


def require_file(path: Path, what: str) -> None:
    """Refuse a missing file (or a directory) before any work, naming what it was for."""
    from sdk.errors import DataError, ModelFormatError

    if not path.exists():
        cls = ModelFormatError if what == "model" else DataError
        raise cls(f"{what} file not found: {path}")
    if path.is_dir():
        raise DataError(f"{what}: {path} is a directory, expected a file")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``--json PATH``: the command's report, and one line saying where it went. Strict JSON:
    a non-finite number (a figure not measured) is written as null, never as NaN."""
    from device_agent.httpjson import without_non_finite

    path.parent.mkdir(parents=True, exist_ok=True)
    clean = without_non_finite(data)
    path.write_text(json.dumps(clean, indent=2, default=str, allow_nan=False) + "\n")
    print(f"report written to {path}")
