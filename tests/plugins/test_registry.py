"""Plugin discovery through entry points and validation at registration."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from rotator import registry
from rotator.errors import PluginLoadError
from rotator.plugin_api import Option, RotationContext, SecretValue
from rotator.registry import load_plugins, validate_plugin
from rotator_plugins.postgres import PostgresPlugin
from rotator_plugins.random import RandomPlugin


class GoodPlugin:
    kind: ClassVar[str] = "good"
    strategies: ClassVar[frozenset[str]] = frozenset({"single-user"})
    options_schema: ClassVar[Mapping[str, Option]] = {"size": Option(type=int, default=1)}

    async def create(self, ctx: RotationContext) -> SecretValue:
        return SecretValue({"token": "x"})

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        return None

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        return None

    async def retire(self, ctx: RotationContext, old: SecretValue) -> None:
        return None


class SyncStepPlugin(GoodPlugin):
    kind = "syncstep"

    def set(self, ctx: RotationContext, new: SecretValue) -> None:  # type: ignore[override]
        return None


class NoSchemaPlugin(GoodPlugin):
    kind = "noschema"
    options_schema = None  # type: ignore[assignment]


class BadSchemaPlugin(GoodPlugin):
    kind = "badschema"
    options_schema: ClassVar[Mapping[str, Option]] = {"size": int}  # type: ignore[dict-item]


class ListStrategiesPlugin(GoodPlugin):
    kind = "liststrategies"
    strategies: ClassVar[frozenset[str]] = ["single-user"]  # type: ignore[assignment]


class NoRetirePlugin:
    kind: ClassVar[str] = "noretire"
    strategies: ClassVar[frozenset[str]] = frozenset({"single-user"})
    options_schema: ClassVar[Mapping[str, Option]] = {}

    async def create(self, ctx: RotationContext) -> SecretValue:
        return SecretValue({})

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        return None

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        return None


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """Replace the installed plugins by ``name=module:attr`` entry points."""
    eps = [importlib.metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP)
           for name, value in targets.items()]

    def entry_points(**params: Any) -> list[importlib.metadata.EntryPoint]:
        assert params == {"group": registry.ENTRY_POINT_GROUP}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def here(attr: str) -> str:
    return f"{__name__}:{attr}"


def test_builtins_load_through_entry_points() -> None:
    """The installed package registers random and postgres in the rotator.plugins group."""
    plugins = load_plugins(required=["random", "postgres"])
    assert plugins["random"] is RandomPlugin
    assert plugins["postgres"] is PostgresPlugin


def test_valid_plugin_is_returned() -> None:
    """validate_plugin returns a well-formed class unchanged."""
    assert validate_plugin("good", GoodPlugin) is GoodPlugin


@pytest.mark.parametrize(
    ("name", "cls", "problem"),
    [
        ("syncstep", SyncStepPlugin, r"set\(\) must be an async def coroutine"),
        ("other", GoodPlugin, "kind is 'good' but its entry point is named 'other'"),
        ("noschema", NoSchemaPlugin, "options_schema must be a mapping"),
        ("badschema", BadSchemaPlugin, r"options_schema\['size'\] must map"),
        ("liststrategies", ListStrategiesPlugin, "strategies must be a non-empty frozenset"),
        ("noretire", NoRetirePlugin, r"has no retire\(\) step"),
        ("instance", GoodPlugin(), "must name a class"),
    ],
)
def test_validate_plugin_rejects_malformed(name: str, cls: object, problem: str) -> None:
    """validate_plugin raises PluginLoadError naming the plugin and what is wrong."""
    with pytest.raises(PluginLoadError, match=problem) as info:
        validate_plugin(name, cls)
    assert info.value.plugin == name
    assert f"plugin {name!r}" in str(info.value)


def test_required_but_missing_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A required plugin with no entry point is an error listing what is installed."""
    fake_entry_points(monkeypatch, good=here("GoodPlugin"),
                      random="rotator_plugins.random:RandomPlugin")
    with pytest.raises(PluginLoadError, match=r"not installed \(installed: good, random\)") as info:
        load_plugins(required=["mysql"])
    assert info.value.plugin == "mysql"


def test_unrequired_broken_plugin_is_logged_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken plugin nothing needs is left out with one warning; the rest load."""
    fake_entry_points(monkeypatch, good=here("GoodPlugin"), syncstep=here("SyncStepPlugin"),
                      ghost="no_such_module_for_rotator_tests:Plugin")
    with capture_logs() as logs:
        plugins = load_plugins(required=["good"])
    assert plugins == {"good": GoodPlugin}
    skipped = sorted((e["plugin"], e["log_level"]) for e in logs if e["event"] == "plugin.skipped")
    assert skipped == [("ghost", "warning"), ("syncstep", "warning")]
    assert any("no_such_module_for_rotator_tests" in e["error"] for e in logs)


def test_required_broken_plugin_raises_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    """A required plugin that cannot be imported raises PluginLoadError chained to its cause."""
    fake_entry_points(monkeypatch, ghost="no_such_module_for_rotator_tests:Plugin")
    with pytest.raises(PluginLoadError, match="cannot import") as info:
        load_plugins(required=["ghost"])
    assert info.value.plugin == "ghost"
    assert isinstance(info.value.__cause__, ImportError)


def test_required_invalid_plugin_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A required plugin that fails validation raises instead of being skipped."""
    fake_entry_points(monkeypatch, syncstep=here("SyncStepPlugin"))
    with pytest.raises(PluginLoadError, match="async def"):
        load_plugins(required=["syncstep"])


def test_plugin_raising_at_import_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception at import time becomes a PluginLoadError chained to it."""
    fake_entry_points(monkeypatch, boom=here("does_not_exist"))
    with pytest.raises(PluginLoadError, match="boom") as info:
        load_plugins(required=["boom"])
    assert isinstance(info.value.__cause__, AttributeError)


def test_conflicting_registrations_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packages registering the same kind with different classes is an error."""
    group = registry.ENTRY_POINT_GROUP
    eps = [importlib.metadata.EntryPoint("good", here("GoodPlugin"), group),
           importlib.metadata.EntryPoint("good", here("NoSchemaPlugin"), group)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: eps)
    with pytest.raises(PluginLoadError, match="registered more than once"):
        load_plugins(required=["good"])


def test_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without asyncpg, requiring postgres fails with the pip command to fix it."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "rotator_plugins.postgres")
    with pytest.raises(PluginLoadError) as info:
        load_plugins(required=["postgres"])
    assert "the postgres plugin needs asyncpg: pip install 'rotator[postgres]'" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
    with capture_logs() as logs:
        assert "random" in load_plugins()
    assert [e["plugin"] for e in logs if e["event"] == "plugin.skipped"] == ["postgres"]
