"""The device tree the guest boots with: QEMU's own tree, plus one ``/reserved-memory`` child
per early CMA region.

Design choices (docs/design.md's "Device tree" decision, in more detail):

* ``#address-cells``/``#size-cells`` of ``/reserved-memory`` copy the root's. Linux 6.1's
  ``__reserved_mem_check_root()`` ignores the whole node unless both match the root and
  ``ranges`` is present (virt's root is 2/2; Exynos' is 1/1, so "always 2/2" would be wrong).
* Each child has ``reg`` and ``no-map``: that is what keeps the kernel off the range and lets
  ``/dev/mem`` reach it under STRICT_DEVMEM. By default it also gets
  ``compatible = "shared-dma-pool"``: on ARM the kernel then logs "Reserved memory: created DMA
  memory pool at ..." per node (a positive confirmation that the verifier reads) and a guest
  driver under test can bind a range with ``memory-region = <&...>``. The pool is only
  instantiated for a device that references it, so unreferenced nodes stay plain holes. Pass
  ``compatible=None`` to leave the nodes bare.
* The node name carries the region's name, and nothing else does: the reserved-memory binding
  (dtschema's ``shared-dma-pool.yaml``) allows no extra properties. Names are
  ``NAME@HEXSTART`` (unnamed regions: ``cma@HEXSTART``). A node name holds only
  ``[A-Za-z0-9,._+-]`` and starts with a letter or digit; every other character of a region
  name (UTF-8 byte by byte) is written ``,XX`` in hex. Region names never contain ``,`` (it
  separates names in the map), so :func:`region_name` decodes a node name exactly; a name that
  does not start with a letter or digit gets the leader ``cma,,`` (``_x`` is ``cma,,_x``).
  The result may be at most 64 characters (dtschema's limit); a longer one is EINVAL, not a
  truncated name that could clash.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import fdt

from cma_qemu.errors import EADDRINUSE, EINVAL, EIO, ENODEV

__all__ = [
    "RESERVED_MEMORY",
    "Reservation",
    "add_lan9118",
    "add_reserved_memory",
    "drop_uart_dma",
    "dump_qemu_dtb",
    "node_name",
    "region_name",
    "reserved_memory_nodes",
]

#: Path of the node this module adds to.
RESERVED_MEMORY = "/reserved-memory"
#: Reservations as the region layer hands them over: (name or None, start, size).
Reservation = tuple[str | None, int, int]

#: Characters a region name keeps in its node name (besides letters and digits, which may
#: also start it).
_NODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
#: The longest node name before ``@`` that dtschema's dt-core.yaml accepts.
MAX_NODE_NAME = 64
#: The node name of a region without a name.
UNNAMED = "cma"
_ESCAPE = re.compile(r"((?:,[0-9a-f]{2})+)")


#: Starts the node name of a region whose name does not start with a letter or digit (a node
#: name must); ``,,`` never occurs in an escaped name, so it cannot be mistaken for one.
_LEADER = f"{UNNAMED},,"


def _escape(name: str) -> str:
    out = [] if name[:1].isascii() and name[:1].isalnum() else [_LEADER]
    for ch in name:
        if ch in _NODE_CHARS:
            out.append(ch)
        else:
            out.extend(f",{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def node_name(name: str | None, start: int) -> str:
    """``NAME@HEXSTART`` (``cma@HEXSTART`` for unnamed regions), a valid DT node name.

    Characters a node name cannot hold are written ``,XX`` per UTF-8 byte (see the module
    doc); EINVAL if the result is longer than dtschema allows. O(len(name)).
    """
    base = _escape(name) if name else UNNAMED
    if len(base) > MAX_NODE_NAME:
        raise EINVAL(
            f"region name {name!r} needs {len(base)} characters as a device-tree node name "
            f"(at most {MAX_NODE_NAME})",
            where="device tree",
        )
    return f"{base}@{start:x}"


def region_name(node: str) -> str:
    """The region name a :func:`node_name` node carries (``cma`` for an unnamed region).

    The inverse of :func:`node_name` for named regions; the unit address is dropped.
    """
    base = node.partition("@")[0].removeprefix(_LEADER)

    def unescape(match: re.Match[str]) -> str:
        raw = bytes(int(part, 16) for part in match.group(1).split(",")[1:])
        return raw.decode("utf-8", "surrogatepass")

    return _ESCAPE.sub(unescape, base)


def dump_qemu_dtb(
    qemu_args: Sequence[str],
    *,
    qemu: str = "qemu-system-arm",
    timeout: float = 30.0,
) -> bytes:
    """QEMU's generated device tree for a machine, via ``-machine dumpdtb=FILE``.

    ``qemu_args`` must contain exactly one ``-machine``/``-M`` option (the same one the real
    launch uses); ``dumpdtb`` is appended to it so the tree matches that launch (QEMU 7.2 has
    no QMP ``dumpdtb``). QEMU exits right after machine init, so this takes about 0.1 s.
    """
    args = list(qemu_args)
    idx = [i for i, a in enumerate(args) if a in ("-M", "-machine")]
    if len(idx) != 1 or idx[0] + 1 >= len(args):
        raise EINVAL("need exactly one -machine option to dump the device tree", where="qemu")
    with tempfile.TemporaryDirectory(prefix="cma-qemu-dtb-") as tmp:
        out = Path(tmp) / "qemu.dtb"
        args[idx[0] + 1] = f"{args[idx[0] + 1]},dumpdtb={out}"
        try:
            proc = subprocess.run(
                [qemu, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise ENODEV(f"{qemu} not found: install qemu-system-arm", where="qemu") from exc
        except subprocess.TimeoutExpired as exc:
            raise EIO(f"{qemu} did not exit after dumping the device tree", where="qemu") from exc
        if proc.returncode != 0 or not out.exists():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            detail = msg[-1] if msg else f"exit status {proc.returncode}"
            raise EIO(f"dumpdtb failed: {detail}", where="qemu")
        return out.read_bytes()


def _cells(value: int, n: int, what: str) -> list[int]:
    """Big-endian 32-bit cells for ``value`` in ``n`` cells, or EINVAL if it does not fit."""
    if value < 0 or value >= 1 << (32 * n):
        raise EINVAL(f"{what} {value:#x} does not fit in {n} cell(s)", where="device tree")
    return [(value >> (32 * (n - 1 - i))) & 0xFFFFFFFF for i in range(n)]


def _int_prop(node: fdt.Node, name: str, default: int) -> int:
    prop = node.get_property(name)
    return int(prop.value) if prop is not None else default


def add_reserved_memory(
    dtb: bytes,
    reservations: Iterable[Reservation],
    *,
    compatible: str | None = "shared-dma-pool",
) -> bytes:
    """``dtb`` with one ``/reserved-memory`` child (``reg`` + ``no-map``) per reservation.

    An existing ``/reserved-memory`` node is kept and extended (its cells must match the
    root's, or Linux ignores it); reservations overlapping each other or an existing child
    raise EADDRINUSE naming both.
    """
    try:
        tree = fdt.parse_dtb(dtb)
    except Exception as exc:  # the fdt package raises bare Exceptions on bad blobs
        raise EINVAL(f"not a valid DTB: {exc}", where="device tree") from exc
    root = tree.get_node("/")
    acells = _int_prop(root, "#address-cells", 2)
    scells = _int_prop(root, "#size-cells", 1)

    if tree.exist_node(RESERVED_MEMORY):
        rmem = tree.get_node(RESERVED_MEMORY)
        have = (_int_prop(rmem, "#address-cells", -1), _int_prop(rmem, "#size-cells", -1))
        if have != (acells, scells):
            raise EINVAL(
                f"existing /reserved-memory has cells {have}, root has {(acells, scells)}",
                where="device tree",
            )
    else:
        rmem = fdt.Node("reserved-memory")
        rmem.append(fdt.PropWords("#address-cells", acells))
        rmem.append(fdt.PropWords("#size-cells", scells))
        rmem.append(fdt.Property("ranges"))
        root.append(rmem)

    taken = [(n, s, z) for n, s, z in _children(rmem, acells, scells)]
    for name, start, size in reservations:
        if size <= 0:
            raise EINVAL(f"reservation {name or 'cma'} has size {size}", where="device tree")
        for other, ostart, osize in taken:
            if start < ostart + osize and ostart < start + size:
                raise EADDRINUSE(
                    f"{name or 'private region'} {start:#x}-{start + size - 1:#x} overlaps "
                    f"{other} {ostart:#x}-{ostart + osize - 1:#x}",
                    where="device tree",
                )
        child = fdt.Node(node_name(name, start))
        if compatible:
            child.append(fdt.PropStrings("compatible", compatible))
        child.append(
            fdt.PropWords(
                "reg",
                *_cells(start, acells, "start"),
                *_cells(size, scells, "size"),
            )
        )
        child.append(fdt.Property("no-map"))
        rmem.append(child)
        taken.append((child.name, start, size))
    out: bytes = tree.to_dtb(version=17)
    return out


def drop_uart_dma(dtb: bytes, index: int) -> bytes:
    """``dtb`` with the DMA properties of UART ``index`` (``/aliases/serialN``) removed.

    Linux receives over DMA when a Samsung UART node has ``dmas``; QEMU's Exynos4210 model
    emulates no PL330 transfers for it, so a reader gets garbage. Without them the driver
    falls back to interrupt-driven receive, which QEMU does emulate.
    """
    try:
        tree = fdt.parse_dtb(dtb)
    except Exception as exc:  # the fdt package raises bare Exceptions on bad blobs
        raise EINVAL(f"not a valid DTB: {exc}", where="device tree") from exc
    alias = f"serial{index}"
    aliases = tree.get_node("/aliases") if tree.exist_node("/aliases") else None
    target = aliases.get_property(alias) if aliases is not None else None
    if target is None:
        raise ENODEV(f"the device tree has no /aliases/{alias}", where="device tree")
    path = str(target.value)
    if not tree.exist_node(path):
        raise ENODEV(f"/aliases/{alias} points at missing node {path}", where="device tree")
    node = tree.get_node(path)
    for name in ("dmas", "dma-names"):
        if node.exist_property(name):
            node.remove_property(name)
    out: bytes = tree.to_dtb(version=17)
    return out


#: Where QEMU's smdkc210 maps its LAN9215 (``lan9118``, 16-bit) and the GPIO bank whose pin 5
#: is its (inverted) interrupt, external interrupt 5 = GIC SPI 21.
LAN9118_NODE = "/soc/ethernet@5000000"
_LAN9118_BASE = 0x05000000
_GPX0 = "/soc/pinctrl@11000000/gpx0-gpio-bank"
_IRQ_TYPE_LEVEL_LOW = 8


def add_lan9118(dtb: bytes, mac: bytes = bytes.fromhex("525400123456")) -> bytes:
    """``dtb`` (Exynos4210) with a node for QEMU's LAN9215, which its tree lacks.

    Add it only when QEMU has a ``-nic``: without one the driver's probe fails ("Device not
    READY in 100ms"). The interrupt is level-low on ``gpx0`` pin 5 (push-pull, not
    ``smsc,irq-active-high``), as QEMU's smdkc210 wires it; the bank gets a phandle for it.
    """
    try:
        tree = fdt.parse_dtb(dtb)
    except Exception as exc:  # the fdt package raises bare Exceptions on bad blobs
        raise EINVAL(f"not a valid DTB: {exc}", where="device tree") from exc
    if not tree.exist_node(_GPX0):
        raise ENODEV(f"the device tree has no {_GPX0}", where="device tree")
    if tree.exist_node(LAN9118_NODE):
        raise EADDRINUSE(f"the device tree already has {LAN9118_NODE}", where="device tree")
    gpx0 = tree.get_node(_GPX0)
    phandle_prop = gpx0.get_property("phandle")
    if phandle_prop is None:
        used = [
            int(node.get_property("phandle").value)
            for _path, nodes, _props in tree.walk()
            for node in nodes
            if node.exist_property("phandle")
        ]
        root_phandle = tree.root.get_property("phandle")
        if root_phandle is not None:
            used.append(int(root_phandle.value))
        phandle = max(used, default=0) + 1
        gpx0.set_property("phandle", phandle)
    else:
        phandle = int(phandle_prop.value)
    node = fdt.Node("ethernet@5000000")
    node.append(fdt.PropStrings("compatible", "smsc,lan9115"))
    node.append(fdt.PropWords("reg", _LAN9118_BASE, 0x10000))
    node.append(fdt.PropWords("interrupt-parent", phandle))
    node.append(fdt.PropWords("interrupts", 5, _IRQ_TYPE_LEVEL_LOW))
    node.append(fdt.PropWords("reg-io-width", 2))
    node.append(fdt.Property("smsc,irq-push-pull"))
    node.append(fdt.PropStrings("phy-mode", "mii"))
    node.append(fdt.PropBytes("local-mac-address", data=list(mac)))
    tree.get_node("/soc").append(node)
    out: bytes = tree.to_dtb(version=17)
    return out


def _children(rmem: fdt.Node, acells: int, scells: int) -> list[tuple[str, int, int]]:
    """``(node name, start, size)`` of each child of ``rmem`` that has a ``reg``."""
    found = []
    for child in rmem.nodes:
        reg = child.get_property("reg")
        if reg is None:
            continue
        words = [int(w) for w in reg.data]
        step = acells + scells
        for i in range(0, len(words) - step + 1, step):
            start = _join(words[i : i + acells])
            size = _join(words[i + acells : i + step])
            found.append((str(child.name), start, size))
    return found


def _join(words: Sequence[int]) -> int:
    value = 0
    for w in words:
        value = (value << 32) | w
    return value


def reserved_memory_nodes(dtb: bytes) -> list[tuple[str, int, int, bool]]:
    """``(node name, start, size, no_map)`` for every ``/reserved-memory`` child of ``dtb``."""
    tree = fdt.parse_dtb(dtb)
    if not tree.exist_node(RESERVED_MEMORY):
        return []
    rmem = tree.get_node(RESERVED_MEMORY)
    acells = _int_prop(rmem, "#address-cells", 2)
    scells = _int_prop(rmem, "#size-cells", 1)
    out = []
    for name, start, size in _children(rmem, acells, scells):
        node = rmem.get_subnode(name)
        out.append((name, start, size, node.get_property("no-map") is not None))
    return out
