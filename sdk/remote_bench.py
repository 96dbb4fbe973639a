"""Timing a candidate model on a real device over the fleet channel (issue 16).

:func:`benchmark_candidate` sends a model file (``.onnx`` or ``.tflite``) to a device with the
``candidate_*`` actions, skipping the chunks the device already has (a candidate's id is its
SHA-256's, so a file already there is not sent again), asks the agent to time it with
``benchmark``'s ``candidate`` argument, and removes it from the device afterwards. The agent
times it in a child process at lower CPU priority while its application keeps being served
(docs/agent.md, "Timing candidates")::

    from sdk.remote_bench import benchmark_candidate
    report = benchmark_candidate("mqtt://hub:1883", "greenhouse", "pi-07", "int8.onnx")
    report["latency_ms"]["p95"], report["peak_rss_mb"], report["measured_on"]
    report["application"]   # the device's own calls meanwhile: calls, failed, latency_ms
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from device_agent.contracts.commands import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_SECONDS,
    MIN_CHUNK_BYTES,
    Action,
    BenchmarkArgs,
    CandidateBegin,
    CandidateChunk,
    CandidateRef,
    CandidateSignature,
    InputShape,
    candidate_id,
)
from device_agent.errors import ConfigError
from sdk.deploy import _Call, _caller
from sdk.remote import CommandClient, RemoteError

__all__ = ["CandidateRefused", "benchmark_candidate", "candidate_signature"]

_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}


class CandidateRefused(RemoteError):
    """The device answered, and refused the candidate or could not time it (its reason in the
    message): unlike a device that does not answer, it is still there for the next one.
    ``stage`` is ``transfer`` (refused before timing: keys, size, a chunk) or ``timing`` (its
    runtime could not time this model)."""

    def __init__(self, message: str, stage: str = "transfer") -> None:
        super().__init__(message)
        self.stage = stage


def candidate_signature(sha256: str, key: str | Path) -> CandidateSignature:
    """The signature a device with ``trusted_keys`` wants for a candidate: Ed25519 by the
    bundle signing key at ``key`` (a private key file, ``edgeship keys generate``) over the
    file's SHA-256 (docs/agent.md, "Timing candidates")."""
    from device_agent.signing import load_private_key, sign_candidate

    return sign_candidate(sha256, load_private_key(key))


def _inputs(spec: Mapping[str, Any] | Sequence[InputShape] | None) -> tuple[InputShape, ...] | None:
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return InputShape.parse_all(spec)
    return tuple(spec)


