"""Everything a rotation plugin author needs, and nothing of the engine.

A plugin is a class satisfying :class:`RotationPlugin` (no inheritance needed),
published in the ``rotator.plugins`` entry-point group under the name equal to its
``kind``. The engine drives it through four steps; every step must be idempotent,
because after a crash, timeout or cancellation the engine runs it again with the
same input:

``create``  mint a candidate value (no side effect on the backend). The engine
            stores it encrypted *before* calling ``set``, so a retry re-applies the
            same value instead of minting another.
``set``     make the backend accept the candidate.
``test``    prove the candidate works (e.g. a fresh login). Raise on failure.
``retire``  revoke an old value that is no longer needed (no-op for single-user).

A plugin may also define ``check_options(options) -> Mapping[str, str]`` (a classmethod
or staticmethod): it gets the schema-checked options at config load (without
``${secret:...}`` references, which resolve later) and returns ``{option: problem}`` for
values no rotation could succeed with, so they fail at load with the key path instead
of mid-rotation. A problem text must not quote the value.

The engine also calls ``set(ctx, current)`` to roll the backend back when ``test``
fails, so ``set`` must accept any value the plugin itself created.

Errors: raise :class:`TransientStepError` for what may pass on retry (network,
timeouts), :class:`PermanentStepError` for what will not, and
:class:`CandidateRejected` when the backend refuses this particular value (the
engine then mints a fresh one, up to a cap). Never put the value, or a DSN with
its password, in an error message or log line.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from structlog.typing import FilteringBoundLogger

from rotator.errors import (
    CandidateRejected,
    PermanentStepError,
    StepError,
    StepTimeout,
    TransientStepError,
)
from rotator.types import SecretValue

__all__ = [
    "DEFAULT_ALPHABET",
    "CandidateRejected",
    "Option",
    "PermanentStepError",
    "RotationContext",
    "RotationPlugin",
    "SecretValue",
    "StepError",
    "StepTimeout",
    "TransientStepError",
    "generate_password",
    "password_options",
    "validate_alphabet",
]

#: Letters and digits: safe in DSNs, shells, URLs and config files.
DEFAULT_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One entry of a plugin's options schema.

    ``type`` is one of ``str``, ``int``, ``bool``, ``float``. A ``sensitive`` option
    (a password, a DSN) is never echoed in errors or ``repr``.
    """

    type: type
    required: bool = False
    default: Any = None
    help: str = ""
    sensitive: bool = False
    min: int | float | None = None
    max: int | float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationContext:
    """What a plugin step gets: which secret, which version, its options."""

    name: str                    # "prod/billing/db"
    version: int                 # the version being created / applied
    options: Mapping[str, Any]   # validated against the plugin's options schema
    current: SecretValue | None  # the live value, None before the first rotation
    log: FilteringBoundLogger    # already bound with plugin, name, version, rotation_id
    rotation_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"RotationContext(name={self.name!r}, version={self.version})"


@runtime_checkable
class RotationPlugin(Protocol):
    """The rotation plugin protocol. Every step is idempotent."""

    kind: ClassVar[str]
    strategies: ClassVar[frozenset[str]]
    options_schema: ClassVar[Mapping[str, Option]]

    async def create(self, ctx: RotationContext) -> SecretValue:
        """Mint a candidate value. No side effect on the backend."""
        ...

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        """Make the backend accept ``new``. Running it twice is harmless."""
        ...

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        """Prove ``new`` works against the backend; raise a StepError if not."""
        ...

    async def retire(self, ctx: RotationContext, old: SecretValue) -> None:
        """Revoke ``old`` where the strategy keeps several credentials alive."""
        ...


def password_options(default_length: int = 32) -> dict[str, Option]:
    """The ``length`` and ``alphabet`` options every password-minting plugin offers."""
    return {
        "length": Option(type=int, default=default_length, min=16, max=1024,
                         help="number of characters in a generated password"),
        "alphabet": Option(type=str, default=DEFAULT_ALPHABET,
                           help="characters a generated password is drawn from "
                                "(printable ASCII, at least 10 distinct)"),
    }


def validate_alphabet(alphabet: str) -> str | None:
    """Return a problem description, or None when the alphabet is usable."""
    if any(not (0x20 < ord(ch) < 0x7F) for ch in alphabet):
        return "must contain only printable ASCII characters (no spaces)"
    if len(set(alphabet)) < 10:
        return "must contain at least 10 distinct characters"
    return None


def generate_password(length: int, alphabet: str = DEFAULT_ALPHABET) -> str:
    """A cryptographically random password drawn uniformly from ``alphabet``."""
    pool = "".join(sorted(set(alphabet)))
    if not pool:
        raise ValueError("empty alphabet")
    return "".join(secrets.choice(pool) for _ in range(length))
