"""Evaluation datasets for zero-shot classification: ImageNet, CIFAR, ImageFolder trees and Hugging Face datasets.

``open_dataset(spec)`` resolves what the user typed:

- ``imagenet``: ``--data DIR`` with ``DIR/<synset>/*.JPEG`` (the standard val layout), or the flat val folder with
  the devkit (``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``) or Kaggle's ``LOC_val_solution.csv``;
  without ``--data``, ``ILSVRC/imagenet-1k`` (validation) from the local Hugging Face cache.
- ``cifar10`` / ``cifar100``: ``uoft-cs/cifar10`` / ``uoft-cs/cifar100`` (test) from the local Hugging Face cache,
  or ``--data DIR`` written by ``save_to_disk``.
- a folder in ImageFolder layout: one sub-folder per class, ``_`` in folder names read as a space.
- ``hf:NAME`` (a cached Hugging Face dataset) or ``hf:PATH`` (a folder written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk``).

Nothing is ever downloaded: missing data raises :class:`~cocatk.errors.DatasetError` whose hint says how to
provide it. Images are decoded the way the reference protocol does: a full PIL decode, ``convert("RGB")``, EXIF
orientation left as stored.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError, UsageError
from ..zeroshot._data import CIFAR10_CLASSNAMES, CIFAR100_CLASSNAMES, IMAGENET_SYNSETS
from .data import decode_cell, load_cached, load_saved, undecoded

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_GT_FILE = "ILSVRC2012_validation_ground_truth.txt"

_IMAGENET_HF = ("ILSVRC/imagenet-1k", "imagenet-1k")
_SPLIT_PREFERENCE = ("validation", "val", "valid", "test")


@dataclass
class ZeroShotDataset:
    """Labelled images for evaluation: class names, int labels, and a way to fetch and decode image ``i``.

    Attributes:
        name: ``imagenet``, ``cifar10``, ``cifar100``, ``folder`` or ``hf``.
        source: where the images come from (a path, or a Hugging Face id and split), for result records.
        classnames: class names in label order.
        labels: int64 (N,) class ids.
        default_templates: the template set used when ``--templates`` is not given.
        benchmark: the key of published reference numbers (``imagenet1k``, ``cifar10``, ``cifar100``) or None.
    """

    name: str
    source: str
    classnames: list[str]
    labels: np.ndarray
    default_templates: str
    benchmark: str | None = None
    #: indices -> raw items (paths or bytes); called from the main thread.
    fetch: Callable[[Sequence[int]], list[Any]] = field(default=lambda idx: [], repr=False)
    #: raw item -> RGB PIL image; thread-safe.
    decode: Callable[[Any], Image.Image] = field(default=lambda raw: raw, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": len(self.classnames),
            "num_images": len(self),
            "benchmark": self.benchmark,
        }


# ---- decoding ----------------------------------------------------------------------------------------------
def decode_path(path: Any) -> Image.Image:
    """Full PIL decode of a file to RGB (no draft-mode shortcut, EXIF orientation as stored)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _decode_hf(raw: Any) -> Image.Image:
    """A Hugging Face image cell (see :func:`~cocatk.evaluation.data.decode_cell`), decoded like a file."""
    return decode_cell(raw, decode_path)


# ---- folders -----------------------------------------------------------------------------------------------
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _path_dataset(
    name: str,
    source: str,
    classnames: list[str],
    paths: list[Path],
    labels: list[int],
    templates: str,
    benchmark: str | None,
) -> ZeroShotDataset:
    return ZeroShotDataset(
        name=name,
        source=source,
        classnames=classnames,
        labels=np.asarray(labels, dtype=np.int64),
        default_templates=templates,
        benchmark=benchmark,
        fetch=lambda idx: [paths[i] for i in idx],
        decode=decode_path,
    )


