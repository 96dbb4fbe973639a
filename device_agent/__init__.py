"""edgeship's device agent: runs a verified bundle on the board with ONNX Runtime or LiteRT.

It depends on numpy, paho-mqtt and one runtime, never on torch or the SDK.
"""

from __future__ import annotations

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
