"""The broker URL: one grammar for every program that connects to the fleet's MQTT broker.

The agent (``--broker``, ``broker_url``), the collector (``edgeship collect --broker``) and the
host's remote commands (``edgeship bench/deploy --broker``) all read the same text, so they
parse it here, with one grammar, one set of errors and one redaction::

    [scheme://][user[:password]@]host[:port][/]

* ``scheme`` is ``mqtt`` (plain TCP, default port 1883) or ``mqtts`` (TLS, default port 8883),
  in any case; ``tcp`` and ``ssl`` are accepted as their aliases (the Eclipse Paho spelling).
  Without ``scheme://`` the URL means ``mqtt://``, so ``hub.local:1883`` works.
* ``user`` and ``password`` are percent-decoded: a user name or password holding ``/``, ``?``
  or ``#`` must write them ``%2F``, ``%3F``, ``%23`` (``@`` and ``:`` in a password may be
  written as they are, or as ``%40`` and ``%3A``). A password needs a user; a user name holds
  no space or control character.
* ``host`` is a name or an IPv4 address, or an IPv6 address in brackets (``[::1]``); names
  are compared in lower case.
* ``port`` is 1..65535; empty or left out means the scheme's default.
* Nothing may follow but one ``/``: no path, query or fragment (MQTT has no use for them, and a
  mistyped URL should fail here rather than connect somewhere unexpected).

Errors are :class:`~device_agent.errors.ConfigError` and name the part that is wrong. They
quote the URL through :func:`redact`, and a parsed :class:`BrokerUrl` shows itself through
:meth:`BrokerUrl.display`: neither ever contains the password.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from device_agent.contracts.errors import ConfigError

__all__ = ["DEFAULT_PORTS", "GRAMMAR", "SCHEMES", "BrokerUrl", "redact"]

GRAMMAR = "[mqtt|mqtts://][user[:password]@]host[:port]"
# scheme (lower case) -> whether it means TLS; tcp/ssl are Eclipse Paho's names for the same.
SCHEMES: dict[str, bool] = {"mqtt": False, "mqtts": True, "tcp": False, "ssl": True}
DEFAULT_PORTS: dict[bool, int] = {False: 1883, True: 8883}

_PORT = re.compile(r"[0-9]+")
# Characters a host name may not hold: the URL's own delimiters, whitespace and controls.
_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f@/?#\[\]:\\]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redact(text: str) -> str:
    """``text`` as the user wrote it, with any password replaced by ``***``, quoted (``repr``).

    For error messages and logs that must show what was given, including text that does not
    parse: everything between the first ``:`` after ``scheme://`` and the last ``@`` is taken
    for a password, which also covers a password holding an unencoded ``/``, ``#`` or ``@``.
    """
    head, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(head.strip()):
        head, sep, rest = "", "", text
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return repr(text)
    user, colon, _password = userinfo.partition(":")
    return repr(f"{head}{sep}{user}{':***' if colon else ''}@{hostpart}")


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL. Build one with :meth:`parse`; the password never shows in its repr."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        """``mqtts`` with TLS, ``mqtt`` without (the canonical names, whatever was written)."""
        return "mqtts" if self.tls else "mqtt"

    def display(self) -> str:
        """``scheme://[user@]host:port`` without the password: for logs, status and errors."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        """Parse ``text`` by the grammar in this module's docstring; ConfigError names the
        wrong part (and never quotes the password)."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"broker URL: empty; expected {GRAMMAR}")
        stripped = text.strip()
        shown = redact(stripped)
        scheme, sep, rest = stripped.partition("://")
        if not sep:
            scheme, rest = "mqtt", stripped
        tls = SCHEMES.get(scheme.lower())
        if tls is None:
            named = f"scheme {scheme!r}" if _SCHEME.fullmatch(scheme) else "the scheme"
            raise ConfigError(
                f"broker URL {shown}: {named} is not mqtt or mqtts (tcp and ssl are accepted "
                "for them)"
            )
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        authority, tail = rest[:end], rest[end:]
        if "@" in tail:
            raise ConfigError(
                f"broker URL {shown}: '@' after a '/', '?' or '#'; percent-encode those in a "
                "user name or password (%2F, %3F, %23)"
            )
        if tail not in ("", "/"):
            raise ConfigError(
                f"broker URL {shown}: unexpected path, query or fragment after the host; "
                f"expected {GRAMMAR}"
            )
        userinfo, at, hostport = authority.rpartition("@")
        username, password = _credentials(shown, userinfo) if at else (None, None)
        host, port = _host_port(shown, hostport, tls)
        return cls(host=host, port=port, tls=tls, username=username, password=password)


def _credentials(shown: str, userinfo: str) -> tuple[str, str | None]:
    raw_user, colon, raw_password = userinfo.partition(":")
    username = unquote(raw_user)
    if not username:
        raise ConfigError(f"broker URL {shown}: the user name before '@' is empty")
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in username):
        raise ConfigError(f"broker URL {shown}: the user name holds a space or a control")
    return username, unquote(raw_password) if colon else None


def _host_port(shown: str, hostport: str, tls: bool) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ConfigError(f"broker URL {shown}: '[' opens an IPv6 address that no ']' closes")
        host, after = hostport[1:end], hostport[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"broker URL {shown}: {host!r} is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise ConfigError(f"broker URL {shown}: {after!r} after the IPv6 address")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = hostport.partition(":")
        if not host:
            raise ConfigError(f"broker URL {shown}: no host")
        if _BAD_HOST_CHARS.search(host):
            raise ConfigError(f"broker URL {shown}: host {host!r} holds a character a host cannot")
        host = host.lower()
    if not port_text:
        return host, DEFAULT_PORTS[tls]
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"broker URL {shown}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"broker URL {shown}: port {port} is out of range 1..65535")
    return host, port
