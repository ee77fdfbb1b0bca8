"""The ``cots`` command: a thin dispatcher over the subcommands owned by each package."""

from importlib.metadata import PackageNotFoundError, version

# pyproject.toml is the one place the version is written; the installed metadata carries it.
try:
    __version__ = version("cots-search")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
