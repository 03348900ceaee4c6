"""Count the package's floor plan from its source (ast, nothing imported): top-level modules and
packages, import circles, imports that run back up the layering, and imports made inside functions.

    python benchmarks/layout.py [--src src/scan]      # prints JSON

The layering (bottom first) is LAYERS below; tests/test_layering.py enforces it with the same
functions. A module may import its own layer and those below; `scan/__init__.py`, `__main__.py`
sit on top of everything.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

# each entry is a top-level module or package of scan; each may import only entries at or before it
LAYERS = ("core", "config", "data", "nets", "algo", "pretext", "train", "rundir", "pipeline", "use", "report", "cli")
TOP = ("__init__", "__main__")


def module_names(src: Path) -> dict[str, Path]:
    """{'scan.core.errors': path, 'scan.pipeline': path of its __init__.py, ...}."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import statements under `if TYPE_CHECKING:` (never run: no import at all)."""
    skipped = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for inner in ast.walk(node)}
    return skipped


def imports(src: Path) -> list[tuple[str, str, int, bool]]:
    """(importing module, imported scan module, line, at module level) for every `import` of scan that
    runs, one per statement and imported module."""
    names = module_names(src)
    found = set()
    for module, path in names.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        skipped = _type_checking_only(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == "scan" or not target.startswith("scan."):
                    continue
                while target not in names and "." in target:
                    target = target.rpartition(".")[0]
                found.add((module, target, node.lineno, id(node) in top))
    return sorted(found)


def entry(module: str) -> str:
    """The top-level entry of a dotted module name: scan.pipeline.stages.mine -> pipeline."""
    return module.split(".")[1] if "." in module else "__init__"


def runs_back_up(importer: str, imported: str) -> bool:
    a, b = entry(importer), entry(imported)
    if a in TOP:
        return False
    return LAYERS.index(b) > LAYERS.index(a)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def layout(src: Path) -> dict:
    found = imports(src)
    module_edges: dict[str, set[str]] = {}
    entry_edges: dict[str, set[str]] = {}
    for a, b, _, _ in found:
        module_edges.setdefault(a, set()).add(b)
        if entry(a) != entry(b) and entry(a) not in TOP:
            entry_edges.setdefault(entry(a), set()).add(entry(b))
    top_level = sorted({entry(m) for m in module_names(src)} - {"__init__"})
    back_up = [f"{a}:{line} imports {b}" for a, b, line, _ in found if runs_back_up(a, b)]
    in_functions = [f"{a}:{line} imports {b}" for a, b, line, top in found if not top]
    return {"top_level": len(top_level), "top_level_names": top_level,
            "module_circles": circles(module_edges), "package_circles": circles(entry_edges),
            "imports_back_up": len(back_up), "back_up": back_up,
            "function_level_imports": len(in_functions), "function_level": in_functions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src" / "scan"))
    args = parser.parse_args(argv)
    print(json.dumps(layout(Path(args.src)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
