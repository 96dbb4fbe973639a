"""Where ONNX Runtime's printing and logging go while it quantizes: relayed to the ``sdk.quantize``
logger at INFO level, so ``edgeship -v`` shows them and a plain run stays quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

# The logger docs/quantization.md names, shared by the ONNX Runtime quantization modules.
log = logging.getLogger("sdk.quantize")


class _RelayFilter(logging.Filter):
    """Drops ORT's records logged on the root logger after re-logging them on this module's
    logger at INFO level."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.info("onnxruntime: %s", record.getMessage())
        return False


class _RelayHandler(logging.Handler):
    """The same for records of the ``onnxruntime.*`` loggers."""

    def emit(self, record: logging.LogRecord) -> None:
        log.info("onnxruntime: %s", record.getMessage())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep ORT's quantization tools off the terminal: what they print (stdout, and native
    stderr) and log (``logging.warning`` on the root logger, e.g. "Axis 1 is out-of-range for
    weight ...") goes to the ``sdk.quantize`` logger at INFO level (``edgeship -v`` shows it)."""
    root = logging.getLogger()
    ort_logger = logging.getLogger("onnxruntime")
    relay = _RelayFilter()
    relay_handler = _RelayHandler()
    # logging.warning() on a root logger without handlers would install one (basicConfig).
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(relay)
    ort_logger.addHandler(relay_handler)
    propagate = ort_logger.propagate
    ort_logger.propagate = False
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), native_stderr_to_log():
            yield
    finally:
        ort_logger.propagate = propagate
        ort_logger.removeHandler(relay_handler)
        root.removeFilter(relay)
        if placeholder is not None:
            root.removeHandler(placeholder)
        text = buffer.getvalue().strip()
        if text:
            log.debug("onnxruntime.quantization: %s", text)


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 (ORT's ``[E:onnxruntime ...]``
    lines) and log it at INFO level instead of showing it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, closed)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.info("onnxruntime (native): %s", text[-4000:])


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


_ORT_NOISE = (
    re.compile(r"^ONNX Runtime failed to run the model: "),
    re.compile(r"^ONNX Runtime cannot load [^:]+: "),
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"Load model from \S+ failed:\s*"),
)


def strip_prefix(message: str) -> str:
    """ORT's message without the wrapper text and temporary paths that mean nothing to a user."""
    for pattern in _ORT_NOISE:
        message = pattern.sub("", message)
    return message.strip()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = next(ln for ln in text.splitlines() if ln.strip())
    return line[:400]
