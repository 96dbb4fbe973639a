"""``edgeship fleet status`` and ``edgeship fleet watch``: a running collector's fleet as a table
in the terminal, read from its JSON API (``/api/devices``, and ``/api/alerts`` when the
collector runs its monitor); with ``--json``, ``fleet status`` prints the same as one JSON
object for scripts. ``edgeship fleet command``: send a device a command through the
collector (``POST /api/devices/{device}/commands``, with the API token) and print its reply.
Standard library only, so the command starts fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from device_agent.contracts.broker_password import read_secret_file
from device_agent.errors import ConfigError
from device_agent.httpjson import dumps_json
from sdk.terminal import printable, raw_stream

__all__ = ["fetch_fleet", "fleet_json", "register", "render_fleet", "send_command"]

DEFAULT_COLLECTOR = "http://127.0.0.1:9108"
READ_TOKEN_ENV = "EDGESHIP_API_READ_TOKEN"  # the collector's --api-read-token-file
WRITE_TOKEN_ENV = "EDGESHIP_API_TOKEN"  # its --api-token-file: commands, and reads too


def register(sub: Any) -> None:
    """Add ``fleet status``, ``fleet watch`` and ``fleet command`` to the ``edgeship``
    subcommands."""
    p = sub.add_parser(
        "fleet",
        help="the fleet as a running collector sees it (status, watch)",
        description="Read a running collector's JSON API (edgeship collect --http ...) and show "
        "one line per device: state, model, p95 latency, outlier rate, temperature, drift, alerts.",
    )
    actions = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    for name, text in (
        ("status", "print the fleet's table once"),
        ("watch", "redraw the table every --interval seconds until Ctrl-C"),
    ):
        q = actions.add_parser(name, help=text, description=text)
        q.add_argument(
            "--collector",
            default=DEFAULT_COLLECTOR,
            help=f"the collector's API (default {DEFAULT_COLLECTOR})",
        )
        q.add_argument("--fleet", help="only this fleet's devices")
        q.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout, seconds")
        q.add_argument(
            "--token-file",
            help="a file holding the collector's read token, for a collector started with "
            f"--api-read-token-file (else {READ_TOKEN_ENV}, else {WRITE_TOKEN_ENV}; without "
            "one, reads go without a token)",
        )
        if name == "status":
            q.add_argument(
                "--json",
                action="store_true",
                help="print one JSON object on stdout instead of the table: the collector's "
                "device objects with their firing alerts (keys in docs/collector.md, 'fleet "
                "status --json'); errors are still one line on stderr, exit 2",
            )
            q.epilog = (
                "example: edgeship fleet status --collector http://127.0.0.1:9108 --json | "
                "jq -r '.devices[] | select(.status != \"online\") | .device'"
            )
        if name == "watch":
            q.add_argument("--interval", type=float, default=2.0, help="seconds (default 2)")
            q.add_argument("--count", type=int, default=0, help="stop after N redraws (0: never)")
        q.set_defaults(handler=_cmd_status if name == "status" else _cmd_watch)
    text = "send a device a command through the collector and print its reply"
    q = actions.add_parser(
        "command",
        help=text,
        description=text + ". The collector must run with an API token (edgeship collect "
        "--api-token-file); this command sends it from --token-file or EDGESHIP_API_TOKEN. Exit "
        "0 when the device answered ok, 1 when it answered an error or did not answer in "
        "--wait seconds, 2 for bad input or a refused request.",
        epilog="example: edgeship fleet command pi-07 benchmark --args '{\"min_runs\": 200}' "
        "--token-file /etc/edgeship/api-token --collector http://127.0.0.1:9108",
    )
    q.add_argument("device", help="the device id")
    q.add_argument("action", help="the action, e.g. ping or benchmark")
    q.add_argument(
        "--args", default="{}", help="the action's arguments, a JSON object (default {})"
    )
    q.add_argument("--fleet", help="the device's fleet (default: the collector's)")
    q.add_argument(
        "--collector",
        default=DEFAULT_COLLECTOR,
        help=f"the collector's API (default {DEFAULT_COLLECTOR})",
    )
    q.add_argument(
        "--token-file", help="a file holding the collector's API token (else EDGESHIP_API_TOKEN)"
    )
    q.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the reply (default 30)"
    )
    q.add_argument("--timeout", type=float, default=15.0, help="HTTP timeout, seconds")
    q.set_defaults(handler=_cmd_command)
    p.set_defaults(handler=_cmd_help(p))


def _cmd_help(p: argparse.ArgumentParser) -> Any:
    def show(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return show


def fetch_fleet(
    collector: str, *, timeout: float = 5.0, token: str | None = None
) -> dict[str, Any]:
    """``{"devices": <GET /api/devices>, "alerts": <GET /api/alerts> or None}``; raises
    ConfigError when the collector cannot be reached, refuses the read ``token`` (or its
    absence) or does not answer JSON."""
    base = _base_url(collector)
    devices = _get(base + "/api/devices", timeout, token)
    try:
        alerts = _get(base + "/api/alerts?state=firing&limit=1", timeout, token)
    except _NotFound:
        alerts = None  # a collector started with --no-monitor
    return {"devices": devices, "alerts": alerts}


class _NotFound(ConfigError):
    pass


def _base_url(collector: str) -> str:
    """``--collector`` as an http(s) base URL; ConfigError for anything urllib would refuse
    with a foreign error (control characters or spaces, another scheme, no host)."""
    base = collector.strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base
    parts = urllib.parse.urlsplit(base)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or any(c.isspace() or not c.isprintable() for c in base)
    ):
        raise ConfigError(
            f"--collector '{printable(collector)}': expected the collector API's address, "
            f"such as {DEFAULT_COLLECTOR} or 127.0.0.1:9108"
        )
    return base


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would send the token on to wherever one points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _hint(exc: urllib.error.HTTPError) -> str:
    if 300 <= exc.code < 400:
        return (
            " (a redirect: edgeship does not follow one with a token; give --collector the "
            "API's own address)"
        )
    return ""


def _get(url: str, timeout: float, token: str | None = None) -> Any:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise _NotFound(f"{url}: not found") from exc
        if exc.code == 401:
            raise ConfigError(
                f"the collector refused to read {url} (401): "
                + (
                    "it needs a read token: give --token-file FILE or set "
                    f"{READ_TOKEN_ENV} (its --api-read-token-file)"
                    if token is None
                    else "the token given is neither its read token nor its API token"
                )
            ) from exc
        raise ConfigError(f"the collector answered {url} with HTTP {exc.code}{_hint(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"cannot reach the collector API at {url}: {reason} "
            "(is 'edgeship collect' running, and is --collector its --http address?)"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"{url} did not answer JSON: {exc}") from exc


def _cell(value: Any, spec: str = "", scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value * scale, spec) + suffix


def _ago(now: float, t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def render_fleet(
    data: Mapping[str, Any], *, fleet: str | None = None, now: float | None = None
) -> str:
    """The table ``fleet status`` prints, from what :func:`fetch_fleet` returned."""
    now = time.time() if now is None else now
    devices = [d for d in data["devices"]["devices"] if fleet is None or d["fleet"] == fleet]
    alerts = data.get("alerts")
    firing: dict[tuple[str, str | None], list[str]] = {}
    for a in (alerts or {}).get("firing", []):
        if fleet is None or a["fleet"] == fleet:
            firing.setdefault((a["fleet"], a["device"]), []).append(a["rule"])
    several = len({d["fleet"] for d in devices}) > 1
    header = ["DEVICE", *(["FLEET"] if several else []), "STATE", "MODEL", "P95 MS", "OUTLIERS",
              "TEMP C", "LAST SEEN", "ALERTS"]  # fmt: skip
    rows: list[list[str]] = []
    for d in devices:
        model = (d.get("model") or "-") + (
            f"@{d['model_version']}" if d.get("model_version") else ""
        )
        rules = firing.get((d["fleet"], d["device"]), [])
        # Every text cell comes from a device (or the collector's store of what devices sent):
        # escaped, so that no control character reaches the terminal.
        rows.append(
            [
                printable(d["device"]),
                *([printable(d["fleet"])] if several else []),
                printable(d["status"]),
                printable(model),
                _cell(d["latency_ms"]["p95"], ".3g"),
                _cell(d["outlier_rate"], ".1f", 100, "%"),
                _cell(d.get("temperature_c"), ".1f"),
                _ago(now, d.get("last_seen")),
                printable(", ".join(rules)) if rules else ("-" if alerts is not None else "n/a"),
            ]
        )
    counts = {
        s: sum(1 for d in devices if d["status"] == s) for s in ("online", "stale", "offline")
    }
    n_firing = sum(len(v) for v in firing.values())
    title = printable(fleet or data["devices"].get("fleet") or "all fleets")
    summary = (
        f"{title}: {len(devices)} devices, {counts['online']} online, {counts['stale']} stale, "
        f"{counts['offline']} offline; "
        + (
            f"{n_firing} alerts firing"
            if alerts is not None
            else "alerts: the collector runs no monitor"
        )
    )
    return summary + "\n\n" + _table(header, rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = {"P95 MS", "OUTLIERS", "TEMP C"}
    lines = []
    for r in [header, *rows]:
        cells = [
            str(c).rjust(w) if h in numeric else str(c).ljust(w)
            for c, w, h in zip(r, widths, header, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    if not rows:
        lines.append("(no devices yet)")
    return "\n".join(lines) + "\n"


def fleet_json(
    data: Mapping[str, Any], *, collector: str, fleet: str | None = None
) -> dict[str, Any]:
    """What ``fleet status --json`` prints, from what :func:`fetch_fleet` returned: the same
    devices and counts as the table, each device as the collector's API gives it (raw numbers,
    every field) plus ``alerts``, the rules firing for it (null when the collector runs no
    monitor)."""
    devices = [d for d in data["devices"]["devices"] if fleet is None or d["fleet"] == fleet]
    alerts = data.get("alerts")
    firing = None
    if alerts is not None:
        firing = [a for a in alerts.get("firing", []) if fleet is None or a["fleet"] == fleet]
    rows = []
    for d in devices:
        rules = None
        if firing is not None:
            rules = [
                a["rule"] for a in firing if (a["fleet"], a["device"]) == (d["fleet"], d["device"])
            ]
        rows.append({**d, "alerts": rules})
    counts = {s: sum(1 for d in devices if d["status"] == s) for s in _STATES}
    return {
        "collector": _base_url(collector),
        "at": data["devices"].get("at"),
        "fleet": fleet or data["devices"].get("fleet"),
        "summary": {
            "devices": len(devices),
            **counts,
            "alerts_firing": None if firing is None else len(firing),
        },
        "devices": rows,
        "alerts": firing,
    }


_STATES = ("online", "stale", "offline", "unknown")


def _token(token_file: str | None, *env_names: str) -> str | None:
    """The token in ``token_file``, else the first of ``env_names`` set (surrounding whitespace
    dropped); None when neither. ConfigError for a file that cannot be read or a value that is
    not a token (printable ASCII without spaces): it could not go in a header, and the error
    urllib would raise quotes the header."""
    if token_file is not None:
        token = read_secret_file(token_file, "--token-file", "the collector's token")
        return _checked(token, f"--token-file {printable(token_file)}")
    for name in env_names:
        if os.environ.get(name, "").strip():
            return _checked(os.environ[name].strip(), name)
    return None


def _checked(token: str, where: str) -> str:
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where}: not a token: a token is printable ASCII without spaces (look for a "
            "stray character or line break)"
        )
    return token


def _cmd_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    token = _token(args.token_file, READ_TOKEN_ENV, WRITE_TOKEN_ENV)
    data = fetch_fleet(args.collector, timeout=args.timeout, token=token)
    if args.json:
        # json.dumps escapes every control character and all non-ASCII text (ensure_ascii),
        # so device text needs no terminal escaping; a non-finite number is written as null.
        body = fleet_json(data, collector=args.collector, fleet=args.fleet)
        out.write(dumps_json(body).decode("ascii") + "\n")
        return 0
    out.write(render_fleet(data, fleet=args.fleet))
    return 0


def send_command(
    collector: str,
    device: str,
    action: str,
    token: str,
    *,
    args: Mapping[str, Any] | None = None,
    fleet: str | None = None,
    wait_s: float = 30.0,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """POST the command, then poll its reply for up to ``wait_s``; the last
    ``GET .../commands/{id}`` answer (``state`` replied / pending / expired). Raises
    ConfigError when the collector refuses the request (the error it gave) or is unreachable."""
    base = _base_url(collector)
    body: dict[str, Any] = {"action": action, "args": dict(args or {})}
    if fleet is not None:
        body["fleet"] = fleet
    url = f"{base}/api/devices/{urllib.parse.quote(device, safe='')}/commands"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            sent = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {exc.code}"
        raise ConfigError(
            f"the collector refused the command ({exc.code}): {reason}{_hint(exc)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(
            f"cannot reach the collector API at {url}: {getattr(exc, 'reason', exc)} "
            "(is 'edgeship collect' running, and is --collector its --http address?)"
        ) from exc
    deadline = time.monotonic() + wait_s
    while True:
        answer: dict[str, Any] = _get(base + sent["reply_url"], timeout, token)
        if answer["state"] != "pending" or time.monotonic() >= deadline:
            return answer
        time.sleep(0.2)


def _cmd_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        command_args = json.loads(args.args)
    except ValueError as exc:
        raise ConfigError(f"--args {args.args!r}: not JSON: {exc}") from None
    if not isinstance(command_args, dict):
        raise ConfigError(f"--args {args.args!r}: expected a JSON object")
    token = _token(args.token_file, WRITE_TOKEN_ENV)
    if not token:
        raise ConfigError(f"no API token: give --token-file FILE or set {WRITE_TOKEN_ENV}")
    answer = send_command(
        args.collector, args.device, args.action, token, args=command_args, fleet=args.fleet,
        wait_s=args.wait, timeout=args.timeout,
    )  # fmt: skip
    reply = answer.get("reply")
    if answer["state"] != "replied" or reply is None:
        out.write(
            f"{printable(answer['id'])}: no reply from {printable(args.device)} in "
            f"{args.wait:g} s ({printable(answer['state'])}): is its agent running and "
            f"connected to the collector's broker, in fleet {answer.get('fleet')!r}?\n"
        )
        return 1
    if not reply["ok"]:
        # The error is the device's own text.
        out.write(
            f"{printable(answer['id'])}: {printable(args.device)} failed: "
            f"{printable(reply['error'])}\n"
        )
        return 1
    # json.dumps escapes every control character and all non-ASCII text (ensure_ascii).
    out.write(json.dumps(reply["result"], indent=2) + "\n")
    return 0


def _cmd_watch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not args.interval > 0:
        raise ConfigError("--interval must be positive")
    _base_url(args.collector)  # a bad address is bad input, not a collector restarting
    # The one escape sequence written on purpose: past the guard of a SafeStream.
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    shown = 0
    token = _token(args.token_file, READ_TOKEN_ENV, WRITE_TOKEN_ENV)
    try:
        while True:
            try:
                text = render_fleet(
                    fetch_fleet(args.collector, timeout=args.timeout, token=token),
                    fleet=args.fleet,
                )
            except ConfigError as exc:  # the collector restarting: keep watching
                text = f"{printable(exc)}\n"
            stamp = time.strftime("%H:%M:%S")
            if clear:
                raw_stream(out).write(clear)
            out.write(f"{text}\n{stamp}, every {args.interval:g} s; Ctrl-C to stop\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
