"""Headless Chromium for the browser tests: where it is, how it is started, how long to wait."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

from tests.tools import tool_path

TIMEOUT_MS = 20_000  # generous: the machine may have two cores and a cold ONNX session
# The test machines have no network: without these, Chromium stalls or logs errors reaching
# Google's services, and a sandbox needs privileges a container lacks.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """$COTS_CHROMIUM, else the Chromium scripts/chromium.sh finds or installs."""
    return tool_path("COTS_CHROMIUM", "chromium.sh", "Chromium")


@contextmanager
def launched_chromium() -> Iterator[Browser]:
    """A headless Chromium for the length of the ``with``."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
