"""Outside text made harmless: one escaping rule for every message, log line and terminal.

What a device, a bundle or any other outside source put in a string must neither drive the
terminal that shows it nor stop a store, a log or an encoder that takes it. :func:`escape`
spells every such character as a Python-style escape (``\\x1b``, ``\\x07``, ``\\u202e``,
``\\ud800``) and leaves all other text, every printable script and emoji included, as it is.

Escaped: C0 controls (U+0000-U+001F), DEL and C1 controls (U+007F-U+009F), the line and
paragraph separators (U+2028, U+2029), the bidirectional controls that reorder what is shown
(U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069) and lone surrogates (U+D800-U+DFFF).

:mod:`device_agent.terminal` applies it to whatever reaches a terminal; the agent applies it to
reasons it sends and logs (:func:`device_agent.contracts.commands.printable`). Stored text keeps
its newlines and controls and is only made encodable
(:func:`device_agent.contracts.messages.safe_text`).
"""

from __future__ import annotations

import re

__all__ = ["escape"]

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_UNSAFE_KEEP_NEWLINES = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff]"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, *, keep_newlines: bool = False, limit: int | None = None) -> str:
    """``text`` with every character above escaped, then cut to ``limit`` characters (the last
    one an ellipsis) when it is longer.

    ``keep_newlines`` leaves ``\\n`` alone (for whole blocks of output, laid out in lines); by
    default it is escaped too, as a single value should have none.
    """
    pattern = _UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE
    if pattern.search(text) is not None:
        text = pattern.sub(_escape_one, text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text
