"""Store URLs: the SQLite path in one, and any URL without its password, for logs and the API."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from collector.errors import ConfigError

__all__ = ["redact_url", "sqlite_path"]


# libpq's connection parameters that hold a secret, given in a URL's query.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` without its passwords (``user:***@``, ``?password=***``), for logs and the
    API: libpq also takes the password (and the TLS key's ``sslpassword``) as a query
    parameter."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_param(param: str) -> str:
    key, sep, _ = param.partition("=")
    if sep and urllib.parse.unquote_plus(key).strip().lower() in _SECRET_PARAMS:
        return f"{key}=***"
    return param


def sqlite_path(url: str) -> Path:
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"store URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(rest[1:])
