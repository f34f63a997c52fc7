"""Sphinx configuration of nstjax's documentation: MyST Markdown pages, the furo theme, the API
reference from docstrings (autodoc + napoleon) and the config reference generated from the schema
(_ext/config_reference.py). It builds offline, without weights: the command is in README.md,
"Set up"."""

import sys
from importlib.metadata import version as _version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "nstjax"
release = _version("nstjax")
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "config_reference"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

myst_heading_anchors = 3  # [text](page.md#a-heading) links, as on GitHub

autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a class's Attributes: as fields, not as a second description of each

html_theme = "furo"
html_title = "nstjax"
html_show_copyright = False
