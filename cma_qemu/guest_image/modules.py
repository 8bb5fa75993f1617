"""Kernel modules for the initramfs: read ``.modinfo``, order by dependency, copy them out."""

from __future__ import annotations

import gzip
import lzma
import re
import struct
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from cma_qemu.errors import EINVAL, ENODEV, ENOENT

__all__ = ["collect_modules", "module_load_order", "read_modinfo"]


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module (ELF32/ELF64, either byte order)."""
    if data[:4] != b"\x7fELF":
        raise EINVAL("not an ELF file", where="modinfo")
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        fmt = end + "IIQQQQ"
    else:
        (shoff,) = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        fmt = end + "IIIIII"

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(fmt, data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, off, size = section(i)
        name = data[stroff + name_off : data.index(b"\0", stroff + name_off)]
        if name != b".modinfo":
            continue
        for entry in data[off : off + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _norm(name: str) -> str:
    return name.replace("-", "_")


_KO = re.compile(r"^(?P<name>.+)\.ko(?P<comp>\.xz|\.gz|\.zst)?$")


def _module_files(moddir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        m = _KO.match(path.name)
        if m:
            found.setdefault(_norm(m["name"]), path)
    return found


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        res = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if res.returncode != 0:
            raise ENODEV(
                f"cannot decompress {path.name}; run `apt-get install zstd`", where="guest build"
            )
        return res.stdout
    return data


def _modules_dep(moddir: Path) -> dict[str, list[str]] | None:
    dep = moddir / "modules.dep"
    if not dep.is_file():
        return None
    table: dict[str, list[str]] = {}
    for line in dep.read_text().splitlines():
        mod, sep, deps = line.partition(":")
        if not sep:
            continue
        m = _KO.match(Path(mod).name)
        if m:
            table[_norm(m["name"])] = [
                _norm(d["name"]) for d in (_KO.match(Path(x).name) for x in deps.split()) if d
            ]
    return table


def _builtin(moddir: Path) -> set[str]:
    path = moddir / "modules.builtin"
    if not path.is_file():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        m = _KO.match(Path(line.strip()).name)
        if m:
            names.add(_norm(m["name"]))
    return names


def module_load_order(
    wanted: Iterable[str], depends: Callable[[str], list[str]], available: Callable[[str], bool]
) -> list[str]:
    """``wanted`` plus their dependencies, each after what it needs; builtins are dropped."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in order or not available(name):
            return
        if name in visiting:
            raise EINVAL(f"module dependency loop at {name}", where="guest build")
        visiting.add(name)
        for dep in depends(name):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def collect_modules(moddir: Path, wanted: Iterable[str], dest: Path) -> list[str]:
    """Copies ``wanted`` and their dependencies (decompressed) to ``dest/<name>.ko``.

    Returns the load order. A wanted module that is neither a file nor built in is an error.
    """
    files = _module_files(moddir)
    builtin = _builtin(moddir)
    table = _modules_dep(moddir)
    cache: dict[str, bytes] = {}

    def data(name: str) -> bytes:
        if name not in cache:
            cache[name] = _decompress(files[name])
        return cache[name]

    def depends(name: str) -> list[str]:
        if table is not None and name in table:
            return table[name]
        deps = read_modinfo(data(name)).get("depends", [""])[0]
        return [d for d in deps.split(",") if d]

    def available(name: str) -> bool:
        if name in files:
            return True
        if name in builtin:
            return False
        raise ENOENT(
            f"kernel module {name} is neither in {moddir} nor built in", where="guest build"
        )

    order = module_load_order(wanted, depends, available)
    dest.mkdir(parents=True, exist_ok=True)
    for name in order:
        (dest / f"{name}.ko").write_bytes(data(name))
    return order