def open_image_folder(root: Path) -> ZeroShotDataset:
    """An ImageFolder tree: ``root/<class>/**/*.jpg``; classes sorted by folder name, ``_`` read as a space.

    Raises:
        DatasetError: no class folders or no images.
    """
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(classes):
        found = _walk_images(d)
        paths += found
        labels += [label] * len(found)
    if not classes or not paths:
        raise DatasetError(
            f"{root} holds no images in class sub-folders",
            hint="lay the images out as DIR/<class name>/<image>.jpg (one sub-folder per class)",
        )
    names = [d.name.replace("_", " ") for d in classes]
    return _path_dataset("folder", str(root), names, paths, labels, "openai", None)


def _imagenet_classnames() -> list[str]:
    from open_clip import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def open_imagenet_folder(root: Path) -> ZeroShotDataset:
    """ImageNet val from disk: ``root/<synset>/`` folders, or the flat folder plus devkit / Kaggle labels.

    Raises:
        DatasetError: the layout is not recognised or labels are missing.
    """
    if (root / "val").is_dir() and not any(root.glob("n*/")):
        root = root / "val"
    index = {s: i for i, s in enumerate(IMAGENET_SYNSETS)}
    synset_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name in index)
    if synset_dirs:
        paths: list[Path] = []
        labels: list[int] = []
        for d in synset_dirs:
            found = _walk_images(d)
            paths += found
            labels += [index[d.name]] * len(found)
        if not paths:
            raise DatasetError(f"the synset folders in {root} hold no images", hint=_IMAGENET_HINT)
        return _path_dataset("imagenet", str(root), _imagenet_classnames(), paths, labels, "openai", "imagenet1k")
    files = sorted(p for p in root.iterdir() if _is_image(p))
    if not files:
        raise DatasetError(f"{root} holds neither synset folders nor validation images", hint=_IMAGENET_HINT)
    by_stem = _imagenet_flat_labels(root, [p.stem for p in files])
    return _path_dataset(
        "imagenet",
        str(root),
        _imagenet_classnames(),
        files,
        [by_stem[p.stem] for p in files],
        "openai",
        "imagenet1k",
    )


_IMAGENET_HINT = (
    "pass --data DIR with the ILSVRC-2012 validation images as DIR/<synset>/*.JPEG (1000 folders n01440764 ...), "
    f"or the flat folder of 50,000 ILSVRC2012_val_*.JPEG with the devkit's data/{IMAGENET_GT_FILE} and data/meta.mat "
    "(or Kaggle's LOC_val_solution.csv) beside it; or put ILSVRC/imagenet-1k in the Hugging Face datasets cache "
    "(on a machine with network: `python -c \"import datasets; datasets.load_dataset('ILSVRC/imagenet-1k', "
    "split='validation')\"` after accepting the licence on huggingface.co)"
)


def _find(root: Path, name: str) -> Path | None:
    for base in (root, root.parent):
        for candidate in (base / name, base / "data" / name, base / "ILSVRC2012_devkit_t12" / "data" / name):
            if candidate.is_file():
                return candidate
    return None


def _imagenet_flat_labels(root: Path, stems: list[str]) -> dict[str, int]:
    """Labels of flat val images ``ILSVRC2012_val_00000001`` ... from Kaggle's CSV or the devkit files."""
    index = {s: i for i, s in enumerate(IMAGENET_SYNSETS)}
    kaggle = _find(root, "LOC_val_solution.csv")
    labels: dict[str, int] = {}
    if kaggle is not None:
        with open(kaggle, newline="") as f:
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = index[row["PredictionString"].split()[0]]
    else:
        gt = _find(root, IMAGENET_GT_FILE)
        if gt is None:
            raise DatasetError(f"no labels for the flat ImageNet folder {root}", hint=_IMAGENET_HINT)
        devkit_ids = [int(line) for line in gt.read_text().split()]
        # The devkit's ids (1..1000) follow meta.mat's synset order, not the sorted order: map them through it.
        id_to_synset = _devkit_synsets(gt.parent / "meta.mat")
        for number, devkit_id in enumerate(devkit_ids, start=1):
            labels[f"ILSVRC2012_val_{number:08d}"] = index[id_to_synset[devkit_id]]
    missing = [s for s in stems if s not in labels]
    if missing:
        raise DatasetError(
            f"{len(missing)} images in {root} have no ground-truth label (first: {missing[0]})",
            hint="keep the original ILSVRC2012_val_XXXXXXXX.JPEG names, or use the DIR/<synset>/ layout",
        )
    return labels


