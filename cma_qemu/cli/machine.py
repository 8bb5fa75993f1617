"""The commands that run QEMU: ``boot``, ``attach`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from qemu.qmp import Runstate
from rich.console import Console

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.cli.offline import read_script
from cma_qemu.errors import EINVAL, EIO, ETIMEDOUT
from cma_qemu.guest_put import parse_put, put
from cma_qemu.lifecycle import run
from cma_qemu.views import local_snapshot, region_table

__all__ = ["cmd_attach", "cmd_boot", "progress_console", "regions_json"]


def progress_console() -> Console:
    """Where progress and tables for people go: stderr, and only when it is a terminal.

    Redirected or piped, stderr carries nothing but errors and the guest's own stderr, so
    ``boot --script`` prints what ``replay`` prints and a failure is one line.
    """
    return Console(stderr=True, highlight=False, quiet=not sys.stderr.isatty())


def regions_json(agent: Agent) -> dict[str, Any]:
    """What a harness needs to know about a booted or attached agent."""
    regions, _ = local_snapshot(agent.cma)
    machine = agent.machine
    recorder = agent.recording.recorder
    return {
        "board": agent.board.name,
        "regions": regions,
        "map": agent.cma.map_text,
        "asterisk": agent.cma.asterisk_text,
        "monitor": str(agent.monitor_path),
        "qmp": str(machine.qmp_path),
        "channel": str(machine.channel_path),
        "record": None if recorder is None else str(recorder.path),
        "state": None if agent.journal is None else str(agent.journal.path),
        "restore": None if agent.journal_restore is None else agent.journal_restore.as_json(),
    }


async def _boot_agent(args: argparse.Namespace, console: Console) -> Agent:
    if args.from_dir is not None:  # boot --from DIR: checked, then restored (cli/snapshot.py)
        from cma_qemu.cli.snapshot import restore_for

        return await restore_for(args)
    if args.board is None:
        raise EINVAL("name a board, or a snapshot with --from DIR", where="boot")
    board = load_board(args.board)
    with console.status(f"booting {board.name}") as status:

        def progress(message: str) -> None:
            status.update(message)
            console.print(f"[dim]{message}[/dim]")

        return await Agent.boot(
            board,
            regions=args.cma,
            map_text=args.map,
            asterisk=args.asterisk,
            allocator=args.allocator,
            monitor_path=Path(args.monitor) if args.monitor else None,
            progress=progress,
            record=Path(args.record) if args.record else None,
        )


async def _boot(args: argparse.Namespace) -> int:
    console = progress_console()
    script = read_script(args.script) if args.script else None
    puts = [parse_put(spec) for spec in args.put]  # a bad --put fails before QEMU starts
    agent = await _boot_agent(args, console)
    async with agent:
        for local, guest in puts:
            console.print(f"[dim]copying {local} to {guest}[/dim]")
            await put(agent, local, guest)
        if args.json:
            print(json.dumps(regions_json(agent), indent=2), flush=True)
        else:
            console.print(region_table(local_snapshot(agent.cma)[0]))
            console.print(f"[dim]monitor: {agent.monitor_path}[/dim]")
        if args.run is not None:
            out, status = await agent.shell.run(args.run, timeout=args.timeout)
            if out:
                print(out, flush=True)
            return status
        if script is not None:
            result = await agent.shell.run_script(script, timeout=args.timeout)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return 1 if result.stderr or result.status else 0
        console.print("[bold]guest console[/bold] (Ctrl-] leaves and shuts the guest down)")
        await asyncio.to_thread(agent.console.interact)
        return 0


def cmd_boot(args: argparse.Namespace) -> int:
    """``cma-qemu boot``: a board with its regions reserved; a command, a script or a shell."""
    return run(_boot(args))


async def _attach(args: argparse.Namespace) -> int:
    console = progress_console()
    board = load_board(args.board)
    agent = await Agent.attach(
        board,
        Path(args.qmp),
        Path(args.channel),
        regions=args.cma,
        map_text=args.map,
        asterisk=args.asterisk,
        allocator=args.allocator,
        monitor_path=Path(args.monitor) if args.monitor else None,
        record=Path(args.record) if args.record else None,
        state=Path(args.state) if args.state else None,
        journal=not args.no_state,
    )
    async with agent:
        if args.json:
            print(json.dumps(regions_json(agent), indent=2), flush=True)
        else:
            console.print(region_table(local_snapshot(agent.cma)[0]))
            if agent.journal_restore is not None:
                console.print(agent.journal_restore.describe())
            console.print(
                f"serving the guest channel; monitor at {agent.monitor_path}; "
                "Ctrl-C detaches (QEMU keeps running)"
            )
        await _until_shutdown(agent)
        console.print("QEMU shut down or went away; detached")
    return 0


async def _until_shutdown(agent: Agent) -> None:
    """Until QEMU says SHUTDOWN or its QMP connection goes away."""
    machine = agent.machine
    with machine.events.subscribe("SHUTDOWN") as shutdown:
        while machine.qmp.runstate == Runstate.RUNNING:
            try:
                await shutdown.get(0.5)
                return
            except ETIMEDOUT:
                continue
            except EIO:
                return


def cmd_attach(args: argparse.Namespace) -> int:
    """``cma-qemu attach``: serve a QEMU someone else started until it shuts down."""
    return run(_attach(args))
