"""A deterministic synthetic data set in the PASCAL VOC 2012 layout: the project's built-in default data.

The generator writes real VOC-format files, so the real loading code (:mod:`lit_wsss.datamodules.voc`,
:mod:`lit_wsss.datamodules.labels`) is exercised end to end::

    <root>/JPEGImages/<id>.jpg               RGB JPEG, quality 95, each image its own height and width
    <root>/SegmentationClass/<id>.png        palette PNG (VOC colour map): 0 background, 1..C classes,
                                             255 a 2 px void band around every object boundary
    <root>/ImageSets/Segmentation/{train,val}.txt
    <root>/cls_labels.npy                    IRN format: np.save of {np.int32 key: float32 (C,) multi-hot},
                                             key = int(id.replace("_", "")), as in IRN's own file
    <root>/synthetic.json                    parameters, per-image records, and "complete": true

Ids look like VOC ids (``2000_000000``, ``2000_000001``, ...), so the int key round-trips; the year 2000 does
not occur in VOC, so synthetic ids never collide with real ones.

What the data set is for: it reproduces, in a few seconds on a CPU, the two failure modes of class
activation maps (CAMs) that weakly supervised semantic segmentation (WSSS) methods are built to fix.

1. **Under-activation (CAM covers only the discriminative part).** Every object is a large *body* plus one
   small *discriminative part*. The body (shape family: ellipse, rounded rectangle or irregular blob; colour;
   texture: stripes, spots or mottling; size) is drawn from the *same* distribution for every class, so it
   carries no class information. The part is a small vivid blob (5-10 % of the object's area) centred on
   the body's edge, whose colour and shape tell the class (class 1: red disc, 2: yellow square, 3: green
   triangle, 4: magenta cross, ...; see :func:`part_look`). A classifier needs only the part, so its CAM
   fires on the part and misses most of the body, while the mask labels the whole object (body + part).
2. **False activation on co-occurring context.** Images that contain the context class (default: index 3,
   "boat") have a blue "water" band along the bottom with probability ``context_prob``; the other images
   have it with probability ``0.1 * (1 - context_prob)``. The water is background (0) in the mask. A
   classifier learns the water as evidence of the context class, so its CAM fires on the water.

Other properties: 1 or 2 objects per image (two objects always have different classes, and never touch,
so there is no occlusion), objects lie at least 4 px inside the image, the background is textured noise
in muted colours, and mild per-pixel noise is added. The first object's class cycles through shuffled
rounds of all classes, so every class is the main object of ``n / C`` images in each split.

Determinism: ``np.random.default_rng(seed)`` plans the splits and spawns one child generator per image;
the JPEGs are encoded by OpenCV and the PNGs by Pillow with fixed parameters, so the same parameters give
byte-identical files (with the same library versions).

Crash safety: every file is written under a temporary name in its folder and renamed (``os.replace``).
``synthetic.json`` is written first with ``"complete": false`` and rewritten with ``"complete": true`` only
after everything else, so an interrupted run never looks complete; calling the generator again finishes it.
A complete folder with the same parameters is left untouched; different parameters raise
:class:`FileExistsError`. A lock file (``.synthetic.lock``) serialises concurrent calls (e.g. DDP ranks).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lit_wsss.datamodules.labels import VOC_CLASSES
from lit_wsss.datamodules.voc import VOCDataModule
from lit_wsss.io import IGNORE_INDEX, palette_png_bytes
from lit_wsss.io import write_bytes_atomic as _write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: concurrent calls are then not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SYNTHETIC_CLASS_NAMES: tuple[str, ...] = VOC_CLASSES
"""VOC class order: the first ``num_classes`` names are used, so class ids match VOC's colour map."""

GENERATOR_VERSION = 1  # bump when the drawing changes: older folders then count as "different parameters"
META_FILE = "synthetic.json"
LOCK_FILE = ".synthetic.lock"
ID_PREFIX = "2000_"
TWO_OBJECT_PROB = 0.4
PART_RATIO_RANGE = (0.05, 0.10)  # part area / object area, drawn per object
MARGIN = 4  # minimum distance (px) of an object to the image border
GAP = 4  # minimum distance (px) between two objects
NOISE_STD = 4.0  # per-pixel Gaussian noise on the final image (0-255 scale)

PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "yellow": (245, 215, 20), "green": (40, 200, 50), "magenta": (215, 40, 215),
    "white": (245, 245, 245),
}  # fmt: skip
PART_SHAPES = ("disc", "square", "triangle", "cross")
BODY_SHAPES = ("ellipse", "rounded_rect", "blob")
BODY_TEXTURES = ("stripes", "spots", "mottled")


def part_look(class_index: int) -> tuple[str, str]:
    """Colour name and shape of the discriminative part of a 0-based class (unique over the 20 classes)."""
    colours = list(PART_COLOURS)
    return colours[class_index % 5], PART_SHAPES[(class_index % 5 + class_index // 5) % 4]


def _unit_polygon(shape: str) -> np.ndarray:
    """Part polygon of area 1, centred at its centroid, fixed orientation (the shape is a class cue)."""
    if shape == "disc":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif shape == "triangle":  # apex up, invariant under horizontal flips
        pts = np.array([[0, -2 / 3], [-1 / math.sqrt(3), 1 / 3], [1 / math.sqrt(3), 1 / 3]], float)
    else:  # plus-shaped cross on a 3 x 3 grid
        a, b = 1.5, 0.5
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                        [-a, b], [-a, -b], [-b, -b]], float)  # fmt: skip
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return pts / math.sqrt(area)


