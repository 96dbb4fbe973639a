"""The exception tree shared by the agent, the SDK and the collector: every error edgeship
raises on purpose derives from :class:`EdgeshipError`. Defined in
:mod:`device_agent.contracts.errors` (the wire's own checks raise it, and importing a contract
must load no agent module); this module is the name the rest of the code imports it by.
"""

from __future__ import annotations

from device_agent.contracts.errors import (
    BundleError,
    ConfigError,
    EdgeshipError,
    InputError,
    IntegrityError,
    ProtocolError,
    RuntimeLoadError,
    SignatureError,
)

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
