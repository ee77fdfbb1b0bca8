"""Near-duplicates (``indexer.duplicates``) with real FAISS: the planted groups of
``tests/planted.py`` and nothing else, across segments and compressed indexes, removed items
left out, the chunked range search against the full similarity matrix, ``cots index
duplicates`` as a table and as JSON, and the API job (in process, and on the Redis queue).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import redis
from click.testing import CliRunner
from rq import Queue, SimpleWorker

from cots.cli import cli
from indexer.duplicates import close_pairs, duplicates_in, union_groups
from indexer.index_bundle import read_info
from indexer.jobs import DEFAULT_QUEUE, work_in_process
from indexer.metadata import Item
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import current_dir, reserve_numbers
from service.settings import Settings
from tests.live_server import live_server
from tests.planted import (
    CAPTION_TWIN,
    COUNT,
    IDENTICAL,
    PLANTED_GROUPS,
    TRIPLE,
    build_planted,
)
from tests.service_helpers import KEYS, SEARCH_KEY, WRITE_KEY, assert_error, wait_for_job

NAME = "photos"


def group_ids(report: Any) -> list[list[int]]:
    groups = report["groups"] if isinstance(report, dict) else report.model_dump()["groups"]
    return [[item["id"] for item in group["items"]] for group in groups]


@pytest.mark.parametrize("factory", ["Flat", "IVF2,SQ8"])
def test_the_planted_groups_are_found_and_nothing_else(
    micro_bundle: Path, tmp_path: Path, factory: str
) -> None:
    """IVF2,SQ8 stores float16 copies: scores within float16's rounding of the truth."""
    build_planted(tmp_path, NAME, micro_bundle, factory=factory)
    report = duplicates_in(tmp_path, NAME, 0.97)
    assert group_ids(report) == PLANTED_GROUPS
    assert report.checked == COUNT - 1  # the caption twin is not an image
    assert all(CAPTION_TWIN[1] not in group for group in group_ids(report))
    assert report.version == 1
    for group in report.groups:
        assert group.items[0].score == pytest.approx(1.0, abs=1e-3)
        assert all(0.97 <= item.score <= 1.0 + 1e-3 for item in group.items)
        assert [item.uri for item in group.items] == [f"photos/{i.id:03d}.jpg" for i in group.items]
    identical = report.groups[1].items
    assert identical[1].score == pytest.approx(1.0, abs=1e-3)
    # A threshold above the near ones' scores leaves only the identical pair.
    assert group_ids(duplicates_in(tmp_path, NAME, 0.9999)) == [list(IDENTICAL)]


def test_groups_span_segments_and_leave_removed_items_out(
    micro_bundle: Path, tmp_path: Path
) -> None:
    vectors = build_planted(tmp_path, NAME, micro_bundle)
    floor = read_info(current_dir(tmp_path, NAME)).max_id + 1
    first = reserve_numbers(tmp_path, NAME, 2, floor)
    ids = np.arange(first, first + 2, dtype=np.int64)
    # Two new items in a segment of their own: a copy of item 30, and one of nothing.
    fresh = np.stack([vectors[30], -vectors[30]])
    items = [Item(id=int(i), kind="image", uri=f"photos/{i:03d}.jpg", group_id=str(i)) for i in ids]
    add_encoded(tmp_path, NAME, ids, fresh, items)
    assert group_ids(duplicates_in(tmp_path, NAME, 0.97)) == [
        *PLANTED_GROUPS, [30, int(ids[0])],
    ]  # fmt: skip

    remove_from_collection(tmp_path, NAME, ids=[IDENTICAL[1], TRIPLE[1]])
    report = duplicates_in(tmp_path, NAME, 0.97)
    assert group_ids(report) == [[7, 8], [TRIPLE[0], TRIPLE[2]], [30, int(ids[0])]]
    assert report.checked == COUNT - 1 + 2 - 2


def _oracle(x: np.ndarray, min_score: float) -> list[list[int]]:
    """Connected components of the full similarity matrix's edges >= min_score."""
    close = (x @ x.T) >= min_score
    seen: set[int] = set()
    groups = []
    for start in range(len(x)):
        if start in seen:
            continue
        component, todo = {start}, [start]
        while todo:
            for j in np.flatnonzero(close[todo.pop()]).tolist():
                if j not in component:
                    component.add(j)
                    todo.append(j)
        seen |= component
        if len(component) > 1:
            groups.append(sorted(component))
    return sorted(groups, key=lambda group: (-len(group), group[0]))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_the_chunked_range_search_equals_the_full_similarity_matrix(chunk: int | None) -> None:
    x = np.random.default_rng(0).standard_normal((400, 6)).astype(np.float32)
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(6)
    index.add(x)
    for min_score in (0.9, 0.98):
        # Scores within float rounding of the threshold could go either way in the two.
        margin = np.abs(x @ x.T - min_score)
        assert margin.min() > 1e-6
        found = union_groups(len(x), close_pairs(index, min_score, chunk=chunk))
        assert found == _oracle(x, min_score)
        assert len(found) > 3


