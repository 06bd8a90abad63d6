"""The cache of exported models: ``$COCATK_CACHE/text-onnx/<key>/`` per model identity, its ``meta.json`` record
(an export, or why a model cannot be exported), atomic publication, and the clean-up of older exports.

The key hashes the model identity an index records (name, architecture, weights id) with the export format and
open_clip's version. A folder is written under a temporary name and renamed into place, so a reader sees all of it
or nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import config

if TYPE_CHECKING:  # pragma: no cover
    pass


#: Bumped when the files or their meaning change: older exports are then ignored, re-made, and removed once the new
#: one is written. 3: CoCa's graph also returns the token embeddings, and the decoder is exported beside it; 4: the
#: image tower beside them; 5: a bf16 model's image tower is exported in float32 (format 4 recorded image_error).
FORMAT = 5

GRAPH, WEIGHTS, TOKENIZER, META = "text.onnx", "text.onnx.data", "tokenizer.json", "meta.json"


def available() -> bool:
    """True when ONNX Runtime and ``tokenizers`` can be imported (the query side's packages)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))


def cache_folder(identity: dict[str, str]) -> Path:
    """Where the export of the model with this identity (as an index manifest records it) lives."""
    oc = package_version("open_clip_torch")
    blob = json.dumps({"identity": identity, "format": FORMAT, "open_clip": oc}, sort_keys=True)
    return config.cache_dir() / "text-onnx" / hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_meta(identity: dict[str, str]) -> dict[str, Any] | None:
    """The cache's record for ``identity``: an export (``error`` absent), a model that cannot be exported (``error``
    says why; it is not tried again), or None when no export was tried."""
    try:
        meta = json.loads((cache_folder(identity) / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("identity") != identity:
        return None
    return meta


def describe(identity: dict[str, str]) -> dict[str, Any]:
    """What embeds a cold text query of the model with ``identity``, for ``cocatk info``: ``backend``
    (``onnxruntime`` or ``torch``), and ``export`` (the folder) or ``why`` torch; for a CoCa export, ``rerank``: what
    runs the rerank from cached tokens (the same keys)."""
    meta = read_meta(identity)
    if meta is None:
        why = "not exported yet (the next `cocatk index` run exports it)"
        if not config.text_onnx_enabled():
            why = "export switched off ($COCATK_TEXT_ONNX=0)"
        return {"backend": "torch", "why": why}
    if "error" in meta:
        return {"backend": "torch", "why": f"cannot be exported: {meta['error']}"}
    if not available():
        return {"backend": "torch", "why": "onnxruntime or tokenizers is not installed"}
    out = {"backend": "onnxruntime", "export": str(cache_folder(identity)), "max_abs_diff": meta.get("max_abs_diff")}
    out["images"] = (
        {"backend": "onnxruntime", "max_abs_diff": meta["image"].get("max_abs_diff")}
        if "image" in meta
        else {"backend": "torch", "why": meta.get("image_error", "no image tower in this export")}
    )
    if "decoder" in meta:  # the rerank from cached tokens runs there too
        out["rerank"] = {"backend": "onnxruntime", "max_nats_per_token": meta["decoder"].get("max_nats_per_token")}
    elif meta.get("info", {}).get("kind") == "coca":
        out["rerank"] = {"backend": "torch", "why": meta.get("decoder_error", "no decoder in this export")}
    return out


def needs_export(identity: dict[str, str]) -> bool:
    """True when no export of ``identity`` was tried, or a failed one was made with other package versions (torch,
    onnx, ONNX Runtime, tokenizers: a newer one may succeed)."""
    meta = read_meta(identity)
    return meta is None or ("error" in meta and meta.get("versions") != versions())


def versions() -> dict[str, str]:
    return {name: package_version(name) for name in ("torch", "onnx", "onnxruntime", "tokenizers")}


@functools.cache
def package_version(name: str) -> str:
    """An installed distribution's version, or ``"absent"``; read once per process (~7 ms each: a search's cache
    lookup asks for open_clip's twice)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def remove_older_exports(identity: dict[str, str]) -> list[Path]:
    """Delete the exports of the model ``identity`` other than the current one (an older format or open_clip
    version: an upgrade would otherwise leave ~250 MB per model behind); the folders removed."""
    current = cache_folder(identity)
    removed = []
    for meta_file in current.parent.glob(f"*/{META}"):
        folder = meta_file.parent
        if folder == current or folder.name.startswith("."):
            continue  # pathlib's * matches dot names: ".<key>-*" is another process's export, still being written
        try:
            other = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(other, dict) and other.get("identity") == identity:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def record_failure(folder: Path, identity: dict[str, str], reason: str) -> None:
    _publish(folder, {"format": FORMAT, "identity": identity, "error": reason, "versions": versions()})


#: A temporary export folder older than this is a killed export's: swept at the next export.
_STALE_SECONDS = 3600


def sweep_stale(parent: Path) -> None:
    """Remove temporary folders (``.<key>-*``) that killed exports left behind."""
    now = time.time()
    for p in parent.glob(".*-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)


def _publish(folder: Path, meta: dict[str, Any]) -> None:
    """Write a folder holding only ``meta`` (a model that cannot be exported), atomically; best effort."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            (tmp / META).write_text(json.dumps(meta, indent=1))
            rename_into_place(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # not recorded: the next run tries again


def rename_into_place(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` to ``folder``. A folder already there is replaced when it holds no valid record (a
    hand edit, a crash of older code) or a failure record while ``tmp`` holds an export; a valid export there
    (another process won) is kept."""
    mine = json.loads((tmp / META).read_text())
    there = read_meta(mine["identity"])
    if folder.exists() and (there is None or ("error" in there and "error" not in mine)):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if read_meta(mine["identity"]) is None:  # not another exporter's finished folder: a real failure
            raise


def write_error(folder: Path, e: OSError) -> Exception:
    from ...errors import ExportError

    return ExportError(
        f"cannot write the ONNX text tower under {folder.parent}: {e.strerror or e}",
        hint="free disk space or point $COCATK_CACHE at a writable folder",
    )


def remove_export(identity: dict[str, str]) -> bool:
    """Delete the export of ``identity`` (best effort: another process may be doing the same); True when it is
    gone."""
    folder = cache_folder(identity)
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()
