"""The layer map of docs/architecture.md, checked: every import (module level, inside functions, under
``TYPE_CHECKING``) points down or sideways within its layer, no two modules import each other through any path, no
file is over 700 lines, no module imports another's private name, and both runtimes answer the query interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cocatk

PACKAGE = Path(cocatk.__file__).parent
DOC = PACKAGE.parent / "docs" / "architecture.md"

#: Layers from the bottom up: a module may import its own layer and those below (docs/architecture.md). The longest
#: matching prefix places a module.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("cocatk", "cocatk._version", "cocatk._lazy", "cocatk._imports", "cocatk.errors", "cocatk.config",
                    "cocatk.paths")),
    ("inputs", ("cocatk.images", "cocatk.preprocess", "cocatk.sources", "cocatk.sidecars")),
    ("models", ("cocatk.models", "cocatk.captioning")),
    ("zero-shot", ("cocatk.zeroshot",)),
    ("index layer", ("cocatk.retrieval.layout", "cocatk.retrieval.migrations", "cocatk.retrieval.store",
                     "cocatk.retrieval.sourcestore", "cocatk.retrieval.tagstore", "cocatk.retrieval.vectors",
                     "cocatk.retrieval.budget",
                     "cocatk.retrieval.folder")),
    ("features", ("cocatk.retrieval",)),
    ("facade", ("cocatk.retrieval.index",)),
    ("applications", ("cocatk.evaluation", "cocatk.recaption", "cocatk.demo")),
    ("edges", ("cocatk.server", "cocatk.cli", "cocatk.__main__")),
)  # fmt: skip
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every cocatk module each module imports, wherever the import statement sits (as
    ``../shared/tools/import_cycles.py`` counts them: ``from . import x`` is the submodule x when there is one)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def layer_of(module: str) -> int:
    best, where = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    return where


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer_and_the_doc_names_each_layer() -> None:
    modules = _modules()
    assert not [m for m in modules if layer_of(m) < 0]
    text = DOC.read_text()
    missing = [name for name, _ in LAYERS if name not in text]
    assert not missing, f"docs/architecture.md does not describe the layers {missing}"


def test_imports_point_down_the_layers() -> None:
    edges = _imports(_modules())
    upward = sorted(
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in edges.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )
    assert not upward, "\n".join(upward)


def test_no_import_circle_lazy_and_type_only_imports_included() -> None:
    assert _circles(_imports(_modules())) == []


def test_the_check_can_fail() -> None:
    """The two checks above on a made-up graph: an upward arrow and a circle are found."""
    folder, search, index = (layer_of(f"cocatk.retrieval.{m}") for m in ("folder", "search", "index"))
    assert folder < search < index
    assert layer_of("cocatk.models.onnx.text") == layer_of("cocatk.models")
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, long


def test_index_facade_stays_thin() -> None:
    assert len((PACKAGE / "retrieval" / "index.py").read_text().splitlines()) <= 450


def test_no_module_imports_another_modules_private_name() -> None:
    found = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("cocatk")):
                found += [f"{mod}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not found, found


def test_features_use_the_index_layer_not_the_facade() -> None:
    """The features take an IndexFolder; only the facade, the edges and the applications name Index."""
    edges = _imports(_modules())
    features = [m for m in edges if layer_of(m) == [n for n, _ in LAYERS].index("features")]
    assert features
    assert not [m for m in features if "cocatk.retrieval.index" in edges[m]]


def test_both_runtimes_answer_the_query_interface(tmp_path, monkeypatch) -> None:
    """The torch model and the exported ONNX towers are both a :class:`cocatk.models.base.QueryModel`."""
    pytest.importorskip("onnxruntime")
    from cocatk import load_model
    from cocatk.models import onnx
    from cocatk.models.base import QueryModel

    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "cache"))
    model = load_model("demo", device="cpu")
    assert isinstance(model, QueryModel)
    assert onnx.export_text_onnx(model) is not None
    engine = onnx.open_text_onnx(model.spec.identity())
    assert isinstance(engine, QueryModel)
    assert (model.backend, engine.backend) == ("torch", "onnxruntime")
    assert engine.embed_dim == model.embed_dim and engine.has_decoder == model.has_decoder
