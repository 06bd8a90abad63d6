"""Property-based tests (Hypothesis) of the library's edges, each with a bounded budget:

1. any bytes a POSIX file name may hold survive index -> store -> `search -0` / `--json` (``path_b64``) -> `forget`;
2. any query text gives the same token ids and (within 1e-4) the same embedding on the torch and the ONNX text tower,
   or both refuse it with the same typed :class:`~cocatk.errors.CocatkError`;
3. a mutated manifest (the readable ``manifest.json`` copy and the authoritative one in SQLite) either opens or is
   refused with a typed error of one line and a hint, by the library and by `cocatk info`.

cocatk reads no user config file (:mod:`cocatk.config` is environment variables only), so there is none to mutate.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cocatk.cli import main
from cocatk.errors import CocatkError
from cocatk.retrieval import Index
from cocatk.retrieval.layout import MANIFEST_NAME
from cocatk.retrieval.store import Store
from tests.conftest import TINY_CONFIG
from tests.test_index import make_images

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]
#: Function-scoped fixtures (the autouse isolated home, capsys) are shared by a test's examples on purpose: each
#: example works in its own temporary folder.
FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def _assert_typed(e: BaseException) -> None:
    """A user-facing refusal: a CocatkError whose text is one line and whose hint says something."""
    assert isinstance(e, CocatkError), f"{type(e).__name__}: {e}"
    assert "\n" not in str(e) and e.hint.strip(), repr(e)


# ---- 1. file names ---------------------------------------------------------------------------------------------
#: A file name's stem: any bytes but "/" and NUL (replaced, so no example is rejected), not hidden (cocatk skips
#: dot files by design), short enough for ".png" to fit in 200 bytes. Half of the examples are UTF-8 text, cut at a
#: byte (which can leave an invalid tail), half arbitrary bytes (mostly invalid UTF-8, control characters).
_stem = (
    st.one_of(
        st.binary(min_size=1, max_size=196),
        st.text(min_size=1, max_size=60).map(lambda s: s.encode("utf-8")[:196]),
        st.lists(st.sampled_from([b"\n", b"\t", b"\r", b"\x1b[31m", b"\xff", b"\xe9", b" ", b"[b]", b"\\"]), min_size=1)
        .map(b"".join)
        .map(lambda b: b[:196]),
    )
    .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda b: len(b) >= 1 and not b.startswith(b"."))
)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_names(folder: Path, stems: list[bytes]) -> list[bytes]:
    """Each stem + b".png" written as a distinct small PNG; the names the file system took (full paths as bytes)."""
    written = []
    for i, stem in enumerate(stems):
        path = os.fsencode(folder) + b"/" + stem + b".png"
        try:
            with open(path, "wb") as f:
                f.write(_png(i))
        except OSError:  # a file system that refuses the name (not ext4/tmpfs, which take any byte but / and NUL)
            continue
        written.append(path)
    return written


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=FIXTURES_OK)
@given(stems=st.lists(_stem, min_size=1, max_size=15, unique=True))
@example(
    stems=[
        b"line\nbreak",
        b"tab\there",
        b"cr\r",
        b"caf\xe9",
        b"\xff\xfe",
        b"\x1b[31mred",
        b"[bold]x",
        b"-n",
        b" ",
        b"a" * 196,
    ]
)
def test_any_file_name_round_trips(stems: list[bytes], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp).resolve() / "photos"
        photos.mkdir()
        names = _write_names(photos, stems)
        assume(names)
        expected = sorted(names)
        idx = str(Path(tmp) / "idx")

        capsysbinary.readouterr()
        assert main(["index", str(photos), "--index", idx, *TINY, "--json"]) == 0
        cap = capsysbinary.readouterr()
        assert b"Traceback" not in cap.err
        report = json.loads(cap.out.decode("utf-8"))
        assert (report["new"], report["total"], report["failed"]) == (len(names), len(names), {})

        store = Store.open(Path(idx))
        try:
            assert sorted(os.fsencode(p) for p in store.file_rows()) == expected
        finally:
            store.close()

        n = str(len(names))
        assert main(["search", "a photo", "--index", idx, "-n", n, "--no-rerank", "-0"]) == 0
        raw = capsysbinary.readouterr().out
        assert raw.endswith(b"\0") and sorted(raw[:-1].split(b"\0")) == expected

        assert main(["search", "a photo", "--index", idx, "-n", n, "--no-rerank", "--json"]) == 0
        hits = json.loads(capsysbinary.readouterr().out.decode("utf-8"))["hits"]
        got = []
        for h in hits:
            if "path_b64" in h:  # only for a name that is not UTF-8
                data = base64.b64decode(h["path_b64"])
                with pytest.raises(UnicodeDecodeError):
                    data.decode("utf-8")
            else:
                data = h["path"].encode("utf-8")
            got.append(data)
        assert sorted(got) == expected

        assert main(["forget", str(photos), "--index", idx, "--json"]) == 0
        capsysbinary.readouterr()
        store = Store.open(Path(idx))
        try:
            assert store.file_rows() == {} and store.roots() == []
        finally:
            store.close()


# ---- 2. query text through both text backends ------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The tiny CoCa in fp32 on torch, and its text tower exported once to ONNX (loaded, so no env var is read
    later)."""
    from cocatk import load_model
    from cocatk.models import onnx as textonnx

    mp = pytest.MonkeyPatch()
    mp.setenv("COCATK_CACHE", str(tmp_path_factory.mktemp("onnx-cache")))
    mp.setenv("COCATK_TEXT_ONNX", "1")
    try:
        model = load_model(str(TINY_CONFIG), "none", device="cpu", precision="fp32")
        assert textonnx.export_text_onnx(model) is not None
        engine = textonnx.open_text_onnx(model.spec.identity())
        assert engine is not None
        engine.load()
    finally:
        mp.undo()
    return model, engine


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as e:  # compared below: a refusal must be typed and the same on both backends
        _assert_typed(e)
        return type(e).__name__, None


