"""XMP sidecars through ExifTool (cocatk.sidecars): every field is read back by the exiftool program itself
(``exiftool -j -struct -G1 -XMP:all FILE``) and checked by its name: XMP-dc:Subject, XMP-lr:HierarchicalSubject,
XMP-dc:Description (x-default; other languages as XMP-dc:Description-LANG).

The user's own sidecars are made with the exiftool program too, never by cocatk. A read-only folder is read-only for
real: ``chmod a-w`` for an unprivileged user, a read-only bind mount in a private mount namespace (``unshare -rm``)
for root, who ignores permission bits (as tests/test_read_only_index.py does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cocatk.errors import SidecarError, SidecarWriteError, UsageError
from cocatk.sidecars import (
    INSTALL_HINT,
    SidecarRecord,
    SidecarWriter,
    existing_description,
    read_sidecar,
    remove_tags,
    sidecar_path,
    write_tags,
)
from tests.conftest import unshare_works

EXIFTOOL = shutil.which("exiftool")
try:
    import exiftool as _pyexiftool  # noqa: F401
except ImportError:
    _pyexiftool = None
if EXIFTOOL is None or _pyexiftool is None:
    missing = "the exiftool program" if EXIFTOOL is None else "PyExifTool"
    pytest.skip(f"{missing} is not installed: {INSTALL_HINT}", allow_module_level=True)

SUBJECT, HIER, DESC = "XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "XMP-dc:Description"
AS_ROOT = os.geteuid() == 0


# ---- helpers ------------------------------------------------------------------------------------------------
def cli(path: Path) -> dict:
    """The exiftool program's own reading of a sidecar (numbers kept as their text, like the values written)."""
    out = subprocess.run([EXIFTOOL, "-j", "-struct", "-G1", "-XMP:all", os.fspath(path)], capture_output=True,
                         check=True).stdout  # fmt: skip
    return json.loads(out.decode(), parse_int=str, parse_float=str)[0]


def exiftool_write(path: Path, *args: str, create: bool = False) -> None:
    """The user's edit, made with the exiftool program (``-o`` creates a sidecar from scratch)."""
    where = ["-o", os.fspath(path)] if create else ["-overwrite_original", os.fspath(path)]
    subprocess.run([EXIFTOOL, "-q", *args, *where], check=True, capture_output=True)


def jpeg(path: Path, *exif_args: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path, quality=90)
    if exif_args:
        exiftool_write(path, *exif_args)
    return path


def user_sidecar(path: Path) -> bytes:
    """A sidecar the user made: their keywords, hierarchical keywords, a caption in two languages."""
    exiftool_write(path, f"-{SUBJECT}+=Holiday", f"-{SUBJECT}+=Kitchen & dining room table", f"-{SUBJECT}+=2024",
                   f"-{HIER}+=Places|Paris", f"-{HIER}+=Holiday", f"-{DESC}=My own words",
                   f"-{DESC}-fr=Mes propres mots", create=True)  # fmt: skip
    return path.read_bytes()


