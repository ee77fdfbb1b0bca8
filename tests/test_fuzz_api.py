"""Property-based fuzzing of the whole OpenAPI document against a live server: whatever a client
sends, valid or not, the answer is never a 5xx.

For every operation schemathesis sends the document's examples, its coverage cases (boundary
and invalid values, wrong types, missing fields) and Hypothesis-drawn requests, positive and
negative. Every request carries a key with scopes ``write`` and ``admin``, so adding, removing
and re-indexing run too (they start real jobs on a copy of the served root, whose data root is
a copy of the corpus); the rate limit is off. Nothing is excluded. Generation is derandomized:
a run is reproducible, and a failure prints the ``curl`` command that replays it.

Checked: no 5xx, and a response's body and Content-Type match the document where it declares
the status. Not checked: that every status is declared (many routes answer 400/403/404/415 that
their ``responses`` leave out, a documentation gap rather than a fault), nor schemathesis's
other checks, which assert API conventions this service does not claim.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from service.app import create_app
from service.settings import ApiKey, Settings
from tests.live_server import COLLECTION_KINDS, LiveServer, live_server
from tests.service_helpers import assert_error

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
KEY = "fuzz-secret"
HEADERS = {"X-API-Key": KEY}
JOB_TIMEOUT_S = 300
STARTED_JOBS: list[str] = []  # ids of the jobs the fuzzing started (202 answers)

# The document comes from the app itself, at import, since schemathesis parametrizes at
# collection time; test_the_fuzzed_document_is_the_served_one checks the server serves it.
# (schemathesis.pytest.from_fixture would read it from the live server, but schemathesis 4.32
# breaks on pytest 9.2: it sets Function._nodeid, which pytest 9.2 no longer has.)
DOCUMENT = create_app(Settings(bundle=Path("unused"), index_root=Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.hook
def flatmap_path_parameters(context: HookContext, parameters: dict[str, Any]) -> Any:
    """Mostly a served collection and an item id that may exist, so that fuzzing gets past the
    404 for an unknown name (drawn from the schema alone, almost every name is unknown). The
    drawn values stay among the choices."""
    if not isinstance(parameters, dict):
        return st.just(parameters)
    choices = [parameters]
    if isinstance(parameters.get("name"), str):
        choices += [{**parameters, "name": name} for name in COLLECTION_KINDS]
    if isinstance(parameters.get("item_id"), int):
        choices = [{**p, "item_id": abs(parameters["item_id"]) % 64} for p in choices] + choices
    return st.sampled_from(choices)


QUERY_FIELDS = ("text", "image", "image_url", "embedding")


@schema.hook
def flatmap_body(context: HookContext, body: Any) -> Any:
    """A search body with several query inputs, and also the same body with only one of them:
    the schema cannot say "exactly one", so most drawn bodies would stop at that 422 and never
    reach the encoder, the filters or FAISS. The drawn body stays among the choices."""
    operation = context.operation
    if operation is None or not operation.path.endswith("/search") or not isinstance(body, dict):
        return st.just(body)
    given = [field for field in QUERY_FIELDS if body.get(field) is not None]
    others = {key: value for key, value in body.items() if key not in QUERY_FIELDS}
    return st.sampled_from([body, *({**others, field: body[field]} for field in given)])


@pytest.fixture(scope="module")
def fuzz_server(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    corpus, root = served_root
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(root, folder / "indices", symlinks=True)
    shutil.copytree(corpus, folder / "corpus", symlinks=True)
    settings = Settings(
        bundle=micro_bundle,
        index_root=folder / "indices",
        data_root=folder / "corpus",
        rate_limit_per_minute=0,
        api_keys=[ApiKey(name="fuzz", sha256=ApiKey.hash(KEY), scopes=["write", "admin"])],
    )
    with live_server(settings) as server:
        yield server
        wait_for_jobs(server, STARTED_JOBS)


def wait_for_jobs(server: LiveServer, ids: list[str]) -> dict[str, Any]:
    """Every job's final status, once none is queued or running: the server is stopped after,
    rather than under a job still writing a version."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    final: dict[str, Any] = {}
    with server.client(headers=HEADERS) as client:
        for job_id in ids:
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("finished", "failed"):
                    final[job_id] = job
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"job {job} still not done after {JOB_TIMEOUT_S} s")
                time.sleep(0.1)
    return final


