"""``cots bench``: speed and memory goals, measured and recorded (not asserted in tests)."""

from __future__ import annotations

from typing import Final

import click

from cots.lazy import LazyGroup

BENCHMARKS: Final[dict[str, tuple[str, str]]] = {
    "train": ("model.bench:train_bench", "Training samples/s and memory per objective variant."),
    "quality": ("model.bench_quality:quality_bench", "The ablation table: train and evaluate."),
    "index": (
        "indexer.bench_build:index_bench",
        "Index build vs the encoder alone; FAISS QPS, recall and memory per index type.",
    ),
    "encode": (
        "model.bench_encode:encode_bench",
        "Texts/s and images/s, torch vs ONNX Runtime (fp32, int8), and their recall.",
    ),
    "serve": ("service.bench_serve:serve_bench", "Search latency and QPS through cots serve."),
}


@click.group(
    cls=LazyGroup,
    lazy_commands=BENCHMARKS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def bench() -> None:
    """Benchmarks. Each prints a markdown table and can write JSON results."""
