"""The commands an operator sends a device on ``cmd``, as types: action names, arguments with
their limits and validation, and the results a device answers with on ``cmd/reply``.

One definition for both ends: the agent parses a command's ``args`` with these types
(:mod:`device_agent.deploy`), and the host builds them with the same types (:mod:`sdk.deploy`,
:mod:`sdk.remote`), so a name or a limit cannot drift between sender and receiver. The envelope
(``id``, ``action``, ``args``, ``expires``) is :class:`device_agent.contracts.messages.Command`;
this module fills its ``action`` and ``args``. Standard library only: a third-party sender
imports it without the agent.

``deploy_*`` send a bundle in chunks and swap it in (docs/agent.md, "Remote deploy"):

* ``deploy_begin`` (:class:`DeployBegin`): opens (or resumes) an upload; the reply
  (:class:`ReceivingReply`) lists the chunks already ``have``. Chunks are
  :data:`MIN_CHUNK_BYTES` to :data:`MAX_CHUNK_BYTES` (a deploy in one chunk may be smaller), at
  most :data:`MAX_CHUNKS` of them: the bookkeeping of an upload is a bitmap of at most 2 KiB,
  whatever the arguments say.
* ``deploy_chunk`` (:class:`DeployChunk`): one base64 chunk, checked against its own SHA-256.
  A chunk delivered twice (QoS 1) is written once and acknowledged twice (:class:`ChunkReply`).
* ``deploy_commit`` (:class:`DeployRef`): joins, verifies, self-tests and swaps in the bundle;
  the reply (:class:`DeployRecord`) says ``probation``, ``applied`` or ``failed``.
* ``deploy_status`` (:class:`DeployRef`, ``deploy`` optional) and ``deploy_abort``
  (:class:`DeployRef`).
* ``deploy_revert`` (:class:`DeployRevert`): rolls back a deploy on probation, or the applied
  deploy that runs now, to the bundle before it (a fleet rollout taking back a wave).

``deploy_begin`` may carry ``probation`` (:class:`ProbationArgs`): how long the new bundle is on
probation and the limits of model health it is judged against (:mod:`device_agent.probation`).

``ping`` takes no arguments and answers :class:`PingReply`; ``benchmark`` takes
:class:`BenchmarkArgs` and answers a benchmark report (``device_agent.benchmark``).

``candidate_*`` send a model file to time on the board without deploying it (docs/agent.md,
"Timing candidates"): ``candidate_begin`` (:class:`CandidateBegin`; the id is the file's
:func:`candidate_id`, so a file already there answers ``ready`` and nothing is sent again),
``candidate_chunk`` (:class:`CandidateChunk`, chunked as deploys are) and ``candidate_remove``
(:class:`CandidateRef`); ``benchmark`` with ``candidate`` times that file in a child process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, ClassVar, TypedDict

from device_agent.contracts.errors import ConfigError, EdgeshipError
from device_agent.contracts.messages import validate_id
from device_agent.contracts.text import escape

__all__ = [
    "CANDIDATE_FORMATS",
    "MAX_BENCH_THREADS",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_MODEL_LEN",
    "MAX_REASON_LEN",
    "MAX_RUNS",
    "MAX_SECONDS",
    "MAX_VERSION_LEN",
    "MAX_WARMUP_RUNS",
    "MIN_CHUNK_BYTES",
    "SHUTTING_DOWN",
    "Action",
    "BenchmarkArgs",
    "CandidateBegin",
    "CandidateChunk",
    "CandidateChunkReply",
    "CandidateRef",
    "CandidateReply",
    "CandidateSignature",
    "ChunkReply",
    "DeployBegin",
    "DeployChunk",
    "DeployError",
    "DeployRecord",
    "DeployRef",
    "DeployRevert",
    "InputShape",
    "PingReply",
    "ProbationArgs",
    "ReceivingReply",
    "candidate_id",
    "candidate_signed_bytes",
    "printable",
]

# 128 KiB of raw data is about 171 KiB of base64: a chunk command stays well under the
# protocol's 256 KiB payload limit.
MAX_CHUNK_BYTES = 128 * 1024
# Smaller chunks only multiply commands and files; a deploy in one chunk may be smaller.
MIN_CHUNK_BYTES = 512
# The begin reply lists the chunks already received: 16384 numbers fit in one reply, and
# 16384 chunks of 128 KiB carry 2 GiB.
MAX_CHUNKS = 16384
# The reason an agent gives for a benchmark or candidate timing it stopped because it is
# shutting down: the sender times the job on another device (it is not the model's fault).
SHUTTING_DOWN = "the agent is shutting down; send it again once it is back"
# What a model name and version may be on the wire (DeployEvent, telemetry).
MAX_MODEL_LEN = 128
MAX_VERSION_LEN = 64
# The operator's reason for a deploy_revert (it goes into the record and the deploy event).
MAX_REASON_LEN = 1000

_BAD_TEXT = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff]")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class Action(str, Enum):
    """The actions the edgeship agent knows. A ``str``: ``Action.PING == "ping"``; use
    ``.value`` where the plain string is wanted (a dict key shown in a message)."""

    PING = "ping"
    BENCHMARK = "benchmark"
    DEPLOY_BEGIN = "deploy_begin"
    DEPLOY_CHUNK = "deploy_chunk"
    DEPLOY_COMMIT = "deploy_commit"
    DEPLOY_STATUS = "deploy_status"
    DEPLOY_ABORT = "deploy_abort"
    DEPLOY_REVERT = "deploy_revert"
    CANDIDATE_BEGIN = "candidate_begin"
    CANDIDATE_CHUNK = "candidate_chunk"
    CANDIDATE_REMOVE = "candidate_remove"


class DeployError(ConfigError):
    """A deploy command that cannot be done as asked (unknown upload, missing chunks, a bad
    argument, another deploy on probation)."""


def printable(text: str, limit: int = 1000) -> str:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates
    escaped (:func:`device_agent.contracts.text.escape`): a reason that quotes a file name or an
    exception must still encode."""
    return escape(text, limit=limit)


