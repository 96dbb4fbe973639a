"""The ``edgeship-agent`` command on the board.

``edgeship-agent check BUNDLE`` is the first command to run on a new board: it verifies the
bundle's signature (with trusted keys) and hashes, loads the model with its runtime (decrypting
it in memory if it is encrypted), runs one inference and prints timings and the environment.
Without BUNDLE it checks the bundle ``run`` would run (a deployed one, else the setting
``bundle``). ``edgeship-agent status`` prints the remote deploy state on disk. With ``--json``
both print one JSON object on stdout instead (keys in docs/agent.md, "For scripts");
``edgeship-agent --version`` prints the package version.
Exit codes: 0 ok, 2 a problem with the bundle, its signature, a key or the runtime (one line
on stderr), 3 an internal error (a bug: rerun with ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent._version import __version__
from device_agent.errors import BundleError, ConfigError, EdgeshipError
from device_agent.httpjson import dumps_json

if TYPE_CHECKING:
    from device_agent.agent_config import AgentConfig
    from device_agent.bundle import Bundle

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3

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


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text.encode("ascii", "backslashreplace").decode("ascii")[:300]


@contextmanager
def _bundle_step(what: str, where: object) -> Iterator[None]:
    """Any failure of ``what`` on the bundle at ``where`` as a :class:`BundleError`: a bundle
    that makes a library raise something else (a MemoryError for a shape too large, an
    unreadable file) is bad input, exit 2 with one line, not a traceback."""
    try:
        yield
    except EdgeshipError:
        raise
    except MemoryError as exc:
        raise BundleError(
            f"{where}: {what} needs more memory than this device has ({_first_line(exc)}); "
            "check the shapes in io of manifest.json, or use a smaller model"
        ) from exc
    except Exception as exc:
        raise BundleError(
            f"{where}: {what} failed ({_first_line(exc)}); the bundle is damaged or was not "
            "made by edgeship: package it again on the workstation"
        ) from exc


class _Report:
    """What ``check`` or ``status`` found: printed line by line as it goes (a label in ten
    columns, then the text), or, with ``--json``, gathered into one object that
    :meth:`finish` writes to stdout, and nothing else (non-finite numbers as null)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {}

    def line(self, label: str, text: str = "", **data: Any) -> None:
        self.data.update(data)
        if not self.as_json:
            print(f"{label:<10} {text}" if text else label)

    def finish(self) -> None:
        if self.as_json:
            sys.stdout.write(dumps_json(self.data).decode("ascii") + "\n")


def _cmd_check(args: argparse.Namespace) -> int:
    from device_agent.config import load_settings

    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")

    # The same trust settings as 'run' (agent.toml, environment), so check refuses what run
    # would refuse; --trusted-key and --model-key win.
    overrides = {
        "trusted_keys": tuple(str(p) for p in args.trusted_key) or None,
        "model_key_file": None if args.model_key is None else str(args.model_key),
        "state_dir": args.state_dir,
        "fleet": args.fleet,
        "device_id": args.device_id,
    }
    config, run_config = load_settings(args.config, os.environ, overrides)
    report = _Report(args.json)
    bundle, t_verify = _bundle_to_check(args.bundle, config, run_config.bundle, report)
    m = bundle.manifest
    report.line(
        "bundle",
        f"{bundle.root}: {m.model.name} v{m.model.version} ({m.model.precision}, "
        f"{m.model.recipe})",
        bundle={
            "path": str(bundle.root), "model": m.model.name, "version": m.model.version,
            "precision": m.model.precision, "recipe": m.model.recipe,
            "runtime": m.model.runtime, "created": m.created,
        },
    )  # fmt: skip
    sig = bundle.signature
    report.line(
        "signature",
        sig.describe(),
        signature={
            "signed": sig.signed, "signers": list(sig.signers),
            "verified_by": list(sig.verified_by), "problem": sig.problem, "text": sig.describe(),
        },
    )  # fmt: skip
    report.line(
        "verified",
        f"{len(m.files)} file(s) match their SHA-256 ({t_verify * 1000:.1f} ms)",
        verified={"files": len(m.files), "ms": t_verify * 1000},
    )
    _check_inference(bundle, config.model_key_file, args, report)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = {
        "machine": platform.machine(), "cores": cpus, "python": platform.python_version(),
        "numpy": np.__version__, "memory_total_mb": _meminfo_mb("MemTotal"),
        "memory_available_mb": _meminfo_mb("MemAvailable"),
    }  # fmt: skip
    report.line(
        "host",
        f"{host['machine']}, {cpus} cores, Python {host['python']}, numpy {host['numpy']}, "
        f"memory {host['memory_total_mb']} MB total / {host['memory_available_mb']} MB available",
        host=host,
    )
    report.line("ok", ok=True)
    report.finish()
    return 0


