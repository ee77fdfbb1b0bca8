"""Choosing a FAISS index for a collection: its factory string by size, dimension and memory
budget, and what each costs in memory. Pure arithmetic over FAISS's documented layouts; nothing
here builds or reads an index (``indexer.faiss_index`` does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

FLAT_MAX_COUNT: Final = 50_000
"""Below this many vectors exact search is fast enough (a few ms a query at dim 512)."""
HNSW_MAX_COUNT: Final = 5_000_000
"""Above this an HNSW build takes hours on a few cores; IVF trains and adds far faster."""
HNSW_M: Final = 32
NLIST_MAX: Final = 65_536
MIN_TRAIN_PER_LIST: Final = 39
"""FAISS warns below 39 training points per k-means centroid; nlist is capped so n/nlist >= 39."""
NPROBE_MAX: Final = 64
PQ_MAX_M: Final = 64
"""PQ codes of at most 64 bytes: also the largest most GPU IVF-PQ kernels take."""

# RAM per vector of the id maps: IndexIDMap2 keeps an id vector (8 B) and a hash map back (about
# 45 B measured with glibc); IVF keeps one int64 per vector in its lists.
IDMAP2_BYTES: Final = 56
IVF_ID_BYTES: Final = 8
# HNSW: level-0 links (2·M int32), upper levels (about M/(M-1) more int32s), level and offset.
HNSW_EXTRA_BYTES: Final = 20


def ivf_nlist(count: int) -> int:
    """Inverted lists for ``count`` vectors: ⌊4·√n⌋, at most n/39 (k-means needs 39 points a
    list) and 65,536, at least 1."""
    nlist = min(int(4 * math.sqrt(max(count, 0))), count // MIN_TRAIN_PER_LIST, NLIST_MAX)
    return max(1, nlist)


def pq_m_candidates(dim: int) -> list[int]:
    """PQ sub-quantizer counts to try, largest first: divisors of ``dim`` up to
    min(dim/4, 64), so a code is at most dim/4 bytes (16x smaller than float32)."""
    cap = min(max(dim // 4, 1), PQ_MAX_M)
    return [m for m in range(cap, 0, -1) if dim % m == 0]


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: nlist/8, between 1 and 64."""
    return max(1, min(nlist // 8, NPROBE_MAX))


def choose_factory(
    count: int,
    dim: int,
    memory_budget_bytes: int | None = None,
    *,
    removable: bool = True,
) -> str:
    """The FAISS factory string for ``count`` vectors of ``dim`` within a RAM budget.

    The first row that applies wins. n = count, d = dim; "fits" means ``estimate_memory_bytes``
    of that factory is at most the budget (no budget: everything fits).

    | row | when                                          | factory                     |
    |-----|-----------------------------------------------|-----------------------------|
    | 1   | n < 50,000 and it fits                        | `Flat` (exact)              |
    | 2   | not `removable`, n <= 5,000,000, it fits      | `HNSW32`                    |
    | 3   | it fits                                       | `IVF{nlist},Flat`           |
    | 4   | it fits                                       | `IVF{nlist},SQfp16` (fp16)  |
    | 5   | n >= 256 and it fits, largest m that does     | `IVF{nlist},PQ{m}`          |
    | 6   | nothing fits                                  | `ValueError`                |

    nlist = ⌊4·√n⌋ clipped to [1, min(n/39, 65,536)]. m runs over the divisors of d up to
    min(d/4, 64), largest first; a PQ code is m bytes. HNSW is only picked when the caller needs
    no ``remove_ids`` (HNSW cannot remove): a collection edited in place gets IVF.
    Searches default to nprobe = nlist/8 in [1, 64] and efSearch = 64.

    Row 5 is served with exact rescoring (``indexer.rescore``): k x ``default_rescore(n)`` (4 to 32)
    candidates ranked by their inner products with the segment's fp16 copy of its vectors,
    read through a memory map. That copy costs disk (2·d bytes a vector, written for every
    compressed segment anyway) and page cache, which the kernel may evict, not the budget,
    which counts what the index holds in RAM. At 100k x 256 it lifts recall@10 from 0.81 to
    0.99 for PQ64 and from 0.67 to 0.97 for PQ32 (``python -m benchmarks.index_rescore``).
    Row 4 still comes first: where SQfp16 fits it has recall 0.998 without rescoring (its
    codes are as fine as the fp16 copy, so it is not rescored) and several times the QPS of
    PQ rescored (9,900 against 1,750-2,700 at batch 64 on 2 cores).
    """
    if count < 0 or dim < 1:
        raise ValueError(f"count must be >= 0 and dim >= 1, not count={count}, dim={dim}")
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes

    def fits(factory: str) -> bool:
        return estimate_memory_bytes(factory, count, dim) <= budget

    if count < FLAT_MAX_COUNT and fits("Flat"):
        return "Flat"
    hnsw = f"HNSW{HNSW_M}"
    if not removable and count <= HNSW_MAX_COUNT and fits(hnsw):
        return hnsw
    nlist = ivf_nlist(count)
    for encoding in ("Flat", "SQfp16"):
        if fits(factory := f"IVF{nlist},{encoding}"):
            return factory
    if count >= 256:  # PQ's 256-centroid k-means needs at least 256 training points
        for m in pq_m_candidates(dim):
            if fits(factory := f"IVF{nlist},PQ{m}"):
                return factory
    smallest = f"IVF{nlist},PQ{pq_m_candidates(dim)[-1]}"
    raise ValueError(
        f"no index for {count:,} vectors of dim {dim} fits in {memory_budget_bytes:,} bytes "
        f"(the smallest, {smallest}, needs {estimate_memory_bytes(smallest, count, dim):,})"
    )


@dataclass(frozen=True)
class _Spec:
    """What a factory string means for memory: bytes a vector, fixed bytes, id map bytes."""

    code_bytes: float
    fixed_bytes: int
    id_bytes: int


_IVF = re.compile(r"^IVF(\d+),(.+)$")
_HNSW = re.compile(r"^HNSW(\d+)(?:,Flat)?$")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?$")


def _code_bytes(encoding: str, dim: int) -> float | None:
    """Bytes a vector of a flat encoding (``Flat``, ``SQfp16``, ``SQ8``, ``PQ{m}[x{bits}]``)."""
    if encoding == "Flat":
        return 4.0 * dim
    if encoding in ("SQfp16", "SQbf16"):
        return 2.0 * dim
    if encoding == "SQ8":
        return float(dim)
    if encoding == "SQ4":
        return dim / 2
    if match := _PQ.match(encoding):
        m, bits = int(match[1]), int(match[2] or 8)
        return math.ceil(m * bits / 8)
    return None


def _spec(factory: str, dim: int) -> _Spec:
    if match := _IVF.match(factory):
        nlist, encoding = int(match[1]), match[2]
        code = _code_bytes(encoding, dim)
        if code is not None:
            fixed = nlist * dim * 4  # the coarse centroids
            if encoding.startswith("PQ"):
                fixed += 256 * dim * 4  # the PQ codebooks
            return _Spec(code, fixed, IVF_ID_BYTES)
    elif match := _HNSW.match(factory):
        links = 2 * int(match[1]) * 4 + HNSW_EXTRA_BYTES
        return _Spec(4.0 * dim + links, 0, IDMAP2_BYTES)
    else:
        code = _code_bytes(factory, dim)
        if code is not None:
            return _Spec(code, 256 * dim * 4 if factory.startswith("PQ") else 0, IDMAP2_BYTES)
    raise ValueError(
        f"cannot estimate the memory of factory {factory!r}: known forms are Flat, SQfp16, SQ8, "
        "PQ{m}, HNSW{M}, IVF{nlist},Flat|SQfp16|SQ8|PQ{m}"
    )


def estimate_memory_bytes(factory: str, count: int, dim: int) -> int:
    """RAM an index of ``count`` vectors takes once built (codes, ids, centroids, links).

    An estimate within ~10 %: allocator slack and the training-time peak are not counted.
    """
    spec = _spec(factory, dim)
    return math.ceil(count * (spec.code_bytes + spec.id_bytes)) + spec.fixed_bytes
