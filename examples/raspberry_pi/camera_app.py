"""A camera application on the board, built on edgeship's ``Agent`` API.

It reads frames from a camera (OpenCV), from a directory of images, or from a synthetic sensor
signal; fits each frame to the bundle's first input (size, channels, layout and dtype are read
from the manifest, so the same app serves the 8x8 digits model and a 224x224 RGB one); runs
``agent.predict``; and logs the frames the bundle's outlier detector flags. With a broker set,
the agent publishes the same telemetry, outlier events and status as ``edgeship-agent run``.

    python3 camera_app.py --bundle /opt/edgeship/bundle --config /etc/edgeship/agent.toml
    python3 camera_app.py --bundle bundle/ --source synthetic --seconds 5      # no camera

It needs what the agent needs (numpy, paho-mqtt, a runtime), plus OpenCV for ``--source
camera`` and for image files other than ``.npy`` and ``.pgm`` (on Raspberry Pi OS:
``sudo apt install python3-opencv`` and a virtualenv made with ``--system-site-packages``, or
``pip install opencv-python-headless``). Without OpenCV, ``--source auto`` falls back to the
image directory, then to the synthetic signal.

The agent keeps its spool and sequence numbers per fleet and device id under ``state_dir``:
do not run this app and the ``edgeship-agent`` service with the same device id at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np

from device_agent import Agent, EdgeshipError, InputError, TensorSpec
from device_agent.config import load_settings

log = logging.getLogger("camera_app")

IMAGE_SUFFIXES = (".npy", ".pgm", ".png", ".jpg", ".jpeg", ".bmp")


# --- fitting a frame to the model's input --------------------------------------------------------


@dataclass(frozen=True)
class InputFormat:
    """How a frame becomes the model's input, derived from the manifest's input spec.

    ``layout`` is ``NCHW``, ``NHWC``, ``NHW`` (batch, height, width: grayscale) or ``NL`` (a
    1-D signal of ``width`` values). Float inputs get values in [0, 1]; uint8 inputs 0..255 and
    int8 inputs -128..127 (a quantized model's raw input).
    """

    name: str
    layout: str
    height: int
    width: int
    channels: int
    dtype: str

    @classmethod
    def from_spec(cls, spec: TensorSpec, size: tuple[int, int] | None = None) -> InputFormat:
        dims = list(spec.shape[1:])  # the first axis is the batch
        c: int | str
        h: int | str
        w: int | str
        if len(dims) == 3 and dims[0] in (1, 3) and dims[2] not in (1, 3):
            layout, c, h, w = "NCHW", dims[0], dims[1], dims[2]
        elif len(dims) == 3:
            layout, c, h, w = "NHWC", dims[2], dims[0], dims[1]
        elif len(dims) == 2:
            layout, c, (h, w) = "NHW", 1, dims
        elif len(dims) == 1:
            layout, c, h, w = "NL", 1, 1, dims[0]
        else:
            raise SystemExit(
                f"input {spec.name!r} has shape {list(spec.shape)}: this app handles images "
                "(batch, C, H, W), (batch, H, W, C), (batch, H, W) and signals (batch, L)"
            )
        if size is not None:
            h, w = (h if layout == "NL" else size[0]), size[1]
        if not all(isinstance(d, int) for d in (c, h, w)):
            raise SystemExit(
                f"input {spec.name!r} has dynamic dimensions {list(spec.shape)}; pass --size HxW"
            )
        if c not in (1, 3):
            raise SystemExit(f"input {spec.name!r} has {c} channels; expected 1 or 3")
        return cls(spec.name, layout, int(h), int(w), int(c), spec.dtype)

    def prepare(self, frame: np.ndarray, *, invert: bool = False) -> np.ndarray:
        """A frame (H, W) or (H, W, 3) with values in [0, 1] -> one batch of the model's input."""
        img = np.asarray(frame, dtype=np.float32)
        if self.layout == "NL":
            img = img.reshape(1, -1) if img.ndim == 1 else _gray(img)
        elif self.channels == 1:
            img = _gray(img)
        elif img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.clip(resize(img, self.height, self.width), 0.0, 1.0)
        if invert:
            img = 1.0 - img
        if self.layout == "NL":
            x = img.reshape(1, self.width)
        elif self.layout == "NHW":
            x = img[None]
        elif self.layout == "NCHW":
            x = (img[None, None] if img.ndim == 2 else img.transpose(2, 0, 1)[None]).copy()
        else:
            x = img[None, :, :, None] if img.ndim == 2 else img[None]
        if self.dtype == "uint8":
            return np.asarray(np.round(x * 255.0), dtype=np.uint8)
        if self.dtype == "int8":
            return np.asarray(np.round(x * 255.0) - 128.0, dtype=np.int8)
        return np.asarray(x, dtype=self.dtype)


def _gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:  # ITU-R BT.601 luma, on RGB
        return np.asarray(img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32), np.float32)
    return img


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (H, W[, C]) by averaging the source pixels under each target pixel.

    OpenCV's INTER_AREA when OpenCV is there; otherwise the same box average in numpy (and the
    nearest pixel where the target is larger than the source).
    """
    if img.shape[:2] == (height, width):
        return img
    try:
        import cv2  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _box(_box(img, height, axis=0), width, axis=1)
    out: np.ndarray = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return out


def _box(img: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = img.shape[axis]
    starts = (np.arange(size) * n) // size
    sums = np.add.reduceat(img, starts, axis=axis)
    counts = np.diff(np.append(starts, n)).clip(min=1)  # 0: an upscaled pixel, one source
    shape = [1] * img.ndim
    shape[axis] = size
    result: np.ndarray = sums / counts.reshape(shape)
    return result.astype(np.float32)


# --- frame sources -------------------------------------------------------------------------------


def camera_frames(index: int) -> Iterator[np.ndarray]:
    """Frames of ``/dev/video<index>`` through OpenCV, RGB in [0, 1]."""
    import cv2

    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        raise SystemExit(
            f"camera {index} did not open: is it connected, and is this user in the 'video' "
            "group? (Pi camera modules on Bookworm need libcamera's V4L2 compatibility.)"
        )
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
    failures = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                failures += 1
                if failures >= 10:
                    raise SystemExit(f"camera {index} stopped delivering frames")
                time.sleep(0.1)
                continue
            failures = 0
            yield bgr[:, :, ::-1].astype(np.float32) / 255.0
    finally:
        cap.release()


def image_frames(directory: Path) -> Iterator[np.ndarray]:
    """The images in ``directory`` (sorted by name), over and over, in [0, 1]."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    while True:
        for path in files:
            img = _read_image(path)
            if img is not None:
                yield img