def _devkit_synsets(meta: Path) -> dict[int, str]:
    if not meta.is_file():
        raise DatasetError(
            f"{IMAGENET_GT_FILE} found but not the devkit's meta.mat beside it ({meta})",
            hint="extract the whole ILSVRC2012_devkit_t12 (its data/ folder holds both files), "
            "or use the DIR/<synset>/ layout",
        )
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DatasetError(
            "reading the devkit's meta.mat needs scipy",
            hint="pip install scipy, or sort the images into DIR/<synset>/ folders",
        ) from e
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s[0]): str(s[1]) for s in synsets if int(s[0]) <= 1000}


# ---- Hugging Face ------------------------------------------------------------------------------------------
def _pick_column(features: Any, wanted: str | None, kind: str, preferred: tuple[str, ...], what: str) -> str:
    import datasets

    cls = datasets.Image if kind == "image" else datasets.ClassLabel
    if wanted is not None:
        if wanted not in features:
            raise UsageError(
                f"{what} has no column '{wanted}'", hint=f"use --{kind}-column with one of: {', '.join(features)}"
            )
        return wanted
    matching = [c for c, f in features.items() if isinstance(f, cls)]
    for c in (*preferred, *matching):
        if c in matching:
            return c
    raise DatasetError(
        f"{what} has no {'Image' if kind == 'image' else 'ClassLabel'} column (columns: {', '.join(features)})",
        hint=f"pass --{kind}-column NAME"
        + ("" if kind == "image" else ", and cast it to ClassLabel so the class names are known"),
    )


