"""Corpus readers and writers: round trips through every format, bad items, corpus errors, video.

Everything runs on real files under tmp_path; nothing is mocked.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model.data.readers import (
    BadItemError,
    CsvImageReader,
    FolderImageReader,
    ImageReader,
    KarpathyImageReader,
    VideoCsvReader,
    WebDatasetImageReader,
    expand_braces,
    load_image,
    open_image_corpus,
)
from model.data.records import CorpusError, ImageRecord, ImageSample
from model.data.synth import SynthConfig, generate_corpus
from model.data.writers import write_csv, write_folder, write_karpathy, write_webdataset
from runtime.errors import VideoDecodeError
from runtime.video_decode import read_video

CAPTIONS = (
    "a red square",
    'a "quoted" caption, with commas',
    "un café au lait, s'il vous plaît!",
    "two blue circles  side by side",
    "a green triangle above a yellow star",
)
# Group ids that exercise the writers' naming: a plain integer (Karpathy "cocoid") and a
# slash (a sub-folder in the folder format).
SPECIAL_GROUPS = {3: "1234", 5: "coco/17"}
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- helpers


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] = (9, 7)):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def make_samples(n: int = 12, seed: int = 0) -> list[ImageSample]:
    """Small random images (RGB, plus one L and one RGBA) with 1-3 captions each."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        mode = {7: "L", 8: "RGBA"}.get(i, "RGB")
        image = random_image(rng, mode)
        n_captions = 1 + i % 3
        captions = tuple(CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(n_captions))
        record = ImageRecord(
            uri=f"memory:{i}",
            captions=captions,
            group_id=SPECIAL_GROUPS.get(i, f"img-{i:03d}"),
            split=SPLITS[i % 3],
            data=png_bytes(image),
        )
        samples.append(ImageSample(record=record, image=image))
    return samples


def by_group(samples: Iterable[ImageSample]) -> dict[str, ImageSample]:
    out: dict[str, ImageSample] = {}
    for sample in samples:
        assert sample.group_id not in out, f"group id {sample.group_id} read twice"
        out[sample.group_id] = sample
    return out


def assert_same_corpus(
    read: Sequence[ImageSample], expected: Sequence[ImageSample], *, splits: bool
) -> None:
    assert len(read) == len(expected)
    got, want = by_group(read), by_group(expected)
    assert sorted(got) == sorted(want)
    for group_id, sample in want.items():
        back = got[group_id]
        assert back.image.mode == sample.image.mode, group_id
        np.testing.assert_array_equal(np.asarray(back.image), np.asarray(sample.image))
        assert back.captions == sample.captions, group_id
        if splits:
            assert back.record.split == sample.record.split, group_id


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- round trips

