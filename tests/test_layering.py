"""The import rules between GenFL's packages, checked on the source (every import statement,
those inside functions and ``if TYPE_CHECKING`` blocks included, as each is a dependency):

* no import cycle between modules;
* the core (``genfl_shared``) and the clients (``genfl_client``) never import ``genfl_server``;
* ``genfl_server`` never imports ``genfl_experiments``;
* in ``genfl_server`` gRPC is the business of its adapter (``SERVER_GRPC_ADAPTER``) and of the
  modules that wire the adapter to the rest (``SERVER_WIRING``); the round, the coordinator, the
  guard and the stream bounds reach no gRPC module, directly or not;
* the core imports nothing of the other three packages;
* the core imports neither gRPC nor click, directly or through another GenFL module, except the
  modules named in ``CORE_FRONTIERS`` (the core's own command-line and gRPC edges), which no other
  core module imports.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml, [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"shared": "genfl_shared", "genfl_server": "genfl_server", "genfl_client": "genfl_client",
                "genfl_experiments": "genfl_experiments"}
CORE = "genfl_shared"
GRPC_OR_CLICK = frozenset({"grpc", "grpc_health", "grpc_tools", "click"})
# The core modules that may import gRPC or click, and that no other core module may import:
CORE_FRONTIERS = {
    "genfl_shared.cli": "click options and logging set-up the commands share",
    "genfl_shared.cli_settings": "the run settings as click options",
    "genfl_shared.partition_cli": "the genfl-partition command",
    "genfl_shared.protogen": "generates the stubs with grpc_tools",
    "genfl_shared.security": "builds gRPC channel and server credentials",
    "genfl_shared.proto.genfl_pb2_grpc": "the generated gRPC stubs",
}
GRPC = frozenset({"grpc", "grpc_health"})
# The server's modules that speak gRPC, and those that start the server with them.
SERVER_GRPC_ADAPTER = {
    "genfl_server.service": "the servicer: RPCs to coordinator calls, refusals to statuses",
    "genfl_server.status_codes": "each refusal's status code",
    "genfl_server.transport": "the aio server on its event-loop thread",
}
SERVER_WIRING = {"genfl_server.app", "genfl_server.cli", "genfl_server.security"}


@dataclass
class ModuleGraph:
    """Project modules, the project modules each imports, and the outside top-level packages each imports."""

    imports: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)

    def add(self, module: str, imported: set[str] = (), external: set[str] = ()) -> None:
        self.imports.setdefault(module, set()).update(imported)
        self.external.setdefault(module, set()).update(external)

    def reachable(self, start: str) -> set[str]:
        """``start`` and every project module it imports, directly or not."""
        seen, stack = {start}, [start]
        while stack:
            for target in self.imports.get(stack.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    """The importable name of a source file under ``root`` (``shared/codec.py`` -> ``genfl_shared.codec``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts[0] = PACKAGE_DIRS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every name ``tree`` imports, absolute, as ``module`` sees it: for ``from X import y`` both
    ``X`` and ``X.y`` (y may be a submodule; the caller keeps the names that are modules)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def project_graph(root: Path = REPO_ROOT) -> ModuleGraph:
    """The import graph of every module of the four packages under ``root``."""
    sources = {module_name(path, root): path for folder in PACKAGE_DIRS
               for path in sorted((root / folder).rglob("*.py"))}
    graph = ModuleGraph()
    for module, path in sources.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        internal, external = set(), set()
        for name in names:
            top = name.partition(".")[0]
            if top in PACKAGE_DIRS.values():
                # The longest prefix that is a module: "genfl_shared.codec.Payload" -> genfl_shared.codec.
                parts = name.split(".")
                while ".".join(parts) not in sources:
                    parts.pop()
                target = ".".join(parts)
                if target != module:
                    internal.add(target)
            else:
                external.add(top)
        graph.add(module, internal, external)
    return graph


def find_cycle(imports: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, str] = {}  # module -> "open" (on the current path) or "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(imports.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(imports):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def forbidden_imports(graph: ModuleGraph, importer_prefixes: tuple[str, ...], imported_prefix: str) -> list[str]:
    """"a -> b" for each module a under one of ``importer_prefixes`` that imports b under ``imported_prefix``."""
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")
    return sorted(f"{module} -> {target}" for module, targets in graph.imports.items()
                  if any(under(module, prefix) for prefix in importer_prefixes)
                  for target in targets if under(target, imported_prefix))


def core_leaks(graph: ModuleGraph) -> list[str]:
    """What brings gRPC or click into a core module outside CORE_FRONTIERS: the module itself, or a
    project module it imports, directly or not (not looking past a frontier)."""
    problems = []
    for module in sorted(graph.imports):
        if not (module == CORE or module.startswith(CORE + ".")) or module in CORE_FRONTIERS:
            continue
        seen, stack = {module}, [module]
        while stack:
            importer = stack.pop()
            problems += [f"{module}: {importer} imports {name}"
                         for name in sorted(graph.external[importer] & GRPC_OR_CLICK)]
            for target in sorted(graph.imports[importer] - seen):
                seen.add(target)
                if target in CORE_FRONTIERS:
                    problems.append(f"{module}: {importer} imports {target} ({CORE_FRONTIERS[target]})")
                else:
                    stack.append(target)
    return sorted(problems)


def server_grpc_leaks(graph: ModuleGraph) -> list[str]:
    """"module: importer imports grpc" for each server module outside the adapter and the wiring
    that reaches gRPC, itself or through the project modules it imports."""
    problems = []
    for module in sorted(graph.imports):
        if not module.startswith("genfl_server.") or module in SERVER_GRPC_ADAPTER.keys() | SERVER_WIRING:
            continue
        for reached in sorted(graph.reachable(module)):
            problems += [f"{module}: {reached} imports {name}" for name in sorted(graph.external[reached] & GRPC)]
    return problems


# -- the rules on the project ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> ModuleGraph:
    return project_graph()


def test_the_graph_sees_every_package(graph):
    for package in PACKAGE_DIRS.values():
        assert any(module.startswith(package + ".") for module in graph.imports), package
    assert "genfl_shared.codec" in graph.imports["genfl_server.service"]


def test_no_import_cycles(graph):
    cycle = find_cycle(graph.imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_and_clients_do_not_import_the_server(graph):
    assert forbidden_imports(graph, (CORE, "genfl_client"), "genfl_server") == []


def test_core_imports_only_the_core(graph):
    for package in ("genfl_client", "genfl_experiments"):
        assert forbidden_imports(graph, (CORE,), package) == []


def test_server_does_not_import_the_experiments(graph):
    assert forbidden_imports(graph, ("genfl_server",), "genfl_experiments") == []


def test_core_imports_neither_grpc_nor_click(graph):
    assert core_leaks(graph) == []


def test_only_the_servers_grpc_adapter_reaches_grpc(graph):
    assert server_grpc_leaks(graph) == []


def test_exceptions_are_modules(graph):
    named = set(CORE_FRONTIERS) | SERVER_GRPC_ADAPTER.keys() | SERVER_WIRING
    assert named <= set(graph.imports)


# -- the checker on small graphs it must fail ------------------------------------------------------

def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    for folder in PACKAGE_DIRS:
        write(tmp_path, f"{folder}/__init__.py", "")
    return tmp_path


def test_checker_finds_a_cycle_through_a_function_local_import(tiny_project):
    write(tiny_project, "genfl_server/a.py", "from .b import thing\n")
    write(tiny_project, "genfl_server/b.py", "def f():\n    from genfl_server import a\n")
    write(tiny_project, "genfl_server/c.py", "from . import b\n")
    graph = project_graph(tiny_project)
    assert graph.imports["genfl_server.c"] == {"genfl_server", "genfl_server.b"}
    assert find_cycle(graph.imports) == ["genfl_server.a", "genfl_server.b", "genfl_server.a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None


def test_checker_finds_forbidden_imports(tiny_project):
    write(tiny_project, "genfl_server/engine.py", "import genfl_experiments.sweep\n")
    write(tiny_project, "genfl_experiments/sweep.py", "")
    write(tiny_project, "shared/config.py", "from typing import TYPE_CHECKING\n"
                                            "if TYPE_CHECKING:\n    from genfl_server.engine import Engine\n")
    write(tiny_project, "genfl_client/runner.py", "import genfl_server.engine as engine\n")
    graph = project_graph(tiny_project)
    assert forbidden_imports(graph, (CORE, "genfl_client"), "genfl_server") == [
        "genfl_client.runner -> genfl_server.engine", "genfl_shared.config -> genfl_server.engine"]
    assert forbidden_imports(graph, ("genfl_server",), "genfl_experiments") == [
        "genfl_server.engine -> genfl_experiments.sweep"]


def test_checker_finds_grpc_in_the_server_outside_its_adapter(tiny_project):
    write(tiny_project, "genfl_server/service.py", "import grpc\nfrom . import coordinator\n")
    write(tiny_project, "genfl_server/limits.py", "import asyncio\n")
    write(tiny_project, "genfl_server/coordinator.py", "from .guard import check\n")
    write(tiny_project, "genfl_server/guard.py", "def check():\n    from grpc_health.v1 import health\n")
    assert server_grpc_leaks(project_graph(tiny_project)) == [
        "genfl_server.coordinator: genfl_server.guard imports grpc_health",
        "genfl_server.guard: genfl_server.guard imports grpc_health",
    ]


def test_checker_finds_grpc_in_the_core_directly_or_through_a_module(tiny_project):
    write(tiny_project, "shared/errors.py", "import grpc.aio\n")
    write(tiny_project, "shared/codec.py", "def frame():\n    from .cli import option\n")
    write(tiny_project, "shared/cli.py", "import click\n")
    write(tiny_project, "shared/models.py", "from genfl_shared import errors\n")
    write(tiny_project, "shared/config.py", "import click\n")  # the settings are core like any other module
    write(tiny_project, "shared/data.py", "import torch\nfrom .config import RunConfig\n")
    assert core_leaks(project_graph(tiny_project)) == [
        "genfl_shared.codec: genfl_shared.codec imports genfl_shared.cli "
        "(click options and logging set-up the commands share)",
        "genfl_shared.config: genfl_shared.config imports click",
        "genfl_shared.data: genfl_shared.config imports click",
        "genfl_shared.errors: genfl_shared.errors imports grpc",
        "genfl_shared.models: genfl_shared.errors imports grpc",
    ]
