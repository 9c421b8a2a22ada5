"""The PostgreSQL plugin against a private cluster that checks SCRAM passwords."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from servers import PostgresCluster, free_port

from rotator.errors import PermanentStepError, StepTimeout, TransientStepError
from rotator.testing import PluginConformance, make_context
from rotator.types import SecretValue
from rotator_plugins.postgres import (
    PostgresPlugin,
    mask_dsn,
    quote_ident,
    quote_literal,
    scram_sha256_verifier,
)

TRICKY_ALPHABET = "abcdefghijkLMNOP'\"\\$;-"


@pytest.fixture
async def role(private_pg: PostgresCluster, unique_name: str) -> AsyncIterator[str]:
    """A login role with a known initial password, dropped afterwards."""
    await private_pg.create_role(unique_name, "initial-" + secrets.token_hex(8))
    yield unique_name
    await private_pg.drop_role(unique_name)


def pg_value(pg: PostgresCluster, role: str, password: str) -> SecretValue:
    """A value as create() would make it, with a chosen password."""
    return SecretValue({"engine": "postgres", "host": pg.host, "port": str(pg.port),
                        "dbname": "postgres", "username": role, "password": password})


class TestPostgresConformance(PluginConformance):
    """The conformance kit against a real role on the private cluster."""

    verifies_credentials = True

    @pytest.fixture
    def plugin(self) -> PostgresPlugin:
        return PostgresPlugin()

    @pytest.fixture
    def options(self, private_pg: PostgresCluster, role: str) -> dict[str, object]:
        return {"admin_dsn": private_pg.admin_dsn, "role": role, "sslmode": "disable"}


async def test_create_takes_connection_fields_from_the_admin_dsn(
        private_pg: PostgresCluster) -> None:
    """create() fills host, port and dbname from the admin DSN unless options override them."""
    plugin = PostgresPlugin()
    value = await plugin.create(make_context(plugin, {"admin_dsn": private_pg.admin_dsn,
                                                      "role": "app"}))
    fields = value.reveal()
    password = fields.pop("password")
    assert fields == {"engine": "postgres", "host": "127.0.0.1", "port": str(private_pg.port),
                      "dbname": "postgres", "username": "app"}
    assert len(password) == 32
    assert password.isalnum()
    value = await plugin.create(make_context(plugin, {
        "admin_dsn": "postgresql://admin:pw@db.internal/ops", "role": "app",
        "host": "db.example", "length": 20}))
    assert value["host"] == "db.example"
    assert value["port"] == "5432"
    assert value["dbname"] == "ops"
    assert len(value["password"]) == 20


async def test_role_name_with_quotes_and_spaces(private_pg: PostgresCluster) -> None:
    """A role named with spaces, double quotes and a single quote is rotated correctly."""
    name = f'app {secrets.token_hex(3)} it\'s "quoted"'
    await private_pg.create_role(name, "initial-password-1")
    try:
        plugin = PostgresPlugin()
        ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": name})
        new = await plugin.create(ctx)
        assert new["username"] == name
        await plugin.set(ctx, new)
        await plugin.test(ctx, new)
        assert await private_pg.can_login(name, new["password"])
        assert not await private_pg.can_login(name, "initial-password-1")
    finally:
        await private_pg.drop_role(name)


async def test_password_alphabet_with_quotes_backslashes_and_dollars(
        private_pg: PostgresCluster, role: str) -> None:
    """Passwords full of quotes, backslashes and dollar signs log in; the old one stops working."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": role,
                                "alphabet": TRICKY_ALPHABET, "length": 64})
    old = await plugin.create(ctx)
    await plugin.set(ctx, old)
    for _ in range(20):  # make sure the generated password does use the awkward characters
        new = await plugin.create(ctx)
        if all(ch in new["password"] for ch in "'\"\\$"):
            break
    else:
        pytest.fail("no generated password used every special character")
    await plugin.set(ctx, new)
    await plugin.test(ctx, new)
    assert await private_pg.can_login(role, new["password"])
    assert not await private_pg.can_login(role, old["password"])
    # A hand-made value with every awkward sequence at once.
    crafted = pg_value(private_pg, role, "a'b\"c\\d$$e$1f\\'g''h\\\\")
    await plugin.set(ctx, crafted)
    assert await private_pg.can_login(role, crafted["password"])
    assert not await private_pg.can_login(role, new["password"])


