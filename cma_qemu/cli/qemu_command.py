"""``cma-qemu qemu-command``: the QEMU command line and its files, for a harness to start.

A harness that starts QEMU itself (labgrid, avocado, a shell script) gets here what ``boot``
would run: the patched DTB and the guest RAM file are written into ``--dir``, and the argv
runs as is from any process, with no descriptor of this one. Everything in the directory
belongs to the harness from then on; ``cma-qemu attach`` (with the printed sockets) serves the
guest once QEMU runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from cma_qemu.boards import load_board
from cma_qemu.configuration import build_cma
from cma_qemu.errors import EINVAL, from_os_error
from cma_qemu.machine.launch import PreparedLaunch, prepare_launch
from cma_qemu.views import local_snapshot

__all__ = ["attach_argv", "cmd_qemu_command", "describe"]


def attach_argv(args: argparse.Namespace, launch: PreparedLaunch) -> list[str]:
    """The ``cma-qemu attach`` command that serves this QEMU (same board and attributes)."""
    argv = ["cma-qemu", "attach", "--board", args.board]
    argv += ["--qmp", str(launch.files.qmp_socket), "--channel", str(launch.files.channel_socket)]
    for option, value in (("--cma", args.cma), ("--map", args.map), ("--asterisk", args.asterisk)):
        if value is not None:
            argv.append(f"{option}={value}")  # one token: a value may start with '-'
    return argv


def describe(args: argparse.Namespace) -> tuple[PreparedLaunch, dict[str, Any]]:
    """Write the files into ``args.dir``; the launch and what ``--json`` prints.

    Bad attributes, a region on the kernel and a missing guest image raise before anything
    is written. Cost: building the framework, plus :func:`prepare_launch` (one QEMU
    ``dumpdtb`` run on virt, about 0.1 s).
    """
    board = load_board(args.board)
    cma = build_cma(board=board, regions=args.cma, map_text=args.map, asterisk=args.asterisk)
    reservations = [(r.name, r.start, r.size) for r in cma.regions]
    directory = Path(args.dir).absolute()
    if directory.exists() and not directory.is_dir():
        raise EINVAL(f"{directory} exists and is not a directory", where="--dir")
    try:
        launch = prepare_launch(board, reservations, directory, console=not args.no_console)
    except OSError as error:
        raise from_os_error(error, "--dir") from None
    regions, _ = local_snapshot(cma)
    files = launch.files
    info: dict[str, Any] = {
        "board": board.name,
        "argv": launch.argv,
        "qmp": str(files.qmp_socket),
        "channel": str(files.channel_socket),
        "dtb": str(files.dtb),
        "ram": None if files.ram_file is None else str(files.ram_file),
        "regions": regions,
        "map": cma.map_text,
        "asterisk": cma.asterisk_text,
        "attach": attach_argv(args, launch),
    }
    return launch, info


def cmd_qemu_command(args: argparse.Namespace) -> int:
    """Print the argv (one shell-quoted line, or ``--json``); how to attach goes to a tty."""
    launch, info = describe(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(shlex.join(launch.argv))
    if sys.stderr.isatty():
        print(f"then: {shlex.join(info['attach'])}", file=sys.stderr)
    return 0
