"""APScheduler glue: fire times → ``engine.rotate(name)``.

APScheduler's triggers compute fire times (cron or interval, with jitter); the
store's ``next_rotation_at`` is the truth that survives restarts. The next fire
time is persisted *before* a rotation starts, so a crash mid-rotation never causes
a second one (the unfinished rotation is resumed instead). A due time missed
while the daemon was down gives exactly one catch-up rotation at start-up, however
many periods were missed. Nothing else in rotator imports APScheduler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from rotator.config import Config, SecretConfig
from rotator.engine import Engine, owner_is_dead
from rotator.errors import LeaseHeld, NotFound, RotatorError
from rotator.store.base import Store
from rotator.types import Label, RotationState

__all__ = ["NEVER", "Scheduler", "cron_trigger", "next_fire_time"]

log = structlog.get_logger("rotator.scheduler")

#: After a failed rotation, try again after this long at the latest.
RETRY_AFTER = timedelta(minutes=5)
#: At most this many rotations run at once.
MAX_PARALLEL = 8


_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_dow(field: str) -> str:
    """Translate a crontab day-of-week field (0 or 7 = Sunday) into APScheduler 3 names.

    APScheduler 3 numbers weekdays from Monday = 0, unlike cron; names avoid the mismatch.
    """
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for token in field.split(","):
        rng, _, step_text = token.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"bad step in day-of-week {token!r}")
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _dow_number(a), _dow_number(b)
            if hi == 0 and lo > 0:      # "5-7" / "fri-sun": 7 means Sunday at the end
                hi = 7
            if lo > hi:
                raise ValueError(f"day-of-week range {rng!r} runs backwards")
        else:
            lo = hi = _dow_number(rng)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def _dow_number(text: str) -> int:
    low = text.strip().lower()
    if low in _DOW_NAMES:
        return _DOW_NAMES.index(low)
    if not low.isdigit() or not 0 <= int(low) <= 7:
        raise ValueError(f"day-of-week {text!r} is not 0-7 or sun..sat")
    return int(low) % 7 if int(low) != 7 else 0


def cron_trigger(expr: str, jitter: float | None = None) -> CronTrigger:
    """A trigger for a standard 5-field crontab expression, in UTC. Raises ValueError."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"it has {len(fields)} field(s), not 5 (minute hour day month weekday)")
    minute, hour, day, month, dow = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_crontab_dow(dow), timezone=UTC,
                       jitter=int(jitter) if jitter else None)


def _trigger(sec: SecretConfig) -> BaseTrigger:
    if sec.interval is not None:
        return IntervalTrigger(seconds=sec.interval, jitter=int(sec.jitter) or None,
                               timezone=UTC)
    assert sec.cron is not None
    return cron_trigger(sec.cron, sec.jitter)


def next_fire_time(sec: SecretConfig, now: datetime) -> datetime:
    """The next rotation time strictly after ``now`` (UTC)."""
    trigger = _trigger(sec)
    if isinstance(trigger, IntervalTrigger):
        nxt = trigger.get_next_fire_time(now, now)
    else:
        nxt = trigger.get_next_fire_time(None, now + timedelta(microseconds=1))
    if not isinstance(nxt, datetime):
        raise ValueError(f"schedule {sec.schedule!r} never fires again")
    return nxt.astimezone(UTC)


#: "Not scheduled": far enough never to come, small enough to do arithmetic with.
NEVER = datetime(9999, 1, 1, tzinfo=UTC)