def leftovers(folder: Path) -> list[str]:
    """ExifTool backups and temporary files, cocatk's own temporary files: none may stay."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(("_original", "_exiftool_tmp", ".cocatk-tmp")))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def writer():
    with SidecarWriter() as w:
        yield w


# ---- names and a new sidecar --------------------------------------------------------------------------------
def test_sidecar_names_per_manager() -> None:
    assert sidecar_path("/p/IMG_0001.jpg") == Path("/p/IMG_0001.jpg.xmp")
    assert sidecar_path("/p/IMG_0001.jpg", "darktable") == Path("/p/IMG_0001.jpg.xmp")
    assert sidecar_path(Path("/p/IMG_0001.jpg"), "adobe") == Path("/p/IMG_0001.xmp")
    assert sidecar_path("/p/IMG_0001.CR2", "adobe") == Path("/p/IMG_0001.xmp")
    with pytest.raises(UsageError) as e:
        sidecar_path("/p/a.jpg", "lightroom")
    assert "digikam, darktable, adobe" in e.value.hint


@pytest.mark.parametrize(("style", "name"), [("digikam", "IMG_0001.jpg.xmp"), ("darktable", "IMG_0001.jpg.xmp"),
                                             ("adobe", "IMG_0001.xmp")])  # fmt: skip
def test_a_new_sidecar_for_a_jpeg(tmp_path: Path, writer, style: str, name: str) -> None:
    image = jpeg(tmp_path / "IMG_0001.jpg")
    before = image.read_bytes()
    done = writer.write_tags(image, style=style, subjects=["dog", "grass"],
                             hierarchical=["cocatk|Animal|dog", "cocatk|Plant|grass"],
                             description="a dog lying on the grass")  # fmt: skip
    assert done.path == tmp_path / name and done.created and done.original is None
    assert done.written == done.path.read_bytes()
    got = cli(done.path)
    assert got[SUBJECT] == ["dog", "grass"]
    assert got[HIER] == ["cocatk|Animal|dog", "cocatk|Plant|grass"]
    assert got[DESC] == "a dog lying on the grass"
    assert (done.added_subjects, done.added_hierarchical) == (["dog", "grass"], got[HIER])
    assert done.description_set and done.previous_description is None
    assert image.read_bytes() == before  # the image itself is never written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"IMG_0001.jpg", name})
    assert leftovers(tmp_path) == []


def test_one_shot_functions(tmp_path: Path) -> None:
    image = jpeg(tmp_path / "a.jpg")
    assert read_sidecar(tmp_path / "a.jpg.xmp").subjects == []  # a missing sidecar: empty fields
    done = write_tags(image, subjects=["cat"], hierarchical=["Animal|cat"], description="a cat")
    fields = read_sidecar(done.path)
    assert (fields.subjects, fields.hierarchical, fields.description) == (["cat"], ["Animal|cat"], "a cat")
    assert existing_description(image) == "a cat"
    assert remove_tags(done.path, done.record()) == "deleted" and not done.path.exists()


# ---- merging into the user's sidecar ------------------------------------------------------------------------
def test_merge_keeps_the_users_entries_and_adds_ours_once(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "IMG_0002.jpg")
    mine = user_sidecar(tmp_path / "IMG_0002.jpg.xmp")
    kwargs = dict(style="digikam", subjects=["dog", "holiday", "a, b", "x; y"],
                  hierarchical=["cocatk|Animal|dog", "places|paris"], description="a dog")  # fmt: skip
    first = writer.write_tags(image, **kwargs)
    assert not first.created and first.original == mine
    got = cli(first.path)
    assert got[SUBJECT] == ["Holiday", "Kitchen & dining room table", "2024", "dog", "a, b", "x; y"]
    # "a, b" and "x; y" name no path: one-level entries too, where readers of lr:hierarchicalSubject see them.
    assert got[HIER] == ["Places|Paris", "Holiday", "cocatk|Animal|dog", "a, b", "x; y"]
    assert got[DESC] == "My own words" and got[f"{DESC}-fr"] == "Mes propres mots"
    assert first.added_subjects == ["dog", "a, b", "x; y"] and first.kept_subjects == ["holiday"]
    assert first.kept_hierarchical == ["places|paris"] and not first.description_set
    second = writer.write_tags(image, **kwargs)  # idempotent: everything is there, the file is not even rewritten
    assert not second.changed and second.original == second.written == first.written
    assert first.path.read_bytes() == first.written
    assert leftovers(tmp_path) == []


def test_the_users_description_stays_unless_overwrite(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "d.jpg")
    mine = user_sidecar(tmp_path / "d.jpg.xmp")
    kept = writer.write_tags(image, description="a generated caption")
    assert not kept.description_set and not kept.changed and kept.path.read_bytes() == mine
    over = writer.write_tags(image, description="a generated caption", overwrite_description=True)
    assert over.description_set and over.previous_description == "My own words"
    got = cli(over.path)
    assert got[DESC] == "a generated caption" and got[f"{DESC}-fr"] == "Mes propres mots"  # other languages stay
    assert got[SUBJECT] == ["Holiday", "Kitchen & dining room table", "2024"]
    assert writer.remove_tags(over.path, over.record()) == "restored" and over.path.read_bytes() == mine


@pytest.mark.parametrize("tag", ["IFD0:ImageDescription", "IPTC:Caption-Abstract", "XMP-dc:Description"])
def test_an_image_with_its_own_description_gets_no_caption(tmp_path: Path, writer, tag: str) -> None:
    image = jpeg(tmp_path / "e.jpg", f"-{tag}=Grandma's garden, 1987")
    assert writer.existing_description(image) == "Grandma's garden, 1987"
    done = writer.write_tags(image, subjects=["garden"], description="a garden with flowers")
    assert done.created and not done.description_set
    got = cli(done.path)
    assert DESC not in got and got[SUBJECT] == ["garden"]


def test_a_caption_in_the_other_sidecar_name_counts_and_camera_filler_does_not(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "f.jpg", "-IFD0:ImageDescription=OLYMPUS DIGITAL CAMERA         ")
    assert writer.existing_description(image) is None  # what the camera wrote by itself is not a caption
    exiftool_write(tmp_path / "f.xmp", f"-{DESC}-de=Omas Garten", create=True)  # Lightroom's name, German only
    assert writer.existing_description(image) == "Omas Garten"
    done = writer.write_tags(image, style="digikam", subjects=["garden"], description="a garden")
    assert not done.description_set and DESC not in cli(done.path)


# ---- removal ------------------------------------------------------------------------------------------------
def test_remove_restores_the_users_sidecar_byte_for_byte_and_deletes_ours(tmp_path: Path, writer) -> None:
    a, b = jpeg(tmp_path / "a.jpg"), jpeg(tmp_path / "b.jpg")
    mine = user_sidecar(tmp_path / "a.jpg.xmp")
    os.chmod(tmp_path / "a.jpg.xmp", 0o640)
    merged = writer.write_tags(a, subjects=["dog"], hierarchical=["cocatk|Animal|dog"], description="a dog")
    created = writer.write_tags(b, subjects=["cat"], hierarchical=["cocatk|Animal|cat"], description="a cat")
    assert merged.path.read_bytes() != mine and created.created
    stored = {
        p: json.loads(json.dumps(w.record().to_json())) for p, w in [(merged.path, merged), (created.path, created)]
    }
    assert writer.unchanged_since(merged.path, SidecarRecord.from_json(stored[merged.path]))
    assert writer.remove_tags(merged.path, SidecarRecord.from_json(stored[merged.path])) == "restored"
    assert merged.path.read_bytes() == mine and (merged.path.stat().st_mode & 0o777) == 0o640
    assert writer.remove_tags(created.path, SidecarRecord.from_json(stored[created.path])) == "deleted"
    assert not created.path.exists()
    assert writer.remove_tags(created.path, SidecarRecord.from_json(stored[created.path])) == "gone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.jpg.xmp", "b.jpg"]
    assert leftovers(tmp_path) == []


def test_after_a_user_edit_remove_cleans_only_ours(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "c.jpg")
    side = tmp_path / "c.jpg.xmp"
    exiftool_write(side, f"-{SUBJECT}+=Holiday", f"-{HIER}+=Places|Paris", create=True)  # no caption of theirs
    done = writer.write_tags(image, subjects=["dog", "Holiday"], hierarchical=["cocatk|Animal|dog"],
                             description="a dog")  # fmt: skip
    assert done.description_set
    exiftool_write(side, f"-{SUBJECT}+=Edited later", f"-{HIER}+=People|Anna")  # the user's edit, after ours
    assert writer.remove_tags(side, done.record()) == "cleaned"
    got = cli(side)
    assert got[SUBJECT] == ["Holiday", "Edited later"]
    assert got[HIER] == ["Places|Paris", "People|Anna"]
    assert DESC not in got  # our caption, still our text: removed
    assert leftovers(tmp_path) == []


def test_a_caption_the_user_changed_is_theirs_and_one_we_replaced_comes_back(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "g.jpg")
    side = tmp_path / "g.jpg.xmp"
    exiftool_write(side, f"-{DESC}=Their caption", create=True)
    done = writer.write_tags(image, subjects=["tree"], description="a tree", overwrite_description=True)
    exiftool_write(side, f"-{SUBJECT}+=Mine")
    assert writer.remove_tags(side, done.record()) == "cleaned"
    got = cli(side)
    assert got[DESC] == "Their caption" and got[SUBJECT] == ["Mine"]  # the one we replaced is back
    other = writer.write_tags(image, description="a tree", overwrite_description=True)
    exiftool_write(side, f"-{DESC}-x-default=Rewritten by the user")
    assert writer.remove_tags(side, other.record()) == "cleaned"
    assert cli(side)[DESC] == "Rewritten by the user"


# ---- what cannot be written ---------------------------------------------------------------------------------


_READ_ONLY_SCRIPT = """
import json, sys
from cocatk.errors import SidecarWriteError
from cocatk.sidecars import SidecarWriter
with SidecarWriter() as w:
    try:
        w.write_tags(sys.argv[1], subjects=["dog"], hierarchical=["cocatk|Animal|dog"], description="a dog")
    except SidecarWriteError as e:
        print(json.dumps({"error": type(e).__name__, "path": e.path, "reason": e.reason, "line": e.one_line()}))
    else:
        print(json.dumps({"error": None}))
