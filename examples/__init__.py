"""Bundled example images (see SOURCES.md)."""
