"""``cots index sync``: the command over :func:`indexer.sync.sync_collection`.

``indexer.cli`` registers it with its own ``--root`` option (:func:`sync_command`), which it
passes in: importing it from here would make the two modules import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def sync_command(root_option: Callable[[Any], Any]) -> click.Command:
    """The ``sync`` command, with ``root_option`` (``indexer.cli``'s ``--root``)."""
    return click.command(name="sync")(root_option(sync))


@click.option("--collection", required=True, help="Collection name.")
@click.option(
    "--corpus",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder of photos or videos the collection should equal (scanned recursively).",
)
@click.option(
    "--kind",
    type=click.Choice(["image", "video"]),
    default="image",
    show_default=True,
    help="Which files of the folder are the collection's items.",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model bundle (cots export); default: the one the collection was built with. "
    "Needed for a first sync.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Decoding processes.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--keep-versions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sync(
    root: Path,
    collection: str,
    corpus: Path,
    kind: str,
    bundle: Path | None,
    workers: int,
    batch_size: int,
    keep_versions: int,
    as_json: bool,
) -> None:
    """Make a collection equal to a folder: embed new and changed files, remove deleted ones,
    all in one new version (nothing published when nothing changed).

    An unchanged file (same size and modification time) is not opened; a file whose time
    changed but whose bytes did not keeps its vector. An interrupted sync resumes from the
    files it had encoded. The first sync of a collection builds it.
    """
    from pydantic import ValidationError

    from indexer.errors import IndexerError
    from indexer.sync import sync_collection
    from runtime.errors import BundleRuntimeError

    try:
        report = sync_collection(
            root,
            collection,
            corpus,
            kind="video" if kind == "video" else "image",
            bundle=bundle,
            workers=workers,
            batch_size=batch_size,
            keep_versions=keep_versions,
        )
    except (IndexerError, BundleRuntimeError, ValidationError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(report.model_dump_json(indent=2) if as_json else report.summary())