def has_bad_text(text: str) -> bool:
    """Whether ``text`` holds a control character or a lone surrogate (a name no bundle file
    has, a label telemetry cannot encode)."""
    return _BAD_TEXT.search(text) is not None


# --- argument checks: each raises DeployError naming the argument ----------------------------


def _arg(args: Mapping[str, Any], key: str) -> Any:
    if key not in args:
        raise DeployError(f"argument {key!r} is missing")
    return args[key]


def deploy_id(value: Any, key: str = "deploy") -> str:
    """A deploy id: a valid id (docs/protocol.md) that does not start with ``.``."""
    try:
        ident = validate_id(value, key)
    except EdgeshipError as exc:
        raise DeployError(printable(str(exc), 300)) from exc
    # The id names folders under the deploy root: "." or ".." would name the root itself or
    # its parent (and rmtree them before any signature is checked).
    if ident.startswith("."):
        raise DeployError(f"{key} {ident!r}: an id must not start with '.'")
    return ident


def _int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _arg(args, key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DeployError(
            f"argument {key!r}: expected an integer in [{lo}, {hi}], got {ascii(value)[:80]}"
        )
    return value


def _sha(args: Mapping[str, Any], key: str = "sha256") -> str:
    value = _arg(args, key)
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise DeployError(f"argument {key!r}: expected a lowercase hex SHA-256")
    return value


def _opt_text(args: Mapping[str, Any], key: str, max_len: int) -> str | None:
    """An optional label: 1 to ``max_len`` characters, no control character or lone surrogate
    (it is logged and sent in telemetry, which must be able to encode it)."""
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise DeployError(f"argument {key!r}: expected a string of 1 to {max_len} characters")
    if _BAD_TEXT.search(value):
        raise DeployError(
            f"argument {key!r}: {ascii(value)[:80]} holds a control character or a lone surrogate"
        )
    return value


def _without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _chunking(args: Mapping[str, Any], max_bytes: int, what: str) -> tuple[int, int, int]:
    """``size``, ``chunks`` and ``chunk_bytes`` of an upload (a deploy's archive, a candidate's
    model file), checked against each other and the limits: DeployError naming the argument."""
    size = _int(args, "size", 1, max_bytes)
    chunk_bytes = _int(args, "chunk_bytes", 1, MAX_CHUNK_BYTES)
    if chunk_bytes < min(MIN_CHUNK_BYTES, size):
        raise DeployError(
            f"argument 'chunk_bytes': {chunk_bytes} bytes is below the minimum of "
            f"{MIN_CHUNK_BYTES} (only a {what} sent in one chunk may be smaller)"
        )
    needed = -(-size // chunk_bytes)
    if needed > MAX_CHUNKS:
        raise DeployError(
            f"{size} bytes in chunks of {chunk_bytes} bytes is {needed} chunks, over the "
            f"limit of {MAX_CHUNKS}; send chunks of at least {-(-size // MAX_CHUNKS)} bytes"
        )
    chunks = _int(args, "chunks", 1, MAX_CHUNKS)
    if chunks != needed:
        raise DeployError(
            f"{chunks} chunks of {chunk_bytes} bytes cannot hold {size} bytes exactly"
        )
    return size, chunks, chunk_bytes


def _chunk_fields(args: Mapping[str, Any], chunks: int) -> tuple[int, str, str]:
    """A chunk's ``index`` (below ``chunks``), base64 ``data`` and ``sha256``, checked."""
    index = _int(args, "index", 0, chunks - 1)
    sha = _sha(args)
    data = _arg(args, "data")
    if not isinstance(data, str):
        raise DeployError("argument 'data': expected a base64 string")
    return index, data, sha


# --- arguments -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployBegin:
    """``deploy_begin``'s arguments: the upload's id, the archive's ``size`` and ``sha256``,
    its chunking, and the bundle's ``model`` and ``model_version`` (labels, optional)."""

    deploy: str
    size: int
    sha256: str
    chunks: int
    chunk_bytes: int
    model: str | None = None
    model_version: str | None = None
    probation: ProbationArgs | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any], *, max_bytes: int) -> DeployBegin:
        """Validate ``args``; ``max_bytes`` is the device's ``deploy_max_bytes``."""
        ident = DeployRef.id_of(args)
        size, chunks, chunk_bytes = _chunking(args, max_bytes, "deploy")
        return cls(
            deploy=ident,
            size=size,
            sha256=_sha(args),
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            model=_opt_text(args, "model", MAX_MODEL_LEN),
            model_version=_opt_text(args, "model_version", MAX_VERSION_LEN),
            probation=None if args.get("probation") is None else ProbationArgs.parse(args),
        )

    def to_args(self) -> dict[str, Any]:
        """The ``args`` object on the wire (``model``/``model_version``/``probation`` left out
        when None)."""
        return _without_none(self.params())

    def params(self) -> dict[str, Any]:
        """Every field, None included: what the device keeps in ``begin.json``."""
        out = dict(self.__dict__)
        out["probation"] = None if self.probation is None else self.probation.to_args()
        return out