#: Any Unicode, surrogates (what a shell hands over for bytes that are not UTF-8) and control characters included.
_any_char = st.characters(codec=None, exclude_categories=())
_query = st.one_of(
    st.text(_any_char, max_size=40),
    st.lists(
        st.sampled_from([" ", "\t", "\n", "\u3000", "\xa0", "\u200d", "🐕", "&amp;", "a", "É", "東"]), max_size=60
    ).map("".join),
    st.text(_any_char, min_size=500, max_size=2000),
)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURES_OK)
@given(texts=st.lists(_query, min_size=1, max_size=4))
@example(texts=[""])
@example(texts=[" \t\n", "\ud800 x", "a\x00b", "&amp;lt;", "word " * 400, "🐕" * 100])
def test_text_backends_agree(text_backends: tuple[Any, Any], texts: list[str]) -> None:
    model, engine = text_backends
    kind_t, ids_t = _outcome(lambda: model.tokenize(texts).numpy())
    kind_o, ids_o = _outcome(lambda: engine.tokenize(texts))
    assert kind_t == kind_o
    if kind_t == "ok":
        assert ids_t.shape == ids_o.shape and np.array_equal(ids_t, ids_o)
    # the batch path and the one-text path (which the engine runs differently)
    for batch in (texts, texts[:1]):
        kind_t, emb_t = _outcome(lambda b=batch: model.encode_texts(b))
        kind_o, emb_o = _outcome(lambda b=batch: engine.encode_texts(b))
        assert kind_t == kind_o
        if kind_t == "ok":
            assert emb_t.shape == emb_o.shape == (len(batch), model.embed_dim)
            assert np.abs(emb_t - emb_o).max() <= 1e-4


