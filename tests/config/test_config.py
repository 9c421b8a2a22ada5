"""load_config: TOML → validated, frozen, redacting dataclasses with key-path errors."""

from __future__ import annotations

import re
import tempfile
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rotator.config
from rotator.config import Config, SecretRef, load_config
from rotator.errors import ConfigError
from rotator.plugin_api import Option, password_options

PASSWORD = "Tr0ub4dor&3-not-for-logs"


class FakePostgres:
    kind = "postgres"
    options_schema: ClassVar[dict[str, Option]] = {
        "admin_dsn": Option(type=str, required=True, sensitive=True),
        "role": Option(type=str, required=True),
        "port": Option(type=int, default=5432, min=1, max=65535),
        "ratio": Option(type=float, default=0.5, min=0, max=1),
        "verify": Option(type=bool, default=True),
        "comment": Option(type=str),
        **password_options(),
    }


class FakeRandom:
    kind = "random"
    options_schema: ClassVar[dict[str, Option]] = password_options()


class FakeStatic:
    kind = "static"
    options_schema: ClassVar[dict[str, Option]] = {}


PLUGINS: dict[str, type] = {"postgres": FakePostgres, "random": FakeRandom, "static": FakeStatic}

ONE_SECRET = """
[[secrets]]
name = "app/key"
plugin = "random"
schedule = "{schedule}"
"""


def write(directory: Path, text: str) -> Path:
    path = directory / "rotator.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, text: str, *, environ: dict[str, str] | None = None,
         plugins: dict[str, type] | None = None) -> Config:
    return load_config(write(directory, text), environ=environ or {}, plugins=plugins)


def fail(directory: Path, text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(directory, text, **kwargs)
    return info.value


def toml_string(text: str) -> str:
    """A TOML basic string holding exactly ``text``."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def pg_secret(options: str, *, extra: str = "") -> str:
    return f"""
    [[secrets]]
    name = "prod/billing/db"
    plugin = "postgres"
    schedule = "0 3 * * *"
    [secrets.options]
    {options}
    {extra}
    """


# --- files and defaults ----------------------------------------------------------------


def test_public_names_are_exported() -> None:
    """Every name in __all__ exists in the module."""
    assert all(hasattr(rotator.config, name) for name in rotator.config.__all__)


def test_empty_file_gives_documented_defaults(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty file yields the defaults, with paths made absolute against the working dir."""
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, "")
    assert cfg.path == tmp_path / "rotator.toml"
    assert cfg.store.url == "sqlite:///var/rotator.db"
    assert cfg.store.path == tmp_path / "var" / "rotator.db"
    assert cfg.crypto.master_key_file == tmp_path / "var" / "master.key"
    assert cfg.crypto.master_key_env is None
    assert cfg.bus.url == "nats://127.0.0.1:4222"
    assert (cfg.bus.subject_prefix, cfg.bus.stream, cfg.bus.enabled) == ("rotator", "ROTATOR", True)
    assert (cfg.bus.connect_timeout, cfg.bus.publish_timeout) == (2.0, 5.0)
    assert (cfg.api.listen, cfg.api.host, cfg.api.port) == ("127.0.0.1:8200", "127.0.0.1", 8200)
    assert cfg.engine == rotator.config.EngineConfig()
    assert (cfg.log.level, cfg.log.format) == ("info", "console")
    assert cfg.secrets == ()


def test_design_example_loads(tmp_path: Path) -> None:
    """The example of the product contract loads as written."""
    cfg = load(tmp_path, """
        [store]
        url = "sqlite:///var/rotator.db"
        [crypto]
        master_key_file = "var/master.key"
        [bus]
        url = "nats://127.0.0.1:4222"
        subject_prefix = "rotator"
        [api]
        listen = "127.0.0.1:8200"
        [[secrets]]
        name = "prod/billing/db"
        plugin = "postgres"
        schedule = "0 3 * * *"
        [secrets.options]
        admin_dsn = "${env:BILLING_PG_ADMIN}"
        role = "billing_app"
        """, environ={"BILLING_PG_ADMIN": "postgresql://admin@db/billing"}, plugins=PLUGINS)
    sec = cfg.secret("prod/billing/db")
    assert sec.cron == "0 3 * * *" and sec.interval is None
    assert sec.options["admin_dsn"] == "postgresql://admin@db/billing"
    assert sec.options["role"] == "billing_app"
    assert sec.options["port"] == 5432


def test_secret_lookup_of_unknown_name_raises_key_error(tmp_path: Path) -> None:
    """Config.secret() raises KeyError for a name that is not configured."""
    with pytest.raises(KeyError):
        load(tmp_path, "").secret("nope")


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the file and suggesting --config."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    assert info.value.path == ""
    assert str(info.value) == f"config file {missing} not found (create one or pass --config)"


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    """Passing a directory is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line."""
    err = fail(tmp_path, '[store]\nurl = "sqlite:///x"\nbroken line\n')
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'rotator.toml'))}: invalid TOML at line 3, "
                        r"column \d+: .+", str(err))


