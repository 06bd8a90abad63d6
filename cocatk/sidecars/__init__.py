"""XMP sidecars beside images, written and merged by ExifTool (through PyExifTool): keywords, hierarchical keywords
and a caption that digiKam, darktable, Lightroom, immich and PhotoPrism read, undone exactly (docs/sidecars.md).

Nothing here imports PyExifTool until a sidecar is read or written.
"""

from __future__ import annotations

from ..errors import SidecarError, SidecarWriteError
from .xmp import (
    INSTALL_HINT,
    SIDECAR_STYLES,
    SidecarFields,
    SidecarRecord,
    SidecarWrite,
    SidecarWriter,
    existing_description,
    read_sidecar,
    remove_tags,
    require_exiftool,
    sidecar_path,
    unchanged_since,
    write_tags,
)

__all__ = [
    "INSTALL_HINT",
    "SIDECAR_STYLES",
    "SidecarError",
    "SidecarFields",
    "SidecarRecord",
    "SidecarWrite",
    "SidecarWriteError",
    "SidecarWriter",
    "existing_description",
    "read_sidecar",
    "remove_tags",
    "require_exiftool",
    "sidecar_path",
    "unchanged_since",
    "write_tags",
]
