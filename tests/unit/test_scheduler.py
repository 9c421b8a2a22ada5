"""Fire-time computation: cron semantics (UTC, Sunday = 0 or 7), intervals, jitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rotator.config import SecretConfig
from rotator.scheduler import NEVER, Scheduler, cron_trigger, next_fire_time

THU = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)   # a Thursday


def cron(expr: str, jitter: float = 0.0) -> SecretConfig:
    return SecretConfig(name="a/b", plugin="random", schedule=expr, interval=None, cron=expr,
                        jitter=jitter)


def every(seconds: float, jitter: float = 0.0) -> SecretConfig:
    return SecretConfig(name="a/b", plugin="random", schedule=f"{seconds}s", interval=seconds,
                        cron=None, jitter=jitter)


@pytest.mark.parametrize(("expr", "expected"), [
    ("0 3 * * *", datetime(2026, 12, 4, 3, 0, tzinfo=UTC)),
    ("0 0 * * 0", datetime(2026, 12, 6, tzinfo=UTC)),        # Sunday, as in cron
    ("0 0 * * 7", datetime(2026, 12, 6, tzinfo=UTC)),        # 7 is Sunday too
    ("0 0 * * 1-5", datetime(2026, 12, 4, tzinfo=UTC)),      # Monday to Friday: Friday next
    ("0 0 * * 6", datetime(2026, 12, 5, tzinfo=UTC)),        # Saturday
    ("0 0 * * 5-7", datetime(2026, 12, 4, tzinfo=UTC)),      # Friday to Sunday
    ("30 12 * * thu", datetime(2026, 12, 3, 12, 30, tzinfo=UTC)),
    ("*/15 * * * *", datetime(2026, 12, 3, 12, 15, tzinfo=UTC)),
])
def test_cron_follows_crontab_semantics_in_utc(expr: str, expected: datetime) -> None:
    """Cron expressions fire when crontab would, in UTC, with crontab's weekday numbers."""
    assert next_fire_time(cron(expr), THU) == expected


def test_next_fire_time_is_strictly_after_now() -> None:
    """A cron time equal to now is not returned again (no double rotation)."""
    assert next_fire_time(cron("0 12 * * *"), THU) == THU + timedelta(days=1)


def test_interval_counts_from_now() -> None:
    """An interval fires one period after now."""
    assert next_fire_time(every(90), THU) == THU + timedelta(seconds=90)


def test_jitter_delays_within_bounds() -> None:
    """Jitter adds between 0 and the configured seconds to each fire time."""
    times = {next_fire_time(every(60, jitter=30), THU) for _ in range(50)}
    assert all(THU + timedelta(seconds=60) <= t <= THU + timedelta(seconds=90) for t in times)
    assert len(times) > 1


@pytest.mark.parametrize("expr", ["0 3 * *", "0 3 * * 8", "0 3 * * 5-2", "61 * * * *"])
def test_bad_cron_is_a_value_error(expr: str) -> None:
    """Malformed expressions raise ValueError (the config loader turns it into a key path)."""
    with pytest.raises(ValueError):
        cron_trigger(expr)


def test_a_schedule_that_never_fires_is_disabled_not_fatal() -> None:
    """February 31st never comes: the secret gets no next time and nothing raises."""
    with pytest.raises(ValueError, match="never fires"):
        next_fire_time(cron("0 0 31 2 *"), THU)
    sched = Scheduler.__new__(Scheduler)
    assert sched._next_fire(cron("0 0 31 2 *"), THU) is NEVER
