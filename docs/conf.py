"""Sphinx configuration for the optcore documentation.

Build (warnings are errors)::

    pip install ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

The build reads the docstrings of the installed package, so install it first. It needs no
network: intersphinx is off, MathJax is loaded by the reader's browser.
"""
import importlib.util
from pathlib import Path

import optcore

project = "optcore"
author = "optcore developers"
copyright = "optcore developers"
version = optcore.__version__
release = optcore.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

# One page per public module: api/<module>.rst. The page of a module that this build of the
# package does not contain (a feature not merged yet) is left out instead of failing the
# build; tests/test_docs.py checks that every public module of the package has a page.
HERE = Path(__file__).resolve().parent
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]


def _absent(module):
    """Whether this build cannot import ``module`` (finding ``optcore.torch.clip`` imports
    ``optcore.torch``, which raises ImportError without torch)."""
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


exclude_patterns += [f"api/{page.name}" for page in sorted((HERE / "api").glob("*.rst"))
                     if _absent(page.stem)]

# The API pages under api/ describe every object. A family page that also wants the full
# description of a name must use ``.. autosummary::`` without ``:toctree:`` (a table linking
# to the API page) or ``:no-index:``: a second description of the same object is a warning.
autosummary_generate = True
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "exclude-members": "rule",  # the optimizer classes' link to their private update rule
}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# ``sphinx-build -n`` (nitpicky) also checks that every cross-reference to an optcore object
# resolves. It is not on by default: short names in docstrings (``:func:`clip_by_norm_```)
# resolve on their module's API page but not in summary tables on other pages. References to
# other projects cannot resolve (intersphinx is off: the build has no network) and are exempt.
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|scipy|torch|sklearn|threadpoolctl|matplotlib|optax|keras)(\..*)?"),
]

html_theme = "pydata_sphinx_theme"
html_title = f"optcore {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []
