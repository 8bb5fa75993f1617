"""The cma-test line format (docs/line-format.md), row by row, through ScriptRunner."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cma_qemu.errors import ENOMEM, CmaError
from cma_qemu.framework import Cma, CmaInfo
from cma_qemu.script import MAX_LINE, FrameworkBackend, ScriptRunner, parse_number

K = 1 << 10
M = 1 << 20
BASE = 0x40000000


def framework() -> Cma:
    return Cma.from_attributes(
        "r0=1M@0x40000000;r1=1M@0x40100000;-r2=64K@0x40200000",
        "dev/k=r1;dev=r0;full=r2",
        None,
        ram=[(BASE, 4 * M)],
    )


def run(script: str, cma: Cma | None = None) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(FrameworkBackend(cma if cma is not None else framework()), out, err).run(script)
    return out.getvalue(), err.getvalue()


@dataclass
class Recorder:
    """A backend that records the calls and hands out addresses 0x1000 apart."""

    calls: list[tuple[object, ...]] = field(default_factory=list)
    next_start: int = 0x10000

    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> int:
        self.calls.append(("alloc", dev, kind, size, alignment))
        self.next_start += 0x1000
        return self.next_start

    def alloc_from(self, regions: str, size: int, alignment: int) -> int:
        self.calls.append(("alloc_from", regions, size, alignment))
        self.next_start += 0x1000
        return self.next_start

    def free(self, addr: int) -> None:
        self.calls.append(("free", addr))

    def info(self, dev: str, kind: str) -> CmaInfo:
        self.calls.append(("info", dev, kind))
        return CmaInfo(1, 2, 3, 4, 5)

    def write(self, addr: int, size: int, pattern: int) -> None:
        self.calls.append(("write", addr, size, pattern))

    def verify(self, addr: int, size: int, pattern: int) -> int | None:
        self.calls.append(("verify", addr, size, pattern))
        return None

    def ping(self) -> None:
        self.calls.append(("ping",))


def record(script: str) -> tuple[list[tuple[object, ...]], str, str]:
    backend = Recorder()
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(backend, out, err).run(script)
    return backend.calls, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------ memparse
@pytest.mark.parametrize(
    ("token", "value"),
    [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("0x10", 16),
        ("0X1f", 31),
        ("0xABCdef", 0xABCDEF),
        ("010", 8),
        ("00", 0),
        ("0777", 0o777),
        ("1K", 1024),
        ("1k", 1024),
        ("2M", 2 * M),
        ("2m", 2 * M),
        ("3G", 3 << 30),
        ("3g", 3 << 30),
        ("0x1K", 1024),
        ("010k", 8 * K),
        ("0k", 0),
        ("18446744073709551615", 2**64 - 1),
        ("0xffffffffffffffff", 2**64 - 1),
        ("17179869183G", (2**34 - 1) << 30),
        ("0x" + "0" * 40 + "1", 1),
    ],
)
def test_parse_number_valid(token: str, value: int) -> None:
    assert parse_number(token) == value


@pytest.mark.parametrize(
    "token",
    [
        "",
        "08",
        "09",
        "0x",
        "0xg",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1KK",
        "1T",
        "1KB",
        "K",
        "1.5",
        "18446744073709551616",
        "17179869184G",
        "0x10000000000000000",
        "\uff11",
        "1_000",
    ],
)
def test_parse_number_invalid(token: str) -> None:
    assert parse_number(token) is None


def test_parse_number_without_suffix() -> None:
    assert parse_number("0x10", suffix=False) == 16
    assert parse_number("1K", suffix=False) is None


# ------------------------------------------------------------------------------ input rules
def test_aliases_do_the_same() -> None:
    long_form = (
        "alloc dev 4K\nalloc-from r1 8K\nlist\ninfo dev\nwrite 1 5\nverify 1 5\nfree 1\nfree\n"
    )
    short_form = "a dev 4K\nr r1 8K\nl\ni dev\nw 1 5\nv 1 5\nf 1\nf\n"
    assert run(long_form) == run(short_form)
    out, err = run(short_form)
    assert err == ""
    assert out.splitlines()[:4] == [
        "1: 0x1000@0x40000000",
        "2: 0x2000@0x40100000",
        "1: 0x1000@0x40000000",
        "2: 0x2000@0x40100000",
    ]


def test_comments_and_repeat_previous() -> None:
    calls, out, err = record("a dev 4K\n# a comment\n   # indented comment\n\n \t\nl\n\n")
    assert [c[0] for c in calls] == ["alloc", "alloc", "alloc"]
    assert err == ""
    three = "1: 0x1000@0x11000\n2: 0x1000@0x12000\n3: 0x1000@0x13000\n"
    assert out == three * 3  # three allocations, then the list twice


def test_empty_line_without_previous_does_nothing() -> None:
    calls, out, err = record("\n  \n# c\n\t\n")
    assert (calls, out, err) == ([], "", "")


def test_failed_line_is_still_the_previous_line() -> None:
    out, err = run("bogus\n\n")
    assert out == ""
    assert err == "bogus: EINVAL: unknown command\n" * 2


def test_leading_whitespace_and_token_runs() -> None:
    calls, _out, err = record(" \t  a \t dev/k\t\t4K/8K   \n")
    assert calls == [("alloc", "dev", "k", 4096, 8192)]
    assert err == ""


@pytest.mark.parametrize("separator", ["\r", "\x0b", "\x0c", "\u00a0"])
def test_only_spaces_and_tabs_separate_tokens(separator: str) -> None:
    calls, _out, err = record(f"a{separator}dev 4K\n{separator}\na dev 4K{separator}\n")
    assert calls == []
    assert err.split("\n") == [
        f"a{separator}dev: EINVAL: unknown command",
        f"{separator}: EINVAL: unknown command",
        "a: EINVAL: invalid size",
        "",
    ]


def test_line_length_limit() -> None:
    ok = "a dev 4K".ljust(MAX_LINE)
    assert len(ok) == 1023
    calls, _out, err = record(ok + "\n")
    assert len(calls) == 1 and err == ""
    too_long = "a dev 4K".ljust(MAX_LINE + 1)
    calls, _out, err = record(too_long + "\n")
    assert calls == [] and err == "input: EINVAL: line too long\n"


def test_line_length_counts_bytes() -> None:
    line = "# " + "é" * 511  # 1024 bytes, 513 characters
    _out, err = run(line + "\n")
    assert err == "input: EINVAL: line too long\n"
    _out, err = run("# " + "é" * 510 + "x\n")  # 1023 bytes
    assert err == ""


def test_too_long_line_does_not_become_previous() -> None:
    calls, _out, err = record("a dev 4K\n" + "a other 4K".ljust(2000) + "\n\n")
    assert [c[1] for c in calls] == ["dev", "dev"]
    assert err == "input: EINVAL: line too long\n"


def test_final_line_without_newline_is_not_run() -> None:
    calls, _out, err = record("a dev 4K\na dev 8K")
    assert calls == [("alloc", "dev", "", 4096, 0)]
    assert err == "input: EINVAL: no new line at EOF\n"
    calls, _out, err = record("a dev 4K\n")
    assert err == ""
    assert record("") == ([], "", "")


def test_final_line_too_long_without_newline() -> None:
    # the stub checks the length before the missing newline
    _calls, _out, err = record("a dev 4K\n" + "x" * 1024)
    assert err == "input: EINVAL: line too long\n"
    _calls, _out, err = record("a dev 4K\n" + "x" * 1023)
    assert err == "input: EINVAL: no new line at EOF\n"


def test_runner_state_persists_across_run_line() -> None:
    backend = Recorder()
    out, err = io.StringIO(), io.StringIO()
    runner = ScriptRunner(backend, out, err)
    runner.run_line("a dev 4K")
    runner.run_line("")
    runner.run_line("f")
    assert [c[0] for c in backend.calls] == ["alloc", "alloc", "free"]
    assert list(runner.live) == [1]
    assert runner.previous == "f"


# ------------------------------------------------------------------------------ ids and lists
def test_ids_lowest_unused_and_list_in_allocation_order() -> None:
    out, err = run("a dev 4K\na dev 4K\na dev 4K\nf 2\na dev 8K\nl\nf 1\nf 3\na dev 4K\nl\n")
    assert err == ""
    assert out.splitlines() == [
        "1: 0x1000@0x40000000",
        "2: 0x1000@0x40001000",
        "3: 0x1000@0x40002000",
        "2: 0x2000@0x40003000",
        "1: 0x1000@0x40000000",
        "3: 0x1000@0x40002000",
        "2: 0x2000@0x40003000",
        "1: 0x1000@0x40000000",
        "2: 0x2000@0x40003000",
        "1: 0x1000@0x40000000",
    ]


def test_free_without_argument_frees_most_recent() -> None:
    calls, out, err = record("a d 4K\na d 4K\na d 4K\nf 1\na d 4K\nf\nl\nf\nf\nf\n")
    frees = [c[1] for c in calls if c[0] == "free"]
    # ids: 1=0x11000 2=0x12000 3=0x13000; free 1; new 1=0x14000 is the most recent
    assert frees == [0x11000, 0x14000, 0x13000, 0x12000]
    assert out.splitlines()[-2:] == ["2: 0x1000@0x12000", "3: 0x1000@0x13000"]
    assert err == "f: ENOENT: no chunks\n"


def test_free_no_chunks_uses_typed_word() -> None:
    assert run("free\nf\n")[1] == "free: ENOENT: no chunks\nf: ENOENT: no chunks\n"


def test_success_line_prints_requested_size() -> None:
    out, _err = run("a dev 5000\nr r1 1/64K\n")
    assert out == "1: 0x1388@0x40000000\n2: 0x1@0x40100000\n"


# ------------------------------------------------------------------------------ alloc parsing
def test_dev_kind_split_at_last_slash() -> None:
    calls, _, err = record("a a/b/c 4K\na dev 4K\na dev/ 4K\na /k 4K\na // 4K\n")
    assert [c[1:3] for c in calls] == [
        ("a/b", "c"),
        ("dev", ""),
        ("dev", ""),
        ("", "k"),
        ("/", ""),
    ]
    assert err == ""


def test_name_or_kind_length() -> None:
    name16, name17 = "d" * 16, "d" * 17
    calls, _, err = record(
        f"a {name16}/{name16} 4K\na {name17} 4K\na x/{name17} 4K\na {name17}/k 4K\n"
        f"alloc {'é' * 8} 4K\nalloc {'é' * 8}x 4K\ni {name17}\nb 1 {name17} 4K\n"
    )
    assert [c[1:3] for c in calls] == [(name16, name16), ("é" * 8, "")]
    assert err.splitlines() == [
        "a: EINVAL: name or kind too long",
        "a: EINVAL: name or kind too long",
        "a: EINVAL: name or kind too long",
        "alloc: EINVAL: name or kind too long",
        "i: EINVAL: name or kind too long",
        "b: EINVAL: name or kind too long",
    ]


@pytest.mark.parametrize(
    ("token", "size", "alignment"),
    [
        ("4K", 4096, 0),
        ("4K/0", 4096, 0),
        ("4K/1", 4096, 1),
        ("4K/8K", 4096, 8192),
        ("1/0x100000", 1, M),
        ("010/010", 8, 8),
        ("0x1000/1G", 4096, 1 << 30),
        ("1/0x8000000000000000", 1, 2**63),
    ],
)
def test_size_and_alignment(token: str, size: int, alignment: int) -> None:
    calls, _, err = record(f"a d {token}\nr x {token}\n")
    assert err == ""
    assert calls == [("alloc", "d", "", size, alignment), ("alloc_from", "x", size, alignment)]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("0", "invalid size"),
        ("0/4K", "invalid size"),
        ("08", "invalid size"),
        ("-1", "invalid size"),
        ("+1", "invalid size"),
        ("1T", "invalid size"),
        ("x", "invalid size"),
        ("/4K", "invalid size"),
        ("18446744073709551616", "invalid size"),
        ("16E", "invalid size"),
        ("4K/", "invalid alignment"),
        ("4K/3", "invalid alignment"),
        ("4K/0x3000", "invalid alignment"),
        ("4K/x", "invalid alignment"),
        ("4K/-4K", "invalid alignment"),
        ("4K/8K/1", "invalid alignment"),
        ("4K/08", "invalid alignment"),
        ("4K/0x10000000000000000", "invalid alignment"),
    ],
)
def test_size_and_alignment_errors(token: str, message: str) -> None:
    calls, out, err = record(f"a d {token}\nalloc-from r {token}\n")
    assert calls == [] and out == ""
    assert err == f"a: EINVAL: {message}\nalloc-from: EINVAL: {message}\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a", "a: EINVAL: missing argument"),
        ("alloc dev", "alloc: EINVAL: missing argument"),
        ("a dev 4K extra", "a: EINVAL: unknown arguments at the end"),
        ("r r1", "r: EINVAL: missing argument"),
        ("r r1 4K x", "r: EINVAL: unknown arguments at the end"),
        ("l x", "l: EINVAL: unknown arguments at the end"),
        ("list 1", "list: EINVAL: unknown arguments at the end"),
        ("i", "i: EINVAL: missing argument"),
        ("info a b", "info: EINVAL: unknown arguments at the end"),
        ("f 1 2", "f: EINVAL: unknown arguments at the end"),
        ("w 1", "w: EINVAL: missing argument"),
        ("v", "v: EINVAL: missing argument"),
        ("write 1 2 3", "write: EINVAL: unknown arguments at the end"),
        ("b 1 dev", "b: EINVAL: missing argument"),
        ("bench 1 dev 4K x", "bench: EINVAL: unknown arguments at the end"),
        ("p", "p: EINVAL: missing argument"),
        ("ping 1 2", "ping: EINVAL: unknown arguments at the end"),
        ("ALLOC dev 4K", "ALLOC: EINVAL: unknown command"),
        ("allocate dev 4K", "allocate: EINVAL: unknown command"),
        ("x", "x: EINVAL: unknown command"),
        ("a-from r 4K", "a-from: EINVAL: unknown command"),
    ],
)
def test_argument_count_errors(line: str, expected: str) -> None:
    calls, out, err = record(line + "\n")
    assert calls == [] and out == ""
    assert err == expected + "\n"


# ------------------------------------------------------------------------------ chunk ids
@pytest.mark.parametrize(
    "token",
    ["0", "-1", "+1", "x", "1x", "0x1", "2147483648", "99999999999999999999", "\u0661", "\u00b2"],
)
def test_invalid_chunk_id(token: str) -> None:
    for command in ("f", "free", "w", "v"):
        extra = " 1" if command in ("w", "v") else ""
        calls, _out, err = record(f"a d 4K\n{command} {token}{extra}\n")
        assert err == f"{command}: EINVAL: invalid chunk id\n"
        assert len(calls) == 1


def test_no_such_chunk() -> None:
    calls, _out, err = record("a d 4K\nf 5\nfree 2147483647\nw 2 1\nverify 3 1\nf 01\nf 1\n")
    assert err.splitlines() == [
        "f: ENOENT: no chunk 5",
        "free: ENOENT: no chunk 2147483647",
        "w: ENOENT: no chunk 2",
        "verify: ENOENT: no chunk 3",
        "f: ENOENT: no chunk 1",
    ]
    assert [c[0] for c in calls] == ["alloc", "free"]  # "01" is chunk 1


# ------------------------------------------------------------------------------ write/verify
def test_write_and_verify_offline() -> None:
    cma = framework()
    out, err = run(
        "a dev 4K\n"
        "v 1 0\n"  # never written: mismatch at 0
        "w 1 0xdeadbeef\n"
        "v 1 0xdeadbeef\n"
        "verify 1 0xdeadbeee\n"
        "w 1 0xffffffff\n"
        "v 1 4294967295\n"
        "w 1 010\n"
        "v 1 8\n"
        "f 1\n"
        "a dev 4K\n"  # the same start again: the pattern was forgotten
        "v 1 8\n",
        cma,
    )
    assert out == "1: 0x1000@0x40000000\n1: 0x1000@0x40000000\n"
    assert err.splitlines() == [
        "v: EIO: mismatch at offset 0x0",
        "verify: EIO: mismatch at offset 0x0",
        "v: EIO: mismatch at offset 0x0",
    ]


@pytest.mark.parametrize("pattern", ["0x100000000", "4294967296", "1K", "-1", "x", "08"])
def test_invalid_pattern(pattern: str) -> None:
    calls, _out, err = record(f"a d 4K\nw 1 {pattern}\nverify 1 {pattern}\n")
    assert err == "w: EINVAL: invalid pattern\nverify: EINVAL: invalid pattern\n"
    assert len(calls) == 1


def test_write_passes_chunk_and_requested_size() -> None:
    calls, _out, _err = record("a d 5000\nw 1 7\nv 1 7\n")
    assert calls[1:] == [("write", 0x11000, 5000, 7), ("verify", 0x11000, 5000, 7)]


# ------------------------------------------------------------------------------ info
def test_info_output_format() -> None:
    out, err = run("a dev 4K\ni dev\ninfo dev/k\ni nomatch\ni full\n")
    assert err == ""
    assert out.splitlines()[1:] == [
        "info: count=1 total=0x100000 free=0xff000 lower=0x40000000 upper=0x40100000",
        "info: count=1 total=0x100000 free=0x100000 lower=0x40100000 upper=0x40200000",
        "info: count=2 total=0x200000 free=0x1ff000 lower=0x40000000 upper=0x40200000",
        "info: count=1 total=0x10000 free=0x10000 lower=0x40200000 upper=0x40210000",
    ]


def test_info_with_no_known_region() -> None:
    cma = Cma.from_attributes("-a=1M", "x=nosuch", None, ram=[(BASE, 4 * M)])
    out, err = run("i x\ni y\n", cma)
    assert out == ("info: count=0 total=0x0 free=0x0 lower=0xffffffffffffffff upper=0x0\n")
    assert err.startswith("i: ENOENT: ")


# ------------------------------------------------------------------------------ bench / ping
def fake_clock(durations_us: list[int]) -> Iterator[float]:
    now = 0.0
    for d in durations_us:
        yield now
        now += d / 1e6
        yield now


def timed(script: str, durations_us: list[int], cma: Cma | None = None) -> tuple[str, str]:
    ticks = fake_clock(durations_us)
    out, err = io.StringIO(), io.StringIO()
    backend = FrameworkBackend(cma if cma is not None else framework())
    ScriptRunner(backend, out, err, clock=lambda: next(ticks)).run(script)
    return out.getvalue(), err.getvalue()


def test_ping_percentiles_nearest_rank() -> None:
    durations = list(range(100, 0, -1))  # 1..100 us, in reverse
    out, err = timed("ping 100\n", durations)
    assert (out, err) == ("ping: n=100 p50=50us p99=99us\n", "")
    out, err = timed("p 1\n", [7])
    assert out == "ping: n=1 p50=7us p99=7us\n"
    out, err = timed("p 3\n", [5, 1, 9])
    assert out == "ping: n=3 p50=5us p99=9us\n"


def test_bench_allocs_and_frees() -> None:
    cma = framework()
    out, err = timed("b 4 dev 64K\nbench 2 dev/k 4K\nl\n", [10, 20, 30, 40, 3, 4], cma)
    assert err == ""
    assert out == "bench: n=4 p50=20us p99=40us\nbench: n=2 p50=3us p99=4us\n"
    assert cma.chunks == []
    r0, r1, _ = cma.stats()
    assert (r0.alloc_pages_success, r0.release_pages_success) == (64, 64)
    assert (r1.alloc_pages_success, r1.release_pages_success) == (2, 2)


def test_bench_error_stops_the_loop() -> None:
    cma = framework()
    out, err = timed("b 3 full 64K\nb 1 full 65537\n", [1, 1, 1, 1, 1], cma)
    assert out == "bench: n=3 p50=1us p99=1us\n"
    assert err.startswith("b: ENOMEM: ")
    assert cma.chunks == []


@pytest.mark.parametrize("count", ["0", "-1", "x", "1000001", "0x10", "1K", "+5"])
def test_invalid_count(count: str) -> None:
    calls, out, err = record(f"p {count}\nbench {count} d 4K\n")
    assert calls == [] and out == ""
    assert err == "p: EINVAL: invalid count\nbench: EINVAL: invalid count\n"


@pytest.mark.parametrize("size", ["0", "x", "4K/8K", "-1"])
def test_bench_invalid_size(size: str) -> None:
    calls, _out, err = record(f"b 1 d {size}\n")
    assert (calls, err) == ([], "b: EINVAL: invalid size\n")


def test_count_bounds_accepted() -> None:
    out, _err = timed("p 1000000\n", [1] * 1_000_000)
    assert out == "ping: n=1000000 p50=1us p99=1us\n"


# ------------------------------------------------------------------------------ framework errors
def test_framework_error_line_uses_word_as_typed_and_str_of_error() -> None:
    cma = framework()
    with pytest.raises(ENOMEM) as info:
        cma.alloc("full", "", 128 * K)
    expected = str(info.value)
    _out, err = run("alloc full 128K\na full 128K\n")
    assert err == f"alloc: ENOMEM: {expected}\na: ENOMEM: {expected}\n"


def test_framework_errors_in_script() -> None:
    cma = Cma.from_attributes("-a=1M", None, None, ram=[(BASE, 4 * M)])
    out, err = run("a dev 4K\na /k 4K\nr a,,b 4K\nr * 4K\nr a 4K\nr a 2M\n", cma)
    assert out == "1: 0x1000@0x40300000\n"
    lines = err.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        ["a", "ENOENT"],
        ["a", "EINVAL"],
        ["r", "EINVAL"],
        ["r", "ENOENT"],
        ["r", "ENOMEM"],
    ]
    assert "column" in lines[2]


def test_failure_counters() -> None:
    out, err = io.StringIO(), io.StringIO()
    runner = ScriptRunner(FrameworkBackend(framework()), out, err)
    runner.run("a full 64K\na full 4K\nr r0 1M\nbogus\na x 0\n")
    assert runner.allocations == 3
    assert runner.failed_allocations == 1
    assert runner.failures == 3


def test_free_error_keeps_chunk_listed() -> None:
    class FailingFree(Recorder):
        def free(self, addr: int) -> None:
            raise CmaError("guest went away")

    backend = FailingFree()
    out, err = io.StringIO(), io.StringIO()
    runner = ScriptRunner(backend, out, err)
    runner.run("a d 4K\nf 1\nl\n")
    assert err.getvalue() == "f: EIO: guest went away\n"
    assert out.getvalue() == "1: 0x1000@0x11000\n1: 0x1000@0x11000\n"


def test_frameworkbackend_owner() -> None:
    cma = framework()
    run("a dev 4K\n", cma)
    assert [c.owner for c in cma.chunks] == ["replay"]


def test_a_nul_byte_ends_the_line_as_in_the_stub() -> None:
    out, err = run("alloc dev 1M\0 trailing garbage\nlist\0 junk\n")
    assert err == ""
    assert out.count("1: 0x100000@") == 2
