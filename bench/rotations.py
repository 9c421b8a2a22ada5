"""Rotations per second, each beside a raw baseline measured in the same run.

Two scenarios, each timed sequentially (one rotation after the other) and
concurrently (per round, every secret at once in a TaskGroup):

``random``    N ``random`` secrets through the real app (config file, plugins from
              entry points, SQLite store, envelope encryption, info logs rendered to
              /dev/null, bus disabled). Baseline: a bare aiosqlite loop doing one
              INSERT + COMMIT per "rotation" on a WAL database with the store's PRAGMAs.
``postgres``  N ``postgres`` secrets against a private scram-sha-256 cluster (the one
              the test suite uses). Baselines: per "rotation", ALTER ROLE ... PASSWORD
              over a persistent admin connection, then a fresh login as the role and
              SELECT 1; once with a SCRAM verifier computed client-side (what the plugin
              sends) and once with the plaintext (the server hashes it).

Before timing, every secret is rotated once (and every baseline runs once per
secret): that warm-up is excluded from the numbers.

Run from the repository root: ``.venv/bin/python bench/rotations.py [--secrets N]
[--rounds R] [--only random|postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import secrets
import sqlite3
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import aiosqlite

from rotator.app import App, load, open_app
from rotator.crypto import MasterKey
from rotator.logs import configure_logging
from rotator.types import RotationState

REPO = Path(__file__).resolve().parent.parent
MASTER_KEY_ENV = "ROTATOR_BENCH_MASTER_KEY"
PG_ADMIN_ENV = "ROTATOR_BENCH_PG_ADMIN"
# The same PRAGMAs rotator/store/sqlite.py sets on its connection.
STORE_PRAGMAS = ("busy_timeout = 10000", "journal_mode = WAL", "synchronous = FULL",
                 "foreign_keys = ON")

Op = Callable[[str], Coroutine[Any, Any, None]]


class BenchError(Exception):
    """A missing prerequisite; the message says what to install or pass."""


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    rotator: Timing
    baseline_name: str
    baseline: Timing

    @property
    def ratio(self) -> float:
        return self.rotator.rate / self.baseline.rate


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    baselines: dict[str, Timing] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


async def warm_up(op: Op, keys: Sequence[str]) -> None:
    """One untimed call per key: first rotations, connection set-up, caches."""
    for key in keys:
        await op(key)


# A raw commit takes under a millisecond: 60 of them are too few to time reliably.
# Baselines therefore repeat whole rounds until they have run at least this long.
BASELINE_MIN_SECONDS = 1.0


async def _rounds(run_round: Callable[[], Awaitable[None]], per_round: int, rounds: int,
                  min_seconds: float) -> Timing:
    """At least ``rounds`` rounds, more until ``min_seconds`` have passed."""
    done = 0
    t0 = time.perf_counter()
    while done < rounds or time.perf_counter() - t0 < min_seconds:
        await run_round()
        done += 1
    return Timing(done * per_round, time.perf_counter() - t0)


async def sequential(op: Op, keys: Sequence[str], rounds: int,
                     min_seconds: float = 0.0) -> Timing:
    async def one_round() -> None:
        for key in keys:
            await op(key)
    return await _rounds(one_round, len(keys), rounds, min_seconds)


async def concurrent(op: Op, keys: Sequence[str], rounds: int,
                     min_seconds: float = 0.0) -> Timing:
    """Per round, every key at once; a round ends when its slowest call does."""
    async def one_round() -> None:
        async with asyncio.TaskGroup() as tg:
            for key in keys:
                tg.create_task(op(key))
    return await _rounds(one_round, len(keys), rounds, min_seconds)


def progress(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


# --- the app under test ------------------------------------------------------------------


def toml_str(text: str) -> str:
    """A TOML basic string (JSON escaping is valid TOML for these values)."""
    return json.dumps(text)


def write_config(path: Path, store: Path, secrets_: Sequence[tuple[str, str, dict[str, str]]]
                 ) -> Path:
    """A config with the bus off and the master key from the environment."""
    lines = [
        "[store]", f"url = {toml_str('sqlite:///' + str(store))}", "",
        "[crypto]", f"master_key_env = {toml_str(MASTER_KEY_ENV)}", "",
        "[bus]", "enabled = false", "",
        "[log]", 'level = "info"', "",
    ]
    for name, plugin, options in secrets_:
        lines += ["[[secrets]]", f"name = {toml_str(name)}", f"plugin = {toml_str(plugin)}",
                  'schedule = "1h"']
        if options:
            lines.append("[secrets.options]")
            lines += [f"{key} = {toml_str(value)}" for key, value in options.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@contextlib.asynccontextmanager
async def rotator_app(config_path: Path, log_sink: TextIO) -> Any:
    """The app as ``rotator rotate`` builds it, logging at the config's level into ``log_sink``."""
    configure_logging("warning")              # a broken plugin still shows up on stderr
    cfg, plugin_classes = load(config_path)
    configure_logging(cfg.log.level, cfg.log.format, stream=log_sink)
    async with open_app(cfg, plugin_classes) as app:
        yield app