@dataclass(frozen=True)
class DeployChunk:
    """``deploy_chunk``'s arguments: chunk ``index`` of upload ``deploy``, its bytes as base64
    ``data`` and their ``sha256``."""

    deploy: str
    index: int
    data: str
    sha256: str

    @classmethod
    def parse(cls, args: Mapping[str, Any], *, chunks_of: Callable[[str], int]) -> DeployChunk:
        """Validate ``args``; ``chunks_of(deploy)`` is the number of chunks of the upload the
        id names (it raises when there is none), which bounds ``index``."""
        ident = DeployRef.id_of(args)
        index, data, sha = _chunk_fields(args, chunks_of(ident))
        return cls(deploy=ident, index=index, data=data, sha256=sha)

    def to_args(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeployRef:
    """The arguments of ``deploy_commit``, ``deploy_abort`` and ``deploy_status``: the deploy
    they are about (``deploy_status`` without one asks about the latest)."""

    deploy: str | None

    @classmethod
    def parse(cls, args: Mapping[str, Any], *, required: bool = True) -> DeployRef:
        if not required and args.get("deploy") is None:
            return cls(None)
        return cls(cls.id_of(args))

    @staticmethod
    def id_of(args: Mapping[str, Any]) -> str:
        """The ``deploy`` argument of ``args``, validated (it is required)."""
        return deploy_id(_arg(args, "deploy"))

    def to_args(self) -> dict[str, Any]:
        return _without_none(self.__dict__)


@dataclass(frozen=True)
class DeployRevert:
    """``deploy_revert``'s arguments: the deploy to roll back and, optionally, the operator's
    ``reason`` (1 to :data:`MAX_REASON_LEN` characters, no control character or lone
    surrogate), which the device's record and deploy event carry."""

    deploy: str
    reason: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> DeployRevert:
        return cls(DeployRef.id_of(args), _opt_text(args, "reason", MAX_REASON_LEN))

    def to_args(self) -> dict[str, Any]:
        """The ``args`` object on the wire (``reason`` left out when None)."""
        return _without_none(self.__dict__)


# --- probation ----------------------------------------------------------------------------

# Limits of the probation arguments (docs/agent.md, "Probation").
MAX_PROBATION_INFERENCES = 1_000_000
MAX_PROBATION_SECONDS = 7 * 86_400.0
MAX_RATIO = 1000.0
QUIET_VERDICTS = ("apply", "rollback")


def _p_int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DeployError(
            f"probation argument {key!r}: expected an integer in [{lo}, {hi}], got "
            f"{_kind(value) if not isinstance(value, int) else _shown(value)}"
        )
    return value


def _p_num(args: Mapping[str, Any], key: str, lo: float, hi: float, *, lo_open: bool) -> float:
    value = args[key]
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    number = float(value) if ok and abs(value) < 2**53 else math.nan
    if not ok or not math.isfinite(number) or not lo <= number <= hi or (lo_open and number <= lo):
        shown = _kind(value) if not ok else f"{number:g}" if math.isfinite(number) else "huge"
        raise DeployError(
            f"probation argument {key!r}: expected a number in {'(' if lo_open else '['}"
            f"{lo:g}, {hi:g}], got {shown}"
        )
    return number


def _shown(value: int) -> str:
    return str(value) if abs(value) < 10**12 else f"an integer of {value.bit_length()} bits"


@dataclass(frozen=True)
class ProbationArgs:
    """``deploy_begin``'s optional ``probation`` object: how long a new bundle is on probation
    and the limits of model health it must keep (docs/agent.md, "Probation").

    Probation ends after ``inferences`` calls (those that fail on the new bundle alone count
    too) or ``seconds`` after the swap, whichever comes first. Given only ``seconds``, no count
    ends it; given ``inferences`` only or neither, ``seconds`` is :data:`DEFAULT_SECONDS` so a
    quiet device does not stay on probation; ``inferences`` defaults to the agent's
    ``deploy_probation_inferences``, raised to ``min_calls`` when below it (:meth:`parse` refuses
    an ``inferences`` below ``min_calls``). A line is judged once ``min_calls`` calls are seen
    on both sides (when fewer were compared with the previous model by the end, outliers and
    classes are judged on every call against the reference, and the verdict names the lines
    not judged): the p95 and median latency at most ``max_latency_ratio`` times the previous
    model's (or at most ``latency_floor_ms`` above it: scheduler noise); the outlier count at most
    ``max_outlier_ratio`` times the expected one (and below ``min_outliers`` never fails); the
    top class share at most ``max_class_shift`` above the previous model's (or the
    reference's); calls that fail on the new bundle alone at most ``max_error_rate`` (0: the
    first one rolls back). ``quiet`` is the verdict when probation ends with fewer than
    ``min_calls`` calls: ``apply`` or ``rollback``.
    """

    inferences: int | None = None
    seconds: float | None = None
    min_calls: int = 10
    max_latency_ratio: float = 2.0
    latency_floor_ms: float = 0.5
    max_outlier_ratio: float = 3.0
    min_outliers: int = 5
    max_class_shift: float = 0.5
    max_error_rate: float = 0.0
    quiet: str = "apply"

    KEYS: ClassVar[tuple[str, ...]] = (
        "inferences",
        "seconds",
        "min_calls",
        "max_latency_ratio",
        "latency_floor_ms",
        "max_outlier_ratio",
        "min_outliers",
        "max_class_shift",
        "max_error_rate",
        "quiet",
    )
    DEFAULT_SECONDS: ClassVar[float] = 600.0

    @classmethod
    def parse(cls, begin_args: Mapping[str, Any]) -> ProbationArgs:
        """Validate the ``probation`` object of ``deploy_begin``'s args; DeployError naming the
        argument and its range."""
        args = begin_args["probation"]
        if not isinstance(args, Mapping):
            raise DeployError(f"argument 'probation': expected an object, got {_kind(args)}")
        unknown = sorted(str(k) for k in args if k not in cls.KEYS)
        if unknown:
            names = ", ".join(ascii(n[:40]) for n in unknown[:5])
            raise DeployError(f"probation: unknown argument {names}; known: {', '.join(cls.KEYS)}")
        given = {k: v for k, v in args.items() if v is not None}
        out: dict[str, Any] = {}
        ints = {"inferences": (1, MAX_PROBATION_INFERENCES), "min_calls": (1, 100_000),
                "min_outliers": (1, MAX_PROBATION_INFERENCES)}  # fmt: skip
        nums = {
            "seconds": (0.0, MAX_PROBATION_SECONDS, True),
            "max_latency_ratio": (1.0, MAX_RATIO, False),
            "latency_floor_ms": (0.0, 60_000.0, False),
            "max_outlier_ratio": (1.0, MAX_RATIO, False),
            "max_class_shift": (0.0, 1.0, True),
            "max_error_rate": (0.0, 1.0, False),
        }
        for key in given:
            if key in ints:
                out[key] = _p_int(given, key, *ints[key])
            elif key in nums:
                lo, hi, lo_open = nums[key]
                out[key] = _p_num(given, key, lo, hi, lo_open=lo_open)
        if "quiet" in given:
            if given["quiet"] not in QUIET_VERDICTS:
                raise DeployError(
                    f"probation argument 'quiet': expected one of {', '.join(QUIET_VERDICTS)}, "
                    f"got {_kind(given['quiet'])}"
                )
            out["quiet"] = given["quiet"]
        least = out.get("min_calls", cls.min_calls)
        if out.get("inferences", least) < least:
            raise DeployError(
                f"probation argument 'inferences' ({out['inferences']}) is below 'min_calls' "
                f"({least}): a probation that ends before min_calls calls judges nothing"
            )
        return cls(**out)

    def to_args(self) -> dict[str, Any]:
        """The ``probation`` object on the wire: the fields that are not the defaults."""
        d = ProbationArgs()
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) != getattr(d, k)}

    def ends(self, default_inferences: int) -> tuple[int | None, float | None]:
        """(inferences, seconds) that end the probation: see the class's docstring."""
        if self.inferences is None and self.seconds is not None:
            return None, self.seconds
        n = self.inferences
        if n is None:  # the agent's default, raised to min_calls so that a verdict is possible
            n = max(default_inferences, self.min_calls) if default_inferences else 0
        return n or None, self.DEFAULT_SECONDS if self.seconds is None else self.seconds


