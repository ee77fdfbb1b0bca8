"""``cots index shard``, and the other ``cots index`` commands on a sharded collection.

``indexer.cli`` registers :func:`shard_command` with its own ``--root`` and ``--collection``
options, then calls :func:`route_sharded` on its group: each command that takes a collection
checks ``sharded.json`` when it runs (``indexer.sharded.is_sharded``) and, for a sharded one,
``add``, ``remove``, ``compact``, ``search``, ``info`` and ``sync`` go through
``indexer.sharded_update``, ``indexer.sharded_sync`` and ``LocalShards``; ``duplicates`` says
it does not take one yet. Nothing heavy
is imported before a command runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

Decorator = Callable[[Any], Any]

_SHARD_HELP = """Split a collection into S shards by id, each a collection of its own.

\b
Item i goes to shard mix(i) % S (splitmix64: balanced whatever the ids'
strides). Each shard is a normal collection under
ROOT/NAME/shards/shard-<i> (its versions, segments, delete set and
compaction are its own); ROOT/NAME/sharded.json, written last, makes NAME
sharded. From then on `cots index add | remove | compact | search | info |
sync --collection NAME` go to its shards: adds take ids after the largest any
shard gave and go to their owning shard, removes to the shard that holds
the id, compaction and sync run per shard, and search asks every shard and merges
(the same hits, scores and order as the unsharded collection). An IVF
collection's coarse quantizer is trained once and copied into every shard;
other shards get the index their own size calls for. The unsharded
collection's files are left as they were (a snapshot, never changed again).

\b
  cots index shard --collection photos --shards 4 --replicas 2
  cots index shard --collection photos --shards 8 --ray   # shards as Ray tasks