"""


def _write_in_read_only(folder: Path, image: Path) -> dict:
    """write_tags for ``image`` in another process, ``folder`` read-only there."""
    cmd = [sys.executable, "-c", _READ_ONLY_SCRIPT, os.fspath(image)]
    if AS_ROOT:
        script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
        cmd = ["unshare", "-rm", "sh", "-c", script, "sh", *cmd]
    else:
        folder.chmod(0o555)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("with_sidecar", [False, True], ids=["new sidecar", "user's sidecar"])
def test_a_read_only_folder_raises_and_changes_nothing(tmp_path: Path, with_sidecar: bool) -> None:
    if AS_ROOT and not unshare_works():
        pytest.skip("running as root without user namespaces (unshare -rm): no way to make a folder read-only")
    folder = tmp_path / "ro"
    image = jpeg(folder / "h.jpg")
    if with_sidecar:
        user_sidecar(folder / "h.jpg.xmp")
    before = digest(folder)
    got = _write_in_read_only(folder, image)
    assert got["error"] == "SidecarWriteError", got
    assert got["path"] == os.fspath(folder / "h.jpg.xmp") and got["reason"], got
    assert "read-only" in got["line"] and "Fix: " in got["line"]
    assert digest(folder) == before and leftovers(folder) == []


def test_a_read_only_sidecar_raises_and_stays_as_it_is(tmp_path: Path, writer) -> None:
    """ExifTool's rename would replace a chmod a-w file in a writable folder: cocatk refuses it (root too)."""
    image = jpeg(tmp_path / "i.jpg")
    side = tmp_path / "i.jpg.xmp"
    mine = user_sidecar(side)
    side.chmod(0o444)
    with pytest.raises(SidecarWriteError) as e:
        writer.write_tags(image, subjects=["dog"])
    assert e.value.path == os.fspath(side) and "read-only" in e.value.reason
    assert side.read_bytes() == mine and (side.stat().st_mode & 0o777) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.jpg", "i.jpg.xmp"]


