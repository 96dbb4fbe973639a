"""Text bound for a terminal, made harmless: defined in :mod:`device_agent.terminal`, where all
three programs (the collector imports no ``sdk`` module) reach it; the SDK's commands import it
by this name."""

from __future__ import annotations

from device_agent.terminal import SafeStream, guard_stdio, printable, raw_stream

__all__ = ["SafeStream", "guard_stdio", "printable", "raw_stream"]
