"""`cocatk serve`: the HTTP API against the library (same ids, same order), clip-retrieval shapes, security.

The app runs in-process through httpx's TestClient (lifespan included: the model loads at start-up); every result
is compared with ``search_index`` on the same index, never with a mocked result. TestClient re-raises server
exceptions, so a bad input that reached the 500 handler would fail its test.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG
from PIL import Image

from cocatk.cli import main
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cocatk.server.app import ServeSettings, create_app  # noqa: E402

MODEL = str(TINY_CONFIG)


def _make_images(root: Path, n: int, seed: int = 3, prefix: str = "im") -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / ("sub" if i % 3 == 0 else "top")
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40 + i, 56, 3), dtype=np.uint8)
        arr[: 10 + i % 20] = rng.integers(0, 255, 3)
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _rotated_jpeg(path: Path) -> None:
    """80x40 pixels stored, EXIF orientation 6 (rotate 90): shown 40 wide, 80 high."""
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, "JPEG", exif=exif.tobytes())


def _png_bytes(seed: int = 11) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(index dir, photo root, files): 12 PNGs in photos/{sub,top} and an EXIF-rotated JPEG, tokens cached."""
    root = tmp_path_factory.mktemp("serve")
    files = _make_images(root / "photos", 12)
    _rotated_jpeg(root / "photos" / "top" / "rotated.jpg")
    files.append(root / "photos" / "top" / "rotated.jpg")
    idx = Index.open(root / "idx", model=MODEL, pretrained="none", device="cpu", create=True)
    assert idx.update([root / "photos"], cache_tokens=True, workers=0).new == len(files)
    idx.close()
    return root / "idx", root / "photos", files


def _client(idx_dir: Path, cache: Path, **kw) -> TestClient:
    with pytest.MonkeyPatch.context() as mp:  # the thumbnail cache folder is fixed when the app starts
        mp.setenv("COCATK_CACHE", str(cache))
        client = TestClient(create_app(ServeSettings(index_dir=idx_dir, device="cpu", **kw)))
        client.__enter__()
    return client


@pytest.fixture(scope="module")
def client(built, tmp_path_factory):
    c = _client(built[0], tmp_path_factory.mktemp("cache"))
    yield c
    c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def lib(built):
    idx = Index.open(built[0], device="cpu")
    yield idx
    idx.close()


def _id_of(lib: Index, path: Path) -> int:
    return lib.store.file_rows()[str(path.resolve())].id


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "hint"} and body["error"] and body["hint"], body
    return body


# ---- JSON API -----------------------------------------------------------------------------------------------------
def test_health_info_folders(client, built, lib):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["images"] == 13 and h["generation"] == lib.store.generation
    assert h["model"]["embed_dim"] == lib.model.embed_dim
    info = client.get("/api/info").json()
    assert info["files"] == 13 and info["roots"] == [{"path": str(built[1].resolve())}]
    assert info["manifest"]["embed_dim"] == lib.dim
    f = client.get("/api/folders").json()
    photos = str(built[1].resolve())
    assert f["roots"] == [{"path": photos}]
    got = {d["path"]: (d["files"], d["root"]) for d in f["folders"]}
    assert got == {photos: (13, True), photos + "/sub": (4, False), photos + "/top": (9, False)}


@pytest.mark.parametrize("rerank", [True, False])
def test_search_equals_library(client, lib, rerank):
    r = client.get("/api/search", params={"q": "a red bicycle", "n": 5, "rerank": rerank, "rerank_k": 8})
    assert r.status_code == 200
    doc = r.json()
    want = search_index(lib, text="a red bicycle", n=5, rerank=rerank, rerank_k=8)
    assert [h["id"] for h in doc["hits"]] == [h.id for h in want.hits]
    ref = want.to_dict()
    assert set(doc) == set(ref) and doc["query"] == ref["query"] and doc["reranked"] is rerank
    for hit, w in zip(doc["hits"], ref["hits"], strict=True):
        assert hit["path"] == w["path"] and hit["similarity"] == pytest.approx(w["similarity"], abs=1e-6)
        assert hit["thumb_url"] == f"/api/thumb/{hit['id']}" and hit["image_url"] == f"/api/image/{hit['id']}"


