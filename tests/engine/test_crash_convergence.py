"""Property: interrupting a rotation at any await and resuming it always converges."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from engine.test_engine import NAME, Backend, FakePlugin, make_config
from hypothesis import given, settings
from hypothesis import strategies as st

from rotator.crypto import Envelope, MasterKey
from rotator.engine import Engine
from rotator.store.sqlite import SQLiteStore
from rotator.types import Label, RotationState

KEY = MasterKey.generate()


async def _interrupt_then_resume(ticks: list[int], rotations: int, tmp: Path) -> None:
    backend = Backend()
    async with SQLiteStore(tmp / "r.db") as store:
        def engine() -> Engine:
            return Engine(config=make_config(tmp), store=store, envelope=Envelope(KEY),
                          plugins={"fake": FakePlugin(backend)})

        for i in range(rotations):
            # Interrupt this rotation once per tick count, each time in a fresh engine
            # (a new process), then let the last one finish.
            for n in ticks if i == rotations - 1 else []:
                task = asyncio.create_task(engine().rotate(NAME))
                for _ in range(n):
                    await asyncio.sleep(0)
                    if task.done():
                        break
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                # Never locked out: the backend holds the current value or a stored candidate.
                stored = {Envelope(KEY).open(NAME, v.version, v.sealed)
                          for v in await store.list_versions(NAME)}
                assert backend.live is None or any(
                    backend.live in s.decode() for s in stored)
            result = await engine().rotate(NAME)
            assert result.state is RotationState.DONE

        assert await store.running_rotations() == []
        current = await store.get_version(NAME, label=Label.CURRENT)
        value = json.loads(Envelope(KEY).open(NAME, current.version, current.sealed))
        assert backend.live == value["password"]
        labels = [lbl for v in await store.list_versions(NAME) for lbl in v.labels]
        assert sorted(labels) == sorted(
            [Label.CURRENT] + ([Label.PREVIOUS] if rotations > 1 else []))
        events = [json.loads(r.payload) for r in await store.pending_events(10_000)]
        rotated = [e["data"]["version"] for e in events if e["type"].endswith(".rotated")]
        assert len(rotated) == len(set(rotated)) == rotations
        assert rotated[-1] == current.version


@given(ticks=st.lists(st.integers(0, 60), min_size=1, max_size=4),
       rotations=st.integers(1, 3))
@settings(max_examples=80, deadline=None)
def test_interrupted_rotations_converge(ticks: list[int], rotations: int) -> None:
    """Cancelled at arbitrary points and resumed, rotations end with one consistent current."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_interrupt_then_resume(ticks, rotations, Path(tmp)))
