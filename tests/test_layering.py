"""The package's architecture, checked on the source: imports point one way and never form a cycle.

Layers, lowest first (a module may import its own layer and any layer below it, never above):
provenance  <-  kernels  <-  models, data  <-  eval  <-  training  <-  the apps (train, synthetic).
``data`` sits beside ``models``: neither imports the other. Lazy (function-level) imports count too.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pararnn_lm"
LAYER = {"provenance": 0, "kernels": 1, "models": 2, "data": 2, "eval": 3, "training": 4, "train": 5, "synthetic": 5}
BESIDE = {frozenset({"models", "data"}), frozenset({"train", "synthetic"})}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the pararnn_lm modules it imports (every import statement, wherever it stands)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                    targets = [stem] if node.module else [f"{stem}.{a.name}" for a in node.names]
                else:
                    targets = [node.module or ""]
            else:
                continue
            graph[module].update(t for t in targets if t.split(".")[0] == "pararnn_lm")
    return graph


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert subpackages | modules <= set(LAYER), f"place {sorted((subpackages | modules) - set(LAYER))} in LAYER"


def test_no_import_points_up_or_across():
    upward = []
    for module, targets in _imports().items():
        src = _component(module)
        for target in targets:
            dst = _component(target)
            if src is None or dst is None or src == dst:
                continue
            if frozenset({src, dst}) in BESIDE or LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src]):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer to a higher one (or across):\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_modules():
    graph = _imports()
    modules = set(graph) | {t for ts in graph.values() for t in ts}

    def resolve(name: str) -> str:  # "pkg.mod.Name" -> "pkg.mod" when only the module exists
        while name not in graph and "." in name and name not in modules:
            name = name.rsplit(".", 1)[0]
        return name

    edges = {m: {resolve(t) for t in ts if resolve(t) != m} for m, ts in graph.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of its modules.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
