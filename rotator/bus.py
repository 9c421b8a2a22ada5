"""The outbox relay: publishes stored events to NATS JetStream, in order, at least once.

Events are written to the store's outbox in the same transaction as the state
change they announce. The relay publishes them with ``Nats-Msg-Id`` = event id, so
JetStream's duplicate window drops a re-send after a crash between publish and
mark. While NATS is unreachable, events wait in the outbox; the relay says so
once, retries with backoff, and flushes the backlog when NATS returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
from typing import Any
from urllib.parse import urlsplit

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from rotator.config import BusConfig
from rotator.errors import RotatorError
from rotator.store.base import Store

__all__ = ["DUPLICATE_WINDOW_S", "OutboxRelay", "StreamMismatch"]

log = structlog.get_logger("rotator.bus")

#: JetStream de-duplicates by message id within this window; a stream rotator creates keeps
#: an hour of ids, so a publish repeated after a crash and a long outage is still dropped.
DUPLICATE_WINDOW_S = 3600.0


class StreamMismatch(NatsError):
    """The configured stream exists but does not capture rotator's subjects."""


class PlainTextRefused(NatsError):
    """A ``tls://`` bus URL pointed at a server that offers no TLS."""


async def _require_tls(url: str, connect_timeout: float) -> None:
    """For a ``tls://`` URL, refuse a server that does not offer TLS *before* any credential
    is sent (nats-py would otherwise fall back to plain text)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    async with asyncio.timeout(connect_timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    try:
        info = json.loads(line.decode().partition(" ")[2])
    except ValueError:
        info = {}
    if not (info.get("tls_required") or info.get("tls_available")):
        raise PlainTextRefused(f"bus.url uses tls:// but the server at {host}:{port} does not "
                               "offer TLS; refusing to send credentials in plain text")


class OutboxRelay:
    """Moves events from the store's outbox to JetStream."""

    def __init__(self, cfg: BusConfig, store: Store) -> None:
        self._cfg = cfg
        self._store = store
        self._nc: NATS | None = None
        self._js: Any = None
        self._wake = asyncio.Event()
        self._down_reported = False
        self.published = 0

    async def _backlog(self) -> int | str:
        try:
            return await self._store.outbox_backlog()
        except RotatorError:
            return "unknown"

    def notify(self) -> None:
        """Tell the relay there is something new in the outbox."""
        self._wake.set()

    async def _connect(self) -> None:
        async def _quiet(*_a: Any) -> None:
            return None

        tls: ssl.SSLContext | None = None
        if self._cfg.url.startswith("tls://"):
            await _require_tls(self._cfg.url, self._cfg.connect_timeout)
            tls = ssl.create_default_context()
        nc = await nats.connect(
            servers=[self._cfg.url], connect_timeout=self._cfg.connect_timeout, tls=tls,
            # One attempt: we reconnect ourselves, with backoff, from run(). (nats-py treats
            # max_reconnect_attempts=0 as "retry forever" during the initial connect.)
            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
            error_cb=_quiet, disconnected_cb=_quiet, closed_cb=_quiet, reconnected_cb=_quiet,
            name="rotator")
        try:
            js = nc.jetstream(timeout=self._cfg.publish_timeout)
            await self._ensure_stream(js)
        except BaseException:
            # Never leak a half-set-up connection (each retry would add one).
            try:
                async with asyncio.timeout(self._cfg.publish_timeout):
                    await nc.close()
            except (TimeoutError, NatsError, OSError):
                pass
            raise
        self._nc, self._js = nc, js

    async def _ensure_stream(self, js: Any) -> None:
        """The stream exists and captures ``<prefix>.>``; created or extended if needed."""
        wanted = f"{self._cfg.subject_prefix}.>"
        try:
            info = await js.stream_info(self._cfg.stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=self._cfg.stream, subjects=[wanted],
                                             duplicate_window=DUPLICATE_WINDOW_S))
            log.info("bus.stream_created", stream=self._cfg.stream, subjects=[wanted],
                     duplicate_window_s=DUPLICATE_WINDOW_S)
            return
        subjects = list(info.config.subjects or [])
        if wanted not in subjects and ">" not in subjects:
            info.config.subjects = [*subjects, wanted]
            try:
                await js.update_stream(info.config)
            except NatsError as exc:
                raise StreamMismatch(
                    f"stream {self._cfg.stream} does not capture {wanted} and cannot be "
                    f"extended ({type(exc).__name__}: {exc}); set bus.stream to another "
                    "name or add the subject to the stream") from exc
            log.warning("bus.stream_extended", stream=self._cfg.stream, added=wanted)

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                async with asyncio.timeout(self._cfg.publish_timeout):
                    await nc.close()
            except (TimeoutError, NatsError, OSError):
                pass

    async def flush_once(self) -> int:
        """Publish everything pending; returns how many were published. Raises when NATS fails."""
        if self._js is None or self._nc is None or not self._nc.is_connected:
            await self._disconnect()
            async with asyncio.timeout(self._cfg.connect_timeout + self._cfg.publish_timeout):
                await self._connect()
        sent = 0
        while True:
            rows = await self._store.pending_events(100)
            if not rows:
                return sent
            for row in rows:
                async with asyncio.timeout(self._cfg.publish_timeout):
                    await self._js.publish(row.subject, row.payload,
                                           headers={"Nats-Msg-Id": row.event_id})
                await self._store.mark_published([row.event_id])
                sent += 1
                self.published += 1

    async def try_flush(self) -> tuple[int, int]:
        """One attempt (for one-shot CLI commands): returns (published, still pending)."""
        try:
            sent = await self.flush_once()
        except (TimeoutError, NatsError, OSError) as exc:
            log.info("bus.unreachable", url=self._cfg.display_url, error=type(exc).__name__,
                     backlog=await self._store.outbox_backlog(),
                     hint="events wait in the outbox; the daemon delivers them when NATS is back")
            sent = 0
        finally:
            await self._disconnect()
        return sent, await self._store.outbox_backlog()

    async def run(self, *, poll: float = 5.0, max_backoff: float = 30.0) -> None:
        """Relay until cancelled."""
        backoff = 1.0
        while True:
            self._wake.clear()
            try:
                sent = await self.flush_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any one failure
                backlog = await self._backlog()
                if not self._down_reported:
                    if isinstance(exc, StreamMismatch | PlainTextRefused):
                        log.error("bus.stream_mismatch", error=str(exc), backlog=backlog)
                    elif isinstance(exc, TimeoutError | NatsError | OSError):
                        log.warning("bus.unreachable", url=self._cfg.display_url,
                                    error=type(exc).__name__, backlog=backlog,
                                    hint="rotations go on; events wait in the outbox until "
                                         "NATS is reachable")
                    else:
                        log.error("bus.relay_error", error=f"{type(exc).__name__}: {exc}",
                                  backlog=backlog, hint="retrying with backoff")
                    self._down_reported = True
                await self._disconnect()
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, max_backoff)
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            if self._down_reported:
                log.info("bus.reconnected", url=self._cfg.display_url, flushed=sent)
                self._down_reported = False
            elif sent:
                log.debug("bus.published", count=sent)
            backoff = 1.0
            try:
                async with asyncio.timeout(poll):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def close(self, *, drain_timeout: float = 3.0) -> None:
        """Last flush attempt, then disconnect."""
        if self._nc is not None and self._nc.is_connected:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self.flush_once()
            except (TimeoutError, NatsError, OSError):
                pass
        await self._disconnect()
