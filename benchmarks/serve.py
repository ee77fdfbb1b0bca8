"""``cots bench serve``: text → image search through the real HTTP server, under wrk.

The collection is real FAISS + SQLite at full size, but its vectors are seeded random unit
vectors (clustered like embeddings) rather than encoded images: search and hydrate cost what
they cost on a real collection of that size and dim (the factory is chosen the normal way),
without encoding 100k images first.

Flow: build or reuse the collection -> measure the same kind of queries in process (a child
process pinned to the server's cores: tokenise+encode, FAISS, hydrate one query at a time,
and the encoder's batched throughput) -> for batching on, then off: start ``cots serve`` as a
child pinned to all cores but the last, check a few answers with a Python client, then per
case and concurrency run wrk (compiled, pinned to the last core; ``benchmarks/load_wrk.py``)
for a warm-up and a measured run, with ``/metrics`` scraped and the server's CPU read around
the measured one. A Python load generator on the same cores measured itself, not the server.

Cases: the ``/healthz`` floor; batching on or off (the server restarts between); cache miss
(every text unique in the run) or hit (a few texts, all cached during the warm-up). The
batchers' batch sizes and the cache hit rate come from ``/metrics`` deltas, so a "miss" row
that hit the cache would show it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import secrets
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import click
import numpy as np
from tqdm import tqdm

from benchmarks.load_wrk import (
    find_wrk,
    run_wrk,
    split_cores,
    tagged,
    write_get_script,
    write_script,
)
from benchmarks.serve_load import (
    COLLECTION,
    Server,
    check_answers,
    cpu_seconds,
    read_metrics,
    running_server,
    wait_until_idle,
)
from benchmarks.serve_report import Measured, level_row, render, table_line, targets

if TYPE_CHECKING:
    from runtime.encoder import Encoder

ROOT: Final = Path(__file__).resolve().parents[1]
CASES: Final = ("healthz", "batch-miss", "batch-hit", "nobatch-miss", "nobatch-hit")
WARMUP_QUERIES: Final = 20
CHECKED_ANSWERS: Final = 8
SCRIPT_TEXTS: Final = 256  # captions a miss level's tags are appended to
# Clustered like real embeddings: IVF lists as uneven, and recall as meaningful, as on a real
# collection (uniform random vectors would make every list equal and recall look broken).
VECTORS: Final = "clustered random unit vectors (indexer.synthetic_vectors.Mixture)"

_SIZES: Final = ("small", "little", "big", "large", "tiny", "huge")
_COLOURS: Final = ("red", "blue", "green", "white", "brown", "yellow", "purple", "orange")
_SHAPES: Final = ("circle", "square", "star", "heart", "diamond", "triangle", "cross")
_RELATIONS: Final = ("left of", "right of", "above", "below", "next to", "beneath")
_BACKGROUNDS: Final = ("dotted", "striped", "checkered", "plain", "polka-dot", "grey")


def _phrase(rng: np.random.Generator) -> str:
    """A caption in the style of the synthetic corpus the bench bundles are trained on."""

    def pick(words: Sequence[str]) -> str:
        return words[int(rng.integers(len(words)))]

    return (
        f"a {pick(_SIZES)} {pick(_COLOURS)} {pick(_SHAPES)} {pick(_RELATIONS)} a "
        f"{pick(_SIZES)} {pick(_COLOURS)} {pick(_SHAPES)}, on a {pick(_BACKGROUNDS)} background"
    )


class QueryTexts:
    """Query texts that never repeat within a run: a caption plus a photo number made of a
    per-run salt and a counter. The salt keeps a Redis cache from hitting on an earlier run's
    texts; case and whitespace never differ only, since the cache key ignores both."""

    def __init__(self, seed: int, salt: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.salt = salt
        self.count = 0

    def fresh(self, n: int) -> list[str]:
        texts = []
        for _ in range(n):
            self.count += 1
            texts.append(f"{_phrase(self.rng)}, photo {self.salt}-{self.count}")
        return texts

    def captions(self, n: int) -> list[str]:
        """``n`` captions without a tag: what a miss level's script tags per request."""
        return [_phrase(self.rng) for _ in range(n)]

    def as_sent(self, n: int, salt: int) -> list[str]:
        """``n`` texts as a miss level's wrk script sends them (a caption and its tag), so
        that in process times texts of the same length."""
        out = []
        for caption in self.captions(n):
            self.count += 1
            # Counters of 4 digits, as most of a measured level's requests carry.
            out.append(tagged(caption, salt, 1, 1000 + self.count))
        return out


