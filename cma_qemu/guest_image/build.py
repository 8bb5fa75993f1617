"""Build and find the guest images: the cache, the stub's cross-compilation, the initramfs.

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
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cma_qemu.errors import EINVAL, EIO, ENODEV, ENOENT, CmaError
from cma_qemu.guest_image import apt, host, kmod
from cma_qemu.guest_image.apt import Package
from cma_qemu.guest_image.cache import COMPLETE, is_complete, publishing
from cma_qemu.guest_image.cpio import CpioWriter
from cma_qemu.guest_image.modules import collect_modules
from cma_qemu.shipped import shipped_dir

__all__ = [
    "CROSS_CC",
    "FLAVOURS",
    "GUEST_MODULES",
    "STUB_CFLAGS",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "find_guest",
    "guest_source_dir",
    "initrd_key",
    "pack_initramfs",
    "sources_key",
    "stub_key",
]

#: Kernel flavour -> the device tree file the flavour's board boots with (None: QEMU makes one).
FLAVOURS: Mapping[str, str | None] = {
    "armmp-lpae": None,  # QEMU virt, cortex-a15
    "armmp": "exynos4210-smdkv310.dtb",  # QEMU smdkc210 (Exynos4210)
}

#: Modules the initramfs loads (with what they depend on), when the kernel has them as modules.
#: smsc911x and its PHY driver smsc (libphy comes as their dependency): the net channel over
#: smdkc210's LAN9215; they stay idle on boards without one.
GUEST_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_console", "smsc911x", "smsc")

#: Flags of the stub's cross-compilation; guest/Makefile uses the same.
STUB_CFLAGS: tuple[str, ...] = ("-std=gnu11", "-static", "-O2", "-Wall", "-Wextra", "-Werror")

CROSS_CC = "arm-linux-gnueabihf-gcc"

#: Bumped when the layout of the initramfs changes, so old caches rebuild.
FORMAT_VERSION = 1

_MANIFEST = "manifest.json"

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
    #: :func:`sources_key` of the guest sources it was built from ("" if not recorded).
    sources: str = ""


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
    for path in sorted([*src.glob("*.c"), *src.glob("*.h"), *src.glob("include/*.h")]):
        parts += [path.name, path.read_bytes()]
    return _sha256(*parts)[:16]


def sources_key(src: Path) -> str:
    """Hash of the guest sources an image is built from: the stub's, ``init`` and the guest
    module's. Unlike the image's key it needs no apt, so :func:`find_guest` can tell an image
    built from other sources (an upgrade, an edit of guest/) cheaply: ~1 ms."""
    parts: list[bytes | str] = [stub_key(src), (src / "init").read_bytes()]
    for path in kmod.guest_kmod_sources(src):
        parts += [path.relative_to(src).as_posix(), path.read_bytes()]
    return _sha256(*parts)[:16]


def initrd_key(
    flavour: str,
    kernel: Package,
    busybox: Package,
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


def _fetch_package(
    pkg: Package, cache: Path, progress: Progress, keep: Callable[[Path, Path], None]
) -> Path:
    """Downloads and extracts ``pkg`` once; ``keep(root, out)`` copies what we need to ``out``."""
    final = cache / "packages" / pkg.dirname
    if is_complete(final):
        return final
    with publishing(final) as tmp, tempfile.TemporaryDirectory(dir=cache) as work_s:
        work = Path(work_s)
        progress(f"downloading {pkg.name}:{apt.ARCH} {pkg.version}")
        deb = apt.download(pkg, work)
        progress(f"extracting {deb.name}")
        root = work / "root"
        apt.extract(deb, root)
        keep(root, tmp)
    return final


#: The GUEST_MODULES a kept kernel package's modules/ was collected for.
_WANTED = "wanted"


def _wanted_modules() -> str:
    return "".join(f"{m}\n" for m in GUEST_MODULES)


def _forget_stale_modules(kdir: Path) -> None:
    """A kernel package kept for another GUEST_MODULES list is extracted again (O(1))."""
    wanted = kdir / "modules" / _WANTED
    if is_complete(kdir) and (not wanted.is_file() or wanted.read_text() != _wanted_modules()):
        (kdir / COMPLETE).unlink()


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
        (out / "modules" / _WANTED).write_text(_wanted_modules())
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
    if is_complete(final):
        return final / "cma-test", key
    host.require_tool(
        CROSS_CC, "run `sudo apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross`"
    )
    progress(f"cross-compiling cma-test ({key})")
    with publishing(final) as tmp:
        argv = [CROSS_CC, *STUB_CFLAGS, "-o", str(tmp / "cma-test"), str(src / "cma-test.c")]
        res = host.run(argv)
        if res.returncode != 0:
            hint = ""
            if "cannot find -lc" in res.stderr or "No such file" in res.stderr:
                hint = (
                    " (static armhf libc missing? run `sudo apt-get install libc6-dev-armhf-cross`)"
                )
            raise EIO(
                f"cross-compiling cma-test.c failed{hint}:\n{host.tail(res.stderr, 20)}",
                where="guest build",
            )
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
            sources=m.get("sources", ""),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    files = [image.kernel, image.initrd] + ([image.dtb] if image.dtb else [])
    return image if all(f.is_file() for f in files) else None


# --------------------------------------------------------------------------- public


def find_guest(flavour: str, cache_dir: Path | None = None) -> GuestImage:
    """The built image of ``flavour`` from the cache; ENODEV when it is not built, or was
    built from other guest sources than these (a stub that no longer matches the agent).

    Does not call apt, so a newer Debian kernel is not noticed (``build_guest`` does that).
    Cost: reading the manifest and hashing the guest sources (~1 ms).
    """
    _check_flavour(flavour)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    image = _image_from_manifest(flavour, cache / "guest" / flavour / _MANIFEST)
    if image is None:
        raise ENODEV(
            f"guest image for {flavour} is not built; run `cma-qemu guest build`",
            where="guest",
        )
    src = guest_source_dir()
    if image.sources != sources_key(src):
        raise ENODEV(
            f"guest image for {flavour} was built from other guest sources than {src}; run "
            "`cma-qemu guest build`",
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
    apt.check_host()
    with _locked(cache):
        say(f"resolving linux-image-{flavour}:{apt.ARCH}")
        kpkg, bpkg = apt.resolve_packages(flavour)
        release = apt.kernel_release(kpkg.name)
        init = (src / "init").read_bytes()
        sources = sources_key(src)
        skey = stub_key(src)
        kkey = kmod.guest_kmod_key(src, release, kpkg.version)  # the guest's cma_guest.ko
        outdir = cache / "guest" / flavour
        manifest = outdir / _MANIFEST

        kdir = cache / "packages" / kpkg.dirname
        _forget_stale_modules(kdir)
        order_file = kdir / "modules" / "load-order"
        if order_file.is_file():
            modules = [*order_file.read_text().split(), *kmod.guest_kmod_names(src)]
            key = initrd_key(flavour, kpkg, bpkg, f"{skey}+{kkey}", init, modules)
            current = _image_from_manifest(flavour, manifest)
            if (
                current is not None
                and current.key == key
                and current.sources == sources
                and is_complete(kdir)
            ):
                say(f"guest image {flavour} is up to date ({kpkg.name} {kpkg.version}, key {key})")
                return current

        kdir = _fetch_package(kpkg, cache, say, _keep_kernel(flavour, release))
        bdir = _fetch_package(bpkg, cache, say, _keep_busybox)
        stub, skey = _build_stub(src, cache, say)
        guest_kmod = kmod.build_guest_kmod(src, release, kpkg.version, cache, say)
        kmods = {ko.stem: ko.read_bytes() for ko in guest_kmod.modules} if guest_kmod else {}
        kkey = guest_kmod.key if guest_kmod else ""
        modules = [*(kdir / "modules" / "load-order").read_text().split(), *kmods]
        key = initrd_key(flavour, kpkg, bpkg, f"{skey}+{kkey}", init, modules)

        current = _image_from_manifest(flavour, manifest)
        if current is not None and current.key == key and current.sources == sources:
            say(f"guest image {flavour} is up to date ({kpkg.name} {kpkg.version}, key {key})")
            return current

        say(f"packing the {flavour} initramfs ({key})")
        info = (
            f"flavour={flavour}\nkernel={kpkg.name} {kpkg.version}\n"
            f"busybox={bpkg.version}\nstub={skey}\nkmod={kkey}\nkey={key}\n"
        )
        initrd = pack_initramfs(
            init,
            (bdir / "busybox").read_bytes(),
            stub.read_bytes(),
            {
                m: kmods[m] if m in kmods else (kdir / "modules" / f"{m}.ko").read_bytes()
                for m in modules
            },
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
            sources=sources,
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
            "kmod": kkey,
            "kmod_symvers": str(guest_kmod.symvers) if guest_kmod else None,
            "modules": list(modules),
            "key": key,
            "sources": sources,
        }
        _write_atomic(manifest, (json.dumps(record, indent=2) + "\n").encode())
        say(f"built {flavour}: kernel {image.kernel}, initrd {image.initrd} ({len(initrd)} bytes)")
        return image


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cma_qemu.guest_image [FLAVOUR ...]``: build and print the paths."""
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
