"""mkdocs hooks: everything the site shows that comes from code or data is generated here.

- ``figures/*.png``: ``figures.py`` beside this file (computed from ring_core at build time);
- ``reference/**``: one mkdocstrings page per public module of ``packages/*/src``,
  and the "API reference" section of the nav;
- ``<!-- generated: NAME -->`` markers: tables of the installed implementations,
  kernels and deprecated names, read from the registry;
- ``<!-- answer: NAME -->`` markers (the benchmarks page): a conclusion, a figure and tables
  computed from ``docs/benchmarks/*.json`` (``benchpage.py``);
- ``<!-- headline -->``: the six headline ratios (``headline.py``), which also rewrites
  ``docs/images/headline.png`` and the README's table before each build when the JSON changed.
"""

from __future__ import annotations

import datetime
import importlib
import re
from pathlib import Path
from typing import Any

# docs/_hooks/*.py: mkdocs puts a hook's folder on sys.path while loading it
import benchdata
import benchpage
import figures
import headline
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
GENERATED = re.compile(r"<!-- generated: (?P<name>[a-z-]+) -->")
ANSWER = re.compile(r"<!-- answer: (?P<name>[a-z-]+) -->")
HEADLINE = "<!-- headline -->"


# -- API reference -------------------------------------------------------------
def public_modules() -> dict[str, list[str]]:
    """``{distribution: [module, ...]}`` for every package under ``packages/*/src``."""
    found: dict[str, list[str]] = {}
    for src in sorted(ROOT.glob("packages/*/src")):
        modules = []
        for path in sorted(src.rglob("*.py")):
            parts = path.relative_to(src).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(part.startswith("_") for part in parts):
                continue
            modules.append(".".join(parts))
        found[src.parent.name] = sorted(modules, key=lambda m: (m.count("."), m))
    return found


def reference_path(module: str) -> str:
    return "reference/" + module.replace(".", "/") + ("/index.md" if "." not in module else ".md")


def on_config(config: Any) -> Any:
    nav = []
    for dist, modules in public_modules().items():
        nav.append({dist: [{module: reference_path(module)} for module in modules]})
    for index, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and "API reference" in entry:
            config["nav"][index] = {"API reference": nav}
    return config


def public_names(module: str) -> tuple[list[str], dict[str, str]]:
    """A module's public names defined in it (its ``__all__``, then what the package or a sibling module
    declares public), in that order, and the public names it re-exports from elsewhere (``{name: defining module}``).

    Everything else (helpers, internal dataclasses) stays off the page.
    """
    mod = importlib.import_module(module)
    package = importlib.import_module(module.split(".")[0])

    def defined_at(name: str) -> str:
        where = getattr(vars(mod).get(name), "__module__", module)  # a constant has none: defined here
        return where if isinstance(where, str) and where.startswith(package.__name__) else module

    own = list(getattr(mod, "__all__", []))
    exported = [n for n in declared_names(package.__name__) if n in vars(mod) and defined_at(n) == module]
    here = [n for n in dict.fromkeys(own + exported) if defined_at(n) == module and not n.startswith("_")]
    return here, {n: defined_at(n) for n in own if defined_at(n) != module}


def declared_names(package: str) -> list[str]:
    """Every name that the package or one of its public modules lists in ``__all__``."""
    names = list(getattr(importlib.import_module(package), "__all__", []))
    for modules in public_modules().values():
        for module in modules:
            if module.split(".")[0] == package and "." in module:
                names += getattr(importlib.import_module(module), "__all__", [])
    return list(dict.fromkeys(names))


def module_page(module: str) -> str:
    """A submodule's page: its docstring, then its public names, each documented; internals left out."""
    lines = [f"# `{module}`\n", f"::: {module}\n    options:\n      show_root_heading: false\n      members: false\n"]
    try:
        here, elsewhere = public_names(module)
    except ImportError as exc:
        return "\n".join([*lines, f"!!! warning\n    `{module}` is not importable here: {exc}\n"])
    for name in here:
        lines.append(f"::: {module}.{name}\n    options:\n      heading_level: 2\n      show_root_full_path: false\n")
    if elsewhere:
        lines.append("Also importable from here:\n")
        lines += [
            f"- `{name}`: see [`{where}`]({_relative(module, where)}#{where}.{name})"
            for name, where in elsewhere.items()
        ]
        lines.append("")
    if not here and not elsewhere:
        lines.append(
            '!!! note "No public names"\n    This module declares no public API (no `__all__`, nothing its package'
            " exports): what it defines may change without notice, so it is not documented here.\n"
        )
    if module == "ring_core.factory":
        lines.append("## Arguments per implementation\n\n<!-- generated: implementation-arguments -->\n")
    return "\n".join(lines)


