"""The commands that need no QEMU: ``boards``, ``replay`` and ``guest build``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cma_qemu.boards import Board, list_boards, load_board
from cma_qemu.configuration import build_cma
from cma_qemu.errors import EINVAL, ENOENT
from cma_qemu.replay import ReplayResult, parse_ram, replay

if TYPE_CHECKING:  # rich is imported where it draws: a replay to a file never needs it
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ReplayProgress", "cmd_boards", "cmd_guest_build", "cmd_replay", "read_script"]


def _stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False)


# ---------------------------------------------------------------------------- boards
def cmd_boards(args: argparse.Namespace) -> int:
    from cma_qemu.views import human_size  # views pulls in the monitor layer: not at start-up

    boards = list_boards()
    if args.json:
        print(json.dumps([_board_json(b) for b in boards], indent=2))
        return 0
    from rich.table import Table

    table = Table(title="Boards")
    for column in ("board", "machine", "RAM", "channel", "regions", "description"):
        table.add_column(column)
    for board in boards:
        table.add_row(
            board.name,
            f"{board.machine_type}" + (f" ({board.cpu})" if board.cpu else ""),
            "\n".join(f"{human_size(b.size)}@{b.base:#x}" for b in board.ram),
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
def read_script(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise ENOENT("no such script file", where=path) from None
    except OSError as error:
        raise EINVAL(f"cannot read script: {error.strerror}", where=path) from None
    return data.decode("utf-8", "surrogateescape")


def cmd_replay(args: argparse.Namespace) -> int:
    if args.board is None and args.cma is None:
        raise EINVAL("replay needs --board BOARD or --cma REGIONS --ram BASE:SIZE")
    if args.board is not None and args.ram:
        raise EINVAL("--ram goes with --cma; a --board brings its own RAM banks")
    if args.board is None and not args.ram:
        raise EINVAL("--cma without --board needs at least one --ram BASE:SIZE")
    board = load_board(args.board) if args.board else None
    ram = [parse_ram(text) for text in args.ram]
    script = read_script(args.script)

    def fresh() -> Any:
        return build_cma(
            board=board,
            regions=args.cma,
            ram=ram,
            map_text=args.map,
            asterisk=args.asterisk,
        )

    bar = None
    if sys.stderr.isatty():
        from rich.console import Console

        bar = ReplayProgress(Console(stderr=True))
    runs: list[ReplayResult] = []
    try:
        for name in args.allocator or [None]:
            if bar is not None:
                bar.begin(f"replay ({name})" if name else "replay")
            runs.append(replay(script, fresh(), name, bar))
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps({"runs": [_result_json(r) for r in runs]}, indent=2))
        return 0 if all(r.errors == 0 for r in runs) else 1
    if len(runs) == 1:
        sys.stdout.write(runs[0].stdout)
        sys.stderr.write(runs[0].stderr)
    if args.allocator:
        _print_comparison(runs)
    return 0 if all(r.errors == 0 for r in runs) else 1


class ReplayProgress:
    """A progress bar on stderr for a replay that has run longer than ``delay`` seconds.

    The runner calls it every few thousand lines (``PROGRESS_EVERY`` in cma_qemu/script.py),
    and it redraws at most every ``interval`` seconds, so a short replay prints nothing and a
    long one pays nothing per line. The bar is transient: it is gone when the replay ends.
    The caller decides whether stderr is a terminal.
    """

    def __init__(
        self,
        console: Console,
        delay: float = 1.0,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.delay = delay
        self.interval = interval
        self.clock = clock
        self._began = clock()
        self._drawn = 0.0
        self._label = "replay"
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def begin(self, label: str) -> None:
        """A new replay (one per allocator) starts: a new bar under this label."""
        self._label = label
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._progress is None:
            if now - self._began < self.delay:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("lines"),
                console=self.console,
                transient=True,
                auto_refresh=False,
            )
            self._progress.start()
        if self._task is None:
            self._task = self._progress.add_task(self._label, total=total, completed=done)
        else:
            self._progress.update(self._task, completed=done, total=total)
        if now - self._drawn >= self.interval or done == total:
            self._drawn = now
            self._progress.refresh()

    def close(self) -> None:
        """Remove the bar (if it was ever shown)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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
        "free": result.free,
        "fragmentation": result.fragmentation,
        "regions": [
            {
                "name": r.name,
                "start": r.start,
                "size": r.size,
                "free": r.free,
                "largest_free": r.largest_free,
                "fragmentation": r.fragmentation,
                "allocator": r.allocator,
            }
            for r in result.regions
        ],
    }


def _print_comparison(runs: Sequence[ReplayResult]) -> None:
    from rich.table import Table

    from cma_qemu.views import human_size  # views pulls in the monitor layer: not at start-up

    table = Table(title="Replay by allocator")
    table.add_column("allocator")
    table.add_column("allocations", justify="right")
    table.add_column("succeeded", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("largest free", justify="right")
    table.add_column("frag.", justify="right")
    names = [r.name or f"<private@{r.start:#x}>" for r in runs[0].regions]
    for name in names:
        table.add_column(f"free in {name}", justify="right")
    for name in names:
        table.add_column(f"frag. {name}", justify="right")
    for run in runs:
        table.add_row(
            run.allocator or "default",
            str(run.allocations),
            str(run.succeeded),
            str(run.failed_allocations),
            human_size(run.largest_free),
            _percent(run.fragmentation),
            *(human_size(r.free) for r in run.regions),
            *(_percent(r.fragmentation) for r in run.regions),
        )
    _stdout().print(table)


def _percent(fraction: float) -> str:
    """External fragmentation as a percentage (1 - largest free block / total free)."""
    return f"{fraction * 100:.1f}%"


# ---------------------------------------------------------------------------- guest build
def cmd_guest_build(args: argparse.Namespace) -> int:
    from cma_qemu.guest_image import FLAVOURS, build_guest, default_cache_dir

    wanted = args.flavour or sorted(FLAVOURS)
    from rich.console import Console

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
