"""How the dashboard shows what a store holds: long texts cut to a preview, sizes
for people, and error types by their public names."""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["PREVIEW_CHARS", "Preview", "clip", "human_size", "preview", "public_type_name"]

#: the most characters of one text (a payload as JSON, a traceback, metadata) a page shows
PREVIEW_CHARS = 65_536


@dataclass(frozen=True, slots=True)
class Preview:
    """A text as a page shows it: at most ``PREVIEW_CHARS`` characters of it."""

    text: str
    #: whether ``text`` is only the start of the whole
    truncated: bool
    #: the whole text's size in bytes (UTF-8)
    size: int


def preview(text: str, limit: int = PREVIEW_CHARS) -> Preview:
    """The first ``limit`` characters of ``text`` (a Python string is cut between
    characters, never inside one), and the size of the whole."""
    size = len(text.encode("utf-8", "surrogatepass"))
    return Preview(text[:limit], len(text) > limit, size)


def clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def human_size(size: int) -> str:
    """A size in bytes for people: ``512 bytes``, ``64.0 KiB``, ``10.5 MiB``."""
    if size < 1024:
        return f"{size:,} byte{'' if size == 1 else 's'}"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "GiB":  # never "1,024.0 KiB"
            break
    return f"{value:,.1f} {unit}"


def public_type_name(name: str) -> str:
    """The public name of a recorded exception type: for a class defined in a private
    module (``retrybus._errors.PermanentError``), the shortest public package that
    exports that same class (``retrybus.PermanentError``). Only modules already
    imported are looked at; any other name is returned unchanged."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a loaded module
        module = ".".join(parts[:cut])
        if module in sys.modules:
            break
    else:
        return name
    package, qualname = parts[:cut], parts[cut:]
    if not any(part.startswith("_") for part in package):
        return name
    kind = _attribute(module, qualname)
    if not isinstance(kind, type):
        return name
    for end in range(1, len(package)):
        if package[end - 1].startswith("_"):
            break  # a shorter public path must not pass through a private module
        public = ".".join(package[:end])
        if public in sys.modules and _attribute(public, qualname) is kind:
            return ".".join([public, *qualname])
    return name


def _attribute(module: str, qualname: list[str]) -> object:
    """``module``'s attribute at the dotted ``qualname`` (None when it has none)."""
    found: object = sys.modules[module]
    try:
        for part in qualname:
            found = getattr(found, part)
    except Exception:  # AttributeError, or whatever a module's __getattr__ raises
        return None
    return found
