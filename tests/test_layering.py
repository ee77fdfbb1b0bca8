"""The packages' layers point one way, and no module imports itself round a cycle.

``benchmarks`` sits beside the product: it may import every package, no package imports it,
and the serving image leaves it out. ``wire`` (the API's pydantic models) is the bottom layer
that both the service and the client import; the client (``cots.client``, the ``client``
extra) imports nothing else of ours.

Every ``import`` in the source counts, at module level or inside a function: a function-level
import delays loading (``cots serve`` never loads torch), it must not hide a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cots", "wire", "runtime", "model", "training", "indexer", "service", "benchmarks")
PRODUCT = ("cots", "cots.client", "wire", "runtime", "model", "training", "indexer", "service")

# Layer -> the layers it may import. ``model.data`` (torch-free corpus readers) sits below the
# indexer; the rest of ``model`` is the model library (towers, objectives, tokenizers), which
# ``training`` (the job: loop, data, evaluation, export, its CLI) imports and never the reverse;
# nothing but the ``cots`` command and ``benchmarks`` imports ``model`` or ``training``.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "runtime": set(),
    "model.data": {"runtime"},
    "model": {"model.data", "runtime"},
    "training": {"model", "model.data", "runtime"},
    "indexer": {"model.data", "runtime", "wire"},
    "service": {"indexer", "model.data", "runtime", "wire"},
    # ``cots`` itself is its __init__ (the version): the client may read that.
    "cots.client": {"cots", "wire"},
    "cots": {
        "cots.client",
        "service",
        "indexer",
        "training",
        "model",
        "model.data",
        "runtime",
        "wire",
    },
    "benchmarks": {
        "cots",
        "cots.client",
        "service",
        "indexer",
        "training",
        "model",
        "model.data",
        "runtime",
        "wire",
    },
}


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = module_files()


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or a name inside one) lives in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import submodule`` depends on the submodule; the package's own
            # __init__ runs first for any import below it, which is no dependency of ours.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if (module := _ours(name)) is not None:
                yield module


def graph() -> dict[str, set[str]]:
    return {name: set(imports_of(path)) - {name} for name, path in MODULES.items()}


def layer(module: str) -> str:
    for sublayer in ("model.data", "cots.client"):
        if module == sublayer or module.startswith(f"{sublayer}."):
            return sublayer
    return module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    """Every import that points against the layers (``ALLOWED``)."""
    return sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]
    )


def test_layers_point_one_way() -> None:
    assert upward_edges(graph()) == []


def test_the_model_library_never_imports_training() -> None:
    """``training`` imports ``model``; an import back (the library reaching for the job's
    config reader, say) fails, as does one from the indexer or the service."""
    edges = graph()
    assert "model.factory" in edges["training.train"]
    assert "model.objectives" in edges["training.train"]
    assert not [
        t
        for name in MODULES
        if layer(name) == "model"
        for t in edges[name]
        if layer(t) == "training"
    ]
    planted = {
        **edges,
        "model.config": edges["model.config"] | {"training.recipes"},
        "indexer.build": edges["indexer.build"] | {"training.export"},
        "service.app": edges["service.app"] | {"training.evaluate"},
    }
    assert upward_edges(planted) == [
        "indexer.build imports training.export",
        "model.config imports training.recipes",
        "service.app imports training.evaluate",
    ]


def test_no_module_is_part_of_an_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_checks_see_what_they_should() -> None:
    # The two checks above pass on an empty graph too: show they find real edges and cycles.
    edges = graph()
    assert "runtime.encoder" in edges["indexer.shards"]
    assert "indexer.build" in edges["indexer.cli"]  # a function-level import counts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def benchmark_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of ``benchmarks`` by a product module."""
    return sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        if layer(module) in PRODUCT
        for target in targets
        if layer(target) == "benchmarks"
    )


def test_no_product_package_imports_benchmarks() -> None:
    assert benchmark_imports(graph()) == []
    # and the check sees such an import (``cots bench`` names its modules as strings only)
    planted = {**graph(), "service.app": {"benchmarks.serve"}}
    assert benchmark_imports(planted) == ["service.app imports benchmarks.serve"]
    assert "benchmarks.serve" in MODULES
    assert not [name for name in MODULES if layer(name) in PRODUCT and "bench_" in name]


def test_the_serving_image_leaves_benchmarks_out() -> None:
    """The Dockerfile copies the build context (``COPY . /opt/src``) only to build the wheel;
    .dockerignore keeps benchmarks/ out of that context, and no COPY names it."""
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "benchmarks" in [line.strip().strip("/") for line in ignored]
    copies = [
        line
        for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.strip().upper().startswith("COPY")
    ]
    assert copies
    assert not [line for line in copies if "bench" in line]


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module of ours that importing ``start`` may import, itself included."""
    seen = {start}
    todo = [start]
    while todo:
        for target in edges.get(todo.pop(), set()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_client_imports_only_the_wire_models() -> None:
    """The ``client`` extra installs httpx, pydantic and click: every module the client and
    ``cots search`` load, followed through every import, is the client's, ``wire``'s or
    ``cots/__init__.py`` (the version), never the service's, the indexer's, the model's or the
    runtime's (tests/test_client_extra.py runs it where those cannot be imported)."""
    edges = graph()
    client = [name for name in MODULES if layer(name) == "cots.client"]
    assert "cots.client.cli" in client
    loaded = set().union(*(reachable(edges, name) for name in client))
    assert sorted(name for name in loaded if layer(name) not in {"cots.client", "wire"}) == ["cots"]
    assert "wire.schemas" in loaded
    assert "wire.filters" in loaded
    # and the check sees a stray import
    planted = {**edges, "cots.client.calls": edges["cots.client.calls"] | {"indexer.filters"}}
    assert "indexer.filters" in reachable(planted, "cots.client.cli")
