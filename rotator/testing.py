"""The conformance kit: one test suite every rotation plugin should pass.

Subclass :class:`PluginConformance` in your plugin's tests and provide two
fixtures, ``plugin`` (an instance) and ``options`` (the options a secret would be
configured with), then run pytest with pytest-asyncio in auto mode::

    from rotator.testing import PluginConformance

    class TestMyPlugin(PluginConformance):
        verifies_credentials = True     # test() logs in to a real backend

        @pytest.fixture
        def plugin(self):
            return MyPlugin()

        @pytest.fixture
        async def options(self, my_server):
            return {"admin_url": my_server.admin_url, "user": "app"}

The kit checks the step contract the engine relies on: a full rotation works,
``set``/``retire`` twice are harmless, ``test`` rejects a wrong credential, a
rollback with ``set(current)`` restores the old credential, a cancelled ``set``
can be re-run, and no log line or exception text contains a secret.

This module imports pytest; import it from tests only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest
import structlog
from structlog.testing import capture_logs

from rotator.errors import PermanentStepError, StepError
from rotator.plugin_api import RotationContext, RotationPlugin
from rotator.registry import validate_plugin
from rotator.types import SecretValue

__all__ = ["PluginConformance", "assert_no_leak", "make_context", "with_defaults"]

#: Field names treated as secret when a kit subclass does not say otherwise.
SECRET_FIELD_HINTS = ("password", "secret", "token", "key", "credential")


def with_defaults(plugin: object, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` completed with the defaults of the plugin's options schema."""
    schema = getattr(plugin, "options_schema", {})
    filled = {name: opt.default for name, opt in schema.items() if opt.default is not None}
    filled.update(options)
    return filled


def make_context(plugin: object, options: Mapping[str, Any], *, name: str = "test/secret",
                 version: int = 1, current: SecretValue | None = None) -> RotationContext:
    """A step context as the engine builds it, with a logger bound like the engine's."""
    kind = getattr(plugin, "kind", type(plugin).__name__)
    log = structlog.get_logger("rotator.plugin").bind(plugin=kind, name=name, version=version)
    return RotationContext(name=name, version=version, options=with_defaults(plugin, options),
                           current=current, log=log)


def assert_no_leak(secrets: Iterable[str], *, logs: list[MutableMapping[str, Any]],
                   errors: list[BaseException]) -> None:
    """Fail if any secret appears in a captured log event or in an error or its causes."""
    needles = [s for s in secrets if s]
    texts: list[tuple[str, str]] = [(f"log event {i}", str(ev)) for i, ev in enumerate(logs)]
    for exc in errors:
        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            texts.append((f"{type(cur).__name__}", f"{cur!s} {cur!r} {cur.args!r}"))
            cur = cur.__cause__ or cur.__context__
    for where, text in texts:
        for needle in needles:
            if needle in text:
                pytest.fail(f"a secret value appears in {where}", pytrace=False)


