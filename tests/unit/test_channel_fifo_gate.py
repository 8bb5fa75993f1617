"""The UART write gate: never fill the guest's receive FIFO, and wake a stuck receiver."""

from __future__ import annotations

import asyncio

from cma_qemu.channel import FifoGate


class FakeUart:
    """A FIFO of ``size`` that the guest drains ``rate`` bytes per level read, maybe stuck."""

    def __init__(self, size: int = 64, rate: int = 8, stuck_at: int | None = None) -> None:
        self.size = size
        self.rate = rate
        self.stuck_at = stuck_at
        self.level = 0
        self.peak = 0
        self.received = bytearray()
        self.writes: list[bytes] = []

    async def read_level(self) -> int:
        take = min(self.rate, self.level)
        if self.stuck_at is not None and self.level - take < self.stuck_at:
            take = max(0, self.level - self.stuck_at)  # the last bytes wait for an interrupt
        self.level -= take
        return self.level

    # the StreamWriter side
    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.received += data
        self.level += len(data)
        self.peak = max(self.peak, self.level)
        if data == b"\n":
            self.stuck_at = None  # new data raises the receive interrupt again

    async def drain(self) -> None:
        return None

    def get_extra_info(self, name: str) -> None:
        return None


def run(gate: FifoGate, uart: FakeUart, data: bytes) -> None:
    asyncio.run(gate.write(uart, data))  # type: ignore[arg-type]


def test_a_long_reply_never_fills_the_fifo() -> None:
    uart = FakeUart()
    data = bytes(range(256)) * 2
    run(FifoGate(uart.read_level, 64, poll=0), uart, data)
    assert bytes(uart.received) == data
    assert uart.peak <= 63  # exactly 64 stored is what loses the FIFO in QEMU
    assert uart.level == 0  # written and drained


def test_a_short_reply_goes_in_one_write() -> None:
    uart = FakeUart()
    run(FifoGate(uart.read_level, 64, poll=0), uart, b'{"return":{},"id":1}\n')
    assert uart.writes == [b'{"return":{},"id":1}\n']


def test_a_stuck_receiver_gets_a_blank_line() -> None:
    uart = FakeUart(stuck_at=6)
    gate = FifoGate(uart.read_level, 64, poll=0.001, stall=0.005)
    run(gate, uart, b"x" * 40 + b"\n")
    assert gate.kicks == 1 and uart.writes[-1] == b"\n"
    assert uart.level == 0


def test_nobody_reading_is_given_up_on() -> None:
    uart = FakeUart(rate=0)
    gate = FifoGate(uart.read_level, 64, poll=0.001, stall=0.002, give_up=0.05, max_kicks=2)
    run(gate, uart, b"y" * 100)  # returns instead of waiting forever
    assert uart.peak == 63 and len(uart.received) == 63
    assert gate.kicks == 0  # a kick into a FIFO with no room would fill it: never
