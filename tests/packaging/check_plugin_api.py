"""Check that the sibling packages use only ring-core's declared plugin API (run by ``nox -s lint``).

Two rules, read from the source (nothing is imported, so it needs no torch):

1. A sibling imports from ring-core only ``ring_core``, ``ring_core.plugin`` or
   ``ring_core.testing``, and only names in that module's ``__all__`` (``import ring_core``
   then ``ring_core.name`` likewise).
2. A sibling calls, overrides or assigns no underscore member of a ring-core class: inside a
   class that derives (through any sibling classes) from a ring-core class, no ``def _x`` or
   ``self._x`` / ``super()._x`` where ring-core's class defines ``_x``; anywhere, no ``obj._x``
   where ``_x`` is a private member of some ring-core class and not one of the sibling's own.

``python tests/packaging/check_plugin_api.py [ROOT]`` prints each violation as
``path:line: message`` and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

CORE = "ring_core"
ALLOWED_MODULES = ("ring_core", "ring_core.plugin", "ring_core.testing")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    package: str  # the top-level import name (ring_core, ring_flash, ...)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base.pop()
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def load(root: Path) -> dict[str, Module]:
    """Every module of ``packages/*/src`` and of the sample plugin, by dotted name."""
    sample = root / "tests" / "sample_plugin"
    sources = [*sorted(root.glob("packages/*/src")), sample / "src", sample / "tests"]
    modules: dict[str, Module] = {}
    for src in sources:
        for path in sorted(src.rglob("*.py")):
            name = _module_name(path, src)
            tree = ast.parse(path.read_text(), filename=str(path))
            module = Module(name, path, tree, name.split(".")[0])
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    source = _absolute(module, node)
                    for alias in node.names:
                        module.imports[alias.asname or alias.name] = (source, alias.name)
            module.classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
            modules[name] = module
    return modules


def declared(module: Module) -> set[str]:
    """The literal ``__all__`` of a module (``__all__ = [...]`` and ``__all__ += [...]``)."""
    names: set[str] = set()
    for node in module.tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return names


def resolve(modules: dict[str, Module], module_name: str, name: str, depth: int = 0) -> tuple[str, str] | None:
    """The module that defines class ``name`` as seen from ``module_name`` (following re-exports)."""
    module = modules.get(module_name)
    if module is None or depth > 20:
        return None
    if name in module.classes:
        return module_name, name
    if name in module.imports:
        return resolve(modules, *module.imports[name], depth + 1)
    return None


def _base_name(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def ancestors(modules: dict[str, Module], key: tuple[str, str], seen: set | None = None) -> set[tuple[str, str]]:
    """Every class ``key`` derives from (``(module, class)``), itself included, as far as the source tells."""
    seen = set() if seen is None else seen
    if key in seen:
        return seen
    seen.add(key)
    module, name = key
    for base in modules[module].classes[name].bases:
        base_name = _base_name(base)
        found = resolve(modules, module, base_name) if base_name else None
        if found:
            ancestors(modules, found, seen)
    return seen


def private_members(cls: ast.ClassDef) -> set[str]:
    """Underscore names a class defines: methods, class attributes and ``self._x`` attributes."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            if _is_private(node.attr):
                names.add(node.attr)
    for node in cls.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name) and _is_private(t.id)}
    return names


def _on_self(node: ast.Attribute) -> bool:
    value = node.value
    if isinstance(value, ast.Name) and value.id in ("self", "cls"):
        return True
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def check(root: Path) -> list[str]:
    modules = load(root)
    core = {name: m for name, m in modules.items() if m.package == CORE}
    if not core:
        return [f"{root}: no ring_core sources found under packages/*/src"]
    exports = {name: declared(core[name]) for name in ALLOWED_MODULES if name in core}
    core_private = {(name, cls): private_members(node) for name, m in core.items() for cls, node in m.classes.items()}
    every_core_private = set().union(*core_private.values())
    problems: list[str] = []
    for module in modules.values():
        if module.package == CORE:
            continue
        own_private = {n for m in modules.values() if m.package == module.package for c in m.classes.values()
                       for n in private_members(c)}  # fmt: skip
        where = module.path.relative_to(root)
        problems += _check_imports(module, where, exports)
        for cls_name, cls in module.classes.items():
            inherited = set()
            for key in ancestors(modules, (module.name, cls_name)):
                inherited |= core_private.get(key, set())
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in inherited:
                    problems.append(f"{where}:{node.lineno}: {cls_name} overrides ring-core's private {node.name}")
                elif isinstance(node, ast.Attribute) and _on_self(node) and node.attr in inherited:
                    problems.append(f"{where}:{node.lineno}: {cls_name} uses ring-core's private {node.attr}")
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Attribute)
                and not _on_self(node)
                and node.attr in every_core_private
                and node.attr not in own_private
            ):
                problems.append(f"{where}:{node.lineno}: uses {node.attr}, a private member of a ring-core class")
    return sorted(set(problems))


def _check_imports(module: Module, where: Path, exports: dict[str, set[str]]) -> list[str]:
    problems = []
    core_aliases = {}  # local name -> ring_core module it names
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == CORE and not node.level:
            if node.module not in exports:
                problems.append(f"{where}:{node.lineno}: imports from {node.module}, not one of {ALLOWED_MODULES}")
                continue
            for alias in node.names:
                if alias.name not in exports[node.module]:
                    problems.append(f"{where}:{node.lineno}: {alias.name} is not in {node.module}.__all__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != CORE:
                    continue
                if alias.name not in exports:
                    problems.append(f"{where}:{node.lineno}: imports {alias.name}; use ring_core.plugin")
                elif alias.asname or "." not in alias.name:
                    core_aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in core_aliases:
            target = core_aliases[node.value.id]
            submodule = f"{target}.{node.attr}"
            if submodule in exports:
                continue
            if node.attr not in exports[target]:
                problems.append(f"{where}:{node.lineno}: {target}.{node.attr} is not in {target}.__all__")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2]
    problems = check(root)
    for problem in problems:
        print(problem)
    print(f"plugin API check: {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
