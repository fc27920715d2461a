"""The layering of docs/architecture.md, read from the import statements: no library module
imports an application, and no layer imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scalable_hbt"

# Bottom up; a module may import its own group and any group of a lower layer.
LAYERS: list[set[str]] = [
    {"errors", "version"},
    {"validation", "log", "files", "memory", "distributed", "metrics"},
    {"task"},
    {"data"},
    {"objective"},
    {"operators"},
    {"curvature"},
    {"methods"},
    {"cache"},
    {"config"},
    {"toolbox"},
]
APPLICATIONS = {"apps", "physics"}


def _group(module: str) -> str:
    """``scalable_hbt.curvature.lissa`` → ``curvature``; the package root → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(group: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if group in layer), None)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every scalable_hbt module (or package attribute) the file imports, absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("scalable_hbt")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("scalable_hbt"):
                continue
            if node.module is None:  # from . import x: x may be a module
                out += [f"{target}.{a.name}" for a in node.names]
            else:
                out.append(target)
    return out


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if _group(_module_name(p)) not in APPLICATIONS]


def test_every_library_module_has_a_layer():
    groups = {_group(_module_name(p)) for p in _library_files()} - {""}
    assert groups <= set().union(*LAYERS), f"modules without a layer: {groups - set().union(*LAYERS)}"


def test_the_library_never_imports_an_application():
    offenders = [(str(p.relative_to(PACKAGE)), target) for p in _library_files() for target in _imports(p)
                 if _group(target) in APPLICATIONS]
    assert not offenders, offenders


def test_no_layer_imports_a_layer_above_it():
    offenders = []
    for path in _library_files():
        source = _group(_module_name(path))
        if source == "":
            continue  # the package root re-exports the public API
        for target in _imports(path):
            group = _group(target)
            if group in ("", source):
                continue
            if _layer(group) is None or _layer(group) >= _layer(source):
                offenders.append((str(path.relative_to(PACKAGE)), target))
    assert not offenders, offenders


def test_physics_does_not_import_the_other_applications():
    offenders = [(str(p.relative_to(PACKAGE)), t) for p in (PACKAGE / "physics").rglob("*.py")
                 for t in _imports(p) if _group(t) == "apps"]
    assert not offenders, offenders