# format -> (write the samples under a folder and return what to read, reader class, has splits)
Writer = Callable[[list[ImageSample], Path], Path]
FORMATS: dict[str, tuple[Writer, type[ImageReader], bool]] = {
    "csv": (write_csv, CsvImageReader, True),
    "folder": (write_folder, FolderImageReader, False),
    "webdataset": (
        lambda samples, out: write_webdataset(samples, out, shard_size=5)[0].parent,
        WebDatasetImageReader,
        True,
    ),
    "karpathy": (write_karpathy, KarpathyImageReader, True),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip_through_each_format(fmt: str, tmp_path: Path) -> None:
    write, reader_class, has_splits = FORMATS[fmt]
    samples = make_samples()
    written = write(samples, tmp_path / fmt)

    reader = reader_class(written)
    read = list(reader.samples())

    assert_same_corpus(read, samples, splits=has_splits)
    assert reader.report.kept == len(samples)
    assert reader.report.n_skipped == 0


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_open_image_corpus_picks_the_reader(fmt: str, tmp_path: Path) -> None:
    write, reader_class, _ = FORMATS[fmt]
    written = write(make_samples(4), tmp_path / fmt)
    reader = open_image_corpus(written)
    assert type(reader) is reader_class
    assert len(list(reader.samples())) == 4


def test_open_image_corpus_shard_forms(tmp_path: Path) -> None:
    samples = make_samples()
    shards = write_webdataset(samples, tmp_path / "wds", shard_size=5)
    assert [shard.name for shard in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    pattern = str(tmp_path / "wds" / "shard-{000000..000002}.tar")
    for source in (pattern, shards[0], tmp_path / "wds"):
        assert isinstance(open_image_corpus(source), WebDatasetImageReader), source
    assert_same_corpus(list(open_image_corpus(pattern).samples()), samples, splits=True)
    assert len(list(open_image_corpus(shards[0]).samples())) == 5


def test_csv_webp_keeps_rgb_pixels(tmp_path: Path) -> None:
    samples = [s for s in make_samples() if s.image.mode in ("RGB", "RGBA")]
    csv_path = write_csv(samples, tmp_path, image_format="webp")
    assert_same_corpus(list(CsvImageReader(csv_path).samples()), samples, splits=True)
    with pytest.raises(ValueError, match="'gif'"):
        write_csv(samples, tmp_path, image_format="gif")


def test_open_image_corpus_tsv_and_unknown(tmp_path: Path) -> None:
    image_path = tmp_path / "a.png"
    image_path.write_bytes(png_bytes(random_image(np.random.default_rng(1))))
    (tmp_path / "list.tsv").write_text("filepath\tcaption\na.png\ta, comma\n", encoding="utf-8")
    reader = open_image_corpus(tmp_path / "list.tsv")
    assert [sample.captions for sample in reader.samples()] == [("a, comma",)]

    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    for bad in (tmp_path / "notes.md", tmp_path / "nowhere"):
        with pytest.raises(CorpusError, match=r"accepted: a \.csv") as info:
            open_image_corpus(bad)
        assert str(bad) in str(info.value)


def test_webdataset_writer_is_deterministic(tmp_path: Path) -> None:
    first = write_webdataset(make_samples(), tmp_path / "a", shard_size=5)
    second = write_webdataset(make_samples(), tmp_path / "b", shard_size=5)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    assert [m.name.rsplit(".", 1)[1] for m in members[:3]] == ["json", "png", "txt"]


def test_karpathy_writer_tokens_and_ids(tmp_path: Path) -> None:
    data = json.loads(write_karpathy(make_samples(6), tmp_path).read_text(encoding="utf-8"))
    entries = data["images"]
    assert data["dataset"] == "synthetic"
    assert [entry["imgid"] for entry in entries] == list(range(6))
    assert entries[3]["cocoid"] == 1234
    assert "image_id" not in entries[3]
    assert entries[5]["image_id"] == "coco/17"
    assert "cocoid" not in entries[5]
    tokens = entries[1]["sentences"][1]["tokens"]
    assert tokens == ["un", "café", "au", "lait", "s", "il", "vous", "plaît"]


# --------------------------------------------------------------------------- bad items

RNG_BYTES = np.random.default_rng(7).integers(0, 256, 600, dtype=np.uint8).tobytes()


def good_png(seed: int) -> bytes:
    return png_bytes(random_image(np.random.default_rng(seed), size=(24, 24)))


def truncated_png() -> bytes:
    data = good_png(99)
    return data[: len(data) // 2]


def bad_csv(root: Path) -> CsvImageReader:
    images = root / "images"
    images.mkdir(parents=True)
    for name, data in [
        ("good1", good_png(1)),
        ("good2", good_png(2)),
        ("corrupt", RNG_BYTES),
        ("truncated", truncated_png()),
        ("blank", good_png(3)),
    ]:
        (images / f"{name}.png").write_bytes(data)
    rows = [
        ("good1", "one"),
        ("good2", "two"),
        ("corrupt", "three"),
        ("truncated", "four"),
        ("missing", "five"),
        ("blank", "   "),
        ("good2", ""),  # an empty row of an image that has a good caption: reported, image kept
    ]
    with (root / "images.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption", "image_id"])
        writer.writerows([f"images/{name}.png", caption, name] for name, caption in rows)
    return CsvImageReader(root / "images.csv")


def bad_folder(root: Path) -> FolderImageReader:
    for name, data in [
        ("good1", good_png(1)),
        ("good2", good_png(2)),
        ("corrupt", RNG_BYTES),
        ("sub/truncated", truncated_png()),
        ("blank", good_png(3)),
        ("missing", good_png(4)),  # an image without its caption file
    ]:
        path = root / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name != "missing":
            caption = {"good1": "one", "good2": "two\n\n", "blank": " \n"}.get(name, "x")
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    (root / "orphan.txt").write_text("a caption without an image", encoding="utf-8")
    return FolderImageReader(root)


def bad_webdataset(root: Path) -> WebDatasetImageReader:
    root.mkdir(parents=True)
    meta = json.dumps({"split": "train"}).encode()
    members = {
        "good1.png": good_png(1),
        "good1.txt": b"one\n",
        "good2.json": meta,
        "good2.png": good_png(2),
        "good2.txt": b"two",
        "corrupt.png": RNG_BYTES,
        "corrupt.txt": b"three",
        "truncated.png": truncated_png(),
        "truncated.txt": b"four",
        "missing.txt": b"five",  # no image for this key
        "blank.png": good_png(3),
        "blank.txt": b"  \n",
    }
    return WebDatasetImageReader(write_tar(root / "data.tar", members))


def bad_karpathy(root: Path) -> KarpathyImageReader:
    root.mkdir(parents=True)
    files = {"good1": good_png(1), "good2": good_png(2), "corrupt": RNG_BYTES}
    files |= {"truncated": truncated_png(), "blank": good_png(3)}
    for name, data in files.items():
        (root / f"{name}.png").write_bytes(data)
    captions = {"good1": "one", "good2": "two", "corrupt": "three", "truncated": "four"}
    captions |= {"missing": "five", "blank": " "}
    entries = [
        {"filename": f"{name}.png", "image_id": name, "split": "test", "sentences": [{"raw": c}]}
        for name, c in captions.items()
    ]
    (root / "dataset.json").write_text(json.dumps({"images": entries}), encoding="utf-8")
    return KarpathyImageReader(root / "dataset.json")


# reader builder, the expected skip counts, the name of the item without an image file
BAD_CORPORA: dict[str, tuple[Callable[[Path], ImageReader], dict[str, int], str]] = {
    "csv": (bad_csv, {"missing file": 1, "corrupt image": 2, "empty caption": 2}, "missing"),
    "folder": (
        bad_folder,
        {"missing caption file": 1, "corrupt image": 2, "empty caption": 1},
        "missing",
    ),
    "webdataset": (
        bad_webdataset,
        {"missing image": 1, "corrupt image": 2, "empty caption": 1},
        "missing",
    ),
    "karpathy": (
        bad_karpathy,
        {"missing file": 1, "corrupt image": 2, "empty caption": 1},
        "missing",
    ),
}


@pytest.mark.parametrize("fmt", sorted(BAD_CORPORA))
def test_bad_items_are_skipped_and_reported(
    fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build, expected, missing_name = BAD_CORPORA[fmt]
    reader = build(tmp_path / fmt)
    with caplog.at_level(logging.INFO, logger="cots.data"):
        samples = list(reader.samples())

    assert [sample.captions for sample in samples] == [("one",), ("two",)]
    assert [sample.group_id for sample in samples] == ["good1", "good2"]
    np.testing.assert_array_equal(
        np.asarray(samples[0].image), np.asarray(Image.open(io.BytesIO(good_png(1))))
    )
    assert reader.report.skipped == Counter(expected)
    assert reader.report.kept == 2
    summary = reader.report.summary()
    assert f"read 2 items, skipped {sum(expected.values())}" in summary
    for reason, count in expected.items():
        assert f"{reason}: {count}" in summary

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("corrupt", "truncated", "blank", missing_name):
        assert any(name in message for message in warnings), (name, warnings)
    assert any("corrupt.png" in message and "corrupt image" in message for message in warnings)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert summary in infos


def test_report_restarts_with_each_pass(tmp_path: Path) -> None:
    reader = bad_csv(tmp_path)
    assert len(list(reader.records())) == 4  # corrupt files are found only when decoding
    assert reader.report.n_skipped == 3
    assert len(list(reader.samples())) == 2
    assert reader.report.n_skipped == 5  # not 8: the records() pass is not counted again


def test_webdataset_corrupt_and_missing_shards(tmp_path: Path) -> None:
    samples = make_samples(6)
    shards = write_webdataset(samples, tmp_path, shard_size=2)  # shard-000000..000002
    shards[1].write_bytes(RNG_BYTES)  # not a tar at all
    with tarfile.open(shards[2]) as tar:
        image_member = tar.getmembers()[1]
    cut = image_member.offset_data + image_member.size // 2  # in the middle of an image
    shards[2].write_bytes(shards[2].read_bytes()[:cut])
    reader = WebDatasetImageReader(str(tmp_path / "shard-{000000..000003}.tar"))

    read = list(reader.samples())

    assert [sample.group_id for sample in read][:2] == ["img-000", "img-001"]
    assert len(read) < 6
    assert reader.report.skipped["corrupt shard"] == 2
    assert reader.report.skipped["missing shard"] == 1
    assert "shard-000001.tar" in str(reader.report.examples)


def test_webdataset_member_layout(tmp_path: Path) -> None:
    image = good_png(5)
    members = {
        "dir.v1/a.b.png": image,  # key "dir.v1/a", extension "b.png": not an image field
        "dir.v1/a.txt": b"only a caption",
        "dir.v1/c.jpg": image,  # a PNG stored as .jpg still decodes
        "dir.v1/c.txt": b"first\n\nsecond\nfirst\n",
        "dir.v1/c.json": json.dumps({"group_id": 42, "split": "val"}).encode(),
        "dir.v1/c.cls": b"3",
    }
    tar_path = write_tar(tmp_path / "x.tar", members)
    reader = WebDatasetImageReader(tar_path)
    (sample,) = reader.samples()
    assert sample.record.uri == f"{tar_path}#dir.v1/c.jpg"
    assert sample.captions == ("first", "second")
    assert (sample.group_id, sample.record.split) == ("42", "val")
    assert sample.record.data == image
    assert sample.record.path is None
    assert reader.report.skipped == Counter({"missing image": 1})
    assert list(WebDatasetImageReader(tar_path, split="train").samples()) == []


def test_image_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(good_png(1))  # 24 x 24 = 576 pixels
    record = ImageRecord(uri=str(path), captions=("x",), group_id="big", path=path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # over the limit: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(BadItemError) as info:
        load_image(record)
    assert info.value.reason == "image too large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # over twice the limit: Pillow raises
    with pytest.raises(BadItemError) as info:
        load_image(record)
    assert info.value.reason == "image too large"


def test_load_image_from_bytes_and_missing_path(tmp_path: Path) -> None:
    data = good_png(1)
    image = load_image(ImageRecord(uri="mem", captions=("x",), group_id="g", data=data))
    assert image.size == (24, 24)
    with pytest.raises(BadItemError) as info:
        load_image(ImageRecord("x", ("x",), "g", path=tmp_path / "gone.png"))
    assert info.value.reason == "missing file"
    assert str(tmp_path / "gone.png") in str(info.value)


# --------------------------------------------------------------------------- CSV specifics


def test_csv_grouping_splits_and_defaults(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(random_image(rng)))
    outside = tmp_path / "elsewhere" / "c.png"
    outside.parent.mkdir()
    outside.write_bytes(png_bytes(random_image(rng)))
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "data.csv").write_text(
        "split,caption,filepath\n"
        "train,first a,../a.png\n"
        "val,only b,../b.png\n"
        "train, second a ,../a.png\n"
        "train,first a,../a.png\n"
        f"train,absolute c,{outside}\n",
        encoding="utf-8",
    )
    reader = CsvImageReader(tmp_path / "list" / "data.csv")
    records = list(reader.records())
    assert [r.captions for r in records] == [("first a", "second a"), ("only b",), ("absolute c",)]
    # No image_id column: the group is the file path as the CSV writes it.
    assert [r.group_id for r in records] == ["../a.png", "../b.png", str(outside)]
    assert [r.split for r in records] == ["train", "val", "train"]
    assert records[0].path == tmp_path / "list" / "../a.png"

    train = CsvImageReader(tmp_path / "list" / "data.csv", split="train")
    assert [r.group_id for r in train.records()] == ["../a.png", str(outside)]


def test_csv_custom_columns(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(good_png(1))
    (tmp_path / "t.csv").write_text("img;text;gid\na.png;hello;G1\n", encoding="utf-8")
    reader = CsvImageReader(
        tmp_path / "t.csv", img_key="img", caption_key="text", group_key="gid", separator=";"
    )
    (sample,) = reader.samples()
    assert (sample.captions, sample.group_id, sample.record.split) == (("hello",), "G1", None)


def test_corpus_level_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        CsvImageReader(tmp_path / "missing.csv")

    (tmp_path / "nocap.csv").write_text("filepath,text\na.png,hello\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"'caption'.*\['filepath', 'text'\]"):
        CsvImageReader(tmp_path / "nocap.csv")
    with pytest.raises(CorpusError, match="'split'"):
        CsvImageReader(tmp_path / "nocap.csv", caption_key="text", split="train")

    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        CsvImageReader(tmp_path / "empty.csv")

    (tmp_path / "noimages.json").write_text('{"dataset": "coco"}', encoding="utf-8")
    with pytest.raises(CorpusError, match="'images' list"):
        KarpathyImageReader(tmp_path / "noimages.json")
    (tmp_path / "broken.json").write_text('{"images": [', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken\.json"):
        KarpathyImageReader(tmp_path / "broken.json")
    with pytest.raises(CorpusError, match="does not exist"):
        KarpathyImageReader(tmp_path / "nothing.json")

    with pytest.raises(CorpusError, match="not a directory"):
        FolderImageReader(tmp_path / "nocap.csv")
    with pytest.raises(CorpusError, match="does not exist"):
        WebDatasetImageReader(tmp_path / "none.tar")
    with pytest.raises(CorpusError, match="no shard"):
        WebDatasetImageReader(str(tmp_path / "s-{0..3}.tar"))


# --------------------------------------------------------------------------- Karpathy specifics


def test_karpathy_layout_restval_and_group_ids(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / "val2014" / f"{name}.jpg").write_bytes(good_png(ord(name)))
    sentences = [{"raw": " A dog. ", "tokens": ["a", "dog"]}, {"raw": "A dog."}]
    entries: list[dict[str, object]] = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "restval", "cocoid": 7, "imgid": 0},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train", "imgid": 1},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test"},
    ]
    for entry in entries:
        entry["sentences"] = sentences
    json_path = tmp_path / "meta" / "dataset_coco.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps({"dataset": "coco", "images": entries}), encoding="utf-8")

    reader = KarpathyImageReader(json_path, images_root=tmp_path / "imgs")
    records = list(reader.records())
    assert [r.group_id for r in records] == ["7", "1", "c.jpg"]
    assert records[0].captions == ("A dog.", "A dog.")  # kept as annotated
    assert records[0].split == "restval"
    train = KarpathyImageReader(json_path, images_root=tmp_path / "imgs", split="train")
    assert [r.group_id for r in train.records()] == ["7", "1"]
    restval = KarpathyImageReader(json_path, images_root=tmp_path / "imgs", split="restval")
    assert [r.group_id for r in restval.records()] == ["7"]


# --------------------------------------------------------------------------- brace expansion


def test_expand_braces() -> None:
    assert expand_braces("shards/{000..003}.tar") == [f"shards/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{08..10}") == ["x08", "x09", "x10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("s{1..}.tar", "s{3..1}.tar", "s{1..3.tar", "s{x}.tar"):
        with pytest.raises(CorpusError, match="pattern"):
            expand_braces(bad)


# --------------------------------------------------------------------------- video

PALETTE = np.array(
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
        [0, 0, 0],
    ],
    dtype=np.uint8,
)


def write_mp4(path: Path, order: Sequence[int], size: int = 64, fps: int = 8) -> None:
    """One solid frame per palette index in ``order``; H.264, yuv420p."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in order:
            pixels = np.broadcast_to(PALETTE[index], (size, size, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def nearest_colours(frames: np.ndarray) -> list[int]:
    means = frames.reshape(len(frames), -1, 3).mean(axis=1)
    distances = np.linalg.norm(means[:, None, :] - PALETTE[None, :, :].astype(float), axis=-1)
    assert distances.min(axis=1).max() < 20, "a frame is far from every palette colour"
    return distances.argmin(axis=1).tolist()


ORDERS = {"v0": list(range(8)), "v1": list(range(7, -1, -1)), "v2": [3, 1, 4, 0, 5, 2, 6, 7]}


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "clips").mkdir()
    for name, order in ORDERS.items():
        write_mp4(root / "clips" / f"{name}.mp4", order)
    (root / "clips" / "corrupt.mp4").write_bytes(RNG_BYTES)
    rows = [(name, f"colours of {name}") for name in ORDERS]
    rows += [("corrupt", "never decoded"), ("missing", "never there"), ("v0", "again v0")]
    with (root / "videos.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption", "video_id", "split"])
        writer.writerows([f"clips/{name}.mp4", caption, name, "test"] for name, caption in rows)
    return root


def test_video_csv_reader(video_corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = VideoCsvReader(video_corpus / "videos.csv", num_frames=8)
    with caplog.at_level(logging.WARNING, logger="cots.data"):
        samples = list(reader.samples())

    assert [sample.group_id for sample in samples] == list(ORDERS)
    assert samples[0].captions == ("colours of v0", "again v0")
    for sample in samples:
        assert sample.frames.shape == (8, 64, 64, 3)
        assert sample.frames.dtype == np.uint8
        assert nearest_colours(sample.frames) == ORDERS[sample.group_id]
        assert sample.fps == pytest.approx(8.0)
        assert sample.duration_s == pytest.approx(1.0, abs=0.2)
        assert sample.record.split == "test"
    assert reader.report.skipped == Counter({"corrupt video": 1, "missing file": 1})
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "corrupt.mp4" in messages
    assert "missing.mp4" in messages


def test_read_video_sampling(video_corpus: Path) -> None:
    path = video_corpus / "clips" / "v2.mp4"
    everything, fps, duration = read_video(path)
    assert everything.shape == (8, 64, 64, 3)
    assert fps == pytest.approx(8.0)
    assert duration == pytest.approx(1.0, abs=0.2)
    four, _, _ = read_video(path, num_frames=4)  # indices 0, 2, 5, 7
    assert nearest_colours(four) == [ORDERS["v2"][i] for i in (0, 2, 5, 7)]
    twelve, _, _ = read_video(path, num_frames=12)  # shorter than asked: frames repeat
    expected = np.linspace(0, 7, 12).round().astype(int)
    assert nearest_colours(twelve) == [ORDERS["v2"][i] for i in expected]
    with pytest.raises(VideoDecodeError) as info:
        read_video(video_corpus / "clips" / "corrupt.mp4")
    assert info.value.reason == "corrupt video"


def test_read_video_without_frame_count(tmp_path: Path) -> None:
    # Matroska stores no frame count, so sampling needs a counting pass first.
    path = tmp_path / "v.mkv"
    write_mp4(path, ORDERS["v2"])
    frames, fps, duration = read_video(path, num_frames=4)
    assert nearest_colours(frames) == [ORDERS["v2"][i] for i in (0, 2, 5, 7)]
    assert (fps, duration) == (pytest.approx(8.0), pytest.approx(1.0, abs=0.2))


# --------------------------------------------------------------------------- synthetic corpus


@pytest.fixture(scope="module")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, SynthConfig(seed=0, n_images=40, n_videos=6), workers=1)
    return out


def test_synthetic_images_convert_to_every_format(synth_corpus: Path, tmp_path: Path) -> None:
    reader = CsvImageReader(synth_corpus / "images.csv")
    original = list(reader.samples())
    assert len(original) == 40
    assert reader.report.n_skipped == 0
    for fmt, (write, reader_class, has_splits) in FORMATS.items():
        written = write(original, tmp_path / fmt)
        converted = list(reader_class(written).samples())
        assert_same_corpus(converted, original, splits=has_splits)
        assert type(open_image_corpus(written)) is reader_class


def test_synthetic_videos_read(synth_corpus: Path) -> None:
    reader = VideoCsvReader(synth_corpus / "videos.csv", num_frames=4)
    samples = list(reader.samples())
    assert len(samples) == 6
    assert reader.report.n_skipped == 0
    for sample in samples:
        assert sample.frames.shape[0] == 4
        assert sample.frames.shape[-1] == 3
        assert sample.frames.dtype == np.uint8
        assert sample.captions
        assert all(sample.captions)
        assert sample.fps > 0
        assert sample.duration_s > 0
