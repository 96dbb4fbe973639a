"""Timing candidate models on a device over the fleet channel (issue 16), end to end: a real
Agent on the shared Mosquitto with an application thread calling predict the whole time, and
``sdk.remote_bench.benchmark_candidate`` on the host. A candidate is timed in a child process
of the agent (its own pid, niced, its own peak RSS) with 0 failed application calls; the same
file is not sent twice; removal works; an oversized candidate, a tampered chunk, an unsigned or
wrongly signed candidate (with trusted keys) are refused before anything runs; a candidate whose
runtime fails to load it or crashes is answered with an error while the agent keeps serving."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent, AgentConfig
from device_agent.candidate_bench import NICE
from device_agent.candidates import CandidateStore, candidates_dir
from device_agent.contracts.commands import candidate_id
from device_agent.sysinfo import SysInfo
from sdk.remote import CommandClient, RemoteError
from sdk.remote_bench import benchmark_candidate, candidate_signature
from tests.helpers import write_mlp_onnx
from tests.test_deploy import BROKER, FEATURES, _bundle, _device, _fleet

FAST = {"min_runs": 30, "min_seconds": 0.2, "warmup_runs": 2, "max_seconds": 60.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    corrupt = root / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not an onnx protobuf" * 100)
    return {
        "bundle": _bundle(root, "v1", "1", features=FEATURES, seed=0),
        # Wider than the bundle's model, same input: ~140 KiB, several chunks of 16 KiB.
        "wide": write_mlp_onnx(root / "wide.onnx", features=FEATURES, hidden=2048, seed=5),
        "other": write_mlp_onnx(root / "other.onnx", features=8, seed=6),
        "corrupt": corrupt,
    }


def _children(needle: str, parent: int | None = None) -> list[int]:
    """Pids of the children of ``parent`` (this test process) whose command line holds
    ``needle``."""
    parent = os.getpid() if parent is None else parent
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and needle in cmdline:
            out.append(int(entry.name))
    return out


def test_a_candidate_is_timed_in_a_child_process_while_the_application_keeps_serving(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    with _device(models["bundle"], tmp_path / "state", fleet) as (agent, traffic):
        report = benchmark_candidate(
            BROKER, fleet, "pi-d", models["wide"], chunk_bytes=16384, remove=False, **FAST
        )
        lat = report["latency_ms"]
        assert report["runtime"] == "onnxruntime" and report["runtime_version"]
        assert report["runs"] >= FAST["min_runs"] and not report["capped"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        # Timed in a process of its own at a lower priority, with one runtime thread.
        assert report["pid"] != os.getpid() and report["threads"] == 1
        assert report["nice"] == min(19, os.nice(0) + NICE)
        assert report["peak_rss_mb"] >= report["baseline_rss_mb"] > 0
        assert report["rss_increase_mb"] >= 0
        assert report["inputs_from"] == "bundle" and report["input_shapes"] == {"x": [1, 16]}
        # Where it was measured, from the device's own facts.
        assert report["device"]["cpu"] == SysInfo().cpu_name()
        assert report["device"]["cores"] == SysInfo().cpu_count()
        assert report["measured_on"].startswith("device pi-d: ")
        # The application's calls during the benchmark, as the agent saw them.
        app = report["application"]
        assert app["calls"] > 0 and app["failed"] == 0, app
        assert app["latency_ms"]["p50"] <= app["latency_ms"]["p95"] <= app["latency_ms"]["max"]
        size = models["wide"].stat().st_size
        assert report["transfer"]["chunks"] == -(-size // 16384) > 3
        assert report["transfer"]["chunks_sent"] == report["transfer"]["chunks"]
        sha = hashlib.sha256(models["wide"].read_bytes()).hexdigest()
        kept = candidates_dir(agent.config) / candidate_id(sha)
        assert report["sha256"] == sha and (kept / "model.onnx").is_file()
        # The same file again: the device has it, nothing is sent; then it is removed.
        again = benchmark_candidate(
            BROKER, fleet, "pi-d", models["wide"], chunk_bytes=16384, threads=2, **FAST
        )
        assert again["transfer"]["chunks_sent"] == 0 and again["threads"] == 2
        assert not kept.exists()
        # Another input than the bundle's: generated from the shapes given.
        other = benchmark_candidate(
            BROKER,
            fleet,
            "pi-d",
            models["other"],
            inputs={"x": {"shape": [4, 8], "dtype": "float32"}},
            remove=False,
            **FAST,
        )
        assert other["inputs_from"] == "args" and other["input_shapes"] == {"x": [4, 8]}
        assert other["batch_size"] == 4
        assert traffic.failures == []
        assert agent.health()["ok"]
    # Candidates do not outlive the agent: one left behind is removed when it starts again.
    assert (candidates_dir(agent.config) / other["candidate"]).is_dir()
    Agent.from_bundle(models["bundle"], agent.config).start().close()
    assert not candidates_dir(agent.config).exists()


@pytest.mark.tflite
def test_a_tflite_candidate_is_timed_by_litert(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    litert_torch = pytest.importorskip("litert_torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    path = tmp_path / "tiny.tflite"
    litert_torch.convert(model, (torch.randn(1, 16),)).export(str(path))
    fleet = _fleet()
    with _device(models["bundle"], tmp_path / "state", fleet) as (_, traffic):
        report = benchmark_candidate(BROKER, fleet, "pi-d", path, **FAST)
        assert report["runtime"] == "litert" and report["format"] == "tflite"
        assert report["runs"] >= FAST["min_runs"]
        assert report["application"]["failed"] == 0
        assert traffic.failures == []


def _begin(client: CommandClient, data: bytes, sha: str, **extra: Any) -> Any:
    args = {
        "candidate": candidate_id(sha),
        "size": len(data),
        "sha256": sha,
        "chunks": 1,
        "chunk_bytes": len(data),
        "format": "onnx",
        **extra,
    }
    return client.call("candidate_begin", args)


def _chunk(client: CommandClient, data: bytes, sha: str, chunk_sha: str | None = None) -> Any:
    args = {
        "candidate": candidate_id(sha),
        "index": 0,
        "data": base64.b64encode(data).decode(),
        "sha256": chunk_sha or hashlib.sha256(data).hexdigest(),
    }
    return client.call("candidate_chunk", args)


def test_oversized_tampered_and_unknown_candidates_are_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    with _device(models["bundle"], tmp_path / "state", fleet, candidate_max_bytes=64 * 1024) as (
        agent,
        traffic,
    ):
        with pytest.raises(
            RemoteError, match=r"argument 'size': expected an integer in \[1, 65536"
        ):
            benchmark_candidate(BROKER, fleet, "pi-d", models["wide"], **FAST)
        good = models["other"].read_bytes()
        sha = hashlib.sha256(good).hexdigest()
        with CommandClient(BROKER, fleet, "pi-d") as client:
            assert _begin(client, good, sha).result["state"] == "receiving"
            # A chunk that does not match its own SHA-256 (damaged in transit).
            damaged = bytearray(good)
            damaged[10] ^= 0xFF
            reply = _chunk(client, bytes(damaged), sha, chunk_sha=hashlib.sha256(good).hexdigest())
            assert not reply.ok and "does not match its SHA-256" in reply.error
            # Chunks that match themselves but not the file announced: refused when joined.
            reply = _chunk(client, bytes(damaged), sha)
            assert not reply.ok and "does not match the SHA-256 announced" in reply.error
            reply = client.call("benchmark", {"candidate": candidate_id(sha), **FAST})
            assert not reply.ok and "no candidate" in reply.error
            reply = client.call("candidate_remove", {"candidate": candidate_id(sha)})
            assert reply.ok and reply.result["removed"] is False
        assert traffic.failures == [] and agent.health()["ok"]


def test_with_trusted_keys_only_a_signed_candidate_is_timed(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from sdk.signing import generate_signing_key, sign_bundle

    trusted = generate_signing_key(tmp_path / "keys", "fleet")
    other = generate_signing_key(tmp_path / "keys", "other")
    assert trusted.public is not None
    bundle = tmp_path / "signed"
    shutil.copytree(models["bundle"], bundle)
    sign_bundle(bundle, trusted.private)
    fleet = _fleet()
    keys = (str(trusted.public),)
    with _device(bundle, tmp_path / "state", fleet, trusted_keys=keys) as (agent, traffic):
        root = candidates_dir(agent.config)
        with pytest.raises(RemoteError, match="not signed"):
            benchmark_candidate(BROKER, fleet, "pi-d", models["other"], **FAST)
        with pytest.raises(RemoteError, match="not among this agent's trusted_keys"):
            benchmark_candidate(BROKER, fleet, "pi-d", models["other"], key=other.private, **FAST)
        # A signature by the trusted key over another file's SHA-256 does not verify.
        data = models["other"].read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        forged = candidate_signature(hashlib.sha256(b"x").hexdigest(), trusted.private)
        with CommandClient(BROKER, fleet, "pi-d") as client:
            reply = _begin(client, data, sha, signature=forged.to_args())
            assert not reply.ok and "does not verify" in reply.error
        assert not (root / "staging").exists()  # refused before anything was stored
        report = benchmark_candidate(
            BROKER, fleet, "pi-d", models["other"], key=trusted.private, **FAST
        )
        assert report["runs"] >= FAST["min_runs"] and report["application"]["failed"] == 0
        assert traffic.failures == []


def test_a_candidate_that_fails_or_crashes_is_an_error_and_the_agent_keeps_serving(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    with _device(models["bundle"], tmp_path / "state", fleet) as (agent, traffic):
        # A corrupt model file with a valid hash: its runtime cannot load it.
        with pytest.raises(RemoteError, match=r"cannot be timed: .*ONNX Runtime cannot load"):
            benchmark_candidate(BROKER, fleet, "pi-d", models["corrupt"], **FAST)
        # A runtime that dies in the middle (SIGSEGV): the child, never the agent.
        errors: list[BaseException] = []

        def bench() -> None:
            try:
                benchmark_candidate(
                    BROKER, fleet, "pi-d", models["wide"], min_seconds=30, max_seconds=60
                )
            except RemoteError as exc:
                errors.append(exc)

        thread = threading.Thread(target=bench)
        thread.start()
        deadline = time.monotonic() + 30
        while not (pids := _children("device_agent.candidate_bench")):
            assert time.monotonic() < deadline, "the benchmark process never started"
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(pids[0], signal.SIGSEGV)
        thread.join(60)
        assert len(errors) == 1 and "crashed (SIGSEGV)" in str(errors[0]), errors
        traffic.wait_count(5)
        assert traffic.failures == [] and agent.health()["ok"]
        report = benchmark_candidate(BROKER, fleet, "pi-d", models["other"], **FAST)
        assert report["runs"] >= FAST["min_runs"]


def test_closing_the_agent_ends_a_candidate_benchmark_at_once(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    with _device(models["bundle"], tmp_path / "state", fleet) as (agent, _):
        errors: list[BaseException] = []

        def bench() -> None:
            try:
                benchmark_candidate(
                    BROKER, fleet, "pi-d", models["wide"], min_seconds=60, max_seconds=120,
                    timeout_s=30,
                )  # fmt: skip
            except RemoteError as exc:
                errors.append(exc)

        thread = threading.Thread(target=bench, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not _children("device_agent.candidate_bench"):
            assert time.monotonic() < deadline, "the benchmark process never started"
            time.sleep(0.05)
        started = time.monotonic()
        agent.close()
        assert time.monotonic() - started < 15
        assert _children("device_agent.candidate_bench") == []


def test_at_most_candidate_keep_candidates_are_kept(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    files = [
        write_mlp_onnx(tmp_path / f"m{i}.onnx", features=FEATURES, seed=20 + i) for i in (0, 1, 2)
    ]
    ids = [candidate_id(hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]
    with _device(models["bundle"], tmp_path / "state", fleet, candidate_keep=2) as (agent, traffic):
        root = candidates_dir(agent.config)
        for f in files:
            benchmark_candidate(BROKER, fleet, "pi-d", f, remove=False, **FAST)
        # The oldest went when the third began.
        assert sorted(p.name for p in root.glob("c*")) == sorted(ids[1:])
        assert traffic.failures == []


def test_no_candidate_is_kept_past_candidate_ttl_s(tmp_path: Path) -> None:
    """The store itself, with the agent's clock injected: a candidate older than
    candidate_ttl_s is removed at the next candidate_begin, a younger one is kept."""
    now = [1000.0]
    store = CandidateStore(
        AgentConfig(device_id="pi-t", state_dir=tmp_path, candidate_ttl_s=60.0),
        clock=lambda: now[0],
    )
    datas = [write_mlp_onnx(tmp_path / f"t{i}.onnx", seed=30 + i).read_bytes() for i in (0, 1)]
    shas = [hashlib.sha256(d).hexdigest() for d in datas]

    def send(data: bytes, sha: str) -> None:
        args = {"candidate": candidate_id(sha), "size": len(data), "sha256": sha, "chunks": 1,
                "chunk_bytes": len(data), "format": "onnx"}  # fmt: skip
        assert store.begin(args)["state"] == "receiving"
        chunk = {"candidate": candidate_id(sha), "index": 0, "sha256": sha,
                 "data": base64.b64encode(data).decode()}  # fmt: skip
        assert store.chunk(chunk)["state"] == "ready"

    send(datas[0], shas[0])
    now[0] += 59
    send(datas[1], shas[1])
    assert store.ready(candidate_id(shas[0])).sha256 == shas[0]
    now[0] += 2  # the first is 61 s old, the second 2 s
    again = {"candidate": candidate_id(shas[1]), "size": len(datas[1]), "sha256": shas[1],
             "chunks": 1, "chunk_bytes": len(datas[1]), "format": "onnx"}  # fmt: skip
    assert store.begin(again)["state"] == "ready"
    assert sorted(p.name for p in store.root.glob("c*")) == [candidate_id(shas[1])]


def test_docs_describe_every_candidate_argument_and_result_field() -> None:
    import dataclasses
    import re

    from device_agent.contracts import commands as cmds

    agent_md = (Path(__file__).resolve().parent.parent / "docs" / "agent.md").read_text()
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| `(candidate_[a-z]+)` \|.*$", agent_md, re.M)
    }
    uses: dict[str, tuple[type, ...]] = {
        "candidate_begin": (cmds.CandidateBegin, cmds.CandidateReply),
        "candidate_chunk": (cmds.CandidateChunk, cmds.CandidateChunkReply),
        "candidate_remove": (cmds.CandidateRef,),
    }
    for action, types in uses.items():
        for kind in types:
            names = (
                [f.name for f in dataclasses.fields(kind)]
                if dataclasses.is_dataclass(kind)
                else list(kind.__annotations__)
            )
            for name in names:
                assert re.search(rf"\b{name}\b", rows[action]), f"{action}: {name!r} not in docs"
    for key in ("candidate_max_bytes", "candidate_keep", "candidate_ttl_s"):
        assert f"{key} = " in agent_md, key


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an init that does not reap is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_timing_process_ends_itself_when_its_agent_is_killed(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    fleet = _fleet()
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.agent_process", "--bundle", str(models["bundle"]),
         "--broker", BROKER, "--fleet", fleet, "--device", "pi-k", "--state",
         str(tmp_path / "state")],
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        errors: list[BaseException] = []

        def bench() -> None:
            try:
                benchmark_candidate(
                    BROKER, fleet, "pi-k", models["wide"], min_seconds=120, max_seconds=300,
                    timeout_s=60,
                )  # fmt: skip
            except RemoteError as exc:
                errors.append(exc)

        thread = threading.Thread(target=bench, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not (children := _children("candidate_bench", agent.pid)):
            assert time.monotonic() < deadline, "the benchmark process never started"
            time.sleep(0.1)
        child = children[0]
        time.sleep(0.5)
        assert _alive(child)
        agent.kill()
        agent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the timing process outlived its agent"
            time.sleep(0.1)
    finally:
        agent.kill()
        agent.wait(10)
