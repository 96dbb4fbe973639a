"""A staged rollout: one bundle to a fleet in waves, each gated on model health.

``edgeship deploy bundle/ --fleet greenhouse --broker mqtt://hub:1883`` (no ``--device``) calls
:func:`run_rollout`. The fleet's devices are those with a retained ``status`` on the broker
that are online; they are split into waves (by default one canary, then 10%, 50% and 100% of
the fleet, cumulative; or explicit device lists). Each wave is deployed with
:func:`sdk.deploy.deploy_bundle` (in parallel, each device judging the new model's health
during its probation) and then watched for ``soak_s`` seconds: the wave passes when every
device applied the bundle and no collector raised an alert (``edgeship/{fleet}/alerts``,
warning or critical) for a device running it. Otherwise the wave is rolled back (devices that
applied the bundle are sent ``deploy_revert``) and the rollout halts: no device of a later
wave is touched.

The rollout's state is a JSON file (``state_dir``, one per rollout, written at every change)
and a retained ``edgeship/{fleet}/rollouts`` message (docs/protocol.md), which collectors
store and show. Running the same rollout again (same bundle, same fleet) resumes an aborted or
interrupted one where it stopped; :func:`request_abort` (``edgeship deploy --abort``) or
Ctrl-C stops one at the next device boundary.

::

    from sdk.rollout import run_rollout
    result = run_rollout("bundle/", "mqtt://hub:1883", "greenhouse", soak_s=120)
    print(result.state, result.reason)      # done / halted / aborted
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from device_agent.bundle import load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.bundle import Manifest
from device_agent.contracts.commands import Action, DeployRevert, ProbationArgs
from device_agent.errors import ConfigError, EdgeshipError
from sdk.deploy import DeployResult, deploy_bundle, deploy_id_of, pack_bundle
from sdk.fleet_watch import FleetWatch
from sdk.remote import CommandClient, RemoteError
from sdk.rollout_state import (
    _STATE_VERSION,
    RolloutResult,
    RolloutStateError,
    _counts,
    _load,
    _locked,
    _result,
    _rollout_id,
    _short,
    _State,
    request_abort,
    rollout_state_dir,
)

__all__ = [
    "DEFAULT_WAVES",
    "RolloutResult",
    "RolloutStateError",
    "plan_waves",
    "request_abort",
    "rollout_state_dir",
    "run_rollout",
]

DEFAULT_WAVES: tuple[str, ...] = ("1", "10%", "50%", "100%")


def plan_waves(specs: Sequence[str], devices: Sequence[str]) -> list[list[str]]:
    """Split ``devices`` into waves. Each spec is a count (``1``), a percentage of the fleet
    (``10%``), both cumulative (the wave brings the rollout to that many devices, those of
    earlier lists included), or a comma-separated list of device ids (exactly those; an id
    made of digits alone is written with a comma, ``1001,``). Counted waves take the devices no
    list names, in sorted order; a wave left empty is dropped. ConfigError names a bad spec."""
    known = sorted(set(devices))
    named: set[str] = set()
    parsed: list[tuple[str, Any]] = []
    for spec in specs:
        text = spec.strip()
        if not text:
            raise ConfigError("--wave: an empty wave; give a count, N% or device ids")
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ConfigError(f"--wave {spec!r}: expected N% with 0 < N <= 100") from None
            if not 0 < pct <= 100 or not math.isfinite(pct):
                raise ConfigError(f"--wave {spec!r}: a percentage must be in (0, 100]")
            parsed.append(("pct", pct))
        elif text.isascii() and text.isdigit():
            count = int(text)
            if count < 1:
                raise ConfigError(f"--wave {spec!r}: a count must be at least 1")
            parsed.append(("count", count))
        else:
            ids = [d.strip() for d in text.split(",") if d.strip()]
            for d in ids:
                if d not in known:
                    raise ConfigError(
                        f"--wave {spec!r}: device {d!r} is not an online device of the fleet "
                        f"({len(known)} are: {_names(known, 8)})"
                    )
                if d in named:
                    raise ConfigError(f"--wave {spec!r}: device {d!r} is in two waves")
                named.add(d)
            parsed.append(("ids", ids))
    pool = [d for d in known if d not in named]
    waves: list[list[str]] = []
    placed = 0  # devices in the waves so far, listed or counted
    taken = 0  # of the pool
    for kind, value in parsed:
        if kind == "ids":
            waves.append(list(value))
            placed += len(value)
            continue
        target = value if kind == "count" else math.ceil(len(known) * value / 100)
        more = min(max(0, target - placed), len(pool) - taken)
        if more:
            waves.append(pool[taken : taken + more])
            taken += more
            placed += more
    return waves


def run_rollout(
    bundle: str | Path,
    broker_url: str,
    fleet: str,
    *,
    waves: Sequence[str] = DEFAULT_WAVES,
    soak_s: float = 60.0,
    probation: ProbationArgs | None = None,
    parallel: int = 8,
    timeout_s: float = 300.0,
    state_dir: Path | None = None,
    restart: bool = False,
    settle_s: float = 1.0,
    report: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> RolloutResult:
    """Roll ``bundle`` out to the online devices of ``fleet`` in ``waves`` (see
    :func:`plan_waves`), each deployed with ``probation`` (``timeout_s`` per device) and
    soaked for ``soak_s`` seconds; ``report(line)`` gets one line per step. Setting ``stop``
    (or :func:`request_abort`) aborts at the next device boundary.

    An unfinished rollout of the same bundle to the same fleet (its state file in
    ``state_dir``) is resumed where it stopped, with its own waves; ``restart`` plans it anew
    (devices that already run the bundle answer so and are not sent it again). A halted one is
    only run again with ``restart``; a done one returns at once.

    Raises ConfigError/BundleError for bad input (nothing sent) and BrokerUnavailableError
    when the broker cannot be reached; what the devices did is the result, not an exception.
    """
    say = report or (lambda line: None)
    if not (0 <= soak_s < math.inf and 0 < timeout_s < math.inf and parallel >= 1):
        raise ConfigError("soak must be >= 0, timeout positive (both finite) and parallel >= 1")
    try:
        msg.validate_id(fleet, "fleet")
    except EdgeshipError as exc:
        raise ConfigError(str(exc)) from None
    manifest = load_bundle(bundle).manifest  # verifies the bundle before anything is sent
    deploy_id = deploy_id_of(pack_bundle(bundle))
    rollout_id = _rollout_id(fleet, deploy_id)
    path = (state_dir or rollout_state_dir()) / f"{rollout_id}.json"
    auth = {"username": username, "password": password, "ca_file": ca_file}
    started = time.monotonic()
    with _locked(path):
        state, last_seq = _load(path, restart, rollout_id, deploy_id)
        if state is not None and state.data["state"] == "done":
            say(f"rollout {rollout_id}: already done ({len(state.data['devices'])} devices)")
            return _result(state, fleet, started)
        if state is not None and state.data["state"] == "halted":
            raise ConfigError(
                f"rollout {rollout_id} halted at wave {state.data['wave'] + 1}: "
                f"{state.data['reason']}; add --restart to plan it again "
                f"(state: {path})"
            )
        state_abort = path.with_suffix(".abort")
        state_abort.unlink(missing_ok=True)
        watch = FleetWatch(broker_url, fleet, **auth)
        try:
            if state is None:
                state = _plan_new(
                    watch,
                    path,
                    bundle,
                    fleet,
                    manifest,
                    deploy_id,
                    last_seq,
                    waves=waves,
                    soak_s=soak_s,
                    settle_s=settle_s,
                    say=say,
                )
            else:
                _resume(state, soak_s, say)
            state.data["state"] = "running"
            state.data["reason"] = None
            try:
                state.save()  # before any device is sent anything: a bad --state-dir is input
            except RolloutStateError as exc:
                raise ConfigError(str(exc)) from None
            runner = _Runner(state, watch, broker_url, fleet, bundle, say, stop, auth)
            try:
                runner.run(probation, parallel, timeout_s, soak_s)
            except BaseException as exc:
                runner.interrupted(exc)
                raise
        finally:
            watch.close()
    return _result(state, fleet, started)


def _plan_new(
    watch: FleetWatch,
    path: Path,
    bundle: str | Path,
    fleet: str,
    manifest: Manifest,
    deploy_id: str,
    last_seq: int,
    *,
    waves: Sequence[str],
    soak_s: float,
    settle_s: float,
    say: Callable[[str], None],
) -> _State:
    """A new rollout's state: the fleet's online devices split into ``waves``, all pending."""
    rollout_id = path.stem
    online, offline = watch.online(settle_s)
    if not online:
        raise ConfigError(
            f"no device of fleet {fleet!r} is online (no retained status saying "
            "so on the broker); check --fleet and --broker"
        )
    plan = plan_waves(list(waves), online)
    planned = {d for w in plan for d in w}
    if len(planned) > msg.MAX_ROLLOUT_DEVICES:
        raise ConfigError(
            f"{len(planned)} devices in one rollout, over the limit of "
            f"{msg.MAX_ROLLOUT_DEVICES}; roll out per --wave lists"
        )
    state = _State(
        path,
        {
            "version": _STATE_VERSION,
            "id": rollout_id,
            "fleet": fleet,
            "bundle": str(Path(bundle).resolve()),
            "deploy": deploy_id,
            "model": manifest.model.name,
            "model_version": manifest.model.version,
            "started": time.time(),
            "seq": last_seq,
            "state": "running",
            "wave": 0,
            "waves": plan,
            "devices": dict.fromkeys(sorted(planned), "pending"),
            "reasons": {},
            "soak_s": float(soak_s),
            "reason": None,
        },
    )
    sizes = ", ".join(str(len(w)) for w in plan)
    say(
        f"rollout {rollout_id}: {manifest.model.name} v{manifest.model.version} to "
        f"{len(planned)} devices of fleet {fleet} in {len(plan)} waves ({sizes}), "
        f"soak {soak_s:g} s"
    )
    left_out = len(online) - len(planned)
    if offline or left_out:
        say(
            f"  not in this rollout: {len(offline)} offline"
            + (f" ({', '.join(offline[:5])})" if offline else "")
            + (f", {left_out} online in no wave" if left_out else "")
        )
    return state


def _resume(state: _State, soak_s: float, say: Callable[[str], None]) -> None:
    """Take up a saved rollout where it stopped (the soak given now applies)."""
    d = state.data
    rollout_id = d["id"]
    d["soak_s"] = float(soak_s)
    applied = sum(1 for s in d["devices"].values() if s == "applied")
    say(
        f"rollout {rollout_id}: resuming at wave {d['wave'] + 1} of "
        f"{len(d['waves'])} ({applied} of {len(d['devices'])} devices applied)"
    )


class _Runner:
    """The waves, one after the other, for :func:`run_rollout`."""

    def __init__(
        self,
        state: _State,
        watch: FleetWatch,
        broker_url: str,
        fleet: str,
        bundle: str | Path,
        say: Callable[[str], None],
        stop: threading.Event | None,
        auth: dict[str, Any],
    ) -> None:
        self.state, self.watch = state, watch
        self.broker_url, self.fleet, self.bundle = broker_url, fleet, bundle
        self.say, self.stop, self.auth = say, stop or threading.Event(), auth
        # device -> when the rollout started sending it the bundle (alerts after count)
        self.since: dict[str, float] = {}
        self._publishing = threading.Lock()
        self.blamed: set[str] = set()  # devices of earlier waves an alert named

    # --- state --------------------------------------------------------------------------

    def _set(self, device: str | None = None, dstate: str | None = None, **fields: Any) -> None:
        # One change at a time, published in seq order: the retained message is the latest.
        with self._publishing:
            with self.state.lock:
                if device is not None and dstate is not None:
                    self.state.data["devices"][device] = dstate
                for key, value in fields.items():
                    self.state.data[key] = _short(value) if key == "reason" and value else value
                event = self.state.event()
                self.state.save()
            try:
                self.watch.publish(event)
            except EdgeshipError as exc:  # never lose the rollout over its announcement
                self.say(f"  (could not publish the rollout's state: {exc})")

    def _aborting(self) -> bool:
        if self.state.abort_file.exists():
            self.stop.set()
        return self.stop.is_set()

    # --- the waves ----------------------------------------------------------------------

    def run(
        self, probation: ProbationArgs | None, parallel: int, timeout_s: float, soak_s: float
    ) -> None:
        d = self.state.data
        # Devices already on the bundle (earlier waves) are watched for alerts from now on.
        now = time.time()
        for device, dstate in d["devices"].items():
            if dstate == "applied":
                self.since[device] = now
        self._set()
        while d["wave"] < len(d["waves"]):
            index = d["wave"]
            wave = d["waves"][index]
            label = f"wave {index + 1}/{len(d['waves'])}"
            if self._aborting():
                return self._abort(label)
            self.say(f"{label}: {len(wave)} device(s): {_names(wave)}")
            self._skip_offline(wave, label)
            failure = self._deploy_wave(wave, label, probation, parallel, timeout_s)
            if failure is None:
                failure = self._soak(wave, label, soak_s)
            if failure == "aborted":
                return self._abort(label)
            if failure is not None:
                return self._halt(wave, label, failure)
            last = index + 1 == len(d["waves"])
            self._set(wave=index + 1, **({"state": "done"} if last else {}))
        counts = _counts(d["devices"])
        skipped = counts.get("skipped", 0)
        self.say(
            f"done: {counts.get('applied', 0)} of {len(d['devices'])} devices applied the bundle"
            + (f"; {skipped} skipped (offline when their wave came)" if skipped else "")
        )
        return None

    def _skip_offline(self, wave: list[str], label: str) -> None:
        """Devices of ``wave`` whose retained status now says offline are skipped, not sent
        the bundle (their Last Will arrived after the rollout was planned)."""
        statuses = dict(self.watch.statuses)
        for device in wave:
            status = statuses.get(device)
            gone = status is None or status.state != "online"
            if gone and self.state.data["devices"][device] in ("pending", "skipped"):
                with self.state.lock:
                    self.state.data["reasons"][device] = f"offline when {label} started"
                self._set(device, "skipped")
                self.say(f"  {device}: skipped (offline)")

    def interrupted(self, exc: BaseException) -> None:
        """The rollout stopped on an exception (a second Ctrl-C, a state that cannot be
        written, a bug): say so in its retained message, if the broker still takes it."""
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped: {exc}"
        with contextlib.suppress(Exception):
            with self.state.lock:
                self.state.data["state"] = "aborted"
                self.state.data["reason"] = _short(why)
                event = self.state.event()
            with contextlib.suppress(RolloutStateError):
                self.state.save()
            self.watch.publish(event)

    def _deploy_wave(
        self,
        wave: list[str],
        label: str,
        probation: ProbationArgs | None,
        parallel: int,
        timeout_s: float,
    ) -> str | None:
        """Deploy to every device of ``wave`` not yet on the bundle; None when all applied it,
        "aborted", or the first failure's line."""
        todo = [
            dev for dev in wave if self.state.data["devices"][dev] not in ("applied", "skipped")
        ]
        failures: list[str] = []

        def one(device: str) -> None:
            if self._aborting():
                return
            self.since.setdefault(device, time.time())
            self._set(device, "deploying")
            try:
                result = deploy_bundle(
                    self.bundle,
                    self.broker_url,
                    self.fleet,
                    device,
                    timeout_s=timeout_s,
                    probation=probation,
                    **self.auth,
                )
            except RemoteError as exc:
                self._device_done(device, "unreachable", str(exc), failures, label)
                return
            self._device_done(device, _device_state(result), _line(result), failures, label)

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(one, dev) for dev in todo]
            for future in futures:
                while True:
                    try:
                        future.result(timeout=0.2)
                        break
                    except TimeoutError:
                        if self.state.abort_file.exists():
                            self.stop.set()
        if failures:
            return failures[0]
        if any(self.state.data["devices"][dev] not in ("applied", "skipped") for dev in wave):
            return "aborted"
        return None

    def _device_done(
        self, device: str, dstate: str, line: str, failures: list[str], label: str
    ) -> None:
        line = _short(line)
        with self.state.lock:
            self.state.data["reasons"][device] = line
        self._set(device, dstate)
        self.say(f"  {device}: {dstate.replace('_', ' ')} ({line})")
        if dstate != "applied":
            failures.append(f"{device} {dstate.replace('_', ' ')}: {line}")

    def _soak(self, wave: list[str], label: str, soak_s: float) -> str | None:
        """Watch alerts for ``soak_s`` seconds; the first gating one's line, or None."""
        if soak_s > 0:
            self.say(f"{label}: all applied; soaking {soak_s:g} s, watching the fleet's alerts")
        deadline = time.monotonic() + soak_s
        while True:
            alert = self.watch.gating_alert(self.since)
            if alert is not None:
                self.blamed.add(alert.device or "")
                return (
                    f"{alert.severity} alert {alert.rule!r} on {alert.device} during the "
                    f"soak: {alert.summary}"
                )
            if self._aborting():
                return "aborted"
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _halt(self, wave: list[str], label: str, failure: str) -> None:
        """Take the bundle back from every device of ``wave`` that was sent it (and from an
        earlier wave's device an alert named), then halt."""
        self.say(f"{label} failed: {failure}")
        devices = self.state.data["devices"]
        sent = [d for d in wave if devices[d] not in ("pending", "skipped", "rolled_back")]
        earlier = sorted(d for d in self.blamed if d in devices and d not in wave)
        for device in [*sent, *earlier]:
            dstate, line = self._revert(device, failure)
            with self.state.lock:
                self.state.data["reasons"][device] = _short(line)
            self._set(device, dstate)
            self.say(f"  {device}: {line}")
        where = f"{label} and {', '.join(earlier)}" if earlier else label
        self._set(state="halted", reason=f"{label} failed: {failure}")
        self.say(f"halted: no device outside {where} was touched")

    def _revert(self, device: str, failure: str) -> tuple[str, str]:
        """Send ``deploy_revert``; the device's state in the rollout afterwards, and why."""
        before = self.state.data["devices"][device]
        deploy = self.state.data["deploy"]
        why = f"rollout {self.state.data['id']} halted: {failure}"
        try:
            with CommandClient(self.broker_url, self.fleet, device, **self.auth) as client:
                reply = client.call(
                    Action.DEPLOY_REVERT,
                    DeployRevert(deploy, why[:200]).to_args(),
                    timeout_s=60,
                )
                if reply.ok:
                    result = reply.result if isinstance(reply.result, dict) else {}
                    return "reverted", f"reverted to v{result.get('from_version')}"
                # Refused: it may not run the bundle at all (refused it, rolled it back).
                status = client.call(Action.DEPLOY_STATUS, {"deploy": deploy}, timeout_s=30)
        except RemoteError as exc:
            return "unreachable", f"NOT reverted: {exc}"
        known = (
            status.result.get("state") if status.ok and isinstance(status.result, dict) else None
        )
        if known in ("applied", "probation"):
            return "applied", f"NOT reverted: {reply.error}"
        kept = before if before in ("failed", "rolled_back") else "reverted"
        return kept, f"does not run the bundle ({known or 'unknown to it'}): {reply.error}"

    def _abort(self, label: str) -> None:
        self.state.abort_file.unlink(missing_ok=True)
        self._set(state="aborted", reason=f"aborted by the operator at {label}")
        self.say(f"aborted at {label}; run the same command again to resume")


def _device_state(result: DeployResult) -> str:
    if result.state in ("applied", "rolled_back", "failed"):
        return result.state
    return "failed"  # still on probation when its time was up: not a verdict


def _line(result: DeployResult) -> str:
    if result.state == "probation":
        return "no verdict within the deploy's timeout"
    return result.reason or result.state


def _names(devices: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(devices[:limit])
    return shown + (f" ... (+{len(devices) - limit})" if len(devices) > limit else "")