def _read_candidate(
    path: Path, fmt: str, chunk_bytes: int, key: str | Path | None
) -> tuple[bytes, CandidateBegin]:
    """The candidate file's bytes and the ``candidate_begin`` that announces it (signed with
    ``key`` if given); ConfigError for a file a device would not take."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the candidate {path}: {exc}") from exc
    if not data:
        raise ConfigError(f"the candidate {path} is empty")
    sha = hashlib.sha256(data).hexdigest()
    ident = candidate_id(sha)
    total = math.ceil(len(data) / chunk_bytes)
    if total > MAX_CHUNKS:
        raise ConfigError(f"{path.name}: {len(data)} bytes is more chunks than a device takes")
    begin = CandidateBegin(
        candidate=ident,
        size=len(data),
        sha256=sha,
        chunks=total,
        chunk_bytes=min(chunk_bytes, len(data)),
        format=fmt,
        signature=None if key is None else candidate_signature(sha, key),
    )
    return data, begin


def benchmark_candidate(
    broker_url: str,
    fleet: str,
    device: str,
    model_path: str | Path,
    *,
    min_runs: int = 200,
    min_seconds: float = 3.0,
    warmup_runs: int = 10,
    max_seconds: float = 120.0,
    threads: int = 1,
    inputs: Mapping[str, Any] | Sequence[InputShape] | None = None,
    key: str | Path | None = None,
    timeout_s: float | None = None,
    call_timeout_s: float = 30.0,
    attempts: int = 3,
    window: int = 8,
    chunk_bytes: int = MAX_CHUNK_BYTES,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    remove: bool = True,
) -> dict[str, Any]:
    """Send ``model_path`` to ``device``, time it there and return the device's report.

    The report has the fields of a ``benchmark`` report (``latency_ms`` with p50/p95/p99/max,
    ``runtime``, ``runtime_version``, ``peak_rss_mb`` of the process that ran it alone,
    ``baseline_rss_mb``, ``rss_increase_mb``), ``measured_on`` and ``device`` (board, CPU,
    arch, cores, agent version) and ``application`` (the device's own calls while it ran:
    ``calls``, ``failed``, ``latency_ms`` p50/p95/max), plus ``transfer`` (``chunks``,
    ``chunks_sent``, ``bytes``, ``seconds``) added here.

    ``threads`` runtime threads run it (default 1); ``inputs`` (name -> ``{shape, dtype}``, or
    :class:`InputShape` values) are the sample inputs' shapes where the candidate's inputs are
    not the device's bundle's. ``key`` (a private signing key file) signs it for a device with
    ``trusted_keys``. ``remove`` deletes it from the device afterwards, whatever happened.
    ``timeout_s`` bounds the whole (default: ``max_seconds`` plus five minutes for the transfer).

    Raises ConfigError for a bad argument or file, :class:`RemoteError` when the device does not
    answer or refuses the candidate or its benchmark (the device's reason in the message).
    """
    path = Path(model_path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path.name}: a candidate is an .onnx or .tflite file")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}"
        )
    args = BenchmarkArgs.parse(
        {
            "min_runs": min_runs,
            "min_seconds": min_seconds,
            "warmup_runs": warmup_runs,
            "max_seconds": min(max_seconds, MAX_SECONDS),
        }
    )
    shapes = _inputs(inputs)
    data, begin = _read_candidate(path, fmt, chunk_bytes, key)
    ident = begin.candidate
    bench = BenchmarkArgs(
        min_runs=args.min_runs,
        min_seconds=args.min_seconds,
        warmup_runs=args.warmup_runs,
        max_seconds=args.max_seconds,
        candidate=ident,
        threads=threads,
        inputs=shapes,
    )
    BenchmarkArgs.parse(bench.to_args())  # threads and inputs within the device's limits
    limit = timeout_s if timeout_s is not None else args.max_seconds + 300.0
    started = time.monotonic()
    deadline = started + limit
    with CommandClient(
        broker_url, fleet, device, username=username, password=password, ca_file=ca_file
    ) as client:
        call = _caller(client, device, deadline, limit, call_timeout_s, attempts)
        try:
            transfer = _send_candidate(call, device, begin, data, chunk_bytes, window)
            transfer["seconds"] = time.monotonic() - started
            # The benchmark gets its own wait (it may take max_seconds), within the deadline.
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(f"device {device!r}: no time left to run the benchmark")
            reply = client.call(Action.BENCHMARK, bench.to_args(), timeout_s=left)
            if not reply.ok:
                raise CandidateRefused(
                    f"device {device!r} could not time the candidate: {reply.error}", "timing"
                )
            report = reply.result
            if not isinstance(report, dict) or "latency_ms" not in report:
                raise CandidateRefused(
                    f"device {device!r} answered the benchmark with something else", "timing"
                )
        finally:
            if remove:
                _remove(client, ident, call_timeout_s)
    report["transfer"] = transfer
    return report


def _send_candidate(
    call: _Call,
    device: str,
    begin: CandidateBegin,
    data: bytes,
    chunk_bytes: int,
    window: int,
) -> dict[str, Any]:
    """Announce the candidate with ``begin`` and send the chunks the device does not have yet,
    ``window`` at a time; the transfer's figures less ``seconds``."""
    ok, begun, error = call(Action.CANDIDATE_BEGIN, begin.to_args())
    if not ok:
        raise CandidateRefused(f"device {device!r} refused the candidate: {error}")
    ident = begin.candidate
    total = math.ceil(len(data) / chunk_bytes)
    given = begun.get("have") if isinstance(begun, dict) else None
    # What a device answers is not trusted: only valid chunk indexes count as held.
    have = {
        i
        for i in (given if isinstance(given, list) else [])
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total
    }
    todo = [i for i in range(total) if i not in have]

    def send(index: int) -> tuple[bool, str | None]:
        part = data[index * chunk_bytes : (index + 1) * chunk_bytes]
        chunk = CandidateChunk(
            candidate=ident,
            index=index,
            data=base64.b64encode(part).decode("ascii"),
            sha256=hashlib.sha256(part).hexdigest(),
        )
        sent_ok, _, why = call(Action.CANDIDATE_CHUNK, chunk.to_args())
        return sent_ok, why

    with ThreadPoolExecutor(max_workers=max(1, window)) as pool:
        for index, (sent_ok, why) in zip(todo, pool.map(send, todo), strict=True):
            if not sent_ok:
                pool.shutdown(cancel_futures=True)
                raise CandidateRefused(f"device {device!r} refused chunk {index}: {why}")
    return {"chunks": total, "chunks_sent": len(todo), "bytes": len(data)}


def _remove(client: CommandClient, ident: str, timeout_s: float) -> None:
    """Ask the device to delete the candidate; a device that does not answer keeps it until its
    ``candidate_keep``/``candidate_ttl_s`` bounds or its next restart remove it."""
    with contextlib.suppress(RemoteError):
        client.call(Action.CANDIDATE_REMOVE, CandidateRef(ident).to_args(), timeout_s=timeout_s)
