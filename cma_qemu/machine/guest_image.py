"""Build and find the guest images: a Debian armhf kernel and a busybox initramfs with ``cma-test``.

``build_guest(flavour)`` resolves the real kernel package behind Debian's metapackage
``linux-image-<flavour>:armhf``, downloads it and ``busybox-static:armhf`` with
``apt-get download`` (nothing is installed on the host), extracts the kernel, the virtio modules
and (for ``armmp``) the smdkc210 device tree, cross-compiles ``guest/cma-test.c`` statically and
packs ``guest/init``, busybox, the stub and the modules into a gzip'd newc initramfs written by
this module (no root, no device nodes on disk).

Cache layout (``default_cache_dir()``)::

    packages/<package>_<version>/   what we keep of each .deb (vmlinuz, modules/, the dtb, busybox)
    stub/<hash>/cma-test            the cross-compiled stub, keyed on its sources and flags
    guest/<flavour>/initrd.img      the initramfs
    guest/<flavour>/manifest.json   the inputs it was built from (its key) and the file paths

Each step is keyed on its inputs, so a second run does no work, and a changed stub rebuilds
only the stub and the initramfs.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cma_qemu.errors import EINVAL, EIO, ENODEV, ENOENT, CmaError
from cma_qemu.shipped import shipped_dir

__all__ = [
    "FLAVOURS",
    "GUEST_MODULES",
    "STUB_CFLAGS",
    "CpioWriter",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "find_guest",
    "guest_source_dir",
]

#: Kernel flavour -> the device tree file the flavour's board boots with (None: QEMU makes one).
FLAVOURS: Mapping[str, str | None] = {
    "armmp-lpae": None,  # QEMU virt, cortex-a15
    "armmp": "exynos4210-smdkv310.dtb",  # QEMU smdkc210 (Exynos4210)
}

#: Modules the initramfs loads (with what they depend on), when the kernel has them as modules.
GUEST_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_console")

#: Flags of the stub's cross-compilation; guest/Makefile uses the same.
STUB_CFLAGS: tuple[str, ...] = ("-std=gnu11", "-static", "-O2", "-Wall", "-Wextra", "-Werror")

CROSS_CC = "arm-linux-gnueabihf-gcc"
ARCH = "armhf"
BUSYBOX_PACKAGE = "busybox-static"

#: Bumped when the layout of the initramfs changes, so old caches rebuild.
FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_COMPLETE = ".complete"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest: what QEMU needs for ``-kernel``, ``-initrd`` and (smdkc210) ``-dtb``."""

    flavour: str
    kernel: Path
    initrd: Path
    dtb: Path | None
    #: ``uname -r`` of the kernel, e.g. ``6.1.0-50-armmp-lpae``.
    kernel_release: str = ""
    #: Debian package and version the kernel came from.
    kernel_package: str = ""
    kernel_version: str = ""
    #: Modules in the initramfs, in the order init loads them.
    modules: tuple[str, ...] = field(default_factory=tuple)
    #: The cache key of the initramfs (hash of every input).
    key: str = ""


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """``$CMA_QEMU_CACHE``, else ``$XDG_CACHE_HOME/cma-qemu``, else ``~/.cache/cma-qemu``."""
    explicit = os.environ.get("CMA_QEMU_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cma-qemu"


def guest_source_dir() -> Path:
    """The ``guest/`` directory with ``cma-test.c`` and ``init`` (``$CMA_QEMU_GUEST_SRC`` wins)."""
    explicit = os.environ.get("CMA_QEMU_GUEST_SRC")
    candidates = [Path(explicit)] if explicit else []
    shipped = shipped_dir("guest")  # the wheel's package data, or the checkout's guest/
    if shipped is not None:
        candidates.append(shipped)
    for cand in candidates:
        if (cand / "cma-test.c").is_file() and (cand / "init").is_file():
            return cand
    raise ENODEV(
        "guest sources (cma-test.c, init) not found in the installed package; reinstall "
        "cma-qemu or set CMA_QEMU_GUEST_SRC to the guest/ directory of a checkout",
        where="guest build",
    )


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        known = ", ".join(FLAVOURS)
        raise EINVAL(f"unknown kernel flavour {flavour!r} (known: {known})", where="guest build")


# --------------------------------------------------------------------------- running tools


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a command and captures its output (replaced by fakes in the unit tests)."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _which(name: str) -> str | None:
    return shutil.which(name)


def _require_tool(name: str, fix: str) -> None:
    if _which(name) is None:
        raise ENODEV(f"{name} not found; {fix}", where="guest build")


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_host() -> None:
    """Raises a CmaError that names the fixing command when a host tool or armhf is missing."""
    _require_tool("apt-get", "a Debian or Ubuntu host with apt is needed to fetch the guest kernel")
    _require_tool("apt-cache", "a Debian or Ubuntu host with apt is needed")
    _require_tool("dpkg-deb", "run `apt-get install dpkg`")
    _require_tool("dpkg", "run `apt-get install dpkg`")
    res = _run(["dpkg", "--print-foreign-architectures"])
    if ARCH not in res.stdout.split():
        raise ENODEV(
            f"the {ARCH} architecture is not enabled for apt; run "
            f"`sudo dpkg --add-architecture {ARCH} && sudo apt-get update`",
            where="guest build",
        )


# --------------------------------------------------------------------------- apt


def parse_control(text: str) -> list[dict[str, str]]:
    """The stanzas of ``apt-cache show`` output, as field dicts (continuation lines joined)."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last: str | None = None
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                fields[last] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            last = name.strip()
            fields[last] = value.strip()
    return stanzas


def kernel_package_from_depends(flavour: str, depends: str) -> tuple[str, str | None]:
    """The versioned kernel package a ``linux-image-<flavour>`` metapackage depends on.

    Returns its name and the version the metapackage pins with ``(= VERSION)``, if any.

    >>> kernel_package_from_depends("armmp", "linux-image-6.1.0-50-armmp (= 6.1.176-1)")
    ('linux-image-6.1.0-50-armmp', '6.1.176-1')
    """
    pattern = re.compile(rf"^linux-image-\d\S*-{re.escape(flavour)}(-unsigned)?$")
    for clause in depends.split(","):
        for alt in clause.split("|"):
            m = re.match(r"^\s*([^\s(:]+)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?", alt)
            if m and pattern.match(m[1]):
                return m[1], m[3] if m[2] == "=" else None
    raise ENOENT(
        f"linux-image-{flavour}:{ARCH} depends on no kernel image package "
        f"(Depends: {depends or 'none'})",
        where="guest build",
    )


def kernel_release(package: str) -> str:
    """``uname -r`` of a kernel package: ``linux-image-6.1.0-50-armmp`` -> ``6.1.0-50-armmp``."""
    release = package.removeprefix("linux-image-")
    return release.removesuffix("-unsigned")


def apt_show(*packages: str) -> dict[str, dict[str, str]]:
    """The candidate versions' control fields of ``package:armhf``, by package name.

    One ``apt-cache show`` call for all of them (each call costs a second or two); a clear
    error names the first package apt does not know.
    """
    res = _run(["apt-cache", "show", "--no-all-versions", *(f"{p}:{ARCH}" for p in packages)])
    found = {s["Package"]: s for s in parse_control(res.stdout) if s.get("Package")}
    for package in packages:
        if not found.get(package, {}).get("Version"):
            raise ENOENT(
                f"package {package}:{ARCH} is not available from apt; run `sudo apt-get update` "
                f"(and check that `dpkg --print-foreign-architectures` lists {ARCH})",
                where="guest build",
            )
    return found


@dataclass(frozen=True)
class _Package:
    name: str
    version: str

    @property
    def dirname(self) -> str:
        # the epoch colon is not welcome in file names
        return f"{self.name}_{self.version.replace(':', '%3a')}"


def resolve_packages(flavour: str) -> tuple[_Package, _Package]:
    """(the real kernel package, busybox-static) with their candidate versions."""
    meta_name = f"linux-image-{flavour}"
    shown = apt_show(meta_name, BUSYBOX_PACKAGE)
    kname, kversion = kernel_package_from_depends(flavour, shown[meta_name].get("Depends", ""))
    if kversion is None:
        kversion = apt_show(kname)[kname]["Version"]
    busybox = _Package(BUSYBOX_PACKAGE, shown[BUSYBOX_PACKAGE]["Version"])
    return _Package(kname, kversion), busybox


def _download(pkg: _Package, into: Path) -> Path:
    """``apt-get download name:armhf=version`` into ``into``; returns the .deb."""
    res = _run(["apt-get", "download", f"{pkg.name}:{ARCH}={pkg.version}"], cwd=into)
    debs = sorted(into.glob(f"{pkg.name}_*.deb"))
    if res.returncode != 0 or not debs:
        raise EIO(
            f"`apt-get download {pkg.name}:{ARCH}={pkg.version}` failed; run "
            f"`sudo apt-get update` and retry:\n{_tail(res.stderr or res.stdout)}",
            where="guest build",
        )
    return debs[-1]


def _extract(deb: Path, into: Path) -> None:
    res = _run(["dpkg-deb", "-x", str(deb), str(into)])
    if res.returncode != 0:
        raise EIO(f"`dpkg-deb -x {deb.name}` failed:\n{_tail(res.stderr)}", where="guest build")


# --------------------------------------------------------------------------- kernel modules


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


# --------------------------------------------------------------------------- cpio


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


# --------------------------------------------------------------------------- keys


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        b = part.encode() if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def stub_key(src: Path) -> str:
    """Hash of the stub's C sources and compiler flags."""
    parts: list[bytes | str] = [CROSS_CC, " ".join(STUB_CFLAGS)]
    for path in sorted([*src.glob("*.c"), *src.glob("*.h")]):
        parts += [path.name, path.read_bytes()]
    return _sha256(*parts)[:16]


def initrd_key(
    flavour: str,
    kernel: _Package,
    busybox: _Package,
    stub: str,
    init: bytes,
    modules: Sequence[str],
) -> str:
    """Hash of every input of a flavour's initramfs."""
    return _sha256(
        str(FORMAT_VERSION),
        flavour,
        kernel.name,
        kernel.version,
        busybox.name,
        busybox.version,
        stub,
        init,
        ",".join(modules),
    )[:16]


# --------------------------------------------------------------------------- build steps


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fresh_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    (tmp / _COMPLETE).touch()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _fetch_package(
    pkg: _Package, cache: Path, progress: Progress, keep: Callable[[Path, Path], None]
) -> Path:
    """Downloads and extracts ``pkg`` once; ``keep(root, out)`` copies what we need to ``out``."""
    final = cache / "packages" / pkg.dirname
    if (final / _COMPLETE).is_file():
        return final
    tmp = _fresh_dir(final)
    try:
        with tempfile.TemporaryDirectory(dir=cache) as work_s:
            work = Path(work_s)
            progress(f"downloading {pkg.name}:{ARCH} {pkg.version}")
            deb = _download(pkg, work)
            progress(f"extracting {deb.name}")
            root = work / "root"
            _extract(deb, root)
            keep(root, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _keep_kernel(flavour: str, release: str) -> Callable[[Path, Path], None]:
    def keep(root: Path, out: Path) -> None:
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.is_file():
            found = sorted((root / "boot").glob("vmlinuz-*"))
            if not found:
                raise ENOENT(f"no /boot/vmlinuz-* in the {release} package", where="guest build")
            vmlinuz = found[0]
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        moddir = next(
            (
                d
                for d in (root / "lib/modules" / release, root / "usr/lib/modules" / release)
                if d.is_dir()
            ),
            None,
        )
        if moddir is None:
            raise ENOENT(f"no lib/modules/{release} in the kernel package", where="guest build")
        order = collect_modules(moddir, GUEST_MODULES, out / "modules")
        (out / "modules" / "load-order").write_text("".join(f"{m}\n" for m in order))
        dtb_name = FLAVOURS[flavour]
        if dtb_name:
            found = sorted(root.glob(f"usr/lib/linux-image-*/**/{dtb_name}"))
            if not found:
                raise ENOENT(f"{dtb_name} is not in the kernel package", where="guest build")
            shutil.copyfile(found[0], out / dtb_name)

    return keep


def _keep_busybox(root: Path, out: Path) -> None:
    for cand in (root / "bin/busybox", root / "usr/bin/busybox"):
        if cand.is_file():
            shutil.copyfile(cand, out / "busybox")
            return
    raise ENOENT("busybox-static contains no bin/busybox", where="guest build")


def _build_stub(src: Path, cache: Path, progress: Progress) -> tuple[Path, str]:
    key = stub_key(src)
    final = cache / "stub" / key
    if (final / _COMPLETE).is_file():
        return final / "cma-test", key
    _require_tool(
        CROSS_CC, "run `sudo apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross`"
    )
    progress(f"cross-compiling cma-test ({key})")
    tmp = _fresh_dir(final)
    try:
        argv = [CROSS_CC, *STUB_CFLAGS, "-o", str(tmp / "cma-test"), str(src / "cma-test.c")]
        res = _run(argv)
        if res.returncode != 0:
            hint = ""
            if "cannot find -lc" in res.stderr or "No such file" in res.stderr:
                hint = (
                    " (static armhf libc missing? run `sudo apt-get install libc6-dev-armhf-cross`)"
                )
            raise EIO(
                f"cross-compiling cma-test.c failed{hint}:\n{_tail(res.stderr, 20)}",
                where="guest build",
            )
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "cma-test", key


def pack_initramfs(
    init: bytes, busybox: bytes, stub: bytes, modules: Mapping[str, bytes], info: str
) -> bytes:
    """The gzip'd newc initramfs: /init, busybox (+ /bin/sh), /bin/cma-test, /lib/modules/."""
    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "lib", "lib/modules",
              "proc", "sys", "mnt", "root"):  # fmt: skip
        cpio.directory(d)
    cpio.directory("tmp", 0o1777)
    # the kernel opens /dev/console before /init runs, before devtmpfs is mounted
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", init, 0o755)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("bin/cma-test", stub, 0o755)
    for name, data in modules.items():
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("lib/modules/load-order", "".join(f"{m}\n" for m in modules).encode())
    cpio.file("etc/cma-qemu-guest", info.encode())
    return gzip.compress(cpio.getvalue(), compresslevel=9, mtime=0)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _image_from_manifest(flavour: str, manifest: Path) -> GuestImage | None:
    try:
        m = json.loads(manifest.read_text())
        image = GuestImage(
            flavour=flavour,
            kernel=Path(m["kernel"]),
            initrd=Path(m["initrd"]),
            dtb=Path(m["dtb"]) if m.get("dtb") else None,
            kernel_release=m["kernel_release"],
            kernel_package=m["kernel_package"],
            kernel_version=m["kernel_version"],
            modules=tuple(m["modules"]),
            key=m["key"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = [image.kernel, image.initrd] + ([image.dtb] if image.dtb else [])
    return image if all(f.is_file() for f in files) else None


# --------------------------------------------------------------------------- public


def find_guest(flavour: str, cache_dir: Path | None = None) -> GuestImage:
    """The built image of ``flavour`` from the cache; ENODEV when it is not built.

    Does not call apt or check that the image is current (``build_guest`` does).
    """
    _check_flavour(flavour)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    image = _image_from_manifest(flavour, cache / "guest" / flavour / _MANIFEST)
    if image is None:
        raise ENODEV(
            f"guest image for {flavour} is not built; run `cma-qemu guest build`",
            where="guest",
        )
    return image


def build_guest(
    flavour: str, cache_dir: Path | None = None, progress: Progress | None = None
) -> GuestImage:
    """Builds (or finds up to date in the cache) the guest image of ``flavour``."""
    _check_flavour(flavour)
    say: Progress = progress if progress is not None else (lambda _msg: None)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    src = guest_source_dir()
    check_host()
    with _locked(cache):
        say(f"resolving linux-image-{flavour}:{ARCH}")
        kpkg, bpkg = resolve_packages(flavour)
        release = kernel_release(kpkg.name)
        init = (src / "init").read_bytes()
        skey = stub_key(src)
        outdir = cache / "guest" / flavour
        manifest = outdir / _MANIFEST

        kdir = cache / "packages" / kpkg.dirname
        order_file = kdir / "modules" / "load-order"
        if order_file.is_file():
            modules = order_file.read_text().split()
            key = initrd_key(flavour, kpkg, bpkg, skey, init, modules)
            current = _image_from_manifest(flavour, manifest)
            if current is not None and current.key == key and (kdir / _COMPLETE).is_file():
                say(f"guest image {flavour} is up to date ({kpkg.name} {kpkg.version}, key {key})")
                return current

        kdir = _fetch_package(kpkg, cache, say, _keep_kernel(flavour, release))
        bdir = _fetch_package(bpkg, cache, say, _keep_busybox)
        stub, skey = _build_stub(src, cache, say)
        modules = (kdir / "modules" / "load-order").read_text().split()
        key = initrd_key(flavour, kpkg, bpkg, skey, init, modules)

        current = _image_from_manifest(flavour, manifest)
        if current is not None and current.key == key:
            say(f"guest image {flavour} is up to date ({kpkg.name} {kpkg.version}, key {key})")
            return current

        say(f"packing the {flavour} initramfs ({key})")
        info = (
            f"flavour={flavour}\nkernel={kpkg.name} {kpkg.version}\n"
            f"busybox={bpkg.version}\nstub={skey}\nkey={key}\n"
        )
        initrd = pack_initramfs(
            init,
            (bdir / "busybox").read_bytes(),
            stub.read_bytes(),
            {m: (kdir / "modules" / f"{m}.ko").read_bytes() for m in modules},
            info,
        )
        outdir.mkdir(parents=True, exist_ok=True)
        _write_atomic(outdir / "initrd.img", initrd)
        dtb_name = FLAVOURS[flavour]
        image = GuestImage(
            flavour=flavour,
            kernel=kdir / "vmlinuz",
            initrd=outdir / "initrd.img",
            dtb=kdir / dtb_name if dtb_name else None,
            kernel_release=release,
            kernel_package=kpkg.name,
            kernel_version=kpkg.version,
            modules=tuple(modules),
            key=key,
        )
        record = {
            "flavour": flavour,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "dtb": str(image.dtb) if image.dtb else None,
            "kernel_release": release,
            "kernel_package": kpkg.name,
            "kernel_version": kpkg.version,
            "busybox_version": bpkg.version,
            "stub": skey,
            "modules": list(modules),
            "key": key,
        }
        _write_atomic(manifest, (json.dumps(record, indent=2) + "\n").encode())
        say(f"built {flavour}: kernel {image.kernel}, initrd {image.initrd} ({len(initrd)} bytes)")
        return image


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cma_qemu.machine.guest_image [FLAVOUR ...]``: build and print the paths."""
    import sys

    names = list(argv if argv is not None else sys.argv[1:]) or list(FLAVOURS)
    try:
        for name in names:
            img = build_guest(name, progress=lambda msg: print(msg, file=sys.stderr))
            print(f"{img.flavour}: kernel={img.kernel} initrd={img.initrd} dtb={img.dtb or '-'}")
    except CmaError as exc:
        print(f"cma-qemu: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
