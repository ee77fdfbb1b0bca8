"""``cots export`` and the encoder runtime: real checkpoints, real ONNX files, real ORT.

Two checkpoints are trained for a couple of steps on synthetic corpora: an image model with
COOKIE's head and the [MASK] row (the most graph to export), and a video model with temporal
pooling. Each is exported once per module (the image one through the CLI).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cots.cli import cli
from model.data.synth import SynthConfig, generate_corpus
from model.preprocess import to_tensor_batch
from model.tokenizer import tokenize
from runtime import encoder as encoder_module
from runtime.bundle import MANIFEST, Precision, read_manifest
from runtime.encoder import Encoder
from runtime.errors import BundleError, InputError
from tests.micro import train_micro
from training.eval_splits import towers_from_checkpoint
from training.export import ExportError, ExportOptions, export_bundle
from training.training_data import load_split
from training.video_data import VideoPairDataset, load_video_split

pytestmark = pytest.mark.slow
CONTEXT = 48  # cots-micro's context length


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of an image model with COOKIE's head and the [MASK] row."""
    root = tmp_path_factory.mktemp("export-image")
    generate_corpus(
        root / "corpus", SynthConfig(seed=3, n_images=40, n_videos=0, image_size=40), workers=1
    )
    checkpoint = train_micro(
        root / "corpus" / "images.csv",
        root / "run",
        cookie={"enabled": True},
        objective={"queue_size": 16, "masked": {"mlm_weight": 1.0}},
    )
    bundle = root / "bundle"
    result = CliRunner().invoke(
        cli, ["export", "--checkpoint", str(checkpoint), "--out", str(bundle), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "parity:" in result.output
    return checkpoint, bundle


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export-video")
    generate_corpus(
        root / "corpus",
        SynthConfig(seed=4, n_images=0, n_videos=16, video_size=48, video_frames=12),
        workers=1,
    )
    checkpoint = train_micro(
        root / "corpus" / "videos.csv",
        root / "run",
        data={
            "train": str(root / "corpus" / "videos.csv"),
            "modality": "video",
            "group_key": "video_id",
            "eval_splits": ["test"],
        },
        video={"frames": 4, "decode_frames": 8},
    )
    bundle = root / "bundle"
    export_bundle(checkpoint, bundle, ExportOptions(progress=False, int8=True))
    return checkpoint, bundle


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_bundle_has_every_file_and_what_a_consumer_needs(image_run: tuple[Path, Path]) -> None:
    checkpoint, bundle = image_run
    manifest = read_manifest(bundle)
    expected = {f"{m}{p}.onnx" for m in ("image", "text", "video") for p in ("", ".fp16")}
    assert set(manifest.files) == expected | {"tokenizer.json"}
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        expected | {"tokenizer.json", MANIFEST}
    )
    towers, config, state = towers_from_checkpoint(checkpoint)
    assert manifest.embed_dim == towers.embed_dim
    assert manifest.image.size == config.preprocess.image_size
    assert manifest.image.mean == config.preprocess.mean
    assert manifest.text.context_length == CONTEXT
    assert manifest.text.trim_padding
    assert manifest.video.frames == config.video.frames
    assert manifest.video.pooling == "mean"
    assert manifest.model_name == "cots-micro"
    assert manifest.model_config_["embed_dim"] > 0
    assert manifest.onnx.opset == 18
    assert manifest.metrics == state["evals"]
    assert "test" in manifest.metrics
    assert manifest.source["step"] == 2
    # The export's own parity checks, recorded per precision and case.
    assert {k for k in manifest.checks} >= {
        f"{p}/{c}"
        for p in ("fp32", "fp16")
        for c in ("image/random", "text/random", "video/random", "image/corpus", "text/corpus")
    }
    for name, cosine in manifest.checks.items():
        assert cosine >= (0.9999 if name.startswith("fp32") else 0.999), name
    # Nothing of the export's scratch folder is left next to the bundle.
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []


def test_graphs_take_a_dynamic_batch_and_text_a_dynamic_length(
    image_run: tuple[Path, Path],
) -> None:
    _, bundle = image_run
    size = read_manifest(bundle).image.size
    shapes = {
        name: ort.InferenceSession(str(bundle / f"{name}.onnx")).get_inputs()[0].shape
        for name in ("image", "text", "video")
    }
    assert shapes["image"] == ["batch", 3, size, size]
    assert shapes["text"] == ["batch", "length"]
    assert shapes["video"] == ["batch", 4, 3, size, size]


def test_runtime_matches_torch_on_corpus_images_and_captions(image_run: tuple[Path, Path]) -> None:
    """Each side with its own decoding, preprocessing and tokenizer."""
    checkpoint, bundle = image_run
    towers, config, _ = towers_from_checkpoint(checkpoint)
    split = load_split(config.data, "test", CONTEXT)
    paths = [r.path for r in split.records if r.path is not None]
    captions = [c for caps in split.captions for c in caps]
    from model.data.readers import load_image

    with torch.no_grad():
        pixels = to_tensor_batch([load_image(r) for r in split.records], config.preprocess)
        torch_images = towers.encode_image(pixels).numpy()
        torch_texts = towers.encode_text(tokenize(captions, CONTEXT)).numpy()
    bounds: dict[Precision, float] = {"fp32": 0.9999, "fp16": 0.999}
    for precision, bound in bounds.items():
        encoder = Encoder(bundle, precision=precision, batch_size=5)
        images = encoder.encode_images(paths)
        texts = encoder.encode_texts(captions)
        assert images.dtype == np.float32
        assert images.shape == torch_images.shape
        assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
        assert _cosines(images, torch_images).min() >= bound, precision
        assert _cosines(texts, torch_texts).min() >= bound, precision


def test_trimming_padding_gives_the_same_text_embedding(image_run: tuple[Path, Path]) -> None:
    """A batch padded to its longest text embeds as the same batch padded to the context
    length, in torch and in ONNX Runtime, while costing a fraction of the work."""
    checkpoint, bundle = image_run
    towers, _, _ = towers_from_checkpoint(checkpoint)
    encoder = Encoder(bundle)
    texts = ["a red circle", "two blue squares left of a green triangle", ""]
    trimmed = encoder.tokenizer(texts)
    assert trimmed.shape == (3, int((trimmed != 0).sum(axis=1).max()))
    assert trimmed.shape[1] < CONTEXT
    full = np.zeros((3, CONTEXT), dtype=np.int64)
    full[:, : trimmed.shape[1]] = trimmed
    assert np.array_equal(full, tokenize(texts, CONTEXT).numpy())
    ort_trimmed, ort_full = encoder.run("text", trimmed), encoder.run("text", full)
    assert np.abs(ort_trimmed - ort_full).max() < 1e-5
    padded = torch.from_numpy(full)
    with torch.no_grad():
        short = towers.encode_text(torch.from_numpy(trimmed)).numpy()
        whole = towers.encode_text(padded).numpy()
        pooled, states = towers.text(padded)  # open_clip's own forward, full length only
        own = torch.nn.functional.normalize(towers.add_text_head(pooled, states, padded), dim=-1)
    assert np.abs(short - whole).max() < 1e-5
    assert np.abs(whole - own.numpy()).max() < 1e-5
    assert np.abs(ort_trimmed - whole).max() < 1e-4


def test_video_bundle_matches_the_training_evaluation_path(video_run: tuple[Path, Path]) -> None:
    """Frames decoded, sampled and preprocessed by the runtime embed as training's evaluation
    embeds the same videos."""
    checkpoint, bundle = video_run
    towers, config, _ = towers_from_checkpoint(checkpoint)
    manifest = read_manifest(bundle)
    assert manifest.video.pooling == "temporal"
    assert manifest.video.frames == 4
    assert set(manifest.models["video"]) == {"fp32", "fp16", "int8"}
    split = load_video_split(config.data, "train", CONTEXT, config.preprocess, decode_frames=8)
    dataset = VideoPairDataset(split, config.preprocess, 4, train=False)
    with torch.no_grad():
        frames = torch.stack([dataset[i, 0][0] for i in range(len(dataset))])
        expected = towers.encode_image(frames).numpy()
    got = Encoder(bundle, batch_size=3).encode_videos([r.path for r in split.records])
    assert _cosines(got, expected).min() >= 0.9999
    int8 = Encoder(bundle, precision="int8").encode_videos([r.path for r in split.records])
    assert _cosines(int8, expected).min() >= 0.99


def test_runtime_never_imports_torch(
    image_run: tuple[Path, Path], video_run: tuple[Path, Path]
) -> None:
    image_bundle, video_bundle = image_run[1], video_run[1]
    image = next((image_bundle.parent / "corpus" / "images").rglob("*.png"))
    video = next((video_bundle.parent / "corpus").rglob("*.mp4"))
    code = f"""
import sys
import indexer, service
from runtime.encoder import Encoder
texts = Encoder({str(image_bundle)!r}).encode_texts(["a red circle", "a blue square"])
images = Encoder({str(image_bundle)!r}).encode_images([__import__("pathlib").Path({str(image)!r})])
videos = Encoder({str(video_bundle)!r}).encode_videos([{str(video)!r}])
assert texts.shape[0] == 2 and images.shape[0] == 1 and videos.shape[0] == 1
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "open_clip")))
print("leaked:", leaked)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "leaked: []"


@pytest.fixture
def bundle_copy(image_run: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(image_run[1], copy)
    return copy


def _edit_manifest(bundle: Path, **changes: Any) -> None:
    path = bundle / MANIFEST
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_missing_files_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "text.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing text\.onnx"):
        Encoder(bundle_copy)
    (bundle_copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        Encoder(bundle_copy)
    with pytest.raises(BundleError, match="does not exist"):
        Encoder(bundle_copy / "nope")


def test_changed_files_and_edited_manifests_are_refused(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "image.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / "image.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"image\.onnx does not match its hash"):
        Encoder(bundle_copy)
    # verify=False skips hashing the files (a trusted, read-only volume), not the manifest.
    Encoder(bundle_copy, verify=False)
    raw = json.loads((bundle_copy / MANIFEST).read_text())
    _edit_manifest(bundle_copy, image={**raw["image"], "size": 224})
    with pytest.raises(BundleError, match="edited after export"):
        Encoder(bundle_copy, verify=False)


def test_unknown_format_versions_and_broken_manifests_are_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, format_version=99)
    with pytest.raises(BundleError, match=r"format version 99; this code reads version 1"):
        Encoder(bundle_copy)
    _edit_manifest(bundle_copy, format_version=1, embed_dim="wide")
    with pytest.raises(BundleError, match=r"embed_dim: .*integer"):
        Encoder(bundle_copy)
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        Encoder(bundle_copy)


def test_bad_inputs_fail_clearly(image_run: tuple[Path, Path], tmp_path: Path) -> None:
    encoder = Encoder(image_run[1], max_pixels=10_000)
    with pytest.raises(InputError, match="not a single str"):
        encoder.encode_texts("a red circle")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="text 1 is a int, not a str"):
        encoder.encode_texts(["ok", 3])  # type: ignore[list-item]
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    with pytest.raises(InputError, match="too large"):
        encoder.encode_images([big])
    with pytest.raises(BundleError, match="no int8 image model"):
        Encoder(image_run[1], precision="int8")


def test_export_refuses_to_overwrite_and_a_failed_check_leaves_nothing(
    image_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, bundle = image_run
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_bundle(checkpoint, bundle, ExportOptions(progress=False))
    monkeypatch.setitem(__import__("training.export").export.MIN_COSINE, "fp32", 1.5)
    out = tmp_path / "failed"
    with pytest.raises(ExportError, match=r"fp32 image/random: min cosine .* < 1\.5"):
        export_bundle(checkpoint, out, ExportOptions(progress=False, fp16=False))
    assert list(tmp_path.iterdir()) == []


def test_bench_encode_compares_torch_and_the_runtime(image_run: tuple[Path, Path]) -> None:
    checkpoint, bundle = image_run
    args = ["bench", "encode", "--checkpoint", str(checkpoint), "--bundle", str(bundle)]
    result = CliRunner().invoke(cli, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in result.output.splitlines()
        if line.startswith("| torch") or line.startswith("| onnx")
    }
    assert set(rows) == {"torch fp32", "onnx fp32"}
    # Texts/s (captions, 16-token queries, full context) and images/s at batch 1 and 64.
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells[:8])
    # The same model through both paths retrieves the same (recall columns agree) and embeds
    # the same (cosine with ONNX fp32 at 1 to four places).
    assert rows["torch fp32"][8:10] == rows["onnx fp32"][8:10]
    assert [float(c) for c in rows["torch fp32"][10:]] == pytest.approx([1.0, 1.0], abs=1e-4)
    refused = CliRunner().invoke(cli, [*args, "--int8"])
    assert refused.exit_code != 0
    assert "no int8 image model" in refused.output


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_gpu_provider_that_cannot_run_falls_back_to_the_cpu_in_fp32(
    image_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu lists CUDA even where no GPU is usable (a GPU image run without one) and
    then quietly runs on the CPU: the encoder must notice and use the fp32 models."""
    _, bundle = image_run
    cpu = Encoder(bundle).encode_texts(["a red circle"])
    # This onnxruntime has no CUDA: asked for it, it runs on the CPU, as a GPU build does
    # without a GPU.
    monkeypatch.setattr(
        encoder_module.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    encoder = Encoder(bundle)
    assert encoder.providers[0] == "CUDAExecutionProvider"
    assert encoder.precision == "fp16"
    with caplog.at_level("WARNING", logger=encoder_module.logger.name):
        fell_back = encoder.encode_texts(["a red circle"])
    assert encoder.providers == ["CPUExecutionProvider"]
    assert encoder.precision == "fp32"
    assert "running on the CPU" in caplog.text
    np.testing.assert_allclose(fell_back, cpu, atol=1e-6)
