"""What every ``butter`` subcommand module shares: the consoles, the store option, the one-line failure."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from butter_pipeline.errors import ButterError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[str, typer.Option("--store", help="A folder or s3://bucket/prefix.")]


def fail(error: ButterError) -> NoReturn:
    """Print ``error`` as one line on stderr and exit with status 2 (bad input, never a traceback)."""
    err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
