"""The ``edgeship-agent`` command on the board.

``edgeship-agent check BUNDLE`` is the first command to run on a new board: it verifies the
bundle's signature (with trusted keys) and hashes, loads the model with its runtime (decrypting
it in memory if it is encrypted), runs one inference and prints timings and the environment.
Exit codes: 0 ok, 2 a problem with the bundle, its signature, a key or the runtime.
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

from device_agent.errors import EdgeshipError

__all__ = ["build_parser", "main"]


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
    from device_agent.benchmark import sample_inputs
    from device_agent.bundle import load_bundle
    from device_agent.config import load_settings
    from device_agent.runtime import check_feed

    # The same trust settings as 'run' (agent.toml, environment), so check refuses what run
    # would refuse; --trusted-key and --model-key win.
    overrides = {
        "trusted_keys": tuple(str(p) for p in args.trusted_key) or None,
        "model_key_file": None if args.model_key is None else str(args.model_key),
    }
    config, _ = load_settings(args.config, os.environ, overrides)
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle, trusted_keys=config.trusted_keys)
    t_verify = time.perf_counter() - t0
    m = bundle.manifest
    print(
        f"bundle     {bundle.root}: {m.model.name} v{m.model.version} "
        f"({m.model.precision}, {m.model.recipe})"
    )
    print(f"signature  {bundle.signature.describe()}")
    print(f"verified   {len(m.files)} file(s) match their SHA-256 ({t_verify * 1000:.1f} ms)")
    t0 = time.perf_counter()
    session = bundle.open_model(model_key_file=config.model_key_file, threads=args.threads)
    t_load = time.perf_counter() - t0
    if m.model.encryption is not None:
        print(
            f"decrypted  {m.model.file} ({m.model.encryption.algorithm}, key "
            f"{m.model.encryption.key_id}) in memory"
        )
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
    _add_trust_args(p)
    p.add_argument(
        "--config", type=Path, help="agent.toml whose trusted_keys and model_key_file apply"
    )
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser(
        "run",
        help="run the agent as a service: inference endpoint, telemetry over MQTT, spool",
        description="Load and verify a bundle, serve a local JSON inference endpoint, report "
        "telemetry and outlier events to an MQTT broker (spooled on disk while the broker is "
        "away), and stop cleanly on SIGTERM. Every option can also be set in agent.toml "
        "(--config) or as EDGESHIP_AGENT_<OPTION> in the environment; the command line wins.",
        epilog="example: edgeship-agent run --bundle /opt/edgeship/bundle "
        "--broker mqtt://hub.local:1883 --fleet greenhouse --device-id pi-07",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        help="the bundle directory (a bundle deployed with 'edgeship deploy' and applied takes "
        "precedence; see docs/agent.md, Remote deploy)",
    )
    p.add_argument("--config", type=Path, help="agent.toml with any of these settings")
    p.add_argument("--broker", dest="broker_url", help="mqtt://host:1883 or mqtts://host:8883")
    p.add_argument("--device-id", help="this board's id (default: the hostname)")
    p.add_argument("--fleet", help="fleet name in the topics (default: 'default')")
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password", help="MQTT password (prefer EDGESHIP_AGENT_PASSWORD)")
    p.add_argument(
        "--state-dir", type=Path, help="where the spool lives (default ~/.local/state/edgeship)"
    )
    p.add_argument(
        "--window", dest="window_s", type=float, help="telemetry window in s (default 10)"
    )
    p.add_argument("--threads", type=int, help="runtime threads")
    p.add_argument(
        "--http", help="host:port of the inference endpoint, or 'off' (default 127.0.0.1:8765)"
    )
    p.add_argument("--replay", type=Path, help=".npz of inputs (keyed by input name) to feed")
    p.add_argument("--replay-rate", type=float, help="replayed inputs per second (default 10)")
    p.add_argument("--replay-loops", type=int, help="passes over the replay file (0 = forever)")
    p.add_argument(
        "--replay-log", type=Path, help="write each replayed input's score and flag (JSON lines)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _add_trust_args(p)
    p.set_defaults(handler=_cmd_run)
    return parser


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        type=Path,
        metavar="PUBLIC.pem",
        help="only accept bundles signed by this Ed25519 public key (repeatable; setting "
        "trusted_keys)",
    )
    p.add_argument(
        "--model-key",
        type=Path,
        metavar="FILE",
        help="AES-256 key file of an encrypted model (setting model_key_file)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    from device_agent.config import load_settings
    from device_agent.service import run_service

    overrides = {
        k: getattr(args, k)
        for k in (
            "bundle",
            "broker_url",
            "device_id",
            "fleet",
            "username",
            "password",
            "state_dir",
            "window_s",
            "threads",
            "http",
            "replay",
            "replay_rate",
            "replay_loops",
            "replay_log",
            "log_level",
        )
    }
    overrides["trusted_keys"] = tuple(str(p) for p in args.trusted_key) or None
    overrides["model_key_file"] = None if args.model_key is None else str(args.model_key)
    agent_config, run_config = load_settings(args.config, os.environ, overrides)
    logging.basicConfig(
        level=getattr(logging, run_config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_service(agent_config, run_config)


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
