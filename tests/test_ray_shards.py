"""Sharded collections served by Ray Serve (issue 39 items 4-5), on a real local Ray cluster of
three nodes: a head without CPUs (the Serve controller and this process) and two workers of one
CPU each, "a" and "b", each with a custom resource of its name.

- S=3, R=2: the router (``service.shard_router``) answers exactly as one collection of the same
  items, through random adds, removes and filtered, paged queries.
- A worker holding a replica of every shard dies under a steady stream of HTTP searches: every
  search answers 200, complete, with the hits of the unsharded twin.
- R=1, shard 0 pinned to worker "a": with "a" gone, searches are partial and name shard 0 (body,
  X-COTS-Partial, cots_partial_results_total), complete: true gets 503 with Retry-After; once
  "a" is back, Serve restarts the replica and answers are complete again.

Without a Ray address, a sharded collection is listed unavailable, naming the setting.

Ray missing fails these tests; it never skips.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.cluster_utils import Cluster

from indexer.assemble import write_version
from indexer.collection import Collection
from indexer.index_bundle import IndexInfo
from indexer.metadata import Item
from indexer.sharded import shard_of
from indexer.sharded_build import split_collection
from indexer.sharded_update import add_sharded, remove_sharded
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import publish, staging
from runtime.bundle import BundleManifest, read_manifest
from service.metrics import Metrics
from service.registry import CollectionRegistry
from service.settings import Settings
from service.shard_router import RayShards, ShardedCollection, deployment_name, ray_address
from tests.live_server import LiveServer, live_server

MB = 2**20
OBJECT_STORE = 80 * MB
TAGS = ("cat", "dog", "bird")
COUNT = 300  # items of each collection at the start
SHARDS = 3
# Fast node-death detection (the default takes ~15 s): replicas' actors are declared dead, and
# Serve stops routing to them, within about a second.
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


class Workers:
    """The cluster's two workers by name; one can die and come back (a new node)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.nodes: dict[str, Any] = {}

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(
            num_cpus=1, resources={f"node-{name}": 1}, object_store_memory=OBJECT_STORE
        )
        self.cluster.wait_for_nodes()

    def kill(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    saved = os.environ.get("RAY_ADDRESS")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH,
        },
    )
    nodes = Workers(cluster)
    try:
        nodes.add("a")
        nodes.add("b")
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        yield nodes
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def manifest(micro_bundle: Path) -> BundleManifest:
    return read_manifest(micro_bundle, verify=False)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray, rng: np.random.Generator) -> list[Item]:
    return [
        Item(
            id=int(i),
            kind="image",
            uri=f"u/{i}",
            group_id=f"g{int(i) // 4}",
            metadata={"year": int(rng.integers(2000, 2010)), "tag": str(rng.choice(TAGS))},
        )
        for i in ids
    ]


