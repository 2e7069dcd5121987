"""mkdocs hooks: everything the site shows that comes from code or data is generated here.

- ``figures/*.png``: ``figures.py`` beside this file (computed from ring_core at build time);
- ``reference/**``: one mkdocstrings page per public module of ``packages/*/src``,
  and the "API reference" section of the nav;
- ``<!-- generated: NAME -->`` markers: tables of the installed implementations,
  kernels and deprecated names, read from the registry;
- ``<!-- bench: GLOB -->`` ... ``<!-- /bench -->`` blocks: replaced by the tables
  (and plots) of the benchmark JSON files matching ``GLOB`` in ``docs/benchmarks/``
  or ``bench-results/``; the block's own text (a placeholder) stays when none match.
"""

from __future__ import annotations

import datetime
import fnmatch
import importlib
import json
import re
from pathlib import Path
from typing import Any

import figures  # docs/_hooks/figures.py: mkdocs puts a hook's folder on sys.path while loading it
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIRS = (ROOT / "docs" / "benchmarks", ROOT / "bench-results")
BENCH_BLOCK = re.compile(r"<!-- bench: (?P<glob>\S+) -->\n(?P<body>.*?)<!-- /bench -->", re.S)
GENERATED = re.compile(r"<!-- generated: (?P<name>[a-z-]+) -->")
META_KEYS = ("card", "device", "date", "command", "torch", "title")
LOCAL_KEYS = ("json", "plot", "out")  # where the run wrote its files: meaningless on the site


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


def reference_page(dist: str, module: str) -> str:
    if "." in module:
        return f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n      heading_level: 2\n"
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
    for path in bench_files("*"):  # plots next to JSON outside docs/ (bench-results/)
        plot = path.with_suffix(".png")
        if plot.is_file() and files.get_file_from_path(f"benchmarks/{plot.name}") is None:
            files.append(File.generated(config, f"benchmarks/{plot.name}", content=plot.read_bytes()))
    return files


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
    if name == "build-info":
        versions = ", ".join(f"{p.name} {p.version}" for p in ring_core.get_registry().plugins if p.version)
        return f"*Generated on {datetime.date.today().isoformat()} from: {versions}.*"
    raise ValueError(f"unknown generated block {name!r}")


# -- benchmark tables ------------------------------------------------------------
def bench_files(glob: str) -> list[Path]:
    found = {}
    for folder in BENCH_DIRS:
        for path in sorted(folder.glob("*.json")):
            if fnmatch.fnmatch(path.name, glob):
                found.setdefault(path.name, path)  # docs/benchmarks wins over bench-results
    return list(found.values())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def bench_markdown(path: Path) -> str:
    """One benchmark JSON as markdown: its metadata, a table of its results, its plot."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        meta, results = {}, data
    else:
        meta = dict(data.get("meta", {}))
        meta.update({k: v for k, v in data.items() if not isinstance(v, (dict, list))})
        results = data.get("results") or data.get("rows") or []
    lines = [f"#### `{path.name}`\n"]
    if meta.get("title"):
        lines.append(f"{meta['title']}\n")
    facts = [f"**{key}**: `{meta[key]}`" for key in META_KEYS[:5] if key in meta]
    missing = [key for key in ("card", "date", "command") if key not in meta]
    extra = [f"{key}: `{value}`" for key, value in meta.items() if key not in META_KEYS + LOCAL_KEYS]
    lines.append("; ".join(facts + extra) + ("\n" if facts or extra else ""))
    if missing:
        lines.append(f"*Not recorded in the JSON: {', '.join(missing)}.*\n")
    rows = [r for r in results if isinstance(r, dict)]
    if rows:  # nested values (a kernel list, say) stay in the JSON
        header = list(dict.fromkeys(key for row in rows for key, v in row.items() if not isinstance(v, (list, dict))))
        lines.append(_table(header, [[_cell(row.get(key)) for key in header] for row in rows]) + "\n")
    if isinstance(data, dict):  # sections of their own: {"name": {"config": ..., "rows": [...]}}
        for name, section in data.items():
            if isinstance(section, dict) and isinstance(section.get("rows"), list) and section["rows"]:
                rows = [r for r in section["rows"] if isinstance(r, dict)]
                header = list(dict.fromkeys(key for row in rows for key in row))
                notes = [
                    f"{key}: `{value}`" for key, value in section.items() if key != "rows" and len(str(value)) < 200
                ]
                lines.append(f"**{name}** " + "; ".join(notes) + "\n")
                lines.append(_table(header, [[_cell(row.get(key)) for key in header] for row in rows]) + "\n")
    plot = path.with_suffix(".png")
    if plot.is_file():
        lines.append(f"![{path.stem}](benchmarks/{plot.name})\n")  # the page is docs/benchmarks.md
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def bench_block(match: re.Match) -> str:
        paths = bench_files(match["glob"])
        if not paths:
            return match["body"]
        return "\n".join(bench_markdown(path) for path in paths)

    markdown = BENCH_BLOCK.sub(bench_block, markdown)
    return GENERATED.sub(lambda m: generated(m["name"]), markdown)
