"""labgrid integration: ``CmaQemuDriver`` (a ``QEMUDriver``) and ``CmaQemuStrategy``.

labgrid has no entry-point discovery for drivers: an env file loads this module through
``imports: [cma_qemu.labgrid]``, and the ``@target_factory.reg_driver`` decorators below make
the two classes known by name. labgrid owns QEMU (its own QMP on stdio, the console on a
socket it listens on); this driver only supplies the command line that ``cma-qemu
qemu-command`` prints, minus the stdio console, and attaches the agent to the QEMU labgrid
started, through the QMP and channel sockets in a private directory.

On a remote host (a farm): bound to a ``NetworkService`` (an exporter's, through a
``RemotePlace``), the driver runs ``cma-qemu qemu-command`` and then QEMU on that host over
ssh: QMP on ssh's stdio as labgrid expects, the console socket forwarded back with ``ssh -R``
(QEMU connects to it), and ``cma-qemu attach`` on the host with its monitor forwarded here
with ``ssh -L``; ``monitor_path`` is then the local end, and ``agent`` does not exist here.
Keys for it: ``keyfile`` (ssh identity) and ``remote_cma_qemu`` (the command on the host).

A client killed without deactivating (SIGKILL) leaves nothing running: QEMU and its ssh get
``PR_SET_PDEATHSIG`` (``setpriv --pdeathsig``, util-linux) here when ``on()`` runs in the main
thread, and QEMU and ``cma-qemu attach`` get it on the host, where their parent is the ssh
session that ends with the connection. The directories (the guest RAM file) name their owner,
the client here and QEMU on the host (``cma_qemu/machine/rundir.py``): the next ``cma-qemu
attach`` on the host (the next board there) sweeps the host's, any cma-qemu start here ours.

Env keys: ``board`` (default ``virt``), ``regions``, ``map``, ``asterisk``, ``allocator``, and
QEMUDriver's own: ``qemu_bin`` (a ``tools`` key or a program), ``extra_args`` (appended) and
``boot_args`` (appended to the kernel command line). ``machine``, ``cpu`` and ``memory`` come
from the board file, so they are optional here and must match it when given; the image keys
(``kernel``, ``dtb``, ``disk``, ...) are refused: the guest is this project's.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attr

from cma_qemu.agent import Agent
from cma_qemu.boards import Board, load_board
from cma_qemu.configuration import build_cma
from cma_qemu.errors import EINVAL, EIO, ENODEV
from cma_qemu.first_json import read_first_json
from cma_qemu.loop_thread import LoopThread
from cma_qemu.machine import rundir
from cma_qemu.machine.launch import QEMU, PreparedLaunch, kernel_cmdline, prepare_launch
from cma_qemu.pytest_plugin import SyncAgent

try:
    from labgrid.driver import QEMUDriver  # type: ignore[import-untyped]
    from labgrid.factory import target_factory  # type: ignore[import-untyped]
    from labgrid.step import step  # type: ignore[import-untyped]
    from labgrid.strategy import Strategy, StrategyError  # type: ignore[import-untyped]
    from labgrid.strategy.common import never_retry  # type: ignore[import-untyped]
except ImportError as error:  # pragma: no cover - the extra is not installed
    raise ENODEV(
        f"labgrid is not installed ({error}): pip install 'cma-qemu[labgrid]'", where="labgrid"
    ) from error

__all__ = ["CmaQemuDriver", "CmaQemuStrategy"]

_optional_str = attr.validators.optional(attr.validators.instance_of(str))
#: QEMUDriver keys that name images: the board's guest replaces them.
_IMAGE_KEYS = ("kernel", "disk", "rootfs", "dtb", "flash", "bios")
_LABGRID_SERIAL = "chardev:serialsocket"
#: Sockets of the host's directory that QEMU and the attach make again at every ``on()``.
_REMOTE_SOCKETS = ("qmp.sock", "channel.sock", "monitor.sock", "console.sock")


@target_factory.reg_driver
@attr.s(eq=False)
class CmaQemuDriver(QEMUDriver):  # type: ignore[misc]
    """A QEMU board with CMA regions reserved, served by an attached agent while it is on.

    ``agent`` (a :class:`~cma_qemu.pytest_plugin.SyncAgent`) exists between ``on()`` and
    ``off()``. ``off()`` detaches the agent, has labgrid quit QEMU and removes the guest RAM
    file; deactivating the driver removes its directory. Cost of ``on()``: QEMU start plus an
    attach (a few QMP round trips); activation runs one QEMU ``dumpdtb`` (about 0.1 s).
    """

    # QEMUDriver's mandatory keys, made optional: the board file has them.
    qemu_bin: str = attr.ib(default=QEMU, validator=attr.validators.instance_of(str))
    machine: str | None = attr.ib(default=None, validator=_optional_str)
    cpu: str | None = attr.ib(default=None, validator=_optional_str)
    memory: str | None = attr.ib(default=None, validator=_optional_str)
    board: str = attr.ib(default="virt", validator=attr.validators.instance_of(str))
    regions: str | None = attr.ib(default=None, validator=_optional_str)
    map: str | None = attr.ib(default=None, validator=_optional_str)
    asterisk: str | None = attr.ib(default=None, validator=_optional_str)
    allocator: str | None = attr.ib(default=None, validator=_optional_str)
    keyfile: str = attr.ib(default="", validator=attr.validators.instance_of(str))
    remote_cma_qemu: str = attr.ib(default="cma-qemu", validator=attr.validators.instance_of(str))
    _cmd: list[str]  # QEMUDriver's argv, set by its on_activate; what its on() starts
    _child: Any  # QEMUDriver's QEMU process (subprocess.Popen)
    _clientsocket: Any  # QEMUDriver's end of the console socket

    #: A ``NetworkService`` makes the board run on that host (over ssh); without one, here.
    bindings = {"host": {"NetworkService", None}}  # noqa: RUF012

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._cma_board: Board | None = None
        self._cma_dir: Path | None = None
        self._cma_launch: PreparedLaunch | None = None
        self._cma_loop: LoopThread | None = None
        self._cma_agent: SyncAgent | None = None
        self._cma_cleanup: Callable[[], None] | None = None
        self._remote_dir: str | None = None
        self._remote_info: dict[str, Any] | None = None
        self._remote_agent: subprocess.Popen[str] | None = None
        self._qemu_argv: list[str] = []  # what on() starts: QEMU, or its ssh to the host

    # -- what labgrid runs ----------------------------------------------------------------

    def _check_keys(self, board: Board) -> None:
        for key in _IMAGE_KEYS:
            if getattr(self, key) is not None:
                raise EINVAL(f"{key!r} is set by board {board.name!r}; leave it out", where=key)
        total = sum(bank.size for bank in board.ram)
        expected = {"machine": board.machine_type, "cpu": board.cpu}
        if self.machine is not None and self.machine != expected["machine"]:
            raise EINVAL(f"board {board.name} is machine {board.machine_type}", where="machine")
        if self.cpu is not None and self.cpu != expected["cpu"]:
            raise EINVAL(f"board {board.name} has cpu {board.cpu}", where="cpu")
        if self.memory is not None and self.memory != f"{total >> 20}M":
            raise EINVAL(f"board {board.name} has {total >> 20}M of RAM", where="memory")

    def get_qemu_base_args(self) -> list[str]:
        """This project's QEMU argv for the board, without the stdio console labgrid replaces.

        Writes the patched DTB (and the RAM file, on virt) into the driver's directory; a
        region on the kernel raises ``EADDRINUSE`` here, as ``cma-qemu boot`` would.
        """
        board = self._cma_board = load_board(self.board)
        self._check_keys(board)
        cma = build_cma(
            board=board,
            regions=self.regions,
            map_text=self.map,
            asterisk=self.asterisk,
            allocator=self.allocator,
        )
        if self._cma_dir is None:
            raise EIO("the driver is not active", where="labgrid")
        if self.host is not None:
            return self._remote_base_args(board)
        qemu = self.target.env.config.get_tool(self.qemu_bin) if self.target.env else None
        launch = prepare_launch(
            board,
            [(r.name, r.start, r.size) for r in cma.regions],
            self._cma_dir,
            console=False,
            qemu=str(qemu or self.qemu_bin),
        )
        self._cma_launch = launch
        argv = list(launch.argv)
        if self.boot_args:
            index = argv.index("-append") + 1
            argv[index] = kernel_cmdline(board, [self.boot_args])
        return [*argv, *shlex.split(self.extra_args or "")]

    def on_activate(self) -> None:
        # Named after this process: the next cma-qemu start sweeps it if this one is killed.
        self._cma_dir = rundir.create(tempfile.gettempdir(), prefix="cma-qemu-labgrid-")
        directory = self._cma_dir
        self._cma_cleanup = lambda: shutil.rmtree(directory, ignore_errors=True)
        atexit.register(self._cma_cleanup)
        try:
            super().on_activate()
        except BaseException:
            self._undo_labgrid_activate()
            self._remove_dir()
            raise
        self._cmd = _console_first(self._cmd)
        if self.host is not None:
            self._cmd = self._over_ssh(self._cmd)
        self._qemu_argv = list(self._cmd)

    def on_deactivate(self) -> None:
        try:
            super().on_deactivate()
        finally:
            try:
                if self._remote_dir is not None:
                    self._ssh_run(["rm", "-rf", self._remote_dir])
            finally:
                self._remote_dir = self._remote_info = None
                self._remove_dir()

    @step()  # type: ignore[untyped-decorator]
    def on(self) -> None:
        """Start QEMU (labgrid), then attach the agent to it."""
        if self.status:
            return
        self._cmd = _dies_with_this_thread(self._qemu_argv)
        super().on()
        if self.host is not None:
            try:
                self._attach_remote()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.off()
                raise
            return
        launch, board = self._cma_launch, self._cma_board
        assert launch is not None and board is not None
        loop = LoopThread()
        try:
            agent = loop.run(
                Agent.attach(
                    board,
                    launch.files.qmp_socket,
                    launch.files.channel_socket,
                    regions=self.regions,
                    map_text=self.map,
                    asterisk=self.asterisk,
                    allocator=self.allocator,
                    journal=False,  # the agent lives exactly as long as this QEMU
                ),
                120,
            )
        except BaseException:
            loop.stop()
            with contextlib.suppress(Exception):
                super().off()
            raise
        self._cma_loop, self._cma_agent = loop, SyncAgent(agent, loop)

    @step()  # type: ignore[untyped-decorator]
    def off(self) -> None:
        """Detach the agent, quit QEMU and remove the guest RAM file."""
        try:
            self._detach()
        finally:
            try:
                if self.status and self.host is not None:
                    self._quit_remote()
                elif self.status:
                    super().off()
            finally:
                self._stop_remote_agent()
                launch, info = self._cma_launch, self._remote_info
                if info is not None and self._remote_dir is not None:
                    # QEMU is gone: its owner file and sockets too, or a sweep on the host
                    # would take the directory (the DTB) before the next on().
                    names = (rundir.OWNER_FILE, *_REMOTE_SOCKETS)
                    paths = [f"{self._remote_dir}/{name}" for name in names]
                    self._ssh_run(["rm", "-f", *paths, *([info["ram"]] if info["ram"] else [])])
                elif launch is not None and launch.files.ram_file is not None:
                    with contextlib.suppress(FileNotFoundError):
                        launch.files.ram_file.unlink()  # QEMU recreates it on the next on()

    @property
    def agent(self) -> SyncAgent:
        """The agent serving this QEMU (between ``on()`` and ``off()``; local boards only)."""
        if self.host is not None:
            raise EIO(f"the agent runs on {self.host.address}: use monitor_path", where="labgrid")
        if self._cma_agent is None:
            raise EIO("the board is off: no agent", where="labgrid")
        return self._cma_agent

    @property
    def monitor_path(self) -> str:
        """The agent's QMP monitor socket here (a forward of the host's, on a remote board)."""
        if self.host is not None:
            if self._remote_agent is None or self._cma_dir is None:
                raise EIO("the board is off: no agent", where="labgrid")
            return str(self._cma_dir / "monitor.sock")
        return self.agent.monitor_path

    # -- a board on another host ------------------------------------------------------------

    def _ssh(self, *options: str) -> list[str]:
        """``ssh`` to the bound host (no tty, no prompts, no known_hosts writes)."""
        host = self.host
        argv = ["ssh", "-T", "-p", str(host.port), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        if self.keyfile:
            keyfile = self.keyfile
            if self.target.env:
                keyfile = self.target.env.config.resolve_path(keyfile)
            argv += ["-i", os.path.expanduser(keyfile), "-o", "IdentitiesOnly=yes"]
        return [*argv, *options, f"{host.username}@{host.address}"]

    def _ssh_run(self, command: Sequence[str], timeout: float = 120) -> str:
        """Run ``command`` on the host; its stdout (EIO with its stderr if it fails)."""
        result = subprocess.run(
            [*self._ssh(), "--", shlex.join(command)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise EIO(f"on {self.host.address}: {shlex.join(command)}: {last}", where="labgrid")
        return result.stdout

    def _attribute_args(self) -> list[str]:
        pairs = (("--cma", self.regions), ("--map", self.map), ("--asterisk", self.asterisk))
        return [f"{option}={value}" for option, value in pairs if value is not None]

    def _remote_base_args(self, board: Board) -> list[str]:
        """``cma-qemu qemu-command`` on the host, into a directory of its own there."""
        directory = f"/tmp/cma-qemu-labgrid-{secrets.token_hex(8)}"
        out = self._ssh_run(
            [self.remote_cma_qemu, "qemu-command", board.name, "--dir", directory, "--json",
             "--no-console", *self._attribute_args()]
        )  # fmt: skip
        self._remote_dir, self._remote_info = directory, json.loads(out)
        argv = list(self._remote_info["argv"])
        if self.boot_args:
            argv[argv.index("-append") + 1] = kernel_cmdline(board, [self.boot_args])
        return [*argv, *shlex.split(self.extra_args or "")]

    def _over_ssh(self, argv: list[str]) -> list[str]:
        """labgrid's QEMU argv run on the host, its console socket forwarded back here.

        QEMU connects (``reconnect=1``: until the forward is up) to a socket in the host's
        directory that ``ssh -R`` forwards to the one labgrid listens on; QMP stays on stdio.
        """
        remote = f"{self._remote_dir}/console.sock"
        local = None
        out = list(argv)
        for index, arg in enumerate(out):
            if arg.startswith("socket,id=serialsocket,path="):
                local = arg.split("path=", 1)[1]
                out[index] = f"socket,id=serialsocket,path={remote},reconnect=1"
        if local is None:
            raise EIO("labgrid's console socket is not in QEMU's arguments", where="labgrid")
        forward = ["-R", f"{remote}:{local}", "-o", "ExitOnForwardFailure=yes"]
        owner = shlex.quote(f"{self._remote_dir}/{rundir.OWNER_FILE}")
        # The shell's pid and start time are QEMU's after the execs: it owns the directory.
        claim = (
            f'read -r stat < /proc/$$/stat && set -- ${{stat##*)}} && echo "$$ ${{20}}" >{owner}'
        )
        return [*self._ssh(*forward), "--", f"{claim} && {_dies_with_parent(out)}"]

    def _attach_remote(self) -> None:
        """``cma-qemu attach`` on the host; its monitor forwarded to ``monitor_path``."""
        info, directory = self._remote_info, self._cma_dir
        assert info is not None and directory is not None and self._remote_dir is not None
        remote_monitor = f"{self._remote_dir}/monitor.sock"
        local_monitor = directory / "monitor.sock"
        with contextlib.suppress(FileNotFoundError):
            local_monitor.unlink()
        command = [
            self.remote_cma_qemu, "attach", "--board", str(info["board"]),
            "--qmp", str(info["qmp"]), "--channel", str(info["channel"]),
            "--monitor", remote_monitor, "--json", *self._attribute_args(),
        ]  # fmt: skip
        if self.allocator:
            command.append(f"--allocator={self.allocator}")
        ssh = [*self._ssh("-L", f"{local_monitor}:{remote_monitor}"), "--"]
        self._remote_agent = subprocess.Popen(
            _dies_with_this_thread([*ssh, _dies_with_parent(command, "TERM")]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        read_first_json(self._remote_agent, 120, where="labgrid")

    def _quit_remote(self) -> None:
        """QEMUDriver's ``off()`` for QEMU behind ssh: ssh ends only when the console
        connection it forwards is closed on this side too, so close it after ``quit``."""
        try:
            with contextlib.suppress(Exception):  # QEMU may be gone already
                self.monitor_command("quit")
            if self._clientsocket is not None:
                self._clientsocket.close()
                self._clientsocket = None
            try:
                self._child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        finally:
            self._child = None
            self.status = 0

    def _stop_remote_agent(self) -> None:
        """The host's attach ends when QEMU shuts down; its ssh with it (or is ended)."""
        proc, self._remote_agent = self._remote_agent, None
        if proc is None:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    # -- helpers --------------------------------------------------------------------------

    def _detach(self) -> None:
        agent, loop = self._cma_agent, self._cma_loop
        self._cma_agent = self._cma_loop = None
        if loop is None:
            return
        try:
            if agent is not None:
                loop.run(agent.agent.close(), 60)
        finally:
            loop.stop()

    def _undo_labgrid_activate(self) -> None:
        """What QEMUDriver's ``on_activate`` made before our arguments failed: its console
        socket and temporary directory (its ``on_deactivate`` never runs for a failed one)."""
        socket_, tempdir = getattr(self, "_socket", None), getattr(self, "_tempdir", None)
        if socket_ is not None:
            socket_.close()
            self._socket = None
        if tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
            self._tempdir = None

    def _remove_dir(self) -> None:
        if self._cma_cleanup is not None:
            atexit.unregister(self._cma_cleanup)
            self._cma_cleanup()
            self._cma_cleanup = None
        self._cma_dir = None

    def __str__(self) -> str:
        return f"CmaQemuDriver({self.target.name}, {self.board})"