def test_search_not_and_under(client, lib, built):
    sub = str((built[1] / "sub").resolve())
    params = [("q", "a dog"), ("n", "10"), ("rerank", "false"), ("not", "a cat"), ("not", "noise"), ("under", sub)]
    doc = client.get("/api/search", params=params).json()
    want = search_index(lib, text="a dog", negative=("a cat", "noise"), n=10, rerank=False, under=sub)
    assert [h["id"] for h in doc["hits"]] == [h.id for h in want.hits] and len(doc["hits"]) == 4
    assert all(h["path"].startswith(sub + "/") for h in doc["hits"])


def test_image_search_upload_equals_library(client, lib, built):
    target = built[2][4]
    data = target.read_bytes()
    r = client.post("/api/search/image", files={"file": ("q.png", data, "image/png")}, data={"n": "4"})
    doc = r.json()
    want = search_index(lib, image=target, n=4)
    assert [h["id"] for h in doc["hits"]] == [h.id for h in want.hits]
    assert doc["hits"][0]["id"] == _id_of(lib, target) and doc["reranked"] is False
    assert doc["query"]["image"] == f"(uploaded image, {len(data)} bytes)"
    # with a text: the mean of both, reranked by the text (the library's answer for the same bytes)
    r = client.post(
        "/api/search/image",
        files={"file": ("q.png", data, "image/png")},
        data={"q": "a dog", "n": "3", "rerank_k": "6"},
    )
    want = search_index(lib, text="a dog", image=data, n=3, rerank_k=6)
    assert [h["id"] for h in r.json()["hits"]] == [h.id for h in want.hits] and r.json()["reranked"]


def test_similar_excludes_itself_and_equals_library(client, lib, built):
    fid = _id_of(lib, built[2][2])
    doc = client.get(f"/api/similar/{fid}", params={"n": 5}).json()
    want = search_index(lib, like_id=fid, n=5)
    assert [h["id"] for h in doc["hits"]] == [h.id for h in want.hits]
    assert fid not in [h["id"] for h in doc["hits"]] and len(doc["hits"]) == 5
    emb = lib.embeddings([fid])[0]
    ids = lib.store.ids()
    sims = lib.embeddings(ids) @ emb
    order = [int(ids[i]) for i in np.argsort(-sims, kind="stable") if int(ids[i]) != fid][:5]
    assert [h["id"] for h in doc["hits"]] == order
    _error(client.get("/api/similar/99999"), 404)


def test_thumb_applies_exif_and_is_cached(client, lib, built):
    fid = _id_of(lib, built[2][-1])
    r = client.get(f"/api/thumb/{fid}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"]
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (40, 80)  # stored 80x40 with orientation 6
    big = _id_of(lib, built[2][11])
    small = Image.open(io.BytesIO(client.get(f"/api/thumb/{big}", params={"size": 32}).content))
    assert max(small.size) == 32
    cached = list((client.app.state.backend.thumb_dir).glob(f"{fid}-*-256.jpg"))
    assert len(cached) == 1
    assert client.get(f"/api/thumb/{fid}").content == r.content
    _error(client.get(f"/api/thumb/{fid}", params={"size": 5000}), 422)


def test_image_is_the_original_file(client, lib, built):
    for path, media in ((built[2][0], "image/png"), (built[2][-1], "image/jpeg")):
        r = client.get(f"/api/image/{_id_of(lib, path)}")
        assert r.status_code == 200 and r.content == path.read_bytes()
        assert r.headers["content-type"] == media and r.headers["x-content-type-options"] == "nosniff"


# ---- clip-retrieval compatibility -----------------------------------------------------------------------------------
def _check_knn_rows(rows, base="http://testserver"):
    assert isinstance(rows, list) and rows
    for row in rows:
        assert isinstance(row["id"], int) and isinstance(row["similarity"], float)
        assert row["url"] == f"{base}/api/image/{row['id']}"
        assert isinstance(row["caption"], str) and row["caption"] == Path(row["image_path"]).name


