"""A generated token with no backend: API keys, signing secrets, shared tokens.

The value is one field (``api_key`` by default) holding ``prefix`` followed by
``length`` characters drawn from ``alphabet``. There is nothing to apply, so
``set`` and ``retire`` do nothing and ``test`` checks the value's shape: that is
all that can be proven without a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from rotator.plugin_api import (
    Option,
    PermanentStepError,
    RotationContext,
    SecretValue,
    generate_password,
    password_options,
    validate_alphabet,
)

__all__ = ["RandomPlugin"]


class RandomPlugin:
    """Mints random tokens; single-user (consumers switch to the new value at once)."""

    kind: ClassVar[str] = "random"
    strategies: ClassVar[frozenset[str]] = frozenset({"single-user"})
    options_schema: ClassVar[Mapping[str, Option]] = MappingProxyType({
        **password_options(32),
        "field": Option(type=str, default="api_key", min=1,
                        help="name of the value's field holding the token"),
        "prefix": Option(type=str, default="",
                         help="text put before the random part, e.g. 'sk_live_'"),
    })

    async def create(self, ctx: RotationContext) -> SecretValue:
        """A fresh token; nothing outside the process is touched."""
        field, prefix, length, alphabet = _settings(ctx.options)
        token = prefix + generate_password(length, alphabet)
        ctx.log.debug("random.created", field=field, length=length)
        return SecretValue({field: token})

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        """Nothing to apply: the stored value is the credential."""

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        """Check that ``new`` has the configured field, prefix, length and alphabet."""
        field, prefix, length, alphabet = _settings(ctx.options)
        if field not in new:
            raise PermanentStepError(f"the value has no field {field!r}")
        token = new[field]
        if not token.startswith(prefix):
            raise PermanentStepError(f"field {field!r} does not start with the configured prefix")
        body = token[len(prefix):]
        if len(body) != length:
            raise PermanentStepError(
                f"field {field!r} has {len(body)} random characters, expected {length}")
        allowed = set(alphabet)
        if any(ch not in allowed for ch in body):
            raise PermanentStepError(
                f"field {field!r} has characters outside the configured alphabet")

    async def retire(self, ctx: RotationContext, old: SecretValue) -> None:
        """Nothing to revoke: an old token simply stops being served."""


def _settings(options: Mapping[str, Any]) -> tuple[str, str, int, str]:
    """(field, prefix, length, alphabet) with schema defaults for missing keys."""
    schema = RandomPlugin.options_schema

    def get(name: str) -> Any:
        return options.get(name, schema[name].default)

    field, prefix, length, alphabet = get("field"), get("prefix"), get("length"), get("alphabet")
    if not isinstance(field, str) or not field:
        raise PermanentStepError("option 'field' must be a non-empty string")
    if not isinstance(prefix, str):
        raise PermanentStepError("option 'prefix' must be a string")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise PermanentStepError("option 'length' must be a positive integer")
    if not isinstance(alphabet, str):
        raise PermanentStepError("option 'alphabet' must be a string")
    problem = validate_alphabet(alphabet)
    if problem is not None:
        raise PermanentStepError(f"option 'alphabet' {problem}")
    return field, prefix, length, alphabet
