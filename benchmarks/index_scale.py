"""``cots bench index scale``: collections larger than RAM, built, served capped and replicated.

Vectors are ``indexer.synthetic_vectors.Mixture`` draws made chunk by chunk (chunk n is
``sample(chunk, seed=seed + 10 + n)``; no encoder), with minimal items (id, kind, uri,
group_id). Queries are 1,000 fresh draws (``seed + 1``); their exact top 10 is merged over the
regenerated chunks (``indexer.large_segment.TopK``), never all vectors at once, and cached in
the work folder. Each phase runs alone (``--phase``) and merges its rows into the JSON file:

- build: ``indexer.large_segment.build_large_collection`` (train on the seeded sample, add in
  chunks, files appended) in this process; wall time per step, peak RSS (VmHWM) and the peak of
  anonymous memory sampled every 0.2 s, bytes on disk.
- rescore: the collection opened as the server opens it (memory-mapped) and searched with
  ``rescore`` r in 1, 2, 4, 8, 16: recall@10 and ms a query one at a time.
- serve: one ``cots serve`` (pinned to all cores but the last, optionally in a memory cgroup,
  ``benchmarks/memory_cap.py``), time to ready, recall@10 of the 1,000 queries sent as
  embeddings over HTTP, then wrk (pinned to the last core, ``benchmarks/load_wrk.py``) at each
  concurrency: a 2 s warm-up and a measured run; the cgroup's peak and the server's memory.
- replicas: one server with mmap on alone, then N started together, each timed to ready and
  warmed with 200 queries, then each one's anonymous and file-backed resident memory
  (``smaps_rollup``); then one server with mmap off (its own copy of the index) the same way.
- sizes: bytes a vector of each index type (built in memory on 100k vectors, centroids and
  codebooks taken out) and of what a segment stores beside it.

The server needs a model bundle whose embed_dim is ``--dim`` (it loads the encoder even when
every query is an embedding); the collections record its id.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, overload

import click
import faiss
import numpy as np
from tqdm import tqdm

from benchmarks.load_wrk import _done_hook, find_wrk, run_wrk, split_cores
from benchmarks.memory_cap import MemoryCap, close_cap, open_cap
from indexer.faiss_choice import HNSW_M, ivf_nlist
from indexer.faiss_search import recall_of
from indexer.large_segment import Chunk, TopK, build_large_collection
from indexer.metadata import Item
from indexer.synthetic_vectors import Mixture

ROOT: Final = Path(__file__).resolve().parents[1]
PHASES: Final = ("build", "rescore", "serve", "replicas", "sizes")
FACTORS: Final = (1, 2, 4, 8, 16)
NLIST_CAP: Final = 4096  # k-means over ⌊4·√10M⌋ = 12,649 centroids takes most of an hour here
QUERY_SEED_OFFSET: Final = 1
CHUNK_SEED_OFFSET: Final = 10
K: Final = 10
READY_TIMEOUT_S: Final = 600.0


# Data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """``count`` Mixture vectors with ids 0..count-1, made ``chunk`` at a time, any number of
    times (the same vectors each pass)."""

    dim: int
    count: int
    seed: int
    chunk: int

    def mixture(self) -> Mixture:
        return Mixture(self.dim, seed=self.seed)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        mixture = self.mixture()
        for n, start in enumerate(range(0, self.count, self.chunk)):
            size = min(self.chunk, self.count - start)
            ids = np.arange(start, start + size, dtype=np.int64)
            yield ids, mixture.sample(size, seed=self.seed + CHUNK_SEED_OFFSET + n)

    def chunks(self) -> Iterator[Chunk]:
        for ids, vectors in self.blocks():
            yield ids, vectors, MinimalItems(ids)

    def queries(self, n: int) -> np.ndarray:
        """Fresh draws: a seed no chunk uses."""
        return self.mixture().sample(n, seed=self.seed + QUERY_SEED_OFFSET)


class MinimalItems(Sequence[Item]):
    """A chunk's rows, made when read (the sampling pass never reads them), without
    validation (they are valid by construction)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | Sequence[Item]:
        if isinstance(index, slice):
            return MinimalItems(self.ids[index])
        return item_of(int(self.ids[index]))

    def __iter__(self) -> Iterator[Item]:
        return (item_of(i) for i in self.ids.tolist())


def item_of(i: int) -> Item:
    return Item.model_construct(
        id=i,
        kind="image",
        uri=f"scale://{i}",
        group_id=str(i),
        caption=None,
        metadata={},
        start_s=None,
        end_s=None,
    )


