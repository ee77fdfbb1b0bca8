"""``cots index duplicates``: near-duplicate groups of a collection, as a table or JSON
(``indexer.duplicates`` does the work; FAISS loads only when the command runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from indexer.duplicates import DuplicateReport

Decorator = Callable[[Any], Any]


def duplicates_command(root_option: Decorator, collection_option: Decorator) -> click.Command:
    """The command, with ``indexer.cli``'s own ``--root`` and ``--collection`` options (given
    by it, so that this module does not import it back: no import cycle)."""

    @click.command("duplicates")
    @root_option
    @collection_option
    @click.option(
        "--min-score",
        type=click.FloatRange(0.5, 1.0),
        default=0.97,
        show_default=True,
        help="Items whose vectors' cosine similarity is at least this are duplicates.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
    def duplicates(root: Path, collection: str, min_score: float, as_json: bool) -> None:
        """List groups of near-identical image and video items (removed ones left out).

        \b
          cots index duplicates --collection photos --min-score 0.97
          cots index duplicates --collection photos --json
        """
        from indexer.duplicates import duplicates_in
        from indexer.errors import IndexerError

        try:
            report = duplicates_in(root, collection, min_score)
        except IndexerError as error:
            raise click.ClickException(str(error)) from None
        click.echo(report.model_dump_json(indent=2) if as_json else duplicates_table(report))

    command: click.Command = duplicates
    return command


def duplicates_table(report: DuplicateReport) -> str:
    """One row per item: group number, id, score to the group's first item, uri."""
    rows = [("group", "id", "score", "uri")]
    for number, group in enumerate(report.groups, start=1):
        rows += [(str(number), str(i.id), f"{i.score:.4f}", i.uri) for i in group.items]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [
        "  ".join(
            [row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]]
        )
        for row in rows
    ]
    if not report.groups:
        lines = ["(no duplicates)"]
    items = sum(len(group.items) for group in report.groups)
    lines.append(
        f"{len(report.groups)} groups, {items} items of {report.checked:,} compared "
        f"(min score {report.min_score}) in {report.collection} v{report.version}"
    )
    return "\n".join(lines)
