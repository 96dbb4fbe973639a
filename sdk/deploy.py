"""Deploying a bundle to a device over MQTT: pack, send in chunks, commit, wait for the verdict.

``edgeship deploy bundle/ --device pi-07 --broker mqtt://hub:1883`` calls
:func:`deploy_bundle`. The device's side (staging, verification, the atomic swap, probation
and rollback) is :mod:`device_agent.deploy`; the actions and their arguments are the types
of :mod:`device_agent.contracts.commands`, documented in docs/agent.md.

::

    from sdk.deploy import deploy_bundle
    result = deploy_bundle("bundle/", "mqtt://hub:1883", "greenhouse", "pi-07")
    if not result.ok:
        print(result.state, result.reason)    # rolled_back / failed, and why
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import math
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_agent.bundle import load_bundle
from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.contracts.commands import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    Action,
    DeployBegin,
    DeployChunk,
    DeployRef,
    ProbationArgs,
)
from device_agent.errors import ConfigError
from sdk.remote import CommandClient, RemoteError

__all__ = ["DeployResult", "deploy_bundle", "deploy_id_of", "pack_bundle"]

# Optional files that travel with a bundle without being listed in its manifest.
_UNLISTED = ("signature.json",)
_FINAL = ("applied", "rolled_back", "failed")


@dataclass(frozen=True)
class DeployResult:
    """What became of a deploy. ``state`` is ``applied`` (the bundle runs and passed its
    probation), ``probation`` (it runs, the probation was not over when we stopped waiting),
    ``rolled_back`` (it ran and failed; the previous bundle runs again) or ``failed`` (the
    device refused it before the swap). ``reason`` says why for the last two."""

    deploy_id: str
    device: str
    state: str
    from_version: str | None
    to_version: str | None
    reason: str | None
    archive_bytes: int
    chunks: int
    chunks_sent: int
    seconds: float
    inputs_changed: bool | None = None

    @property
    def ok(self) -> bool:
        return self.state == "applied"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pack_bundle(path: str | Path) -> bytes:
    """The bundle at ``path``, verified, as a gzipped tar: its manifest, the files the manifest
    lists and its signature if it has one, nothing else. The same bundle gives the same bytes
    (sorted names, zero times and owners), so a resumed deploy can reuse chunks."""
    bundle = load_bundle(path)
    names = [MANIFEST_NAME, *sorted(bundle.manifest.files)]
    names += [n for n in _UNLISTED if (bundle.root / n).is_file()]
    buf = io.BytesIO()
    # mtime=0 in the gzip header too, or the same bundle packs to different bytes each second.
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in names:
            data = (bundle.root / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deploy_id_of(archive: bytes) -> str:
    """The deploy id of a packed bundle: its hash, so deploying the same bytes again after an
    interruption resumes the upload instead of starting over."""
    return f"d{hashlib.sha256(archive).hexdigest()[:24]}"


@dataclass
class _Upload:
    """One deploy on its way: the archive, its id and chunking, and what was sent."""

    archive: bytes
    deploy_id: str
    digest: str
    chunk_bytes: int
    total: int
    device: str
    model: str
    to_version: str
    started: float
    sent: int = 0

    def chunk(self, index: int) -> DeployChunk:
        data = self.archive[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
        return DeployChunk(
            deploy=self.deploy_id,
            index=index,
            data=base64.b64encode(data).decode("ascii"),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def result(self, state: str, reply: dict[str, Any] | None, reason: str | None) -> DeployResult:
        r = reply or {}
        return DeployResult(
            deploy_id=self.deploy_id,
            device=self.device,
            state=state,
            from_version=r.get("from_version"),
            to_version=r.get("to_version", self.to_version),
            reason=reason if reason is not None else r.get("reason"),
            archive_bytes=len(self.archive),
            chunks=self.total,
            chunks_sent=self.sent,
            seconds=time.monotonic() - self.started,
            inputs_changed=r.get("inputs_changed"),
        )


_Call = Callable[[Action, dict[str, Any]], tuple[bool, Any, str | None]]


def _caller(
    client: CommandClient,
    device: str,
    deadline: float,
    timeout_s: float,
    call_timeout_s: float,
    attempts: int,
) -> _Call:
    """``call(action, args)``: the device's (ok, result, error), each command sent again when
    it gets no answer within ``call_timeout_s`` (the device handles repeats idempotently), up
    to ``attempts`` times and within the deploy's deadline; RemoteError when it never answers."""

    def call(action: Action, args: dict[str, Any]) -> tuple[bool, Any, str | None]:
        for attempt in range(1, attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = client.call(action, args, timeout_s=min(call_timeout_s, left))
            except RemoteError:
                if attempt == attempts or deadline - time.monotonic() <= 0:
                    raise
                continue
            return reply.ok, reply.result, reply.error
        raise RemoteError(
            f"device {device!r} did not finish {action.value!r} within the deploy's "
            f"{timeout_s:g} s timeout"
        )

    return call


def _send_chunks(
    call: _Call,
    upload: _Upload,
    todo: list[int],
    done: int,
    window: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, str] | None:
    """Send the chunks ``todo``, up to ``window`` in flight: a command's round trip (broker,
    the device's reply spool) costs tens of milliseconds, more than the device takes to store
    a chunk. None when all were stored, else the first refused chunk and why."""

    def send(index: int) -> tuple[int, bool, str | None]:
        ok, _, error = call(Action.DEPLOY_CHUNK, upload.chunk(index).to_args())
        return index, ok, error

    with ThreadPoolExecutor(max_workers=max(1, window)) as pool:
        pending = {pool.submit(send, i) for i in todo[:window]}
        queued = iter(todo[window:])
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index, ok, error = future.result()
                if not ok:
                    for other in pending:
                        other.cancel()
                    return index, str(error)
                upload.sent += 1
                done += 1
                if progress is not None:
                    progress(done, upload.total)
                nxt = next(queued, None)
                if nxt is not None:
                    pending.add(pool.submit(send, nxt))
    return None


def _pack(bundle: str | Path, device: str, chunk_bytes: int) -> _Upload:
    """Pack ``bundle`` and plan its chunks; ConfigError when they are more than a device
    takes."""
    started = time.monotonic()
    archive = pack_bundle(bundle)
    model = load_bundle(bundle, verify=False).manifest.model
    digest = hashlib.sha256(archive).hexdigest()
    total = math.ceil(len(archive) / chunk_bytes)
    if total > MAX_CHUNKS:
        raise ConfigError(
            f"the packed bundle is {len(archive)} bytes: {total} chunks of {chunk_bytes} bytes, "
            f"over the device's limit of {MAX_CHUNKS}; use chunk_bytes of at least "
            f"{math.ceil(len(archive) / MAX_CHUNKS)} (at most {MAX_CHUNK_BYTES})"
        )
    return _Upload(
        archive=archive,
        deploy_id=deploy_id_of(archive),
        digest=digest,
        chunk_bytes=chunk_bytes,
        total=total,
        device=device,
        model=model.name,
        to_version=model.version,
        started=started,
    )


def deploy_bundle(
    bundle: str | Path,
    broker_url: str,
    fleet: str,
    device: str,
    *,
    timeout_s: float = 300.0,
    wait_probation: bool = True,
    chunk_bytes: int = MAX_CHUNK_BYTES,
    call_timeout_s: float = 30.0,
    attempts: int = 3,
    window: int = 8,
    progress: Callable[[int, int], None] | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    probation: ProbationArgs | None = None,
) -> DeployResult:
    """Send ``bundle`` to ``device`` and wait for the outcome (at most ``timeout_s`` in all).

    A device that already runs this bundle (the same bytes) answers ``applied`` without
    anything being sent, and one judging it now is waited for. Chunks the device already has
    (an interrupted deploy of the same bytes) are not sent again; up to ``window`` chunks are
    in flight at once. Each command that gets no answer within ``call_timeout_s`` is sent
    again, up to ``attempts`` times; the device handles repeats idempotently.
    ``progress(sent, total)`` is called after each chunk. With ``wait_probation`` the result
    waits for the device's verdict on its first inferences, else it returns once the bundle is
    swapped in (``probation``).
    ``probation`` sets how long the device judges the new bundle's model health and its limits
    (docs/agent.md, "Probation"; None: the device's defaults).

    Raises :class:`ConfigError`/:class:`BundleError` for a bad bundle or argument and
    :class:`RemoteError` when the device does not answer; a device that refuses or rolls back
    the bundle is a result, not an exception.
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}"
        )
    if not (0 < timeout_s < math.inf and 0 < call_timeout_s < math.inf and attempts >= 1):
        raise ConfigError(
            "timeout_s and call_timeout_s must be positive finite numbers and attempts >= 1"
        )
    upload = _pack(bundle, device, chunk_bytes)
    deadline = upload.started + timeout_s
    with CommandClient(
        broker_url, fleet, device, username=username, password=password, ca_file=ca_file
    ) as client:
        call = _caller(client, device, deadline, timeout_s, call_timeout_s, attempts)
        ref = DeployRef(upload.deploy_id).to_args()
        # Already there (a deploy resumed after its answer was lost, a rollout resumed after
        # an abort): say so instead of sending it again. An agent that never heard of the id
        # answers with an error, which only means "send it".
        ok, known, _ = call(Action.DEPLOY_STATUS, ref)
        if ok and isinstance(known, dict) and known.get("state") == "applied":
            return upload.result("applied", known, None)
        if ok and isinstance(known, dict) and known.get("state") == "probation":
            return _wait_verdict(call, upload, ref, known, deadline, wait_probation)
        begin = DeployBegin(
            deploy=upload.deploy_id,
            size=len(upload.archive),
            sha256=upload.digest,
            chunks=upload.total,
            chunk_bytes=chunk_bytes,
            model=upload.model,
            model_version=upload.to_version,
            probation=probation,
        )
        ok, begun, error = call(Action.DEPLOY_BEGIN, begin.to_args())
        if not ok:
            return upload.result("failed", None, f"the device refused the deploy: {error}")
        have = set(begun.get("have", [])) if isinstance(begun, dict) else set()
        if progress is not None:
            progress(len(have), upload.total)
        todo = [i for i in range(upload.total) if i not in have]
        refused = _send_chunks(call, upload, todo, len(have), window, progress)
        if refused is not None:
            index, error = refused
            return upload.result("failed", None, f"the device refused chunk {index}: {error}")
        ok, committed, error = call(Action.DEPLOY_COMMIT, ref)
        if not ok:
            return upload.result("failed", None, f"the device refused the commit: {error}")
        return _wait_verdict(call, upload, ref, committed, deadline, wait_probation)


def _wait_verdict(
    call: _Call,
    upload: _Upload,
    ref: dict[str, Any],
    committed: dict[str, Any],
    deadline: float,
    wait_probation: bool,
) -> DeployResult:
    """The deploy's result once the device has judged it (or the deadline passed, or
    ``wait_probation`` is off): ``committed`` is the device's last answer about it."""
    state = str(committed.get("state"))
    while wait_probation and state == "probation" and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        try:
            ok, status, error = call(Action.DEPLOY_STATUS, ref)
        except RemoteError:
            if time.monotonic() < deadline:
                raise
            break  # the deadline ran out mid-poll: still on probation, not unreachable
        if not ok:
            return upload.result("failed", committed, f"deploy_status failed: {error}")
        committed = {**committed, **status}
        state = str(status.get("state"))
    return upload.result(state, committed, None)
