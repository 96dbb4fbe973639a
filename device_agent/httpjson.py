"""Strict JSON for HTTP bodies, in and out: what the agent's endpoint and the collector's API
accept, and how they answer.

:func:`parse_json` refuses nesting deeper than ``max_depth`` (checked on the bytes before
parsing), NaN / Infinity and numbers that overflow a float, duplicate keys, strings with NUL or
lone surrogates, and non-UTF-8 bytes, each with a :class:`RequestError` that says why (400;
non-finite numbers carry the status the caller chose). :func:`dumps_json` writes with
``allow_nan=False``: a non-finite float goes out as ``null``. Standard library only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from device_agent.contracts.messages import unique_keys
from device_agent.errors import EdgeshipError

__all__ = ["RequestError", "dumps_json", "json_too_deep", "parse_json", "without_non_finite"]


class RequestError(EdgeshipError):
    """A request the server refuses; ``status`` is the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


_QUOTED = re.compile(rb'"[^"]*"')
_KEEP_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ESCAPED_SURROGATE_OR_NUL = re.compile(rb"\\u(?:[dD][89a-fA-F]|00{2})", re.ASCII)


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether the arrays and objects in ``body`` nest deeper than ``max_depth`` (or their
    brackets do not balance), found without parsing: a few passes over bytes in C, so a
    megabyte of ``[`` costs milliseconds and no recursion."""
    # Escapes first (left to right, as a JSON parser reads them): then every '"' delimits a
    # string, and the brackets inside strings can be dropped with them.
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = _QUOTED.sub(b"", text).translate(_KEEP_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not text:
            return False
        inner = text.replace(b"[]", b"")
        if len(inner) == len(text):
            return True  # unbalanced: no innermost pair left to remove
        text = inner
    return bool(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"the number {text[:40]} is too large for a float")
    return value


def _no_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not a number JSON allows; send finite numbers")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return unique_keys(pairs, _duplicate_key)


def _duplicate_key(key: str) -> RequestError:
    return RequestError(f"the key {key!r} appears twice in one object")


class _NonFinite(ValueError):
    pass


def _check_strings(value: Any) -> None:
    """Refuse NUL and lone surrogates in any key or string (they cannot be stored, logged or
    encoded to UTF-8 downstream). Iterative: the depth is bounded, but not by Python's stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise RequestError("strings must not contain NUL (\\u0000)")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    "strings must not contain lone surrogates (\\ud800-\\udfff unpaired)"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(x for x in item if isinstance(x, str | list | dict))


def parse_json(body: bytes, *, max_depth: int, non_finite_status: int = 400) -> Any:
    """``body`` parsed as strict JSON; raises :class:`RequestError` (400, or
    ``non_finite_status`` for NaN, Infinity and numbers beyond a float's range)."""
    if json_too_deep(body, max_depth):
        raise RequestError(
            f"the JSON nests deeper than {max_depth} levels (or its brackets do not balance)"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(
            text,
            parse_float=_finite_float,
            parse_constant=_no_constant,
            object_pairs_hook=_unique_keys,
        )
    except _NonFinite as exc:
        raise RequestError(str(exc), non_finite_status) from None
    except RecursionError:  # json_too_deep's bound is far below; kept as a backstop
        raise RequestError("the JSON nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise RequestError(f"the body is not JSON: {exc}") from None
    if _ESCAPED_SURROGATE_OR_NUL.search(body):
        _check_strings(value)
    return value


def without_non_finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities), however deep, as None: what
    JSON can hold (it has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: without_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_non_finite(v) for v in value]
    return value


def dumps_json(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """``value`` as JSON bytes; non-finite floats become ``null`` (JSON has no NaN)."""
    try:
        return json.dumps(value, allow_nan=False, default=default).encode()
    except ValueError:
        return json.dumps(without_non_finite(value), allow_nan=False, default=default).encode()
