"""HTML gallery: odd file names shown escaped and linked by exact bytes, header and warnings, marked hits, and
`write_gallery` edge cases (folder target, write failures leave no temp file, umask-based permissions)."""

from __future__ import annotations

import errno
import os
import stat
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from PIL import Image

from cocatk.errors import CocatkError, UsageError
from cocatk.paths import display_path, file_url
from cocatk.retrieval import gallery
from cocatk.retrieval.gallery import GallerySection, render_gallery, write_gallery
from cocatk.retrieval.search import Hit

ODD_NAMES = [
    os.fsdecode(b"fleur_caf\xe9.png"),  # Latin-1, not UTF-8
    "new\nline.png",
    "[bold red]x.png",
    "<script>alert(1)<script>.png",
    "a" * 251 + ".png",  # 255 bytes, the longest name most filesystems allow
    "plain.png",
]


class _Tags(HTMLParser):
    """Every start tag with its attributes (values unescaped, as a browser reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


@pytest.fixture
def odd_hits(tmp_path: Path) -> list[Hit]:
    folder = tmp_path / "photos"
    folder.mkdir()
    hits = []
    for i, name in enumerate(ODD_NAMES):
        path = os.path.join(str(folder), name)
        Image.new("RGB", (40 + i, 30), (40 * i, 200 - 30 * i, 90)).save(path, format="PNG")
        hits.append(Hit(rank=i + 1, id=100 + i, path=path, similarity=0.5 - i / 100, loglik=-3.0 - i))
    assert sorted(os.listdir(folder)) == sorted(ODD_NAMES)  # the names really are on disk
    return hits


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- rendering ---------------------------------------------------------------------------------------------------


def test_links_point_at_exact_bytes_and_names_are_shown_escaped(odd_hits):
    page = render_gallery("t", [GallerySection("q", odd_hits)])
    tags = _tags(page)
    for hit in odd_hits:
        url = file_url(hit.path)
        links = [a for t, a in tags if t == "a" and a.get("href") == url]
        assert len(links) == 2, hit.path  # the thumbnail and the path text
        assert unquote_to_bytes(url.removeprefix("file://")) == os.fsencode(hit.path)
        imgs = [a for t, a in tags if t == "img" and a.get("alt") == display_path(hit.path)]
        assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/jpeg;base64,"), hit.path
    assert "unreadable" not in page  # every thumbnail decoded, the non-UTF-8 name included
    assert "fleur_caf\ufffd.png" in page and "new\\nline.png" in page and "new\nline" not in page
    assert "[bold red]x.png" in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;script&gt;.png" in page
    assert not [t for t, _ in tags if t == "script"]
    page.encode("utf-8")  # valid text: no lone surrogates


def test_header_shows_meta_escaped_date_and_warnings(odd_hits):
    meta = {"query": "a <b>red</b> circle", "model": "demo (coca_demo)", "index": "/data/idx & co"}
    warning = "the demo model knows only synthetic coloured shapes: on real photos its results mean nothing"
    before = datetime.now().strftime("%Y-%m-%d")
    page = render_gallery("cocatk search: a <b>red</b> circle", [GallerySection("q", odd_hits[:1])], meta=meta,
                          warnings=[warning])  # fmt: skip
    after = datetime.now().strftime("%Y-%m-%d")
    assert "<b>red" not in page
    assert "<dd>a &lt;b&gt;red&lt;/b&gt; circle</dd>" in page
    assert "<dd>demo (coca_demo)</dd>" in page and "<dd>/data/idx &amp; co</dd>" in page
    assert "<dt>date</dt>" in page and (before in page or after in page)
    assert page.count(warning) == 1 and page.index('class="warnings"') < page.index('class="grid"')
    # a given date is shown as given, not replaced
    page = render_gallery("t", [], meta={"date": "2020-02-02 20:20"})
    assert "<dd>2020-02-02 20:20</dd>" in page and before not in page
    assert 'class="warnings"' not in page  # no box without warnings


def test_marked_hit_gets_one_badge_and_the_green_frame(odd_hits):
    page = render_gallery("t", [GallerySection("q", odd_hits, marked={odd_hits[2].id})])
    assert page.count("✓ true image") == 1
    figures = [a for t, a in _tags(page) if t == "figure"]
    assert [a["data-id"] for a in figures if "marked" in a["class"].split()] == [str(odd_hits[2].id)]
    marked_figure = page.split("<figure")[3]
    assert "✓ true image" in marked_figure and "[bold red]x.png" in marked_figure
    assert "✓ true image" not in render_gallery("t", [GallerySection("q", odd_hits)])  # default: nothing marked


def test_old_positional_call_still_works(odd_hits):
    page = render_gallery("t", [GallerySection("q", odd_hits[:2], "sub line")], "foot <note>")
    assert "sub line" in page and "foot &lt;note&gt;" in page and "<dt>date</dt>" in page
    assert "no hits" in render_gallery("t", [GallerySection("empty", [])])


def test_unreadable_image_shows_a_placeholder(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    page = render_gallery("t", [GallerySection("q", [Hit(1, 1, str(bad), 0.1)])])
    assert "unreadable" in page and f'href="{file_url(str(bad))}"' in page


# --- writing -----------------------------------------------------------------------------------------------------


def test_folder_target_is_refused_before_anything_is_created(tmp_path, odd_hits, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def no_temp(*args, **kwargs):
        raise AssertionError("a temp file was created for a folder target")

    monkeypatch.setattr(gallery, "_create_temp", no_temp)
    with pytest.raises(UsageError) as info:
        write_gallery(out, "t", [GallerySection("q", odd_hits)])
    assert info.value.message == f"--html {out} is a folder"
    assert info.value.one_line() == f"--html {out} is a folder. Fix: pass a file name such as {out}/results.html"
    assert _listing(out) == ["keep.txt"] and _listing(tmp_path) == ["out", "photos"]


@pytest.mark.parametrize(
    ("exc", "hint"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk space"),
        (PermissionError(errno.EACCES, "Permission denied"), "folder you can write to"),
    ],
)
def test_failed_write_raises_typed_error_and_leaves_no_temp_file(tmp_path, odd_hits, monkeypatch, exc, hint):
    out = tmp_path / "site"
    out.mkdir()

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(gallery.os, "replace", fail)
    with pytest.raises(CocatkError) as info:
        write_gallery(out / "page.html", "t", [GallerySection("q", odd_hits)])
    assert hint in info.value.hint and str(out / "page.html") in info.value.message
    assert isinstance(info.value.__cause__, OSError)
    assert _listing(out) == []  # neither the page nor a .page.html.*.tmp


def test_failure_while_writing_the_text_leaves_no_temp_file(tmp_path, odd_hits, monkeypatch):
    real_fdopen = os.fdopen

    class _Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gallery.os, "fdopen", lambda *a, **k: _Full(real_fdopen(*a, **k)))
    (tmp_path / "page.html").write_text("old page")
    with pytest.raises(CocatkError, match="No space left"):
        write_gallery(tmp_path / "page.html", "t", [GallerySection("q", odd_hits[:1])])
    assert _listing(tmp_path) == ["page.html", "photos"]
    assert (tmp_path / "page.html").read_text() == "old page"  # the old page is untouched


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_mode_follows_the_umask_and_is_kept_when_replacing(tmp_path, odd_hits):
    old = os.umask(0o022)
    try:
        page = write_gallery(tmp_path / "new" / "a.html", "t", [GallerySection("q", odd_hits[:1])])
        assert stat.S_IMODE(page.stat().st_mode) == 0o644
        os.umask(0o027)
        other = write_gallery(tmp_path / "b.html", "t", [GallerySection("q", odd_hits[:1])])
        assert stat.S_IMODE(other.stat().st_mode) == 0o640
        os.chmod(page, 0o600)
        write_gallery(page, "t2", [GallerySection("q", odd_hits[:1])])
        assert stat.S_IMODE(page.stat().st_mode) == 0o600 and "<title>t2</title>" in page.read_text()
    finally:
        os.umask(old)
    assert page == (tmp_path / "new" / "a.html").resolve()
    assert not [n for n in _listing(tmp_path / "new") if n.endswith(".tmp")]
