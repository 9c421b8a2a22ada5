"""The public surface: explicit __all__, values that never print, log redaction."""

from __future__ import annotations

import copy
import importlib
import io
import json
import pickle
import pkgutil

import pytest
import structlog

import rotator
from rotator.logs import configure_logging
from rotator.types import SecretValue

MODULES = sorted(m.name for m in pkgutil.walk_packages(rotator.__path__, "rotator."))


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_an_existing_all(name: str) -> None:
    """Each module lists its public names in __all__, and each listed name exists."""
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list | tuple), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


def test_secret_value_never_prints() -> None:
    """repr, str, format and f-strings of a value show *** only."""
    value = SecretValue({"password": "hunter2-very-secret"})
    for text in (repr(value), str(value), f"{value}", f"{value!r}", format(value, ">10"),
                 repr([value]), repr({"v": value})):
        assert "hunter2" not in text


def test_secret_value_refuses_pickling_but_copies() -> None:
    """Pickling a value is refused; copies stay equal and stay masked."""
    value = SecretValue({"k": "v"})
    with pytest.raises(TypeError):
        pickle.dumps(value)
    assert copy.deepcopy(value) == value and copy.copy(value).reveal() == {"k": "v"}


def test_secret_value_is_byte_exact() -> None:
    """Any Unicode and surrounding whitespace survive an encode/decode round trip."""
    raw = {"password": "  ünï\u200bcode\n\t ", "emoji": "🔑"}
    assert SecretValue.from_bytes(SecretValue(raw).to_bytes()).reveal() == raw


def test_secret_value_rejects_non_string_fields() -> None:
    """Field values must be strings: a number is refused, not coerced."""
    with pytest.raises(TypeError):
        SecretValue({"port": 5432})  # type: ignore[dict-item]


def test_log_redaction_masks_credential_keys() -> None:
    """Log keys that name credentials are masked whatever the caller passed."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        structlog.get_logger("t").info("x", password="p1-secret", admin_dsn="postgresql://u:pw@h",
                                       api_key="k-secret", name="prod/db")
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["password"] == line["admin_dsn"] == line["api_key"] == "***"
    assert line["name"] == "prod/db"
