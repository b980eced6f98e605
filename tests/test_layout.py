"""The layout rules of ARCHITECTURE.md and the structure issue, checked on the source itself:
no import cycle between modules, no module over 350 lines, dynet/ imports only torch/einops and the
standard library, nothing under dynet/ or dyntrain/ imports launch/, bench/ or tests/, and the
production code reads no test-only environment variable."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 350


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg in ("dynet", "dyntrain"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _imports(name: str, path: Path, is_pkg: bool, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    package = name if is_pkg else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                head = cycle[0]  # a package's __init__ re-exporting its own submodules is not a cycle
                if not all(m == head or m.startswith(head + ".") for m in cycle):
                    found.append(cycle)
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []


def test_no_import_cycle():
    mods = _modules()
    graph = {name: {t for t in _imports(name, path, is_pkg, top_level_only=True) if t in mods and t != name}
             for name, (path, is_pkg) in mods.items()}
    assert _cycles(graph) == []


def test_no_module_over_the_limit():
    long = {str(path.relative_to(ROOT)): n for path, _ in _modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_dynet_imports_only_torch_einops_and_the_standard_library():
    allowed = {"torch", "einops", "dynet", "__future__"} | set(sys.stdlib_module_names)
    bad = {}
    for name, (path, is_pkg) in _modules().items():
        if not name.startswith("dynet"):
            continue
        roots = {t.split(".")[0] for t in _imports(name, path, is_pkg, top_level_only=False)}
        if roots - allowed:
            bad[name] = sorted(roots - allowed)
    assert bad == {}


def test_the_flow_is_one_directional():
    bad = {}
    for name, (path, is_pkg) in _modules().items():
        roots = {t.split(".")[0] for t in _imports(name, path, is_pkg, top_level_only=False)}
        wrong = roots & ({"launch", "bench", "tests"} | ({"dyntrain"} if name.startswith("dynet") else set()))
        if wrong:
            bad[name] = sorted(wrong)
    assert bad == {}


@pytest.mark.parametrize("folder", ["dynet", "dyntrain", "launch"])
def test_no_test_only_environment_variable_in_production_code(folder):
    pattern = re.compile(r"DYNTRAIN_(TEST\w*|CKPT_FAULT|TRACE_DIR)")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".sh") for m in pattern.finditer(p.read_text())]
    assert hits == []
