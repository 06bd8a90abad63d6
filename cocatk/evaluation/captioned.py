"""Captioned image sets for retrieval evaluation, opened without decoding any image.

What :func:`open_captioned_dataset` reads: a Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``:
``images[].filename / filepath / split / sentences[].raw``) with its image folder, a plain ``{"image.jpg":
["caption", ...]}`` JSON, a folder holding one of those (or the ``captions.jsonl`` that ``cocatk.demo`` writes),
or ``hf:PATH``, a Hugging Face dataset saved with ``save_to_disk`` with an image and a caption column.

Images are decoded the way the indexer does (:func:`cocatk.images.load_image`: EXIF orientation applied), without
the megapixel guard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError, UsageError
from .data import decode_cell, load_saved, undecoded

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

_DATA_HINT = (
    "pass a Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json) with --images DIR, a folder holding "
    'captions.json ({"image.jpg": ["caption", ...]}), or hf:PATH (a dataset saved with save_to_disk); '
    "README 'cocatk eval-retrieval' says where to get COCO and Flickr30k"
)

#: Split of a DatasetDict when --split is not given (the published retrieval figures are on test).
_SPLIT_PREFERENCE = ("test", "validation")


# ---- the set ----------------------------------------------------------------------------------------------------
@dataclass
class CaptionedDataset:
    """Images, their captions, and which image each caption belongs to.

    Attributes:
        name: what was opened (a path or ``hf:PATH``).
        images: one entry per image: a file path, or a row index for Hugging Face data.
        captions: all captions, flat.
        caption_image: int64 (C,): the image index of each caption.
        benchmark: ``coco5k`` / ``flickr1k`` when the data is that published test set, else None.
        split: the split used, when the source has splits.
    """

    name: str
    images: list[Any]
    captions: list[str]
    caption_image: np.ndarray
    benchmark: str | None = None
    split: str | None = None
    _loader: Callable[[Any], Image.Image] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` to RGB (EXIF orientation applied)."""
        if self._loader is not None:
            return self._loader(self.images[i])
        from ..images import load_image

        return load_image(self.images[i], max_megapixels=None)

    def subset(self, limit: int) -> CaptionedDataset:
        """The first ``limit`` images and their captions (a published reference no longer applies)."""
        if limit >= len(self.images):
            return self
        keep = self.caption_image < limit
        return CaptionedDataset(
            name=self.name,
            images=self.images[:limit],
            captions=[c for c, k in zip(self.captions, keep, strict=False) if k],
            caption_image=self.caption_image[keep],
            benchmark=None,
            split=self.split,
            _loader=self._loader,
        )


def _from_pairs(name: str, items: Sequence[tuple[Any, Sequence[str]]], **kw: Any) -> CaptionedDataset:
    images, captions, owner = [], [], []
    for img, caps in items:
        caps = [caps] if isinstance(caps, str) else [str(c) for c in caps if str(c).strip()]
        if not caps:
            continue
        for c in caps:
            captions.append(c.strip())
            owner.append(len(images))
        images.append(img)
    if not images:
        raise DatasetError(f"{name} holds no captioned images", hint=_DATA_HINT)
    return CaptionedDataset(name, images, captions, np.asarray(owner, dtype=np.int64), **kw)


def _resolve_files(name: str, root: Path, rels: Sequence[Sequence[str]]) -> list[Path]:
    """For each image, the first candidate path that exists; a clear error naming the first missing file."""
    out = []
    for cands in rels:
        found = next((root / c for c in cands if (root / c).is_file()), None)
        if found is None:
            raise DatasetError(
                f"image {cands[0]} listed in {name} is not under {root}",
                hint="pass --images DIR, the folder that holds the images (for COCO the one containing val2014/)",
            )
        out.append(found)
    return out


def _karpathy(path: Path, data: dict[str, Any], split: str | None, root: Path) -> CaptionedDataset:
    entries = data["images"]
    if split:
        splits = sorted({str(e.get("split")) for e in entries})
        entries = [e for e in entries if e.get("split") == split]
        if not entries:
            raise UsageError(f"{path.name} has no images in split '{split}'", hint=f"use --split {'/'.join(splits)}")
    rels = [
        [str(Path(e.get("filepath", "")) / e["filename"]), e["filename"]] if e.get("filepath") else [e["filename"]]
        for e in entries
    ]
    files = _resolve_files(path.name, root, rels)
    caps = [[s["raw"] if "raw" in s else " ".join(s.get("tokens", [])) for s in e["sentences"]] for e in entries]
    kind = str(data.get("dataset", "")).lower()
    benchmark = None
    if split == "test" and kind == "coco" and len(entries) == 5000:
        benchmark = "coco5k"
    elif split == "test" and kind.startswith("flickr30k") and len(entries) == 1000:
        benchmark = "flickr1k"
    return _from_pairs(str(path), list(zip(files, caps, strict=False)), benchmark=benchmark, split=split)


