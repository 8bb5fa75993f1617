"""Shared by the kernel-module e2e tests: the module's daemon in a booted guest."""

from __future__ import annotations

import time

from cma_qemu.pytest_plugin import BoardSession


class Daemon:
    """``cma-test -k`` running in the guest's background; :meth:`stop` kills it and waits.

    It holds the board's channel while it runs, so ``cma-test`` (and the plugin's
    ``guest.stub()``) must wait for :meth:`stop`.
    """

    def __init__(self, session: BoardSession, timeout: float = 30) -> None:
        self.guest = session.guest
        self.pid = int(
            self.guest.check("cma-test -k </dev/null >/dev/null 2>/tmp/cmakd.err & echo $!")
        )
        # ready when it holds /dev/cma-ctl and the channel: its ready line
        deadline = time.monotonic() + timeout
        while "serving" not in (err := self.guest.run("cat /tmp/cmakd.err").output):
            assert time.monotonic() < deadline, f"cma-test -k did not start: {err}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.guest.check(
            f"kill {self.pid}; while kill -0 {self.pid} 2>/dev/null; do usleep 50000; done"
        )
