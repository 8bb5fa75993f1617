"""Attribute strings that begin with ``-`` on every command that takes them (issue 7.4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.boards import load_board
from cma_qemu.cli import ATTRIBUTE_OPTIONS, join_attribute_values, main, parse_args

AQUILA = load_board("aquila")
GONI = load_board("goni")
SEED_STRINGS = [AQUILA.regions, GONI.regions]
COMMANDS = [
    ["boot", "virt"],
    ["attach", "--qmp", "q.sock", "--channel", "c.sock", "--board", "virt"],
    ["replay", "s.txt"],
]


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)


def test_the_seed_strings_begin_with_a_dash() -> None:
    assert all(s.startswith("-mfc_fw=") for s in SEED_STRINGS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("regions", SEED_STRINGS, ids=["aquila", "goni"])
def test_every_command_takes_a_leading_dash_regions_string(
    command: list[str], regions: str
) -> None:
    args = parse_args([*command, "--cma", regions, "--map", "-x/y=a", "--asterisk", "-a,b"])
    assert (args.cma, args.map, args.asterisk) == (regions, "-x/y=a", "-a,b")
    assert args.command == command[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("option", ATTRIBUTE_OPTIONS)
def test_a_missing_value_keeps_argparse_error(
    command: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for after in ([], ["--json"], ["--map=x=y"], ["--jso"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args([*command, option, *after])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == (
            f"cma-qemu: EINVAL: argument {option}: expected one argument "
            f"(see `cma-qemu {command[0]} --help`)\n"
        )


def test_nothing_after_double_dash_is_touched() -> None:
    known = {"--cma", "--json"}
    assert join_attribute_values(["a", "--", "--cma", "-x"], known) == ["a", "--", "--cma", "-x"]
    assert join_attribute_values(["--cma", "--"], known) == ["--cma", "--"]


@given(
    option=st.sampled_from(ATTRIBUTE_OPTIONS),
    value=st.text(min_size=1).map(lambda t: "-" + t),
)
def test_any_dash_value_that_is_not_an_option_reaches_the_command(option: str, value: str) -> None:
    known = {"--cma", "--map", "--asterisk", "--json", "--board", "-h", "--help"}
    joined = join_attribute_values(["replay", "s", option, value, "--json"], known)
    name = value.split("=", 1)[0]
    if name in known or (name.startswith("--") and any(k.startswith(name) for k in known)):
        assert joined == ["replay", "s", option, value, "--json"]
    else:
        assert joined == ["replay", "s", f"{option}={value}", "--json"]


def test_replay_with_the_aquila_string_as_a_separate_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "s.txt"
    script.write_text("alloc s3c-mfc5/a 1M\nalloc s3c-mfc5/f 64K\n")
    common = ["--ram", "0x40000000:384M", "--map", AQUILA.map]
    assert main(["replay", str(script), "--cma", AQUILA.regions, *common]) == 0
    separate = capsys.readouterr()
    assert main(["replay", str(script), f"--cma={AQUILA.regions}", *common]) == 0
    joined = capsys.readouterr()
    assert (separate.out, separate.err) == (joined.out, joined.err)
    assert separate.out.startswith("1: 0x100000@")
    assert separate.err == ""


def test_attach_state_options() -> None:
    attach = COMMANDS[1]
    assert (parse_args(attach).state, parse_args(attach).no_state) == (None, False)
    assert parse_args([*attach, "--state", "j"]).state == "j"
    assert parse_args([*attach, "--no-state"]).no_state is True
    with pytest.raises(SystemExit):
        parse_args([*attach, "--state", "j", "--no-state"])
