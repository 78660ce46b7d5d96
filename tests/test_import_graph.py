"""The package's import graph: no cycles, dlmscope imports at the top of files, the layering DESIGN.md states.

Edges come from the source (``ast``), so the check needs no import side effects: ``a -> b`` when module ``a``
imports ``dlmscope`` module ``b`` (absolute or relative; ``from pkg import sub`` is an edge to ``pkg.sub``).
Every import counts, also inside functions, so a cycle cannot hide behind a local import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dlmscope

ROOT = Path(dlmscope.__file__).parent
#: the layers DESIGN.md fixes: these modules import nothing of the rest of dlmscope but what is listed
LEAVES = {
    "dlmscope.reference": set(),
    "dlmscope.data.noise": set(),
    "dlmscope.sae.metrics": set(),
    "dlmscope.util.atomic": set(),
    "dlmscope.backends.chunks": set(),
}
#: the one module outside dlmscope.kernels the kernels may import: a leaf (above), pure torch
KERNEL_IMPORTS_ALLOWED = {"dlmscope.backends.chunks"}
#: function-level imports of dlmscope modules that have a reason
LOCAL_IMPORTS_ALLOWED = {
    ("dlmscope.backends.triton_backend", "dlmscope.kernels"): "importing triton costs ~1 s; CPU users never need it",
    ("dlmscope.backends.chunked_backend", "dlmscope.kernels.topk_select"): "the same, and a torch-only install "
                                                                           "has no triton",
}
#: prefixes that must not import SAE code (models know nothing of SAEs; kernels nothing of dlmscope)
NO_SAE = ("dlmscope.models", "dlmscope.kernels")
SAE_MODULES = {"dlmscope.sae.topk", "dlmscope.train.trainer", "dlmscope.sae.formats"}


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
    known = set(mods)
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


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_nothing_of_dlmscope(leaf):
    _, edges = _graph()
    got = {t for t, _, _ in edges[leaf]} - LEAVES[leaf]
    assert not got, f"{leaf} must stay independent of the rest of dlmscope, but imports {sorted(got)}"


def test_layering():
    _, edges = _graph()
    bad = [f"{a} -> {t}" for a, es in edges.items() if a.startswith(NO_SAE) for t, _, _ in es
           if t in SAE_MODULES or t.startswith("dlmscope.sae.formats")]
    assert not bad, "models/kernels must know nothing of SAEs: " + ", ".join(bad)
    for prefix in ("dlmscope.kernels",):
        bad = [f"{a} -> {t}" for a, es in edges.items() if a.startswith(prefix) for t, _, _ in es
               if not t.startswith(prefix) and t not in KERNEL_IMPORTS_ALLOWED]
        assert not bad, f"{prefix} imports the rest of dlmscope: " + ", ".join(bad)
    for a in ("dlmscope.sae.topk", "dlmscope.train.trainer", "dlmscope.train.step"):
        models = [t for t, _, _ in edges[a] if t.startswith("dlmscope.models") or t == "dlmscope.data.activations"]
        assert not models, f"{a} must know no language model, imports {models}"


def test_formats_do_not_import_the_sae_module():
    _, edges = _graph()
    bad = [f"{a} -> {t}" for a, es in edges.items() if a.startswith("dlmscope.sae.formats") for t, _, _ in es
           if t == "dlmscope.sae.topk"]
    assert not bad, ", ".join(bad)


def test_modules_stay_small():
    """No module over 500 lines, except the listed ones (and why)."""
    allowed: dict[str, int] = {}  # module -> budget, with the reason in a comment
    mods = _modules()
    big = {name: len(p.read_text().splitlines()) for name, p in mods.items()}
    over = {n: c for n, c in big.items() if c > allowed.get(n, 500)}
    assert not over, f"modules over their line budget: {over}"
