"""Rendering and sampling helpers around policies: labelled image grids."""

from pipelines.grid import render_grid, sample_grid

__all__ = ["render_grid", "sample_grid"]