# --- candidates -----------------------------------------------------------------------------

CANDIDATE_FORMATS = ("onnx", "tflite")
_CANDIDATE_RE = re.compile(r"c[0-9a-f]{32}")
_KEY_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
# What the signature over a candidate covers: this prefix and the file's hex SHA-256. The prefix
# keeps a candidate's signature from standing for anything else signed with the same key.
CANDIDATE_SIGNED_PREFIX = b"edgeship.candidate/1:"
MAX_SIGNATURE_B64 = 200


def candidate_id(sha256: str) -> str:
    """The id of the candidate whose file has this hex SHA-256: ``c`` and its first 32 digits.
    Content-addressed: the same file is the same candidate on every device."""
    return "c" + sha256[:32]


def candidate_signed_bytes(sha256: str) -> bytes:
    """The bytes a candidate's Ed25519 signature is over (:data:`CANDIDATE_SIGNED_PREFIX` and the
    file's hex SHA-256)."""
    return CANDIDATE_SIGNED_PREFIX + sha256.encode("ascii")


@dataclass(frozen=True)
class CandidateSignature:
    """``candidate_begin``'s optional ``signature``: an Ed25519 signature by ``key_id`` (the
    fingerprint of a bundle signing key, docs/security.md) over
    :func:`candidate_signed_bytes`, base64 in ``signature``."""

    key_id: str
    algorithm: str
    signature: str

    KEYS: ClassVar[tuple[str, ...]] = ("key_id", "algorithm", "signature")

    @classmethod
    def parse(cls, value: Any) -> CandidateSignature:
        if not isinstance(value, Mapping) or set(value) != set(cls.KEYS):
            raise DeployError(
                f"argument 'signature': expected an object with exactly {', '.join(cls.KEYS)}"
            )
        key_id, algorithm, sig = (value[k] for k in cls.KEYS)
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            raise DeployError("signature 'key_id': expected 'sha256:' and 64 lowercase hex digits")
        if algorithm != "ed25519":
            raise DeployError(f"signature 'algorithm': expected 'ed25519', got {_kind(algorithm)}")
        if not isinstance(sig, str) or not 0 < len(sig) <= MAX_SIGNATURE_B64:
            raise DeployError(
                f"signature 'signature': expected base64 of at most {MAX_SIGNATURE_B64} characters"
            )
        return cls(key_id=key_id, algorithm=algorithm, signature=sig)

    def to_args(self) -> dict[str, Any]:
        return dict(self.__dict__)


