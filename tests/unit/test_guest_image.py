"""Guest image builder: apt parsing, cache keys, cpio writer, errors (apt, compilers faked)."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from cma_qemu import guest_image as gi
from cma_qemu.errors import EINVAL, EIO, ENODEV, ENOENT
from cma_qemu.guest_image import build
from cma_qemu.guest_image import host as host_tools

REPO = Path(__file__).resolve().parents[2]
STUB = REPO / "guest" / "cma-test.c"

META_SHOW = """\
Package: linux-image-armmp-lpae
Source: linux
Version: 6.1.176-1
Architecture: armhf
Depends: linux-image-6.1.0-50-armmp-lpae (= 6.1.176-1)
Description: Linux for ARMv7 multiplatform compatible SoCs supporting LPAE (meta-package)

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: armhf
Description: Standalone rescue shell with tons of builtin utilities
 BusyBox combines tiny versions of many common UNIX utilities into a single
 small executable.
"""


# --------------------------------------------------------------------------- apt parsing


def test_parse_control_stanzas_and_continuations() -> None:
    stanzas = gi.parse_control(META_SHOW)
    assert [s["Package"] for s in stanzas] == ["linux-image-armmp-lpae", "busybox-static"]
    assert stanzas[1]["Version"] == "1:1.35.0-4+deb12u1+b1"
    assert stanzas[1]["Description"].splitlines()[1].startswith("BusyBox combines")


K50 = "linux-image-6.1.0-50-armmp"
DEPENDS_CASES = [
    ("armmp", f"{K50} (= 6.1.176-1)", (K50, "6.1.176-1")),
    ("armmp-lpae", f"{K50}-lpae (= 6.1.176-1)", (f"{K50}-lpae", "6.1.176-1")),
    # "armmp" must not pick the lpae image; alternatives and arch qualifiers are fine
    (
        "armmp",
        "linux-base, linux-image-6.12+deb13-armmp-lpae | linux-image-6.12+deb13-armmp:armhf",
        ("linux-image-6.12+deb13-armmp", None),
    ),
    ("armmp", f"{K50}-unsigned (>= 6.1)", (f"{K50}-unsigned", None)),
]


@pytest.mark.parametrize(("flavour", "depends", "expected"), DEPENDS_CASES)
def test_kernel_package_from_depends(
    flavour: str, depends: str, expected: tuple[str, str | None]
) -> None:
    assert gi.kernel_package_from_depends(flavour, depends) == expected


def test_kernel_package_from_depends_none() -> None:
    with pytest.raises(ENOENT, match="depends on no kernel image package"):
        gi.kernel_package_from_depends("armmp", "linux-base")


def test_kernel_release() -> None:
    assert gi.kernel_release("linux-image-6.1.0-50-armmp-lpae") == "6.1.0-50-armmp-lpae"
    assert gi.kernel_release("linux-image-6.1.0-50-armmp-unsigned") == "6.1.0-50-armmp"


def _completed(argv: Sequence[str], out: str = "", rc: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(list(argv), rc, out, "")


def test_resolve_packages_one_apt_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def run(argv: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return _completed(argv, META_SHOW)

    monkeypatch.setattr(host_tools, "run", run)
    kernel, busybox = gi.resolve_packages("armmp-lpae")
    assert (kernel.name, kernel.version) == ("linux-image-6.1.0-50-armmp-lpae", "6.1.176-1")
    assert busybox.version == "1:1.35.0-4+deb12u1+b1"
    assert busybox.dirname == "busybox-static_1%3a1.35.0-4+deb12u1+b1"
    assert calls == [
        [
            "apt-cache",
            "show",
            "--no-all-versions",
            "linux-image-armmp-lpae:armhf",
            "busybox-static:armhf",
        ]
    ]


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    only_busybox = META_SHOW.split("\n\n", 1)[1]
    monkeypatch.setattr(
        host_tools, "run", lambda argv, cwd=None: _completed(argv, only_busybox, 100)
    )
    with pytest.raises(ENOENT) as info:
        gi.resolve_packages("armmp-lpae")
    assert "linux-image-armmp-lpae:armhf is not available" in str(info.value)
    assert "apt-get update" in str(info.value)


# --------------------------------------------------------------------------- host checks


def test_missing_tools_and_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        host_tools, "which", lambda name: None if name == "apt-get" else f"/usr/bin/{name}"
    )
    with pytest.raises(ENODEV, match="apt-get not found"):
        gi.check_host()

    monkeypatch.setattr(host_tools, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(host_tools, "run", lambda argv, cwd=None: _completed(argv, "i386\n"))
    with pytest.raises(ENODEV) as info:
        gi.check_host()
    assert "dpkg --add-architecture armhf && sudo apt-get update" in str(info.value)

    monkeypatch.setattr(host_tools, "run", lambda argv, cwd=None: _completed(argv, "i386\narmhf\n"))
    gi.check_host()


def test_missing_cross_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host_tools, "which", lambda name: None)
    with pytest.raises(ENODEV) as info:
        build._build_stub(STUB.parent, tmp_path, lambda _m: None)
    assert "apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" in str(info.value)


def test_find_guest_not_built(tmp_path: Path) -> None:
    with pytest.raises(ENODEV) as info:
        gi.find_guest("armmp-lpae", tmp_path)
    assert str(info.value) == (
        "guest: guest image for armmp-lpae is not built; run `cma-qemu guest build`"
    )
    with pytest.raises(EINVAL, match="unknown kernel flavour"):
        gi.find_guest("x86", tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CMA_QEMU_CACHE", str(tmp_path / "c"))
    assert gi.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CMA_QEMU_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gi.default_cache_dir() == tmp_path / "x" / "cma-qemu"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert gi.default_cache_dir() == tmp_path / "h" / ".cache" / "cma-qemu"


# --------------------------------------------------------------------------- cpio


def test_cpio_writer_round_trip() -> None:
    w = gi.CpioWriter()
    w.directory("bin")
    w.file("bin/busybox", b"\x7fELF...", 0o755)
    w.symlink("bin/sh", "busybox")
    w.char_device("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\n", 0o755)
    data = w.getvalue()
    assert len(data) % 4 == 0
    entries = gi.read_cpio(data)
    assert [(n, oct(m)) for n, m, _ in entries] == [
        ("bin", "0o40755"),
        ("bin/busybox", "0o100755"),
        ("bin/sh", "0o120777"),
        ("dev/console", "0o20600"),
        ("init", "0o100755"),
    ]
    assert entries[2][2] == b"busybox"
    # the console node carries its device numbers in rdevmajor/rdevminor
    i = data.index(b"dev/console\0") - 110
    assert data[i + 78 : i + 94] == b"%08x%08x" % (5, 1)


def test_cpio_duplicate_entry() -> None:
    w = gi.CpioWriter()
    w.directory("bin")
    with pytest.raises(EINVAL, match="duplicate"):
        w.directory("/bin/")


def test_cpio_readable_by_gnu_cpio() -> None:
    image = gi.pack_initramfs(b"#!/bin/sh\n", b"bb", b"stub", {"virtio_mmio": b"ko"}, "x=1\n")
    assert gzip.decompress(image) == gzip.decompress(
        gi.pack_initramfs(b"#!/bin/sh\n", b"bb", b"stub", {"virtio_mmio": b"ko"}, "x=1\n")
    ), "packing is deterministic"
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"],
        input=gzip.decompress(image),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "bin/sh -> busybox" in listing
    assert "lib/modules/virtio_mmio.ko" in listing
    assert "lib/modules/load-order" in listing
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console


# --------------------------------------------------------------------------- modules


def test_module_load_order_dependencies_first() -> None:
    deps = {"virtio_console": ["virtio_ring", "virtio"], "virtio_ring": ["virtio"], "virtio": []}
    order = gi.module_load_order(
        ["virtio_mmio", "virtio-console"], lambda n: deps.get(n, []), lambda n: n != "virtio_mmio"
    )
    assert order == ["virtio", "virtio_ring", "virtio_console"]


def test_read_modinfo_and_collect(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-1-armmp" / "kernel"
    moddir.mkdir(parents=True)
    srcs = {
        "virtio_console": "depends=virtio_ring,virtio",
        "virtio_ring": "depends=virtio",
        "virtio": "depends=",
        "virtio_mmio": "depends=",
    }
    for name, info in srcs.items():
        c = tmp_path / f"{name}.c"
        c.write_text(
            f'__attribute__((section(".modinfo"), used)) static const char m[] = '
            f'"name={name}\\0{info}\\0license=GPL";\n'
        )
        subprocess.run(["gcc", "-c", "-o", str(moddir / f"{name}.ko"), str(c)], check=True)
    # a compressed module is decompressed into the image
    import lzma

    ring = moddir / "virtio_ring.ko"
    (moddir / "virtio_ring.ko.xz").write_bytes(lzma.compress(ring.read_bytes()))
    ring.unlink()
    assert gi.read_modinfo((moddir / "virtio_console.ko").read_bytes())["depends"] == [
        "virtio_ring,virtio"
    ]
    out = tmp_path / "out"
    order = gi.collect_modules(moddir.parent, ("virtio_mmio", "virtio_console"), out)
    assert order == ["virtio_mmio", "virtio", "virtio_ring", "virtio_console"]
    assert (out / "virtio_ring.ko").read_bytes()[:4] == b"\x7fELF"

    (moddir.parent / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    (moddir / "virtio_mmio.ko").unlink()
    assert gi.collect_modules(moddir.parent, ["virtio_mmio"], out) == []
    with pytest.raises(ENOENT, match="neither"):
        gi.collect_modules(moddir.parent, ["virtio_blk"], out)


# --------------------------------------------------------------------------- the build, faked


class FakeHost:
    """apt-cache, apt-get download, dpkg-deb -x and the cross compiler, as fakes."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.kernel_version = "6.1.176-1"

    def which(self, name: str) -> str:
        return f"/usr/bin/{name}"

    def run(
        self, argv: Sequence[str], *, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        tool = argv[0]
        self.calls.append(" ".join(argv[:2]))
        if tool == "dpkg":
            return _completed(argv, "armhf\n")
        if tool == "apt-cache":
            return _completed(argv, META_SHOW.replace("6.1.176-1", self.kernel_version))
        if tool == "apt-get":
            assert cwd is not None
            name, _, version = argv[2].partition("=")
            (cwd / f"{name.split(':')[0]}_{version.replace(':', '%3a')}_armhf.deb").write_text(name)
            return _completed(argv)
        if tool == "dpkg-deb":
            deb, root = Path(argv[2]), Path(argv[3])
            if deb.name.startswith("busybox"):
                (root / "bin").mkdir(parents=True)
                (root / "bin/busybox").write_bytes(b"busybox")
            else:
                rel = "6.1.0-50-armmp-lpae"
                (root / "boot").mkdir(parents=True)
                (root / "boot" / f"vmlinuz-{rel}").write_bytes(b"kernel " + deb.name.encode())
                mods = root / "lib/modules" / rel / "kernel/drivers"
                mods.mkdir(parents=True)
                (mods / "virtio_mmio.ko").write_bytes(b"mmio")
                (mods / "virtio_console.ko").write_bytes(b"console")
                for name in ("libphy", "smsc911x", "smsc"):
                    (mods / f"{name}.ko").write_bytes(name.encode())
                (root / "lib/modules" / rel / "modules.dep").write_text(
                    "kernel/drivers/virtio_mmio.ko:\nkernel/drivers/virtio_console.ko:\n"
                    "kernel/drivers/libphy.ko:\n"
                    "kernel/drivers/smsc911x.ko: kernel/drivers/libphy.ko\n"
                    "kernel/drivers/smsc.ko: kernel/drivers/libphy.ko\n"
                )
            return _completed(argv)
        if tool == gi.CROSS_CC:
            Path(argv[argv.index("-o") + 1]).write_bytes(b"stub " + Path(argv[-1]).read_bytes())
            return _completed(argv)
        raise AssertionError(f"unexpected command {argv}")


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[FakeHost, Path, Path]:
    host = FakeHost()
    src = tmp_path / "guest"
    src.mkdir()
    (src / "cma-test.c").write_text("int main(void) { return 0; }\n")
    (src / "init").write_text("#!/bin/sh\n")
    monkeypatch.setenv("CMA_QEMU_GUEST_SRC", str(src))
    monkeypatch.setattr(host_tools, "run", host.run)
    monkeypatch.setattr(host_tools, "which", host.which)
    return host, src, tmp_path / "cache"


def test_build_caches_and_rebuilds_only_what_changed(
    fake_build: tuple[FakeHost, Path, Path],
) -> None:
    host, src, cache = fake_build
    msgs: list[str] = []
    img = gi.build_guest("armmp-lpae", cache, msgs.append)
    modules = ("virtio_mmio", "virtio_console", "libphy", "smsc911x", "smsc")
    assert img.dtb is None and img.modules == modules
    assert img.kernel.read_bytes().startswith(b"kernel linux-image-6.1.0-50-armmp-lpae_")
    entries = {n: d for n, _, d in gi.read_cpio(gzip.decompress(img.initrd.read_bytes()))}
    assert entries["bin/cma-test"].startswith(b"stub int main")
    assert entries["lib/modules/load-order"] == "".join(f"{m}\n" for m in modules).encode()
    assert gi.find_guest("armmp-lpae", cache) == img
    assert sum(c.startswith("apt-get") for c in host.calls) == 2

    # second run: only the apt-cache look-up, and it says so
    host.calls.clear()
    msgs.clear()
    assert gi.build_guest("armmp-lpae", cache, msgs.append) == img
    assert host.calls == ["dpkg --print-foreign-architectures", "apt-cache show"]
    assert "is up to date" in msgs[-1]

    # a stub change recompiles the stub and repacks the initramfs, nothing is downloaded
    host.calls.clear()
    (src / "cma-test.c").write_text("int main(void) { return 1; }\n")
    img2 = gi.build_guest("armmp-lpae", cache, msgs.append)
    assert img2.key != img.key and img2.kernel == img.kernel
    assert host.calls[2:] == [f"{gi.CROSS_CC} -std=gnu11"]

    # an init change repacks only
    host.calls.clear()
    (src / "init").write_text("#!/bin/sh\necho hi\n")
    assert gi.build_guest("armmp-lpae", cache).key != img2.key
    assert host.calls == ["dpkg --print-foreign-architectures", "apt-cache show"]

    # a new Debian upload of the kernel is downloaded
    host.calls.clear()
    host.kernel_version = "6.1.177-1"
    img3 = gi.build_guest("armmp-lpae", cache)
    assert img3.kernel_version == "6.1.177-1"
    assert "apt-get download" in host.calls


def test_build_reports_compiler_errors(
    fake_build: tuple[FakeHost, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _, cache = fake_build
    real = host.run

    def run(argv: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        if argv[0] == gi.CROSS_CC:
            return subprocess.CompletedProcess(list(argv), 1, "", "ld: cannot find -lc\n")
        return real(argv, cwd=cwd)

    monkeypatch.setattr(host_tools, "run", run)
    with pytest.raises(EIO) as info:
        gi.build_guest("armmp-lpae", cache)
    assert "libc6-dev-armhf-cross" in str(info.value)
    with pytest.raises(ENODEV):
        gi.find_guest("armmp-lpae", cache)


def test_stub_key_tracks_sources(tmp_path: Path) -> None:
    (tmp_path / "cma-test.c").write_text("a")
    k1 = gi.stub_key(tmp_path)
    (tmp_path / "init").write_text("changes the initramfs, not the stub")
    assert gi.stub_key(tmp_path) == k1
    (tmp_path / "cma-test.c").write_text("b")
    assert gi.stub_key(tmp_path) != k1


# --------------------------------------------------------------------------- the stub compiles


def test_stub_compiles_warning_free_with_host_gcc() -> None:
    res = subprocess.run(
        ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(STUB)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


def test_stub_compiles_warning_free_with_cross_gcc() -> None:
    res = subprocess.run(
        [gi.CROSS_CC, *gi.STUB_CFLAGS, "-fsyntax-only", str(STUB)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_changed_module_list_extracts_the_kernel_again(
    fake_build: tuple[FakeHost, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _src, cache = fake_build
    gi.build_guest("armmp-lpae", cache)
    host.calls.clear()
    monkeypatch.setattr(build, "GUEST_MODULES", ("virtio_mmio", "virtio_console"))
    img = gi.build_guest("armmp-lpae", cache)
    assert img.modules == ("virtio_mmio", "virtio_console")
    assert sum(c.startswith("apt-get") for c in host.calls) == 1  # the kernel, not busybox
    host.calls.clear()
    assert gi.build_guest("armmp-lpae", cache) == img
    assert not any(c.startswith("apt-get") for c in host.calls)


def test_find_guest_refuses_an_image_built_from_other_sources(
    fake_build: tuple[FakeHost, Path, Path],
) -> None:
    # An edited guest/ (or an upgraded package) must not boot the old stub silently: find_guest
    # says ENODEV, which Agent.boot answers by building, and the rebuilt image is found again.
    _, src, cache = fake_build
    img = gi.build_guest("armmp-lpae", cache)
    assert img.sources == gi.sources_key(src)
    assert gi.find_guest("armmp-lpae", cache) == img
    (src / "cma-test.c").write_text("int main(void) { return 1; }\n")
    with pytest.raises(ENODEV, match="built from other guest sources"):
        gi.find_guest("armmp-lpae", cache)
    img2 = gi.build_guest("armmp-lpae", cache)
    assert gi.find_guest("armmp-lpae", cache) == img2 != img
    (src / "init").write_text("#!/bin/sh\necho changed\n")
    with pytest.raises(ENODEV, match="built from other guest sources"):
        gi.find_guest("armmp-lpae", cache)


def test_an_image_without_recorded_sources_is_repacked_once(
    fake_build: tuple[FakeHost, Path, Path],
) -> None:
    # A cache from before the manifest recorded its sources: not trusted by find_guest, and
    # build_guest repacks it (no download) instead of calling it up to date.
    host, _, cache = fake_build
    img = gi.build_guest("armmp-lpae", cache)
    manifest = cache / "guest" / "armmp-lpae" / "manifest.json"
    record = json.loads(manifest.read_text())
    del record["sources"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(ENODEV, match="built from other guest sources"):
        gi.find_guest("armmp-lpae", cache)
    host.calls.clear()
    msgs: list[str] = []
    assert gi.build_guest("armmp-lpae", cache, msgs.append) == img
    assert any(m.startswith("packing the armmp-lpae initramfs") for m in msgs)
    assert not any("up to date" in m for m in msgs)
    assert not any(c.startswith("apt-get download") for c in host.calls)
    assert gi.find_guest("armmp-lpae", cache) == img
