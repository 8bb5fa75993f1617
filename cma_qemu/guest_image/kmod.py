"""Out-of-tree guest kernel modules, cross-built on the host from Debian's header packages.

Debian ships what an out-of-tree build needs as three packages: the headers common to every
flavour (``linux-headers-ABI-common``, arch ``all``), the flavour's ``.config`` and
``Module.symvers`` (``linux-headers-RELEASE:armhf``) and the kbuild tools
(``linux-kbuild-X.Y``). The tools are host programs, so they come for the *host's* architecture
(an armhf ``fixdep`` cannot run here; the amd64 ``modpost`` reads 32-bit ARM objects). The
three are unpacked with ``dpkg-deb -x`` into one tree (their ``scripts``/``tools`` links are
relative), the flavour's ``Makefile`` is pointed into that tree instead of ``/usr/src``, and
``make -C TREE M=DIR ARCH=arm CROSS_COMPILE=arm-linux-gnueabihf- modules`` builds the module.
Nothing is installed on the host.

Cache layout (under the guest cache, ``build.default_cache_dir()``)::

    kbuild/<release>_<version>/     the unpacked tree (usr/src/..., usr/lib/linux-kbuild-X.Y)
    kmod/<key>/<name>.ko            a built module (debug info stripped) and its Module.symvers
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cma_qemu.errors import EINVAL, EIO, ENOENT
from cma_qemu.guest_image import apt, host
from cma_qemu.guest_image.cache import is_complete, publishing

__all__ = [
    "CROSS_COMPILE",
    "GUEST_KMOD",
    "BuiltModule",
    "KbuildTree",
    "build_guest_kmod",
    "build_module",
    "build_user_module",
    "guest_kmod_key",
    "guest_kmod_names",
    "kbuild_packages",
    "kbuild_tree",
    "module_key",
]

CROSS_COMPILE = "arm-linux-gnueabihf-"

#: The guest's own module: /dev/cma, /dev/cma-ctl and the in-kernel API (guest/kernel/).
GUEST_KMOD = "cma_guest"

#: Bumped when the build recipe changes, so cached modules rebuild.
RECIPE_VERSION = 1

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KbuildTree:
    """An unpacked header tree for one kernel release: ``make -C`` this ``build_dir``."""

    release: str
    version: str
    build_dir: Path


@dataclass(frozen=True)
class BuiltModule:
    """A cross-built module: the ``.ko`` files and the ``Module.symvers`` of its exports."""

    modules: tuple[Path, ...]
    symvers: Path
    key: str
    seconds: float  # how long make took (0.0 when it came from the cache)


def _release_parts(release: str) -> tuple[str, str]:
    """``6.1.0-50-armmp-lpae`` -> (``6.1.0-50``, ``6.1``): the ABI and the kbuild series."""
    m = re.match(r"^((\d+)\.(\d+)\.\d+-\d+)-", release)
    if not m:
        raise EINVAL(f"cannot read the ABI of kernel release {release!r}", where="module build")
    return m[1], f"{m[2]}.{m[3]}"


def kbuild_packages(release: str, version: str, host_arch: str) -> list[str]:
    """The ``apt-get download`` arguments of the three packages a module build needs.

    >>> kbuild_packages("6.1.0-50-armmp", "6.1.176-1", "amd64")  # doctest: +NORMALIZE_WHITESPACE
    ['linux-headers-6.1.0-50-common=6.1.176-1', 'linux-headers-6.1.0-50-armmp:armhf=6.1.176-1',
     'linux-kbuild-6.1:amd64=6.1.176-1']
    """
    abi, series = _release_parts(release)
    return [
        f"linux-headers-{abi}-common={version}",
        f"linux-headers-{release}:armhf={version}",
        f"linux-kbuild-{series}:{host_arch}={version}",
    ]


def _host_arch() -> str:
    res = host.run(["dpkg", "--print-architecture"])
    arch = res.stdout.strip()
    if res.returncode != 0 or not arch:
        raise EIO("`dpkg --print-architecture` failed", where="module build")
    return arch


def kbuild_tree(release: str, version: str, cache: Path, progress: Progress) -> KbuildTree:
    """The header tree of ``release`` at ``version``: downloaded and unpacked once, cached."""
    final = cache / "kbuild" / f"{release}_{version.replace(':', '%3a')}"
    build_dir = final / "usr/src" / f"linux-headers-{release}"
    if is_complete(final):
        return KbuildTree(release, version, build_dir)
    with publishing(final) as tmp:
        with tempfile.TemporaryDirectory(dir=cache) as work_s:
            work = Path(work_s)
            for spec in kbuild_packages(release, version, _host_arch()):
                progress(f"downloading {spec}")
                res = host.run(["apt-get", "download", spec], cwd=work)
                if res.returncode != 0:
                    raise ENOENT(
                        f"`apt-get download {spec}` failed (a kernel module build needs it; "
                        f"run `sudo apt-get update`):\n{host.tail(res.stderr or res.stdout)}",
                        where="module build",
                    )
            for deb in sorted(work.glob("*.deb")):
                res = host.run(["dpkg-deb", "-x", str(deb), str(tmp)])
                if res.returncode != 0:
                    raise EIO(
                        f"`dpkg-deb -x {deb.name}` failed:\n{host.tail(res.stderr)}",
                        where="module build",
                    )
        abi, _ = _release_parts(release)
        flavour_dir = tmp / "usr/src" / f"linux-headers-{release}"
        common = final / "usr/src" / f"linux-headers-{abi}-common"
        if (
            not (flavour_dir / "Makefile").is_file()
            or not (tmp / "usr/src" / f"linux-headers-{abi}-common" / "Makefile").is_file()
        ):
            raise ENOENT(f"the header packages of {release} hold no Makefile", where="module build")
        # the flavour's Makefile includes /usr/src/...-common/Makefile: point it into this tree
        (flavour_dir / "Makefile").write_text(f"include {common}/Makefile\n")
    return KbuildTree(release, version, build_dir)


def module_key(tree_id: str, sources: Sequence[Path], extra: Sequence[str] = ()) -> str:
    """Hash of a module build's inputs: the kernel, the source files (by name) and ``extra``."""
    h = hashlib.sha256()
    for part in [str(RECIPE_VERSION), CROSS_COMPILE, tree_id, *extra]:
        h.update(part.encode() + b"\0")
    for path in sorted(sources, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _module_sources(src: Path) -> list[Path]:
    return sorted(
        p for p in src.iterdir() if p.is_file() and (p.suffix in (".c", ".h") or p.name == "Kbuild")
    )


def build_module(
    tree: KbuildTree,
    src: Path,
    cache: Path,
    progress: Progress,
    *,
    include: Sequence[Path] = (),
    extra_symbols: Sequence[Path] = (),
) -> BuiltModule:
    """Cross-builds the module(s) of ``src`` (a directory with a ``Kbuild`` file), cached.

    ``include`` directories are passed as ``-I`` flags (their headers are part of the key);
    ``extra_symbols`` are the ``Module.symvers`` of modules it uses. The source directory is
    copied first, so a read-only or installed source tree works and stays clean. Cost: about
    8 s of make on a cold cache (2 cores), a hash of the sources when cached.
    """
    if not (src / "Kbuild").is_file() and not (src / "Makefile").is_file():
        raise ENOENT(f"{src} has no Kbuild file", where="module build")
    host.require_tool("make", "run `sudo apt-get install make`")
    host.require_tool(f"{CROSS_COMPILE}gcc", "run `sudo apt-get install gcc-arm-linux-gnueabihf`")
    sources = _module_sources(src)
    headers = [h for d in include for h in sorted(d.glob("*.h"))]
    key = module_key(
        f"{tree.release}_{tree.version}",
        [*sources, *headers, *extra_symbols],
    )
    final = cache / "kmod" / key
    if is_complete(final):
        kos = tuple(sorted(final.glob("*.ko")))
        return BuiltModule(kos, final / "Module.symvers", key, 0.0)
    with publishing(final) as tmp, tempfile.TemporaryDirectory(dir=cache) as work_s:
        work = Path(work_s) / "src"
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("*.ko", "*.o", ".*"))
        flags = " ".join(f"-I{d.resolve()}" for d in include)
        argv = [
            "make", "-C", str(tree.build_dir), f"M={work}", "ARCH=arm",
            f"CROSS_COMPILE={CROSS_COMPILE}", f"KCFLAGS={flags}",
            "KBUILD_EXTRA_SYMBOLS=" + " ".join(str(p.resolve()) for p in extra_symbols),
            "modules",
        ]  # fmt: skip
        progress(f"building the kernel module(s) in {src} for {tree.release}")
        started = time.monotonic()
        res = host.run(argv)
        seconds = time.monotonic() - started
        built = sorted(work.glob("*.ko"))
        if res.returncode != 0 or not built:
            raise EIO(
                f"building the kernel module in {src} for {tree.release} failed:\n"
                f"{host.tail(res.stderr or res.stdout, 20)}",
                where="module build",
            )
        for ko in built:
            strip = host.run(
                [f"{CROSS_COMPILE}strip", "--strip-debug", "-o", str(tmp / ko.name), str(ko)]
            )
            if strip.returncode != 0:
                shutil.copyfile(ko, tmp / ko.name)
        symvers = work / "Module.symvers"
        if symvers.is_file():
            shutil.copyfile(symvers, tmp / "Module.symvers")
        else:
            (tmp / "Module.symvers").write_text("")
    return BuiltModule(tuple(sorted(final.glob("*.ko"))), final / "Module.symvers", key, seconds)


