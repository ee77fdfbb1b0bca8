"""``--where`` on the command line: the ``cots index`` commands' filter option, parsed into an
``indexer.filters.Filter`` (its own module so the sharded commands in ``indexer.cli_shard``
share it without importing ``indexer.cli``, which registers them)."""

from __future__ import annotations

import click

from indexer.filters import Filter, parse_where, split_where


def parse_filters(where: tuple[str, ...]) -> Filter | None:
    """``--where`` conditions as a filter (``indexer.filters.parse_where``), or a usage error.
    One ``--where`` may hold several, comma-separated, as the page's filter box does."""
    try:
        return parse_where([part for text in where for part in split_where(text)])
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--where") from None