def test_cots_index_duplicates_prints_a_table_or_json(micro_bundle: Path, tmp_path: Path) -> None:
    build_planted(tmp_path, NAME, micro_bundle)
    runner = CliRunner()
    base = ["index", "duplicates", "--root", str(tmp_path), "--collection", NAME]
    table = runner.invoke(cli, [*base, "--min-score", "0.97"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["group", "id", "score", "uri"]
    rows = [line.split() for line in lines[1:-1]]
    expected = [(n, i) for n, group in enumerate(PLANTED_GROUPS, start=1) for i in group]
    assert [(int(row[0]), int(row[1])) for row in rows] == expected
    assert all(row[3] == f"photos/{int(row[1]):03d}.jpg" for row in rows)
    assert lines[-1].startswith(f"3 groups, 7 items of {COUNT - 1} compared")

    as_json = runner.invoke(cli, [*base, "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert group_ids(report) == PLANTED_GROUPS
    assert report["min_score"] == 0.97

    none = runner.invoke(cli, [*base, "--min-score", "1.0"])
    assert none.exit_code == 0, none.output
    refused = runner.invoke(cli, [*base, "--min-score", "0.2"])
    assert refused.exit_code == 2
    assert "0.5<=x<=1.0" in refused.output
    missing = runner.invoke(cli, [*base[:-1], "nothing"])
    assert missing.exit_code == 1
    assert "nothing" in missing.output


def _settings(bundle: Path, root: Path, redis_url: str | None = None) -> Settings:
    return Settings(
        bundle=bundle,
        index_root=root,
        api_keys=KEYS,
        rate_limit_per_minute=0,
        reload_poll_s=0.2,
        redis_url=redis_url,
    )


def test_the_api_runs_a_duplicates_job_in_process(micro_bundle: Path, tmp_path: Path) -> None:
    build_planted(tmp_path, NAME, micro_bundle)
    path = f"/v1/collections/{NAME}/duplicates"
    with live_server(_settings(micro_bundle, tmp_path)) as server, server.client() as client:
        write = {"X-API-Key": WRITE_KEY}
        assert_error(client.post(path, json={}), 401)
        assert_error(client.post(path, json={}, headers={"X-API-Key": SEARCH_KEY}), 403)
        assert_error(client.post(path, json={"min_score": 0.3}, headers=write), 422, "min_score")
        assert_error(client.post(path, json={"min": 0.9}, headers=write), 422, "min")
        missing = client.post("/v1/collections/nothing/duplicates", json={}, headers=write)
        assert_error(missing, 404, "nothing")

        started = client.post(path, json={"min_score": 0.97}, headers=write)
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["kind"] == "duplicates"
        assert job["id"].startswith("local-")
        done = wait_for_job(client, job["id"], WRITE_KEY)
        assert done["status"] == "finished", done
        assert done["kind"] == "duplicates"
        assert group_ids(done["result"]) == PLANTED_GROUPS
        assert done["result"]["collection"] == NAME
        # A read: no new version.
        assert client.get("/readyz").json()["collections"][NAME] == 1

        default = client.post(path, json={}, headers=write).json()
        assert wait_for_job(client, default["id"], WRITE_KEY)["result"]["min_score"] == 0.97


def test_the_api_queues_a_duplicates_job_on_redis(
    micro_bundle: Path, tmp_path: Path, redis_db: str
) -> None:
    build_planted(tmp_path, NAME, micro_bundle)
    remove_from_collection(tmp_path, NAME, ids=[IDENTICAL[0]])
    settings = _settings(micro_bundle, tmp_path, redis_db)
    with live_server(settings) as server, server.client() as client:
        started = client.post(
            f"/v1/collections/{NAME}/duplicates",
            json={"min_score": 0.97},
            headers={"X-API-Key": WRITE_KEY},
        )
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["status"] == "queued"
        assert not job["id"].startswith("local-")
        connection = redis.Redis.from_url(redis_db)
        worker = SimpleWorker([Queue(DEFAULT_QUEUE, connection=connection)], connection=connection)
        assert work_in_process(worker, burst=True)
        done = wait_for_job(client, job["id"], WRITE_KEY)
        assert done["status"] == "finished", done
        assert done["kind"] == "duplicates"
        assert group_ids(done["result"]) == [list(TRIPLE), [7, 8]]
