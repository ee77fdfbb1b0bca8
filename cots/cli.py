"""The ``cots`` command.

Subcommands live in the package that owns them and are imported only when they run, so
``cots serve`` and ``cots index`` never import torch, and ``cots --help`` imports nothing heavy.
"""

from __future__ import annotations

import logging
from typing import Final

import click

from cots import __version__
from cots.lazy import LazyGroup

# name -> ("module:attribute", one-line help)
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "data": ("model.data.cli:data", "Synthesise, convert and inspect corpora."),
    "demo": ("cots.demo:demo", "Run the end-to-end demo on the embedded synthetic corpus."),
    "quickstart": (
        "cots.quickstart:quickstart",
        "Index a folder of your own photos and videos and serve its search page.",
    ),
    "train": ("training.cli:train", "Train the two-tower model (COTS or the CLIP baseline)."),
    "eval": ("training.cli:evaluate", "Evaluate a checkpoint: Recall@K and median rank."),
    "negatives": (
        "training.negatives_cli:negatives",
        "Show the hard negative captions training would write for a corpus, and their coverage.",
    ),
    "export": ("training.cli:export", "Export a checkpoint to an ONNX model bundle."),
    "index": ("indexer.cli:index", "Build and change collections (versioned FAISS indexes)."),
    "worker": ("indexer.worker_cli:worker", "Run re-indexing jobs from the Redis queue."),
    "serve": ("service.cli:serve", "Serve the search API, the clip-retrieval API and the page."),
    "search": ("cots.client.cli:search", "Search a running server from the terminal."),
    "train-visual-tokenizer": (
        "training.visual_tokenizer_train:train_visual_tokenizer",
        "Train the VQ visual tokenizer for masked vision modeling.",
    ),
    "bench": ("cots.bench:bench", "Benchmarks: training cost, and more as they land."),
}
# old name -> current name: runs with a deprecation note, hidden from --help
DEPRECATED_COMMANDS: Final[dict[str, str]] = {"train-tokenizer": "train-visual-tokenizer"}


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    deprecated_aliases=DEPRECATED_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="cots")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """COTS Search: cross-modal retrieval of images and video moments by text, and back.

    Run `cots COMMAND --help` for the options of each command.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="cots")


if __name__ == "__main__":
    main()
