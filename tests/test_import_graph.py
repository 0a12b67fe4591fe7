"""The house rules of the package layout, read from the source (ast, no imports run):

* every import points one way, from a stage to an earlier one (the order below), and no cycle
  exists among ``tilesegment`` modules, counting imports inside functions too (only those under
  ``if TYPE_CHECKING:`` never run and do not count);
* no module imports another module's ``_private`` name;
* no module is over 600 lines, no function over 60 lines of code (docstring, comments and blank
  lines not counted) unless a ``# long: <reason>`` comment states why.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tilesegment"

#: The stages in data-flow order; a module may import its own stage and earlier ones.
STAGES = (
    "tilesegment",  # the package root: __version__ only
    "tilesegment.errors",
    "tilesegment.machine",  # usable cores and memory: stdlib only
    "tilesegment.geometry",
    "tilesegment.instances",
    "tilesegment.io",
    "tilesegment.tissue",
    "tilesegment.model",
    "tilesegment.store",
    "tilesegment.infer.capacity",
    "tilesegment.infer.options",
    "tilesegment.infer.identity",
    "tilesegment.infer.devices",
    "tilesegment.infer.source",
    "tilesegment.infer.plan",
    "tilesegment.infer.predict",
    "tilesegment.infer.stream",
    "tilesegment.infer.record",
    "tilesegment.infer.executors",
    "tilesegment.infer.report",
    "tilesegment.infer.preview",
    "tilesegment.infer.run",
    "tilesegment.infer",
    "tilesegment.postprocess",
    "tilesegment.dask",
    "tilesegment.train",
    "tilesegment.cli",
    "tilesegment.testing",
    "tilesegment.__main__",
)

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    name: str | None
    line: int


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(mods: dict[str, Path]) -> list[Import]:
    """Every import of a tilesegment module by a tilesegment module, wherever it stands."""
    found = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found += [
                    Import(mod, a.name, None, node.lineno)
                    for a in node.names
                    if a.name.split(".")[0] == "tilesegment"
                ]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != "tilesegment":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # `from pkg import module`
                        found.append(Import(mod, sub, None, node.lineno))
                    else:
                        found.append(Import(mod, target, a.name, node.lineno))
    return found


def cycles(mods: dict[str, Path], edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if e.target in mods and e.target != e.source:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in mods:
        if v not in index:
            visit(v)
    return found


def stage(mod: str) -> int:
    matches = [i for i, s in enumerate(STAGES) if mod == s or mod.startswith(s + ".")]
    return max(matches, key=lambda i: len(STAGES[i]))


def code_lines(func: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    body = func.body
    first = body[0]
    doc = set()
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        doc = set(range(first.lineno, first.end_lineno + 1))
    count = 0
    for number in range(first.lineno, func.end_lineno + 1):
        text = lines[number - 1].strip()
        if number not in doc and text and not text.startswith("#"):
            count += 1
    return count


MODULES = modules()
EDGES = imports(MODULES)


def test_the_scan_sees_the_package():
    assert {"tilesegment.infer.run", "tilesegment.store.layout", "tilesegment.cli"} <= set(MODULES)
    assert any(e.source == "tilesegment.infer.run" and e.target == "tilesegment.infer.plan"
               for e in EDGES)  # fmt: skip


def test_no_import_cycle_among_tilesegment_modules():
    assert cycles(MODULES, EDGES) == []


def test_no_module_imports_another_modules_private_name():
    private = [
        f"{e.source}:{e.line} imports {e.name} from {e.target}"
        for e in EDGES
        if e.name is not None
        and e.name.startswith("_")
        and not e.name.startswith("__")
        and e.target != e.source
    ]
    assert private == []


def test_imports_point_from_a_stage_to_an_earlier_one():
    backwards = [
        f"{e.source}:{e.line} imports {e.target} (a later stage)"
        for e in EDGES
        if e.target in MODULES and stage(e.target) > stage(e.source)
    ]
    assert backwards == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_modules_and_functions_stay_small(mod):
    path = MODULES[mod]
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path} has {len(lines)} lines"
    long = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = code_lines(node, lines)
            reason = any("# long:" in lines[i] for i in range(node.lineno - 2, node.lineno))
            if n > MAX_FUNCTION_LINES and not reason:
                long.append(f"{node.name} (line {node.lineno}): {n} lines of code")
    assert long == [], f"{path}: {long}"


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The rules above fail on a package that breaks them."""
    pkg = tmp_path / "tilesegment"
    (pkg / "infer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "__init__.py").write_text("")
    (pkg / "store.py").write_text("def f():\n    from tilesegment.infer.run import _x\n")
    (pkg / "infer" / "run.py").write_text("from tilesegment import store\n_x = 1\n")
    mods = modules(pkg)
    edges = imports(mods)
    assert cycles(mods, edges) == [["tilesegment.infer.run", "tilesegment.store"]]
    assert [e.name for e in edges if e.name and e.name.startswith("_")] == ["_x"]
    assert stage("tilesegment.infer.run") > stage("tilesegment.store")  # store -> run is backwards
