"""The Ray deployments (issue 39 item 6): docker-compose.yml's `ray` profile, the KubeRay manifest
deploy/kuberay/rayservice.yaml, and the Serve application its serveConfigV2 names.

The files are parsed (PyYAML) and checked against each other and against the code they start:
the default profile is left as it was, every node runs one image built with the `distributed`
extra and sees the index root at the same path, ports and addresses agree, every COTS_*
variable is one the service or its tools know, and serveConfigV2 is valid for Ray Serve and
names the shards as the front door's router does. The slow test deploys the manifest's shard
applications on a local Ray cluster through service.shard_app and has the router use them.
Nothing here starts containers (tests/test_container_stack.py does).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from service.settings import OTHER_VARIABLES, Settings, setting_variables

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
MANIFEST_PATH = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
MANIFEST = [doc for doc in yaml.safe_load_all(MANIFEST_PATH.read_text()) if doc]

DEFAULT_SERVICES = {"redis", "init", "api", "worker", "gateway"}
RAY_SERVICES = {"ray-head", "ray-worker", "ray-api", "ray-gateway"}
RAY_NODES = ("ray-head", "ray-worker")
RAY_IMAGE_SERVICES = ("ray-head", "ray-worker", "ray-api")
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments of a command (``--block`` and the like map to "")."""
    found = {}
    for word in command:
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            found[name] = value
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "compose environments here are mappings"
    return {key: str(value) for key, value in env.items()}


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in MANIFEST if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (doc,) = of_kind(kind)
    return doc


def settings_map() -> dict[str, str]:
    """The ConfigMap of COTS_* settings the front door and the Ray pods share."""
    (found,) = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == "cots-settings"]
    return dict(found["data"])


def ray_cluster() -> dict[str, Any]:
    return one("RayService")["spec"]["rayClusterConfig"]


def pod_specs() -> dict[str, dict[str, Any]]:
    """The pod specs of the manifest: the Ray head, each worker group, the front door."""
    cluster = ray_cluster()
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[f"worker:{group['groupName']}"] = group["template"]["spec"]
    for deployment in of_kind("Deployment"):
        specs[f"deployment:{deployment['metadata']['name']}"] = deployment["spec"]["template"][
            "spec"
        ]
    return specs


# ---- docker-compose.yml ----------------------------------------------------------------------


def test_ray_services_are_only_in_the_ray_profile_and_the_default_stack_is_unchanged() -> None:
    profiled = {name for name, service in SERVICES.items() if service.get("profiles")}
    assert profiled == RAY_SERVICES
    assert all(SERVICES[name]["profiles"] == ["ray"] for name in RAY_SERVICES)
    assert set(SERVICES) - profiled == DEFAULT_SERVICES
    # Nothing of the default stack points at Ray or waits for a Ray service.
    for name in DEFAULT_SERVICES:
        service = SERVICES[name]
        assert "COTS_RAY_ADDRESS" not in environment(service), name
        assert not set(service.get("depends_on", {})) & RAY_SERVICES, name


def test_ray_head_serves_the_gcs_client_and_dashboard_ports() -> None:
    head = SERVICES["ray-head"]
    command = head["command"]
    assert command[:3] == ["ray", "start", "--head"]
    options = flags(command)
    assert options["port"] == str(GCS_PORT)
    assert options["ray-client-server-port"] == str(CLIENT_PORT)
    assert options["dashboard-port"] == str(DASHBOARD_PORT)
    assert options["dashboard-host"] == "0.0.0.0"
    assert options["num-cpus"] == "0"  # the control plane only: shards go to the workers
    assert "block" in options  # the container lives as long as the node
    assert {str(port) for port in (GCS_PORT, CLIENT_PORT, DASHBOARD_PORT)} <= set(head["expose"])
    # The dashboard has no authentication: published on the host's loopback only.
    assert head["ports"] == [f"127.0.0.1:{DASHBOARD_PORT}:{DASHBOARD_PORT}"]


