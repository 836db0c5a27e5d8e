"""Style gates: ruff (lint and format) and mypy on the package, as part of the suite."""

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


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy", "cpusparse")
    assert result.returncode == 0, result.stdout + result.stderr
