"""The package version (pyproject.toml has the same number)."""
__version__ = "0.1.0"
