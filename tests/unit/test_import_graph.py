"""launcher's own import graph, read from the source (imports inside functions included): no cycles, and
the login-node readers never reach the rank runtime."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "launcher"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The launcher module an imported name lives in: the longest known prefix."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the launcher modules it imports anywhere in its body. `from launcher.x import y` counts
    as an import of launcher.x.y when y is a module, else of launcher.x."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                if not t.startswith("launcher"):
                    continue
                hit = _resolve(t, modules)
                # `from launcher import __version__` names the package itself, not a cycle through it.
                if hit and hit != mod and hit != "launcher":
                    edges.add(hit)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    # The checker itself must be able to fail: a two-module loop and a three-module loop.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from launcher.config import spec\n")
    tree = ast.parse(src.read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "launcher.config" for n in ast.walk(tree))


def test_launcher_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and any(graph.values()), "the graph was not read"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among launcher's modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_login_node_readers_never_reach_the_rank_runtime():
    graph = import_graph()
    forbidden = ("launcher.rank", "launcher.model", "launcher.data.build", "launcher.data.collate")
    for top in ("launcher.ops", "launcher.rundir"):
        for mod in sorted(m for m in graph if m == top or m.startswith(top + ".")):
            bad = sorted(m for m in reachable(graph, mod) if m.startswith(forbidden))
            assert not bad, f"{mod} reaches {bad}"
