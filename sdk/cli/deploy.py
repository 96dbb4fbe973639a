"""``edgeship deploy``: send a bundle to a device's agent over MQTT (``sdk.deploy``), with a
progress bar, and report what the device answered."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.contracts.commands import DeployError, ProbationArgs
from device_agent.errors import ConfigError
from sdk.cli.common import (
    EXIT_BUDGET,
    EXIT_OK,
    add_broker_password_arg,
    broker_password,
    write_json,
)

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``deploy`` to the ``edgeship`` subparsers."""
    p = sub.add_parser(
        "deploy",
        help="send a bundle to a device, or roll it out to a fleet in waves, over MQTT",
        description="Send a bundle to a device's agent over MQTT in chunks. The device "
        "verifies it (hashes, and the signature when it has trusted keys), loads it, runs a "
        "self-test, swaps it in without failing an inference, and judges the new model's "
        "health during a probation (errors, p95 latency, outlier rate, predicted classes), "
        "rolling back to the previous bundle when a line fails. Without --device, a staged "
        "rollout to every online device of --fleet: waves (default: one canary, then 10%%, "
        "50%%, 100%% of the fleet), each gated on every device's verdict and on the "
        "collectors' alerts during --soak; a failed wave is rolled back and the rollout halts. "
        "Its state is kept (--state-dir): the same command resumes an aborted rollout; Ctrl-C "
        "or --abort stops one. Exit 0 when the bundle is applied (everywhere), 1 when a "
        "device refused or rolled it back, did not answer, or the rollout halted or was "
        "aborted (the reason is printed), 2 for bad input (the broker unreachable or refusing "
        "the credentials included: nothing was sent). The broker password comes from "
        "--broker-password-file or EDGESHIP_BROKER_PASSWORD (docs/security.md, 'Secrets'). "
        "See docs/agent.md, 'Remote deploy' and 'Fleet rollout'.",
        epilog="examples: edgeship deploy bundle-v2/ --device pi-07 --fleet greenhouse "
        "--broker mqtts://operator@hub.local:8883 --broker-password-file ~/.edgeship/broker.pw "
        "--ca-file ca.crt --probation seconds=300 --probation max_latency_ratio=1.5 | "
        "edgeship deploy bundle-v2/ --fleet greenhouse --broker mqtt://hub.local --wave pi-07 "
        "--wave 25% --wave 100% --soak 600 --json rollout.json",
    )
    p.add_argument("bundle", type=Path, help="the bundle directory to send")
    p.add_argument(
        "--device", help="the device id; leave it out to roll out to every online device"
    )
    p.add_argument(
        "--broker",
        required=True,
        help="the broker the device's agent is connected to: mqtt://[user@]host[:port] or "
        "mqtts://... (a user allowed to write the device's cmd topic)",
    )
    add_broker_password_arg(p)
    p.add_argument("--fleet", default="default", help="the device's fleet (default: default)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the whole deploy, probation included (default 300)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the bundle is swapped in, without waiting for its probation",
    )
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    r = p.add_argument_group("fleet rollout (without --device)")
    r.add_argument(
        "--wave",
        action="append",
        default=[],
        metavar="SPEC",
        help="one wave, in order, repeatable: a device count (1), a share of the fleet (10%%), "
        "both cumulative, or device ids (pi-01,pi-02). Default: 1, 10%%, 50%%, 100%%",
    )
    r.add_argument(
        "--soak",
        type=float,
        default=60.0,
        help="seconds each wave is watched for alerts after its devices applied the bundle "
        "(default 60)",
    )
    r.add_argument("--parallel", type=int, default=8, help="devices deployed at once (default 8)")
    r.add_argument(
        "--state-dir",
        type=Path,
        help="where rollouts keep their state (default: $EDGESHIP_STATE_DIR/rollouts or "
        "~/.local/state/edgeship/rollouts)",
    )
    r.add_argument(
        "--restart",
        action="store_true",
        help="plan the rollout anew instead of resuming it (devices already on the bundle "
        "are not sent it again)",
    )
    r.add_argument(
        "--abort",
        action="store_true",
        help="stop the rollout of this bundle to --fleet that another terminal runs (at its "
        "next device); running the rollout again resumes it",
    )
    p.add_argument(
        "--probation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="how the device judges the new bundle's model health, repeatable: "
        "inferences=N and/or seconds=S end the probation (whichever first); min_calls, "
        "max_latency_ratio (default 2), latency_floor_ms (0.5), max_outlier_ratio (3), "
        "min_outliers (5), max_class_shift (0.5), max_error_rate (0), quiet=apply|rollback "
        "(the verdict when fewer than min_calls calls came). See docs/agent.md, 'Probation'",
    )
    p.set_defaults(handler=run)


def probation_args(pairs: list[str]) -> ProbationArgs | None:
    """``--probation KEY=VALUE`` options as the device will check them; ConfigError (exit 2)
    naming the option for a malformed pair, an unknown key or a value out of range."""
    if not pairs:
        return None
    given: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--probation {pair!r}: expected KEY=VALUE, e.g. seconds=300")
        value: Any = text.strip()
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
        given[key.strip()] = value
    try:
        return ProbationArgs.parse({"probation": given})
    except DeployError as exc:
        raise ConfigError(f"--probation: {exc}") from None