def _dies_with_this_thread(argv: list[str]) -> list[str]:
    """``argv`` killed when this process dies, if started from the main thread.

    ``PR_SET_PDEATHSIG`` fires when the thread that started the process ends; only the main
    thread lives as long as the process, so from another thread ``argv`` is left as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        return argv
    setpriv = shutil.which("setpriv")
    return argv if setpriv is None else [setpriv, "--pdeathsig", "KILL", "--", *argv]


def _dies_with_parent(argv: Sequence[str], signal: str = "KILL") -> str:
    """A remote shell command running ``argv`` that gets ``signal`` when its parent, the ssh
    session (which ends when the connection does), exits. Debian's util-linux has setpriv."""
    return "exec " + shlex.join(["setpriv", "--pdeathsig", signal, "--", *argv])


def _console_first(argv: list[str]) -> list[str]:
    """labgrid's console ``-serial`` moved before the board's own (the guest's UART0).

    labgrid appends its console after the base arguments; on a board whose channel is a
    UART (smdkc210) that would make the channel the first serial port.
    """
    serials = [i for i, a in enumerate(argv) if a == "-serial"]
    mine = [i for i in serials if argv[i + 1] == _LABGRID_SERIAL]
    if not mine or mine[0] == serials[0]:
        return argv
    index = mine[0]
    rest = argv[:index] + argv[index + 2 :]
    first = serials[0]
    return [*rest[:first], "-serial", _LABGRID_SERIAL, *rest[first:]]


