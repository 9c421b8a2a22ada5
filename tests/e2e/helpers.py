"""Shared helpers for the end-to-end tests: config files, the real CLI, events, leak scans.

Every helper drives rotator from the outside: the ``rotator`` command runs as a
subprocess in the test's directory (relative paths in the config resolve against
it), events are read back from JetStream with a fresh consumer, and files are
scanned as raw bytes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

CONFIG_NAME = "rotator.toml"
CRASHRUN = Path(__file__).with_name("crashrun.py")
#: Environment variable the configs read the admin DSN from (never written to a file).
ADMIN_DSN_ENV = "E2E_PG_ADMIN_DSN"

# --- config ---------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)   # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(lines: list[str], header: str, values: Mapping[str, object]) -> None:
    lines.append(header)
    lines.extend(f"{key} = {_toml_value(val)}" for key, val in values.items())
    lines.append("")


@dataclass(frozen=True, slots=True)
class Bus:
    """Where a test's events go: its own stream and subject prefix on a NATS server."""

    url: str
    stream: str
    prefix: str

    def options(self, **extra: object) -> dict[str, object]:
        return {"url": self.url, "stream": self.stream, "subject_prefix": self.prefix,
                "connect_timeout": 1, "publish_timeout": 3, **extra}


@dataclass(frozen=True, slots=True)
class Role:
    """A login role on the private cluster and the password it was created with."""

    name: str
    initial_password: str


def secret(name: str, plugin: str, schedule: str = "1h",
           **options: object) -> dict[str, object]:
    """One ``[[secrets]]`` entry."""
    return {"name": name, "plugin": plugin, "schedule": schedule, "options": options}


def pg_secret(name: str, role: str, schedule: str = "1h", **options: object) -> dict[str, object]:
    """A postgres secret whose admin DSN comes from the environment."""
    return secret(name, "postgres", schedule, admin_dsn=f"${{env:{ADMIN_DSN_ENV}}}", role=role,
                  sslmode="disable", **options)


def write_config(directory: Path, secrets: Sequence[Mapping[str, object]], *,
                 bus: Bus | None = None, engine: Mapping[str, object] | None = None,
                 log: Mapping[str, object] | None = None) -> Path:
    """Write ``rotator.toml`` into ``directory`` (store and key under ``var/``)."""
    lines: list[str] = []
    _table(lines, "[store]", {"url": "sqlite:///var/rotator.db"})
    _table(lines, "[crypto]", {"master_key_file": "var/master.key"})
    _table(lines, "[bus]", bus.options() if bus else {"enabled": False})
    _table(lines, "[engine]", {"step_timeout": 20, "retry_base_delay": 0.2, **(engine or {})})
    if log:
        _table(lines, "[log]", log)
    for sec in secrets:
        options = sec.get("options") or {}
        assert isinstance(options, Mapping)
        _table(lines, "[[secrets]]", {k: v for k, v in sec.items() if k != "options"})
        if options:
            _table(lines, "[secrets.options]", options)
    path = directory / CONFIG_NAME
    path.write_text("\n".join(lines))
    return path