def test_invalid_toml_does_not_quote_file_content(tmp_path: Path) -> None:
    """A TOML error does not quote the offending character, which may belong to a secret."""
    path = tmp_path / "rotator.toml"
    path.write_text('[secrets]\npw = "ab\x01cd"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "invalid TOML at line 2" in str(info.value)
    assert "\\x01" not in str(info.value) and "\x01" not in str(info.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported as such."""
    path = tmp_path / "rotator.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path, environ={})


def test_relative_paths_resolve_against_working_directory(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative store and key paths resolve against the working directory, not the file's."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    confdir = tmp_path / "config"
    confdir.mkdir()
    monkeypatch.chdir(workdir)
    cfg = load(confdir, """
        [store]
        url = "sqlite:///data/r.db"
        [crypto]
        master_key_file = "keys/../keys/master.key"
        """)
    assert cfg.store.path == workdir / "data" / "r.db"
    assert cfg.crypto.master_key_file == workdir / "keys" / "master.key"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """sqlite:////abs/path and an absolute key file stay as written."""
    cfg = load(tmp_path, f"""
        [store]
        url = "sqlite:///{tmp_path}/r.db"
        [crypto]
        master_key_file = "{tmp_path}/m.key"
        """)
    assert cfg.store.path == tmp_path / "r.db"
    assert cfg.crypto.master_key_file == tmp_path / "m.key"


# --- store, crypto, bus, api, engine, log ----------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://u@h/db", "store.url: postgresql store is not available yet; "
                            "use sqlite:///PATH"),
    ("postgres://u@h/db", "store.url: postgresql store is not available yet; use sqlite:///PATH"),
    ("mysql://u@h/db", "store.url: expected sqlite:///PATH"),
    ("sqlite://relative.db", "store.url: expected sqlite:///PATH"),
    ("sqlite:///", "store.url: expected sqlite:///PATH (the path is empty)"),
])
def test_store_url_errors(tmp_path: Path, url: str, message: str) -> None:
    """Only sqlite:///PATH store URLs are accepted, with a specific message for PostgreSQL."""
    err = fail(tmp_path, f'[store]\nurl = "{url}"\n')
    assert (err.path, str(err)) == ("store.url", message)


def test_store_url_expands_env_reference(tmp_path: Path) -> None:
    """store.url may take its path from the environment."""
    cfg = load(tmp_path, '[store]\nurl = "sqlite:///${env:DB}"\n', environ={"DB": "/srv/r.db"})
    assert cfg.store.url == "sqlite:////srv/r.db"
    assert cfg.store.path == Path("/srv/r.db")


def test_crypto_file_and_env_together_are_rejected(tmp_path: Path) -> None:
    """Setting both master-key sources is an error on the crypto table."""
    err = fail(tmp_path, '[crypto]\nmaster_key_file = "k"\nmaster_key_env = "K"\n')
    assert str(err) == "crypto: set master_key_file or master_key_env, not both"


def test_crypto_env_replaces_default_file(tmp_path: Path) -> None:
    """With master_key_env set there is no key file."""
    cfg = load(tmp_path, '[crypto]\nmaster_key_env = "ROTATOR_MASTER_KEY"\n')
    assert cfg.crypto.master_key_env == "ROTATOR_MASTER_KEY"
    assert cfg.crypto.master_key_file is None


@pytest.mark.parametrize(("text", "path"), [
    ('[crypto]\nmaster_key_env = "1BAD"\n', "crypto.master_key_env"),
    ('[crypto]\nmaster_key_env = 3\n', "crypto.master_key_env"),
    ('[crypto]\nmaster_key_file = ""\n', "crypto.master_key_file"),
])
def test_crypto_value_errors(tmp_path: Path, text: str, path: str) -> None:
    """A bad master key source is reported on its key."""
    assert fail(tmp_path, text).path == path


def test_bus_values_are_read(tmp_path: Path) -> None:
    """Every [bus] key is read, integers are accepted for timeouts."""
    cfg = load(tmp_path, """
        [bus]
        url = "tls://nats.internal:4222"
        subject_prefix = "acme.rotator-v1"
        stream = "ACME_ROT"
        connect_timeout = 1
        publish_timeout = 0.5
        enabled = false
        """)
    assert cfg.bus == rotator.config.BusConfig(
        url="tls://nats.internal:4222", subject_prefix="acme.rotator-v1", stream="ACME_ROT",
        connect_timeout=1.0, publish_timeout=0.5, enabled=False)
    assert isinstance(cfg.bus.connect_timeout, float)


@pytest.mark.parametrize(("line", "message"), [
    ('url = "http://127.0.0.1:4222"', "bus.url: expected nats://HOST:PORT or tls://HOST:PORT"),
    ('url = "nats://"', "bus.url: expected nats://HOST:PORT or tls://HOST:PORT"),
    ('subject_prefix = "a..b"', "bus.subject_prefix: invalid subject prefix 'a..b'; "
                                "expected tokens of [A-Za-z0-9_-] separated by '.'"),
    ('subject_prefix = "a.>"', "bus.subject_prefix: invalid subject prefix 'a.>'; "
                               "expected tokens of [A-Za-z0-9_-] separated by '.'"),
    ('stream = "my.stream"', "bus.stream: invalid stream name 'my.stream'; "
                             "expected [A-Za-z0-9_-] characters only"),
    ("connect_timeout = 0", "bus.connect_timeout: must be greater than 0"),
    ("publish_timeout = -1.5", "bus.publish_timeout: must be greater than 0"),
    ("publish_timeout = inf", "bus.publish_timeout: expected a finite number"),
    ('connect_timeout = "2s"', "bus.connect_timeout: expected a number, got string"),
    ("connect_timeout = true", "bus.connect_timeout: expected a number, got boolean"),
    ('enabled = "yes"', "bus.enabled: expected a boolean (true or false), got string"),
])
def test_bus_errors(tmp_path: Path, line: str, message: str) -> None:
    """Each [bus] key is checked for type and shape."""
    assert str(fail(tmp_path, f"[bus]\n{line}\n")) == message


def test_bus_url_rejects_secret_reference(tmp_path: Path) -> None:
    """${secret:...} is only allowed in secret options, not in bus.url."""
    err = fail(tmp_path, '[bus]\nurl = "${secret:a#b}"\n')
    assert str(err) == "bus.url: ${secret:...} references are only allowed in [secrets.options]"


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:8200", "127.0.0.1", 8200),
    ("localhost:0", "localhost", 0),
    ("[::1]:9000", "::1", 9000),
    ("0.0.0.0:65535", "0.0.0.0", 65535),
])
def test_api_listen_accepts_host_and_port(tmp_path: Path, listen: str, host: str,
                                          port: int) -> None:
    """api.listen is HOST:PORT; host and port are available as properties."""
    api = load(tmp_path, f'[api]\nlisten = "{listen}"\n').api
    assert (api.listen, api.host, api.port) == (listen, host, port)