def _bundle_to_check(
    given: Path | None, config: AgentConfig, setting: Path | None, report: _Report
) -> tuple[Bundle, float]:
    """The bundle to check and the seconds loading (verifying) it took: BUNDLE, else what
    'run' without --bundle would run, the deployed bundle, else the setting ``bundle``. Sets
    ``source`` (argument, deployed or setting) and ``deployed_error`` (why a deployed bundle
    was passed over, else null)."""
    from device_agent.bundle import load_bundle
    from device_agent.deploy import deploy_dir, deployed_bundle

    report.data.update(source="argument", deployed_error=None)
    t0 = time.perf_counter()
    if given is not None:
        with _bundle_step("loading the bundle", given):
            return load_bundle(given, trusted_keys=config.trusted_keys), time.perf_counter() - t0
    try:
        with _bundle_step("loading the deployed bundle", deploy_dir(config)):
            deployed = deployed_bundle(config, fallback=False)
    except EdgeshipError as exc:
        if setting is None:
            raise
        report.line("deployed", str(exc), deployed_error=str(exc))
        report.line("", f"'run' falls back to the configured bundle {setting}")
        deployed = None
        t0 = time.perf_counter()
    if deployed is not None:
        report.line(
            "deployed",
            f"{deployed.root} is current (it takes precedence over 'bundle')",
            source="deployed",
        )
        return deployed, time.perf_counter() - t0
    if setting is None:
        raise ConfigError(
            "nothing to check: give BUNDLE, set bundle in agent.toml (--config) or "
            "EDGESHIP_AGENT_BUNDLE, or deploy one with 'edgeship deploy' (none in "
            f"{deploy_dir(config)})"
        )
    report.data["source"] = "setting"
    with _bundle_step("loading the bundle", setting):
        return load_bundle(setting, trusted_keys=config.trusted_keys), time.perf_counter() - t0


def _check_inference(
    bundle: Bundle, model_key_file: str | None, args: argparse.Namespace, report: _Report
) -> None:
    """Open the model, run it once and ``--runs`` times more on generated inputs."""
    from device_agent.benchmark import sample_inputs
    from device_agent.runtime import check_feed

    m = bundle.manifest
    t0 = time.perf_counter()
    with _bundle_step("opening the model", bundle.root):
        session = bundle.open_model(model_key_file=model_key_file, threads=args.threads)
    t_load = time.perf_counter() - t0
    enc = m.model.encryption
    report.data["decrypted"] = None
    if enc is not None:
        report.line(
            "decrypted",
            f"{m.model.file} ({enc.algorithm}, key {enc.key_id}) in memory",
            decrypted={"file": m.model.file, "algorithm": enc.algorithm, "key_id": enc.key_id},
        )
    report.line(
        "runtime",
        f"{session.runtime} {session.runtime_version} (session created in "
        f"{t_load * 1000:.1f} ms)",
        runtime={"name": session.runtime, "version": session.runtime_version,
                 "session_ms": t_load * 1000},
    )  # fmt: skip
    with _bundle_step("one inference on generated inputs", bundle.root):
        feed = check_feed(m.io, sample_inputs(m.io))
        t0 = time.perf_counter()
        outputs = session.run(feed)
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            session.run(feed)
            times.append(time.perf_counter() - t0)
    shapes = [
        (o.name, [int(d) for d in a.shape]) for o, a in zip(m.io.outputs, outputs, strict=False)
    ]
    median = float(np.median(times))
    report.line(
        "inference",
        f"first {t_first * 1000:.2f} ms; median of {args.runs} {median * 1000:.3f} ms; outputs "
        + ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes),
        inference={
            "first_ms": t_first * 1000, "runs": args.runs, "median_ms": median * 1000,
            "min_ms": min(times) * 1000, "max_ms": max(times) * 1000,
            "outputs": [{"name": name, "shape": shape} for name, shape in shapes],
        },
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship-agent",
        description="edgeship's device agent: runs a verified model bundle on the board.",
        epilog="example: edgeship-agent check /opt/edgeship/bundle",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an internal error"
    )
    parser.add_argument("--version", action="version", version=f"edgeship-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "check",
        help="verify a bundle, run one inference, print timings and the environment",
        description="Verify every file of BUNDLE against its SHA-256, load the model, run one "
        "inference on generated inputs and print timings and the environment. Run it first "
        "on a new board. Without BUNDLE it checks the bundle 'run' would start with: the one "
        "a remote deploy made current (found under state_dir by fleet and device id), else the "
        "setting bundle.",
        epilog="example: edgeship-agent check --config /etc/edgeship/agent.toml",
    )
    p.add_argument(
        "bundle",
        type=Path,
        nargs="?",
        help="the bundle directory (default: the one 'run' would run, as 'run' chooses it: "
        "the bundle a remote deploy made current on this board, else the setting bundle)",
    )
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: runtime's)")
    p.add_argument("--runs", type=int, default=20, help="timed runs after the first (default 20)")
    _add_trust_args(p)
    p.add_argument(
        "--config",
        type=Path,
        help="agent.toml whose trusted_keys, model_key_file (and, without BUNDLE, bundle, "
        "state_dir, fleet, device_id) apply",
    )
    _add_where_args(p)
    _add_json_arg(p)
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser(
        "status",
        help="print the remote deploy state on disk: current bundle, previous one, uploads",
        description="Print what remote deploys left under the state directory, without "
        "verifying anything: the bundle current.json names (the one 'run' starts with), the "
        "previous one kept beside it, open uploads, and deployed bundles not applied. Whether "
        "a bundle is on probation is known only to the running agent: ask it with 'edgeship "
        "fleet command DEVICE deploy_status'.",
    )
    p.add_argument("--config", type=Path, help="agent.toml with state_dir, fleet, device_id")
    _add_where_args(p)
    _add_json_arg(p)
    p.set_defaults(handler=_cmd_status)

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
        "precedence, and without --bundle that one runs; see docs/agent.md, Remote deploy)",
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


