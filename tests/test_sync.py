"""``cots index sync`` on real files, a real cots-micro bundle and real FAISS segments.

A folder of generated PNGs is synced into a collection (a first sync builds it), then
changed the ways a photo folder changes (files deleted, added, rewritten, only touched), and
synced again: one new version whose live items are exactly the folder's files, with only the
new and rewritten files encoded. Then the ways a sync can be cut short or raced: killed
mid-encoding, files vanishing or changing while it runs, two syncs at once; and the sync as a
queued job (real Redis, real ``cots worker``) and through the HTTP API.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from PIL import Image
from rq.registry import FinishedJobRegistry

from indexer.cli import index
from indexer.collection import Collection
from indexer.errors import CollectionError
from indexer.jobs import DEFAULT_QUEUE, SyncRequest, enqueue_sync, job_status, pending_sync
from indexer.sync import SYNCS, SyncReport, sync_collection
from indexer.versions import collection_dir, current_version, list_versions
from model.data.synth import SynthConfig, generate_corpus
from runtime.encoder import Encoder
from service.settings import Settings
from tests.live_server import live_server
from tests.service_helpers import KEYS, WRITE_KEY, assert_error, wait_for_job, wait_for_version

ROOT = Path(__file__).resolve().parents[1]
N_PHOTOS = 20


def _write_png(path: Path, seed: int, side: int = 32) -> None:
    """A PNG of 4x4 random blocks: every seed a different picture (and vector)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((side // 4, side // 4, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _photos(folder: Path, count: int = N_PHOTOS, first_seed: int = 0) -> list[str]:
    """``count`` PNGs in two nested folders; their relative paths."""
    names = []
    for i in range(count):
        relpath = f"{'trips/2024' if i % 2 else 'home'}/p{first_seed + i:03d}.png"
        _write_png(folder / relpath, first_seed + i)
        names.append(relpath)
    (folder / "notes.txt").write_text("not a photo\n")
    return names


def _live(root: Path, name: str = "photos") -> dict[str, list[int]]:
    """Relative path -> live ids of the collection's items."""
    found: dict[str, list[int]] = {}
    with Collection.open(root, name, with_indexes=False) as collection:
        deleted = set(collection.segments.deleted.tolist())
        for segment in collection.segments.segments:
            for item in segment.store.iter_items():
                if item.id not in deleted:
                    found.setdefault(item.metadata["path"], []).append(item.id)
    return found


def _folder_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}


def _sync(root: Path, folder: Path, bundle: Path, **options: object) -> SyncReport:
    fields: dict[str, object] = {"bundle": bundle, "workers": 0, "batch_size": 8, **options}
    return sync_collection(root, "photos", folder, **fields)  # type: ignore[arg-type]


def _bump_mtime(path: Path, seconds: int = 3600) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


@pytest.fixture
def synced(tmp_path: Path, micro_bundle: Path) -> tuple[Path, Path, list[str]]:
    """(index root, folder, relative paths): a folder of 20 PNGs and its first sync."""
    folder, root = tmp_path / "photos", tmp_path / "collections"
    names = _photos(folder)
    report = _sync(root, folder, micro_bundle)
    assert report.published
    assert report.version == 1
    assert (report.added, report.encoded, report.removed) == (N_PHOTOS, N_PHOTOS, 0)
    assert report.skipped == {"not media": 1}
    return root, folder, names


def test_a_sync_publishes_what_changed_as_one_version(
    synced: tuple[Path, Path, list[str]], micro_bundle: Path
) -> None:
    root, folder, names = synced
    before = _live(root)
    assert set(before) == set(names)
    deleted, modified, touched = names[:3], names[3], names[4]
    for relpath in deleted:
        (folder / relpath).unlink()
    _write_png(folder / modified, seed=999, side=48)  # another size: re-encoded unhashed
    _bump_mtime(folder / touched)
    added = _photos(folder / "new", count=5, first_seed=100)
    added = [f"new/{relpath}" for relpath in added]
    (folder / "new" / "notes.txt").unlink()

    report = _sync(root, folder, micro_bundle)

    assert report.published
    assert report.version == 2
    assert list_versions(root, "photos") == [1, 2]  # one version for the whole change
    assert (report.added, report.changed, report.touched, report.removed) == (5, 1, 1, 3)
    assert report.unchanged == N_PHOTOS - 5
    assert report.encoded == 6
    # Only the touched file (same size, other mtime) was opened to compare its bytes, and the
    # 6 encoded files had their hashes taken by the decoder already.
    assert report.hashed == 1
    after = _live(root)
    assert set(after) == _folder_files(folder) == set(names[3:]) | set(added)
    gone = [i for relpath in [*deleted, modified, touched] for i in before[relpath]]
    with Collection.open(root, "photos") as collection:
        assert collection.get(gone) == [None] * len(gone)
        assert collection.info.live == len(after)
        # The touched photo kept its vector under its new id, with its new mtime recorded.
        (old_id,), (new_id,) = before[touched], after[touched]
        (item,) = collection.get([new_id])
        assert item is not None
        assert item.metadata["mtime_ns"] == (folder / touched).stat().st_mtime_ns
        with Collection.open(root, "photos", version=1) as first:
            old = first.segments.live_rows()[1][first.segments.live_rows()[0] == old_id]
        new = collection.segments.live_rows()[1][collection.segments.live_rows()[0] == new_id]
        np.testing.assert_allclose(new, old, atol=1e-6)
        # Search finds the rewritten and the new photos by their own pictures.
        encoder = Encoder(micro_bundle)
        queries = encoder.encode_images([folder / modified, folder / added[2]])
        hits = collection.search(queries, 1)
    assert [h[0].item.metadata["path"] for h in hits] == [modified, added[2]]
    assert not (collection_dir(root, "photos") / SYNCS).exists()

    again = _sync(root, folder, micro_bundle)
    assert not again.published
    assert again.version == 2
    assert list_versions(root, "photos") == [1, 2]
    assert (again.added, again.changed, again.touched, again.removed) == (0, 0, 0, 0)
    assert again.unchanged == len(after)
    # Nothing opened: no file hashed (the touched one's new mtime is recorded), none encoded.
    assert (again.hashed, again.encoded) == (0, 0)
    assert "already in sync at version 2" in again.summary()
    assert not (collection_dir(root, "photos") / SYNCS).exists()


def test_an_interrupted_sync_resumes_from_its_saved_shards(
    synced: tuple[Path, Path, list[str]], micro_bundle: Path
) -> None:
    root, folder, _ = synced
    _photos(folder / "more", count=6, first_seed=200)

    def crash_after_first_shard(done: int, total: int, stage: str) -> None:
        if stage == "encoding" and done > 0:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _sync(root, folder, micro_bundle, shard_size=2, progress=crash_after_first_shard)
    assert current_version(root, "photos") == 1  # nothing published
    saved = list((collection_dir(root, "photos") / SYNCS).rglob("shard-*.npz"))
    assert len(saved) == 1

    report = _sync(root, folder, micro_bundle, shard_size=2)
    assert (report.added, report.encoded, report.resumed) == (6, 4, 2)
    assert report.version == 2
    assert set(_live(root)) == _folder_files(folder)
    assert not (collection_dir(root, "photos") / SYNCS).exists()


def test_files_vanishing_or_changing_during_a_sync(
    synced: tuple[Path, Path, list[str]], micro_bundle: Path
) -> None:
    root, folder, names = synced
    new = [f"late/{p}" for p in _photos(folder / "late", count=3, first_seed=300)]
    (folder / "late" / "notes.txt").unlink()
    rewritten = names[0]
    _write_png(folder / rewritten, seed=777, side=48)

    def meddle(done: int, total: int, stage: str) -> None:
        if stage == "encoding" and done == 0:  # after the scan, before any file is read
            (folder / new[0]).unlink()
            (folder / rewritten).unlink()
        if stage == "encoding" and done == total:  # encoded, not yet published
            _write_png(folder / new[1], seed=555, side=48)

    report = _sync(root, folder, micro_bundle, progress=meddle)
    assert report.skipped == {"not media": 1, "missing file": 2, "changed during sync": 1}
    assert (report.added, report.changed, report.removed) == (1, 0, 1)
    live = _live(root)
    assert new[2] in live
    assert new[1] not in live
    assert new[0] not in live
    assert rewritten not in live  # it vanished: its old item went with it
    # The next sync takes the file that changed under the last one.
    report = _sync(root, folder, micro_bundle)
    assert (report.added, report.encoded) == (1, 1)
    assert set(_live(root)) == _folder_files(folder)


def test_a_video_changed_or_deleted_takes_its_segments_with_it(
    tmp_path: Path, micro_bundle: Path
) -> None:
    config = SynthConfig(
        seed=3, n_images=0, n_videos=3, image_size=32, video_size=32, video_frames=24
    )
    generate_corpus(tmp_path / "corpus", config, workers=1)
    videos = sorted((tmp_path / "corpus").rglob("*.mp4"))
    folder, root = tmp_path / "videos", tmp_path / "collections"
    folder.mkdir()
    for video in videos[:2]:
        shutil.copy(video, folder / video.name)
    first = _sync(root, folder, micro_bundle, kind="video")
    assert (first.added, first.encoded) == (2, 2)
    before = _live(root)
    assert all(len(ids) > 1 for ids in before.values())  # each video and its segments

    shutil.copy(videos[2], folder / videos[0].name)  # another video under the same name
    (folder / videos[1].name).unlink()
    report = _sync(root, folder, micro_bundle, kind="video")
    assert (report.added, report.changed, report.removed, report.encoded) == (0, 1, 1, 1)
    after = _live(root)
    assert set(after) == {videos[0].name}
    assert set(after[videos[0].name]).isdisjoint(before[videos[0].name])
    with Collection.open(root, "photos", with_indexes=False) as collection:
        old = [i for ids in before.values() for i in ids]
        assert collection.get(old) == [None] * len(old)
        kinds = [item.kind for item in collection.get(after[videos[0].name]) if item]
    assert kinds[0] == "video"
    assert set(kinds[1:]) == {"segment"}


def test_one_sync_per_collection_and_clear_errors(
    synced: tuple[Path, Path, list[str]], micro_bundle: Path, tmp_path: Path
) -> None:
    root, folder, _ = synced
    with (collection_dir(root, "photos") / ".sync.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CollectionError, match="already running"):
            _sync(root, folder, micro_bundle)
    with pytest.raises(CollectionError, match="--kind image"):
        _sync(root, folder, micro_bundle, kind="video")
    with pytest.raises(CollectionError, match="--bundle"):
        sync_collection(root, "fresh", folder)  # a first sync needs the bundle named
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CollectionError, match="refusing to remove"):
        _sync(root, empty, micro_bundle)
    with pytest.raises(CollectionError, match="holds no images"):
        sync_collection(root, "fresh", empty, bundle=micro_bundle)
    assert not (root / "fresh").exists()
    assert current_version(root, "photos") == 1
    # The recorded bundle is the default: the CLI needs no --bundle after the first sync.
    (folder / "home" / "p000.png").unlink()
    result = CliRunner().invoke(
        index,
        ["sync", "--root", str(root), "--collection", "photos", "--corpus", str(folder),
         "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "photos: 0 new, 0 changed, 1 removed, 19 unchanged" in result.output
    assert result.output.rstrip().endswith("now version 2")


def test_a_sync_job_on_the_queue_run_by_cots_worker(
    redis_db: str, synced: tuple[Path, Path, list[str]], micro_bundle: Path
) -> None:
    root, folder, _ = synced
    _photos(folder / "queued", count=2, first_seed=400)
    request = SyncRequest(root=root, collection="photos", folder=folder, workers=0)
    job_id = enqueue_sync(redis_db, request)
    assert pending_sync(redis_db, "photos") == job_id
    # The worker's schedule skips the collection whose sync is queued, and queues the other.
    other = folder.parent / "others"
    _photos(other, count=2, first_seed=500)
    command = [
        sys.executable, "-c", "from cots.cli import main; main()", "worker", "--burst",
        "--redis-url", redis_db, "--root", str(root), "--bundle", str(micro_bundle),
        "--sync", f"{folder}=photos", "--sync", f"{other}=others", "--sync-every", "3600",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    status = job_status(redis_db, job_id)
    assert status["status"] == "finished", status
    assert status["kind"] == "sync"
    assert status["progress"]["stage"] in ("publishing", "indexing")
    assert status["result"]["report"]["added"] == 2
    assert status["result"]["version"] == 2
    assert pending_sync(redis_db, "photos") is None
    with redis.Redis.from_url(redis_db) as connection:
        finished = FinishedJobRegistry(DEFAULT_QUEUE, connection=connection).get_job_ids()
    assert len(finished) == 2  # the queued photos sync and the scheduled others sync
    assert current_version(root, "photos") == 2
    assert current_version(root, "others") == 1  # its first sync, queued by the schedule
    assert set(_live(root, "others")) == _folder_files(other)


def test_the_sync_route(
    synced: tuple[Path, Path, list[str]], micro_bundle: Path, tmp_path: Path
) -> None:
    root, folder, _ = synced
    _photos(folder / "api", count=2, first_seed=600)
    settings = Settings(
        bundle=micro_bundle,
        index_root=root,
        data_root=folder.parent,
        api_keys=KEYS,
        rate_limit_per_minute=0,
        reload_poll_s=0.2,
    )
    with live_server(settings) as server, server.client() as client:
        url = "/v1/collections/photos/sync"
        headers = {"X-API-Key": WRITE_KEY}
        assert_error(client.post(url, json={"corpus": "photos"}), 401)
        outside = client.post(url, json={"corpus": "../.."}, headers=headers)
        assert_error(outside, 403, "outside the data root")
        response = client.post(url, json={"corpus": "photos", "kind": "image"}, headers=headers)
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], WRITE_KEY)
        assert job["status"] == "finished", job
        assert job["kind"] == "sync"
        assert job["result"]["version"] == 2
        assert job["result"]["detail"]["added"] == 2
        wait_for_version(client, "photos", 2)
    assert set(_live(root)) == _folder_files(folder)
