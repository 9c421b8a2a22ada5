"""Small value types shared by every layer: the secret value, labels and states."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

__all__ = [
    "Label",
    "RotationState",
    "SecretValue",
    "Step",
    "StepState",
    "VersionState",
]


class SecretValue(Mapping[str, str]):
    """A secret value: a JSON object of string fields that never prints itself.

    ``repr``/``str`` give ``'***'``; pickling is refused; the plaintext is reached
    only through :meth:`reveal` or by reading a field explicitly (``value["password"]``).
    Values are byte-exact: nothing is stripped or normalised.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str]) -> None:
        for key, val in fields.items():
            if not isinstance(key, str) or not isinstance(val, str):
                raise TypeError("a secret value maps string field names to string values")
        self._fields: dict[str, str] = dict(fields)

    # Mapping protocol: reading a field by name is an explicit act of the caller.
    def __getitem__(self, key: str) -> str:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretValue):
            return self._fields == other._fields
        return NotImplemented

    def __hash__(self) -> int:
        raise TypeError("SecretValue is not hashable")

    def __repr__(self) -> str:
        return "SecretValue('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue refuses to be pickled")

    def __copy__(self) -> SecretValue:
        return SecretValue(self._fields)

    def __deepcopy__(self, memo: dict[int, Any]) -> SecretValue:
        return SecretValue(self._fields)

    def reveal(self) -> dict[str, str]:
        """The plaintext fields, as a new dict."""
        return dict(self._fields)

    def to_bytes(self) -> bytes:
        """Canonical UTF-8 JSON encoding (what gets encrypted)."""
        return json.dumps(self._fields, ensure_ascii=False, sort_keys=True,
                          separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretValue:
        """Decode :meth:`to_bytes` output."""
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("a secret value must be a JSON object")
        return cls(obj)


class Label(enum.StrEnum):
    """Staging labels: at most one version carries each per secret."""

    CURRENT = "current"
    PENDING = "pending"
    PREVIOUS = "previous"


class VersionState(enum.StrEnum):
    """Lifecycle of a stored version."""

    PENDING = "pending"        # created, not yet live for consumers
    CURRENT = "current"        # the live credential
    PREVIOUS = "previous"      # the one before current (still valid where the strategy allows)
    DEPRECATED = "deprecated"  # older; kept for audit
    FAILED = "failed"          # never went live (test failed, rejected, rolled back)


class Step(enum.StrEnum):
    """Rotation steps, in order."""

    CREATE = "create"
    SET = "set"
    TEST = "test"
    FINISH = "finish"
    ROLLBACK = "rollback"   # restoring the backend to the current value after a failure


class StepState(enum.StrEnum):
    """Whether a step's side effect may have happened: persisted before and after it."""

    STARTED = "started"
    DONE = "done"


class RotationState(enum.StrEnum):
    """Where a rotation ended up."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