def ground_truth(source: Source, queries: np.ndarray, work: Path) -> np.ndarray:
    """Exact top-10 ids of ``queries`` over the source's vectors (cached in ``work``)."""
    key = f"truth-{source.count}-{source.dim}-{source.seed}-{source.chunk}-{len(queries)}.npy"
    path = work / key
    if path.is_file():
        return np.load(path)
    exact = TopK(queries, K)
    start = time.perf_counter()
    with tqdm(total=source.count, desc="exact top 10", unit="vec") as bar:
        for ids, vectors in source.blocks():
            exact.add(ids, vectors)
            bar.update(len(ids))
    tqdm.write(f"exact top 10 over {source.count:,}: {time.perf_counter() - start:.0f} s")
    np.save(path, exact.ids)
    return exact.ids


def default_factory(kind: str, count: int, pq_m: int) -> str:
    nlist = min(ivf_nlist(count), NLIST_CAP)
    return f"IVF{nlist},PQ{pq_m}" if kind == "pq" else f"IVF{nlist},Flat"


def collection_name(kind: str, count: int) -> str:
    label = f"{count // 1_000_000}m" if count % 1_000_000 == 0 else str(count)
    return f"{kind}-{label}"


# Memory of this process and others ----------------------------------------------------------


def status_bytes(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssFile) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes: Rss, Pss, Pss_Anon, Pss_File, Private_*, Shared_*,
    Anonymous."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            found[key] = int(parts[0]) * 1024
    return found


@contextmanager
def anon_peak() -> Iterator[list[int]]:
    """Samples this process's anonymous resident memory every 0.2 s; the list's one value is
    its peak so far."""
    peak = [status_bytes("self", "RssAnon")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], status_bytes("self", "RssAnon"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], status_bytes("self", "RssAnon"))


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (clean pages; no root needed), so that a
    capped server reads them itself and its cgroup is charged for them: pages stay charged
    to the cgroup that first read them, here the build's."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


# Phases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    work: Path
    dim: int
    seed: int
    chunk: int
    bundle: Path | None
    threads: int

    @property
    def root(self) -> Path:
        return self.work / "indices"

    def source(self, count: int) -> Source:
        return Source(self.dim, count, self.seed, self.chunk)

    def bundle_id(self) -> str:
        from runtime.bundle import read_manifest

        if self.bundle is None:
            raise click.UsageError("--bundle is needed: the collection records its id")
        manifest = read_manifest(self.bundle)
        if manifest.embed_dim != self.dim:
            raise click.UsageError(f"--bundle embeds in {manifest.embed_dim} dims, not --dim")
        return manifest.bundle_id


def phase_build(
    bench: Bench, count: int, kind: str, factory: str, nprobe: int | None
) -> dict[str, Any]:
    name = collection_name(kind, count)
    timings: dict[str, float] = {}
    bundle_id = bench.bundle_id()
    with anon_peak() as peak, tqdm(total=count, desc=f"building {name}", unit="vec") as bar:
        bar.set_postfix_str(factory)
        start = time.perf_counter()
        version, info = build_large_collection(
            bench.root,
            name,
            bench.source(count).chunks,
            count=count,
            dim=bench.dim,
            factory=factory,
            model_bundle_id=bundle_id,
            build={"bench_scale": {"seed": bench.seed, "chunk": bench.chunk, "count": count}},
            seed=bench.seed,
            on_progress=bar.update,
            timings=timings,
            nprobe=nprobe,
        )
        build_s = time.perf_counter() - start
    segment = bench.root / name / "segments" / info.segments[0]
    on_disk = folder_bytes(segment)
    fp32 = count * bench.dim * 4
    peak_rss = status_bytes("self", "VmHWM")
    row: dict[str, Any] = {
        "collection": name,
        "count": count,
        "dim": bench.dim,
        "factory": factory,
        "version": version,
        "build_s": round(build_s, 1),
        # The rest is making the vectors (Mixture draws, items), twice: sample pass, add pass.
        "steps_s": {key: round(value, 1) for key, value in timings.items()},
        "peak_rss_bytes": peak_rss,
        "peak_anon_bytes": peak[0],
        "fp32_vectors_bytes": fp32,
        "files_bytes": on_disk,
        "recall_at_10_segment": info.recall_at_10,
    }
    tqdm.write(
        f"{name}: {build_s:.0f} s, peak RSS {peak_rss / 2**30:.2f} GiB "
        f"({peak_rss / fp32:.1%} of the fp32 vectors), metadata "
        f"{timings.get('metadata', 0):.0f} s"
    )
    return row


def phase_rescore(
    bench: Bench,
    count: int,
    kind: str,
    queries: int,
    nprobe: int | None,
    factors: Sequence[int] = FACTORS,
) -> dict[str, Any]:
    from indexer.collection import Collection

    name = collection_name(kind, count)
    source = bench.source(count)
    wanted = source.queries(queries)
    truth = ground_truth(source, wanted, bench.work)
    rows = []
    with Collection.open(bench.root, name, mmap=True) as collection:
        if nprobe is not None:
            _set_nprobe(collection, nprobe)
        params = _search_params(collection)
        for factor in factors if kind == "pq" else (1,):
            collection.nearest(wanted[:64], K, rescore=factor)  # the page cache, warm
            start = time.perf_counter()
            found = np.concatenate(
                [
                    collection.nearest(wanted[i : i + 64], K, rescore=factor)[1]
                    for i in range(0, len(wanted), 64)
                ]
            )
            batch_s = time.perf_counter() - start
            single = []
            for i in range(min(200, len(wanted))):
                began = time.perf_counter()
                collection.nearest(wanted[i : i + 1], K, rescore=factor)
                single.append(time.perf_counter() - began)
            row = {
                "rescore": factor,
                "recall_at_10": round(recall_of(found, truth), 4),
                "qps_batch64": round(len(wanted) / batch_s, 1),
                "p50_ms_batch1": round(float(np.percentile(single, 50)) * 1000, 2),
                "p99_ms_batch1": round(float(np.percentile(single, 99)) * 1000, 2),
            }
            rows.append(row)
            tqdm.write(f"{name} rescore {factor}: {row}")
    return {"collection": name, "count": count, "search_params": params, "rows": rows}


def _set_nprobe(collection: Any, nprobe: int) -> None:
    from indexer.faiss_index import set_search_params

    for segment in collection.segments.segments:
        if segment.index is not None:
            set_search_params(segment.index, nprobe=nprobe)


def _search_params(collection: Any) -> dict[str, int]:
    from indexer.faiss_index import get_search_params

    segment = collection.segments.segments[0]
    return get_search_params(segment.index) if segment.index is not None else {}


# The server ---------------------------------------------------------------------------------


