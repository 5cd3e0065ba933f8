"""Code-shape numbers of a checkout: lines per package, the longest functions, the import graph's
cycles (function-local imports included), README lines. python scripts/code_stats.py [ROOT]"""
from __future__ import annotations
import ast, sys
from pathlib import Path

PACKAGES = {"shared": "genfl_shared", "genfl_server": "genfl_server", "genfl_client": "genfl_client",
            "genfl_experiments": "genfl_experiments"}

def modules(root: Path):
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            if "proto" in path.parts and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path, package

def imports(name: str, tree: ast.AST, is_package: bool, known: set[str]):
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                prefix = base[:len(base) - node.level + 1]
                mod = ".".join(prefix + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                yield t

def main(root: Path):
    mods = list(modules(root))
    known = {m for m, _, _ in mods}
    graph, lines, funcs = {}, {}, []
    for name, path, package in mods:
        text = path.read_text()
        tree = ast.parse(text)
        lines[package] = lines.get(package, 0) + len(text.splitlines())
        graph[name] = set(imports(name, tree, path.name == "__init__.py", known))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    print("lines per package:", ", ".join(f"{p} {n}" for p, n in lines.items()), f"(total {sum(lines.values())})")
    print("15 longest functions:")
    for n, where in sorted(funcs, reverse=True)[:15]:
        print(f"  {n:4d} {where}")
    # package __init__ edges are not cycles of interest: drop edges into a package's own __init__
    sccs, index, low, stack, on, counter = [], {}, {}, [], set(), [0]
    sys.setrecursionlimit(10000)
    def strong(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: sccs.append(sorted(comp))
    for v in graph:
        if v not in index: strong(v)
    edges = sum(len(t) for t in graph.values())
    print(f"import graph: {len(graph)} modules, {edges} edges, cycles (strongly connected groups): {len(sccs)}")
    for c in sccs:
        print("  cycle:", " <-> ".join(c))
    readme = root / "README.md"
    print("README lines:", len(readme.read_text().splitlines()))

if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
