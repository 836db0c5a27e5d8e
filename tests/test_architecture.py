"""The package's shape: no import runs back up the layers, no switch on layer kinds.

The layers of the package, lowest first (a module may import its own layer and the
ones below it, never one above):

0. ``cpusparse._validation``, ``_io``, ``_threads``, ``_typing``, ``_version``
1. ``cpusparse.engine`` (kernels < csr < layers < containers; losses)
2. ``cpusparse.method``
3. ``cpusparse.models``
4. ``cpusparse.training``
5. ``cpusparse.testing``
6. ``cpusparse.sklearn``
7. ``cpusparse.tools``
8. ``cpusparse.sweep`` (grids of fits: runs the classifiers on the tools' data sets)
9. ``cpusparse`` itself (the public API)
"""

import ast
import os
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cpusparse"

LEVELS = [
    ("cpusparse._validation", 0),
    ("cpusparse._io", 0),
    ("cpusparse._threads", 0),
    ("cpusparse._typing", 0),
    ("cpusparse._version", 0),
    ("cpusparse.engine.kernels", 1.0),
    ("cpusparse.engine.csr", 1.1),
    ("cpusparse.engine.losses", 1.1),
    ("cpusparse.engine.layers.base", 1.2),
    ("cpusparse.engine.layers", 1.3),
    ("cpusparse.engine.containers", 1.4),
    ("cpusparse.engine", 1.5),
    ("cpusparse.method.masks", 2.0),
    ("cpusparse.method", 2.1),
    ("cpusparse.models", 3),
    ("cpusparse.training", 4),
    ("cpusparse.testing", 5),
    ("cpusparse.sklearn", 6),
    ("cpusparse.tools", 7),
    ("cpusparse.sweep", 8),
    ("cpusparse", 9),
]


def level(module):
    """The level of a module: that of the longest prefix in LEVELS."""
    for prefix, value in sorted(LEVELS, key=lambda p: -len(p[0])):
        if module == prefix or module.startswith(prefix + "."):
            return value
    raise AssertionError(f"{module} has no level in LEVELS")


def module_name(path, root=PACKAGE):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path, root=PACKAGE):
    """Every cpusparse module imported by ``path``, at any depth (functions included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cpusparse"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cpusparse"):
                # "from . import engine" imports the submodule cpusparse.engine
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    where = root.parent / sub.replace(".", os.sep)
                    is_module = where.is_dir() or where.with_suffix(".py").is_file()
                    found.add(sub if is_module else target)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_tree_has_the_documented_packages():
    names = {module_name(p) for p in SOURCES}
    for package in (
        "engine",
        "engine.kernels",
        "engine.layers",
        "method",
        "training",
        "testing",
        "tools",
    ):
        assert f"cpusparse.{package}" in names
    for name in names:
        level(name)  # every module has a level


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_import_runs_upward(path):
    here = module_name(path)
    upward = sorted(m for m in imports(path) if level(m) > level(here))
    assert not upward, f"{here} (level {level(here)}) imports higher modules: {upward}"


def test_the_import_check_catches_an_upward_import(tmp_path):
    # The check itself must be able to fail: a module of the engine importing training,
    # at module level or inside a function.
    root = tmp_path / "cpusparse"
    path = root / "engine" / "csr.py"
    path.parent.mkdir(parents=True)
    (root / "training").mkdir()
    (root / "tools").mkdir()
    path.write_text("from ..training import TrainConfig\ndef f():\n    from .. import tools\n")
    found = imports(path, root)
    assert found == {"cpusparse.training", "cpusparse.tools"}
    assert all(level(m) > level(module_name(path, root)) for m in found)


LAYER_CLASSES = ("SparseLinear", "Linear", "ReLU", "Sequential", "MaskedScale")


def test_no_switch_on_layer_kinds_outside_the_layers():
    # isinstance on a layer class, or a branch on a granularity name, belongs in the
    # layers and their unit maps only: everything else goes through the protocol.
    isinstance_re = re.compile(r"isinstance\([^)]*\b(" + "|".join(LAYER_CLASSES) + r")\b")
    # Duck-typed switches on a layer's cache or attributes count too.
    duck_re = re.compile(r"hasattr\([^)]*[\"'](positive|indptr|granularity|units)[\"']")
    granularity_re = re.compile(r"granularity\s*[!=]=|[!=]=\s*[\"'](weight|neuron|channel)[\"']")
    # The standalone PyTorch replay is an independent port written from the trace
    # format: it reads the granularity from a trace's metadata, as any port does. The
    # export translates each layer class into its PyTorch (or narrower) counterpart.
    offenders = []
    for path in (p for p in SOURCES if p.name not in ("replay_torch.py", "export.py")):
        inside_layers = path.parent.name == "layers"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not inside_layers and (isinstance_re.search(line) or duck_re.search(line)):
                offenders.append(f"{module_name(path)}:{number}: {line.strip()}")
            if granularity_re.search(line) and path.name != "linear.py":
                offenders.append(f"{module_name(path)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