def test_a_sidecar_exiftool_cannot_parse_raises_and_stays(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "j.jpg")
    side = tmp_path / "j.jpg.xmp"
    side.write_bytes(b"not XMP at all\n")
    with pytest.raises(SidecarWriteError) as e:
        writer.write_tags(image, subjects=["dog"])
    assert "ExifTool says" in str(e.value) and e.value.reason
    assert side.read_bytes() == b"not XMP at all\n" and leftovers(tmp_path) == []


def test_a_missing_exiftool_or_pyexiftool_is_one_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SidecarError) as e:
        SidecarWriter(executable="/nonexistent/exiftool").start()
    assert "libimage-exiftool-perl" in e.value.hint and "pip install PyExifTool" in e.value.hint
    monkeypatch.setitem(sys.modules, "exiftool", None)  # `import exiftool` now fails
    with pytest.raises(SidecarError) as e:
        SidecarWriter().start()
    assert "PyExifTool" in e.value.message and "brew install exiftool" in e.value.hint


# ---- names and values ExifTool must not split or mangle -----------------------------------------------------
def test_non_ascii_paths_and_labels_with_commas_round_trip(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "Café" / "Crème brûlée 1.jpg")
    labels = ["Crème brûlée", "Kitchen & dining room table", "a, b", "x; y", "1.50", "日本"]
    caption = "Line one\nline two: a back\\slash, $5 and @home\t(tab)"
    done = writer.write_tags(image, style="darktable", subjects=labels, hierarchical=["Café|Crème brûlée"],
                             description=caption)  # fmt: skip
    assert done.path == tmp_path / "Café" / "Crème brûlée 1.jpg.xmp"
    got = cli(done.path)
    assert got[SUBJECT] == labels
    assert got[HIER][0] == "Café|Crème brûlée" and "a, b" in got[HIER] and "x; y" in got[HIER]
    assert got[DESC] == caption
    again = writer.write_tags(image, style="darktable", subjects=labels, hierarchical=["Café|Crème brûlée"])
    assert not again.changed
    assert writer.remove_tags(done.path, done.record()) == "deleted"
    assert leftovers(tmp_path) == []


