"""Kernel-module cross-build: package names, the header tree, the make step, cache keys and
errors (apt, dpkg-deb and make faked; the real build runs in ``cma-qemu guest build``)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from cma_qemu.errors import EINVAL, EIO, ENOENT
from cma_qemu.guest_image import host as host_tools
from cma_qemu.guest_image import kmod

REPO = Path(__file__).resolve().parents[2]
RELEASE = "6.1.0-50-armmp"
VERSION = "6.1.176-1"


def _completed(
    argv: Sequence[str], out: str = "", rc: int = 0, err: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(list(argv), rc, out, err)


class FakeHost:
    """dpkg, apt-get download, dpkg-deb -x, make and strip, as fakes that lay out files."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.missing: str | None = None  # an apt-get download spec that fails
        self.make_error: str | None = None

    def which(self, name: str) -> str:
        return f"/usr/bin/{name}"

    def run(
        self, argv: Sequence[str], *, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        tool = argv[0]
        if tool == "dpkg":
            return _completed(argv, "amd64\n")
        if tool == "apt-get":
            assert cwd is not None
            if argv[2] == self.missing:
                return _completed(argv, rc=100, err=f"E: Can't find a source for {argv[2]}")
            (cwd / (argv[2].split("=")[0].replace(":", "_") + ".deb")).write_text(argv[2])
            return _completed(argv)
        if tool == "dpkg-deb":
            deb, root = Path(argv[2]), Path(argv[3])
            src = root / "usr/src"
            if "common" in deb.name:
                (src / "linux-headers-6.1.0-50-common").mkdir(parents=True)
                (src / "linux-headers-6.1.0-50-common/Makefile").write_text("# kbuild\n")
            elif "headers" in deb.name:
                (src / f"linux-headers-{RELEASE}").mkdir(parents=True)
                (src / f"linux-headers-{RELEASE}/Makefile").write_text(
                    "include /usr/src/linux-headers-6.1.0-50-common/Makefile\n"
                )
            return _completed(argv)
        if tool == "make":
            if self.make_error:
                return _completed(argv, rc=2, err=self.make_error)
            work = Path(next(a for a in argv if a.startswith("M="))[2:])
            for c in work.glob("*.c"):
                (work / f"{c.stem}.ko").write_bytes(b"ko " + c.read_bytes())
            (work / "Module.symvers").write_text("0x1\tcma_alloc\tx\tEXPORT_SYMBOL_GPL\t\n")
            return _completed(argv)
        if tool.endswith("strip"):
            Path(argv[argv.index("-o") + 1]).write_bytes(Path(argv[-1]).read_bytes())
            return _completed(argv)
        raise AssertionError(f"unexpected command {argv}")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    host = FakeHost()
    monkeypatch.setattr(host_tools, "run", host.run)
    monkeypatch.setattr(host_tools, "which", host.which)
    return host


def _module_dir(tmp_path: Path, body: str = "int x;\n") -> Path:
    src = tmp_path / "mod"
    src.mkdir(exist_ok=True)
    (src / "Kbuild").write_text("obj-m := drv.o\n")
    (src / "drv.c").write_text(body)
    return src


def test_kbuild_packages_host_tools_for_the_host() -> None:
    assert kmod.kbuild_packages("6.1.0-50-armmp-lpae", VERSION, "arm64") == [
        f"linux-headers-6.1.0-50-common={VERSION}",
        f"linux-headers-6.1.0-50-armmp-lpae:armhf={VERSION}",
        f"linux-kbuild-6.1:arm64={VERSION}",
    ]
    with pytest.raises(EINVAL, match="ABI"):
        kmod.kbuild_packages("custom", VERSION, "amd64")


def test_tree_unpacked_once_and_makefile_points_into_it(fake: FakeHost, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tree = kmod.kbuild_tree(RELEASE, VERSION, cache, lambda _m: None)
    makefile = (tree.build_dir / "Makefile").read_text()
    assert makefile == f"include {tree.build_dir.parent}/linux-headers-6.1.0-50-common/Makefile\n"
    assert Path(makefile.split()[1]).is_file()
    assert sum(c[0] == "apt-get" for c in fake.calls) == 3
    fake.calls.clear()
    assert kmod.kbuild_tree(RELEASE, VERSION, cache, lambda _m: None) == tree
    assert fake.calls == []


def test_missing_package_is_named_and_leaves_no_tree(fake: FakeHost, tmp_path: Path) -> None:
    fake.missing = f"linux-kbuild-6.1:amd64={VERSION}"
    cache = tmp_path / "cache"
    with pytest.raises(ENOENT, match=r"linux-kbuild-6\.1:amd64") as info:
        kmod.kbuild_tree(RELEASE, VERSION, cache, lambda _m: None)
    assert "apt-get update" in str(info.value)
    assert list((cache / "kbuild").iterdir()) == []


def test_build_module_cached_on_its_sources(fake: FakeHost, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tree = kmod.kbuild_tree(RELEASE, VERSION, cache, lambda _m: None)
    src = _module_dir(tmp_path)
    built = kmod.build_module(tree, src, cache, lambda _m: None)
    assert [p.name for p in built.modules] == ["drv.ko"]
    assert "cma_alloc" in built.symvers.read_text()
    make = next(c for c in fake.calls if c[0] == "make")
    assert "ARCH=arm" in make and f"CROSS_COMPILE={kmod.CROSS_COMPILE}" in make
    assert not list(src.glob("*.ko")), "the source directory stays clean"
    fake.calls.clear()
    assert kmod.build_module(tree, src, cache, lambda _m: None).key == built.key
    assert fake.calls == []
    (src / "drv.c").write_text("int y;\n")
    assert kmod.build_module(tree, src, cache, lambda _m: None).key != built.key


def test_build_failure_shows_the_compiler_output(fake: FakeHost, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tree = kmod.kbuild_tree(RELEASE, VERSION, cache, lambda _m: None)
    fake.make_error = "drv.c:1:1: error: unknown type name 'in'\n"
    with pytest.raises(EIO, match="unknown type name") as info:
        kmod.build_module(tree, _module_dir(tmp_path), cache, lambda _m: None)
    assert info.value.where == "module build"
    assert not list((cache / "kmod").glob("[0-9a-f]*"))


def test_no_kbuild_file(fake: FakeHost, tmp_path: Path) -> None:
    tree = kmod.kbuild_tree(RELEASE, VERSION, tmp_path / "cache", lambda _m: None)
    with pytest.raises(ENOENT, match="no Kbuild"):
        kmod.build_module(tree, tmp_path, tmp_path / "cache", lambda _m: None)


def test_guest_kmod_key_tracks_module_and_headers(tmp_path: Path) -> None:
    assert kmod.guest_kmod_key(tmp_path, RELEASE, VERSION) == ""
    assert kmod.guest_kmod_names(tmp_path) == []
    (tmp_path / "kernel").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "kernel/Kbuild").write_text("obj-m := cma_guest.o\n")
    (tmp_path / "kernel/cma_guest.c").write_text("a")
    (tmp_path / "include/cma-dev.h").write_text("h")
    k1 = kmod.guest_kmod_key(tmp_path, RELEASE, VERSION)
    (tmp_path / "include/cma-dev.h").write_text("h2")
    k2 = kmod.guest_kmod_key(tmp_path, RELEASE, VERSION)
    assert len({k1, k2, kmod.guest_kmod_key(tmp_path, "6.1.0-50-armmp-lpae", VERSION)}) == 3
    assert kmod.guest_kmod_names(tmp_path) == [kmod.GUEST_KMOD]


def test_shipped_module_has_werror_kbuild() -> None:
    kbuild = (REPO / "guest/kernel/Kbuild").read_text()
    assert "obj-m := cma_guest.o" in kbuild and "-Werror" in kbuild
