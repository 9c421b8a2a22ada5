"""SQLite store (aiosqlite, WAL). The file is created 0600; it holds only ciphertext.

One connection per process, transactions serialised by an asyncio lock and, across
processes, by ``BEGIN IMMEDIATE`` plus SQLite's busy timeout. A partial unique index
enforces one running rotation per secret even if two processes race.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from rotator.crypto import Sealed
from rotator.errors import LeaseHeld, NotFound, StoreError
from rotator.events import Event
from rotator.store.base import OutboxRow, RotationRow, SecretRow, VersionRow
from rotator.types import Label, RotationState, Step, StepState, VersionState

__all__ = ["SQLiteStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    created_at TEXT NOT NULL,
    next_rotation_at TEXT,
    last_rotated_at TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES secrets(name),
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    rotation_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS labels (
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, label),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
CREATE TABLE IF NOT EXISTS rotations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL REFERENCES secrets(name),
    reason TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT NOT NULL,
    step_state TEXT NOT NULL,
    version INTEGER,
    from_version INTEGER,
    candidates INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    owner TEXT,
    lease_until REAL,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS rotations_one_running ON rotations(name) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS rotations_by_name ON rotations(name, started_at);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rotation_id TEXT NOT NULL,
    at TEXT NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(seq) WHERE published_at IS NULL;
"""


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat()


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _req_dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _rotation(row: sqlite3.Row) -> RotationRow:
    return RotationRow(
        id=row["id"], name=row["name"], reason=row["reason"],
        state=RotationState(row["state"]), step=Step(row["step"]),
        step_state=StepState(row["step_state"]), version=row["version"],
        from_version=row["from_version"], candidates=row["candidates"], error=row["error"],
        owner=row["owner"], lease_until=row["lease_until"],
        started_at=_req_dt(row["started_at"]), updated_at=_req_dt(row["updated_at"]),
        finished_at=_dt(row["finished_at"]),
    )


def _secret(row: sqlite3.Row) -> SecretRow:
    return SecretRow(name=row["name"], plugin=row["plugin"], created_at=_req_dt(row["created_at"]),
                     next_rotation_at=_dt(row["next_rotation_at"]),
                     last_rotated_at=_dt(row["last_rotated_at"]))


