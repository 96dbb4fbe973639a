"""The collector's JSON API: what it answers, the API token, the commands it sends, and the
view of the collector it serves. Light on purpose (no FastAPI): the service and the command
code import its types; the routes themselves are :mod:`collector.api_routes`.

Routes (documented with examples in ``docs/collector.md``, and at ``/docs``):

* ``GET /api/health``: the collector's connection, counters (received, stored, duplicates, dead
  letters by field...) and store; HTTP 503 while it is not connected or has failed.
* ``GET /api/devices``: the fleet snapshot: per-device state (online / offline / stale / unknown
  with the reason), last seen, model and version, latency percentiles from the summed
  histograms, outlier rate, temperature and throttling, spool drops, gaps; plus fleet totals.
* ``GET /api/devices/{device}``: one device with its newest telemetry windows (``?series=N``,
  default 120, at most 10000) and its newest status / outlier / reply events (``?events=N``);
  ``?fleet=NAME`` when a collector of several fleets holds the same device id twice.
* ``GET /api/dead-letters``: the newest rejected messages (``?limit=N``, default 50) with the
  field and reason, and a payload preview.
* ``GET /api/rollouts``: the newest staged rollouts (``?limit=N``, default 20; ``?fleet=``),
  each the newest state its host published: state, model, wave, devices per state, reason.
* ``GET /api/rollouts/{fleet}/{id}``: one rollout, with its waves and every device's state.
* ``GET /api/devices/{device}/commands/{id}``: a command sent through this API and the device's
  reply (from the store), ``state`` pending / replied / expired.
* ``POST /api/devices/{device}/commands`` with ``{"action": "ping", "args": {}}``: the collector
  publishes a ``cmd`` (:class:`device_agent.contracts.messages.Command`) to the device over its
  own MQTT connection and answers 202 with the command's id once the broker acknowledged it.

State-changing requests (POST) need the API token, ``Authorization: Bearer <token>``; the check
is :func:`collector.app.create_app`'s, before any route. Without a configured token
(``--api-token-file``, ``EDGESHIP_API_TOKEN``) they answer 403 and say how to enable them; with
one, a missing or wrong token is 401. Reads stay open.

A command's body is parsed strictly (:func:`device_agent.httpserver.parse_json`: nested at most
32 deep, finite numbers only, no duplicate keys, NUL or lone surrogates; 400), then checked
field by field; its schema in the OpenAPI document is
:class:`collector.api_routes.CommandRequest`.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from collector.errors import ConfigError
from device_agent.contracts import messages as msg
from device_agent.contracts.broker_password import read_secret_file

if TYPE_CHECKING:
    from collector.state import FleetState

__all__ = [
    "ENABLE_COMMANDS",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_SERIES",
    "TOKEN_ENV",
    "ApiError",
    "CollectorView",
    "Commander",
    "SentCommand",
    "check_api_token",
    "check_bearer",
    "load_api_token",
]

log = logging.getLogger("collector.api")

MAX_SERIES = 10_000
MAX_BODY_BYTES = 64 * 1024  # any request's body; a command is a few hundred bytes
MAX_JSON_DEPTH = 32
TOKEN_ENV = "EDGESHIP_API_TOKEN"
_MIN_TOKEN = 16
ENABLE_COMMANDS = (
    "state-changing requests are disabled: start edgeship collect with --api-token-file FILE "
    f"(or {TOKEN_ENV}) and send 'Authorization: Bearer <token>'"
)


class ApiError(Exception):
    """An answer other than success, raised by a route: ``{"error": message}`` with ``status``
    (and ``headers``), written by the app's handler."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class SentCommand:
    """A command this collector published, as ``GET .../commands/{id}`` shows it."""

    fleet: str
    device: str
    topic: str
    command: msg.Command
    sent_at: float

    def to_dict(self) -> dict[str, Any]:
        c = self.command
        return {
            "action": c.action,
            "args": dict(c.args),
            "topic": self.topic,
            "sent_at": self.sent_at,
            "expires": c.expires,
        }


class Commander(Protocol):
    """What the API needs to send commands (:class:`collector.service.Collector`)."""

    def send_command(self, fleet: str, device: str, command: msg.Command) -> SentCommand:
        """Publish ``command`` at QoS 1 and wait for the broker's PUBACK; raises BrokerError
        when not connected, refused (MQTT 5 reason code) or not acknowledged in time."""
        ...

    def sent_command(self, command_id: str) -> SentCommand | None:
        """A command sent since start (the newest 1000 are kept), or None."""
        ...


class CollectorView(Commander, Protocol):
    """What the API serves: the fleet's state, the collector's health, and its commands."""

    @property
    def state(self) -> FleetState: ...

    def health(self) -> dict[str, Any]: ...


# --- the token ----------------------------------------------------------------------------------


def load_api_token(
    token: str | None = None,
    token_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The API token from ``--api-token``, ``--api-token-file`` or ``EDGESHIP_API_TOKEN`` (in
    that order; naming both options is an error), or None. Raises ConfigError."""
    env = os.environ if environ is None else environ
    if token is not None and token_file is not None:
        raise ConfigError("--api-token and --api-token-file: give one of them")
    where = "--api-token"
    if token_file is not None:
        where = f"--api-token-file {token_file}"
        token = read_secret_file(token_file, "--api-token-file", "the API token")
    elif token is None:
        token = env.get(TOKEN_ENV) or None
        where = TOKEN_ENV
    if token is None:
        return None
    check_api_token(token, where)
    return token


def check_api_token(token: str, where: str = "api_token") -> None:
    """Raise ConfigError unless ``token`` is at least 16 printable characters, no spaces."""
    # ASCII: a header is read as latin-1, so a UTF-8 token sent by curl would never match.
    if (
        len(token) < _MIN_TOKEN
        or not token.isascii()
        or not token.isprintable()
        or any(c.isspace() for c in token)
    ):
        raise ConfigError(
            f"{where}: the API token must be at least {_MIN_TOKEN} printable ASCII characters "
            "without spaces; make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )


def check_bearer(token: str | None, authorization: str) -> tuple[int, str] | None:
    """None when ``authorization`` (the header) carries ``token``; else (status, problem):
    403 when no token is configured (commands are off), 401 when it is missing or wrong."""
    if token is None:
        return 403, ENABLE_COMMANDS
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    return 401, "wrong API token" if scheme.lower() == "bearer" else "no API token"
