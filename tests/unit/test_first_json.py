"""read_first_json against real child processes: slow, early-exiting, silent and garbage ones."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.errors import EIO
from cma_qemu.first_json import read_first_json

#: Writes stdin to stdout in pieces of argv[1] bytes, a little apart, then runs argv[2:].
WRITER = """
import os, sys, time
data, size = sys.stdin.buffer.read(), int(sys.argv[1])
for i in range(0, len(data), size):
    os.write(1, data[i : i + size])
    time.sleep(0.005)
exec(" ".join(sys.argv[2:]))
"""
PYTHON = Path(sys.executable).name


@contextlib.contextmanager
def child(code: str, *args: str, stdin: bytes = b"") -> Iterator[subprocess.Popen[str]]:
    """``python -c code args`` with stdout and stderr on pipes, in a session of its own: it and
    whatever it started are killed and reaped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.buffer.write(stdin)
    proc.stdin.close()
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def one_line_eio(info: pytest.ExceptionInfo[EIO], where: str = "stdout") -> str:
    assert info.value.where == where
    text = str(info.value)
    assert "\n" not in text
    return text


def test_a_document_printed_in_pieces_is_read_while_the_process_keeps_running() -> None:
    document = {"monitor": "/tmp/m.sock", "regions": [{"name": "dmé", "size": 1 << 20}]}
    raw = json.dumps(document, ensure_ascii=False).encode()
    # 3-byte pieces cut the two-byte "é" in two somewhere; the process then keeps running
    with child(WRITER, "3", "time.sleep(60)", stdin=raw + b"\n") as proc:
        assert read_first_json(proc, 30) == document
        assert proc.poll() is None


def test_output_after_the_document_in_the_same_read_is_not_in_the_way() -> None:
    code = "import os; os.write(1, b'  {\"a\": 1}\\nready\\n'); import time; time.sleep(60)"
    with child(code) as proc:
        assert read_first_json(proc, 30) == {"a": 1}


def test_a_process_that_exits_first_is_eio_with_its_last_stderr_line() -> None:
    code = "import sys; print('partial {', end=''); sys.stderr.write('Traceback\\nEINVAL: no\\n')"
    with child(code + "; sys.exit(3)") as proc, pytest.raises(EIO) as info:
        read_first_json(proc, 30, where="labgrid")
    assert one_line_eio(info, "labgrid") == (
        f"labgrid: {PYTHON} exited with status 3 before printing a JSON document: EINVAL: no"
    )


def test_garbage_then_exit_shows_what_was_printed() -> None:
    with child("print('no json here')") as proc, pytest.raises(EIO) as info:
        read_first_json(proc, 30)
    text = one_line_eio(info)
    assert "exited with status 0 before printing a JSON document: 'no json here\\n'" in text


def test_json_that_is_not_an_object_is_eio() -> None:
    with (
        child("import os, time; os.write(1, b'[1, 2]'); time.sleep(60)") as proc,
        pytest.raises(EIO, match=r"^stdout: \S+ printed '\[1, 2\]', not a JSON object$"),
    ):
        read_first_json(proc, 30)


def test_a_silent_process_times_out_and_is_left_running() -> None:
    with child("import time; time.sleep(60)") as proc:
        with pytest.raises(EIO) as info:
            read_first_json(proc, 0.3)
        assert proc.poll() is None  # the caller decides what happens to it
    expected = f"no JSON document from {PYTHON} in 0.3 s; it printed nothing"
    assert one_line_eio(info).endswith(expected)


def test_a_process_that_closes_stdout_but_runs_on_is_eio_without_waiting_for_it() -> None:
    code = "import os, time; os.write(1, b'{\"a\": '); os.close(1); time.sleep(60)"
    with child(code) as proc:
        with pytest.raises(EIO) as info:
            read_first_json(proc, 30)
        assert proc.poll() is None
    assert "closed its output before printing a JSON document: '{\"a\": '" in one_line_eio(info)


def test_a_grandchild_holding_stderr_open_does_not_block_the_message() -> None:
    """The process exits; a child it started keeps stderr (and stdout) open."""
    code = (
        "import subprocess, sys; subprocess.Popen(['sleep', '60']); "
        "sys.stderr.write('left a child\\n')"
    )
    with child(code) as proc, pytest.raises(EIO) as info:
        read_first_json(proc, 30)
    assert "exited with status 0 before printing a JSON document: left a child" in str(info.value)


def test_stdout_that_is_not_a_pipe_is_eio() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with pytest.raises(EIO, match=f"stdout: the stdout of {PYTHON} is not a pipe"):
            read_first_json(proc, 1)
    finally:
        proc.wait()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=6,
        ),
        max_size=4,
    ),
    piece=st.integers(1, 64),
)
def test_any_object_in_any_pieces_comes_back_equal(document: dict[str, Any], piece: int) -> None:
    raw = json.dumps(document, ensure_ascii=False).encode()
    with child(WRITER, str(piece), "time.sleep(60)", stdin=raw) as proc:
        assert read_first_json(proc, 30) == document


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=st.binary(max_size=200))
def test_any_output_is_an_object_or_one_line_eio(output: bytes) -> None:
    with child(WRITER, "7", "pass", stdin=output) as proc:
        try:
            document = read_first_json(proc, 30)
        except EIO as error:
            assert "\n" not in str(error) and error.where == "stdout"
        else:
            assert isinstance(document, dict)
            assert output.decode().lstrip().startswith("{")
