"""A synthetic captioned image corpus: coloured shapes on varied backgrounds, with exact captions.

Pretrained CoCa weights live on the Hugging Face hub; on a machine that cannot reach it, the ``demo`` model (trained
on this corpus, shipped in ``cocatk/assets``) and a folder written by :func:`generate_folder` still give meaningful
results, and the quality tests measure the model against held-out scenes.

A scene holds one or two objects. Each object is a coloured shape (:data:`COLOURS` x :data:`SHAPES`) of some size and
rotation, drawn flat, outlined or shaded; the background is a flat colour, a gradient or a lightly textured colour
chosen to contrast with the objects. Two objects stand in one clear spatial relation (:data:`RELATIONS`)::

    a green triangle                       # one object
    a red circle left of a blue square     # two objects; the same scene is "a blue square right of a red circle"
    a blue square left of a red circle     # its swapped caption: same words, false

Everything is deterministic given a seed (Python's ``random.Random`` and numpy's PCG64, no global state) and needs
no network and no torch.

Example:
    >>> import random
    >>> spec = random_scene(random.Random(0), n_objects=2)
    >>> spec.caption() != spec.swapped_caption()
    True
    >>> render_scene(spec, 128).size
    (128, 128)
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UsageError

#: Named object colours (sRGB). Captions use the names; the drawn colour is jittered a little around these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 35),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: "A left of B": A's centre is clearly left of B's, and the vertical offset is small next to the horizontal one.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: The 18 single-object classes ("red circle", ...) for zero-shot classification.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
#: Object fill styles: plain flat colour most of the time.
STYLES: tuple[str, ...] = ("flat", "outline", "shaded")
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "texture")
#: The manifest :func:`generate_folder` writes beside the photos (JSON lines, one per file).
MANIFEST_NAME = "captions.jsonl"

# Contrast rules (Euclidean sRGB distance). A background colour keeps BG_MIN_DIST from every named colour, so it never
# reads as one of them, and BG_OBJECT_DIST from the colours of the objects drawn on it.
_BG_MIN_DIST = 70.0
_BG_OBJECT_DIST = 115.0
_COLOUR_JITTER = 12
# Texture amplitude (low-frequency blotches and per-pixel grain), small next to the contrast margins above.
_TEXTURE_LOW = 22.0
_TEXTURE_GRAIN = 7.0
# Objects stay inside the central square of the image, this far from its border (fraction of the square's side).
_BORDER = 0.03


@dataclass(frozen=True)
class Shape:
    """One object. Coordinates and size are fractions of the image's central square (0..1, y downwards)."""

    colour: str
    shape: str
    x: float
    y: float
    size: float
    angle: float = 0.0
    style: str = "flat"
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """A flat colour, a two-colour gradient (``angle`` in degrees) or a colour with a light texture (``seed``)."""

    kind: str
    colours: tuple[tuple[int, int, int], ...]
    angle: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows; render it with :func:`render_scene`, describe it with :meth:`caption`."""

    background: Background
    objects: tuple[Shape, ...]
    #: For two objects: how objects[0] stands to objects[1]; None for one object.
    relation: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def caption(self, inverse: bool = False) -> str:
        """The true caption. ``inverse=True`` gives the equivalent sentence from the other object's side
        ("a blue square right of a red circle" for "a red circle left of a blue square")."""
        if len(self.objects) == 1:
            return f"a {self.objects[0].name}"
        a, b = self.objects
        assert self.relation is not None
        if inverse:
            return f"a {b.name} {INVERSE_RELATION[self.relation]} a {a.name}"
        return f"a {a.name} {self.relation} a {b.name}"

    def swapped_caption(self) -> str:
        """The caption with its two objects swapped ("a blue square left of a red circle"): same words, false.

        Raises:
            ValueError: the scene holds one object.
        """
        if len(self.objects) != 2:
            raise ValueError("a one-object scene has no swapped caption")
        a, b = self.objects
        return f"a {b.name} {self.relation} a {a.name}"

    def captions(self) -> list[str]:
        """Every true caption: one for one object, both directions for two."""
        if len(self.objects) == 1:
            return [self.caption()]
        return [self.caption(), self.caption(inverse=True)]

    def key(self) -> str:
        """What the scene means, independent of wording: equal keys have the same set of true captions."""
        return min(self.captions())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (manifests)."""
        return {
            "background": asdict(self.background),
            "objects": [asdict(o) for o in self.objects],
            "relation": self.relation,
        }


