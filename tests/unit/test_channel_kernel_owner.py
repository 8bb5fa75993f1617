"""Requests with ``"owner": "kernel"`` (cma-test -k for the guest kernel module): their chunks
belong to ``guest:PORT/kernel``, ownership is checked per owner, a reset releases both owners,
and the journal and the recorder carry the new owner through.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cma_helpers import cma_state as state
from cma_helpers import make_cma
from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.boards import load_board
from cma_qemu.channel import GuestSession
from cma_qemu.configuration import build_cma
from cma_qemu.framework import Cma
from cma_qemu.journal import JOURNAL_NAME, Journal, JournalIdentity
from cma_qemu.record import Recorder, RecordingHeader
from cma_qemu.replay import replay
from cma_qemu.wire.messages import RequestError, parse_request

PORT = "guest:org.cma.0"
KERNEL = "guest:org.cma.0/kernel"


@pytest.fixture
def cma() -> Cma:
    return make_cma(map="dev/*=a;other/*=b")


@pytest.fixture
def guest(cma: Cma) -> GuestSession:
    return GuestSession(cma, PORT)


def call(session: GuestSession, execute: str, owner: object = None, **arguments: Any) -> Any:
    """One request with id 1, ``"owner"`` only when given; the decoded reply."""
    request: dict[str, object] = {"execute": execute, "arguments": arguments, "id": 1}
    if owner is not None:
        request["owner"] = owner
    [line] = session.feed(json.dumps(request).encode() + b"\n").splitlines()
    reply: dict[str, Any] = json.loads(line)
    assert reply["id"] == 1
    return reply


def ok(session: GuestSession, execute: str, owner: str | None = None, **arguments: Any) -> Any:
    reply = call(session, execute, owner, **arguments)
    assert "return" in reply, reply
    return reply["return"]


def test_kernel_chunks_carry_the_ports_kernel_owner(guest: GuestSession, cma: Cma) -> None:
    user = ok(guest, "cma-alloc", dev="dev", size=4096)
    kernel = ok(guest, "cma-alloc", "kernel", dev="dev", size=8192)
    by_addr = {c.start: c.owner for c in cma.chunks}
    assert by_addr == {user["addr"]: PORT, kernel["addr"]: KERNEL}
    assert guest.kernel_owner == KERNEL
    assert [c.start for c in guest.chunks] == sorted([user["addr"], kernel["addr"]])
    assert ok(guest, "cma-list", "kernel") == [kernel]
    assert ok(guest, "cma-list") == [user]


def test_kernel_and_user_space_cannot_free_each_others_chunks(
    guest: GuestSession, cma: Cma
) -> None:
    user = ok(guest, "cma-alloc", dev="dev", size=4096)
    kernel = ok(guest, "cma-alloc-from", "kernel", regions="b", size=4096)
    before = state(cma)
    for execute in ("cma-free", "cma-get", "cma-put"):
        assert call(guest, execute, addr=kernel["addr"])["error"]["class"] == "ENOENT"
        assert call(guest, execute, "kernel", addr=user["addr"])["error"]["class"] == "ENOENT"
    assert state(cma) == before
    assert ok(guest, "cma-get", "kernel", addr=kernel["addr"]) == {}
    assert ok(guest, "cma-put", "kernel", addr=kernel["addr"]) == {"freed": False}
    assert ok(guest, "cma-free", "kernel", addr=kernel["addr"]) == {}  # module unload's path
    assert [c.owner for c in cma.chunks] == [PORT]


def test_reset_releases_both_owners_of_the_port_and_no_other(cma: Cma) -> None:
    one = GuestSession(cma, PORT)
    other = GuestSession(cma, "guest:other")
    mine = {ok(one, "cma-alloc", owner, dev="dev", size=4096)["addr"] for owner in ("kernel", None)}
    kept = ok(other, "cma-alloc", "kernel", dev="dev", size=4096)
    released = one.reset()
    assert {c.start for c in released} == mine
    assert [c.start for c in released] == sorted(mine)
    assert one.chunks == [] and ok(other, "cma-list", "kernel") == [kept]


@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=20).filter(lambda s: s != "kernel"),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
)
def test_any_other_owner_is_one_generic_error_and_changes_nothing(value: object) -> None:
    cma = make_cma(map="dev/*=a;other/*=b")
    guest = GuestSession(cma, PORT)
    ok(guest, "cma-alloc", "kernel", dev="dev", size=4096)
    before = state(cma)
    line = json.dumps(
        {"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 4096}, "owner": value, "id": 9}
    )
    [reply_line] = guest.feed(line.encode() + b"\n").splitlines()
    reply = json.loads(reply_line)
    assert reply["id"] == 9
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("cma-alloc: member 'owner' must be one of kernel")
    assert "\n" not in reply["error"]["desc"]
    assert state(cma) == before
    assert len(ok(guest, "cma-list", "kernel")) == 1  # the session goes on


def test_the_monitor_envelope_still_has_no_owner_member() -> None:
    line = b'{"execute": "query-cma-chunks", "owner": "kernel"}'
    with pytest.raises(RequestError, match="member 'owner' is unexpected"):
        parse_request(line)
    assert parse_request(line, owners=frozenset({"kernel"})).owner == "kernel"
    assert parse_request(b'{"execute": "x"}', owners=frozenset({"kernel"})).owner is None


def test_the_journal_brings_kernel_chunks_back_and_a_reset_then_frees_them(
    tmp_path: Path,
) -> None:
    def make() -> Cma:
        return Cma.from_attributes("a=1M;b=1M", "*/*=a,b", ram=[(0x40000000, 16 << 20)])

    def identity(cma: Cma) -> JournalIdentity:
        return JournalIdentity.of("test", "a=1M;b=1M", cma, None)

    path = tmp_path / JOURNAL_NAME
    first = make()
    journal, _ = Journal.open(first, path, identity(first), "1:42")
    guest = GuestSession(first, PORT)
    ok(guest, "cma-alloc", "kernel", dev="d", size=4096)
    ok(guest, "cma-alloc", dev="d", size=8192)
    journal.close()  # the agent dies; a new one restores from the file
    second = make()
    journal2, report = Journal.open(second, path, identity(second), "1:42")
    assert report.restored == 2
    assert sorted((c.owner or "") for c in second.chunks) == [PORT, KERNEL]
    again = GuestSession(second, PORT)  # the restarted agent's session for the same port
    assert len(ok(again, "cma-list", "kernel")) == 1
    assert len(again.reset()) == 2 and second.chunks == []
    journal2.close()


def test_the_recorder_names_the_kernel_owner_and_replays_the_same(tmp_path: Path) -> None:
    board = load_board("virt")
    cma = build_cma(board=board)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(
        cma, recording, RecordingHeader(board.name, None, cma.map_text, cma.asterisk_text)
    )
    guest = GuestSession(cma, PORT)
    kernel = ok(guest, "cma-alloc", "kernel", dev="vpu", kind="dec", size=0x3000)
    user = ok(guest, "cma-alloc", dev="vpu", kind="dec", size=0x1000)
    ok(guest, "cma-free", "kernel", addr=kernel["addr"])
    recorder.close()
    text = recording.read_text()
    assert f"# from {KERNEL}\nalloc vpu/dec 0x3000\n# from {PORT}\n" in text
    assert f"# from {KERNEL}\nfree 1\n" in text
    result = replay(text, build_cma(board=board))
    placed = [int(x, 16) for x in re.findall(r"@(0x[0-9a-f]+)", result.stdout)]
    assert placed == [kernel["addr"], user["addr"]]
