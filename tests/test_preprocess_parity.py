"""Serving preprocessing (NumPy + Pillow + PyAV) against the training transform, and its guards.

Real files of many sizes, modes and formats go through both paths: training's
(``model.data.readers.load_image`` + ``model.preprocess.image_transform``, and
``load_video_split`` + ``VideoPairDataset`` for videos) and the indexer's
(``runtime.images`` / ``runtime.video``); the normalised pixels must agree to 1e-5.
"""

from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from av.video.stream import VideoStream
from PIL import Image
from torchvision.transforms.functional import _compute_resized_output_size

from model.config import DataConfig, PreprocessConfig
from model.data.readers import BadItemError
from model.data.readers import load_image as train_load_image
from model.data.records import ImageRecord
from model.preprocess import image_transform
from runtime.errors import ImageDecodeError, InputError
from runtime.image_decode import decode_image, to_rgb
from runtime.images import load_image, preprocess_frames, preprocess_images, resized_size
from runtime.spec import ImageSpec, VideoSpec
from runtime.video import load_video
from training.video_data import VideoPairDataset, load_video_split

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_of(config: PreprocessConfig) -> ImageSpec:
    assert config.image_size is not None
    return ImageSpec(
        size=config.image_size,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
    )


def training_pixels(path: Path, config: PreprocessConfig) -> np.ndarray:
    record = ImageRecord(uri=str(path), captions=("x",), group_id="g", path=path)
    return image_transform(config)(train_load_image(record)).numpy()


