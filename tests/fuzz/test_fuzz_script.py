"""Fuzz the line format: ScriptRunner over FrameworkBackend, line by line and whole scripts.

Checked on every line: nothing escapes ``run_line``; each error is one ``CMD: ERRNO: message``
line; a line that printed an error changed nothing; the allocator invariants hold; and the
runner's chunk table always names live chunks of the framework.
"""

from __future__ import annotations

import io
import re

from fuzzing import fuzz, no_hang
from hypothesis import given
from hypothesis import strategies as st
from strategies import script_lines
from test_framework_properties import (  # type: ignore[import-not-found]
    build,
    check_invariants,
    snapshot,
)

from cma_qemu.script import FrameworkBackend, ScriptRunner

BASE = 0x40000000
P = 4096
LAYOUT = [("a", BASE, 16 * P), ("b", BASE + 32 * P, 8 * P), ("c", BASE + 64 * P, 32 * P)]
ERROR_LINE = re.compile(r"[^\n]*: (EINVAL|ENOENT|ENOMEM|EIO|EADDRINUSE|ENOSPC): [^\n]+")
OUT_LINE = re.compile(
    r"\d+: 0x[0-9a-f]+@0x[0-9a-f]+|info: count=\d+ .*|(bench|ping): n=\d+ p50=\d+us p99=\d+us"
)


def _runner(allocator: str) -> tuple[ScriptRunner, io.StringIO, io.StringIO]:
    cma = build(LAYOUT, allocator)
    cma.set_map("d0=a,b;d1/k=b,nosuch;d2=*;d?/*=c")
    out, err = io.StringIO(), io.StringIO()
    return ScriptRunner(FrameworkBackend(cma), out, err), out, err


@fuzz
@given(
    lines=st.lists(script_lines, min_size=1, max_size=20),
    allocator=st.sampled_from(["bf", "bitmap"]),
)
def test_script_lines(lines: list[str], allocator: str) -> None:
    runner, out, err = _runner(allocator)
    backend = runner.backend
    assert isinstance(backend, FrameworkBackend)
    cma = backend.cma
    for line in lines:
        line = line.replace("\n", " ")  # (run_line takes one line, without its newline)
        before = snapshot(cma)
        err_at = err.tell()
        with no_hang():
            runner.run_line(line)
        errors = err.getvalue()[err_at:]
        if errors:
            assert errors.count("\n") == 1 and ERROR_LINE.fullmatch(errors[:-1]), errors
            assert snapshot(cma) == before, line
        check_invariants(cma, {c.start: 0 for c in cma.chunks})
        live = {c.start: c for c in cma.chunks}
        for _, chunk in runner.live.items():
            assert chunk.start in live and live[chunk.start].size >= chunk.size
    for line in out.getvalue().split("\n")[:-1]:
        assert OUT_LINE.fullmatch(line), line
    assert err.getvalue().count("\n") == runner.failures


@fuzz
@given(
    lines=st.lists(script_lines, max_size=15),
    end=st.sampled_from(["", "\n", "x", "a d0 4K"]),
)
def test_whole_scripts(lines: list[str], end: str) -> None:
    runner, _, err = _runner("bf")
    with no_hang():
        runner.run("\n".join([line.replace("\n", " ") for line in lines]) + "\n" + end)
    for line in err.getvalue().split("\n")[:-1]:  # ("\r" is not a line end for the stub)
        assert ERROR_LINE.fullmatch(line), line
    if end.strip("\n"):
        assert err.getvalue().endswith("input: EINVAL: no new line at EOF\n")


def test_lone_surrogates_are_input_errors_not_exceptions() -> None:
    # found by the fuzzer: a surrogate outside surrogateescape's range made the line-length
    # check raise UnicodeEncodeError out of run_line and run
    runner, out, err = _runner("bf")
    runner.run_line("\ud800")
    runner.run_line("a \ud800/k 4K")
    runner.run_line("i d0/\udfff")
    runner.run("a d0 4K\n\ud800")
    assert err.getvalue() == (
        "\ud800: EINVAL: unknown command\ninput: EINVAL: no new line at EOF\n"
    )
    lines = out.getvalue().split("\n")
    assert lines[0].startswith("1: 0x1000@") and lines[1].startswith("info: count=")
    assert lines[2].startswith("2: 0x1000@") and lines[3:] == [""]
