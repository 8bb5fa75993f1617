"""Host files into a running guest over its console: ``boot --put LOCAL:GUEST`` and the pytest
plugin's ``guest.put``.

The console is the one path every board has (virt and smdkc210 alike), so a file goes
gzip'd, as base64 text in lines just under the terminal's 4095-byte canonical limit, is
decoded and unpacked in the guest (busybox ``base64 -d | gunzip``) and gets the local file's
mode bits. Cost: one console round trip per 2.25 KiB of compressed file; a 370 KiB static
binary (150 KiB gzip'd) is ~70 round trips, seconds on virt, a minute or two on smdkc210's
UART.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shlex
import stat
from pathlib import Path
from typing import Protocol

from cma_qemu.errors import EINVAL, EIO, ENOENT

__all__ = ["GuestShell", "load_module", "parse_put", "put"]

#: Base64 characters per console line (the line also carries the shell's run markers).
_LINE = 3072


class GuestShell(Protocol):
    """What ``put`` needs of the agent: a shell command in the guest, (output, status)."""

    async def guest_run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]: ...


def parse_put(spec: str) -> tuple[Path, str]:
    """``LOCAL:GUEST`` -> (the local file, the absolute guest path); a clear error if not.

    The last ``:`` splits, so a local path may contain colons; the guest path may not.
    A guest path ending in ``/`` is a directory: the local file's name is appended.
    """
    local_s, sep, guest = spec.rpartition(":")
    if not sep or not local_s or not guest:
        raise EINVAL(f"--put {spec!r}: expected LOCAL:GUEST", where="put")
    if not guest.startswith("/"):
        raise EINVAL(f"--put {spec!r}: the guest path must be absolute", where="put")
    local = Path(local_s).expanduser()
    if not local.is_file():
        raise ENOENT(f"--put {spec!r}: {local} is not a file", where="put")
    if not os.access(local, os.R_OK):
        raise EINVAL(f"--put {spec!r}: {local} is not readable", where="put")
    if guest.endswith("/"):
        guest += local.name
    return local, guest


async def put(shell: GuestShell, local: Path, guest: str, timeout: float = 60.0) -> None:
    """Copies ``local`` to ``guest`` (parent directories made), with its permission bits."""
    data = local.read_bytes()
    mode = stat.S_IMODE(local.stat().st_mode)
    encoded = base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")
    target = shlex.quote(guest)
    staging = shlex.quote(f"{guest}.b64")

    async def check(cmd: str) -> None:
        out, status = await shell.guest_run(cmd, timeout)
        if status:
            raise EIO(f"copying {local} to the guest's {guest} failed: {out}", where="put")

    await check(f'mkdir -p "$(dirname {target})" && : > {staging}')
    for offset in range(0, len(encoded), _LINE):
        await check(f"printf %s {encoded[offset : offset + _LINE]} >> {staging}")
    await check(
        f"base64 -d {staging} | gunzip -c > {target} && rm {staging} && chmod {mode:o} {target}"
    )


async def load_module(shell: GuestShell, ko: Path, params: str = "", timeout: float = 60.0) -> str:
    """Copies a ``.ko`` (from ``cma-qemu guest module build``) into the guest and insmods it
    with ``params``; returns the guest path. EIO with insmod's message when it fails."""
    guest = f"/tmp/{ko.name}"
    digest, _ = await shell.guest_run(f"md5sum {shlex.quote(guest)} 2>/dev/null", timeout)
    if digest.split()[:1] != [hashlib.md5(ko.read_bytes()).hexdigest()]:  # copied once
        await put(shell, ko, guest, timeout)
    out, status = await shell.guest_run(f"insmod {shlex.quote(guest)} {params}", timeout)
    if status:
        raise EIO(f"insmod {ko.name} {params}: {out}", where="guest")
    return guest
