"""The ``cots`` command.

Subcommands live in the package that owns them and are imported only when they run, so
``cots serve`` and ``cots index`` never import torch, and ``cots --help`` imports nothing heavy.
"""

from __future__ import annotations

import importlib
import logging
from typing import Final

import click

from cots import __version__

# name -> ("module:attribute", one-line help). The help is kept here so listing the commands
# does not import them.
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "data": ("model.data.cli:data", "Synthesise, convert and inspect corpora."),
    "demo": ("cots.demo:demo", "Run the end-to-end demo on the embedded synthetic corpus."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cots")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """COTS Search: cross-modal retrieval of images and video moments by text, and back.

    Run `cots COMMAND --help` for the options of each command.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="cots")


if __name__ == "__main__":
    main()