def hf_dataset(
    ds: Any,
    source: str,
    image_column: str | None = None,
    label_column: str | None = None,
    classnames: Sequence[str] | None = None,
    name: str = "hf",
    templates: str = "openai",
    benchmark: str | None = None,
) -> ZeroShotDataset:
    """Wrap a ``datasets.Dataset`` (image column + ClassLabel column) as a :class:`ZeroShotDataset`."""
    import datasets

    image_col = _pick_column(ds.features, image_column, "image", ("image", "img", "jpg", "png"), source)
    label_col = _pick_column(ds.features, label_column, "label", ("label", "labels", "fine_label"), source)
    feature = ds.features[label_col]
    if classnames is None:
        if not isinstance(feature, datasets.ClassLabel):
            raise DatasetError(
                f"column '{label_col}' of {source} is not a ClassLabel, so the class names are unknown",
                hint=f"cast it: ds.cast_column('{label_col}', datasets.ClassLabel(names=[...])) and save again",
            )
        classnames = [n.replace("_", " ") for n in feature.names]
    labels = np.asarray(ds[label_col], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise DatasetError(
            f"labels of {source} fall outside 0..{len(classnames) - 1}",
            hint="drop unlabelled rows (label -1) before evaluating",
        )
    raw = undecoded(ds, image_col).select_columns([image_col])
    return ZeroShotDataset(
        name=name,
        source=source,
        classnames=list(classnames),
        labels=labels,
        default_templates=templates,
        benchmark=benchmark,
        fetch=lambda idx: raw[list(idx)][image_col],
        decode=_decode_hf,
    )


_CIFAR = {
    "cifar10": ("uoft-cs/cifar10", CIFAR10_CLASSNAMES, "label"),
    "cifar100": ("uoft-cs/cifar100", CIFAR100_CLASSNAMES, "fine_label"),
}


def open_dataset(
    spec: str,
    data_dir: str | Path | None = None,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ZeroShotDataset:
    """Resolve a dataset name or path (see the module docstring) without downloading anything.

    Args:
        spec: ``imagenet``, ``cifar10``, ``cifar100``, a folder (ImageFolder layout), ``hf:NAME`` or ``hf:PATH``.
        data_dir: where ``imagenet`` / ``cifar*`` live on disk.
        split: dataset split (Hugging Face data); default validation, else test, else the first one.
        image_column / label_column: Hugging Face columns; default the Image / ClassLabel column.

    Raises:
        DatasetError: data missing or malformed (the hint says how to provide it).
        UsageError: unknown split or column.
    """
    key = spec.strip()
    data = Path(data_dir).expanduser() if data_dir else None
    if data is not None and not data.exists():
        raise DatasetError(f"--data {data} does not exist", hint="pass the folder that holds the dataset")

    if key.lower() == "imagenet":
        if data is not None:
            return open_imagenet_folder(data)
        errors = []
        for name in _IMAGENET_HF:
            try:
                ds, used = load_cached(name, split or "validation", _SPLIT_PREFERENCE)
            except UsageError:
                raise
            except Exception as e:  # not cached shows up as ConnectionError, FileNotFoundError, DatasetNotFoundError
                errors.append(f"{name}: {type(e).__name__}")
                continue
            return hf_dataset(
                ds,
                f"hf:{name}[{used}]",
                image_column,
                label_column,
                _imagenet_classnames(),
                "imagenet",
                "openai",
                "imagenet1k",
            )
        raise DatasetError(
            f"ImageNet was not found: no --data and not in the Hugging Face cache ({'; '.join(errors)})",
            hint=_IMAGENET_HINT,
        )

    if key.lower() in _CIFAR:
        hub_name, names, label = _CIFAR[key.lower()]
        if data is not None:
            ds, used = load_saved(data, split or "test", _SPLIT_PREFERENCE)
            src = f"{data}[{used}]"
        else:
            try:
                ds, used = load_cached(hub_name, split or "test", _SPLIT_PREFERENCE)
            except UsageError:
                raise
            except Exception as e:
                raise DatasetError(
                    f"{key} is not in the local Hugging Face datasets cache ({type(e).__name__})",
                    hint=f'on a machine with network run `python -c "import datasets; datasets.load_dataset('
                    f"'{hub_name}', split='test')\"` to fill the cache (copy ~/.cache/huggingface/datasets here), "
                    f"or save it with .save_to_disk(DIR) and pass --data DIR",
                ) from e
            src = f"hf:{hub_name}[{used}]"
        return hf_dataset(ds, src, image_column, label_column or label, names, key.lower(), "cifar", key.lower())

    if key.startswith("hf:"):
        name = key[3:]
        if not name:
            raise UsageError("empty Hugging Face dataset name", hint="use hf:NAME or hf:/path/to/saved_dataset")
        path = Path(name).expanduser()
        if path.exists():
            ds, used = load_saved(path, split, _SPLIT_PREFERENCE)
            return hf_dataset(ds, f"{path}" + (f"[{used}]" if used else ""), image_column, label_column)
        try:
            ds, used = load_cached(name, split, _SPLIT_PREFERENCE)
        except UsageError:
            raise
        except Exception as e:
            raise DatasetError(
                f"Hugging Face dataset '{name}' is not in the local cache ({type(e).__name__})",
                hint=f"on a machine with network run `python -c \"import datasets; datasets.load_dataset('{name}')\"`"
                ", or save it with .save_to_disk(DIR) and pass hf:DIR",
            ) from e
        return hf_dataset(ds, f"hf:{name}" + (f"[{used}]" if used else ""), image_column, label_column)

    path = Path(key).expanduser()
    if path.is_dir():
        return open_image_folder(path)
    raise DatasetError(
        f"unknown dataset '{spec}'",
        hint="use imagenet, cifar10, cifar100, a folder with one sub-folder per class, hf:NAME or hf:/saved/path",
    )
