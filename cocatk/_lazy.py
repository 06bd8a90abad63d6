"""Lazy package attributes: a public name imports its module on first access, so importing a package stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` serving ``table`` (name -> module, relative like ``.models``).

    Args:
        namespace: the package's ``globals()``; a resolved name is stored there, so the next access is plain.
        table: public name -> the module that defines it (relative to the package, or absolute).

    Example:
        >>> __getattr__, __dir__ = lazy_exports(globals(), {"load_model": ".models"})   # doctest: +SKIP
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *table])

    return __getattr__, __dir__


def lazy_table(modules: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{module: names}`` -> ``{name: module}``, the table :func:`lazy_exports` serves."""
    return {name: module for module, names in modules.items() for name in names}
