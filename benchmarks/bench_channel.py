"""Benchmark a guest allocation round trip against an empty one over the same channel.

One boot per board (``Agent.boot``); in it the guest stub ``cma-test`` runs ``ping N`` (N
``guest-ping`` round trips) and ``bench N DEV SIZE`` (N ``cma-alloc`` round trips, each
followed by an untimed ``cma-free``) alternately for several rounds, so both see the same
machine load. The stub times each round trip in the guest (CLOCK_MONOTONIC) and prints p50 and
p99 (nearest rank, whole microseconds); the figures here are the medians of those per-round
percentiles, the ratio is bench p50 / ping p50. The agent's own cost per request (parse,
framework, encode; no I/O) is timed in-process too, to show which part is ours. From the
repository root:

    .venv/bin/python benchmarks/bench_channel.py                 # every board below
    .venv/bin/python benchmarks/bench_channel.py --boards smdkc210-uart smdkc210  # UART vs net
    .venv/bin/python benchmarks/bench_channel.py --boards virt --n 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info
from rich.console import Console
from rich.table import Table

GOAL = 1.3
#: smdkc210's net channel (its default): ping p50 at most this fraction of smdkc210-uart's,
#: in the same run.
NET_GOAL = 1 / 3
#: board -> (DEV[/KIND] for ``bench``, default N, default rounds). The smdkc210-uart UART
#: loses a reply now and then, and the stub ends a ``bench`` at its first failed request, so
#: there the commands are short and many.
BOARDS = {
    "virt": ("vpu/dec", 2000, 5),
    "smdkc210": ("s5p-mfc/a", 200, 12),  # the LAN9215: one TCP connection per stub
    "smdkc210-uart": ("s5p-mfc/a", 50, 12),
}
SIZE = "1M"
LINE = re.compile(r"^(ping|bench): n=(\d+) p50=(\d+)us p99=(\d+)us$", re.MULTILINE)


# ------------------------------------------------------------------ pure helpers


def parse_timing(text: str) -> dict[str, tuple[int, int, int]]:
    """``{"ping": (n, p50, p99), ...}`` from the stub's output."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in LINE.finditer(text)}


