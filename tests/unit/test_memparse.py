"""One memparse: whole tokens (``memparse``) read exactly as ``parse_memsize`` reads them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.attributes import memparse, parse_memsize
from cma_qemu.errors import AttributeSyntaxError

TOKENS = st.text(st.sampled_from(list("0123456789xXabcdefABCDEFkKmMgG-; ")), max_size=24)


def whole(token: str) -> int | None:
    try:
        value, end = parse_memsize(token)
    except AttributeSyntaxError:
        return None
    return value if end == len(token) else None


@settings(max_examples=2000)
@given(TOKENS)
def test_memparse_is_parse_memsize_on_a_whole_token(token: str) -> None:
    assert memparse(token) == whole(token)


@pytest.mark.parametrize(
    ("token", "suffix", "value"),
    [
        ("16M", True, 16 << 20),
        ("16M", False, None),
        ("0x1f", False, 0x1F),
        ("017", True, 15),
        ("08", True, None),  # a leading 0 is octal
        ("0x", True, None),
        ("18446744073709551615", True, 2**64 - 1),
        ("18446744073709551616", True, None),
        ("16G" * 2, True, None),
        ("9" * 5000, True, None),  # too long for int(): refused, not a crash
        ("0" * 5000 + "1", True, 1),
        ("", True, None),
    ],
)
def test_memparse_cases(token: str, suffix: bool, value: int | None) -> None:
    assert memparse(token, suffix=suffix) == value


def test_parse_memsize_errors_name_the_problem() -> None:
    with pytest.raises(AttributeSyntaxError, match="not an octal digit"):
        parse_memsize("089")
    with pytest.raises(AttributeSyntaxError, match="expected a hex digit after '0x'"):
        parse_memsize("0xg")
    with pytest.raises(AttributeSyntaxError, match="too large"):
        parse_memsize("0x10000000000000000")
    with pytest.raises(AttributeSyntaxError, match="expected a number"):
        parse_memsize("M")
    assert parse_memsize("0000GX", 3) == (0, 5)  # the suffix ends the number, not the 'X'
