"""The wrk load generator of ``cots bench serve``, against a real loopback HTTP server that
records every body it is sent: the script's requests are well-formed, never repeat a text in
the unique mode, and the parsed counts match what the server saw."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from benchmarks import load_wrk
from benchmarks.load_wrk import find_wrk, run_wrk, split_cores, tagged, write_script


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        out = b'{"hits": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    _Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("unique", [True, False])
def test_wrk_posts_the_scripts_texts(recorder: str, tmp_path: Path, unique: bool) -> None:
    texts = ["a red circle", "a blue square"]
    script = write_script(tmp_path / "load.lua", "/search", texts, k=7, salt=3, unique=unique)
    result = run_wrk(find_wrk(), recorder, script, concurrency=2, duration_s=1, cores=[0])
    bodies = _Recorder.bodies
    assert result.errors == 0
    assert result.requests > 0
    assert result.requests <= len(bodies)  # wrk counts only the responses it completed in time
    assert 0 < result.p50_ms <= result.p99_ms
    assert all(body["k"] == 7 for body in bodies)
    sent = [str(body["text"]) for body in bodies]
    if unique:
        assert len(set(sent)) == len(sent)
        assert all(text.split(", photo 3-")[0] in texts for text in sent)
        # tagged() builds what the script sends (the bench times these texts in process);
        # wrk may build a request or two it never sends, so counters need not start at 1.
        expected = {tagged(texts[n % 2], 3, 1, n) for n in range(1, len(sent) + 10)}
        assert set(sent) <= expected
    else:
        assert set(sent) == set(texts)


def test_the_load_generator_gets_its_own_core() -> None:
    assert split_cores([0, 1]) == ([0], [1])
    assert split_cores([0, 1, 2, 3]) == ([0, 1, 2], [3])
    assert split_cores([5]) == ([5], [5])


def test_wrk_unpacks_without_root(tmp_path: Path) -> None:
    """The path a user without root takes: Debian's packages downloaded and unpacked into a
    folder of their own, run through a wrapper that finds the unpacked LuaJIT."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    assert apt, "this test (like scripts/redis.sh) needs a Debian or Ubuntu machine"
    assert dpkg, "this test (like scripts/redis.sh) needs a Debian or Ubuntu machine"
    wrapper = tmp_path / "wrk" / "bin" / "wrk"
    load_wrk._unpack_without_root(apt, dpkg, wrapper)
    assert load_wrk._runs(str(wrapper))
    assert str(tmp_path) in wrapper.read_text()  # the unpacked binary, not one on PATH
