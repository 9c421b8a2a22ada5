"""The random-token plugin: conformance kit plus its own shape checks."""

from __future__ import annotations

import pytest

from rotator.errors import PermanentStepError
from rotator.testing import PluginConformance, make_context
from rotator.types import SecretValue
from rotator_plugins.random import RandomPlugin


class TestRandomConformance(PluginConformance):
    """The conformance kit against the random plugin with a prefix and a custom field."""

    @pytest.fixture
    def plugin(self) -> RandomPlugin:
        return RandomPlugin()

    @pytest.fixture
    def options(self) -> dict[str, object]:
        return {"field": "api_key", "prefix": "sk_", "length": 40}

    def wrong_value(self, new: SecretValue) -> SecretValue:
        """A key one character short, which the shape check must catch."""
        return SecretValue({"api_key": new["api_key"][:-1]})


async def test_create_uses_field_prefix_length_and_alphabet() -> None:
    """create() puts prefix + length characters of the alphabet in the configured field."""
    plugin = RandomPlugin()
    ctx = make_context(plugin, {"field": "token", "prefix": "ghp_", "length": 50,
                                "alphabet": "abcdefghij"})
    value = await plugin.create(ctx)
    assert list(value) == ["token"]
    token = value["token"]
    assert token.startswith("ghp_")
    assert len(token) == 54
    assert set(token[4:]) <= set("abcdefghij")
    await plugin.test(ctx, value)


async def test_defaults_give_a_32_character_api_key() -> None:
    """Without options the value is {'api_key': 32 letters and digits}."""
    plugin = RandomPlugin()
    value = await plugin.create(make_context(plugin, {}))
    assert list(value) == ["api_key"]
    assert len(value["api_key"]) == 32
    assert value["api_key"].isalnum()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"other": "sk_" + "a" * 40}, "no field 'api_key'"),
        ({"api_key": "pk_" + "a" * 40}, "prefix"),
        ({"api_key": "sk_" + "a" * 41}, "41 random characters, expected 40"),
        ({"api_key": "sk_" + "a" * 39 + "!"}, "alphabet"),
    ],
)
async def test_test_rejects_malformed_values(fields: dict[str, str], problem: str) -> None:
    """test() raises PermanentStepError naming what is wrong with the value's shape."""
    plugin = RandomPlugin()
    ctx = make_context(plugin, {"prefix": "sk_", "length": 40})
    with pytest.raises(PermanentStepError, match=problem) as info:
        await plugin.test(ctx, SecretValue(fields))
    assert "a" * 39 not in str(info.value)


async def test_bad_alphabet_is_a_permanent_error() -> None:
    """An alphabet with too few distinct characters is refused at create()."""
    plugin = RandomPlugin()
    with pytest.raises(PermanentStepError, match="alphabet"):
        await plugin.create(make_context(plugin, {"alphabet": "abc"}))