def server_env(bench: Bench, name: str, *, mmap: bool, rescore: int | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COTS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    assert bench.bundle is not None
    env.update(
        COTS_BUNDLE=str(bench.bundle.resolve()),
        COTS_INDEX_ROOT=str(bench.root.resolve()),
        COTS_COLLECTIONS=json.dumps([name]),
        COTS_RATE_LIMIT_PER_MINUTE="0",
        COTS_MMAP="true" if mmap else "false",
    )
    if rescore is not None:
        env["COTS_RESCORE"] = str(rescore)
    return env


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    url: str
    ready_s: float


def start_servers(
    envs: Sequence[dict[str, str]],
    logs: Sequence[Path],
    cores: Sequence[int] | None,
    cap: MemoryCap | None = None,
) -> list[Started]:
    """Start one ``cots serve`` per env at once; returns when all answer /readyz 200, each
    with its seconds from spawn to ready."""
    import httpx

    from benchmarks.serve_load import free_port

    def preexec() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        if cap is not None:
            cap.enter()

    launched = []
    for env, log in zip(envs, logs, strict=True):
        port = free_port()
        argv = [sys.executable, "-m", "cots.cli", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                cap.command(argv) if cap is not None else argv,
                env=env,
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=preexec,
            )
        if cap is not None:
            cap.pids.append(process.pid)
        launched.append((process, f"http://127.0.0.1:{port}", time.monotonic(), log))
    started: list[Started | None] = [None] * len(launched)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while any(s is None for s in started):
                for i, (process, url, began, log) in enumerate(launched):
                    if started[i] is not None:
                        continue
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = log.read_text(errors="replace")[-3000:]
                        raise click.ClickException(f"a server did not get ready; {log}:\n{tail}")
                    try:
                        if client.get(f"{url}/readyz").status_code == 200:
                            started[i] = Started(process, url, time.monotonic() - began)
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
    except BaseException:
        stop_servers([Started(p, u, 0.0) for p, u, _, _ in launched])
        raise
    return [s for s in started if s is not None]


def stop_servers(servers: Sequence[Started]) -> None:
    for server in servers:
        server.process.terminate()
    for server in servers:
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def search_over_http(url: str, name: str, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each query as an embedding, one at a time: the top-10 ids [Q, 10] and seconds each."""
    import httpx

    found = np.full((len(queries), K), -1, dtype=np.int64)
    seconds = []
    path = f"{url}/v1/collections/{name}/search"
    with httpx.Client(timeout=60, trust_env=False) as client:
        for row, query in enumerate(queries):
            began = time.perf_counter()
            response = client.post(path, json={"embedding": query.tolist(), "k": K})
            seconds.append(time.perf_counter() - began)
            if response.status_code != 200:
                raise click.ClickException(
                    f"search answered {response.status_code}: {response.text[:500]}"
                )
            hits = [hit["id"] for hit in response.json()["hits"]]
            found[row, : len(hits)] = hits
    return found, seconds


def write_embedding_script(path: Path, request_path: str, queries: np.ndarray) -> Path:
    """wrk's script: POST ``{"embedding": [...], "k": 10}``, cycling through ``queries``."""
    bodies = [json.dumps({"embedding": [round(float(v), 6) for v in q], "k": K}) for q in queries]
    table = ",\n".join(json.dumps(body) for body in bodies)
    path.write_text(
        f"""-- written by benchmarks/index_scale.py for cots bench index scale
local bodies = {{{table}}}
local counter = 0

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  return wrk.format(nil, "{request_path}", nil, bodies[(counter % #bodies) + 1])
end

{_done_hook()}"""
    )
    return path


def phase_serve(
    bench: Bench,
    count: int,
    kind: str,
    *,
    mmap: bool,
    cap_bytes: int,
    rescore: int | None,
    concurrency: Sequence[int],
    duration_s: float,
    queries: int,
) -> dict[str, Any]:
    name = collection_name(kind, count)
    source = bench.source(count)
    wanted = source.queries(queries)
    truth = ground_truth(source, wanted, bench.work)
    wrk = find_wrk()
    available = sorted(os.sched_getaffinity(0))
    server_cores, generator_cores = split_cores(available)
    label = f"{name} {'mmap' if mmap else 'in RAM'}"
    cap = open_cap(cap_bytes, "cots-scale") if cap_bytes else None
    env = server_env(bench, name, mmap=mmap, rescore=rescore)
    row: dict[str, Any] = {
        "collection": name,
        "count": count,
        "mmap": mmap,
        "rescore": rescore,
        "cap_bytes": cap_bytes or None,
        "cap_method": cap.method if cap else None,
        "server_cores": server_cores,
        "wrk_cores": generator_cores,
    }
    try:
        evict(bench.root / name)  # a cold start, every page the server reads charged to it
        servers = start_servers(
            [env], [bench.work / "logs" / f"serve-{name}.log"], server_cores, cap
        )
        server = servers[0]
        try:
            row["ready_s"] = round(server.ready_s, 2)
            found, seconds = search_over_http(server.url, name, wanted)
            row["recall_at_10"] = round(recall_of(found, truth), 4)
            row["python_client_p50_ms"] = round(float(np.percentile(seconds, 50)) * 1000, 2)
            scripts = bench.work / "scripts"
            scripts.mkdir(parents=True, exist_ok=True)
            script = write_embedding_script(
                scripts / f"{name}.lua", f"/v1/collections/{name}/search", wanted[:256]
            )
            levels = []
            for level in concurrency:
                run_wrk(wrk, server.url, script, level, 2.0, generator_cores)
                result = run_wrk(wrk, server.url, script, level, duration_s, generator_cores)
                levels.append(
                    {
                        "concurrency": level,
                        "requests": result.requests,
                        "errors": result.errors,
                        "p50_ms": round(result.p50_ms, 2),
                        "p99_ms": round(result.p99_ms, 2),
                        "qps": round(result.qps, 1),
                        "load_1min": round(os.getloadavg()[0], 2),
                    }
                )
                tqdm.write(f"{label} c={level}: {levels[-1]}")
            row["levels"] = levels
            row["server_memory"] = smaps_rollup(server.process.pid)
            row["server_rss_anon_bytes"] = status_bytes(server.process.pid, "RssAnon")
            row["server_rss_file_bytes"] = status_bytes(server.process.pid, "RssFile")
            row["server_vm_hwm_bytes"] = status_bytes(server.process.pid, "VmHWM")
            if cap is not None:
                row["cap_peak_bytes"] = cap.peak_bytes()
                row["cap_stats"] = cap.stats()
        finally:
            stop_servers(servers)
    finally:
        if cap is not None:
            close_cap(cap)
    return row


def phase_replicas(bench: Bench, count: int, kind: str, replicas: int) -> dict[str, Any]:
    name = collection_name(kind, count)
    warm = bench.source(count).queries(200)
    out: dict[str, Any] = {"collection": name, "count": count, "replicas": replicas}
    # One mapped replica alone first (its start is not slowed by three others starting on the
    # same cores), then N together, then one holding its own copy.
    for tag, mmap, n in (("mmap-alone", True, 1), ("mmap", True, replicas), ("copy", False, 1)):
        env = server_env(bench, name, mmap=mmap, rescore=None)
        logs = [bench.work / "logs" / f"replica-{tag}-{i}.log" for i in range(n)]
        servers = start_servers([env] * n, logs, None)
        try:
            for server in servers:  # every replica touches the pages a query needs
                search_over_http(server.url, name, warm)
            rows = []
            for server in servers:
                memory = smaps_rollup(server.process.pid)
                rows.append(
                    {
                        "ready_s": round(server.ready_s, 2),
                        "rss_anon_bytes": status_bytes(server.process.pid, "RssAnon"),
                        "rss_file_bytes": status_bytes(server.process.pid, "RssFile"),
                        "private_bytes": memory.get("Private_Clean", 0)
                        + memory.get("Private_Dirty", 0),
                        "pss_bytes": memory.get("Pss", 0),
                        "shared_bytes": memory.get("Shared_Clean", 0)
                        + memory.get("Shared_Dirty", 0),
                    }
                )
        finally:
            stop_servers(servers)
        out[tag] = {
            "mmap": mmap,
            "servers": rows,
            "sum_rss_anon_bytes": sum(r["rss_anon_bytes"] for r in rows),
            "sum_pss_bytes": sum(r["pss_bytes"] for r in rows),
        }
        tqdm.write(f"{name} {tag} x{n}: {json.dumps(out[tag])}")
    return out


def phase_sizes(bench: Bench, count: int, metadata_from: Path | None) -> dict[str, Any]:
    """Bytes a vector per index type, from indexes built in memory on ``count`` vectors."""
    from indexer.faiss_index import build_index, index_bytes

    vectors = Mixture(bench.dim, seed=bench.seed).sample(count, seed=bench.seed + 2)
    ids = np.arange(count, dtype=np.int64)
    nlist = min(ivf_nlist(count), NLIST_CAP)
    factories = {
        "IVF-Flat": f"IVF{nlist},Flat",
        "IVF-SQ8": f"IVF{nlist},SQ8",
        "IVF-PQ32": f"IVF{nlist},PQ32",
        "IVF-PQ64": f"IVF{nlist},PQ64",
        "HNSW32": f"HNSW{HNSW_M}",
    }
    rows: dict[str, Any] = {}
    for label, factory in factories.items():
        start = time.perf_counter()
        index = build_index(vectors, ids, factory, use_gpu=False)
        size = index_bytes(index)
        fixed = nlist * bench.dim * 4 if factory.startswith("IVF") else 0
        if "PQ" in factory:
            fixed += 256 * bench.dim * 4  # the codebooks: 256 centroids of every sub-vector
        rows[label] = {
            "factory": factory,
            "index_bytes": size,
            "fixed_bytes": fixed,
            "bytes_per_vector": round((size - fixed) / count, 2),
            "build_s": round(time.perf_counter() - start, 1),
        }
        tqdm.write(f"{label}: {rows[label]}")
        del index
    rows["fp16 stored vectors"] = {"bytes_per_vector": 2 * bench.dim}
    rows["ids (ids.npy)"] = {"bytes_per_vector": 8}
    if metadata_from is not None:
        sqlite = metadata_from / "metadata.sqlite"
        info = json.loads((metadata_from / "segment.json").read_text())
        rows["metadata.sqlite"] = {
            "bytes_per_item": round(sqlite.stat().st_size / info["count"], 1),
            "items": info["count"],
            "row": "id, kind, uri 'scale://<id>', group_id '<id>', empty metadata",
        }
    return {"count": count, "dim": bench.dim, "rows": rows}


# The command --------------------------------------------------------------------------------


def record(json_out: Path, phase: str, key: str, row: dict[str, Any], meta: dict[str, Any]) -> None:
    """Merge one phase's row into the JSON results (other phases' rows are kept)."""
    results = json.loads(json_out.read_text()) if json_out.is_file() else {}
    results.setdefault(phase, {})[key] = {**row, **meta}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=2) + "\n")


