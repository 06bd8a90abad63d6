"""`cocatk serve`: a thin HTTP edge (FastAPI) over the same library functions as the command line.

Import :func:`create_app` from :mod:`cocatk.server.app`; FastAPI is imported there, never by ``cocatk --help``.

Example:
    >>> from cocatk.server.app import ServeSettings, create_app      # doctest: +SKIP
    >>> app = create_app(ServeSettings(index_dir="~/.local/share/cocatk/index"))   # doctest: +SKIP
"""

from __future__ import annotations

__all__: list[str] = []
