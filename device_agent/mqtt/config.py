"""The agent's broker setting: where and how it connects, validated when it is built."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_agent.contracts.broker import BrokerUrl, redact
from device_agent.errors import ConfigError

__all__ = ["BrokerConfig", "Protocol"]

Protocol = Literal["auto", "5", "3.1.1"]


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the agent connects. Construction validates and raises ConfigError.

    ``url`` follows :mod:`device_agent.contracts.broker`'s grammar: ``mqtt://host[:port]``
    (plain TCP, port 1883) or ``mqtts://host[:port]`` (TLS, port 8883); credentials may also be
    given in it (``mqtt://user:pass@host``). With TLS the
    broker certificate is verified against ``ca_file`` (the system's CAs when None);
    ``cert_file``/``key_file`` present a client certificate; ``tls_insecure`` skips the
    hostname check (not the chain check), as ``mosquitto_pub --insecure`` does.

    ``protocol``: ``"auto"`` tries MQTT 5 and falls back to 3.1.1 when refused. ``keepalive_s``
    also bounds how long a dead connection goes unnoticed (1.5 times it). ``connect_timeout_s``
    bounds the TCP/TLS connect and the wait for CONNACK. ``session_expiry_s`` is how long the
    broker keeps the device's session (its command subscription and commands sent while it
    was offline) after a disconnect; under 3.1.1 the broker's own setting applies.
    ``client_id`` defaults to ``edgeship-{fleet}-{device}``.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    protocol: Protocol = "auto"
    keepalive_s: int = 30
    client_id: str | None = None
    connect_timeout_s: float = 10.0
    session_expiry_s: int = 86_400
    # Parsed from url in __post_init__.
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)
    tls: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        parsed = BrokerUrl.parse(self.url)
        if parsed.username is not None:
            if self.username is not None or self.password is not None:
                raise ConfigError(
                    f"broker URL {redact(self.url)}: credentials are given both in the URL "
                    "and as username/password; keep one"
                )
            object.__setattr__(self, "username", parsed.username)
            object.__setattr__(self, "password", parsed.password)
        object.__setattr__(self, "host", parsed.host)
        object.__setattr__(self, "port", parsed.port)
        object.__setattr__(self, "tls", parsed.tls)
        self._validate()

    def _validate(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(
                f"mqtt protocol: {self.protocol!r} is not one of 'auto', '5', '3.1.1'"
            )
        if isinstance(self.keepalive_s, bool) or not isinstance(self.keepalive_s, int):
            raise ConfigError(f"mqtt keepalive_s: {self.keepalive_s!r} is not an integer")
        if not 5 <= self.keepalive_s <= 65535:
            raise ConfigError(
                f"mqtt keepalive_s: {self.keepalive_s} is outside 5..65535 seconds "
                "(0 would let a dead connection go unnoticed, so the Last Will would never fire)"
            )
        if not (isinstance(self.connect_timeout_s, int | float) and self.connect_timeout_s > 0):
            raise ConfigError(
                f"mqtt connect_timeout_s: {self.connect_timeout_s!r} must be a positive number"
            )
        if isinstance(self.session_expiry_s, bool) or not isinstance(self.session_expiry_s, int):
            raise ConfigError(f"mqtt session_expiry_s: {self.session_expiry_s!r} is not an integer")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError(f"mqtt session_expiry_s: {self.session_expiry_s} is out of range")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt password: MQTT needs a username with a password")
        if self.username is not None and not self.username:
            raise ConfigError("mqtt username: must not be empty (use None for no username)")
        if self.client_id is not None and (not self.client_id or "\0" in self.client_id):
            raise ConfigError(f"mqtt client_id: {self.client_id!r} must be a non-empty string")
        tls_files = {
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
        }
        if not self.tls:
            given = [name for name, value in tls_files.items() if value is not None]
            if self.tls_insecure:
                given.append("tls_insecure")
            if given:
                raise ConfigError(
                    f"broker URL {redact(self.url)}: {', '.join(given)} given for a plain "
                    "mqtt:// connection; use mqtts:// for TLS"
                )
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("mqtt key_file: given without cert_file (the client certificate)")
        for name, value in tls_files.items():
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"mqtt {name}: {value} is not a readable file")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BrokerConfig:
        """``BrokerConfig(url=url, **kw)``: the usual way to build one from a setting string."""
        unknown = set(kw) - {
            f for f in cls.__dataclass_fields__ if f not in ("host", "port", "tls")
        }
        if "url" in kw or unknown:
            raise ConfigError(f"BrokerConfig.from_url: unexpected options {sorted(unknown)}")
        return cls(url=url, **kw)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (None for mqtt://); ConfigError if a file is unusable."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt TLS files: cannot load them: {exc}") from exc
        ctx.check_hostname = not self.tls_insecure
        return ctx
