"""How the agent runs: :class:`AgentConfig`, the settings shared by the agent, its model slot and
its deploy code (a module of its own so that none of them imports another for it)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.contracts import messages as msg
from device_agent.errors import ConfigError, ProtocolError

__all__ = ["AgentConfig"]


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0] or "device"
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)[:64]
    return cleaned or "device"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "edgeship"


@dataclass(frozen=True)
class AgentConfig:
    """How the agent runs. Every field can also come from ``agent.toml`` or the environment
    (see :mod:`device_agent.config`).

    ``broker_url`` None runs without MQTT (inference and scoring only). ``window_s`` is the
    telemetry window. Outlier events are limited to ``outlier_events_per_min`` (a token bucket;
    the next event reports how many were held back). With ``trusted_keys`` (Ed25519 public key
    files) only bundles signed by one of those keys are loaded; ``model_key_file`` holds the
    AES-256 key of encrypted models (see ``docs/security.md``). A bundle deployed over MQTT
    (:mod:`device_agent.deploy`) is on probation for ``deploy_probation_inferences`` calls
    (0: applied at once; at least the probation's ``min_calls``) or its time limit, judged on
    model health (:mod:`device_agent.probation`, docs/agent.md "Probation"), and may be at most
    ``deploy_max_bytes``. A candidate model sent to be timed (:mod:`device_agent.candidates`)
    may be at most ``candidate_max_bytes``; at most ``candidate_keep`` are kept, none longer
    than ``candidate_ttl_s`` seconds.
    """

    device_id: str = field(default_factory=_default_device_id)
    fleet: str = "default"
    broker_url: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_protocol: str = "auto"
    state_dir: Path | str = field(default_factory=_default_state_dir)
    spool_max_bytes: int = 32 * 2**20
    window_s: float = 10.0
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    outlier_events_per_min: float = 60.0
    input_sample_values: int = 0
    sysinfo_root: str = "/"
    trusted_keys: tuple[str, ...] = ()
    model_key_file: str | None = None
    deploy_probation_inferences: int = 20
    deploy_max_bytes: int = 256 * 2**20
    candidate_max_bytes: int = 256 * 2**20
    candidate_keep: int = 2
    candidate_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        # Accept a str for convenience; the field is always a Path afterwards.
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())
        for value, what in ((self.device_id, "device_id"), (self.fleet, "fleet")):
            try:
                msg.validate_id(value, what)
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from exc
        if self.window_s <= 0:
            raise ConfigError(f"window_s must be positive, got {self.window_s}")
        if self.spool_max_bytes < 64 * 1024:
            raise ConfigError(
                f"spool_max_bytes must be at least 64 KiB, got {self.spool_max_bytes}"
            )
        if self.outlier_events_per_min < 0:
            raise ConfigError("outlier_events_per_min must not be negative")
        if self.deploy_probation_inferences < 0:
            raise ConfigError("deploy_probation_inferences must not be negative")
        if self.candidate_max_bytes < 1024:
            raise ConfigError(
                f"candidate_max_bytes must be at least 1 KiB, got {self.candidate_max_bytes}"
            )
        if self.candidate_keep < 1:
            raise ConfigError(f"candidate_keep must be at least 1, got {self.candidate_keep}")
        if not self.candidate_ttl_s > 0:
            raise ConfigError(f"candidate_ttl_s must be positive, got {self.candidate_ttl_s}")
        if self.deploy_max_bytes < 1024:
            raise ConfigError(
                f"deploy_max_bytes must be at least 1 KiB, got {self.deploy_max_bytes}"
            )