def test_a_non_utf8_file_name(tmp_path: Path, writer) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on disk: surrogate-escaped in Python
    try:
        image = jpeg(tmp_path / name)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    done = writer.write_tags(image, subjects=["dog"])
    assert os.fsencode(done.path.name) == b"caf\xe9.jpg.xmp" and cli(done.path)[SUBJECT] == ["dog"]


# ---- what managers read -------------------------------------------------------------------------------------
def test_digikams_tags_list_gets_our_paths_when_the_sidecar_has_one(tmp_path: Path, writer) -> None:
    """digiKam and immich read digiKam:TagsList first and nothing else when it is there."""
    image = jpeg(tmp_path / "k.jpg")
    side = tmp_path / "k.jpg.xmp"
    exiftool_write(side, "-XMP-digiKam:TagsList+=Places/Paris", f"-{HIER}+=Places|Paris", f"-{SUBJECT}+=Paris",
                   create=True)  # fmt: skip
    done = writer.write_tags(image, subjects=["dog"], hierarchical=["cocatk|Animal|dog"])
    got = cli(side)
    assert got["XMP-digiKam:TagsList"] == ["Places/Paris", "cocatk/Animal/dog"]
    exiftool_write(side, f"-{SUBJECT}+=later")
    assert writer.remove_tags(side, done.record()) == "cleaned"
    assert cli(side)["XMP-digiKam:TagsList"] == ["Places/Paris"]
    plain = writer.write_tags(jpeg(tmp_path / "l.jpg"), subjects=["dog"], hierarchical=["cocatk|Animal|dog"])
    assert "XMP-digiKam:TagsList" not in cli(plain.path)  # never a new TagsList: it would hide lr's list


