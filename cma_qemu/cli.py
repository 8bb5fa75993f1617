"""``cma-qemu``: the command line.

Every user mistake ends as one line on stderr and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cma_qemu.boards import Board, list_boards, load_board
from cma_qemu.errors import EINVAL, ENOENT, CmaError
from cma_qemu.replay import ReplayResult, build_cma, parse_ram, replay

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _size(value: int) -> str:
    """Human size for tables: 16M, 128K, or hex."""
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return f"{value:#x}"


def _stdout() -> Console:
    return Console(highlight=False)


# ---------------------------------------------------------------------------- boards
def _cmd_boards(args: argparse.Namespace) -> int:
    boards = list_boards()
    if args.json:
        print(json.dumps([_board_json(b) for b in boards], indent=2))
        return 0
    table = Table(title="Boards")
    for column in ("board", "machine", "RAM", "channel", "regions", "description"):
        table.add_column(column)
    for board in boards:
        table.add_row(
            board.name,
            f"{board.machine_type}" + (f" ({board.cpu})" if board.cpu else ""),
            "\n".join(f"{_size(b.size)}@{b.base:#x}" for b in board.ram),
            f"{board.channel.kind} {board.channel.name}",
            board.regions.replace(";", "\n"),
            board.description,
        )
    _stdout().print(table)
    return 0


def _board_json(board: Board) -> dict[str, Any]:
    return {
        "name": board.name,
        "description": board.description,
        "machine": board.machine_type,
        "cpu": board.cpu,
        "kernel": board.kernel_flavour,
        "ram": [{"base": b.base, "size": b.size} for b in board.ram],
        "channel": {"kind": board.channel.kind, "name": board.channel.name},
        "regions": board.regions,
        "map": board.map,
        "asterisk": board.asterisk,
    }


# ---------------------------------------------------------------------------- replay
def _read_script(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise ENOENT("no such script file", where=path) from None
    except OSError as error:
        raise EINVAL(f"cannot read script: {error.strerror}", where=path) from None
    return data.decode("utf-8", "surrogateescape")


def _cmd_replay(args: argparse.Namespace) -> int:
    if args.board is None and args.cma is None:
        raise EINVAL("replay needs --board BOARD or --cma REGIONS --ram BASE:SIZE")
    if args.board is not None and args.ram:
        raise EINVAL("--ram goes with --cma; a --board brings its own RAM banks")
    if args.board is None and not args.ram:
        raise EINVAL("--cma without --board needs at least one --ram BASE:SIZE")
    board = load_board(args.board) if args.board else None
    ram = [parse_ram(text) for text in args.ram]
    script = _read_script(args.script)

    def fresh() -> Any:
        return build_cma(
            board=board,
            regions=args.cma,
            ram=ram,
            map_text=args.map,
            asterisk=args.asterisk,
        )

    fresh()  # validate the attributes before running anything
    runs = [replay(script, fresh(), name) for name in args.allocator or [None]]
    if args.json:
        print(json.dumps({"runs": [_result_json(r) for r in runs]}, indent=2))
        return 0 if all(r.errors == 0 for r in runs) else 1
    if len(runs) == 1:
        sys.stdout.write(runs[0].stdout)
        sys.stderr.write(runs[0].stderr)
    if args.allocator:
        _print_comparison(runs)
    return 0 if all(r.errors == 0 for r in runs) else 1


def _result_json(result: ReplayResult) -> dict[str, Any]:
    return {
        "allocator": result.allocator,
        "stdout": result.stdout.splitlines(),
        "stderr": result.stderr.splitlines(),
        "allocations": result.allocations,
        "succeeded": result.succeeded,
        "failed": result.failed_allocations,
        "errors": result.errors,
        "largest_free": result.largest_free,
        "regions": [
            {
                "name": r.name,
                "start": r.start,
                "size": r.size,
                "free": r.free,
                "largest_free": r.largest_free,
                "allocator": r.allocator,
            }
            for r in result.regions
        ],
    }


def _print_comparison(runs: Sequence[ReplayResult]) -> None:
    table = Table(title="Replay by allocator")
    table.add_column("allocator")
    table.add_column("allocations", justify="right")
    table.add_column("succeeded", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("largest free", justify="right")
    names = [r.name or f"<private@{r.start:#x}>" for r in runs[0].regions]
    for name in names:
        table.add_column(f"free in {name}", justify="right")
    for run in runs:
        table.add_row(
            run.allocator or "default",
            str(run.allocations),
            str(run.succeeded),
            str(run.failed_allocations),
            _size(run.largest_free),
            *(_size(r.free) for r in run.regions),
        )
    _stdout().print(table)


# ---------------------------------------------------------------------------- guest build
def _cmd_guest_build(args: argparse.Namespace) -> int:
    from cma_qemu.machine.guest_image import FLAVOURS, build_guest, default_cache_dir

    wanted = args.flavour or sorted(FLAVOURS)
    console = Console(stderr=True, highlight=False)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    for flavour in wanted:
        if flavour not in FLAVOURS:
            raise EINVAL(f"unknown kernel flavour {flavour!r} (known: {', '.join(FLAVOURS)})")
        with console.status(f"guest {flavour}: checking the cache") as status:

            def progress(message: str, flavour: str = flavour, status: Any = status) -> None:
                status.update(f"guest {flavour}: {message}")
                console.print(f"guest {flavour}: {message}", soft_wrap=True)

            build_guest(flavour, cache, progress)
    return 0


# ---------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cma-qemu",
        description="The 2010 Contiguous Memory Allocator for emulated ARM boards.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    boards = commands.add_parser("boards", help="list the board files and their regions")
    boards.add_argument("--json", action="store_true", help="machine-readable output")
    boards.set_defaults(handler=_cmd_boards)

    guest = commands.add_parser("guest", help="the guest images (kernel, initramfs, stub)")
    guest_commands = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    build = guest_commands.add_parser(
        "build", help="fetch Debian's armhf kernels and busybox, cross-compile cma-test, pack"
    )
    build.add_argument(
        "flavour", nargs="*", help="kernel flavours to build (default: all: armmp, armmp-lpae)"
    )
    build.add_argument("--cache", help="cache directory (default: $CMA_QEMU_CACHE or ~/.cache)")
    build.set_defaults(handler=_cmd_guest_build)

    rep = commands.add_parser(
        "replay", help="run a cma-test script against the framework offline (no QEMU)"
    )
    rep.add_argument("script", help="script file in the cma-test line format, or - for stdin")
    rep.add_argument("--board", help="take RAM, reserved ranges and attributes from a board")
    rep.add_argument("--cma", metavar="REGIONS", help="regions attribute (replaces the board's)")
    rep.add_argument(
        "--ram", metavar="BASE:SIZE", action="append", default=[], help="a RAM bank (repeatable)"
    )
    rep.add_argument("--map", help="map attribute (replaces the board's)")
    rep.add_argument("--asterisk", metavar="LIST", help="asterisk list (replaces the default)")
    rep.add_argument(
        "--allocator",
        action="append",
        metavar="NAME",
        help="replay under this allocator; repeat to compare allocators",
    )
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.set_defaults(handler=_cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cma-qemu`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CmaError as error:
        print(f"cma-qemu: {error.errno_name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cma-qemu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop the flush at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
