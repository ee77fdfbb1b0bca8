"""Search results on the terminal: what ``cots index search`` prints for a collection or a
sharded one (each query, then its hits: score, uri, a video segment's moment, the caption)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # indexer.segments imports FAISS: `cots index --help` stays light
    from indexer.segments import Hit


def echo_hits(queries: Sequence[str], results: Sequence[Sequence[Hit]]) -> None:
    for query, hits in zip(queries, results, strict=True):
        click.echo(f"{query}")
        for hit in hits:
            moment = ""
            if hit.item.start_s is not None and hit.item.kind == "segment":
                moment = f" [{hit.item.start_s:.1f}-{hit.item.end_s:.1f} s]"
            caption = f"  {hit.item.caption!r}" if hit.item.caption else ""
            click.echo(f"  {hit.score:.3f}  {hit.item.uri}{moment}{caption}")
