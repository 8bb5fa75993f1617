"""What recording (``--record``) and the journal (``attach --state``) cost per guest allocation.

Two measurements, both against a baseline taken in the same run:

* **agent side, in-process**: CPU microseconds (``thread_time``, so a loaded machine does not
  count) per ``cma-alloc`` request and per alloc + free pair in ``GuestSession.feed`` (parse,
  framework, encode; no I/O), with nothing listening, with a
  :class:`~cma_qemu.record.Recorder`, with the :class:`~cma_qemu.journal.Journal` (an
  append-only file) and with an SQLite journal in WAL mode written the same way (one row per
  live chunk, ``synchronous=OFF``: it survives the process dying, like the file). This is how
  the journal's store was chosen. The extra CPU per alloc request is added to a quiet
  machine's virt round trips (``QUIET_PING``/``QUIET_ALLOC``, measured by bench_channel.py,
  BENCHMARKS.md "Channel") to estimate the ratios the goals are about.
* **in the guest on virt**: one boot, the stub held open, rounds of ``ping N`` and
  ``bench N vpu/dec 1M`` (alloc round trips, stub-timed) with nothing, with recording on,
  with the journal on, and with both, in an order that rotates each round. The figures are
  medians over rounds of the stub's p50 (many short rounds, so that a shared machine's load
  bursts fall on every mode alike); the goals are recorded alloc p50 <= 1.10 x plain
  alloc p50, and journaled alloc p50 <= 1.3 x ping p50. From the repository root:

    .venv/bin/python benchmarks/bench_record.py                 # both, about a minute
    .venv/bin/python benchmarks/bench_record.py --agent-only    # in-process only, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info
from rich.console import Console
from rich.table import Table

#: virt ping and alloc p50 (us) on a quiet machine: BENCHMARKS.md, "Channel" (bench_channel.py).
QUIET_PING = 128
QUIET_ALLOC = 153
RECORD_GOAL = 1.10
JOURNAL_GOAL = 1.3
DEV = "vpu/dec"
LINE = re.compile(r"^(ping|bench): n=(\d+) p50=(\d+)us p99=(\d+)us$", re.MULTILINE)
MODES = ("plain", "record", "journal", "record+journal")


# ------------------------------------------------------------------ an SQLite journal


class SqliteJournal:
    """The journal's changes as SQLite rows (WAL, autocommit): the store it was compared with."""

    def __init__(self, cma: object, path: Path) -> None:
        from cma_qemu.framework import AllocEvent, Cma, FreeEvent, RefcountEvent

        assert isinstance(cma, Cma)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS chunk (start INTEGER PRIMARY KEY, size INTEGER, "
            "requested INTEGER, refcount INTEGER, owner TEXT)"
        )
        db = self._db

        def on_change(change: object) -> None:
            if isinstance(change, AllocEvent):
                c = change.chunk
                db.execute(
                    "INSERT INTO chunk VALUES (?, ?, ?, ?, ?)",
                    (c.start, c.size, c.requested, c.refcount, c.owner),
                )
            elif isinstance(change, FreeEvent):
                db.execute("DELETE FROM chunk WHERE start = ?", (change.chunk.start,))
            elif isinstance(change, RefcountEvent):
                db.execute(
                    "UPDATE chunk SET refcount = ? WHERE start = ?",
                    (change.chunk.refcount, change.chunk.start),
                )

        self._unsubscribe = cma.subscribe_changes(on_change)

    def close(self) -> None:
        self._unsubscribe()
        self._db.close()


# ------------------------------------------------------------------ agent side, in-process


