"""``cots negatives``: which hard negative captions training would write for a corpus.

Data flow: the corpus is read as training reads it (captions only, no pixels decoded), every
caption goes through :func:`model.hard_negatives.hard_negatives`, and the command prints how
much of the caption set each kind of swap covers (``coverage``) and a few captions with one
negative of each kind they have. A corpus whose captions name no colours, shapes, sizes, places,
relations or motions gets few negatives: the coverage says so before a run spends time on them.
"""

from __future__ import annotations

from pathlib import Path

import click

from model.config import NEGATIVE_KINDS


@click.command("negatives", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--split", default="train", show_default=True, help="Only captions of this split.")
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Captions to print with their negatives.",
)
@click.option(
    "--video", is_flag=True, help="SOURCE is a video CSV (filepath,caption,video_id,split)."
)
def negatives(source: Path, split: str, show: int, video: bool) -> None:
    """Report how much of SOURCE's captions the hard negative transform can use.

    SOURCE is any corpus `cots data inspect` reads (CSV, Karpathy JSON, WebDataset, a folder
    with .txt captions). Prints, per kind (colour, shape, size, position, relation, binding,
    motion), the share of captions with at least one such negative, then examples. Training
    uses them with `--set objective.hard_negatives.enabled=true`.
    """
    from model.data.readers import VideoCsvReader, open_image_corpus
    from model.data.records import CorpusError
    from model.hard_negatives import coverage, hard_negatives

    try:
        reader = (
            VideoCsvReader(source, split=split) if video else open_image_corpus(source, split=split)
        )
        captions = [caption for record in reader.records() for caption in record.captions]
    except CorpusError as error:
        raise click.ClickException(str(error)) from None
    if not captions:
        raise click.ClickException(f"no captions in {source} (split {split!r})")
    report = coverage(captions)
    click.echo(f"{len(captions):,} captions; with a negative: {report['any']:.1f} %")
    for kind in NEGATIVE_KINDS:
        click.echo(f"  {kind:<9} {report[kind]:5.1f} %")
    for caption in captions[:show]:
        click.echo(f"{caption!r}")
        seen: set[str] = set()
        for negative in hard_negatives(caption):
            if negative.kind not in seen:
                seen.add(negative.kind)
                click.echo(f"    {negative.kind:<9} {negative.text!r}")
