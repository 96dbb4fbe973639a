"""Store URLs: the SQLite path in one, and any URL without its password, for logs and the API."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from collector.errors import ConfigError

__all__ = ["redact_url", "sqlite_path"]


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and the API."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def sqlite_path(url: str) -> Path:
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"store URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(rest[1:])
