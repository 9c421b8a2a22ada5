"""The store interface. A store sees only ciphertext and state rows, never plaintext.

Every method that changes more than one row does it in one transaction; in
particular the event outbox row is written in the same transaction as the state
change it announces, so an event can be late but never lost or invented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from rotator.crypto import Sealed
from rotator.events import Event
from rotator.types import Label, RotationState, Step, StepState, VersionState

__all__ = ["OutboxRow", "RotationRow", "SecretRow", "Store", "VersionRow"]


@dataclass(frozen=True, slots=True)
class SecretRow:
    name: str
    plugin: str
    created_at: datetime
    next_rotation_at: datetime | None
    last_rotated_at: datetime | None


@dataclass(frozen=True, slots=True)
class VersionRow:
    name: str
    version: int
    state: VersionState
    labels: tuple[Label, ...]
    created_at: datetime
    rotation_id: str
    sealed: Sealed


@dataclass(frozen=True, slots=True)
class RotationRow:
    id: str
    name: str
    reason: str
    state: RotationState
    step: Step
    step_state: StepState
    version: int | None          # the candidate version, once created
    from_version: int | None     # the version that was current when the rotation started
    candidates: int              # candidate values minted so far
    error: str | None
    owner: str | None
    lease_until: float | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    event_id: str
    subject: str
    payload: bytes


class Store(Protocol):
    """What the engine, scheduler, relay and CLI need from persistence."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # secrets
    async def ensure_secret(self, name: str, plugin: str) -> SecretRow: ...
    async def get_secret(self, name: str) -> SecretRow | None: ...
    async def list_secrets(self) -> list[SecretRow]: ...
    async def set_next_rotation(self, name: str, at: datetime | None) -> None: ...

    # versions
    async def get_version(self, name: str, *, version: int | None = None,
                          label: Label | None = None) -> VersionRow: ...
    async def list_versions(self, name: str) -> list[VersionRow]: ...
    async def next_version_number(self, name: str) -> int: ...

    # rotations
    async def claim_rotation(self, *, name: str, rotation_id: str, reason: str, owner: str,
                             lease_ttl: float,
                             owner_is_dead: Callable[[str], bool],
                             started_event: Callable[[RotationRow], Event],
                             ) -> tuple[RotationRow, bool]:
        """Start a rotation, or take over an abandoned one. Returns (row, resumed).

        A new rotation records the version labelled ``current`` at that moment (read in the
        same transaction) as ``from_version``: the value a failure rolls back to.
        """
        ...
    async def renew_lease(self, rotation_id: str, owner: str, lease_ttl: float) -> None: ...
    async def release_lease(self, name: str, owner: str) -> None:
        """Let another process resume ``owner``'s running rotation of ``name`` at once."""
        ...
    # Every write to a running rotation is fenced: it raises LeaseHeld unless ``owner``
    # still owns the rotation and it is still running, so a process that lost its lease
    # can never overwrite the work of the one that took over.
    async def mark_step(self, rotation_id: str, step: Step, state: StepState,
                        detail: str = "", *, owner: str,
                        error: str | None = None) -> RotationRow: ...
    async def put_candidate(self, rotation_id: str, name: str, version: int,
                            sealed: Sealed, *, owner: str) -> RotationRow: ...
    async def reject_candidate(self, rotation_id: str, name: str, version: int,
                               detail: str, *, owner: str) -> RotationRow: ...
    async def finish_rotation(self, rotation_id: str, name: str, version: int,
                              events: Sequence[Event], *, owner: str) -> None: ...
    async def fail_rotation(self, rotation_id: str, name: str, error: str,
                            events: Sequence[Event], *, owner: str) -> None: ...
    async def get_rotation(self, rotation_id: str) -> RotationRow: ...
    async def running_rotations(self) -> list[RotationRow]: ...
    async def last_rotation(self, name: str) -> RotationRow | None: ...
    async def rotation_history(self, name: str, limit: int = 20) -> list[RotationRow]: ...

    # outbox
    async def pending_events(self, limit: int = 100) -> list[OutboxRow]: ...
    async def mark_published(self, event_ids: Sequence[str]) -> None: ...
    async def outbox_backlog(self) -> int: ...
