"""The layout rules of ARCHITECTURE.md, checked on the source itself.

Every import is read, those inside functions included. The rules:
- no import cycle between modules (a package's ``__init__`` re-exporting its own submodules aside);
- the layering: a module imports its own package (concept) or a package of a lower layer, never one
  of its own layer or above (``LAYERS``);
- an import inside a function carries a ``# lazy: <reason>`` line (an optional dependency that must
  stay unloaded: the GPU image has no mlflow, webdataset, boto3 or DALI);
- no module over 350 lines; ``dynet/`` imports only torch, einops and the standard library; nothing
  under ``dynet/`` or ``dyntrain/`` imports ``launch/``, ``bench/`` or ``tests/``; the production
  code reads no test-only environment variable.
The checker itself is tried on a small package built in a temporary folder.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 350

# concept package -> layer; a module belongs to the longest prefix that names it
LAYERS = {
    "dyntrain": 0,  # the utilities: errors, logs, progress, images, seeds, devices, redaction
    "dyntrain.config": 1,
    "dyntrain.data.storage": 2.0,
    "dyntrain.data.synthetic": 2.0,
    "dyntrain.data": 2.0,
    "dyntrain.data.shards": 2.1,
    "dyntrain.data.pretrain": 2.2,
    "dyntrain.data.finetune": 2.3,
    "dyntrain.checkpoint": 2.0,
    "dyntrain.tracking": 2.0,
    "dyntrain.interop": 2.5,
    "dyntrain.restore": 3,
    "dyntrain.train": 3,
    "dyntrain.eval": 4,
    "dyntrain.routing": 5,
    "dyntrain.analysis": 5,
    "dyntrain.serving": 5.5,  # the MLflow Model: restores (3), routes (5); the jobs log it
    "dyntrain.jobs": 6,
}
UTILITIES = {"dyntrain.errors", "dyntrain.logs", "dyntrain.progress", "dyntrain.images", "dyntrain.seeds",
             "dyntrain.devices", "dyntrain.redaction"}


@dataclass(frozen=True)
class Import:
    source: str      # importing module
    target: str      # imported module (or module.name for ``from module import name``)
    line: int
    local: bool      # inside a function or class body
    reason: str      # the ``# lazy:`` text found on the line or the line above ("" if none)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def imports(name: str, path: Path, is_pkg: bool) -> list[Import]:
    """Every import statement of a module (top level, under if/try, and inside functions)."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    package = name if is_pkg else name.rsplit(".", 1)[0]
    top = set()
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(sub) for sub in ast.walk(node))
        top.add(id(node))

    def reason(lineno: int) -> str:
        """The ``# lazy:`` text on the import's line, or above the block of imports it belongs to."""
        ln = lineno - 1
        while ln >= 0:
            m = re.search(r"#\s*lazy:\s*(.+)$", lines[ln])
            if m:
                return m.group(1).strip()
            if ln < lineno - 1 and not lines[ln].strip().startswith(("import ", "from ")):
                return ""
            ln -= 1
        return ""

    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for t in targets:
            out.append(Import(name, t, node.lineno, id(node) not in top, reason(node.lineno)))
    return out


def graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    return {name: {i.target for i in imports(name, path, is_pkg) if i.target in mods and i.target != name}
            for name, (path, is_pkg) in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                head = cycle[0]  # a package's __init__ re-exporting its own submodules is not a cycle
                if not all(m == head or m.startswith(head + ".") for m in cycle):
                    found.append(cycle)
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    return found


def concept(module: str, layers: dict[str, float]) -> str:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in layers:
            return head
    return ""


def layering_violations(g: dict[str, set[str]], layers: dict[str, float]) -> list[str]:
    """'a -> b' for every import of a concept of the same or a higher layer than the importer's."""
    bad = []
    for src, targets in g.items():
        cs = concept(src, layers)
        for dst in sorted(targets):
            cd = concept(dst, layers)
            if not cs or not cd or cd == cs or dst in UTILITIES or cd == "dyntrain" and dst == cd:
                continue
            if src.startswith(dst + "."):  # a parent package's __init__ runs anyway
                continue
            if layers[cd] >= layers[cs]:
                bad.append(f"{src} -> {dst} ({cs} layer {layers[cs]} imports {cd} layer {layers[cd]})")
    return bad


def unexplained_local_imports(mods: dict[str, tuple[Path, bool]]) -> list[str]:
    seen, out = set(), []
    for name, (path, is_pkg) in mods.items():
        for i in imports(name, path, is_pkg):
            if i.local and not i.reason and (name, i.line) not in seen:
                seen.add((name, i.line))
                out.append(f"{name}:{i.line}: {i.target}")
    return out


# ------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from pkg.c import g\n    return g\n",
        "pkg/c.py": "def g():\n    from . import a\n    return a\n",
    })
    found = cycles(graph(modules(tmp_path, ("pkg",))))
    assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []


def test_the_checker_finds_an_upward_import_and_an_unexplained_local_one(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g\n    return g\n",
        "pkg/high.py": "def g():\n    # lazy: an optional dependency\n    import json\n    return json\n",
    })
    mods = modules(tmp_path, ("pkg",))
    layers = {"pkg": 0, "pkg.low": 1, "pkg.high": 2}
    assert layering_violations(graph(mods), layers) == [
        "pkg.low -> pkg.high (pkg.low layer 1 imports pkg.high layer 2)"]
    assert unexplained_local_imports(mods) == ["pkg.low:2: pkg.high"]


# ------------------------------------------------------------------------------- the project
def test_no_import_cycle():
    assert cycles(graph(modules(ROOT, ("dynet", "dyntrain")))) == []


def test_every_import_follows_the_layering():
    mods = modules(ROOT, ("dyntrain",))
    missing = sorted(n for n in mods if not concept(n, LAYERS) or (concept(n, LAYERS) == "dyntrain"
                     and n not in UTILITIES | {"dyntrain"}))
    assert missing == []  # every module has a layer (a new top-level module must be a utility)
    assert layering_violations(graph(mods), LAYERS) == []


def test_function_local_imports_say_why():
    assert unexplained_local_imports(modules(ROOT, ("dynet", "dyntrain"))) == []


def test_no_module_over_the_limit():
    long = {str(path.relative_to(ROOT)): n for path, _ in modules(ROOT, ("dynet", "dyntrain")).values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_dynet_imports_only_torch_einops_and_the_standard_library():
    allowed = {"torch", "einops", "dynet", "__future__"} | set(sys.stdlib_module_names)
    bad = {}
    for name, (path, is_pkg) in modules(ROOT, ("dynet",)).items():
        roots = {i.target.split(".")[0] for i in imports(name, path, is_pkg)}
        if roots - allowed:
            bad[name] = sorted(roots - allowed)
    assert bad == {}


def test_the_flow_is_one_directional():
    bad = {}
    for name, (path, is_pkg) in modules(ROOT, ("dynet", "dyntrain")).items():
        roots = {i.target.split(".")[0] for i in imports(name, path, is_pkg)}
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


def test_every_environment_variable_the_code_reads_is_documented():
    """docs/reliability.md's table names every ``DYNTRAIN_*`` variable of the production code."""
    found = {m.group(0): p.relative_to(ROOT) for folder in ("dynet", "dyntrain", "launch", "slurm")
             for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".sh", ".sbatch")
             for m in re.finditer(r"\bDYNTRAIN_[A-Z0-9_]*[A-Z0-9]", p.read_text())}
    documented = {name.rstrip("_") for name in  # `DYNTRAIN_SERVE_<LIMIT>` documents the prefix
                  re.findall(r"`(DYNTRAIN_[A-Z0-9_]+)", (ROOT / "docs" / "reliability.md").read_text())}
    assert len(found) >= 11
    assert {k: str(v) for k, v in found.items() if k not in documented} == {}
