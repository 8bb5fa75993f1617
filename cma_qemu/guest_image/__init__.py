"""The guest images: a Debian armhf kernel and a busybox initramfs with ``cma-test``.

``build_guest(flavour)`` resolves the real kernel package behind Debian's metapackage
``linux-image-<flavour>:armhf``, downloads it and ``busybox-static:armhf`` with ``apt-get
download`` (nothing is installed on the host), extracts the kernel, the virtio modules and
(for ``armmp``) the smdkc210 device tree, cross-compiles the shipped ``guest/cma-test.c``
statically and packs ``guest/init``, busybox, the stub and the modules into a gzip'd newc
initramfs (no root, no device nodes on disk). ``find_guest(flavour)`` returns what was built.

One job per module: :mod:`.host` runs host tools, :mod:`.apt` resolves and fetches Debian
packages, :mod:`.modules` picks kernel modules in load order, :mod:`.cpio` writes the
archive, :mod:`.build` keeps the cache and puts it together. This is not a machine concern:
the machine layer only takes a built image (``launch.GuestImageLike``).
"""

from __future__ import annotations

from cma_qemu.guest_image.apt import (
    check_host,
    kernel_package_from_depends,
    kernel_release,
    parse_control,
    resolve_packages,
)
from cma_qemu.guest_image.build import (
    CROSS_CC,
    FLAVOURS,
    GUEST_MODULES,
    STUB_CFLAGS,
    GuestImage,
    build_guest,
    default_cache_dir,
    find_guest,
    guest_source_dir,
    initrd_key,
    main,
    pack_initramfs,
    sources_key,
    stub_key,
)
from cma_qemu.guest_image.cpio import CpioWriter, read_cpio
from cma_qemu.guest_image.modules import collect_modules, module_load_order, read_modinfo

__all__ = [
    "CROSS_CC",
    "FLAVOURS",
    "GUEST_MODULES",
    "STUB_CFLAGS",
    "CpioWriter",
    "GuestImage",
    "build_guest",
    "check_host",
    "collect_modules",
    "default_cache_dir",
    "find_guest",
    "guest_source_dir",
    "initrd_key",
    "kernel_package_from_depends",
    "kernel_release",
    "main",
    "module_load_order",
    "pack_initramfs",
    "parse_control",
    "read_cpio",
    "read_modinfo",
    "resolve_packages",
    "sources_key",
    "stub_key",
]
