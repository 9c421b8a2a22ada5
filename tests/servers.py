"""Private servers for the test suite: a nats-server with JetStream, a PostgreSQL cluster.

Each lives in its own temporary directory on a free loopback port and checks what
the machine's shared servers would not (the private PostgreSQL demands SCRAM
passwords for every login). Used through the fixtures in ``conftest.py``; usable
directly from a benchmark or a script.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

__all__ = [
    "NatsServer",
    "PostgresCluster",
    "ServerNotFound",
    "find_nats_server",
    "find_pg_bindir",
    "free_port",
    "make_temp_dir",
    "quote_ident",
    "quote_literal",
]

NATS_HINT = "nats-server not found: apt-get install nats-server"
PG_HINT = "PostgreSQL server binaries not found: apt-get install postgresql"
_LISTENING = re.compile(rb"Listening for client connections on [^\s]*:(\d+)")


class ServerNotFound(RuntimeError):
    """A server binary is not installed; the message names the Debian package."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings is on in the private cluster)."""
    return "'" + text.replace("'", "''") + "'"


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate, then kill if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --- NATS ----------------------------------------------------------------------------------


def find_nats_server() -> str:
    """Path of the nats-server binary, or ServerNotFound."""
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise ServerNotFound(NATS_HINT)
    return found


@dataclass(eq=False)
class NatsServer:
    """A private nats-server with JetStream on 127.0.0.1.

    ``start()`` the first time picks a free port (``-p -1``, read back from the log);
    after ``stop()``, ``start()`` comes back on the same port and store directory, so
    a test can take NATS down and bring it back with its streams intact.
    """

    base_dir: Path
    binary: str = field(default_factory=find_nats_server)
    port: int = 0
    startup_timeout: float = 10.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _starts: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.base_dir / "store"

    @property
    def log_path(self) -> Path:
        return self.base_dir / f"nats-{self._starts}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NatsServer:
        """Start (or restart) the server and wait until it accepts clients."""
        if self.running:
            return self
        self._starts += 1
        self.store_dir.mkdir(parents=True, exist_ok=True)
        port = str(self.port) if self.port else "-1"
        log_path = self.log_path
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-js", "-a", "127.0.0.1", "-p", port,
                 "-sd", str(self.store_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            match = _LISTENING.search(log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                break
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited at start-up:\n{self.read_log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server did not listen within {self.startup_timeout}s:\n"
                    f"{self.read_log()}")
            time.sleep(0.02)
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        """The log line comes before 'Server is ready'; wait for that too."""
        while b"Server is ready" not in self.log_path.read_bytes():
            if time.monotonic() > deadline or not self.running:
                raise RuntimeError(f"nats-server not ready:\n{self.read_log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (terminate, then kill); the port and store stay reserved for start()."""
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None

    def read_log(self) -> str:
        """The current run's log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# --- PostgreSQL ----------------------------------------------------------------------------


def find_pg_bindir() -> Path:
    """Directory holding initdb/pg_ctl (highest installed version), or ServerNotFound."""
    def version(path: str) -> tuple[int, ...]:
        num = Path(path).parent.name
        return tuple(int(p) for p in num.split(".") if p.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    for cand in candidates:
        path = Path(cand)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    raise ServerNotFound(PG_HINT)


@dataclass(eq=False)
class PostgresCluster:
    """A private PostgreSQL cluster that checks SCRAM-SHA-256 passwords on every login.

    Runs as the ``postgres`` OS user when the tests run as root (initdb refuses
    root), listens on 127.0.0.1 on a free port, keeps its socket, data and log in
    ``base_dir``, and logs every statement (``log_statement = all``) so a test can
    prove a plaintext password never reached the server.
    """

    base_dir: Path
    bindir: Path = field(default_factory=find_pg_bindir)
    host: str = "127.0.0.1"
    port: int = 0
    superuser: str = "postgres"
    superpassword: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    _started: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def admin_dsn(self) -> str:
        return (f"postgresql://{self.superuser}:{self.superpassword}"
                f"@{self.host}:{self.port}/postgres")

    def dsn(self, user: str, password: str, dbname: str = "postgres") -> str:
        """A URL for ``user`` (percent-encoded)."""
        from urllib.parse import quote
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@{self.host}:{self.port}/{quote(dbname, safe='')}")

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}):\n"
                               f"{out.stdout}\n{out.stderr}")

    def start(self) -> PostgresCluster:
        """initdb (first time) and start; returns when the server accepts connections."""
        if self._started:
            return self
        if not self.data_dir.exists():
            self._initdb()
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                  str(self.log_path), "-w", "-t", "60", "start")
        self._started = True
        return self

    def _initdb(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.superpassword + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            for path in (self.base_dir, self.socket_dir, pwfile):
                shutil.chown(path, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
                  f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                  "--locale=C", "--no-sync", timeout=120)
        pwfile.unlink()
        self.port = self.port or free_port()
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            "host  all all 127.0.0.1/32 scram-sha-256\n")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# private test cluster\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "password_encryption = 'scram-sha-256'\n"
                "log_statement = 'all'\n"
                "logging_collector = off\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 100\n"
                "shared_buffers = 32MB\n")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``pg_ctl stop -m immediate`` by default)."""
        if self._started:
            self._started = False
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode,
                      "-w", "stop")

    def destroy(self) -> None:
        """Stop and remove every file."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def read_log(self) -> str:
        """The server log (every statement, thanks to log_statement = all)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- async helpers, run on the calling test's event loop -------------------------------

    async def connect(self, user: str | None = None, password: str | None = None,
                      dbname: str = "postgres") -> Any:
        """An asyncpg connection (superuser by default). Close it."""
        return await asyncpg.connect(
            host=self.host, port=self.port, user=user or self.superuser,
            password=self.superpassword if password is None else password,
            database=dbname, ssl=False, timeout=10, command_timeout=30)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement as the superuser."""
        conn = await self.connect()
        try:
            status: str = await conn.execute(sql, *args)
            return status
        finally:
            await conn.close(timeout=10)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """First column of the first row of a query run as the superuser."""
        conn = await self.connect()
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close(timeout=10)

    async def create_role(self, name: str, password: str, *, superuser: bool = False,
                          createrole: bool = False) -> None:
        """CREATE ROLE ... LOGIN PASSWORD (hashed server-side with SCRAM)."""
        extra = (" SUPERUSER" if superuser else "") + (" CREATEROLE" if createrole else "")
        await self.execute(
            f"CREATE ROLE {quote_ident(name)} LOGIN{extra} PASSWORD {quote_literal(password)}")

    async def drop_role(self, name: str) -> None:
        """DROP ROLE IF EXISTS."""
        await self.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")

    async def can_login(self, user: str, password: str, dbname: str = "postgres") -> bool:
        """Whether ``user`` can log in with ``password`` (over TCP, SCRAM checked)."""
        try:
            conn = await self.connect(user, password, dbname)
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
            return False
        await conn.close(timeout=10)
        return True


def make_temp_dir(prefix: str) -> Path:
    """A fresh directory under the system temp dir (world-traversable for the postgres user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
