"""Fuzz board files: generated TOML documents, valid and broken, loaded and booted offline.

A board file either loads, and then the framework boots from it or refuses with one of the
project's errors, or it is refused with one EINVAL line that names the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cma_helpers import allocator_registry
from fuzzing import check_error, fuzz, no_hang, ram_spans
from hypothesis import given
from strategies import board_documents

from cma_qemu.boards import Board, load_board_file
from cma_qemu.errors import EINVAL, CmaError
from cma_qemu.framework import Cma

STEM = "fuzzed"


@pytest.fixture(scope="module")
def board_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("boards") / f"{STEM}.toml"


def _load(path: Path, text: str) -> Board | None:
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        with no_hang():
            return load_board_file(path)
    except CmaError as error:
        check_error(error)
        assert isinstance(error, EINVAL)
        assert error.where == str(path)
        return None


@fuzz
@given(text=board_documents(STEM))
def test_board_files_load_or_fail_with_one_line(board_path: Path, text: str) -> None:
    board = _load(board_path, text)
    if board is None:
        return
    assert board.name == STEM and board.ram
    assert all(bank.size > 0 and bank.base % 4096 == 0 for bank in board.ram)
    try:
        with no_hang():
            cma = Cma.from_attributes(
                board.regions,
                board.map,
                board.asterisk,
                ram=board.ram,
                keep_free=board.keep_free,
                registry=allocator_registry(),
            )
    except CmaError as error:
        check_error(error)
        return
    spans = ram_spans(board.ram)
    for region in cma.regions:
        assert any(low <= region.start and region.end <= high for low, high in spans)


# Found by the fuzzer: tomllib raises RecursionError on deep nesting and ValueError on
# integers of more than 4300 digits, and both escaped load_board_file as tracebacks.
@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 5000 + "]" * 5000 + "\n",
        "a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n",
        f'name = "{STEM}"\n[[ram]]\nbase = {"9" * 5000}\nsize = "1M"\n',
    ],
    ids=["nested-arrays", "nested-tables", "huge-integer"],
)
def test_hostile_toml_is_one_einval(board_path: Path, text: str) -> None:
    board_path.write_text(text, encoding="utf-8")
    with pytest.raises(EINVAL, match="not valid TOML") as caught:
        load_board_file(board_path)
    check_error(caught.value)
    assert caught.value.where == str(board_path)