def rotate_op(app: App) -> Op:
    async def rotate(name: str) -> None:
        result = await app.engine.rotate(name)
        if result.state is not RotationState.DONE:
            raise RuntimeError(f"{name}: rotation ended {result.state}: {result.error}")
    return rotate


async def warm_up_counting(app: App, op: Op, keys: Sequence[str]) -> tuple[float, float]:
    """Warm up while counting store work: (write transactions, SQL statements) per rotation."""
    statements: list[str] = []
    await app.store.db.set_trace_callback(statements.append)
    try:
        await warm_up(op, keys)
    finally:
        # sqlite3 takes None to remove the callback; aiosqlite's annotation omits it.
        await app.store.db.set_trace_callback(None)  # type: ignore[arg-type]
    writes = sum(1 for sql in statements if sql.lstrip().upper().startswith("BEGIN"))
    return writes / len(keys), len(statements) / len(keys)


async def time_rotator(app: App, names: Sequence[str], rounds: int,
                       label: str) -> tuple[Timing, Timing, tuple[float, float]]:
    op = rotate_op(app)
    progress(f"{label}: warm-up ({len(names)} rotations, not timed)")
    per_rotation = await warm_up_counting(app, op, names)
    progress(f"{label}: sequential")
    seq = await sequential(op, names, rounds)
    progress(f"{label}: concurrent")
    conc = await concurrent(op, names, rounds)
    return seq, conc, per_rotation


# --- random ------------------------------------------------------------------------------


