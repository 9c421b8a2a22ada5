"""How the real ``rotator`` command reports bad configuration and failed look-ups."""

from __future__ import annotations

import pytest
from e2e.helpers import ADMIN_DSN_ENV, Workdir, secret, write_config

UNSET_VAR = "E2E_SURELY_UNSET_VARIABLE"
#: Written into a bad option; an error message must not repeat it.
CANARY = "canary-Zq8w1x"


def _pg(**options: object) -> dict[str, object]:
    return secret("app/db", "postgres", **options)


BAD_CONFIGS = {
    "unknown key": (
        [secret("app/key", "random")], {"engine": {"step_timout": 5}}, "engine.step_timout"),
    "wrong type": (
        [secret("app/key", "random", length=CANARY)], {}, "secrets[0].options.length"),
    "missing plugin option": (
        [_pg(admin_dsn="postgresql://admin@127.0.0.1/postgres")], {},
        "secrets[0].options.role"),
    "bad schedule": (
        [secret("app/key", "random", schedule="every tuesday")], {}, "secrets[0].schedule"),
    "bad secret name": (
        [secret("app/key", "random"), secret("app//key two", "random")], {},
        "secrets[1].name"),
    "unknown plugin": (
        [secret("app/key", "no-such-plugin")], {}, "secrets[0].plugin"),
    "unset env reference": (
        [_pg(admin_dsn=f"${{env:{UNSET_VAR}}}", role="app")], {},
        "secrets[0].options.admin_dsn"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_the_key_and_exit_2(work: Workdir, case: str) -> None:
    """A bad config file stops every command with exit 2 and one stderr line naming the key."""
    secrets_, extra, key_path = BAD_CONFIGS[case]
    write_config(work.path, secrets_, **extra)
    res = work.run("status", env={ADMIN_DSN_ENV: "unused"})
    assert res.returncode == 2, res
    assert len(res.stderr_lines) == 1, res.stderr
    line = res.stderr_lines[0]
    assert line.startswith("rotator: error: "), line
    assert key_path in line, line
    assert "Traceback" not in res.stderr
    assert CANARY not in res.stderr
    assert res.stdout == ""
    assert not work.var.exists()


@pytest.fixture
def rotated(work: Workdir) -> Workdir:
    """A workdir whose one secret, ``app/key`` (random plugin), has been rotated once."""
    work.config([secret("app/key", "random")])
    work.run("init").ok()
    work.run("rotate", "app/key").ok()
    return work


def test_get_unknown_secret_fails_with_one_line(rotated: Workdir) -> None:
    """``rotator get`` of a secret the store does not hold exits 1 with one line."""
    res = rotated.run("get", "app/nothing")
    assert res.returncode == 1, res
    assert len(res.stderr_lines) == 1, res.stderr
    assert "app/nothing" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_rotate_secret_not_in_config_fails_with_one_line(rotated: Workdir) -> None:
    """``rotator rotate`` of a name the config does not list fails with one line naming it."""
    res = rotated.run("rotate", "app/nothing")
    assert res.returncode in (1, 2), res
    assert len(res.stderr_lines) == 1, res.stderr
    line = res.stderr_lines[0]
    assert "app/nothing" in line and "app/key" in line   # what exists, to fix the typo
    assert "Traceback" not in res.stderr
    assert [r["version"] for r in rotated.versions("app/key")] == [1]


def test_get_unknown_field_lists_the_fields(rotated: Workdir) -> None:
    """``rotator get --field`` of a missing field exits 1 and lists the fields there are."""
    res = rotated.run("get", "app/key", "--field", "nope")
    assert res.returncode == 1, res
    assert len(res.stderr_lines) == 1, res.stderr
    assert "'nope'" in res.stderr and "api_key" in res.stderr
    assert res.stdout == ""
    key = rotated.field("app/key", "api_key")
    assert key not in res.stderr
