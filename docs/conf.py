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
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]

# Tutorials are executed at every build; a failing cell fails the build.
nb_execution_mode = os.environ.get("SPADE_SC_DOCS_EXECUTE", "force")
nb_execution_timeout = 1200
nb_execution_raise_on_error = True
nb_merge_streams = True

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