def test_the_users_flat_keywords_stay_visible_when_a_hierarchical_list_starts(tmp_path: Path, writer) -> None:
    """darktable, digiKam and immich read dc:subject only while lr:hierarchicalSubject is empty."""
    image = jpeg(tmp_path / "m.jpg")
    side = tmp_path / "m.jpg.xmp"
    exiftool_write(side, f"-{SUBJECT}+=beach", f"-{SUBJECT}+=summer", create=True)
    mine = side.read_bytes()
    done = writer.write_tags(image, subjects=["dog"], hierarchical=["cocatk|Animal|dog"])
    got = cli(side)
    assert got[SUBJECT] == ["beach", "summer", "dog"]
    assert got[HIER] == ["cocatk|Animal|dog", "beach", "summer"]
    assert writer.remove_tags(side, done.record()) == "restored" and side.read_bytes() == mine


# ---- files --------------------------------------------------------------------------------------------------
def test_a_symlinked_sidecar_stays_a_link(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "n.jpg")
    real = tmp_path / "store" / "n.xmp"
    real.parent.mkdir()
    user_sidecar(real)
    (tmp_path / "n.jpg.xmp").symlink_to(real)
    done = writer.write_tags(image, subjects=["dog"])
    assert (tmp_path / "n.jpg.xmp").is_symlink() and "dog" in cli(real)[SUBJECT]
    assert writer.remove_tags(done.path, done.record()) == "restored" and (tmp_path / "n.jpg.xmp").is_symlink()


def test_a_sidecar_that_appears_while_ours_is_made_is_merged_into(tmp_path: Path, writer, monkeypatch) -> None:
    from cocatk.sidecars import xmp

    image = jpeg(tmp_path / "o.jpg")
    real = xmp._create_exclusive

    def racing(target: Path, data: bytes, shown: Path) -> None:
        if not target.exists():  # another program writes its sidecar first
            exiftool_write(target, f"-{SUBJECT}+=theirs", create=True)
        real(target, data, shown)

    monkeypatch.setattr(xmp, "_create_exclusive", racing)
    done = writer.write_tags(image, subjects=["dog"])
    assert not done.created and cli(done.path)[SUBJECT] == ["theirs", "dog"]
    assert leftovers(tmp_path) == []


def test_one_exiftool_process_for_many_files(tmp_path: Path) -> None:
    images = [jpeg(tmp_path / f"p{i:03d}.jpg") for i in range(40)]
    t0 = time.monotonic()
    with SidecarWriter() as w:
        pid = w._et._process.pid
        for i, image in enumerate(images):
            w.write_tags(image, subjects=[f"label {i}"], hierarchical=[f"cocatk|label {i}"])
        assert w._et._process.pid == pid
    assert [cli(sidecar_path(p))[SUBJECT] for p in images[:3]] == [["label 0"], ["label 1"], ["label 2"]]
    assert time.monotonic() - t0 < 60


def test_the_record_round_trips_through_json(tmp_path: Path, writer) -> None:
    image = jpeg(tmp_path / "q.jpg")
    user_sidecar(tmp_path / "q.jpg.xmp")
    done = writer.write_tags(image, subjects=["dog"], description="x", overwrite_description=True)
    rec = done.record()
    back = SidecarRecord.from_json(json.dumps(rec.to_json()))
    assert back == rec and back.original == done.original and back.previous_description == "My own words"


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The Python block of docs/sidecars.md, as written, on a photo of its own."""
    import re

    page = (Path(__file__).parent.parent / "docs" / "sidecars.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    jpeg(tmp_path / "photos" / "IMG_0001.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "sidecars.md", "exec"), {})  # noqa: S102 - the page's own code
    out = capsys.readouterr().out.splitlines()
    assert out == ["photos/IMG_0001.jpg.xmp True ['dog'] True", "deleted"]
    assert leftovers(tmp_path) == [] and not (tmp_path / "photos" / "IMG_0001.jpg.xmp").exists()
