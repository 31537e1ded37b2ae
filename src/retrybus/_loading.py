"""Loading the user's ``EventBus`` from ``module:attribute``, as uvicorn and celery
do: for the command line and the dashboard alike."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from ._bus import EventBus
from ._errors import AppNotFound

__all__ = ["load_bus"]


def load_bus(app: str, app_dir: str | None = ".") -> EventBus:
    """Import ``app`` (``"package.module:attribute"``, the attribute may be dotted)
    and return the ``EventBus`` it names.

    ``app_dir`` (default: the current directory) is put first on ``sys.path``
    so that a module beside the user is found. Raises ``AppNotFound`` with a
    one-line message when the string, the module or the attribute is wrong.

    >>> bus = load_bus("myservice.events:bus")
    """
    module_name, colon, attribute = app.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise AppNotFound(
            f"APP must look like 'module:attribute' (for example 'myservice.events:bus'), got {app!r}"
        )
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    target: object = _import(module_name, app)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppNotFound(
                f"module {module_name!r} has no attribute {attribute!r} (from APP {app!r})"
            ) from None
    if not isinstance(target, EventBus):
        raise AppNotFound(f"APP {app!r} is a {type(target).__name__}, not a retrybus.EventBus")
    return target


def _import(module_name: str, app: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise AppNotFound(
                f"cannot import module {module_name!r} (from APP {app!r}): no module named "
                f"{missing!r}; run from the directory that holds it or pass --app-dir"
            ) from None
        raise _import_failed(module_name, exc) from None
    except Exception as exc:  # the user's module failed while it was being imported
        raise _import_failed(module_name, exc) from None


def _import_failed(module_name: str, exc: BaseException) -> AppNotFound:
    return AppNotFound(
        f"importing {module_name!r} failed: {type(exc).__name__}: {exc} "
        f"(python -c 'import {module_name}' shows the traceback)"
    )