def _listeners(directory: Path) -> dict[str, Callable[[object], Callable[[], None]]]:
    """Store name -> (cma -> close function) that starts it on a framework."""
    from cma_qemu.journal import Journal, JournalIdentity
    from cma_qemu.record import Recorder, RecordingHeader

    def none(cma: object) -> Callable[[], None]:
        return lambda: None

    def record(cma: object) -> Callable[[], None]:
        recorder = Recorder(cma, directory / "bench.cma", RecordingHeader("virt", None, "", ""))  # type: ignore[arg-type]
        return recorder.close

    def journal(cma: object) -> Callable[[], None]:
        path = directory / "bench.journal"
        path.unlink(missing_ok=True)
        identity = JournalIdentity.of("virt", "", cma, None)  # type: ignore[arg-type]
        return Journal(cma, path, identity, "bench").close  # type: ignore[arg-type]

    def sqlite(cma: object) -> Callable[[], None]:
        path = directory / "bench.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return SqliteJournal(cma, path).close

    def both(cma: object) -> Callable[[], None]:
        close_record, close_journal = record(cma), journal(cma)

        def close() -> None:
            close_record()
            close_journal()

        return close

    return {
        "nothing": none,
        "recorder": record,
        "journal (file)": journal,
        "recorder + journal (file)": both,
        "journal (sqlite wal)": sqlite,
    }


def agent_side(n: int = 500, repeat: int = 21) -> dict[str, tuple[float, float]]:
    """CPU us per (alloc+free pair, alloc alone) in ``GuestSession.feed``; best of ``repeat``.

    CPU time of this thread (user + system, so the ``write`` calls count), not wall time: on a
    shared machine the wall time mostly measures how long the process waited for a CPU.
    """
    from cma_qemu.boards import load_board
    from cma_qemu.channel.session import GuestSession
    from cma_qemu.configuration import build_cma

    alloc = (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","kind":"dec","size":1048576},"id":1}\n'
    )
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cma-qemu-bench-") as tmp:
        listeners = _listeners(Path(tmp))
        for _ in range(repeat):
            for name, start in listeners.items():  # interleaved, so load drift hits all alike
                cma = build_cma(board=load_board("virt"))
                close = start(cma)
                session = GuestSession(cma, "guest:bench")
                feed = session.feed
                clock = time.thread_time
                t_alloc = 0.0
                t0 = clock()
                for _ in range(n):
                    t1 = clock()
                    reply = feed(alloc)
                    t_alloc += clock() - t1
                    addr = json.loads(reply)["return"]["addr"]
                    feed(b'{"execute":"cma-free","arguments":{"addr":%d},"id":2}\n' % addr)
                pair = (clock() - t0) / n * 1e6
                close()
                old = best.get(name, (pair, t_alloc / n * 1e6))
                best[name] = (min(old[0], pair), min(old[1], t_alloc / n * 1e6))
    return best


# ------------------------------------------------------------------ in the guest