def build(root: Path, name: str, bundle_id: str, vectors: np.ndarray,
          items: list[Item]) -> None:  # fmt: skip
    info = IndexInfo(
        collection=name, kind="image", modality="image", count=0, live=0,
        dim=vectors.shape[1], factory="Flat", model_bundle_id=bundle_id,
        recall_at_10=0.0, build={"index_fields": ["year"]},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    ids = np.array([item.id for item in items], dtype=np.int64)
    with staging(root, name) as staged:
        write_version(staged, ids, vectors, items, "Flat", info)
        publish(root, name, staged, keep=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, manifest: BundleManifest) -> Path:
    """Collections of the same COUNT items: "plain" (one node), "fleet" (S=3, R=2), "solo"
    (S=3, R=1); and "prop" (S=3, R=2) with its twin "prop-plain" for the changes test."""
    folder = tmp_path_factory.mktemp("sharded-root")
    rng = np.random.default_rng(11)
    vectors = unit(rng, COUNT, manifest.embed_dim)
    vectors[7] = vectors[5]  # equal scores: the order of ties (by id) is checked too
    items = items_for(np.arange(COUNT), rng)
    for name, replicas in (("plain", 0), ("prop-plain", 0), ("fleet", 2), ("solo", 1), ("prop", 2)):
        build(folder, name, manifest.bundle_id, vectors, items)
        if replicas:
            split_collection(folder, name, SHARDS, replicas, progress=False)
    return folder


def random_filter(rng: np.random.Generator) -> dict[str, Any] | None:
    choice = int(rng.integers(0, 4))
    if choice == 0:
        return None
    if choice == 1:
        return {"year": {"gte": int(rng.integers(2000, 2010))}}
    if choice == 2:
        return {"tag": {"in": [str(t) for t in rng.choice(TAGS, size=2, replace=False)]}}
    return {"group_id": f"g{int(rng.integers(0, 80))}"}  # few matches: exact filtered search


def assert_same_page(
    sharded: ShardedCollection, plain: Collection, queries: np.ndarray, k: int, offset: int,
    filters: dict[str, Any] | None,
) -> None:  # fmt: skip
    """The page at ``offset``: each side asked for offset + k, the rows sliced after."""
    found = sharded.nearest_items(queries, offset + k, filters=filters)
    assert found.missing == []
    want_scores, want_ids = plain.nearest(queries, offset + k, filters=filters)
    np.testing.assert_array_equal(found.ids, want_ids, err_msg=f"{k=} {offset=} {filters=}")
    # A shard's segment holds a third of the vectors; FAISS's BLAS blocking may then sum the
    # same products in another order, which can change a score's last float bit.
    np.testing.assert_allclose(found.scores, want_scores, rtol=0, atol=1e-6)
    want = plain.hydrate(want_scores[:, offset:], want_ids[:, offset:], k)
    # Hydrated from the items the shards sent along, and asked of the shards again.
    for known in (found.items, None):
        got, missing = sharded.hydrate_partial(
            found.scores[:, offset:], found.ids[:, offset:], k, known=known
        )
        assert missing == []
        for have, expected in zip(got, want, strict=True):
            assert [(h.id, h.item) for h in have] == [(h.id, h.item) for h in expected]


@pytest.mark.slow
def test_sharded_answers_equal_single_node_through_random_changes(
    workers: Workers, root: Path, manifest: BundleManifest, request: pytest.FixtureRequest
) -> None:
    link = RayShards("unused", bundle_id=manifest.bundle_id, timeout_s=30.0, poll_s=60.0)
    request.addfinalizer(link.close)
    sharded = link.open(root, "prop", None)
    assert isinstance(sharded, ShardedCollection)
    wait_running(["prop"], replicas=2)
    rng = np.random.default_rng(5)
    dim = manifest.embed_dim
    for step in range(14):
        op = step % 4 if step < 8 else int(rng.integers(0, 4))
        if op == 0:  # an add, one of its vectors equal to a live item's
            n = int(rng.integers(1, 30))
            vectors = unit(rng, n, dim)
            with Collection.open(root, "prop-plain") as plain:
                alive = plain.ids_matching(None)
                vectors[0] = plain.stored_vectors([int(alive[-1])])[int(alive[-1])]
            items = items_for(np.zeros(n, dtype=np.int64), rng)
            given = add_sharded(root, "prop", vectors, items, keep_versions=2)
            numbered = [
                it.model_copy(update={"id": int(i)}) for it, i in zip(items, given, strict=True)
            ]
            add_encoded(root, "prop-plain", given, vectors, numbered, keep_versions=2)
        elif op == 1:  # removes by id, one of them unknown
            with Collection.open(root, "prop-plain", with_indexes=False) as plain:
                alive = plain.ids_matching(None)
            doomed = [
                *rng.choice(alive, size=int(rng.integers(1, 40)), replace=False).tolist(),
                10**9,
            ]
            _, removed = remove_sharded(root, "prop", ids=doomed, keep_versions=2)
            _, expected = remove_from_collection(root, "prop-plain", ids=doomed, keep_versions=2)
            assert removed == expected == len(doomed) - 1
        elif op == 2:  # a remove by filter
            where = {"tag": "bird", "year": int(rng.integers(2000, 2010))}
            _, removed = remove_sharded(root, "prop", filters=where, keep_versions=2)
            _, expected = remove_from_collection(root, "prop-plain", filters=where, keep_versions=2)
            assert removed == expected
        before = sharded.version
        sharded = link.open(root, "prop", sharded)
        assert isinstance(sharded, ShardedCollection)
        assert sharded.version >= before
        with Collection.open(root, "prop-plain") as plain:
            assert sharded.info.live == plain.info.live
            for _ in range(3):
                queries = unit(rng, int(rng.integers(1, 5)), dim)
                k = int(rng.integers(1, 25))
                offset = int(rng.integers(0, 3)) * int(rng.integers(0, 20))
                assert_same_page(sharded, plain, queries, k, offset, random_filter(rng))
            filters = random_filter(rng)
            np.testing.assert_array_equal(
                sharded.ids_matching(filters), plain.ids_matching(filters)
            )
            probe = rng.integers(0, COUNT + 200, size=12)
            assert sharded.get(probe) == plain.get(probe)
            want = plain.stored_vectors(probe)
            have = sharded.stored_vectors(probe)
            assert sorted(have) == sorted(want)
            for i in want:
                np.testing.assert_array_equal(have[i], want[i])
    # Each replica answered from the version the router read from disk, never an older one.
    versions = {answer["shard"]: answer["version"] for answer in sharded.replicas()}
    assert versions == dict(enumerate(sharded.shard_versions))


# Through the service ---------------------------------------------------------------------------


def wait_running(collections: list[str], replicas: int, timeout: float = 120.0) -> None:
    """Until every shard deployment of ``collections`` has ``replicas`` running replicas."""
    names = [deployment_name(c, i) for c in collections for i in range(SHARDS)]
    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        running = {
            name: sum(
                count
                for state, count in apps[name].deployments[name].replica_states.items()
                if state == "RUNNING"
            )
            if name in apps
            else 0
            for name in names
        }
        if all(count == replicas for count in running.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas running after {timeout:.0f} s: {running}")
        time.sleep(0.5)


def solo_placement(collection: str, shard: int) -> dict[str, Any]:
    """Shard 0 of "solo" on worker "a", its other shards on "b"."""
    return {"resources": {"node-a" if shard == 0 else "node-b": 0.01}}


@pytest.fixture(scope="module")
def server(
    workers: Workers, root: Path, micro_bundle: Path, manifest: BundleManifest
) -> Iterator[LiveServer]:
    # "solo" is deployed first, with its placement, by a link of the test's own: the service
    # finds its deployments running and uses them as they are.
    pinned = RayShards("unused", bundle_id=manifest.bundle_id, timeout_s=5.0, poll_s=60.0,
                       placement=solo_placement)  # fmt: skip
    pinned.open(root, "solo", None)
    pinned.close()
    settings = Settings(
        index_root=root,
        bundle=micro_bundle,
        collections=["plain", "fleet", "solo"],
        ray_address=workers.cluster.address,
        shard_timeout_s=1.0,
        reload_poll_s=60.0,
    )
    with live_server(settings) as running:
        wait_running(["fleet"], replicas=2)
        wait_running(["solo"], replicas=1)
        yield running


def query(server: LiveServer, rng: np.random.Generator) -> list[float]:
    return unit(rng, 1, server.state.encoder.dim)[0].tolist()


def search(client: httpx.Client, collection: str, **body: Any) -> httpx.Response:
    return client.post(f"/v1/collections/{collection}/search", json=body)


def hit_ids(answer: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in answer["hits"]]


def partial_count(client: httpx.Client, collection: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cots_partial_results_total" and sample.labels == {
                "collection": collection
            }:
                return sample.value
    return 0.0


def png() -> bytes:
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sharded_collection_answers_as_its_unsharded_twin_over_http(server: LiveServer) -> None:
    rng = np.random.default_rng(1)
    with server.client() as client:
        for offset, filters in ((0, None), (10, None), (0, {"tag": "cat"})):
            vector = query(server, rng)
            body = {"embedding": vector, "k": 10, "offset": offset, "filters": filters}
            plain, fleet = search(client, "plain", **body), search(client, "fleet", **body)
            assert plain.status_code == fleet.status_code == 200, fleet.text
            assert (fleet.json()["partial"], fleet.json()["missing_shards"]) == (False, [])
            assert "partial" not in plain.json()  # unsharded answers are as they were
            assert "x-cots-partial" not in fleet.headers
            assert hit_ids(fleet.json()) == hit_ids(plain.json())
            assert fleet.json()["next_offset"] == plain.json()["next_offset"]
        info = client.get("/v1/collections/fleet").json()
        assert (info["live"], info["kind"]) == (COUNT, "image")
        for item_id in (5, 7, 100):  # an item's metadata, and searches with its stored vector
            plain = client.get(f"/v1/collections/plain/items/{item_id}").json()
            assert client.get(f"/v1/collections/fleet/items/{item_id}").json() == {
                **plain,
                "media_url": plain["media_url"].replace("plain", "fleet"),
            }
            like = [search(client, c, similar_to=item_id, k=5).json() for c in ("plain", "fleet")]
            assert hit_ids(like[1]) == hit_ids(like[0])
            assert item_id not in hit_ids(like[1])
        missing = search(client, "fleet", similar_to=COUNT + 5, k=5)
        assert missing.status_code == 404, missing.text


@pytest.mark.slow
def test_a_dead_node_under_steady_load_fails_no_query(server: LiveServer, workers: Workers) -> None:
    rng = np.random.default_rng(2)
    vectors = [query(server, rng) for _ in range(8)]
    with server.client() as client:
        expected = [hit_ids(search(client, "plain", embedding=v, k=10).json()) for v in vectors]
    answers: list[tuple[int, int, Any]] = []
    stop = threading.Event()

    def load() -> None:
        with server.client() as client:
            turn = 0
            while not stop.is_set():
                which = turn % len(vectors)
                response = search(client, "fleet", embedding=vectors[which], k=10)
                answers.append((which, response.status_code, response.json()))
                turn += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.5)
        before = len(answers)
        workers.kill("b")  # a replica of every shard of "fleet" (and "solo"'s shards 1, 2)
        time.sleep(6.0)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert before > 0
    assert len(answers) > before + 10, len(answers)
    for which, status, body in answers:
        assert status == 200, body
        assert body["partial"] is False, body["missing_shards"]
        assert hit_ids(body) == expected[which]
    workers.add("b")
    wait_running(["fleet"], replicas=2)  # Serve restarted the lost replicas on the new "b"
    wait_running(["solo"], replicas=1)


@pytest.mark.slow
def test_a_shard_without_replicas_answers_partial_until_its_node_returns(
    server: LiveServer, workers: Workers
) -> None:
    rng = np.random.default_rng(3)
    vector = query(server, rng)
    with server.client() as client:
        complete = search(client, "solo", embedding=vector, k=10).json()
        assert complete["partial"] is False
        assert hit_ids(complete) == hit_ids(search(client, "plain", embedding=vector, k=10).json())
        # What shards 1 and 2 hold of the plain answer: the partial page's hits.
        deep = hit_ids(search(client, "plain", embedding=vector, k=60).json())
        without_0 = [i for i in deep if shard_of(np.array([i]), SHARDS)[0] != 0][:10]

        workers.kill("a")  # shard 0's only replica
        # Until Ray has declared the node dead (a second or so) its replica may still answer.
        poll(
            lambda: search(client, "solo", embedding=vector, k=10).json()["partial"],
            30,
            "partial answers once the node died",
        )

        def fast_partial() -> bool:
            # Once Serve's status says no replica of shard 0 runs, the router stops waiting
            # shard_timeout_s (1 s here) for it.
            start = time.perf_counter()
            body = search(client, "solo", embedding=vector, k=10).json()
            return bool(body["partial"]) and time.perf_counter() - start < 0.5

        poll(fast_partial, 30, "partial answers without waiting for the missing shard")
        counted = partial_count(client, "solo")
        answer = search(client, "solo", embedding=vector, k=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["partial"], body["missing_shards"]) == (True, [0])
        assert answer.headers["x-cots-partial"] == "0"
        assert hit_ids(body) == without_0
        assert partial_count(client, "solo") == counted + 1
        # "fleet" lost a replica of each shard, not a shard: still complete.
        fleet = search(client, "fleet", embedding=vector, k=10).json()
        assert (fleet["partial"], hit_ids(fleet)) == (False, hit_ids(complete))

        refused = search(client, "solo", embedding=vector, k=10, complete=True)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert "shard 0" in refused.json()["error"]["message"]
        upload_refused = client.post(
            "/v1/collections/solo/search/upload",
            files={"image": ("q.png", png(), "image/png")},
            data={"k": "10", "complete": "true"},
        )
        assert upload_refused.status_code == 503, upload_refused.text
        assert "retry-after" in upload_refused.headers

        workers.add("a")  # Serve places shard 0's replica on the new "a"

        def whole_again() -> bool:
            again = search(client, "solo", embedding=vector, k=10)
            return again.status_code == 200 and again.json()["partial"] is False

        poll(whole_again, 90, "complete answers after the node came back")
        again = search(client, "solo", embedding=vector, k=10, complete=True)
        assert again.status_code == 200
        assert "x-cots-partial" not in again.headers
        assert hit_ids(again.json()) == hit_ids(complete)


# Without Ray ----------------------------------------------------------------------------------


def test_without_a_ray_address_a_sharded_collection_is_unavailable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = items_for(np.arange(30), rng)
    for name in ("plain", "split"):
        build(tmp_path, name, "b" * 64, unit(rng, 30, 16), items)
    split_collection(tmp_path, "split", SHARDS, 2, progress=False)
    registry = CollectionRegistry(tmp_path, "b" * 64, Metrics())
    registry.refresh()
    assert registry.names() == ["plain", "split"]
    assert sorted(registry.loaded()) == ["plain"]  # the other collections are served
    why = registry.unavailable()["split"]
    assert "sharded" in why
    assert "COTS_RAY_ADDRESS" in why
    assert "RAY_ADDRESS" in why


def test_the_ray_address_is_the_setting_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == "ray://head:10001"
    assert ray_address("auto") == "auto"
    monkeypatch.setenv("COTS_RAY_ADDRESS", "ray://other:10001")
    assert ray_address(Settings().ray_address) == "ray://other:10001"


UNREACHABLE = """
import sys, time
from pathlib import Path
import service.shard_link as link
import service.shard_router as router
from service.metrics import Metrics
from service.registry import CollectionRegistry

link.CONNECT_WAIT_S = 1.0
shards = router.RayShards("127.0.0.1:9", bundle_id="b" * 64, timeout_s=1.0, poll_s=60.0)
registry = CollectionRegistry(Path(sys.argv[1]), "b" * 64, Metrics(), shards=shards)
start = time.monotonic()
registry.refresh()
print(round(time.monotonic() - start, 1), sorted(registry.loaded()), registry.unavailable())
"""


def test_an_unreachable_ray_cluster_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """ray.init waits minutes for a cluster that does not answer: the registry's refresh
    waits CONNECT_WAIT_S (1 s here) and serves the other collections (in a process of its
    own, whose joining thread dies with it)."""
    rng = np.random.default_rng(0)
    items = items_for(np.arange(30), rng)
    for name in ("plain", "split"):
        build(tmp_path, name, "b" * 64, unit(rng, 30, 16), items)
    split_collection(tmp_path, "split", SHARDS, 2, progress=False)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", UNREACHABLE, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    seconds, rest = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(seconds) < 10, done.stdout
    assert "['plain']" in rest
    assert "127.0.0.1:9" in rest
    assert "has not answered yet" in rest
