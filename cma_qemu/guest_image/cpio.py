"""A ``newc`` cpio writer and reader: the initramfs format, with no root or fakeroot needed."""

from __future__ import annotations

import io

from cma_qemu.errors import EINVAL

__all__ = ["CpioWriter", "read_cpio"]


class CpioWriter:
    """A ``newc`` cpio archive (what the kernel unpacks as an initramfs), built in memory.

    Every entry is owned by root with mtime 0, so the same inputs give the same bytes; device
    nodes are plain header entries, so no root or mknod is needed.
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 721
        self._names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        name = name.strip("/") if name != "TRAILER!!!" else name
        if name in self._names:
            raise EINVAL(f"duplicate initramfs entry {name}", where="cpio")
        self._names.add(name)
        raw = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0
        )  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._buf.write(header + raw)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        """The archive with its trailer (the writer can be used once)."""
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def read_cpio(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc archive, the trailer excluded."""
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise EINVAL(f"bad cpio magic at {pos}", where="cpio")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, body))
