"""Fixtures for the end-to-end tests: a role to rotate, a private event stream, a workdir."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from e2e.helpers import ADMIN_DSN_ENV, Bus, Role, Workdir
from servers import NatsServer, PostgresCluster


@pytest.fixture
async def role(private_pg: PostgresCluster, unique_name: str) -> AsyncIterator[Role]:
    """A fresh login role, dropped afterwards."""
    initial = "initial-" + secrets.token_urlsafe(12)
    await private_pg.create_role(unique_name, initial)
    yield Role(unique_name, initial)
    await private_pg.drop_role(unique_name)


@pytest.fixture
def work(tmp_path: Path) -> Workdir:
    """The test's directory for rotator, with no extra environment."""
    return Workdir(tmp_path, {})


@pytest.fixture
def pg_work(tmp_path: Path, private_pg: PostgresCluster) -> Workdir:
    """The test's directory, run with the admin DSN in the environment (never in a file)."""
    return Workdir(tmp_path, {ADMIN_DSN_ENV: private_pg.admin_dsn})


@pytest.fixture
def bus(nats_server: NatsServer) -> Bus:
    """A stream and subject prefix of this test's own on the session's NATS server."""
    token = secrets.token_hex(4)
    return Bus(url=nats_server.url, stream=f"E2E_{token}", prefix=f"e2e_{token}")
