"""One error base per package, and HTTP statuses chosen in one table at the API edge: the
client's mistakes are 4xx naming them, the server's own failures 500s with a logged trace."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import indexer
import runtime
import service
from indexer.collection import Collection
from indexer.errors import CollectionError, FactoryError, FilterError, IndexerError
from runtime.errors import BundleRuntimeError
from service.api.errors import STATUS, status_of
from service.errors import OverloadedError, ServiceError, UnauthenticatedError, UnavailableError
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import ADMIN_KEY, KEYS, assert_error

SEARCH = "/v1/collections/images/search"


# The HTTP edge, whose exceptions are ASGI control flow (the body limit's 413 raised from
# ``receive``), not errors of the service's work.
EDGE = {"service.middleware"}


def errors_defined_in(package: object) -> list[type[BaseException]]:
    """Every exception class a module of ``package`` defines (not those it imports)."""
    found = []
    path = package.__path__  # type: ignore[attr-defined]
    for module in pkgutil.walk_packages(path, f"{package.__name__}."):  # type: ignore[attr-defined]
        if module.name in EDGE:
            continue
        loaded = importlib.import_module(module.name)
        for _, value in inspect.getmembers(loaded, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == loaded.__name__:
                found.append(value)
    return found


@pytest.mark.parametrize(
    ("package", "base"),
    [(runtime, BundleRuntimeError), (indexer, IndexerError), (service, ServiceError)],
)
def test_every_error_a_package_defines_is_under_its_base(
    package: object, base: type[Exception]
) -> None:
    defined = errors_defined_in(package)
    assert base in defined
    assert [error.__name__ for error in defined if not issubclass(error, base)] == []


def test_the_runtime_and_the_indexer_do_not_share_a_base() -> None:
    # The registry tells "a collection cannot load" from "the bundle cannot load" by base.
    assert not issubclass(CollectionError, BundleRuntimeError)
    assert not issubclass(BundleRuntimeError, IndexerError)


def test_every_service_error_has_a_status_and_nothing_else_is_blamed_on_the_client() -> None:
    subclasses = [e for e in errors_defined_in(service) if issubclass(e, ServiceError)]
    for error in subclasses:
        if error is ServiceError:
            continue
        assert 400 <= status_of(error.__new__(error)) < 600, error
    assert status_of(OverloadedError("search")) == 503  # by its base, UnavailableError
    assert status_of(FilterError("bad filter")) == 422
    # The server's own failures, and the packages' errors that are not the client's: 500.
    for internal in (ValueError("x"), KeyError("x"), CollectionError("x"), FactoryError("x")):
        assert status_of(internal) == 500, internal
    assert set(STATUS) <= {*subclasses, FilterError}


@pytest.fixture(scope="module")
def server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = Settings(
        bundle=micro_bundle, index_root=served_root[1], api_keys=KEYS, rate_limit_per_minute=0
    )
    with live_server(settings) as running:
        yield running


def test_an_internal_value_error_under_a_search_is_a_500_with_its_trace_logged(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Collection, *args: object, **kwargs: object) -> object:
        raise ValueError("a bug in the server, not the client's fault")

    monkeypatch.setattr(Collection, "nearest", broken)
    with server.client() as client, caplog.at_level(logging.ERROR, logger="cots.service"):
        json_search = client.post(SEARCH, json={"text": "a red circle never searched", "k": 3})
        error = assert_error(json_search, 500, "internal error")
        assert "bug" not in error["message"]  # no internals leak to the client
    traces = [str(record.exc_info[1]) for record in caplog.records if record.exc_info]
    assert any("a bug in the server" in trace for trace in traces), traces


def test_a_filter_the_store_refuses_is_a_422_naming_it(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuses(self: Collection, *args: object, **kwargs: object) -> object:
        raise FilterError("field 'year': a range on text that holds numbers")

    monkeypatch.setattr(Collection, "nearest", refuses)
    with server.client() as client:
        answer = client.post(SEARCH, json={"text": "a blue star never searched", "k": 3})
        assert_error(answer, 422, "field 'year'")


def test_statuses_and_headers_come_from_the_table(server: LiveServer) -> None:
    with server.client() as client:
        unauthenticated = client.post("/v1/collections/images/compact", json={})
        assert_error(unauthenticated, 401, "API key")
        assert unauthenticated.headers["WWW-Authenticate"] == "ApiKey"
        missing = client.post("/v1/collections/nosuch/search", json={"text": "x"})
        assert_error(missing, 404, "nosuch")
        bad_factory = client.post(
            "/v1/collections/images/reindex",
            json={"factory": "IVF99999999,Nonsense"},
            headers={"X-API-Key": ADMIN_KEY},
        )
        assert_error(bad_factory, 422, "FAISS cannot build factory")
    assert status_of(UnauthenticatedError("x")) == 401
    assert status_of(UnavailableError("x", retry_after=2)) == 503