def candidate_ref(value: Any, key: str = "candidate") -> str:
    """A candidate id: :func:`candidate_id` of some SHA-256 (``c`` and 32 lowercase hex digits)."""
    if not isinstance(value, str) or not _CANDIDATE_RE.fullmatch(value):
        raise DeployError(
            f"argument {key!r}: expected a candidate id ('c' and 32 lowercase hex digits), got "
            f"{_kind(value)}"
        )
    return value


@dataclass(frozen=True)
class CandidateBegin:
    """``candidate_begin``'s arguments: the ``candidate`` (its id, which must be
    :func:`candidate_id` of ``sha256``), the file's ``size`` and ``sha256``, its chunking as a
    deploy's (:class:`DeployBegin`), its ``format`` (``onnx`` or ``tflite``) and, for a device
    with trusted keys, its ``signature``."""

    candidate: str
    size: int
    sha256: str
    chunks: int
    chunk_bytes: int
    format: str
    signature: CandidateSignature | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any], *, max_bytes: int) -> CandidateBegin:
        """Validate ``args``; ``max_bytes`` is the device's ``candidate_max_bytes``."""
        ident = candidate_ref(_arg(args, "candidate"))
        size, chunks, chunk_bytes = _chunking(args, max_bytes, "candidate")
        sha = _sha(args)
        if candidate_id(sha) != ident:
            raise DeployError(
                f"candidate {ident} is not the id of a file with SHA-256 {sha[:12]}…; the id is "
                f"{candidate_id(sha)}"
            )
        fmt = _arg(args, "format")
        if fmt not in CANDIDATE_FORMATS:
            raise DeployError(
                f"argument 'format': expected one of {', '.join(CANDIDATE_FORMATS)}, got "
                f"{_kind(fmt)}"
            )
        sig = args.get("signature")
        return cls(
            candidate=ident,
            size=size,
            sha256=sha,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            format=str(fmt),
            signature=None if sig is None else CandidateSignature.parse(sig),
        )

    def to_args(self) -> dict[str, Any]:
        """The ``args`` object on the wire (``signature`` left out when None)."""
        return _without_none(self.params())

    def params(self) -> dict[str, Any]:
        """Every field, None included: what the device keeps about the candidate."""
        out = dict(self.__dict__)
        out["signature"] = None if self.signature is None else self.signature.to_args()
        return out