# --- running the CLI ------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a rotator subprocess: ours, minus ROTATOR_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROTATOR_", "E2E_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rotator.cli", "--config", CONFIG_NAME, *args]


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Result:
        """Self, after asserting exit status 0 (with the output in the failure message)."""
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stdout}\n{self.stderr}"
        return self

    def json(self) -> Any:
        return json.loads(self.ok().stdout)

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@dataclass(frozen=True, slots=True)
class Workdir:
    """A directory rotator runs in (config, ``var/``) and the environment it runs with."""

    path: Path
    env: Mapping[str, str]

    @property
    def var(self) -> Path:
        return self.path / "var"

    def config(self, secrets: Sequence[Mapping[str, object]], **kwargs: Any) -> Path:
        return write_config(self.path, secrets, **kwargs)

    def run(self, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 60.0) -> Result:
        """Run one ``rotator`` command here and wait for it."""
        out = subprocess.run(command(*args), cwd=self.path,
                             env=child_env({**self.env, **(env or {})}), capture_output=True,
                             text=True, timeout=timeout, check=False)
        return Result(out.returncode, out.stdout, out.stderr)

    def start(self, argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
              log_name: str = "daemon.log") -> Daemon:
        """Start ``rotator run`` (or ``argv``) in the background."""
        return Daemon(self.path, argv or command("run"), child_env({**self.env, **(env or {})}),
                      self.path / log_name)

    def versions(self, name: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.run("versions", name, "--json").json()
        return rows

    def value(self, name: str, version: int) -> dict[str, str]:
        """A stored version's fields, through ``rotator get --version N --json``."""
        doc = self.run("get", name, "--version", str(version), "--json").json()
        assert doc["version"] == version
        fields: dict[str, str] = doc["value"]
        return fields

    def field(self, name: str, field: str, version: int | None = None) -> str:
        """One stored field through ``rotator get --field`` (the current version by default)."""
        args = ["get", name, "--field", field]
        if version is not None:
            args += ["--version", str(version)]
        out = self.run(*args).ok().stdout
        assert out.endswith("\n")
        return out[:-1]

    def password(self, name: str, version: int | None = None) -> str:
        return self.field(name, "password", version)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.run("status", "--json").json()
        return doc

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Read the store directly (read-only), for facts the CLI does not print."""
        conn = sqlite3.connect(f"file:{self.var / 'rotator.db'}?mode=ro", uri=True, timeout=10)
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def execute(self, sql: str, params: Sequence[object] = ()) -> None:
        """Change the store directly (to simulate what only time would do)."""
        conn = sqlite3.connect(self.var / "rotator.db", timeout=10)
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()


class Daemon:
    """A background rotator process whose output (stdout and stderr) goes to a file."""

    def __init__(self, cwd: Path, argv: Sequence[str], env: Mapping[str, str],
                 log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env),
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the log", alive=self)

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took). Kills it if it overstays."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit within {timeout}s of SIGTERM\n{self.log()}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL and reap (a zombie would still look alive to the next process)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, *,
               alive: Daemon | None = None, every: float = 0.1) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` or if ``alive`` exits first."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None and alive.proc.poll() is not None:
            raise AssertionError(f"process exited ({alive.proc.returncode}) before {what}\n"
                                 f"{alive.log()}")
        if time.monotonic() > deadline:
            extra = f"\n{alive.log()}" if alive is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(every)


# --- reading state back ---------------------------------------------------------------


def labelled(rows: Sequence[Mapping[str, Any]], label: str) -> int | None:
    """The version carrying ``label`` in ``versions --json`` output, if any."""
    found = [r["version"] for r in rows if label in r["labels"]]
    assert len(found) <= 1, f"label {label} on several versions: {rows}"
    return found[0] if found else None


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- leaks ----------------------------------------------------------------------------


def find_leaks(root: Path, needles: Iterable[str]) -> list[str]:
    """Every (file, needle index) where a needle occurs in a file under ``root``, as bytes."""
    wanted = [n.encode() for n in needles if n]
    assert wanted, "nothing to look for"
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits.extend(f"{path.relative_to(root)} contains secret #{i}"
                    for i, needle in enumerate(wanted) if needle in data)
    return hits


def leaked_in(text: str, needles: Iterable[str]) -> list[int]:
    """Indexes of the needles found in ``text`` (indexes, so a failure prints no secret)."""
    return [i for i, needle in enumerate(needles) if needle and needle in text]


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    subject: str
    raw: bytes
    event: dict[str, Any]
    msg_id: str | None


async def _consume(url: str, stream: str, subject: str, idle: float) -> list[Received]:
    nc = await nats.connect(servers=[url], connect_timeout=3, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0))
        out: list[Received] = []
        while True:
            try:
                batch = await sub.fetch(100, timeout=idle)
            except NatsTimeoutError:
                break
            for msg in batch:
                headers = msg.headers or {}
                out.append(Received(msg.subject, msg.data, json.loads(msg.data),
                                    headers.get("Nats-Msg-Id")))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def consume(bus: Bus, subject: str = ">", *, idle: float = 1.0) -> list[Received]:
    """Every event stored on the test's stream under ``<prefix>.<subject>``, oldest first.

    A fresh consumer (deliver all) fetches until nothing arrives for ``idle`` seconds.
    """
    return await _consume(bus.url, bus.stream, f"{bus.prefix}.{subject}", idle)


def by_version(events: Iterable[Received], kind: str) -> dict[int, int]:
    """How many events of ``kind`` each version got."""
    counts: dict[int, int] = {}
    for ev in events:
        if ev.event["type"].endswith("." + kind):
            version = ev.event["data"]["version"]
            counts[version] = counts.get(version, 0) + 1
    return counts


CLOUDEVENT_FIELDS = ("specversion", "id", "type", "source", "subject", "time", "data")


def check_cloudevent(ev: Received, *, kind: str, name: str, bus: Bus) -> None:
    """The CloudEvents 1.0 attributes rotator promises, for one received event."""
    doc = ev.event
    missing = [f for f in CLOUDEVENT_FIELDS if not doc.get(f)]
    assert not missing, f"missing CloudEvents attributes {missing}: {sorted(doc)}"
    assert doc["specversion"] == "1.0"
    assert doc["type"].endswith("." + kind)
    assert doc["subject"] == name
    assert ev.subject == f"{bus.prefix}.{kind}.{name.replace('/', '.')}"
    assert ev.msg_id == doc["id"], "the JetStream message id must be the event id"
    parse_time(doc["time"])
    assert doc["data"]["name"] == name
