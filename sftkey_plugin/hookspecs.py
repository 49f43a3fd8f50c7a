"""The pluggy hook through which key-span finders are registered, and the manager that loads them.

A finder is a callable ``finder(text, *, example=None, **options) -> list[(start, end)]`` returning the
character spans of the key answer inside a completion text (``[]`` when there is none). Third-party
packages add finders by exposing a module or object with a ``@hookimpl``-decorated ``sftkey_finders``
function under the entry-point group ``sftkey_plugin.finders``::

    [project.entry-points."sftkey_plugin.finders"]
    my_finders = "my_package.finders"

The built-in finders are registered through the same group (see this project's ``pyproject.toml``).

A finder that sees answer statements it cannot tell apart (two different answers, or an answer and a remark about
it) raises ``AmbiguousAnswer`` rather than guess: the example gets no key span, is counted as ambiguous (a kind of
missing, handled by ``sftkey_on_missing``), and ``auto`` tries no later finder.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any, cast

import pluggy

PROJECT_NAME = "sftkey_plugin"
ENTRY_POINT_GROUP = "sftkey_plugin.finders"

Span = tuple[int, int]
Finder = Callable[..., list[Span]]

AMBIGUOUS = "ambiguous"  # the finder value recorded for an example whose finder raised AmbiguousAnswer

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class AmbiguousAnswer(ValueError):
    """Raised by a finder whose text states answers it cannot tell apart: no key, counted as ambiguous."""


class FinderSpec:
    """Hook specifications for key-span finder plugins."""

    @hookspec
    def sftkey_finders(self) -> Mapping[str, Finder]:  # type: ignore[empty-body]
        """Return the finders this plugin provides, by name (names must be unique across plugins)."""


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every ``sftkey_plugin.finders`` entry point loaded."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(FinderSpec)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    builtin = importlib.import_module("sftkey_plugin.finders")
    if not manager.is_registered(builtin):
        # A source checkout that was never pip-installed has no entry points; the built-ins must still work.
        manager.register(builtin, name="builtin")
    return manager


@functools.lru_cache(maxsize=1)
def registered_finders() -> dict[str, Finder]:
    """All finders from all plugins, by name; a name offered twice is an error."""
    finders: dict[str, Finder] = {}
    owners: dict[str, Any] = {}
    manager = get_plugin_manager()
    for impl in manager.hook.sftkey_finders.get_hookimpls():
        offered = cast(Mapping[str, Finder], impl.function())
        for name, finder in offered.items():
            if name in finders:
                raise ValueError(
                    f"Key-span finder {name!r} is registered twice: by {owners[name]!r} and {impl.plugin_name!r}."
                )
            finders[name] = finder
            owners[name] = impl.plugin_name
    return finders


def get_finder(name: str) -> Finder:
    """The finder registered under ``name``, or a ``ValueError`` listing the known names."""
    finders = registered_finders()
    if name not in finders:
        known = ", ".join(sorted([*finders, "auto"]))
        raise ValueError(
            f"Unknown sftkey_finder {name!r}. Known finders: {known}. Third-party finders are loaded from the "
            f"entry-point group {ENTRY_POINT_GROUP!r}."
        )
    return finders[name]
