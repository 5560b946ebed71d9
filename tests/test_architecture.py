"""The house: imports run one way through the layers of ``tvlens/_layers.py``, with no circle, and no
function is longer than a screen. Read from the code with ``ast`` (no import of tvlens needed), counting
imports inside functions: they are dependencies all the same, they only hide the arrow from Python."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tvlens._layers import LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tvlens"
MAX_LINES = 80
# the justified exceptions to MAX_LINES (at most three), each with its reason
LONG_OK: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The tvlens module an imported dotted name lands in (a submodule, else its closest package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


# modules that import by a computed name, and why (anything else must import by a name the test can read)
DYNAMIC_OK = {
    "tvlens": "the lazy facade: a public name imports the module _LAZY names for it",
    "tvlens.plotting": "loads tvlens.views once so that the views register their drawings (a plugin entry point)",
    "tvlens.cli": "--import: the user's own module that registers a task family",
}


def _dynamic_import(node: ast.AST) -> str | bool | None:
    """For a call of ``__import__`` / ``importlib.import_module``: its module name when it is a literal, True
    when it is computed; None for any other node."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    if name not in ("__import__", "import_module"):
        return None
    arg = node.args[0] if node.args else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else True


def imports_of(module: str) -> dict[str, int]:
    """``{imported tvlens module: first line}`` for every import in ``module``, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target and target != module:
            out.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        name = _dynamic_import(node)
        if isinstance(name, str) and (name == "tvlens" or name.startswith("tvlens.")):
            add(_resolve(name), node.lineno)  # __import__("tvlens.x") / import_module("tvlens.x"): an arrow too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tvlens" or alias.name.startswith("tvlens."):
                    add(_resolve(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if base != "tvlens" and not base.startswith("tvlens."):
                continue
            for alias in node.names:  # `from tvlens import tasks` imports the submodule tvlens.tasks
                full = f"{base}.{alias.name}"
                add(full if full in MODULES else _resolve(base), node.lineno)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_code():
    # an honest reader: the known arrows are found, including function-level and relative-free forms
    assert "tvlens.backends" in GRAPH["tvlens.backends.loading"]  # `from tvlens.backends import ...` in functions
    assert "tvlens.tasks" in GRAPH["tvlens.models"]  # `from tvlens import tasks as _tasks`
    assert "tvlens.positions" in GRAPH["tvlens.circuits.scoring"]
    assert "tvlens.encoding.td" in GRAPH["tvlens.encoding.emergence"]
    assert len(MODULES) > 50


def test_no_hidden_imports():
    computed = sorted(f"{m}:{node.lineno}" for m, path in MODULES.items() if m not in DYNAMIC_OK
                      for node in ast.walk(ast.parse(path.read_text())) if _dynamic_import(node) is True)
    assert not computed, f"imports by a computed name hide an arrow from this test: {computed}"
    assert "tvlens.train" in GRAPH["tvlens.cli"]  # a literal __import__("tvlens.train") is an arrow


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"modules in no layer of tvlens/_layers.py: {missing}; add each where it belongs"


def test_no_import_circles():
    circles = _cycles()
    assert not circles, "import circles (counting imports inside functions):\n" + "\n".join(map(str, circles))


def test_imports_only_go_down():
    upward = []
    for module, targets in sorted(GRAPH.items()):
        for target, line in sorted(targets.items()):
            lo, hi = layer_of(module), layer_of(target)
            if lo is not None and hi is not None and hi > lo:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} ({LAYERS[lo][0]}) imports "
                              f"{target} ({LAYERS[hi][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_layers_are_listed_in_the_package_docstring_and_the_readme():
    import tvlens

    for where, text in (("tvlens/__init__.py", tvlens.__doc__ or ""), ("README.md", (ROOT / "README.md").read_text())):
        lines = [line.strip() for line in text.splitlines()]
        found = []
        for name, modules in LAYERS:
            row = next((i for i, line in enumerate(lines) if line.startswith(f"{name}:")), None)
            assert row is not None, f"{where}: no line for the layer {name!r}"
            words = set(re.findall(r"[A-Za-z_]+", lines[row].split("(")[0]))
            short = {m.removeprefix("tvlens.") for m in modules}
            assert short <= words, f"{where}: layer {name!r} must name {sorted(short)}, its line is {lines[row]!r}"
            found.append(row)
        assert found == sorted(found), f"{where}: the layers must be listed bottom to top, as tvlens/_layers.py"


def _functions():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{module}.{node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen():
    assert len(LONG_OK) <= 3 and all(reason.strip() for reason in LONG_OK.values())
    long = sorted(f"{name}: {n} lines" for name, n in _functions() if n > MAX_LINES and name not in LONG_OK)
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(long)