async def sqlite_baseline(path: Path, keys: Sequence[str], rounds: int) -> tuple[Timing, Timing]:
    """One INSERT + COMMIT per call, on one connection behind a lock, as the store does."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        for pragma in STORE_PRAGMAS:
            await db.execute(f"PRAGMA {pragma}")
        await db.execute("CREATE TABLE rotations (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "name TEXT NOT NULL, at TEXT NOT NULL, payload BLOB NOT NULL)")
        lock = asyncio.Lock()

        async def commit_one(name: str) -> None:
            async with lock:
                await db.execute("BEGIN IMMEDIATE")
                await db.execute("INSERT INTO rotations(name, at, payload) VALUES (?, ?, ?)",
                                 (name, datetime.now(UTC).isoformat(), secrets.token_bytes(64)))
                await db.commit()

        await warm_up(commit_one, keys)
        return (await sequential(commit_one, keys, rounds, BASELINE_MIN_SECONDS),
                await concurrent(commit_one, keys, rounds, BASELINE_MIN_SECONDS))
    finally:
        await db.close()


async def bench_random(n: int, rounds: int, workdir: Path, log_sink: TextIO,
                       report: Report) -> None:
    base = workdir / "random"
    base.mkdir()
    names = [f"bench/random-{i:03d}" for i in range(n)]
    config = write_config(base / "rotator.toml", base / "rotator.db",
                          [(name, "random", {}) for name in names])
    async with rotator_app(config, log_sink) as app:
        seq, conc, (writes, statements) = await time_rotator(app, names, rounds, "random")
    progress("random: baseline (aiosqlite INSERT + COMMIT)")
    base_seq, base_conc = await sqlite_baseline(base / "baseline.db", names, rounds)
    baseline = "sqlite INSERT+COMMIT"
    report.baselines[f"{baseline}, sequential"] = base_seq
    report.baselines[f"{baseline}, concurrent"] = base_conc
    report.rows += [Row("random, sequential", seq, baseline, base_seq),
                    Row(f"random, concurrent x{n}", conc, baseline, base_conc)]
    report.facts["store"] = f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL, " \
                            f"on {filesystem_of(workdir)}"
    report.notes.append(
        f"A random rotation costs the store {writes:g} write transactions (BEGIN IMMEDIATE ... "
        f"COMMIT, each fsynced) and {statements:g} SQL statements in all, counted during the "
        "warm-up; the sqlite baseline is one such transaction.")


# --- postgres ----------------------------------------------------------------------------


def import_servers() -> ModuleType:
    """tests/servers.py: the private PostgreSQL cluster the test suite starts."""
    sys.path.insert(0, str(REPO / "tests"))
    return importlib.import_module("servers")


async def pg_baseline(cluster: Any, roles: Sequence[str], rounds: int, *,
                      verifier: bool) -> tuple[Timing, Timing]:
    """ALTER ROLE over a persistent admin connection, then a fresh login + SELECT 1."""
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    from rotator_plugins.postgres import quote_ident, quote_literal, scram_sha256_verifier

    admins = {role: await cluster.connect() for role in roles}
    try:
        async def set_and_login(role: str) -> None:
            password = secrets.token_urlsafe(24)
            sent = (await asyncio.to_thread(scram_sha256_verifier, password)
                    if verifier else password)
            await admins[role].execute(
                f"ALTER ROLE {quote_ident(role)} WITH PASSWORD {quote_literal(sent)}")
            conn = await asyncpg.connect(host=cluster.host, port=cluster.port, user=role,
                                         password=password, database="postgres", ssl=False,
                                         timeout=10, command_timeout=30)
            try:
                if await conn.fetchval("SELECT 1") != 1:
                    raise RuntimeError(f"SELECT 1 as {role} failed")
            finally:
                await conn.close(timeout=10)

        await warm_up(set_and_login, roles)
        return (await sequential(set_and_login, roles, rounds, BASELINE_MIN_SECONDS),
                await concurrent(set_and_login, roles, rounds, BASELINE_MIN_SECONDS))
    finally:
        for conn in admins.values():
            await conn.close(timeout=10)


async def bench_postgres(n: int, rounds: int, workdir: Path, log_sink: TextIO,
                         report: Report) -> None:
    servers = import_servers()
    try:
        bindir = servers.find_pg_bindir()
    except servers.ServerNotFound as exc:
        raise BenchError(f"{exc} (or run with --only random)") from None
    progress("postgres: starting a private scram-sha-256 cluster")
    cluster = servers.PostgresCluster(base_dir=servers.make_temp_dir("rotator-bench-pg-"),
                                      bindir=bindir)
    try:
        await asyncio.to_thread(cluster.start)
        version = await cluster.fetchval("SHOW server_version")
        report.facts["postgresql"] = (f"{version}, private cluster on 127.0.0.1, "
                                      "scram-sha-256, fsync=off (test settings)")
        roles = [f"bench_role_{i:03d}" for i in range(n)]
        for role in roles:
            await cluster.create_role(role, secrets.token_urlsafe(24))
        os.environ[PG_ADMIN_ENV] = cluster.admin_dsn + "?sslmode=disable"
        base = workdir / "postgres"
        base.mkdir()
        names = [f"bench/pg-{i:03d}" for i in range(n)]
        config = write_config(base / "rotator.toml", base / "rotator.db", [
            (name, "postgres", {"admin_dsn": f"${{env:{PG_ADMIN_ENV}}}", "role": role,
                                "sslmode": "disable"})
            for name, role in zip(names, roles, strict=True)])
        async with rotator_app(config, log_sink) as app:
            seq, conc, _ = await time_rotator(app, names, rounds, "postgres")
        for verifier, baseline in ((True, "ALTER ROLE verifier+login"),
                                   (False, "ALTER ROLE plaintext+login")):
            progress(f"postgres: baseline ({baseline})")
            base_seq, base_conc = await pg_baseline(cluster, roles, rounds, verifier=verifier)
            report.baselines[f"{baseline}, sequential"] = base_seq
            report.baselines[f"{baseline}, concurrent"] = base_conc
            report.rows += [Row("postgres, sequential", seq, baseline, base_seq),
                            Row(f"postgres, concurrent x{n}", conc, baseline, base_conc)]
        report.notes += [
            "The postgres plugin computes the SCRAM-SHA-256 verifier client-side (PBKDF2-SHA-256, "
            "4096 iterations, in a worker thread), so the plaintext never reaches the server or "
            "its log. 'verifier' baselines do the same; 'plaintext' ones send the password and "
            "let the server hash it (and log it: log_statement=all).",
            "Per rotation the plugin opens a fresh admin connection and checks pg_roles before "
            "ALTER ROLE; the baselines reuse one open admin connection per role. Every login "
            "(admin or role) costs the client a further PBKDF2 for SCRAM authentication.",
        ]
    finally:
        os.environ.pop(PG_ADMIN_ENV, None)
        progress("postgres: stopping the cluster")
        await asyncio.to_thread(cluster.destroy)


# --- machine facts and output --------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """'ext4 (/dev/vda)' for the mount holding ``path``; 'unknown' off Linux."""
    best: tuple[int, str] = (-1, "unknown")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype, *_ = line.split()
            mount = mount.replace("\\040", " ")
            inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
            if inside and len(mount) > best[0]:
                best = (len(mount), f"{fstype} ({device})")
    return best[1]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, str]:
    return {
        "date": date.today().isoformat(),
        "cores": f"{os.cpu_count()} ({cpu_model()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
    }


def render(report: Report, n: int, rounds: int) -> str:
    out = ["rotator rotations per second", ""]
    width = max(len(k) for k in report.facts)
    out += [f"  {key:<{width}}  {value}" for key, value in report.facts.items()]
    out += ["", f"  {n} secrets x {rounds} rounds = {n * rounds} timed rotations per row.",
            "  A warm-up round (one rotation per secret) ran before each timing and is excluded.",
            ""]
    header = ("scenario", "rotations", "seconds", "rotations/s", "baseline",
              "baseline rot/s", "ratio")
    table = [header] + [
        (r.scenario, str(r.rotator.count), f"{r.rotator.seconds:.3f}", f"{r.rotator.rate:.1f}",
         r.baseline_name, f"{r.baseline.rate:.1f}", f"{r.ratio:.2f}")
        for r in report.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    numeric = {1, 2, 3, 5, 6}

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()

    out += [fmt(table[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in table[1:]]
    out += ["", "ratio = rotator rotations/s / baseline rotations/s (1.00 = no overhead).", "",
            f"baselines (same run, same warm-up rule; whole rounds repeated until each ran "
            f"for at least {BASELINE_MIN_SECONDS:g} s):"]
    bwidth = max(len(k) for k in report.baselines)
    out += [f"  {name:<{bwidth}}  {t.count:>4} in {t.seconds:7.3f} s = {t.rate:8.1f}/s"
            for name, t in report.baselines.items()]
    out += ["", "notes:"]
    out += [textwrap.fill(note, 96, initial_indent="  - ", subsequent_indent="    ") for note in [
        "rotator runs as the daemon would: config loaded from TOML, plugins from entry points, "
        "values sealed with AES-256-GCM, info-level logs rendered (to /dev/null), bus disabled "
        "(rotations write their events to the outbox; nothing waits on NATS).",
        "concurrent: per round, every secret rotates at once (asyncio TaskGroup). The SQLite "
        "store serialises its transactions on one connection, so only plugin I/O overlaps.",
        *report.notes]]
    return "\n".join(out)


@contextlib.contextmanager
def scratch() -> Iterator[tuple[Path, TextIO]]:
    with tempfile.TemporaryDirectory(prefix="rotator-bench-") as tmp, \
            open(os.devnull, "w") as sink:
        yield Path(tmp), sink


async def main_async(args: argparse.Namespace) -> Report:
    report = Report(facts=machine_facts())
    os.environ[MASTER_KEY_ENV] = MasterKey.generate().encode()
    try:
        with scratch() as (workdir, sink):
            if args.only in (None, "random"):
                await bench_random(args.secrets, args.rounds, workdir, sink, report)
            if args.only in (None, "postgres"):
                await bench_postgres(args.secrets, args.rounds, workdir, sink, report)
    finally:
        os.environ.pop(MASTER_KEY_ENV, None)
    return report


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="rotator rotations per second beside raw baselines")
    p.add_argument("--secrets", type=positive, default=20, metavar="N",
                   help="secrets per scenario (default 20)")
    p.add_argument("--rounds", type=positive, default=3, metavar="R",
                   help="timed rotations per secret, per mode (default 3)")
    p.add_argument("--only", choices=("random", "postgres"), help="run one scenario")
    args = p.parse_args(argv)
    try:
        report = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(render(report, args.secrets, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
