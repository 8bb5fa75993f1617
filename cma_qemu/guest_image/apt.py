"""Debian packages with apt: resolve the kernel behind a metapackage, download, unpack.

Nothing is installed on the host: ``apt-cache show`` gives the candidate versions, ``apt-get
download`` fetches the ``.deb`` and ``dpkg-deb -x`` unpacks it into a scratch directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cma_qemu.errors import EIO, ENODEV, ENOENT
from cma_qemu.guest_image import host

__all__ = [
    "ARCH",
    "BUSYBOX_PACKAGE",
    "Package",
    "apt_show",
    "check_host",
    "download",
    "extract",
    "kernel_package_from_depends",
    "kernel_release",
    "parse_control",
    "resolve_packages",
]

ARCH = "armhf"
BUSYBOX_PACKAGE = "busybox-static"


def check_host() -> None:
    """Raises a CmaError that names the fixing command when a host tool or armhf is missing."""
    host.require_tool(
        "apt-get", "a Debian or Ubuntu host with apt is needed to fetch the guest kernel"
    )
    host.require_tool("apt-cache", "a Debian or Ubuntu host with apt is needed")
    host.require_tool("dpkg-deb", "run `apt-get install dpkg`")
    host.require_tool("dpkg", "run `apt-get install dpkg`")
    res = host.run(["dpkg", "--print-foreign-architectures"])
    if ARCH not in res.stdout.split():
        raise ENODEV(
            f"the {ARCH} architecture is not enabled for apt; run "
            f"`sudo dpkg --add-architecture {ARCH} && sudo apt-get update`",
            where="guest build",
        )


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
    res = host.run(["apt-cache", "show", "--no-all-versions", *(f"{p}:{ARCH}" for p in packages)])
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
class Package:
    """A Debian armhf package at one version."""

    name: str
    version: str

    @property
    def dirname(self) -> str:
        """``name_version`` for the cache (the epoch colon is not welcome in file names)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}"


def resolve_packages(flavour: str) -> tuple[Package, Package]:
    """(the real kernel package, busybox-static) with their candidate versions."""
    meta_name = f"linux-image-{flavour}"
    shown = apt_show(meta_name, BUSYBOX_PACKAGE)
    kname, kversion = kernel_package_from_depends(flavour, shown[meta_name].get("Depends", ""))
    if kversion is None:
        kversion = apt_show(kname)[kname]["Version"]
    busybox = Package(BUSYBOX_PACKAGE, shown[BUSYBOX_PACKAGE]["Version"])
    return Package(kname, kversion), busybox


def download(pkg: Package, into: Path) -> Path:
    """``apt-get download name:armhf=version`` into ``into``; returns the .deb."""
    res = host.run(["apt-get", "download", f"{pkg.name}:{ARCH}={pkg.version}"], cwd=into)
    debs = sorted(into.glob(f"{pkg.name}_*.deb"))
    if res.returncode != 0 or not debs:
        raise EIO(
            f"`apt-get download {pkg.name}:{ARCH}={pkg.version}` failed; run "
            f"`sudo apt-get update` and retry:\n{host.tail(res.stderr or res.stdout)}",
            where="guest build",
        )
    return debs[-1]


def extract(deb: Path, into: Path) -> None:
    """``dpkg-deb -x``: unpack a .deb's files (nothing is installed)."""
    res = host.run(["dpkg-deb", "-x", str(deb), str(into)])
    if res.returncode != 0:
        raise EIO(f"`dpkg-deb -x {deb.name}` failed:\n{host.tail(res.stderr)}", where="guest build")
