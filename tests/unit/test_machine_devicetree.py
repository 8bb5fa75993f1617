"""/reserved-memory patching: round trip through the fdt package and through dtc."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import fdt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.errors import EADDRINUSE, EINVAL, ENODEV
from cma_qemu.machine.devicetree import (
    add_reserved_memory,
    drop_uart_dma,
    dump_qemu_dtb,
    node_name,
    region_name,
    reserved_memory_nodes,
)

MiB = 1 << 20


def base_dtb(acells: int = 2, scells: int = 2, *, rmem: bool = False) -> bytes:
    tree = fdt.FDT()
    tree.header.version = 17
    tree.root.append(fdt.PropWords("#address-cells", acells))
    tree.root.append(fdt.PropWords("#size-cells", scells))
    tree.root.append(fdt.PropStrings("compatible", "linux,dummy-virt"))
    mem = fdt.Node("memory@40000000")
    mem.append(fdt.PropStrings("device_type", "memory"))
    reg = [0] * (acells - 1) + [0x40000000] + [0] * (scells - 1) + [0x20000000]
    mem.append(fdt.PropWords("reg", *reg))
    tree.root.append(mem)
    if rmem:
        node = fdt.Node("reserved-memory")
        node.append(fdt.PropWords("#address-cells", acells))
        node.append(fdt.PropWords("#size-cells", scells))
        node.append(fdt.Property("ranges"))
        child = fdt.Node("region-mfc-left")
        child.append(fdt.PropStrings("compatible", "shared-dma-pool"))
        child.append(fdt.PropWords("size", 0x2400000))
        node.append(child)
        fixed = fdt.Node("fw@5f000000")
        fixed.append(fdt.PropWords("reg", *([0] * (acells - 1)), 0x5F000000,
                                   *([0] * (scells - 1)), MiB))  # fmt: skip
        node.append(fixed)
        tree.root.append(node)
    data: bytes = tree.to_dtb(version=17)
    return data


def dtc_dts(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "x.dtb"
    path.write_bytes(data)
    proc = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout


def test_round_trip_2_2_cells(tmp_path: Path) -> None:
    out = add_reserved_memory(
        base_dtb(), [("mfc_b1", 0x50000000, 16 * MiB), (None, 0x52000000, MiB)]
    )
    assert reserved_memory_nodes(out) == [
        ("mfc_b1@50000000", 0x50000000, 16 * MiB, True),
        ("cma@52000000", 0x52000000, MiB, True),
    ]
    dts = dtc_dts(out, tmp_path)
    assert "reserved-memory {" in dts
    assert "#address-cells = <0x02>;" in dts
    assert "ranges;" in dts
    assert "mfc_b1@50000000 {" in dts
    assert "reg = <0x00 0x50000000 0x00 0x1000000>;" in dts
    assert "cma@52000000 {" in dts
    assert dts.count("no-map;") == 2
    assert 'compatible = "shared-dma-pool";' in dts
    assert "cma-qemu" not in dts  # the node name carries the region name (the binding)
    # the rest of the tree survives
    assert "memory@40000000" in dts


def test_root_cells_are_copied_1_1(tmp_path: Path) -> None:
    out = add_reserved_memory(base_dtb(1, 1), [("fimc", 0x64000000, 16 * MiB)], compatible=None)
    dts = dtc_dts(out, tmp_path)
    assert "#address-cells = <0x01>;" in dts.split("reserved-memory {")[1]
    assert "reg = <0x64000000 0x1000000>;" in dts
    assert "compatible" not in dts.split("reserved-memory {")[1]


def test_existing_node_is_extended(tmp_path: Path) -> None:
    out = add_reserved_memory(base_dtb(1, 1, rmem=True), [("a", 0x50000000, MiB)])
    names = [n for n, *_ in reserved_memory_nodes(out)]
    assert names == ["fw@5f000000", "a@50000000"]
    dts = dtc_dts(out, tmp_path)
    assert "region-mfc-left" in dts
    with pytest.raises(EADDRINUSE, match="overlaps fw@5f000000"):
        add_reserved_memory(base_dtb(1, 1, rmem=True), [("b", 0x5F0FF000, 0x2000)])


def test_overlapping_reservations() -> None:
    with pytest.raises(EADDRINUSE, match="b 0x50800000-0x517fffff overlaps a@50000000"):
        add_reserved_memory(base_dtb(), [("a", 0x50000000, 16 * MiB), ("b", 0x50800000, 16 * MiB)])


def test_values_must_fit_the_cells() -> None:
    with pytest.raises(EINVAL, match="does not fit in 1 cell"):
        add_reserved_memory(base_dtb(1, 1), [("hi", 0x1_0000_0000, MiB)])
    with pytest.raises(EINVAL, match="size 0"):
        add_reserved_memory(base_dtb(), [("z", 0x50000000, 0)])


def test_bad_blob() -> None:
    with pytest.raises(EINVAL, match="not a valid DTB"):
        add_reserved_memory(b"nonsense" * 10, [])


def test_mismatched_existing_cells() -> None:
    tree = fdt.parse_dtb(base_dtb(2, 2, rmem=True))
    tree.get_node("/reserved-memory").set_property("#size-cells", 1)
    with pytest.raises(EINVAL, match="cells"):
        add_reserved_memory(tree.to_dtb(version=17), [("a", 0x50000000, MiB)])


def test_node_names() -> None:
    assert node_name("mfc_fw", 0x5F000000) == "mfc_fw@5f000000"
    assert node_name(None, 0x40000000) == "cma@40000000"
    assert node_name("a b/c", 0x1000) == "a,20b,2fc@1000"
    assert node_name("_x", 0x1000) == "cma,,_x@1000"  # a node name starts with a letter or digit
    assert node_name("/", 0x1000) == "cma,,,2f@1000"
    assert region_name("cma,,_x@1000") == "_x"
    assert node_name("mfc-b1.2+x_y", 0x1000) == "mfc-b1.2+x_y@1000"
    assert node_name("aé", 0x1000) == "a,c3,a9@1000"
    assert region_name("a,20b,2fc@1000") == "a b/c"
    assert region_name("cma@40000000") == "cma"
    assert node_name("x" * 64, 0) == "x" * 64 + "@0"
    with pytest.raises(EINVAL, match="needs 65 characters"):
        node_name("x" * 65, 0)
    with pytest.raises(EINVAL, match="needs 66 characters"):
        node_name("x" * 63 + " ", 0)


# What the regions attribute accepts as a name: printable, no whitespace, none of ",;*=".
region_names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Z"), blacklist_characters=",;*="),
    min_size=1,
    max_size=20,
).filter(lambda name: name.isprintable() and not any(ch.isspace() for ch in name))


@given(name=region_names, start=st.integers(0, 2**64 - 1))
def test_node_names_round_trip(name: str, start: int) -> None:
    try:
        node = node_name(name, start)
    except EINVAL:
        assert len(name.encode()) * 3 + 5 > 64  # only names that cannot fit are refused
        return
    base, _, unit = node.partition("@")
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9,+\-._]{0,63}", base), node  # dt-core.yaml
    assert int(unit, 16) == start
    assert region_name(node) == name


def test_dump_qemu_dtb_and_patch(tmp_path: Path) -> None:
    dtb = dump_qemu_dtb(["-M", "virt", "-cpu", "cortex-a15", "-m", "256M", "-nodefaults",
                         "-display", "none"])  # fmt: skip
    out = add_reserved_memory(dtb, [("x", 0x48000000, 4 * MiB)])
    assert len(out) < len(dtb)  # QEMU's blob has 1 MiB of free space; ours is packed
    dts = dtc_dts(out, tmp_path)
    assert "x@48000000" in dts
    assert "reg = <0x00 0x40000000 0x00 0x10000000>;" in dts  # 256 MiB of memory


def test_dump_needs_one_machine_option() -> None:
    with pytest.raises(EINVAL):
        dump_qemu_dtb(["-m", "256M"])


def _tree_with_uarts() -> bytes:
    tree = fdt.FDT()
    aliases = fdt.Node("aliases")
    for index in range(2):
        uart = fdt.Node(f"serial@138{index}0000")
        uart.append(fdt.PropWords("dmas", 7, index))
        uart.append(fdt.PropStrings("dma-names", "rx", "tx"))
        uart.append(fdt.PropStrings("compatible", "samsung,exynos4210-uart"))
        tree.root.append(uart)
        aliases.append(fdt.PropStrings(f"serial{index}", f"/serial@138{index}0000"))
    tree.root.append(aliases)
    blob: bytes = tree.to_dtb(version=17)
    return blob


def test_drop_uart_dma_only_touches_that_uart() -> None:
    tree = fdt.parse_dtb(drop_uart_dma(_tree_with_uarts(), 1))
    one = tree.get_node("/serial@13810000")
    zero = tree.get_node("/serial@13800000")
    assert not one.exist_property("dmas") and not one.exist_property("dma-names")
    assert one.exist_property("compatible")
    assert zero.exist_property("dmas") and zero.exist_property("dma-names")


def test_drop_uart_dma_needs_the_alias() -> None:
    with pytest.raises(ENODEV, match="no /aliases/serial3"):
        drop_uart_dma(_tree_with_uarts(), 3)