class Scheduler:
    """Decides when each configured secret rotates and asks the engine to do it."""

    def __init__(self, config: Config, store: Store, engine: Engine, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._cfg = config
        self._store = store
        self._engine = engine
        self._clock = clock
        self._next: dict[str, datetime] = {}
        self._reason: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._paused = False
        self._slots = asyncio.Semaphore(MAX_PARALLEL)

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self._tasks

    def pause(self) -> None:
        """Stop starting rotations (shutdown)."""
        self._paused = True
        self._wake.set()

    async def plan(self) -> None:
        """Load or compute every secret's next rotation; mark what is due now and why."""
        now = self._clock()
        unfinished = {r.name for r in await self._store.running_rotations()}
        for sec in self._cfg.secrets:
            row = await self._store.ensure_secret(sec.name, sec.plugin)
            if sec.name in unfinished:
                # An interrupted rotation is resumed (not repeated) as soon as we start.
                self._next[sec.name], self._reason[sec.name] = now, "resume"
                log.info("schedule.planned", name=sec.name, schedule=sec.schedule,
                         next_rotation_at=now.isoformat(), reason="resume")
                continue
            try:
                await self._store.get_version(sec.name, label=Label.CURRENT)
                has_current = True
            except NotFound:
                has_current = False
            if not has_current:
                self._next[sec.name], self._reason[sec.name] = now, "initial"
            elif row.next_rotation_at is None:
                nxt = self._next_fire(sec, now)
                await self._store.set_next_rotation(sec.name, nxt if nxt < NEVER else None)
                self._next[sec.name], self._reason[sec.name] = nxt, "schedule"
            elif row.next_rotation_at <= now:
                self._next[sec.name], self._reason[sec.name] = now, "catch_up"
                log.info("schedule.missed", name=sec.name,
                         due_at=row.next_rotation_at.isoformat(), action="one catch-up rotation")
            else:
                self._next[sec.name], self._reason[sec.name] = row.next_rotation_at, "schedule"
            log.info("schedule.planned", name=sec.name, schedule=sec.schedule,
                     next_rotation_at=self._next[sec.name].isoformat(),
                     reason=self._reason[sec.name])

    async def _adopt_abandoned(self) -> None:
        """Resume rotations another process left behind (it died, or gave its lease up)."""
        try:
            running = await self._store.running_rotations()
        except RotatorError as exc:
            log.warning("schedule.check_failed", error=f"{type(exc).__name__}: {exc}")
            return
        now, wall = self._clock(), time.time()
        for rot in running:
            if rot.name not in self._next or self._engine.is_running(rot.name):
                continue
            expired = rot.lease_until is None or rot.lease_until < wall
            if expired or (rot.owner is not None and owner_is_dead(rot.owner)):
                log.info("schedule.resume_abandoned", name=rot.name, rotation_id=rot.id,
                         previous_owner=rot.owner)
                self._next[rot.name], self._reason[rot.name] = now, "resume"

    async def run(self) -> None:
        """Start due rotations until paused or cancelled."""
        check_every = min(self._cfg.engine.lease_ttl, 30.0)
        last_check = time.monotonic()
        while not self._paused:
            if time.monotonic() - last_check >= check_every:
                last_check = time.monotonic()
                await self._adopt_abandoned()
            now = self._clock()
            for sec in self._cfg.secrets:
                if self._next[sec.name] <= now and not self._engine.is_running(sec.name):
                    await self._launch(sec, now)
            self._wake.clear()
            upcoming = [t for n, t in self._next.items() if not self._engine.is_running(n)]
            delay = min([(t - self._clock()).total_seconds() for t in upcoming]
                        + [check_every - (time.monotonic() - last_check)])
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _next_fire(self, sec: SecretConfig, now: datetime) -> datetime:
        try:
            return next_fire_time(sec, now)
        except ValueError as exc:
            log.error("schedule.disabled", name=sec.name, schedule=sec.schedule, error=str(exc))
            return NEVER

    async def _launch(self, sec: SecretConfig, now: datetime) -> None:
        reason = self._reason.get(sec.name, "schedule")
        nxt = self._next_fire(sec, now)
        # Persist the next fire time first: a crash mid-rotation must not cause a second one.
        await self._store.set_next_rotation(sec.name, nxt if nxt < NEVER else None)
        self._next[sec.name], self._reason[sec.name] = nxt, "schedule"
        task = asyncio.create_task(self._rotate(sec, reason, nxt), name=f"scheduled:{sec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rotate(self, sec: SecretConfig, reason: str, nxt: datetime) -> None:
        try:
            async with self._slots:
                try:
                    result = await self._engine.rotate(sec.name, reason=reason)
                except LeaseHeld as exc:
                    # Another process is on it; if it dies, _adopt_abandoned resumes it.
                    log.info("schedule.skipped", name=sec.name, owner=exc.owner,
                             reason="a rotation is already running")
                    return
                except RotatorError as exc:
                    log.error("schedule.rotation_error", name=sec.name,
                              error=f"{type(exc).__name__}: {exc}")
                    result = None
                except Exception as exc:  # noqa: BLE001 - one secret's bug must not stop the rest
                    log.error("schedule.rotation_error", name=sec.name,
                              error=f"unexpected {type(exc).__name__}")
                    result = None
            if result is None or result.state is RotationState.FAILED:
                retry = min(nxt, self._clock() + RETRY_AFTER)
                if retry < nxt:
                    self._next[sec.name], self._reason[sec.name] = retry, "retry"
                    await self._store.set_next_rotation(sec.name, retry)
        except RotatorError as exc:
            log.error("schedule.store_error", name=sec.name, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._wake.set()
