"""`cocatk duplicates` (issue 17): groups against a numpy brute-force reference, exact copies, the keeper rule,
--under, the JSON shape, the HTML page, and one-line refusals of bad input."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.cli import main
from cocatk.errors import EmptyIndexError, UsageError
from cocatk.retrieval.duplicates import DEFAULT_THRESHOLDS, connected_components, group_rows, similar_pairs
from cocatk.retrieval.index import Index
from tests.test_index import make_images, open_tiny


def reference_groups(hashes: list[str], vecs: np.ndarray, t: float) -> list[list[int]]:
    """Brute force: the full similarity matrix, same-hash edges, components by repeated BFS in plain Python."""
    n = len(hashes)
    sims = vecs @ vecs.T
    adj = (sims >= t) | (np.array(hashes)[:, None] == np.array(hashes)[None, :])
    seen, groups = set(), []
    for s in range(n):
        if s in seen:
            continue
        comp, todo = {s}, [s]
        while todo:
            for nb in np.flatnonzero(adj[todo.pop()]).tolist():
                if nb not in comp:
                    comp.add(nb)
                    todo.append(nb)
        seen |= comp
        if len(comp) > 1:
            groups.append(sorted(comp))
    return sorted(groups)


def _canon(groups) -> list[list[int]]:
    return sorted(sorted(int(r) for r in g) for g in groups)


@pytest.mark.parametrize("t", [0.99, 0.9, 0.7])
def test_groups_match_brute_force_on_synthetic_vectors(t: float) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    # Chains of perturbed copies (A~B~C without A~C) and exact copies with equal hashes.
    x = np.concatenate(
        [base, base[:60] + 0.15 * rng.standard_normal((60, 32)), base[:30] + 0.3 * rng.standard_normal((30, 32))]
    )
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    hashes = [f"h{i}" for i in range(len(x))]
    x = np.concatenate([x, x[:10]])
    hashes += hashes[:10]
    groups, _ = group_rows(hashes, x, t)
    want = reference_groups(hashes, x, t)
    assert _canon(groups) == want and want  # not vacuous
    # The pairs themselves: exactly the upper triangle at or above t, small blocks included.
    i, j = similar_pairs(x[:200], t, block=7)
    sims = x[:200] @ x[:200].T
    ri, rj = np.nonzero(np.triu(sims >= t, 1))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(zip(ri.tolist(), rj.tolist(), strict=True))


def test_connected_components_of_a_long_chain() -> None:
    n = 1000
    i = np.arange(n - 1)[::-1].copy()
    labels = connected_components(n + 3, i, i + 1)
    assert set(labels[:n].tolist()) == {0} and labels[n:].tolist() == [n, n + 1, n + 2]


@pytest.fixture
def dup_index(tmp_path: Path) -> tuple[Path, Path]:
    photos = tmp_path / "photos"
    paths = make_images(photos / "a", 10)
    make_images(photos / "b", 6, seed=4)
    shutil.copy(paths[1], photos / "b" / "copy_of_1.png")  # an exact copy in another folder
    shutil.copy(paths[3], photos / "a" / "copy_of_3.jpg")
    idx = tmp_path / "idx"
    with open_tiny(idx) as ix:
        ix.update([photos], workers=0)
    return idx, photos


def test_groups_match_brute_force_on_the_tiny_model_index(dup_index) -> None:
    idx, photos = dup_index
    with Index.open(idx) as ix:
        ids, vecs = ix.store.all_embeddings(ix.dim)
        hashes = ix.store.hashes_for_ids(ids.tolist())
        sims = np.sort((vecs @ vecs.T)[np.triu_indices(len(ids), 1)])
        for t in (0.999, float(sims[-12]) - 1e-4, float(sims[-40]) - 1e-4):  # exact only, then looser
            report = ix.duplicates(threshold=t)
            got = sorted(sorted(f.id for f in g.files) for g in report.groups)
            want = sorted([int(ids[r]) for r in g] for g in reference_groups(hashes, vecs, t))
            assert got == want
        assert report.timings and report.files == len(ids)
        exact = ix.duplicates(threshold=1.0)
        assert {g.kind for g in exact.groups} == {"exact"} and len(exact.groups) == 2
        names = sorted(sorted(os.path.basename(f.path) for f in g.files) for g in exact.groups)
        assert names == [["copy_of_1.png", "im001.png"], ["copy_of_3.jpg", "im003.png"]]
        # --under: both files of a pair below the folder.
        under = ix.duplicates(threshold=1.0, under=photos / "a")
        assert [sorted(os.path.basename(f.path) for f in g.files) for g in under.groups] == [
            ["copy_of_3.jpg", "im003.png"]
        ]


def _save(path: Path, size: tuple[int, int], date: str | None, colour=(120, 30, 200)) -> None:
    img = Image.new("RGB", size, colour)
    img.putpixel((0, 0), (0, 0, 0))
    exif = Image.Exif()
    if date:
        exif.get_ifd(0x8769)[36867] = date
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())


def test_keeper_is_largest_then_oldest(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _save(photos / "small_old.jpg", (40, 30), "2001:01:01 10:00:00")
    _save(photos / "big_new.jpg", (80, 60), "2020:05:05 10:00:00")
    _save(photos / "big_old.jpg", (60, 80), "2010:03:03 10:00:00")  # same pixel count, older: the keeper
    _save(photos / "no_exif.jpg", (80, 60), None)  # mtime now: newer than every EXIF date
    with open_tiny(tmp_path / "idx") as ix:
        ix.update([photos], workers=0)
        report = ix.duplicates(threshold=0.5)  # one plain colour: near-identical embeddings
        (group,) = report.groups
        assert group.kind == "near" and len(group.files) == 4
        assert os.path.basename(group.keeper.path) == "big_old.jpg" and group.keeper.keeper
        assert [f.keeper for f in group.files] == [True, False, False, False]
        k = group.keeper
        assert (k.width, k.height, k.date, k.date_source) == (60, 80, "2010-03-03 10:00:00", "exif")
        facts = {os.path.basename(f.path): f for f in group.files}
        assert facts["no_exif.jpg"].date_source == "mtime"
        assert group.reclaimable_bytes == sum(f.size for f in group.files[1:])


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json_table_and_html(dup_index, tmp_path: Path, capsys) -> None:
    idx, photos = dup_index
    odd = photos / "a" / os.fsdecode(b"caf\xe9.png")
    shutil.copy(photos / "a" / "im005.png", odd)
    with Index.open(idx, lock=True) as ix:
        ix.update(workers=0)
    code, out, err = _run(capsys, "duplicates", "--index", str(idx), "--threshold", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["threshold"] == 1.0 and data["threshold_source"] == "given" and len(data["groups"]) == 3
    g = data["groups"][0]
    assert set(g) == {"group", "kind", "keeper", "reclaimable_bytes", "files"}
    assert set(g["files"][0]) >= {"id", "path", "size", "width", "height", "date", "date_source", "keeper"}
    assert g["files"][0]["keeper"] and g["keeper"] == g["files"][0]["id"]
    b64 = [f["path_b64"] for grp in data["groups"] for f in grp["files"] if "path_b64" in f]
    assert [base64.b64decode(b) for b in b64] == [os.fsencode(odd)]
    # TSV on a pipe: a header and one line per file.
    code, out, err = _run(capsys, "duplicates", "--index", str(idx), "--threshold", "1")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split("\t")[:3] == ["group", "kind", "keep"] and len(lines) == 1 + 6
    assert "Nothing was deleted" in err
    page = tmp_path / "dups.html"
    code, out, err = _run(capsys, "duplicates", "--index", str(idx), "--threshold", "1", "--html", str(page))
    text = page.read_text()
    assert code == 0 and text.count("<section>") == 3 and text.count('class="hit marked"') == 3
    # Nothing on disk was touched.
    assert odd.exists() and (photos / "b" / "copy_of_1.png").exists()


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "nan"])
def test_threshold_outside_the_range_is_one_line(dup_index, capsys, bad: str) -> None:
    idx, _ = dup_index
    code, out, err = _run(capsys, "duplicates", "--index", str(idx), "--threshold", bad)
    assert code == 2 and out == "" and "(0, 1]" in err and "Fix:" in err and len(err.strip().splitlines()) == 1
    with Index.open(idx) as ix, pytest.raises(UsageError):
        ix.duplicates(threshold=float(bad))


def test_empty_index_missing_under_and_conflicting_options(tmp_path: Path, capsys) -> None:
    idx = tmp_path / "idx"
    open_tiny(idx).close()
    with Index.open(idx) as ix, pytest.raises(EmptyIndexError, match="holds no images"):
        ix.duplicates()
    code, _, err = _run(capsys, "duplicates", "--index", str(idx))
    assert code == 1 and "cocatk index PATH" in err and len(err.strip().splitlines()) == 1
    make_images(tmp_path / "p", 3)
    with Index.open(idx, lock=True) as ix:
        ix.update([tmp_path / "p"], workers=0)
    code, _, err = _run(capsys, "duplicates", "--index", str(idx), "--under", str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in err
    (tmp_path / "other").mkdir()
    code, _, err = _run(capsys, "duplicates", "--index", str(idx), "--under", str(tmp_path / "other"))
    assert code == 2 and "no indexed images under" in err
    code, _, err = _run(capsys, "duplicates", "--index", str(idx), "--json", "--html", str(tmp_path / "x.html"))
    assert code == 2 and "cannot be combined" in err
    with Index.open(idx) as ix:
        report = ix.duplicates()
    assert report.threshold == DEFAULT_THRESHOLDS["random"] and "random" in report.threshold_source
