"""PostgreSQL role passwords, single-user strategy.

``set`` connects with ``admin_dsn`` and runs ``ALTER ROLE ... WITH PASSWORD`` with a
SCRAM-SHA-256 verifier computed here, so the plaintext never reaches the server
(nor its log, whatever ``log_statement`` says). ``test`` logs in afresh as the
role with the candidate password. ``retire`` has nothing to do: ``ALTER ROLE``
already replaced the old password.

Driver exceptions are translated here, at the edge: authentication, privilege
and missing-object problems are permanent; network trouble, an overloaded or
starting server and timeouts are transient. Messages show the admin DSN only with
its password masked, and never the role's password.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from rotator.plugin_api import (
    Option,
    PermanentStepError,
    RotationContext,
    SecretValue,
    StepError,
    StepTimeout,
    TransientStepError,
    generate_password,
    password_options,
    validate_alphabet,
)

try:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
except ImportError as exc:
    raise ImportError("the postgres plugin needs asyncpg: pip install 'rotator[postgres]'") from exc

__all__ = [
    "PostgresPlugin",
    "mask_dsn",
    "quote_ident",
    "quote_literal",
    "scram_sha256_verifier",
]

SCRAM_ITERATIONS = 4096
SCRAM_SALT_BYTES = 16

#: Server errors a retry may fix, by SQLSTATE class (connection exception,
#: insufficient resources, operator intervention, transaction rollback).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})
#: ... and by exact SQLSTATE (lock_not_available).
_TRANSIENT_SQLSTATES = frozenset({"55P03"})

#: Everything the driver and the network raise; anything else is a bug and propagates.
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError)

_LOGIN_REJECTED = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


class PostgresPlugin:
    """Rotates the password of one PostgreSQL role in place."""

    kind: ClassVar[str] = "postgres"
    strategies: ClassVar[frozenset[str]] = frozenset({"single-user"})
    options_schema: ClassVar[Mapping[str, Option]] = MappingProxyType({
        "admin_dsn": Option(type=str, required=True, sensitive=True,
                            help="postgresql:// URL of a role allowed to ALTER the target role"),
        "role": Option(type=str, required=True, help="the role whose password is rotated"),
        "host": Option(type=str, help="host consumers connect to (default: the admin DSN's)"),
        "port": Option(type=int, min=1, max=65535,
                       help="port consumers connect to (default: the admin DSN's, else 5432)"),
        "dbname": Option(type=str,
                         help="database consumers connect to (default: the admin DSN's, "
                              "else 'postgres')"),
        **password_options(32),
        "sslmode": Option(type=str, default="prefer",
                          help="libpq-style sslmode for the login test: disable, allow, "
                               "prefer, require, verify-ca, verify-full"),
        "connect_timeout": Option(type=float, default=10.0, min=0.1,
                                  help="seconds allowed to open a connection"),
        "command_timeout": Option(type=float, default=30.0, min=0.1,
                                  help="seconds allowed for each statement"),
    })

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> dict[str, str]:
        """Problems no rotation could get past, found at config load."""
        problems: dict[str, str] = {}
        admin_dsn = options.get("admin_dsn")
        if isinstance(admin_dsn, str):
            try:
                _dsn_target(admin_dsn)
            except ValueError as exc:
                problems["admin_dsn"] = str(exc)
        role = options.get("role")
        if isinstance(role, str) and (not role.strip() or "\x00" in role):
            problems["role"] = "must be a role name (not empty, no NUL character)"
        sslmode = options.get("sslmode")
        if isinstance(sslmode, str) and sslmode not in _SSLMODES:
            problems["sslmode"] = f"must be one of: {', '.join(sorted(_SSLMODES))}"
        return problems

    async def create(self, ctx: RotationContext) -> SecretValue:
        """A fresh password plus the connection fields consumers need; the server is untouched."""
        cfg = _Settings.from_options(ctx.options)
        password = generate_password(cfg.length, cfg.alphabet)
        return SecretValue({
            "engine": "postgres",
            "host": cfg.host,
            "port": str(cfg.port),
            "dbname": cfg.dbname,
            "username": cfg.role,
            "password": password,
        })

    async def set(self, ctx: RotationContext, new: SecretValue) -> None:
        """Give the role ``new["password"]`` (as a SCRAM verifier); re-running it is harmless."""
        cfg = _Settings.from_options(ctx.options)
        role = new.get("username", cfg.role)
        password = _field(new, "password")
        verifier = await asyncio.to_thread(scram_sha256_verifier, password)
        statement = f"ALTER ROLE {quote_ident(role)} WITH PASSWORD {quote_literal(verifier)}"
        where = f"as admin {mask_dsn(cfg.admin_dsn)}"
        async with _connect(cfg, f"cannot connect {where}", dsn=cfg.admin_dsn) as conn:
            try:
                exists = await conn.fetchval(
                    "SELECT true FROM pg_catalog.pg_roles WHERE rolname = $1", role)
                if not exists:
                    raise PermanentStepError(f"role {role!r} does not exist")
                await conn.execute(statement)
            except _DRIVER_ERRORS as exc:
                _translate(exc, f"cannot set the password of role {role!r} {where}")
        ctx.log.info("postgres.password_set", role=role)

    async def test(self, ctx: RotationContext, new: SecretValue) -> None:
        """Log in as the role with ``new`` on a fresh connection and run ``SELECT 1``."""
        cfg = _Settings.from_options(ctx.options)
        role = _field(new, "username")
        host = new.get("host", cfg.host)
        port_text = new.get("port", str(cfg.port))
        dbname = new.get("dbname", cfg.dbname)
        if not (port_text.isascii() and port_text.isdigit()):
            raise PermanentStepError(f"the value's port {port_text!r} is not a number")
        port = int(port_text)
        where = f"{host}:{port}/{dbname}"
        async with _connect(
                cfg, f"cannot connect to {where} as role {role!r}",
                rejected=f"login as role {role!r} with the candidate password failed ({where})",
                host=host, port=port, user=role, password=_field(new, "password"),
                database=dbname, ssl=cfg.sslmode) as conn:
            try:
                one = await conn.fetchval("SELECT 1")
            except _DRIVER_ERRORS as exc:
                _translate(exc, f"SELECT 1 as role {role!r} on {where} failed")
        if one != 1:
            raise PermanentStepError(f"SELECT 1 as role {role!r} on {where} returned {one!r}")
        ctx.log.debug("postgres.login_ok", role=role)

    async def retire(self, ctx: RotationContext, old: SecretValue) -> None:
        """Nothing to do: single-user ``set`` already replaced the old password."""


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    admin_dsn: str
    role: str
    host: str
    port: int
    dbname: str
    length: int
    alphabet: str
    sslmode: str
    connect_timeout: float
    command_timeout: float

    def __repr__(self) -> str:
        return f"_Settings(admin_dsn={mask_dsn(self.admin_dsn)!r}, role={self.role!r})"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> _Settings:
        schema = PostgresPlugin.options_schema

        def get(name: str) -> Any:
            value = options.get(name)
            return schema[name].default if value is None else value

        admin_dsn, role = get("admin_dsn"), get("role")
        if not isinstance(admin_dsn, str) or not admin_dsn:
            raise PermanentStepError("option 'admin_dsn' is required")
        if not isinstance(role, str) or not role:
            raise PermanentStepError("option 'role' is required")
        if "\x00" in role:
            raise PermanentStepError("option 'role' must not contain a NUL character")
        try:
            dsn_host, dsn_port, dsn_dbname = _dsn_target(admin_dsn)
        except ValueError as exc:
            raise PermanentStepError(f"option 'admin_dsn': {exc}") from exc
        alphabet = get("alphabet")
        problem = validate_alphabet(alphabet) if isinstance(alphabet, str) else "must be a string"
        if problem is not None:
            raise PermanentStepError(f"option 'alphabet' {problem}")
        return cls(
            admin_dsn=admin_dsn,
            role=role,
            host=str(get("host") or dsn_host),
            port=int(get("port") or dsn_port),
            dbname=str(get("dbname") or dsn_dbname),
            length=int(get("length")),
            alphabet=alphabet,
            sslmode=str(get("sslmode")),
            connect_timeout=float(get("connect_timeout")),
            command_timeout=float(get("command_timeout")),
        )


_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})


def _dsn_target(dsn: str) -> tuple[str, int, str]:
    """(host, port, dbname) a postgresql:// URL points at, with libpq-like defaults.

    Raises ValueError with a fixed message: never one quoting the DSN, whose
    password could be cut anywhere by a malformed URL.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    query = dict(parse_qsl(parts.query))
    hostspec = parts.netloc.rpartition("@")[2].split(",")[0]
    if hostspec.startswith("["):
        host, _, rest = hostspec[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = hostspec.partition(":")
    host = unquote(host) or query.get("host", "") or "localhost"
    port_text = port_text or query.get("port", "") or "5432"
    port_text = port_text.split(",")[0]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("has an invalid port")
    port = int(port_text)
    dbname = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or "postgres"
    return host, port, dbname


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its password (in the user info or a ``password=`` parameter) as ``***``."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if not parts.scheme or (not parts.netloc and not parts.query):
        return "<unparseable DSN>"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hostinfo}" if at else hostinfo
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# --- SQL quoting and SCRAM -------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """``name`` as a PostgreSQL identifier, whatever characters it contains."""
    if "\x00" in name:
        raise ValueError("an identifier cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as a string literal, correct with or without standard_conforming_strings."""
    if "\x00" in text:
        raise ValueError("a string literal cannot contain NUL")
    quoted = "'" + text.replace("'", "''") + "'"
    if "\\" in text:
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def scram_sha256_verifier(password: str, *, salt: bytes | None = None,
                          iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores for ``password`` (RFC 5802/7677).

    Format: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, base64
    parts. The password is SASLprep-normalised first, as the server does. CPU-bound
    (PBKDF2): call it through ``asyncio.to_thread``.
    """
    salt = secrets.token_bytes(SCRAM_SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _saslprep(password: str) -> str:
    """SASLprep (RFC 4013) as PostgreSQL applies it: on any violation, the raw password.

    Pure ASCII passes unchanged (every generated password takes this path).
    """
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password if not stringprep.in_table_b1(ch))
    normal = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
        stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
        stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if any(check(ch) for ch in normal for check in prohibited):
        return password
    if any(stringprep.in_table_d1(ch) for ch in normal) and (
            any(stringprep.in_table_d2(ch) for ch in normal)
            or not stringprep.in_table_d1(normal[0])
            or not stringprep.in_table_d1(normal[-1])):
        return password
    return normal


# --- helpers -------------------------------------------------------------------------------


def _field(value: SecretValue, name: str) -> str:
    try:
        return value[name]
    except KeyError:
        raise PermanentStepError(f"the value has no field {name!r}") from None


@contextlib.asynccontextmanager
async def _connect(cfg: _Settings, what: str, *, rejected: str | None = None,
                   **params: Any) -> AsyncIterator[Any]:
    """A connection closed on the way out: politely after success or a step error,
    by aborting the socket after anything else (cancellation included)."""
    try:
        conn = await asyncpg.connect(
            timeout=cfg.connect_timeout, command_timeout=cfg.command_timeout, **params)
    except _LOGIN_REJECTED as exc:
        if rejected is None:
            _translate(exc, what)
        raise PermanentStepError(rejected) from exc
    except _DRIVER_ERRORS as exc:
        _translate(exc, what)
    try:
        yield conn
    except StepError:
        await _close(conn, cfg)
        raise
    except BaseException:
        conn.terminate()
        raise
    await _close(conn, cfg)


async def _close(conn: Any, cfg: _Settings) -> None:
    """Close politely within the command timeout; abort the connection otherwise."""
    try:
        await conn.close(timeout=cfg.command_timeout)
    except BaseException:
        conn.terminate()
        raise


def _translate(exc: BaseException, what: str) -> NoReturn:
    """Re-raise a driver or network exception as the step error the engine understands."""
    if isinstance(exc, TimeoutError):
        raise StepTimeout(f"{what}: timed out") from exc
    if isinstance(exc, _LOGIN_REJECTED):
        raise PermanentStepError(f"{what}: authentication failed") from exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        detail = f"{what}: {type(exc).__name__} (SQLSTATE {state})"
        if state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES:
            raise TransientStepError(detail) from exc
        raise PermanentStepError(detail) from exc
    if isinstance(exc, OSError | ConnectionError | asyncpg.ConnectionDoesNotExistError):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise TransientStepError(f"{what}: {reason}") from exc
    if isinstance(exc, asyncpg.InterfaceError | ValueError):
        # Client-side: a malformed DSN or option. The text may quote the DSN, so it is
        # summarised by class only.
        raise PermanentStepError(f"{what}: {type(exc).__name__}") from exc
    raise exc  # not a driver or network error: a bug, left for the engine to report as such
