"""TOML configuration → frozen dataclasses, validated once at load.

Errors are :class:`~rotator.errors.ConfigError` naming the key path
(``secrets[2].options.role: required``) and what is expected. Secret values and
resolved ``${env:...}`` contents never appear in an error or a ``repr``.

String values in ``[secrets.options]``, ``store.url`` and ``bus.url`` may hold
references, expanded once here:

``${env:NAME}``            the environment variable ``NAME`` (an error if unset)
``${secret:NAME#field}``   only as a whole option value: a :class:`SecretRef` to another
                           configured secret, read from the store at rotation time
``$${``                    a literal ``${``

Relative paths (the SQLite file, the master key file) are resolved against the
working directory at load time, so every path in a :class:`Config` is absolute.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from rotator.errors import ConfigError
from rotator.plugin_api import Option, validate_alphabet

__all__ = [
    "ApiConfig",
    "BusConfig",
    "Config",
    "CryptoConfig",
    "EngineConfig",
    "LogConfig",
    "SecretConfig",
    "SecretRef",
    "StoreConfig",
    "load_config",
]


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A ``${secret:NAME#field}`` reference, resolved at rotation time from the store."""

    name: str
    field: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    url: str = "sqlite:///var/rotator.db"
    path: Path = Path("var/rotator.db")   # absolute after load (relative → working directory)

    @property
    def display_url(self) -> str:
        """``url`` with any password masked: the form to log or print."""
        return _mask_url(self.url)

    def __repr__(self) -> str:
        return f"StoreConfig(url={self.display_url!r}, path={self.path!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class CryptoConfig:
    master_key_file: Path | None = None   # absolute after load (relative → working directory)
    master_key_env: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BusConfig:
    url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = "rotator"
    stream: str = "ROTATOR"
    connect_timeout: float = 2.0
    publish_timeout: float = 5.0
    enabled: bool = True

    @property
    def display_url(self) -> str:
        """``url`` with its password or token masked: the form to log or print."""
        return _mask_url(self.url)

    def __repr__(self) -> str:
        return (f"BusConfig(url={self.display_url!r}, subject_prefix={self.subject_prefix!r}, "
                f"stream={self.stream!r}, connect_timeout={self.connect_timeout!r}, "
                f"publish_timeout={self.publish_timeout!r}, enabled={self.enabled!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    listen: str = "127.0.0.1:8200"

    @property
    def host(self) -> str:
        """The host part of ``listen``, without IPv6 brackets."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of ``listen`` (0 lets the OS pick a free port)."""
        return _split_listen(self.listen)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    step_timeout: float = 30.0        # seconds per plugin step
    max_retries: int = 3              # retries of a transient step failure
    retry_base_delay: float = 1.0     # first backoff delay; doubles, with full jitter
    max_candidates: int = 3           # fresh values tried when the backend rejects one
    lease_ttl: float = 60.0           # a crashed process's lease expires after this
    shutdown_grace: float = 5.0       # in-flight rotations get this long on SIGTERM
    max_value_bytes: int = 65536      # encoded value size limit


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = "info"
    format: str = "console"           # "console" (key=value) or "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretConfig:
    name: str
    plugin: str
    schedule: str                     # as written, for display
    interval: float | None            # seconds, when the schedule is an interval
    cron: str | None                  # the 5-field expression, when it is a cron schedule
    jitter: float = 0.0               # seconds of random delay added to each fire time
    options: Mapping[str, Any] = field(default_factory=dict)
    # Options redacted in repr: those the plugin schema marks sensitive, plus every
    # option whose value came (wholly or partly) from an ${env:...} reference.
    sensitive_options: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        shown = {k: ("***" if k in self.sensitive_options else v) for k, v in self.options.items()}
        return (f"SecretConfig(name={self.name!r}, plugin={self.plugin!r}, "
                f"schedule={self.schedule!r}, options={shown!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path
    store: StoreConfig
    crypto: CryptoConfig
    bus: BusConfig
    api: ApiConfig
    engine: EngineConfig
    log: LogConfig
    secrets: tuple[SecretConfig, ...]

    def has_secret(self, name: str) -> bool:
        return any(sec.name == name for sec in self.secrets)

    def secret(self, name: str) -> SecretConfig:
        for sec in self.secrets:
            if sec.name == name:
                return sec
        raise KeyError(name)


def load_config(path: str | Path, *, plugins: Mapping[str, type] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. ``plugins`` maps kind → plugin class (for options).

    Without ``plugins`` each ``[secrets.options]`` table is kept as written (references
    still expanded); with it, the table is checked against the plugin's ``options_schema``
    and completed with the schema's defaults.
    """
    file = Path(path)
    raw = _read_toml(file)
    refs = _References(os.environ if environ is None else environ)
    _check_keys(raw, "", _SECTIONS)
    store = _parse_store(_section(raw, "store"), refs)
    crypto = _parse_crypto(_section(raw, "crypto"))
    bus = _parse_bus(_section(raw, "bus"), refs)
    api = _parse_api(_section(raw, "api"))
    engine = _parse_engine(_section(raw, "engine"))
    log = _parse_log(_section(raw, "log"))
    # Two passes: ${secret:...} references may point at a secret defined further down.
    tables = _secret_tables(raw)
    secrets = _parse_secrets(tables, plugins)
    refs.secret_names = frozenset(sec.name for sec in secrets)
    secrets = [_with_options(sec, table, f"secrets[{i}]", plugins, refs)
               for i, (sec, table) in enumerate(zip(secrets, tables, strict=True))]
    return Config(path=_absolute(file), store=store, crypto=crypto, bus=bus, api=api,
                  engine=engine, log=log, secrets=tuple(secrets))


# --- reading -------------------------------------------------------------------------

_Table = Mapping[str, Any]
_SECTIONS = ("store", "crypto", "bus", "api", "engine", "log", "secrets")
_TOML_WHERE = re.compile(r"^(?P<msg>.*) \((?P<where>at line (?P<line>\d+), column (?P<col>\d+)"
                         r"|at end of document)\)$", re.DOTALL)
# tomllib quotes the offending character in a few messages; it may belong to a secret.
_TOML_QUOTED_CHAR = re.compile(r"(invalid character|Illegal character) .*$", re.DOTALL)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", f"config file {file} not found (create one or pass --config)") \
            from None
    except IsADirectoryError:
        raise ConfigError("", f"config file {file} is a directory (pass a .toml file)") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {file}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{file}: not valid UTF-8 (byte offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{file}: {_describe_toml_error(str(exc))}") from None
    except RecursionError:
        raise ConfigError("", f"{file}: invalid TOML: nested too deeply") from None


def _describe_toml_error(message: str) -> str:
    match = _TOML_WHERE.match(message)
    if match is None:
        return f"invalid TOML: {message}"
    problem = _TOML_QUOTED_CHAR.sub(r"\1", match["msg"])
    problem = problem[:1].lower() + problem[1:]
    if match["line"] is None:
        return f"invalid TOML at the end of the file: {problem}"
    return f"invalid TOML at line {match['line']}, column {match['col']}: {problem}"


# --- generic checks ------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(parent: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{parent}.{shown}" if parent else shown


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, SecretRef):
        return "a ${secret:...} reference"
    if isinstance(value, datetime):
        return "datetime"
    for kind, name in ((int, "integer"), (float, "float"), (str, "string"), (dict, "table"),
                       (list, "array"), (date, "date"), (time, "time")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _check_keys(table: _Table, path: str, allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(_join(path, key),
                              f"unknown key (expected one of: {', '.join(allowed)})")


def _field_names(cls: Any) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _section(raw: _Table, name: str) -> _Table:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, f"expected a table ([{name}]), got {_type_name(value)}")
    return value


def _get_str(table: _Table, key: str, section: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(_join(section, key), f"expected a string, got {_type_name(value)}")
    return value


def _required_str(table: _Table, key: str, section: str) -> str:
    if key not in table:
        raise ConfigError(_join(section, key), "required")
    value = _get_str(table, key, section, "")
    if not value:
        raise ConfigError(_join(section, key), "must not be empty")
    return value


def _get_bool(table: _Table, key: str, section: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(_join(section, key),
                          f"expected a boolean (true or false), got {_type_name(value)}")
    return value


def _get_int(table: _Table, key: str, section: str, default: int, *, minimum: int,
             maximum: tuple[float, str] | None = None) -> int:
    """An integer within bounds; ``maximum`` is the bound and how to show it."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(_join(section, key), f"expected an integer, got {_type_name(value)}")
    if value < minimum:
        raise ConfigError(_join(section, key), f"must be at least {minimum}")
    if maximum is not None and value > maximum[0]:
        raise ConfigError(_join(section, key), f"must be at most {maximum[1]}")
    return value


def _get_seconds(table: _Table, key: str, section: str, default: float, *,
                 maximum: tuple[float, str] | None = None) -> float:
    """A strictly positive, finite number (TOML integers are accepted)."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(_join(section, key), f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise ConfigError(_join(section, key), "expected a finite number")
    if value <= 0:
        raise ConfigError(_join(section, key), "must be greater than 0")
    if maximum is not None and value > maximum[0]:
        raise ConfigError(_join(section, key), f"must be at most {maximum[1]}")
    return float(value)


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): keep symlinks as the operator wrote them.
    return Path(os.path.abspath(path))


def _mask_url(url: str) -> str:
    """The URL with its password (or a bare token before '@') replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{scheme}://{user + ':***' if colon else '***'}{rest[at:]}"


# --- references ----------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_SECRET_REF = re.compile(r"secret:(?P<name>[^#]*)#(?P<field>[A-Za-z0-9_-]+)")
_UNSUPPORTED_REF = ("unsupported ${...} reference; expected ${env:NAME} or "
                    "${secret:NAME#field} (write $${ for a literal ${)")


class _References:
    """Expands ``${env:...}`` and ``${secret:...}`` in string values."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.secret_names: frozenset[str] = frozenset()

    def expand(self, text: str, path: str, *, owner: str | None) -> tuple[str | SecretRef, bool]:
        """The expanded value and whether the environment contributed to it.

        ``owner`` is the secret whose options are being expanded; None where
        ``${secret:...}`` is not allowed. Messages never quote the text: it may be a secret.
        """
        if "$" not in text:
            return text, False
        pieces: list[str] = []
        pos = 0
        used_env = False
        for match in _REFERENCE.finditer(text):
            pieces.append(text[pos:match.start()])
            pos = match.end()
            if match[0] == "$${":
                pieces.append("${")
                continue
            if not match["close"]:
                raise ConfigError(path, "unterminated ${ reference (missing '}'); "
                                        "write $${ for a literal ${")
            body = match["body"]
            if body.startswith("env:"):
                pieces.append(self._env(body[4:], path))
                used_env = True
            elif body.startswith("secret:"):
                if match.start() != 0 or match.end() != len(text):
                    raise ConfigError(path, "a ${secret:...} reference must be the whole value; "
                                            "it cannot be combined with other text")
                return self._secret(body, path, owner), False
            else:
                raise ConfigError(path, _UNSUPPORTED_REF)
        pieces.append(text[pos:])
        return "".join(pieces), used_env

    def expand_env(self, text: str, path: str) -> str:
        """Expand a value where only ``${env:...}`` is allowed."""
        value, _ = self.expand(text, path, owner=None)
        assert isinstance(value, str)   # owner=None rejects ${secret:...}
        return value

    def expand_tree(self, value: object, path: str, *, owner: str) -> tuple[object, bool]:
        """Expand every string inside tables and arrays."""
        if isinstance(value, str):
            return self.expand(value, path, owner=owner)
        if isinstance(value, dict):
            out: dict[str, object] = {}
            used = False
            for key, item in value.items():
                out[key], item_used = self.expand_tree(item, _join(path, key), owner=owner)
                used = used or item_used
            return out, used
        if isinstance(value, list):
            items: list[object] = []
            used = False
            for i, item in enumerate(value):
                new, item_used = self.expand_tree(item, f"{path}[{i}]", owner=owner)
                items.append(new)
                used = used or item_used
            return items, used
        return value, False

    def _env(self, name: str, path: str) -> str:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(path, "invalid ${env:NAME} reference; NAME must be an environment "
                                    "variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if name not in self.environ:
            raise ConfigError(path, f"environment variable {name} is not set")
        return self.environ[name]

    def _secret(self, body: str, path: str, owner: str | None) -> SecretRef:
        if owner is None:
            raise ConfigError(path, "${secret:...} references are only allowed in "
                                    "[secrets.options]")
        match = _SECRET_REF.fullmatch(body)
        if match is None or not _valid_name(match["name"]):
            raise ConfigError(path, "invalid ${secret:NAME#field} reference; expected e.g. "
                                    "${secret:prod/billing/db#password}")
        name = match["name"]
        if name == owner:
            raise ConfigError(path, f"${{secret:...}} refers to the secret itself ({name!r})")
        if name not in self.secret_names:
            raise ConfigError(path, f"${{secret:...}} refers to unknown secret {name!r}")
        return SecretRef(name, match["field"])


# --- sections ------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_LEVELS = ("debug", "info", "warning", "error")
_FORMATS = ("console", "json")
_SQLITE = "sqlite:///"
# Any engine setting not listed here must be greater than 0.
_ENGINE_MINIMUM = {"max_retries": 0, "max_candidates": 1, "max_value_bytes": 1}
# Upper bounds, with how an error shows them. They catch typos (an extra zero or two)
# that would otherwise make a rotation retry, wait or hold its lease for absurdly long.
_DAY = (86400.0, "86400 (1 day)")
_ENGINE_MAXIMUM: dict[str, tuple[float, str]] = {
    "max_retries": (100, "100"),
    "max_candidates": (100, "100"),
    "max_value_bytes": (16 * 1024 * 1024, "16777216 (16 MiB)"),
    "step_timeout": _DAY,
    "lease_ttl": _DAY,
    "shutdown_grace": _DAY,
    "retry_base_delay": (3600.0, "3600 (1 hour)"),
}


def _parse_store(table: _Table, refs: _References) -> StoreConfig:
    _check_keys(table, "store", ("url",))
    url = refs.expand_env(_get_str(table, "url", "store", StoreConfig().url), "store.url")
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.url", "postgresql store is not available yet; use sqlite:///PATH")
    if not url.startswith(_SQLITE):
        raise ConfigError("store.url", "expected sqlite:///PATH")
    if url == _SQLITE:
        raise ConfigError("store.url", "expected sqlite:///PATH (the path is empty)")
    return StoreConfig(url=url, path=_absolute(Path(url[len(_SQLITE):])))


def _parse_crypto(table: _Table) -> CryptoConfig:
    _check_keys(table, "crypto", ("master_key_file", "master_key_env"))
    if "master_key_file" in table and "master_key_env" in table:
        raise ConfigError("crypto", "set master_key_file or master_key_env, not both")
    if "master_key_env" in table:
        name = _get_str(table, "master_key_env", "crypto", "")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError("crypto.master_key_env", "expected an environment variable name "
                                                       "([A-Za-z_][A-Za-z0-9_]*)")
        return CryptoConfig(master_key_env=name)
    file = _get_str(table, "master_key_file", "crypto", "var/master.key")
    if not file:
        raise ConfigError("crypto.master_key_file", "must not be empty")
    return CryptoConfig(master_key_file=_absolute(Path(file)))


def _parse_bus(table: _Table, refs: _References) -> BusConfig:
    default = BusConfig()
    _check_keys(table, "bus", _field_names(BusConfig))
    url = refs.expand_env(_get_str(table, "url", "bus", default.url), "bus.url")
    scheme, _, rest = url.partition("://")
    if scheme not in ("nats", "tls") or not rest:
        # Not quoted: the URL may carry a password.
        raise ConfigError("bus.url", "expected nats://HOST:PORT or tls://HOST:PORT")
    prefix = _get_str(table, "subject_prefix", "bus", default.subject_prefix)
    if not _SUBJECT.fullmatch(prefix):
        raise ConfigError("bus.subject_prefix", f"invalid subject prefix {prefix!r}; expected "
                                                "tokens of [A-Za-z0-9_-] separated by '.'")
    stream = _get_str(table, "stream", "bus", default.stream)
    if not _TOKEN.fullmatch(stream):
        raise ConfigError("bus.stream", f"invalid stream name {stream!r}; expected "
                                        "[A-Za-z0-9_-] characters only")
    return BusConfig(
        url=url, subject_prefix=prefix, stream=stream,
        connect_timeout=_get_seconds(table, "connect_timeout", "bus", default.connect_timeout),
        publish_timeout=_get_seconds(table, "publish_timeout", "bus", default.publish_timeout),
        enabled=_get_bool(table, "enabled", "bus", default.enabled),
    )


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets")
    if (not sep or not host or any(ch.isspace() for ch in host)
            or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535):
        raise ValueError("expected HOST:PORT")
    return host, int(port)


def _parse_api(table: _Table) -> ApiConfig:
    _check_keys(table, "api", ("listen",))
    listen = _get_str(table, "listen", "api", ApiConfig().listen)
    try:
        _split_listen(listen)
    except ValueError:
        raise ConfigError("api.listen", f"expected HOST:PORT (e.g. 127.0.0.1:8200 or [::1]:8200),"
                                        f" got {listen!r}") from None
    return ApiConfig(listen=listen)


def _parse_engine(table: _Table) -> EngineConfig:
    _check_keys(table, "engine", _field_names(EngineConfig))
    default = EngineConfig()
    values: dict[str, Any] = {}
    for name in _field_names(EngineConfig):
        current = getattr(default, name)
        maximum = _ENGINE_MAXIMUM.get(name)
        if isinstance(current, int):
            values[name] = _get_int(table, name, "engine", current,
                                    minimum=_ENGINE_MINIMUM.get(name, 1), maximum=maximum)
        else:
            values[name] = _get_seconds(table, name, "engine", current, maximum=maximum)
    return EngineConfig(**values)


def _parse_log(table: _Table) -> LogConfig:
    _check_keys(table, "log", _field_names(LogConfig))
    default = LogConfig()
    level = _get_str(table, "level", "log", default.level).lower()
    if level not in _LEVELS:
        raise ConfigError("log.level", f"expected one of: {', '.join(_LEVELS)}")
    fmt = _get_str(table, "format", "log", default.format).lower()
    if fmt not in _FORMATS:
        raise ConfigError("log.format", f"expected one of: {', '.join(_FORMATS)}")
    return LogConfig(level=level, format=fmt)


# --- secrets -------------------------------------------------------------------------

_SECRET_KEYS = ("name", "plugin", "schedule", "jitter", "options")
_NAME = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_NAME_MAX = 200
_INTERVAL = re.compile(r"([0-9]+)([smhd])")
_INTERVAL_LIKE = re.compile(r"-?[0-9.]+\s*[A-Za-z]+")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_INTERVAL_DAYS = 3650
_SCHEDULE_HINT = "expected 5 fields or an interval like 90s, 15m, 12h, 7d"


def _valid_name(name: str) -> bool:
    return len(name) <= _NAME_MAX and _NAME.fullmatch(name) is not None


def _secret_tables(raw: _Table) -> list[_Table]:
    value = raw.get("secrets", [])
    if not isinstance(value, list):
        raise ConfigError("secrets", f"expected an array of tables ([[secrets]]), "
                                     f"got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"secrets[{i}]", f"expected a table, got {_type_name(item)}")
    return value


def _parse_secrets(tables: list[_Table], plugins: Mapping[str, type] | None) -> list[SecretConfig]:
    """Everything but the options, which need the full list of names."""
    seen: dict[str, int] = {}
    out: list[SecretConfig] = []
    for i, table in enumerate(tables):
        path = f"secrets[{i}]"
        _check_keys(table, path, _SECRET_KEYS)
        name = _required_str(table, "name", path)
        if len(name) > _NAME_MAX:
            raise ConfigError(f"{path}.name", f"too long ({len(name)} characters; "
                                              f"at most {_NAME_MAX})")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{path}.name", f"invalid secret name {name!r}; expected segments "
                                              "of [A-Za-z0-9_-] separated by '/', "
                                              "e.g. prod/billing/db")
        if name in seen:
            raise ConfigError(f"{path}.name",
                              f"duplicate secret name {name!r} (also secrets[{seen[name]}])")
        seen[name] = i
        plugin = _required_str(table, "plugin", path)
        if plugins is not None and plugin not in plugins:
            installed = ", ".join(sorted(plugins)) or "none"
            raise ConfigError(f"{path}.plugin",
                              f"unknown plugin {plugin!r} (installed: {installed})")
        schedule = _required_str(table, "schedule", path)
        interval, cron = _parse_schedule(schedule, f"{path}.schedule")
        out.append(SecretConfig(
            name=name, plugin=plugin, schedule=schedule, interval=interval, cron=cron,
            jitter=_parse_jitter(table.get("jitter", 0), f"{path}.jitter"),
        ))
    return out


def _interval_seconds(text: str, path: str) -> int | None:
    """Seconds for ``<int><unit>``; None when ``text`` does not look like an interval."""
    match = _INTERVAL.fullmatch(text)
    if match is None:
        if _INTERVAL_LIKE.fullmatch(text):
            raise ConfigError(path, f"invalid interval {text!r}; expected a whole number "
                                    "followed by s, m, h or d, e.g. 90s, 15m, 12h, 7d")
        return None
    digits = match[1].lstrip("0") or "0"
    # Checked before int(): a huge digit string would be slow or overflow later.
    if len(digits) > 12 or int(digits) * _UNIT_SECONDS[match[2]] > _MAX_INTERVAL_DAYS * 86400:
        raise ConfigError(path, f"interval {text!r} is too long; at most {_MAX_INTERVAL_DAYS}d")
    return int(digits) * _UNIT_SECONDS[match[2]]


def _parse_schedule(text: str, path: str) -> tuple[float | None, str | None]:
    seconds = _interval_seconds(text, path)
    if seconds is not None:
        if seconds < 1:
            raise ConfigError(path, "an interval must be at least 1s")
        return float(seconds), None
    _check_cron(text, path)
    return None, text


def _check_cron(expr: str, path: str) -> None:
    # Validated with the parser the scheduler uses, so a schedule that loads also fires.
    # Imported here: the scheduler module imports this one.
    from rotator.scheduler import cron_trigger

    try:
        trigger = cron_trigger(expr)
    except ValueError as exc:
        raise ConfigError(path, f"invalid cron expression {expr!r}: {exc}; {_SCHEDULE_HINT}") \
            from None
    # Each field can be valid while no date matches them all ("0 0 31 2 *": February 31st).
    # Such a schedule would never rotate; the scheduler also assumes a cron always fires again.
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ConfigError(path, f"cron expression {expr!r} never fires (no such date)")


def _parse_jitter(value: object, path: str) -> float:
    if isinstance(value, str):
        seconds = _interval_seconds(value, path)
        if seconds is None:
            raise ConfigError(path, f"invalid jitter {value!r}; expected a number of seconds "
                                    "or an interval like 30s, 5m")
        return float(seconds)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"expected a number of seconds or an interval like \"30s\", "
                                f"got {_type_name(value)}")
    if not math.isfinite(value):
        raise ConfigError(path, "expected a finite number")
    if value < 0:
        raise ConfigError(path, "must be at least 0")
    if value > _MAX_INTERVAL_DAYS * 86400:
        raise ConfigError(path, f"too long; at most {_MAX_INTERVAL_DAYS}d")
    return float(value)


def _with_options(sec: SecretConfig, table: _Table, path: str,
                  plugins: Mapping[str, type] | None, refs: _References) -> SecretConfig:
    opath = f"{path}.options"
    raw = table.get("options", {})
    if not isinstance(raw, dict):
        raise ConfigError(opath, f"expected a table, got {_type_name(raw)}")
    schema: Mapping[str, Option] | None = None
    if plugins is not None:
        schema = getattr(plugins[sec.plugin], "options_schema", {})
        _check_option_names(raw, schema, opath)
    options: dict[str, Any] = {}
    sensitive: set[str] = set()
    for key, value in raw.items():
        options[key], used_env = refs.expand_tree(value, _join(opath, key), owner=sec.name)
        if used_env:
            sensitive.add(key)
    if schema is not None and plugins is not None:
        options = _validate_options(options, schema, opath)
        sensitive |= {key for key, opt in schema.items() if opt.sensitive}
        _plugin_check(plugins[sec.plugin], options, opath)
    return replace(sec, options=options, sensitive_options=frozenset(sensitive))


# --- plugin options ------------------------------------------------------------------

def _plugin_check(plugin: type, options: Mapping[str, Any], path: str) -> None:
    """Run the plugin's optional ``check_options`` hook on the literal option values."""
    check = getattr(plugin, "check_options", None)
    if not callable(check):
        return
    literal = {k: v for k, v in options.items() if not isinstance(v, SecretRef)}
    problems = check(literal)
    for key, problem in sorted(dict(problems).items()):
        raise ConfigError(_join(path, key), str(problem))

_EXPECTED = {str: "a string", int: "an integer", float: "a number",
             bool: "a boolean (true or false)"}


def _check_option_names(raw: _Table, schema: Mapping[str, Option], path: str) -> None:
    for key in raw:
        if key not in schema:
            problem = (f"unknown option (expected one of: {', '.join(schema)})" if schema
                       else "unknown option (this plugin takes no options)")
            raise ConfigError(_join(path, key), problem)


def _validate_options(options: Mapping[str, Any], schema: Mapping[str, Option],
                      path: str) -> dict[str, Any]:
    """Type- and bound-check each option; absent ones take the schema default."""
    out: dict[str, Any] = {}
    for key, opt in schema.items():
        where = _join(path, key)
        if key in options:
            out[key] = _check_option(options[key], opt, where, key)
        elif opt.required:
            raise ConfigError(where, "required")
        else:
            out[key] = opt.default
    return out


def _check_option(value: object, opt: Option, path: str, key: str) -> object:
    """The value, converted where TOML is looser than the schema (an int for a float).

    Messages name types and bounds only, never the value: it may be a secret.
    """
    expected = _EXPECTED.get(opt.type, f"a value of type {opt.type.__name__}")
    if isinstance(value, SecretRef):
        if opt.type is not str:
            raise ConfigError(path, f"expected {expected}, got {_type_name(value)}")
        return value
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (not isinstance(value, opt.type)
            or (isinstance(value, bool) and opt.type is not bool)):
        raise ConfigError(path, f"expected {expected}, got {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, "expected a finite number")
    measure: int | float | None = None
    unit = ""
    if isinstance(value, str):
        measure, unit = len(value), " characters long"
    elif isinstance(value, int | float) and not isinstance(value, bool):
        measure = value
    if measure is not None and opt.min is not None and measure < opt.min:
        raise ConfigError(path, f"must be at least {opt.min}{unit}")
    if measure is not None and opt.max is not None and measure > opt.max:
        raise ConfigError(path, f"must be at most {opt.max}{unit}")
    if key == "alphabet" and isinstance(value, str):
        problem = validate_alphabet(value)
        if problem is not None:
            raise ConfigError(path, problem)
    return value
