"""Index bundles end to end: real corpora, a real model bundle, real FAISS and SQLite files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cots.cli import cli
from indexer.build import build_collection
from indexer.collection import Collection
from indexer.compaction import compact_collection
from indexer.errors import CollectionError
from indexer.index_bundle import read_info
from indexer.update import add_to_collection, remove_from_collection
from indexer.versions import current_dir, current_version, list_versions
from model.data.synth import SynthConfig, generate_corpus
from runtime.encoder import Encoder
from tests.micro import build_spec
from tests.versions import version_content

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index-corpora")
    generate_corpus(
        root / "a", SynthConfig(seed=5, n_images=60, n_videos=3, image_size=40), workers=1
    )
    generate_corpus(
        root / "b", SynthConfig(seed=6, n_images=20, n_videos=0, image_size=40), workers=1
    )
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def bundle(micro_bundle: Path) -> Path:
    return micro_bundle


def test_build_search_and_hydrate(corpora: dict[str, Path], bundle: Path, tmp_path: Path) -> None:
    csv = corpora["a"] / "images.csv"
    version = build_collection(build_spec(tmp_path, bundle, csv, workers=2))
    assert version == 1
    assert current_version(tmp_path, "photos") == 1
    info = read_info(current_dir(tmp_path, "photos"))
    assert info.count == info.live == 60
    assert info.factory == "Flat"
    assert info.recall_at_10 == pytest.approx(1.0)
    assert info.model_bundle_id == Encoder(bundle).bundle_id
    encoder = Encoder(bundle)
    with Collection.open(tmp_path, "photos", bundle_id=encoder.bundle_id) as collection:
        hits = collection.search(encoder.encode_texts(["a red circle", "a blue square"]), 5)
        assert [len(row) for row in hits] == [5, 5]
        for row in hits:
            scores = [hit.score for hit in row]
            assert scores == sorted(scores, reverse=True)
            for hit in row:
                assert hit.item.kind == "image"
                assert Path(hit.item.uri).is_file()
                assert hit.item.caption
                assert hit.item.metadata["split"] in {"train", "val", "test", "heldout"}
        # An item's own image embedding finds it first.
        first = hits[0][0].item
        (own,) = collection.search(encoder.encode_images([Path(first.uri)]), 1)
        assert own[0].id == hits[0][0].id


def test_bad_items_are_skipped_counted_and_named(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["b"], corpus)
    images = sorted((corpus / "images").rglob("*.png"))
    images[0].write_bytes(b"not an image")
    images[1].unlink()
    build_collection(build_spec(tmp_path / "idx", bundle, corpus / "images.csv"))
    info = read_info(current_dir(tmp_path / "idx", "photos"))
    assert info.count == 18
    assert info.skipped == {"corrupt image": 1, "missing file": 1}
    assert any(images[0].name in r.message and "corrupt image" in r.message for r in caplog.records)


def test_a_killed_build_resumes_to_the_same_index(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    csv = corpora["a"] / "images.csv"
    straight = build_spec(tmp_path / "straight", bundle, csv, shard_size=4)
    build_collection(straight)
    killed = build_spec(tmp_path / "killed", bundle, csv, shard_size=4)
    build_collection(killed.model_copy(update={"corpus": str(corpora["b"] / "images.csv")}))
    code = (
        "import sys, time\n"
        "import indexer.build as b\n"
        "from indexer.shards import ShardEncoder\n"
        "from indexer.build_spec import BuildSpec\n"
        "original = ShardEncoder.encode\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return original(self, *a, **k)\n"
        "ShardEncoder.encode = slow\n"
        "b.build_collection(BuildSpec.model_validate_json(sys.argv[1]))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, killed.model_dump_json()])
    builds = tmp_path / "killed" / "photos" / "builds"
    deadline = time.monotonic() + 120
    while not list(builds.rglob("shard-000003.npz")):
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # The interrupted build left the previous version live and intact.
    assert current_version(tmp_path / "killed", "photos") == 1
    assert read_info(current_dir(tmp_path / "killed", "photos")).count == 20
    finished = len(list(builds.rglob("shard-*.npz")))
    assert 4 <= finished < 15
    assert build_collection(killed) == 2
    a, b = current_dir(tmp_path / "straight", "photos"), current_dir(tmp_path / "killed", "photos")
    (ids_a, vectors_a, _), (ids_b, vectors_b, _) = version_content(a), version_content(b)
    assert np.array_equal(ids_a, ids_b)
    assert np.allclose(vectors_a, vectors_b, atol=1e-6)
    assert not builds.exists() or not any(builds.iterdir())


def test_add_remove_filter_and_versions(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    encoder = Encoder(bundle)
    build_collection(build_spec(tmp_path, bundle, corpora["a"] / "images.csv", keep_versions=2))
    version = add_to_collection(
        build_spec(tmp_path, bundle, corpora["b"] / "images.csv", keep_versions=2)
    )
    assert version == 2
    with Collection.open(tmp_path, "photos") as collection:
        assert collection.info.count == 80
        query = encoder.encode_texts(["a green triangle"])
        everything = collection.search(query, 80)[0]
        assert len(everything) == 80
        ids = sorted(hit.id for hit in everything)
        assert ids == list(range(80))  # new records continue after the largest id
        tests = [hit for hit in everything if hit.item.metadata.get("split") == "test"]
        filtered = collection.search(query, 3, filters={"split": "test"})[0]
        assert [hit.id for hit in filtered] == [hit.id for hit in tests[:3]]
    doomed = [hit.id for hit in everything[:5]]
    version, count = remove_from_collection(tmp_path, "photos", ids=doomed, keep_versions=2)
    assert (version, count) == (3, 5)
    assert list_versions(tmp_path, "photos") == [2, 3]  # keep_versions=2 pruned version 1
    with Collection.open(tmp_path, "photos") as collection:
        rest = collection.search(query, 80)[0]
        assert len(rest) == 75
        assert not set(doomed) & {hit.id for hit in rest}
        assert not set(doomed) & {
            h.id for h in collection.search(query, 5, filters={"kind": "image"})[0]
        }
    # The previous version is still there, untouched, for readers that opened it.
    with Collection.open(tmp_path, "photos", version=2) as old:
        assert len(old.search(query, 80)[0]) == 80


def test_hnsw_removal_uses_tombstones_until_compacted(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    encoder = Encoder(bundle)
    build_collection(build_spec(tmp_path, bundle, corpora["a"] / "images.csv", factory="HNSW16"))
    query = encoder.encode_texts(["a small yellow star"])
    with Collection.open(tmp_path, "photos") as collection:
        top = [hit.id for hit in collection.search(query, 10)[0]]
    _, count = remove_from_collection(tmp_path, "photos", filters={"split": "train"})
    with Collection.open(tmp_path, "photos") as collection:
        assert collection.info.count == 60  # the vectors are still in the graph
        hits = collection.search(query, 10)[0]
        assert len(hits) == min(10, 60 - count)
        assert all(hit.item.metadata["split"] != "train" for hit in hits)
    version = compact_collection(tmp_path, "photos")
    with Collection.open(tmp_path, "photos") as collection:
        assert collection.version == version
        assert collection.info.count == collection.info.live == 60 - count
        assert collection.info.tombstones == 0
        assert len(collection.segments.deleted) == 0
        compacted = collection.search(query, 10)[0]
        assert [hit.id for hit in compacted] == [hit.id for hit in hits]
    assert top  # the first search saw train items too


def test_an_index_from_another_model_bundle_is_refused(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    build_collection(build_spec(tmp_path, bundle, corpora["b"] / "images.csv"))
    with pytest.raises(CollectionError, match=r"was built with model bundle .* rebuild"):
        Collection.open(tmp_path, "photos", bundle_id="0" * 64)
    with pytest.raises(CollectionError, match="no live version"):
        Collection.open(tmp_path, "nope")


def test_caption_and_video_collections(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    encoder = Encoder(bundle)
    build_collection(
        build_spec(
            tmp_path, bundle, corpora["b"] / "images.csv", collection="captions", kind="caption"
        )
    )
    with Collection.open(tmp_path, "captions") as captions:
        assert captions.info.modality == "text"
        rows = list(csv_rows(corpora["b"] / "images.csv"))
        assert captions.info.count == len(rows)
        image = Path(rows[0]["filepath"])
        if not image.is_absolute():
            image = corpora["b"] / image
        hits = captions.search(encoder.encode_images([image]), 3)[0]
        assert all(hit.item.kind == "caption" and hit.item.caption for hit in hits)
    videos = corpora["a"] / "videos.csv"
    # Synthetic clips last 2 s: one segment would repeat the video, so none is stored.
    build_collection(build_spec(tmp_path, bundle, videos, collection="whole", kind="video"))
    with Collection.open(tmp_path, "whole") as whole:
        assert whole.info.count == 3
        assert {
            hit.item.kind for hit in whole.search(encoder.encode_texts(["a circle"]), 10)[0]
        } == {"video"}
    build_collection(
        build_spec(tmp_path, bundle, videos, collection="clips", kind="video", segment_seconds=0.5)
    )
    with Collection.open(tmp_path, "clips") as clips:
        hits = clips.search(encoder.encode_texts(["a circle moves left"]), 50)[0]
        kinds = {hit.item.kind for hit in hits}
        assert kinds == {"video", "segment"}
        for hit in hits:
            assert hit.item.start_s is not None
            assert hit.item.end_s is not None
            assert 0 <= hit.item.start_s < hit.item.end_s or hit.item.kind == "video"
        segments = [h for h in hits if h.item.kind == "segment"]
        assert max(h.item.end_s or 0 for h in segments) > 0


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_cli_build_info_search_remove(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    base = ["--root", str(tmp_path), "--collection", "photos"]
    result = runner.invoke(
        cli,
        [
            "index",
            "build",
            *base,
            "--bundle",
            str(bundle),
            "--corpus",
            str(corpora["b"] / "images.csv"),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "built version 1" in result.output
    assert "20 live of 20 image vectors" in result.output
    result = runner.invoke(cli, ["index", "info", *base, "--json"])
    assert json.loads(result.output)["count"] == 20
    result = runner.invoke(
        cli,
        ["index", "search", *base, "--bundle", str(bundle), "--text", "a red circle", "-k", "2"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(".png") == 2
    result = runner.invoke(cli, ["index", "remove", *base, "--where", "split=train"])
    assert result.exit_code == 0, result.output
    assert "removed" in result.output
    missing = runner.invoke(cli, ["index", "info", "--root", str(tmp_path), "--collection", "x"])
    assert missing.exit_code != 0
    assert "no live version" in missing.output


def test_bench_index_runs_both_parts(
    corpora: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    out = tmp_path / "build.json"
    result = runner.invoke(
        cli,
        [
            "bench", "index", "build", "--bundle", str(bundle),
            "--corpus", str(corpora["a"] / "images.csv"), "--limit", "64", "--workers", "1",
            "--json-out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["items"] == 60
    assert row["build_items_per_s"] > 0
    assert row["ratio_build_to_encoder"] > 0
    result = runner.invoke(
        cli, ["bench", "index", "faiss", "--sizes", "3000", "--dim", "32", "--queries", "64"]
    )
    assert result.exit_code == 0, result.output
    assert {"`Flat`", "`HNSW32`"} <= {
        line.split("|")[2].strip()
        for line in result.output.splitlines()
        if line.startswith("| 3,000")
    }