def test_ray_workers_join_the_head_and_scale() -> None:
    worker = SERVICES["ray-worker"]
    assert worker["command"][:2] == ["ray", "start"]
    assert flags(worker["command"])["address"] == f"ray-head:{GCS_PORT}"
    assert "block" in flags(worker["command"])
    # --scale ray-worker=N needs no fixed name and no published port.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_ray_api_connects_to_the_head_client_port() -> None:
    api = SERVICES["ray-api"]
    address = environment(api)["COTS_RAY_ADDRESS"]
    assert address == f"ray://ray-head:{CLIENT_PORT}"
    assert Settings(ray_address=address).ray_address == address
    assert api["command"][:2] == ["cots", "serve"]
    assert {"ray-head", "ray-worker", "redis", "init"} <= set(api["depends_on"])
    gateway = SERVICES["ray-gateway"]
    assert environment(gateway)["COTS_GATEWAY_UPSTREAM"] == "http://ray-api:8000"
    assert gateway["ports"] == ["${COTS_RAY_PORT:-8001}:8080"]
    # Not the default gateway's host port: both stacks can run side by side.
    assert gateway["ports"] != SERVICES["gateway"]["ports"]


def test_every_node_and_the_api_mount_the_index_volume_at_the_same_path() -> None:
    for name in ("api", "worker", *RAY_IMAGE_SERVICES):
        assert "cots-data:/data" in SERVICES[name]["volumes"], name
    # Ray's settings (token authentication above all: a client whose mode differs from the
    # cluster's is refused) are the same in every Ray process.
    ray_settings = [
        {key: value for key, value in environment(SERVICES[name]).items() if key.startswith("RAY_")}
        for name in RAY_IMAGE_SERVICES
    ]
    assert "RAY_AUTH_MODE" in ray_settings[0]
    assert all(settings == ray_settings[0] for settings in ray_settings)
    # The shared environment (COTS_INDEX_ROOT, COTS_BUNDLE, ...) is the default api's.
    shared = {key: value for key, value in environment(SERVICES["api"]).items() if "COTS_" in key}
    for name in RAY_IMAGE_SERVICES:
        env = environment(SERVICES[name])
        assert {key: env.get(key) for key in shared} == shared, name


def test_one_ray_image_built_with_the_distributed_extra() -> None:
    images = {SERVICES[name]["image"] for name in RAY_IMAGE_SERVICES}
    assert images == {"${COTS_RAY_IMAGE:-cots-search-ray:latest}"}
    builds = [SERVICES[name]["build"] for name in RAY_IMAGE_SERVICES]
    assert all(build == builds[0] for build in builds)
    assert builds[0]["target"] == "serving"
    assert builds[0]["args"]["EXTRAS"] == "distributed"
    assert builds[0]["args"]["VARIANT"] == SERVICES["api"]["build"]["args"]["VARIANT"]
    # Not the default image's name: the default stack never runs the Ray image by mistake.
    assert SERVICES["api"]["image"] not in images
    # The extra brings Ray with Serve (shards) and the client (ray://).
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (ray,) = [req for req in extras["distributed"] if req.startswith("ray[")]
    assert {"serve", "client"} <= set(ray[4 : ray.index("]")].split(","))


def test_ray_services_have_healthchecks_and_memory_limits() -> None:
    for name in RAY_SERVICES:
        service = SERVICES[name]
        assert service["healthcheck"]["test"], name
        memory = service["deploy"]["resources"]["limits"]["memory"]
        assert re.fullmatch(r"(\$\{COTS_RAY_\w+_MEMORY:-)?\d+[mg]\}?", memory), (name, memory)
    head_check = " ".join(SERVICES["ray-head"]["healthcheck"]["test"])
    assert f"127.0.0.1:{DASHBOARD_PORT}/api/gcs_healthz" in head_check
    for name in RAY_NODES:
        check = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert "127.0.0.1:52365/api/local_raylet_healthz" in check, name
        assert "python -m service.healthcheck" in check, name  # no curl in the image
        assert SERVICES[name]["shm_size"], name  # Ray's object store lives in /dev/shm
    assert "service.healthcheck" in SERVICES["ray-api"]["healthcheck"]["test"]


