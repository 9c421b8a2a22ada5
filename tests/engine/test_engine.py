"""The rotation state machine, driven against an in-process backend.

The backend here is a dict that can be told to hang, reject or fail: behaviours no
real server produces on demand. Real-server rotations live in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from rotator.config import (
    ApiConfig,
    BusConfig,
    Config,
    CryptoConfig,
    EngineConfig,
    LogConfig,
    SecretConfig,
    StoreConfig,
)
from rotator.crypto import Envelope, MasterKey
from rotator.engine import Engine
from rotator.errors import CandidateRejected, LeaseHeld, PermanentStepError, TransientStepError
from rotator.plugin_api import Option, RotationContext, generate_password
from rotator.store.sqlite import SQLiteStore
from rotator.types import Label, RotationState, SecretValue, Step, VersionState

NAME = "team/app/db"


@dataclass
class Backend:
    """What the fake server holds and how it should misbehave."""

    live: str | None = None
    sets: list[str] = field(default_factory=list)
    reject: int = 0              # reject this many candidates (CandidateRejected)
    transient: int = 0           # fail this many set calls transiently
    fail_test: bool = False      # test() always fails
    hang_in: str | None = None   # "set" or "test": never return
    crash_after_set: asyncio.Event | None = None  # set(), then wait forever
    leak: bool = False           # raise a bare exception containing the value


class FakePlugin:
    kind: ClassVar[str] = "fake"
    strategies: ClassVar[frozenset[str]] = frozenset({"single-user"})
    options_schema: ClassVar[dict[str, Option]] = {}

    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def create(self, ctx: RotationContext) -> SecretValue:
        return SecretValue({"username": "app", "password": generate_password(24)})

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        if self.b.hang_in == "set":
            await asyncio.sleep(3600)
        if self.b.leak:
            raise RuntimeError(f"driver said: bad password {new['password']}")
        if self.b.transient > 0:
            self.b.transient -= 1
            raise TransientStepError("connection reset")
        if self.b.reject > 0 and new != ctx.current:
            self.b.reject -= 1
            raise CandidateRejected("password does not meet the policy")
        self.b.live = new["password"]
        self.b.sets.append(new["password"])
        if self.b.crash_after_set is not None:
            self.b.crash_after_set.set()
            await asyncio.sleep(3600)

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        if self.b.hang_in == "test":
            await asyncio.sleep(3600)
        if self.b.fail_test or self.b.live != new["password"]:
            raise PermanentStepError("login with the candidate failed")

    async def retire(self, ctx: RotationContext, old: SecretValue) -> None:
        return None


def make_config(tmp: Path, **engine: Any) -> Config:
    defaults: dict[str, Any] = {"step_timeout": 2.0, "retry_base_delay": 0.01, "lease_ttl": 30.0}
    defaults.update(engine)
    return Config(
        path=tmp / "rotator.toml", store=StoreConfig(path=tmp / "r.db"),
        crypto=CryptoConfig(master_key_file=tmp / "k"), bus=BusConfig(), api=ApiConfig(),
        engine=EngineConfig(**defaults), log=LogConfig(),
        secrets=(SecretConfig(name=NAME, plugin="fake", schedule="1h", interval=3600.0,
                              cron=None),))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "r.db") as s:
        yield s


KEY = MasterKey.generate()


def engine_for(tmp: Path, store: SQLiteStore, backend: Backend, **engine: Any) -> Engine:
    return Engine(config=make_config(tmp, **engine), store=store, envelope=Envelope(KEY),
                  plugins={"fake": FakePlugin(backend)})


async def events(store: SQLiteStore) -> list[dict[str, Any]]:
    return [json.loads(r.payload) for r in await store.pending_events(1000)]


async def test_rotation_moves_labels_and_emits_one_rotated_event(tmp_path: Path,
                                                                 store: SQLiteStore) -> None:
    """Two rotations leave v2 current, v1 previous, the backend on v2, one rotated event each."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend)
    r1 = await eng.rotate(NAME)
    r2 = await eng.rotate(NAME)
    assert (r1.state, r1.version, r2.state, r2.version) == (
        RotationState.DONE, 1, RotationState.DONE, 2)
    rows = {r.version: r for r in await store.list_versions(NAME)}
    assert rows[2].labels == (Label.CURRENT,) and rows[1].labels == (Label.PREVIOUS,)
    _, value = await eng.read(NAME)
    assert backend.live == value["password"]
    evs = await events(store)
    rotated = [e for e in evs if e["type"].endswith(".rotated")]
    assert [e["data"]["version"] for e in rotated] == [1, 2]
    assert rotated[1]["data"]["previous_version"] == 1
    assert rotated[1]["subject"] == NAME
    for pw in backend.sets:
        assert all(pw not in json.dumps(e) for e in evs)


