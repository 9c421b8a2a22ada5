"""Run the rotator CLI with a hang point, so a test can SIGKILL it inside a rotation step.

Usage: ``crashrun.py ROTATOR_ARGS...`` with, in the environment,
``E2E_CRASH_POINT`` (one of :data:`POINTS`) and ``E2E_CRASH_MARKER`` (a file path).
When execution reaches the point, the marker file is written and the process
sleeps until it is killed. The patches live in this process only.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rotator.cli import main
from rotator.store.sqlite import SQLiteStore
from rotator_plugins.postgres import PostgresPlugin

#: point → (class, method, whether the original runs before the hang)
POINTS: dict[str, tuple[type, str, bool]] = {
    "create": (PostgresPlugin, "create", False),
    "set-before-server": (PostgresPlugin, "set", False),
    "set-after-server": (PostgresPlugin, "set", True),
    "test": (PostgresPlugin, "test", False),
    "finish-before-commit": (SQLiteStore, "finish_rotation", False),
}


def _hang_in(cls: type, method: str, after_original: bool, marker: Path) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(cls, method)

    @functools.wraps(original)
    async def hang(*args: Any, **kwargs: Any) -> Any:
        if after_original:
            await original(*args, **kwargs)
        marker.write_text(f"{os.getpid()}\n")
        await asyncio.sleep(3600)
        raise AssertionError("the crash runner should have been killed by now")

    setattr(cls, method, hang)


if __name__ == "__main__":
    cls, method, after = POINTS[os.environ["E2E_CRASH_POINT"]]
    _hang_in(cls, method, after, Path(os.environ["E2E_CRASH_MARKER"]))
    sys.exit(main(sys.argv[1:]))
