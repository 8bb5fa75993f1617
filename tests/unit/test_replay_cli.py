"""``cma-qemu boards`` and ``cma-qemu replay``: output, exit status, and one-line errors."""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from cma_qemu.boards import load_board
from cma_qemu.churn import churn_script
from cma_qemu.cli import main, offline
from cma_qemu.cli.offline import ReplayProgress
from cma_qemu.configuration import build_cma
from cma_qemu.errors import EINVAL
from cma_qemu.regions import RamBank
from cma_qemu.replay import external_fragmentation, parse_ram, replay

DATA = Path(__file__).resolve().parent.parent / "data"
ROOT = DATA.parent.parent
AQUILA = DATA / "aquila_mfc.txt"
POOL = DATA / "pool.txt"
POOL_ARGS = ["--cma", "pool=1M;-priv=64K@0x40000000", "--ram", "0x40000000:16M"]
M = 1 << 20


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no truncated cells


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def expected(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def assert_one_line_error(err: str, errno_name: str, *fragments: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"cma-qemu: {errno_name}: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


# ------------------------------------------------------------------------------ boards
def test_boards_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "boards")
    assert (status, err) == (0, "")
    for text in ("aquila", "goni", "smdkc210", "virt", "384M@0x40000000", "128M@0x50000000"):
        assert text in out
    assert "uart /dev/ttySAC1" in out
    assert "mfc_b2=16M@0x44000000" in out


def test_boards_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "boards", "--json")
    assert (status, err) == (0, "")
    boards = {b["name"]: b for b in json.loads(out)}
    assert sorted(boards) == ["aquila", "goni", "smdkc210", "smdkc210-uart", "virt"]
    goni = boards["goni"]
    assert set(goni) == {
        "name",
        "description",
        "machine",
        "cpu",
        "kernel",
        "ram",
        "channel",
        "regions",
        "map",
        "asterisk",
    }
    assert goni["ram"] == [
        {"base": 0x40000000, "size": 256 * M},
        {"base": 0x50000000, "size": 128 * M},
    ]
    assert goni["channel"] == {"kind": "virtio-serial", "name": "org.cma.0"}
    assert goni["regions"] == "-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x44000000"
    assert goni["asterisk"] is None
    assert boards["smdkc210"]["machine"] == "smdkc210"
    assert boards["smdkc210"]["channel"] == {"kind": "net", "name": "tcp:10.0.2.100:1234"}
    assert boards["smdkc210-uart"]["machine"] == "smdkc210"
    assert boards["smdkc210-uart"]["channel"]["kind"] == "uart"


def test_boards_bad_env_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken.toml").write_text('name = "broken"\n[machine]\ntype = 5\n')
    monkeypatch.setenv("CMA_QEMU_BOARDS", str(tmp_path))
    status, out, err = cli(capsys, "boards")
    assert status == 1 and out == ""
    assert_one_line_error(err, "EINVAL", str(tmp_path / "broken.toml"), "machine.type")


# ------------------------------------------------------------------------------ replay
def test_replay_board_exact_output(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "replay", str(AQUILA), "--board", "aquila")
    assert out == expected("aquila_mfc.stdout.txt")
    assert err == expected("aquila_mfc.stderr.txt")
    assert status == 1  # some lines failed
    assert out.startswith("1: 0x100000@0x57f00000\n2: 0x800000@0x55f00000\n")
    assert "3: 0x400000@0x44000000\n" in out  # mfc_b2 at 0x44000000


def test_replay_cma_ram_exact_output(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "replay", str(POOL), *POOL_ARGS)
    assert (out, err) == (expected("pool.stdout.txt"), expected("pool.stderr.txt"))
    assert status == 1


