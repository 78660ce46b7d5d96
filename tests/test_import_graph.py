"""The package's import graph: no cycles, dlmscope imports at the top of files, the layering docs/design.md states.

Edges come from the source (``ast``), so the check needs no import side effects: ``a -> b`` when module ``a``
imports ``dlmscope`` module ``b`` (absolute or relative; ``from pkg import sub`` is an edge to ``pkg.sub``).
Every import counts, also inside functions, so a cycle cannot hide behind a local import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import dlmscope

ROOT = Path(dlmscope.__file__).parent

#: package -> the dlmscope packages it may import (docs/design.md, "Import rules"). A package is the first name
#: under dlmscope (``dlmscope.train.step`` belongs to ``train``); the top-level modules are packages of their own.
MAY_IMPORT = {
    "util": set(),
    "reference": set(),
    "kernels": {"util"},  # util.chunks: the selection loop the Triton encoder shares with the chunked backends
    "backends": {"kernels", "util", "_C"},  # _C: the compiled C++ extension setup.py builds into the package root
    "ops": {"backends"},
    "dlmscope": {"ops", "reference"},  # the package's __init__: the public ops
    "sae": {"ops", "util"},
    "train": {"sae", "ops", "util"},
    "models": {"util"},
    "data": {"util"},  # it drives models through the adapter contract, duck-typed
    "analysis": {"models", "data", "sae", "util"},
    "interp": {"data", "util"},
    "world": {"models"},
    "jobs": {"util", "sae", "train", "models", "data", "analysis", "interp", "world"},
    "demo": {"util", "sae", "train", "models", "data", "analysis", "interp", "ops", "world", "jobs"},
    "cli": {"jobs", "demo"},
}
#: the library: what a user imports to work on their own models, which never names the toy world or a job
LIBRARY = {"util", "reference", "kernels", "backends", "ops", "dlmscope", "sae", "train", "models", "data",
           "analysis", "interp"}
#: private names imported from another module, each with its reason
PRIVATE_IMPORTS_ALLOWED = {
    ("dlmscope.backends.cpu_backend", "_C"): "the compiled C++ extension, built into the package root by setup.py",
}
#: function-level imports of dlmscope modules that have a reason
LOCAL_IMPORTS_ALLOWED = {
    ("dlmscope.backends.triton_backend", "dlmscope.kernels"): "importing triton costs ~1 s; CPU users never need it",
    ("dlmscope.backends.chunked_backend", "dlmscope.kernels.topk_select"): "the same, and a torch-only install "
                                                                           "has no triton",
}
#: at most this many modules directly under dlmscope/ (everything else lives in a subpackage by job)
MAX_TOP_LEVEL_MODULES = 8


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dlmscope"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(target module, line, at module level)`` for every import of a dlmscope module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a top-level `if`/`try` (e.g. TYPE_CHECKING) count as module level
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno, id(node) in top))
    return out


def _graph():
    mods = _modules()
    known = set(mods) | {"dlmscope._C"}
    return mods, {name: _imports(name, path, known) for name, path in mods.items()}


def test_no_import_cycles():
    mods, edges = _graph()
    graph = {a: {t for t, _, _ in es} for a, es in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dlmscope_imports_sit_at_the_top_of_files():
    _, edges = _graph()
    inner = sorted({f"{a}:{line} imports {t}" for a, es in edges.items() for t, line, top in es
                    if not top and (a, t) not in LOCAL_IMPORTS_ALLOWED})
    assert not inner, "function-level imports of dlmscope modules (move them to the top):\n" + "\n".join(inner)


def test_packages_import_only_what_the_map_allows():
    _, edges = _graph()
    bad = []
    for a, es in edges.items():
        pa = _package(a)
        allowed = MAY_IMPORT[pa] | {pa}
        for t, line, _ in es:
            pt = _package(t)
            if pt not in allowed and t.removeprefix("dlmscope.") not in allowed:
                bad.append(f"{a}:{line} imports {t} ({pa} may import {sorted(MAY_IMPORT[pa]) or 'nothing'})")
    assert not bad, "imports against docs/design.md's map:\n" + "\n".join(sorted(set(bad)))


def test_every_package_is_in_the_map():
    mods = _modules()
    assert {_package(m) for m in mods} <= set(MAY_IMPORT), sorted({_package(m) for m in mods} - set(MAY_IMPORT))


def test_the_library_never_names_the_world_a_job_or_the_cli():
    _, edges = _graph()
    bad = [f"{a}:{line} imports {t}" for a, es in edges.items() if _package(a) in LIBRARY for t, line, _ in es
           if _package(t) in {"world", "jobs", "demo", "cli"}]
    assert not bad, "\n".join(bad)


def _private_imports():
    """``(importer, line, name)`` for each ``from m import _name`` where m is another module. A private module
    (``_launch``, ``_checks``) is the shared helper of its own folder: its siblings may import it and its names."""
    mods = _modules()
    known = set(mods) | {"dlmscope._C"}
    out = []
    for name, path in mods.items():
        folder = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _resolve(name, path.name == "__init__.py", node)
            if not base.startswith("dlmscope"):
                continue
            for a in node.names:
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                leaf = target.rpartition(".")[2]
                sibling_helper = leaf.startswith("_") and target.rpartition(".")[0] == folder
                if a.name.startswith("_") and not sibling_helper:
                    out.append((name, node.lineno, a.name))
    return out


def test_no_private_name_crosses_a_module():
    bad = [f"{a}:{line} imports {name}" for a, line, name in _private_imports()
           if (a, name) not in PRIVATE_IMPORTS_ALLOWED]
    assert not bad, "private names used outside their module (give them a public home):\n" + "\n".join(bad)


def test_few_modules_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_models_and_kernels_know_no_sae():
    _, edges = _graph()
    bad = [f"{a} -> {t}" for a, es in edges.items() if _package(a) in ("models", "kernels") for t, _, _ in es
           if _package(t) in ("sae", "train")]
    assert not bad, "models/kernels must know nothing of SAEs: " + ", ".join(bad)


def test_formats_do_not_import_the_sae_module():
    _, edges = _graph()
    bad = [f"{a} -> {t}" for a, es in edges.items() if a.startswith("dlmscope.sae.formats") for t, _, _ in es
           if not t.startswith("dlmscope.sae.formats") and _package(t) == "sae"]
    assert not bad, ", ".join(bad)


def test_modules_stay_small():
    """No module over 500 lines, except the listed ones (and why)."""
    allowed: dict[str, int] = {}  # module -> budget, with the reason in a comment
    mods = _modules()
    big = {name: len(p.read_text().splitlines()) for name, p in mods.items()}
    over = {n: c for n, c in big.items() if c > allowed.get(n, 500)}
    assert not over, f"modules over their line budget: {over}"