"""


def shard_command(root_option: Decorator, collection_option: Decorator) -> click.Command:
    """The command, with ``indexer.cli``'s ``--root`` and ``--collection`` options (passed in:
    importing them would make the two modules import each other)."""

    @click.command("shard", help=_SHARD_HELP)
    @root_option
    @collection_option
    @click.option("--shards", type=int, required=True, help="S: shards to split into (at least 2).")
    @click.option(
        "--replicas",
        type=int,
        default=1,
        show_default=True,
        help="R: serving replicas of each shard (recorded in sharded.json for `cots serve`).",
    )
    @click.option(
        "--ray",
        "use_ray",
        is_flag=True,
        help="Build the shards as Ray tasks (RAY_ADDRESS picks the cluster; the index root "
        "must be on a file system every node sees).",
    )
    @click.option("--keep-versions", type=click.IntRange(min=1), default=3, show_default=True)
    def shard(
        root: Path, collection: str, shards: int, replicas: int, use_ray: bool, keep_versions: int
    ) -> None:
        from indexer.errors import IndexerError
        from indexer.sharded_build import split_collection

        try:
            info = split_collection(
                root,
                collection,
                shards,
                replicas,
                parallel="ray" if use_ray else "local",
                keep_versions=keep_versions,
            )
        except IndexerError as error:
            raise click.ClickException(str(error)) from None
        _echo_sharded(root, collection, f"split into {info.shards} shards")

    return shard


def route_sharded(group: click.Group) -> None:
    """Make ``group``'s commands that take ``--collection`` handle a sharded one (see the
    module docstring). Call it after every command is registered."""
    for name, handler in _HANDLERS.items():
        command = group.commands.get(name)
        if command is not None and command.callback is not None:
            command.callback = _routed(command.callback, handler)


def _routed(original: Callable[..., Any], handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def callback(**options: Any) -> Any:
        from indexer.sharded import is_sharded

        root, collection = options.get("root"), options.get("collection")
        if root is not None and collection and is_sharded(root, collection):
            return handler(**options)
        return original(**options)

    return callback


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


def _add(**options: Any) -> None:
    from pydantic import ValidationError

    from indexer.build_spec import BuildSpec
    from indexer.errors import IndexerError
    from indexer.sharded_update import add_corpus_sharded
    from runtime.errors import BundleRuntimeError

    try:
        spec = BuildSpec.model_validate({k: v for k, v in options.items() if v is not None})
        versions = add_corpus_sharded(spec)
    except (IndexerError, BundleRuntimeError, ValidationError) as error:
        raise _fail(error) from None
    _echo_sharded(options["root"], options["collection"], f"added; shard versions {versions}")


def _remove(
    root: Path, collection: str, ids: tuple[int, ...], where: tuple[str, ...], keep_versions: int
) -> None:
    from indexer.cli_where import parse_filters
    from indexer.errors import IndexerError
    from indexer.sharded_update import remove_sharded

    try:
        _, count = remove_sharded(
            root, collection, ids=ids, filters=parse_filters(where), keep_versions=keep_versions
        )
    except (IndexerError, ValueError) as error:
        raise _fail(error) from None
    _echo_sharded(root, collection, f"removed {count} items")


def _compact(
    root: Path,
    collection: str,
    keep_versions: int,
    full: bool,
    tombstone_ratio: float,
    max_segments: int,
    small_ratio: float,
) -> None:
    from indexer.compaction import CompactionPolicy
    from indexer.errors import IndexerError
    from indexer.sharded_update import compact_sharded

    policy = CompactionPolicy(
        full=full,
        tombstone_ratio=tombstone_ratio,
        max_segments=max_segments,
        small_ratio=small_ratio,
    )
    try:
        versions = compact_sharded(root, collection, keep_versions=keep_versions, policy=policy)
    except IndexerError as error:
        raise _fail(error) from None
    done = sum(v is not None for v in versions)
    _echo_sharded(root, collection, f"compacted {done} of {len(versions)} shards")


def _info(root: Path, collection: str, as_json: bool) -> None:
    from indexer.errors import IndexerError
    from indexer.sharded import read_sharded
    from indexer.sharded_update import shard_infos

    try:
        if as_json:
            whole = {
                "sharded": read_sharded(root, collection).model_dump(mode="json"),
                "shards": [i.model_dump(mode="json") for i in shard_infos(root, collection)],
            }
            click.echo(json.dumps(whole, indent=2))
        else:
            _echo_sharded(root, collection, "live")
    except IndexerError as error:
        raise _fail(error) from None


def _search(
    root: Path,
    collection: str,
    bundle: Path | None,
    texts: tuple[str, ...],
    images: tuple[Path, ...],
    k: int,
    where: tuple[str, ...],
    rescore: int | None = None,
    **others: Any,
) -> None:
    import numpy as np

    from indexer.cli_hits import echo_hits
    from indexer.cli_where import parse_filters
    from indexer.errors import IndexerError
    from indexer.sharded import LocalShards, read_sharded
    from runtime.encoder import Encoder
    from runtime.errors import BundleRuntimeError

    if not texts and not images:
        raise click.UsageError("give at least one --text or --image query")
    chosen = [f"--{name.replace('_', '-')}" for name, value in others.items() if value]
    if chosen:
        raise click.UsageError(f"{', '.join(chosen)}: not for a sharded collection yet")
    try:
        info = read_sharded(root, collection)
        if bundle is None and info.model_bundle_path is None:
            raise click.UsageError(f"collection {collection!r} records no bundle: name --bundle")
        encoder = Encoder(bundle or Path(str(info.model_bundle_path)))
        queries = [encoder.encode_texts(list(texts)), encoder.encode_images(list(images))]
        with LocalShards.open(root, collection, bundle_id=encoder.bundle_id) as opened:
            filters = parse_filters(where)
            results = opened.search(np.concatenate(queries), k, filters=filters, rescore=rescore)
    except (IndexerError, BundleRuntimeError) as error:
        raise _fail(error) from None
    echo_hits([*texts, *map(str, images)], results)


def _sync(
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
    from pydantic import ValidationError

    from indexer.errors import IndexerError
    from indexer.sharded_sync import sync_sharded
    from runtime.errors import BundleRuntimeError

    try:
        report = sync_sharded(
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
        raise _fail(error) from None
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        # The report's last clause names one version; a sharded collection has one a shard.
        done = "published to its shards" if report.published else "already in sync"
        _echo_sharded(root, collection, f"{report.summary().rsplit(';', 1)[0]}; {done}")


def _refuse(command: str, hint: str = "") -> Callable[..., None]:
    def refuse(root: Path, collection: str, **_: Any) -> None:
        from indexer.sharded import SHARDED_JSON

        raise click.ClickException(
            f"collection {collection!r} is sharded ({SHARDED_JSON}): `cots index {command}` "
            f"takes unsharded collections only{hint.format(root=root, name=collection)}"
        )

    return refuse


_UNSHARD = (
    "; build under a new name and split that (cots index shard), or make this one unsharded "
    "again by deleting {root}/{name}/sharded.json and {root}/{name}/shards (back to the "
    "snapshot it was split from, without the changes since)"
)


_HANDLERS: dict[str, Callable[..., None]] = {
    "add": _add,
    "remove": _remove,
    "compact": _compact,
    "info": _info,
    "search": _search,
    "sync": _sync,
    "duplicates": _refuse("duplicates", " (yet)"),
    "build": _refuse("build", _UNSHARD),
}


def _echo_sharded(root: Path, collection: str, what: str) -> None:
    from indexer.sharded import read_sharded
    from indexer.sharded_update import shard_infos

    info = read_sharded(root, collection)
    shards = shard_infos(root, collection)
    live = sum(s.live for s in shards)
    count = sum(s.count for s in shards)
    sizes = ", ".join(f"{s.live:,}" for s in shards)
    click.echo(
        f"{collection}: {what}; sharded: {info.shards} shards x {info.replicas} replicas, "
        f"{live:,} live of {count:,} vectors (per shard: {sizes}), {info.factory}"
        f"{', one shared quantizer' if info.shared_quantizer else ''}, model bundle "
        f"{info.model_bundle_id[:12]}"
    )