def _fill(canvas_shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    """Boolean mask of a polygon given in float pixel coordinates (sub-pixel accurate)."""
    mask = np.zeros(canvas_shape, np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """h in degrees, s and v in [0, 1] -> float RGB in [0, 255]."""
    hsv = np.array([[[h, s, v]]], np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64) * 255


def _hue(rng: np.random.Generator, excluded: tuple[float, float]) -> float:
    """A uniform hue (degrees) outside ``excluded``: blue is kept for the water."""
    lo, hi = excluded
    h = rng.uniform(0, 360 - (hi - lo))
    return h + (hi - lo) if h >= lo else h


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``cells`` cells along the long side."""
    h, w = shape
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted, textured background: never blue, so the bottom rows are blue only where there is water."""
    base = _hsv_to_rgb(_hue(rng, (180, 280)), rng.uniform(0.0, 0.18), rng.uniform(0.35, 0.75))
    shade = 1 + 0.12 * _smooth_noise(rng, (h, w), rng.integers(3, 7)) + 0.06 * _smooth_noise(rng, (h, w), 20)
    chroma = np.stack([_smooth_noise(rng, (h, w), 5) for _ in range(3)], -1) * 5
    return base * shade[..., None] + chroma


def _add_water(rng: np.random.Generator, img: np.ndarray) -> dict[str, Any]:
    """Blue wavy band along the bottom (the co-occurring context); returns its record."""
    h, w = img.shape[:2]
    top = h * (1 - rng.uniform(0.2, 0.3))
    amp, wavelength, phase = rng.uniform(1.5, 4), rng.uniform(25, 60), rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    region = yy >= top + amp * np.sin(2 * np.pi * xx / wavelength + phase)
    colour = _hsv_to_rgb(rng.uniform(215, 235), rng.uniform(0.6, 0.85), rng.uniform(0.6, 0.85))
    period, wave = rng.uniform(4, 8), rng.uniform(1, 3)
    ripples = 1 + 0.15 * np.sin(2 * np.pi * (yy + wave * np.sin(2 * np.pi * xx / wavelength)) / period)
    img[region] = colour * ripples[region][:, None]
    return {"top": round(float(top), 2), "area": int(region.sum())}


def _body_polygon(rng: np.random.Generator, size: float) -> tuple[np.ndarray, str]:
    """Body outline (class-independent), centred at 0, longest axis about ``size``."""
    shape = BODY_SHAPES[rng.integers(len(BODY_SHAPES))]
    a = size / 2
    b = a * rng.uniform(0.55, 1.0)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    if shape == "ellipse":
        pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    elif shape == "blob":
        radius = np.ones_like(t)
        for k in (2, 3, 4):
            radius += rng.uniform(0, 0.12) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        pts = np.stack([a * radius * np.cos(t), b * radius * np.sin(t)], 1)
    else:  # rounded rectangle: four quarter-circle corners
        r = rng.uniform(0.2, 0.45) * b
        arcs = []
        for k, (sx, sy) in enumerate(((1, 1), (-1, 1), (-1, -1), (1, -1))):
            u = np.linspace(k * np.pi / 2, (k + 1) * np.pi / 2, 18)
            arcs.append(np.stack([sx * (a - r) + r * np.cos(u), sy * (b - r) + r * np.sin(u)], 1))
        pts = np.concatenate(arcs)
    angle = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T, shape


def _body_texture(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Multiplicative brightness texture (class-independent)."""
    kind = BODY_TEXTURES[rng.integers(len(BODY_TEXTURES))]
    h, w = shape
    if kind == "stripes":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 12)
        phase = 2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
        field = rng.uniform(0.12, 0.25) * np.sin(phase)
    elif kind == "spots":
        spots = np.zeros(shape, np.float32)
        for _ in range(max(3, h * w // 60)):
            centre = (int(rng.integers(w)), int(rng.integers(h)))
            cv2.circle(spots, centre, int(rng.integers(1, 4)), 1.0, -1)
        field = spots * rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.3)
    else:
        field = rng.uniform(0.12, 0.2) * _smooth_noise(rng, shape, 4)
    return field, kind


def _make_object(rng: np.random.Generator, cls: int, size: float, bg_colour: np.ndarray) -> dict[str, Any]:
    """Draw one object (body + part) on a tight local canvas: rgb, body/part masks and its record."""
    body_pts, body_shape = _body_polygon(rng, size)
    colour_name, part_shape = part_look(cls)
    ratio = rng.uniform(*PART_RATIO_RANGE)
    extent = np.abs(body_pts).max()
    pad = math.ceil(extent + 0.6 * size + 3)
    canvas = (2 * pad, 2 * pad)
    body = _fill(canvas, body_pts + pad)
    anchor = body_pts[rng.integers(len(body_pts))] + pad  # part centred on the body's edge
    unit = _unit_polygon(part_shape)
    part_area = max(ratio * body.sum(), 9.0)  # at least about 3 x 3 px, even on a tiny body
    for _ in range(3):  # measured ratio -> rescale: the part overlaps the body by about half
        part = _fill(canvas, unit * math.sqrt(part_area) + anchor)
        measured = part.sum() / max(1, (body | part).sum())
        part_area = max(part_area * ratio / max(measured, 1e-3), 9.0)
    obj = body | part
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    body, part, obj = body[y0:y1, x0:x1], part[y0:y1, x0:x1], obj[y0:y1, x0:x1]

    for _ in range(20):  # keep the body visibly different from the background
        base = _hsv_to_rgb(_hue(rng, (190, 260)), rng.uniform(0.25, 0.5), rng.uniform(0.45, 0.85))
        if np.linalg.norm(base - bg_colour) > 70:
            break
    texture, texture_name = _body_texture(rng, body.shape)
    rgb = base * (1 + texture)[..., None]
    rgb[part] = PART_COLOURS[colour_name]
    return {
        "rgb": rgb, "obj": obj, "part": part,
        "record": {
            "class": cls + 1, "name": SYNTHETIC_CLASS_NAMES[cls], "area": int(obj.sum()),
            "body_area": int((obj & ~part).sum()), "part_area": int(part.sum()),
            "part_ratio": round(float(part.sum() / obj.sum()), 4), "body_shape": body_shape,
            "body_texture": texture_name, "part_shape": part_shape, "part_colour": colour_name,
        },
    }  # fmt: skip


def _place(rng: np.random.Generator, obj: np.ndarray, occupied: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner keeping ``obj`` MARGIN px inside the image and off ``occupied``; None if no room."""
    h, w = occupied.shape
    oh, ow = obj.shape
    if oh > h - 2 * MARGIN or ow > w - 2 * MARGIN:
        return None
    for _ in range(40):
        y, x = int(rng.integers(MARGIN, h - MARGIN - oh + 1)), int(rng.integers(MARGIN, w - MARGIN - ow + 1))
        if not (occupied[y : y + oh, x : x + ow] & obj).any():
            return y, x
    return None


def _render(
    rng: np.random.Generator,
    h: int,
    w: int,
    classes: list[int],
    context: int | None,
    p_ctx: float,
    p_no: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One image: RGB uint8, mask uint8 and its record (the classes actually placed, water, objects).

    Water is drawn with probability ``p_ctx`` if the context class was placed, else ``p_no``.
    """
    img = _background(rng, h, w)
    bg_colour = img.reshape(-1, 3).mean(0)
    mask = np.zeros((h, w), np.uint8)
    occupied = np.zeros((h, w), bool)
    band = np.zeros((h, w), bool)
    kernel = np.ones((3, 3), np.uint8)
    placed: list[dict[str, Any]] = []
    for k, cls in enumerate(classes):
        scale = rng.uniform(0.5, 0.72) if len(classes) == 1 else rng.uniform(0.36, 0.5)
        size = scale * min(h, w)
        for _ in range(4):  # shrink until it fits; a second object that never fits is dropped
            item = _make_object(rng, cls, size, bg_colour)
            corner = _place(rng, item["obj"], occupied)
            if corner is not None:
                break
            size *= 0.85
        if corner is None:
            if k == 0:
                raise RuntimeError(f"could not place an object in a {h}x{w} image; use a larger image_size")
            continue
        y, x = corner
        full = np.zeros((h, w), np.uint8)
        full[y : y + item["obj"].shape[0], x : x + item["obj"].shape[1]] = item["obj"]
        occupied |= cv2.dilate(full, np.ones((2 * GAP + 1, 2 * GAP + 1), np.uint8)).astype(bool)
        band |= (cv2.dilate(full, kernel) - cv2.erode(full, kernel)).astype(bool)  # 1 px out + 1 px in
        item["corner"] = corner
        record = item["record"]
        record["bbox"] = [x, y, x + item["obj"].shape[1], y + item["obj"].shape[0]]
        py, px = np.nonzero(item["part"])
        px0, py0, px1, py1 = int(px.min()), int(py.min()), int(px.max()) + 1, int(py.max()) + 1
        record["part_bbox"] = [x + px0, y + py0, x + px1, y + py1]
        placed.append(item)

    present = sorted({item["record"]["class"] - 1 for item in placed})
    has_context = context is not None and context in present
    water = None
    if context is not None and rng.random() < (p_ctx if has_context else p_no):
        water = _add_water(rng, img)
    for item in placed:
        y, x = item["corner"]
        oh, ow = item["obj"].shape
        img[y : y + oh, x : x + ow][item["obj"]] = item["rgb"][item["obj"]]
        mask[y : y + oh, x : x + ow][item["obj"]] = item["record"]["class"]
    mask[band] = IGNORE_INDEX
    img += rng.standard_normal(img.shape) * NOISE_STD
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    record = {"height": h, "width": w, "classes": [c + 1 for c in present], "water": water,
              "objects": [item["record"] for item in placed]}  # fmt: skip
    return rgb, mask, record


def _read_meta(root: Path) -> dict[str, Any] | None:
    path = root / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FileExistsError(f"{root}: {META_FILE} is unreadable ({err}); delete the folder") from err
    return meta if isinstance(meta, dict) else {}


def _check_foreign(root: Path) -> None:
    """Refuse to write into a non-empty folder that holds anything but (a part of) a synthetic set."""
    if not root.exists() or (root / META_FILE).is_file():
        return
    ours = {"JPEGImages", "SegmentationClass", "ImageSets", "cls_labels.npy", LOCK_FILE}
    for entry in root.iterdir():
        if entry.name in ours or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        raise FileExistsError(f"{root}: not empty and not a synthetic data set ({entry.name!r}); not writing")
    for folder in (root / "JPEGImages", root / "SegmentationClass"):
        names = [e.name for e in folder.iterdir()] if folder.is_dir() else []
        foreign = [n for n in names if not n.startswith((ID_PREFIX, "."))]
        if foreign:
            raise FileExistsError(f"{folder}: holds {foreign[0]!r}, not a synthetic image; not writing")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(root: Path, meta: dict[str, Any]) -> bool:
    if meta.get("complete") is not True:
        return False
    seg = root / "ImageSets" / "Segmentation"
    files = [root / "cls_labels.npy", seg / "train.txt", seg / "val.txt"]
    for record in meta.get("images", []):
        image_id = record["id"]
        files += [root / "JPEGImages" / f"{image_id}.jpg", root / "SegmentationClass" / f"{image_id}.png"]
    return all(f.is_file() for f in files)


def generate_synthetic_voc(
    root: str | Path,
    *,
    num_classes: int = 4,
    num_train: int = 240,
    num_val: int = 48,
    image_size: tuple[int, int] = (96, 160),
    context_class: int | None = 3,
    context_prob: float = 0.9,
    seed: int = 0,
) -> Path:
    """Write (or finish, or reuse) the synthetic VOC-format data set under ``root``.

    Args:
        root: output folder (created). Must be empty, absent, or hold a synthetic set.
        num_classes: foreground classes C (1..20): the first C of :data:`SYNTHETIC_CLASS_NAMES`.
        num_train, num_val: images in ``train.txt`` and ``val.txt``.
        image_size: (min, max) side: each image draws its height and width independently in this range.
        context_class: 0-based index of the class that co-occurs with water (default 3: "boat");
            ``None`` draws no water at all.
        context_prob: P(water | context class present); P(water | absent) is ``0.1 * (1 - context_prob)``.
        seed: everything follows from it.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid parameters.
        FileExistsError: ``root`` holds a synthetic set made with different parameters, or foreign files.
    """
    lo, hi = (int(v) for v in image_size)
    if not 1 <= num_classes <= len(SYNTHETIC_CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASS_NAMES)}, got {num_classes}")
    if num_train < 1 or num_val < 1 or num_train + num_val > 999_999:
        raise ValueError(f"need 1 <= num_train, num_val and a total below 1e6, got {num_train}, {num_val}")
    if not 64 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 64 <= min <= max, got {image_size}")
    if context_class is not None and not 0 <= context_class < num_classes:
        raise ValueError(f"context_class must be None or in 0..{num_classes - 1}, got {context_class}")
    if not 0.0 <= context_prob <= 1.0:
        raise ValueError(f"context_prob must be in [0, 1], got {context_prob}")
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_classes": int(num_classes),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [lo, hi],
        "context_class": None if context_class is None else int(context_class),
        "context_prob": float(context_prob),
        "seed": int(seed),
    }

    root = Path(root)
    meta = _read_meta(root)
    if meta is not None and meta.get("params") != params:
        raise FileExistsError(_differ_message(root, meta.get("params"), params))
    if meta is not None and _is_complete(root, meta):
        return root
    _check_foreign(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        meta = _read_meta(root)  # again: another process may have finished while we waited for the lock
        if meta is not None and meta.get("params") != params:
            raise FileExistsError(_differ_message(root, meta.get("params"), params))
        if meta is not None and _is_complete(root, meta):
            return root
        _check_foreign(root)
        _write_atomic(root / META_FILE, _json_bytes({"params": params, "complete": False}))
        _generate(root, params)
    return root


def _differ_message(root: Path, old: Any, new: dict[str, Any]) -> str:
    keys = sorted(k for k in new if not isinstance(old, dict) or old.get(k) != new[k])
    found = {k: old.get(k) for k in keys} if isinstance(old, dict) else old
    wanted = {k: new[k] for k in keys}
    return (
        f"{root}: holds a synthetic data set generated with different parameters "
        f"(found {found}, requested {wanted}); delete it or choose another folder"
    )


def _generate(root: Path, params: dict[str, Any]) -> None:
    start = time.perf_counter()
    C, lo, hi = params["num_classes"], *params["image_size"]
    context, p_ctx = params["context_class"], params["context_prob"]
    p_no = 0.1 * (1 - p_ctx)
    splits = {"train": params["num_train"], "val": params["num_val"]}
    rng = np.random.default_rng(params["seed"])
    image_rngs = rng.spawn(sum(splits.values()))
    plan: list[tuple[str, list[int]]] = []
    for split, n in splits.items():  # main classes: shuffled rounds of all classes -> balanced splits
        main = np.concatenate([rng.permutation(C) for _ in range(-(-n // C))])[:n]
        second = rng.random(n) < TWO_OBJECT_PROB
        other = (main + rng.integers(1, max(C, 2), n)) % C
        for m, s, o in zip(main, second, other):
            plan.append((split, [int(m), int(o)] if s and C > 1 else [int(m)]))

    dirs = [root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"]
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{ID_PREFIX}{i:06d}" for i in range(len(plan))]
    keep = set(ids)
    for folder in dirs[:2]:  # stale temporaries and leftovers of an earlier, interrupted run
        for entry in folder.iterdir():
            is_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
            if is_tmp or (entry.name.startswith(ID_PREFIX) and entry.stem not in keep):
                entry.unlink()
    labels: dict[np.int32, np.ndarray] = {}
    records = []
    for image_id, (split, classes), image_rng in zip(ids, plan, image_rngs):
        h, w = (int(v) for v in image_rng.integers(lo, hi + 1, size=2))
        rgb, mask, record = _render(image_rng, h, w, classes, context, p_ctx, p_no)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:  # pragma: no cover
            raise RuntimeError(f"JPEG encoding failed for {image_id}")
        _write_atomic(root / "JPEGImages" / f"{image_id}.jpg", jpg.tobytes())
        _write_atomic(root / "SegmentationClass" / f"{image_id}.png", palette_png_bytes(mask))
        vector = np.zeros(C, np.float32)
        vector[[c - 1 for c in record["classes"]]] = 1
        labels[np.int32(image_id.replace("_", ""))] = vector  # IRN's key type: np.int32, as in its own file
        records.append({"id": image_id, "split": split, **record})

    buffer = io.BytesIO()
    np.save(buffer, np.array(labels, dtype=object), allow_pickle=True)
    _write_atomic(root / "cls_labels.npy", buffer.getvalue())
    for split in splits:
        text = "".join(f"{r['id']}\n" for r in records if r["split"] == split)
        _write_atomic(dirs[2] / f"{split}.txt", text.encode())
    summary = {}
    for split in splits:
        rows = [r for r in records if r["split"] == split]
        summary[split] = {
            "images": len(rows),
            "images_per_class": [sum(c + 1 in r["classes"] for r in rows) for c in range(C)],
            "two_objects": sum(len(r["objects"]) == 2 for r in rows),
            "water": sum(r["water"] is not None for r in rows),
        }
        if context is not None:
            with_context = [r for r in rows if context + 1 in r["classes"]]
            summary[split]["context_images"] = len(with_context)
            summary[split]["water_with_context"] = sum(r["water"] is not None for r in with_context)
    meta = {"params": params, "class_names": list(SYNTHETIC_CLASS_NAMES[:C]),
            "water_prob": {"context_present": p_ctx, "context_absent": round(p_no, 6)},
            "part_looks": {SYNTHETIC_CLASS_NAMES[c]: " ".join(part_look(c)) for c in range(C)},
            "summary": summary, "images": records, "complete": True}  # fmt: skip
    _write_atomic(root / META_FILE, _json_bytes(meta))
    elapsed = time.perf_counter() - start
    log.info("synthetic VOC: %d images written to %s in %.1f s", len(records), root, elapsed)


class SyntheticVOCDataModule(VOCDataModule):
    """The built-in data set: :func:`generate_synthetic_voc` output, read by the real VOC code path.

    ``prepare_data`` (one process per node) writes the set under ``root`` if it is not complete there;
    ``train`` / ``val`` lists, ``cls_labels.npy`` and ``SegmentationClass`` are then read exactly like VOC.

    Args:
        root: where the set is written (reused when complete with the same parameters).
        num_classes, num_train, num_val, image_size, context_class, context_prob, generator_seed:
            generator parameters (see :func:`generate_synthetic_voc`).
        predict_list: split exported by ``lit-wsss predict`` (default ``val``).
        train_list, val_list: the training and validation lists (``train``, ``val``; a path or a name under
            the root, e.g. the segmentation stage's training part).
        crop_size, resize_long, num_workers: CPU-sized defaults of the :class:`WSSSDataModule` arguments.
        **kwargs: the other loader and augmentation arguments of
            :class:`~lit_wsss.datamodules.base.WSSSDataModule` (``train_transform``, ``seed_dir``, ...).
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        num_classes: int = 4,
        num_train: int = 240,
        num_val: int = 48,
        image_size: tuple[int, int] = (96, 160),
        context_class: int | None = 3,
        context_prob: float = 0.9,
        generator_seed: int = 0,
        predict_list: str | None = None,
        train_list: str = "train",
        val_list: str = "val",
        crop_size: int = 128,
        resize_long: tuple[int, int] = (96, 160),
        num_workers: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root, train_list=train_list, val_list=val_list, predict_list=predict_list, mask_dir="SegmentationClass",
            crop_size=crop_size, resize_long=resize_long, num_workers=num_workers, **kwargs,
        )
        self.class_names = SYNTHETIC_CLASS_NAMES[:num_classes]
        self.num_classes = num_classes
        self.generator_args: dict[str, Any] = {
            "num_classes": num_classes, "num_train": num_train, "num_val": num_val,
            "image_size": tuple(image_size), "context_class": context_class, "context_prob": context_prob,
            "seed": generator_seed,
        }

    def prepare_data(self) -> None:
        generate_synthetic_voc(self.root, **self.generator_args)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record["synthetic"] = {**self.generator_args, "image_size": list(self.generator_args["image_size"])}
        return record