@dataclass(frozen=True)
class CandidateChunk:
    """``candidate_chunk``'s arguments: as :class:`DeployChunk`'s, for ``candidate``."""

    candidate: str
    index: int
    data: str
    sha256: str

    @classmethod
    def parse(cls, args: Mapping[str, Any], *, chunks_of: Callable[[str], int]) -> CandidateChunk:
        ident = candidate_ref(_arg(args, "candidate"))
        index, data, sha = _chunk_fields(args, chunks_of(ident))
        return cls(candidate=ident, index=index, data=data, sha256=sha)

    def to_args(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CandidateRef:
    """``candidate_remove``'s argument: the candidate to delete from the device."""

    candidate: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> CandidateRef:
        return cls(candidate_ref(_arg(args, "candidate")))

    def to_args(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- benchmark ----------------------------------------------------------------------------

# The limits of a benchmark the agent runs on request (the ``benchmark`` command): every loop
# count is bounded, and ``max_seconds`` bounds the wall time of the whole benchmark (first run,
# warm-up and timed runs), whatever the model's speed. Documented in docs/agent.md.
MAX_RUNS = 100_000
MAX_WARMUP_RUNS = 10_000
MAX_SECONDS = 600.0


def _count(value: Any, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass, and 1e9 or "10" are not counts: only a JSON integer is.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"benchmark argument {name!r}: expected an integer in [{lo}, {hi}], got {_kind(value)}"
        )
    if not lo <= value <= hi:
        # str() of a huge int is slow (and refused past 4300 digits): name its size instead.
        shown = str(value) if abs(value) < 10**12 else f"an integer of {value.bit_length()} bits"
        raise ConfigError(f"benchmark argument {name!r}: {shown} is outside [{lo}, {hi}]")
    return value


def _seconds(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"benchmark argument {name!r}: expected a number of seconds in "
            f"{'(' if lo_open else '['}{lo:g}, {hi:g}], got {_kind(value)}"
        )
    # A huge JSON integer would overflow float(); anything that large is out of range anyway.
    seconds = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
    if not math.isfinite(seconds) or seconds < lo or seconds > hi or (lo_open and seconds <= lo):
        shown = f"{seconds:g}" if math.isfinite(seconds) else "a non-finite or huge number"
        raise ConfigError(
            f"benchmark argument {name!r}: {shown} is outside "
            f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        )
    return seconds


def _kind(value: Any) -> str:
    """A short description of a wrong value, never the value in full (it may be huge)."""
    if isinstance(value, str):
        text = value[:20].encode("ascii", "backslashreplace").decode("ascii")
        return f"the string {text!r}{'...' if len(value) > 20 else ''}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if value is None or isinstance(value, bool):
        return "null" if value is None else ("true" if value else "false")
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


MAX_BENCH_THREADS = 64
MAX_INPUTS = 16
MAX_INPUT_RANK = 8
# Elements of one generated input (64 MiB of float32): a sample input is allocated on the
# device, so its size is bounded whatever the arguments say.
MAX_INPUT_ELEMENTS = 2**24
INPUT_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


@dataclass(frozen=True)
class InputShape:
    """One input of a candidate's sample inputs (``benchmark``'s ``inputs``): its ``name``, a
    fixed ``shape`` and a ``dtype`` from :data:`INPUT_DTYPES`."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def parse_all(cls, value: Any) -> tuple[InputShape, ...]:
        """``inputs``: an object of 1 to :data:`MAX_INPUTS` names, each ``{shape, dtype}``."""
        if not isinstance(value, Mapping) or not 0 < len(value) <= MAX_INPUTS:
            raise ConfigError(
                f"benchmark argument 'inputs': expected an object of 1 to {MAX_INPUTS} inputs, "
                f"got {_kind(value)}"
            )
        out = []
        for name, spec in value.items():
            if not isinstance(name, str) or not 0 < len(name) <= MAX_MODEL_LEN:
                raise ConfigError(
                    f"benchmark argument 'inputs': a name of 1 to {MAX_MODEL_LEN} characters"
                )
            if _BAD_TEXT.search(name):
                raise ConfigError(
                    f"benchmark argument 'inputs': {ascii(name)[:80]} holds a control character "
                    "or a lone surrogate"
                )
            where = f"benchmark argument 'inputs' {ascii(name)[:40]}"
            if not isinstance(spec, Mapping) or set(spec) != {"shape", "dtype"}:
                raise ConfigError(f"{where}: expected an object with exactly shape and dtype")
            shape, dtype = spec["shape"], spec["dtype"]
            if not isinstance(shape, list | tuple) or len(shape) > MAX_INPUT_RANK:
                raise ConfigError(f"{where}: 'shape' must be a list of at most {MAX_INPUT_RANK}")
            dims = tuple(_count(d, "inputs shape", 1, MAX_INPUT_ELEMENTS) for d in shape)
            if math.prod(dims) > MAX_INPUT_ELEMENTS:
                raise ConfigError(f"{where}: more than {MAX_INPUT_ELEMENTS} elements")
            if dtype not in INPUT_DTYPES:
                raise ConfigError(
                    f"{where}: 'dtype' must be one of {', '.join(INPUT_DTYPES)}, got {_kind(dtype)}"
                )
            out.append(cls(name=name, shape=dims, dtype=str(dtype)))
        return tuple(out)

    @staticmethod
    def to_args_all(inputs: tuple[InputShape, ...]) -> dict[str, Any]:
        return {i.name: {"shape": list(i.shape), "dtype": i.dtype} for i in inputs}


@dataclass(frozen=True)
class BenchmarkArgs:
    """The arguments of the agent's ``benchmark`` command, validated.

    ``min_runs`` (int, 1 to :data:`MAX_RUNS`, default 200) and ``min_seconds`` (number, 0 to
    :data:`MAX_SECONDS`, default 3) are both reached unless ``max_seconds`` (number, above 0 up
    to :data:`MAX_SECONDS`, default :data:`MAX_SECONDS`) runs out first: it bounds the whole
    benchmark's wall time. ``warmup_runs`` (int, 0 to :data:`MAX_WARMUP_RUNS`, default 10).

    ``candidate`` (an id, :func:`candidate_id`) times that candidate, sent with the
    ``candidate_*`` actions, instead of the loaded bundle, in a child process with ``threads``
    (1 to :data:`MAX_BENCH_THREADS`, default 1) runtime threads, on sample inputs of the
    bundle's input spec or, given ``inputs`` (:class:`InputShape`), of those shapes and dtypes.
    ``threads`` and ``inputs`` are refused without ``candidate``.
    """

    min_runs: int = 200
    min_seconds: float = 3.0
    warmup_runs: int = 10
    max_seconds: float = MAX_SECONDS
    candidate: str | None = None
    threads: int | None = None
    inputs: tuple[InputShape, ...] | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "min_runs",
        "min_seconds",
        "warmup_runs",
        "max_seconds",
        "candidate",
        "threads",
        "inputs",
    )

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> BenchmarkArgs:
        """Validate a command's ``args``; ConfigError naming the argument and its range."""
        unknown = sorted(str(k) for k in args if k not in cls.KEYS)
        if unknown:
            names = ", ".join(repr(n[:40]) for n in unknown[:5])
            raise ConfigError(f"benchmark: unknown argument {names}; known: {', '.join(cls.KEYS)}")
        d = cls()
        out = cls(
            min_runs=_count(args.get("min_runs", d.min_runs), "min_runs", 1, MAX_RUNS),
            min_seconds=_seconds(
                args.get("min_seconds", d.min_seconds), "min_seconds", 0.0, MAX_SECONDS
            ),
            warmup_runs=_count(
                args.get("warmup_runs", d.warmup_runs), "warmup_runs", 0, MAX_WARMUP_RUNS
            ),
            max_seconds=_seconds(
                args.get("max_seconds", d.max_seconds),
                "max_seconds",
                0.0,
                MAX_SECONDS,
                lo_open=True,
            ),
        )
        if out.min_seconds > out.max_seconds:
            raise ConfigError(
                f"benchmark: min_seconds ({out.min_seconds:g}) is more than max_seconds "
                f"({out.max_seconds:g})"
            )
        candidate = args.get("candidate")
        threads, inputs = args.get("threads"), args.get("inputs")
        if candidate is None:
            if threads is not None or inputs is not None:
                raise ConfigError(
                    "benchmark: 'threads' and 'inputs' apply to a candidate only (the loaded "
                    "bundle runs with the agent's own settings); give 'candidate' too"
                )
            return out
        return replace(
            out,
            candidate=candidate_ref(candidate),
            threads=1 if threads is None else _count(threads, "threads", 1, MAX_BENCH_THREADS),
            inputs=None if inputs is None else InputShape.parse_all(inputs),
        )

    def to_args(self) -> dict[str, Any]:
        """The ``args`` object on the wire: ``min_runs`` and ``min_seconds`` always (what the
        host has always sent), the others when they are not the defaults."""
        d = BenchmarkArgs()
        args: dict[str, Any] = {"min_runs": self.min_runs, "min_seconds": self.min_seconds}
        if self.warmup_runs != d.warmup_runs:
            args["warmup_runs"] = self.warmup_runs
        if self.max_seconds != d.max_seconds:
            args["max_seconds"] = self.max_seconds
        if self.candidate is not None:
            args["candidate"] = self.candidate
            args["threads"] = self.threads or 1
        if self.inputs is not None:
            args["inputs"] = InputShape.to_args_all(self.inputs)
        return args


# --- replies (the ``result`` of an ``ok`` reply) --------------------------------------------


class PingReply(TypedDict):
    """``ping``: the device is there, and which boot of its agent answers."""

    pong: bool
    boot: str


class ReceivingReply(TypedDict):
    """``deploy_begin``: the upload is open; ``have`` lists the chunks the device has."""

    deploy: str
    state: str
    chunks: int
    have: list[int]


class ChunkReply(TypedDict):
    """``deploy_chunk``: the chunk is stored; ``received`` of ``chunks`` are."""

    deploy: str
    index: int
    received: int
    chunks: int


class DeployRecord(TypedDict, total=False):
    """What a device knows about one deploy: ``deploy_commit``'s, ``deploy_abort``'s and
    ``deploy_revert``'s result, and ``deploy_status``'s with the running
    ``model``/``model_version`` added (and, while they apply, ``received``/``chunks`` of an
    upload and ``probation_left``). ``state`` is
    ``receiving``, ``probation``, ``applied``, ``rolled_back``, ``failed`` or ``aborted``, and
    from ``deploy_status`` ``superseded`` for one applied and since replaced (None when the
    device has no deploy to report)."""

    deploy: str | None
    state: str | None
    from_version: str | None
    to_version: str | None
    model: str | None
    model_version: str | None
    reason: str | None
    error: str | None
    inputs_changed: bool
    probation: int
    probation_left: int
    received: int
    chunks: int


class CandidateReply(TypedDict):
    """``candidate_begin`` (and ``candidate_chunk``): ``state`` is ``receiving`` with the chunks
    the device ``have``s, or ``ready`` once the whole file is there and matches its SHA-256
    (``have`` then lists every chunk)."""

    candidate: str
    state: str
    chunks: int
    have: list[int]


class CandidateChunkReply(TypedDict):
    """``candidate_chunk``: the chunk is stored; ``state`` is ``ready`` after the last one."""

    candidate: str
    index: int
    received: int
    chunks: int
    state: str