@pytest.mark.parametrize("listen", ["8200", ":8200", "host:", "host:port", "::1:8200",
                                    "host:65536", "a b:80", "[]:80"])
def test_api_listen_rejects_malformed_values(tmp_path: Path, listen: str) -> None:
    """A listen value that is not HOST:PORT is rejected on api.listen."""
    err = fail(tmp_path, f'[api]\nlisten = "{listen}"\n')
    assert err.path == "api.listen"
    assert str(err).startswith("api.listen: expected HOST:PORT")


def test_engine_accepts_integers_for_seconds(tmp_path: Path) -> None:
    """Seconds settings accept integers (stored as float); max_retries may be 0."""
    cfg = load(tmp_path, "[engine]\nstep_timeout = 10\nmax_retries = 0\nlease_ttl = 2.5\n")
    assert cfg.engine.step_timeout == 10.0 and isinstance(cfg.engine.step_timeout, float)
    assert cfg.engine.max_retries == 0
    assert cfg.engine.lease_ttl == 2.5


@pytest.mark.parametrize(("line", "message"), [
    ('step_timeout = "30"', "engine.step_timeout: expected a number, got string"),
    ("step_timeout = 0", "engine.step_timeout: must be greater than 0"),
    ("step_timeout = nan", "engine.step_timeout: expected a finite number"),
    ("max_retries = true", "engine.max_retries: expected an integer, got boolean"),
    ("max_retries = 1.5", "engine.max_retries: expected an integer, got float"),
    ("max_retries = -1", "engine.max_retries: must be at least 0"),
    ("max_candidates = 0", "engine.max_candidates: must be at least 1"),
    ("max_value_bytes = 0", "engine.max_value_bytes: must be at least 1"),
    ("shutdown_grace = [1]", "engine.shutdown_grace: expected a number, got array"),
    ("lease_ttl = 1979-05-27T07:32:00Z", "engine.lease_ttl: expected a number, got datetime"),
    ("max_retries = 101", "engine.max_retries: must be at most 100"),
    ("max_candidates = 101", "engine.max_candidates: must be at most 100"),
    ("max_value_bytes = 16777217", "engine.max_value_bytes: must be at most 16777216 (16 MiB)"),
    ("max_retries = 9223372036854775807", "engine.max_retries: must be at most 100"),
    ("step_timeout = 86400.5", "engine.step_timeout: must be at most 86400 (1 day)"),
    ("lease_ttl = 86401", "engine.lease_ttl: must be at most 86400 (1 day)"),
    ("shutdown_grace = 1e9", "engine.shutdown_grace: must be at most 86400 (1 day)"),
])
def test_engine_errors(tmp_path: Path, line: str, message: str) -> None:
    """Engine settings are type- and range-checked with their key path."""
    assert str(fail(tmp_path, f"[engine]\n{line}\n")) == message


def test_engine_upper_bounds_are_inclusive(tmp_path: Path) -> None:
    """Each cap itself is accepted: 100 retries and candidates, 16 MiB, one day."""
    cfg = load(tmp_path, "[engine]\nmax_retries = 100\nmax_candidates = 100\n"
                         "max_value_bytes = 16777216\nstep_timeout = 86400\n"
                         "lease_ttl = 86400.0\nshutdown_grace = 86400\n")
    assert (cfg.engine.max_retries, cfg.engine.max_candidates) == (100, 100)
    assert cfg.engine.max_value_bytes == 16 * 1024 * 1024
    assert cfg.engine.step_timeout == cfg.engine.lease_ttl == cfg.engine.shutdown_grace == 86400.0


def test_log_level_and_format_are_case_insensitive(tmp_path: Path) -> None:
    """log.level and log.format accept any case and are stored lower-case."""
    cfg = load(tmp_path, '[log]\nlevel = "DEBUG"\nformat = "JSON"\n')
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")


@pytest.mark.parametrize(("line", "message"), [
    ('level = "verbose"', "log.level: expected one of: debug, info, warning, error"),
    ('format = "xml"', "log.format: expected one of: console, json"),
    ("level = 10", "log.level: expected a string, got integer"),
])
def test_log_errors(tmp_path: Path, line: str, message: str) -> None:
    """log.level and log.format accept only the documented values."""
    assert str(fail(tmp_path, f"[log]\n{line}\n")) == message


# --- structure: unknown keys, wrong section types ----------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("[bus]\nur = 'x'\n", "bus.ur: unknown key (expected one of: url, subject_prefix, stream, "
                          "connect_timeout, publish_timeout, enabled)"),
    ("[buss]\n", "buss: unknown key (expected one of: store, crypto, bus, api, engine, log, "
                 "secrets)"),
    ("[store]\npath = 'x'\n", "store.path: unknown key (expected one of: url)"),
    ("[engine]\n'step timeout' = 1\n", 'engine."step timeout": unknown key (expected one of: '
                                       "step_timeout, max_retries, retry_base_delay, "
                                       "max_candidates, lease_ttl, shutdown_grace, "
                                       "max_value_bytes)"),
    ("[log]\ncolor = true\n", "log.color: unknown key (expected one of: level, format)"),
])
def test_unknown_keys_are_rejected_with_path(tmp_path: Path, text: str, message: str) -> None:
    """An unknown key names its full path and the keys that are allowed."""
    assert str(fail(tmp_path, text)) == message


def test_unknown_secret_key_names_its_index(tmp_path: Path) -> None:
    """An unknown key in the third secret is reported as secrets[2].KEY."""
    text = "".join(f'[[secrets]]\nname = "s{i}"\nplugin = "random"\nschedule = "1h"\n'
                   for i in range(2))
    text += '[[secrets]]\nname = "s2"\nplugin = "random"\nshedule = "1h"\n'
    err = fail(tmp_path, text)
    assert err.path == "secrets[2].shedule"
    assert str(err) == ("secrets[2].shedule: unknown key (expected one of: name, plugin, "
                        "schedule, jitter, options)")


