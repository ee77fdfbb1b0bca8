"""Golden embeddings: the current code must reproduce the vectors stored in tests/golden/.

Parity tests compare two code paths of one commit, and some code sits on both sides (training's
preprocessing calls ``runtime.image_decode.to_rgb``; video frame sampling), so a change there
passes them while it changes what every built index was embedded with. Here a fixed tiny model
(tests/golden_recipe.py) embeds fixed images, texts and a video through the torch model with
training's input code and through the exported ONNX bundle with the serving runtime's, and both
must match the stored vectors of the same path (open_clip's tests/test_inference.py does this).

Tolerance: cosine >= 0.9999 per vector and max abs difference <= 1e-5 per component (unit
vectors of 64 floats). Recomputing on one machine gives identical bits and torch vs ONNX Runtime
differ by ~1.5e-7, so 1e-5 leaves ~60x room for other CPUs, BLAS kernels and library versions;
a one-pixel change of the resize size moves components by 1e-2 or more (see the commit that
added this test).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.golden_recipe import GOLDEN, RECIPE_VERSION, compute

MIN_COSINE = 0.9999
MAX_ABS = 1e-5
REGENERATE = (
    "If this change is MEANT to move embeddings (every existing index must then be rebuilt), "
    "regenerate on purpose with `.venv/bin/python scripts/make_golden.py` and say so in the "
    "commit; otherwise the change altered preprocessing, tokenisation, frame sampling or the "
    "model and is a bug."
)
KEYS = [
    f"{path}/{modality}" for path in ("torch", "runtime") for modality in ("image", "text", "video")
]


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def current() -> Iterator[dict[str, np.ndarray]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield compute()
    finally:
        torch.set_num_threads(before)


def test_the_stored_file_is_the_current_recipe(stored: dict[str, np.ndarray]) -> None:
    recipe = json.loads(str(stored["recipe"]))
    assert recipe["recipe_version"] == str(RECIPE_VERSION), REGENERATE
    assert sorted(k for k in stored if k != "recipe") == sorted(KEYS)
    for key in KEYS:
        assert stored[key].dtype == np.float32
        assert np.allclose(np.linalg.norm(stored[key], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("key", KEYS)
def test_embeddings_match_the_golden_file(
    key: str, stored: dict[str, np.ndarray], current: dict[str, np.ndarray]
) -> None:
    expected, got = stored[key], current[key]
    assert got.shape == expected.shape, f"{key}: shape {got.shape} != {expected.shape}"
    cosine = np.sum(got * expected, axis=1)
    worst = float(np.abs(got - expected).max())
    reproduced = bool(cosine.min() >= MIN_COSINE) and worst <= MAX_ABS
    assert reproduced, (
        f"{key} moved away from {GOLDEN.name}: cosine per item {np.round(cosine, 6).tolist()} "
        f"(min {MIN_COSINE}), max abs difference {worst:.3g} (max {MAX_ABS}). {REGENERATE}"
    )
