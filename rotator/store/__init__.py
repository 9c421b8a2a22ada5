"""Persistence: secrets, encrypted versions, labels, the rotation journal and the event outbox."""

from rotator.store.base import OutboxRow, RotationRow, SecretRow, Store, VersionRow

__all__ = ["OutboxRow", "RotationRow", "SecretRow", "Store", "VersionRow", "open_store"]


def open_store(url: str, path: object) -> Store:
    """The store for a configured URL (only SQLite today)."""
    from pathlib import Path

    from rotator.store.sqlite import SQLiteStore

    if not url.startswith("sqlite:"):
        raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]}")
    return SQLiteStore(Path(str(path)))
