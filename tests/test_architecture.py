"""The package's shape, checked from its source: data flows one way (cli → training → evaluation → retrieval →
model → tasks → data → modalities/losses → config), no import circle, no oversized module or training function.

Read with ``ast`` (nothing is imported), so a lazy import inside a function counts as much as a top-level one:
an import circle is a circle even when it only closes at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "xmodal"

# Lowest first. A module may import from its own layer (never in a circle) or from a lower one, never upwards.
LAYERS = [
    ["xmodal.config", "xmodal._scalar", "xmodal.batch", "xmodal.atomic", "xmodal.progress", "xmodal.integrity",
     "xmodal.run_identity"],
    ["xmodal.modalities", "xmodal.losses", "xmodal.feature_cache", "xmodal.feature_store", "xmodal.feature_index"],
    ["xmodal.data"],
    ["xmodal.tasks"],
    ["xmodal.pair_memory"],
    ["xmodal.model", "xmodal.model_files"],
    ["xmodal.retrieval"],
    ["xmodal.evaluation"],
    ["xmodal.training"],
    ["xmodal.cli", "xmodal.engine", "xmodal"],
]
MAX_MODULE_LINES = 450
MAX_TRAINING_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The xmodal modules ``name`` imports (``from . import x`` resolves to the submodule x when there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "xmodal"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "xmodal":
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out |= subs if subs and len(subs) == len(node.names) else subs | {target}
    return {m for m in out if m != name}


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of tests/test_architecture.py"
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: {m for m in _imports(name, path, known) if m in known or m.rpartition(".")[0] in known}
            for name, path in mods.items()}


def test_no_import_from_a_higher_layer(graph):
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, deps in graph.items() for b in sorted(deps) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            comps.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its own submodules is not a circle of concepts
    circles = [sorted(c) for c in comps if len(c) > 1
               and not all(m == min(c, key=len) or m.startswith(min(c, key=len) + ".") for m in c)]
    assert not circles, circles


def test_graph_sees_known_edges(graph):
    """The checker itself: edges that exist must be found (relative, lazy and package imports alike)."""
    assert "xmodal.config" in graph["xmodal.model"]
    assert "xmodal.model" in graph["xmodal.training.engine"]
    assert any(m.startswith("xmodal.training") for m in graph["xmodal.cli"] | {
        d for sub, deps in graph.items() if sub.startswith("xmodal.cli.") for d in deps})


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines (split it: one concept per module)"


def test_training_functions_fit_on_a_screen():
    long = []
    for path in sorted((PKG / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_TRAINING_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_parser_registry_and_manifest_reader_stay_import_light():
    """`xmodal --help`, the modality registry and the manifest reader import no deep-learning stack (seconds each):
    the built-in modalities are declared with builders named "module:function", imported when a tower is built."""
    import subprocess
    import sys

    code = ("import sys, xmodal.cli, xmodal.data, xmodal.modalities as m; xmodal.cli.build_parser(); "
            "assert m.modality_names()[:3] == ['image', 'text', 'audio']; "
            "print(sorted(x for x in ('torch', 'open_clip', 'timm', 'transformers', 'faiss') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_module_is_in_the_architecture_doc():
    """docs/architecture.md names every module: by its path, or by its file name in its package's row."""
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or path.name.startswith("_"):
            continue
        rel = path.relative_to(PKG.parent).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        if rel not in doc and not (folder in doc and path.name in doc):
            missing.append(rel)
    assert not missing, "modules docs/architecture.md does not name: " + ", ".join(missing)
