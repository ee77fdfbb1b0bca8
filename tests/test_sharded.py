"""Sharded collections (issue 39 item 4): split, routed adds/removes/compaction, and search
over the shards that equals search over one collection of the same items."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import ray
from click.testing import CliRunner

from indexer.assemble import write_version
from indexer.cli import index as index_cli
from indexer.collection import Collection
from indexer.compaction import CompactionPolicy, compact_collection
from indexer.errors import CollectionError
from indexer.faiss_index import native_ivf
from indexer.index_bundle import IndexInfo, read_info
from indexer.metadata import Item
from indexer.segments import Segment
from indexer.sharded import (
    LocalShards,
    is_sharded,
    merge_shard_results,
    read_sharded,
    shard_name,
    shard_of,
    shard_root,
)
from indexer.sharded_build import build_sharded, split_collection
from indexer.sharded_sync import sync_sharded
from indexer.sharded_update import add_sharded, compact_sharded, remove_sharded
from indexer.sync import SyncReport, sync_collection
from indexer.synthetic_vectors import Mixture
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import current_dir, publish, staging
from runtime.encoder import Encoder

DIM = 32
TAGS = ("cat", "dog", "bird", "fish")


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """OpenMP threads spin-waiting on the shared 2-core test machine make these small
    searches several times slower."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray, rng: np.random.Generator) -> list[Item]:
    return [
        Item(
            id=int(i),
            kind="image",
            uri=f"u/{i}",
            group_id=f"g{int(i) // 3}",
            metadata={"year": int(rng.integers(2000, 2010)), "tag": str(rng.choice(TAGS))},
        )
        for i in ids
    ]


def build(root: Path, name: str, ids: np.ndarray, vectors: np.ndarray, items: list[Item],
          factory: str = "Flat") -> None:  # fmt: skip
    info = IndexInfo(
        collection=name, kind="image", modality="image", count=0, live=0, dim=DIM,
        factory=factory, model_bundle_id="b" * 64, recall_at_10=0.0,
        build={"index_fields": ["year"]}, created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, name) as staged:
        write_version(staged, ids, vectors, items, factory, info)
        publish(root, name, staged, keep=2)


