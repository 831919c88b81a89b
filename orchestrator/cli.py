"""The ``pianoforge`` command line. Each command is a thin layer over a library function."""

from __future__ import annotations

from importlib.metadata import version as _version
from typing import Optional

import typer

app = typer.Typer(
    name="pianoforge",
    help="Train robot pianists at scale: specialists per song chunk, a trajectory lake, a generalist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
manifest_app = typer.Typer(help="Song manifests: check what a manifest will train.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"pianoforge {_version('pianoforge')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_cb, is_eager=True, help="Print the version."),
) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
