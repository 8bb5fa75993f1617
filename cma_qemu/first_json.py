"""The JSON document a child process prints first (``cma-qemu boot|attach --json``).

A harness starts the agent with its stdout on a pipe and needs the sockets and regions it
prints before it goes on serving; the process keeps running, so the pipe never reaches EOF
while it does and a plain ``read()`` would block. This reads the pipe's fd as bytes arrive.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from cma_qemu.errors import EIO

__all__ = ["read_first_json"]

#: How long one ``select`` waits before the process is checked for having exited.
_POLL_S = 0.5
_READ_SIZE = 65536
#: At most this much of the process's stderr is read for the message when it exited.
_STDERR_LIMIT = 65536
_DECODER = json.JSONDecoder()


def read_first_json(
    proc: subprocess.Popen[Any], timeout: float, *, where: str | None = None
) -> dict[str, Any]:
    """The first JSON object ``proc`` prints on its stdout (a pipe), parsed as bytes arrive.

    Reads the pipe's fd, not its buffered reader, so ``select`` sees every byte (output after
    the object in the same read is dropped; later output stays in the pipe). EIO (with
    ``where``, by default ``"stdout"``) when the process closes stdout or exits first
    (the message ends with its last stderr line, or what it printed), when what it printed
    first is JSON but not an object, or when ``timeout`` seconds pass. Cost: one parse of the
    bytes so far per read; a ``select`` every half second while the process is silent.
    """
    program = _program(proc)
    where = where or "stdout"
    if proc.stdout is None:
        raise EIO(f"the stdout of {program} is not a pipe", where=where)
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EIO(
                f"no JSON document from {program} in {timeout:g} s; it printed {_shown(data)}",
                where=where,
            )
        if select.select([fd], [], [], min(_POLL_S, left))[0]:
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:
                break
            data += chunk
            document = _first_document(data)
            if document is None:
                continue
            if not isinstance(document, dict):
                raise EIO(
                    f"{program} printed {_shown(data)}, not a JSON object",
                    where=where,
                )
            return document
        elif proc.poll() is not None:
            break
    try:  # at EOF the process is usually exiting: its status and stderr say why
        status: int | None = proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        status = None
    how = "closed its output" if status is None else f"exited with status {status}"
    said = _stderr_last_line(proc) if status is not None else ""
    raise EIO(
        f"{program} {how} before printing a JSON document: {said or _shown(data)}",
        where=where,
    )


def _first_document(data: bytes) -> Any:
    """The first complete JSON value in ``data`` (leading whitespace skipped); None if the
    bytes so far are not one yet (incomplete, a UTF-8 character cut in two, or garbage)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[", '"')):
        # a bare number or word may still be growing ("12" of "123"): only EOF ends it
        return None
    try:
        return _DECODER.raw_decode(stripped)[0]
    except ValueError:
        return None


def _program(proc: subprocess.Popen[Any]) -> str:
    """The name of the program ``proc`` runs (``cma-qemu``, ``ssh``), for messages."""
    args = proc.args
    if isinstance(args, (str, bytes, os.PathLike)):
        parts = os.fsdecode(args).split()
    else:
        parts = [os.fsdecode(arg) for arg in args]
    return Path(parts[0]).name if parts else "the process"


def _shown(data: bytes) -> str:
    """What the process printed, on one line and at most 200 characters."""
    if not data.strip():
        return "nothing"
    text = data.decode(errors="replace")
    return repr(text if len(text) <= 200 else text[:200] + "...")


def _stderr_last_line(proc: subprocess.Popen[Any]) -> str:
    """The last non-empty line of an exited process's stderr pipe, read without blocking
    (a child it left behind may hold the pipe open); "" when stderr is not a pipe."""
    if proc.stderr is None:
        return ""
    fd, err = proc.stderr.fileno(), b""
    while len(err) < _STDERR_LIMIT and select.select([fd], [], [], 0.1)[0]:
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            break
        err += chunk
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""
