"""``cma-qemu``: the command line.

Every user mistake ends as one line on stderr and a non-zero exit; a traceback means a bug.
Each command lives in the module of its layer: ``offline`` (boards, replay, guest build),
``machine`` (boot, attach, demo), ``qemu_command`` (a command line for a harness) and
``inspect`` (the monitor's client).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Final, NoReturn

from cma_qemu.cli.offline import cmd_boards, cmd_guest_build, cmd_replay
from cma_qemu.errors import CmaError
from cma_qemu.lifecycle import Terminated, signals_interrupt

__all__ = ["ATTRIBUTE_OPTIONS", "join_attribute_values", "main", "parse_args"]

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------- parser
def _lazy(module: str, name: str) -> Handler:
    """``cma_qemu.cli.<module>.<name>``, imported when its command runs: the machine, monitor
    and agent layers (asyncio, QEMU, numpy) add ~0.3 s CPU to every start-up, which
    ``replay`` and ``boards`` never need."""

    def handler(args: argparse.Namespace) -> int:
        command: Handler = getattr(importlib.import_module(f"cma_qemu.cli.{module}"), name)
        return command(args)

    return handler


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in the one-line form of every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cma-qemu: EINVAL: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cma-qemu",
        description="The 2010 Contiguous Memory Allocator for emulated ARM boards.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    boards = commands.add_parser("boards", help="list the board files and their regions")
    boards.add_argument("--json", action="store_true", help="machine-readable output")
    boards.set_defaults(handler=cmd_boards)

    guest = commands.add_parser("guest", help="the guest images (kernel, initramfs, stub)")
    guest_commands = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    build = guest_commands.add_parser(
        "build", help="fetch Debian's armhf kernels and busybox, cross-compile cma-test, pack"
    )
    build.add_argument(
        "flavour", nargs="*", help="kernel flavours to build (default: all: armmp, armmp-lpae)"
    )
    build.add_argument("--cache", help="cache directory (default: $CMA_QEMU_CACHE or ~/.cache)")
    build.set_defaults(handler=cmd_guest_build)
    module = guest_commands.add_parser("module", help="guest kernel modules of your own")
    module_commands = module.add_subparsers(dest="module_command", required=True, metavar="ACTION")
    module_build = module_commands.add_parser(
        "build", help="cross-build DIR (with a Kbuild file) against the guest kernels' headers"
    )
    module_build.add_argument("dir", help="the module's source directory (Kbuild, *.c)")
    module_build.add_argument(
        "--flavour", action="append", help="kernel flavour (repeatable; default: all)"
    )
    module_build.add_argument("--out", metavar="DIR", help="copy the .ko files to DIR/FLAVOUR/")
    module_build.add_argument("--cache", help="cache directory (default: as guest build)")
    module_build.set_defaults(handler=_lazy("guest_module", "cmd_guest_module_build"))

    boot = commands.add_parser(
        "boot", help="boot a board with its CMA regions reserved and serve the guest"
    )
    boot.add_argument("board", nargs="?", help="board name (see `cma-qemu boards`) or board file")
    _attribute_options(boot)
    boot.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR",
        help="restore a `snapshot save` instead of booting (a bare name: in the cache)",
    )
    boot.add_argument("--monitor", metavar="SOCK", help="QMP monitor socket path")
    action = boot.add_mutually_exclusive_group()
    action.add_argument("--run", metavar="CMD", help="run CMD in the guest; exit with its status")
    action.add_argument("--script", metavar="FILE", help="run a cma-test script in the guest")
    boot.add_argument(
        "--timeout", type=float, default=300.0, help="seconds --run/--script may take"
    )
    boot.add_argument("--json", action="store_true", help="print the regions and sockets as JSON")
    boot.add_argument(
        "--put",
        action="append",
        default=[],
        metavar="LOCAL:GUEST",
        help="copy a host file into the guest (mode bits kept) before --run/--script/the "
        "console; repeatable",
    )
    _record_option(boot)
    boot.set_defaults(handler=_lazy("machine", "cmd_boot"))

    snap = commands.add_parser("snapshot", help="saved booted boards, for boot --from")
    snap_commands = snap.add_subparsers(dest="snapshot_command", required=True)
    save = snap_commands.add_parser(
        "save", help="boot BOARD, verify its reservations in the guest, save it to DIR"
    )
    save.add_argument("board", help="board name or board file")
    save.add_argument(
        "dir", help="snapshot directory (a bare name: in ~/.cache/cma-qemu/snapshots)"
    )
    _attribute_options(save)
    save.set_defaults(handler=_lazy("snapshot", "cmd_snapshot_save"))
    snap_list = snap_commands.add_parser("list", help="the snapshots in the cache")
    snap_list.add_argument("--dir", help="list another directory than the cache")
    snap_list.add_argument("--json", action="store_true", help="as JSON")
    snap_list.set_defaults(handler=_lazy("snapshot", "cmd_snapshot_list"))
    snap_rm = snap_commands.add_parser("rm", help="remove snapshots (refuses anything else)")
    snap_rm.add_argument("names", nargs="+", metavar="DIR", help="snapshot directory or name")
    snap_rm.set_defaults(handler=_lazy("snapshot", "cmd_snapshot_rm"))

    att = commands.add_parser(
        "attach", help="serve a QEMU started by someone else, through its QMP and channel sockets"
    )
    att.add_argument("--qmp", required=True, metavar="SOCK", help="QEMU's QMP socket")
    att.add_argument(
        "--channel", required=True, metavar="SOCK", help="the channel's chardev socket"
    )
    att.add_argument("--board", required=True, help="board name or board file")
    _attribute_options(att)
    att.add_argument("--monitor", metavar="SOCK", help="QMP monitor socket path")
    att.add_argument("--json", action="store_true", help="print the regions and sockets as JSON")
    _record_option(att)
    state = att.add_mutually_exclusive_group()
    state.add_argument(
        "--state",
        metavar="FILE",
        help="journal of the agent's state, restored on the next attach "
        "(default: cma-state.journal beside the QMP socket)",
    )
    state.add_argument(
        "--no-state", action="store_true", help="keep no journal (a restart loses the chunks)"
    )
    att.set_defaults(handler=_lazy("machine", "cmd_attach"))

    qcmd = commands.add_parser(
        "qemu-command",
        help="write the patched DTB and RAM file into DIR and print the QEMU command line",
    )
    qcmd.add_argument("board", help="board name (see `cma-qemu boards`) or board file")
    qcmd.add_argument("--cma", metavar="REGIONS", help="regions attribute (like cma=)")
    qcmd.add_argument("--map", help="map attribute (replaces the board's)")
    qcmd.add_argument("--asterisk", metavar="LIST", help="asterisk list (replaces the default)")
    qcmd.add_argument(
        "--dir", required=True, metavar="DIR", help="where the DTB, RAM file and sockets go"
    )
    qcmd.add_argument(
        "--json", action="store_true", help="argv, sockets, regions and the attach command"
    )
    qcmd.add_argument(
        "--no-console",
        action="store_true",
        help="leave out the stdio console (a harness adds its own as the first -serial)",
    )
    qcmd.set_defaults(handler=_lazy("qemu_command", "cmd_qemu_command"))

    ins = commands.add_parser("inspect", help="ask a running agent's monitor (QMP) what it holds")
    ins.add_argument("--monitor", required=True, metavar="SOCK", help="the agent's monitor socket")
    ins.add_argument(
        "what", metavar="WHAT", help="regions, chunks, map, stats, dump ADDR LEN, watch or plot"
    )
    ins.add_argument("operands", nargs="*", help="ADDR LEN for dump")
    ins.add_argument("--json", action="store_true", help="raw monitor replies")
    ins.add_argument("--count", type=int, default=0, help="watch: stop after N events")
    ins.add_argument("--width", type=int, default=64, help="plot: cells per region bar")
    ins.set_defaults(handler=_lazy("inspect", "cmd_inspect"))

    demo = commands.add_parser(
        "demo", help="the main job: boot, allocate from the guest, check from the host, free"
    )
    demo.add_argument("--board", default="virt", help="board to run it on (default: virt)")
    demo.set_defaults(handler=_lazy("demo", "cmd_demo"))

    rep = commands.add_parser(
        "replay", help="run a cma-test script against the framework offline (no QEMU)"
    )
    rep.add_argument("script", help="script file in the cma-test line format, or - for stdin")
    rep.add_argument("--board", help="take RAM, reserved ranges and attributes from a board")
    rep.add_argument("--cma", metavar="REGIONS", help="regions attribute (replaces the board's)")
    rep.add_argument(
        "--ram", metavar="BASE:SIZE", action="append", default=[], help="a RAM bank (repeatable)"
    )
    rep.add_argument("--map", help="map attribute (replaces the board's)")
    rep.add_argument("--asterisk", metavar="LIST", help="asterisk list (replaces the default)")
    rep.add_argument(
        "--allocator",
        action="append",
        metavar="NAME",
        help="replay under this allocator; repeat to compare allocators",
    )
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.set_defaults(handler=cmd_replay)
    return parser


def _attribute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cma", metavar="REGIONS", help="regions attribute (like cma=)")
    parser.add_argument("--map", help="map attribute (replaces the board's)")
    parser.add_argument("--asterisk", metavar="LIST", help="asterisk list (replaces the default)")
    parser.add_argument(
        "--allocator", metavar="NAME", help="put every region on this allocator (bf, bitmap, ...)"
    )


#: Options whose value is an attribute string. Such a string may begin with ``-`` (a first
#: region left out of the asterisk list, like the 2010 Aquila board's ``-mfc_fw=1M/128K;...``),
#: which argparse would take for an option.
ATTRIBUTE_OPTIONS: Final = ("--cma", "--map", "--asterisk")


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands, recursively."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _looks_like_option(token: str, known: Collection[str]) -> bool:
    """A token argparse would take for one of our options (exact, ``--opt=...`` or a prefix)."""
    name = token.split("=", 1)[0]
    if name in known:
        return True
    return name.startswith("--") and len(name) > 2 and any(k.startswith(name) for k in known)


def join_attribute_values(argv: Sequence[str], known: Collection[str]) -> list[str]:
    """``--cma -a=1M`` becomes ``--cma=-a=1M``, so argparse sees a value, not an option.

    A following token that is one of our options (``--cma --json``) is left alone, so a value
    that is really missing keeps argparse's own "expected one argument" error; nothing after
    ``--`` is touched. O(len(argv) x len(known)).
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            out.extend(argv[index:])
            break
        if token in ATTRIBUTE_OPTIONS and index + 1 < len(argv):
            value = argv[index + 1]
            if value.startswith("-") and value != "--" and not _looks_like_option(value, known):
                out.append(f"{token}={value}")
                index += 2
                continue
        out.append(token)
        index += 1
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as the commands see it (a usage mistake exits with status 2)."""
    parser = _parser()
    args = parser.parse_args(join_attribute_values(argv, _option_strings(parser)))
    if args.command == "boot" and args.board is None and args.from_dir is None:
        parser.error("boot: the following arguments are required: board (or --from DIR)")
    return args


def _record_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="write every allocation and free served as a script `cma-qemu replay` runs",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cma-qemu`` console script."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handler: Handler = args.handler
    try:
        with signals_interrupt():  # SIGTERM and SIGHUP unwind like Ctrl-C (cma_qemu.lifecycle)
            return handler(args)
    except CmaError as error:
        print(f"cma-qemu: {error.errno_name}: {error}", file=sys.stderr)
        return 1
    except Terminated as signal:
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            print(f"cma-qemu: terminated by {signal.name}", file=sys.stderr)
        return signal.exit_status
    except KeyboardInterrupt:
        print("cma-qemu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop the flush at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
