"""Where a host program's broker password comes from, when not from the command line.

A password written in ``--broker mqtt://user:password@host`` is shown to every user of the
machine by ``ps`` while the program runs, and stays in the shell's history. Every host program
that connects to the broker (``edgeship deploy``, ``edgeship bench --device``, ``edgeship
collect`` and ``edgeship-collector``) therefore also reads it from a file or from the
environment, by one rule (:func:`resolve_broker_password`):

1. ``--broker-password-file FILE``: the file's text, less one trailing line break. A file that
   is missing, unreadable, a directory, empty, not UTF-8 or of more than one line is an error.
2. Else ``EDGESHIP_BROKER_PASSWORD``, when it is set and not empty.
3. Else the password in the URL, accepted with a warning that says where it shows.

A password in the URL together with a file or the variable is refused: two passwords, one of
them on the command line, is a mistake to fix, not to guess at. A password from a file or the
variable needs the user name in the URL (``mqtt://operator@host``).

Errors are :class:`~device_agent.errors.ConfigError` (one line); neither they, the warnings
nor the repr of :class:`BrokerPassword` ever hold the password.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.errors import ConfigError

__all__ = [
    "PASSWORD_ENV",
    "PASSWORD_FILE_OPTION",
    "BrokerPassword",
    "read_password_file",
    "read_secret_file",
    "resolve_broker_password",
    "url_with_password",
]

PASSWORD_ENV = "EDGESHIP_BROKER_PASSWORD"
PASSWORD_FILE_OPTION = "--broker-password-file"
MAX_PASSWORD_BYTES = 65535  # MQTT's limit on the CONNECT packet's password field
MAX_SECRET_BYTES = 65536  # any other secret file (an API token): read no more than this

log = logging.getLogger("edgeship.broker")

Source = Literal["file", "env", "url"]


@dataclass(frozen=True)
class BrokerPassword:
    """The password a program connects with (None: none) and where it came from."""

    password: str | None = field(repr=False)
    source: Source | None = None
    where: str = ""  # "--broker-password-file /etc/x", "EDGESHIP_BROKER_PASSWORD", "--broker"


def read_secret_file(
    path: str | Path, option: str, what: str, *, max_bytes: int | None = None
) -> str:
    """The secret in ``path`` (a password or an API token): its text less one trailing line
    break (``echo secret > file``). The one reader of secret files for every program.

    Raises ConfigError, naming ``option`` and the file, when the file is missing, unreadable, a
    directory, empty, not UTF-8, longer than ``max_bytes`` (default :data:`MAX_SECRET_BYTES`; no
    more is read), holds a NUL or more than one line.
    Logs a warning when group or others may read it. ``what`` names the secret in errors
    ("the broker password").
    """
    where = f"{option} {path}"
    cap = MAX_SECRET_BYTES if max_bytes is None else max_bytes
    try:
        with Path(path).open("rb") as fh:  # at most cap + 1 bytes: /dev/zero is refused too
            raw = fh.read(cap + 1)
        mode = Path(path).stat().st_mode
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, expected a file holding {what}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    if len(raw) > cap:
        raise ConfigError(f"{where}: longer than {cap} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{where}: is empty; write {what} in it")
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{where}: holds more than one line; write only {what} in it")
    if "\x00" in text:
        raise ConfigError(f"{where}: holds a NUL character")
    if os.name == "posix" and mode & 0o077:
        log.warning(
            "%s is readable by group or others (mode %04o): restrict it with: chmod 600 %s",
            where,
            mode & 0o777,
            path,
        )
    return text


def read_password_file(path: str | Path, option: str = PASSWORD_FILE_OPTION) -> str:
    """The broker password in ``path`` (:func:`read_secret_file`, at most MQTT's
    ``MAX_PASSWORD_BYTES``)."""
    return read_secret_file(path, option, "the broker password", max_bytes=MAX_PASSWORD_BYTES)


def resolve_broker_password(
    url: str | BrokerUrl,
    password_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    option: str = PASSWORD_FILE_OPTION,
) -> BrokerPassword:
    """The broker password by the rule in this module's docstring (file, then
    ``EDGESHIP_BROKER_PASSWORD``, then the URL's, with a warning). Raises ConfigError."""
    broker = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
    env = os.environ if environ is None else environ
    if password_file is not None:
        found = BrokerPassword(
            read_password_file(password_file, option), "file", f"{option} {password_file}"
        )
    elif env.get(PASSWORD_ENV):
        found = BrokerPassword(env[PASSWORD_ENV], "env", PASSWORD_ENV)
    elif broker.password is not None:
        log.warning(
            "the broker password is in --broker's URL, where ps shows it to every user of this "
            "machine and the shell's history keeps it; put it in a file (%s FILE, mode 600) or "
            "in %s instead",
            option,
            PASSWORD_ENV,
        )
        return BrokerPassword(broker.password, "url", "--broker")
    else:
        return BrokerPassword(None)
    if broker.password is not None:
        raise ConfigError(
            f"the broker password is given twice, in --broker's URL and by {found.where}: "
            f"remove it from the URL ({broker.display()})"
        )
    if not broker.username:
        raise ConfigError(
            f"a broker password from {found.where} needs a user name in --broker, e.g. "
            f"{broker.scheme}://USER@{broker.display().partition('://')[2]}"
        )
    return found


def url_with_password(broker: BrokerUrl, password: str | None) -> str:
    """``broker`` as URL text holding ``password`` (percent-encoded), for an API that takes the
    URL as text. Keep it in memory: never log it or pass it on a command line."""
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    user = ""
    if broker.username:
        user = quote(broker.username, safe="")
        if password is not None:
            user += ":" + quote(password, safe="")
        user += "@"
    return f"{broker.scheme}://{user}{host}:{broker.port}"
