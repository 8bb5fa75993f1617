"""Recording what the framework serves as a script that ``cma-qemu replay`` reproduces."""

from __future__ import annotations

import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from cma_qemu.boards import load_board
from cma_qemu.cli import main
from cma_qemu.configuration import build_cma
from cma_qemu.errors import ENOENT, CmaError, from_os_error
from cma_qemu.framework import Cma
from cma_qemu.monitor import Monitor
from cma_qemu.record import Recorder, RecordingHeader, RecordingSwitch
from cma_qemu.replay import replay
from cma_qemu.script import FrameworkBackend, ScriptRunner

BOARD = load_board("virt")
K = 1 << 10
ALLOC_LINE = re.compile(r"^\d+: 0x[0-9a-f]+@0x[0-9a-f]+$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)


def header(cma: Cma, regions: str | None = None) -> RecordingHeader:
    return RecordingHeader(BOARD.name, regions, cma.map_text, cma.asterisk_text)


def run_script(cma: Cma, text: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(FrameworkBackend(cma, owner="guest:org.cma.0"), out, err).run(text)
    return out.getvalue(), err.getvalue()


def replay_file(path: Path, **attributes: str) -> tuple[str, str]:
    result = replay(path.read_text(), build_cma(board=BOARD, **attributes))  # type: ignore[arg-type]
    return result.stdout, result.stderr


def test_a_guest_session_replays_to_the_same_lines(tmp_path: Path) -> None:
    cma = build_cma(board=BOARD)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, header(cma))
    script = (
        "alloc vpu/dec 6M\na vpu/dec 3M/1M\nalloc-from common 8M\nfree 2\n"
        "alloc camera/ 1M\nalloc vpu/dec 900M\nfree\nr video,common 64K/64K\nfree 1\nfree 3\n"
    )
    out, err = run_script(cma, script)
    recorder.close()
    assert ALLOC_LINE.findall(out) and "ENOMEM" in err
    again_out, again_err = replay_file(recording)
    assert (again_out, again_err) == (out, err)
    text = recording.read_text()
    assert text.startswith("# cma-qemu recording")
    assert "# board: virt\n" in text
    assert f"# map: {cma.map_text}\n" in text
    assert "alloc vpu/dec 0x300000/0x100000\n" in text
    assert text.endswith("# stopped: 5 allocations, 4 frees, 1 chunks still live\n")


def test_ids_follow_replay_across_owners_and_a_runtime_map_change(tmp_path: Path) -> None:
    cma = build_cma(board=BOARD)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, header(cma))
    guest = [cma.alloc("vpu", "dec", 64 * K, owner="guest:a") for _ in range(3)]
    monitor = cma.alloc_from("common", 8 * K, 0x10000, owner="monitor")
    cma.free(guest[1].start)
    cma.set_map("*/*=camera")  # later allocations name the regions they tried
    moved = cma.alloc("vpu", "dec", 12 * K, owner="guest:b")
    cma.release_owner("guest:a")
    recorder.close()
    text = recording.read_text()
    assert "# from monitor\n" in text and "# from guest:b\n" in text
    assert "alloc-from camera 0x3000\n" in text
    lines, _ = replay_file(recording)
    placed = [int(x, 16) for x in re.findall(r"@(0x[0-9a-f]+)", lines)]
    assert placed == [guest[0].start, guest[1].start, guest[2].start, monitor.start, moved.start]
    assert lines.splitlines()[-1].startswith("2: ")  # the freed id 2 was reused, as replay does


def test_chunks_live_before_and_private_regions_are_comments(tmp_path: Path) -> None:
    cma = Cma.from_attributes("a=1M", ram=[(0x40000000, 16 << 20)])
    early = cma.alloc("d", "", 4 * K)
    private = cma.region_register(0x48000000, 64 * K)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, RecordingHeader("x", "a=1M", "", "a"))
    cma.alloc_from_region(private, 4 * K)
    cma.free(early.start)
    assert recorder.summary() == {
        "path": str(recording),
        "allocations": 0,
        "frees": 0,
        "live": 0,
    }
    recorder.close()
    recorder.close()  # idempotent
    assert not recorder.recording
    text = recording.read_text()
    assert "# live before recording (not replayed): 0x1000@" in text
    assert "# not replayable (private region or odd names)" in text
    assert "# free of a chunk not in this recording" in text
    assert not [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_a_path_that_cannot_be_written_is_one_error_and_no_subscription(tmp_path: Path) -> None:
    cma = build_cma(board=BOARD)
    with pytest.raises(ENOENT, match="record: No such file or directory"):
        Recorder(cma, tmp_path / "missing" / "rec.cma", header(cma))
    cma.alloc("vpu", "dec", 4 * K)  # nobody listens any more: no error


def test_replay_command_in_the_header_reproduces_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = "-t=16M;u=8M"
    cma = build_cma(board=BOARD, regions=regions, map_text="*/*=u,t")
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, header(cma, regions))
    out, _ = run_script(cma, "a x/y 1M\na x/y 9M\na x/y 1M\nf 2\na x 64K\n")
    recorder.close()
    command = next(ln for ln in recording.read_text().splitlines() if ln.startswith("# replay: "))
    argv = shlex.split(command.removeprefix("# replay: "))
    assert argv[:2] == ["cma-qemu", "replay"]
    assert main(argv[1:]) == 0
    assert capsys.readouterr().out == out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("a"),
                st.sampled_from(["vpu/dec", "camera/", "x", "vpu/enc"]),
                st.sampled_from(["4K", "64K", "1M", "3M/1M", "100M", "12K/64K"]),
            ),
            st.tuples(
                st.just("r"), st.sampled_from(["*", "common", "video,common"]), st.just("8K")
            ),
            st.tuples(
                st.just("f"), st.integers(0, 6).map(lambda i: str(i) if i else ""), st.just("")
            ),
        ),
        max_size=40,
    )
)
def test_any_session_replays_byte_for_byte(tmp_path: Path, ops: list[tuple[str, str, str]]) -> None:
    cma = build_cma(board=BOARD)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, header(cma))
    script = "".join(" ".join(p for p in op if p) + "\n" for op in ops)
    out, err = run_script(cma, script)
    recorder.close()
    # The same failed requests, under the recording's command words (alloc, alloc-from).
    expected_errors = [ln.partition(": ")[2] for ln in err.splitlines() if "ENOMEM" in ln]
    again_out, again_err = replay_file(recording)
    assert again_out == out
    assert [ln.partition(": ")[2] for ln in again_err.splitlines()] == expected_errors