# ---- sampling --------------------------------------------------------------------------------------------------


def scene_rng(seed: int, index: int, namespace: str = "scene") -> random.Random:
    """An independent generator for scene ``index`` of stream ``seed`` (stable across runs and platforms)."""
    return random.Random(f"cocatk-demo:{namespace}:{seed}:{index}")


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b)


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in rgb)  # type: ignore[return-value]


def _background_colour(rng: random.Random, object_rgbs: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    named = list(COLOURS.values())
    for _ in range(1000):
        c = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        if all(_dist(c, n) >= _BG_MIN_DIST for n in named) and all(_dist(c, o) >= _BG_OBJECT_DIST for o in object_rgbs):
            return c
    return (128, 128, 128)  # pragma: no cover - the rules above leave plenty of colours


def _random_background(rng: random.Random, object_rgbs: Sequence[tuple[int, int, int]]) -> Background:
    kind = rng.choices(BACKGROUNDS, weights=(0.45, 0.3, 0.25))[0]
    if kind == "gradient":
        colours = (_background_colour(rng, object_rgbs), _background_colour(rng, object_rgbs))
        return Background("gradient", colours, angle=rng.uniform(0, 360))
    colour = _background_colour(rng, object_rgbs)
    if kind == "texture":
        return Background("texture", (colour,), seed=rng.randrange(2**31))
    return Background("flat", (colour,))


def _random_object(rng: random.Random, exclude: frozenset[str] = frozenset()) -> tuple[str, str]:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if f"{colour} {shape}" not in exclude:
            return colour, shape


def _style(rng: random.Random) -> str:
    return rng.choices(STYLES, weights=(0.6, 0.2, 0.2))[0]


def _angle(rng: random.Random, shape: str) -> float:
    return 0.0 if shape == "circle" else rng.uniform(-20.0, 20.0)


def _place_pair(rng: random.Random, relation: str, sa: float, sb: float) -> tuple[float, float, float, float]:
    """Centres (xa, ya, xb, yb) with A `relation` B, both objects inside the square and apart."""
    lo, hi = _BORDER, 1.0 - _BORDER
    # Along the relation's axis: A before B ("left of", "above") or after it; gap between the edges >= 0.04.
    min_d = (sa + sb) / 2 + 0.04
    max_d = (hi - lo) - (sa + sb) / 2
    d = rng.uniform(min_d, max(min_d, max_d))
    first_lo, first_hi = lo + (sa / 2 if relation in ("left of", "above") else sb / 2), hi - d
    first_hi -= sb / 2 if relation in ("left of", "above") else sa / 2
    p_first = rng.uniform(first_lo, max(first_lo, first_hi))
    p_second = p_first + d
    pa, pb = (p_first, p_second) if relation in ("left of", "above") else (p_second, p_first)
    # Across the axis: a small offset (at most 35 % of the distance along it), so the relation stays unambiguous.
    off = rng.uniform(-0.35, 0.35) * d
    q_lo = lo + max(sa, sb) / 2 + abs(off) / 2
    q_hi = hi - max(sa, sb) / 2 - abs(off) / 2
    qm = rng.uniform(q_lo, max(q_lo, q_hi))
    qa, qb = qm - off / 2, qm + off / 2
    if relation in ("left of", "right of"):
        return pa, qa, pb, qb
    return qa, pa, qb, pb


def random_scene(rng: random.Random, n_objects: int | None = None, p_single: float = 0.35) -> SceneSpec:
    """Draw a scene.

    Args:
        rng: the generator (see :func:`scene_rng`); the scene depends on nothing else.
        n_objects: 1 or 2; None draws one object with probability ``p_single``.
        p_single: see ``n_objects``.

    Returns:
        A :class:`SceneSpec`. Two objects always differ in colour or shape.
    """
    if n_objects is None:
        n_objects = 1 if rng.random() < p_single else 2
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    if n_objects == 1:
        colour, shape = _random_object(rng)
        size = rng.uniform(0.25, 0.6)
        x = rng.uniform(_BORDER + size / 2, 1 - _BORDER - size / 2)
        y = rng.uniform(_BORDER + size / 2, 1 - _BORDER - size / 2)
        obj = Shape(colour, shape, x, y, size, _angle(rng, shape), _style(rng), _jitter(rng, COLOURS[colour]))
        return SceneSpec(_random_background(rng, [obj.rgb]), (obj,))
    ca, sa_ = _random_object(rng)
    cb, sb_ = _random_object(rng, exclude=frozenset({f"{ca} {sa_}"}))
    relation = rng.choice(RELATIONS)
    size_a, size_b = rng.uniform(0.16, 0.34), rng.uniform(0.16, 0.34)
    xa, ya, xb, yb = _place_pair(rng, relation, size_a, size_b)
    a = Shape(ca, sa_, xa, ya, size_a, _angle(rng, sa_), _style(rng), _jitter(rng, COLOURS[ca]))
    b = Shape(cb, sb_, xb, yb, size_b, _angle(rng, sb_), _style(rng), _jitter(rng, COLOURS[cb]))
    return SceneSpec(_random_background(rng, [a.rgb, b.rgb]), (a, b), relation)


def swap_objects(spec: SceneSpec) -> SceneSpec:
    """The same two objects and background with their places exchanged: the scene that
    :meth:`SceneSpec.swapped_caption` describes (a hard negative for training and tests).

    Raises:
        ValueError: the scene holds one object.
    """
    if len(spec.objects) != 2 or spec.relation is None:
        raise ValueError("only a two-object scene can be swapped")
    a, b = spec.objects
    a2 = Shape(a.colour, a.shape, b.x, b.y, a.size, a.angle, a.style, a.rgb)
    b2 = Shape(b.colour, b.shape, a.x, a.y, b.size, b.angle, b.style, b.rgb)
    return SceneSpec(spec.background, (a2, b2), INVERSE_RELATION[spec.relation])


def reshape_object(spec: SceneSpec, rng: random.Random) -> SceneSpec:
    """The same scene with one object drawn as another shape (same colour, place, size, style): a hard negative
    whose caption differs from the original in one shape word. Two objects stay different things.
    """
    i = rng.randrange(len(spec.objects))
    obj = spec.objects[i]
    taken = {o.name for j, o in enumerate(spec.objects) if j != i}
    shapes = [s for s in SHAPES if s != obj.shape and f"{obj.colour} {s}" not in taken]
    shape = rng.choice(shapes)
    new = Shape(obj.colour, shape, obj.x, obj.y, obj.size, _angle(rng, shape), obj.style, obj.rgb)
    objects = tuple(new if j == i else o for j, o in enumerate(spec.objects))
    return SceneSpec(spec.background, objects, spec.relation)


def distinct_meanings(n_objects: int | None = None) -> int:
    """How many scenes with different meanings (:meth:`SceneSpec.key`) exist: 18 with one object, 612 with two
    (18 x 17 ordered object pairs x 4 relations, halved: "A left of B" means "B right of A"), 630 in all."""
    single = len(CLASS_NAMES)
    pairs = len(CLASS_NAMES) * (len(CLASS_NAMES) - 1) * len(RELATIONS) // 2
    return {1: single, 2: pairs}.get(n_objects, single + pairs)  # type: ignore[arg-type]


def iter_scenes(seed: int, n: int, n_objects: int | None = None, unique: bool = False,
                namespace: str = "scene") -> Iterator[SceneSpec]:  # fmt: skip
    """``n`` scenes of stream ``seed``; ``unique=True`` skips scenes whose meaning (:meth:`SceneSpec.key`) repeats,
    so every caption has exactly one matching image (retrieval evaluation).

    Raises:
        ValueError: ``unique=True`` and ``n`` is more than :func:`distinct_meanings` (it would never finish).
    """
    if unique and n > (limit := distinct_meanings(n_objects)):  # checked now, not at the first next()
        raise ValueError(f"only {limit} scenes with distinct meanings exist; ask for at most {limit}")
    return _scene_stream(seed, n, n_objects, unique, namespace)


def _scene_stream(seed: int, n: int, n_objects: int | None, unique: bool, namespace: str) -> Iterator[SceneSpec]:
    seen: set[str] = set()
    index = 0
    count = 0
    while count < n:
        spec = random_scene(scene_rng(seed, index, namespace), n_objects=n_objects)
        index += 1
        if unique:
            if spec.key() in seen:
                continue
            seen.add(spec.key())
        count += 1
        yield spec


# ---- rendering -------------------------------------------------------------------------------------------------


def _background_array(bg: Background, w: int, h: int) -> np.ndarray:
    if bg.kind == "gradient":
        theta = math.radians(bg.angle)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx / max(w - 1, 1) - 0.5) * math.cos(theta) + (yy / max(h - 1, 1) - 0.5) * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c0, c1 = (np.asarray(c, np.float32) for c in bg.colours)
        return c0 * (1 - t[..., None]) + c1 * t[..., None]
    base = np.empty((h, w, 3), np.float32)
    base[:] = np.asarray(bg.colours[0], np.float32)
    if bg.kind == "texture":
        rng = np.random.default_rng(bg.seed)
        # Low-frequency blotches: a 6x6 grid of offsets, smoothly upsampled; then a fine grain.
        grid = rng.uniform(-1.0, 1.0, (6, 6, 3)).astype(np.float32)
        img = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
        low = np.asarray(img, np.float32) / 127.5 - 1.0
        base += low * _TEXTURE_LOW + rng.normal(0.0, _TEXTURE_GRAIN, (h, w, 1)).astype(np.float32)
    return base


