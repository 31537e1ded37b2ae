"""``RetrybusTyper``: a Typer app whose help shows a placeholder only where a value is typed.

Typer (0.29) puts a parameter's type in the second column of its help: ``<bool>``
beside flags such as ``--json`` and ``--help``, which take no value, and
``<str>`` or ``<list[str]>`` beside arguments its first column already names by
their metavar (``ID``). The commands and groups of a ``RetrybusTyper`` leave
those out; options that take a value keep their metavar (``URL``, ``N``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

if TYPE_CHECKING:  # for annotations only: no run-time use of Typer's private module
    from typer._click import Context, Parameter  # Typer's own Click, which its classes extend

__all__ = ["RetrybusGroup", "RetrybusTyper", "group_defaulting_to"]

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


class _NamedArgument(TyperArgument):
    """An argument whose help shows its metavar alone, without Typer's type."""

    def display_type_rich(self, ctx: Context) -> str | None:
        return None


def _without_type_placeholders(params: list[Parameter]) -> list[Parameter]:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # the help shows a metavar instead of the type: nothing
        elif type(param) is TyperArgument and param.metavar:
            # Typer builds its own TyperArgument for each parameter; this one
            # only draws its help differently
            param.__class__ = _NamedArgument
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Context) -> list[Parameter]:
        return _without_type_placeholders(super().get_params(ctx))


class RetrybusGroup(TyperGroup):
    """A group whose help shows no type placeholders (the base of every retrybus group)."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _without_type_placeholders(super().get_params(ctx))


def group_defaulting_to(command: str) -> type[RetrybusGroup]:
    """A group whose first argument, unless it names one of its commands (or asks
    for help), goes to its ``command``: ``retrybus services --json billing`` is
    ``retrybus services show --json billing``."""

    class DefaultingGroup(RetrybusGroup):
        def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
            if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
                args = [command, *args]
            return super().parse_args(ctx, args)

    return DefaultingGroup


class RetrybusTyper(typer.Typer):
    """A ``typer.Typer`` whose commands' and groups' help shows no type beside
    flags (``--json``, not ``--json <bool>``) or named arguments (``ID``)."""

    def __init__(self, *, cls: type[TyperGroup] | None = None, **settings: Any) -> None:
        super().__init__(cls=cls or RetrybusGroup, **settings)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **settings: Any
    ) -> Callable[[CommandFunction], CommandFunction]:
        """As ``typer.Typer.command``, the command made by default a ``RetrybusTyper`` one."""
        return super().command(name, cls=cls or _Command, **settings)