@click.command("scale", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--phase", type=click.Choice(PHASES), required=True)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/tmp/scale"),
    show_default=True,
)
@click.option("--count", type=click.IntRange(min=1000), default=1_000_000, show_default=True)
@click.option(
    "--index",
    "kind",
    type=click.Choice(["pq", "flat"]),
    default="pq",
    show_default=True,
    help="IVF-PQ or IVF-Flat (nlist ⌊4·√n⌋ capped at 4,096).",
)
@click.option("--factory", default=None, help="Override the factory string (build).")
@click.option("--pq-m", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    default=None,
    help="build: the nprobe the index file keeps; rescore: searched with (default nlist/8, ≤ 64).",
)
@click.option("--dim", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1024), default=65_536, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A model bundle of embed_dim --dim (build, serve, replicas).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="FAISS threads in this process (build, rescore, sizes).",
)
@click.option("--queries", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option(
    "--cap-gb",
    type=float,
    default=2.0,
    show_default=True,
    help="serve: the server's memory cap (0: none).",
)
@click.option("--mmap/--no-mmap", default=True, show_default=True, help="serve: COTS_MMAP.")
@click.option(
    "--rescore",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="serve: COTS_RESCORE (unset: the server's default).",
)
@click.option("--concurrency", default="1,8", show_default=True)
@click.option(
    "--factors",
    default=",".join(map(str, FACTORS)),
    show_default=True,
    help="rescore: the rescore factors r measured.",
)
@click.option("--duration", type=float, default=10.0, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("docs/bench/scale.json"),
    show_default=True,
)
def scale_bench(
    phase: str,
    work: Path,
    count: int,
    kind: str,
    factory: str | None,
    pq_m: int,
    nprobe: int | None,
    dim: int,
    chunk: int,
    seed: int,
    bundle: Path | None,
    threads: int,
    queries: int,
    cap_gb: float,
    mmap: bool,
    rescore: int | None,
    concurrency: str,
    factors: str,
    duration: float,
    replicas: int,
    json_out: Path,
) -> None:
    """Collections larger than RAM (see benchmarks/index_scale.py): build one in chunks,
    recall against rescore, serve it under a memory cap with wrk, replicas sharing its pages,
    bytes a vector per index type. One --phase a run; rows merge into --json-out."""
    faiss.omp_set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, dim, seed, chunk, bundle, threads)
    load_start = os.getloadavg()[0]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    name = collection_name(kind, count)
    if phase == "build":
        row = phase_build(bench, count, kind, factory or default_factory(kind, count, pq_m), nprobe)
        key = name
    elif phase == "rescore":
        chosen = tuple(int(f) for f in factors.split(",") if f.strip())
        row = phase_rescore(bench, count, kind, queries, nprobe, chosen)
        key = name + (f" nprobe {nprobe}" if nprobe else "")
        key += f" r {factors}" if chosen != FACTORS else ""
    elif phase == "serve":
        if bundle is None:
            raise click.UsageError("--phase serve needs --bundle")
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        cap = int(cap_gb * 2**30)
        row = phase_serve(
            bench,
            count,
            kind,
            mmap=mmap,
            cap_bytes=cap,
            rescore=rescore,
            concurrency=levels,
            duration_s=duration,
            queries=queries,
        )
        key = f"{name} {'mmap' if mmap else 'in RAM'}" + (f" cap {cap_gb:g} GB" if cap else "")
        key += f" rescore {rescore}" if rescore else ""
    elif phase == "replicas":
        if bundle is None:
            raise click.UsageError("--phase replicas needs --bundle")
        row = phase_replicas(bench, count, kind, replicas)
        key = f"{name} x{replicas}"
    else:
        segments = bench.root / collection_name("pq", 1_000_000) / "segments"
        found = sorted(segments.iterdir()) if segments.is_dir() else []
        row = phase_sizes(bench, count, found[0] if found else None)
        key = f"{count}"
    meta = {
        "command": "cots bench index scale " + " ".join(sys.argv[sys.argv.index("scale") + 1 :])
        if "scale" in sys.argv
        else "",
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": threads,
        "chunk": chunk,
        "seed": seed,
        "load_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "machine": {
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "faiss": faiss.__version__,
            "python": platform.python_version(),
        },
        "peak_rss_of_this_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    record(json_out, phase, key, row, meta)
    click.echo(json.dumps({phase: {key: row}}, indent=2))
