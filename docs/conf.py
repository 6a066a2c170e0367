"""Sphinx configuration for spade_sc."""

import os
from datetime import date
from importlib.metadata import version as _version

project = "spade_sc"
author = "spade_sc developers"
copyright = f"{date.today().year}, {author}"
release = _version("spade_sc")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# docs/tutorials is a link to the top-level tutorials/ folder (one copy of every notebook); its README is for
# people browsing the folder, not a page.
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "tutorials/README.md"]

# Tutorials (tutorials/*.ipynb, stored without outputs) are executed at every build; a failing cell fails the build.
# SPADE_SC_DOCS_EXECUTE=off builds the pages without running them (for quick iterations on the text).
nb_execution_mode = os.environ.get("SPADE_SC_DOCS_EXECUTE", "force")
nb_execution_timeout = 1200
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# The notebook kernels inherit this process's environment: a non-interactive matplotlib backend there (the tests
# export MPLBACKEND=agg) would leave every figure undrawn, so it is dropped; kernels use the inline backend.
if os.environ.get("MPLBACKEND", "").lower() in ("agg", "pdf", "svg", "ps", "cairo", "template"):
    os.environ.pop("MPLBACKEND")

# Intersphinx needs the network: off unless SPADE_SC_DOCS_INTERSPHINX=1 (CI and this offline machine).
if os.environ.get("SPADE_SC_DOCS_INTERSPHINX", "0") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    }
else:
    intersphinx_mapping = {}

html_theme = "furo"
html_title = "spade_sc"
# Types such as SpatialData or AnnData are not resolvable offline; do not warn about them.
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]
