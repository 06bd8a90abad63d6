"""XMP sidecars written and merged by ExifTool, driven through PyExifTool: never a hand-written byte of XML.

A sidecar is the file beside an image that photo managers read its keywords and caption from (docs/sidecars.md):
``IMG_0001.jpg.xmp`` (digiKam, darktable, immich) or ``IMG_0001.xmp`` (Lightroom). :meth:`SidecarWriter.write_tags`
merges keywords (``dc:subject``), hierarchical keywords (``lr:hierarchicalSubject``) and a caption
(``dc:description``) into it, keeping everything already there, and says exactly what it added;
:meth:`SidecarWriter.remove_tags` takes that record and undoes it: the old bytes back, the file gone when cocatk made
it, or only cocatk's entries removed when the user edited the sidecar since.

One :class:`SidecarWriter` keeps one ExifTool process open (``-stay_open``) for any number of files; the module-level
functions start one for a single call.

Example:
    >>> with SidecarWriter() as w:  # doctest: +SKIP
    ...     done = w.write_tags("IMG_0001.jpg", subjects=["dog"], hierarchical=["Animals|dog"])
    ...     w.remove_tags(done.path, done.record())
    'deleted'
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SidecarError, SidecarWriteError, UsageError

if TYPE_CHECKING:
    from typing import TypeAlias

    StrPath: TypeAlias = str | os.PathLike[str]

#: Sidecar naming: digiKam and darktable add ``.xmp`` to the whole name, Lightroom (adobe) replaces the suffix.
SIDECAR_STYLES: tuple[str, ...] = ("digikam", "darktable", "adobe")

INSTALL_HINT = (
    "apt-get install libimage-exiftool-perl (Debian/Ubuntu), brew install exiftool (macOS), then pip install PyExifTool"
)

SUBJECT = "XMP-dc:Subject"
HIERARCHICAL = "XMP-lr:HierarchicalSubject"
DESCRIPTION = "XMP-dc:Description"
#: digiKam's own tag paths ('/'-separated). digiKam and immich read it before lr:hierarchicalSubject and ignore the
#: rest when it is there, so a sidecar that holds one gets cocatk's paths in it too (never a new one).
TAGS_LIST = "XMP-digiKam:TagsList"
#: The x-default item of the lang-alt list alone: a plain ``-XMP-dc:Description=`` replaces every language.
_DEFAULT_DESCRIPTION = "XMP-dc:Description-x-default"
#: A description the image carries itself: XMP (every language), EXIF, IPTC.
_EMBEDDED = ("-XMP-dc:Description*", "-IFD0:ImageDescription", "-IPTC:Caption-Abstract")
#: What cameras write into ImageDescription by themselves (the list gThumb and PhotoPrism ignore): not a caption.
_CAMERA_FILLER = frozenset(
    {"olympus digital camera", "sony dsc", "konica minolta digital camera", "minolta digital camera",
     "digital camera", "binary comment", "default", "exif_jpeg_picture"}
)  # fmt: skip
#: Every call: file names are UTF-8 bytes (ExifTool converts them on Windows; elsewhere they pass as they are).
_COMMON_ARGS = ["-charset", "filename=utf8"]
#: Characters XML 1.0 cannot hold: dropped from values.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---- records ------------------------------------------------------------------------------------------------
@dataclass
class SidecarFields:
    """What a sidecar holds of what cocatk writes: keywords, hierarchical keywords, the caption.

    ``description`` is the x-default item of ``dc:description``; ``descriptions`` holds every language (x-default
    included); ``tags_list`` is digiKam's ``TagsList``.
    """

    subjects: list[str] = field(default_factory=list)
    hierarchical: list[str] = field(default_factory=list)
    description: str | None = None
    descriptions: dict[str, str] = field(default_factory=dict)
    tags_list: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class _Changes:
    """What a write added, shared by :class:`SidecarWrite` and :class:`SidecarRecord`."""

    added_subjects: list[str] = field(default_factory=list)
    added_hierarchical: list[str] = field(default_factory=list)
    added_tags_list: list[str] = field(default_factory=list)
    kept_subjects: list[str] = field(default_factory=list)
    kept_hierarchical: list[str] = field(default_factory=list)
    description_set: bool = False
    description: str | None = None
    previous_description: str | None = None

    @property
    def changed(self) -> bool:
        """Whether the write changed the sidecar at all (a rerun that found everything there did not)."""
        return bool(self.added_subjects or self.added_hierarchical or self.added_tags_list or self.description_set)


@dataclass(kw_only=True)
class SidecarRecord(_Changes):
    """What one :meth:`SidecarWriter.write_tags` did, enough for :meth:`SidecarWriter.remove_tags` to undo it.

    ``original`` is the sidecar's bytes before (None when cocatk created it), ``written_sha256`` the digest of the
    bytes it left; ``kept_*`` are the entries asked for that the sidecar held already (not added, so never removed);
    ``description`` is the caption written when ``description_set``, ``previous_description`` the one it replaced.
    ``to_json`` gives a plain dict (``original`` in base64) for the caller's index; ``from_json`` reads it back.
    """

    created: bool
    original: bytes | None
    written_sha256: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["original"] = None if self.original is None else base64.b64encode(self.original).decode("ascii")
        return {**out, "version": 1}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> SidecarRecord:
        d = dict(json.loads(data) if isinstance(data, str) else data)
        original = d.pop("original", None)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(original=None if original is None else base64.b64decode(original), **known)


@dataclass(kw_only=True)
class SidecarWrite(_Changes):
    """The outcome of :meth:`SidecarWriter.write_tags`: the sidecar, its bytes before (None when it was created) and
    after, and what was added; :meth:`record` keeps what removal needs."""

    path: Path
    created: bool
    original: bytes | None
    written: bytes

    def record(self) -> SidecarRecord:
        changes = {k: copy.copy(getattr(self, k)) for k in _Changes.__dataclass_fields__}
        return SidecarRecord(created=self.created, original=self.original, written_sha256=_sha256(self.written),
                             **changes)  # fmt: skip


# ---- names --------------------------------------------------------------------------------------------------
def sidecar_path(image: StrPath, style: str = "digikam") -> Path:
    """The sidecar of ``image`` as ``style`` names it: ``IMG_0001.jpg.xmp`` (digikam, darktable) or ``IMG_0001.xmp``
    (adobe: Lightroom replaces the suffix).

    Raises:
        UsageError: an unknown style (the message lists the valid ones).
    """
    if style not in SIDECAR_STYLES:
        raise UsageError(f"unknown sidecar style {style!r}", hint=f"use one of: {', '.join(SIDECAR_STYLES)}")
    p = Path(os.fspath(image))
    return p.with_suffix(".xmp") if style == "adobe" and p.suffix else p.with_name(p.name + ".xmp")


def _sidecar_names(image: StrPath) -> list[Path]:
    """Every name a sidecar of ``image`` may have, whichever manager wrote it."""
    return list(dict.fromkeys([sidecar_path(image, "digikam"), sidecar_path(image, "adobe")]))


# ---- the ExifTool process -----------------------------------------------------------------------------------
class SidecarWriter:
    """One ExifTool process (``-stay_open``) for reading and writing many sidecars; a context manager.

    Not thread-safe: one writer per thread. ``executable`` overrides the ``exiftool`` found on PATH.

    Raises (on entering):
        SidecarError: PyExifTool or the exiftool program is missing, or it does not start; the hint says how to
            install both.
    """

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable
        self._et: Any = None
        self.version: str | None = None

    def __enter__(self) -> SidecarWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start ExifTool (done by ``with``); a second call does nothing."""
        if self._et is not None:
            return
        try:
            import exiftool  # lazy: `cocatk --help` never loads it
        except ImportError as e:
            raise SidecarError("PyExifTool is not installed: XMP sidecars need it", hint=INSTALL_HINT) from e
        kwargs = {"executable": self.executable} if self.executable else {}
        try:
            et = exiftool.ExifToolHelper(common_args=_COMMON_ARGS, encoding="utf-8", **kwargs)
            et.run()
        except (OSError, RuntimeError, ValueError, exiftool.exceptions.ExifToolException) as e:
            what = self.executable or "exiftool"
            raise SidecarError(f"ExifTool ({what}) cannot be started: {e}", hint=INSTALL_HINT) from e
        self._et = et
        self.version = str(et.version)

    def close(self) -> None:
        """Stop ExifTool (done by ``with``)."""
        if self._et is not None:
            et, self._et = self._et, None
            with contextlib.suppress(Exception):  # a process that died already has nothing left to stop
                et.terminate()

    # ---- reading ----
    def read_sidecar(self, path: StrPath) -> SidecarFields:
        """The keywords, hierarchical keywords and caption a sidecar holds; empty fields when there is no file.

        Raises:
            SidecarWriteError: the file cannot be read (permission denied).
        """
        target = _resolved(Path(os.fspath(path)))
        if not target.exists():
            return SidecarFields()
        return _fields(self._json(target, "-struct", "-G1", "-XMP:all", path=Path(os.fspath(path))))

    def existing_description(self, image: StrPath) -> str | None:
        """A caption the image already has: in a sidecar under any manager's name, or embedded (XMP, EXIF, IPTC).

        Camera boilerplate ("OLYMPUS DIGITAL CAMERA") and blank values do not count.

        Raises:
            SidecarWriteError: ExifTool cannot read the image (missing, unreadable): whether it has a caption is
                unknown.
        """
        for name in _sidecar_names(image):
            found = _first_description(self.read_sidecar(name).descriptions)
            if found is not None:
                return found
        return self._embedded_description(Path(os.fspath(image)))

    def _embedded_description(self, image: Path) -> str | None:
        data = self._json(image, "-fast2", "-G1", *_EMBEDDED, path=image)
        values = {k: v for k, v in data.items() if k != "SourceFile"}
        default = values.pop("XMP-dc:Description", None)
        ordered = [default, *values.values()]
        return _first_description({str(i): str(v) for i, v in enumerate(ordered) if v is not None})

    def unchanged_since(self, path: StrPath, record: SidecarRecord | SidecarWrite) -> bool:
        """Whether the sidecar still holds exactly the bytes ``record``'s write left (nobody edited it since)."""
        return _unchanged(path, record)

    # ---- writing ----
    def write_tags(self, image: StrPath, *, style: str = "digikam", subjects: Iterable[str] = (),
                   hierarchical: Iterable[str] = (), description: str | None = None,
                   overwrite_description: bool = False,
                   before_write: Callable[[SidecarWrite], None] | None = None) -> SidecarWrite:  # fmt: skip
        """Merge keywords, hierarchical keywords and a caption into the image's sidecar (created when missing).

        Nothing already there is removed or replaced: only the keywords missing (compared case-insensitively) are
        added, once, in the order given. Flat keywords that no hierarchical path names are added to
        ``lr:hierarchicalSubject`` as one-level entries as well, the way digiKam, darktable and Lightroom write them,
        because darktable, digiKam and immich read ``dc:subject`` only when that list is empty. A sidecar with
        digiKam's ``TagsList`` gets the new paths there too (with '/'). The caption goes into the x-default item of
        ``dc:description`` only when neither the sidecar nor the image has one (:meth:`existing_description`),
        unless ``overwrite_description``. Other languages are never touched. A sidecar that holds everything already
        is not written at all.

        Writes are atomic: ExifTool makes the bytes (``-o -``: those its ``-overwrite_original`` writes), renamed
        over the sidecar from a temporary file; a new one is linked in only if no file of that name appeared.
        ``before_write(result)`` gets the final result before the bytes land, so a caller records it first (killed
        between, :meth:`remove_tags` of that record changes nothing); not called when nothing needs writing.

        Raises:
            UsageError: an unknown style.
            SidecarWriteError: the sidecar cannot be written (read-only folder or file, permission denied, an XMP
                file ExifTool cannot parse), or the image cannot be read when its caption is checked. Nothing was
                changed.
            SidecarError: ExifTool stopped working.
        """
        path = sidecar_path(image, style)
        if not os.path.isfile(image):
            raise SidecarWriteError(f"cannot write {path}: its image {os.fspath(image)} is not a file here",
                                    hint="check the path", path=str(path), reason="image missing")  # fmt: skip
        want_s, want_h = _clean_list(subjects), _clean_list(hierarchical)
        text = _clean_text(description)
        target = _resolved(path)
        for _ in range(3):  # a sidecar that appears while ours is being created is merged into instead
            original = _read_bytes(target, path)
            fields = self.read_sidecar(target) if original is not None else SidecarFields()
            plan = _plan(fields, want_s, want_h)
            desc_set = False
            if text is not None:
                if overwrite_description:
                    desc_set = text != fields.description
                else:
                    desc_set = _first_description(fields.descriptions) is None and self._no_caption(image, target)
            args = plan.args()
            if desc_set:
                args.append(f"-{_DEFAULT_DESCRIPTION}={_escape(text or '')}")
            result = SidecarWrite(
                path=path, created=False, original=original, written=original or b"",
                added_subjects=plan.subjects, added_hierarchical=plan.hierarchical, added_tags_list=plan.tags_list,
                kept_subjects=plan.kept_subjects, kept_hierarchical=plan.kept_hierarchical,
                description_set=desc_set, description=text if desc_set else None,
                previous_description=fields.description if desc_set else None,
            )  # fmt: skip
            if not args:
                return result
            _check_writable(target, path, exists=original is not None)
            result.created = original is None
            out = ["-.xmp", *args] if result.created else ["-", *args, _fs(target, path)]
            result.written = self._write("-o", *out, path=path)
            if before_write is not None:
                before_write(result)
            if not result.created:
                _replace_atomic(target, result.written, path)
                return result
            try:
                _create_exclusive(target, result.written, path)
            except FileExistsError:
                continue
            return result
        raise SidecarWriteError(f"cannot write {path}: it keeps appearing and changing while being created",
                                path=str(path), reason="changed while being written")  # fmt: skip

    def _no_caption(self, image: StrPath, target: Path) -> bool:
        """No caption in the image's other sidecar names nor embedded (the sidecar being written was checked)."""
        for name in _sidecar_names(image):
            if _resolved(name) != target and _first_description(self.read_sidecar(name).descriptions) is not None:
                return False
        return self._embedded_description(Path(os.fspath(image))) is None

    def remove_tags(self, path: StrPath, record: SidecarRecord | SidecarWrite) -> str:
        """Undo one :meth:`write_tags` on the sidecar at ``path``; returns what happened.

        - ``"restored"``: the sidecar was as cocatk left it; its original bytes are back, byte for byte (atomically).
        - ``"deleted"``: the same, and cocatk had created it: it is removed.
        - ``"cleaned"``: it was edited since: only what cocatk added is removed (``-=`` per keyword), and the caption
          only when it is still cocatk's text (the one it replaced comes back).
        - ``"gone"``: there is no sidecar any more. ``"untouched"``: the write had changed nothing.

        Raises:
            SidecarWriteError: the sidecar cannot be written; nothing was changed.
            SidecarError: ExifTool stopped working.
        """
        rec = record.record() if isinstance(record, SidecarWrite) else record
        shown = Path(os.fspath(path))
        target = _resolved(shown)
        if not rec.changed:
            return "untouched"
        current = _read_bytes(target, shown)
        if current is None:
            return "gone"
        if _sha256(current) == rec.written_sha256:
            _check_writable(target, shown, exists=True)
            if rec.created or rec.original is None:
                try:
                    target.unlink()
                except FileNotFoundError:
                    return "gone"
                except OSError as e:
                    raise _os_error(shown, e) from e
                return "deleted"
            _replace_atomic(target, rec.original, shown)
            return "restored"
        fields = self.read_sidecar(target)
        args = [f"-{SUBJECT}-={_escape(s)}" for s in rec.added_subjects if s in fields.subjects]
        args += [f"-{HIERARCHICAL}-={_escape(h)}" for h in rec.added_hierarchical if h in fields.hierarchical]
        args += [f"-{TAGS_LIST}-={_escape(t)}" for t in rec.added_tags_list if t in fields.tags_list]
        if rec.description_set and rec.description is not None and fields.description == rec.description:
            args.append(f"-{_DEFAULT_DESCRIPTION}={_escape(rec.previous_description or '')}")
        if args:
            _check_writable(target, shown, exists=True)
            self._write("-overwrite_original", *args, _fs(target, shown), path=shown)
        return "cleaned"

    # ---- ExifTool calls ----
    def _execute(self, *args: str | bytes) -> bytes:
        if self._et is None:
            raise SidecarError("the sidecar writer is not started", hint="use it as `with SidecarWriter() as w:`")
        out = self._et.execute(*args, raw_bytes=True)
        return out if isinstance(out, bytes) else str(out).encode()

    def _json(self, file: Path, *args: str, path: Path) -> dict[str, Any]:
        """ExifTool's JSON for one file, numbers kept as their text (a keyword '1.50' stays '1.50')."""
        import exiftool

        try:
            out = self._execute("-j", *args, _fs(file, path))
        except exiftool.exceptions.ExifToolExecuteError as e:
            raise _exiftool_error(path, e, "read") from e
        except (exiftool.exceptions.ExifToolException, OSError) as e:
            raise SidecarError(f"ExifTool stopped working: {e}", hint="run again; " + INSTALL_HINT) from e
        rows = json.loads(out.decode("utf-8", "replace") or "[{}]", parse_int=str, parse_float=str)
        return dict(rows[0]) if rows else {}

    def _write(self, *args: str | bytes, path: Path) -> bytes:
        """One ExifTool write; values C-escaped (``-ec``) so line breaks, backslashes and leading spaces survive."""
        import exiftool

        try:
            return self._execute("-ec", *args)
        except exiftool.exceptions.ExifToolExecuteError as e:
            raise _exiftool_error(path, e, "write") from e
        except (exiftool.exceptions.ExifToolException, OSError) as e:
            raise SidecarError(f"ExifTool stopped working: {e}", hint="run again; " + INSTALL_HINT) from e


