"""The compiled load generator of ``cots bench serve``: ``wrk`` with a Lua script.

A Python client on the same cores as the server measures itself (2.4-8.4 ms of CPU per
request against a server that needs about 1 ms), so the figures ``cots bench serve`` records
come from ``wrk``: found on ``PATH`` or installed from Debian's packages by the bench itself
(without root too), pinned to its own core with ``taskset`` while the server keeps the others.

Flow: ``find_wrk`` -> ``write_script`` (a Lua script whose every request posts a text no
other request in the run has posted, so a cache-miss level never hits the cache, and whose
``done`` hook prints one JSON line of counts and latency percentiles) -> ``run_wrk`` (wrk for
a fixed duration at ``concurrency`` open connections, each sending its next request as soon
as the last is answered: the same closed loop as the Python client) -> ``WrkResult``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

RESULT_MARK: Final = "COTS-WRK-RESULT "
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)


# Debian's wrk and the LuaJIT it links: what a user without root unpacks beside the bench.
WRK_PACKAGES: Final = ("wrk", "libluajit-5.1-2", "libluajit-5.1-common")


def wrk_home() -> Path:
    """Where a wrk unpacked without root lives (reused by later runs)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cots" / "wrk"


def find_wrk(install: bool = True) -> str:
    """The path of ``wrk``: ``$COTS_WRK``, else the one on ``PATH``, else one an earlier run
    unpacked; else installs Debian's package (``apt-get install`` as root, otherwise
    ``apt-get download`` + ``dpkg -x`` into :func:`wrk_home`, as ``scripts/redis.sh`` does for
    Redis). Fails naming the command that installs it when none of that works."""
    found = os.environ.get("COTS_WRK") or shutil.which("wrk")
    wrapper = wrk_home() / "bin" / "wrk"
    if found:
        return found
    if wrapper.is_file() and _runs(str(wrapper)):
        return str(wrapper)
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if install and apt and dpkg:
        if os.geteuid() == 0:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            _step([apt, "update", "-qq"], env=env)
            _step([apt, "install", "-y", "-qq", "wrk"], env=env)
            found = shutil.which("wrk")
            if found:
                return found
        else:
            _unpack_without_root(apt, dpkg, wrapper)
            if _runs(str(wrapper)):
                return str(wrapper)
    raise click.ClickException(
        "the serve benchmark needs the wrk load generator: install it "
        "(Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk), or set COTS_WRK "
        "to its path, and run again"
    )


def _step(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(
            f"installing wrk failed ({' '.join(command)}):\n{done.stderr[-1500:]}"
        )


def _runs(wrk: str) -> bool:
    # `wrk -v` prints its version and exits 1; a missing library fails before printing it.
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    return "wrk" in (done.stdout + done.stderr).lower() and "error while loading" not in (
        done.stderr
    )


def _unpack_without_root(apt: str, dpkg: str, wrapper: Path) -> None:
    home = wrapper.parent.parent
    root = home / "root"
    with tempfile.TemporaryDirectory() as downloads:
        click.echo(
            f"installing wrk into {home} (apt-get download {' '.join(WRK_PACKAGES)})", err=True
        )
        _step([apt, "download", *WRK_PACKAGES], cwd=Path(downloads))
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for deb in sorted(Path(downloads).glob("*.deb")):
            _step([dpkg, "-x", str(deb), str(root)])
    binary = root / "usr" / "bin" / "wrk"
    libraries = sorted({str(lib.parent) for lib in root.rglob("*.so*")})
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n"
        f'LD_LIBRARY_PATH="{":".join(libraries)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
        f'exec "{binary}" "$@"\n'
    )
    wrapper.chmod(0o755)


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII


def _done_hook() -> str:
    """wrk's end-of-run hook: one JSON line of counts and latency percentiles on stdout."""
    percentiles = ", ".join(str(p) for p in PERCENTILES)
    return f"""function done(summary, latency, requests)
  local out = {{}}
  for _, p in ipairs({{{percentiles}}}) do
    table.insert(out, string.format('"%s": %d', tostring(p), latency:percentile(p)))
  end
  local errors = summary.errors
  io.write(string.format(
    '{RESULT_MARK}{{"requests": %d, "duration_us": %d, "mean_us": %f, "max_us": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, '
      .. '"timeouts": %d, "percentiles_us": {{%s}}}}\\n',
    summary.requests, summary.duration, latency.mean, latency.max,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    table.concat(out, ", ")))
end
"""


def write_get_script(path: Path, request_path: str) -> Path:
    """The script of a plain GET of ``request_path`` (the /healthz floor)."""
    path.write_text(f'wrk.method = "GET"\nwrk.path = "{request_path}"\n\n{_done_hook()}')
    return path


def tagged(text: str, salt: int, thread: int, counter: int) -> str:
    """The text a unique-mode script sends: what its Lua ``request()`` builds, for whoever
    must time the same texts in process (their length sets the encoder's cost)."""
    return f"{text}, photo {salt}-{thread}-{counter}"


def write_script(
    path: Path, request_path: str, texts: list[str], k: int, salt: int, unique: bool
) -> Path:
    """The Lua script: POST ``{"text": ..., "k": k}`` to ``request_path``. With ``unique``
    each request appends a "photo SALT-THREAD-N" tag to a text of ``texts`` (never the same
    twice in a run; :func:`tagged` builds the same); without, it cycles through ``texts`` as
    they are (the cache-hit case)."""
    table = ", ".join(_lua_string(text) for text in texts)
    path.write_text(
        f"""-- written by benchmarks/load_wrk.py for cots bench serve
local texts = {{{table}}}
local threads = {{}}
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("id", thread_id)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local text = texts[(counter % #texts) + 1]
  if {"true" if unique else "false"} then
    text = text .. ", photo {salt}-" .. id .. "-" .. counter
  end
  local body = '{{"text": "' .. text .. '", "k": {k}}}'
  return wrk.format(nil, "{request_path}", nil, body)
end

{_done_hook()}"""
    )
    return path


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def qps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def parse_result(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            break
    else:
        raise click.ClickException(f"wrk printed no result:\n{output[-1500:]}")
    errors = sum(
        int(data[key])
        for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    percentiles = {float(key): value / 1000 for key, value in data["percentiles_us"].items()}
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        errors=errors,
        p50_ms=percentiles[50.0],
        p90_ms=percentiles[90.0],
        p99_ms=percentiles[99.0],
        mean_ms=data["mean_us"] / 1000,
    )


def split_cores(cores: list[int]) -> tuple[list[int], list[int]]:
    """(server cores, load-generator cores): the generator gets the last core where there are
    two or more, else both share the one."""
    if len(cores) < 2:
        return cores, cores
    return cores[:-1], cores[-1:]


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    concurrency: int,
    duration_s: float,
    cores: list[int],
    timeout_s: float = 60.0,
) -> WrkResult:
    """wrk against ``url`` for ``duration_s`` with ``concurrency`` connections, its threads
    (at most one per core it is given, never more than the connections) pinned to ``cores``."""
    threads = max(1, min(concurrency, len(cores)))
    command = ["taskset", "-c", ",".join(map(str, cores)), wrk]
    command += ["-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s"]
    command += ["--timeout", f"{timeout_s:g}s", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 120)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-1500:]
        raise click.ClickException(f"wrk failed ({done.returncode}):\n{output}")
    return parse_result(done.stdout)
