"""``cma-qemu qemu-command``: what it writes into DIR, what it prints, and how it refuses.

The guest image is a fake (a zImage header the loader reads, an empty initrd), so no guest
build is needed; virt's device tree still comes from QEMU's own ``dumpdtb`` (about 0.1 s).
"""

from __future__ import annotations

import json
import shlex
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.boards import load_board
from cma_qemu.cli import main, parse_args
from cma_qemu.errors import EADDRINUSE
from cma_qemu.machine.launch import prepare_launch

MiB = 1 << 20
VIRT = load_board("virt")


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    dtb: Path | None = None


def fake_image(tmp: Path) -> Image:
    """A zImage header of an 8 MiB kernel, and a 4 KiB initrd."""
    data = bytearray(0x20000)
    struct.pack_into("<3I", data, 0x24, 0x016F2818, 0, len(data))
    struct.pack_into("<I", data, len(data) - 4, 8 * MiB)
    kernel, initrd = tmp / "zImage", tmp / "initrd"
    kernel.write_bytes(bytes(data))
    initrd.write_bytes(b"\0" * 4096)
    return Image(kernel, initrd)


@pytest.fixture
def image(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Image:
    img = fake_image(tmp_path_factory.mktemp("img"))
    monkeypatch.setattr("cma_qemu.guest_image.find_guest", lambda flavour: img)
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)
    return img


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_json_names_the_files_it_wrote_and_the_attach_command(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["qemu-command", "virt", "--dir", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    argv = info["argv"]
    assert argv[0] == "qemu-system-arm"
    assert (info["qmp"], info["channel"]) == (str(run / "qmp.sock"), str(run / "channel.sock"))
    assert opt_after(argv, "-qmp") == [f"unix:{run / 'qmp.sock'},server=on,wait=off"]
    assert opt_after(argv, "-dtb") == [str(run / "guest.dtb")] == [info["dtb"]]
    assert opt_after(argv, "-kernel") == [str(image.kernel)]
    # guest RAM: a file in DIR that the harness owns, not this process's /proc/PID/fd/N
    ram = run / "guest.ram"
    assert info["ram"] == str(ram)
    assert f"mem-path={ram},share=on" in opt_after(argv, "-object")[0]
    assert not any("/proc/" in a for a in argv)
    assert ram.stat().st_size == 512 * MiB
    assert stat.S_IMODE(ram.stat().st_mode) == 0o600
    assert (run / "guest.dtb").read_bytes()[:4] == b"\xd0\x0d\xfe\xed"
    names = [r["name"] for r in info["regions"]]
    assert sorted(names) == ["camera", "common", "fw", "video"]
    assert info["attach"] == [
        "cma-qemu", "attach", "--board", "virt",
        "--qmp", info["qmp"], "--channel", info["channel"],
    ]  # fmt: skip


def test_plain_output_is_one_shell_quoted_line(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["qemu-command", "virt", "--dir", str(tmp_path / "a")]) == 0
    plain = capsys.readouterr().out
    assert main(["qemu-command", "virt", "--dir", str(tmp_path / "a"), "--json"]) == 0
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert plain.count("\n") == 1
    assert shlex.split(plain) == argv  # the -append value has spaces: quoted
    assert "'console=ttyAMA0 cma=0 panic=1 cma_qemu.channel=org.cma.0'" in plain


def test_no_console_leaves_the_first_serial_port_to_the_harness(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["qemu-command", "virt", "--dir", str(tmp_path), "--no-console"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert "-serial" not in argv
    assert not any(a.startswith("stdio") for a in opt_after(argv, "-chardev"))
    assert opt_after(argv, "-device")[-1].startswith("virtserialport,")


def test_regions_and_a_leading_dash_string_reach_the_dtb_and_attach(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = "-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x44000000"
    args = ["qemu-command", "aquila", "--cma", regions, "--dir", str(tmp_path), "--json"]
    assert parse_args(args).cma == regions
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    placed = {r["name"]: (r["start"], r["size"]) for r in info["regions"]}
    assert placed["mfc_b2"] == (0x44000000, 16 * MiB)
    assert f"--cma={regions}" in info["attach"]
    import fdt

    tree = fdt.parse_dtb((tmp_path / "guest.dtb").read_bytes())
    reserved = tree.get_node("/reserved-memory")
    nodes = {n.name for n in reserved.nodes}
    assert {f"{name}@{start:x}" for name, (start, _) in placed.items()} <= nodes


def test_a_region_on_the_kernel_is_refused_and_nothing_is_left(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["qemu-command", "aquila", "--cma", "mfc_b2=16M@0x40000000", "--dir", str(run)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("cma-qemu: EADDRINUSE: ") and err.count("\n") == 1
    assert not run.exists()


def test_the_loader_check_runs_in_prepare_launch(image: Image, tmp_path: Path) -> None:
    """Past the framework's own check: the loader's kernel placement itself, as at boot."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(EADDRINUSE, match="overlaps the kernel"):
        prepare_launch(VIRT, [("x", 0x40008000, MiB)], run, image=image)
    assert list(run.iterdir()) == []  # the RAM file it created is gone again


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--cma", "a=1Q"], "cma-qemu: EINVAL: "),
        (["--map", "vpu/dec"], "cma-qemu: EINVAL: map: "),
        (["--asterisk", "a;b"], "cma-qemu: EINVAL: asterisk: "),
    ],
)
def test_bad_attributes_are_one_line_and_write_nothing(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    run = tmp_path / "run"
    assert main(["qemu-command", "virt", *args, "--dir", str(run)]) == 1
    _, err = capsys.readouterr()
    assert err.startswith(error) and err.count("\n") == 1, err
    assert not run.exists()


def test_a_dir_that_is_a_file_is_one_line(
    image: Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "f"
    file.write_text("mine")
    assert main(["qemu-command", "virt", "--dir", str(file)]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("cma-qemu: EINVAL: --dir: ") and err.count("\n") == 1, err
    assert file.read_text() == "mine"


def test_usage_mistakes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["qemu-command", "virt"])
    assert exit_.value.code == 2
    assert "--dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["qemu-command", "virt", "--dir", "d", "--cma", "--json"])
    assert "expected one argument" in capsys.readouterr().err


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    regions=st.text(alphabet="-ab=;@/,0123456789xMK", min_size=0, max_size=24),
)
def test_any_regions_string_prints_an_argv_or_one_line(
    image: Image,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    regions: str,
) -> None:
    run = tmp_path_factory.mktemp("h") / "run"
    # one token: `--cma --` is argparse's usage error (exit 2, tested above), not a regions one
    status = main(["qemu-command", "virt", f"--cma={regions}", "--dir", str(run), "--json"])
    out, err = capsys.readouterr()
    if status == 0:
        info = json.loads(out)
        assert Path(info["dtb"]).is_file() and Path(info["ram"]).is_file()
        assert err == ""
    elif status == 2:
        # Only a token argparse reads as an option ('--', or a prefix of an option such as
        # '--a') leaves --cma without a value: join_attribute_values' documented rule.
        assert regions.startswith("--"), err
        assert "expected one argument" in err and err.count("\n") == 1
        assert not run.exists()
    else:
        assert status == 1 and out == ""
        assert err.startswith("cma-qemu: E") and err.count("\n") == 1, err
        assert not run.exists()