@pytest.mark.parametrize(("text", "message"), [
    ('bus = "nats://x"\n', "bus: expected a table ([bus]), got string"),
    ("engine = 3\n", "engine: expected a table ([engine]), got integer"),
    ("[secrets]\nname = 'x'\n", "secrets: expected an array of tables ([[secrets]]), got table"),
    ("secrets = [1]\n", "secrets[0]: expected a table, got integer"),
])
def test_sections_must_be_tables(tmp_path: Path, text: str, message: str) -> None:
    """A section that is not a table (or [[secrets]] that is not an array) is rejected."""
    assert str(fail(tmp_path, text)) == message


# --- secrets: names, plugins, schedules, jitter --------------------------------------------


@pytest.mark.parametrize("name", ["db", "prod/billing/db", "a-b_c/D-9", "x" * 200])
def test_valid_secret_names(tmp_path: Path, name: str) -> None:
    """Names made of [A-Za-z0-9_-] segments separated by '/' are accepted."""
    cfg = load(tmp_path, f'[[secrets]]\nname = "{name}"\nplugin = "random"\nschedule = "1h"\n')
    assert cfg.secrets[0].name == name


@pytest.mark.parametrize("name", ["/db", "db/", "a//b", "a b", "a.b", "é", "a/./b"])
def test_invalid_secret_names(tmp_path: Path, name: str) -> None:
    """Empty segments and characters outside [A-Za-z0-9_-/] are rejected."""
    err = fail(tmp_path, f'[[secrets]]\nname = "{name}"\nplugin = "random"\nschedule = "1h"\n')
    assert err.path == "secrets[0].name"
    assert "invalid secret name" in str(err)


def test_overlong_secret_name_is_rejected(tmp_path: Path) -> None:
    """A name longer than 200 characters is rejected without echoing it."""
    err = fail(tmp_path, f'[[secrets]]\nname = "{"x" * 201}"\nplugin = "random"\n'
                         'schedule = "1h"\n')
    assert str(err) == "secrets[0].name: too long (201 characters; at most 200)"


def test_duplicate_secret_names_point_at_the_first(tmp_path: Path) -> None:
    """A repeated name is reported on the repeat, naming the first occurrence."""
    names = ["x", "y", "z", "x"]
    text = "".join(f'[[secrets]]\nname = "{n}"\nplugin = "random"\nschedule = "1h"\n'
                   for n in names)
    assert str(fail(tmp_path, text)) == ("secrets[3].name: duplicate secret name 'x' "
                                         "(also secrets[0])")


@pytest.mark.parametrize("missing", ["name", "plugin", "schedule"])
def test_required_secret_keys(tmp_path: Path, missing: str) -> None:
    """name, plugin and schedule are required in every secret."""
    keys = {"name": '"a"', "plugin": '"random"', "schedule": '"1h"'}
    del keys[missing]
    text = "[[secrets]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    assert str(fail(tmp_path, text)) == f"secrets[0].{missing}: required"


@pytest.mark.parametrize(("line", "message"), [
    ("plugin = 1", "secrets[0].plugin: expected a string, got integer"),
    ('plugin = ""', "secrets[0].plugin: must not be empty"),
])
def test_plugin_must_be_a_non_empty_string(tmp_path: Path, line: str, message: str) -> None:
    """secrets[].plugin must be a non-empty string."""
    assert str(fail(tmp_path, f'[[secrets]]\nname = "a"\n{line}\nschedule = "1h"\n')) == message


def test_unknown_plugin_lists_installed_ones(tmp_path: Path) -> None:
    """With plugins given, an unknown plugin names the installed ones."""
    err = fail(tmp_path, '[[secrets]]\nname = "a"\nplugin = "foo"\nschedule = "1h"\n',
               plugins={"random": FakeRandom, "postgres": FakePostgres})
    assert str(err) == "secrets[0].plugin: unknown plugin 'foo' (installed: postgres, random)"


def test_unknown_plugin_with_nothing_installed(tmp_path: Path) -> None:
    """With an empty plugin mapping, the message says none are installed."""
    err = fail(tmp_path, '[[secrets]]\nname = "a"\nplugin = "foo"\nschedule = "1h"\n',
               plugins={})
    assert str(err) == "secrets[0].plugin: unknown plugin 'foo' (installed: none)"


def test_plugin_is_not_checked_without_plugins(tmp_path: Path) -> None:
    """Without a plugin mapping, any plugin name loads (e.g. for offline validation)."""
    cfg = load(tmp_path, '[[secrets]]\nname = "a"\nplugin = "foo"\nschedule = "1h"\n')
    assert cfg.secrets[0].plugin == "foo"


@pytest.mark.parametrize(("schedule", "seconds"), [
    ("1s", 1), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("3650d", 315360000),
])
def test_interval_schedules(tmp_path: Path, schedule: str, seconds: int) -> None:
    """An interval schedule is converted to seconds and has no cron expression."""
    sec = load(tmp_path, ONE_SECRET.format(schedule=schedule)).secrets[0]
    assert (sec.schedule, sec.interval, sec.cron) == (schedule, float(seconds), None)


@pytest.mark.parametrize(("schedule", "message"), [
    ("0s", "secrets[0].schedule: an interval must be at least 1s"),
    ("10w", "secrets[0].schedule: invalid interval '10w'; expected a whole number followed by "
            "s, m, h or d, e.g. 90s, 15m, 12h, 7d"),
    ("1.5h", "secrets[0].schedule: invalid interval '1.5h'; expected a whole number followed "
             "by s, m, h or d, e.g. 90s, 15m, 12h, 7d"),
    ("3651d", "secrets[0].schedule: interval '3651d' is too long; at most 3650d"),
    ("9" * 40 + "s", f"secrets[0].schedule: interval '{'9' * 40}s' is too long; at most 3650d"),
])
def test_interval_errors(tmp_path: Path, schedule: str, message: str) -> None:
    """Intervals must be whole, at least 1s, at most 3650d, with a known unit."""
    assert str(fail(tmp_path, ONE_SECRET.format(schedule=schedule))) == message


