"""The ``rotator`` command: argument parsing and human output only.

Exit codes: 0 success, 1 a failed operation, 2 bad usage or configuration.
Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rotator import __version__
from rotator.config import Config
from rotator.errors import (
    ConfigError,
    LeaseHeld,
    NotFound,
    PluginLoadError,
    RotatorError,
)
from rotator.store.base import RotationRow
from rotator.types import Label, RotationState

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line usage found after parsing (exit 2)."""


def _default_config() -> str:
    return os.environ.get("ROTATOR_CONFIG") or "config/rotator.toml"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $ROTATOR_CONFIG, then config/rotator.toml)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")

    p = argparse.ArgumentParser(prog="rotator", parents=[common],
                                description="Rotate credentials on schedule, store every "
                                            "version encrypted, announce changes on NATS.")
    p.add_argument("--version", action="version", version=f"rotator {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("init", parents=[common], help="create the master key and the store")
    s.add_argument("--print-key", action="store_true",
                   help="print a fresh master key for crypto.master_key_env and exit")
    sub.add_parser("run", parents=[common], help="run the daemon (SIGTERM/SIGINT to stop)")

    s = sub.add_parser("rotate", parents=[common], help="rotate a secret now and wait for it")
    s.add_argument("name")

    s = sub.add_parser("get", parents=[common], help="print a secret's value")
    s.add_argument("name")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--version", type=_version_number, dest="version_no", metavar="N")
    which.add_argument("--label", choices=[str(x) for x in Label])
    s.add_argument("--field", metavar="F", help="print only this field, raw")
    s.add_argument("--json", action="store_true",
                   help="print name, version, labels, created_at and value as JSON")

    s = sub.add_parser("versions", parents=[common], help="list a secret's versions (no values)")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")

    sub.add_parser("plugins", parents=[common], help="installed rotation plugins and their options")

    for cmd in ("status", "list"):
        s = sub.add_parser(cmd, parents=[common], help="secrets, last and next rotations")
        s.add_argument("--json", action="store_true")
    return p


def _version_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}") from None
    if not 1 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"version numbers start at 1: {text!r}")
    return number


def _fail(message: str, code: int) -> int:
    print(f"rotator: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything rotator writes is private to its user
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    given = getattr(args, "config", None)
    if given is not None and not given.strip():
        return _fail("--config: empty path", EXIT_USAGE)
    config_path = Path(given or _default_config())
    try:
        return asyncio.run(_dispatch(args, config_path))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, PluginLoadError, UsageError) as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), EXIT_USAGE)
    except RotatorError as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        if debug:
            traceback.print_exc()
        return _fail(f"unexpected {type(exc).__name__} (run with --debug for the traceback)",
                     EXIT_FAILED)


async def _dispatch(args: argparse.Namespace, config_path: Path) -> int:
    from rotator.app import load
    from rotator.logs import configure_logging

    if args.command == "init" and args.print_key:
        from rotator.crypto import MasterKey
        print(MasterKey.generate().encode())
        return EXIT_OK
    if args.command == "plugins":
        return _plugins()
    configure_logging("debug" if getattr(args, "debug", False) else "warning")
    cfg, plugin_classes = load(config_path)
    level = "debug" if getattr(args, "debug", False) else cfg.log.level
    if args.command != "run" and level != "debug":
        level = "critical"   # one-shot commands print their own one-line outcome
    configure_logging(level, cfg.log.format)
    if args.command in ("get", "versions", "status", "list") and not cfg.store.path.exists():
        raise NotFound(f"store {cfg.store.path} does not exist yet (run `rotator init`)")
    handler = {
        "init": _init, "run": _run, "rotate": _rotate, "get": _get, "versions": _versions,
        "status": _status, "list": _status,
    }[args.command]
    return await handler(args, cfg, plugin_classes)