async def test_third_rotation_deprecates_the_oldest(tmp_path: Path, store: SQLiteStore) -> None:
    """After three rotations v1 is deprecated and keeps no label; nothing is deleted."""
    eng = engine_for(tmp_path, store, Backend())
    for _ in range(3):
        await eng.rotate(NAME)
    states = {r.version: (r.state, r.labels) for r in await store.list_versions(NAME)}
    assert states == {1: (VersionState.DEPRECATED, ()),
                      2: (VersionState.PREVIOUS, (Label.PREVIOUS,)),
                      3: (VersionState.CURRENT, (Label.CURRENT,))}


async def test_failed_test_rolls_back_to_current(tmp_path: Path, store: SQLiteStore) -> None:
    """A failing test restores the current value on the backend and leaves labels alone."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend)
    await eng.rotate(NAME)
    before = backend.live
    backend.fail_test = True
    result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED
    assert result.error is not None and "login with the candidate failed" in result.error
    assert backend.live == before
    row, value = await eng.read(NAME)
    assert row.version == 1 and value["password"] == before
    failed = (await store.list_versions(NAME))[-1]
    assert failed.version == 2 and failed.state is VersionState.FAILED and failed.labels == ()
    kinds = [e["type"].rsplit(".", 1)[1] for e in await events(store)]
    assert kinds[-2:] == ["rolled_back", "failed"]
    last = (await events(store))[-1]["data"]
    assert last["step"] == "test" and last["rolled_back"] is True and "login" in last["error"]


async def test_rejected_candidates_are_replaced_up_to_the_cap(tmp_path: Path,
                                                              store: SQLiteStore) -> None:
    """Two rejected candidates get fresh ones; the third is accepted and becomes current."""
    backend = Backend(reject=2)
    eng = engine_for(tmp_path, store, backend, max_candidates=3)
    result = await eng.rotate(NAME)
    assert result.state is RotationState.DONE and result.version == 3
    states = [r.state for r in await store.list_versions(NAME)]
    assert states == [VersionState.FAILED, VersionState.FAILED, VersionState.CURRENT]


async def test_rejection_cap_fails_the_rotation(tmp_path: Path, store: SQLiteStore) -> None:
    """A backend that rejects every candidate fails the rotation after max_candidates."""
    backend = Backend(reject=100)
    eng = engine_for(tmp_path, store, backend, max_candidates=2)
    result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED and backend.reject == 98
    assert "policy" in (result.error or "")


async def test_transient_errors_are_retried(tmp_path: Path, store: SQLiteStore) -> None:
    """Two transient set failures are retried and the rotation completes."""
    backend = Backend(transient=2)
    result = await engine_for(tmp_path, store, backend, max_retries=3).rotate(NAME)
    assert result.state is RotationState.DONE and backend.transient == 0


async def test_hanging_step_times_out(tmp_path: Path, store: SQLiteStore) -> None:
    """A set that never returns times out, is retried, then fails with a timeout error."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend, step_timeout=0.2, max_retries=1)
    await eng.rotate(NAME)
    backend.hang_in = "set"
    result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED and "timed out" in (result.error or "")


