"""Style gates: ruff (lint and format) and mypy on the package, as part of the suite."""

import ast
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_lint_is_clean():
    result = run("ruff", "check", "cpusparse", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_format_is_clean():
    result = run("ruff", "format", "--check", "cpusparse", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


PACKAGE = ROOT / "cpusparse"
# Left unannotated on purpose: the Numba kernels (annotations must not come near their
# compilation).
UNANNOTATED = (PACKAGE / "engine" / "kernels",)
PUBLIC_DUNDERS = ("__init__", "__call__", "__getattr__")
MIN_ANNOTATED = 0.9


def _is_public(name):
    return not name.startswith("_") or name in PUBLIC_DUNDERS


def _fully_annotated(fn, is_method):
    """Every parameter (but self or cls), *args, **kwargs and the return are annotated."""
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in fn.decorator_list}
    if is_method and "staticmethod" not in decorators:
        params = params[1:]
    params += [p for p in (a.vararg, a.kwarg) if p is not None]
    return fn.returns is not None and all(p.annotation is not None for p in params)


def public_signatures():
    """``{"path:line name": fully annotated}`` for the public functions and methods.

    Public: a module-level function, or a method of a module-level class, whose name
    (and the class's) does not start with an underscore, plus ``__init__``,
    ``__call__`` and ``__getattr__``; private modules count too.
    """
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path.is_relative_to(skip) for skip in UNANNOTATED):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [(node, False) for node in tree.body if isinstance(node, functions)]
        for cls in tree.body:
            if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
                found += [(node, True) for node in cls.body if isinstance(node, functions)]
        for fn, is_method in found:
            if _is_public(fn.name):
                where = f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
                out[where] = _fully_annotated(fn, is_method)
    return out


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    # Without check_untyped_defs mypy skips the body of every unannotated function, so
    # a clean run would say little.
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config.getboolean("mypy", "check_untyped_defs", fallback=False)

    result = run(sys.executable, "-m", "mypy", "cpusparse")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every module was checked...
    checked = re.search(r"in (\d+) source files?", result.stdout)
    assert checked, result.stdout
    assert int(checked.group(1)) >= len(list(PACKAGE.rglob("*.py"))), result.stdout

    # ... and checked against annotations: the public API has typed signatures.
    signatures = public_signatures()
    missing = [where for where, ok in signatures.items() if not ok]
    assert len(signatures) > 100
    assert 1 - len(missing) / len(signatures) >= MIN_ANNOTATED, (
        f"{len(missing)} of {len(signatures)} public functions and methods lack "
        "annotations:\n" + "\n".join(missing)
    )
