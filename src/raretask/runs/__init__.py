"""Experiment grids on disk: run directories, atomic writes, resume, the results store."""
