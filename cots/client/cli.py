"""``cots search``: one query against a running server, printed as a table of hits (or the
server's JSON answer with ``--json``). It is ``cots.client.Client`` on the command line: the
same retries, the same errors, shown as the server's message."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from cots.client.base import DEFAULT_URL
from cots.client.errors import ApiError, ClientError
from cots.client.sync import Client
from wire.filters import Filter, parse_where, split_where
from wire.schemas import SearchHit, SearchResponse


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("text", required=False)
@click.option(
    "--url",
    envvar="COTS_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The server (cots serve), or $COTS_URL.",
)
@click.option("--collection", "-c", required=True, help="The collection to search.")
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Search with this image file instead of TEXT.",
)
@click.option(
    "--similar-to",
    type=click.IntRange(0),
    metavar="ID",
    help="Search for items like item ID of the collection (its stored vector), instead of TEXT.",
)
@click.option(
    "--min-score",
    type=click.FloatRange(-1.0, 1.0),
    help="Leave out hits scoring below this; the results end there.",
)
@click.option(
    "--sort",
    metavar="FIELD",
    help="Order the hits at or above --min-score (which it needs) by a metadata field: "
    "taken (oldest first) or -taken (newest first).",
)
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="Hits to show.")
@click.option(
    "--offset", type=click.IntRange(0), default=0, show_default=True, help="Hits to skip."
)
@click.option(
    "--where",
    multiple=True,
    metavar="COND",
    help="Keep only matching items, e.g. --where split=test --where 'year>=2020', or "
    "--where 'split=test, year>=2020' (=, !=, >, >=, <, <=; a|b for one of). ANDed.",
)
@click.option(
    "--api-key",
    envvar="COTS_API_KEY",
    help="Sent as X-API-Key (needed when the server requires keys for search), or $COTS_API_KEY.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for one answer.",
)
@click.option(
    "--complete",
    is_flag=True,
    help="A sharded collection with a shard down: fail (503) rather than show the other "
    "shards' hits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
def search(
    text: str | None,
    url: str,
    collection: str,
    image: Path | None,
    similar_to: int | None,
    min_score: float | None,
    sort: str | None,
    k: int,
    offset: int,
    where: tuple[str, ...],
    api_key: str | None,
    timeout: float,
    complete: bool,
    as_json: bool,
) -> None:
    """Search a collection (-c) of a running server by TEXT, by --image FILE, or for items
    like --similar-to ID.

    \b
      cots search -c images "a small red circle on a striped background"
      cots search -c captions --image photo.png -k 5 --json
      cots search --url http://search:8000 -c videos "a ball bouncing" --where split=test
      cots search -c photos "a beach" --min-score 0.25 --sort -taken
      cots search -c photos --similar-to 42
    """
    if sum(given is not None for given in (text, image, similar_to)) != 1:
        raise click.UsageError("give a TEXT query, --image FILE or --similar-to ID (exactly one)")
    if sort is not None and min_score is None:
        raise click.UsageError("--sort needs --min-score: the hits at or above it are sorted")
    filters = parse_filters(where)
    try:
        with Client(url, api_key=api_key, timeout_s=timeout) as client:
            page = client.search(
                collection,
                text,
                image=image,
                similar_to=similar_to,
                k=k,
                offset=offset,
                filters=filters,
                min_score=min_score,
                sort=sort,
                complete=complete,
            )
    except ApiError as error:
        message = f"{url} answered {error.status} {error.code}: {error.message}"
        raise click.ClickException(message) from None
    except (ClientError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(page.model_dump_json(indent=2))
    else:
        click.echo(hits_table(page))


def parse_filters(where: tuple[str, ...]) -> Filter | None:
    """``--where`` conditions as a filter, or a usage error. One ``--where`` may hold several,
    comma-separated, as the page's filter box does (``cots index remove --where`` alike)."""
    try:
        return parse_where([part for text in where for part in split_where(text)])
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--where") from None


def hits_table(page: SearchResponse, width: int | None = None) -> str:
    """A plain-text table of a page of hits: rank, score, id, kind, and what the item is."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    rows = [("#", "score", "id", "kind", "item")]
    for rank, hit in enumerate(page.hits, start=page.offset + 1):
        rows.append((str(rank), f"{hit.score:.3f}", str(hit.id), hit.kind, describe(hit)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    room = max(20, width - sum(widths) - 2 * 4)
    lines = []
    for row in rows:
        item = row[4] if len(row[4]) <= room else row[4][: room - 1] + "\u2026"
        cells = [row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2])]
        lines.append("  ".join([*cells, row[3].ljust(widths[3]), item]).rstrip())
    if not page.hits:
        lines.append("(no hits)")
    if page.partial:
        missing = ", ".join(str(shard) for shard in page.missing_shards)
        lines.append(f"partial: shard {missing} did not answer; their items are missing")
    more = f", next page: --offset {page.next_offset}" if page.next_offset is not None else ""
    cached = ", embedding cached" if page.cached else ""
    lines.append(
        f"{page.query} query on {page.collection} v{page.version}: "
        f"{page.took_ms:.1f} ms{cached}{more}"
    )
    return "\n".join(lines)


def describe(hit: SearchHit) -> str:
    moment = ""
    if hit.start_s is not None and hit.end_s is not None:
        moment = f"{hit.start_s:.1f}\u2013{hit.end_s:.1f} s of "
    what = hit.caption if hit.caption else hit.uri
    if hit.kind == "segment":
        what = f"{hit.group_id} ({hit.uri})"
    return f"{moment}{what}"
