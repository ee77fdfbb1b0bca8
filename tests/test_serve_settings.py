"""``cots serve``'s process settings: thread shares per worker and the query precision."""

from __future__ import annotations

import pytest

from service.cli import _thread_shares
from service.settings import Settings


def test_workers_split_the_cores_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("COTS_THREADS", raising=False)
    monkeypatch.delenv("COTS_FAISS_THREADS", raising=False)
    assert _thread_shares(1) == {}
    assert _thread_shares(4) == {"COTS_THREADS": "4", "COTS_FAISS_THREADS": "4"}
    assert _thread_shares(32) == {"COTS_THREADS": "1", "COTS_FAISS_THREADS": "1"}
    monkeypatch.setenv("COTS_THREADS", "2")
    assert _thread_shares(4) == {"COTS_FAISS_THREADS": "4"}


def test_precision_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().precision == "auto"
    monkeypatch.setenv("COTS_PRECISION", "int8")
    assert Settings().precision == "int8"
    monkeypatch.setenv("COTS_PRECISION", "int4")
    with pytest.raises(ValueError, match="precision"):
        Settings()