def _relative(page_module: str, target_module: str) -> str:
    """The path from ``page_module``'s reference page to ``target_module``'s."""
    import posixpath

    source = reference_path(page_module)
    return posixpath.relpath(reference_path(target_module), posixpath.dirname(source))


def reference_page(dist: str, module: str) -> str:
    if "." in module:
        return module_page(module)
    lines = [
        f"# `{module}` ({dist})\n",
        f"::: {module}\n    options:\n      show_root_heading: false\n      members: false\n",
    ]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        return "\n".join([*lines, f"!!! warning\n    `{module}` is not importable here: {exc}\n"])
    names = [n for n in getattr(package, "__all__", []) if not n.startswith("_")]
    if names:
        lines.append("Public names (importable from the package):\n")
        lines.append("| name | defined in |\n|---|---|")
        for name in names:
            where = getattr(getattr(package, name, None), "__module__", None)
            if where and where != module and where.startswith(module + ".") and not _private(where):
                target = reference_path(where).removeprefix(f"reference/{module}/")
                lines.append(f"| [`{name}`]({target}#{where}.{name}) | `{where}` |")
            else:
                lines.append(f"| `{name}` | `{module}` |")
    return "\n".join(lines) + "\n"


def _private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


# -- files generated at build time -------------------------------------------
def on_files(files: Files, config: Any) -> Files:
    for dist, modules in public_modules().items():
        for module in modules:
            files.append(File.generated(config, reference_path(module), content=reference_page(dist, module)))
    for name, data in figures.render_all().items():
        files.append(File.generated(config, f"figures/{name}", content=data))
    for path, make in benchpage.figures().items():
        files.append(File.generated(config, path, content=benchdata.png(make())))
    return files


def on_pre_build(config: Any) -> None:
    """The README's figure and table, rewritten from the JSON (before the files are collected)."""
    for path in headline.write():
        print(f"headline: rewrote {path.relative_to(ROOT)}")


# -- tables from the registry ----------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def generated(name: str) -> str:
    import ring_core

    if name == "implementations":
        rows = [
            [
                f"`{i.name}`",
                f"`{i.cls.__name__}`",
                i.package,
                i.kind,
                "yes" if i.distributed else "no",
                ", ".join(i.devices),
                i.description,
            ]
            for i in ring_core.list_implementations()
        ]
        header = ["name", "class", "package", "kind", "sequence-parallel", "devices", "what"]
        return _table(header, rows)
    if name == "kernels":
        rows = [
            [f"`{k.name}`", str(k.priority), ", ".join(k.devices) or "any", k.description]
            for k in ring_core.list_kernels()
        ]
        return _table(["kernel", "priority", "devices", "what"], rows)
    if name == "deprecations":
        rows = [
            [f"`{old}`", f"`{i.cls.__name__}` / `{i.name}`", i.package, removal]
            for i in ring_core.list_implementations()
            for old, removal in sorted(i.aliases.items())
        ]
        if not rows:
            return "*No deprecated names are registered by the packages installed for this build.*"
        return _table(["old name", "use instead (class / factory name)", "package", "removed in"], rows)
    if name == "implementation-arguments":
        from ring_core.arguments import describe_arguments

        parts = [
            "`create_attention(name, **config)` and `create_multihead_attention(name, embed_dim=..., num_heads=..., "
            "**config)` pass `config` to the class registered under `name`; these are its arguments "
            "(`ring-attention info --name NAME` prints the same for what is installed where you run it)."
        ]
        for impl in ring_core.list_implementations():
            rows = [
                [f"`{'**' if a.kind == '**' else ''}{a.name}`", f"`{a.annotation}`" if a.annotation else "",
                 f"`{a.default}`" if a.default not in ("", "required") else a.default, a.description]
                for a in describe_arguments(impl)
            ]  # fmt: skip
            parts.append(
                f"### `{impl.name}`\n\n`{impl.cls.__name__}` ({impl.package}, {impl.kind}): {impl.description}"
            )
            parts.append(_table(["argument", "type", "default", "what"], rows))
        return "\n\n".join(parts)
    if name == "build-info":
        versions = ", ".join(f"{p.name} {p.version}" for p in ring_core.get_registry().plugins if p.version)
        return f"*Generated on {datetime.date.today().isoformat()} from: {versions}.*"
    raise ValueError(f"unknown generated block {name!r}")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    markdown = ANSWER.sub(lambda m: benchpage.answer_markdown(m["name"]), markdown)
    markdown = markdown.replace(HEADLINE, headline.ratios_markdown(link_prefix="benchmarks/"))
    return GENERATED.sub(lambda m: generated(m["name"]), markdown)
