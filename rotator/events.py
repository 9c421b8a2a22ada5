"""Event records and their CloudEvents 1.0 JSON form. Never carries a secret value.

Subject: ``<prefix>.<kind>.<name with '/' as '.'>``, e.g. ``rotator.rotated.prod.billing.db``.
The event id doubles as the JetStream message id (``Nats-Msg-Id``) for de-duplication.
"""

from __future__ import annotations

import enum
import json
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["Event", "EventKind", "subject_for"]

SPEC_VERSION = "1.0"
TYPE_PREFIX = "dev.rotator.secret."


class EventKind(enum.StrEnum):
    STARTED = "started"
    ROTATED = "rotated"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"
    EXPIRING = "expiring"


def subject_for(prefix: str, kind: EventKind | str, name: str) -> str:
    return f"{prefix}.{kind}.{name.replace('/', '.')}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One state change worth telling consumers about."""

    kind: EventKind
    name: str
    data: Mapping[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def subject(self, prefix: str) -> str:
        return subject_for(prefix, self.kind, self.name)

    def to_cloudevent(self) -> dict[str, Any]:
        return {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": f"rotator://{socket.gethostname()}",
            "type": TYPE_PREFIX + str(self.kind),
            "subject": self.name,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": {"name": self.name, **self.data},
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_cloudevent(), sort_keys=True, separators=(",", ":")).encode()