# --------------------------------------------------------------------------- test images


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: gradients plus noise, so any resampling difference shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 100 * np.sin(x / 3)],
        axis=-1,
    )
    noisy = smooth + rng.normal(0, 40, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def alpha(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W]: a fully transparent block, a half-transparent band, the rest opaque."""
    values = np.full((height, width), 255, dtype=np.uint8)
    values[: height // 3, : width // 2] = 0
    values[height // 2 :, :] = np.random.default_rng(seed).integers(0, 256, width, dtype=np.uint8)
    return values


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rgb = Image.fromarray(scene(width, height, seed))
    if mode == "RGB":
        return rgb
    if mode in ("RGBA", "LA"):
        base = rgb.convert(mode[0] if mode == "LA" else "RGB")
        base.putalpha(Image.fromarray(alpha(width, height, seed)))
        return base
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P+transparency":
        image = rgb.quantize(64)
        image.info["transparency"] = int(np.asarray(image)[0, 0])  # the top-left colour
        return image
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        grey[::2] += 100  # values that are not multiples of 257
        return Image.fromarray(grey)
    return rgb.convert(mode)  # L, 1, CMYK


@dataclass(frozen=True)
class Case:
    name: str
    mode: str
    fmt: str
    width: int
    height: int
    size: int
    interpolation: str = "bicubic"

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.{self.fmt.lower()}"
        image = make_image(self.mode, self.width, self.height, seed=len(self.name))
        options: dict[str, object] = {}
        if self.mode == "P+transparency" and self.fmt == "PNG":
            options["transparency"] = image.info["transparency"]
        if self.fmt == "JPEG":
            options["quality"] = 90
        image.save(path, self.fmt, **options)
        return path


CASES = [
    Case("rgb_png_odd_portrait", "RGB", "PNG", 97, 131, 64),
    Case("rgb_png_long_side_truncated", "RGB", "PNG", 151, 100, 64, "bilinear"),
    Case("rgb_jpeg_landscape", "RGB", "JPEG", 200, 120, 64),
    Case("rgb_jpeg_square_exact", "RGB", "JPEG", 64, 64, 64, "bilinear"),
    Case("rgb_png_square_down", "RGB", "PNG", 50, 50, 32),
    Case("crop_top_rounds_half_to_even", "RGB", "PNG", 32, 35, 32),
    Case("crop_left_rounds_half_to_even", "RGB", "PNG", 37, 32, 32, "bilinear"),
    Case("rgb_png_upsampled", "RGB", "PNG", 20, 13, 64),
    Case("l_png_upsampled_224", "L", "PNG", 9, 15, 224, "bilinear"),
    Case("rgb_png_very_wide", "RGB", "PNG", 600, 16, 32),
    Case("rgb_png_very_tall", "RGB", "PNG", 12, 500, 64, "bilinear"),
    Case("rgba_png_transparent", "RGBA", "PNG", 80, 60, 64),
    Case("la_png", "LA", "PNG", 70, 90, 32, "bilinear"),
    Case("l_jpeg", "L", "JPEG", 101, 77, 64),
    Case("p_png", "P", "PNG", 90, 66, 64),
    Case("p_png_transparency", "P+transparency", "PNG", 66, 90, 32, "bilinear"),
    Case("p_gif_transparency", "P+transparency", "GIF", 120, 80, 64),
    Case("cmyk_jpeg", "CMYK", "JPEG", 88, 120, 64),
    Case("i16_png", "I;16", "PNG", 100, 70, 64, "bilinear"),
    Case("bilevel_png", "1", "PNG", 77, 55, 32),
    Case("rgb_webp", "RGB", "WEBP", 130, 97, 64),
    Case("rgba_webp", "RGBA", "WEBP", 64, 80, 32, "bilinear"),
    Case("rgb_jpeg_224", "RGB", "JPEG", 300, 257, 224),
    Case("rgba_png_224", "RGBA", "PNG", 240, 230, 224, "bilinear"),
    Case("rgb_png_upsampled_224", "RGB", "PNG", 100, 80, 224),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_images_match_the_training_transform(tmp_path: Path, case: Case) -> None:
    path = case.write(tmp_path)
    config = PreprocessConfig(image_size=case.size, interpolation=case.interpolation)
    expected = training_pixels(path, config)
    served = preprocess_images([load_image(path)], spec_of(config))
    assert served.dtype == np.float32
    assert served.shape == (1, 3, case.size, case.size)
    assert served.flags.c_contiguous
    assert np.abs(served[0] - expected).max() <= TOLERANCE
    # From bytes too, as a service receives them.
    from_bytes = preprocess_images([load_image(path.read_bytes())], spec_of(config))
    assert np.array_equal(from_bytes, served)


def test_the_stored_modes_are_the_ones_meant(tmp_path: Path) -> None:
    """Guards the parity cases above: each file decodes in the mode it is meant to exercise."""
    expected = {
        "RGBA": "RGBA",
        "LA": "LA",
        "L": "L",
        "P": "P",
        "CMYK": "CMYK",
        "I;16": "I;16",
        "1": "1",
    }
    for case in CASES:
        image = load_image(case.write(tmp_path))
        if case.fmt == "PNG" and case.mode in expected:
            assert image.mode == expected[case.mode], case.name
        if case.mode == "P+transparency":
            assert image.mode == "P", case.name
            assert "transparency" in image.info, case.name
        if case.name == "cmyk_jpeg":
            assert image.mode == "CMYK"


def test_a_batch_equals_its_items(tmp_path: Path) -> None:
    config = PreprocessConfig(image_size=32)
    images = [load_image(case.write(tmp_path)) for case in CASES[:6]]
    batch = preprocess_images(images, spec_of(config))
    assert batch.shape == (6, 3, 32, 32)
    for row, image in zip(batch, images, strict=True):
        assert np.array_equal(row, preprocess_images([image], spec_of(config))[0])
    assert preprocess_images([], spec_of(config)).shape == (0, 3, 32, 32)


def test_resized_size_is_torchvisions() -> None:
    for size in (32, 64, 224):
        for width in range(1, 400, 7):
            for height in range(1, 400, 11):
                new_h, new_w = _compute_resized_output_size((height, width), [size])
                assert resized_size(width, height, size) == (new_w, new_h)


def test_preprocess_frames_follows_the_image_path() -> None:
    config = PreprocessConfig(image_size=32, interpolation="bilinear")
    frames = np.stack([scene(45, 33, seed) for seed in range(3)])
    out = preprocess_frames(frames, spec_of(config))
    expected = np.stack([image_transform(config)(Image.fromarray(f)).numpy() for f in frames])
    assert out.shape == (3, 3, 32, 32)
    assert np.abs(out - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(frames.astype(np.float32), spec_of(config))


# --------------------------------------------------------------------------- mode handling


def test_transparent_pixels_become_white() -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)  # black, fully transparent
    pixels[1, 1] = (200, 0, 0, 255)  # opaque red
    pixels[0, 1] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(to_rgb(Image.fromarray(pixels)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 0, 0]
    assert all(126 <= v <= 128 for v in out[0, 1].tolist())
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="L").convert("P")
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    grey_alpha = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8))
    assert grey_alpha.mode == "LA"
    assert np.asarray(to_rgb(grey_alpha)).tolist() == [[[255] * 3, [10] * 3]]


def test_wide_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257 * 100, 32896, 65535]], dtype=np.uint16)
    scaled = [0, 0, 1, 100, 128, 255]
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")):
        image = Image.frombytes(mode, (6, 1), values.astype(dtype).tobytes())
        assert np.asarray(to_rgb(image))[0, :, 0].tolist() == scaled
    wide = Image.fromarray(np.array([[-5, 257 * 7, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0].tolist() == [[0] * 3, [7] * 3, [255] * 3]
    floats = Image.fromarray(np.array([[-5.0, 127.4, 127.6, 300.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats))[0, :, 1].tolist() == [0, 127, 128, 255]


def test_other_modes_convert_as_pillow_does() -> None:
    rgb = Image.fromarray(scene(9, 7, 0))
    for mode in ("L", "1", "CMYK", "YCbCr"):
        image = rgb.convert(mode)
        out = to_rgb(image)
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))
    assert to_rgb(rgb).tobytes() == rgb.tobytes()


# Pixel operations that store an upright image under each EXIF orientation: the viewer (and
# exif_transpose) must undo them. From the EXIF spec: 6 = stored rotated 90 degrees
# anticlockwise (shown after a clockwise turn), 8 = the opposite; 5 and 7 mirror as well.
STORE = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}
QUADRANTS = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}


def upright(width: int = 48, height: int = 32) -> np.ndarray:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for (row, col), colour in QUADRANTS.items():
        rows = slice(row * height // 2, (row + 1) * height // 2)
        pixels[rows, col * width // 2 : (col + 1) * width // 2] = colour
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_comes_out_upright(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORE[orientation](upright()))
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    shown = np.asarray(to_rgb(load_image(path))).astype(int)
    assert shown.shape == (32, 48, 3)
    for (row, col), colour in QUADRANTS.items():
        centre = shown[8 + 16 * row, 12 + 24 * col]
        assert np.abs(centre - colour).max() < 8, (orientation, row, col, centre)
    config = PreprocessConfig(image_size=32)
    served = preprocess_images([load_image(path)], spec_of(config))[0]
    assert np.abs(served - training_pixels(path, config)).max() <= TOLERANCE


# --------------------------------------------------------------------------- video parity


def write_video(path: Path, codec: str, width: int, height: int, count: int, pix: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, pix
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(scene(width, height, index), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


VIDEOS = {
    "h264.mp4": ("libx264", 64, 48, 20, "yuv420p"),
    "mpeg4_odd_short.mp4": ("mpeg4", 45, 33, 7, "yuv420p"),
    "h264_odd_portrait.mp4": ("libx264", 33, 71, 16, "yuv444p"),
    "ffv1_no_frame_count.mkv": ("ffv1", 50, 40, 11, "yuv444p"),
    "tiny_upsampled.mp4": ("libx264", 20, 14, 3, "yuv444p"),
}


@pytest.fixture(scope="module")
def video_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity_videos")
    with (root / "videos.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption", "video_id", "split"])
        for name, args in VIDEOS.items():
            write_video(root / name, *args)
            writer.writerow([name, f"a clip called {name}", name, "test"])
    return root / "videos.csv"


@pytest.mark.parametrize(
    ("frames", "decode_frames", "size", "interpolation"),
    [(4, 16, 32, "bicubic"), (8, 8, 32, "bilinear"), (5, 12, 64, "bicubic")],
)
def test_videos_match_the_training_evaluation_path(
    video_csv: Path, frames: int, decode_frames: int, size: int, interpolation: str
) -> None:
    config = PreprocessConfig(image_size=size, interpolation=interpolation)
    data = DataConfig(modality="video", train=video_csv, group_key="video_id")
    split = load_video_split(data, "test", 32, config, decode_frames=decode_frames)
    assert len(split.records) == len(VIDEOS)
    dataset = VideoPairDataset(split, config, frames, train=False)
    spec = VideoSpec(frames=frames, decode_frames=decode_frames, pooling="mean")
    for index, record in enumerate(split.records):
        assert record.path is not None
        expected = dataset[index, 0][0].numpy()
        served = load_video(record.path, spec, spec_of(config))
        assert served.shape == (frames, 3, size, size)
        assert served.dtype == np.float32
        assert np.abs(served - expected).max() <= TOLERANCE, record.path.name


# --------------------------------------------------------------------------- guards


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with hardly any data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def encoded(fmt: str, width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene(width, height, 3)).save(buffer, fmt)
    return buffer.getvalue()


def refused(source: bytes | Path, reason: str, max_pixels: int | None = None) -> str:
    with pytest.raises(InputError) as info:
        load_image(source, max_pixels=max_pixels)
    message = str(info.value)
    assert reason in message
    return message


def test_decompression_bombs_are_refused_before_decoding() -> None:
    filters = list(warnings.filters)
    message = refused(png_claiming(100_000, 100_000), "image too large")
    assert "image data" in message
    # Over max_pixels but under Pillow's limit: the header is enough to refuse it.
    message = refused(encoded("PNG"), "image too large", max_pixels=1000)
    assert "3,072 pixels, limit 1,000" in message
    assert load_image(encoded("PNG"), max_pixels=3072).size == (64, 48)
    assert warnings.filters == filters


def test_pillows_warning_is_converted_even_when_warnings_are_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3,072 pixels: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        refused(encoded("PNG"), "image too large")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(encoded("PNG"), "image too large")
        with pytest.raises(ImageDecodeError) as info:
            decode_image(encoded("PNG"), max_pixels=None)
        assert info.value.reason == "image too large"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(tmp_path: Path, fmt: str) -> None:
    data = encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    message = refused(path, "truncated image")
    assert str(path) in message
    # The corpus readers share the decoder and count it as a corrupt image, as before.
    with pytest.raises(BadItemError) as bad:
        train_load_image(ImageRecord(uri=str(path), captions=("x",), group_id="g", path=path))
    assert bad.value.reason == "corrupt image"
    assert "truncated image" in bad.value.detail


def test_other_bad_inputs_are_refused(tmp_path: Path) -> None:
    noise = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "not a recognised image format" in refused(noise, "corrupt image")
    assert "0 bytes" in refused(b"", "corrupt image")
    missing = tmp_path / "gone.png"
    assert str(missing) in refused(missing, "missing file")
    assert str(tmp_path) in refused(tmp_path, "unreadable file")  # a directory


def test_bad_videos_are_refused(tmp_path: Path) -> None:
    video = VideoSpec(frames=4, decode_frames=8, pooling="mean")
    image = ImageSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    cases = [
        (tmp_path / "gone.mp4", "missing file"),
        (corrupt, "corrupt video"),
        (audio, "no video stream"),
    ]
    for path, reason in cases:
        with pytest.raises(InputError) as info:
            load_video(path, video, image)
        assert reason in str(info.value)
        assert str(path) in str(info.value)


def test_the_serving_modules_never_import_torch() -> None:
    code = "import sys, runtime.images, runtime.video; assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
