"""The real ``rotator`` command rotating a PostgreSQL role on a private, password-checking
cluster, with its events read back from a private JetStream."""

from __future__ import annotations

import os
import sys

import pytest
from e2e.helpers import (
    CONFIG_NAME,
    CRASHRUN,
    Bus,
    Role,
    Workdir,
    by_version,
    check_cloudevent,
    consume,
    find_leaks,
    labelled,
    leaked_in,
    pg_secret,
    wait_until,
)
from servers import PostgresCluster

NAME = "prod/billing/db"


async def test_two_rotations_end_to_end(pg_work: Workdir, private_pg: PostgresCluster,
                                        role: Role, bus: Bus) -> None:
    """Two CLI rotations leave only the newest password working, label versions right,
    write no password anywhere and publish one CloudEvent per version without values."""
    config = pg_work.config([pg_secret(NAME, role.name)], bus=bus)
    assert private_pg.superpassword not in config.read_text()

    results = [pg_work.run("init").ok()]
    results += [pg_work.run("rotate", NAME).ok() for _ in range(2)]
    assert "to version 1" in results[1].stdout
    assert "to version 2" in results[2].stdout

    newest = pg_work.password(NAME)
    first = pg_work.password(NAME, 1)
    assert pg_work.password(NAME, 2) == newest
    assert len({newest, first, role.initial_password}) == 3
    assert await private_pg.can_login(role.name, newest)
    assert not await private_pg.can_login(role.name, first)
    assert not await private_pg.can_login(role.name, role.initial_password)

    rows = pg_work.versions(NAME)
    assert [r["version"] for r in rows] == [1, 2]
    assert labelled(rows, "current") == 2
    assert labelled(rows, "previous") == 1
    assert labelled(rows, "pending") is None
    assert [r["state"] for r in rows] == ["previous", "current"]

    secrets_ = [newest, first, private_pg.superpassword]
    assert find_leaks(pg_work.var, secrets_) == []
    assert find_leaks(pg_work.path, [newest, first]) == []   # the config file too
    for res in results:
        assert leaked_in(res.stdout + res.stderr, secrets_) == []

    events = await consume(bus)
    rotated = [e for e in events if e.event["type"].endswith(".rotated")]
    assert by_version(rotated, "rotated") == {1: 1, 2: 1}
    for ev in rotated:
        check_cloudevent(ev, kind="rotated", name=NAME, bus=bus)
        assert ev.event["data"]["reason"] == "manual"
    assert rotated[1].event["data"]["previous_version"] == 1
    assert len({e.event["id"] for e in events}) == len(events)
    for ev in events:
        assert leaked_in(ev.raw.decode(), secrets_) == [], ev.subject


CRASH_POINTS = ["create", "set-before-server", "set-after-server", "test",
                "finish-before-commit"]


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_sigkill_inside_a_step_then_rotate_again_completes(
        pg_work: Workdir, private_pg: PostgresCluster, role: Role, bus: Bus,
        point: str) -> None:
    """A rotation killed with SIGKILL inside any step never locks the role out, and the next
    ``rotator rotate`` resumes it to a working current password."""
    pg_work.config([pg_secret(NAME, role.name)], bus=bus)
    pg_work.run("init").ok()
    pg_work.run("rotate", NAME).ok()
    before = pg_work.password(NAME, 1)

    marker = pg_work.path / "crash.marker"
    crashed = pg_work.start(
        [sys.executable, os.fspath(CRASHRUN), "--config", CONFIG_NAME, "rotate", NAME],
        env={"E2E_CRASH_POINT": point, "E2E_CRASH_MARKER": str(marker)}, log_name="crashed.log")
    try:
        wait_until(marker.exists, 30, f"the crash point {point}", alive=crashed)
    finally:
        crashed.kill()
    assert crashed.proc.returncode == -9

    # Never locked out: the live password is the one from before or a stored version's.
    stored = [r["version"] for r in pg_work.versions(NAME)]
    candidates = {1: before} | {v: pg_work.password(NAME, v) for v in stored if v != 1}
    working = [v for v, pw in candidates.items() if await private_pg.can_login(role.name, pw)]
    assert working == ([1] if point in ("create", "set-before-server") else [2]), \
        f"versions that log in after the crash: {working}"

    resumed = pg_work.run("rotate", NAME).ok()
    assert "resumed and completed to version 2" in resumed.stdout

    rows = pg_work.versions(NAME)
    assert [r["version"] for r in rows] == [1, 2]
    assert labelled(rows, "current") == 2
    assert labelled(rows, "previous") == 1
    current = pg_work.password(NAME)
    assert await private_pg.can_login(role.name, current)
    assert not await private_pg.can_login(role.name, before)
    assert not await private_pg.can_login(role.name, role.initial_password)
    assert pg_work.status()["secrets"][0]["last_rotation"]["state"] == "done"

    secrets_ = [current, before]
    assert find_leaks(pg_work.var, secrets_) == []
    assert leaked_in(crashed.log() + resumed.stderr, secrets_) == []
    events = await consume(bus)
    assert by_version(events, "rotated") == {1: 1, 2: 1}
    assert by_version(events, "failed") == {}


