"""The golden embeddings' recipe: a fixed tiny model, fixed inputs and both embedding paths.

``scripts/make_golden.py`` writes what :func:`compute` returns to ``tests/golden/embeddings.npz``;
``tests/test_golden.py`` recomputes it with the current code and compares. Everything here is made
in code (no download, no training): the model is ``cots-micro`` with weights drawn from a seeded
NumPy PCG64 generator (not torch's initialisers, which may change between torch versions); the
images are drawn with NumPy and saved as PNG (lossless, so no codec version moves a pixel); the
video is lossless FFV1 in RGB.

Changing anything here changes the stored vectors: bump :data:`RECIPE_VERSION` and regenerate.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import av
import numpy as np
import torch
from av.video.stream import VideoStream
from PIL import Image

RECIPE_VERSION: Final = 1
MODEL: Final = "cots-micro"
GOLDEN: Final = Path(__file__).resolve().parent / "golden" / "embeddings.npz"
WEIGHT_SEED: Final = 20261206
WEIGHT_STD: Final = 0.02

TEXTS: Final = (
    "a red square on a blue background",
    "Ünïcödé: café naïve — 東京の夜景 🌸 ÀÉÎ",
    # Longer than cots-micro's 48-token context: both tokenisers truncate it.
    " ".join(f"word{index} and another phrase number {index}" for index in range(40)),
    "  SHOUTING, with punctuation!!! and   spaces?  ",
)


@dataclass(frozen=True)
class GoldenImage:
    name: str
    width: int
    height: int
    mode: str  # the mode it is saved in
    orientation: int = 1  # EXIF orientation


IMAGES: Final = (
    GoldenImage("rgb_square", 32, 32, "RGB"),
    GoldenImage("rgb_wide_odd", 75, 41, "RGB"),
    GoldenImage("rgb_portrait_odd", 41, 67, "RGB"),
    GoldenImage("rgb_tall_exif6", 37, 90, "RGB", orientation=6),  # stored tall, shown wide
    GoldenImage("rgba_transparent", 50, 44, "RGBA"),
    GoldenImage("grey_upsampled", 21, 17, "L"),
)
VIDEO: Final = ("ffv1_rgb.mkv", 48, 36, 12)  # name, width, height, frames


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: gradients, stripes and noise, so any resampling change shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 100 * np.sin(x / 3)],
        axis=-1,
    )
    noisy = smooth + rng.normal(0, 30, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def image_bytes(spec: GoldenImage, seed: int) -> bytes:
    image = Image.fromarray(scene(spec.width, spec.height, seed))
    if spec.mode == "RGBA":
        alpha = np.full((spec.height, spec.width), 255, dtype=np.uint8)
        alpha[: spec.height // 3, : spec.width // 2] = 0
        alpha[spec.height // 2 :, :] = 128
        image.putalpha(Image.fromarray(alpha))
    elif spec.mode != "RGB":
        image = image.convert(spec.mode)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if spec.orientation != 1:
        exif[0x0112] = spec.orientation  # Orientation
    image.save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


def write_video(path: Path, width: int, height: int, count: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(scene(width, height, 100 + index), format="rgb24")
            for packet in stream.encode(frame.reformat(format="bgr0")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@contextmanager
def inputs() -> Iterator[tuple[list[Path], Path]]:
    """The golden images and video, written to a temporary folder: (image files, video)."""
    with tempfile.TemporaryDirectory(prefix="cots-golden-") as folder:
        root = Path(folder)
        paths = []
        for seed, spec in enumerate(IMAGES):
            path = root / f"{spec.name}.png"
            path.write_bytes(image_bytes(spec, seed))
            paths.append(path)
        name, width, height, count = VIDEO
        write_video(root / name, width, height, count)
        yield paths, root / name


def weights(folder: Path) -> Path:
    """cots-micro's state dict with every non-constant tensor drawn by NumPy, in the state dict's
    key order, from N(0, 1/fan_in) (matrices: so attention and pixels matter, unlike with tiny
    weights where every image embeds alike) or N(0, 0.02) (vectors); constant tensors (LayerNorm,
    biases, logit scale) keep their init."""
    import open_clip

    from model.factory import model_config

    model_config(MODEL)  # registers model/configs with open_clip
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded
    try:
        clip = open_clip.create_model(MODEL, force_custom_text=True)
    finally:
        logging.disable(logging.NOTSET)
    rng = np.random.default_rng(WEIGHT_SEED)
    state = clip.state_dict()
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        if bool((tensor == tensor.flatten()[0]).all()):
            continue
        fan_in = int(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else 0
        std = fan_in**-0.5 if fan_in else WEIGHT_STD
        drawn = rng.standard_normal(tuple(tensor.shape)) * std
        state[key] = torch.from_numpy(drawn.astype(np.float32))
    path = folder / f"{MODEL}-golden.pt"
    torch.save({"state_dict": state}, path)
    return path


def torch_embeddings(weights_file: Path, images: list[Path], video: Path) -> dict[str, np.ndarray]:
    """The torch model's embeddings through training's own input code: readers.load_image and
    model.preprocess for images, model.tokenizer for texts, load_video_split + VideoPairDataset
    (evaluation frames) for the video."""
    from model.config import DataConfig
    from model.data.readers.base import load_image
    from model.data.records import ImageRecord
    from model.preprocess import to_tensor_batch
    from model.tokenizer import tokenize
    from model.video import TemporalPooling
    from training.video_data import VideoPairDataset, load_video_split
    from training.zero_shot import pretrained_model

    model = pretrained_model(MODEL, str(weights_file))
    towers, config = model.towers, model.config
    towers.temporal = TemporalPooling(towers.embed_dim, config.video.frames, "mean")
    towers.eval()
    records = [ImageRecord(uri=str(p), captions=("x",), group_id=p.stem, path=p) for p in images]
    pixels = to_tensor_batch([load_image(record) for record in records], config.preprocess)
    tokens = tokenize(list(TEXTS), model.context_length)
    listing = video.parent / "videos.csv"
    with listing.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption", "video_id", "split"])
        writer.writerow([video.name, "a clip", "v0", "test"])
    data = DataConfig(modality="video", train=listing, group_key="video_id")
    split = load_video_split(
        data,
        "test",
        model.context_length,
        config.preprocess,
        decode_frames=config.video.decode_frames,
    )
    frames = VideoPairDataset(split, config.preprocess, config.video.frames, train=False)[0, 0][0]
    with torch.no_grad():
        return {
            "image": towers.encode_image(pixels).float().numpy(),
            "text": towers.encode_text(tokens).float().numpy(),
            "video": towers.encode_image(frames[None]).float().numpy(),
        }


def runtime_embeddings(
    weights_file: Path, images: list[Path], video: Path
) -> dict[str, np.ndarray]:
    """The exported fp32 ONNX bundle's embeddings through the serving runtime's own input code."""
    from runtime.encoder import Encoder
    from training.export import ExportOptions, export_pretrained

    bundle = export_pretrained(
        MODEL,
        str(weights_file),
        weights_file.parent / "bundle",
        ExportOptions(fp16=False, progress=False),
    )
    encoder = Encoder(bundle, providers=["cpu"], precision="fp32", threads=1, verify=False)
    return {
        "image": encoder.encode_images(images),
        "text": encoder.encode_texts(list(TEXTS)),
        "video": encoder.encode_videos([video]),
    }


def compute() -> dict[str, np.ndarray]:
    """Every golden vector, keyed "<path>/<modality>" (path: torch or runtime), float32."""
    with inputs() as (images, video), tempfile.TemporaryDirectory() as folder:
        weights_file = weights(Path(folder))
        out = {f"torch/{k}": v for k, v in torch_embeddings(weights_file, images, video).items()}
        runtime = runtime_embeddings(weights_file, images, video)
        out.update({f"runtime/{k}": v for k, v in runtime.items()})
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in out.items()}


def recipe() -> dict[str, str]:
    """What the vectors were made from, stored beside them (informational, not compared)."""
    import onnxruntime
    import PIL

    return {
        "recipe_version": str(RECIPE_VERSION),
        "model": MODEL,
        "weights": f"numpy PCG64 seed {WEIGHT_SEED}, N(0, 1/fan_in) or N(0, {WEIGHT_STD})",
        "images": ", ".join(f"{i.name} {i.width}x{i.height} {i.mode}" for i in IMAGES),
        "texts": " | ".join(TEXTS),
        "video": f"{VIDEO[0]} {VIDEO[1]}x{VIDEO[2]} {VIDEO[3]} frames",
        "versions": (
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"numpy {np.__version__}, Pillow {PIL.__version__}, av {av.__version__}"
        ),
    }
