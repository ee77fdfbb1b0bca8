"""Two (or more) CPU processes in one gloo process group, for the DDP paths of the objectives.

``run_ranks(work, folder)`` spawns the ranks; each runs ``work(rank, folder)`` inside the
group and saves what the test compares under ``folder`` (``torch.save``), which
``rank_results`` reads back in rank order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WORLD_SIZE = 2


def run_ranks(work: Callable[[int, Path], Any], folder: Path) -> list[Any]:
    """Run ``work`` (a module-level function: it is pickled) on every rank; the results it
    saved with :func:`save_result`, in rank order."""
    torch.multiprocessing.spawn(_in_group, args=(work, str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def save_result(result: Any, rank: int, folder: Path) -> None:
    torch.save(result, folder / f"rank{rank}.pt")


def _in_group(rank: int, work: Callable[[int, Path], Any], folder: str) -> None:
    torch.set_num_threads(1)  # two ranks on a shared two-core machine
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE
    )
    try:
        work(rank, Path(folder))
    finally:
        torch.distributed.destroy_process_group()