def nearest_rank(sorted_values: Sequence[float], p: float) -> float:
    """The stub's percentile: the smallest value with at least p% of the samples at or below."""
    n = len(sorted_values)
    rank = int((n * p + 99) // 100)
    return sorted_values[rank - 1 if rank else 0]


def spread(values: Sequence[float]) -> str:
    return f"{min(values):g}-{max(values):g}" if values else "no data"


@dataclass
class BoardResult:
    board: str
    dev: str
    n: int
    channel: str
    ping: list[tuple[int, int]] = field(default_factory=list)  # (p50, p99) per round
    bench: list[tuple[int, int]] = field(default_factory=list)
    boot_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    leaked: int = 0  # chunks the agent still counts for the guest after the stub exited

    def p50(self, kind: str) -> float:
        rows = getattr(self, kind)
        return statistics.median(r[0] for r in rows) if rows else math.nan

    def p99(self, kind: str) -> float:
        rows = getattr(self, kind)
        return statistics.median(r[1] for r in rows) if rows else math.nan

    @property
    def ratio(self) -> float:
        return self.p50("bench") / self.p50("ping")

    def round_ratios(self) -> list[float]:
        return [b[0] / p[0] for p, b in zip(self.ping, self.bench, strict=False)]


# ------------------------------------------------------------------ in the guest


async def measure(
    board_name: str, dev: str, n: int, rounds: int, console: Console, baud: int | None = None
) -> BoardResult:
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board

    board = load_board(board_name)
    t0 = time.perf_counter()
    agent = await Agent.boot(board)
    result = BoardResult(board_name, dev, n, board.channel.kind, boot_s=time.perf_counter() - t0)
    if board.channel.kind == "uart":
        # the UART's RX timeout is counted in character times: the line speed matters. The
        # stub sets 115200 itself when it opens the port; --baud is for experiments only
        # (the stub overrides what stty set).
        if baud is not None:
            await agent.shell.run(f"stty -F {board.channel.name} {baud} 2>/dev/null")
        result.channel += " (115200 baud, FIFO-gated)"
    async with agent:
        async with agent.shell.stub(timeout=600) as stub:
            for r in range(rounds):
                # alternate which goes first, so a drift in load does not favour one
                order = ("ping", "bench") if r % 2 == 0 else ("bench", "ping")
                before = len(result.ping), len(result.bench)
                for kind in order:
                    line = f"ping {n}" if kind == "ping" else f"bench {n} {dev} {SIZE}"
                    out = await stub.send(line)
                    got = parse_timing(out).get(kind)
                    if got is None or got[0] != n:
                        # the stub stops a run at the first failed request (a lost reply on
                        # a UART times out): record it, the round's other figure still counts
                        result.failures.append(f"round {r + 1} {line!r}: {out.strip()}")
                        console.print(f"[red]{board_name}: {line!r} printed {out.strip()!r}[/red]")
                        continue
                    getattr(result, kind).append(got[1:])
                console.print(
                    f"[dim]{board_name} round {r + 1}/{rounds}: ping p50/p99 "
                    f"{_last(result.ping, before[0])}, bench p50/p99 "
                    f"{_last(result.bench, before[1])}[/dim]"
                )
        result.leaked = len(agent.chunks_of_guest())
    return result


def _last(rows: list[tuple[int, int]], before: int) -> str:
    """This round's figures, or "failed" if the round added none."""
    return f"{rows[-1][0]}/{rows[-1][1]} us" if len(rows) > before else "failed"


# ------------------------------------------------------------------ agent side, in-process


def agent_side(board_name: str, dev: str, n: int = 20000) -> dict[str, float]:
    """Microseconds per request in ``GuestSession.feed`` (no I/O): ping, alloc, free."""
    from cma_qemu.boards import load_board
    from cma_qemu.channel.session import GuestSession
    from cma_qemu.configuration import build_cma

    cma = build_cma(board=load_board(board_name))
    session = GuestSession(cma, "bench")
    name, _, kind = dev.rpartition("/") if "/" in dev else (dev, "", "")
    size = 1 << 20
    alloc = json.dumps(
        {
            "execute": "cma-alloc",
            "arguments": {"dev": name, "kind": kind, "size": size, "alignment": 0},
            "id": 1,
        },
        separators=(",", ":"),
    ).encode()
    alloc_line = alloc + b"\n"
    ping = b'{"execute":"guest-ping","id":1}\n'
    feed = session.feed
    best: dict[str, float] = {}
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            feed(ping)
        t_ping = (time.perf_counter() - t0) / n
        t_alloc = t_free = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            reply = feed(alloc_line)
            t1 = time.perf_counter()
            addr = json.loads(reply)["return"]["addr"]
            free = b'{"execute":"cma-free","arguments":{"addr":%d},"id":2}\n' % addr
            t2 = time.perf_counter()
            feed(free)
            t_free += time.perf_counter() - t2
            t_alloc += t1 - t0
        for key, value in (("ping", t_ping), ("alloc", t_alloc / n), ("free", t_free / n)):
            best[key] = min(best.get(key, value), value) * 1e6
    best["ping reply bytes"] = len(feed(ping))
    best["alloc reply bytes"] = len(feed(alloc_line))
    best["alloc request bytes"] = len(alloc_line)
    best["ping request bytes"] = len(ping)
    return best


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", nargs="+", default=list(BOARDS), choices=list(BOARDS))
    parser.add_argument(
        "--n", type=int, help="round trips per command (virt 2000, smdkc210 200, smdkc210-uart 50)"
    )
    parser.add_argument("--rounds", type=int, help="ping/bench pairs (virt 5, smdkc210 12)")
    parser.add_argument(
        "--baud", type=int, help="set a UART channel's line speed in the guest first (stty)"
    )
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(machine_info())

    results: list[BoardResult] = []
    sides: dict[str, dict[str, float]] = {}
    for board in args.boards:
        dev, default_n, default_rounds = BOARDS[board]
        n = args.n or default_n
        rounds = args.rounds or default_rounds
        console.print(f"{board}: {rounds} rounds of `ping {n}` / `bench {n} {dev} {SIZE}`")
        results.append(asyncio.run(measure(board, dev, n, rounds, console, args.baud)))
        sides[board] = agent_side(board, dev)

    table = Table(title="Guest round trips (stub-timed, us; median over rounds of p50 / p99)")
    columns = ("board", "channel", "N x rounds ok (ping/alloc)", "ping p50", "ping p99",
               "alloc p50", "alloc p99", "alloc/ping p50", "per-round ratios")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("board", "channel") else "right")
    for r in results:
        table.add_row(
            r.board,
            r.channel,
            f"{r.n} x {len(r.ping)}/{len(r.bench)}",
            f"{r.p50('ping'):g} ({spread([x[0] for x in r.ping])})",
            f"{r.p99('ping'):g} ({spread([x[1] for x in r.ping])})",
            f"{r.p50('bench'):g} ({spread([x[0] for x in r.bench])})",
            f"{r.p99('bench'):g} ({spread([x[1] for x in r.bench])})",
            f"{r.ratio:.2f}x",
            " ".join(f"{x:.2f}" for x in r.round_ratios()),
        )
    console.print(table)

    side = Table(title="Agent side per request (GuestSession.feed in-process, best of 3, us)")
    for col in ("board", "ping", "alloc", "free", "alloc - ping", "reply bytes ping/alloc"):
        side.add_column(col, justify="left" if col == "board" else "right")
    for board, s in sides.items():
        side.add_row(
            board,
            f"{s['ping']:.1f}",
            f"{s['alloc']:.1f}",
            f"{s['free']:.1f}",
            f"{s['alloc'] - s['ping']:.1f}",
            f"{s['ping reply bytes']:.0f}/{s['alloc reply bytes']:.0f}",
        )
    console.print(side)
    for r in results:
        verdict = "[green]met[/green]" if r.ratio <= GOAL else "[red]MISSED[/red]"
        if math.isnan(r.ratio):
            verdict = "[red]no data[/red]"
        console.print(
            f"{r.board}: alloc p50 / ping p50 = {r.ratio:.2f}x (goal <= {GOAL}x: {verdict})"
        )
        for failure in r.failures:
            console.print(f"{r.board}: [red]failed[/red] {failure}")
        if r.leaked:
            console.print(f"{r.board}: {r.leaked} chunk(s) left allocated (replies lost)")
    by_name = {r.board: r for r in results}
    if "smdkc210" in by_name and "smdkc210-uart" in by_name:
        net = by_name["smdkc210"].p50("ping") / by_name["smdkc210-uart"].p50("ping")
        verdict = "[green]met[/green]" if net <= NET_GOAL else "[red]MISSED[/red]"
        console.print(
            f"smdkc210: net ping p50 / UART ping p50 = {net:.2f} (goal <= 1/3: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
