"""``main()``, the ``retrybus`` console script's entry point, and ``app``, the Typer app.

``retrybus worker`` goes straight to the worker's own option parser without
importing Typer: Typer converts options through pydantic, and the two would
take a third of the worker's memory. Every other command runs the Typer app
(``retrybus._cli.commands``), which is imported on first use of ``app``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

__all__ = ["main"]  # and `app`, imported on first use


def main() -> None:
    """Run the ``retrybus`` command line."""
    argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        from .worker import main as worker_main

        sys.exit(worker_main(argv[1:]))
    from .commands import app

    app(prog_name="retrybus")


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
