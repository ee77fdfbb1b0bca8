"""The Ray engine against the local one: same shards, same index, and resume, on a real local
Ray cluster of 2 CPUs and a real model bundle. Ray missing fails these tests; it never skips."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from indexer.build import build_collection
from indexer.build_spec import BuildSpec
from indexer.index_bundle import read_info
from indexer.ray_engine import encode_shards_with_ray
from indexer.shards import Shard, encode_shards_locally, list_records
from indexer.versions import current_dir
from model.data.synth import SynthConfig, generate_corpus
from tests.micro import build_spec
from tests.versions import version_content

pytestmark = [
    pytest.mark.slow,
    # Ray Data's DataContext warns about its own deprecated fields when it builds one.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CORRUPT = 3  # record index of the image the corpus fixture breaks
OLD = 1_000_000_000.0  # an mtime no file written by the tests can have


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-corpus")
    generate_corpus(root, SynthConfig(seed=7, n_images=40, n_videos=0, image_size=32), workers=1)
    # A bad item, so skipped items go through the pipeline too.
    spec = BuildSpec(collection="c", root=root, bundle=root, corpus=str(root / "images.csv"))
    records, _ = list_records(spec)
    path = records[CORRUPT].path
    assert path is not None
    path.write_bytes(b"not an image")
    return root / "images.csv"


@pytest.fixture(scope="module")
def bundle(micro_bundle: Path) -> Path:
    return micro_bundle


@pytest.fixture
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine must start its own local cluster, not join one named by the environment."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def ray_cluster() -> Iterator[None]:
    """A local cluster of 2 CPUs started by the test, which the engine must use and leave."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def spec(root: Path, bundle: Path, corpus: Path, **overrides: Any) -> BuildSpec:
    return build_spec(root, bundle, corpus, shard_size=8, batch_size=4, **overrides)


def assert_same_shard(got: Shard, want: Shard) -> None:
    assert np.array_equal(got.ids, want.ids)
    assert got.vectors.dtype == np.float32
    assert got.vectors.shape == want.vectors.shape
    assert np.allclose(got.vectors, want.vectors, atol=1e-5)
    assert got.items == want.items
    assert got.skipped == want.skipped


@pytest.mark.usefixtures("no_ray_address")
def test_ray_builds_the_same_collection_as_local(
    corpus: Path, bundle: Path, tmp_path: Path
) -> None:
    build_collection(spec(tmp_path / "local", bundle, corpus))
    assert not ray.is_initialized()
    # workers=1: the engine's own local cluster gets max(2, workers + 1) = 2 CPUs.
    build_collection(spec(tmp_path / "ray", bundle, corpus, engine="ray", workers=1))
    assert not ray.is_initialized()  # it shut down the cluster it started
    local, distributed = (
        current_dir(tmp_path / "local", "photos"),
        current_dir(tmp_path / "ray", "photos"),
    )
    (ids_l, vectors_l, items), (ids_d, vectors_d, items_d) = (
        version_content(local),
        version_content(distributed),
    )
    assert np.array_equal(ids_l, ids_d)
    assert np.allclose(vectors_l, vectors_d, atol=1e-5)
    assert items == items_d
    assert len(items) == 39
    assert CORRUPT not in {item["id"] for item in items}
    want, got = read_info(local), read_info(distributed)
    assert (got.count, got.live, got.dim, got.factory) == (want.count, want.live, want.dim, "Flat")
    assert got.count == 39
    assert got.skipped == want.skipped == {"corrupt image": 1}
    assert got.model_bundle_id == want.model_bundle_id
    assert got.recall_at_10 == pytest.approx(want.recall_at_10)
    assert got.build["engine"] == "ray"


@pytest.mark.usefixtures("ray_cluster")
def test_ray_resumes_only_the_missing_shards(corpus: Path, bundle: Path, tmp_path: Path) -> None:
    build = spec(tmp_path, bundle, corpus, engine="ray")
    records, _ = list_records(build)
    work = tmp_path / "work"
    work.mkdir()
    paths = encode_shards_locally(build, records, work, None)
    assert len(paths) == 5
    expected = [Shard.load(path) for path in paths]
    for path in paths:
        os.utime(path, (OLD, OLD))
    for lost in (1, 4):  # shard 1 holds the corrupt image
        paths[lost].unlink()
    calls: list[tuple[int, int, str]] = []
    got = encode_shards_with_ray(build, records, work, lambda *call: calls.append(call))
    assert got == paths
    assert [path.stat().st_mtime != OLD for path in paths] == [False, True, False, False, True]
    for path, shard in zip(paths, expected, strict=True):
        assert_same_shard(Shard.load(path), shard)
    assert sorted(calls) == [(32, 40, "encoding"), (40, 40, "encoding")]
    assert ray.is_initialized()  # the test's cluster is the test's to stop
    # Nothing left to do: nothing is recomputed.
    assert encode_shards_with_ray(build, records, work, None) == paths
    assert [path.stat().st_mtime != OLD for path in paths] == [False, True, False, False, True]
