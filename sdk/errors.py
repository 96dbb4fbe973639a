"""Errors raised by the host SDK.

All derive from :class:`device_agent.errors.EdgeshipError`, the root shared with the agent,
so ``except EdgeshipError`` catches every deliberate edgeship failure. The CLI prints their
message on one line and exits with code 2.

::

    EdgeshipError (device_agent.errors)
    ├── ConfigError, InputError, BundleError, IntegrityError, SignatureError, RuntimeLoadError
    ├── DataError           calibration/eval data missing, unreadable, or not matching the model
    ├── ModelFormatError    a model file is missing, truncated, corrupt or of an unknown format
    ├── ExportError         a PyTorch export failed or diverged from PyTorch
    ├── QuantizationError   a quantizer failed; the message names the step (and node if known)
    └── BenchmarkError      a benchmark worker process failed
"""

from __future__ import annotations

from device_agent.errors import (
    BundleError,
    ConfigError,
    EdgeshipError,
    InputError,
    IntegrityError,
    RuntimeLoadError,
    SignatureError,
)

__all__ = [
    "BenchmarkError",
    "BundleError",
    "ConfigError",
    "DataError",
    "EdgeshipError",
    "ExportError",
    "InputError",
    "IntegrityError",
    "ModelFormatError",
    "QuantizationError",
    "RuntimeLoadError",
    "SignatureError",
]


class DataError(EdgeshipError):
    """Calibration or evaluation data is missing, unreadable, or does not match the model."""


class ModelFormatError(EdgeshipError):
    """A model file is missing, truncated, corrupt, or in a format edgeship cannot read."""


class ExportError(EdgeshipError):
    """Exporting a PyTorch model failed, or the export's outputs diverge from PyTorch."""


class QuantizationError(EdgeshipError):
    """Quantization failed; the message names the step and, when known, the node."""


class BenchmarkError(EdgeshipError):
    """A benchmark worker process failed to load or run a model."""
