"""``cots bench``: speed and memory goals, measured and recorded (not asserted in tests).

The benchmarks live in the top-level ``benchmarks/`` package of a source checkout, not in the
wheel or the serving image, so ``cots bench`` runs from a checkout (an editable install) only.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Final

import click

from cots.lazy import LazyGroup

BENCHMARKS: Final[dict[str, tuple[str, str]]] = {
    "train": (
        "benchmarks.train:train_bench",
        "Training samples/s and memory per objective variant.",
    ),
    "quality": ("benchmarks.quality:quality_bench", "The ablation table: train and evaluate."),
    "index": (
        "benchmarks.index_build:index_bench",
        "Index build vs the encoder alone; FAISS QPS, recall and memory per index type.",
    ),
    "encode": (
        "benchmarks.encode:encode_bench",
        "Texts/s and images/s, torch vs ONNX Runtime (fp32, int8), and their recall.",
    ),
    "serve": ("benchmarks.serve:serve_bench", "Search latency and QPS through cots serve."),
    "querybank": (
        "benchmarks.querybank:querybank_bench",
        "Hubness correction (querybank normalisation) against plain cosine ranking.",
    ),
    "scenes": (
        "benchmarks.scenes:scenes_bench",
        "Scene queries by kind and scene size; test captions' recall by object count.",
    ),
    "scene-scoring": (
        "benchmarks.scene_scoring:scene_scoring_bench",
        "Scoring rules without retraining (word head, masked views) on the scene queries.",
    ),
}

NO_CHECKOUT: Final = (
    "cots bench needs a source checkout: the benchmarks live in the repository's benchmarks/ "
    "folder, which the wheel and the serving image leave out. Clone the repository, "
    'pip install -e ".[training]" there and run cots bench from it.'
)


def checkout_root() -> Path | None:
    """The source checkout this ``cots`` was installed from, if it holds ``benchmarks/``."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "__init__.py").is_file() else None


def ensure_benchmarks() -> None:
    """Make ``benchmarks`` importable (an editable install maps only the product packages, so
    the checkout goes on ``sys.path``), or fail with NO_CHECKOUT."""
    if find_spec("benchmarks") is not None:
        return
    root = checkout_root()
    if root is None:
        raise click.ClickException(NO_CHECKOUT)
    sys.path.insert(0, str(root))


class BenchGroup(LazyGroup):
    """Loads a benchmark's module from ``benchmarks/`` only when it runs."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            ensure_benchmarks()
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=BenchGroup,
    lazy_commands=BENCHMARKS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def bench() -> None:
    """Benchmarks (from a source checkout's benchmarks/). Each prints a markdown table and can
    write JSON results."""
