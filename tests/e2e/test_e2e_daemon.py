"""``rotator run`` as a real background process: schedules, SIGTERM, NATS outages, catch-up."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from e2e.helpers import (
    Bus,
    Role,
    Workdir,
    by_version,
    check_cloudevent,
    consume,
    find_leaks,
    labelled,
    leaked_in,
    parse_time,
    pg_secret,
    secret,
    wait_until,
)
from servers import NatsServer, PostgresCluster

NAME = "svc/orders/db"
KEY = "svc/orders/api-key"


async def test_daemon_rotates_on_an_interval_and_stops_cleanly_on_sigterm(
        pg_work: Workdir, private_pg: PostgresCluster, role: Role, bus: Bus) -> None:
    """With a 2 s schedule the daemon rotates again and again, exits 0 soon after SIGTERM,
    and neither its log nor its files hold any generated password."""
    pg_work.config([pg_secret(NAME, role.name, schedule="2s")], bus=bus)
    pg_work.run("init").ok()
    daemon = pg_work.start()
    try:
        t0 = time.monotonic()
        seen: set[int] = set()

        def rotated_three_times() -> bool:
            current = pg_work.status()["secrets"][0]["current_version"]
            if current is not None:
                seen.add(current)
            return current is not None and current >= 3

        wait_until(rotated_three_times, 12, "three rotations", alive=daemon, every=0.3)
        assert time.monotonic() - t0 < 12
        assert len(seen) >= 2, f"status showed versions {sorted(seen)}"
        # The -wal and -shm files exist only while the store is open: keep a copy to scan.
        live = shutil.copytree(pg_work.var, pg_work.path / "var-while-running")
    finally:
        code, took = daemon.terminate(timeout=10)
    assert code == 0, daemon.log()
    assert took < 10
    assert (live / "rotator.db-wal").exists()
    log = daemon.log()
    assert "daemon.stopped" in log
    assert log.count("rotation.done") >= 3
    assert "Traceback" not in log

    rows = pg_work.versions(NAME)
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["state"] in ("current", "previous", "deprecated") for r in rows), rows
    values = [pg_work.value(NAME, r["version"]) for r in rows]
    passwords = [v["password"] for v in values]
    assert len(set(passwords)) == len(passwords)
    needles = [*passwords, private_pg.superpassword]
    assert leaked_in(log, needles) == []
    for tree in (pg_work.var, live):
        assert find_leaks(tree, needles) == []
    current = labelled(rows, "current")
    assert current == rows[-1]["version"]
    assert await private_pg.can_login(role.name, passwords[-1])
    assert not await private_pg.can_login(role.name, passwords[0])


async def test_events_wait_in_the_outbox_while_nats_is_down(
        work: Workdir, nats_factory: Callable[[], NatsServer]) -> None:
    """Rotations succeed while NATS is down; the daemon says so once, and when NATS is back
    every version's ``rotated`` event arrives exactly once."""
    server = nats_factory()
    token = secrets.token_hex(4)
    bus = Bus(url=server.url, stream=f"E2E_{token}", prefix=f"e2e_{token}")
    work.config([secret(KEY, "random")], bus=bus)
    work.run("init").ok()
    server.stop()

    for version in (1, 2):
        res = work.run("rotate", KEY).ok()
        assert f"to version {version}" in res.stdout
        assert "outbox" in res.stderr
        assert "Traceback" not in res.stderr
    assert work.status()["outbox_backlog"] == 4   # started + rotated, twice

    daemon = work.start()
    try:
        daemon.wait_for_log("bus.unreachable", 15)
        time.sleep(2.0)   # a few reconnect attempts while NATS stays down
        server.start()
        wait_until(lambda: work.query("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                   == [(0,)], 20, "the outbox to drain", alive=daemon, every=0.2)
    finally:
        code, _ = daemon.terminate()
    assert code == 0, daemon.log()
    log = daemon.log()
    assert log.count("bus.unreachable") == 1, log
    assert "bus.reconnected" in log
    assert work.status()["outbox_backlog"] == 0

    res = work.run("rotate", KEY).ok()
    assert "to version 3" in res.stdout
    assert "outbox" not in res.stderr

    events = await consume(bus)
    assert by_version(events, "rotated") == {1: 1, 2: 1, 3: 1}
    started = [e for e in events if e.event["type"].endswith(".started")]
    assert len(started) == 3
    assert len({e.event["data"]["rotation_id"] for e in started}) == 3
    assert len({e.event["id"] for e in events}) == len(events) == 6
    for ev in events:
        if ev.event["type"].endswith(".rotated"):
            check_cloudevent(ev, kind="rotated", name=KEY, bus=bus)
    keys = [work.field(KEY, "api_key", v) for v in (1, 2, 3)]
    for ev in events:
        assert leaked_in(ev.raw.decode(), keys) == [], ev.subject
    assert leaked_in(log, keys) == []


async def test_daemon_down_across_several_periods_catches_up_once(
        work: Workdir, bus: Bus) -> None:
    """A due time missed by several periods while the daemon was down gives exactly one
    catch-up rotation at start-up, and the next one is a full period later."""
    work.config([secret(KEY, "random", schedule="1h")], bus=bus)
    work.run("init").ok()
    work.run("rotate", KEY).ok()
    # The daemon was "down" for five hours: the stored due time is long past.
    work.execute("UPDATE secrets SET next_rotation_at = ? WHERE name = ?",
                 ((datetime.now(UTC) - timedelta(hours=5)).isoformat(), KEY))

    daemon = work.start()
    try:
        wait_until(lambda: work.query("SELECT MAX(version) FROM versions WHERE name = ?",
                                      (KEY,))[0][0] >= 2, 15, "the catch-up rotation",
                   alive=daemon, every=0.2)
        started_at = datetime.now(UTC)
        time.sleep(3.0)   # long enough for a second (wrong) rotation to show up
    finally:
        code, _ = daemon.terminate()
    assert code == 0, daemon.log()
    assert daemon.log().count("schedule.missed") == 1

    rows = work.versions(KEY)
    assert [r["version"] for r in rows] == [1, 2]
    assert labelled(rows, "current") == 2
    state = work.status()["secrets"][0]
    assert state["last_rotation"]["reason"] == "catch_up"
    assert state["last_rotation"]["state"] == "done"
    due = parse_time(state["next_rotation_at"])
    assert abs(due - (started_at + timedelta(hours=1))) < timedelta(seconds=30), due
    assert work.query("SELECT reason FROM rotations WHERE name = ? ORDER BY started_at",
                      (KEY,)) == [("manual",), ("catch_up",)]

    events = await consume(bus, "rotated.>")
    assert by_version(events, "rotated") == {1: 1, 2: 1}
    assert [e.event["data"]["reason"] for e in events] == ["manual", "catch_up"]


def test_second_daemon_on_the_same_store_refuses_to_start(work: Workdir, bus: Bus) -> None:
    """A second `rotator run` on the same store exits 1 with one line naming the first's pid."""
    work.config([secret(KEY, "random", schedule="1h")], bus=bus)
    work.run("init").ok()
    first = work.start()
    try:
        first.wait_for_log("daemon.started", 15)
        second = work.run("run", timeout=30)
        assert second.returncode == 1, second
        assert len(second.stderr_lines) == 1, second.stderr
        assert f"pid {first.proc.pid}" in second.stderr and "already running" in second.stderr
        assert first.proc.poll() is None, "the first daemon keeps running"
    finally:
        code, _ = first.terminate(timeout=10)
    assert code == 0
    # Once the first is gone, a new daemon starts normally.
    again = work.start(log_name="again.log")
    try:
        again.wait_for_log("daemon.started", 15)
    finally:
        assert again.terminate(timeout=10)[0] == 0