def _read_image(path: Path) -> np.ndarray | None:
    if path.suffix.lower() == ".npy":
        arr = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        peak = float(arr.max(initial=0.0))
        return arr / peak if peak > 1.0 else arr  # 0..255 or 0..16 images become 0..1
    if path.suffix.lower() == ".pgm":
        return _read_pgm(path)
    try:
        import cv2
    except ImportError:
        log.warning("skipping %s: reading %s files needs OpenCV", path.name, path.suffix)
        return None
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        log.warning("skipping %s: OpenCV cannot read it", path.name)
        return None
    return np.asarray(bgr[:, :, ::-1], dtype=np.float32) / 255.0


def _read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) or text (P2) PGM, the format ``convert``, GIMP and OpenCV all write."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic == b"P5":
        dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
        pixels = np.frombuffer(data, dtype=dtype, count=width * height, offset=pos + 1)
    elif magic == b"P2":
        pixels = np.array(data[pos:].split()[: width * height], dtype=np.float32)
    else:
        raise SystemExit(f"{path}: not a PGM file (magic {magic!r})")
    return pixels.reshape(height, width).astype(np.float32) / maxval


def synthetic_frames(seed: int = 0, glitch_every: int = 25) -> Iterator[np.ndarray]:
    """A stand-in sensor: a bright blob drifting on a dark field with sensor noise, 32x32.

    Every ``glitch_every``-th frame is a fault a real sensor produces (a saturated frame, a
    dead frame, a band of noise), which the bundle's detector should tend to flag.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    n = 0
    while True:
        t = n * 0.15
        cy, cx = 16 + 8 * math.sin(t), 16 + 8 * math.cos(0.7 * t)
        frame = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0).astype(np.float32)
        frame += rng.normal(0.0, 0.03, frame.shape).astype(np.float32)
        if glitch_every and n % glitch_every == glitch_every - 1:
            kind = (n // glitch_every) % 3
            if kind == 0:
                frame[:] = 1.0
            elif kind == 1:
                frame[:] = 0.0
            else:
                frame[8:24] = rng.random((16, 32), dtype=np.float32)
        yield np.clip(frame, 0.0, 1.0)
        n += 1


def open_source(args: argparse.Namespace) -> tuple[str, Iterator[np.ndarray]]:
    source = args.source
    if source == "auto":
        try:
            import cv2

            cap = cv2.VideoCapture(args.camera)
            opened = cap.isOpened()
            cap.release()
        except ImportError:
            opened = False
        source = "camera" if opened else "images" if args.images else "synthetic"
        log.info("--source auto: using %s", source)
    if source == "camera":
        return source, camera_frames(args.camera)
    if source == "images":
        if args.images is None:
            raise SystemExit("--source images needs --images DIR")
        return source, image_frames(args.images)
    return source, synthetic_frames(seed=args.seed)


# --- the application ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Feed camera frames (or images, or a synthetic signal) to an edgeship "
        "bundle through the Agent API and log the outliers it flags.",
    )
    p.add_argument("--bundle", type=Path, help="the bundle (default: bundle in --config)")
    p.add_argument("--config", type=Path, help="agent.toml: broker, fleet, device id, ...")
    p.add_argument("--source", choices=["auto", "camera", "images", "synthetic"], default="auto")
    p.add_argument("--camera", type=int, default=0, help="OpenCV camera index (default 0)")
    p.add_argument("--images", type=Path, help="directory of images for --source images")
    p.add_argument("--rate", type=float, default=5.0, help="frames per second (default 5)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: never)")
    p.add_argument("--size", help="HxW for a model whose input size is dynamic")
    p.add_argument(
        "--invert",
        action="store_true",
        help="invert the frames: dark ink on white paper for a model trained on light-on-dark "
        "images (the digits model)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic signal seed")
    p.add_argument("--broker", dest="broker_url", help="mqtt://host:1883 (default: --config's)")
    p.add_argument("--fleet")
    p.add_argument("--device-id")
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--window", dest="window_s", type=float, help="telemetry window, s")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        k: getattr(args, k)
        for k in ("bundle", "broker_url", "fleet", "device_id", "state_dir", "window_s")
    }
    overrides["log_level"] = args.log_level
    try:
        agent_config, run_config = load_settings(args.config, os.environ, overrides)
    except EdgeshipError as exc:
        print(f"camera_app: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, run_config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if run_config.bundle is None:
        print("camera_app: error: pass --bundle DIR (or set bundle in agent.toml)", file=sys.stderr)
        return 2
    size = None
    if args.size:
        h, _, w = args.size.lower().partition("x")
        size = (int(h), int(w))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    try:
        agent = Agent.from_bundle(run_config.bundle, agent_config)
    except EdgeshipError as exc:
        print(f"camera_app: error: {exc}", file=sys.stderr)
        return 2
    manifest = agent.bundle.manifest
    if len(manifest.io.inputs) != 1:
        names = manifest.io.input_names
        print(
            f"camera_app: error: the model has inputs {names}; this app feeds one", file=sys.stderr
        )
        return 2
    fmt = InputFormat.from_spec(manifest.io.inputs[0], size)
    threshold = None if manifest.detector is None else manifest.detector.threshold
    source, frames = open_source(args)
    log.info(
        "%s v%s: %s frames -> %s %s %s (%dx%d, %d channel(s)); telemetry to %s",
        manifest.model.name,
        manifest.model.version,
        source,
        fmt.name,
        fmt.layout,
        fmt.dtype,
        fmt.height,
        fmt.width,
        fmt.channels,
        agent_config.broker_url or "nowhere (no broker)",
    )

    count = outliers = rejected = 0
    latencies: list[float] = []
    labels: dict[str, int] = {}
    period = 1.0 / args.rate if args.rate > 0 else 0.0
    started = time.monotonic()
    next_at = started
    next_report = started + 10.0
    with agent:
        for frame in frames:
            if stop.is_set():
                break
            now = time.monotonic()
            if args.seconds and now - started >= args.seconds:
                break
            if args.frames and count + rejected >= args.frames:
                break
            try:
                result = agent.predict({fmt.name: fmt.prepare(frame, invert=args.invert)})
            except InputError as exc:  # counted in telemetry by the agent; keep going
                rejected += 1
                log.warning("frame rejected by the model: %s", exc)
                continue
            count += 1
            latencies.append(result.latency_s)
            label = None if result.labels is None else result.labels[0]
            if label is not None:
                labels[label] = labels.get(label, 0) + 1
            if bool(result.is_outlier[0]):
                outliers += 1
                log.warning(
                    "outlier: frame %d score %.3g > threshold %.3g (predicted %s)",
                    count,
                    result.score,
                    threshold,
                    label,
                )
            if now >= next_report:
                next_report = now + 10.0
                log.info(
                    "%d frames, %d outliers, last %.2f ms", count, outliers, result.latency_s * 1e3
                )
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                next_at = time.monotonic()
    print(
        json.dumps(
            {
                "source": source,
                "input": {
                    "name": fmt.name,
                    "layout": fmt.layout,
                    "dtype": fmt.dtype,
                    "height": fmt.height,
                    "width": fmt.width,
                    "channels": fmt.channels,
                },
                "frames": count,
                "rejected": rejected,
                "outliers": outliers,
                "labels": labels,
                "p50_ms": float(np.median(latencies)) * 1e3 if latencies else None,
                "seconds": round(time.monotonic() - started, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