@pytest.mark.parametrize("expr", ["0 3 * * *", "*/15 * * * *", "0 0 1 jan,jul *",
                                  "30 2 * * mon-fri"])
def test_cron_schedules(tmp_path: Path, expr: str) -> None:
    """A valid 5-field cron expression is kept as written."""
    sec = load(tmp_path, ONE_SECRET.format(schedule=expr)).secrets[0]
    assert (sec.cron, sec.interval) == (expr, None)


@pytest.mark.parametrize("expr", ["0 3 * *", "* * * * * *", "61 * * * *", "*/0 * * * *",
                                  "daily", "0 3 * * funday"])
def test_invalid_cron_schedules(tmp_path: Path, expr: str) -> None:
    """A bad cron expression is explained, with the accepted forms."""
    err = fail(tmp_path, ONE_SECRET.format(schedule=expr))
    assert err.path == "secrets[0].schedule"
    assert str(err).startswith(f"secrets[0].schedule: invalid cron expression '{expr}': ")
    assert str(err).endswith("; expected 5 fields or an interval like 90s, 15m, 12h, 7d")


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30 feb *", "15 4 31 4,6,9,11 *",
                                  "0 0 31 2 mon"])
def test_cron_that_never_fires_is_rejected(tmp_path: Path, expr: str) -> None:
    """A cron whose fields are each valid but match no date (February 31st) is refused."""
    text = ONE_SECRET.format(schedule="1h") + ONE_SECRET.replace("app/key", "app/other").format(
        schedule=expr)
    err = fail(tmp_path, text)
    assert err.path == "secrets[1].schedule"
    assert str(err) == f"secrets[1].schedule: cron expression '{expr}' never fires (no such date)"


@pytest.mark.parametrize("expr", ["0 0 29 2 *", "0 0 31 1-3 *", "0 0 13 2 fri"])
def test_rare_but_possible_cron_dates_are_accepted(tmp_path: Path, expr: str) -> None:
    """Leap days and dates that exist in only some months or years still load."""
    sec = load(tmp_path, ONE_SECRET.format(schedule=expr)).secrets[0]
    assert (sec.cron, sec.interval) == (expr, None)


def test_schedule_must_be_a_string(tmp_path: Path) -> None:
    """A numeric schedule is a type error (write "90s", not 90)."""
    err = fail(tmp_path, '[[secrets]]\nname = "a"\nplugin = "random"\nschedule = 90\n')
    assert str(err) == "secrets[0].schedule: expected a string, got integer"


@pytest.mark.parametrize(("value", "seconds"), [
    ('"30s"', 30.0), ('"5m"', 300.0), ('"0s"', 0.0), ("12", 12.0), ("2.5", 2.5), ("0", 0.0),
])
def test_jitter_accepts_intervals_and_seconds(tmp_path: Path, value: str, seconds: float) -> None:
    """jitter is an interval string or a number of seconds, zero allowed."""
    sec = load(tmp_path, ONE_SECRET.format(schedule="1h") + f"jitter = {value}\n").secrets[0]
    assert sec.jitter == seconds and isinstance(sec.jitter, float)


def test_jitter_defaults_to_zero(tmp_path: Path) -> None:
    """Without jitter, fire times are not delayed."""
    assert load(tmp_path, ONE_SECRET.format(schedule="1h")).secrets[0].jitter == 0.0


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "secrets[0].jitter: must be at least 0"),
    ('"soon"', "secrets[0].jitter: invalid jitter 'soon'; expected a number of seconds or an "
               "interval like 30s, 5m"),
    ("true", 'secrets[0].jitter: expected a number of seconds or an interval like "30s", '
             "got boolean"),
    ("inf", "secrets[0].jitter: expected a finite number"),
    ('"2x"', "secrets[0].jitter: invalid interval '2x'; expected a whole number followed by "
             "s, m, h or d, e.g. 90s, 15m, 12h, 7d"),
])
def test_jitter_errors(tmp_path: Path, value: str, message: str) -> None:
    """A negative, non-finite or malformed jitter is rejected."""
    assert str(fail(tmp_path, ONE_SECRET.format(schedule="1h") + f"jitter = {value}\n")) == message


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@settings(deadline=None, max_examples=150)
@given(st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 10**7), st.sampled_from("smhd")),
    st.from_regex(r"-?[0-9]{0,16}[.]?[0-9]{0,3} ?[a-zA-Z]{0,2}", fullmatch=True),
    st.text(max_size=24),
))
def test_any_schedule_parses_correctly_or_raises_config_error(text: str) -> None:
    """Any schedule string yields the right interval, a cron expression, or a ConfigError."""
    match = re.fullmatch(r"([0-9]+)([smhd])", text)
    with tempfile.TemporaryDirectory() as directory:
        try:
            sec = load(Path(directory), ONE_SECRET.replace('"{schedule}"', toml_string(text)))
        except ConfigError as err:
            assert err.path == "secrets[0].schedule"
            if match:
                seconds = int(match[1]) * _UNITS[match[2]]
                assert seconds < 1 or seconds > 3650 * 86400
            return
    secret = sec.secrets[0]
    assert secret.schedule == text
    if match:
        assert (secret.interval, secret.cron) == (int(match[1]) * _UNITS[match[2]], None)
    else:
        assert (secret.interval, secret.cron) == (None, text)


_CRON_FIELD = st.text(alphabet="0123456789*/,-#?LW abcdefjmnorstuwy", min_size=0, max_size=8)


