"""Print the pip requirements of pyproject.toml's extras, one per line, for the Dockerfile.

The images install their dependencies from this list before the project's source is copied in,
so a code change does not re-install them (layer caching). ``--variant gpu`` swaps the CPU
runtime packages (onnxruntime, faiss-cpu) for those of the ``gpu`` extra, which install the same
modules and cannot sit beside them.

    python requirements.py pyproject.toml serving [training ...] [--variant cpu|gpu]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# The name and extras of a requirement. A regex, not `packaging`: this runs in the fresh venv of
# the image build, before anything but pip (whose vendored copy is private) is installed.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?")
_CPU_RUNTIMES = {"onnxruntime", "faiss-cpu"}


def _name(requirement: str) -> tuple[str, list[str]]:
    match = _NAME.match(requirement)
    if match is None:
        raise SystemExit(f"cannot parse requirement {requirement!r}")
    extras = [extra.strip() for extra in (match.group(3) or "").split(",") if extra.strip()]
    return match.group(1).lower().replace("_", "-"), extras


def requirements(pyproject: dict, extras: list[str], variant: str) -> list[str]:
    project = pyproject["project"]
    own_name = project["name"].lower()
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    wanted = list(project.get("dependencies", []))
    seen: set[str] = set()
    pending = list(extras) + (["gpu"] if variant == "gpu" else [])
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for requirement in optional[extra]:
            name, nested = _name(requirement)
            if name == own_name:  # "cots-search[serving]": another extra of this project
                pending.extend(nested)
            else:
                wanted.append(requirement)
    if variant == "gpu":
        wanted = [r for r in wanted if _name(r)[0] not in _CPU_RUNTIMES]
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(args.pyproject.read_text())
    for line in requirements(pyproject, args.extras, args.variant):
        sys.stdout.write(f"{line}\n")


if __name__ == "__main__":
    main()
