"""Board files: the four shipped boards, and one clear EINVAL per broken file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cma_qemu.boards import Board, board_dirs, list_boards, load_board, load_board_file
from cma_qemu.errors import EINVAL, ENOENT
from cma_qemu.regions import RamBank, ReservedRange

M = 1 << 20
SEED_MAP = "s3c-mfc5/f=mfc_fw;s3c-mfc5/a=mfc_b1;s3c-mfc5/b=mfc_b2"
SEED_REGIONS = "-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x44000000"
LOADER = (
    ReservedRange("the kernel", 0x40000000, 32 * M),
    ReservedRange("the initrd and DTB", 0x48000000, 32 * M),
)


@pytest.fixture(autouse=True)
def _shipped_boards_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)


def test_all_shipped_boards_load() -> None:
    boards = list_boards()
    assert [b.name for b in boards] == ["aquila", "goni", "smdkc210", "smdkc210-uart", "virt"]
    for board in boards:
        assert isinstance(board, Board)
        assert board.path.name == f"{board.name}.toml"
        assert board.keep_free == LOADER
        assert board.description


def test_virt() -> None:
    board = load_board("virt")
    assert board.machine_type == "virt" and board.cpu == "cortex-a15"
    assert board.kernel_flavour == "armmp-lpae" and board.console == "ttyAMA0"
    assert board.ram == (RamBank(0x40000000, 512 * M),)
    assert (board.ram_base, board.ram_size) == (0x40000000, 512 * M)
    assert (board.channel.kind, board.channel.name) == ("virtio-serial", "org.cma.0")
    assert board.memory_access == "mmap"
    assert board.regions and board.map and board.asterisk is None


def test_aquila() -> None:
    board = load_board("aquila")
    assert board.machine_type == "virt"
    assert board.ram == (RamBank(0x40000000, 384 * M),)
    assert board.channel.kind == "virtio-serial"
    assert (board.regions, board.map, board.asterisk) == (SEED_REGIONS, SEED_MAP, None)
    assert "mfc_b2=16M@0x44000000" in board.regions
    assert board.layout.banks == board.ram and board.layout.keep_free == LOADER


def test_goni() -> None:
    board = load_board("goni")
    assert board.machine_type == "virt"
    assert board.ram == (RamBank(0x40000000, 256 * M), RamBank(0x50000000, 128 * M))
    assert (board.ram_base, board.ram_size) == (0x40000000, 384 * M)
    assert board.channel.kind == "virtio-serial"
    assert (board.regions, board.map, board.asterisk) == (SEED_REGIONS, SEED_MAP, None)


def test_smdkc210_defaults_to_the_net_channel() -> None:
    board = load_board("smdkc210")
    assert board.machine_type == "smdkc210" and board.cpu is None
    assert board.kernel_flavour == "armmp" and board.console == "ttySAC0"
    assert board.ram == (RamBank(0x40000000, 1 << 30),)
    assert (board.channel.kind, board.channel.name) == ("net", "tcp:10.0.2.100:1234")
    assert board.channel.rx_fifo_status is None  # no FifoGate on the net channel
    assert board.memory_access == "pmemsave"


def test_smdkc210_uart() -> None:
    board, net = load_board("smdkc210-uart"), load_board("smdkc210")
    assert board.machine_type == "smdkc210" and board.cpu is None
    assert (board.channel.kind, board.channel.name) == ("uart", "/dev/ttySAC1")
    assert board.channel.rx_fifo_status == 0x13810018 and board.channel.rx_fifo_size == 64
    assert board.memory_access == "pmemsave"
    # the same machine and CMA layout; only the channel differs
    assert (board.ram, board.keep_free, board.regions, board.map) == (
        net.ram,
        net.keep_free,
        net.regions,
        net.map,
    )


def test_load_by_path() -> None:
    shipped = board_dirs()[-1]
    board = load_board(str(shipped / "virt.toml"))
    assert board.name == "virt"
    with pytest.raises(ENOENT, match="no board file"):
        load_board(str(shipped / "nosuch.toml"))


def test_unknown_board_lists_known_ones() -> None:
    with pytest.raises(ENOENT) as info:
        load_board("nosuch")
    assert (
        str(info.value)
        == "no board named 'nosuch' (known: aquila, goni, smdkc210, smdkc210-uart, virt)"
    )


# ------------------------------------------------------------------------------ bad files
GOOD = """\
name = "{name}"
description = "a test board"

[machine]
type = "virt"
cpu = "cortex-a15"
kernel = "armmp-lpae"

[[ram]]
base = 0x40000000
size = "256M"

[[ram]]
base = 0x50000000
size = "128M"

[[reserve]]
label = "the kernel"
start = 0x40000000
size = "32M"

[channel]
kind = "virtio-serial"
name = "org.cma.0"

