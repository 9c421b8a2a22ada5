"""Discovery and validation of rotation plugins.

Plugins are published in the ``rotator.plugins`` entry-point group, the built-ins
exactly like a third-party package. Each is validated when it is loaded (the
entry-point name equals its ``kind``, the steps are coroutine functions, an options
schema is present), so a malformed plugin fails at start-up with a
:class:`~rotator.errors.PluginLoadError` naming it, not in the middle of a rotation.

A plugin the configuration refers to must load. A broken one nothing refers to is
logged once and skipped, so one bad third-party package cannot stop the daemon.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterable, Mapping

import structlog

from rotator.errors import PluginLoadError
from rotator.plugin_api import Option

__all__ = ["ENTRY_POINT_GROUP", "STEPS", "discover_plugins", "load_plugins", "validate_plugin"]

#: The entry-point group plugins register in.
ENTRY_POINT_GROUP = "rotator.plugins"
#: The coroutine methods every plugin implements.
STEPS = ("create", "set", "test", "retire")

_log = structlog.get_logger("rotator.registry")


def validate_plugin(name: str, cls: object) -> type:
    """Return ``cls`` if it satisfies the plugin protocol under ``name``, else raise
    :class:`PluginLoadError` saying what is wrong."""
    if not isinstance(cls, type):
        raise PluginLoadError(name, f"entry point must name a class, not {type(cls).__name__}")
    where = f"{cls.__module__}.{cls.__qualname__}"
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str):
        raise PluginLoadError(name, f"{where} has no 'kind' string attribute")
    if kind != name:
        raise PluginLoadError(
            name, f"{where}.kind is {kind!r} but its entry point is named {name!r}")
    strategies = getattr(cls, "strategies", None)
    if not isinstance(strategies, frozenset) or not strategies or not all(
            isinstance(item, str) for item in strategies):
        raise PluginLoadError(
            name, f"{where}.strategies must be a non-empty frozenset of strategy names")
    schema = getattr(cls, "options_schema", None)
    if not isinstance(schema, Mapping):
        raise PluginLoadError(name, f"{where}.options_schema must be a mapping of name → Option")
    for key, option in schema.items():
        if not isinstance(key, str) or not isinstance(option, Option):
            raise PluginLoadError(
                name, f"{where}.options_schema[{key!r}] must map a string to an Option")
    for step in STEPS:
        method = getattr(cls, step, None)
        if method is None:
            raise PluginLoadError(name, f"{where} has no {step}() step")
        if not inspect.iscoroutinefunction(method):
            raise PluginLoadError(name, f"{where}.{step}() must be an async def coroutine")
    return cls


def discover_plugins() -> tuple[dict[str, type], dict[str, PluginLoadError]]:
    """Load and validate every installed plugin: (loaded by kind, errors by kind)."""
    by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(ep.name, []).append(ep)
    loaded: dict[str, type] = {}
    broken: dict[str, PluginLoadError] = {}
    for name, eps in sorted(by_name.items()):
        targets = sorted({ep.value for ep in eps})
        if len(targets) > 1:
            broken[name] = PluginLoadError(
                name, f"registered more than once, by {', '.join(targets)}")
            continue
        try:
            loaded[name] = _load(name, eps[0])
        except PluginLoadError as exc:
            broken[name] = exc
    return loaded, broken


def load_plugins(required: Iterable[str] = ()) -> dict[str, type]:
    """Plugin classes by kind.

    Every name in ``required`` must load and validate, else :class:`PluginLoadError`
    (chained to the cause). Other broken plugins are logged and left out.
    """
    loaded, broken = discover_plugins()
    wanted = set(required)
    for name in sorted(wanted):
        if name in broken:
            raise broken[name]
        if name not in loaded:
            installed = ", ".join(sorted(loaded.keys() | broken.keys())) or "none"
            raise PluginLoadError(name, f"not installed (installed: {installed})")
    for name, exc in broken.items():
        _log.warning("plugin.skipped", plugin=name, error=str(exc))
    return loaded


def _load(name: str, ep: importlib.metadata.EntryPoint) -> type:
    """Import one entry point and validate what it names; errors chained to the cause."""
    try:
        obj = ep.load()
    except ImportError as exc:
        raise PluginLoadError(name, f"cannot import {ep.value}: {exc}") from exc
    except Exception as exc:  # a plugin module may raise anything at import time
        raise PluginLoadError(
            name, f"cannot load {ep.value}: {type(exc).__name__}: {exc}") from exc
    return validate_plugin(name, obj)
