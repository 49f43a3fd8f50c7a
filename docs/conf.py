"""Sphinx configuration of the docs (Markdown pages through MyST); built by scripts/build_docs.sh.

Why Sphinx with MyST rather than mkdocs: both read these Markdown pages and build offline, but Sphinx and
myst-parser are actively released (mkdocs' last release is 1.6.1, 2024-08), and Sphinx's nitpicky, warnings-as-errors
build (-n -W) fails on a link to a missing page or heading anchor, which is what keeps these pages honest in CI. The
pages stay plain Markdown, readable on GitHub as they are.
"""

project = "sftkey-plugin"
author = "sftkey-plugin authors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# headings down to ### get anchors, so [text](page.md#a-heading) links are resolved and checked
myst_heading_anchors = 3
html_theme = "furo"
html_title = "sftkey-plugin"
# option values and patterns in prose are copied into configs: keep ' " and ... as typed
smartquotes = False