def twins(root: Path, n: int, seed: int = 0, factory: str = "Flat") -> None:
    """Collections "single" and "split" of the same items; "split" is split into 3 shards."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    vectors = unit(rng, n)
    items = items_for(ids, rng)
    build(root, "single", ids, vectors, items, factory)
    build(root, "split", ids, vectors, items, factory)
    split_collection(root, "split", 3, progress=False)


def random_filter(rng: np.random.Generator) -> dict[str, Any] | None:
    choice = int(rng.integers(0, 5))
    if choice == 0:
        return None
    if choice == 1:
        return {"year": {"gte": int(rng.integers(2000, 2010))}}
    if choice == 2:
        return {"tag": {"in": [str(t) for t in rng.choice(TAGS, size=2, replace=False)]}}
    if choice == 3:  # few matches: the exact path of filtered segments
        return {"group_id": f"g{int(rng.integers(0, 550))}"}
    return {"any_of": [{"tag": "cat", "year": {"lt": 2004}}, {"tag": "fish"}]}


def assert_same_page(
    single: Collection, shards: LocalShards, queries: np.ndarray, k: int, offset: int,
    filters: dict[str, Any] | None,
) -> None:  # fmt: skip
    """The page at ``offset`` of size ``k``: each side asked for offset + k, sliced after."""
    s_scores, s_ids = single.nearest(queries, offset + k, filters=filters)
    m_scores, m_ids = shards.nearest(queries, offset + k, filters=filters)
    expected = single.hydrate(s_scores[:, offset:], s_ids[:, offset:], k)
    got = shards.hydrate(m_scores[:, offset:], m_ids[:, offset:], k)
    for want, have in zip(expected, got, strict=True):
        assert [h.id for h in have] == [h.id for h in want], (k, offset, filters)
        assert [h.item for h in have] == [h.item for h in want]
        # A shard holds a third of a segment's vectors; FAISS's BLAS blocking then sums the
        # same products in another order, which may change a score's last float bit.
        np.testing.assert_allclose(
            [h.score for h in have], [h.score for h in want], rtol=0, atol=1e-6
        )


def test_sharded_search_equals_single_node_through_random_changes(tmp_path: Path) -> None:
    twins(tmp_path, 1500)
    info = read_sharded(tmp_path, "split")
    assert (info.shards, info.replicas, info.factory) == (3, 1, "Flat")
    assert not info.shared_quantizer
    assert info.source_version == 1
    rng = np.random.default_rng(7)
    largest = 1499
    for step in range(30):
        op = int(rng.integers(0, 10))
        if op < 4:
            n = int(rng.integers(1, 60))
            vectors = unit(rng, n)
            items = items_for(np.zeros(n, dtype=np.int64), rng)
            given = add_sharded(tmp_path, "split", vectors, items)
            # New ids follow the largest any shard ever gave (removed ones included).
            assert given.tolist() == list(range(largest + 1, largest + 1 + n))
            largest = int(given[-1])
            numbered = [
                it.model_copy(update={"id": int(i)}) for it, i in zip(items, given, strict=True)
            ]
            add_encoded(tmp_path, "single", given, vectors, numbered, keep_versions=2)
        elif op < 6:
            with Collection.open(tmp_path, "single", with_indexes=False) as live:
                alive = live.ids_matching(None)
            doomed = rng.choice(alive, size=int(rng.integers(1, 80)), replace=False).tolist()
            doomed.append(10**9 + step)  # an id nobody holds: ignored by both
            _, removed = remove_sharded(tmp_path, "split", ids=doomed, keep_versions=2)
            _, expected = remove_from_collection(tmp_path, "single", ids=doomed, keep_versions=2)
            assert removed == expected == len(doomed) - 1
        elif op == 6:
            where = {"tag": "bird", "year": int(rng.integers(2000, 2010))}
            _, removed = remove_sharded(tmp_path, "split", filters=where, keep_versions=2)
            _, expected = remove_from_collection(tmp_path, "single", filters=where, keep_versions=2)
            assert removed == expected
        elif op == 7:
            policy = CompactionPolicy(full=bool(rng.integers(0, 2)), tombstone_ratio=0.05)
            compact_sharded(tmp_path, "split", keep_versions=2, policy=policy)
            compact_collection(tmp_path, "single", keep_versions=2, policy=policy)
        with (
            Collection.open(tmp_path, "single") as single,
            LocalShards.open(tmp_path, "split") as shards,
        ):
            queries = unit(rng, 4)
            filters = random_filter(rng)
            k, offset = int(rng.integers(1, 25)), int(rng.integers(0, 3)) * int(rng.integers(0, 30))
            assert_same_page(single, shards, queries, k, offset, filters)
            np.testing.assert_array_equal(
                shards.ids_matching(filters), single.ids_matching(filters)
            )
            probe = rng.integers(0, 1700, size=20)
            assert shards.get(probe) == single.get(probe)
            want = single.stored_vectors(probe)
            have = shards.stored_vectors(probe)
            assert sorted(have) == sorted(want)
            for i in want:
                np.testing.assert_array_equal(have[i], want[i])
            assert shards.live == single.info.live
    # Every shard holds only the ids it owns.
    for i in range(3):
        with Collection.open(shard_root(tmp_path, "split"), shard_name(i)) as shard:
            held = np.concatenate([s.ids for s in shard.segments.segments])
            assert np.all(shard_of(held, 3) == i)


def test_ownership_is_balanced_whatever_the_id_stride() -> None:
    """Ids are record * stride + sub (indexer.item_ids): a caption's position or a video's
    segment must not decide its shard, as it would with id % S."""
    images = np.arange(30_000)
    captions = (np.arange(6_000)[:, None] * 1024 + np.arange(5)).ravel()
    videos = (np.arange(1_000)[:, None] * 1_000_000 + np.arange(30)).ravel()
    for ids in (images, captions, videos):
        for shards in (2, 3, 4, 8):
            counts = np.bincount(shard_of(ids, shards), minlength=shards)
            assert counts.min() > 0.93 * len(ids) / shards, (shards, counts)
    # Pinned: collections on disk were split by it, so it never changes.
    assert shard_of(np.array([0, 1, 2, 3, 2**62]), 4).tolist() == [3, 1, 2, 1, 3]


def test_split_writes_normal_shard_collections(tmp_path: Path) -> None:
    twins(tmp_path, 300)
    assert is_sharded(tmp_path, "split")
    assert not is_sharded(tmp_path, "single")
    source = read_info(current_dir(tmp_path, "split"))
    total = 0
    for i in range(3):
        folder = shard_root(tmp_path, "split")
        info = read_info(current_dir(folder, shard_name(i)))
        assert info.collection == shard_name(i)
        assert (info.max_id, info.kind, info.model_bundle_id) == (299, "image", "b" * 64)
        assert info.build == source.build
        assert len(info.segments) == 1
        assert info.factory == "Flat"
        total += info.live
    assert total == 300
    # The source's files stay: the snapshot it was split from.
    assert read_info(current_dir(tmp_path, "split")).live == 300


def ivf_of(segment: Segment) -> faiss.IndexIVF:
    assert segment.index is not None
    ivf = native_ivf(segment.index)
    assert ivf is not None
    return ivf


def test_ivf_shards_share_one_quantizer(tmp_path: Path) -> None:
    mixture = Mixture(DIM, clusters=64, seed=1)
    vectors = mixture.sample(6000, seed=2)
    ids = np.arange(len(vectors), dtype=np.int64)
    rng = np.random.default_rng(0)
    build(tmp_path, "ivf", ids, vectors, items_for(ids, rng), factory="IVF64,Flat")
    info = split_collection(tmp_path, "ivf", 3, progress=False)
    assert info.shared_quantizer
    assert info.factory == "IVF64,Flat"
    with Collection.open(tmp_path, "ivf") as whole:
        whole_ivf = ivf_of(whole.segments.segments[0])
        # Trained on the same seeded sample (all 6,000 here) as the unsharded build was.
        whole_centroids = whole_ivf.quantizer.reconstruct_n(0, 64)
        queries = mixture.sample(200, seed=3)
        whole_scores, whole_ids = whole.nearest(queries, 10)
    with LocalShards.open(tmp_path, "ivf") as shards:
        for shard in shards.shards:
            (segment,) = shard.segments.segments
            assert shard.info.factory == "IVF64,Flat"
            ivf = ivf_of(segment)
            assert ivf.nprobe == whole_ivf.nprobe == 8
            np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 64), whole_centroids)
        scores, found = shards.nearest(queries, 10)
    # One quantizer, the same nprobe: each query probes the same lists in every shard as in
    # the whole, so the merged answer is the unsharded IVF's answer.
    np.testing.assert_array_equal(found, whole_ids)
    np.testing.assert_allclose(scores, whole_scores, rtol=0, atol=1e-6)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall > 0.9, recall


@pytest.mark.slow
def test_ray_task_build_equals_local_build(tmp_path: Path) -> None:
    """Flat shards built from vectors in memory (each shard chooses its own factory) and IVF
    ones split from a collection (each task reads its items from the source's segment files;
    the trained quantizer is sent to every task): Ray tasks write the shards this process
    writes."""
    rng = np.random.default_rng(3)
    vectors = unit(rng, 900)
    ids = np.arange(900, dtype=np.int64) * 2 + 1
    items = items_for(ids, rng)
    common: dict[str, Any] = {"model_bundle_id": "b" * 64, "fields": ["year"], "progress": False}
    factories = {"flat": "auto", "ivf": "IVF8,Flat"}
    for where in ("local", "ray"):
        build(tmp_path / where, "ivf", ids, vectors, items, factory="IVF8,Flat")
        remove_from_collection(tmp_path / where, "ivf", ids=[1, 3, 5])  # split live items only
    build_sharded(tmp_path / "local", "flat", ids, vectors, items, 3, **common)
    split_collection(tmp_path / "local", "ivf", 3, progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        build_sharded(tmp_path / "ray", "flat", ids, vectors, items, 3, parallel="ray", **common)
        split_collection(tmp_path / "ray", "ivf", 3, parallel="ray", progress=False)
    finally:
        ray.shutdown()
    queries = unit(rng, 5)
    for name in factories:
        with (
            LocalShards.open(tmp_path / "local", name) as local,
            LocalShards.open(tmp_path / "ray", name) as remote,
        ):
            assert local.info.shared_quantizer == remote.info.shared_quantizer == (name == "ivf")
            for a, b in zip(local.shards, remote.shards, strict=True):
                assert (a.info.live, a.info.factory) == (b.info.live, b.info.factory)
                np.testing.assert_array_equal(a.ids_matching(None), b.ids_matching(None))
                (a_segment,) = a.segments.segments
                (b_segment,) = b.segments.segments
                assert a_segment.index is not None
                assert b_segment.index is not None
                assert faiss.serialize_index(a_segment.index).tobytes() == (
                    faiss.serialize_index(b_segment.index).tobytes()
                )
            for a_part, b_part in zip(
                local.nearest(queries, 7), remote.nearest(queries, 7), strict=True
            ):
                np.testing.assert_array_equal(a_part, b_part)
    with LocalShards.open(tmp_path / "ray", "ivf") as remote:
        assert remote.live == 897
        found = remote.get([1, 3, 5, 7])
        assert found[:3] == [None, None, None]
        assert found[3] == items[3]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = np.arange(5, dtype=np.int64)
    build(tmp_path, "tiny", ids, unit(rng, 5), items_for(ids, rng))
    with pytest.raises(CollectionError, match="at least 2 shards"):
        split_collection(tmp_path, "tiny", 1, progress=False)
    with pytest.raises(CollectionError, match=r"5 live items.*6 shards"):
        split_collection(tmp_path, "tiny", 6, progress=False)
    with pytest.raises(CollectionError, match="'nowhere' has no live version"):
        split_collection(tmp_path, "nowhere", 2, progress=False)
    assert not (tmp_path / "nowhere").exists()
    split_collection(tmp_path, "tiny", 2, progress=False)
    with pytest.raises(CollectionError, match="sharded already"):
        split_collection(tmp_path, "tiny", 2, progress=False)
    # The unsharded change paths refuse a sharded collection instead of changing the snapshot.
    with pytest.raises(CollectionError, match="'tiny' is sharded"):
        remove_from_collection(tmp_path, "tiny", ids=[1])
    with pytest.raises(CollectionError, match="'tiny' is sharded"):
        add_encoded(tmp_path, "tiny", np.array([9]), unit(rng, 1), items_for(np.array([9]), rng))
    with pytest.raises(CollectionError, match="not sharded"):
        read_sharded(tmp_path, "single")
    assert merge_shard_results(
        [(np.array([[0.5, -np.inf]], np.float32), np.array([[3, -1]])),
         (np.array([[0.5]], np.float32), np.array([[1]]))], 3
    )[1].tolist() == [[1, 3, -1]]  # fmt: skip


def test_cli_shard_and_routed_commands(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = np.arange(40, dtype=np.int64)
    build(tmp_path, "c", ids, unit(rng, 40), items_for(ids, rng))
    runner = CliRunner()
    root = ["--root", str(tmp_path)]
    result = runner.invoke(index_cli, ["shard", *root, "--collection", "c", "--shards", "1"])
    assert result.exit_code != 0
    assert "at least 2 shards" in result.output
    result = runner.invoke(
        index_cli, ["shard", *root, "--collection", "c", "--shards", "4", "--replicas", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "4 shards" in result.output
    assert read_sharded(tmp_path, "c").replicas == 2
    result = runner.invoke(index_cli, ["info", *root, "--collection", "c"])
    assert result.exit_code == 0, result.output
    assert "sharded: 4 shards" in result.output, result.output
    assert "40 live" in result.output
    result = runner.invoke(index_cli, ["remove", *root, "--collection", "c", "--id", "3"])
    assert result.exit_code == 0, result.output
    assert "removed 1 items" in result.output, result.output
    result = runner.invoke(index_cli, ["info", *root, "--collection", "c"])
    assert "39 live" in result.output, result.output
    result = runner.invoke(index_cli, ["compact", *root, "--collection", "c", "--full"])
    assert result.exit_code == 0, result.output
    assert "compacted" in result.output, result.output
    result = runner.invoke(index_cli, ["duplicates", *root, "--collection", "c"])
    assert result.exit_code != 0, result.output
    assert "'c' is sharded" in result.output, result.output
    result = runner.invoke(
        index_cli, ["build", *root, "--collection", "c", "--bundle", str(tmp_path), "--corpus", "x"]
    )
    assert result.exit_code != 0, result.output
    assert "`cots index build` takes unsharded collections only" in result.output
    assert f"deleting {tmp_path}/c/sharded.json" in result.output
    result = runner.invoke(index_cli, ["shard", "--help"])
    assert result.exit_code == 0
    assert "goes to shard mix(i) % S" in result.output


@pytest.mark.slow
def test_sync_of_a_sharded_collection_equals_sync_of_one(
    tmp_path: Path, micro_bundle: Path
) -> None:
    from tests.test_sync import _photos, _write_png

    folder = tmp_path / "photos"
    names = _photos(folder, count=12)
    single, split = tmp_path / "single", tmp_path / "split"
    options: dict[str, Any] = {"bundle": micro_bundle, "workers": 0, "batch_size": 8}
    assert sync_collection(single, "photos", folder, **options).published
    shutil.copytree(single, split, symlinks=True)
    split_collection(split, "photos", 3, progress=False)
    # New, gone, changed and touched (same bytes, new mtime) files.
    _photos(folder / "more", count=3, first_seed=100)
    (folder / names[0]).unlink()
    _write_png(folder / names[1], seed=999)
    stat = (folder / names[2]).stat()
    os.utime(folder / names[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
    expected = sync_collection(single, "photos", folder, **options)
    result = CliRunner().invoke(
        index_cli,
        ["sync", "--root", str(split), "--collection", "photos", "--corpus", str(folder),
         "--bundle", str(micro_bundle), "--workers", "0", "--batch-size", "8", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = SyncReport.model_validate_json(result.stdout)
    assert (got.added, got.changed, got.touched, got.removed) == (3, 1, 1, 1)
    assert (got.added, got.changed, got.touched, got.removed) == (
        expected.added, expected.changed, expected.touched, expected.removed
    )  # fmt: skip
    queries = Encoder(micro_bundle).encode_texts(["a photo", "blocks of colour"])
    with (
        Collection.open(single, "photos") as one,
        LocalShards.open(split, "photos") as shards,
    ):
        everything = one.ids_matching(None)
        np.testing.assert_array_equal(shards.ids_matching(None), everything)
        assert shards.get(everything) == one.get(everything)
        assert_same_page(one, shards, queries, 5, 2, None)
    again = sync_sharded(split, "photos", folder, **options)
    assert not again.published
    assert again.unchanged == 14


@pytest.mark.slow
def test_cli_add_and_search_on_a_sharded_collection(tmp_path: Path, micro_bundle: Path) -> None:
    from tests.test_sync import _photos

    folder, root = tmp_path / "photos", tmp_path / "collections"
    _photos(folder, count=8)
    options: dict[str, Any] = {"bundle": micro_bundle, "workers": 0, "batch_size": 8}
    sync_collection(root, "photos", folder, **options)
    split_collection(root, "photos", 2, progress=False)
    more = tmp_path / "more"
    _photos(more, count=3, first_seed=50)
    runner = CliRunner()
    common = ["--root", str(root), "--collection", "photos"]
    result = runner.invoke(
        index_cli,
        ["add", *common, "--bundle", str(micro_bundle), "--corpus", str(more), "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    assert "11 live" in result.stdout
    with LocalShards.open(root, "photos") as shards:
        added = [item for item in shards.get(np.arange(8, 11)) if item is not None]
        assert sorted(Path(item.uri).name for item in added) == ["p050.png", "p051.png", "p052.png"]
        # Ids 0-7 were split, 8-10 added: each shard holds the ones it owns.
        owners = shard_of(np.arange(11), 2)
        assert [shard.info.live for shard in shards.shards] == np.bincount(owners).tolist()
    result = runner.invoke(index_cli, ["search", *common, "--text", "a photo", "-k", "11"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "a photo"
    assert len(lines) == 12
    assert any("p051.png" in line for line in lines)