def _progress_printer() -> Callable[[int, int], None]:
    """A bar redrawn in place on a terminal; in a log, one line every 10% of the chunks."""
    from sdk.terminal import raw_stream

    tty = sys.stderr.isatty()
    shown = [-1]

    def progress(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        line = f"sending [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks"
        if tty:
            # "\r" redraws the bar: written on purpose, past the terminal guard.
            out = raw_stream(sys.stderr)
            print(f"\r{line}", end="\n" if done == total else "", file=out, flush=True)
        elif done == total or 10 * done // max(total, 1) > shown[0]:  # every 10% in a log
            shown[0] = 10 * done // max(total, 1)
            print(line, file=sys.stderr, flush=True)

    return progress


def run(args: argparse.Namespace) -> int:
    if args.device is None:
        return run_rollout_cli(args)
    from sdk.deploy import deploy_bundle
    from sdk.remote import BrokerUnavailableError, RemoteError
    from sdk.terminal import printable

    if not 0 < args.timeout < math.inf:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if not args.bundle.is_dir():
        raise ConfigError(f"bundle directory not found: {args.bundle}")
    password = broker_password(args)
    probation = probation_args(args.probation)
    try:
        result = deploy_bundle(
            args.bundle,
            args.broker,
            args.fleet,
            args.device,
            timeout_s=args.timeout,
            wait_probation=not args.no_wait,
            progress=_progress_printer(),
            password=password,
            ca_file=args.ca_file,
            probation=probation,
        )
    except BrokerUnavailableError:
        raise  # nothing was sent: bad input, exit 2 with one line
    except RemoteError as exc:
        print(f"edgeship: deploy failed: {printable(exc)}", file=sys.stderr)
        return EXIT_BUDGET
    # The versions, the state and the reason come from the device's replies.
    versions = printable(f"v{result.from_version} -> v{result.to_version}")
    state = printable(result.state.replace("_", " "))
    print(
        f"{printable(args.device)}: deploy {printable(result.deploy_id)} {state} ({versions}); "
        f"{result.archive_bytes / 1024:.1f} KiB in {result.chunks} chunks "
        f"({result.chunks_sent} sent) in {result.seconds:.1f} s"
    )
    if result.reason:
        print(f"  reason: {printable(result.reason)}")
    if result.state == "probation":
        print("  still on probation: it rolls back if its model health fails a line")
    if args.json is not None:
        write_json(args.json, result.to_dict())
    return EXIT_OK if result.ok or (args.no_wait and result.state == "probation") else EXIT_BUDGET


def run_rollout_cli(args: argparse.Namespace) -> int:
    """``edgeship deploy BUNDLE --fleet F`` without ``--device``: a staged rollout."""
    import signal
    import threading

    from sdk.remote import BrokerUnavailableError, RemoteError
    from sdk.rollout import DEFAULT_WAVES, RolloutStateError, request_abort, run_rollout
    from sdk.terminal import printable

    if not args.bundle.is_dir():
        raise ConfigError(f"bundle directory not found: {args.bundle}")
    if args.abort:
        path = request_abort(args.fleet, args.bundle, args.state_dir)
        print(f"asked rollout {path.stem} to stop at its next device ({path})")
        return EXIT_OK
    if not (0 < args.timeout < math.inf and 0 <= args.soak < math.inf and args.parallel >= 1):
        raise ConfigError(
            "--timeout must be positive, --soak >= 0 (both finite) and --parallel >= 1"
        )
    password = broker_password(args)
    probation = probation_args(args.probation)
    stop = threading.Event()

    def first_interrupt(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            "\nstopping at the next device: deploys in flight finish first (each within "
            "--timeout); the same command resumes the rollout",
            file=sys.stderr,
            flush=True,
        )

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, first_interrupt) if main_thread else None
    try:
        result = run_rollout(
            args.bundle,
            args.broker,
            args.fleet,
            waves=args.wave or DEFAULT_WAVES,
            soak_s=args.soak,
            probation=probation,
            parallel=args.parallel,
            timeout_s=args.timeout,
            state_dir=args.state_dir,
            restart=args.restart,
            report=lambda line: print(printable(line), flush=True),
            stop=stop,
            password=password,
            ca_file=args.ca_file,
        )
    except BrokerUnavailableError:
        raise  # nothing was sent: bad input, exit 2 with one line
    except RolloutStateError as exc:
        print(f"edgeship: rollout stopped: {printable(exc)}", file=sys.stderr)
        return EXIT_BUDGET
    except RemoteError as exc:
        print(f"edgeship: rollout failed: {printable(exc)}", file=sys.stderr)
        return EXIT_BUDGET
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(result.counts().items()))
    print(
        f"rollout {result.id} {result.state} ({counts}) in {result.seconds:.1f} s; "
        f"state: {result.state_file}"
    )
    if result.reason and result.state != "done":
        print(f"  reason: {printable(result.reason)}")
    skipped = result.counts().get("skipped", 0)
    if result.state == "done" and skipped:
        print(
            f"  {skipped} device(s) skipped (offline when their wave came): run the same "
            "command with --restart when they are back; the others are not sent it again"
        )
    if args.json is not None:
        write_json(args.json, result.to_dict())
    return EXIT_OK if result.ok else EXIT_BUDGET
