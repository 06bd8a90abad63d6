"""Index maintenance on the index layer: forget roots, compact the folder, describe it, check it.

Each function takes an open :class:`~cocatk.retrieval.folder.IndexFolder`; :class:`~cocatk.retrieval.index.Index`
exposes them as ``forget``, ``compact``, ``info`` and ``check``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from . import sourcestore, tagstore
from .layout import is_under, json_failure
from .vectors import DEFAULT_FACTORY

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder


@dataclass
class CheckReport:
    """Result of :func:`check_index`: ``ok`` when SQLite and FAISS agree."""

    ok: bool
    problems: list[str]
    files: int
    vectors: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forget_roots(index: IndexFolder, roots: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Drop roots from the index with every file, vector, token and failure below them (an old drive, a folder
    you no longer want searched). Nothing on disk outside the index folder is touched.

    Returns:
        ``{"roots": [...], "files": N}``: the roots dropped and how many indexed files went with them.

    Raises:
        UsageError: a path is not one of the index's roots. IndexBusyError: another process is writing.
    """
    with index.writer_lock():
        stored = index.store.roots()
        targets: list[str] = []
        for p in roots:
            candidates = {os.path.abspath(os.path.expanduser(os.fspath(p)))}
            with contextlib.suppress(OSError):
                candidates.add(str(Path(p).expanduser().resolve()))
            match = next((r for r in stored if r in candidates), None)
            if match is None:
                from ..paths import display_path

                listed = ", ".join(display_path(r) for r in stored) or "none"
                raise UsageError(
                    f"{display_path(os.fspath(p))} is not a root of the index at {index.dir}",
                    hint=f"pass one of its roots ({listed}); `cocatk info` lists them",
                )
            targets.append(match)
        ids = np.unique(np.concatenate([index.store.ids_under(r) for r in targets] or [np.zeros(0, np.int64)]))
        # A shard's items are below it (shard#key), and only below it: a folder that holds a shard which stays a
        # root keeps that shard's items.
        kept = sourcestore.member_ids(index.store, [r for r in stored if r not in targets])
        ids = np.union1d(ids, np.fromiter(sourcestore.member_ids(index.store, targets), np.int64))
        ids = ids[~np.isin(ids, np.fromiter(kept, np.int64))] if kept else ids
        vectors = index.vectors if index.store.manifest() is not None else None
        failed = [f for f in index.store.failure_rows() if is_under(f, targets)]
        index.store.begin()
        try:
            index.store.delete_files(ids.tolist())
            index.store.delete_failures(failed)
            for r in targets:
                index.store.remove_root(r)
            sourcestore.forget_done(index.store, targets)
            gen = index.store.bump_generation()
            index.store.commit()
        except BaseException:
            index.store.rollback()
            raise
        # SQLite is committed; the FAISS file of the new generation follows (rebuilt from SQLite if we die here).
        if vectors is not None and vectors.remove(ids):
            vectors.save(index.vector_path(gen))
            index.cleanup_vector_files(keep=gen)
            index.set_vectors(vectors, gen)
        elif vectors is not None:
            index.set_vectors(index.load_vectors(gen, save=True), gen)
        return {"index_dir": str(index.dir), "roots": targets, "files": int(len(ids))}


def compact_index(index: IndexFolder) -> dict[str, Any]:
    """Reclaim disk space: fold the SQLite write-ahead log back, VACUUM the database, delete stale vector and
    temporary files. Searches may run meanwhile; writers wait (the writer lock is held).

    Returns:
        ``{"before_bytes", "after_bytes", "reclaimed_bytes", "removed_files"}``.
    """
    with index.writer_lock():
        before = folder_bytes(index.dir)
        index.store.vacuum()
        gen = index.store.generation
        removed = []
        keep = index.vector_path(gen).name
        for p in index.dir.iterdir():
            stale = p.name.startswith("vectors.") and p.name != keep
            if stale or p.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
        if index.store.manifest() is not None and index.store.count():
            index.set_vectors(index.load_vectors(gen, save=True), gen)  # writes the current file when it was missing
        after = folder_bytes(index.dir)
        return {
            "index_dir": str(index.dir),
            "before_bytes": before,
            "after_bytes": after,
            "reclaimed_bytes": before - after,
            "removed_files": sorted(removed),
        }