async def test_failed_test_step_rolls_back_on_the_server(
        pg_work: Workdir, private_pg: PostgresCluster, role: Role, bus: Bus) -> None:
    """A candidate that fails its login test is rolled back: the current password keeps
    working, the label stays, and a ``failed`` event carries the error but no password."""
    pg_work.config([pg_secret(NAME, role.name)], bus=bus)
    pg_work.run("init").ok()
    pg_work.run("rotate", NAME).ok()
    good = pg_work.password(NAME)

    # The next value names a database that does not exist: its login test cannot pass.
    pg_work.config([pg_secret(NAME, role.name, dbname="no_such_db_e2e")], bus=bus)
    failed = pg_work.run("--debug", "rotate", NAME)    # --debug: show the step log lines
    assert failed.returncode == 1, failed.stderr
    assert "outcome=failed" in failed.stderr
    assert "outcome=retry" not in failed.stderr   # a missing database is permanent
    last = failed.stderr_lines[-1]
    assert last.startswith("rotator: error: ") and "failed" in last
    assert "Traceback" not in failed.stderr

    rows = pg_work.versions(NAME)
    assert labelled(rows, "current") == 1
    assert labelled(rows, "pending") is None
    assert [r["state"] for r in rows] == ["current", "failed"]
    assert pg_work.password(NAME) == good
    rejected = pg_work.password(NAME, 2)
    assert await private_pg.can_login(role.name, good)
    assert not await private_pg.can_login(role.name, rejected)

    last_rotation = pg_work.status()["secrets"][0]["last_rotation"]
    assert last_rotation["state"] == "failed"
    assert last_rotation["step"] == "rollback"

    secrets_ = [good, rejected]
    assert leaked_in(failed.stdout + failed.stderr, secrets_) == []
    assert find_leaks(pg_work.var, secrets_) == []

    events = await consume(bus)
    fails = [e for e in events if e.event["type"].endswith(".failed")]
    assert len(fails) == 1
    check_cloudevent(fails[0], kind="failed", name=NAME, bus=bus)
    data = fails[0].event["data"]
    assert data["version"] == 2
    assert data["previous_version"] == 1
    assert data["step"] == "test"
    assert data["rolled_back"] is True
    assert "no_such_db_e2e" in data["error"]
    assert "InvalidCatalogName" in data["error"]
    assert role.name in data["error"] and "plugin=postgres" in data["error"]
    assert by_version(events, "rolled_back") == {2: 1}
    assert by_version(events, "rotated") == {1: 1}
    for ev in events:
        assert leaked_in(ev.raw.decode(), secrets_) == [], ev.subject

    # Without --debug a failed rotate prints exactly one line.
    quiet = pg_work.run("rotate", NAME)
    assert quiet.returncode == 1 and len(quiet.stderr_lines) == 1, quiet.stderr
    assert quiet.stderr.startswith("rotator: error: ") and "no_such_db_e2e" in quiet.stderr
