"""Write tests/golden/embeddings.npz: the golden embeddings that tests/test_golden.py checks.

Run it ONLY ON PURPOSE, when a change is meant to move embeddings (preprocessing, tokenisation,
video frame sampling, the towers, the export) and so every index built before it must be
rebuilt; say so in the commit that updates the file. A test failing in tests/test_golden.py is
otherwise a bug to fix, not a file to regenerate.

    .venv/bin/python scripts/make_golden.py

It builds a fixed ``cots-micro`` (weights drawn from a seeded NumPy generator, no download, no
training), embeds fixed inputs made in code (images, texts, one video; tests/golden_recipe.py)
through the torch model with training's preprocessing and through the exported ONNX bundle with
the serving runtime's, and stores both sets of float32 vectors with the recipe (~15 s on CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.golden_recipe import GOLDEN, compute, recipe  # noqa: E402


def main() -> None:
    vectors = compute()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    # The recipe as a 0-d unicode array (not pickled): np.load reads it without allow_pickle.
    arrays: dict[str, Any] = {
        "recipe": np.array(json.dumps(recipe(), ensure_ascii=False)),
        **vectors,
    }
    np.savez_compressed(GOLDEN, **arrays)
    shapes = ", ".join(f"{key} {value.shape}" for key, value in vectors.items())
    print(f"wrote {GOLDEN.relative_to(ROOT)} ({GOLDEN.stat().st_size:,} bytes): {shapes}")


if __name__ == "__main__":
    main()