[cma]
regions = "a=16M;b=1M@0x44000000"
map = "dev=a"
asterisk = "a,b"
"""


def write(tmp_path: Path, text: str, name: str = "test") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("{name}", name), encoding="utf-8")
    return path


@pytest.fixture()
def boards_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CMA_QEMU_BOARDS", str(tmp_path))
    return tmp_path


def test_good_template_loads(boards_dir: Path) -> None:
    write(boards_dir, GOOD)
    board = load_board("test")
    assert board.ram_size == 384 * M and board.asterisk == "a,b"
    assert board.path == boards_dir / "test.toml"
    assert [b.name for b in list_boards()] == [
        "aquila",
        "goni",
        "smdkc210",
        "smdkc210-uart",
        "test",
        "virt",
    ]


def test_env_dir_wins_over_shipped(boards_dir: Path) -> None:
    write(boards_dir, GOOD, "virt")
    assert load_board("virt").path == boards_dir / "virt.toml"
    assert {b.name: b.path for b in list_boards()}["virt"] == boards_dir / "virt.toml"


def test_unknown_board_lists_env_boards(boards_dir: Path) -> None:
    write(boards_dir, GOOD, "mine")
    with pytest.raises(ENOENT, match=r"known: aquila, goni, mine, smdkc210, smdkc210-uart, virt"):
        load_board("nosuch")


def replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


BAD = [
    ("invalid TOML", GOOD + "\n[[[\n", "not valid TOML"),
    ("unknown top key", 'colour = "red"\n' + GOOD, "board: unknown key 'colour'"),
    (
        "unknown machine key",
        replace('cpu = "cortex-a15"', 'cpu = "a15"\nram = 1'),
        "machine: unknown key 'ram'",
    ),
    (
        "unknown ram key",
        replace('size = "256M"', 'size = "256M"\nbank = 1'),
        "ram[0]: unknown key 'bank'",
    ),
    (
        "unknown cma key",
        replace('map = "dev=a"', 'map = "dev=a"\ncma = "x"'),
        "cma: unknown key 'cma'",
    ),
    ("missing machine", replace("[machine]", "[unused]"), "board: unknown key 'unused'"),
    (
        "missing channel table",
        replace('[channel]\nkind = "virtio-serial"\nname = "org.cma.0"\n', ""),
        "channel: missing table",
    ),
    ("missing cma table", GOOD.split("[cma]")[0], "cma: missing table"),
    (
        "machine not a table",
        replace("[machine]\ntype", 'machine = "virt"\n[unused]\ntype'),
        "machine",
    ),
    ("missing name", replace('name = "{name}"\n', ""), "board.name: missing"),
    ("name not a string", replace('name = "{name}"', "name = 5"), "board.name: must be a string"),
    (
        "name != stem",
        replace('name = "{name}"', 'name = "other"'),
        "name: 'other' must match the file name 'test'",
    ),
    (
        "unknown machine",
        replace('type = "virt"', 'type = "vexpress"'),
        "machine.type: 'vexpress' is not supported",
    ),
    ("bad kernel", replace('kernel = "armmp-lpae"', 'kernel = "amd64"'), "machine.kernel"),
    (
        "cpu not a string",
        replace('cpu = "cortex-a15"', "cpu = 15"),
        "machine.cpu: must be a string",
    ),
    (
        "no ram",
        replace('[[ram]]\nbase = 0x50000000\nsize = "128M"\n', "").replace(
            '[[ram]]\nbase = 0x40000000\nsize = "256M"\n', ""
        ),
        "ram: needs at least one [[ram]] bank",
    ),
    (
        "bad size string",
        replace('size = "256M"', 'size = "256Q"'),
        "ram[0].size: '256Q' is not a size",
    ),
    ("size string trailing", replace('size = "256M"', 'size = "256M "'), "ram[0].size"),
    ("size negative", replace('size = "256M"', "size = -4096"), "ram[0].size"),
    (
        "size float",
        replace('size = "256M"', "size = 1.5"),
        "ram[0].size: must be a number or a size string",
    ),
    ("size bool", replace('size = "256M"', "size = true"), "ram[0].size: must be a number"),
    ("missing size", replace('size = "256M"\n', ""), "ram[0].size: missing"),
    (
        "non-page-multiple size",
        replace('size = "256M"', "size = 0x10000001"),
        "ram[0].size: 0x10000001 is not a multiple of the 4 KiB page",
    ),
    (
        "non-page-multiple base",
        replace("base = 0x50000000", "base = 0x50000800"),
        "ram[1].base: 0x50000800 is not a multiple",
    ),
    ("zero size", replace('size = "128M"', "size = 0"), "ram[1]: size must not be 0"),
    (
        "ram not a table",
        replace('[[ram]]\nbase = 0x50000000\nsize = "128M"\n', "").replace(
            "[[ram]]\nbase = 0x40000000", "ram = [5]\n[unused]\nbase = 0x40000000"
        ),
        "ram",
    ),
    (
        "overlapping banks",
        replace("base = 0x50000000", "base = 0x4F000000"),
        "ram: banks at 0x40000000 and 0x4f000000 overlap",
    ),
    (
        "non-contiguous banks on virt",
        replace("base = 0x50000000", "base = 0x60000000"),
        "ram: QEMU virt has one contiguous RAM block",
    ),
    (
        "reserve outside RAM",
        replace("start = 0x40000000", "start = 0x30000000"),
        "reserve[0]: the kernel is not inside RAM",
    ),
    ("reserve missing label", replace('label = "the kernel"\n', ""), "reserve[0].label: missing"),
    (
        "reserve unknown key",
        replace('label = "the kernel"', 'label = "k"\nend = 1'),
        "reserve[0]: unknown key 'end'",
    ),
    ("bad channel kind", replace('kind = "virtio-serial"', 'kind = "pci"'), "channel.kind: 'pci'"),
    ("missing channel name", replace('name = "org.cma.0"\n', ""), "channel.name: missing"),
    (
        "bad regions",
        replace('regions = "a=16M;b=1M@0x44000000"', 'regions = "a=16M;b=1Q"'),
        "cma.regions: at column 10",
    ),
    ("bad map", replace('map = "dev=a"', 'map = "dev"'), "cma.map: at column 4"),
    ("bad asterisk", replace('asterisk = "a,b"', 'asterisk = "a,,b"'), "cma.asterisk: at column"),
    (
        "regions not a string",
        replace('regions = "a=16M;b=1M@0x44000000"', "regions = 5"),
        "cma.regions: must be a string",
    ),
    (
        "asterisk not a string",
        replace('asterisk = "a,b"', "asterisk = []"),
        "cma.asterisk: must be a string",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_board_file(boards_dir: Path, text: str, expected: str) -> None:
    path = write(boards_dir, text)
    with pytest.raises(EINVAL) as info:
        load_board("test")
    error = info.value
    assert error.where == str(path)
    message = str(error)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message.strip()
    with pytest.raises(EINVAL):
        load_board_file(path)
    with pytest.raises(EINVAL):
        list_boards()


def test_uart_required_on_smdkc210(boards_dir: Path) -> None:
    text = replace('type = "virt"', 'type = "smdkc210"')
    write(boards_dir, text)
    with pytest.raises(EINVAL, match=r"channel\.kind: smdkc210 has no virtio bus: use 'uart'"):
        load_board("test")
    # smdkc210 does not need contiguous banks
    text = text.replace('kind = "virtio-serial"', 'kind = "uart"').replace(
        "base = 0x50000000", "base = 0x60000000"
    )
    write(boards_dir, text)
    board = load_board("test")
    assert board.channel.kind == "uart" and board.memory_access == "pmemsave"
    assert board.kernel_flavour == "armmp-lpae"


def test_net_channel(boards_dir: Path) -> None:
    text = replace('type = "virt"', 'type = "smdkc210"').replace(
        "base = 0x50000000", "base = 0x60000000"
    )
    net = text.replace('kind = "virtio-serial"', 'kind = "net"')
    write(boards_dir, net)  # the name is a virtio port name, not an address
    with pytest.raises(EINVAL, match=r"channel\.name: .*must be tcp:A\.B\.C\.D:PORT"):
        load_board("test")
    name = re.search(r'^name = "([^"]*)"$', net[net.index("[channel]") :], re.M)
    assert name is not None
    for bad in ("tcp:10.0.2.100", "tcp:10.0.2.100:0", "tcp:10.0.2.100:70000", "udp:1.2.3.4:5"):
        write(boards_dir, net.replace(f'"{name[1]}"', f'"{bad}"'))
        with pytest.raises(EINVAL, match=r"channel\.name"):
            load_board("test")
    write(boards_dir, net.replace(f'"{name[1]}"', '"tcp:10.0.2.100:1234"'))
    assert load_board("test").channel.kind == "net"
    on_virt = replace('kind = "virtio-serial"', 'kind = "net"')
    write(boards_dir, on_virt.replace(f'"{name[1]}"', '"tcp:10.0.2.100:1234"'))
    with pytest.raises(EINVAL, match=r"channel\.kind: virt has no net channel"):
        load_board("test")


def test_optional_keys_default(boards_dir: Path) -> None:
    text = (
        replace('description = "a test board"\n', "")
        .replace('cpu = "cortex-a15"\n', "")
        .replace('kernel = "armmp-lpae"\n', "")
        .replace('asterisk = "a,b"\n', "")
        .replace('map = "dev=a"\n', "")
        .replace('regions = "a=16M;b=1M@0x44000000"\n', "")
    )
    write(boards_dir, text)
    board = load_board("test")
    assert (board.description, board.cpu, board.kernel_flavour) == ("", None, "armmp-lpae")
    assert (board.regions, board.map, board.asterisk) == ("", "", None)


def test_reserve_not_a_list(boards_dir: Path) -> None:
    block = '[[reserve]]\nlabel = "the kernel"\nstart = 0x40000000\nsize = "32M"\n'
    write(boards_dir, "reserve = 5\n" + replace(block, ""))
    with pytest.raises(EINVAL) as info:
        load_board("test")
    assert "reserve: must be an array of [[reserve]] tables" in str(info.value)


def test_not_utf8(boards_dir: Path) -> None:
    (boards_dir / "test.toml").write_bytes(b'name = "\xff"\n')
    with pytest.raises(EINVAL, match=r"test\.toml"):
        load_board("test")
