"""The state file of a staged rollout (:mod:`sdk.rollout`): where it lives, its lock, how it is
read back and checked, :class:`RolloutResult` (what a state comes to), and
:func:`request_abort` for a rollout running in another process.

The file is JSON, one per rollout (``{id}.json`` in :func:`rollout_state_dir`), written
atomically at every change; ``{id}.lock`` is held while a process runs the rollout and
``{id}.abort`` asks that process to stop at its next device boundary.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.contracts import messages as msg
from device_agent.contracts.errors import ProtocolError
from device_agent.errors import ConfigError, EdgeshipError
from sdk.deploy import deploy_id_of, pack_bundle

__all__ = ["RolloutResult", "RolloutStateError", "request_abort", "rollout_state_dir"]

_STATE_VERSION = 1
_MAX_REASON = 1000  # characters of a reason kept in the state and its message


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class RolloutStateError(EdgeshipError):
    """The rollout's state file could not be written once devices had been sent the bundle:
    the rollout stopped there (exit 1); the devices' states are in its last message."""


@dataclass(frozen=True)
class RolloutResult:
    """What became of a rollout: ``state`` is ``done`` (every device applied the bundle, or
    was skipped as offline when its wave came),
    ``halted`` (a wave failed and was rolled back; ``reason`` names the device and the line)
    or ``aborted`` (stopped by the operator; running it again resumes it)."""

    id: str
    fleet: str
    state: str
    reason: str | None
    waves: list[list[str]]
    devices: dict[str, str]
    reasons: dict[str, str]
    state_file: Path
    seconds: float

    @property
    def ok(self) -> bool:
        """Done, and every device applied the bundle (none skipped as offline)."""
        return self.state == "done" and all(s == "applied" for s in self.devices.values())

    def counts(self) -> dict[str, int]:
        return _counts(self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fleet": self.fleet,
            "state": self.state,
            "reason": self.reason,
            "waves": self.waves,
            "devices": self.devices,
            "reasons": self.reasons,
            "counts": self.counts(),
            "state_file": str(self.state_file),
            "seconds": self.seconds,
        }


def rollout_state_dir() -> Path:
    """Where rollouts keep their state: ``$EDGESHIP_STATE_DIR/rollouts``, else
    ``$XDG_STATE_HOME/edgeship/rollouts``, else ``~/.local/state/edgeship/rollouts``. State,
    not a cache: deleting it forgets how far a rollout got."""
    own = os.environ.get("EDGESHIP_STATE_DIR")
    if own:
        return Path(own).expanduser() / "rollouts"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "edgeship" / "rollouts"


def _rollout_id(fleet: str, deploy_id: str) -> str:
    return "r" + hashlib.sha256(f"{fleet}/{deploy_id}".encode()).hexdigest()[:15]


def request_abort(fleet: str, bundle: str | Path, state_dir: Path | None = None) -> Path:
    """Ask the rollout of ``bundle`` to ``fleet``, running in another process, to stop at its
    next device boundary. Returns its state file; ConfigError when there is no such rollout or
    none is running (an interrupted one stays as it is: running it again resumes it)."""
    deploy_id = deploy_id_of(pack_bundle(bundle))
    path = (state_dir or rollout_state_dir()) / f"{_rollout_id(fleet, deploy_id)}.json"
    if not path.is_file():
        raise ConfigError(f"no rollout of {bundle} to fleet {fleet!r} in {path.parent}")
    try:
        with _locked(path):
            running = False
    except ConfigError:
        running = True  # the lock is held: a process runs it
    if not running:
        raise ConfigError(
            f"rollout {path.stem} is not running now, so there is nothing to stop (state: "
            f"{path}); run the same deploy command to resume it"
        )
    path.with_suffix(".abort").write_text(str(time.time()))
    return path


@dataclass
class _State:
    """The rollout's state file, written atomically after every change."""

    path: Path
    data: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def save(self) -> None:
        """Write the state (the first write comes before any device is sent anything)."""
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise RolloutStateError(
                f"cannot write the rollout's state {self.path}: {exc}; the rollout stopped"
            ) from exc

    @property
    def abort_file(self) -> Path:
        return self.path.with_suffix(".abort")

    def event(self) -> msg.RolloutEvent:
        """The rollout's state as its next retained message (``seq`` counts up)."""
        d = self.data
        d["seq"] += 1
        return msg.RolloutEvent(
            id=d["id"],
            seq=d["seq"],
            ts=time.time(),
            started=d["started"],
            state=d["state"],
            deploy=d["deploy"],
            wave=d["wave"],
            waves=tuple(tuple(w) for w in d["waves"]),
            devices=dict(d["devices"]),
            model=d["model"],
            model_version=d["model_version"],
            soak_s=d["soak_s"],
            reason=d["reason"],
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(
            f"cannot keep the rollout's state in {path.parent}: {exc} (see --state-dir)"
        ) from exc
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"rollout {path.stem} is being run by another edgeship process (lock "
                f"{path.with_suffix('.lock')}); stop it first or wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load(path: Path, restart: bool, rollout_id: str, deploy_id: str) -> tuple[_State | None, int]:
    """The rollout's saved state (None: plan it anew) and the last ``seq`` it published (a
    restarted rollout keeps counting, so subscribers take its messages as the newest)."""
    if not path.is_file():
        return None, 0
    try:
        data = json.loads(path.read_text())
        _check_state(data, rollout_id, deploy_id)
    except (OSError, ValueError, TypeError, ProtocolError) as exc:
        if restart:
            return None, _old_seq(path)
        raise ConfigError(
            f"rollout state {path} cannot be used ({exc}); add --restart to plan the rollout anew"
        ) from None
    if restart:
        return None, int(data["seq"])
    return _State(path, data), int(data["seq"])


def _old_seq(path: Path) -> int:
    try:
        seq = json.loads(path.read_text()).get("seq")
    except (OSError, ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0


def _check_state(data: Any, rollout_id: str, deploy_id: str) -> None:
    """ValueError unless ``data`` is a consistent state of this rollout: the same rules as its
    message (waves, one state per device, the wave index), plus the file's own fields."""
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise ValueError("not a rollout state of this version")
    if data.get("id") != rollout_id or data.get("deploy") != deploy_id:
        raise ValueError("it belongs to another rollout")
    reasons = data.get("reasons")
    if not isinstance(reasons, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in reasons.items()
    ):
        raise ValueError("'reasons' must map device ids to lines")
    event = msg.RolloutEvent.from_dict({**data, "ts": time.time()})
    done = event.wave == len(event.waves)
    if done != (event.state == "done") or (
        done and any(s not in ("applied", "skipped") for s in event.devices.values())
    ):
        raise ValueError(f"state {event.state!r} at wave {event.wave} does not add up")


def _result(state: _State, fleet: str, started: float) -> RolloutResult:
    d = state.data
    return RolloutResult(
        id=d["id"],
        fleet=fleet,
        state=d["state"],
        reason=d["reason"],
        waves=[list(w) for w in d["waves"]],
        devices=dict(d["devices"]),
        reasons=dict(d["reasons"]),
        state_file=state.path,
        seconds=time.monotonic() - started,
    )


def _counts(devices: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in devices.values():
        out[state] = out.get(state, 0) + 1
    return out
