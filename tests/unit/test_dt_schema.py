"""Every board's patched device tree passes dtschema's ``dt-validate`` (no boot needed).

The DTB is built the way ``Machine`` builds it before a launch: QEMU's own tree
(``dumpdtb``) on the virt boards, the guest image's Exynos tree on the smdkc210 boards (with
the UARTs' DMA dropped, and on ``smdkc210``, whose channel is the net one, the LAN9215's node
added), then one ``/reserved-memory`` child per region the board file places.

Two runs, each over all five DTBs:

* with ``-l reserved-memory`` (only the reserved-memory bindings, ``shared-dma-pool.yaml``
  among them): no report at all, nothing filtered;
* with every schema dtschema ships: what is left after :data:`NO_BINDING` must be empty.
  Those filters cover only nodes the agent does not write (QEMU's or the kernel's own) and
  two untyped properties of the NIC node it adds on smdkc210, for bindings that live in the
  Linux tree rather than in dtschema, so dtschema cannot type them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import fdt
import pytest

from cma_qemu.boards import Board, load_board
from cma_qemu.configuration import build_cma
from cma_qemu.guest_image import find_guest
from cma_qemu.machine.devicetree import (
    RESERVED_MEMORY,
    add_lan9118,
    add_reserved_memory,
    drop_uart_dma,
    dump_qemu_dtb,
    node_name,
)
from cma_qemu.machine.launch import console_device, machine_args

BOARDS = ["virt", "aquila", "goni", "smdkc210", "smdkc210-uart"]
#: Installed with the package's ``test`` extra, next to this interpreter.
DT_VALIDATE = Path(sys.executable).with_name("dt-validate")


@dataclass(frozen=True)
class NoBinding:
    """Reports to drop: on ``node`` (a regex on the node path), whose message matches."""

    node: str
    message: str
    reason: str


#: dtschema's untyped-property report: the property's binding is not among its schemas.
UNTYPED = r"""^b(['"]).*\1 is not of type 'object', 'integer', 'array', 'boolean', 'null'$"""

NO_BINDING: dict[str, list[NoBinding]] = {
    "virt": [
        NoBinding("^/psci$", UNTYPED, "QEMU's PSCI node: arm,psci binding is in Linux"),
        NoBinding("^/gpio-keys/poweroff$", UNTYPED, "QEMU's gpio-keys: binding is in Linux"),
        NoBinding("^/flash@0$", UNTYPED, "QEMU's cfi-flash: mtd bindings are in Linux"),
    ],
    "smdkc210-uart": [
        # The whole tree is Debian's exynos4210-smdkv310.dtb (the kernel's, not ours): the
        # Samsung, thermal, pinctrl, keypad, cache and CPU bindings all live in Linux.
        NoBinding(
            r"^/(?!reserved-memory(/|$)|soc/ethernet@)",
            UNTYPED,
            "the kernel's Exynos nodes: Linux bindings",
        ),
        NoBinding(
            "^/soc$",
            r"^'ranges' is a required property$",
            "the kernel's simple-bus holds opp tables and a phy without 'ranges'",
        ),
        NoBinding(
            "^/soc/camera$",
            r"^'camera' does not match ",
            "the kernel's samsung,fimc container is named 'camera', not '*-bus'",
        ),
    ],
}
NO_BINDING["aquila"] = NO_BINDING["goni"] = NO_BINDING["virt"]
#: smdkc210 (net channel): the same tree plus the agent's LAN9215 node, whose
#: ``smsc,lan9115`` and ``ethernet-controller`` bindings live in Linux too.
NO_BINDING["smdkc210"] = [
    *NO_BINDING["smdkc210-uart"],
    NoBinding(
        "^/soc/ethernet@5000000$",
        r"^b'(mii|RT).*' is not of type",
        "the LAN9215's phy-mode and local-mac-address: ethernet-controller binding is in Linux",
    ),
]
Report = dict[str, object]


def board_dtb(board: Board) -> tuple[bytes, list[tuple[str | None, int, int]]]:
    """The DTB a launch of ``board`` would boot (as ``Machine`` prepares it) and its regions."""
    cma = build_cma(board=board, regions=None, map_text=None, asterisk=None, allocator=None)
    reservations = [(r.name, r.start, r.size) for r in cma.regions]
    if board.machine_type == "virt":
        dtb = dump_qemu_dtb(machine_args(board, None))
    else:
        image = find_guest(board.kernel_flavour)
        assert image.dtb is not None, "the guest image has no device tree"
        dtb = Path(image.dtb).read_bytes()
        uarts = [f"/dev/{console_device(board)}"]
        if board.channel.kind == "uart":
            uarts.append(board.channel.name)
        for device in uarts:  # as Machine does: these UARTs receive through the FIFO only
            match = re.fullmatch(r"/dev/tty[A-Za-z]*?(\d+)", device)
            assert match is not None, device
            dtb = drop_uart_dma(dtb, int(match[1]))
        if board.channel.kind == "net":
            dtb = add_lan9118(dtb)
    return add_reserved_memory(dtb, reservations), reservations


def validate(dtbs: dict[str, bytes], tmp_path: Path, *limit: str) -> dict[str, list[Report]]:
    """dt-validate's reports (its JSON diagnostics) per board, from one run over all DTBs.

    One run: dt-validate spends most of its time loading the schemas.
    """
    paths = {}
    for board, dtb in dtbs.items():
        paths[board] = tmp_path / f"{board}.dtb"
        paths[board].write_bytes(dtb)
    report = tmp_path / "report.json"
    args = [str(DT_VALIDATE), "--json-output", str(report)]
    if limit:
        args += ["-l", ":".join(limit)]
    proc = subprocess.run(
        [*args, *map(str, paths.values())], capture_output=True, text=True, check=False
    )
    assert report.exists(), proc.stderr
    reports: list[Report] = json.loads(report.read_text())
    # the JSON and the human output agree (the run did look at the trees)
    assert len(reports) == proc.stderr.count("\n\tfrom schema $id:"), proc.stderr
    by_board: dict[str, list[Report]] = {board: [] for board in dtbs}
    for item in reports:
        by_board[Path(str(item["file"])).stem].append(item)
    return by_board


def unexplained(board: str, reports: list[Report]) -> tuple[list[str], list[str]]:
    """(reports no filter explains, filters that explain nothing) for ``board``."""
    left, used = [], set()
    for report in reports:
        node, message = str(report["node"]), str(report["message"])
        hits = [
            i
            for i, f in enumerate(NO_BINDING[board])
            if re.search(f.node, node) and re.search(f.message, message)
        ]
        used.update(hits)
        if not hits:
            left.append(f"{node}: {message} ({report['schema']})")
    unused = [f.reason for i, f in enumerate(NO_BINDING[board]) if i not in used]
    return left, unused


Reservations = list[tuple[str | None, int, int]]


@dataclass(frozen=True)
class Validated:
    """Every board's patched DTB, its regions, and dt-validate's reports on it."""

    dtbs: dict[str, bytes]
    reservations: dict[str, Reservations]
    reserved_memory: dict[str, list[Report]]  # with -l reserved-memory
    everything: dict[str, list[Report]]  # with all of dtschema's schemas


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Validated:
    dtbs, reservations = {}, {}
    for board in BOARDS:
        dtbs[board], reservations[board] = board_dtb(load_board(board))
    tmp = tmp_path_factory.mktemp("dtbs")
    return Validated(
        dtbs,
        reservations,
        validate(dtbs, tmp, "reserved-memory"),
        validate(dtbs, tmp),
    )


@pytest.mark.parametrize("board", BOARDS)
def test_reserved_memory_bindings_pass(validated: Validated, board: str) -> None:
    reservations = validated.reservations[board]
    assert reservations
    tree = fdt.parse_dtb(validated.dtbs[board])
    for name, start, _ in reservations:  # the nodes are there, carrying the names
        assert tree.exist_node(f"{RESERVED_MEMORY}/{node_name(name, start)}")
    assert validated.reserved_memory[board] == []


@pytest.mark.parametrize("board", BOARDS)
def test_whole_tree_has_only_the_listed_reports(validated: Validated, board: str) -> None:
    reports = validated.everything[board]
    assert unexplained(board, reports) == ([], [])  # and every filter is still needed
    assert not [r for r in reports if str(r["node"]).startswith(RESERVED_MEMORY)]


def test_the_check_can_fail(validated: Validated, tmp_path: Path) -> None:
    """A property the binding does not allow (what nodes carried before) is reported."""
    broken, nodes = {}, {}
    for board in ("virt", "smdkc210"):  # 2/2 and 1/1 cells
        tree = fdt.parse_dtb(validated.dtbs[board])
        name, start, _ = validated.reservations[board][0]
        nodes[board] = f"{RESERVED_MEMORY}/{node_name(name, start)}"
        tree.get_node(nodes[board]).append(fdt.PropStrings("cma-qemu,name", name or "cma"))
        broken[board] = tree.to_dtb(version=17)
    for board, reports in validate(broken, tmp_path, "reserved-memory").items():
        assert [(r["node"], r["schema"]) for r in reports] == [
            (nodes[board], "http://devicetree.org/schemas/reserved-memory/shared-dma-pool.yaml")
        ]
        assert "'cma-qemu,name' was unexpected" in str(reports[0]["message"])
        assert unexplained(board, reports)[0]  # and no filter hides it