# ---- one-shot functions -------------------------------------------------------------------------------------
def require_exiftool() -> str:
    """ExifTool's version, after checking that PyExifTool and the exiftool program are both there and start.

    Raises:
        SidecarError: either is missing; the hint says how to install them.
    """
    with SidecarWriter() as w:
        return str(w.version)


def read_sidecar(path: StrPath) -> SidecarFields:
    """:meth:`SidecarWriter.read_sidecar` with a one-shot ExifTool (no process for a missing file)."""
    if not _resolved(Path(os.fspath(path))).exists():
        return SidecarFields()
    with SidecarWriter() as w:
        return w.read_sidecar(path)


def existing_description(image: StrPath) -> str | None:
    """:meth:`SidecarWriter.existing_description` with a one-shot ExifTool."""
    with SidecarWriter() as w:
        return w.existing_description(image)


def write_tags(image: StrPath, *, style: str = "digikam", subjects: Iterable[str] = (),
               hierarchical: Iterable[str] = (), description: str | None = None,
               overwrite_description: bool = False) -> SidecarWrite:  # fmt: skip
    """:meth:`SidecarWriter.write_tags` with a one-shot ExifTool; use a :class:`SidecarWriter` for many files."""
    sidecar_path(image, style)  # a bad style fails before ExifTool starts
    with SidecarWriter() as w:
        return w.write_tags(image, style=style, subjects=subjects, hierarchical=hierarchical,
                            description=description, overwrite_description=overwrite_description)  # fmt: skip