def test_replay_exit_zero_when_all_lines_pass(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "ok.txt"
    script.write_text("a s3c-mfc5/a 4K\nl\nf\n")
    status, out, err = cli(capsys, "replay", str(script), "--board", "goni")
    assert (status, out, err) == (0, "1: 0x1000@0x55f00000\n1: 0x1000@0x55f00000\n", "")


def test_replay_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Stdin:
        buffer = io.BytesIO(b"r pool 4K\n")

    monkeypatch.setattr(sys, "stdin", Stdin())
    status, out, err = cli(capsys, "replay", "-", *POOL_ARGS)
    assert (status, out, err) == (0, "1: 0x1000@0x40f00000\n", "")


def test_replay_no_newline_at_eof(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = tmp_path / "s.txt"
    script.write_bytes(b"r pool 4K\nr pool 4K")
    status, out, err = cli(capsys, "replay", str(script), *POOL_ARGS)
    assert (status, out, err) == (
        1,
        "1: 0x1000@0x40f00000\n",
        "input: EINVAL: no new line at EOF\n",
    )


def test_replay_compare_allocators(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(
        capsys,
        "replay",
        str(AQUILA),
        "--board",
        "aquila",
        "--allocator",
        "bf",
        "--allocator",
        "bitmap",
    )
    assert status == 1 and err == ""
    assert "Replay by allocator" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 2
    assert rows[0].split("│")[1].strip() == "bf"
    assert rows[1].split("│")[1].strip() == "bitmap"
    for row in rows:
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[1:4] == ["8", "7", "1"]  # allocations, succeeded, failed
    for name in ("mfc_b2", "mfc_b1", "mfc_fw"):
        assert f"free in {name}" in out
    assert "0x57f00000" not in out  # the script's own lines are not printed in a comparison


def test_replay_single_allocator_prints_output_and_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = cli(
        capsys, "replay", str(AQUILA), "--board", "aquila", "--allocator", "bitmap"
    )
    assert out.startswith(expected("aquila_mfc.stdout.txt"))
    assert "bitmap" in out[len(expected("aquila_mfc.stdout.txt")) :]
    assert err == expected("aquila_mfc.stderr.txt")
    assert status == 1


def test_replay_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(
        capsys,
        "replay",
        str(AQUILA),
        "--board",
        "aquila",
        "--allocator",
        "bf",
        "--allocator",
        "bitmap",
        "--json",
    )
    assert status == 1 and err == ""
    data = json.loads(out)
    assert list(data) == ["runs"]
    assert [run["allocator"] for run in data["runs"]] == ["bf", "bitmap"]
    for run in data["runs"]:
        assert set(run) == {
            "allocator",
            "stdout",
            "stderr",
            "allocations",
            "succeeded",
            "failed",
            "errors",
            "largest_free",
            "free",
            "fragmentation",
            "regions",
        }
        assert (run["allocations"], run["succeeded"], run["failed"], run["errors"]) == (8, 7, 1, 3)
        assert run["stderr"] == expected("aquila_mfc.stderr.txt").splitlines()
        assert [r["name"] for r in run["regions"]] == ["mfc_b2", "mfc_b1", "mfc_fw"]
        assert {r["allocator"] for r in run["regions"]} == {run["allocator"]}
        assert run["regions"][0] == {
            "name": "mfc_b2",
            "start": 0x44000000,
            "size": 16 * M,
            "free": 12 * M,
            "largest_free": 12 * M,
            "fragmentation": 0.0,
            "allocator": run["allocator"],
        }
        assert run["largest_free"] == max(r["largest_free"] for r in run["regions"])
    assert data["runs"][0]["stdout"] == expected("aquila_mfc.stdout.txt").splitlines()


def test_replay_json_default_allocator(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err = cli(capsys, "replay", str(POOL), *POOL_ARGS, "--json")
    (run,) = json.loads(out)["runs"]
    assert run["allocator"] is None
    assert run["stdout"] == expected("pool.stdout.txt").splitlines()
    assert {r["allocator"] for r in run["regions"]} == {"bf"}
    assert status == 1


def test_replay_map_and_asterisk_overrides(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "s.txt"
    script.write_text("a s3c-mfc5/f 4K\na other 4K\ni other\n")
    status, out, err = cli(
        capsys,
        "replay",
        str(script),
        "--board",
        "aquila",
        "--map",
        "s3c-mfc5/f=mfc_b2",
        "--asterisk",
        "mfc_fw",
    )
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "1: 0x1000@0x44000000",
        "2: 0x1000@0x57f00000",
        "info: count=1 total=0x100000 free=0xff000 lower=0x57f00000 upper=0x58000000",
    ]


def test_replay_cma_replaces_board_regions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "s.txt"
    script.write_text("i x\n")
    status, out, err = cli(capsys, "replay", str(script), "--board", "virt", "--cma", "only=2M")
    assert (status, err) == (0, "")
    assert out == "info: count=1 total=0x200000 free=0x200000 lower=0x5fe00000 upper=0x60000000\n"


# ------------------------------------------------------------------------------ user mistakes
MISTAKES = [
    (
        ["--board", "aquila", "--cma", "mfc_b2=16M@0x40000000"],
        "EADDRINUSE",
        ["region 'mfc_b2' 0x40000000-0x40ffffff", "the kernel 0x40000000-0x41ffffff"],
    ),
    (["--cma", "a=1M"], "EINVAL", ["--cma without --board needs at least one --ram"]),
    ([], "EINVAL", ["replay needs --board"]),
    (["--cma", "a=1Q", "--ram", "0x40000000:16M"], "EINVAL", ["regions", "column 4"]),
    (["--cma", "a=1M", "--ram", "0x40000000"], "EINVAL", ["--ram '0x40000000'"]),
    (["--cma", "a=1M", "--ram", "0x40000000:0"], "EINVAL", ["--ram"]),
    (["--cma", "a=1M", "--ram", "x:16M"], "EINVAL", ["--ram 'x:16M'"]),
    (["--cma", "a=1M", "--ram", "0x40000800:16M"], "EINVAL", ["4 KiB page"]),
    (["--cma", "a=32M", "--ram", "0x40000000:16M"], "ENOMEM", ["region 'a'", "does not fit"]),
    (["--cma", "a=1M@0x80000000", "--ram", "0x40000000:16M"], "ENOMEM", ["not inside RAM"]),
    (
        ["--board", "nosuch"],
        "ENOENT",
        ["no board named 'nosuch'", "aquila, goni, smdkc210, smdkc210-uart, virt"],
    ),
    (["--board", "aquila", "--allocator", "nosuch"], "EINVAL", ["'nosuch'", "bf, bitmap"]),
    (["--board", "aquila", "--allocator", "bf", "--allocator", "nope"], "EINVAL", ["'nope'"]),
    (["--board", "aquila", "--map", "s3c-mfc5"], "EINVAL", ["map", "column"]),
    (["--board", "aquila", "--asterisk", "a,,b"], "EINVAL", ["asterisk", "column"]),
]


@pytest.mark.parametrize(("args", "errno_name", "fragments"), MISTAKES)
def test_user_mistakes_print_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], errno_name: str, fragments: list[str]
) -> None:
    status, out, err = cli(capsys, "replay", str(AQUILA), *args)
    assert status == 1 and out == ""
    assert_one_line_error(err, errno_name, *fragments)


def test_missing_script_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.txt"
    status, out, err = cli(capsys, "replay", str(missing), "--board", "aquila")
    assert status == 1 and out == ""
    assert_one_line_error(err, "ENOENT", str(missing), "no such script file")


def test_bad_board_file_through_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = (ROOT / "board_configs" / "virt.toml").read_text()
    (tmp_path / "mine.toml").write_text(
        board.replace('name = "virt"', 'name = "mine"').replace('size = "512M"', 'size = "512X"')
    )
    monkeypatch.setenv("CMA_QEMU_BOARDS", str(tmp_path))
    status, out, err = cli(capsys, "replay", str(AQUILA), "--board", "mine")
    assert status == 1 and out == ""
    assert_one_line_error(err, "EINVAL", str(tmp_path / "mine.toml"), "ram[0].size")


# ------------------------------------------------------------------------------ replay module
def test_parse_ram() -> None:
    assert parse_ram("0x40000000:512M") == RamBank(0x40000000, 512 * M)
    assert parse_ram("1G:4K") == RamBank(1 << 30, 4096)
    for bad in ("", ":", "0x40000000:", ":16M", "0x40000000:16M:1", "-1:16M", "0x40000000:0"):
        with pytest.raises(EINVAL):
            parse_ram(bad)


def test_replay_function_is_deterministic_and_isolated() -> None:
    board = load_board("aquila")
    script = AQUILA.read_text()
    first = replay(script, build_cma(board=board), "bitmap")
    second = replay(script, build_cma(board=board), "bitmap")
    assert first == second
    assert first.succeeded == 7 and first.failed_allocations == 1 and first.errors == 3
    with pytest.raises(EINVAL):
        build_cma(regions="a=1M")


# ------------------------------------------------------------------------------ the real script
def test_console_script_subprocess() -> None:
    exe = Path(sys.executable).parent / "cma-qemu"  # the console script of this environment
    done = subprocess.run(
        [str(exe), "replay", str(AQUILA), "--board", "aquila"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == expected("aquila_mfc.stdout.txt")
    assert done.stderr == expected("aquila_mfc.stderr.txt")
    done = subprocess.run(
        [str(exe), "replay", str(AQUILA), "--board", "aquila", "--cma", "mfc_b2=16M@0x40000000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line_error(done.stderr, "EADDRINUSE", "the kernel")


def test_ram_with_board_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = tmp_path / "s.txt"
    script.write_text("list\n")
    status, out, err = cli(capsys, "replay", str(script), "--board", "virt", "--ram", "0:1M")
    assert status == 1 and out == ""
    assert_one_line_error(err, "EINVAL", "--ram goes with --cma")


def test_closed_stdout_pipe_is_not_a_traceback() -> None:
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write fails with EPIPE, as under `| head`
    code = "import sys; from cma_qemu.cli import main; sys.exit(main(['boards', '--json']))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    assert proc.returncode == 0


def test_build_cma_puts_every_region_on_one_allocator() -> None:
    from cma_qemu.boards import load_board
    from cma_qemu.configuration import build_cma

    cma = build_cma(board=load_board("virt"), allocator="bitmap")
    assert {r.allocator_name for r in cma.regions} == {"bitmap"}
    assert cma.alloc("vpu", "dec", 1 << 20).region.attached == "bitmap"


def test_boot_with_an_unknown_allocator_fails_before_qemu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = cli(capsys, "boot", "virt", "--allocator", "nope", "--run", "true")
    assert status == 1 and out == ""
    assert_one_line_error(err, "EINVAL", "no allocator named 'nope'", "bf, bitmap")


@pytest.mark.parametrize(
    "argv",
    [("boot",), ("replay", "x.txt", "--bogus"), (), ("inspect", "regions")],
)
def test_usage_mistakes_are_one_line_too(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith("cma-qemu: EINVAL: ") and "--help" in err


# ------------------------------------------------------------------------------ fragmentation
FRAG_ARGS = ["--cma", "t=1M;u=1M", "--ram", "0x40000000:16M"]
#: Three 256K chunks in t, the middle one freed: a 256K hole and the 256K tail.
FRAG_SCRIPT = "a x 256K\na x 256K\na x 256K\nf 2\n"


def test_external_fragmentation_definition() -> None:
    assert external_fragmentation(0, 0) == 0.0  # nothing free: defined as 0
    assert external_fragmentation(M, M) == 0.0  # one block
    assert external_fragmentation(M // 4, M) == 0.75


def test_replay_json_fragmentation_per_region_and_overall(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "frag.cma"
    script.write_text(FRAG_SCRIPT)
    args = ["--allocator", "bf", "--allocator", "bitmap", "--asterisk", "t,u", "--json"]
    status, out, err = cli(capsys, "replay", str(script), *FRAG_ARGS, *args)
    assert (status, err) == (0, "")
    for run in json.loads(out)["runs"]:
        by_name = {r["name"]: r for r in run["regions"]}
        assert (by_name["t"]["free"], by_name["t"]["largest_free"]) == (M // 2, M // 4)
        assert by_name["t"]["fragmentation"] == 0.5
        assert by_name["u"]["fragmentation"] == 0.0  # untouched: one whole free block
        assert run["free"] == M + M // 2
        assert run["fragmentation"] == pytest.approx(1 - M / (M + M // 2))


def test_replay_comparison_table_has_fragmentation_columns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "frag.cma"
    script.write_text(FRAG_SCRIPT)
    args = ["--allocator", "bf", "--allocator", "bitmap", "--asterisk", "t,u"]
    status, out, err = cli(capsys, "replay", str(script), *FRAG_ARGS, *args)
    assert (status, err) == (0, "")
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    columns = [c.strip() for c in header.split("┃")[1:-1]]
    assert {"frag.", "frag. t", "frag. u"} <= set(columns)
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 2
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.split("│")[1:-1]), strict=True))
        assert (cells["frag."], cells["frag. t"], cells["frag. u"]) == ("33.3%", "50.0%", "0.0%")


# ------------------------------------------------------------------------------ progress
BASE = 0x40000000


def test_progress_bar_shows_once_the_replay_has_run_a_second() -> None:
    sink = io.StringIO()
    ticks = iter([0.0, *[5.0] * 100])  # constructed at 0 s, every later call at 5 s
    bar = ReplayProgress(Console(file=sink, force_terminal=True, width=100), clock=ticks.__next__)
    bar.begin("replay (bf)")
    result = replay(
        "a x 4K\nf\n" * 3000, build_cma(regions="t=1M", ram=[RamBank(BASE, M)]), None, bar
    )
    bar.close()
    assert result.errors == 0
    assert "replay (bf)" in sink.getvalue() and "6000/6000" in sink.getvalue()


def test_progress_bar_stays_away_from_a_short_replay() -> None:
    sink = io.StringIO()
    bar = ReplayProgress(Console(file=sink, force_terminal=True, width=100), clock=lambda: 0.5)
    replay("a x 4K\nf\n" * 3000, build_cma(regions="t=1M", ram=[RamBank(BASE, M)]), None, bar)
    bar.close()
    assert sink.getvalue() == ""


def test_no_progress_output_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Even a bar that would show at once stays away: the choice is stderr's isatty.
    monkeypatch.setattr(offline, "ReplayProgress", functools.partial(ReplayProgress, delay=0.0))
    script = tmp_path / "long.cma"
    script.write_text("a x 4K\nf\n" * 5000)
    status, out, err = cli(
        capsys, "replay", str(script), "--cma", "t=1M", "--ram", "0x40000000:16M"
    )
    assert (status, err) == (0, "")
    assert out == "1: 0x1000@0x40f00000\n" * 5000


def test_progress_bar_on_a_real_terminal(tmp_path: Path) -> None:
    """A replay of a few seconds under a pty draws the bar on stderr (stdout to /dev/null).

    Long enough to outlast the bar's one-second delay with room to spare (1,001,000 lines, a
    few seconds at today's speed)."""
    script = tmp_path / "churn.cma"
    script.write_text(churn_script(1_000, 500_000))
    exe = Path(sys.executable).parent / "cma-qemu"
    command = f"exec {exe} replay {script} --cma t=2G --ram 0x40000000:2G > /dev/null"
    child = pexpect.spawn("/bin/sh", ["-c", command], encoding="utf-8", timeout=300)
    child.setwinsize(24, 120)
    shown = child.read()
    child.close()
    assert child.exitstatus == 0, shown
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)  # colours and cursor moves
    assert re.search(r"replay ━+.* \d+/1001000 lines", plain), plain
    assert "1001000/1001000 lines" in plain
