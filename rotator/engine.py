"""The rotation state machine: leases, steps, timeouts, retries, rollback.

A rotation is a row in the store that moves through ``create → set → test →
finish``. Each step is marked *started* before its side effect; the next step's
start (or the finish transaction) records that it is done. So after a crash the
engine knows exactly which side effects may have happened:

* ``create`` is done once the candidate is stored encrypted (before the backend
  is touched); a crash before that mints a new candidate, which is harmless.
* ``set`` started but not done: the engine does not guess. It probes the backend
  with ``test(candidate)``; if the candidate already works, ``set`` reached the
  server, otherwise ``set`` is re-applied (it is idempotent).
* ``test`` / ``finish`` are re-run; ``finish`` is one store transaction.
* ``rollback`` started: ``set(current)`` is re-applied, then the rotation fails.

A failed ``test`` (or ``set``) rolls the backend back to the current value and
leaves the ``current`` label unchanged. A backend that rejects a candidate for
good (:class:`CandidateRejected`) gets a fresh one, up to ``max_candidates``.
One rotation per secret at a time: in-process by a registry of running tasks,
across processes by a lease row in the store.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from rotator.config import Config, SecretConfig, SecretRef
from rotator.crypto import Envelope
from rotator.errors import (
    CandidateRejected,
    CryptoError,
    LeaseHeld,
    NotFound,
    PermanentStepError,
    RotatorError,
    StepError,
    StepTimeout,
    TransientStepError,
    ValueTooLarge,
)
from rotator.events import Event, EventKind
from rotator.plugin_api import RotationContext, RotationPlugin
from rotator.store.base import RotationRow, Store, VersionRow
from rotator.types import Label, RotationState, SecretValue, Step, StepState

__all__ = ["Engine", "RotationResult", "owner_id"]

T = TypeVar("T")

_ORDER = {Step.CREATE: 0, Step.SET: 1, Step.TEST: 2, Step.FINISH: 3, Step.ROLLBACK: 4}


def owner_id() -> str:
    """This process's lease owner id: host, pid and a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _needs(rot: RotationRow, step: Step) -> bool:
    """Whether ``step`` still has to run (its side effect may not have happened)."""
    at = _ORDER[rot.step]
    return at < _ORDER[step] or (rot.step is step and rot.step_state is StepState.STARTED)


#: Value fields that locate a credential rather than being one (the familiar database
#: field names). Masking them would turn "cannot connect to db:5432/app" into
#: "***:***/***" and even hide the plugin name "postgres" behind the ``engine`` field.
_LOCATOR_FIELDS = frozenset({"engine", "host", "port", "dbname", "username"})


def _scrub(text: str, *values: SecretValue | None) -> str:
    """Mask any credential field of the given values that a misbehaving plugin put in a
    message (every field except the locators in :data:`_LOCATOR_FIELDS`)."""
    for value in values:
        if value is None:
            continue
        for key, field_value in value.reveal().items():
            if key in _LOCATOR_FIELDS:
                continue
            if len(field_value) >= 4:
                text = text.replace(field_value, "***")
    return text


@dataclass(frozen=True, slots=True)
class RotationResult:
    """How a rotation ended."""

    rotation_id: str
    name: str
    state: RotationState
    version: int | None
    resumed: bool
    error: str | None = None