def serving_requirements(extras: str | None) -> list[str]:
    """What the Dockerfile's serving-deps stage lists, its RUN line run through sh as the build
    runs it (``EXTRAS=extras``); None: the command as it was before the argument existed."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = dockerfile.split("FROM os AS serving-deps", 1)[1].split("\nFROM ", 1)[0]
    match = re.search(r"python (/opt/build/requirements\.py .*?)>/opt/build/serving", stage, re.S)
    assert match is not None, "the serving-deps stage runs requirements.py"
    command = " ".join(match[1].replace("\\\n", " ").split())
    if extras is None:
        command = command.replace(" $EXTRAS", "")
    command = command.replace("/opt/build/", "")
    result = subprocess.run(
        ["sh", "-c", f"{sys.executable} deploy/docker/{command}"],
        cwd=ROOT,
        env={"EXTRAS": extras or "", "VARIANT": "cpu", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.splitlines()


def test_dockerfile_extras_default_keeps_the_serving_requirements() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG EXTRAS=$", dockerfile, re.MULTILINE)  # empty by default
    before = serving_requirements(None)
    assert "fastapi" in " ".join(before)
    assert serving_requirements("") == before
    with_ray = serving_requirements("distributed")
    assert [req for req in with_ray if req not in before] == [
        req for req in with_ray if req.startswith("ray[")
    ]
    assert len(with_ray) == len(before) + 1


# ---- the variables -------------------------------------------------------------------------


def compose_variables() -> set[str]:
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"\$\{(COTS_\w+)", text))
    keys = {key for service in SERVICES.values() for key in environment(service)}
    return referenced | {key for key in keys if key.startswith("COTS_")}


def manifest_variables() -> set[str]:
    found = set()
    for config_map in of_kind("ConfigMap"):
        found |= {key for key in config_map["data"] if key.startswith("COTS_")}
    for spec in pod_specs().values():
        for container in spec["containers"]:
            found |= {env["name"] for env in container.get("env", [])}
    commented = set(re.findall(r"#\s*(COTS_\w+):", MANIFEST_PATH.read_text()))
    return {name for name in found | commented if name.startswith("COTS_")}


@pytest.mark.parametrize("where", ["docker-compose.yml", "deploy/kuberay/rayservice.yaml"])
def test_every_cots_variable_is_a_setting_or_a_known_tool_variable(where: str) -> None:
    names = compose_variables() if where == "docker-compose.yml" else manifest_variables()
    assert {"COTS_INDEX_ROOT", "COTS_BUNDLE"} <= names  # the check sees the variables
    known = set(setting_variables()) | OTHER_VARIABLES | command_variables()
    assert sorted(names - known) == []


def command_variables() -> set[str]:
    """The variables ``cots worker``'s options read (the compose worker's COTS_SYNC_*)."""
    from indexer.worker_cli import worker

    found: set[str] = set()
    for param in worker.params:
        envvar = param.envvar
        found |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return found


# ---- deploy/kuberay/rayservice.yaml --------------------------------------------------------


def test_manifest_is_a_kuberay_rayservice_with_the_compose_ports() -> None:
    service = one("RayService")
    assert service["apiVersion"] == "ray.io/v1"
    cluster = ray_cluster()
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(value, str) for value in params.values())  # KubeRay wants strings
    assert params["num-cpus"] == flags(SERVICES["ray-head"]["command"])["num-cpus"]
    assert params["dashboard-host"] == "0.0.0.0"
    (container,) = head["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["gcs-server"] == GCS_PORT
    assert ports["dashboard"] == DASHBOARD_PORT
    assert ports["client"] == CLIENT_PORT
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["replicas"] >= 2  # a shard's replicas go to distinct nodes (R = 2)
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    # KubeRay's version field is one the distributed extra allows.
    assert re.fullmatch(r"2\.\d+\.\d+", cluster["rayVersion"])
    assert int(cluster["rayVersion"].split(".")[1]) >= 30


def test_manifest_runs_one_image_everywhere_with_the_shared_volume() -> None:
    compose_image = SERVICES["ray-head"]["image"].split(":-", 1)[1].rstrip("}")
    images = set()
    for where, spec in pod_specs().items():
        (container,) = spec["containers"]
        images.add(container["image"])
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["cots-data"] == "/data", where
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["cots-data"]["persistentVolumeClaim"]["claimName"] == "cots-data", where
    assert images == {compose_image}
    (claim,) = of_kind("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "cots-data"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (CPU or memory) as a number, for comparisons."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6}
    text = str(value)
    for suffix, scale in sorted(units.items(), key=lambda unit: -len(unit[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def test_manifest_containers_have_resources_probes_and_the_settings() -> None:
    config_maps = {doc["metadata"]["name"]: doc for doc in of_kind("ConfigMap")}
    for where, spec in pod_specs().items():
        (container,) = spec["containers"]
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            requested = quantity(resources["requests"][resource])
            assert 0 < requested <= quantity(resources["limits"][resource]), (where, resource)
        # HTTP probes: KubeRay's own run wget, which the image does not have.
        for probe in ("readinessProbe", "livenessProbe"):
            assert "httpGet" in container[probe], (where, probe)
        assert [source["configMapRef"]["name"] for source in container["envFrom"]] == [
            "cots-settings"
        ], where  # one set of COTS_* and RAY_* settings for the pods and the front door
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, where
    head = pod_specs()["head"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/api/gcs_healthz", "port": DASHBOARD_PORT}
    # Login shells (KubeRay's `bash -lc`) find the image's venv again.
    assert "RAY_AUTH_MODE" in settings_map()
    login = config_maps["cots-login-path"]["data"]["cots-venv.sh"]
    assert "/opt/venv/bin" in login
    for where, spec in pod_specs().items():
        if where.startswith(("head", "worker")):
            mounts = [mount["mountPath"] for mount in spec["containers"][0]["volumeMounts"]]
            assert "/etc/profile.d/cots-venv.sh" in mounts, where


def test_front_door_connects_to_the_rayservice_head_service() -> None:
    name = one("RayService")["metadata"]["name"]
    api = pod_specs()["deployment:cots-api"]["containers"][0]
    env = {item["name"]: item["value"] for item in api["env"]}
    # KubeRay names a RayService's head service <name>-head-svc; the client port is Ray's.
    assert env["COTS_RAY_ADDRESS"] == f"ray://{name}-head-svc:{CLIENT_PORT}"
    assert api["args"][:2] == ["cots", "serve"]
    (service,) = of_kind("Service")
    assert service["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == api["ports"][0]["containerPort"]


def serve_config() -> dict[str, Any]:
    config = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


def test_serve_config_is_valid_and_names_the_shards_as_the_router_does() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.shard_link import deployment_name

    config = serve_config()
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of a config file
    shards: dict[str, list[int]] = {}
    for application in config["applications"]:
        args = application["args"]
        assert application["name"] == deployment_name(args["collection"], args["shard"])
        assert application["route_prefix"] is None  # handles only, no HTTP route
        module, attribute = application["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        assert args["root"] == settings_map()["COTS_INDEX_ROOT"]
        shards.setdefault(args["collection"], []).append(args["shard"])
    assert shards
    for numbers in shards.values():
        assert sorted(numbers) == list(range(len(numbers)))  # every shard, 0 to S-1


# ---- service/shard_app.py ------------------------------------------------------------------

DIM = 32
BUNDLE = "b" * 64


def build_photos(root: Path, shards: int, replicas: int, n: int = 240) -> np.ndarray:
    """A sharded collection "photos" of n unit vectors (ids 0..n-1); returns the vectors."""
    from indexer.metadata import Item
    from indexer.sharded_build import build_sharded

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    items = [Item(id=int(i), kind="image", uri=f"u/{i}", group_id=f"g{i}") for i in ids]
    build_sharded(
        root, "photos", ids, vectors, items, shards, replicas,
        model_bundle_id=BUNDLE, factory="Flat", progress=False,
    )  # fmt: skip
    return vectors


def built_with(app: Any, root: Path, **extra: Any) -> Any:
    return app({"root": str(root), "collection": "photos", "shard": 0, **extra})._bound_deployment


def test_shard_app_binds_the_router_s_deployment_from_sharded_json(tmp_path: Path) -> None:
    from ray.serve import Application

    from service.shard_app import app
    from service.shard_link import REPLICA_CPUS, REPLICA_MAX_ONGOING, deployment_name

    build_photos(tmp_path, shards=3, replicas=2)
    built = app({"root": str(tmp_path), "collection": "photos", "shard": 2})
    assert isinstance(built, Application)
    # Serve keeps the bound deployment on the application (no public accessor).
    bound = built._bound_deployment
    assert bound.name == deployment_name("photos", 2)
    assert bound._deployment_config.num_replicas == 2  # sharded.json's R
    assert bound._deployment_config.max_ongoing_requests == REPLICA_MAX_ONGOING
    assert bound._replica_config.ray_actor_options["num_cpus"] == REPLICA_CPUS
    assert bound._replica_config.placement_group_bundles is None
    assert bound._replica_config.max_replicas_per_node == 1
    assert bound.init_args[:4] == (str(tmp_path.resolve()), "photos", 2, BUNDLE)
    assert built_with(app, tmp_path, replicas=3)._deployment_config.num_replicas == 3
    with pytest.raises(ValueError, match="has 3 shards"):
        app({"root": str(tmp_path), "collection": "photos", "shard": 3})
    with pytest.raises(ValidationError, match="shards"):
        app({"root": str(tmp_path), "collection": "photos", "shard": 0, "shards": 2})


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A Ray cluster of its own (address "local": never another session's `ray start`)."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def deployed_at(names: list[str]) -> dict[str, float]:
    """When each Serve application was last deployed (a new deployment changes it)."""
    from ray import serve

    applications = serve.status().applications
    assert all(applications[name].status == "RUNNING" for name in names)
    return {name: applications[name].last_deployed_time_s for name in names}


@pytest.mark.slow
def test_manifest_shard_apps_serve_and_the_router_uses_them(
    tmp_path: Path, local_ray: None
) -> None:
    """serveConfigV2's applications, built from their import path and args as Serve does from a
    config, serve the collection; the front door's router finds them running, uses them as
    they are (same replicas), and its answers are exact search over all items."""
    from ray import serve

    from service.shard_router import RayShards

    config = serve_config()
    apps = [a for a in config["applications"] if a["args"]["collection"] == "photos"]
    vectors = build_photos(tmp_path, shards=len(apps), replicas=1)
    for application in apps:
        module, attribute = application["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attribute)
        args = {**application["args"], "root": str(tmp_path)}  # the manifest's /data/indices
        serve.run(builder(args), name=application["name"], route_prefix=None)
    before = deployed_at([a["name"] for a in apps])

    link = RayShards("local", bundle_id=BUNDLE, timeout_s=30, poll_s=5)
    try:
        collection = link.open(tmp_path, "photos", None)
        queries = vectors[:5] + 0.01
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        scores, ids = collection.nearest(queries, 10)
        exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
        assert ids.tolist() == exact.tolist()
        np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, exact, 1), 1e-5)
        assert deployed_at(list(before)) == before  # not deployed again by the router
    finally:
        link.close()