def test_compat_indices_knn_metadata(client, lib, built):
    assert client.get("/indices-list").json() == ["cocatk"]
    body = {"text": "a red bicycle", "modality": "image", "num_images": 4, "indice_name": "cocatk",
            "use_mclip": False, "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
            "aesthetic_score": "", "aesthetic_weight": ""}  # fmt: skip
    rows = client.post("/knn-service", json=body).json()
    _check_knn_rows(rows)
    want = search_index(lib, text="a red bicycle", n=4)
    assert [r["id"] for r in rows] == [h.id for h in want.hits]
    assert client.get(rows[0]["url"]).content == Path(rows[0]["image_path"]).read_bytes()
    plain = client.post("/knn-service", json={**body, "rerank": False}).json()
    assert [r["id"] for r in plain] == [h.id for h in search_index(lib, text="a red bicycle", n=4, rerank=False).hits]
    # image as base64, and embedding_input
    target = built[2][6]
    img = client.post(
        "/knn-service", json={"image": base64.b64encode(target.read_bytes()).decode(), "modality": "image",
                              "num_images": 3, "indice_name": "cocatk"},
    ).json()  # fmt: skip
    _check_knn_rows(img)
    assert [r["id"] for r in img] == [h.id for h in search_index(lib, image=target, n=3).hits]
    emb = lib.embeddings([_id_of(lib, target)])[0].tolist()
    by_emb = client.post("/knn-service", json={"embedding_input": emb, "modality": "image", "num_images": 3}).json()
    assert by_emb[0]["id"] == _id_of(lib, target)
    ids = [r["id"] for r in rows]
    meta = client.post("/metadata", json={"ids": [*ids, 99999], "indice_name": "cocatk"}).json()
    assert [m["id"] for m in meta] == [*ids, 99999] and meta[-1]["metadata"] == {}
    assert meta[0]["metadata"] == {k: rows[0][k] for k in ("url", "caption", "image_path")}
    assert client.post("/metadata", json={"ids": [], "indice_name": "cocatk"}).json() == []


def test_compat_bodies_as_clip_front_sends_them(client, lib, built):
    """clip front posts JSON.stringify(...) without a Content-Type (browsers send text/plain), and its
    click-to-search sends a hit's own url back as image_url: "more like this" for that id, nothing fetched."""
    body = json.dumps({"text": "a red bicycle", "modality": "image", "num_images": 4, "indice_name": "cocatk"})
    r = client.post("/knn-service", content=body, headers={"content-type": "text/plain;charset=UTF-8"})
    assert r.status_code == 200
    assert [row["id"] for row in r.json()] == [h.id for h in search_index(lib, text="a red bicycle", n=4).hits]
    target = _id_of(lib, built[2][3])
    click = {"image_url": f"http://testserver/api/image/{target}", "modality": "image", "num_images": 3}
    r = client.post("/knn-service", content=json.dumps(click), headers={"content-type": "text/plain"})
    assert [row["id"] for row in r.json()] == [h.id for h in search_index(lib, like_id=target, n=3).hits]
    relative = client.post("/knn-service", json={**click, "image_url": f"/api/image/{target}"}).json()
    assert [row["id"] for row in relative] == [row["id"] for row in r.json()]
    for other in (f"http://elsewhere:1/api/image/{target}", "http://testserver/api/thumb/1", "file:///etc/passwd"):
        assert "network" in _error(client.post("/knn-service", json={**click, "image_url": other}), 400)["error"]
    meta = client.post("/metadata", content=json.dumps({"ids": [target]}), headers={"content-type": "text/plain"})
    assert meta.json()[0]["id"] == target
    _error(client.post("/knn-service", content=b"{not json", headers={"content-type": "text/plain"}), 422)
    _error(client.post("/knn-service", content=json.dumps({"num_images": "many"})), 422)


def test_compat_refusals(client):
    url = {"image_url": "http://example.com/x.jpg", "modality": "image", "num_images": 3, "indice_name": "cocatk"}
    assert "network" in _error(client.post("/knn-service", json=url), 400)["error"]
    assert "no query" in _error(client.post("/knn-service", json={"modality": "image", "num_images": 3}), 422)["error"]
    _error(client.post("/knn-service", json={"text": "", "image": "", "num_images": 3}), 422)
    _error(client.post("/knn-service", json={"text": "x", "modality": "text", "num_images": 3}), 422)
    _error(client.post("/knn-service", json={"text": "x", "num_images": 3, "indice_name": "laion5B"}), 404)
    _error(client.post("/knn-service", json={"image": "%%%not base64", "num_images": 3}), 400)
    _error(client.post("/knn-service", json={"embedding_input": [1.0, 2.0], "num_images": 3}), 400)
    _error(client.post("/knn-service", json={"text": "x", "num_images": "many"}), 422)
    _error(client.post("/knn-service", content=b"{not json", headers={"content-type": "application/json"}), 422)


