"""Typed errors raised by the cocatk library.

Every error carries a ``hint`` that tells the user what to do next. The library never prints or exits; the command
line turns a :class:`CocatkError` into one line (``error: <message> (<hint>)``) and a non-zero exit code.

Example:
    >>> try:
    ...     raise UnknownModelError("unknown model 'x'", hint="use one of: coca-l14, coca-b32")
    ... except CocatkError as e:
    ...     print(e.one_line())
    unknown model 'x'. Fix: use one of: coca-l14, coca-b32
"""

from __future__ import annotations


class CocatkError(Exception):
    """Base class of every error a user can cause; ``hint`` says what to do about it."""

    #: Process exit code the CLI uses for this error (2 for usage errors, 1 otherwise).
    exit_code: int = 1
    default_hint: str = "run with COCATK_DEBUG=1 for the full traceback"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def one_line(self) -> str:
        """The message and its hint on one line, as the CLI prints it."""
        text = f"{self.message}. Fix: {self.hint}"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class UsageError(CocatkError):
    """A bad argument value: empty query, n < 1, unknown option value."""

    exit_code = 2
    default_hint = "see --help for the accepted values"


class ModelError(CocatkError):
    """Base class of model loading errors."""


class UnknownModelError(ModelError):
    """The model name is neither a preset, an open_clip CoCa architecture nor a config file."""

    exit_code = 2


class WeightsNotFoundError(ModelError):
    """Pretrained weights are not in the local cache and cannot be downloaded."""


class ModelConfigError(ModelError):
    """A custom model config or checkpoint is malformed or does not fit the architecture."""


class DeviceError(CocatkError):
    """The requested device (e.g. cuda) is not available."""


class ImageError(CocatkError):
    """An image file cannot be read or decoded."""


class IndexError_(CocatkError):  # noqa: N801 - avoids shadowing the builtin IndexError
    """Base class of index errors."""


class IndexNotFoundError(IndexError_):
    """No index exists at the given folder."""


class IndexBusyError(IndexError_):
    """Another process is writing to the index."""


class IndexMismatchError(IndexError_):
    """The index was built with another model, embedding dim or schema."""


class IndexCorruptError(IndexError_):
    """The index files are inconsistent or unreadable."""


class IndexReadOnlyError(IndexError_):
    """The index folder (or its SQLite file) cannot be written by this user: a writer cannot run there."""


class EmptyIndexError(IndexError_):
    """The index holds no images yet."""


class DatasetError(CocatkError):
    """A benchmark or evaluation dataset is missing or malformed."""


class MissingDependencyError(CocatkError):
    """An optional dependency is not installed (FAISS comes with the ``cpu`` or ``cuda12`` extra)."""

    default_hint = "pip install 'cocatk[cpu]' (CPU) or 'cocatk[cuda12]' (NVIDIA GPU, CUDA 12)"


__all__ = [
    "CocatkError",
    "DatasetError",
    "DeviceError",
    "EmptyIndexError",
    "ImageError",
    "IndexBusyError",
    "IndexCorruptError",
    "IndexError_",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexReadOnlyError",
    "MissingDependencyError",
    "ModelConfigError",
    "ModelError",
    "UnknownModelError",
    "UsageError",
    "WeightsNotFoundError",
]


class DecoderRequiredError(UsageError):
    """A feature needs CoCa's multimodal decoder (rerank, captions, likelihood) and the model is a dual encoder."""


class RerankerError(ModelError):
    """A rerank model (BLIP-ITM) cannot be loaded: extra not installed, weights or tokenizer not cached."""


class ExportError(ModelError):
    """A model part could not be exported (to ONNX) faithfully, or the export could not be written."""


class ExportMismatchError(ExportError):
    """An export that does not reproduce the model (other token ids, embeddings too far from torch's)."""


class ExportUnreadableError(ExportError):
    """An export's files cannot be loaded (truncated, edited, written by an incompatible version)."""


class SidecarError(CocatkError):
    """XMP sidecars cannot be handled at all: ExifTool (or PyExifTool, which drives it) is missing or broken."""

    default_hint = (
        "apt-get install libimage-exiftool-perl (Debian/Ubuntu), brew install exiftool (macOS), then pip install "
        "PyExifTool"
    )


class SidecarWriteError(SidecarError):
    """One sidecar cannot be written (read-only folder or file, permission denied, unreadable XMP): skip that image.

    ``path`` is the sidecar, ``reason`` why it failed (the operating system's or ExifTool's own words).
    """

    default_hint = "make the folder and the sidecar writable (chmod u+w), or leave this image out"

    def __init__(self, message: str, hint: str | None = None, *, path: str = "", reason: str = "") -> None:
        super().__init__(message, hint)
        self.path = path
        self.reason = reason
