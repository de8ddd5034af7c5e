"""The package's layering (docs/ARCHITECTURE.md), kept by reading every module's imports with ``ast``.

engine ← algorithms ← io ← sat ← tools: a module imports only its own layer and those below it; base modules
(errors, _libc, _version, oom) import nothing of the package; nothing in the plugin imports ``sat_quant.testing``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "sat_quant"
LAYERS = ["base", "engine", "algorithms", "io", "sat", "tools"]
BASE = {"sat_quant.errors", "sat_quant._libc", "sat_quant._version", "sat_quant.oom"}
MAX_FUNCTION_LEVEL_IMPORTS = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in BASE or module == "sat_quant":
        return "base"
    return module.split(".")[1]


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def internal_imports() -> List[Tuple[str, str, str, bool]]:
    """(importer, imported module, imported name or '', inside a function) for every sat_quant-internal import."""
    found = []
    known = modules()
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        in_function: Set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            nested = id(node) in in_function
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("sat_quant"):
                        found.append((name, alias.name, "", nested))
            elif isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                if not target.startswith("sat_quant"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:  # "from . import module"
                        found.append((name, sub, "", nested))
                    else:
                        found.append((name, target, alias.name, nested))
    return found


def test_lower_layers_never_import_upper_ones():
    wrong = []
    for importer, target, _, _ in internal_imports():
        if importer == "sat_quant" or layer_of(importer) == "testing":
            continue  # the package's lazy front door and the test assets may reach anything
        if layer_of(target) == "testing":
            wrong.append(f"{importer} imports {target} (test assets are not the plugin)")
        elif LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(importer)):
            wrong.append(f"{importer} ({layer_of(importer)}) imports {target} ({layer_of(target)})")
    assert wrong == []


def test_no_import_cycles_counting_function_level_imports():
    graph: Dict[str, Set[str]] = {}
    known = modules()
    for importer, target, _, _ in internal_imports():
        if target in known and importer != "sat_quant":
            graph.setdefault(importer, set()).add(target)
    state: Dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_few_function_level_imports_between_sat_quant_modules():
    nested = sorted({(importer, target) for importer, target, _, inside in internal_imports() if inside})
    assert len(nested) <= MAX_FUNCTION_LEVEL_IMPORTS, nested


def test_no_module_imports_another_modules_private_names():
    private = [f"{importer} imports {target}.{name}" for importer, target, name, _ in internal_imports()
               if name.startswith("_") and name != "__version__" and target != importer]
    assert private == []


def test_only_the_sat_and_tools_layers_see_argparse():
    readers = [name for name, path in modules().items()
               if layer_of(name) in ("engine", "algorithms", "io")
               and any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                       any(a.name == "argparse" for a in n.names) or
                       (isinstance(n, ast.ImportFrom) and n.module == "argparse")
                       for n in ast.walk(ast.parse(path.read_text())))]
    assert readers == []


def test_every_module_is_in_the_architecture_table():
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [name for name in modules() if name != "sat_quant" and not name.endswith("__init__")
               and f"`{name.split('.', 1)[1].replace('.', '/')}" not in text]
    assert missing == []
