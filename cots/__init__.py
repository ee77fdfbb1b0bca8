"""The ``cots`` command: a thin dispatcher over the subcommands owned by each package."""

__version__ = "0.1.0"
