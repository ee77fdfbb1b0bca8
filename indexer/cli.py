"""``cots index build | add | remove | compact | info | search``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from indexer.cli_hits import echo_hits
from indexer.cli_where import parse_filters
from indexer.home import DEFAULT_INDEX_ROOT, INDEX_ROOT_VARIABLE

if TYPE_CHECKING:
    from indexer.build_spec import BuildSpec

_ROOT_HELP = (
    "Folder holding the collections, shared by every cots command [COTS_INDEX_ROOT; default "
    f"{DEFAULT_INDEX_ROOT}]."
)


def _root_option(function: Any) -> Any:
    return click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=INDEX_ROOT_VARIABLE,
        default=DEFAULT_INDEX_ROOT,
        help=_ROOT_HELP,
    )(function)


def _collection_option(function: Any) -> Any:
    return click.option("--collection", required=True, help="Collection name.")(function)


def _spec_options(function: Any) -> Any:
    options = [
        click.option(
            "--bundle",
            type=click.Path(file_okay=False, path_type=Path),
            required=True,
            help="Model bundle (cots export) that embeds the corpus.",
        ),
        click.option(
            "--corpus",
            required=True,
            help="CSV/TSV, image folder, WebDataset shards, Karpathy JSON, or a video CSV.",
        ),
        click.option(
            "--kind",
            type=click.Choice(["image", "caption", "video"]),
            default="image",
            show_default=True,
            help="image: a vector per image; caption: per caption (image->text lookup); "
            "video: per video and per segment (search answers with a moment).",
        ),
        click.option("--split", help="Only this split of the corpus."),
        click.option(
            "--segment-seconds", type=float, default=2.0, show_default=True, help="Video segments."
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="Decoding processes.",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option(
            "--keep-versions",
            type=click.IntRange(min=1),
            default=3,
            show_default=True,
            help="Versions kept after the new one goes live.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def index() -> None:
    """Build and change collections: versioned FAISS index bundles of a corpus.

    Each build or change writes a new version next to the old ones and switches the
    collection's `current` pointer atomically when it is complete.
    """


@index.command()
@_root_option
@_collection_option
@_spec_options
@click.option(
    "--factory",
    default="auto",
    show_default=True,
    help="FAISS factory string (Flat, IVF1024,Flat, IVF1024,PQ32, HNSW32) or auto.",
)
@click.option("--memory-budget-mb", type=click.IntRange(min=1), help="Index memory for auto.")
@click.option(
    "--index-field",
    "index_fields",
    multiple=True,
    metavar="KEY",
    help="Metadata key to index for filters (repeatable), e.g. --index-field year; later adds "
    "and compactions index it too.",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: embed with a Ray Data pipeline (RAY_ADDRESS picks the cluster).",
)
def build(**options: Any) -> None:
    """Embed a corpus into a new version of a collection; resumes an interrupted build.

    Items that cannot be read are logged with their path and reason, counted in index.json
    and skipped; they never stop the build.
    """
    from indexer.build import build_collection

    version = _run_spec(build_collection, options)
    _echo_info(options["root"], options["collection"], f"built version {version}")


@index.command()
@_root_option
@_collection_option
@_spec_options
def add(**options: Any) -> None:
    """Embed more items into a collection (a new version; ids continue after the largest)."""
    from indexer.update import add_to_collection

    version = _run_spec(add_to_collection, options)
    _echo_info(options["root"], options["collection"], f"added; now version {version}")


def _run_spec(action: Callable[[BuildSpec], int], options: dict[str, Any]) -> int:
    """Validate the command's options as a BuildSpec and run ``action`` on it; failures
    become clear command errors."""
    from pydantic import ValidationError

    from indexer.build_spec import BuildSpec
    from indexer.errors import IndexerError
    from runtime.errors import BundleRuntimeError

    try:
        return action(BuildSpec.model_validate({k: v for k, v in options.items() if v is not None}))
    except (IndexerError, BundleRuntimeError, ValidationError) as error:
        raise _fail(error) from None


@index.command()
@_root_option
@_collection_option
@click.option("--id", "ids", type=int, multiple=True, help="Item id to remove (repeatable).")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="CONDITION",
    help="Remove the items that match, e.g. --where split=test --where 'year<2000' "
    "(=, !=, >, >=, <, <=; a|b for one of; repeat to AND).",
)
@click.option("--keep-versions", type=click.IntRange(min=1), default=3, show_default=True)
def remove(
    root: Path, collection: str, ids: tuple[int, ...], where: tuple[str, ...], keep_versions: int
) -> None:
    """Remove items by id or by field; they never appear in results again."""
    from indexer.errors import IndexerError
    from indexer.update import remove_from_collection

    try:
        version, count = remove_from_collection(
            root, collection, ids=ids, filters=parse_filters(where), keep_versions=keep_versions
        )
    except (IndexerError, ValueError) as error:  # ValueError: no ids and no filter
        raise _fail(error) from None
    _echo_info(root, collection, f"removed {count} items; now version {version}")


@index.command()
@_root_option
@_collection_option
@click.option("--keep-versions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--full", is_flag=True, help="Merge every segment into one, whatever the policy.")
@click.option(
    "--tombstone-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.2,
    show_default=True,
    help="Rewrite a segment once this share of its items is removed.",
)
@click.option(
    "--max-segments",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Beyond this many segments, merge the newest small ones.",
)
@click.option(
    "--small-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="'Small': fewer items than this share of the largest segment.",
)
def compact(
    root: Path,
    collection: str,
    keep_versions: int,
    full: bool,
    tombstone_ratio: float,
    max_segments: int,
    small_ratio: float,
) -> None:
    """Merge segments and drop removed items, as the policy says (see docs/index.md).

    Each change adds a segment or a delete set; compaction merges neighbouring segments into
    one (IVF centroids trained anew when the merged one is large) and publishes a new version.
    A collection built before segments (index format 1) is rewritten whole."""
    from indexer.compaction import CompactionPolicy, compact_collection
    from indexer.errors import IndexerError

    policy = CompactionPolicy(
        full=full,
        tombstone_ratio=tombstone_ratio,
        max_segments=max_segments,
        small_ratio=small_ratio,
    )
    try:
        version = compact_collection(root, collection, keep_versions=keep_versions, policy=policy)
    except IndexerError as error:
        raise _fail(error) from None
    if version is None:
        _echo_info(root, collection, "nothing to compact (the policy found no segment to merge)")
    else:
        _echo_info(root, collection, f"compacted; now version {version}")


@index.command()
@_root_option
@_collection_option
@click.option("--json", "as_json", is_flag=True, help="Print index.json of the live version.")
def info(root: Path, collection: str, as_json: bool) -> None:
    """The live version of a collection: count, index type, recall@10, model bundle."""
    from indexer.errors import IndexerError
    from indexer.index_bundle import read_info
    from indexer.versions import current_dir

    try:
        folder = current_dir(root, collection)
    except IndexerError as error:
        raise _fail(error) from None
    if as_json:
        click.echo(read_info(folder).model_dump_json(indent=2))
    else:
        _echo_info(root, collection, "live")


@index.command()
@_root_option
@_collection_option
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model bundle [default: the one the collection was built with].",
)
@click.option("--text", "texts", multiple=True, help="Text query (repeatable).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-k", type=click.IntRange(min=1, max=1000), default=5, show_default=True)
@click.option(
    "--where",
    multiple=True,
    metavar="CONDITION",
    help="Filter, e.g. --where split=test --where 'year>=2020' (=, !=, >, >=, <, <=; a|b for "
    "one of; repeat to AND).",
)
@click.option(
    "--rescore",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Compressed indexes (PQ, SQ) rescore k x N candidates exactly with the stored vectors "
    "(1: their own scores) [default: by segment size: 4 up to 200k vectors, 16 up to 2M, "
    "32 beyond].",
)
def search(
    root: Path,
    collection: str,
    bundle: Path | None,
    texts: tuple[str, ...],
    images: tuple[Path, ...],
    k: int,
    where: tuple[str, ...],
    rescore: int | None,
) -> None:
    """Search a collection from the command line (text or image queries)."""
    import numpy as np

    from indexer.collection import Collection
    from indexer.errors import IndexerError
    from runtime.encoder import Encoder
    from runtime.errors import BundleRuntimeError

    if not texts and not images:
        raise click.UsageError("give at least one --text or --image query")
    from indexer.home import bundle_of_collections

    try:
        encoder = Encoder(bundle or bundle_of_collections(root, [collection]))
        queries = [encoder.encode_texts(list(texts)), encoder.encode_images(list(images))]
        with Collection.open(root, collection, bundle_id=encoder.bundle_id) as opened:
            filters = parse_filters(where)
            results = opened.search(np.concatenate(queries), k, filters=filters, rescore=rescore)
    except (IndexerError, BundleRuntimeError) as error:
        raise _fail(error) from None
    echo_hits([*texts, *map(str, images)], results)


def _echo_info(root: Path, collection: str, what: str) -> None:
    from indexer.index_bundle import read_info
    from indexer.versions import current_dir, current_version

    info = read_info(current_dir(root, collection))
    skipped = sum(info.skipped.values())
    n = len(info.segments)
    segments = f", {n} segment{'s' if n != 1 else ''}" if n else ""
    if info.tombstones:
        segments += f" ({info.tombstones:,} removed items awaiting compaction)"
    click.echo(
        f"{collection}: {what}; version {current_version(root, collection)}, {info.live:,} live "
        f"of {info.count:,} {info.modality} vectors{segments}, {info.factory}, recall@10 "
        f"{info.recall_at_10:.3f}, model bundle {info.model_bundle_id[:12]}"
        + (f", {skipped} items skipped ({info.skipped})" if skipped else "")
    )


# Registered last, with this module's --root (indexer.cli_sync imports nothing heavy at import).
from indexer.cli_sync import sync_command  # noqa: E402

index.add_command(sync_command(_root_option))

from indexer.cli_duplicates import duplicates_command  # noqa: E402

index.add_command(duplicates_command(_root_option, _collection_option))

from indexer.cli_shard import route_sharded, shard_command  # noqa: E402

index.add_command(shard_command(_root_option, _collection_option))
route_sharded(index)  # last: add/remove/compact/search/info on a sharded collection