@settings(deadline=None, max_examples=150)
@given(st.lists(_CRON_FIELD, min_size=4, max_size=6).map(" ".join))
def test_cron_like_schedules_load_or_raise_config_error(expr: str) -> None:
    """Cron-shaped strings either load as cron or raise ConfigError, never another exception."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            sec = load(Path(directory), ONE_SECRET.replace('"{schedule}"', toml_string(expr)))
        except ConfigError as err:
            assert err.path == "secrets[0].schedule"
            return
    assert sec.secrets[0].cron == expr or sec.secrets[0].interval is not None


# --- options without a plugin schema ----------------------------------------------------


def test_options_are_kept_as_written_without_plugins(tmp_path: Path) -> None:
    """Without plugins, options are not validated and get no defaults."""
    sec = load(tmp_path, """
        [[secrets]]
        name = "a"
        plugin = "anything"
        schedule = "1h"
        [secrets.options]
        whatever = 1
        nested = {list = [1, "two"], flag = true}
        """).secrets[0]
    assert sec.options == {"whatever": 1, "nested": {"list": [1, "two"], "flag": True}}
    assert sec.sensitive_options == frozenset()


def test_options_must_be_a_table(tmp_path: Path) -> None:
    """options = "x" is a type error on secrets[N].options."""
    err = fail(tmp_path, ONE_SECRET.format(schedule="1h") + 'options = "x"\n')
    assert str(err) == "secrets[0].options: expected a table, got string"


# --- references ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("${env:PW}", PASSWORD),
    ("postgresql://admin:${env:PW}@db:5432/billing",
     f"postgresql://admin:{PASSWORD}@db:5432/billing"),
    ("${env:USER_}:${env:PW}", f"root:{PASSWORD}"),
    ("$${env:PW}", "${env:PW}"),
    ("cost: $5 and $$ and $", "cost: $5 and $$ and $"),
    ("a $${ b", "a ${ b"),
    ("${env:EMPTY}", ""),
])
def test_env_references_are_expanded(tmp_path: Path, value: str, expected: str) -> None:
    """${env:NAME} is replaced (also inside text), $${ is a literal ${, other $ are kept."""
    sec = load(tmp_path, pg_secret(f"opt = {toml_string(value)}"),
               environ={"PW": PASSWORD, "USER_": "root", "EMPTY": ""}).secrets[0]
    assert sec.options["opt"] == expected


def test_env_reference_values_are_not_expanded_again(tmp_path: Path) -> None:
    """An environment value that itself contains ${...} is taken literally."""
    sec = load(tmp_path, pg_secret('opt = "${env:X}"'), environ={"X": "${env:Y}"}).secrets[0]
    assert sec.options["opt"] == "${env:Y}"


def test_missing_env_variable_names_the_variable(tmp_path: Path) -> None:
    """An unset variable is reported on the option path, naming the variable."""
    err = fail(tmp_path, pg_secret('admin_dsn = "${env:BILLING_PG_ADMIN}"\nrole = "r"'),
               plugins=PLUGINS)
    assert str(err) == ("secrets[0].options.admin_dsn: environment variable BILLING_PG_ADMIN "
                        "is not set")


def test_env_references_in_nested_values_report_their_path(tmp_path: Path) -> None:
    """References inside arrays and tables are expanded; errors give the nested path."""
    err = fail(tmp_path, pg_secret('hosts = ["a", {dsn = "${env:NOPE}"}]'))
    assert str(err) == "secrets[0].options.hosts[1].dsn: environment variable NOPE is not set"
    sec = load(tmp_path, pg_secret('hosts = ["a", {dsn = "${env:X}"}]'),
               environ={"X": "y"}).secrets[0]
    assert sec.options["hosts"] == ["a", {"dsn": "y"}]


@pytest.mark.parametrize(("value", "problem"), [
    ("${ENV:X}", "unsupported ${...} reference; expected ${env:NAME} or ${secret:NAME#field} "
                 "(write $${ for a literal ${)"),
    ("${X}", "unsupported ${...} reference; expected ${env:NAME} or ${secret:NAME#field} "
             "(write $${ for a literal ${)"),
    ("${vault:a/b}", "unsupported ${...} reference; expected ${env:NAME} or "
                     "${secret:NAME#field} (write $${ for a literal ${)"),
    ("abc${env:X", "unterminated ${ reference (missing '}'); write $${ for a literal ${"),
    ("${env:1X}", "invalid ${env:NAME} reference; NAME must be an environment variable name "
                  "([A-Za-z_][A-Za-z0-9_]*)"),
    ("${env:}", "invalid ${env:NAME} reference; NAME must be an environment variable name "
                "([A-Za-z_][A-Za-z0-9_]*)"),
])
def test_malformed_references(tmp_path: Path, value: str, problem: str) -> None:
    """Anything but ${env:NAME}, ${secret:NAME#field} and $${ is an error naming the forms."""
    err = fail(tmp_path, pg_secret(f"opt = {toml_string(value)}"), environ={"X": "x"})
    assert (err.path, err.problem) == ("secrets[0].options.opt", problem)


def test_env_reference_in_bus_url(tmp_path: Path) -> None:
    """bus.url may hold ${env:...} references; a missing one is reported on bus.url."""
    text = '[bus]\nurl = "nats://rotator:${env:NATS_PW}@127.0.0.1:4222"\n'
    assert load(tmp_path, text, environ={"NATS_PW": "pw"}).bus.url == \
        "nats://rotator:pw@127.0.0.1:4222"
    assert str(fail(tmp_path, text)) == "bus.url: environment variable NATS_PW is not set"


TWO_SECRETS = """
[[secrets]]
name = "prod/billing/db"
plugin = "postgres"
schedule = "1d"
[secrets.options]
admin_dsn = {admin}
role = "billing"
[[secrets]]
name = "prod/pg/admin"
plugin = "random"
schedule = "30d"
"""


def test_secret_reference_becomes_secret_ref(tmp_path: Path) -> None:
    """A whole-value ${secret:NAME#field} becomes a SecretRef, even to a later secret."""
    cfg = load(tmp_path, TWO_SECRETS.format(admin='"${secret:prod/pg/admin#dsn}"'),
               plugins=PLUGINS)
    assert cfg.secrets[0].options["admin_dsn"] == SecretRef("prod/pg/admin", "dsn")


@pytest.mark.parametrize(("value", "problem"), [
    ("${secret:prod/nope#dsn}", "${secret:...} refers to unknown secret 'prod/nope'"),
    ("${secret:prod/billing/db#password}",
     "${secret:...} refers to the secret itself ('prod/billing/db')"),
    ("postgresql://${secret:prod/pg/admin#password}@db/x",
     "a ${secret:...} reference must be the whole value; it cannot be combined with other text"),
    ("${secret:prod/pg/admin}", "invalid ${secret:NAME#field} reference; expected e.g. "
                                "${secret:prod/billing/db#password}"),
    ("${secret:a//b#password}", "invalid ${secret:NAME#field} reference; expected e.g. "
                                "${secret:prod/billing/db#password}"),
])
def test_secret_reference_errors(tmp_path: Path, value: str, problem: str) -> None:
    """Secret references must name another configured secret and a field, as the whole value."""
    err = fail(tmp_path, TWO_SECRETS.format(admin=toml_string(value)), plugins=PLUGINS)
    assert (err.path, err.problem) == ("secrets[0].options.admin_dsn", problem)


def test_secret_reference_needs_a_string_option(tmp_path: Path) -> None:
    """A ${secret:...} reference cannot fill an integer option."""
    err = fail(tmp_path, TWO_SECRETS.format(admin='"x"') + "[secrets.options]\n"
               'length = "${secret:prod/billing/db#len}"\n', plugins=PLUGINS)
    assert str(err) == ("secrets[1].options.length: expected an integer, "
                        "got a ${secret:...} reference")


# --- options with a plugin schema -------------------------------------------------------


def test_schema_defaults_are_filled(tmp_path: Path) -> None:
    """Options left out take the schema default (None when the schema has none)."""
    sec = load(tmp_path, pg_secret('admin_dsn = "postgresql://a@h/d"\nrole = "r"'),
               plugins=PLUGINS).secrets[0]
    assert sec.options["port"] == 5432
    assert sec.options["verify"] is True
    assert sec.options["length"] == 32
    assert sec.options["comment"] is None
    assert set(sec.options) == set(FakePostgres.options_schema)


def test_unknown_option_lists_the_schema(tmp_path: Path) -> None:
    """A misspelt option names the expected ones, in schema order."""
    err = fail(tmp_path, pg_secret('admin_dsn = "x"\nrol = "r"'), plugins=PLUGINS)
    assert str(err) == ("secrets[0].options.rol: unknown option (expected one of: admin_dsn, "
                        "role, port, ratio, verify, comment, length, alphabet)")


def test_unknown_option_is_reported_before_missing_env(tmp_path: Path) -> None:
    """A misspelt option name is reported even if its value references an unset variable."""
    err = fail(tmp_path, pg_secret('admin_dns = "${env:NOPE}"\nrole = "r"'), plugins=PLUGINS)
    assert err.path == "secrets[0].options.admin_dns"


def test_option_for_plugin_without_options(tmp_path: Path) -> None:
    """A plugin with an empty schema rejects every option."""
    err = fail(tmp_path, '[[secrets]]\nname = "a"\nplugin = "static"\nschedule = "1h"\n'
                         "[secrets.options]\nx = 1\n", plugins=PLUGINS)
    assert str(err) == "secrets[0].options.x: unknown option (this plugin takes no options)"


def test_missing_required_option(tmp_path: Path) -> None:
    """A required option left out is reported on its path."""
    text = pg_secret('admin_dsn = "x"\nrole = "r"')
    text += '[[secrets]]\nname = "b"\nplugin = "postgres"\nschedule = "1h"\n'
    text += '[secrets.options]\nadmin_dsn = "x"\n'
    err = fail(tmp_path, text, plugins=PLUGINS)
    assert str(err) == "secrets[1].options.role: required"


@pytest.mark.parametrize(("line", "message"), [
    ('length = "32"', "secrets[0].options.length: expected an integer, got string"),
    ("length = true", "secrets[0].options.length: expected an integer, got boolean"),
    ("length = 32.0", "secrets[0].options.length: expected an integer, got float"),
    ("verify = 1", "secrets[0].options.verify: expected a boolean (true or false), got integer"),
    ("role = 5", "secrets[0].options.role: expected a string, got integer"),
    ("role = [\"a\"]", "secrets[0].options.role: expected a string, got array"),
    ("ratio = \"0.5\"", "secrets[0].options.ratio: expected a number, got string"),
    ("ratio = nan", "secrets[0].options.ratio: expected a finite number"),
    ("length = 8", "secrets[0].options.length: must be at least 16"),
    ("length = 5000", "secrets[0].options.length: must be at most 1024"),
    ("port = 0", "secrets[0].options.port: must be at least 1"),
    ("ratio = 2", "secrets[0].options.ratio: must be at most 1"),
    ('alphabet = "abc"', "secrets[0].options.alphabet: must contain at least 10 distinct "
                         "characters"),
    ('alphabet = "abcdefghij klm"', "secrets[0].options.alphabet: must contain only printable "
                                    "ASCII characters (no spaces)"),
])
def test_option_type_and_bound_errors(tmp_path: Path, line: str, message: str) -> None:
    """Options are checked against the schema's type and bounds, alphabets for usability."""
    text = pg_secret(f'admin_dsn = "x"\nrole = "r"\n{line}'.replace('role = "r"\nrole', "role"))
    assert str(fail(tmp_path, text, plugins=PLUGINS)) == message


def test_integer_is_accepted_for_float_option(tmp_path: Path) -> None:
    """An integer fills a float option and is stored as a float."""
    sec = load(tmp_path, pg_secret('admin_dsn = "x"\nrole = "r"\nratio = 1'),
               plugins=PLUGINS).secrets[0]
    assert sec.options["ratio"] == 1.0 and isinstance(sec.options["ratio"], float)


def test_string_bounds_apply_to_length(tmp_path: Path) -> None:
    """For a string option, min and max bound its length."""

    class Bounded:
        options_schema: ClassVar[dict[str, Option]] = {"code": Option(type=str, min=2, max=4)}

    text = '[[secrets]]\nname = "a"\nplugin = "b"\nschedule = "1h"\n[secrets.options]\n'
    err = fail(tmp_path, text + 'code = "x"\n', plugins={"b": Bounded})
    assert str(err) == "secrets[0].options.code: must be at least 2 characters long"
    err = fail(tmp_path, text + 'code = "xxxxx"\n', plugins={"b": Bounded})
    assert str(err) == "secrets[0].options.code: must be at most 4 characters long"


def test_sensitive_options_come_from_schema_and_env(tmp_path: Path) -> None:
    """Schema-sensitive options and options filled from the environment are sensitive."""
    sec = load(tmp_path, pg_secret('admin_dsn = "x"\nrole = "${env:ROLE}"'),
               environ={"ROLE": "billing"}, plugins=PLUGINS).secrets[0]
    assert sec.sensitive_options == frozenset({"admin_dsn", "role"})


# --- nothing leaks -----------------------------------------------------------------------


def test_repr_of_config_hides_env_values(tmp_path: Path) -> None:
    """repr(config) shows no value that came from the environment, with or without plugins."""
    text = pg_secret('admin_dsn = "postgresql://admin:${env:PW}@db/billing"\nrole = "r"')
    text += '[bus]\nurl = "nats://rotator:${env:PW}@127.0.0.1:4222"\n'
    for plugins in (PLUGINS, None):
        cfg = load(tmp_path, text, environ={"PW": PASSWORD}, plugins=plugins)
        assert cfg.secrets[0].options["admin_dsn"] == f"postgresql://admin:{PASSWORD}@db/billing"
        for shown in (repr(cfg), str(cfg), repr(cfg.secrets), repr(cfg.bus)):
            assert PASSWORD not in shown
        assert "nats://rotator:***@127.0.0.1:4222" in repr(cfg)
        assert cfg.bus.display_url == "nats://rotator:***@127.0.0.1:4222"
        assert "'admin_dsn': '***'" in repr(cfg)


def test_repr_of_bus_masks_a_token_url(tmp_path: Path) -> None:
    """A nats://TOKEN@host URL is masked whole in repr and display_url."""
    cfg = load(tmp_path, '[bus]\nurl = "nats://${env:TOKEN}@nats:4222"\n',
               environ={"TOKEN": PASSWORD})
    assert "nats://***@nats:4222" in repr(cfg.bus)
    assert cfg.bus.display_url == "nats://***@nats:4222"
    assert PASSWORD not in repr(cfg)


@pytest.mark.parametrize("text", [
    pg_secret('admin_dsn = "x"\nrole = "r"\nlength = "${env:PW}"'),
    pg_secret('admin_dsn = "x"\nrole = "r"\nalphabet = "${env:PW} "'),
    pg_secret('admin_dsn = "x"\nrole = "${env:PW}"\nport = "${env:PW}"'),
    pg_secret('admin_dsn = "${env:PW}${env:MISSING}"\nrole = "r"'),
    pg_secret('admin_dsn = "${env:PW}${nope}"\nrole = "r"'),
    pg_secret('admin_dsn = "${env:PW}${secret:x#y}"\nrole = "r"'),
    pg_secret('admin_dsn = "${env:PW}"\nrole = "r"\ncomment = "${env:PW}"\nratio = 7'),
    '[bus]\nurl = "http://u:${env:PW}@host"\n',
    '[store]\nurl = "postgresql://u:${env:PW}@host/db"\n',
    '[store]\nurl = "mysql://u:${env:PW}@host/db"\n',
])
def test_errors_never_contain_env_values(tmp_path: Path, text: str) -> None:
    """No ConfigError message contains the value of a referenced environment variable."""
    err = fail(tmp_path, text, environ={"PW": PASSWORD}, plugins=PLUGINS)
    assert PASSWORD not in str(err)
    assert PASSWORD not in repr(err)


@pytest.mark.parametrize(("options", "path", "words"), [
    ({"sslmode": "bogus"}, "secrets[0].options.sslmode", "must be one of"),
    ({"admin_dsn": "mysql://u:pw@h/db"}, "secrets[0].options.admin_dsn", "postgresql://"),
    ({"admin_dsn": "postgresql://u:pw@h:99999/db"}, "secrets[0].options.admin_dsn", "port"),
    ({"role": ""}, "secrets[0].options.role", "not empty"),
])
def test_postgres_options_that_cannot_work_fail_at_load(tmp_path: Path, options: dict[str, str],
                                                        path: str, words: str) -> None:
    """Postgres options no rotation could succeed with are rejected at load, by key path."""
    from rotator.registry import load_plugins

    opts = {"admin_dsn": "postgresql://admin:pw-s3cret@127.0.0.1:5432/postgres", "role": "app",
            **options}
    body = "\n".join(f'{k} = "{v}"' for k, v in opts.items())
    cfg = tmp_path / "r.toml"
    cfg.write_text('[[secrets]]\nname = "a/db"\nplugin = "postgres"\nschedule = "1h"\n'
                   f"[secrets.options]\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, plugins=load_plugins(["postgres"]))
    assert str(info.value).startswith(path + ":") and words in str(info.value)
    assert "pw-s3cret" not in str(info.value) and "pw@" not in str(info.value)