def _add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of the lines (keys in docs/agent.md, "
        "For scripts); errors are still one line on stderr with the same exit codes",
    )


def _add_where_args(p: argparse.ArgumentParser) -> None:
    """Where the deploy state lives: {state_dir}/deploy-{fleet}-{device_id}, as for 'run'."""
    p.add_argument("--state-dir", type=Path, help="the agent's state_dir (as for 'run')")
    p.add_argument("--fleet", help="fleet name (as for 'run')")
    p.add_argument("--device-id", help="this board's id (as for 'run'; default: the hostname)")


def _cmd_status(args: argparse.Namespace) -> int:
    from device_agent.config import load_settings
    from device_agent.deploy import deploy_dir, deploy_state

    overrides = {"state_dir": args.state_dir, "fleet": args.fleet, "device_id": args.device_id}
    config, run_config = load_settings(args.config, os.environ, overrides)
    try:
        state = deploy_state(config)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {deploy_dir(config)}: {exc.strerror or exc} (run it as the agent's "
            "user, e.g. sudo -u edgeship)"
        ) from exc
    setting = None if run_config.bundle is None else str(run_config.bundle)
    if args.json:
        sys.stdout.write(dumps_json(_status_json(state, setting)).decode("ascii") + "\n")
        return 0
    print(f"deploys    {state['dir']}")
    current = state["current"]
    if "error" in state:
        print(f"current    {state['error']}; 'run' ignores it")
    elif current is None:
        print(f"current    none deployed; 'run' uses the setting bundle ({setting})")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(current.get("ts", 0))))
        # current.json's time is when it was written: after a deploy_revert, the revert's.
        reverted = "previous" in current and current["previous"] is None
        since = f"running again since {when} (deploy_revert)" if reverted else f"applied {when}"
        print(
            f"current    {current.get('model')} v{current.get('model_version')}, deploy "
            f"{current.get('deploy')}, {since} ({current.get('bundle')})"
        )
        print(f"previous   {_previous_line(current, state)}")
    for upload in state["uploads"]:
        print(
            f"upload     {upload['deploy']}: {upload['received']} of {upload['chunks']} chunks "
            "received (resumes when the same bundle is deployed again)"
        )
    for name in state["unapplied"]:
        print(
            f"unapplied  bundles/{name} (on probation now; else left by a restart during one "
            "or taken back by deploy_revert, and deleted by the next applied deploy)"
        )
    return 0


def _previous_line(current: dict[str, Any], state: dict[str, Any]) -> str:
    """The ``previous`` line of ``status``: the bundle a revert of the current deploy would go
    back to. ``previous`` is null after a deploy_revert to a deployed bundle (the one before
    that is not known), absent only in a hand-written current.json."""
    previous = current.get("previous")
    if previous is None:
        if "previous" in current:
            return (
                "none known (a deploy_revert went back to this bundle; the one before it is not "
                "kept, so this deploy cannot be reverted: deploy the bundle you want instead)"
            )
        return "none recorded in current.json"
    name = state.get("previous_model")
    label = f"{name} v{state.get('previous_version')}" if name else "unreadable manifest"
    return f"{label} ({previous})"


def _status_json(state: dict[str, Any], setting: str | None) -> dict[str, Any]:
    """``status --json``: the same facts as the lines, every key always present."""
    current = state["current"]
    previous = None
    if current is not None and "error" not in state and current.get("previous") is not None:
        previous = {
            "path": current.get("previous"),
            "model": state.get("previous_model"),
            "version": state.get("previous_version"),
        }
    return {
        "dir": state["dir"],
        "current": None if "error" in state else current,
        "error": state.get("error"),
        "setting_bundle": setting,
        "previous": previous,
        "uploads": state["uploads"],
        "unapplied": state["unapplied"],
    }


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
        print(f"edgeship-agent: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug or args.command == "run":  # a service's log keeps the traceback
            traceback.print_exception(exc, file=sys.stderr)
        print(
            f"edgeship-agent: internal error: {_first_line(exc)} (rerun with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    """``text`` on one line, printable whatever it quotes (control characters and lone
    surrogates escaped)."""
    return "".join(
        c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else ascii(c)[1:-1] for c in text
    )


if __name__ == "__main__":
    raise SystemExit(main())
