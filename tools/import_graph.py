"""Count moeinfer's internal imports by package: cycles, upward imports (against the floors of the
import-linter contract in pyproject.toml, which docs/architecture.md draws), function-level imports.
Run: `python tools/import_graph.py [--list]`.

Reads the source with `ast` (imports nothing), so it works on a broken tree too.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "moeinfer"

def read_floors() -> tuple[list[list[str]], set[str]]:
    """The floors of the import-linter `layers` contract in pyproject.toml (the one source of the
    layering; docs/architecture.md draws the same), lowest first, and the packages that must not
    import their floor's other members (`a | b` in the contract)."""
    with open(ROOT.parent / "pyproject.toml", "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    floors, independent = [], set()
    for layer in reversed(layers):
        members = [m.strip().removeprefix("moeinfer.") for m in layer.split("|")]
        floors.append(members)
        if len(members) > 1:
            independent |= set(members)
    return floors, independent


FLOORS, INDEPENDENT = read_floors()


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported moeinfer module, line, inside a function, under TYPE_CHECKING) for every import."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node: ast.AST, in_func: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("moeinfer"):
                        out.append((a.name, child.lineno, in_func, typing_only))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = me.split(".") if is_pkg else me.split(".")[:-1]
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.startswith("moeinfer"):
                    for a in child.names:
                        sub = f"{mod}.{a.name}"
                        target = sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() \
                            or (ROOT.parent / sub.replace(".", "/")).is_dir() else mod
                        out.append((target, child.lineno, in_func, typing_only))
            visit(child, func, tc)

    visit(tree, False, False)
    return out


def floor_of(pkg: str) -> int | None:
    for i, members in enumerate(FLOORS):
        if pkg in members:
            return i
    return None


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--list", action="store_true", help="list every upward and function-level import")
    args = ap.parse_args()
    edges = []  # (src module, src package, dst module, dst package, line, in_func, typing)
    for path in sorted(ROOT.rglob("*.py")):
        src = module_name(path)
        for dst, line, in_func, typing_only in imports(path):
            edges.append((src, package_of(src), dst, package_of(dst), line, in_func, typing_only, path))
    internal = [e for e in edges if not e[6]]
    graph: dict[str, set[str]] = defaultdict(set)
    for s, sp, d, dp, *_ in internal:
        if sp != dp and sp != "__init__" and dp != "__init__":
            graph[sp].add(dp)
    cycles = sccs(graph)
    # two-package cycles, named
    pairs = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    upward = []
    for e in internal:
        s, sp, d, dp = e[:4]
        if sp == dp or sp in ("__init__", "__main__") or dp == "__init__":
            continue  # the package root and `python -m moeinfer` sit above every floor
        fs, fd = floor_of(sp), floor_of(dp)
        if fs is None or fd is None:
            upward.append((e, "unplaced"))
        elif fd > fs or (fd == fs and sp in INDEPENDENT):
            upward.append((e, "up" if fd > fs else "sideways"))
    func = [e for e in internal if e[5]]
    stmts = {(e[7], e[4]) for e in internal}
    func_stmts = {(e[7], e[4]) for e in func}
    print(f"internal import statements: {len(stmts)} (inside functions: {len(func_stmts)}; "
          f"TYPE_CHECKING-only: {len({(e[7], e[4]) for e in edges if e[6]})}); imported names: {len(internal)}")
    print("package graph:")
    for a in sorted(graph):
        print(f"    {a} -> {', '.join(sorted(graph[a]))}")
    print(f"package-level cycles (strongly connected sets): {len(cycles)}")
    for c in cycles:
        print("   ", " <-> ".join(c))
    print(f"two-package cycles: {len(pairs)}: " + ", ".join(f"{a}<->{b}" for a, b in pairs))
    print(f"upward/sideways imports (module-level or in functions): {len(upward)}")
    if args.list:
        for e, why in upward:
            print(f"    {why:9s} {e[0]} -> {e[2]}  ({e[7].relative_to(ROOT.parent)}:{e[4]}"
                  f"{', in function' if e[5] else ''})")
        print("function-level imports:")
        seen = set()
        for e in func:
            if (e[7], e[4]) not in seen:
                seen.add((e[7], e[4]))
                print(f"    {e[7].relative_to(ROOT.parent)}:{e[4]} -> {e[2]}")


if __name__ == "__main__":
    main()
