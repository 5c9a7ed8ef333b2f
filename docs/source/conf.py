"""Sphinx configuration of the jaxopt_lab documentation (as optax and flax build theirs: autodoc
from the docstrings, napoleon for their Google-style sections, notebooks through myst-nb).

Build: ``sphinx-build -W -b html docs/source docs/_build/html``. The notebooks are rendered with
the outputs committed in ``notebooks/`` (``nb_execution_mode = "off"``): they are not run here.
"""

import os
import shutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)  # document this checkout, not whatever jaxopt_lab is installed
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tutorials are the notebooks of notebooks/, copied in at each build (Sphinx reads only its
# source folder; the copies are ignored by git).
_TUTORIALS = os.path.join(os.path.dirname(__file__), "tutorials")
os.makedirs(_TUTORIALS, exist_ok=True)
for _name in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
    if _name.endswith(".ipynb"):
        shutil.copyfile(os.path.join(ROOT, "notebooks", _name), os.path.join(_TUTORIALS, _name))

import jaxopt_lab  # noqa: E402

project = "jaxopt_lab"
author = "jaxopt_lab contributors"
copyright = "the jaxopt_lab contributors"
release = version = jaxopt_lab.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # signatures stay readable; types go beside each argument
autodoc_mock_imports = ["torch"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc documents the members themselves once
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

nb_execution_mode = "off"  # show the outputs committed with the notebooks

html_theme = "sphinx_book_theme"
html_title = "jaxopt_lab"
import tomllib  # noqa: E402

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    _REPOSITORY = tomllib.load(_f)["project"]["urls"]["Repository"]  # the one place the URL is set
html_theme_options = {"show_toc_level": 2, "repository_url": _REPOSITORY, "use_repository_button": True,
                      "path_to_docs": "docs/source"}
