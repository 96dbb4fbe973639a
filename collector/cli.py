"""The collector's command line: ``edgeship-collector`` (and ``edgeship collect``, which calls
:func:`add_collect_arguments` and :func:`run_collect`), and ``python -m collector.simulate``.

The collector is its own program (it installs alone with ``edgeship[collector]``), so its
options live beside it rather than inside the workstation CLI; both entry points share these
functions, so their flags, help and exit codes cannot drift apart. This layer only turns
arguments into configs and calls the library: the wiring of subscriber, store, monitor and HTTP
app lives in the library, not here.

Exit codes, as ``edgeship``'s: 0 ok, 2 bad input (one line on stderr), 3 internal error (a bug:
rerun with ``--debug``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agent.errors import EdgeshipError

__all__ = [
    "COLLECT_DESCRIPTION",
    "COLLECT_EPILOG",
    "add_collect_arguments",
    "build_parser",
    "main",
    "run_collect",
    "simulate_main",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

COLLECT_DESCRIPTION = (
    "Run the fleet collector until SIGTERM or Ctrl-C: validate every message "
    "(invalid ones go to a dead-letter table), store telemetry, outlier events and status "
    "changes without duplicates, and serve a JSON API on 127.0.0.1 unless --http names another "
    "address: reads are open unless a read token is set (--api-read-token-file, or "
    "EDGESHIP_API_READ_TOKEN); sending commands needs the API token (--api-token-file, or "
    "EDGESHIP_API_TOKEN). The broker password comes from --broker-password-file or "
    "EDGESHIP_BROKER_PASSWORD, out of ps. See docs/collector.md and docs/security.md."
)
COLLECT_EPILOG = (
    "example: edgeship-collector --broker mqtts://collector@hub.local:8883 --ca-file ca.crt "
    "--broker-password-file /etc/edgeship/collector.pw --api-token-file "
    "/etc/edgeship/api-token --api-read-token-file /etc/edgeship/api-read-token"
)


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    """The ``collect`` options, on ``edgeship collect``'s subparser or ``edgeship-collector``'s
    parser alike."""
    p.add_argument(
        "--broker",
        required=True,
        help="mqtt://[user@]host[:port] or mqtts://... (a password here shows in ps: use "
        "--broker-password-file)",
    )
    p.add_argument(
        "--broker-password-file",
        type=Path,
        metavar="FILE",
        help="a file holding the broker password for the user in --broker (mode 600; else "
        "EDGESHIP_BROKER_PASSWORD)",
    )
    p.add_argument("--fleet", help="the fleet to collect (default: every fleet)")
    p.add_argument(
        "--store",
        default="sqlite:///fleet.db",
        help="sqlite:///path.db (default: sqlite:///fleet.db) or postgresql://user@host/db",
    )
    p.add_argument(
        "--http", default="127.0.0.1:9108", help="JSON API address (default 127.0.0.1:9108; off)"
    )
    p.add_argument(
        "--http-tls-cert",
        metavar="FILE",
        help="serve the API over HTTPS with this certificate (PEM; needs --http-tls-key)",
    )
    p.add_argument(
        "--http-tls-key", metavar="FILE", help="the private key of --http-tls-cert (PEM)"
    )
    p.add_argument("--group", help="MQTT v5 shared-subscription group, to split a fleet's load")
    p.add_argument("--client-id", help="the broker session's name (keep it across restarts)")
    p.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto")
    p.add_argument(
        "--stale-windows",
        type=float,
        default=3.0,
        help="telemetry windows without a message before a device is stale (default 3)",
    )
    p.add_argument("--workers", type=int, default=2, help="decode/store processes (default 2)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument(
        "--api-token-file",
        type=Path,
        metavar="FILE",
        help="a file holding the API token that POST requests (commands to devices) must send "
        "as 'Authorization: Bearer TOKEN'; without a token (this, --api-token or "
        "EDGESHIP_API_TOKEN) the API is read-only",
    )
    p.add_argument(
        "--api-token",
        metavar="TOKEN",
        help="the API token itself (visible to other users in ps: prefer --api-token-file)",
    )
    p.add_argument(
        "--api-read-token-file",
        type=Path,
        metavar="FILE",
        help="a file holding a read token (else EDGESHIP_API_READ_TOKEN): with one, every read "
        "but /api/health (the dashboard and /metrics included) needs 'Authorization: Bearer' "
        "with it or with the API token; without one, reads are open",
    )
    p.add_argument(
        "--cert-file",
        help="client certificate for mqtts:// (a broker with use_identity_as_username takes its "
        "CN as the user name)",
    )
    p.add_argument("--key-file", help="the client certificate's private key")
    p.add_argument(
        "--alerts",
        type=Path,
        help="alert rules, TOML (default: the built-in rules; docs/collector.md)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="[NAME[@VERSION]=]PATH",
        help="reference statistics for drift: a bundle directory, or NAME[@VERSION]=reference.json "
        "(repeatable; without one, a device is compared with its own first windows)",
    )
    p.add_argument(
        "--alerts-db",
        help="the alert history's SQLite file (default: beside a SQLite store; on PostgreSQL "
        "the store's edgeship_alerts table, shared by the fleet's collectors)",
    )
    p.add_argument(
        "--metrics-expire",
        type=float,
        default=3600.0,
        help="seconds after which a silent device's series leave /metrics (default 3600)",
    )
    p.add_argument(
        "--no-monitor",
        action="store_true",
        help="only collect and serve the JSON API: no alerts, drift, /metrics or dashboard",
    )


def run_collect(args: argparse.Namespace) -> int:
    """Run the collector with ``collect``'s options until SIGTERM or Ctrl-C; 0 when it stopped.
    Bad input raises an :class:`EdgeshipError` (the caller prints it and exits 2)."""
    from collector.api import load_api_token
    from collector.config import load_read_token
    from collector.program import ProgramConfig, run_program
    from collector.service import CollectorConfig
    from device_agent.contracts.broker_password import resolve_broker_password

    _require_extra(http=args.http != "off", monitor=not args.no_monitor)
    password = resolve_broker_password(args.broker, args.broker_password_file)
    config = CollectorConfig(
        broker_url=args.broker,
        broker_password=password.password if password.source != "url" else None,
        fleet=args.fleet,
        store_url=args.store,
        http=args.http,
        client_id=args.client_id,
        share_group=args.group,
        protocol=args.protocol,
        stale_windows=args.stale_windows,
        workers=args.workers,
        ca_file=args.ca_file,
        api_token=load_api_token(args.api_token, args.api_token_file),
        api_read_token=load_read_token(args.api_read_token_file),
        cert_file=args.cert_file,
        key_file=args.key_file,
        http_tls_cert_file=args.http_tls_cert,
        http_tls_key_file=args.http_tls_key,
    )
    monitor_config, references = _monitor_settings(args)
    stats = run_program(
        ProgramConfig(config, monitor=monitor_config, references=references),
        on_started=lambda program: print(program.describe(), flush=True),
    )
    print(
        f"stopped: {stats.received} received, {stats.stored} stored, {stats.duplicates} "
        f"duplicates, {stats.dead_letters} dead letters",
        flush=True,
    )
    return EXIT_OK


# What the collector's extra brings, by the part that needs it: the HTTP API, the monitor.
_EXTRA_HTTP = ("fastapi", "uvicorn")
_EXTRA_MONITOR = ("prometheus_client",)


def _require_extra(*, http: bool, monitor: bool) -> None:
    """A ConfigError naming the install line when the collector's extra is missing (a board's
    ``edgeship[agent]`` install has the command but not the server's libraries): a user's
    setup, not a bug, so exit 2 and what to do instead of an internal error."""
    from importlib.util import find_spec

    from collector.errors import ConfigError

    wanted = (_EXTRA_HTTP if http else ()) + (_EXTRA_MONITOR if monitor else ())
    missing = [name for name in wanted if find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"the collector needs {', '.join(missing)}, which this Python does not have: "
            "pip install 'edgeship[collector]'"
        )


def _monitor_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(MonitorConfig, ReferenceSet) from ``collect``'s options, read before connecting so a
    bad alerts file or reference is exit code 2; (None, None) with --no-monitor."""
    if args.no_monitor:
        return None, None
    from collector.alerts import load_alerts_config
    from collector.drift import ReferenceSet
    from collector.monitor import MonitorConfig

    config = MonitorConfig(
        alerts=load_alerts_config(args.alerts),
        references=tuple(args.reference),
        alerts_db=args.alerts_db,
        expire_after_s=args.metrics_expire,
    )
    return config, ReferenceSet.from_specs(config.references)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeship")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """``edgeship-collector``'s parser: the ``collect`` options at the top level."""
    parser = argparse.ArgumentParser(
        prog="edgeship-collector", description=COLLECT_DESCRIPTION, epilog=COLLECT_EPILOG
    )
    parser.add_argument("--version", action="version", version=f"edgeship {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    add_collect_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``edgeship-collector``: the same options and exit codes as ``edgeship collect``."""
    from device_agent.terminal import guard_stdio

    # Devices put text in what the collector prints: no control character may reach the
    # terminal (device_agent.terminal).
    with guard_stdio():
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return _guarded("edgeship-collector", args.debug, lambda: run_collect(args))


def _guarded(prog: str, debug: bool, run: Callable[[], int]) -> int:
    """Run ``run()``; an :class:`EdgeshipError` is one line and exit 2, a bug exit 3."""
    from device_agent.terminal import printable

    try:
        return run()
    except EdgeshipError as exc:
        if debug:  # the traceback, with the foreign error it was converted from
            traceback.print_exception(exc, file=sys.stderr)
        print(f"{prog}: error: {printable(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {printable(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def simulate_main(argv: Sequence[str] | None = None) -> int:
    """``python -m collector.simulate``: a fleet of simulated devices for benchmarks, tests and
    demos. Exit 0 when the broker acknowledged every message, 1 when not, 2 for bad input."""
    from collector.sim_fleet import MAX_DEVICES_PER_PROCESS, SimConfig, SimulatedFleet

    p = argparse.ArgumentParser(
        prog="python -m collector.simulate",
        description="Simulate a fleet of devices: one MQTT connection each, with a Last Will, "
        "a birth status and a valid telemetry window every --period seconds.",
        epilog="example: python -m collector.simulate --broker mqtt://127.0.0.1:1883 "
        "--fleet demo --devices 20 --period 1 --duration 60 --report published.json\n"
        f"one process holds at most {MAX_DEVICES_PER_PROCESS} devices (paho-mqtt's select() "
        "stops at file descriptor 1023); for more, run several processes with distinct --prefix",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", required=True, help="mqtt://[user:password@]host[:port]")
    p.add_argument("--fleet", default="sim", help="fleet name in the topics (default sim)")
    p.add_argument(
        "--devices",
        type=int,
        default=10,
        help=f"devices in this process (default 10, at most {MAX_DEVICES_PER_PROCESS})",
    )
    p.add_argument("--prefix", default="sim", help="device names PREFIX-0000... (default sim)")
    p.add_argument("--period", type=float, default=1.0, help="seconds between windows (default 1)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--keepalive", type=int, default=10, help="MQTT keepalive, s (default 10)")
    p.add_argument("--report", help="write what the broker acknowledged, as JSON")
    p.add_argument("--no-goodbye", action="store_true", help="exit without the offline status")
    args = p.parse_args(argv)
    try:
        fleet = SimulatedFleet(
            SimConfig(
                broker_url=args.broker,
                fleet=args.fleet,
                devices=args.devices,
                prefix=args.prefix,
                period_s=args.period,
                keepalive_s=args.keepalive,
            )
        ).connect()
    except EdgeshipError as exc:
        from device_agent.terminal import printable

        print(f"simulate: error: {printable(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"event": "connected", "devices": len(fleet.devices)}), flush=True)
    rounds = fleet.run(args.duration)
    acked = fleet.wait_acked(60.0)
    fleet.close(goodbye=not args.no_goodbye)
    published = fleet.published
    summary = {
        "event": "done",
        "rounds": rounds,
        "acked_all": acked,
        "messages": sum(len(v["seqs"]) for v in published.values()),
    }
    if args.report:
        with open(args.report, "w") as f:
            json.dump({**summary, "devices": published}, f)
    print(json.dumps(summary), flush=True)
    return 0 if acked else 1


if __name__ == "__main__":
    raise SystemExit(main())
