"""Composition root: builds store, crypto, plugins, engine, relay and scheduler; owns shutdown.

Shutdown order on SIGTERM/SIGINT: pause the scheduler → give in-flight rotations
``engine.shutdown_grace`` seconds → cancel the rest (they resume on the next start)
→ last outbox flush and NATS close → close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from rotator.bus import OutboxRelay
from rotator.config import Config, load_config
from rotator.crypto import Envelope, MasterKey
from rotator.engine import Engine
from rotator.errors import RotatorError
from rotator.plugin_api import RotationPlugin
from rotator.registry import discover_plugins
from rotator.scheduler import Scheduler
from rotator.store.sqlite import SQLiteStore

__all__ = ["App", "DaemonRunning", "daemon_lock", "load", "load_master_key", "open_app",
           "run_daemon"]

log = structlog.get_logger("rotator.app")


def load(path: str | Path) -> tuple[Config, dict[str, type]]:
    """Load the config, with the plugins it refers to loaded and its options validated."""
    raw = load_config(path)
    loaded, broken = discover_plugins()
    for sec in raw.secrets:
        if sec.plugin in broken:
            raise broken[sec.plugin]
    for name, exc in broken.items():
        log.warning("plugin.skipped", plugin=name, error=str(exc))
    return load_config(path, plugins=loaded), loaded


def load_master_key(cfg: Config) -> MasterKey:
    if cfg.crypto.master_key_env:
        return MasterKey.load_env(cfg.crypto.master_key_env)
    assert cfg.crypto.master_key_file is not None
    return MasterKey.load_file(cfg.crypto.master_key_file)


@dataclass(slots=True)
class App:
    config: Config
    store: SQLiteStore
    engine: Engine
    relay: OutboxRelay


@contextlib.asynccontextmanager
async def open_app(cfg: Config, plugin_classes: dict[str, type]) -> AsyncIterator[App]:
    """Everything a command needs, closed in reverse order."""
    master = await asyncio.to_thread(load_master_key, cfg)
    store = SQLiteStore(cfg.store.path)
    store.subject_prefix = cfg.bus.subject_prefix
    await store.open()
    try:
        instances: dict[str, RotationPlugin] = {
            name: plugin_classes[name]() for name in {s.plugin for s in cfg.secrets}}
        relay = OutboxRelay(cfg.bus, store)
        engine = Engine(config=cfg, store=store, envelope=Envelope(master), plugins=instances,
                        on_event=relay.notify)
        yield App(cfg, store, engine, relay)
    finally:
        await store.close()


class DaemonRunning(RotatorError):
    """Another daemon already runs on this store."""


@contextlib.contextmanager
def daemon_lock(store_path: Path) -> Iterator[None]:
    """One daemon per SQLite store: an exclusive lock on ``<store>.lock``, held while running.

    The lock goes away with the process, however it ends. (A shared PostgreSQL store will
    coordinate several daemons with per-secret leases instead.)
    """
    path = store_path.with_name(store_path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise DaemonRunning(f"another rotator daemon (pid {holder}) is already running on "
                                f"{store_path}; stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def run_daemon(cfg: Config, plugin_classes: dict[str, type],
                     stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set)."""
    with daemon_lock(cfg.store.path):
        await _run_daemon(cfg, plugin_classes, stop or asyncio.Event())


async def _run_daemon(cfg: Config, plugin_classes: dict[str, type], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with open_app(cfg, plugin_classes) as app:
            relay_task = asyncio.create_task(app.relay.run(), name="outbox-relay") \
                if cfg.bus.enabled else None
            try:
                await _serve(cfg, app, stop)
            finally:
                if relay_task is not None:
                    relay_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await relay_task
                    await app.relay.close(drain_timeout=2.0)
                log.info("daemon.stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _serve(cfg: Config, app: App, stop: asyncio.Event) -> None:
    """Schedule rotations until ``stop``; then let in-flight ones finish or park them."""
    scheduler = Scheduler(cfg, app.store, app.engine)
    await scheduler.plan()
    sched_task = asyncio.create_task(scheduler.run(), name="scheduler")
    log.info("daemon.started", secrets=len(cfg.secrets), store=str(cfg.store.path),
             bus=cfg.bus.display_url if cfg.bus.enabled else "disabled")
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stop_wait, sched_task}, return_when=asyncio.FIRST_COMPLETED)
    crashed = sched_task.exception() if sched_task in done else None
    stop_wait.cancel()
    if crashed is not None:
        log.error("daemon.scheduler_failed", error=f"{type(crashed).__name__}: {crashed}")
    log.info("daemon.stopping", in_flight=app.engine.running())
    scheduler.pause()
    if not sched_task.done():
        sched_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sched_task
    inflight = set(scheduler.tasks)
    if inflight:
        _, pending = await asyncio.wait(inflight, timeout=cfg.engine.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
            log.warning("daemon.rotations_interrupted", count=len(pending),
                        hint="they resume on the next start")
    if crashed is not None:
        raise crashed
