"""The package's floors stay true: a lower floor never imports a higher one, and no module imports itself back.

Every import counts: at module level, under TYPE_CHECKING and inside functions (a cycle hidden in a function is
still a cycle). Floors, ground first (README, "Architecture"):
    0 config, log                   1 sip, media (sans-I/O cores)
    2 adapters, store               3 calls                4 apps
    5 rooms, api, cluster (edges)   6 worker, http, cli, __main__ (assembly)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gateway"
FLOORS = {
    "config": 0, "log": 0, "sources": 0, "tls": 0,
    "sip": 1, "media": 1,
    "adapters": 2, "store": 2,
    "calls": 3,
    "apps": 4,
    "rooms": 5, "api": 5, "cluster": 5,
    "worker": 6, "http": 6, "cli": 6, "__main__": 6,
}
# The sans-I/O cores see only themselves, the standard library and their own libraries.
CORES = {"sip": set(), "media": {"numpy", "webrtcvad", "pylibsrtp"}}
CORE_SHARED = {"sources"}  # floor-0 modules of the standard library only, which the cores may use too


def is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def module_name(path: Path) -> str:
    parts = ["gateway", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not is_package(target):  # a package's __init__ runs for any of its modules: not an edge
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def floor_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if module != "gateway" else "__main__"
    assert top in FLOORS, f"{module}: package {top!r} has no floor: add it to FLOORS and the README's tree"
    return top, FLOORS[top]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_higher_floor(module: str) -> None:
    top, floor = floor_of(module)
    for target in GRAPH[module]:
        other, other_floor = floor_of(target)
        assert other_floor <= floor, f"{module} (floor {floor}) imports {target} (floor {other_floor})"
        if top in CORES:
            assert other in (top, *CORE_SHARED), f"sans-I/O core {module} imports {target}"


@pytest.mark.parametrize("core", sorted(CORES))
def test_cores_use_only_the_standard_library_and_their_own_libraries(core: str) -> None:
    import sys
    allowed = set(sys.stdlib_module_names) | CORES[core] | {"gateway"}
    for path in (ROOT / core).rglob("*.py"):
        for target in imports(path):
            assert target.split(".")[0] in allowed, f"{module_name(path)} imports {target}"


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over the module graph: every component is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_a_reversed_floor() -> None:
    """The checks above could fail: a lower floor importing a higher one is caught."""
    assert "gateway.calls.call" in GRAPH["gateway.calls.ua"]
    assert floor_of("gateway.calls.ua")[1] < floor_of("gateway.apps.inroom")[1]