class SQLiteStore:
    """The default store: one SQLite file in WAL mode."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._create_file)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.path}: {exc.strerror or exc}") from None
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.executescript(_SCHEMA)
            await db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"cannot initialise store {self.path}: {exc}") from exc
        if row is None or int(row[0]) != SCHEMA_VERSION:
            await db.close()
            raise StoreError(f"store {self.path} has schema version {row and row[0]}, "
                             f"this rotator expects {SCHEMA_VERSION}")
        self._db = db

    def _create_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        # SQLite creates the -wal/-shm files with the database file's permissions.
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, serialised in-process and across processes."""
        async with self._lock:
            db = self.db
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StoreError(f"store {self.path} is busy or unwritable: {exc}") from exc
                try:
                    yield db
                except sqlite3.Error as exc:
                    raise StoreError(f"store {self.path}: {exc}") from exc
                try:
                    await db.commit()
                except sqlite3.Error as exc:
                    raise StoreError(f"commit failed on {self.path}: {exc}") from exc
            except BaseException:
                # Also after a cancellation that hit BEGIN or COMMIT: aiosqlite runs calls in
                # order on its thread, so this rollback lands after them (a no-op when the
                # commit went through, or when no transaction is open).
                await asyncio.shield(db.rollback())
                raise

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        try:
            async with self._lock, self.db.execute(sql, params) as cur:
                row: sqlite3.Row | None = await cur.fetchone()
                return row
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._lock, self.db.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    # -- secrets -------------------------------------------------------------

    async def ensure_secret(self, name: str, plugin: str) -> SecretRow:
        row = await self.get_secret(name)
        if row is not None and row.plugin == plugin:
            return row      # the common case: no write transaction (and no fsync)
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO secrets(name, plugin, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET plugin = excluded.plugin",
                (name, plugin, _ts(_now())))
        row = await self.get_secret(name)
        assert row is not None
        return row

    async def get_secret(self, name: str) -> SecretRow | None:
        row = await self._one("SELECT * FROM secrets WHERE name = ?", (name,))
        return None if row is None else _secret(row)

    async def list_secrets(self) -> list[SecretRow]:
        return [_secret(r) for r in await self._all("SELECT * FROM secrets ORDER BY name")]

    async def set_next_rotation(self, name: str, at: datetime | None) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE secrets SET next_rotation_at = ? WHERE name = ?",
                             (_ts(at), name))

    # -- versions ------------------------------------------------------------

    async def _labels(self, name: str) -> dict[int, tuple[Label, ...]]:
        out: dict[int, list[Label]] = {}
        for r in await self._all("SELECT label, version FROM labels WHERE name = ?", (name,)):
            out.setdefault(r["version"], []).append(Label(r["label"]))
        order = {Label.CURRENT: 0, Label.PENDING: 1, Label.PREVIOUS: 2}
        return {v: tuple(sorted(ls, key=order.__getitem__)) for v, ls in out.items()}

    def _version(self, row: sqlite3.Row, labels: dict[int, tuple[Label, ...]]) -> VersionRow:
        return VersionRow(
            name=row["name"], version=row["version"], state=VersionState(row["state"]),
            labels=labels.get(row["version"], ()), created_at=_req_dt(row["created_at"]),
            rotation_id=row["rotation_id"],
            sealed=Sealed(row["key_id"], bytes(row["wrapped_key"]), bytes(row["ciphertext"])))

    async def get_version(self, name: str, *, version: int | None = None,
                          label: Label | None = None) -> VersionRow:
        if version is not None and label is not None:
            raise ValueError("pass version or label, not both")
        if version is None:
            wanted = label or Label.CURRENT
            row = await self._one("SELECT version FROM labels WHERE name = ? AND label = ?",
                                  (name, str(wanted)))
            if row is None:
                raise await self._not_found(name, f"no version labelled {wanted}",
                                            maybe_unrotated=wanted is Label.CURRENT)
            version = int(row["version"])
        row = await self._one("SELECT * FROM versions WHERE name = ? AND version = ?",
                              (name, version))
        if row is None:
            raise await self._not_found(name, f"no version {version}")
        return self._version(row, await self._labels(name))

    async def _not_found(self, name: str, what: str, *, maybe_unrotated: bool = False) -> NotFound:
        """The NotFound to raise: naming the secret when the store does not know it at all."""
        if await self.get_secret(name) is None:
            hint = " (or not rotated yet)" if maybe_unrotated else ""
            return NotFound(f"{name}: no such secret in the store{hint}")
        return NotFound(f"{name}: {what}")

    async def list_versions(self, name: str) -> list[VersionRow]:
        labels = await self._labels(name)
        rows = await self._all("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,))
        return [self._version(r, labels) for r in rows]

    async def next_version_number(self, name: str) -> int:
        row = await self._one("SELECT COALESCE(MAX(version), 0) + 1 AS n FROM versions "
                              "WHERE name = ?", (name,))
        assert row is not None
        return int(row["n"])

    # -- rotations -----------------------------------------------------------

    async def _get_rotation(self, db: aiosqlite.Connection, rotation_id: str) -> RotationRow:
        async with db.execute("SELECT * FROM rotations WHERE id = ?", (rotation_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no rotation {rotation_id}")
        return _rotation(row)

    async def _journal(self, db: aiosqlite.Connection, rotation_id: str, step: str, state: str,
                       detail: str = "") -> None:
        await db.execute("INSERT INTO journal(rotation_id, at, step, state, detail) "
                         "VALUES (?, ?, ?, ?, ?)", (rotation_id, _ts(_now()), step, state, detail))

    async def _outbox(self, db: aiosqlite.Connection, events: Sequence[Event]) -> None:
        for ev in events:
            await db.execute(
                "INSERT INTO outbox(event_id, subject, payload, created_at) VALUES (?, ?, ?, ?)",
                (ev.id, ev.subject(self.subject_prefix), ev.to_json(), _ts(ev.time)))

    #: set by the composition root from the bus config; events are stored with their subject.
    subject_prefix: str = "rotator"

    async def claim_rotation(self, *, name: str, rotation_id: str, reason: str, owner: str,
                             lease_ttl: float,
                             owner_is_dead: Callable[[str], bool],
                             started_event: Callable[[RotationRow], Event],
                             ) -> tuple[RotationRow, bool]:
        now = _now()
        async with self._tx() as db:
            async with db.execute("SELECT * FROM rotations WHERE name = ? AND state = 'running'",
                                  (name,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                running = _rotation(row)
                expired = running.lease_until is None or running.lease_until < time.time()
                if running.owner and running.owner != owner and not expired \
                        and not owner_is_dead(running.owner):
                    raise LeaseHeld(name, running.owner)
                await db.execute("UPDATE rotations SET owner = ?, lease_until = ?, updated_at = ? "
                                 "WHERE id = ?", (owner, time.time() + lease_ttl, _ts(now),
                                                  running.id))
                await self._journal(db, running.id, str(running.step), "resumed",
                                    f"previous owner {running.owner}")
                return await self._get_rotation(db, running.id), True
            async with db.execute("SELECT version FROM labels WHERE name = ? AND label = ?",
                                  (name, str(Label.CURRENT))) as cur:
                current = await cur.fetchone()
            from_version = None if current is None else int(current["version"])
            await db.execute(
                "INSERT INTO rotations(id, name, reason, state, step, step_state, from_version, "
                "owner, lease_until, started_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (rotation_id, name, reason, str(RotationState.RUNNING), str(Step.CREATE),
                 str(StepState.STARTED), from_version, owner, time.time() + lease_ttl,
                 _ts(now), _ts(now)))
            await self._journal(db, rotation_id, str(Step.CREATE), "claimed", f"reason {reason}")
            rot = await self._get_rotation(db, rotation_id)
            await self._outbox(db, [started_event(rot)])
            return rot, False

    async def renew_lease(self, rotation_id: str, owner: str, lease_ttl: float) -> None:
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE rotations SET lease_until = ? WHERE id = ? AND owner = ? "
                "AND state = 'running'", (time.time() + lease_ttl, rotation_id, owner))
            if cur.rowcount == 0:
                rot = await self._get_rotation(db, rotation_id)
                raise LeaseHeld(rot.name, rot.owner or "nobody")

    async def release_lease(self, name: str, owner: str) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE rotations SET lease_until = 0 WHERE name = ? AND owner = ? "
                             "AND state = 'running'", (name, owner))

    async def _fence(self, db: aiosqlite.Connection, rotation_id: str,
                     owner: str) -> RotationRow:
        """The rotation, if ``owner`` still owns it and it is running; else LeaseHeld."""
        rot = await self._get_rotation(db, rotation_id)
        if rot.state is not RotationState.RUNNING or rot.owner != owner:
            raise LeaseHeld(rot.name, rot.owner if rot.state is RotationState.RUNNING
                            and rot.owner else f"nobody: the rotation is {rot.state}")
        return rot

    async def mark_step(self, rotation_id: str, step: Step, state: StepState,
                        detail: str = "", *, owner: str,
                        error: str | None = None) -> RotationRow:
        async with self._tx() as db:
            await self._fence(db, rotation_id, owner)
            await db.execute("UPDATE rotations SET step = ?, step_state = ?, updated_at = ?, "
                             "error = COALESCE(?, error) WHERE id = ?",
                             (str(step), str(state), _ts(_now()), error, rotation_id))
            await self._journal(db, rotation_id, str(step), str(state), detail)
            return await self._get_rotation(db, rotation_id)

    async def put_candidate(self, rotation_id: str, name: str, version: int,
                            sealed: Sealed, *, owner: str) -> RotationRow:
        now = _ts(_now())
        async with self._tx() as db:
            await self._fence(db, rotation_id, owner)
            await db.execute(
                "INSERT INTO versions(name, version, state, created_at, rotation_id, key_id, "
                "wrapped_key, ciphertext) VALUES (?,?,?,?,?,?,?,?)",
                (name, version, str(VersionState.PENDING), now, rotation_id, sealed.key_id,
                 sealed.wrapped_key, sealed.ciphertext))
            await db.execute("INSERT OR REPLACE INTO labels(name, label, version) VALUES (?,?,?)",
                             (name, str(Label.PENDING), version))
            await db.execute(
                "UPDATE rotations SET version = ?, candidates = candidates + 1, step = ?, "
                "step_state = ?, updated_at = ? WHERE id = ?",
                (version, str(Step.CREATE), str(StepState.DONE), now, rotation_id))
            await self._journal(db, rotation_id, str(Step.CREATE), str(StepState.DONE),
                                f"candidate v{version}")
            return await self._get_rotation(db, rotation_id)

    async def reject_candidate(self, rotation_id: str, name: str, version: int,
                               detail: str, *, owner: str) -> RotationRow:
        async with self._tx() as db:
            await self._fence(db, rotation_id, owner)
            await db.execute("UPDATE versions SET state = ? WHERE name = ? AND version = ?",
                             (str(VersionState.FAILED), name, version))
            await db.execute("DELETE FROM labels WHERE name = ? AND label = ? AND version = ?",
                             (name, str(Label.PENDING), version))
            await db.execute("UPDATE rotations SET version = NULL, step = ?, step_state = ?, "
                             "updated_at = ? WHERE id = ?",
                             (str(Step.CREATE), str(StepState.STARTED), _ts(_now()), rotation_id))
            await self._journal(db, rotation_id, str(Step.SET), "rejected", detail)
            return await self._get_rotation(db, rotation_id)

    async def finish_rotation(self, rotation_id: str, name: str, version: int,
                              events: Sequence[Event], *, owner: str) -> None:
        now = _ts(_now())
        async with self._tx() as db:
            rot = await self._fence(db, rotation_id, owner)
            if rot.version != version:
                raise StoreError(f"rotation {rotation_id} holds candidate v{rot.version}, "
                                 f"not v{version}")
            async with db.execute("SELECT label, version FROM labels WHERE name = ?",
                                  (name,)) as cur:
                labels = {r["label"]: r["version"] for r in await cur.fetchall()}
            old_current = labels.get(str(Label.CURRENT))
            old_previous = labels.get(str(Label.PREVIOUS))
            if old_previous is not None and old_previous != old_current:
                await db.execute("UPDATE versions SET state = ? WHERE name = ? AND version = ?",
                                 (str(VersionState.DEPRECATED), name, old_previous))
                await db.execute("DELETE FROM labels WHERE name = ? AND label = ?",
                                 (name, str(Label.PREVIOUS)))
            if old_current is not None:
                await db.execute("UPDATE versions SET state = ? WHERE name = ? AND version = ?",
                                 (str(VersionState.PREVIOUS), name, old_current))
                await db.execute("INSERT OR REPLACE INTO labels(name, label, version) "
                                 "VALUES (?,?,?)", (name, str(Label.PREVIOUS), old_current))
            await db.execute("UPDATE versions SET state = ? WHERE name = ? AND version = ?",
                             (str(VersionState.CURRENT), name, version))
            await db.execute("DELETE FROM labels WHERE name = ? AND label = ?",
                             (name, str(Label.PENDING)))
            await db.execute("INSERT OR REPLACE INTO labels(name, label, version) VALUES (?,?,?)",
                             (name, str(Label.CURRENT), version))
            await db.execute(
                "UPDATE rotations SET state = ?, step = ?, step_state = ?, updated_at = ?, "
                "finished_at = ?, error = NULL, lease_until = 0 WHERE id = ?",
                (str(RotationState.DONE), str(Step.FINISH), str(StepState.DONE), now, now,
                 rotation_id))
            await db.execute("UPDATE secrets SET last_rotated_at = ? WHERE name = ?", (now, name))
            await self._journal(db, rotation_id, str(Step.FINISH), str(StepState.DONE),
                                f"v{version} is current")
            await self._outbox(db, events)

    async def fail_rotation(self, rotation_id: str, name: str, error: str,
                            events: Sequence[Event], *, owner: str) -> None:
        now = _ts(_now())
        async with self._tx() as db:
            rot = await self._fence(db, rotation_id, owner)
            if rot.version is not None:
                await db.execute(
                    "UPDATE versions SET state = ? WHERE name = ? AND version = ? AND state = ?",
                    (str(VersionState.FAILED), name, rot.version, str(VersionState.PENDING)))
                await db.execute("DELETE FROM labels WHERE name = ? AND label = ?",
                                 (name, str(Label.PENDING)))
            await db.execute(
                "UPDATE rotations SET state = ?, error = ?, updated_at = ?, finished_at = ?, "
                "lease_until = 0 WHERE id = ?",
                (str(RotationState.FAILED), error, now, now, rotation_id))
            await self._journal(db, rotation_id, str(rot.step), "failed", error)
            await self._outbox(db, events)

    async def get_rotation(self, rotation_id: str) -> RotationRow:
        row = await self._one("SELECT * FROM rotations WHERE id = ?", (rotation_id,))
        if row is None:
            raise NotFound(f"no rotation {rotation_id}")
        return _rotation(row)

    async def running_rotations(self) -> list[RotationRow]:
        return [_rotation(r) for r in await self._all(
            "SELECT * FROM rotations WHERE state = 'running' ORDER BY started_at")]

    async def last_rotation(self, name: str) -> RotationRow | None:
        rows = await self.rotation_history(name, 1)
        return rows[0] if rows else None

    async def rotation_history(self, name: str, limit: int = 20) -> list[RotationRow]:
        return [_rotation(r) for r in await self._all(
            "SELECT * FROM rotations WHERE name = ? ORDER BY started_at DESC, rowid DESC LIMIT ?",
            (name, limit))]

    # -- outbox --------------------------------------------------------------

    async def pending_events(self, limit: int = 100) -> list[OutboxRow]:
        rows = await self._all("SELECT seq, event_id, subject, payload FROM outbox "
                               "WHERE published_at IS NULL ORDER BY seq LIMIT ?", (limit,))
        return [OutboxRow(r["seq"], r["event_id"], r["subject"], bytes(r["payload"]))
                for r in rows]

    async def mark_published(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        now = _ts(_now())
        async with self._tx() as db:
            await db.executemany("UPDATE outbox SET published_at = ? WHERE event_id = ?",
                                 [(now, eid) for eid in event_ids])

    async def outbox_backlog(self) -> int:
        row = await self._one("SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL")
        return 0 if row is None else int(row["n"])