# ------------------------------------------------------------------------------ monitor
async def test_monitor_starts_and_stops_a_recording(tmp_path: Path) -> None:
    cma = build_cma(board=BOARD)
    switch = RecordingSwitch(cma, lambda: header(cma))
    monitor = Monitor(cma)
    sock = tmp_path / "run" / "monitor.sock"
    await monitor.start(sock)
    qmp = QMPClient("test")
    await qmp.connect(str(sock))
    try:
        with pytest.raises(ExecuteError, match="no recorder attached"):
            await qmp.execute("cma-record-start", {"path": str(tmp_path / "x")})
        monitor.commands.record_start = switch.start
        monitor.commands.record_stop = switch.stop
        with pytest.raises(ExecuteError) as not_recording:
            await qmp.execute("cma-record-stop")
        assert not_recording.value.error_class == "ENOENT"
        path = tmp_path / "rec.cma"
        started: Any = await qmp.execute("cma-record-start", {"path": str(path)})
        assert started == {"path": str(path), "allocations": 0, "frees": 0, "live": 0}
        with pytest.raises(ExecuteError) as busy:
            await qmp.execute("cma-record-start", {"path": str(tmp_path / "other")})
        assert busy.value.error_class == "EBUSY"
        chunk: Any = await qmp.execute("cma-alloc", {"dev": "vpu", "kind": "dec", "size": 5000})
        await qmp.execute("cma-alloc-from", {"regions": "common", "size": 8192})
        await qmp.execute("cma-free", {"addr": chunk["addr"]})
        stopped: Any = await qmp.execute("cma-record-stop")
        assert stopped == {"path": str(path), "allocations": 2, "frees": 1, "live": 1}
        body = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
        assert body == ["alloc vpu/dec 0x1388", "alloc-from common 0x2000", "free 1"]
        with pytest.raises(ExecuteError) as unwritable:
            await qmp.execute("cma-record-start", {"path": str(tmp_path / "no" / "such")})
        assert unwritable.value.error_class == "ENOENT"
        assert switch.recorder is None
    finally:
        await qmp.disconnect()
        await monitor.close()
        switch.close()


def test_the_record_benchmark_runs_its_agent_side() -> None:
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("_bench_record", bench / "bench_record.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        figures = module.agent_side(n=20, repeat=1)
    finally:
        sys.path.remove(str(bench))
    assert set(figures) == {
        "nothing",
        "recorder",
        "journal (file)",
        "recorder + journal (file)",
        "journal (sqlite wal)",
    }
    assert all(pair > alloc > 0 for pair, alloc in figures.values())
    nan = float("nan")
    assert module.paired([2.0, 4.0, nan, 9.0], [1.0, 2.0, 3.0, 3.0]) == 2.0  # failed round out


def test_os_errors_keep_their_errno_name_where_the_hierarchy_has_it() -> None:
    missing = from_os_error(FileNotFoundError(2, "No such file or directory", "/x"), "record")
    assert isinstance(missing, ENOENT)
    assert str(missing) == "record: No such file or directory: /x"
    denied = from_os_error(PermissionError(13, "Permission denied"), "journal j")
    assert type(denied) is CmaError and denied.errno_name == "EIO"
    assert str(denied) == "journal j: Permission denied"


def test_comments_stay_one_line_whatever_they_quote(tmp_path: Path) -> None:
    cma = build_cma(board=BOARD)
    recording = tmp_path / "rec.cma"
    recorder = Recorder(cma, recording, RecordingHeader("virt", "x\nalloc vpu/dec 1M", "", ""))
    cma.alloc("bad\ndev", "", 4 * K, owner="monitor\nfree 1")
    recorder.close()
    body = [ln for ln in recording.read_text().splitlines() if not ln.startswith("#")]
    assert len(body) == 1 and body[0].startswith("alloc-from ")  # the name cannot go as is