# ---- index generations and concurrency ------------------------------------------------------------------------------
def test_new_generation_is_picked_up_without_restart(tmp_path):
    first = _make_images(tmp_path / "a", 4, seed=1)
    idx = Index.open(tmp_path / "idx", model=MODEL, pretrained="none", device="cpu", create=True)
    idx.update([tmp_path / "a"], workers=0)
    c = _client(tmp_path / "idx", tmp_path / "cache")
    try:
        r = c.get("/api/search", params={"q": "a cat", "n": 20, "rerank": False}).json()
        assert len(r["hits"]) == 4 and c.get("/api/health").json()["images"] == 4
        _make_images(tmp_path / "b", 4, seed=2, prefix="new")
        idx.update([tmp_path / "b"], workers=0)  # a writer beside the running server commits a new generation
        r = c.get("/api/search", params={"q": "a cat", "n": 20, "rerank": False}).json()
        want = search_index(idx, text="a cat", n=20, rerank=False)
        assert len(r["hits"]) == 8 and [h["id"] for h in r["hits"]] == [h.id for h in want.hits]
        assert any("/b/" in h["path"] for h in r["hits"])
        assert c.get("/api/health").json()["generation"] == idx.store.generation
        assert str((tmp_path / "b").resolve()) in [f["path"] for f in c.get("/api/folders").json()["folders"]]
        # a file deleted since the last index run: never a hit, and its thumb / image answer 404 with the fix
        gone = first[1]
        fid = idx.store.file_rows()[str(gone.resolve())].id
        gone.unlink()
        assert "cocatk index" in _error(c.get(f"/api/image/{fid}"), 404)["hint"]
        assert "cocatk index" in _error(c.get(f"/api/thumb/{fid}"), 404)["hint"]
        hits = c.get("/api/search", params={"q": "a cat", "n": 20, "rerank": False}).json()["hits"]
        assert fid not in [h["id"] for h in hits]
    finally:
        c.__exit__(None, None, None)
        idx.close()


def test_index_removed_or_replaced_while_serving_is_410_with_the_fix(tmp_path):
    """Issue 29: answers from memory about an index that is gone from disk are wrong; every endpoint that uses the
    index says so (410, one line, the fix), /api/health included, so a supervisor sees it."""
    import shutil

    _make_images(tmp_path / "a", 3, seed=4)
    idx = Index.open(tmp_path / "idx", model=MODEL, pretrained="none", device="cpu", create=True)
    idx.update([tmp_path / "a"], workers=0)
    fid = next(iter(idx.store.file_rows().values())).id
    idx.close()
    c = _client(tmp_path / "idx", tmp_path / "cache")
    try:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/search", params={"q": "a cat", "rerank": False}).status_code == 200
        shutil.rmtree(tmp_path / "idx")
        requests = [
            c.get("/api/health"),
            c.get("/api/info"),
            c.get("/api/search", params={"q": "a cat", "rerank": False}),
            c.get(f"/api/thumb/{fid}"),
            c.get(f"/api/similar/{fid}"),
            c.post("/knn-service", json={"text": "a cat", "indice_name": "cocatk"}),
            c.post("/metadata", json={"ids": [fid]}),
        ]
        for r in requests:
            body = _error(r, 410)
            assert "was removed" in body["error"] and "restart `cocatk serve`" in body["hint"], body
        # a new index built in the same place is another index: the server says so instead of mixing the two
        _make_images(tmp_path / "b", 2, seed=5)
        with Index.open(tmp_path / "idx", model=MODEL, pretrained="none", device="cpu", create=True) as new:
            new.update([tmp_path / "b"], workers=0)
        assert "was replaced" in _error(c.get("/api/search", params={"q": "a cat", "rerank": False}), 410)["error"]
    finally:
        c.__exit__(None, None, None)