class _Status:
    """CmaQemuStrategy's states (labgrid's ``Status`` enums, by name)."""

    unknown, off, shell = "unknown", "off", "shell"


@target_factory.reg_driver
@attr.s(eq=False)
class CmaQemuStrategy(Strategy):  # type: ignore[misc]
    """off -> shell: QEMU on with the agent attached, and a ShellDriver at ``cma# ``.

    The guest has no login: its init prints ``cma-qemu: ready channel=...`` and starts a
    shell with ``PS1='cma# '``; the env's ShellDriver needs ``prompt: 'cma# '`` and a
    ``login_prompt`` that never appears.
    """

    bindings = {"power": "CmaQemuDriver", "shell": "ShellDriver"}  # noqa: RUF012

    status: str = attr.ib(default=_Status.unknown)

    @never_retry  # type: ignore[untyped-decorator]
    @step(args=["status"])  # type: ignore[untyped-decorator]
    def transition(self, status: Any, *, step: Any) -> None:
        """Walk to ``off`` or ``shell``; labgrid's ``strategy.transition("shell")``."""
        status = getattr(status, "name", status)
        if status not in (_Status.off, _Status.shell):
            raise StrategyError(f"can not transition to {status}")
        if status == self.status:
            step.skip("nothing to do")
            return
        if status == _Status.off:
            self.target.deactivate(self.shell)
            self.target.activate(self.power)
            self.power.off()
        else:
            self.transition(_Status.off)
            self.power.on()
            self.target.activate(self.shell)
        self.status = status

    @never_retry  # type: ignore[untyped-decorator]
    @step(args=["status"])  # type: ignore[untyped-decorator]
    def force(self, status: Any, *, step: Any) -> None:
        """Take the target to be in ``status`` already (``pytest --lg-initial-state``)."""
        status = getattr(status, "name", status)
        if status == _Status.off:
            self.target.deactivate(self.shell)
            self.target.activate(self.power)
        elif status == _Status.shell:
            self.target.activate(self.power)
            self.target.activate(self.shell)
        else:
            raise StrategyError(f"can not force state {status}")
        self.status = status

    @property
    def agent(self) -> SyncAgent:
        """The agent of a local board (``strategy.agent`` in a test)."""
        agent: SyncAgent = self.power.agent
        return agent

    @property
    def monitor_path(self) -> str:
        """The agent's QMP monitor socket, local or forwarded from the board's host."""
        path: str = self.power.monitor_path
        return path