async def test_one_rotation_per_secret(tmp_path: Path, store: SQLiteStore) -> None:
    """A second rotate of the same secret, in-process or from another engine, gets LeaseHeld."""
    backend = Backend(hang_in="test")
    eng = engine_for(tmp_path, store, backend, step_timeout=30)
    task = asyncio.create_task(eng.rotate(NAME))
    await asyncio.sleep(0.2)
    with pytest.raises(LeaseHeld):
        await eng.rotate(NAME)
    other = engine_for(tmp_path, store, Backend())
    with pytest.raises(LeaseHeld):
        await other.rotate(NAME)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_interrupted_set_is_detected_and_resumed(tmp_path: Path,
                                                       store: SQLiteStore) -> None:
    """Cancelled right after set reached the backend, the next run probes, skips set, finishes."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend)
    await eng.rotate(NAME)
    backend.crash_after_set = asyncio.Event()
    task = asyncio.create_task(eng.rotate(NAME))
    await backend.crash_after_set.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (running,) = await store.running_rotations()
    assert (running.step, running.step_state) == (Step.SET, "started")
    backend.crash_after_set = None
    sets_before = len(backend.sets)
    result = await engine_for(tmp_path, store, backend).rotate(NAME)
    assert result.state is RotationState.DONE and result.resumed and result.version == 2
    assert len(backend.sets) == sets_before, "set was applied already; it must not run again"
    _, value = await eng.read(NAME)
    assert backend.live == value["password"]


async def test_interrupted_create_mints_a_value_once_stored(tmp_path: Path,
                                                            store: SQLiteStore) -> None:
    """A rotation cancelled inside test resumes with the stored candidate, not a new one."""
    backend = Backend(hang_in="test")
    eng = engine_for(tmp_path, store, backend, step_timeout=30)
    task = asyncio.create_task(eng.rotate(NAME))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    candidate = backend.live
    backend.hang_in = None
    result = await engine_for(tmp_path, store, backend).rotate(NAME)
    assert result.state is RotationState.DONE and result.resumed
    _, value = await eng.read(NAME)
    assert value["password"] == candidate


async def test_plugin_bug_never_leaks_the_value(tmp_path: Path, store: SQLiteStore) -> None:
    """A plugin raising a bare exception with the value in it fails cleanly; logs stay clean."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend)
    await eng.rotate(NAME)
    backend.leak = True
    with capture_logs() as logs:
        result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED and "RuntimeError" in (result.error or "")
    candidate = (await store.list_versions(NAME))[-1]
    value = SecretValue.from_bytes(Envelope(KEY).open(NAME, candidate.version, candidate.sealed))
    text = json.dumps([{k: str(v) for k, v in e.items()} for e in logs]) + json.dumps(
        await events(store)) + (result.error or "")
    assert value["password"] not in text
    assert any(e["event"] == "rotation.failed" for e in logs)


async def test_every_step_logs_one_line(tmp_path: Path, store: SQLiteStore) -> None:
    """Each step logs one line with name, version, rotation id, step and duration."""
    with capture_logs() as logs:
        result = await engine_for(tmp_path, store, Backend()).rotate(NAME)
    steps = [e for e in logs if e["event"] == "rotation.step"]
    assert [e["step"] for e in steps] == ["create", "set", "test", "finish"]
    for e in steps:
        assert e["name"] == NAME and e["rotation_id"] == result.rotation_id
        assert e["version"] == 1 and isinstance(e["took_ms"], float)


async def test_value_size_limit(tmp_path: Path, store: SQLiteStore) -> None:
    """A value above max_value_bytes fails the rotation with a clear error and no version."""
    result = await engine_for(tmp_path, store, Backend(), max_value_bytes=10).rotate(NAME)
    assert result.state is RotationState.FAILED
    assert "max_value_bytes" in (result.error or "")
    assert await store.list_versions(NAME) == []



async def test_failed_set_with_working_current_skips_rollback(tmp_path: Path,
                                                              store: SQLiteStore) -> None:
    """When set fails and the current value still works, nothing is rolled back."""
    backend = Backend()
    eng = engine_for(tmp_path, store, backend, max_candidates=1)
    await eng.rotate(NAME)
    sets_before = list(backend.sets)
    backend.reject = 1
    with capture_logs() as logs:
        result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED
    assert backend.sets == sets_before, "no set(current) when the backend never changed"
    assert any(e["event"] == "rotation.rollback_skipped" for e in logs)
    last = (await events(store))[-1]
    assert last["type"].endswith(".failed") and last["data"]["rolled_back"] is False


