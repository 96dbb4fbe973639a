"""edgeship's device agent: runs a verified bundle on the board with ONNX Runtime or LiteRT.

It depends on numpy, paho-mqtt and one runtime, never on torch or the SDK.

The names below are loaded on first use (PEP 562 ``__getattr__``), so ``import device_agent``
and ``import device_agent.contracts.messages`` load no other module of the package: a
collector or a third-party subscriber that needs only the wire format gets the wire format,
not the agent, its runtimes and numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from device_agent._version import __version__
    from device_agent.agent import Agent, AgentConfig, Prediction
    from device_agent.bundle import Bundle, load_bundle
    from device_agent.contracts.bundle import IOSpec, Manifest, TensorSpec
    from device_agent.errors import (
        BundleError,
        ConfigError,
        EdgeshipError,
        InputError,
        IntegrityError,
        RuntimeLoadError,
        SignatureError,
    )
    from device_agent.runtime import ModelSession, open_session

__all__ = [
    "Agent",
    "AgentConfig",
    "Bundle",
    "BundleError",
    "ConfigError",
    "EdgeshipError",
    "IOSpec",
    "InputError",
    "IntegrityError",
    "Manifest",
    "ModelSession",
    "Prediction",
    "RuntimeLoadError",
    "SignatureError",
    "TensorSpec",
    "__version__",
    "load_bundle",
    "open_session",
]

# exported name -> the module that defines it
_WHERE = {
    "__version__": "device_agent._version",
    "Agent": "device_agent.agent",
    "AgentConfig": "device_agent.agent",
    "Prediction": "device_agent.agent",
    "Bundle": "device_agent.bundle",
    "load_bundle": "device_agent.bundle",
    "IOSpec": "device_agent.contracts.bundle",
    "Manifest": "device_agent.contracts.bundle",
    "TensorSpec": "device_agent.contracts.bundle",
    "BundleError": "device_agent.errors",
    "ConfigError": "device_agent.errors",
    "EdgeshipError": "device_agent.errors",
    "InputError": "device_agent.errors",
    "IntegrityError": "device_agent.errors",
    "RuntimeLoadError": "device_agent.errors",
    "SignatureError": "device_agent.errors",
    "ModelSession": "device_agent.runtime",
    "open_session": "device_agent.runtime",
}


def __getattr__(name: str) -> Any:
    """Load an exported name's module on first use and keep the name here for the next one."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
