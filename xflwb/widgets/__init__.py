"""Notebook views (HTML reports, ipywidgets) over the public API; they compute nothing."""
