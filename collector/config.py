"""How a collector runs: :class:`CollectorConfig`, checked whole at construction (a bad broker
URL, address, id, file or limit is a :class:`~collector.errors.ConfigError` before anything
connects), and the small grammars its options use.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from collector.errors import ConfigError
from collector.state import StateConfig
from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.broker_password import read_secret_file, url_with_password
from device_agent.contracts.messages import shared_subscription, subscription, validate_id
from device_agent.errors import ProtocolError

__all__ = ["READ_TOKEN_ENV", "CollectorConfig", "load_read_token", "parse_http_address"]

READ_TOKEN_ENV = "EDGESHIP_API_READ_TOKEN"


def load_read_token(
    token_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The API's read token from ``--api-read-token-file`` or ``EDGESHIP_API_READ_TOKEN`` (the
    file wins), or None (reads open). Raises ConfigError for an unreadable file or a weak token.
    """
    from collector.api import check_api_token

    env = os.environ if environ is None else environ
    if token_file is None:
        token = env.get(READ_TOKEN_ENV) or None
        if token is not None:
            check_api_token(token, READ_TOKEN_ENV)
        return token
    token = read_secret_file(token_file, "--api-read-token-file", "the read token")
    check_api_token(token, f"--api-read-token-file {token_file}")
    return token


def parse_http_address(value: str | None) -> tuple[str, int] | None:
    """``127.0.0.1:9108``, ``:9108`` or ``9108`` (bound to 127.0.0.1), ``0.0.0.0:9108`` to
    listen on every interface; ``off`` or empty disables the API. Raises ConfigError."""
    if value is None or value.strip().lower() in ("", "off", "none"):
        return None
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--http {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9108") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--http {value!r}: port {port} is not in 0..65535")
    return host, port


def _default_client_id(fleet: str | None) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
    return f"edgeship-collector-{fleet or 'all'}-{host}"[:64]


@dataclass(frozen=True)
class CollectorConfig:
    """How a collector runs. Only ``broker_url`` is required.

    ``fleet`` None collects every fleet (``edgeship/+/#``). ``client_id`` names the broker
    session, so it must stay the same across restarts (default: derived from the fleet and the
    host name) and differ between collectors sharing a fleet through ``share_group``.
    ``stale_windows``: a device is stale when no telemetry arrived for that many of its windows.
    ``worker``: ``process`` (decode and store in ``workers`` child processes, each with its own
    batches and database connection; the default) or ``thread`` (one, in this process).
    ``ca_file`` verifies an ``mqtts://`` broker against a private CA; ``cert_file`` and
    ``key_file`` present a client certificate (a broker with ``use_identity_as_username``
    takes its CN as the user name).
    ``broker_password`` is the password of the user in ``broker_url`` when the URL holds none
    (:mod:`device_agent.contracts.broker_password`): it is folded into ``broker_url`` at
    construction, so every connection the collector makes uses it, and neither shows in repr.
    ``api_token`` enables the API's state-changing routes (sending commands), for requests
    with ``Authorization: Bearer <api_token>``; None leaves the API read-only.
    ``api_read_token``, when set, guards every read except ``/api/health``: a request needs
    ``Authorization: Bearer`` with it (or with ``api_token``); None leaves reads open.
    """

    broker_url: str = field(repr=False)  # it may hold the password: `broker` shows it safely
    fleet: str | None = None
    store_url: str = "sqlite:///fleet.db"
    http: str | None = "127.0.0.1:9108"
    client_id: str | None = None
    share_group: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    receive_maximum: int = 10_000
    batch_max: int = 2_000
    batch_interval_s: float = 0.05
    worker: Literal["process", "thread"] = "process"
    workers: int = 2
    stale_windows: float = 3.0
    default_window_s: float = 10.0
    lookback_s: float = 300.0
    ca_file: str | None = None
    connect_timeout_s: float = 10.0
    api_token: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None
    http_tls_cert_file: str | None = None
    http_tls_key_file: str | None = None
    broker_password: str | None = field(default=None, repr=False, compare=False)
    api_read_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        broker = self.broker  # parse now: a bad URL is a ConfigError at construction
        if self.broker_password is not None:
            if broker.password is not None and broker.password != self.broker_password:
                raise ConfigError(
                    f"broker_password given and {broker.display()} holds another: give one"
                )
            if not broker.username:
                raise ConfigError(f"broker_password needs a user name in {broker.display()}")
            # Frozen: set once here, so the session and the alert publisher connect with it.
            folded = url_with_password(broker, self.broker_password)
            object.__setattr__(self, "broker_url", folded)
        self.http_address  # noqa: B018
        for value, what in ((self.fleet, "fleet"), (self.share_group, "share_group")):
            if value is not None:
                try:
                    validate_id(value, what)
                except ProtocolError as exc:
                    raise ConfigError(str(exc)) from exc
        if self.client_id is not None and not 0 < len(self.client_id) <= 128:
            raise ConfigError("client_id must be 1 to 128 characters")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"protocol {self.protocol!r}: use auto, 5 or 3.1.1")
        if self.worker not in ("process", "thread"):
            raise ConfigError(f"worker {self.worker!r}: use process or thread")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be in 1..64")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("receive_maximum must be in 1..65535 (an MQTT v5 limit)")
        if not 1 <= self.batch_max <= 100_000:
            raise ConfigError("batch_max must be in 1..100000")
        if not 0 < self.batch_interval_s <= 60:
            raise ConfigError("batch_interval_s must be in (0, 60]")
        if self.stale_windows <= 0 or self.default_window_s <= 0 or self.lookback_s <= 0:
            raise ConfigError("stale_windows, default_window_s and lookback_s must be positive")
        if not 5 <= self.keepalive_s <= 65535:
            raise ConfigError("keepalive_s must be in 5..65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError("session_expiry_s must be in 0..4294967295")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file given without cert_file (the client certificate)")
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            raise ConfigError("the HTTP API's TLS needs both a certificate and its key")
        for path, what in ((self.ca_file, "ca_file"), (self.cert_file, "cert_file"),
                           (self.key_file, "key_file"),
                           (self.http_tls_cert_file, "http_tls_cert_file"),
                           (self.http_tls_key_file, "http_tls_key_file")):  # fmt: skip
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{what} {path}: no such file")
        for token, name in ((self.api_token, "api_token"), (self.api_read_token, "api_read_token")):
            if token is not None:
                from collector.api import check_api_token

                check_api_token(token, name)

    @property
    def broker(self) -> BrokerUrl:
        """The parsed ``broker_url`` (:mod:`device_agent.contracts.broker`: the grammar and
        the errors every edgeship program shares, the password never shown)."""
        return BrokerUrl.parse(self.broker_url)

    @property
    def http_address(self) -> tuple[str, int] | None:
        return parse_http_address(self.http)

    @property
    def session_id(self) -> str:
        return self.client_id or _default_client_id(self.fleet)

    @property
    def topic_filter(self) -> str:
        pattern = subscription(self.fleet)
        return (
            pattern if self.share_group is None else shared_subscription(self.share_group, pattern)
        )

    @property
    def state_config(self) -> StateConfig:
        return StateConfig(
            stale_windows=self.stale_windows,
            default_window_s=self.default_window_s,
            lookback_s=self.lookback_s,
        )
