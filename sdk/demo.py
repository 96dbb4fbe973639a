"""``edgeship demo``: the host pipeline end to end on scikit-learn's bundled digits.

Train (or reuse) a small CNN, export it to ONNX, write calibration and eval data, optimize under
a Raspberry Pi budget, bundle the choice and sign the bundle with an Ed25519 key kept in the
work directory (``keys/``); the fleet's agents only accept bundles signed by that key. Every
artifact lands in the work directory so a newcomer can look at each one, and a second run
reuses the trained model and the key.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

__all__ = [
    "DEMO_KEY_NAME",
    "demo_signing_key",
    "make_replay",
    "prepare_digits",
    "run_fleet_demo",
    "run_host_demo",
]

DEMO_KEY_NAME = "demo-signing"


def prepare_digits(workdir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Train and export the digits CNN into ``workdir`` unless already there.

    Returns the paths of ``model`` (fp32 ONNX), ``calibration`` and ``eval`` (.npz).
    """
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, load_digits_splits

    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / "digits.onnx"
    cal_path = workdir / "calibration.npz"
    eval_path = workdir / "eval.npz"
    info_path = workdir / "digits.json"
    splits = load_digits_splits(seed)
    if not (onnx_path.is_file() and info_path.is_file()):
        import torch

        from sdk.export import export
        from sdk.zoo.digits import train_digits_cnn

        print("training a CNN on scikit-learn's bundled digits (about 10 s)...", flush=True)
        start = time.perf_counter()
        # One thread: this small CNN trains fastest that way, above all on a busy machine.
        torch.set_num_threads(1)
        model, acc = train_digits_cnn(splits, seed=seed)
        print(f"  fp32 test accuracy {acc:.2%} ({time.perf_counter() - start:.1f} s)")
        art = export(
            model,
            (torch.from_numpy(splits.x_cal[:4]),),
            to="onnx",
            path=onnx_path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
        print(f"  exported {art.path} (max |onnx - torch| = {art.details.get('max_abs_diff')})")
        info_path.write_text(json.dumps({"fp32_test_accuracy": acc, "seed": seed}) + "\n")
    else:
        print(f"reusing the trained model in {onnx_path}")
    cal: dict[str, Any] = {INPUT_NAME: splits.x_cal}
    evaluation: dict[str, Any] = {INPUT_NAME: splits.x_test, "labels": splits.y_test}
    np.savez(cal_path, **cal)
    np.savez(eval_path, **evaluation)
    return {"model": onnx_path, "calibration": cal_path, "eval": eval_path}


def demo_signing_key(workdir: Path) -> tuple[Path, Path, str]:
    """The demo's Ed25519 key pair under ``workdir/keys``: ``(private, public, key id)``.

    Generated on the first run; a later run reuses the private key (and rewrites the public
    file from it when that is missing or does not match), so the agents' trusted key stays the
    same across runs.
    """
    from cryptography.hazmat.primitives import serialization

    from device_agent.signing import fingerprint, load_private_key
    from sdk.signing import generate_signing_key

    keys = workdir / "keys"
    private = keys / f"{DEMO_KEY_NAME}.pem"
    public = keys / f"{DEMO_KEY_NAME}.pub.pem"
    if not private.exists():
        public.unlink(missing_ok=True)  # a public key without its private key is useless here
        generated = generate_signing_key(keys, DEMO_KEY_NAME)
        return generated.private, public, generated.key_id
    key = load_private_key(private).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.is_file() or public.read_bytes() != pem:
        public.write_bytes(pem)
    return private, public, fingerprint(key)


def run_host_demo(workdir: Path, *, target: str = "rpi4", budget: str = "") -> int:
    """Run the host demo; return the CLI exit code (0 when the budget is met).

    The bundle (``workdir/bundle``) is signed with :func:`demo_signing_key`."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from sdk.targets import get_target

    parsed = parse_budget(budget)
    profile = get_target(target)
    files = prepare_digits(workdir)
    print(f"optimizing for {profile.description} under budget {parsed.describe()}...", flush=True)
    report = optimize(
        files["model"],
        calibration=files["calibration"],
        eval_data=files["eval"],
        out=workdir / "bundle",
        config=OptimizeConfig(
            target=profile,
            budget=parsed,
            name="digits-cnn",
            labels=tuple(str(i) for i in range(10)),
            min_seconds=1.0,
        ),
        progress=True,
    )
    print(report.summary())
    if (workdir / "bundle" / "manifest.json").is_file():
        from sdk.signing import sign_bundle

        private, public, _ = demo_signing_key(workdir)
        _, signed_by = sign_bundle(workdir / "bundle", private)
        print(
            f"\nsigned the bundle with Ed25519 key {signed_by}\n  private key {private}\n"
            f"  public key {public} (the agents' trusted key)"
        )
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    print(f"\nreport: {report_path}\nnext: edgeship inspect {report.bundle}")
    return 0 if report.meets_budget else 1


# --- the fleet demo -------------------------------------------------------------------------

CORRUPTIONS = ("noise", "inverted", "random")


def make_replay(
    x: np.ndarray, *, seed: int, corrupt_share: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits with a share replaced by corrupted inputs; returns (inputs, is_corrupt).

    Corruptions cycle through Gaussian noise (sigma 0.5, clipped to [0, 1]), inverted images
    and uniformly random pixels.
    """
    rng = np.random.default_rng(seed)
    images = x[rng.permutation(len(x))].copy()
    corrupt = np.zeros(len(images), dtype=bool)
    picks = rng.choice(len(images), size=round(corrupt_share * len(images)), replace=False)
    for k, i in enumerate(picks):
        kind = CORRUPTIONS[k % len(CORRUPTIONS)]
        if kind == "noise":
            images[i] = np.clip(images[i] + rng.normal(0.0, 0.5, images[i].shape), 0.0, 1.0)
        elif kind == "inverted":
            images[i] = 1.0 - images[i]
        else:
            images[i] = rng.random(images[i].shape)
        corrupt[i] = True
    return images.astype(np.float32), corrupt


def _get_json(url: str, timeout: float = 3.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_api(url: str, proc: Any, timeout_s: float = 60.0) -> None:
    import urllib.error

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the collector exited at start (code {proc.returncode}); see its log")
        try:
            _get_json(url)
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.3)
    raise DemoError(f"the collector's API did not answer at {url} within {timeout_s:g} s")


class DemoError(Exception):
    """The demo could not set up one of its processes."""


def _fleet_table(snapshot: dict[str, Any]) -> str:
    from sdk.terminal import printable

    rows = [
        f"  {'device':<8}{'state':<9}{'model':<16}{'p95 ms':>8}{'inferences':>11}"
        f"{'outlier rate':>13}{'gaps':>6}"
    ]
    for d in snapshot.get("devices", []):
        lat = d.get("latency_ms") or d.get("latency") or {}
        p95 = lat.get("p95")
        rate = d.get("outlier_rate")
        gaps = d.get("gaps", {})
        missing = gaps.get("missing", 0) if isinstance(gaps, dict) else gaps
        # What the agents reported, through the collector: escaped for the terminal.
        model = printable(f"{d.get('model') or '?'} v{d.get('model_version') or '?'}")
        device, status = printable(d.get("device", "?")), printable(d.get("status", "?"))
        rows.append(
            f"  {device:<8}{status:<9}{model:<16}"
            f"{'-' if p95 is None else f'{p95:.3f}':>8}{d.get('inferences', 0):>11}"
            f"{'-' if rate is None else f'{rate:.1%}':>13}{missing:>6}"
        )
    return "\n".join(rows)


def _detection(log_path: Path, corrupt: np.ndarray) -> dict[str, int]:
    counts = {"injected": 0, "caught": 0, "clean": 0, "false_alarms": 0}
    if not log_path.is_file():
        return counts
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short when the agent stopped
        if row["index"] >= len(corrupt):
            continue
        if corrupt[row["index"]]:
            counts["injected"] += 1
            counts["caught"] += int(row["outlier"])
        else:
            counts["clean"] += 1
            counts["false_alarms"] += int(row["outlier"])
    return counts


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the demo the way Ctrl-C (SIGINT) does: a KeyboardInterrupt, so
    the same code stops every process the demo started. ``timeout``, ``kill`` and service
    managers send SIGTERM, a closed terminal SIGHUP; neither reaches the children, which run
    in sessions of their own. The first one interrupts; later ones are ignored, so that they
    do not cut the cleanup short (a SIGKILL still ends it, and the children then get SIGTERM
    from the kernel: :mod:`sdk.children`). Only in the main thread, where Python runs signal
    handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if caught:
            return
        caught.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_fleet_demo(
    workdir: Path,
    *,
    target: str = "rpi4",
    budget: str = "",
    duration_s: float = 60.0,
    agents: int = 3,
    broker_url: str | None = None,
    http: str = "127.0.0.1:9108",
    rate: float = 20.0,
    keep_running: bool = False,
) -> int:
    """The whole story: optimize and bundle, then run a fleet of agents that report to a
    collector through a broker, and show what the fleet saw.

    SIGTERM and SIGHUP stop it as Ctrl-C does, stopping every process it started; those
    processes also get SIGTERM from the kernel if the demo dies without stopping them (killed
    outright, on Linux: :mod:`sdk.children`)."""
    with _stop_signals_interrupt():
        return _run_fleet_demo(
            workdir,
            target=target,
            budget=budget,
            duration_s=duration_s,
            agents=agents,
            broker_url=broker_url,
            http=http,
            rate=rate,
            keep_running=keep_running,
        )


def _run_fleet_demo(
    workdir: Path,
    *,
    target: str,
    budget: str,
    duration_s: float,
    agents: int,
    broker_url: str | None,
    http: str,
    rate: float,
    keep_running: bool,
) -> int:
    import shutil
    import signal
    import subprocess
    import sys

    from sdk.broker import EmbeddedBroker, free_port
    from sdk.children import die_with_parent

    workdir = workdir.resolve()
    print("[1/5] model: train, optimize for the board, bundle, sign", flush=True)
    code = run_host_demo(workdir, target=target, budget=budget)
    bundle = workdir / "bundle"
    if not (bundle / "manifest.json").is_file():
        print("the bundle was not written; stopping", flush=True)
        return 1
    from sdk.zoo.digits import INPUT_NAME, load_digits_splits

    _, public_key, key_id = demo_signing_key(workdir)
    splits = load_digits_splits(0)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    broker = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fleet = "demo"
    interrupted = False
    try:
        if broker_url is None:
            print("[2/5] broker: starting an embedded MQTT broker (amqtt, MQTT 3.1.1)", flush=True)
            broker = EmbeddedBroker(log_file=workdir / "broker.log").start()
            broker_url = broker.url
            # amqtt speaks 3.1.1 only: say so, rather than have every client wait out a v5
            # connect attempt before falling back.
            env["EDGESHIP_AGENT_MQTT_PROTOCOL"] = "3.1.1"
            collector_protocol = "3.1.1"
        else:
            print(f"[2/5] broker: using {broker_url}", flush=True)
            collector_protocol = "auto"
        host, _, port = http.rpartition(":")
        host = host or "127.0.0.1"
        try:
            if not port.isdigit() or int(port) == 0:
                raise OSError("pick a free port")
            with socket.socket() as s:
                s.bind((host, int(port)))
        except OSError:  # taken (or 0): any free port will do for a demo
            port = str(free_port(host))
        api = f"http://{host}:{port}"
        db = workdir / "fleet.db"
        for stale in workdir.glob("fleet.db*"):
            stale.unlink()
        print(f"[3/5] collector: SQLite {db}, dashboard and API on {api}/", flush=True)
        log = open(workdir / "collector.log", "wb")  # noqa: SIM115
        procs.append(
            (
                "collector",
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "sdk.cli",
                        "collect",
                        "--broker",
                        broker_url,
                        "--fleet",
                        fleet,
                        "--store",
                        f"sqlite:///{db}",
                        "--http",
                        f"{host}:{port}",
                        "--client-id",
                        "edgeship-demo-collector",
                        "--protocol",
                        collector_protocol,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=die_with_parent(),
                ),
            )
        )
        _wait_api(f"{api}/api/health", procs[0][1])

        print(
            f"[4/5] fleet: {agents} agents replaying held-out digits, 20% of them corrupted "
            f"({', '.join(CORRUPTIONS)}); they only accept bundles signed by {key_id}",
            flush=True,
        )
        truths: dict[str, np.ndarray] = {}
        agent_root = workdir / "agents"
        shutil.rmtree(agent_root, ignore_errors=True)
        for i in range(1, agents + 1):
            device = f"pi-{i}"
            home = agent_root / device
            home.mkdir(parents=True)
            images, corrupt = make_replay(splits.x_test, seed=i)
            replay_file = home / "replay.npz"
            arrays: dict[str, Any] = {INPUT_NAME: images}
            np.savez(replay_file, **arrays)
            truths[device] = corrupt
            log = open(home / "agent.log", "wb")  # noqa: SIM115
            procs.append(
                (
                    device,
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "device_agent.cli",
                            "run",
                            "--bundle",
                            str(bundle),
                            "--broker",
                            broker_url,
                            "--fleet",
                            fleet,
                            "--device-id",
                            device,
                            "--replay",
                            str(replay_file),
                            "--replay-rate",
                            str(rate),
                            "--window",
                            "2",
                            "--http",
                            "off",
                            "--state-dir",
                            str(home / "state"),
                            "--trusted-key",
                            str(public_key),
                            "--replay-log",
                            str(home / "replay.jsonl"),
                            # info: the start line says whose signature was verified
                            "--log-level",
                            "info",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                        preexec_fn=die_with_parent(),
                    ),
                )
            )

        print(
            f"[5/5] running for {duration_s:g} s (Ctrl-C to stop early); watch {api}/", flush=True
        )
        start = time.monotonic()
        snapshot: dict[str, Any] = {}
        try:
            while True:
                elapsed = time.monotonic() - start
                if elapsed >= duration_s:
                    break
                time.sleep(min(5.0, duration_s - elapsed))
                for name, p in procs:
                    if p.poll() is not None:
                        raise DemoError(
                            f"{name} exited early (code {p.returncode}); see {workdir} for its log"
                        )
                try:
                    snapshot = _get_json(f"{api}/api/devices")
                except OSError:
                    continue
                s = snapshot.get("summary", {})
                print(
                    f"  {time.monotonic() - start:5.0f} s: {s.get('online', 0)} online, "
                    f"{s.get('inferences', 0)} inferences, {s.get('outliers', 0)} outliers, "
                    f"{s.get('missing', 0)} messages missing",
                    flush=True,
                )
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (named)
            interrupted = True
            by = f" by {exc}" if str(exc) else ""
            print(f"\ninterrupted{by}: stopping the fleet", flush=True)
        # The snapshot taken while every agent still runs is the fleet table to show.
        with contextlib.suppress(OSError):
            snapshot = _get_json(f"{api}/api/devices")
        for _name, p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for _name, p in procs[1:]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        detection = {d: _detection(agent_root / d / "replay.jsonl", t) for d, t in truths.items()}
        total = {
            k: sum(v[k] for v in detection.values())
            for k in ("injected", "caught", "clean", "false_alarms")
        }
        caught = total["caught"] / total["injected"] if total["injected"] else 0.0
        false_rate = total["false_alarms"] / total["clean"] if total["clean"] else 0.0
        online = sum(1 for d in snapshot.get("devices", []) if d.get("status") == "online")
        print("\nfleet (from the collector's API, while the agents ran):")
        print(_fleet_table(snapshot))
        print(
            f"\noutliers: caught {total['caught']} of {total['injected']} injected corrupted "
            f"inputs ({caught:.1%}); flagged {total['false_alarms']} of {total['clean']} clean "
            f"ones ({false_rate:.1%})"
        )
        summary = {
            "devices_online": online,
            "devices": agents,
            "detection": detection,
            "total": total,
            "caught_rate": caught,
            "false_alarm_rate": false_rate,
            "fleet": snapshot,
            "dashboard": f"{api}/",
            "optimize_exit_code": code,
            "signing_key": key_id,
            "interrupted": interrupted,
        }
        (workdir / "demo-summary.json").write_text(
            json.dumps(summary, indent=2, default=str) + "\n"
        )
        print(f"summary: {workdir / 'demo-summary.json'}")
        if keep_running and not interrupted:
            print(f"dashboard: {api}/ (collector and broker keep running; Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                procs[0][1].wait()
        else:
            print(
                f"dashboard was served at {api}/ (rerun with --keep-running to browse it "
                "after the run)"
            )
        ok = online == agents and caught >= 0.9 and false_rate <= 0.05
        return 0 if ok and not interrupted else 1
    except DemoError as exc:
        print(f"edgeship demo: {exc}", flush=True)
        return 1
    finally:
        for _name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        if broker is not None:
            broker.stop()
