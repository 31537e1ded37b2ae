"""How the dashboard shows stored values: long texts cut to a preview, sizes for
people, and recorded error types by their public names."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from retrybus import PermanentError
from retrybus.dashboard._display import (
    PREVIEW_CHARS,
    clip,
    human_size,
    preview,
    public_type_name,
)


def test_a_short_text_is_shown_whole() -> None:
    shown = preview("abc")
    assert (shown.text, shown.truncated, shown.size) == ("abc", False, 3)
    exact = "x" * PREVIEW_CHARS
    assert preview(exact).text == exact
    assert not preview(exact).truncated


def test_a_long_text_is_cut_between_characters_and_its_whole_size_is_kept() -> None:
    text = "é" * (PREVIEW_CHARS + 1)  # two bytes each in UTF-8
    shown = preview(text)
    assert shown.truncated
    assert shown.text == "é" * PREVIEW_CHARS
    assert shown.size == 2 * (PREVIEW_CHARS + 1)
    shown.text.encode("utf-8")  # nothing was cut inside a character
    # a character outside the BMP (4 bytes in UTF-8) is kept or dropped whole
    assert preview("a🙂b", limit=2) == preview("a🙂c", limit=2)
    assert preview("a🙂b", limit=2).text == "a🙂"


def test_a_lone_surrogate_does_not_stop_the_size_from_being_counted() -> None:
    assert preview("\ud800").size == 3


def test_clip_says_how_much_was_left_out() -> None:
    assert clip("short") == "short"
    assert clip("abcdef", limit=4) == "abcd… (2 more characters)"


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1,023 bytes"),
        (1024, "1.0 KiB"),
        (65_536, "64.0 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),
        (10 * 1024 * 1024 + 512 * 1024, "10.5 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5000 * 1024**3, "5,000.0 GiB"),
    ],
)
def test_sizes_for_people(size: int, text: str) -> None:
    assert human_size(size) == text


# public type names ---------------------------------------------------------------------


@pytest.fixture
def fake_package() -> Iterator[type[Exception]]:
    """``shop`` exporting ``shop._impl._errors.Declined`` and ``shop._impl._errors.Outer.Inner``,
    with a public ``shop.api`` exporting ``Declined`` too; and ``shop._impl._errors.Hidden``,
    which nothing public exports."""

    class Declined(Exception):
        pass

    class Outer:
        class Inner(Exception):
            pass

    class Hidden(Exception):
        pass

    modules = {
        name: types.ModuleType(name)
        for name in ("shop", "shop.api", "shop._impl", "shop._impl._errors")
    }
    errors = modules["shop._impl._errors"]
    errors.Declined, errors.Outer, errors.Hidden = Declined, Outer, Hidden  # type: ignore[attr-defined]
    modules["shop"].Declined = modules["shop.api"].Declined = Declined  # type: ignore[attr-defined]
    modules["shop"].Outer = Outer  # type: ignore[attr-defined]
    # a different class under the same public name is not the recorded one
    modules["shop.api"].Hidden = type("Hidden", (Exception,), {})  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield Declined
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def test_an_error_type_of_a_private_module_shows_its_public_name() -> None:
    recorded = f"{PermanentError.__module__}.{PermanentError.__qualname__}"
    assert recorded == "retrybus._errors.PermanentError"  # what a worker records today
    assert public_type_name(recorded) == "retrybus.PermanentError"


def test_the_shortest_public_path_of_the_same_class_is_chosen(
    fake_package: type[Exception],
) -> None:
    assert public_type_name("shop._impl._errors.Declined") == "shop.Declined"
    assert public_type_name("shop._impl._errors.Outer.Inner") == "shop.Outer.Inner"
    # not exported publicly, or only a namesake is: unchanged
    assert public_type_name("shop._impl._errors.Hidden") == "shop._impl._errors.Hidden"


@pytest.mark.parametrize(
    "name",
    [
        "retrybus.PermanentError",  # already public: harmless
        "ValueError",
        "",
        "json.decoder.JSONDecodeError",  # a public module path is left as it is
        "not_imported._private.Error",  # a module that is not loaded is never imported
        "retrybus._errors.NoSuchError",
        "retrybus._errors.retrybus_helper.<locals>.Local",
        "retrybus._records.MAX_ERROR_CHARS",  # not a class
        "_private_top.Error",
    ],
)
def test_other_names_are_shown_unchanged(name: str) -> None:
    assert public_type_name(name) == name
    assert "not_imported" not in sys.modules
