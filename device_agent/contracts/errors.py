"""The exception tree shared by the agent, the SDK and the collector.

It lives with the contracts because the wire's own checks raise it (a manifest that does not
parse is a :class:`BundleError`, a message that breaks the protocol a :class:`ProtocolError`),
so a third party that imports a contract module gets the errors it may catch and nothing else.
``device_agent.errors`` re-exports every name: import from either.

Every error edgeship raises on purpose derives from :class:`EdgeshipError`, and its
message says what to fix. Errors from ONNX Runtime, LiteRT, paho-mqtt and friends are
converted where they are caught (``raise BundleError(...) from exc``), so callers never
need to know which library failed.

::

    EdgeshipError
    ├── ConfigError          a setting, option or string the user gave is invalid
    ├── InputError           inference inputs do not match the model (name, dtype, shape)
    ├── BundleError          a bundle cannot be read or is malformed
    │   ├── IntegrityError   a bundle file does not match the hash in its manifest
    │   └── SignatureError   a bundle is unsigned, signed by an untrusted key, or its
    │                        signature does not verify (with trusted_keys configured)
    ├── RuntimeLoadError     the runtime could not load or run a model
    ├── ProtocolError        an MQTT topic or message breaks the wire contract
    └── (sdk.errors adds ExportError, QuantizationError, DataError, ModelFormatError,
         BenchmarkError)
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "EdgeshipError",
    "InputError",
    "IntegrityError",
    "ProtocolError",
    "RuntimeLoadError",
    "SignatureError",
]


class EdgeshipError(Exception):
    """Root of every error edgeship raises deliberately."""


class ConfigError(EdgeshipError):
    """A setting, option or string given by the user is invalid."""


class InputError(EdgeshipError, ValueError):
    """Inference inputs do not match the model's input spec."""


class BundleError(EdgeshipError):
    """A bundle cannot be read, or its manifest is malformed."""


class IntegrityError(BundleError):
    """A bundle file is missing or does not match the SHA-256 in the manifest."""

    def __init__(self, message: str, *, file: str) -> None:
        super().__init__(message)
        self.file = file


class SignatureError(BundleError):
    """A bundle's signature is missing, by a key that is not trusted, or does not verify."""


class RuntimeLoadError(EdgeshipError):
    """ONNX Runtime or LiteRT could not load or run the model."""


class ProtocolError(EdgeshipError):
    """An MQTT topic or message payload does not follow the wire contract.

    ``field`` names the offending part (``"payload"``, ``"topic"``, ``"latency_ms.counts[3]"``)
    so that a collector can count rejections by cause.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field