class PluginConformance:
    """Base class of a plugin's conformance tests; subclass it and add fixtures.

    Required fixtures: ``plugin`` (an instance) and ``options`` (a mapping).
    Optional overrides:

    ``verifies_credentials``
        True when ``test`` proves the value against a backend (a login). Adds the
        checks only a backend can answer: a created value fails ``test`` before
        ``set``, and after a rollback ``set(old)`` the newer value fails.
    ``secret_fields``
        Fields that must never be logged; by default every field whose name contains
        password, secret, token, key or credential.
    ``wrong_value(new)``
        A value ``test`` must reject. The default alters one character of each
        secret field, which a backend refuses; a plugin without a backend overrides
        it with something its shape check catches.
    """

    verifies_credentials: ClassVar[bool] = False
    secret_fields: ClassVar[frozenset[str] | None] = None
    #: Delays (seconds) after which the cancellation test cancels ``set``.
    cancel_delays: ClassVar[tuple[float, ...]] = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)

    def wrong_value(self, new: SecretValue) -> SecretValue:
        """``new`` with the last character of every secret field changed."""
        fields = new.reveal()
        for name in self._secret_fields(new):
            text = fields[name]
            if text:
                last = text[-1]
                fields[name] = text[:-1] + ("x" if last != "x" else "y")
        return SecretValue(fields)

    def _secret_fields(self, value: SecretValue) -> list[str]:
        if self.secret_fields is not None:
            return [f for f in value if f in self.secret_fields]
        return [f for f in value if any(hint in f.lower() for hint in SECRET_FIELD_HINTS)]

    def _secrets_of(self, *values: SecretValue) -> list[str]:
        return [v[f] for v in values for f in self._secret_fields(v)]

    @contextmanager
    def _no_leaks(self, values: Callable[[], list[SecretValue]]) -> Iterator[list[BaseException]]:
        """Capture logs (and the errors the body appends); check no secret shows at exit."""
        errors: list[BaseException] = []
        with capture_logs() as logs:
            yield errors
        assert_no_leak(self._secrets_of(*values()), logs=logs, errors=errors)

    async def _rotate(self, plugin: Any, options: Mapping[str, Any], version: int,
                      current: SecretValue | None = None) -> SecretValue:
        ctx = make_context(plugin, options, version=version, current=current)
        new: SecretValue = await plugin.create(ctx)
        await plugin.set(ctx, new)
        await plugin.test(ctx, new)
        return new

    # --- the tests ---------------------------------------------------------------------

    async def test_plugin_passes_registry_validation(self, plugin: Any) -> None:
        """The plugin class satisfies the protocol the registry enforces at load."""
        validate_plugin(plugin.kind, type(plugin))
        assert isinstance(plugin, RotationPlugin)

    async def test_full_rotation(self, plugin: Any, options: Mapping[str, Any]) -> None:
        """create → set → test succeeds; with a backend, the value fails test() before set()."""
        ctx = make_context(plugin, options)
        new = await plugin.create(ctx)
        assert isinstance(new, SecretValue)
        assert self._secret_fields(new), "the value has no field the kit recognises as secret"
        if self.verifies_credentials:
            with pytest.raises(PermanentStepError):
                await plugin.test(ctx, new)
        await plugin.set(ctx, new)
        await plugin.test(ctx, new)

    async def test_create_mints_a_fresh_value(self, plugin: Any,
                                              options: Mapping[str, Any]) -> None:
        """Two create calls give different secrets."""
        ctx = make_context(plugin, options)
        first, second = await plugin.create(ctx), await plugin.create(ctx)
        assert self._secrets_of(first) != self._secrets_of(second)

    async def test_set_twice_is_harmless(self, plugin: Any, options: Mapping[str, Any]) -> None:
        """Running set() twice with the same value leaves a value that passes test()."""
        ctx = make_context(plugin, options)
        new = await plugin.create(ctx)
        await plugin.set(ctx, new)
        await plugin.set(ctx, new)
        await plugin.test(ctx, new)

    async def test_retire_twice_is_harmless(self, plugin: Any,
                                            options: Mapping[str, Any]) -> None:
        """Retiring the previous value twice leaves the current one working."""
        old = await self._rotate(plugin, options, version=1)
        new = await self._rotate(plugin, options, version=2, current=old)
        ctx = make_context(plugin, options, version=2, current=new)
        await plugin.retire(ctx, old)
        await plugin.retire(ctx, old)
        await plugin.test(ctx, new)

    async def test_rejects_wrong_credential(self, plugin: Any,
                                            options: Mapping[str, Any]) -> None:
        """test() raises PermanentStepError for a wrong value, without showing it."""
        new = await self._rotate(plugin, options, version=1)
        wrong = self.wrong_value(new)
        assert wrong != new, "wrong_value() returned the value unchanged"
        with self._no_leaks(lambda: [new, wrong]) as errors:
            with pytest.raises(PermanentStepError) as info:
                await plugin.test(make_context(plugin, options), wrong)
            errors.append(info.value)

    async def test_set_current_rolls_back(self, plugin: Any, options: Mapping[str, Any]) -> None:
        """set(old) after set(new) restores old; with a backend, new then fails test()."""
        old = await self._rotate(plugin, options, version=1)
        new = await self._rotate(plugin, options, version=2, current=old)
        ctx = make_context(plugin, options, version=2, current=old)
        await plugin.set(ctx, old)
        await plugin.test(ctx, old)
        if self.verifies_credentials:
            with pytest.raises(PermanentStepError):
                await plugin.test(ctx, new)

    async def test_cancelled_set_can_be_rerun(self, plugin: Any,
                                              options: Mapping[str, Any]) -> None:
        """A set() cancelled at any point can be run again, after which test() passes."""
        interrupted = 0
        for delay in self.cancel_delays:
            ctx = make_context(plugin, options)
            new = await plugin.create(ctx)
            task = asyncio.ensure_future(plugin.set(ctx, new))
            await asyncio.sleep(delay)  # even 0 lets the step start before it is cancelled
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                interrupted += 1
            await plugin.set(ctx, new)
            await plugin.test(ctx, new)
        if self.verifies_credentials:  # a set() that does I/O must have been caught midway
            assert interrupted, "set() finished before every cancellation: widen cancel_delays"

    async def test_values_never_leak(self, plugin: Any, options: Mapping[str, Any]) -> None:
        """No log event or error text of a rotation, failure or rollback contains a secret."""
        seen: list[SecretValue] = []
        with self._no_leaks(lambda: seen) as errors:
            old = await self._rotate(plugin, options, version=1)
            seen.append(old)
            new = await self._rotate(plugin, options, version=2, current=old)
            seen.append(new)
            ctx = make_context(plugin, options, version=2, current=old)
            wrong = self.wrong_value(new)
            seen.append(wrong)
            try:
                await plugin.test(ctx, wrong)
            except StepError as exc:
                errors.append(exc)
            await plugin.set(ctx, old)
            await plugin.retire(ctx, new)
            for value in seen:
                assert repr(value) == "SecretValue('***')"