def remove_tags(path: StrPath, record: SidecarRecord | SidecarWrite) -> str:
    """:meth:`SidecarWriter.remove_tags` with a one-shot ExifTool."""
    with SidecarWriter() as w:
        return w.remove_tags(path, record)


def unchanged_since(path: StrPath, record: SidecarRecord | SidecarWrite) -> bool:
    """Whether the sidecar at ``path`` holds exactly the bytes ``record``'s write left (needs no ExifTool)."""
    return _unchanged(path, record)


# ---- merge plan ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    subjects: list[str]
    hierarchical: list[str]
    tags_list: list[str]
    kept_subjects: list[str]
    kept_hierarchical: list[str]

    def args(self) -> list[str]:
        """One ``-TAG+=value`` per item: ExifTool adds each as one list entry, commas and semicolons included."""
        return ([f"-{SUBJECT}+={_escape(s)}" for s in self.subjects]
                + [f"-{HIERARCHICAL}+={_escape(h)}" for h in self.hierarchical]
                + [f"-{TAGS_LIST}+={_escape(t)}" for t in self.tags_list])  # fmt: skip


def _plan(fields: SidecarFields, subjects: Sequence[str], hierarchical: Sequence[str]) -> _Plan:
    have_s, have_h = {_key(s) for s in fields.subjects}, {_key(h) for h in fields.hierarchical}
    add_s = [s for s in subjects if _key(s) not in have_s]
    add_h = [h for h in hierarchical if _key(h) not in have_h]
    kept_s = [s for s in subjects if _key(s) in have_s]
    kept_h = [h for h in hierarchical if _key(h) in have_h]
    if fields.hierarchical or add_h:
        # Readers that find lr:hierarchicalSubject ignore dc:subject: a flat keyword no path names gets its own
        # one-level path (ours always; the sidecar's own only when it had no hierarchical list before this write).
        listed = have_h | {_key(h) for h in add_h}
        named = {_key(part) for h in [*fields.hierarchical, *add_h] for part in h.split("|")}
        flat = [*subjects, *([] if fields.hierarchical else fields.subjects)]
        for s in flat:
            k = _key(s)
            if k not in named and k not in listed and "|" not in s:
                add_h.append(s)
                listed.add(k)
                named.add(k)
    add_t: list[str] = []
    if fields.tags_list:
        have_t = {_key(t) for t in fields.tags_list}
        for h in add_h:
            t = h.replace("|", "/")
            if _key(t) not in have_t:
                add_t.append(t)
                have_t.add(_key(t))
    return _Plan(add_s, add_h, add_t, kept_s, kept_h)