async def test_undecryptable_current_fails_instead_of_hanging(tmp_path: Path,
                                                             store: SQLiteStore) -> None:
    """A current version that no longer decrypts ends the rotation as failed, not running."""
    eng = engine_for(tmp_path, store, Backend())
    await eng.rotate(NAME)
    await store.db.execute("UPDATE versions SET ciphertext = zeroblob(40)")
    result = await eng.rotate(NAME)
    assert result.state is RotationState.FAILED
    assert "does not authenticate" in (result.error or "")
    assert await store.running_rotations() == []
    last = await store.last_rotation(NAME)
    assert last is not None and last.state is RotationState.FAILED and last.error


async def test_a_process_that_lost_its_lease_cannot_undo_the_new_owner(
        tmp_path: Path, store: SQLiteStore) -> None:
    """When a stalled rotation's lease is taken over, the old owner stops with LeaseHeld
    and the new owner's finished rotation stands."""
    backend = Backend()
    await engine_for(tmp_path, store, backend).rotate(NAME)
    backend.hang_in = "test"
    slow = engine_for(tmp_path, store, backend, lease_ttl=1.5, step_timeout=60)
    stalled = asyncio.create_task(slow.rotate(NAME))
    await asyncio.sleep(0.3)
    await store.db.execute("UPDATE rotations SET lease_until = 0 WHERE state = 'running'")
    backend.hang_in = None
    result = await engine_for(tmp_path, store, backend).rotate(NAME)
    assert result.state is RotationState.DONE and result.resumed and result.version == 2
    with pytest.raises(LeaseHeld):
        await asyncio.wait_for(stalled, 5)
    last = await store.last_rotation(NAME)
    assert last is not None and last.state is RotationState.DONE
    _, value = await engine_for(tmp_path, store, backend).read(NAME)
    assert backend.live == value["password"]
    kinds = [e["type"].rsplit(".", 1)[1] for e in await events(store)]
    assert kinds.count("rotated") == 2 and "failed" not in kinds


async def test_store_failure_leaves_the_rotation_resumable(tmp_path: Path, store: SQLiteStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A store error at finish keeps the rotation running (no rollback); the next run ends it."""
    from rotator.errors import StoreError

    backend = Backend()
    eng = engine_for(tmp_path, store, backend)
    await eng.rotate(NAME)
    real_finish = store.finish_rotation

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(store, "finish_rotation", broken)
    with pytest.raises(StoreError):
        await eng.rotate(NAME)
    (running,) = await store.running_rotations()
    assert running.step is Step.TEST, "test had passed; only the finish commit failed"
    live = backend.live
    monkeypatch.setattr(store, "finish_rotation", real_finish)
    result = await eng.rotate(NAME)
    assert result.state is RotationState.DONE and result.resumed and result.version == 2
    _, value = await eng.read(NAME)
    assert value["password"] == live == backend.live


async def test_daemon_adopts_a_rotation_abandoned_after_it_started(
        tmp_path: Path, store: SQLiteStore) -> None:
    """A rotation another process gave up mid-way is resumed by the running scheduler."""
    from rotator.scheduler import Scheduler

    backend = Backend()
    daemon_engine = engine_for(tmp_path, store, backend)
    await daemon_engine.rotate(NAME)
    scheduler = Scheduler(make_config(tmp_path), store, daemon_engine)
    await scheduler.plan()
    assert scheduler._reason[NAME] == "schedule"
    backend.hang_in = "test"
    cli = asyncio.create_task(engine_for(tmp_path, store, backend, step_timeout=60).rotate(NAME))
    await asyncio.sleep(0.3)
    await scheduler._adopt_abandoned()
    assert scheduler._reason[NAME] == "schedule", "a live owner's rotation is left alone"
    cli.cancel()                      # like Ctrl-C on `rotator rotate`: the lease is released
    with pytest.raises(asyncio.CancelledError):
        await cli
    await scheduler._adopt_abandoned()
    assert scheduler._reason[NAME] == "resume"
    backend.hang_in = None
    result = await daemon_engine.rotate(NAME, reason="resume")
    assert result.resumed and result.state is RotationState.DONE
