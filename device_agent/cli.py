"""The ``edgeship-agent`` command on the board.

``edgeship-agent check BUNDLE`` is the first command to run on a new board: it verifies the
bundle's hashes, loads the model with its runtime, runs one inference and prints timings and
the environment. Exit codes: 0 ok, 2 a problem with the bundle or the runtime.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from device_agent.contracts.bundle import IOSpec
from device_agent.errors import EdgeshipError

__all__ = ["main", "sample_inputs"]


def sample_inputs(io: IOSpec, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes (symbolic dims become ``batch``/1)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in io.inputs:
        shape = tuple(
            (batch if i == 0 else 1) if isinstance(d, str) else d for i, d in enumerate(spec.shape)
        )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def _meminfo_mb(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _cmd_check(args: argparse.Namespace) -> int:
    from device_agent.bundle import load_bundle
    from device_agent.runtime import check_feed, open_session

    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    t_verify = time.perf_counter() - t0
    m = bundle.manifest
    print(
        f"bundle     {bundle.root}: {m.model.name} v{m.model.version} "
        f"({m.model.precision}, {m.model.recipe})"
    )
    print(f"verified   {len(m.files)} files match their SHA-256 ({t_verify * 1000:.1f} ms)")
    t0 = time.perf_counter()
    session = open_session(bundle.model_path, runtime=m.model.runtime, threads=args.threads)
    t_load = time.perf_counter() - t0
    print(
        f"runtime    {session.runtime} {session.runtime_version} "
        f"(session created in {t_load * 1000:.1f} ms)"
    )
    feed = check_feed(m.io, sample_inputs(m.io))
    t0 = time.perf_counter()
    outputs = session.run(feed)
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - t0)
    shapes = ", ".join(
        f"{o.name} {tuple(a.shape)}" for o, a in zip(m.io.outputs, outputs, strict=False)
    )
    print(
        f"inference  first {t_first * 1000:.2f} ms; median of {args.runs} "
        f"{float(np.median(times)) * 1000:.3f} ms; outputs {shapes}"
    )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"host       {platform.machine()}, {cpus} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, memory {_meminfo_mb('MemTotal')} MB total / "
        f"{_meminfo_mb('MemAvailable')} MB available"
    )
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship-agent",
        description="edgeship's device agent: runs a verified model bundle on the board.",
        epilog="example: edgeship-agent check /opt/edgeship/bundle",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "check",
        help="verify a bundle, run one inference, print timings and the environment",
        description="Verify every file of BUNDLE against its SHA-256, load the model, run one "
        "inference on generated inputs and print timings and the environment. Run it first "
        "on a new board.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: runtime's)")
    p.add_argument("--runs", type=int, default=20, help="timed runs after the first (default 20)")
    p.set_defaults(handler=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        code: int = handler(args)
        return code
    except EdgeshipError as exc:
        print(f"edgeship-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
