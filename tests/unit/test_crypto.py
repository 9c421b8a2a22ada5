"""Envelope encryption: round trips, tampering, key handling."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rotator.crypto import Envelope, MasterKey, Sealed
from rotator.errors import CryptoError, IntegrityError

KEY = MasterKey.generate()
ENV = Envelope(KEY)
names = st.from_regex(r"[A-Za-z0-9_-]{1,12}(/[A-Za-z0-9_-]{1,12}){0,3}", fullmatch=True)


@given(name=names, version=st.integers(1, 10**6), data=st.binary(max_size=2048))
@settings(max_examples=200)
def test_round_trip(name: str, version: int, data: bytes) -> None:
    """Whatever is sealed opens back to the same bytes under the same name and version."""
    assert ENV.open(name, version, ENV.seal(name, version, data)) == data


@given(data=st.binary(min_size=1, max_size=256), where=st.integers(0, 10**6),
       part=st.sampled_from(["wrapped_key", "ciphertext"]))
@settings(max_examples=200)
def test_any_flipped_bit_is_detected(data: bytes, where: int, part: str) -> None:
    """Flipping any bit of the wrapped key or the ciphertext makes opening fail."""
    sealed = ENV.seal("a/b", 3, data)
    blob = bytearray(getattr(sealed, part))
    blob[where % len(blob)] ^= 1 << (where % 8)
    tampered = Sealed(sealed.key_id, **{
        "wrapped_key": sealed.wrapped_key, "ciphertext": sealed.ciphertext, part: bytes(blob)})
    with pytest.raises(IntegrityError):
        ENV.open("a/b", 3, tampered)


def test_ciphertext_is_bound_to_name_and_version() -> None:
    """A row copied to another secret or version does not decrypt."""
    sealed = ENV.seal("prod/db", 2, b"{}")
    with pytest.raises(IntegrityError):
        ENV.open("prod/other", 2, sealed)
    with pytest.raises(IntegrityError):
        ENV.open("prod/db", 3, sealed)


def test_wrong_master_key_is_an_integrity_error_without_detail() -> None:
    """Opening with another key of the same id fails without leaking the plaintext."""
    sealed = ENV.seal("x", 1, b"topsecret-value")
    other = MasterKey(key_id=KEY.key_id, key=os.urandom(32))
    with pytest.raises(IntegrityError) as info:
        Envelope(other).open("x", 1, sealed)
    assert "topsecret" not in str(info.value)


def test_unknown_key_id_names_the_key() -> None:
    """A row sealed by a key that is not loaded says which key id is missing."""
    sealed = ENV.seal("x", 1, b"v")
    with pytest.raises(CryptoError, match=KEY.key_id):
        Envelope(MasterKey.generate()).open("x", 1, sealed)


def test_rewrap_moves_rows_to_the_new_key() -> None:
    """rewrap re-seals the data key under the active key and the value still opens."""
    new = MasterKey.generate()
    sealed = ENV.seal("x", 1, b"value")
    moved = Envelope(new, KEY).rewrap("x", 1, sealed)
    assert moved.key_id == new.key_id and moved.ciphertext == sealed.ciphertext
    assert Envelope(new).open("x", 1, moved) == b"value"


def test_key_file_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    """The master key file is created mode 0600, reloads to the same key, and is not replaced."""
    path = tmp_path / "var" / "master.key"
    key = MasterKey.generate()
    key.write_new_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert MasterKey.load_file(path) == key
    with pytest.raises(CryptoError, match="already exists"):
        MasterKey.generate().write_new_file(path)
    assert MasterKey.load_file(path) == key


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    """A key file others can read is refused with the chmod that fixes it."""
    path = tmp_path / "master.key"
    MasterKey.generate().write_new_file(path)
    path.chmod(0o640)
    with pytest.raises(CryptoError, match="chmod 600"):
        MasterKey.load_file(path)


def test_directory_instead_of_key_file_says_so(tmp_path: Path) -> None:
    """A directory where the key file should be is named as such, not as a read error."""
    path = tmp_path / "master.key"
    path.mkdir(mode=0o700)
    with pytest.raises(CryptoError) as info:
        MasterKey.load_file(path)
    assert str(info.value) == f"master key file {path} is a directory"


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
                                  b"rotator-master-key:v1:\xc3\xa9AAAA"])
def test_binary_key_file_is_not_a_master_key(tmp_path: Path, data: bytes) -> None:
    """A file that is not ASCII text is reported as not being a master key."""
    path = tmp_path / "master.key"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(CryptoError) as info:
        MasterKey.load_file(path)
    assert str(info.value) == (
        f"master key file {path} is not a rotator master key (expected base64 text)")


def test_unreadable_key_file_says_permission_denied(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file the process may not read says so in words, not as an exception name."""
    path = tmp_path / "master.key"
    MasterKey.generate().write_new_file(path)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CryptoError) as info:
        MasterKey.load_file(path)
    assert str(info.value) == f"master key file {path} cannot be read: permission denied"


@pytest.mark.parametrize("text", ["", "not base64!", "c2hvcnQ=", "rotator-master-key:v1:AAAA"])
def test_malformed_keys_are_refused(text: str) -> None:
    """Garbage, short keys and truncated files are refused with a clear error."""
    with pytest.raises(CryptoError, match=r"master key|32 bytes"):
        MasterKey.parse(text, where="test")


def test_env_key_missing_names_the_variable() -> None:
    """An unset master key variable is named in the error."""
    with pytest.raises(CryptoError, match="ROTATOR_TEST_KEY"):
        MasterKey.load_env("ROTATOR_TEST_KEY", environ={})
    key = MasterKey.generate()
    assert MasterKey.load_env("K", environ={"K": key.encode()}) == key


def test_repr_hides_key_material() -> None:
    """Neither the key nor the envelope prints key bytes."""
    assert KEY.encode().split(":")[-1] not in repr(KEY) + repr(ENV)
