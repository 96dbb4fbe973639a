"""Text bound for a terminal, made harmless: what a device, a bundle or any other outside
source put in a string must not drive the terminal that shows it.

A device id, a model name, an alert's text or an error message quoting input can carry ESC
sequences (clear the screen, set the window title, rewrite earlier lines), BEL, backspace or
carriage returns; a lone surrogate makes ``print`` itself fail. :func:`printable` spells every
such character as a Python-style escape (``\\x1b``, ``\\x07``, ``\\u202e``, ``\\ud800``) and
leaves all other text, every printable script and emoji included, as it is.

Escaped: C0 controls (U+0000-U+001F), DEL and C1 controls (U+007F-U+009F), the line and
paragraph separators (U+2028, U+2029), the bidirectional controls that reorder what is shown
(U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069) and lone surrogates (U+D800-U+DFFF).

Use :func:`printable` on each outside value placed in a line (it escapes newlines too, so a
value cannot forge a line of a table), and :func:`guard_stdio` around a whole command, which
escapes what still gets through on stdout and stderr (keeping the newlines of the command's own
layout).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from device_agent.contracts.text import escape

__all__ = ["SafeStream", "guard_stdio", "printable", "raw_stream"]


def printable(value: object, *, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control, bidi-control and surrogate character escaped
    (:func:`device_agent.contracts.text.escape`, the one rule for all outside text).

    ``keep_newlines`` leaves ``\\n`` alone (for whole blocks of output, laid out in lines); by
    default it is escaped too, as a single value should have none.
    """
    return escape(value if isinstance(value, str) else str(value), keep_newlines=keep_newlines)


class SafeStream:
    """A text stream that writes :func:`printable` text (newlines kept) to ``raw``.

    Everything else (``flush``, ``isatty``, ``encoding``, ``fileno`` ...) is ``raw``'s; the
    escape sequences a command means to send (``fleet watch`` clearing the screen) go to
    :func:`raw_stream` of it."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(printable(text, keep_newlines=True))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def raw_stream(stream: TextIO) -> TextIO:
    """The stream under a :class:`SafeStream` (``stream`` itself otherwise): for the escape
    sequences a command writes on purpose, never for outside text."""
    raw = stream.raw if isinstance(stream, SafeStream) else stream
    return raw


@contextlib.contextmanager
def guard_stdio() -> Iterator[None]:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`SafeStream` for the block
    (loggers set up inside it write through it too)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = SafeStream(saved[0])
    sys.stderr = SafeStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
