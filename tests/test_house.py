"""The house in order (issue 19): one direction between modules, the encoder seam, the typed update options."""

from __future__ import annotations

import ast
import hashlib
import shutil
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

import cocatk
from cocatk.errors import UsageError
from cocatk.retrieval import Index
from cocatk.retrieval.encoder import Encoded, EncodeJob, LocalEncoder, StageTimer, hash_bytes
from cocatk.retrieval.updater import UpdateOptions
from tests.conftest import TINY_CONFIG
from tests.test_index import assert_consistent, make_images

PACKAGE = Path(cocatk.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """cocatk modules imported when ``path`` is imported: module-level imports, not those under TYPE_CHECKING or
    inside functions (those run later, after every module has finished loading)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: Sequence[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("cocatk"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.startswith("cocatk"):
                    for alias in node.names:  # "from . import x" may name a submodule
                        sub = f"{base}.{alias.name}"
                        found.add(
                            sub
                            if (PACKAGE.parent / sub.replace(".", "/")).exists()
                            or (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                            else base
                        )

    visit(tree.body)
    found.discard(name)
    return found


def test_no_module_level_import_cycle() -> None:
    # Explicit imports only: that importing a.b.c first runs a/__init__ is Python's order, not a dependency of
    # a.b.c on its package's names.
    graph = {_module_name(p): _runtime_imports(p) for p in PACKAGE.rglob("*.py")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    assert cycles == [], cycles


def test_the_updater_does_not_import_the_index_module_at_run_time() -> None:
    imports = _runtime_imports(PACKAGE / "retrieval" / "updater.py")
    assert "cocatk.retrieval.index" not in imports
    assert "cocatk.retrieval.updater" in _runtime_imports(PACKAGE / "retrieval" / "index.py")
    assert "cocatk.retrieval.index" not in _runtime_imports(PACKAGE / "retrieval" / "search.py")


def test_update_options_are_typed_and_checked() -> None:
    opts = UpdateOptions(paths=("a",), batch_size=4)
    with pytest.raises(AttributeError):
        opts.batch_size = 8  # type: ignore[misc]  # frozen
    for bad in ({"checkpoint_every": 0}, {"batch_size": 0}, {"workers": -1}):
        with pytest.raises(UsageError):
            UpdateOptions(**bad)


class HashEncoder:
    """An encoder with no model: each content's embedding is a unit vector seeded by its hash. It follows the
    contract of :mod:`cocatk.retrieval.encoder` and records what it was asked to encode."""

    workers = 0

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.encoded: list[str] = []

    def token_shape(self) -> tuple[int, int]:
        return (3, self.dim)

    @staticmethod
    def vector(content_hash: str, dim: int) -> np.ndarray:
        rng = np.random.default_rng(int(content_hash[:8], 16))
        v = rng.standard_normal(dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode(
        self, jobs: Sequence[EncodeJob], *, known: Collection[str], tokens: bool, timed: StageTimer
    ) -> Iterator[Encoded]:
        seen = set(known)
        for job in jobs:
            data = Path(job.path).read_bytes()
            h = hash_bytes(data)
            res = Encoded(job, hash=h)
            if h in seen and not job.need_decode:
                yield res
                continue
            seen.add(h)
            with timed("model"):
                res.embedding = self.vector(h, self.dim)
                res.tokens = np.zeros((3, self.dim), np.float16) if tokens else None
            self.encoded.append(job.path)
            yield res


def test_a_model_free_encoder_plugs_into_the_updater(tmp_path: Path, monkeypatch) -> None:
    """Everything but the encoder is the updater's: moves, copies, removals and checkpoints work with any encoder,
    and no model is ever loaded."""
    photos = tmp_path / "photos"
    files = make_images(photos, 6)
    with Index.open(tmp_path / "idx", model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True):
        pass  # created with the tiny model's manifest (64-d)
    monkeypatch.setattr("cocatk.models.load_model", lambda *a, **k: pytest.fail("the encoder owns the model"))
    enc = HashEncoder(64)
    with Index.open(tmp_path / "idx") as ix:
        first = ix.update([photos], encoder=enc, checkpoint_every=2)
        assert (first.new, first.encoded, first.checkpoints) == (6, 6, 3)  # after files 2, 4 and 6
        assert_consistent(ix)
        ids = ix.store.ids()
        for fid, path in zip(ids, ix.store.paths_for_ids(ids), strict=True):
            want = enc.vector(hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest(), 64)
            np.testing.assert_array_equal(ix.embeddings([fid])[0], want)

        # Move one, copy one twice, delete one: only the new content of nothing is encoded.
        (photos / "sub").mkdir()
        shutil.move(files[0], photos / "sub" / "moved.jpg")
        shutil.copy(files[1], photos / "copy_a.png")
        shutil.copy(files[1], photos / "copy_b.png")
        files[2].unlink()
        enc.encoded.clear()
        second = ix.update(encoder=enc)
        assert enc.encoded == []
        assert (second.moved, second.duplicates, second.removed, second.total) == (1, 2, 1, 7)
        assert_consistent(ix)

        # Two new files with the same new content: encoded once, the second is a copy.
        make_images(photos / "new", 1, seed=42)
        shutil.copy(photos / "new" / "im000.jpg", photos / "new" / "twin.jpg")
        third = ix.update(encoder=enc)
        assert len(enc.encoded) == 1 and (third.new, third.duplicates, third.encoded) == (2, 1, 1)
        assert_consistent(ix)


def test_local_encoder_results_come_back_in_job_order_with_repeats_encoded_once(tmp_path: Path) -> None:
    from cocatk import load_model

    files = make_images(tmp_path, 5)
    shutil.copy(files[0], tmp_path / "again.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"no")
    paths = [*files[:3], tmp_path / "again.jpg", tmp_path / "bad.jpg", *files[3:]]
    jobs = [EncodeJob(str(p), 0, 0, None) for p in paths]
    model = load_model(str(TINY_CONFIG), pretrained="none", device="cpu")
    enc = LocalEncoder(model, workers=2, batch_size=2)
    timings: dict[str, int] = {}

    from contextlib import contextmanager

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        timings[stage] = timings.get(stage, 0) + 1
        yield

    known = {hash_bytes(files[4].read_bytes())}
    out = list(enc.encode(jobs, known=known, tokens=True, timed=timed))
    assert [r.job.path for r in out] == [str(p) for p in paths]
    assert out[3].hash == out[0].hash and out[3].embedding is None  # repeat: encoded once
    assert out[4].error is not None and out[4].error.reason == "not an image"
    assert out[-1].embedding is None  # known content: reused, not encoded
    encoded = [r for r in out if r.embedding is not None]
    assert len(encoded) == 4 and all(r.tokens is not None and r.tokens.dtype == np.float16 for r in encoded)
    ref = model.encode_images(
        model.preprocess_images(
            [__import__("cocatk.images").images.load_image(r.job.path, draft_size=model.image_size) for r in encoded]
        )
    )
    np.testing.assert_allclose(np.stack([r.embedding for r in encoded]), ref, atol=1e-5)
    assert timings["model"] == 2  # batches of 2: [f0, f1], [f2, f3]


def test_piped_tables_are_tsv_with_whole_values(capsys, monkeypatch) -> None:
    """`cocatk models | grep coca_ViT-L-14` finds the row: a pipe gets TSV, never a table folded at 80 columns."""
    from cocatk.cli import main

    monkeypatch.setenv("COLUMNS", "60")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split("\t") == ["preset", "open_clip model", "pretrained", "dim", "weights", "about"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows["coca-l14"][1:4] == ["coca_ViT-L-14", "laion2b_s13b_b90k", "768"]
    assert [line for line in lines if "coca_ViT-L-14" in line] == [
        "\t".join(rows["coca-l14"]),
        "\t".join(rows["coca-l14-coco"]),
    ]
    assert all(len(line.split("\t")) == 6 for line in lines)  # no wrapped continuation lines


def test_narrow_terminal_table_folds_but_never_cuts(capsys, monkeypatch) -> None:
    from rich.console import Console

    from cocatk.cli import main, render

    monkeypatch.setattr(render, "out", Console(force_terminal=True, width=60, soft_wrap=True, color_system=None))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "┃" in out
    # Each value is whole, folded over consecutive lines of its own column: join a column's slices line by line.
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    bars = [i for i, ch in enumerate(header) if ch == "┃"]
    body = [line for line in lines if line.startswith("│")]
    columns = ["".join(line[a + 1 : b].strip() for line in body) for a, b in zip(bars, bars[1:], strict=False)]
    assert "coca_ViT-L-14" in columns[1] and "mscoco_finetuned_laion2b_s13b_b90k" in columns[2]