def _key(value: str) -> str:
    """Keywords compare as people read them: Unicode-normalised and case-folded ("Dog" is "dog")."""
    return unicodedata.normalize("NFC", value).casefold()


def _clean_list(values: Iterable[str]) -> list[str]:
    """Stripped, without empties, control characters XML cannot hold, or repeats (the first spelling kept)."""
    if isinstance(values, str):
        values = [values]
    out: dict[str, str] = {}
    for v in values:
        text = _clean_text(v)
        if text is not None:
            out.setdefault(_key(text), text)
    return list(out.values())


def _clean_text(value: str | None) -> str | None:
    if value is None:
        return None
    text = _NOT_XML.sub("", str(value)).strip()
    return text or None


def _first_description(descriptions: dict[str, str]) -> str | None:
    """The first description that is one (x-default first): not blank, not camera boilerplate."""
    for text in descriptions.values():
        clean = " ".join(str(text).split())
        if clean and clean.casefold() not in _CAMERA_FILLER and not clean.upper().startswith("DCIM\\"):
            return str(text)
    return None


def _fields(data: dict[str, Any]) -> SidecarFields:
    def listed(tag: str) -> list[str]:
        v = data.get(tag)
        if v is None:
            return []
        return [str(x) for x in v] if isinstance(v, list) else [str(v)]

    descriptions: dict[str, str] = {}
    if DESCRIPTION in data:
        descriptions["x-default"] = str(data[DESCRIPTION])
    for k, v in data.items():
        if k.startswith(DESCRIPTION + "-"):
            descriptions[k[len(DESCRIPTION) + 1 :]] = str(v)
    return SidecarFields(
        subjects=listed(SUBJECT), hierarchical=listed(HIERARCHICAL), description=descriptions.get("x-default"),
        descriptions=descriptions, tags_list=listed(TAGS_LIST),
    )  # fmt: skip


