"""The README's example: the guest allocates and writes a pattern, the host checks the bytes."""

import pytest

pytestmark = pytest.mark.e2e


def test_guest_writes_host_reads(guest, agent):
    with guest.stub() as stub:
        line = stub.send("alloc vpu/dec 1M")  # the map sends vpu/* to video, then common
        assert line.startswith("1: 0x100000@")
        chunk = agent.chunk_at(int(line.split("@")[1], 16))
        assert chunk.region.name == "video"

        assert stub.send("write 1 0xc0ffee") == ""
        assert agent.find_mismatch(chunk, 0xC0FFEE) is None  # the host sees the guest's bytes
        assert agent.find_mismatch(chunk, 0xBADBAD) == 0

    assert agent.guest_chunks() == []  # the stub freed its chunk when its input ended


def test_every_region_is_a_hole_in_system_ram(guest, agent):
    iomem = guest.check("cat /proc/iomem")
    ram = [
        tuple(int(x, 16) for x in line.split(" : ")[0].split("-"))
        for line in iomem.splitlines()
        if line.endswith(" : System RAM")
    ]
    assert ram
    for region in agent.cma.regions:
        assert all(region.end <= low or high < region.start for low, high in ram)
