"""One shard's Ray Serve application, importable by path: what a Serve config file (KubeRay's
``serveConfigV2``, ``serve deploy``) names to run the shards of a sharded collection on the
cluster itself, before any front door connects.

``serveConfigV2: applications[i] = {name: <collection>-shard-<i>, import_path:
service.shard_app:app, args: {root, collection, shard}}`` -> Serve's controller calls
:func:`app` on the cluster -> ``sharded.json`` of the collection (shards, replicas, model
bundle) -> ``ShardDeployment`` bound with the options the front door's router would give it

The front door (``service.shard_router.RayShards``) deploys a shard's application when none
of that name is running and uses a running one as it finds it, so an application deployed
from the cluster's config is the one it queries. Its name, its deployment's name and its
options are the ones the front door gives (``service.shard_link``: ``deployment_name``, one
replica per node, ``REPLICA_CPUS``, ``REPLICA_MAX_ONGOING``); the replica count and the model
bundle come from ``sharded.json`` (``cots index shard --replicas``) unless the config says
otherwise. Serving settings that the router passes from the front door's settings
(``COTS_MMAP``, ``COTS_RESCORE``, ``COTS_RELOAD_POLL_S``) are read here from the environment
of the cluster's nodes, so give the Ray pods the same ``COTS_*`` variables as the front door.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from indexer.sharded import read_sharded
from service.settings import Settings
from service.shard_link import REPLICA_CPUS, REPLICA_MAX_ONGOING, deployment_name
from service.shard_serve import ShardDeployment


class ShardAppArgs(BaseModel):
    """``args`` of one shard's application in a Serve config."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(description="the index root, at the same path on every node")
    collection: str = Field(min_length=1, description="the sharded collection")
    shard: int = Field(ge=0, description="which shard, 0 to S-1")
    replicas: int | None = Field(None, ge=1, description="unset: sharded.json's R")
    bundle_id: str | None = Field(None, description="unset: the bundle the shards were built with")


def app(args: ShardAppArgs | Mapping[str, Any]) -> Application:
    """The application ``<collection>-shard-<shard>``: Serve's application builder, called
    with the config's ``args`` (a mapping, validated here as :class:`ShardAppArgs`, so that a
    wrong key fails the deployment with pydantic's message)."""
    args = ShardAppArgs.model_validate(args)
    sharded = read_sharded(args.root, args.collection)
    if args.shard >= sharded.shards:
        raise ValueError(
            f"collection {args.collection!r} has {sharded.shards} shards (0 to "
            f"{sharded.shards - 1}), not a shard {args.shard}"
        )
    settings = Settings()
    name = deployment_name(args.collection, args.shard)
    deployment = ShardDeployment.options(  # type: ignore[attr-defined]
        name=name,
        num_replicas=args.replicas or sharded.replicas,
        max_replicas_per_node=1,  # as the router's: a node's death takes one replica at most
        ray_actor_options={"num_cpus": REPLICA_CPUS},
        max_ongoing_requests=REPLICA_MAX_ONGOING,
    )
    bound: Application = deployment.bind(
        str(Path(args.root).resolve()),
        args.collection,
        args.shard,
        args.bundle_id or sharded.model_bundle_id,
        poll_s=settings.reload_poll_s,
        mmap=settings.mmap,
        rescore=settings.rescore,
    )
    return bound
