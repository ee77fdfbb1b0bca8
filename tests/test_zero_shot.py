"""Zero-shot bundles: ``cots export --model NAME --pretrained FILE`` with no training.

Small open_clip architectures (``tests/open_clip_archs.py``: a ViT with CLIP's text tower, a
bidirectional SigLIP-style text tower, a ResNet image tower, a model whose tokenizer comes from
a model hub) are registered, built with random weights and saved as open_clip saves
checkpoints. The bundles are compared with open_clip's own ``encode_image``/``encode_text`` of
the same weights, through the serving runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers

from cots.cli import cli
from model.config import DataConfig, PreprocessConfig
from model.data.synth import SynthConfig, generate_corpus
from model.factory import create_towers
from model.preprocess import to_tensor_batch
from model.tokenizer import tokenize
from runtime.bundle import read_manifest
from runtime.encoder import Encoder
from service.settings import Settings
from tests.live_server import live_server
from tests.open_clip_archs import register_architectures, saved_weights
from tests.test_readers import png_bytes
from training.training_data import csv_reader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_architectures(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zs-corpus")
    config = SynthConfig(seed=5, n_images=24, n_videos=0, image_size=32)
    generate_corpus(root, config, workers=1)
    return root / "images.csv"


def _export(*args: str) -> Any:
    return CliRunner().invoke(cli, ["export", "--no-fp16", "--quiet", *args])


def _zero_shot(name: str, folder: Path) -> tuple[Any, Encoder]:
    """(open_clip's model, the runtime of its zero-shot fp32 bundle)."""
    clip, weights = saved_weights(name, folder)
    bundle = folder / "bundle"
    result = _export("--model", name, "--pretrained", str(weights), "--out", str(bundle))
    assert result.exit_code == 0, result.output
    return clip, Encoder(bundle, providers=["cpu"], precision="fp32")


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


@torch.no_grad()
def test_zero_shot_bundle_reproduces_open_clip(
    registered: Path, corpus: Path, tmp_path: Path
) -> None:
    clip, weights = saved_weights("test-zs-vit", tmp_path)
    bundle = tmp_path / "bundle"
    result = _export(
        "--model",
        "test-zs-vit",
        "--pretrained",
        str(weights),
        "--out",
        str(bundle),
        "--corpus",
        str(corpus),
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    assert manifest.source == {"pretrained": str(weights), "zero_shot": True}
    assert manifest.model_name == "test-zs-vit"
    assert manifest.image.size == 32
    assert manifest.text.context_length == 16
    assert manifest.text.trim_padding  # causal CLIP text tower, pooled at end of text
    assert {"fp32/image/corpus", "fp32/text/corpus", "fp32/text/random"} <= set(manifest.checks)

    samples = list(csv_reader(DataConfig(train=corpus, split_key=None), None).samples())[:12]
    images = [s.image for s in samples]
    captions = [s.captions[0] for s in samples]
    pre = PreprocessConfig(image_size=32)
    expected_images = clip.encode_image(to_tensor_batch(images, pre), normalize=True).numpy()
    expected_texts = clip.encode_text(tokenize(captions, 16), normalize=True).numpy()
    encoder = Encoder(bundle, providers=["cpu"], precision="fp32")
    assert _min_cosine(encoder.encode_images(images), expected_images) >= 0.9999
    assert _min_cosine(encoder.encode_texts(captions), expected_texts) >= 0.9999


@torch.no_grad()
def test_a_zero_shot_bundle_is_indexed_and_served_unchanged(
    registered: Path, corpus: Path, tmp_path: Path
) -> None:
    """``cots index build`` and ``cots serve`` take a zero-shot bundle as they take a trained
    one: the server's scores are open_clip's own cosines of the same weights."""
    clip, _ = _zero_shot("test-zs-vit", tmp_path)
    bundle = tmp_path / "bundle"
    root = tmp_path / "indices"
    for name, kind in (("images", "image"), ("captions", "caption")):
        where = ["--root", str(root), "--collection", name, "--bundle", str(bundle)]
        what = ["--corpus", str(corpus), "--kind", kind, "--workers", "0"]
        built = CliRunner().invoke(cli, ["index", "build", *where, *what])
        assert built.exit_code == 0, built.output

    samples = list(csv_reader(DataConfig(train=corpus, split_key=None), None).samples())
    pre = PreprocessConfig(image_size=32)
    images = clip.encode_image(to_tensor_batch([s.image for s in samples], pre), normalize=True)
    query = samples[3].captions[0]
    text = clip.encode_text(tokenize([query], 16), normalize=True)
    expected = np.sort((images @ text.T).numpy()[:, 0])[::-1][:3]

    settings = Settings(bundle=bundle, index_root=root, rate_limit_per_minute=0)
    with live_server(settings) as server, server.client() as http:
        found = http.post("/v1/collections/images/search", json={"text": query, "k": 3})
        assert found.status_code == 200, found.text
        scores = [hit["score"] for hit in found.json()["hits"]]
        assert scores == pytest.approx(expected.tolist(), abs=1e-4)

        upload = {"image": ("query.png", png_bytes(samples[5].image), "image/png")}
        similar = http.post("/v1/collections/images/search/upload", files=upload, data={"k": "1"})
        assert similar.status_code == 200, similar.text
        assert similar.json()["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

        captions = http.post("/v1/collections/captions/search", json={"text": query, "k": 1})
        assert captions.status_code == 200, captions.text
        assert captions.json()["hits"][0]["caption"] == query


def test_padding_is_trimmed_exactly_when_that_is_lossless(registered: Path) -> None:
    assert create_towers("test-zs-vit").trims_padding
    assert not create_towers("test-zs-bidir").trims_padding
    assert not create_towers("test-zs-bidir-argmax").trims_padding
    # Evidence, not just the rule: cutting the padding changes a bidirectional tower's output
    # and leaves a causal one's unchanged.
    tokens = tokenize(["a small red circle", "a big blue star on the left"], 16)
    short = tokens[:, : int((tokens != 0).sum(1).max())]
    with torch.no_grad():
        for name, lossless in (("test-zs-vit", True), ("test-zs-bidir-argmax", False)):
            towers = create_towers(name).eval()
            same = torch.allclose(towers.encode_text(tokens), towers.encode_text(short), atol=1e-5)
            assert same is lossless, name


@torch.no_grad()
def test_a_bidirectional_text_tower_is_exported_at_full_length(
    registered: Path, tmp_path: Path
) -> None:
    clip, encoder = _zero_shot("test-zs-bidir", tmp_path)
    assert not encoder.manifest.text.trim_padding
    captions = ["a small red circle", "two big stars, one green, one blue"]
    ids = encoder.tokenizer(captions)
    assert ids.shape == (2, 16)  # padded to the context length, as the tower was trained
    expected = clip.encode_text(tokenize(captions, 16), normalize=True).numpy()
    assert _min_cosine(encoder.encode_texts(captions), expected) >= 0.9999


@torch.no_grad()
def test_a_resnet_image_tower_exports(registered: Path, tmp_path: Path) -> None:
    clip, encoder = _zero_shot("test-zs-rn", tmp_path)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = clip.encode_image(pixels, normalize=True).numpy()
    assert _min_cosine(encoder.run("image", pixels.numpy()), expected) >= 0.9999
    pooled, tokens = create_towers("test-zs-rn").image_features(pixels)
    assert pooled.shape == (3, 24)
    assert tokens.shape == (3, 0, 24)


_WORDS = ("a", "small", "big", "red", "blue", "green", "circle", "star", "on", "the", "left")
_QUERY = ("a", "big", "red", "star", "on", "the", "left")


def _word_tokenizer(path: Path) -> list[str]:
    words = ["<pad>", "<unk>", *_WORDS]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return words


@torch.no_grad()
def test_a_hub_tokenizer_is_refused_without_a_local_file_and_used_as_given(
    registered: Path, tmp_path: Path
) -> None:
    clip, weights = saved_weights("test-zs-hubtok", tmp_path)
    bundle = tmp_path / "bundle"
    args = ["--model", "test-zs-hubtok", "--pretrained", str(weights), "--out", str(bundle)]
    refused = _export(*args)
    assert refused.exit_code != 0
    assert "example/hub-only-tokenizer" in refused.output
    assert "--tokenizer" in refused.output
    assert not bundle.exists()

    words = _word_tokenizer(tmp_path / "tokenizer.json")
    result = _export(*args, "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    assert not manifest.text.trim_padding
    assert manifest.text.pad_id == 0
    encoder = Encoder(bundle, providers=["cpu"], precision="fp32")
    ids = encoder.tokenizer(["a big red star on the left"])
    assert ids[0, :7].tolist() == [words.index(w) for w in _QUERY]
    assert ids.shape == (1, 16)
    assert ids[0, 7:].tolist() == [0] * 9
    expected = clip.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    assert _min_cosine(encoder.encode_texts(["a big red star on the left"]), expected) >= 0.9999


def test_bad_requests_fail_clearly(registered: Path, tmp_path: Path) -> None:
    _, weights = saved_weights("test-zs-vit", tmp_path)
    out = str(tmp_path / "bundle")
    cases = {
        ("--model", "no-such-model", "--pretrained", str(weights)): "unknown model config",
        ("--model", "test-zs-vit", "--pretrained", "laion9b_nope"): "neither a file nor",
        ("--model", "test-zs-rn", "--pretrained", str(weights)): "cannot load weights",
        ("--model", "test-zs-vit"): "--model and --pretrained",
        ("--checkpoint", str(weights), "--model", "test-zs-vit", "--pretrained", "x"): "not both",
    }
    for args, message in cases.items():
        result = _export(*args, "--out", out)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not Path(out).exists()


def test_a_known_tag_without_a_network_names_the_way_out(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cots.cli", "export", "--model", "ViT-B-32"]
    command += ["--pretrained", "openai", "--out", str(tmp_path / "b"), "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "could not fetch open_clip weights ViT-B-32/openai" in result.stderr
    assert "pass a local checkpoint file" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_encode_measures_an_open_clip_model_zero_shot(
    registered: Path, corpus: Path, tmp_path: Path
) -> None:
    _, weights = saved_weights("test-zs-vit", tmp_path)
    args = ["bench", "encode", "--model", "test-zs-vit", "--pretrained", str(weights)]
    result = CliRunner().invoke(cli, [*args, "--data", str(corpus), "--int8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = {
        line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:-1]]
        for line in result.output.splitlines()
        if line.startswith(("| torch", "| onnx"))
    }
    assert set(rows) == {"torch fp32", "onnx fp32", "onnx int8"}
    assert all(cell > 0 for cells in rows.values() for cell in cells[:8])
    assert rows["torch fp32"][10:] == pytest.approx([1.0, 1.0], abs=1e-4)
    # int8 is close to fp32, not equal; printed to 4 decimals, a tiny model's can round to 1
    assert all(0.9 < cosine <= 1.0 for cosine in rows["onnx int8"][10:])
    missing = CliRunner().invoke(cli, args)
    assert missing.exit_code != 0
    assert "--model needs --data" in missing.output
