"""Fuzzing bundle trust and remote deploy (issue 11, findings 2, 3, 4 and 10).

Three boundaries, each fed random input interleaved with good input:

* **A bundle directory -> the agent** (``load_bundle``, ``Agent.from_bundle`` + ``predict``,
  ``edgeship-agent check``). ``manifest.json`` is mutated as JSON (any field replaced by
  random JSON: wrong types, lone surrogates, NUL, NaN and inf, huge integers, deep nesting;
  an input's ``sample_shape`` set to good and bad values: negative, zero, huge, non-int, NaN,
  wrong length, nested) or as bytes (non-UTF-8, truncation, duplicate keys, deep nesting);
  bundle files are replaced with their hash updated (what anyone can do without the signing
  key); unlisted files are added. Invariant: a load is a correct load or an EdgeshipError
  naming the problem, never another exception; ``check`` exits 0 or 2, and with 2 prints
  exactly one line.
* **deploy_* arguments -> the deploy handlers**: random argument objects for every action.
  Invariant: a result or a DeployError (``ok: false`` with the reason), never another
  exception; the deployer keeps working.
* **A deploy archive -> a running agent on a private Mosquitto**: random bytes, gzip, tar
  archives of random members (names with ``..``, ``/``, NUL, surrogates and non-UTF-8 bytes;
  links, devices, folders; random sizes), good bundles with a member added or a manifest
  mutated. Interleaved good deploys under unique ids. Invariant: every commit is answered,
  ``failed`` with a reason or applied; no refused deploy leaves its folder; every good deploy is
  applied exactly once (its model runs next, and its id is applied once in the device's
  records); the agent answers commands and predicts throughout.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from device_agent import Agent, AgentConfig
from device_agent.benchmark import sample_inputs
from device_agent.bundle import load_bundle
from device_agent.cli import main as agent_main
from device_agent.contracts import messages as msg
from device_agent.deploy import deploy_dir
from device_agent.errors import EdgeshipError
from sdk.remote import CommandClient
from tests.brokers import Mosquitto
from tests.helpers import write_mlp_onnx

FEATURES = 16
SPECIAL_TEXT = [
    "\ud800",
    "a\udfffb",
    "\x00",
    "nul\x00byte",
    "line\nbreak",
    "\x1b[31m",
    "..",
    "../x",
    "/etc/passwd",
    "model.onnx",
    "detector.npz",
    "w.bin",
    "",
    "x" * 300,
    "\U0001f600",
]
texts = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=10),
    st.text(st.characters(categories=["Cs", "Cc"]), max_size=3),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([10**12, 2**31, 2**63, -1, 0, 10**400, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# --- a small bundle with a detector and reference statistics ---------------------------------


def _make_bundle(root: Path, name: str, version: str, seed: int) -> Path:
    from sdk.artifact import read_artifact
    from sdk.detect import fit_detector
    from sdk.package import package
    from sdk.reference import reference_stats, write_reference

    art = read_artifact(write_mlp_onnx(root / f"{name}.onnx", features=FEATURES, seed=seed))
    x = np.random.default_rng(seed).normal(size=(200, FEATURES)).astype(np.float32)
    detector = fit_detector("mahalanobis", {"x": x}, art, out=root / f"{name}-det.npz")
    ref = write_reference(root / f"{name}-ref.json", reference_stats(art.path, detector, {"x": x}))
    bundle = package(
        art, root / name, name="mlp", version=version, detector=detector, reference=ref,
        labels=["a", "b", "c", "d"],
    )  # fmt: skip
    return bundle.root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-bundles")
    return {"v1": _make_bundle(root, "v1", "1", 0), "v2": _make_bundle(root, "v2", "2", 1)}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path in a JSON tree (the root included)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(data: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    if not path:
        return value
    node = data
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "delete":
        del node[last]
    elif op == "add" and isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node[last] = value
    return data


# io.inputs[0].sample_shape for the base's input of shape ["batch", 16]: [1, 16] is valid.
sample_shapes = st.one_of(
    st.just([1, FEATURES]),
    st.sampled_from(
        [
            [1, -FEATURES],
            [-1, FEATURES],
            [0, FEATURES],
            [2, FEATURES],
            [1, 2**31],
            [2**31, FEATURES],
            [10**400, FEATURES],
            [1, float("nan")],
            [float("inf"), FEATURES],
            [1.0, FEATURES],
            [True, FEATURES],
            ["1", FEATURES],
            [1],
            [1, FEATURES, 1],
            [],
            [[1], [FEATURES]],
            [1, _deep(70)],
            {"0": 1},
            None,
        ]
    ),
    st.lists(st.one_of(st.integers(-3, 2**40), numbers), max_size=4),
    json_values,
)


@st.composite
def manifest_bytes(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    data = json.loads(json.dumps(base))
    sampled = draw(st.booleans())
    if sampled:
        # a copy: the sampled lists are shared constants that a later mutation would edit in
        # place, making the next example's strategy differ (Hypothesis: FlakyStrategyDefinition)
        data["io"]["inputs"][0]["sample_shape"] = copy.deepcopy(draw(sample_shapes))
    for _ in range(draw(st.integers(0 if sampled else 1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "delete" and not path:
            op = "replace"
        data = _mutate(data, path, op, copy.deepcopy(draw(json_values)))
    text = json.dumps(data, allow_nan=True).encode()
    raw = draw(
        st.sampled_from(["json", "json", "json", "flip", "cut", "utf8", "dup", "deep", "bytes"])
    )
    if raw == "flip" and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + bytes([text[at] ^ draw(st.integers(1, 255))]) + text[at + 1 :]
    elif raw == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif raw == "utf8":
        text = text.replace(b'"mlp"', b'"ml\xff\xfe"', 1)
    elif raw == "dup":
        text = text.replace(b'{"format"', b'{"format": "x", "format"', 1)
    elif raw == "deep":
        depth = draw(st.sampled_from([70, 5000, 200_000]))
        text = text.replace(b'"benchmark": ', b'"benchmark": ' + b"[" * depth + b"0" + b"]" * depth)
    elif raw == "bytes":
        text = draw(st.binary(max_size=64))
    return text


FILE_CHANGES = st.sampled_from(["none", "none", "detector", "reference", "model", "extra", "dir"])


def _apply_file_change(root: Path, change: str, blob: bytes, name: str) -> None:
    """Replace a bundle file and record its new hash (no signing key needed), or add an
    unlisted file or folder."""
    manifest_path = root / "manifest.json"
    if change in ("detector", "reference", "model"):
        target = {"detector": "detector.npz", "reference": "reference.json"}.get(
            change, "model.onnx"
        )
        file = root / target
        real = file.read_bytes()
        if change == "model":  # a prefix of the real model: a protobuf the parsers must refuse
            blob = real[: len(blob) * 7]
        elif blob and blob[0] % 3 == 0:  # the real file cut short (a zip without its end)
            blob = real[: len(real) * blob[-1] // 256]
        elif blob and blob[0] % 3 == 1:  # the real file with bytes flipped
            flipped = bytearray(real)
            for b in blob[1:]:
                flipped[(b * 97) % len(flipped)] ^= b or 1
            blob = bytes(flipped)
        file.write_bytes(blob)
        try:
            data = json.loads(manifest_path.read_bytes())
            data["files"][target] = hashlib.sha256(blob).hexdigest()
            manifest_path.write_text(json.dumps(data, allow_nan=True))
        except (ValueError, KeyError, TypeError, RecursionError):
            pass  # a manifest already broken stays as it is
    elif change == "extra":
        safe = "".join(c for c in name if c.isalnum())[:40] or "x"
        (root / f"{safe}.bin").write_bytes(blob)
    elif change == "dir":
        (root / "sub").mkdir(exist_ok=True)


def _check_one_line(root: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = agent_main(["check", str(root), "--runs", "1"])
    return code, err.getvalue()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_bundle_directory_into_the_agent(bundles: dict[str, Path], data: Any) -> None:
    base = json.loads((bundles["v1"] / "manifest.json").read_bytes())
    mutate_manifest = data.draw(st.booleans())
    change = data.draw(FILE_CHANGES)
    blob = data.draw(st.binary(max_size=200))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(bundles["v1"], Path(tmp) / "bundle"))
        if mutate_manifest:
            (root / "manifest.json").write_bytes(data.draw(manifest_bytes(base)))
        _apply_file_change(root, change, blob, data.draw(texts))
        loaded = None
        try:
            loaded = load_bundle(root)
        except EdgeshipError as exc:
            assert str(exc)
            str(exc).encode("utf-8")  # the message itself always encodes
        if loaded is not None:
            try:
                cfg = AgentConfig(device_id="fz", state_dir=Path(tmp) / "state")
                with Agent.from_bundle(root, cfg) as agent:
                    agent.predict(sample_inputs(loaded.manifest.io))
            except EdgeshipError as exc:
                str(exc).encode("utf-8")
        code, err = _check_one_line(root)
        event(f"check exit {code}, loaded: {loaded is not None}, files: {change}")
        assert code in (0, 2), err
        if code == 2:
            assert err.count("\n") == 1 and err.startswith("edgeship-agent: error: "), err
        if loaded is None:
            assert code == 2
        if not mutate_manifest and change == "none":
            assert code == 0, err


# --- deploy arguments -------------------------------------------------------------------------

ACTIONS = ["deploy_begin", "deploy_chunk", "deploy_commit", "deploy_status", "deploy_abort"]
ACTIONS += ["deploy_revert"]
ARG_KEYS = ["deploy", "size", "sha256", "chunks", "chunk_bytes", "model", "model_version"]
ARG_KEYS += ["index", "data", "reason"]
arg_values = st.one_of(
    json_values,
    st.sampled_from(["d1", "0" * 64, "AAAA", ".", "..", 512, 1024, 1, 2]),
    st.just(_deep(60)),
)


def _command(action: str, args: Any) -> msg.Command:
    return msg.Command(id=uuid.uuid4().hex[:12], action=action, ts=time.time(), args=args)


@st.composite
def consistent_begins(draw: st.DrawFn) -> dict[str, Any]:
    """A deploy_begin whose numbers agree with each other (so it gets past the arithmetic):
    tiny chunks of a large archive included, with random labels."""
    size = draw(st.sampled_from([1, 300, 2**20, 8 * 2**20, 256 * 2**20]))
    chunk = draw(st.sampled_from([1, 7, 256, 512, 4096, 131072, size]))
    return {
        "deploy": draw(st.sampled_from(["d1", "d2"])),
        "size": size,
        "sha256": "0" * 64,
        "chunks": -(-size // chunk),
        "chunk_bytes": chunk,
        "model": draw(st.none() | texts),
        "model_version": draw(st.none() | texts),
    }


def _encodes(value: Any) -> None:
    """What the agent sends must be strict JSON in UTF-8 (no NaN, no lone surrogate)."""
    json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(ACTIONS),
                st.dictionaries(st.sampled_from(ARG_KEYS) | texts, arg_values, max_size=6),
            ),
            st.tuples(st.just("deploy_begin"), consistent_begins()),
            st.tuples(
                st.sampled_from(["deploy_commit", "deploy_abort", "deploy_status"]),
                st.fixed_dictionaries({"deploy": st.sampled_from(["d1", "d2"])}),
            ),
            st.tuples(
                st.just("deploy_revert"),
                st.fixed_dictionaries(
                    {"deploy": st.sampled_from(["d1", "d2"])}, optional={"reason": arg_values}
                ),
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_deploy_arguments_are_a_result_or_a_deploy_error(
    deploy_agent: Agent, steps: list[tuple[str, dict[str, Any]]]
) -> None:
    import tracemalloc

    from device_agent.deploy import DeployError

    handlers = deploy_agent.command_handlers
    tracemalloc.start()
    try:
        for action, args in steps:
            if action == "deploy_begin" and "deploy" not in args:
                args = {"deploy": "d1", **args}
            try:
                result = handlers[action](_command(action, args))
            except DeployError as exc:
                _encodes(str(exc))
            else:
                _encodes(result)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Whatever begin claimed, what the deployer keeps stays small (finding 4).
    assert peak < 4 * 2**20, peak
    event = deploy_agent.deployer.last_event
    if event is not None:
        _encodes(event.to_dict())  # it goes out in the next telemetry window
    # The deployer still works: a well-formed begin opens an upload.
    begin = {"deploy": "ok", "size": 2048, "sha256": "0" * 64, "chunks": 4, "chunk_bytes": 512}
    assert handlers["deploy_begin"](_command("deploy_begin", begin))["state"] == "receiving"
    assert handlers["deploy_status"](_command("deploy_status", {"deploy": "ok"}))["chunks"] == 4


@pytest.fixture(scope="module")
def deploy_agent(
    bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    """An agent without a broker: the deploy handlers are called directly."""
    cfg = AgentConfig(device_id="pi-f", state_dir=tmp_path_factory.mktemp("deploy-state"))
    with Agent.from_bundle(bundles["v1"], cfg) as agent:
        yield agent


# --- deploy archives through MQTT -------------------------------------------------------------


class _Field:
    """A running agent on a private Mosquitto, and a command client."""

    def __init__(self, agent: Agent, client: CommandClient) -> None:
        self.agent = agent
        self.client = client
        self.good = 0


@pytest.fixture(scope="module")
def field(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Field]:
    work = tmp_path_factory.mktemp("fuzz-deploy")
    with Mosquitto(work / "broker") as broker:
        fleet = f"z{uuid.uuid4().hex[:10]}"
        cfg = AgentConfig(
            device_id="pi-z",
            fleet=fleet,
            broker_url=broker.url,
            window_s=0.5,
            state_dir=work / "state",
            deploy_probation_inferences=0,
        )
        with Agent.from_bundle(bundles["v1"], cfg) as agent:
            deadline = time.monotonic() + 15
            while not agent.stats.get("connected") and time.monotonic() < deadline:
                time.sleep(0.05)
            with CommandClient(broker.url, fleet, "pi-z") as client:
                yield _Field(agent, client)


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes | None:
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for info, blob in entries:
                if blob is not None:
                    info.size = len(blob)
                tar.addfile(info, None if blob is None else io.BytesIO(blob))
    except (ValueError, UnicodeError, tarfile.TarError):
        return None  # a name tarfile itself cannot write
    return buf.getvalue()


def _bundle_entries(root: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (tarfile.TarInfo(p.relative_to(root).as_posix()), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


member_names = st.one_of(
    st.sampled_from(
        ["manifest.json", "model.onnx", "w.bin", "sub/x", "./a", "../up", "/abs", "a/../../b",
         "a\\b", "dir/", "n\x00ul", "sur\udcffrogate", "line\nbreak", "x" * 120]
    ),
    texts,
)  # fmt: skip
member_types = st.sampled_from(
    [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
     tarfile.FIFOTYPE, tarfile.CHRTYPE]
)  # fmt: skip


@st.composite
def archives(draw: st.DrawFn, bundles: dict[str, Path]) -> tuple[str, bytes, bool]:
    """``(kind, archive, unlisted)``: ``unlisted`` when a good bundle got a member that names
    a file or folder (which the device must refuse)."""
    kind = draw(st.sampled_from(["bytes", "members", "extra", "manifest", "gzip-members"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=2048)), False
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if kind in ("extra", "manifest"):
        entries = _bundle_entries(bundles["v2"])
    if kind == "manifest":
        base = json.loads((bundles["v2"] / "manifest.json").read_bytes())
        blob = draw(manifest_bytes(base))
        entries = [(i, blob if i.name == "manifest.json" else b) for i, b in entries]
    unlisted = False
    for _ in range(draw(st.integers(0 if kind == "manifest" else 1, 4))):
        info = tarfile.TarInfo(draw(member_names))
        if kind == "extra":
            unlisted |= any(p != "." for p in PurePosixPath(info.name).parts)
        info.type = draw(member_types)
        if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = draw(st.sampled_from(["/etc/passwd", "model.onnx", "../x"]))
        content = draw(st.binary(max_size=300)) if info.type == tarfile.REGTYPE else None
        at = draw(st.integers(0, len(entries)))
        entries.insert(at, (info, content))
    data = _tar_bytes(entries)
    if data is None:
        return "bytes", draw(st.binary(max_size=64)), False
    if kind == "gzip-members" or draw(st.booleans()):
        data = gzip.compress(data, mtime=0)
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated in transit, rehashed
    return kind, data, unlisted


def _deploy(
    client: CommandClient, deploy_id: str, archive: bytes, chunk: int = 512
) -> msg.CommandReply:
    """begin, chunks of ``chunk`` bytes (the last one shorter), commit."""
    size = len(archive)
    chunk = min(chunk, max(1, size))
    chunks = -(-size // chunk)
    sha = hashlib.sha256(archive).hexdigest()
    args = {"deploy": deploy_id, "size": size, "sha256": sha, "chunks": chunks,
            "chunk_bytes": chunk}  # fmt: skip
    begin = client.call("deploy_begin", args, timeout_s=20)
    if not begin.ok:
        return begin  # an empty archive: size 0 is refused at begin
    for i in range(chunks):
        part = archive[i * chunk : (i + 1) * chunk]
        sent = client.call(
            "deploy_chunk",
            {"deploy": deploy_id, "index": i, "data": base64.b64encode(part).decode(),
             "sha256": hashlib.sha256(part).hexdigest()},
            timeout_s=20,
        )  # fmt: skip
        assert sent.ok, sent.error
    return client.call("deploy_commit", {"deploy": deploy_id}, timeout_s=30)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_deploy_archives_into_a_running_agent(
    bundles: dict[str, Path], field: _Field, data: Any
) -> None:
    from sdk.deploy import pack_bundle

    agent, client = field.agent, field.client
    bundles_dir = deploy_dir(agent.config) / "bundles"
    kind, archive, unlisted = data.draw(archives(bundles))
    deploy_id = f"f{uuid.uuid4().hex[:12]}"
    before = agent.bundle.manifest.model.version
    # Several chunks for small archives; larger ones (a deeply nested manifest) in 16 KiB.
    reply = _deploy(client, deploy_id, archive, chunk=512 if len(archive) < 8192 else 16384)
    event(f"{kind}: {reply.result['state'] if reply.ok else reply.error}")
    if reply.ok:
        state = reply.result["state"]
        assert state in ("failed", "applied"), reply
        if state == "failed":
            assert reply.result["reason"]
            assert not (bundles_dir / deploy_id).exists(), kind
            assert agent.bundle.manifest.model.version == before
        else:
            assert not unlisted, kind
    else:
        assert reply.error and len(archive) == 0, reply
    # A good deploy now and then, alternating versions under fresh ids: applied, once.
    if data.draw(st.booleans()):
        field.good += 1
        target = "v2" if agent.bundle.manifest.model.version == "1" else "v1"
        good_id = f"g{field.good}-{uuid.uuid4().hex[:8]}"
        good = _deploy(client, good_id, pack_bundle(bundles[target]), chunk=16384)
        assert good.ok and good.result["state"] == "applied", good
        assert agent.bundle.manifest.model.version == target[1:]
        # Applied once: a repeated commit gets the same answer and changes nothing.
        again = client.call("deploy_commit", {"deploy": good_id}, timeout_s=20)
        assert again.ok and again.result == good.result
        status = client.call("deploy_status", {"deploy": good_id}, timeout_s=20)
        assert status.ok and status.result["state"] == "applied", status
        assert agent.bundle.manifest.model.version == target[1:]
    # The agent keeps answering and predicting.
    status = client.call("deploy_status", {"deploy": deploy_id}, timeout_s=20)
    assert status.ok or "no deploy" in (status.error or ""), status
    x = np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
    assert agent.predict({"x": x}).outputs[0].shape == (1, 4)
    kept = {p.name for p in bundles_dir.iterdir()} if bundles_dir.exists() else set()
    assert len(kept) <= 2, kept  # the current bundle and the previous one, nothing refused