async def _init(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.app import load_master_key
    from rotator.crypto import MasterKey
    from rotator.store.sqlite import SQLiteStore

    if cfg.crypto.master_key_env:
        load_master_key(cfg)  # must be set and valid
        print(f"master key: from environment variable {cfg.crypto.master_key_env}")
    else:
        path = cfg.crypto.master_key_file
        assert path is not None
        if path.exists():
            load_master_key(cfg)
            print(f"master key: {path} (exists)")
        else:
            await asyncio.to_thread(MasterKey.generate().write_new_file, path)
            print(f"master key: {path} (created, mode 0600; back it up: without it no "
                  "stored value can be read)")
    store = SQLiteStore(cfg.store.path)
    await store.open()
    await store.close()
    print(f"store: {cfg.store.path}")
    return EXIT_OK


async def _run(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.app import run_daemon

    await run_daemon(cfg, plugins)
    return EXIT_OK


def _plugins() -> int:
    from rotator.registry import discover_plugins

    loaded, broken = discover_plugins()
    for name, cls in sorted(loaded.items()):
        schema = getattr(cls, "options_schema", {})
        opts = ", ".join(f"{k}{'*' if o.required else ''}" for k, o in schema.items())
        strategies = ",".join(sorted(getattr(cls, "strategies", ())))
        print(f"{name:<12} {strategies:<14} options: {opts or '-'}")
    for name, exc in sorted(broken.items()):
        print(f"{name:<12} BROKEN         {exc}")
    print("(* = required option)")
    return EXIT_OK


def _known(cfg: Config, name: str) -> None:
    if not cfg.has_secret(name):
        raise UsageError(f"{name}: no such secret in {cfg.path} "
                       f"(configured: {', '.join(s.name for s in cfg.secrets) or 'none'})")


async def _rotate(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.app import open_app

    _known(cfg, args.name)
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    interrupted = False

    def on_signal() -> None:
        # SIGTERM/SIGINT: stop cleanly (once); the engine parks the rotation, frees its lease.
        nonlocal interrupted
        if not interrupted and me is not None:
            interrupted = True
            me.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with open_app(cfg, plugins) as app:
            try:
                result = await app.engine.rotate(args.name, reason="manual")
            except LeaseHeld as exc:
                return _fail(f"{exc}; try again when it has finished", EXIT_FAILED)
            _, backlog = await app.relay.try_flush() if cfg.bus.enabled else (0, 0)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return _fail(f"{args.name}: interrupted; the rotation resumes with the next "
                     "`rotator rotate` or when the daemon runs", EXIT_INTERRUPTED)
    how = "resumed and completed" if result.resumed else "rotated"
    if result.state is RotationState.DONE:
        print(f"{args.name}: {how} to version {result.version} (rotation {result.rotation_id})")
    if cfg.bus.enabled and backlog:
        print(f"events: NATS at {cfg.bus.display_url} unreachable; {backlog} event(s) wait in the "
              "outbox and are delivered when it is back", file=sys.stderr)
    if result.state is not RotationState.DONE:
        return _fail(f"{args.name}: rotation {result.rotation_id} failed: {result.error}",
                     EXIT_FAILED)
    return EXIT_OK


async def _get(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.app import open_app

    async with open_app(cfg, plugins) as app:
        label = Label(args.label) if args.label else None
        row, value = await app.engine.read(args.name, version=args.version_no, label=label)
    fields = value.reveal()
    if args.field is not None:
        if args.field not in fields:
            return _fail(f"{args.name} v{row.version} has no field {args.field!r} "
                         f"(fields: {', '.join(sorted(fields))})", EXIT_FAILED)
        sys.stdout.write(fields[args.field] + "\n")
    elif args.json:
        print(json.dumps({"name": row.name, "version": row.version,
                          "labels": [str(x) for x in row.labels],
                          "created_at": row.created_at.isoformat(), "value": fields},
                         ensure_ascii=False, indent=2))
    else:
        print(json.dumps(fields, ensure_ascii=False, indent=2, sort_keys=True))
    return EXIT_OK


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _state(rot: RotationRow) -> str:
    """``interrupted`` for a running rotation nobody holds a lease on (it resumes later)."""
    from rotator.engine import owner_is_dead

    if rot.state is RotationState.RUNNING and (
            (rot.lease_until or 0) < time.time() or (rot.owner and owner_is_dead(rot.owner))):
        return "interrupted"
    return str(rot.state)


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _versions(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.store.sqlite import SQLiteStore

    async with SQLiteStore(cfg.store.path) as store:
        rows = await store.list_versions(args.name)
        if not rows and await store.get_secret(args.name) is None \
                and not cfg.has_secret(args.name):
            raise NotFound(f"{args.name}: no such secret in the store or in {cfg.path}")
    if args.json:
        print(json.dumps([{"version": r.version, "state": str(r.state),
                           "labels": [str(x) for x in r.labels],
                           "created_at": r.created_at.isoformat(),
                           "rotation_id": r.rotation_id} for r in rows], indent=2))
        return EXIT_OK
    table = [["VERSION", "LABELS", "STATE", "CREATED (UTC)", "ROTATION"]]
    table += [[str(r.version), ",".join(r.labels) or "-", str(r.state), _when(r.created_at),
               r.rotation_id] for r in rows]
    print(_table(table) if rows else f"{args.name}: no versions yet (it has not been rotated)")
    return EXIT_OK


async def _status(args: argparse.Namespace, cfg: Config, plugins: dict[str, type]) -> int:
    from rotator.store.sqlite import SQLiteStore

    out: list[dict[str, Any]] = []
    async with SQLiteStore(cfg.store.path) as store:
        for sec in cfg.secrets:
            row = await store.get_secret(sec.name)
            last = await store.last_rotation(sec.name)
            try:
                current: int | None = (await store.get_version(sec.name)).version
            except NotFound:
                current = None
            out.append({
                "name": sec.name, "plugin": sec.plugin, "schedule": sec.schedule,
                "current_version": current,
                "last_rotated_at": row.last_rotated_at.isoformat()
                if row and row.last_rotated_at else None,
                "next_rotation_at": row.next_rotation_at.isoformat()
                if row and row.next_rotation_at else None,
                "last_rotation": None if last is None else {
                    "id": last.id, "state": _state(last), "reason": last.reason,
                    "step": str(last.step), "error": last.error,
                    "started_at": last.started_at.isoformat()},
            })
        backlog = await store.outbox_backlog()
    if args.json:
        print(json.dumps({"secrets": out, "outbox_backlog": backlog}, indent=2))
        return EXIT_OK
    table = [["NAME", "PLUGIN", "SCHEDULE", "CURRENT", "LAST ROTATED (UTC)", "LAST RESULT",
              "NEXT (UTC)"]]
    for s in out:
        last = s["last_rotation"]
        result = "-" if last is None else last["state"] + (
            f": {last['error']} (the backend was put back to the current value)"
            if last["state"] == "failed" and last["step"] == "rollback"
            and "rollback failed" not in (last["error"] or "") else
            f" at {last['step']}: {last['error']}" if last["state"] == "failed" else
            f" at {last['step']} (resumes on the next rotate or daemon start)"
            if last["state"] == "interrupted" else "")
        table.append([
            s["name"], s["plugin"], s["schedule"],
            "-" if s["current_version"] is None else f"v{s['current_version']}",
            _when(datetime.fromisoformat(s["last_rotated_at"]) if s["last_rotated_at"] else None),
            result,
            _when(datetime.fromisoformat(s["next_rotation_at"]) if s["next_rotation_at"] else None),
        ])
    print(_table(table))
    if not backlog:
        print("\noutbox: empty (every event published)")
    elif cfg.bus.enabled:
        print(f"\noutbox: {backlog} event(s) not yet published (the daemon publishes them when "
              "NATS is reachable)")
    else:
        print(f"\noutbox: {backlog} event(s) kept; bus.enabled = false, so none are published")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
