"""The documentation builds without a warning and covers the public API."""

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cpusparse

ROOT = Path(__file__).resolve().parent.parent


def _public_modules():
    names = ["cpusparse"]
    for info in pkgutil.walk_packages(cpusparse.__path__, "cpusparse."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _import(modname):
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == "torch":  # cpusparse.testing.replay_torch without PyTorch
            return None
        raise


def test_docs_build(tmp_path):
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(ROOT / "docs"),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"sphinx exited with {proc.returncode}\n--- stderr ---\n{proc.stderr}"
        f"\n--- stdout ---\n{proc.stdout[-5000:]}"
    )

    # The API pages: the entry of train_step where it is defined, and the re-export in
    # the top-level package links to it.
    training = (out / "api" / "cpusparse.training.html").read_text(encoding="utf-8")
    assert 'id="cpusparse.training.step.train_step"' in training
    top = (out / "api" / "cpusparse.html").read_text(encoding="utf-8")
    assert "cpusparse.training.html#cpusparse.training.step.train_step" in top

    # Every public module has a module entry, and every name in its __all__ an entry
    # under a public module that exports the same object.
    ids = set()
    for page in (out / "api").glob("*.html"):
        ids.update(re.findall(r'id="((?:module-)?cpusparse[\w.]*)"', page.read_text("utf-8")))
    modules = {m: _import(m) for m in _public_modules()}
    missing = []
    for modname, mod in modules.items():
        if f"module-{modname}" not in ids:
            missing.append(modname)
        if mod is None:
            continue
        for name in getattr(mod, "__all__", None) or []:
            obj = getattr(mod, name)
            if getattr(obj, "__name__", None) in modules and f"module-{obj.__name__}" in ids:
                continue  # a submodule listed in a package's __all__
            homes = [
                other
                for other, omod in modules.items()
                if omod is not None
                and f"{other}.{name}" in ids
                and getattr(omod, name, None) is obj
            ]
            if not homes:
                missing.append(f"{modname}.{name}")
    assert not missing, f"not documented: {missing}"

    # The trace format page and one page per tutorial notebook, with its code cells.
    trace = (out / "trace_format.html").read_text(encoding="utf-8")
    assert "Golden traces" in trace
    assert "highlight-python" in trace  # the replay script, included verbatim
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        page = out / "tutorials" / f"{notebook.stem}.html"
        assert page.is_file(), f"no page for {notebook.name}"
        html = page.read_text(encoding="utf-8")
        assert "cell_input" in html, f"{page.name} shows no code cell"
    assert (out / "tutorials" / "index.html").is_file()