async def test_non_ascii_password_is_saslprep_normalised(
        private_pg: PostgresCluster, role: str) -> None:
    """A non-ASCII password (ligature, full-width letters, NBSP) logs in like the server expects."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": role})
    value = pg_value(private_pg, role, "p\u00e4ss\ufb01-\uff58\u00a0w\u00f6rd")
    await plugin.set(ctx, value)
    await plugin.test(ctx, value)
    assert await private_pg.can_login(role, value["password"])


async def test_plaintext_never_reaches_the_server(private_pg: PostgresCluster, role: str) -> None:
    """The server stores and logs a SCRAM verifier, never the plaintext password."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": role})
    new = await plugin.create(ctx)
    await plugin.set(ctx, new)
    await plugin.test(ctx, new)
    stored = await private_pg.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    assert stored.startswith("SCRAM-SHA-256$4096:")
    log = private_pg.read_log()
    assert f"ALTER ROLE {quote_ident(role)} WITH PASSWORD 'SCRAM-SHA-256$4096:" in log
    assert new["password"] not in log


async def test_missing_role_is_permanent(private_pg: PostgresCluster, unique_name: str) -> None:
    """A missing role is a PermanentStepError whose text has no password in it."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": unique_name})
    new = await plugin.create(ctx)
    with pytest.raises(PermanentStepError, match="does not exist") as info:
        await plugin.set(ctx, new)
    assert repr(unique_name) in str(info.value)
    assert private_pg.superpassword not in str(info.value)
    assert new["password"] not in str(info.value)


async def test_wrong_admin_password_is_permanent_and_masked(
        private_pg: PostgresCluster, role: str) -> None:
    """A wrong admin password is a PermanentStepError whose text shows the DSN masked."""
    wrong = "Wr0ng-" + secrets.token_hex(8)
    dsn = f"postgresql://postgres:{wrong}@127.0.0.1:{private_pg.port}/postgres"
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": dsn, "role": role})
    new = await plugin.create(ctx)
    with pytest.raises(PermanentStepError, match="authentication failed") as info:
        await plugin.set(ctx, new)
    text = str(info.value)
    assert f"postgresql://postgres:***@127.0.0.1:{private_pg.port}/postgres" in text
    assert wrong not in text
    assert new["password"] not in text


async def test_admin_without_privilege_is_permanent(
        private_pg: PostgresCluster, role: str, unique_name: str) -> None:
    """An admin role not allowed to ALTER the target role gives a PermanentStepError."""
    weak = unique_name + "_weak"
    await private_pg.create_role(weak, "weak-password-1")
    try:
        plugin = PostgresPlugin()
        ctx = make_context(plugin, {"admin_dsn": private_pg.dsn(weak, "weak-password-1"),
                                    "role": role})
        with pytest.raises(PermanentStepError, match="InsufficientPrivilege"):
            await plugin.set(ctx, await plugin.create(ctx))
    finally:
        await private_pg.drop_role(weak)


async def test_unreachable_server_is_transient() -> None:
    """A closed port makes set() and test() raise TransientStepError."""
    port = free_port()
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": f"postgresql://postgres:pw-123@127.0.0.1:{port}/x",
                                "role": "app", "connect_timeout": 5})
    new = await plugin.create(ctx)
    with pytest.raises(TransientStepError) as info:
        await plugin.set(ctx, new)
    assert "pw-123" not in str(info.value)
    with pytest.raises(TransientStepError):
        await plugin.test(ctx, new)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_a_server_that_never_answers_times_out(silent_server: int) -> None:
    """connect_timeout bounds the wait for a server that accepts but never answers."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {
        "admin_dsn": f"postgresql://postgres:pw@127.0.0.1:{silent_server}/postgres",
        "role": "app", "connect_timeout": 0.3, "sslmode": "disable"})
    new = await plugin.create(ctx)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StepTimeout):
        await plugin.set(ctx, new)
    with pytest.raises(StepTimeout):
        await plugin.test(ctx, new)
    assert loop.time() - started < 5