@dataclass(frozen=True)
class ServeBenchConfig:
    bundle: Path
    work: Path
    items: int = 100_000
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    duration_s: float = 10.0  # per measured level
    warmup_s: float = 2.0  # per level, before it
    cases: tuple[str, ...] = CASES
    k: int = 10
    hit_texts: int = 32
    in_process_queries: int = 200
    redis_url: str | None = None
    providers: tuple[str, ...] = ()
    gpu_faiss: bool | None = None
    threads: int | None = None
    faiss_threads: int | None = None  # None: FAISS's default (every core)
    seed: int = 0


# The collection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCollection:
    root: Path
    factory: str
    items: int
    dim: int
    recall_at_10: float
    reused: bool
    build_s: float


def ensure_collection(bundle: Path, work: Path, items: int, seed: int) -> BenchCollection:
    """The bench collection under ``work/indices``: the live version when it was made for this
    bundle, count and seed, else a new one (random unit vectors, real items), published."""
    from indexer.assemble import write_version
    from indexer.faiss_choice import choose_factory
    from indexer.index_bundle import IndexInfo, read_info
    from indexer.metadata import Item
    from indexer.synthetic_vectors import Mixture
    from indexer.versions import current_dir, current_version, publish, staging
    from runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    root = work / "indices"
    if current_version(root, COLLECTION) is not None:
        info = read_info(current_dir(root, COLLECTION))
        made = (info.model_bundle_id, info.count, info.build.get("bench_serve"))
        if made == (manifest.bundle_id, items, {"seed": seed, "vectors": VECTORS}):
            return BenchCollection(
                root, info.factory, info.count, info.dim, info.recall_at_10, True, 0.0
            )
    start = time.perf_counter()
    dim = manifest.embed_dim
    vectors = Mixture(dim, seed=seed).sample(items, seed=seed + 1)
    rng = np.random.default_rng(seed)
    ids = np.arange(items, dtype=np.int64)
    rows = [
        Item(id=i, kind="image", uri=f"bench://item/{i}", caption=_phrase(rng), group_id=f"b{i}")
        for i in range(items)
    ]
    factory = choose_factory(items, dim)
    tqdm.write(
        f"building the {items:,}-item bench collection ({factory}) under {root}", file=sys.stderr
    )
    info = IndexInfo(
        collection=COLLECTION,
        kind="image",
        modality="image",
        count=items,
        live=items,
        dim=dim,
        factory=factory,
        model_bundle_id=manifest.bundle_id,
        recall_at_10=0.0,
        build={"bench_serve": {"seed": seed, "vectors": VECTORS}},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    with staging(root, COLLECTION) as staged:
        final = write_version(staged, ids, vectors, rows, factory, info)
        publish(root, COLLECTION, staged, keep=1)
    build_s = time.perf_counter() - start
    return BenchCollection(root, factory, items, dim, final.recall_at_10, False, build_s)


# The server -------------------------------------------------------------------------------


def server_env(config: ServeBenchConfig, root: Path, *, batching: bool) -> dict[str, str]:
    """The child's environment: ours without any COTS_* (a stray API-key or rate-limit setting
    would change what is measured), plus the bench's settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COTS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        COTS_BUNDLE=str(config.bundle.resolve()),
        COTS_INDEX_ROOT=str(root.resolve()),
        COTS_COLLECTIONS=json.dumps([COLLECTION]),
        COTS_RATE_LIMIT_PER_MINUTE="0",
        COTS_BATCH__ENABLED="true" if batching else "false",
    )
    if config.redis_url:
        env["COTS_REDIS_URL"] = config.redis_url
    if config.providers:
        env["COTS_PROVIDERS"] = json.dumps(list(config.providers))
    if config.gpu_faiss is not None:
        env["COTS_GPU_FAISS"] = "true" if config.gpu_faiss else "false"
    if config.threads is not None:
        env["COTS_THREADS"] = str(config.threads)
    if config.faiss_threads is not None:  # no setting for it: FAISS's OpenMP reads this
        env["OMP_NUM_THREADS"] = str(config.faiss_threads)
    return env


# Runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cores:
    """Which cores the server (and the in-process measurement) and wrk run on."""

    server: list[int]
    generator: list[int]

    @classmethod
    def of_this_process(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        server, generator = split_cores(available)
        return cls(server, generator)


def measure_level(
    wrk: str,
    server: Server,
    scripts: tuple[Path, Path],
    concurrency: int,
    config: ServeBenchConfig,
    cores: Cores,
) -> Measured:
    """A warm-up run, then (once the server has finished what the warm-up left queued) the
    measured run between two scrapes and CPU readings."""
    warmup, script = scripts
    warm = run_wrk(wrk, server.url, warmup, concurrency, config.warmup_s, cores.generator)
    wait_until_idle(server.pid)
    before, cpu = read_metrics(server), cpu_seconds(server.pid)
    result = run_wrk(wrk, server.url, script, concurrency, config.duration_s, cores.generator)
    cpu_after, after = cpu_seconds(server.pid), read_metrics(server)
    used = None if cpu is None or cpu_after is None else cpu_after - cpu
    return Measured(warm, result, before, after, used)


def run_server_cases(
    config: ServeBenchConfig,
    root: Path,
    batching: bool,
    texts: QueryTexts,
    wrk: str,
    cores: Cores,
    bar: tqdm,  # type: ignore[type-arg]
) -> list[dict[str, Any]]:
    """The chosen cases of one batching mode, on one server: the floor (batching on only),
    cache misses, then hits."""
    prefix = "batch" if batching else "nobatch"
    chosen = [case for case in config.cases if case.split("-")[0] == prefix]
    if batching and "healthz" in config.cases:
        chosen.insert(0, "healthz")
    if not chosen:
        return []
    rows = []
    scripts = config.work / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    env = server_env(config, root, batching=batching)
    with running_server(env, config.work / f"server-{prefix}.log", cores.server) as server:
        problems = check_answers(server, texts.fresh(CHECKED_ANSWERS), config.k)
        if problems:
            raise click.ClickException(f"the server answered wrongly: {dict(problems)}")
        for case in chosen:
            levels = (1,) if case == "healthz" else config.concurrency
            hot = texts.fresh(config.hit_texts) if case.endswith("hit") else []
            for concurrency in levels:
                bar.set_postfix_str(f"{case} @{concurrency}")
                pair = _scripts(scripts, case, config, texts, hot)
                level = measure_level(wrk, server, pair, concurrency, config, cores)
                rows.append(level_row(case, concurrency, level))
                # Other work on the machine shows here: it shares the cores.
                rows[-1]["load_1min"] = round(os.getloadavg()[0], 2)
                tqdm.write(table_line(rows[-1]), file=sys.stderr)
                bar.update(1)
    return rows


def _scripts(
    folder: Path, case: str, config: ServeBenchConfig, texts: QueryTexts, hot: Sequence[str]
) -> tuple[Path, Path]:
    """wrk's (warm-up, measured) scripts of one level. Miss: each with a fresh salt, so no run
    repeats another's texts; hit: the hot texts both, which the warm-up run caches."""
    if case == "healthz":
        script = write_get_script(folder / "healthz.lua", "/healthz")
        return script, script
    search = f"/v1/collections/{COLLECTION}/search"
    if case.endswith("hit"):
        script = write_script(folder / f"{case}.lua", search, list(hot), config.k, 0, unique=False)
        return script, script
    captions = texts.captions(SCRIPT_TEXTS)
    made = []
    for phase in ("warmup", "measured"):
        salt = 10**8 + secrets.randbelow(9 * 10**8)  # nine digits: every level's texts alike
        path = folder / f"{case}-{phase}.lua"
        made.append(write_script(path, search, captions, config.k, salt, unique=True))
    return made[0], made[1]


def measure_in_process(
    config: ServeBenchConfig, root: Path, cores: Sequence[int], salt: int
) -> dict[str, Any]:
    """What the server's cores do for one query without HTTP: in a fresh child process pinned
    to ``cores`` (so its thread pools are sized and placed as the server's are)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_in_process_child, config, root, list(cores), salt).result()


def _in_process_child(
    config: ServeBenchConfig, root: Path, cores: list[int], salt: int
) -> dict[str, Any]:
    """Medians of tokenise+encode, FAISS search and hydrate, one unique query at a time
    (alternating, as a lone request does), and the encoder's throughput on full batches;
    threads as the server would size them."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # before any thread pool exists
    import faiss

    from indexer.collection import Collection
    from runtime.encoder import Encoder
    from service.settings import BatchSettings

    threads = config.threads or len(cores)
    faiss.omp_set_num_threads(config.faiss_threads or len(cores))
    encoder = Encoder(config.bundle, providers=list(config.providers) or None, threads=threads)
    collection = Collection.open(
        root, COLLECTION, bundle_id=encoder.bundle_id, use_gpu=config.gpu_faiss
    )
    texts = QueryTexts(config.seed + 1, salt)
    tag = 10**8 + salt % (9 * 10**8)  # nine digits, as the scripts' salts
    times: dict[str, list[float]] = {"encode": [], "search": [], "hydrate": []}
    batch = BatchSettings().max_batch
    try:
        for text in texts.as_sent(WARMUP_QUERIES, tag):  # first runs allocate, pick kernels
            collection.search(encoder.encode_texts([text]), config.k)
        queries = texts.as_sent(config.in_process_queries, tag)
        for text in tqdm(queries, desc="in process", leave=False):
            start = time.perf_counter()
            vector = encoder.encode_texts([text])
            encoded = time.perf_counter()
            scores, ids = collection.nearest(vector, config.k)
            searched = time.perf_counter()
            collection.hydrate(scores, ids, config.k)
            times["encode"].append(encoded - start)
            times["search"].append(searched - encoded)
            times["hydrate"].append(time.perf_counter() - searched)
        rounds = max(3, config.in_process_queries // batch)
        batches = [texts.as_sent(batch, tag) for _ in range(rounds)]
        start = time.perf_counter()
        for chunk in batches:
            encoder.encode_texts(chunk)
        batched_qps = batch * len(batches) / (time.perf_counter() - start)
        model = model_batch_cost(encoder, queries, batches)
    finally:
        collection.close()
    ms = {name: np.asarray(values) * 1000 for name, values in times.items()}
    total = ms["encode"] + ms["search"] + ms["hydrate"]
    return {
        "queries": len(total),
        "cores": cores,
        "encode_ms_p50": round(float(np.median(ms["encode"])), 3),
        "search_ms_p50": round(float(np.median(ms["search"])), 3),
        "hydrate_ms_p50": round(float(np.median(ms["hydrate"])), 3),
        "single_ms_p50": round(float(np.median(total)), 3),
        "batch": batch,
        "batched_encode_qps": round(batched_qps, 1),
        **model,
    }


def model_batch_cost(
    encoder: Encoder, singles: Sequence[str], batches: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """The text model alone (token ids ready, no tokeniser, no normalising), per text: median
    of one-text calls against median of full-batch calls, and the mean token count. Their ratio
    is all that batching can save on the encoder: a model whose one-text call already fills the
    cores gains nothing from company."""
    one = [encoder.tokenizer([text]) for text in singles]
    full = [encoder.tokenizer(chunk) for chunk in batches]
    for ids in one[:WARMUP_QUERIES] + full[:1]:  # first calls of a shape pick kernels
        encoder.run("text", ids)

    def median_ms(inputs: Sequence[np.ndarray]) -> float:
        spent = []
        for ids in inputs:
            start = time.perf_counter()
            encoder.run("text", ids)
            spent.append((time.perf_counter() - start) * 1000 / len(ids))
        return float(np.median(spent))

    single, batched = median_ms(one), median_ms(full)
    return {
        "model_ms_per_text_single": round(single, 3),
        "model_ms_per_text_batched": round(batched, 3),
        "tokens_per_text": round(float(np.mean([ids.shape[1] for ids in one])), 1),
    }


def machine_info() -> dict[str, Any]:
    """Versions and cores; the server runs with this interpreter and path, so what can be
    imported here is what uvicorn picks (uvloop and httptools when installed)."""
    import importlib.util

    import faiss
    import httpx
    import onnxruntime
    import uvicorn

    def has(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return {
        "uvicorn_loop": "uvloop" if has("uvloop") else "asyncio",
        "uvicorn_http": "httptools" if has("httptools") else "h11",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "faiss": faiss.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
    }


def cache_backend(redis_url: str | None) -> str:
    """How the run cached query embeddings, without any password of the URL."""
    if not redis_url:
        return "in-process LRU (no Redis)"
    parts = urlsplit(redis_url)
    return f"Redis at {parts.hostname}:{parts.port or 6379}{parts.path} (+ in-process LRU)"


def run_serve_bench(config: ServeBenchConfig) -> dict[str, Any]:
    """Every step of the bench; returns the results (what ``--json`` writes)."""
    from runtime.bundle import read_manifest

    unknown = sorted(set(config.cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown cases {', '.join(unknown)}; known: {', '.join(CASES)}")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine skews every timing
    wrk = find_wrk()
    cores = Cores.of_this_process()
    config.work.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(config.bundle)
    collection = ensure_collection(config.bundle, config.work, config.items, config.seed)
    texts = QueryTexts(config.seed, salt=secrets.randbelow(10**6))
    in_process = measure_in_process(config, collection.root, cores.server, texts.salt)
    levels = sum(
        1 if case == "healthz" else len(config.concurrency)
        for case in config.cases
        if case != "healthz" or any(c.startswith("batch-") for c in config.cases)
    )
    rows: list[dict[str, Any]] = []
    with tqdm(total=levels, desc="levels", unit="level") as bar:
        for batching in (True, False):
            rows += run_server_cases(config, collection.root, batching, texts, wrk, cores, bar)
    return {
        "machine": machine_info(),
        "bundle_id": manifest.bundle_id,
        "model": manifest.model_name,
        "dim": collection.dim,
        "items": collection.items,
        "factory": collection.factory,
        "recall_at_10": collection.recall_at_10,
        "collection_reused": collection.reused,
        "collection_build_s": round(collection.build_s, 1),
        "cache_backend": cache_backend(config.redis_url),
        "providers": list(config.providers) or ["default"],
        "gpu_faiss": config.gpu_faiss,
        "threads": config.threads,
        "faiss_threads": config.faiss_threads,
        "k": config.k,
        "batch_settings": _batch_defaults(),
        "hit_texts": config.hit_texts,
        "query_salt": texts.salt,
        "load": {
            "generator": _wrk_version(wrk),
            "generator_cores": cores.generator,
            "server_cores": cores.server,
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
        },
        "in_process": in_process,
        "targets": targets(rows, in_process),
        "rows": rows,
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "duration_s": round(time.perf_counter() - started, 1),
    }


def _wrk_version(wrk: str) -> str:
    import subprocess

    done = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=30)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


def _batch_defaults() -> dict[str, Any]:
    from service.settings import BatchSettings

    return BatchSettings().model_dump()


# The command ------------------------------------------------------------------------------


def _ints(value: str) -> tuple[int, ...]:
    try:
        found = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not found or min(found) < 1:
        raise click.BadParameter(f"{value!r}: give one or more integers >= 1")
    return found


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _cases(value: str) -> tuple[str, ...]:
    chosen = _names(value)
    unknown = sorted(set(chosen) - set(CASES))
    if unknown or not chosen:
        raise click.BadParameter(f"{value!r}: give cases among {', '.join(CASES)}")
    return chosen


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-serve"),
    show_default=True,
    help="Holds the collection (reused when bundle, --items and --seed match) and server logs.",
)
@click.option("--items", type=click.IntRange(min=100), default=100_000, show_default=True)
@click.option("--concurrency", default="1,8,32,128", show_default=True, help="Comma-separated.")
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    help="Seconds of each measured level (wrk rounds to whole seconds).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=1),
    default=2.0,
    show_default=True,
    help="Seconds of wrk warm-up before each level (opens connections, fills the cache).",
)
@click.option("--cases", default=",".join(CASES), show_default=True, help="Comma-separated.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--hit-texts", type=click.IntRange(min=1), default=32, show_default=True,
    help="Distinct texts of the cache-hit cases.",
)  # fmt: skip
@click.option("--in-process-queries", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--redis-url", help="Redis for the server's cache (default: in-process only).")
@click.option("--providers", default="", help="ONNX Runtime providers, comma-separated (cuda).")
@click.option(
    "--gpu-faiss/--no-gpu-faiss",
    default=None,
    help="FAISS indices on the GPU or not [default: on when FAISS sees a GPU].",
)
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads.")
@click.option(
    "--faiss-threads",
    type=click.IntRange(min=1),
    help="FAISS (OpenMP) threads of the server, as OMP_NUM_THREADS [default: every core].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--json", "--json-out", "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)  # fmt: skip
def serve_bench(
    bundle: Path,
    work: Path,
    items: int,
    concurrency: str,
    duration: float,
    warmup: float,
    cases: str,
    k: int,
    hit_texts: int,
    in_process_queries: int,
    redis_url: str | None,
    providers: str,
    gpu_faiss: bool | None,
    threads: int | None,
    faiss_threads: int | None,
    seed: int,
    json_out: Path | None,
) -> None:
    """Text → image search through cots serve under wrk: p50/p99, QPS, errors, server CPU per
    request and batch sizes at each concurrency, batching on/off, cache miss/hit, beside the
    /healthz floor and the same work in process.

    wrk comes from $COTS_WRK or PATH, or the bench installs Debian's package (unpacked into
    ~/.cache/cots/wrk without root); the server gets every core but the last, wrk the last
    (both share a one-core machine)."""
    config = ServeBenchConfig(
        bundle=bundle,
        work=work,
        items=items,
        concurrency=_ints(concurrency),
        duration_s=duration,
        warmup_s=warmup,
        cases=_cases(cases),
        k=k,
        hit_texts=hit_texts,
        in_process_queries=in_process_queries,
        redis_url=redis_url,
        providers=_names(providers),
        gpu_faiss=gpu_faiss,
        threads=threads,
        faiss_threads=faiss_threads,
        seed=seed,
    )
    result = run_serve_bench(config)
    click.echo("\n" + render(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