def test_the_fuzzed_document_is_the_served_one(fuzz_server: LiveServer) -> None:
    with fuzz_server.client() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=50,  # about 30 s for the 19 operations on 2 cores
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: Case, fuzz_server: LiveServer) -> None:
    response = case.call_and_validate(
        base_url=fuzz_server.url, headers=HEADERS, timeout=60, checks=CHECKS
    )
    if response.status_code == 202:
        STARTED_JOBS.append(response.json()["id"])


# Requests that fuzzing (here or by hand, around what it found) answered with a 5xx or with a
# job that failed inside: kept as plain cases, since a derandomized run of 50 examples per
# operation need not draw them again. Each is pinned to the refusal it gets now (status and a
# word of its message): a 4xx other than that one is a change of behaviour, not a pass.
TOO_BIG = 2**70  # over SQLite's and numpy's 64-bit integers
UNUSABLE = (400, "not a usable file name")  # a name the file system refuses, never a 5xx
NOT_JSON = (400, "must be JSON")  # nesting past the parser's limit is refused as bad JSON
FOUND = [
    pytest.param(
        "json",
        "/v1/collections/images/reindex",
        {"corpus": "0" * 1024},
        UNUSABLE,
        id="reindex-long-name",
    ),
    pytest.param(
        "json", "/v1/collections/images/reindex", {"corpus": "a\u0000b"}, UNUSABLE, id="reindex-nul"
    ),
    pytest.param(
        "json",
        "/v1/collections/images/items",
        {"items": [{"path": "0" * 300}]},
        UNUSABLE,
        id="add-long-name",
    ),
    pytest.param(
        "json",
        "/v1/collections/images/items",
        {"items": [{"path": "a\u0000b"}]},
        UNUSABLE,
        id="add-nul",
    ),
    pytest.param(
        "json",
        "/v1/collections/images/search",
        {"text": "a", "filters": {"split": TOO_BIG}},
        (422, "filters.split"),
        id="search-filter-int",
    ),
    pytest.param(
        "form",
        "/v1/collections/images/search/upload",
        {"filters": f'{{"split": {TOO_BIG}}}'},
        (422, "filters.split"),
        id="upload-filter-int",
    ),
    pytest.param(
        "json",
        "/v1/collections/images/items/remove",
        {"filters": {"split": TOO_BIG}},
        (422, "filters.split"),
        id="remove-filter-int",
    ),
    pytest.param(
        "json",
        "/v1/collections/images/items/remove",
        {"ids": [TOO_BIG]},
        (422, "ids.0"),
        id="remove-id-int",
    ),
    pytest.param("raw", "/knn-service", b"[" * 100_000, NOT_JSON, id="knn-deep-json"),
    pytest.param("raw", "/metadata", b"[" * 100_000, NOT_JSON, id="metadata-deep-json"),
]


@pytest.mark.parametrize(("kind", "path", "body", "refusal"), FOUND)
def test_found_by_fuzzing(
    kind: str, path: str, body: Any, refusal: tuple[int, str], fuzz_server: LiveServer
) -> None:
    with fuzz_server.client(headers=HEADERS) as client:
        if kind == "json":
            response = client.post(path, json=body)
        elif kind == "form":
            png = next((fuzz_server.settings.data_root or Path()).rglob("*.png")).read_bytes()
            response = client.post(path, data=body, files={"image": ("q.png", png, "image/png")})
        else:
            response = client.post(path, content=body)
    status, words = refusal
    assert_error(response, status, words)  # refused before any job starts: no 202