async def test_test_rejects_the_old_password_after_set(
        private_pg: PostgresCluster, role: str) -> None:
    """After set(new), test() of the previous value fails with the documented message."""
    plugin = PostgresPlugin()
    ctx = make_context(plugin, {"admin_dsn": private_pg.admin_dsn, "role": role})
    old = await plugin.create(ctx)
    await plugin.set(ctx, old)
    await plugin.set(ctx, await plugin.create(ctx))
    with pytest.raises(PermanentStepError,
                       match=f"login as role {role!r} with the candidate password failed"):
        await plugin.test(ctx, old)


async def test_missing_options_are_permanent() -> None:
    """A missing admin_dsn or role, or a non-URL DSN, is a PermanentStepError at create()."""
    plugin = PostgresPlugin()
    with pytest.raises(PermanentStepError, match="admin_dsn"):
        await plugin.create(make_context(plugin, {"role": "app"}))
    with pytest.raises(PermanentStepError, match="role"):
        await plugin.create(make_context(plugin, {"admin_dsn": "postgresql://a@h/d"}))
    with pytest.raises(PermanentStepError, match="postgresql://") as info:
        await plugin.create(make_context(plugin, {"admin_dsn": "host=h password=sekrit",
                                                  "role": "app"}))
    assert "sekrit" not in str(info.value)
    with pytest.raises(PermanentStepError, match="port") as info:
        await plugin.create(make_context(plugin, {
            "admin_dsn": "postgresql://u:se/cr@t@host:5432/db", "role": "app"}))
    assert "se/cr" not in str(info.value) and "cr@t" not in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://admin:s3cret@db:5432/app", "postgresql://admin:***@db:5432/app"),
        ("postgres://admin@db/app", "postgres://admin@db/app"),
        ("postgresql://db/app?user=a&password=s3cret", "postgresql://db/app?user=a&password=***"),
        ("host=db password=s3cret", "<unparseable DSN>"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    """mask_dsn hides the password wherever a URL carries it."""
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize("scs", ["on", "off"])
@pytest.mark.parametrize("text", ["plain", "it's", "back\\slash", "both\\'mixed''", "$$x$$"])
async def test_quote_literal_round_trips(private_pg: PostgresCluster, text: str,
                                         scs: str) -> None:
    """quote_literal reads back as the same string whatever standard_conforming_strings says."""
    conn = await private_pg.connect()
    try:
        await conn.execute(f"SET standard_conforming_strings = {scs}")
        assert await conn.fetchval(f"SELECT {quote_literal(text)}") == text
        assert await conn.fetchval(f"SELECT 1 AS {quote_ident(text)}") == 1
    finally:
        await conn.close()


def test_scram_verifier_format() -> None:
    """The verifier has PostgreSQL's layout and a fresh 16-byte salt each time."""
    first = scram_sha256_verifier("pencil")
    second = scram_sha256_verifier("pencil")
    assert first != second
    head, keys = first.split("$", 1)[1].split("$")
    iterations, salt = head.split(":")
    assert first.startswith("SCRAM-SHA-256$4096:")
    assert iterations == "4096"
    assert len(salt) == 24  # base64 of 16 bytes
    assert all(len(k) == 44 for k in keys.split(":"))  # base64 of 32 bytes
    assert scram_sha256_verifier("pencil", salt=b"s" * 16) == scram_sha256_verifier(
        "pencil", salt=b"s" * 16)
