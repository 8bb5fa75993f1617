"""``cma-qemu snapshot save|list|rm`` and the snapshot side of ``boot --from``.

A snapshot is a directory (see cma_qemu/snapshot.py); a bare name (no ``/``) means a
directory of that name in the cache, ``~/.cache/cma-qemu/snapshots``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.cli.machine import progress_console
from cma_qemu.errors import EINVAL, CmaError
from cma_qemu.lifecycle import run
from cma_qemu.snapshot import (
    SnapshotInfo,
    default_snapshot_dir,
    list_snapshots,
    read_snapshot,
    remove_snapshot,
)
from cma_qemu.units import MiB

__all__ = [
    "check_requested",
    "cmd_snapshot_list",
    "cmd_snapshot_rm",
    "cmd_snapshot_save",
    "resolve",
    "restore_for",
]


def resolve(name: str) -> Path:
    """A snapshot directory: a path as given, or a bare name in the cache."""
    if "/" in name or name in (".", ".."):
        return Path(name)
    return default_snapshot_dir() / name


def check_requested(info: SnapshotInfo, args: argparse.Namespace) -> None:
    """``boot --from DIR BOARD --cma ...``: what is named on the command line must match.

    Attributes left out are taken from the snapshot; one that differs is EINVAL before
    anything starts (a snapshot is valid only for the reservations it was booted with).
    """
    asked = {
        "board": getattr(args, "board", None),
        "regions": args.cma,
        "map": args.map,
        "asterisk": args.asterisk,
        "allocator": args.allocator,
    }
    if asked["board"] is not None:
        asked["board"] = load_board(asked["board"]).name
    diffs = [
        f"{name} {value!r} asked, {info.key.get(name)!r} saved"
        for name, value in asked.items()
        if value is not None and value != info.key.get(name)
    ]
    if diffs:
        raise EINVAL(
            "does not match: " + "; ".join(diffs) + " (save another snapshot for them)",
            where=f"snapshot {info.path}",
        )


async def restore_for(args: argparse.Namespace) -> Agent:
    """``boot --from DIR``: the snapshot checked against what the command line names, restored."""
    info = read_snapshot(resolve(args.from_dir))
    check_requested(info, args)
    agent = await Agent.restore(
        info.path, monitor_path=Path(args.monitor) if args.monitor else None
    )
    if args.record:
        try:
            agent.recording.start(Path(args.record))
        except BaseException:
            await agent.close()
            raise
    return agent


async def _save(args: argparse.Namespace) -> int:
    console = progress_console()
    board = load_board(args.board)
    path = resolve(args.dir)
    console.print(f"[dim]booting {board.name}[/dim]")
    agent = await Agent.boot(
        board,
        regions=args.cma,
        map_text=args.map,
        asterisk=args.asterisk,
        allocator=args.allocator,
        progress=lambda message: console.print(f"[dim]{message}[/dim]"),
    )
    async with agent:  # Agent.boot verified every reservation in the guest
        await agent.snapshot(path)
    info = read_snapshot(path)
    print(f"saved {board.name} to {info.path} ({_used(info.path)})")
    return 0


def _used(path: Path) -> str:
    used = sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())
    return f"{used / MiB:.1f} MiB on disk"


def cmd_snapshot_save(args: argparse.Namespace) -> int:
    """Boot BOARD, verify its reservations in the guest, save it to DIR."""
    return run(_save(args))


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    """The snapshots in the cache (or ``--dir``): name, board, regions, age, or why unusable."""
    parent = Path(args.dir) if args.dir else default_snapshot_dir()
    found = list_snapshots(parent)
    if args.json:
        print(
            json.dumps(
                [
                    {"error": str(item)}
                    if isinstance(item, CmaError)
                    else {"path": str(item.path), "created": item.created, "key": item.key}
                    for item in found
                ],
                indent=2,
            )
        )
        return 0
    for item in found:
        if isinstance(item, CmaError):
            print(f"unusable  {item}")
            continue
        when = datetime.datetime.fromtimestamp(item.created).strftime("%Y-%m-%d %H:%M")
        regions = item.key.get("regions")
        print(f"{item.path.name}  {item.board}  {when}  {_used(item.path)}  {regions}")
    if not found:
        print(f"no snapshots in {parent}")
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    """Remove snapshot directories (refusing anything that is not one)."""
    for name in args.names:
        remove_snapshot(resolve(name))
    return 0