def _caption_json(path: Path, split: str | None, images_dir: Path | None) -> CaptionedDataset:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}", hint=_DATA_HINT) from e
    root = images_dir or path.parent
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _karpathy(path, data, split, root)
    if isinstance(data, dict) and all(isinstance(v, (str, list)) for v in data.values()):
        files = _resolve_files(path.name, root, [[k] for k in data])
        return _from_pairs(str(path), list(zip(files, data.values(), strict=False)))
    raise DatasetError(f"{path} is neither a Karpathy split JSON nor an image -> captions mapping", hint=_DATA_HINT)


def _jsonl(path: Path, images_dir: Path | None) -> CaptionedDataset:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("broken") and (r.get("captions") or r.get("caption"))]
    files = _resolve_files(path.name, images_dir or path.parent, [[r["file"]] for r in rows])
    return _from_pairs(str(path), [(f, r.get("captions") or [r["caption"]]) for f, r in zip(files, rows, strict=False)])


def _hf(spec: str, split: str | None, image_column: str | None, caption_column: str | None) -> CaptionedDataset:
    import datasets

    path = Path(spec[3:]).expanduser()
    if not path.exists():
        raise DatasetError(f"{path} does not exist", hint="save the dataset with ds.save_to_disk(PATH), pass hf:PATH")
    ds, split = load_saved(path, split, _SPLIT_PREFERENCE, what=spec)
    features = ds.features
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if caption_column is None:
        caption_column = next((c for c in ("caption", "captions", "sentences", "text", "raw") if c in features), None)
    for col, what in ((image_column, "image"), (caption_column, "caption")):
        if col is None or col not in features:
            raise UsageError(
                f"{spec}: no {what} column{f' {col!r}' if col else ''} (columns: {', '.join(features)})",
                hint=f"pass --{what}-column NAME",
            )
    raw = undecoded(ds, image_column)

    def load(i: int) -> Image.Image:
        from ..images import load_image

        return decode_cell(raw[int(i)][image_column], lambda src: load_image(src, max_megapixels=None))

    caps = ds[caption_column]
    return _from_pairs(spec, list(zip(range(len(ds)), caps, strict=False)), split=split, _loader=load)


def open_captioned_dataset(
    data: str | Path,
    split: str | None = "test",
    images_dir: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> CaptionedDataset:
    """Open a captioned image set without decoding any image.

    Args:
        data: a Karpathy split JSON, an ``{"image": [captions]}`` JSON, a folder holding ``captions.json``,
            ``dataset_coco.json``, ``dataset_flickr30k.json`` or ``captions.jsonl``, or ``hf:PATH``.
        split: the Karpathy / Hugging Face split (``test`` by default; None for every image of a Karpathy JSON).
        images_dir: where the image files are (default: the JSON's folder).
        image_column, caption_column: Hugging Face columns (default: the Image column and ``caption``/``captions``).

    Raises:
        DatasetError: missing or malformed data (the hint says what to pass). UsageError: bad split or column.
    """
    spec = str(data)
    if spec.startswith("hf:"):
        return _hf(spec, split, image_column, caption_column)
    path = Path(spec).expanduser()
    root = Path(images_dir).expanduser() if images_dir else None
    if root is not None and not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist", hint="pass --images DIR, the folder of the images")
    if path.is_dir():
        for fname in ("captions.json", "dataset_coco.json", "dataset_flickr30k.json", "captions.jsonl"):
            if (path / fname).is_file():
                path = path / fname
                break
        else:
            raise DatasetError(f"{path} holds no captions.json, Karpathy JSON or captions.jsonl", hint=_DATA_HINT)
    if not path.is_file():
        raise DatasetError(f"captioned data {spec} not found", hint=_DATA_HINT)
    if path.suffix == ".jsonl":
        return _jsonl(path, root)
    return _caption_json(path, split, root)
