"""Session-wide fixtures: private servers and unique names.

Servers are real and private (temp dir, free loopback port). A missing server
binary fails the run with the Debian package to install; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator

import pytest
from servers import (
    NatsServer,
    PostgresCluster,
    ServerNotFound,
    find_nats_server,
    find_pg_bindir,
    make_temp_dir,
)


def _nats_binary() -> str:
    """The nats-server binary, or a failed run naming the package (never a skip)."""
    try:
        return find_nats_server()
    except ServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream shared by the session; tests must not stop it."""
    binary = _nats_binary()
    base = make_temp_dir("rotator-nats-")
    server = NatsServer(base_dir=base, binary=binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def nats_factory() -> Iterator[Callable[[], NatsServer]]:
    """Start fresh private nats-servers (for tests that stop and restart one)."""
    binary = _nats_binary()
    started: list[NatsServer] = []

    def start() -> NatsServer:
        server = NatsServer(base_dir=make_temp_dir("rotator-nats-"), binary=binary)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
            shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster that checks SCRAM passwords, shared by the session."""
    try:
        bindir = find_pg_bindir()
    except ServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    cluster = PostgresCluster(base_dir=make_temp_dir("rotator-pg-"), bindir=bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test uses: lower-case letters, digits and '_', at most 40 chars."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:24]
    return f"t_{stem}_{secrets.token_hex(4)}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (CI=true) a skipped test fails the run: a skip must never count as a pass."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