def index_info(index: IndexFolder) -> dict[str, Any]:
    """Manifest, counts, roots, size on disk and failures, as plain data."""
    from ..models.onnx import describe

    failures = index.store.failures()
    size = folder_bytes(index.dir)
    gen = index.store.generation
    manifest = index.store.manifest()
    return {
        "index_dir": str(index.dir),
        "manifest": manifest,  # None: the first run never recorded a model (an empty index)
        "files": index.store.count(),
        "unique_contents": index.store.unique_contents(),
        "roots": index.store.roots(),
        "generation": gen,
        "faiss_file": index.vector_path(gen).name if index.vector_path(gen).is_file() else None,
        "size_bytes": size,
        "token_cache_bytes": index.store.token_bytes(),
        "captions": index.store.caption_configs(),
        "tags": tagstore.configs(index.store),
        "sidecars": len(tagstore.sidecars(index.store)),
        "failed": dict(Counter(f["reason"] for f in failures)),
        "failures": [json_failure(f) for f in failures],
        # What embeds a cold text query (cocatk.models.onnx); None for an empty index.
        "text_queries": describe(manifest["identity"]) if manifest else None,
    }


def check_index(index: IndexFolder) -> CheckReport:
    """Verify that SQLite and FAISS agree: same ids, same count, same vectors (exact for Flat), tokens and
    captions only for indexed files, every file under a root, SQLite integrity. Does not modify anything
    (`cocatk check`; a problem it lists is one that a rerun of the interrupted command did not repair)."""
    problems = list(index.store.integrity_problems())
    m = index.manifest
    store_ids = index.store.ids()
    vi = index.load_vectors(index.store.generation)
    faiss_ids = np.sort(vi.ids())
    if len(faiss_ids) != vi.ntotal:
        problems.append(f"faiss id map has {len(faiss_ids)} ids for {vi.ntotal} vectors")
    if len(np.unique(faiss_ids)) != len(faiss_ids):
        problems.append("faiss holds duplicate ids")
    if not np.array_equal(faiss_ids, store_ids):
        only_s = np.setdiff1d(store_ids, faiss_ids)[:5].tolist()
        only_f = np.setdiff1d(faiss_ids, store_ids)[:5].tolist()
        problems.append(f"ids differ: only in sqlite {only_s}, only in faiss {only_f}")
    elif len(store_ids) and m.get("factory", DEFAULT_FACTORY) == "Flat":
        stored = index.store.embeddings(store_ids.tolist(), index.dim)
        if not np.array_equal(vi.reconstruct(store_ids), stored):
            problems.append("faiss vectors differ from the stored embeddings")
    if len(store_ids):
        _, vecs = index.store.all_embeddings(index.dim)
        norms = np.linalg.norm(vecs, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            problems.append("some stored embeddings are not L2-normalised")
    tok_ids = index.store.token_ids()
    orphans = tok_ids - set(store_ids.tolist())
    if orphans:
        problems.append(f"{len(orphans)} token rows without a file")
    caption_orphans = index.store.caption_ids() - set(store_ids.tolist())
    if caption_orphans:
        problems.append(f"{len(caption_orphans)} captioned ids without a file, e.g. {min(caption_orphans)}")
    if m is not None and m.get("cache_tokens") and len(tok_ids) > len(store_ids):
        problems.append(f"{len(tok_ids)} token rows for {len(store_ids)} files")
    roots = index.store.roots()
    shard_of = sourcestore.member_sources(index.store)  # an item is under the shard that holds it: shard#key
    outside = [p for p in index.store.file_rows() if not is_under(shard_of.get(p, p), roots)]
    if outside:
        problems.append(f"{len(outside)} files outside every root, e.g. {outside[0]}")
    return CheckReport(not problems, problems, len(store_ids), vi.ntotal, len(tok_ids))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder``."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


__all__ = ["CheckReport", "check_index", "compact_index", "folder_bytes", "forget_roots", "index_info"]
