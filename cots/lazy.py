"""A click group whose subcommands are imported only when they run."""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """``lazy_commands`` maps a name to ("module:attribute", one-line help); the help is listed
    without importing anything. ``deprecated_aliases`` maps an old name to its current one."""

    def __init__(
        self,
        *args: object,
        lazy_commands: dict[str, tuple[str, str]],
        deprecated_aliases: dict[str, str] | None = None,
        **kwargs: object,
    ):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_commands = lazy_commands
        # old name -> current name: still runs (with a note on stderr), never listed
        self.deprecated_aliases = deprecated_aliases or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.deprecated_aliases:
            current = self.deprecated_aliases[cmd_name]
            click.echo(
                f"Warning: '{cmd_name}' is deprecated and will be removed; use '{current}'.",
                err=True,
            )
            cmd_name = current
        if cmd_name not in self.lazy_commands:
            return None
        module_name, attribute = self.lazy_commands[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy_commands[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