def test_concurrent_requests_equal_the_library(client, lib, built):
    queries = ["a red bicycle", "a dog", "a beach", "a cat"]
    want = {
        (q, rr): [h.id for h in search_index(lib, text=q, n=5, rerank=rr, rerank_k=8).hits]
        for q in queries
        for rr in (True, False)
    }
    like = _id_of(lib, built[2][3])
    want_like = [h.id for h in search_index(lib, like_id=like, n=4).hits]
    errors: list[str] = []

    def worker(k: int) -> None:
        for j in range(3):
            q, rr = queries[(k + j) % 4], (k + j) % 2 == 0
            r = client.get("/api/search", params={"q": q, "n": 5, "rerank": rr, "rerank_k": 8})
            if r.status_code != 200 or [h["id"] for h in r.json()["hits"]] != want[(q, rr)]:
                errors.append(f"{q} {rr}: {r.status_code}")
            s = client.get(f"/api/similar/{like}", params={"n": 4})
            if s.status_code != 200 or [h["id"] for h in s.json()["hits"]] != want_like:
                errors.append(f"similar: {s.status_code}")
            t = client.get(f"/api/thumb/{like}", params={"size": 64 + k})
            if t.status_code != 200:
                errors.append(f"thumb: {t.status_code}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- security ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "1;rm", "-1", "1.5", "0x10"])
def test_path_like_ids_are_refused(client, bad):
    for route in ("thumb", "image", "similar"):
        r = client.get(f"/api/{route}/{bad}")
        assert r.status_code in (404, 422), (route, bad, r.status_code)
        _error(r, r.status_code)
        assert b"root:" not in r.content


def test_ids_past_int64_are_422_not_500(client, lib):
    """Issue 29's five 500s (sqlite3's OverflowError on ids past int64), now refused by the schema's bounds: ids
    are bounded to 2^53-1, the largest integer a JSON number (a double) holds exactly."""
    for route in ("thumb", "image", "similar"):
        for bad in ("99999999999999999999999", str(2**63), str(2**53)):
            assert "less than or equal to" in _error(client.get(f"/api/{route}/{bad}"), 422)["error"]
    assert "not in the index" in _error(client.get(f"/api/thumb/{2**53 - 1}"), 404)["error"]
    _error(client.post("/metadata", json={"ids": [-1, 99999999999999999999]}), 422)
    _error(client.post("/metadata", json={"ids": [True]}), 422)  # a JSON true is not the id 1
    meta = client.post("/metadata", json={"ids": [-1, -(2**53 - 1), 2**53 - 1, 1.0]})
    assert meta.status_code == 200 and [m["id"] for m in meta.json()] == [-1, -(2**53 - 1), 2**53 - 1, 1]
    assert [m["metadata"] for m in meta.json()][:3] == [{}, {}, {}] and meta.json()[3]["metadata"]
    assert lib.store.paths_for_ids([2**64, -(2**70), -1]) == [None, None, None]  # the store itself guards too
    assert "no body" in _error(client.post("/metadata"), 422)["error"]
    _error(client.post("/knn-service", content=b" "), 422)
    url = {"image_url": f"/api/image/{2**64}", "num_images": 2.0}
    assert "network" in _error(client.post("/knn-service", json=url), 400)["error"]


def test_ids_not_in_the_index(client):
    for route in ("thumb", "image", "similar"):
        assert "not in the index" in _error(client.get(f"/api/{route}/99999"), 404)["error"]


def test_bad_queries_are_4xx_json(client, built):
    _error(client.get("/api/search"), 422)
    _error(client.get("/api/search", params={"q": ""}), 422)
    _error(client.get("/api/search", params={"q": " "}), 422)
    _error(client.get("/api/search", params={"q": "x", "n": 0}), 422)
    _error(client.get("/api/search", params={"q": "x", "n": "ten"}), 422)
    _error(client.get("/api/nowhere"), 404)
    _error(client.delete("/api/search"), 405)
    for under in ("/etc", "/", str(built[0]), str(built[1] / "sub" / ".."), "../photos"):
        assert (
            "not a folder of the index"
            in _error(client.get("/api/search", params={"q": "x", "under": under}), 404)["error"]
        )
    _error(client.post("/api/search/image", files={"file": ("x.png", b"not an image", "image/png")}), 400)
    _error(client.post("/api/search/image", files={"file": ("x.png", b"", "image/png")}), 400)
    _error(client.post("/api/search/image", data={"q": "x"}), 422)


def test_bomb_upload_is_refused(client):
    body = _error(client.post("/api/search/image", files={"file": ("b.png", _bomb_png(), "image/png")}), 400)
    assert "too large" in body["error"]
    b64 = base64.b64encode(_bomb_png()).decode()
    assert "too large" in _error(client.post("/knn-service", json={"image": b64, "num_images": 2}), 400)["error"]


def test_upload_limit(built, tmp_path):
    c = _client(built[0], tmp_path / "cache", max_upload_mb=0.01)  # 10 KiB
    try:
        big = b"\x89PNG" + b"\0" * 20_000
        _error(c.post("/api/search/image", files={"file": ("big.png", big, "image/png")}), 413)
        b64 = base64.b64encode(big).decode()
        _error(c.post("/knn-service", json={"image": b64, "num_images": 2}), 413)
        # a body above the whole-request limit: refused on Content-Length, and counted when chunked
        huge = b"x" * (2**20 + 200_000)
        _error(c.post("/api/search/image", content=huge, headers={"content-type": "multipart/form-data; b=x"}), 413)

        def chunks():
            for _ in range(40):
                yield b"y" * 65536

        _error(c.post("/knn-service", content=chunks(), headers={"content-type": "application/json"}), 413)
        ok = c.post("/api/search/image", files={"file": ("q.png", _png_bytes(), "image/png")}, data={"n": "2"})
        assert ok.status_code == 200 and len(ok.json()["hits"]) == 2
    finally:
        c.__exit__(None, None, None)


def test_token(built, tmp_path):
    c = _client(built[0], tmp_path / "cache", token="s3cret-token")
    try:
        for url in ("/api/health", "/api/search?q=x", "/api/thumb/1", "/api/image/1", "/indices-list"):
            body = _error(c.get(url), 401)
            assert "token" in body["hint"]
        assert _error(c.get("/api/health", headers={"Authorization": "Bearer wrong"}), 401)["error"]
        _error(c.post("/knn-service", json={"text": "x", "num_images": 2}), 401)
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/api/health", params={"token": "s3cret-token"}).status_code == 200
        c.cookies.set("cocatk_token", "s3cret-token")
        assert c.get("/api/search", params={"q": "x", "n": 2}).status_code == 200
        c.cookies.clear()
        # the page, its static files and the docs hold no data: they load without the token
        assert c.get("/").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_cors_only_with_the_option(client, built, tmp_path):
    headers = {"Origin": "http://front.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/knn-service", headers=headers)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in client.get("/api/health", headers=headers).headers
    c = _client(built[0], tmp_path / "cache", cors_origin="http://front.example")
    try:
        r = c.options("/knn-service", headers=headers)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://front.example"
        other = c.get("/api/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        c.__exit__(None, None, None)


def test_openapi_lists_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/health", "/api/info", "/api/search", "/api/search/image", "/api/similar/{file_id}",
              "/api/folders", "/api/thumb/{file_id}", "/api/image/{file_id}", "/knn-service", "/metadata",
              "/indices-list"):  # fmt: skip
        assert p in paths


# ---- the command -------------------------------------------------------------------------------------------------
def test_cli_non_local_bind_needs_token(tmp_path, capsys):
    code = main(["serve", "--host", "0.0.0.0", "--index", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "--token" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--host", "0.0.0.0", "--token", "t", "--no-auth", "--index", str(tmp_path)]) == 2


def test_cli_missing_or_empty_index(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "no index" in err and len(err.strip().splitlines()) == 1
    Index.open(tmp_path / "empty", model=MODEL, pretrained="none", device="cpu", create=True).close()
    assert main(["serve", "--index", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "holds no images" in err and len(err.strip().splitlines()) == 1


def test_cli_no_auth_warns_then_starts(built, monkeypatch, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "--host", "0.0.0.0", "--no-auth", "--index", str(built[0]), "--port", "9999"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9999
    assert "without authentication" in capsys.readouterr().err


def test_serve_help_imports_no_web_stack():
    import subprocess
    import sys

    code = (
        "import sys\nfrom cocatk.cli import main\nmain(['serve', '--help'])\n"
        "print('HEAVY', [m for m in ('fastapi', 'uvicorn', 'starlette', 'torch', 'faiss') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "--no-auth" in out
