"""The layers of ARCHITECTURE.md, checked on the source: every import points down, nothing cycles.

The import graph is read from the code itself (ast, nothing imported), imports inside
functions included, so a lazy import cannot hide a cycle. Run it alone with
`python -m pytest tests/test_architecture.py -q`; a failure names the offending import.
"""

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgecore", "federation", "client", "server", "simulations")

# Bottom to top; a module may import its own layer and the layers below. A layer that names a
# module exactly wins over a pattern.
LAYERS = [
    ("errors", ["edgecore", "edgecore.errors"]),
    ("foundations", ["edgecore.memory", "edgecore.allocator", "edgecore.measure", "edgecore.data", "edgecore.data.*"]),
    ("tensors", ["edgecore.encoding", "edgecore.lm", "edgecore.wire"]),
    ("compression", ["edgecore.luc", "edgecore.luc.*"]),  # the verb on a model you hold, and its parts
    ("device profiles", ["edgecore.profiles", "edgecore.fleet"]),  # profiles speak LUC's Candidates
    ("training", ["edgecore.models", "edgecore.finetune", "edgecore.evaluate", "edgecore.experiment",
                  "edgecore.tuning", "edgecore.tuning.*"]),
    ("compression by name", ["edgecore.luc.pipeline", "edgecore.luc.streamed"]),  # LUC on a model named, loaded from disk
    ("scheduling", ["edgecore.schedule", "edgecore.schedule.costs", "edgecore.schedule.executor",
                    "edgecore.schedule.formats", "edgecore.schedule.guard", "edgecore.schedule.kernels",
                    "edgecore.schedule.planner", "edgecore.schedule.streaming", "edgecore.schedule.workload"]),
    ("device", ["edgecore.device_store", "edgecore.device"]),
    ("edgecore command line", ["edgecore.cli", "edgecore.schedule.cli", "edgecore.__main__"]),
    ("federation", ["federation", "federation.credentials", "federation.privacy", "federation.*"]),
    ("apps", ["client", "client.*", "server", "server.*", "server.privacy"]),
    ("simulations", ["simulations", "simulations.*"]),
]
# Command-line entry points may import lazily, to start fast; nothing else may.
LAZY_ALLOWED = ["edgecore.cli", "client.__main__", "server.__main__", "simulations.bench.__main__"]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module
    base = module.split(".")[: len(module.split(".")) - (node.level - (1 if is_package else 0))]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in the file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                target = _target(module, child, path.name == "__init__.py")
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in child.names]
            for name in dict.fromkeys(names):
                if name.split(".")[0] in PACKAGES:
                    while name not in MODULES and "." in name:
                        name = name.rsplit(".", 1)[0]
                    # Importing a.b.c runs a/b/__init__.py first: the package is imported too.
                    parts = name.split(".")
                    for package in (".".join(parts[:k]) for k in range(2, len(parts))):
                        if package in MODULES and package != module and not module.startswith(package + "."):
                            found.append((package, child.lineno, in_function))
                    found.append((name, child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    """The rank of the layer that names `module` exactly, else of the first whose pattern matches."""
    for rank, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return rank
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_architecture.py and ARCHITECTURE.md")


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_point_down():
    upward = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} ({LAYERS[_layer(target)][0]}, above {LAYERS[_layer(m)][0]})"
        for m, edges in GRAPH.items() for target, line, _ in edges if _layer(target) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_client_and_server_do_not_import_each_other():
    crossing = [f"{m} imports {t}" for m, edges in GRAPH.items() for t, _, _ in edges
                if {m.split(".")[0], t.split(".")[0]} == {"client", "server"}]
    assert not crossing, "\n".join(crossing)


def test_no_import_hides_inside_a_function():
    lazy = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} inside a function"
            for m, edges in GRAPH.items() if m not in LAZY_ALLOWED for t, line, inside in edges if inside]
    assert not lazy, "\n".join(lazy)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target, _, _ in GRAPH[module]:
            if target == module:
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [module, target]
            if target not in state and (cycle := walk(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in MODULES:
        if module not in state and (cycle := walk(module, [module])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The walk reads function-level imports too: the check cannot pass by not looking."""
    planted = tmp_path / "memory.py"
    planted.write_text("def f():\n    from edgecore import device\n")
    assert _imports("edgecore.memory", planted) == [("edgecore.device", 2, True)]
    assert _layer("edgecore.device") > _layer("edgecore.memory")
