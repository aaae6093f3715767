"""A click command whose usage line says what it accepts when click's own cannot (an argument that an option
replaces, a subcommand's words), so that --help, docs/CLI.md and the man pages (docgen.py) show the same line."""

from __future__ import annotations

from typing import Any

import click


class Command(click.Command):
    """``@main.command(cls=Command, usage_args="(DEST | --discard)")``: the arguments part of the usage line."""

    def __init__(self, *args: Any, usage_args: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_args = usage_args

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        if self.usage_args is None:
            return super().collect_usage_pieces(ctx)
        return [self.options_metavar or "", self.usage_args]