def _polygon(obj: Shape, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if obj.shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r * 0.86  # a square of side 1.72 r looks about as large as a circle of radius r
    else:  # triangle pointing up, centred on its centroid
        corners = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
        scale = r * 1.12
    a = math.radians(obj.angle)
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in corners]


def _draw_object(canvas: Image.Image, obj: Shape, ox: float, oy: float, side: float) -> None:
    cx, cy, r = ox + obj.x * side, oy + obj.y * side, obj.size * side / 2
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(obj, cx, cy, r), fill=255)
    rgb = np.asarray(obj.rgb, np.float32)
    if obj.style == "shaded":
        # A lighter top-left to darker bottom-right shading that keeps the hue (black stays near-black).
        h, w = canvas.size[1], canvas.size[0]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = np.clip(((xx - cx) + (yy - cy)) / (2 * r + 1e-6), -1, 1)[..., None]
        fill = np.clip(rgb * (1 - 0.18 * t) + 20 * (1 - t) * (rgb.mean() < 60), 0, 255).astype(np.uint8)
        canvas.paste(Image.fromarray(fill, "RGB"), (0, 0), mask)
    else:
        canvas.paste(tuple(int(c) for c in obj.rgb), (0, 0, *canvas.size), mask)  # type: ignore[arg-type]
    if obj.style == "outline":
        dark = rgb.mean() < 60
        edge = (95, 95, 95) if dark else tuple(int(c * 0.55) for c in obj.rgb)
        width = max(1, round(side * 0.012))
        d = ImageDraw.Draw(canvas)
        if obj.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=edge, width=width)
        else:
            pts = _polygon(obj, cx, cy, r)
            d.line([*pts, pts[0]], fill=edge, width=width, joint="curve")


