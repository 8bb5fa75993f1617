"""Unit tests for the regions, map and asterisk attribute grammars (docs/semantics.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cma_qemu.attributes import (
    MAX_ATTRIBUTE_LENGTH,
    MAX_MEMSIZE,
    MAX_REGIONS,
    AttributeBoundError,
    Map,
    MapRule,
    Pattern,
    RegionSpec,
    derive_asterisk,
    format_asterisk,
    format_map,
    format_memsize,
    format_regions,
    match_part,
    parse_asterisk,
    parse_map,
    parse_memsize,
    parse_regions,
)
from cma_qemu.errors import EINVAL, ENOSPC, AttributeSyntaxError

K, M, G = 1 << 10, 1 << 20, 1 << 30

SEED_REGIONS = "-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x44000000"
SEED_MAP = "s3c-mfc5/f=mfc_fw;s3c-mfc5/a=mfc_b1;s3c-mfc5/b=mfc_b2"


def syntax_error(func: Callable[[str], object], text: str, attribute: str) -> AttributeSyntaxError:
    """Call ``func(text)``, expecting a syntax error about ``attribute``; return it."""
    with pytest.raises(AttributeSyntaxError) as info:
        func(text)
    err = info.value
    assert isinstance(err, EINVAL)
    assert err.attribute == attribute
    assert err.text == text
    assert 0 <= err.position <= len(text)
    return err


# --------------------------------------------------------------------------------------------
# memparse


@pytest.mark.parametrize(
    ("text", "value", "end"),
    [
        ("0", 0, 1),
        ("123", 123, 3),
        ("0x1f", 31, 4),
        ("0X1F", 31, 4),
        ("0xabcdef", 0xABCDEF, 8),
        ("010", 8, 3),
        ("0777", 0o777, 4),
        ("00", 0, 2),
        ("0" * 100 + "1", 1, 101),
        ("1k", K, 2),
        ("1K", K, 2),
        ("3m", 3 * M, 2),
        ("3M", 3 * M, 2),
        ("2g", 2 * G, 2),
        ("2G", 2 * G, 2),
        ("0x10K", 16 * K, 5),
        ("010M", 8 * M, 4),
        ("0K", 0, 2),
        ("18446744073709551615", MAX_MEMSIZE, 20),
        ("0xffffffffffffffff", MAX_MEMSIZE, 18),
        ("01777777777777777777777", MAX_MEMSIZE, 23),
        ("17179869183G", 17179869183 * G, 12),
        ("18014398509481983K", 18014398509481983 * K, 18),
        # memparse stops at the first character it does not understand
        ("12x", 12, 2),
        ("1KK", K, 2),
        ("1T", 1, 1),
        ("1.5M", 1, 1),
        ("0xfg", 15 * G, 4),
        ("0xfz", 15, 3),
        ("7@8", 7, 1),
    ],
)
def test_parse_memsize(text: str, value: int, end: int) -> None:
    assert parse_memsize(text) == (value, end)


def test_parse_memsize_at_position() -> None:
    assert parse_memsize("a=16M@0x40", 2) == (16 * M, 5)
    assert parse_memsize("a=16M@0x40", 6) == (0x40, 10)


def test_parse_memsize_bad_position_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_memsize("1", 2)
    with pytest.raises(ValueError):
        parse_memsize("1", -1)


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("", 0, "expected a number, found end of input"),
        ("K", 0, "expected a number, found 'K'"),
        ("-1", 0, "expected a number"),
        ("+1", 0, "expected a number"),
        (" 1", 0, "expected a number"),
        ("\u00b2", 0, "expected a number"),  # superscript two: a Unicode digit, not ASCII
        ("\u0663", 0, "expected a number"),  # Arabic-Indic three
        ("0x", 2, "expected a hex digit after '0x', found end of input"),
        ("0Xg", 2, "expected a hex digit after '0X', found 'g'"),
        ("08", 1, "'8' is not an octal digit"),
        ("0779", 3, "'9' is not an octal digit"),
        ("18446744073709551616", 0, "too large"),
        ("0x10000000000000000", 0, "too large"),
        ("18014398509481984K", 0, "too large"),
        ("17179869184G", 0, "too large"),
        ("0xffffffffffffffffk", 0, "too large"),
        ("9" * 5000, 0, "too large"),  # longer than int() accepts: still a syntax error
    ],
)
def test_parse_memsize_errors(text: str, position: int, fragment: str) -> None:
    err = syntax_error(parse_memsize, text, "size")
    assert err.position == position
    assert fragment in err.message


def test_parse_memsize_error_names_the_attribute_and_absolute_position() -> None:
    with pytest.raises(AttributeSyntaxError) as info:
        parse_memsize("a=zz", 2, attribute="regions")
    assert info.value.attribute == "regions"
    assert info.value.position == 2


def test_kelvin_sign_is_not_a_suffix() -> None:
    # "\u212a".lower() == "k": the suffix test must not go through lower().
    assert parse_memsize("1\u212a") == (1, 1)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (1, "0x1"),
        (4095, "0xfff"),
        (4096, "4K"),
        (K, "1K"),
        (1536, "0x600"),
        (128 * K, "128K"),
        (M, "1M"),
        (1536 * K, "1536K"),
        (G, "1G"),
        (3 * G, "3G"),
        (0x44000000, "1088M"),
        (MAX_MEMSIZE, "0xffffffffffffffff"),
        (MAX_MEMSIZE - 1023, "18014398509481983K"),
    ],
)
def test_format_memsize(value: int, text: str) -> None:
    assert format_memsize(value) == text
    assert parse_memsize(text) == (value, len(text))


@pytest.mark.parametrize("value", [-1, MAX_MEMSIZE + 1])
def test_format_memsize_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        format_memsize(value)


# --------------------------------------------------------------------------------------------
# regions


def test_regions_empty() -> None:
    assert parse_regions("") == ()
    assert format_regions(()) == ""


def test_regions_seed() -> None:
    specs = parse_regions(SEED_REGIONS)
    assert specs == (
        RegionSpec("mfc_fw", M, None, 128 * K, None, in_asterisk=False),
        RegionSpec("mfc_b1", 32 * M),
        RegionSpec("mfc_b2", 16 * M, start=0x44000000),
    )
    assert derive_asterisk(specs) == ("mfc_b1", "mfc_b2")
    assert format_regions(specs) == SEED_REGIONS


def test_regions_original_seed_with_second_bank_start() -> None:
    specs = parse_regions("-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x40000000")
    assert specs[2].start == 0x40000000


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a=1", RegionSpec("a", 1)),
        ("a=4096", RegionSpec("a", 4096)),
        ("a=0x1000", RegionSpec("a", 0x1000)),
        ("a=010", RegionSpec("a", 8)),
        ("a=1k", RegionSpec("a", K)),
        ("a=1K", RegionSpec("a", K)),
        ("a=2m", RegionSpec("a", 2 * M)),
        ("a=2g", RegionSpec("a", 2 * G)),
        ("-a=1M", RegionSpec("a", M, in_asterisk=False)),
        ("--a=1M", RegionSpec("-a", M, in_asterisk=False)),
        ("a-=1M", RegionSpec("a-", M)),
        ("a=32M@0", RegionSpec("a", 32 * M)),
        ("a=32M@0x0", RegionSpec("a", 32 * M)),
        ("a=32M@0K", RegionSpec("a", 32 * M)),
        ("a=32M@0x40000000", RegionSpec("a", 32 * M, start=0x40000000)),
        ("a=32M@1G", RegionSpec("a", 32 * M, start=G)),
        ("a=1M@0x40000001", RegionSpec("a", M, start=0x40000001)),  # as written, not rounded
        ("a=1M/0", RegionSpec("a", M)),
        ("a=1M/1", RegionSpec("a", M, alignment=1)),
        ("a=1M/128K", RegionSpec("a", M, alignment=128 * K)),
        ("a=1M/0x100000", RegionSpec("a", M, alignment=M)),
        ("a=1M@0/0", RegionSpec("a", M)),
        ("a=1M:bf", RegionSpec("a", M, allocator="bf")),
        ("a=1M:", RegionSpec("a", M)),
        ("a=1M:my-alloc_2.0", RegionSpec("a", M, allocator="my-alloc_2.0")),
        ("a=1M@2G/2M:bitmap", RegionSpec("a", M, 2 * G, 2 * M, "bitmap")),
        ("a=1M@2G:bf", RegionSpec("a", M, start=2 * G, allocator="bf")),
        ("a=1M/64K:bf", RegionSpec("a", M, alignment=64 * K, allocator="bf")),
        ("a=1M;", RegionSpec("a", M)),
        ("a@b:c/d=1M", RegionSpec("a@b:c/d", M)),
        ("r\u00e9gion=1M", RegionSpec("r\u00e9gion", M)),
        ("a=4095@0xfffffffffffff000", RegionSpec("a", 4095, start=0xFFFFFFFFFFFFF000)),
        ("a=1M@0xfffffffffff00000", RegionSpec("a", M, start=0xFFFFFFFFFFF00000)),
        ("a=0xfffffffffffff000", RegionSpec("a", 0xFFFFFFFFFFFFF000)),
        ("a=0xffffffffffffffff", RegionSpec("a", MAX_MEMSIZE)),
    ],
)
def test_regions_forms(text: str, spec: RegionSpec) -> None:
    assert parse_regions(text) == (spec,)


def test_regions_several_and_duplicates() -> None:
    assert parse_regions("a=1M;b=2M;a=3M;") == (
        RegionSpec("a", M),
        RegionSpec("b", 2 * M),
        RegionSpec("a", 3 * M),
    )


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        (";", 0, "expected a region name, found ';'"),
        ("a=1M;;", 5, "expected a region name, found ';'"),
        ("=1M", 0, "expected a region name, found '='"),
        ("-=1M", 1, "expected a region name, found '='"),
        ("-", 1, "expected a region name, found end of input"),
        ("a", 1, "expected '=' and a size after the region name 'a', found end of input"),
        ("a;b=1M", 1, "expected '=' and a size after the region name 'a', found ';'"),
        ("a=", 2, "expected a number, found end of input"),
        ("a=;", 2, "expected a number, found ';'"),
        ("a=M", 2, "expected a number, found 'M'"),
        ("a=0", 2, "size of region 'a' must not be 0"),
        ("a=0K", 2, "must not be 0"),
        ("a=0x0@1G", 2, "must not be 0"),
        ("a=1Mx", 4, "expected '@', '/', ':' or ';' after the size of region 'a', found 'x'"),
        ("a=1M b=1M", 4, "found ' '"),
        ("a=1M\n", 4, "found '\\n'"),
        ("a=1M,b=1M", 4, "found ','"),
        ("a=1M@", 5, "expected a number, found end of input"),
        ("a=1M@x", 5, "expected a number, found 'x'"),
        ("a=1M@1Gx", 7, "expected '/', ':' or ';' after the start of region 'a', found 'x'"),
        ("a=1M@1G@2G", 7, "the optional parts come in the order"),
        ("a=1M/", 5, "expected a number, found end of input"),
        ("a=1M/4Kx", 7, "expected ':' or ';' after the alignment of region 'a', found 'x'"),
        ("a=1M/4K@0", 7, "the optional parts come in the order '@', '/', ':'"),
        ("a=1M/4K/8K", 7, "the optional parts come in the order"),
        ("a=1M/3", 5, "alignment 0x3 is not a power of two"),
        ("a=1M/0x3000", 5, "alignment 0x3000 is not a power of two"),
        ("a=1M/12K", 5, "alignment 0x3000 is not a power of two"),
        ("a=1M:bf(x)", 7, "allocator parameters are not supported"),
        ("a=1M:(x)", 5, "allocator parameters are not supported"),
        ("a=1M:b f", 6, "allocator names may contain only letters, digits"),
        ("a=1M:bf@1G", 7, "allocator names may contain only"),
        ("a=1M:b\u00e9", 6, "allocator names may contain only"),
        ("a b=1M", 1, "region names cannot contain whitespace"),
        ("a\tb=1M", 1, "region names cannot contain whitespace"),
        (" a=1M", 0, "region names cannot contain whitespace"),
        ("a\x00=1M", 1, "region names cannot contain control"),
        ("a\x7f=1M", 1, "region names cannot contain control"),
        ("a,b=1M", 1, "region names cannot contain ','"),
        ("a*=1M", 1, "region names cannot contain '*'"),
        ("*=1M", 0, "region names cannot contain '*'"),
        ("a=08", 3, "'8' is not an octal digit"),
        ("a=0x", 4, "expected a hex digit"),
        ("a=18446744073709551616", 2, "too large"),
        ("a=1M@18446744073709551616", 5, "too large"),
        ("a=1M/0x8000000000000000K", 5, "too large"),
        # start + size, rounded as the regions attribute is normalised, must stay within 2^64
        ("a=4097@0xfffffffffffff000", 7, "past the 64-bit address space"),
        ("a=1@0xffffffffffffffff", 4, "past the 64-bit address space"),
        ("a=1M@0xfffffffffff00001/1M", 5, "past the 64-bit address space"),
        ("ok=1M;bad=1M;;", 13, "expected a region name"),
        ("ok=1M;bad=0", 10, "size of region 'bad' must not be 0"),
    ],
)
def test_regions_errors(text: str, position: int, fragment: str) -> None:
    err = syntax_error(parse_regions, text, "regions")
    assert err.position == position, err.message
    assert fragment in err.message


def test_regions_error_message_and_pointer() -> None:
    err = syntax_error(parse_regions, "a=1M/0x3000", "regions")
    assert str(err) == "regions: at column 6: alignment 0x3000 is not a power of two"
    assert err.pointer() == "a=1M/0x3000\n     ^"


def test_regions_max_count() -> None:
    text = ";".join(f"r{i}=4K" for i in range(MAX_REGIONS))
    assert len(parse_regions(text)) == MAX_REGIONS
    assert len(parse_regions(text + ";")) == MAX_REGIONS
    err = syntax_error(parse_regions, text + ";x=4K", "regions")
    assert isinstance(err, AttributeBoundError)
    assert isinstance(err, ENOSPC)
    assert err.errno_name == "ENOSPC"
    assert err.position == len(text) + 1
    assert "too many regions" in err.message


def test_regions_max_length() -> None:
    name = "n" * (MAX_ATTRIBUTE_LENGTH - len("=1M"))
    assert parse_regions(f"{name}=1M") == (RegionSpec(name, M),)
    err = syntax_error(parse_regions, f"{name}x=1M", "regions")
    assert isinstance(err, AttributeBoundError)
    assert err.position == MAX_ATTRIBUTE_LENGTH
    assert "longer than" in err.message


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (RegionSpec("a", 4097), "a=0x1001"),
        (RegionSpec("a", 3 * G, start=G), "a=3G@0x40000000"),
        (RegionSpec("a", M, 0x40001000, 4 * K, "bf", False), "-a=1M@0x40001000/4K:bf"),
        (RegionSpec("-a", M, in_asterisk=False), "--a=1M"),
    ],
)
def test_format_regions(spec: RegionSpec, text: str) -> None:
    assert format_regions((spec,)) == text
    assert parse_regions(text) == (spec,)


@pytest.mark.parametrize(
    "spec",
    [
        RegionSpec("a", 0),
        RegionSpec("a", -1),
        RegionSpec("a", MAX_MEMSIZE + 1),
        RegionSpec("", M),
        RegionSpec("a,b", M),
        RegionSpec("a=b", M),
        RegionSpec("a;b", M),
        RegionSpec("a b", M),
        RegionSpec("-a", M),  # the '-' would read back as "not in the asterisk list"
        RegionSpec("a", M, start=0),  # 0 reads back as None
        RegionSpec("a", M, start=-1),
        RegionSpec("a", M, alignment=0),
        RegionSpec("a", M, alignment=3 * K),
        RegionSpec("a", M, allocator=""),
        RegionSpec("a", M, allocator="bf(x)"),
        RegionSpec("a", M, allocator="b;c=1M"),
        RegionSpec("a", 8 * K, start=MAX_MEMSIZE - 4095),
    ],
)
def test_format_regions_refuses_unwritable_specs(spec: RegionSpec) -> None:
    with pytest.raises(EINVAL) as info:
        format_regions((spec,))
    assert info.value.where == "regions"


def test_format_regions_refuses_too_many() -> None:
    with pytest.raises(EINVAL):
        format_regions(tuple(RegionSpec(f"r{i}", 4096) for i in range(MAX_REGIONS + 1)))


def test_derive_asterisk() -> None:
    assert derive_asterisk(()) == ()
    assert derive_asterisk(parse_regions("-a=1M;-b=1M")) == ()
    assert derive_asterisk(parse_regions("c=1M;-a=1M;b=1M;c=2M")) == ("c", "b", "c")


# --------------------------------------------------------------------------------------------
# map


@pytest.mark.parametrize(
    ("pattern", "name", "result"),
    [
        ("abc", "abc", True),
        ("abc", "abd", False),
        ("abc", "ab", False),
        ("abc", "abcd", False),
        ("abc", "ABC", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("a?c", "abbc", False),
        ("???", "xyz", True),
        ("a*", "a", True),
        ("a*", "abc", True),
        ("a*", "b", False),
        ("*", "", True),
        ("*", "anything", True),
        ("?*", "", False),
        ("?*", "x", True),
        ("[a]", "a", False),  # no fnmatch character classes
        ("[a]", "[a]", True),
    ],
)
def test_match_part(pattern: str, name: str, result: bool) -> None:
    assert match_part(pattern, name) is result


@pytest.mark.parametrize("text", ["", "\n"])
def test_map_unset(text: str) -> None:
    assert parse_map(text) is None
    assert format_map(None) == ""


def test_map_seed() -> None:
    value = parse_map(SEED_MAP)
    assert value == Map(
        (
            MapRule((Pattern("s3c-mfc5", "f"),), ("mfc_fw",)),
            MapRule((Pattern("s3c-mfc5", "a"),), ("mfc_b1",)),
            MapRule((Pattern("s3c-mfc5", "b"),), ("mfc_b2",)),
        )
    )
    assert format_map(value) == SEED_MAP
    assert value.resolve("s3c-mfc5", "f") == ("mfc_fw",)
    assert value.resolve("s3c-mfc5", "a") == ("mfc_b1",)
    assert value.resolve("s3c-mfc5", "b") == ("mfc_b2",)
    # no rule matches: the implied */*=* gives the asterisk list
    assert value.resolve("s3c-mfc5", "") is None
    assert value.resolve("s3c-mfc5", "c") is None
    assert value.resolve("other", "f") is None


@pytest.mark.parametrize("suffix", [";", "\n", ";\n"])
def test_map_trailing_semicolon_and_newline(suffix: str) -> None:
    assert parse_map(SEED_MAP + suffix) == parse_map(SEED_MAP)


@pytest.mark.parametrize(
    ("text", "rules"),
    [
        ("a=r", (MapRule((Pattern("a", None),), ("r",)),)),
        ("a/k=r", (MapRule((Pattern("a", "k"),), ("r",)),)),
        ("a/*=*", (MapRule((Pattern("a", "*"),), None),)),
        ("*/*=*", (MapRule((Pattern("*", "*"),), None),)),
        ("a=", (MapRule((Pattern("a", None),), ()),)),
        ("a=;b=r", (MapRule((Pattern("a", None),), ()), MapRule((Pattern("b", None),), ("r",)))),
        ("a=r1,r2,r3", (MapRule((Pattern("a", None),), ("r1", "r2", "r3")),)),
        ("a,b/k,/j=r", (
            MapRule((Pattern("a", None), Pattern("b", "k"), Pattern(None, "j")), ("r",)),
        )),
        ("a?c*/k?=r", (MapRule((Pattern("a?c*", "k?"),), ("r",)),)),
        ("foo/quaz=r2;/*=r3", (
            MapRule((Pattern("foo", "quaz"),), ("r2",)),
            MapRule((Pattern(None, "*"),), ("r3",)),
        )),
        ("a@b:c=r/x", (MapRule((Pattern("a@b:c", None),), ("r/x",)),)),
        ("?=-r", (MapRule((Pattern("?", None),), ("-r",)),)),
    ],
)  # fmt: skip
def test_map_forms(text: str, rules: tuple[MapRule, ...]) -> None:
    value = parse_map(text)
    assert value == Map(rules)
    assert parse_map(format_map(value)) == value


def test_resolve_first_matching_rule_wins() -> None:
    value = parse_map("dev/k=r1;dev/*=r2;d*=r3;*/*=*")
    assert value is not None
    assert value.resolve("dev", "k") == ("r1",)
    assert value.resolve("dev", "j") == ("r2",)
    assert value.resolve("dev", "") == ("r2",)
    assert value.resolve("dx", "") == ("r3",)
    assert value.resolve("dx", "k") is None  # the explicit */*=* rule
    assert value.resolve("zz", "") is None


def test_resolve_pattern_without_kind_matches_only_empty_kind() -> None:
    value = parse_map("dev=r1;dev/*=r2")
    assert value is not None
    assert value.resolve("dev", "") == ("r1",)
    assert value.resolve("dev", "x") == ("r2",)


def test_resolve_question_mark_and_trailing_star() -> None:
    value = parse_map("s3c-mfc?/?=r1;s3c-*/long*=r2;*=r3")
    assert value is not None
    assert value.resolve("s3c-mfc5", "a") == ("r1",)
    assert value.resolve("s3c-mfc55", "a") is None
    assert value.resolve("s3c-mfc5", "ab") is None
    assert value.resolve("s3c-fimc", "long") == ("r2",)
    assert value.resolve("s3c-fimc", "longer") == ("r2",)
    assert value.resolve("s3c-fimc", "lon") is None
    assert value.resolve("anything", "") == ("r3",)


def test_resolve_literal_characters_are_case_sensitive() -> None:
    value = parse_map("Dev=r")
    assert value is not None
    assert value.resolve("Dev", "") == ("r",)
    assert value.resolve("dev", "") is None


def test_resolve_empty_dev_part_follows_previous_dev_pattern_across_rules() -> None:
    value = parse_map("foo/quaz=r2;/*=r3")
    assert value is not None
    assert value.resolve("foo", "quaz") == ("r2",)
    assert value.resolve("foo", "other") == ("r3",)
    assert value.resolve("foo", "") == ("r3",)
    assert value.resolve("bar", "other") is None  # previous dev pattern "foo" did not match


def test_resolve_empty_dev_part_uses_the_most_recent_dev_pattern() -> None:
    value = parse_map("a/x=r1,r2;b/y,/z=r3;/w=r4")
    assert value is not None
    assert value.resolve("a", "x") == ("r1", "r2")
    assert value.resolve("a", "z") is None  # the most recent dev pattern is "b"
    assert value.resolve("b", "z") == ("r3",)
    assert value.resolve("b", "w") == ("r4",)
    assert value.resolve("a", "w") is None


def test_resolve_star_rules_and_empty_lists() -> None:
    value = parse_map("a=*;b=;c/*=r")
    assert value is not None
    assert value.resolve("a", "") is None
    assert value.resolve("b", "") == ()
    assert value.resolve("c", "k") == ("r",)


def test_resolve_empty_device_name_is_einval() -> None:
    value = parse_map("*/*=r")
    assert value is not None
    with pytest.raises(EINVAL) as info:
        value.resolve("", "")
    assert "device name must not be empty" in info.value.message
    assert not isinstance(info.value, AttributeSyntaxError)


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        (";", 0, "expected a pattern"),
        (";;", 0, "expected a pattern"),
        ("a=r;;", 4, "expected a pattern (dev, dev/kind or /kind), found ';'"),
        ("=r", 0, "expected a pattern (dev, dev/kind or /kind), found '='"),
        ("a,=r", 2, "expected a pattern"),
        (",a=r", 0, "expected a pattern"),
        ("a=r;=s", 4, "expected a pattern"),
        ("a", 1, "expected ',' or '=' and a region list after a pattern, found end of input"),
        ("a;b=r", 1, "found ';'"),
        ("a/k", 3, "found end of input"),
        ("a=r;b", 5, "found end of input"),
        ("/k=r", 0, "the pattern '/k' has no device pattern before it"),
        ("/*=r;a=s", 0, "has no device pattern before it"),
        ("a/=r", 2, "expected a kind pattern after '/', found '='"),
        ("a/,b=r", 2, "expected a kind pattern"),
        ("/=r", 1, "expected a kind pattern"),
        ("a/b/c=r", 3, "at most one '/'"),
        ("a*b=r", 1, "'*' is allowed only as the last character of a device pattern"),
        ("**=r", 0, "'*' is allowed only as the last character"),
        ("a/*k=r", 2, "'*' is allowed only as the last character of a kind pattern"),
        ("a b=r", 1, "device patterns cannot contain whitespace"),
        ("a* =r", 2, "device patterns cannot contain whitespace"),
        ("a/k\t=r", 3, "kind patterns cannot contain whitespace"),
        (" a=r", 0, "cannot contain whitespace"),
        ("a\x01=r", 1, "cannot contain whitespace or control"),
        ("a=r s", 3, "region names cannot contain whitespace"),
        ("a=r,", 4, "empty region name"),
        ("a=,r", 2, "empty region name"),
        ("a=r,,s", 4, "empty region name"),
        ("a=r,;b=s", 4, "empty region name"),
        ("a=*,r", 2, "'*' (the asterisk list) must be the whole region list"),
        ("a=r,*", 4, "'*' (the asterisk list) must be the whole region list"),
        ("a=**", 2, "must be the whole region list"),
        ("a=* ", 2, "must be the whole region list"),
        ("a=r*", 3, "must be the whole region list"),
        ("a=r=s", 3, "region names cannot contain '='"),
        ("a=r\nb=s", 3, "single line"),
        ("a=r\n\n", 3, "single line"),
        ("a=r\n;", 3, "single line"),
        ("\n\n", 0, "single line"),
        ("a=r\x00", 3, "NUL"),
        ("a\x00=r", 1, "NUL"),
    ],
)
def test_map_errors(text: str, position: int, fragment: str) -> None:
    err = syntax_error(parse_map, text, "map")
    assert err.position == position, err.message
    assert fragment in err.message


def test_map_max_length() -> None:
    body = "a=" + "r" * (MAX_ATTRIBUTE_LENGTH - 2)
    assert parse_map(body + "\n") is not None
    err = syntax_error(parse_map, body + "r", "map")
    assert isinstance(err, AttributeBoundError)
    assert err.position == MAX_ATTRIBUTE_LENGTH
    assert "longer than" in err.message


def test_format_map_empty_rules_is_unset() -> None:
    assert format_map(Map(())) == ""


@pytest.mark.parametrize(
    "value",
    [
        Map((MapRule((Pattern(None, "k"),), ("r",)),)),  # no dev pattern before /k
        Map((MapRule((), ("r",)),)),
        Map((MapRule((Pattern(None, None),), ("r",)),)),
        Map((MapRule((Pattern("", "k"),), ("r",)),)),
        Map((MapRule((Pattern("a", ""),), ("r",)),)),
        Map((MapRule((Pattern("a*b", None),), ("r",)),)),
        Map((MapRule((Pattern("a b", None),), ("r",)),)),
        Map((MapRule((Pattern("a/b", None),), ("r",)),)),
        Map((MapRule((Pattern("a", None),), ("",)),)),
        Map((MapRule((Pattern("a", None),), ("*",)),)),
        Map((MapRule((Pattern("a", None),), ("r;b=s",)),)),
    ],
)
def test_format_map_refuses_unwritable_maps(value: Map) -> None:
    with pytest.raises(EINVAL) as info:
        format_map(value)
    assert info.value.where == "map"


# --------------------------------------------------------------------------------------------
# asterisk


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", ()),
        ("\n", ()),
        ("a", ("a",)),
        ("a\n", ("a",)),
        ("mfc_b1,mfc_b2", ("mfc_b1", "mfc_b2")),
        ("a,b,a", ("a", "b", "a")),
        ("-a,b/c", ("-a", "b/c")),
    ],
)
def test_asterisk(text: str, names: tuple[str, ...]) -> None:
    assert parse_asterisk(text) == names
    assert parse_asterisk(format_asterisk(names)) == names


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        (",", 0, "empty region name"),
        ("a,", 2, "empty region name"),
        ("a,\n", 2, "empty region name"),
        (",a", 0, "empty region name"),
        ("a,,b", 2, "empty region name"),
        ("a b", 1, "region names cannot contain whitespace"),
        (" a", 0, "whitespace"),
        ("a\n\n", 1, "whitespace"),
        ("a\nb", 1, "whitespace"),
        ("a\x00", 1, "control"),
        ("*", 0, "region names cannot contain '*'"),
        ("a,*", 2, "'*'"),
        ("a;b", 1, "region names cannot contain ';'"),
        ("a=b", 1, "region names cannot contain '='"),
    ],
)
def test_asterisk_errors(text: str, position: int, fragment: str) -> None:
    err = syntax_error(parse_asterisk, text, "asterisk")
    assert err.position == position, err.message
    assert fragment in err.message


def test_asterisk_max_length() -> None:
    name = "a" * MAX_ATTRIBUTE_LENGTH
    assert parse_asterisk(name + "\n") == (name,)
    err = syntax_error(parse_asterisk, name + "a", "asterisk")
    assert isinstance(err, AttributeBoundError)
    assert err.position == MAX_ATTRIBUTE_LENGTH


@pytest.mark.parametrize("names", [("",), ("a", ""), ("a,b",), ("a b",), ("*",), ("a\n",)])
def test_format_asterisk_refuses_unwritable_names(names: tuple[str, ...]) -> None:
    with pytest.raises(EINVAL) as info:
        format_asterisk(names)
    assert info.value.where == "asterisk"
