"""The embedded default corpus: seeded scenes of shapes and short videos, with exact captions."""

from model.data.synth.generate import (
    DATASET_JSON,
    IMAGES_CSV,
    VIDEOS_CSV,
    SynthConfig,
    generate_corpus,
    image_scenes,
    read_dataset_json,
)

__all__ = [
    "DATASET_JSON",
    "IMAGES_CSV",
    "VIDEOS_CSV",
    "SynthConfig",
    "generate_corpus",
    "image_scenes",
    "read_dataset_json",
]