def render_scene(spec: SceneSpec, size: int | tuple[int, int] = 256) -> Image.Image:
    """Draw a scene as an RGB image.

    Args:
        spec: the scene.
        size: side of a square image, or ``(width, height)``. Objects stay inside the central square, so a
            centre crop (what CLIP-style preprocessing does) keeps them whole.

    Returns:
        A PIL RGB image. Images under 128 px are drawn at twice the size and downsampled, so edges are smooth.
    """
    w, h = (size, size) if isinstance(size, int) else size
    if w < 8 or h < 8:
        raise ValueError(f"image size must be at least 8 px, got {w}x{h}")
    ss = 2 if min(w, h) < 128 else 1
    W, H = w * ss, h * ss
    side = min(W, H)
    ox, oy = (W - side) / 2, (H - side) / 2
    if spec.background.kind == "flat":
        canvas = Image.new("RGB", (W, H), spec.background.colours[0])
    else:
        bg = _background_array(spec.background, W, H)
        canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    for obj in spec.objects:
        _draw_object(canvas, obj, ox, oy, side)
    if ss != 1:
        canvas = canvas.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=None)
    return canvas


# ---- photo folders ---------------------------------------------------------------------------------------------

# EXIF orientation -> the transpose that turns the upright picture into the stored pixels; exif_transpose applies
# the inverse (3: ROTATE_180, 6: ROTATE_270, 8: ROTATE_90).
_STORE_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save(image: Image.Image, path: Path, fmt: str, orientation: int | None) -> None:
    if orientation:
        stored = image.transpose(_STORE_TRANSPOSE[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation
        stored.save(path, "JPEG", quality=90, exif=exif.tobytes())
    elif fmt == "PNG":
        image.save(path, "PNG", optimize=False)
    else:
        image.save(path, "JPEG", quality=90)


def generate_folder(
    directory: str | Path,
    n: int = 60,
    seed: int = 0,
    *,
    min_size: int = 256,
    max_size: int = 640,
    png_fraction: float = 0.25,
    exif_fraction: float = 0.15,
    broken: bool = False,
    manifest: bool = True,
) -> list[dict[str, Any]]:
    """Write ``n`` scene photos (JPEG and PNG, varied sizes and aspect ratios) into ``directory``.

    Some JPEGs store their pixels rotated with an EXIF orientation tag (3, 6 or 8), as phones do:
    ``PIL.ImageOps.exif_transpose`` restores the upright scene. Every meaning (caption) appears at most once.

    Args:
        directory: created if missing; existing files with the same names are overwritten.
        n: how many photos, at most :func:`distinct_meanings` (630).
        seed: the scene stream; the same seed writes the same files.
        min_size, max_size: range of each side in pixels.
        png_fraction, exif_fraction: shares of PNG files and of rotated JPEGs with an orientation tag.
        broken: also write three unreadable files (empty, truncated JPEG, text named .jpg) to show error handling.
        manifest: write :data:`MANIFEST_NAME` (one JSON object per file: file, caption, swapped_caption, ...).

    Returns:
        The manifest records, photos first, then the broken files (``"broken": reason``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    scenes = iter_scenes(seed, n, unique=True, namespace="folder")  # refuses n > 630 before anything is written
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for i, spec in enumerate(scenes):
        rng = scene_rng(seed, i, namespace="folder-file")
        w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
        orientation = rng.choice((3, 6, 8)) if rng.random() < exif_fraction else None
        fmt = "JPEG" if orientation or rng.random() >= png_fraction else "PNG"
        name = f"scene_{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        _save(render_scene(spec, (w, h)), out / name, fmt, orientation)
        records.append(
            {
                "file": name,
                "caption": spec.caption(),
                "captions": spec.captions(),
                "swapped_caption": spec.swapped_caption() if len(spec.objects) == 2 else None,
                "objects": [o.name for o in spec.objects],
                "relation": spec.relation,
                "width": w,
                "height": h,
                "orientation": orientation,
            }
        )
    if broken:
        (out / "broken_empty.jpg").write_bytes(b"")
        buf = io.BytesIO()
        render_scene(random_scene(scene_rng(seed, 0, "broken")), 320).save(buf, "JPEG", quality=90)
        (out / "broken_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        (out / "broken_text.jpg").write_text("this is a text file, not a photo\n")
        for name, reason in (
            ("broken_empty.jpg", "empty file"),
            ("broken_truncated.jpg", "truncated JPEG"),
            ("broken_text.jpg", "not an image"),
        ):
            records.append({"file": name, "broken": reason})
    if manifest:
        with open(out / MANIFEST_NAME, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


# ---- a captioned set (retrieval evaluation, tests) -------------------------------------------------------------
def write_captioned_folder(folder: str | Path, n: int = 24, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` two-object scenes and a ``captions.json`` with their 2 true captions.

    Scenes have distinct meanings, so each caption matches exactly one image. Deterministic for a seed; needs
    neither torch nor the network.

    The folder is what :func:`cocatk.evaluation.open_captioned_dataset` and ``cocatk eval-retrieval`` read.

    Returns:
        The path of ``captions.json``.

    Raises:
        UsageError: ``n`` is not between 1 and ``distinct_meanings(2)`` (612).
    """
    if not 1 <= n <= distinct_meanings(2):
        raise UsageError(
            f"n must be between 1 and {distinct_meanings(2)} (two-object scenes with distinct meanings), got {n}",
            hint=f"ask for at most {distinct_meanings(2)} images",
        )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    captions: dict[str, list[str]] = {}
    for i, spec in enumerate(iter_scenes(seed, n, n_objects=2, unique=True, namespace="captioned")):
        name = f"scene_{i:03d}.png"
        render_scene(spec, size).save(out / name)
        captions[name] = spec.captions()
    path = out / "captions.json"
    path.write_text(json.dumps(captions, indent=1))
    return path
