"""Sphinx configuration for the cpusparse documentation.

Build with ``python -m sphinx -W --keep-going -b html docs OUTDIR`` from the
repository's root. The build imports the package from the working tree, executes no
notebook and writes only to ``OUTDIR``:

- the API pages (``api/*.rst``) each hold one ``api-modules`` directive, which
  documents a package and its public submodules from their ``__all__``; after
  reading, every name in the ``__all__`` of every public module is checked to have
  been documented;
- the tutorial pages (``tutorials/*.nblink``) are links: each names a notebook in
  ``tutorials/``, which is read in its place and rendered without being executed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import sys
from pathlib import Path

from docutils.parsers.rst import directives
from sphinx.ext.autodoc.mock import mock
from sphinx.util import logging
from sphinx.util.docstrings import prepare_docstring
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
NOTEBOOKS = ROOT / "tutorials"
sys.path.insert(0, str(ROOT))

import cpusparse  # noqa: E402

logger = logging.getLogger(__name__)

# -- Project -------------------------------------------------------------------------

project = "cpusparse"
author = "the cpusparse authors"
copyright = "the cpusparse authors"
release = cpusparse.__version__
version = ".".join(release.split(".")[:2])

# -- General -------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",
]

root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path: list[str] = []
default_role = "obj"
add_module_names = False

# -- autodoc / autosummary / numpydoc -----------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# The PyTorch replay script (cpusparse.testing.replay_torch) imports torch at module
# level; mocking it keeps the build independent of PyTorch, which the docs never run.
autodoc_mock_imports = ["torch"]
# The API pages are written by the ``api-modules`` directive below, not generated as
# stub files (which would be written into the source tree).
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

# -- Notebooks (MyST-NB) -------------------------------------------------------------

# The notebooks are committed without outputs and are rendered as they are: code and
# markdown only, never executed.
nb_execution_mode = "off"
nb_custom_formats = {".nblink": ("nbformat.reads", {"as_version": 4})}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"cpusparse {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Completely sparse neural-network training on the CPU",
    "fixed_sidebar": True,
    "page_width": "1180px",
}
# The sources of the API and tutorial pages are a directive and a link file: showing
# them would help no one.
html_copy_source = False
html_show_sourcelink = False


# -- Tutorials: link files -----------------------------------------------------------


def _link_target(link: Path, text: str) -> Path:
    """The notebook that a ``.nblink`` file names, relative to the link file."""
    return (link.parent / json.loads(text)["path"]).resolve()


def _read_linked_notebook(app, docname, source):
    """Replace the text of a ``.nblink`` document with the notebook it names."""
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".nblink":
        return
    target = _link_target(path, source[0])
    app.env.note_dependency(str(target))
    # The notebooks link to each other and to their index as files next to them
    # (``03_x.ipynb``, ``README.rst``); here those are the pages of their links.
    text = target.read_text(encoding="utf-8")
    text = re.sub(r"\]\((\d\d_[A-Za-z0-9_]+)\.ipynb\)", r"](\1.nblink)", text)
    source[0] = text.replace("](README.rst)", "](index.rst)")


def _check_notebook_links(app):
    """Warn about a notebook in ``tutorials/`` that no ``.nblink`` file names."""
    linked = {
        _link_target(link, link.read_text(encoding="utf-8"))
        for link in Path(app.srcdir).rglob("*.nblink")
    }
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        if notebook.resolve() not in linked:
            logger.warning(
                "tutorial %s has no page: add a .nblink file naming it under docs/tutorials/",
                notebook.name,
            )


# -- API pages -----------------------------------------------------------------------


def _is_public(modname: str) -> bool:
    return not any(part.startswith("_") for part in modname.split("."))


def _import(modname: str):
    """Import a module as autodoc does: with ``autodoc_mock_imports`` mocked."""
    with mock(autodoc_mock_imports):
        return importlib.import_module(modname)


def _public_modules(package: str = "cpusparse") -> list[str]:
    """The public modules of ``package``, itself first, in import-path order."""
    mod = _import(package)
    names = [package]
    if hasattr(mod, "__path__"):
        with mock(autodoc_mock_imports):
            for info in pkgutil.walk_packages(mod.__path__, package + "."):
                if _is_public(info.name):
                    names.append(info.name)
    return sorted(names)


def _exported(modname: str) -> list[str]:
    return list(getattr(_import(modname), "__all__", None) or [])


def _canonical(modname: str, name: str) -> str:
    """The module that documents ``modname.name``: where it is defined, if public.

    A package that re-exports an object from one of its submodules links to the
    submodule's entry instead of documenting the object a second time. An object
    defined in a private module is documented where it is exported.
    """
    obj = getattr(_import(modname), name)
    if inspect.ismodule(obj):
        return obj.__name__
    home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
    if home and _is_public(home) and name in _exported(home):
        return home
    if hasattr(_import(modname), "__path__"):
        # A constant re-exported by a package: documented in the submodule that
        # exports the same object under the same name.
        for other in _public_modules(modname):
            if other != modname and name in _exported(other):
                if getattr(_import(other), name) is obj:
                    return other
    return modname


def _target(modname: str, name: str) -> str:
    """The full name of the entry that documents ``modname.name``."""
    obj = getattr(_import(modname), name)
    return obj.__name__ if inspect.ismodule(obj) else f"{_canonical(modname, name)}.{name}"


def _directive_for(obj) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isroutine(obj) or callable(obj):
        return "autofunction"
    return "autodata"


def _foreign_members(cls: type) -> list[str]:
    """Members of ``cls`` that the package did not write.

    NamedTuple fields are described in the class's Attributes section: their
    generated "Alias for field number N" properties add nothing. Methods that a base
    class generates on the subclass (scikit-learn's ``set_*_request``) are documented
    by that library.
    """
    fields = getattr(cls, "_fields", None)
    names = list(fields) if isinstance(fields, tuple) else []
    for name in vars(cls):
        if name.startswith("_") or name in names:
            continue
        member = getattr(cls, name, None)
        home = getattr(member, "__module__", None)
        if callable(member) and home and not home.startswith("cpusparse"):
            names.append(name)
    return names


def _module_rst(modname: str) -> list[str]:
    """Module docstring, summary table and entries of one module."""
    mod = _import(modname)
    lines = [
        f".. automodule:: {modname}",
        "   :no-members:",
        "",
        f".. currentmodule:: {modname}",
        "",
    ]
    names = _exported(modname)
    if not names:
        return lines
    lines += [".. autosummary::", "   :nosignatures:", ""]
    for name in names:
        target = _target(modname, name)
        # Relative to the current module, which autosummary resolves against.
        lines.append(f"   ~{target.removeprefix(modname + '.')}")
    lines.append("")
    for name in names:
        if _canonical(modname, name) != modname:
            continue
        obj = getattr(mod, name)
        directive = _directive_for(obj)
        lines.append(f".. {directive}:: {name}")
        if directive == "autodata" and len(repr(obj)) > 80:
            lines.append("   :no-value:")
        if directive in ("autoclass", "autoexception"):
            lines.append("   :members:")
            lines.append("   :show-inheritance:")
            excluded = _foreign_members(obj)
            if excluded:
                lines.append(f"   :exclude-members: {', '.join(excluded)}")
        lines.append("")
    return lines


class ApiModules(SphinxDirective):
    """Document a module and, unless ``:no-submodules:``, its public submodules.

    The module's own entries come first, under the page's title; each public submodule
    follows in its own section.
    """

    required_arguments = 1
    option_spec = {"no-submodules": directives.flag}

    def run(self):
        """Generate the reST of the modules' entries and parse it in place."""
        package = self.arguments[0]
        modules = [package] if "no-submodules" in self.options else _public_modules(package)
        lines = _module_rst(package)
        for modname in modules[1:]:
            lines += ["", modname, "-" * len(modname), ""]
            lines += _module_rst(modname)
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


def _drop_type_docstring(app, what, name, obj, options, lines):
    """Give a constant without a docstring of its own no docstring, not its type's."""
    if what not in ("data", "attribute") or inspect.isclass(obj) or inspect.isroutine(obj):
        return
    own = getattr(type(obj), "__doc__", None)
    if own and [line.rstrip() for line in lines if line.strip()] == [
        line.rstrip() for line in prepare_docstring(own) if line.strip()
    ]:
        lines.clear()


def _check_api_coverage(app, env):
    """Warn about a public module, or a name in its ``__all__``, left undocumented."""
    objects = env.domains["py"].objects
    modules = env.domains["py"].modules
    for modname in _public_modules():
        if modname not in modules:
            logger.warning("public module %s is not documented: no api-modules covers it", modname)
            continue
        for name in _exported(modname):
            target = _target(modname, name)
            if target not in objects and target not in modules:
                logger.warning("%s.%s is exported but not documented", modname, name)


def setup(app):
    """Register the link-file reader, the API directive and the completeness checks."""
    app.add_directive("api-modules", ApiModules)
    app.connect("source-read", _read_linked_notebook)
    # Before numpydoc (priority 500), which would reformat the type's docstring.
    app.connect("autodoc-process-docstring", _drop_type_docstring, priority=100)
    app.connect("builder-inited", _check_notebook_links)
    app.connect("env-check-consistency", _check_api_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