# ---- 3. mutated manifests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-image tiny index, built once; every example mutates its own copy."""
    root = tmp_path_factory.mktemp("manifest-index")
    mp = pytest.MonkeyPatch()
    mp.setenv("COCATK_HOME", str(root / "home"))
    mp.setenv("COCATK_CACHE", str(root / "cache"))
    mp.setenv("COCATK_TEXT_ONNX", "0")
    try:
        make_images(root / "photos", 3)
        with Index.open(root / "idx", model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True) as ix:
            ix.update([root / "photos"], workers=0)
    finally:
        mp.undo()
    assert (root / "idx" / MANIFEST_NAME).is_file()
    return root / "idx"


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` (a JSON object) truncated, with bytes flipped, a value of the wrong type, a key deleted, as
    garbage, or empty."""
    how = draw(st.sampled_from(["truncate", "flip", "retype", "delete", "garbage", "empty"]))
    if how == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if how == "flip":
        data = bytearray(original)
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=5)):
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "garbage":
        return draw(st.binary(min_size=1, max_size=200))
    if how == "empty":
        return b""
    doc = json.loads(original)
    target = doc
    nested = [k for k, v in doc.items() if isinstance(v, dict) and v]
    if nested and draw(st.booleans()):  # one level down (the identity, the rerank model)
        target = doc[draw(st.sampled_from(sorted(nested)))]
    key = draw(st.sampled_from(sorted(target)))
    if how == "delete":
        del target[key]
    else:
        target[key] = draw(_json_value.filter(lambda v, old=target[key]: type(v) is not type(old)))
    return json.dumps(doc).encode()


def _open_and_read(folder: Path) -> None:
    """What a reader does with the manifest: open, the facts `cocatk info` shows, a consistency check."""
    with Index.open(folder) as ix:
        ix.manifest  # noqa: B018 - the property reads and validates
        ix.info()
        ix.check()


def _check_both_readers(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        _open_and_read(folder)
    except Exception as e:
        _assert_typed(e)
    capsys.readouterr()
    code = main(["info", "--index", str(folder)])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "internal error" not in cap.err, cap.err
    if code != 0:
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Fix:" in lines[0], cap.err


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES_OK)
@given(data=st.data())
def test_mutated_manifest_json_opens_or_is_refused(
    small_index: Path, data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The readable copy (manifest.json): SQLite holds the authoritative manifest, so any copy must still open."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idx"
        shutil.copytree(small_index, folder)
        original = (folder / MANIFEST_NAME).read_bytes()
        (folder / MANIFEST_NAME).write_bytes(data.draw(_mutated(original)))
        _open_and_read(folder)  # the copy is never read back
        assert main(["info", "--index", str(folder)]) == 0
        capsys.readouterr()


def _sqlite_manifest(folder: Path) -> str:
    conn = sqlite3.connect(folder / "index.sqlite")
    try:
        return conn.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()[0]
    finally:
        conn.close()


def _set_sqlite_manifest(folder: Path, value: str) -> None:
    conn = sqlite3.connect(folder / "index.sqlite")
    try:
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (value,))
    finally:
        conn.close()


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(data=st.data())
def test_mutated_stored_manifest_opens_or_is_refused(
    small_index: Path, data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The authoritative manifest (SQLite ``meta``): opening reads it; a broken one is a typed, one-line refusal."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idx"
        shutil.copytree(small_index, folder)
        original = _sqlite_manifest(folder).encode()
        _set_sqlite_manifest(folder, data.draw(_mutated(original)).decode("utf-8", "replace"))
        _check_both_readers(folder, capsys)


# ---- 4. the environment (cocatk's only configuration) ----------------------------------------------------------
#: A device or precision value: near-misses of the accepted ones, and any text (no NUL: an environment cannot hold
#: it); "mps" is among them (a typed refusal on a machine without MPS, see the regression test below).
_env_value = st.one_of(
    st.sampled_from(
        [
            "",
            "cpu",
            "cuda",
            "cuda:0",
            "cuda:x",
            "cuda:99",
            " cpu",
            "CPU",
            "cpu:0",
            "mps",
            "mps:0",
            "auto",
            "fp32",
            "bf16",
            "fp16",
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12),
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURES_OK)
@given(device=_env_value, precision=_env_value)
def test_env_device_and_precision_load_or_are_refused(
    small_index: Path, device: str, precision: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from cocatk import load_model

    monkeypatch.setenv("COCATK_DEVICE", device)
    monkeypatch.setenv("COCATK_PRECISION", precision)
    try:
        load_model(str(TINY_CONFIG), "none")
        event("loaded")
    except Exception as e:
        _assert_typed(e)
        event(f"refused: {type(e).__name__}")
    capsys.readouterr()
    code = main(["search", "a photo", "--index", str(small_index), "--no-rerank", "--json"])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "internal error" not in cap.err, cap.err
    if code != 0:
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Fix:" in lines[0], cap.err
    else:
        assert len(json.loads(cap.out)["hits"]) == 3


# ---- regressions found by the properties above -----------------------------------------------------------------
def _retyped(key: str, value: Any) -> Any:
    return lambda doc: {**doc, key: value}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda doc: "",  # Hypothesis: b"" raised json.JSONDecodeError from Store.manifest
        lambda doc: "{",  # Hypothesis: b"{" raised json.JSONDecodeError from Store.manifest
        lambda doc: [],
        _retyped("identity", 1),
        _retyped("embed_dim", "64"),
        lambda doc: {k: v for k, v in doc.items() if k != "model"},
    ],
    ids=["empty", "truncated", "list", "identity-int", "embed_dim-str", "no-model"],
)
def test_damaged_stored_manifest_is_a_typed_one_line_refusal(small_index: Path, tmp_path: Path, mutate, capsys) -> None:
    from cocatk.errors import IndexCorruptError

    folder = tmp_path / "idx"
    shutil.copytree(small_index, folder)
    new = mutate(json.loads(_sqlite_manifest(folder)))
    _set_sqlite_manifest(folder, new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(IndexCorruptError) as info:
        _open_and_read(folder)
    assert "manifest" in str(info.value) and "\n" not in str(info.value) and "re-run `cocatk index" in info.value.hint
    capsys.readouterr()
    assert main(["info", "--index", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "damaged" in err and "Fix:" in err


def test_mps_without_mps_is_a_typed_refusal() -> None:
    """Found by the test above (issue 29): torch's RuntimeError reached the user as an internal error."""
    import torch

    from cocatk import load_model

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(CocatkError, match="MPS") as e:
        load_model(str(TINY_CONFIG), "none", device="mps")
    assert e.value.hint == "use --device cpu"