def guest_kmod_key(guest_src: Path, release: str, version: str) -> str:
    """The cache key of the guest's own module (guest/kernel/ with guest/include/); "" when
    the sources have no ``kernel/Kbuild`` (then the initramfs carries no module)."""
    sources = guest_kmod_sources(guest_src)
    return module_key(f"{release}_{version}", sources) if sources else ""


def guest_kmod_sources(guest_src: Path) -> list[Path]:
    """The files the guest's own module is built from (guest/kernel/ and guest/include/
    headers); none when the sources have no ``kernel/Kbuild``."""
    if not (guest_src / "kernel" / "Kbuild").is_file():
        return []
    return [*_module_sources(guest_src / "kernel"), *sorted((guest_src / "include").glob("*.h"))]


def guest_kmod_names(guest_src: Path) -> list[str]:
    """The guest's own modules the initramfs loads after the kernel's: ``[GUEST_KMOD]``."""
    return [GUEST_KMOD] if (guest_src / "kernel" / "Kbuild").is_file() else []


def build_guest_kmod(
    guest_src: Path, release: str, version: str, cache: Path, progress: Progress
) -> BuiltModule | None:
    """Builds (or finds cached) ``cma_guest.ko`` for ``release``; None without guest/kernel/.

    Its ``Module.symvers`` is what ``cma-qemu guest module build`` gives modules that call
    the CMA API. Cost: one kbuild tree download (~10 MB) and ~8 s of make when cold.
    """
    key = guest_kmod_key(guest_src, release, version)
    if not key:
        return None
    final = cache / "kmod" / key
    if is_complete(final):
        return BuiltModule(tuple(sorted(final.glob("*.ko"))), final / "Module.symvers", key, 0.0)
    tree = kbuild_tree(release, version, cache, progress)
    return build_module(
        tree, guest_src / "kernel", cache, progress, include=[guest_src / "include"]
    )


def build_user_module(
    src: Path, flavour: str, guest_src: Path, cache: Path, progress: Progress
) -> BuiltModule:
    """``cma-qemu guest module build DIR``: a module of one's own, for ``flavour``'s kernel.

    It compiles with ``guest/include`` on the include path (``#include <cma-kernel.h>``) and
    links against ``cma_guest``'s exports (its ``Module.symvers``), so it may call the CMA
    API. Cost: an ``apt-cache`` look-up (1-2 s), then as :func:`build_module`.
    """
    if not src.is_dir():
        raise ENOENT(f"{src} is not a directory", where="module build")
    apt.check_host()
    kpkg, _ = apt.resolve_packages(flavour)
    release = apt.kernel_release(kpkg.name)
    guest = build_guest_kmod(guest_src, release, kpkg.version, cache, progress)
    tree = kbuild_tree(release, kpkg.version, cache, progress)
    symbols = [guest.symvers] if guest is not None else []
    return build_module(
        tree, src, cache, progress, include=[guest_src / "include"], extra_symbols=symbols
    )
