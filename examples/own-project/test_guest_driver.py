"""A guest driver test in a project outside this repository, using the plugin's fixtures.

`./dev.sh test` copies this directory next to a fresh venv holding the built wheel and
pytest only, and runs it there: the wheel's plugin, board files and guest sources must do.
"""

import pytest

pytestmark = pytest.mark.e2e


def test_guest_writes_host_reads(guest, agent):
    with guest.stub() as stub:
        line = stub.send("alloc vpu/dec 1M")
        assert line.startswith("1: 0x100000@")
        chunk = agent.chunk_at(int(line.split("@")[1], 16))
        assert stub.send("write 1 0xc0ffee") == ""
        assert agent.find_mismatch(chunk, 0xC0FFEE) is None
    assert agent.guest_chunks() == []
