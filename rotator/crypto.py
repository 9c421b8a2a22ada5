"""Envelope encryption: pure, synchronous, no I/O beyond reading/creating the key file.

Every version gets a fresh 256-bit data key (DEK). The value is sealed with
AES-256-GCM under the DEK; the DEK is sealed with AES-256-GCM under the master key.
Both seals carry associated data binding them to the secret name and version, so
a ciphertext copied onto another row does not decrypt. The master key has a key
id stored next to each wrapped DEK, which lets ``rekey`` rewrap rows one by one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rotator.errors import CryptoError, IntegrityError

__all__ = ["Envelope", "MasterKey", "Sealed"]

_FILE_PREFIX = "rotator-master-key:v1:"
_NONCE = 12
_KEY = 32


@dataclass(frozen=True, slots=True)
class MasterKey:
    """A 256-bit key-encryption key and its id (derived from the key, not secret)."""

    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        if len(key) != _KEY:
            raise CryptoError(f"a master key must be {_KEY} bytes, got {len(key)}")
        key_id = hashlib.sha256(b"rotator-key-id\x00" + key).hexdigest()[:16]
        return cls(key_id=key_id, key=key)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_bytes(secrets.token_bytes(_KEY))

    @classmethod
    def parse(cls, text: str, *, where: str) -> MasterKey:
        """Parse the key file / env format: ``rotator-master-key:v1:<base64>`` or bare base64."""
        body = text.strip()
        if body.startswith(_FILE_PREFIX):
            body = body[len(_FILE_PREFIX):]
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError(
                f"{where}: not a rotator master key (expected base64 of 32 bytes)") from None
        if len(raw) != _KEY:
            raise CryptoError(f"{where}: a master key must decode to {_KEY} bytes, got {len(raw)}")
        return cls.from_bytes(raw)

    def encode(self) -> str:
        return _FILE_PREFIX + base64.b64encode(self.key).decode("ascii")

    @classmethod
    def load_file(cls, path: Path) -> MasterKey:
        where = f"master key file {path}"
        try:
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            data = path.read_bytes()
        except FileNotFoundError:
            raise CryptoError(f"{where} not found (run `rotator init` to create it)") from None
        except IsADirectoryError:
            raise CryptoError(f"{where} is a directory") from None
        except PermissionError:
            raise CryptoError(f"{where} cannot be read: permission denied") from None
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            raise CryptoError(f"{where} cannot be read: {reason}") from None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise CryptoError(
                f"{where} is not a rotator master key (expected base64 text)") from None
        if st.st_mode & 0o077:
            raise CryptoError(
                f"{where} is readable by group or others "
                f"(mode {st.st_mode & 0o777:o}); run: chmod 600 {path}")
        return cls.parse(text, where=where)

    @classmethod
    def load_env(cls, name: str, environ: Mapping[str, str] | None = None) -> MasterKey:
        env = os.environ if environ is None else environ
        if name not in env:
            raise CryptoError(f"environment variable {name} (crypto.master_key_env) is not set")
        return cls.parse(env[name], where=f"environment variable {name}")

    def write_new_file(self, path: Path) -> None:
        """Create ``path`` with mode 0600; refuses to overwrite an existing key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CryptoError(
                f"master key file {path} already exists; refusing to overwrite") from None
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(self.encode() + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@dataclass(frozen=True, slots=True)
class Sealed:
    """One encrypted version as stored: master key id, wrapped DEK, sealed value."""

    key_id: str
    wrapped_key: bytes   # nonce || AES-GCM(master, DEK)
    ciphertext: bytes    # nonce || AES-GCM(DEK, value)


def _aad(kind: bytes, name: str, version: int, key_id: str = "") -> bytes:
    return b"\x00".join((b"rotator/v1", kind, name.encode("utf-8"), str(version).encode(),
                         key_id.encode("ascii")))


class Envelope:
    """Seals and opens versions with the active master key; opens with any known key."""

    def __init__(self, active: MasterKey, *older: MasterKey) -> None:
        self.active = active
        self._keys = {k.key_id: k for k in (active, *older)}

    def __repr__(self) -> str:
        return f"Envelope(active={self.active.key_id!r})"

    def seal(self, name: str, version: int, plaintext: bytes) -> Sealed:
        dek = AESGCM.generate_key(bit_length=256)
        n1, n2 = os.urandom(_NONCE), os.urandom(_NONCE)
        ciphertext = n1 + AESGCM(dek).encrypt(n1, plaintext, _aad(b"value", name, version))
        wrapped = n2 + AESGCM(self.active.key).encrypt(
            n2, dek, _aad(b"dek", name, version, self.active.key_id))
        return Sealed(self.active.key_id, wrapped, ciphertext)

    def open(self, name: str, version: int, sealed: Sealed) -> bytes:
        master = self._keys.get(sealed.key_id)
        if master is None:
            raise CryptoError(
                f"{name} v{version} is sealed with master key {sealed.key_id}, which is not loaded")
        try:
            w = sealed.wrapped_key
            dek = AESGCM(master.key).decrypt(w[:_NONCE], w[_NONCE:],
                                             _aad(b"dek", name, version, sealed.key_id))
            c = sealed.ciphertext
            return AESGCM(dek).decrypt(c[:_NONCE], c[_NONCE:], _aad(b"value", name, version))
        except (InvalidTag, ValueError):
            raise IntegrityError(f"{name} v{version}: ciphertext does not authenticate "
                                 "(wrong master key or tampered row)") from None

    def rewrap(self, name: str, version: int, sealed: Sealed) -> Sealed:
        """Re-seal the DEK under the active key; the value ciphertext is untouched."""
        if sealed.key_id == self.active.key_id:
            return sealed
        master = self._keys.get(sealed.key_id)
        if master is None:
            raise CryptoError(f"master key {sealed.key_id} is not loaded")
        w = sealed.wrapped_key
        try:
            dek = AESGCM(master.key).decrypt(w[:_NONCE], w[_NONCE:],
                                             _aad(b"dek", name, version, sealed.key_id))
        except InvalidTag:
            raise IntegrityError(f"{name} v{version}: wrapped key does not authenticate") from None
        n = os.urandom(_NONCE)
        wrapped = n + AESGCM(self.active.key).encrypt(
            n, dek, _aad(b"dek", name, version, self.active.key_id))
        return Sealed(self.active.key_id, wrapped, sealed.ciphertext)
