"""The Docker deployment, for real: the images of the Dockerfile and the stack of
docker-compose.yml, built and started as a user would, then searched, re-indexed, scaled and
torn down; the untagged images of earlier builds are pruned.

The stack's first start trains and indexes a small demo (COTS_DEMO_OPTIONS) in the init service;
the test then searches text→image through the gateway, runs a re-index job that the worker
container picks up and checks the API serves the new version, scales the API to two replicas
and checks both answer (directly and through the gateway), stops a replica and checks the stop
was graceful, and finally removes every container, volume and network of the project.

Needs a container engine: Docker with compose, or podman with podman-compose. Without one these
tests fail, saying so; ``-m "not container"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from functools import partial

import httpx
import pytest

from service.settings import ApiKey
from tests.compose_stack import ComposeStack, find_compose, qualified
from tests.tools import free_port, wait_until

pytestmark = [pytest.mark.container, pytest.mark.slow]

ADMIN_KEY = "container-test-admin"
# Small enough to build in about two minutes on two cores, big enough to search sensibly.
DEMO_OPTIONS = "--n-images 1000 --n-videos 40 --epochs 1 --batch-size 64"
SERVING_IMAGE = "cots-search:latest"
NON_ROOT_UID = "10001"
HEALTHCHECK = ("python", "-m", "service.healthcheck")
# The serving image is ~0.9 GB on the sandbox's Debian stand-in base; torch alone would add
# several GB, so a bound well under that catches torch or CUDA creeping in.
MAX_SERVING_IMAGE_BYTES = 1_500_000_000


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[ComposeStack, httpx.Client]]:
    found = find_compose()
    if found is None:
        # Fail rather than skip, as tests/tools.py does for a missing program: a skipped
        # container test would read as a passed one.
        pytest.fail(
            "no container engine: install Docker with its compose plugin, or podman and "
            "podman-compose (COTS_COMPOSE names another compose command, as .ci/run does with "
            "the sandbox's); or leave these tests out with -m 'not container'",
            pytrace=False,
        )
    command, engine = found
    port = free_port()
    keys = [{"name": "ci", "sha256": ApiKey.hash(ADMIN_KEY), "scopes": ["write", "admin"]}]
    env = {
        "COTS_PORT": str(port),
        "COTS_API_KEYS": json.dumps(keys),
        "COTS_DEMO_OPTIONS": DEMO_OPTIONS,
    }
    stack = ComposeStack(command, engine, f"cots-test-{os.getpid()}", env)
    missing = stack.missing_base_images()
    if missing:
        pytest.fail(_no_base_images(engine, missing), pytrace=False)
    try:
        stack.compose("build", timeout=1500)
        # Blocks while the init service builds the demo, then starts the long-running services.
        stack.compose("up", "-d", timeout=900)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def ready() -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 300, "the API behind the gateway is not ready", stack.logs)
        yield stack, client
        client.close()
    finally:
        said = _down(stack)
    left = stack.leftovers()
    if left:  # podman-compose now and then fails to remove a volume a moment after its users
        time.sleep(5)
        said += _down(stack)
        left = stack.leftovers()
    stack.prune_superseded_images()
    assert not left, f"compose down left {left}; it said:\n{said}"


def _no_base_images(engine: str, missing: dict[str, str]) -> str:
    names = " ".join(sorted(missing))
    why = "\n".join(f"  {image}: {reason}" for image, reason in sorted(missing.items()))
    return (
        f"{engine} has no local copy of the base images {names} and cannot pull them (is a "
        f"registry reachable from here?):\n{why}\nProvide them locally under those names: "
        f"`{engine} load -i IMAGE.tar` of images saved elsewhere with `{engine} save`, or "
        f"`{engine} tag LOCAL_IMAGE {qualified(sorted(missing)[0])}` for a compatible image "
        "you have; on a machine without any, ../shared/tools/container-sandbox.sh prepare "
        f"{names} builds Debian stand-ins (as .ci/run does)."
    )


def _down(stack: ComposeStack) -> str:
    return stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=300)


def test_serving_image_has_no_torch_runs_non_root_under_init(
    stack: tuple[ComposeStack, httpx.Client],
) -> None:
    compose, _ = stack
    find_torch = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
    compose.engine_run("run", "--rm", SERVING_IMAGE, "python", "-c", find_torch)
    assert compose.engine_run("run", "--rm", SERVING_IMAGE, "id", "-u").strip() == NON_ROOT_UID
    size = int(compose.engine_run("image", "inspect", "--format", "{{.Size}}", SERVING_IMAGE))
    print(f"serving image {SERVING_IMAGE}: {size / 1e6:.0f} MB")
    assert size < MAX_SERVING_IMAGE_BYTES
    # The running API: the unprivileged user, with tini as PID 1 to pass signals on.
    (api,) = compose.containers("api")
    assert compose.engine_run("exec", api, "id", "-u").strip() == NON_ROOT_UID
    assert compose.engine_run("exec", api, "cat", "/proc/1/comm").strip() == "tini"


def test_text_to_image_search_through_the_gateway(
    stack: tuple[ComposeStack, httpx.Client],
) -> None:
    _, client = stack
    response = client.post(
        "/v1/collections/images/search", json={"text": "a big red circle", "k": 5}
    )
    assert response.status_code == 200, response.text
    page = response.json()
    assert len(page["hits"]) == 5
    assert all(hit["kind"] == "image" for hit in page["hits"])
    scores = [hit["score"] for hit in page["hits"]]
    assert scores == sorted(scores, reverse=True)
    media = client.get(page["hits"][0]["media_url"])
    assert media.status_code == 200
    assert media.headers["content-type"].startswith("image/")
    # The page's static files made it into the image's wheel.
    assert "<html" in client.get("/").text.lower()
    assert client.get("/static/app.js").status_code == 200


def test_reindex_runs_on_the_worker_and_search_sees_the_new_version(
    stack: tuple[ComposeStack, httpx.Client],
) -> None:
    compose, client = stack
    admin = {"X-API-Key": ADMIN_KEY}
    before = client.get("/v1/collections/captions").json()["version"]
    started = client.post("/v1/collections/captions/reindex", json={}, headers=admin)
    assert started.status_code == 202, started.text
    job = started.json()
    assert not job["id"].startswith("local-"), "the job ran in the API, not on the queue"

    def finished() -> bool:
        status = client.get(f"/v1/jobs/{job['id']}", headers=admin).json()["status"]
        assert status not in ("failed", "stopped", "canceled"), status
        return status == "finished"

    wait_until(finished, 300, f"re-index job {job['id']} did not finish", compose.logs)
    done = client.get(f"/v1/jobs/{job['id']}", headers=admin).json()
    new_version = done["result"]["version"]
    assert new_version == before + 1
    (worker,) = compose.containers("worker")
    assert job["id"] in compose.container_logs(worker), "the worker did not run the job"

    def serves_new_version() -> bool:
        search = client.post("/v1/collections/captions/search", json={"text": "a red star"})
        return search.status_code == 200 and search.json()["version"] == new_version

    wait_until(serves_new_version, 60, "search does not see the new version", compose.logs)


def test_api_scales_to_two_replicas_that_both_serve(
    stack: tuple[ComposeStack, httpx.Client],
) -> None:
    compose, client = stack
    compose.compose("up", "-d", "--scale", "api=2", timeout=600)
    wait_until(
        lambda: len(compose.containers("api")) == 2, 120, "no second API replica", compose.logs
    )
    replicas = compose.containers("api")
    search = (
        "import json, urllib.request\n"
        "request = urllib.request.Request('http://127.0.0.1:8000/v1/collections/images/search',"
        " data=json.dumps({'text': 'a small blue square', 'k': 3}).encode(),"
        " headers={'Content-Type': 'application/json'})\n"
        "print(len(json.load(urllib.request.urlopen(request, timeout=30))['hits']))\n"
    )
    hostnames = {}
    for replica in replicas:
        wait_until(
            # The replica's own healthcheck: readyz from inside the container.
            partial(compose.engine_succeeds, "exec", replica, *HEALTHCHECK),
            300,
            f"replica {replica} is not ready",
            compose.logs,
        )
        assert compose.exec_python(replica, search).strip() == "3"
        hostnames[replica] = compose.exec_python(
            replica, "import socket; print(socket.gethostname())"
        ).strip()
    # Through the gateway, requests reach both (it re-resolves the service name every 5 s).
    seen: set[str] = set()

    def both_answer_through_the_gateway() -> bool:
        seen.add(client.get("/healthz").json()["replica"])
        return seen >= set(hostnames.values())

    wait_until(
        both_answer_through_the_gateway,
        60,
        "the gateway does not reach every replica",
        lambda: f"answered: {seen}, replicas: {hostnames}\n{compose.logs()}",
    )


def test_stopping_a_replica_is_graceful(stack: tuple[ComposeStack, httpx.Client]) -> None:
    compose, client = stack
    replica = compose.containers("api")[-1]
    started = time.monotonic()
    compose.engine_run("stop", "--time", "30", replica)
    took = time.monotonic() - started
    status = compose.engine_run("inspect", "--format", "{{.State.ExitCode}}", replica).strip()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (128 + 15); a
    # SIGKILL after the grace period would read 137.
    assert status in ("0", "143"), f"{replica} exited {status}: not a graceful shutdown"
    assert took < 25, f"stopping took {took:.0f} s: SIGTERM did not reach uvicorn"
    logs = compose.container_logs(replica)
    assert "Application shutdown complete" in logs
    assert "Finished server process" in logs
    # The other replica goes on serving through the gateway.
    for _ in range(5):
        assert client.get("/readyz").status_code == 200
