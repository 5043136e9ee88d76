"""Figures (matplotlib) and the report, read from finished run directories."""