def _escape(value: str) -> str:
    """A value for ``-ec``: ExifTool reads its argument list one line each and drops one space after '=', so line
    breaks, control characters, backslashes and a leading space are written as C escapes it turns back."""
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value.replace("\\", "\\\\"))
    return "\\x20" + out[1:] if out.startswith(" ") else out


# ---- files --------------------------------------------------------------------------------------------------
def _fs(path: Path, shown: Path) -> bytes:
    """An absolute file name as bytes (any name a filesystem holds; never read as an option, never re-encoded)."""
    raw = os.fsencode(os.path.abspath(path))
    if b"\n" in raw or b"\r" in raw:
        why = "ExifTool reads one file name per line and this one holds a line break"
        raise SidecarWriteError(f"cannot handle {shown}: {why}", hint="rename it", path=str(shown), reason=why)
    return raw


def _resolved(path: Path) -> Path:
    """The file a symbolic link points to: ExifTool's rename would replace the link itself with a plain file."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unchanged(path: StrPath, record: SidecarRecord | SidecarWrite) -> bool:
    rec = record.record() if isinstance(record, SidecarWrite) else record
    shown = Path(os.fspath(path))
    current = _read_bytes(_resolved(shown), shown)
    return current is not None and _sha256(current) == rec.written_sha256


def _read_bytes(path: Path, shown: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _os_error(shown, e) from e


def _check_writable(target: Path, shown: Path, *, exists: bool) -> None:
    """Refuse before ExifTool runs: a read-only folder (``os.access`` sees read-only mounts too) or file.

    ExifTool renames its temporary file over the sidecar, which a writable folder allows even for a file marked
    read-only: a sidecar without any write bit is the user's "leave this alone" and is refused, root included."""
    folder = target.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SidecarWriteError(f"cannot write {shown}: its folder {folder} is read-only here", path=str(shown),
                                reason="the folder is read-only")  # fmt: skip
    if exists:
        try:
            mode = target.stat().st_mode
        except OSError as e:
            raise _os_error(shown, e) from e
        if not os.access(target, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise SidecarWriteError(f"cannot write {shown}: the sidecar is read-only", path=str(shown),
                                    reason="the sidecar is read-only")  # fmt: skip


def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.cocatk-tmp")


def _write_new(tmp: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``tmp`` (which must not exist) and flush it to disk; ``mode`` before the umask."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_exclusive(target: Path, data: bytes, shown: Path) -> None:
    """Put a new file at ``target`` whole or not at all, never over one that appeared meanwhile (FileExistsError)."""
    tmp = _temp_beside(target)
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, target)  # atomic, and fails when the name exists
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem (FAT, some shares): rename, after a check
            if os.path.lexists(target):
                raise FileExistsError(str(target)) from None
            os.replace(tmp, target)
    except FileExistsError:
        raise
    except OSError as e:
        raise _os_error(shown, e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _replace_atomic(target: Path, data: bytes, shown: Path) -> None:
    """Replace ``target``'s bytes whole (a temporary file renamed over it), keeping its mode and, for root, owner."""
    tmp = _temp_beside(target)
    try:
        st = target.stat()
        _write_new(tmp, data, 0o600)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if hasattr(os, "chown") and os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, target)
    except OSError as e:
        raise _os_error(shown, e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _os_error(shown: Path, e: OSError) -> SidecarWriteError:
    reason = e.strerror or str(e)
    return SidecarWriteError(f"cannot write {shown}: {reason}", path=str(shown), reason=reason)


def _exiftool_error(shown: Path, e: Any, doing: str) -> SidecarWriteError:
    """ExifTool's own "Error: ..." line as the reason (without the file name it repeats)."""
    stderr = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else str(e.stderr or "")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")] or lines or [f"exit status {e.returncode}"]
    reason = re.sub(r"^Error:\s*", "", errors[0]).rsplit(" - ", 1)[0].strip() or errors[0]
    hint = None
    if "_exiftool_tmp" in reason or "Temporary file" in reason:
        hint = f"an interrupted ExifTool left {shown}_exiftool_tmp: delete it when no ExifTool runs, then retry"
    return SidecarWriteError(f"cannot {doing} {shown}: ExifTool says {reason}", hint=hint, path=str(shown),
                             reason=reason)  # fmt: skip


__all__ = [
    "INSTALL_HINT",
    "SIDECAR_STYLES",
    "SidecarFields",
    "SidecarRecord",
    "SidecarWrite",
    "SidecarWriter",
    "existing_description",
    "read_sidecar",
    "remove_tags",
    "require_exiftool",
    "sidecar_path",
    "unchanged_since",
    "write_tags",
]
