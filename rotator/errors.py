"""The exception tree of rotator.

Every error the product raises on purpose is a ``RotatorError``. Messages name
what went wrong and where; they never contain a secret value or a DSN password.

::

    RotatorError
    ├── ConfigError(path)                 bad config: key path + what is expected
    ├── CryptoError
    │   └── IntegrityError                wrong key or tampered row; no detail leaked
    ├── StoreError
    │   └── NotFound                      no such secret / version / label
    ├── LeaseHeld                         another process owns this secret's rotation
    ├── ValueTooLarge                     a value above the configured size limit
    └── PluginError(plugin)
        ├── PluginLoadError               the plugin cannot be loaded or is malformed
        └── StepError(plugin, name, step)
            ├── TransientStepError        the engine retries with backoff
            │   └── StepTimeout           a step exceeded its time budget
            └── PermanentStepError        the rotation is rolled back and parked
                └── CandidateRejected     the backend refused this value; try a fresh one
"""

from __future__ import annotations

__all__ = [
    "CandidateRejected",
    "ConfigError",
    "CryptoError",
    "IntegrityError",
    "LeaseHeld",
    "NotFound",
    "PermanentStepError",
    "PluginError",
    "PluginLoadError",
    "RotatorError",
    "StepError",
    "StepTimeout",
    "StoreError",
    "TransientStepError",
    "ValueTooLarge",
]


class RotatorError(Exception):
    """Base of every error rotator raises on purpose."""


class ConfigError(RotatorError):
    """The configuration is invalid; ``path`` is the key path, e.g. ``secrets[2].options.role``."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class CryptoError(RotatorError):
    """Encryption or key handling failed."""


class IntegrityError(CryptoError):
    """A ciphertext did not authenticate: wrong master key or a tampered row."""


class StoreError(RotatorError):
    """The store failed or holds something unexpected."""


class NotFound(StoreError):
    """The secret, version or label asked for does not exist."""


class LeaseHeld(RotatorError):
    """Another process is rotating this secret right now."""

    def __init__(self, name: str, owner: str) -> None:
        self.name = name
        self.owner = owner
        super().__init__(f"{name}: a rotation is already running (owner {owner})")


class ValueTooLarge(RotatorError):
    """A secret value is larger than ``engine.max_value_bytes``."""


class PluginError(RotatorError):
    """A plugin failed; ``plugin`` is its kind."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class PluginLoadError(PluginError):
    """A plugin could not be loaded, or does not satisfy the plugin protocol."""


class StepError(PluginError):
    """A rotation step failed. Raised by plugins; ``name`` and ``step`` are filled by the engine."""

    def __init__(self, message: str, *, plugin: str = "", name: str = "", step: str = "") -> None:
        self.message = message
        self.name = name
        self.step = step
        PluginError.__init__(self, plugin, message)

    def bind(self, *, plugin: str, name: str, step: str) -> StepError:
        """Fill in where the error happened (the engine calls this)."""
        self.plugin = plugin or self.plugin
        self.name = name or self.name
        self.step = step or self.step
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        where = " ".join(
            part for part in (
                f"plugin={self.plugin}" if self.plugin else "",
                f"secret={self.name}" if self.name else "",
                f"step={self.step}" if self.step else "",
            ) if part
        )
        return f"{self.message} ({where})" if where else self.message


class TransientStepError(StepError):
    """A step failed in a way that may pass on retry (network, timeout, lock)."""


class StepTimeout(TransientStepError, TimeoutError):
    """A step did not finish within its time budget."""


class PermanentStepError(StepError):
    """A step failed in a way a retry will not fix (auth, missing role, bad options)."""


class CandidateRejected(PermanentStepError):
    """The backend refused this particular value (e.g. a password policy); a fresh one may pass."""
