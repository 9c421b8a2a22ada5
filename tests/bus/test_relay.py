"""The outbox relay against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig
from servers import NatsServer

from rotator.bus import DUPLICATE_WINDOW_S, OutboxRelay, PlainTextRefused
from rotator.config import BusConfig
from rotator.errors import StoreError
from rotator.events import Event, EventKind
from rotator.store.sqlite import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "r.db") as s:
        yield s


def bus_config(url: str) -> BusConfig:
    token = secrets.token_hex(4)
    return BusConfig(url=url, subject_prefix=f"t{token}", stream=f"T{token}",
                     connect_timeout=2.0, publish_timeout=2.0)


async def put_event(store: SQLiteStore, prefix: str, version: int) -> Event:
    """Write one event into the outbox the way a state change does."""
    store.subject_prefix = prefix
    ev = Event(kind=EventKind.ROTATED, name="a/b", data={"version": version})
    async with store._tx() as db:
        await store._outbox(db, [ev])
    return ev


async def received(url: str, stream: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("", durable=None, stream=stream,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        out: list[dict[str, Any]] = []
        while True:
            try:
                msgs = await sub.fetch(50, timeout=0.5)
            except nats.errors.TimeoutError:
                return out
            for m in msgs:
                out.append(json.loads(m.data))
                await m.ack()
    finally:
        await nc.close()


async def test_relay_creates_the_stream_and_publishes_in_order(
        nats_server: NatsServer, store: SQLiteStore) -> None:
    """Pending events are published once each, in order, into a stream it creates."""
    cfg = bus_config(nats_server.url)
    ids = [(await put_event(store, cfg.subject_prefix, v)).id for v in (1, 2, 3)]
    relay = OutboxRelay(cfg, store)
    assert await relay.flush_once() == 3
    assert await relay.flush_once() == 0
    await relay.close()
    got = await received(nats_server.url, cfg.stream)
    assert [e["id"] for e in got] == ids
    assert await store.outbox_backlog() == 0
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(cfg.stream)
        assert info.config.duplicate_window == DUPLICATE_WINDOW_S
    finally:
        await nc.close()


async def test_republished_event_is_dropped_by_message_id(
        nats_server: NatsServer, store: SQLiteStore) -> None:
    """A publish repeated after a crash between publish and mark arrives only once."""
    cfg = bus_config(nats_server.url)
    ev = await put_event(store, cfg.subject_prefix, 1)
    relay = OutboxRelay(cfg, store)
    await relay.flush_once()
    await store.db.execute("UPDATE outbox SET published_at = NULL")   # "crash" before mark
    assert await relay.flush_once() == 1
    await relay.close()
    assert [e["id"] for e in await received(nats_server.url, cfg.stream)] == [ev.id]


async def test_existing_stream_without_our_subjects_is_extended(
        nats_server: NatsServer, store: SQLiteStore) -> None:
    """A stream that exists with other subjects gets ours added instead of looping forever."""
    cfg = bus_config(nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=cfg.stream,
                                                     subjects=[f"{cfg.subject_prefix}x.>"]))
    finally:
        await nc.close()
    await put_event(store, cfg.subject_prefix, 1)
    relay = OutboxRelay(cfg, store)
    assert await relay.flush_once() == 1
    await relay.close()
    assert len(await received(nats_server.url, cfg.stream)) == 1


async def test_relay_survives_a_store_error(nats_server: NatsServer, store: SQLiteStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A store failure while relaying is logged and retried; the relay keeps running."""
    cfg = bus_config(nats_server.url)
    await put_event(store, cfg.subject_prefix, 1)
    relay = OutboxRelay(cfg, store)
    real = store.pending_events
    calls = 0

    async def flaky(limit: int = 100) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("database is locked")
        return await real(limit)

    monkeypatch.setattr(store, "pending_events", flaky)
    task = asyncio.create_task(relay.run(poll=0.2))
    try:
        for _ in range(50):
            if await store.outbox_backlog() == 0:
                break
            relay.notify()
            await asyncio.sleep(0.1)
        assert not task.done(), "the relay task died"
        assert await store.outbox_backlog() == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await relay.close()


async def test_tls_url_refuses_a_plain_text_server(nats_server: NatsServer,
                                                   store: SQLiteStore) -> None:
    """A tls:// bus URL never sends credentials to a server that offers no TLS."""
    cfg = BusConfig(url=f"tls://user:hunter2-bus@127.0.0.1:{nats_server.port}",
                    subject_prefix="tlst", stream="TLST", connect_timeout=2.0,
                    publish_timeout=2.0)
    relay = OutboxRelay(cfg, store)
    with pytest.raises(PlainTextRefused, match="does not offer TLS") as info:
        await relay.flush_once()
    assert "hunter2" not in str(info.value)


async def test_unreachable_bus_is_logged_once_with_the_token_masked(store: SQLiteStore) -> None:
    """While NATS is down the relay says so once, and never prints a token from the URL."""
    from servers import free_port
    from structlog.testing import capture_logs

    cfg = BusConfig(url=f"nats://s3cr3t-token@127.0.0.1:{free_port()}", subject_prefix="x",
                    stream="X", connect_timeout=0.5, publish_timeout=0.5)
    await put_event(store, "x", 1)
    relay = OutboxRelay(cfg, store)
    with capture_logs() as logs:
        task = asyncio.create_task(relay.run(poll=0.1, max_backoff=0.2))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    down = [e for e in logs if e["event"] == "bus.unreachable"]
    assert len(down) == 1 and down[0]["backlog"] == 1
    assert "s3cr3t" not in repr(logs)