async def in_guest(n: int, rounds: int, console: Console) -> dict[str, list[float]]:
    """Stub-timed p50s per round (NaN: the round failed): ``ping`` and ``bench`` per mode."""
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board
    from cma_qemu.journal import Journal, JournalIdentity

    board = load_board("virt")
    p50s: dict[str, list[float]] = {"ping": [], **{m: [] for m in MODES}}
    agent = await Agent.boot(board)
    async with agent:
        with tempfile.TemporaryDirectory(prefix="cma-qemu-bench-") as tmp:
            directory = Path(tmp)
            identity = JournalIdentity.of(board.name, board.regions, agent.cma, None)
            async with agent.shell.stub(timeout=600) as stub:
                for r in range(rounds):
                    order = ["ping", *MODES]
                    order = order[r % len(order) :] + order[: r % len(order)]
                    for mode in order:
                        journal = None
                        if "record" in mode:
                            agent.recording.start(directory / f"round{r}.cma")
                        if "journal" in mode:
                            path = directory / f"round{r}.journal"
                            journal = Journal(agent.cma, path, identity, "bench")
                        line = f"ping {n}" if mode == "ping" else f"bench {n} {DEV} 1M"
                        out = await stub.send(line)
                        if "record" in mode:
                            agent.recording.stop()
                        if journal is not None:
                            journal.close()
                        match = LINE.search(out)
                        if match is None or int(match[2]) != n:
                            console.print(f"[red]round {r + 1} {mode}: {out.strip()!r}[/red]")
                            p50s[mode].append(math.nan)
                            continue
                        p50s[mode].append(int(match[3]))
                    console.print(
                        f"[dim]round {r + 1}/{rounds}: "
                        + ", ".join(f"{k} {v[-1] if v else '-'}" for k, v in p50s.items())
                        + " us[/dim]"
                    )
    return p50s


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250, help="round trips per command")
    parser.add_argument("--rounds", type=int, default=30, help="rounds over every mode")
    parser.add_argument("--agent-n", type=int, default=500, help="in-process request pairs")
    parser.add_argument("--agent-repeat", type=int, default=21, help="in-process runs (best)")
    parser.add_argument("--agent-only", action="store_true", help="skip the guest (no QEMU)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(machine_info())

    side = agent_side(args.agent_n, args.agent_repeat)
    table = Table(title="Agent side: CPU us in GuestSession.feed (best of runs)")
    columns = ("listening", "alloc+free pair", "alloc", "extra per alloc",
               "est. alloc/plain alloc", "est. alloc/ping")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "listening" else "right")
    base = side["nothing"][1]
    for name, (pair, alloc_us) in side.items():
        extra = alloc_us - base
        table.add_row(
            name,
            f"{pair:.1f}",
            f"{alloc_us:.1f}",
            f"{extra:+.1f}",
            f"{(QUIET_ALLOC + extra) / QUIET_ALLOC:.3f}x",
            f"{(QUIET_ALLOC + extra) / QUIET_PING:.2f}x",
        )
    console.print(table)
    console.print(
        f"[dim]estimates: a quiet virt alloc p50 of {QUIET_ALLOC} us and ping p50 of "
        f"{QUIET_PING} us (BENCHMARKS.md, Channel) plus the extra CPU per alloc[/dim]"
    )
    if args.agent_only:
        return 0

    p50s = asyncio.run(in_guest(args.n, args.rounds, console))
    median = {k: _median([x for x in v if not math.isnan(x)]) for k, v in p50s.items()}
    guest = Table(title=f"In the guest on virt: stub p50 (us), median of {args.rounds} rounds")
    columns = ("mode", "p50", "vs plain alloc", "vs ping", "per-round vs plain (median)",
               "per-round vs ping (median)")  # fmt: skip
    for col in columns:
        guest.add_column(col, justify="left" if col == "mode" else "right")
    for mode in p50s:
        guest.add_row(
            mode,
            f"{median[mode]:g}",
            "" if mode == "ping" else f"{median[mode] / median['plain']:.2f}x",
            f"{median[mode] / median['ping']:.2f}x",
            "" if mode == "ping" else f"{paired(p50s[mode], p50s['plain']):.2f}x",
            f"{paired(p50s[mode], p50s['ping']):.2f}x",
        )
    console.print(guest)
    console.print(
        "[dim]per-round: the median over rounds of the ratio within one round (modes that ran "
        "seconds apart), steadier than a ratio of medians when the machine's load moves[/dim]"
    )
    for label, value, goal in (
        ("recorded alloc / plain alloc", paired(p50s["record"], p50s["plain"]), RECORD_GOAL),
        ("journaled alloc / ping", paired(p50s["journal"], p50s["ping"]), JOURNAL_GOAL),
    ):
        verdict = "[green]met[/green]" if value <= goal else "[red]MISSED[/red]"
        console.print(f"{label} p50, per-round median = {value:.2f}x (goal <= {goal}x: {verdict})")
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired(top: list[float], bottom: list[float]) -> float:
    """Median over rounds of ``top[r] / bottom[r]``, skipping failed (NaN) rounds."""
    return _median([t / b for t, b in zip(top, bottom, strict=True) if not math.isnan(t / b)])


if __name__ == "__main__":
    sys.exit(main())