class Engine:
    """Runs rotations. Knows nothing of NATS, APScheduler or HTTP."""

    def __init__(self, *, config: Config, store: Store, envelope: Envelope,
                 plugins: Mapping[str, RotationPlugin],
                 on_event: Callable[[], None] | None = None,
                 log: FilteringBoundLogger | None = None) -> None:
        self._cfg = config
        self._ecfg = config.engine
        self._store = store
        self._envelope = envelope
        self._plugins = plugins
        self._on_event = on_event or (lambda: None)
        self._log: FilteringBoundLogger = log or structlog.get_logger("rotator.engine")
        self.owner = owner_id()
        self._running: dict[str, asyncio.Task[RotationResult]] = {}

    # -- public --------------------------------------------------------------

    def is_running(self, name: str) -> bool:
        return name in self._running

    def running(self) -> list[str]:
        return sorted(self._running)

    async def rotate(self, name: str, *, reason: str = "manual") -> RotationResult:
        """Rotate ``name`` now (or resume its unfinished rotation) and wait for the outcome.

        Raises :class:`LeaseHeld` when a rotation of this secret is already running,
        here or in another process.
        """
        sec = self._secret_config(name)
        if name in self._running:
            raise LeaseHeld(name, "this process")
        task = asyncio.create_task(self._rotate(sec, reason), name=f"rotate:{name}")
        self._running[name] = task
        task.add_done_callback(lambda _t: self._running.pop(name, None))
        return await task

    async def resume_unfinished(self) -> list[RotationResult]:
        """Resume every rotation left running by a process that died (called at start-up)."""
        results = []
        for rot in await self._store.running_rotations():
            if not self._cfg.has_secret(rot.name):
                self._log.warning("rotation.orphaned", name=rot.name, rotation_id=rot.id,
                                  hint="the secret is no longer in the config")
                continue
            try:
                results.append(await self.rotate(rot.name, reason=rot.reason))
            except LeaseHeld as exc:
                self._log.info("rotation.resume_skipped", name=rot.name, owner=exc.owner)
        return results

    async def read(self, name: str, *, version: int | None = None,
                   label: Label | None = None) -> tuple[VersionRow, SecretValue]:
        """Decrypt one stored version (default: the ``current`` label)."""
        row = await self._store.get_version(name, version=version, label=label)
        return row, self._open(row)

    # -- the state machine ---------------------------------------------------

    def _secret_config(self, name: str) -> SecretConfig:
        try:
            return self._cfg.secret(name)
        except KeyError:
            raise NotFound(f"{name}: no such secret in the configuration") from None

    def _open(self, row: VersionRow) -> SecretValue:
        return SecretValue.from_bytes(self._envelope.open(row.name, row.version, row.sealed))

    async def _current(self, name: str) -> tuple[int, SecretValue] | None:
        try:
            row, value = await self.read(name, label=Label.CURRENT)
        except NotFound:
            return None
        return row.version, value

    async def _rotate(self, sec: SecretConfig, reason: str) -> RotationResult:
        await self._store.ensure_secret(sec.name, sec.plugin)
        plugin = self._plugins[sec.plugin]
        try:
            rot, resumed = await self._store.claim_rotation(
                name=sec.name, rotation_id=str(uuid.uuid4()), reason=reason, owner=self.owner,
                lease_ttl=self._ecfg.lease_ttl, owner_is_dead=owner_is_dead,
                started_event=lambda r: Event(kind=EventKind.STARTED, name=r.name, data={
                    "rotation_id": r.id, "reason": r.reason, "previous_version": r.from_version,
                    "plugin": sec.plugin, "started_at": r.started_at.isoformat()}))
        except asyncio.CancelledError:
            # The claim may have committed before the cancellation reached us.
            await self._release(sec.name)
            raise
        self._on_event()
        log = self._log.bind(name=sec.name, rotation_id=rot.id, plugin=sec.plugin)
        log.info("rotation.resumed" if resumed else "rotation.started", reason=rot.reason,
                 step=str(rot.step), step_state=str(rot.step_state))
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(rot, asyncio.current_task(), lost))
        try:
            try:
                # Read under the lease: ``current`` cannot change until this rotation ends.
                current = await self._current(sec.name)
            except CryptoError as exc:
                return await self._fail_unreadable(rot, sec, exc, resumed, log)
            return await self._drive(rot, sec, plugin, current, resumed, log)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if lost.is_set() and task is not None:
                # Cancelled by our own lease keeper, not by the caller: say so.
                task.uncancel()
                raise LeaseHeld(sec.name, "another process (this one lost its lease)") from None
            # Leave the rotation resumable; let the next process take it over at once.
            log.warning("rotation.interrupted", hint="it resumes on the next start or "
                                                     "`rotator rotate`")
            await self._release(sec.name)
            raise
        except LeaseHeld:
            log.warning("rotation.lease_lost", hint="another process took this rotation over; "
                                                    "this one stops without touching it")
            raise
        except RotatorError as exc:
            # The store failed (busy, disk full, I/O): the rotation stays running and resumes.
            log.warning("rotation.interrupted", error=f"{type(exc).__name__}: {exc}",
                        hint="it resumes on the next start or `rotator rotate`")
            await self._release(sec.name)
            raise
        finally:
            keeper.cancel()

    async def _fail_unreadable(self, rot: RotationRow, sec: SecretConfig, exc: CryptoError,
                               resumed: bool, log: FilteringBoundLogger) -> RotationResult:
        """The current value does not decrypt (wrong master key, tampered row): no rotation
        can succeed or roll back until an operator fixes that, so fail it now, loudly."""
        error = f"the current value of {sec.name} cannot be read: {exc}"
        return await self._record_failure(rot, sec, error, str(rot.step), [], resumed, log)

    async def _record_failure(self, rot: RotationRow, sec: SecretConfig, error: str, step: str,
                              events: list[Event], resumed: bool,
                              log: FilteringBoundLogger) -> RotationResult:
        """End the rotation as failed, with ``events`` and then the ``failed`` event."""
        rolled_back = any(ev.kind is EventKind.ROLLED_BACK for ev in events)
        events = [*events, Event(kind=EventKind.FAILED, name=sec.name, data={
            "version": rot.version, "previous_version": rot.from_version, "rotation_id": rot.id,
            "reason": rot.reason, "plugin": sec.plugin, "step": step, "error": error,
            "rolled_back": rolled_back, "started_at": rot.started_at.isoformat(),
            "failed_at": datetime.now(UTC).isoformat()})]
        await self._store.fail_rotation(rot.id, sec.name, error, events, owner=self.owner)
        self._on_event()
        log.error("rotation.failed", step=step, version=rot.version, error=error,
                  rolled_back=rolled_back)
        return RotationResult(rot.id, sec.name, RotationState.FAILED, rot.version, resumed, error)

    async def _release(self, name: str) -> None:
        """Give up our lease on ``name`` (short, shielded budget; best effort)."""
        try:
            async with asyncio.timeout(2):
                await asyncio.shield(self._store.release_lease(name, self.owner))
        except (TimeoutError, RotatorError, asyncio.CancelledError):
            pass

    async def _keep_lease(self, rot: RotationRow, worker: asyncio.Task[Any] | None,
                          lost: asyncio.Event) -> None:
        period = max(self._ecfg.lease_ttl / 3, 0.5)
        while True:
            await asyncio.sleep(period)
            try:
                await self._store.renew_lease(rot.id, self.owner, self._ecfg.lease_ttl)
            except LeaseHeld:
                self._log.error("rotation.lease_lost", name=rot.name, rotation_id=rot.id)
                lost.set()
                if worker is not None:
                    worker.cancel()
                return
            except RotatorError as exc:
                self._log.warning("rotation.lease_renew_failed", name=rot.name,
                                  error=type(exc).__name__)

    async def _resolve_options(self, sec: SecretConfig) -> dict[str, Any]:
        resolved: dict[str, Any] = {}
        for key, val in sec.options.items():
            if isinstance(val, SecretRef):
                try:
                    _, ref_value = await self.read(val.name, label=Label.CURRENT)
                except NotFound:
                    raise PermanentStepError(
                        f"options.{key}: referenced secret {val.name!r} has no current version"
                    ) from None
                if val.field not in ref_value:
                    raise PermanentStepError(
                        f"options.{key}: referenced secret {val.name!r} has no field {val.field!r}")
                resolved[key] = ref_value[val.field]
            else:
                resolved[key] = val
        return resolved

    async def _drive(self, rot: RotationRow, sec: SecretConfig, plugin: RotationPlugin,
                     current_pair: tuple[int, SecretValue] | None, resumed: bool,
                     log: FilteringBoundLogger) -> RotationResult:
        current = current_pair[1] if current_pair else None
        options: dict[str, Any] = {}
        pending: SecretValue | None = None

        def ctx(version: int) -> RotationContext:
            return RotationContext(name=sec.name, version=version, options=options,
                                   current=current, rotation_id=rot.id,
                                   log=log.bind(version=version))

        try:
            options = await self._resolve_options(sec)
            if rot.step is Step.ROLLBACK:
                raise PermanentStepError(rot.error or "rotation was rolling back when interrupted",
                                         plugin=sec.plugin, name=sec.name, step=str(Step.ROLLBACK))
            while True:
                if rot.version is None:
                    rot = await self._create(rot, sec, plugin, ctx, log)
                assert rot.version is not None
                version = rot.version
                pending = self._open(await self._store.get_version(sec.name, version=version))

                if _needs(rot, Step.SET):
                    applied = False
                    if rot.step is Step.SET and rot.step_state is StepState.STARTED:
                        applied = await self._probe(plugin, ctx(version), pending, log)
                    if not applied:
                        rot = await self._store.mark_step(rot.id, Step.SET, StepState.STARTED,
                                                          owner=self.owner)
                        try:
                            await self._call(rot, sec, Step.SET, log, version,
                                             partial(plugin.set, ctx(version), pending),
                                             hide=(pending, current))
                        except CandidateRejected as err:
                            if rot.candidates >= self._ecfg.max_candidates:
                                raise
                            log.warning("rotation.candidate_rejected", version=version,
                                        attempt=rot.candidates, error=_scrub(str(err), pending))
                            rot = await self._store.reject_candidate(
                                rot.id, sec.name, version, _scrub(str(err), pending),
                                owner=self.owner)
                            continue
                    else:
                        rot = await self._store.mark_step(rot.id, Step.SET, StepState.DONE,
                                                          "probe: already applied",
                                                          owner=self.owner)
                # Marking "test started" also records that set is done: one commit, not two.
                if _needs(rot, Step.TEST):
                    rot = await self._store.mark_step(rot.id, Step.TEST, StepState.STARTED,
                                                      owner=self.owner)
                    await self._call(rot, sec, Step.TEST, log, version,
                                     partial(plugin.test, ctx(version), pending),
                                     hide=(pending, current))
                break

            # finish is one transaction: a crash before it re-runs test (idempotent).
            t0 = time.monotonic()
            finished = datetime.now(UTC)
            await self._store.finish_rotation(rot.id, sec.name, version, [Event(
                kind=EventKind.ROTATED, name=sec.name, data={
                    "version": version, "previous_version": rot.from_version,
                    "rotation_id": rot.id, "reason": rot.reason, "plugin": sec.plugin,
                    "started_at": rot.started_at.isoformat(), "finished_at": finished.isoformat(),
                })], owner=self.owner)
            self._on_event()
            log.info("rotation.step", step=str(Step.FINISH), version=version, outcome="done",
                     took_ms=round((time.monotonic() - t0) * 1000, 1))
            log.info("rotation.done", version=version, previous_version=rot.from_version,
                     took_ms=round((finished - rot.started_at).total_seconds() * 1000, 1))
            return RotationResult(rot.id, sec.name, RotationState.DONE, version, resumed)
        except (StepError, ValueTooLarge) as err:
            return await self._fail(rot, sec, plugin, ctx, current, pending, err, resumed, log)

    async def _create(self, rot: RotationRow, sec: SecretConfig, plugin: RotationPlugin,
                      ctx: Callable[[int], RotationContext],
                      log: FilteringBoundLogger) -> RotationRow:
        # The rotation is at "create started" already (claimed, or a candidate was rejected).
        version = await self._store.next_version_number(sec.name)
        value = await self._call(rot, sec, Step.CREATE, log, version,
                                 lambda: plugin.create(ctx(version)))
        if not isinstance(value, SecretValue):
            raise PermanentStepError(
                f"create() returned {type(value).__name__}, expected SecretValue",
                plugin=sec.plugin, name=sec.name, step=str(Step.CREATE))
        data = value.to_bytes()
        if len(data) > self._ecfg.max_value_bytes:
            raise ValueTooLarge(f"{sec.name}: the new value is {len(data)} bytes, above "
                                f"engine.max_value_bytes = {self._ecfg.max_value_bytes}")
        sealed = self._envelope.seal(sec.name, version, data)
        return await self._store.put_candidate(rot.id, sec.name, version, sealed,
                                               owner=self.owner)

    async def _probe(self, plugin: RotationPlugin, ctx: RotationContext, value: SecretValue,
                     log: FilteringBoundLogger) -> bool:
        """Does the backend accept ``value`` right now? Used instead of guessing whether an
        interrupted or failed ``set`` reached the backend."""
        try:
            async with asyncio.timeout(self._ecfg.step_timeout):
                await plugin.test(ctx, value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "does not work (yet)"
            log.info("rotation.probe", version=ctx.version, works=False,
                     detail=type(exc).__name__)
            return False
        log.info("rotation.probe", version=ctx.version, works=True)
        return True

    async def _call(self, rot: RotationRow, sec: SecretConfig, step: Step,
                    log: FilteringBoundLogger, version: int,
                    fn: Callable[[], Awaitable[T]],
                    hide: tuple[SecretValue | None, ...] = ()) -> T:
        """Run one plugin step with a timeout, retrying transient failures with backoff.

        ``hide``: values whose fields are masked in logged error messages.
        """
        attempt = 0
        while True:
            t0 = time.monotonic()
            err: StepError
            try:
                async with asyncio.timeout(self._ecfg.step_timeout):
                    result = await fn()
            except StepError as exc:
                err = exc
            except TimeoutError as exc:
                err = StepTimeout(f"step timed out after {self._ecfg.step_timeout:g}s")
                err.__cause__ = exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin bug must fail the rotation cleanly
                err = PermanentStepError(
                    f"plugin raised {type(exc).__name__} (a bug in the plugin: it should raise "
                    "a StepError)")
                err.__cause__ = exc
            else:
                log.info("rotation.step", step=str(step), version=version, outcome="done",
                         attempt=attempt + 1,
                         took_ms=round((time.monotonic() - t0) * 1000, 1))
                return result
            err.bind(plugin=sec.plugin, name=sec.name, step=str(step))
            took = round((time.monotonic() - t0) * 1000, 1)
            if isinstance(err, TransientStepError) and attempt < self._ecfg.max_retries:
                delay = random.uniform(0, self._ecfg.retry_base_delay * (2 ** attempt))
                log.warning("rotation.step", step=str(step), version=version, outcome="retry",
                            attempt=attempt + 1, took_ms=took, retry_in_s=round(delay, 2),
                            error=_scrub(err.message, *hide))
                await asyncio.sleep(delay)
                attempt += 1
                continue
            log.warning("rotation.step", step=str(step), version=version, outcome="failed",
                        attempt=attempt + 1, took_ms=took, error=_scrub(err.message, *hide),
                        error_type=type(err).__name__)
            raise err

    async def _fail(self, rot: RotationRow, sec: SecretConfig, plugin: RotationPlugin,
                    ctx: Callable[[int], RotationContext], current: SecretValue | None,
                    pending: SecretValue | None, err: RotatorError, resumed: bool,
                    log: FilteringBoundLogger) -> RotationResult:
        error = _scrub(str(err), pending, current)
        failed_step = getattr(err, "step", "") or str(rot.step)
        events: list[Event] = []
        # The backend may hold the candidate once ``set`` has started: put ``current`` back,
        # unless ``set`` failed and the backend demonstrably still accepts ``current``.
        needs_rollback = _ORDER[rot.step] >= _ORDER[Step.SET] and current is not None
        if needs_rollback and rot.step is Step.SET and current is not None \
                and await self._probe(plugin, ctx(rot.from_version or 0), current, log):
            log.info("rotation.rollback_skipped", reason="set failed and the current value "
                                                         "still works")
            needs_rollback = False
        if needs_rollback and current is not None:
            rot = await self._store.mark_step(rot.id, Step.ROLLBACK, StepState.STARTED,
                                              error=error, owner=self.owner)
            back_version = rot.from_version or 0
            try:
                await self._call(rot, sec, Step.ROLLBACK, log, back_version,
                                 lambda: plugin.set(ctx(back_version), current),
                                 hide=(pending, current))
            except StepError as rb_err:
                error = f"{error}; rollback failed: {_scrub(str(rb_err), pending, current)}"
                log.error("rotation.rollback_failed", error=error,
                          hint="the backend may hold the failed candidate; it stays stored "
                               "(state failed) for recovery")
            else:
                rot = await self._store.mark_step(rot.id, Step.ROLLBACK, StepState.DONE,
                                                  owner=self.owner)
                events.append(Event(kind=EventKind.ROLLED_BACK, name=sec.name, data={
                    "version": rot.version, "restored_version": rot.from_version,
                    "rotation_id": rot.id, "reason": rot.reason, "error": error}))
        return await self._record_failure(rot, sec, error, failed_step, events, resumed, log)
