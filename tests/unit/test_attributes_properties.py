"""Property tests for the attribute parsers: round trips, robustness, and map resolution."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.attributes import (
    MAX_MEMSIZE,
    PAGE_SIZE,
    Map,
    MapRule,
    Pattern,
    RegionSpec,
    derive_asterisk,
    format_asterisk,
    format_map,
    format_memsize,
    format_regions,
    parse_asterisk,
    parse_map,
    parse_memsize,
    parse_regions,
)
from cma_qemu.errors import AttributeSyntaxError

# --------------------------------------------------------------------------------------------
# Strategies


def _printable_except(forbidden: str) -> st.SearchStrategy[str]:
    # Letters, marks, numbers, punctuation and symbols: printable and never whitespace.
    return st.characters(
        codec="utf-8", categories=["L", "M", "N", "P", "S"], exclude_characters=forbidden
    )


NAME_CHARS = _printable_except(",;*=")
names = st.text(NAME_CHARS, min_size=1, max_size=8)
alloc_names = st.text("abcXYZ019_.-", min_size=1, max_size=6)


def _power_of_two() -> st.SearchStrategy[int]:
    return st.integers(0, 63).map(lambda k: 1 << k)


memsizes = st.one_of(
    st.integers(1, MAX_MEMSIZE),
    st.integers(1, 1 << 20).map(lambda v: v << 10),
    st.integers(1, 4096).map(lambda v: v << 20),
    st.integers(1, 64).map(lambda v: v << 30),
    st.integers(1, 1 << 16),
)


def _fits(spec: RegionSpec) -> bool:
    """The regions attribute's normalisation must not carry past 2^64 (as the parser requires)."""
    if spec.start is None:
        return True
    step = max(spec.alignment or 0, PAGE_SIZE)
    start = -(-spec.start // step) * step
    size = -(-spec.size // PAGE_SIZE) * PAGE_SIZE
    return start + size <= 1 << 64


# (Strategies a composite draws from are built once: ``a | b`` inside it is a new object per
# draw, which Hypothesis validates again every time; the fuzz targets draw these 100,000 times.)
_asterisk_names = names.filter(lambda n: not n.startswith("-"))
_starts = st.none() | memsizes
_alignments = st.none() | _power_of_two()
_allocators = st.none() | alloc_names


@st.composite
def region_specs(draw: st.DrawFn) -> RegionSpec:
    in_asterisk = draw(st.booleans())
    name = draw(_asterisk_names if in_asterisk else names)
    spec = RegionSpec(
        name=name,
        size=draw(memsizes),
        start=draw(_starts),
        alignment=draw(_alignments),
        allocator=draw(_allocators),
        in_asterisk=in_asterisk,
    )
    if not _fits(spec):
        spec = RegionSpec(spec.name, spec.size, None, spec.alignment, spec.allocator, in_asterisk)
    return spec


# Pattern parts: small alphabets make matches (and '?' / '*' effects) frequent in resolve tests.
SMALL_PART_CHARS = "ab?"
WIDE_PART_CHARS = _printable_except(",;=/*")


def parts(chars: st.SearchStrategy[str] | str) -> st.SearchStrategy[str]:
    body = st.text(chars, max_size=4)
    # A trailing '*' is the only place it may appear; an empty body always gets one.
    return st.tuples(body, st.booleans()).map(lambda t: t[0] + ("*" if t[1] or not t[0] else ""))


def maps(part: st.SearchStrategy[str], name: st.SearchStrategy[str]) -> st.SearchStrategy[Map]:
    optional_part = st.none() | part
    region_lists = st.none() | st.lists(name, max_size=3).map(tuple)

    @st.composite
    def draw_map(draw: st.DrawFn) -> Map:
        rules: list[MapRule] = []
        for rule_index in range(draw(st.integers(1, 5))):
            patterns: list[Pattern] = []
            for pattern_index in range(draw(st.integers(1, 3))):
                first = rule_index == 0 and pattern_index == 0
                dev = draw(part) if first else draw(optional_part)
                kind = draw(part) if dev is None else draw(optional_part)
                patterns.append(Pattern(dev, kind))
            rules.append(MapRule(tuple(patterns), draw(region_lists)))
        return Map(tuple(rules))

    return draw_map()


small_maps = maps(parts(SMALL_PART_CHARS), st.sampled_from(["r1", "r2", "r3"]))
wide_maps = maps(parts(WIDE_PART_CHARS), names)

# Text built from each grammar's own alphabet reaches deeper than uniformly random text.
REGIONS_ALPHABET = "ab-=;@/:0x19fKkMmGg(),* \n"
MAP_ALPHABET = "ab?*/,;=-\n\x00 "
ASTERISK_ALPHABET = "ab,;*=- \n"


def _check_outcome(parse: Callable[[str], object], attribute: str, text: str) -> object | None:
    """Either a value, or an AttributeSyntaxError about ``attribute`` inside ``text``."""
    try:
        return parse(text)
    except AttributeSyntaxError as err:
        assert err.attribute == attribute
        assert err.text == text
        assert 0 <= err.position <= len(text)
        assert err.message
        return None


# --------------------------------------------------------------------------------------------
# memparse


@given(st.integers(0, MAX_MEMSIZE))
def test_memsize_round_trip(value: int) -> None:
    text = format_memsize(value)
    assert parse_memsize(text) == (value, len(text))


@given(st.integers(0, MAX_MEMSIZE), st.sampled_from(["", "K", "k", "M", "m", "G", "g"]))
def test_memsize_decimal_hex_octal_agree(value: int, suffix: str) -> None:
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[suffix.upper()]
    expected = value << shift
    for number in (str(value), hex(value), "0" + oct(value)[2:]):
        text = number + suffix
        if expected > MAX_MEMSIZE:
            with pytest.raises(AttributeSyntaxError, match="too large"):
                parse_memsize(text)
        else:
            assert parse_memsize(text) == (expected, len(text))


@given(st.text(), st.data())
def test_memsize_arbitrary_text(text: str, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(text)))
    result = _check_outcome(lambda t: parse_memsize(t, position), "size", text)
    if result is not None:
        assert isinstance(result, tuple)
        value, end = result
        assert 0 <= value <= MAX_MEMSIZE
        assert position < end <= len(text)


# --------------------------------------------------------------------------------------------
# regions


@given(st.lists(region_specs(), max_size=6).map(tuple))
def test_regions_round_trip(specs: tuple[RegionSpec, ...]) -> None:
    text = format_regions(specs)
    assert parse_regions(text) == specs
    assert parse_regions(text + ";" if text else "") == specs
    assert derive_asterisk(specs) == tuple(s.name for s in specs if s.in_asterisk)


@given(st.one_of(st.text(), st.text(REGIONS_ALPHABET)))
def test_regions_arbitrary_text(text: str) -> None:
    specs = _check_outcome(parse_regions, "regions", text)
    if specs is not None:
        assert isinstance(specs, tuple)
        assert parse_regions(format_regions(specs)) == specs


# --------------------------------------------------------------------------------------------
# map


@given(st.one_of(small_maps, wide_maps))
def test_map_round_trip(value: Map) -> None:
    text = format_map(value)
    assert parse_map(text) == value
    assert parse_map(text + ";\n") == value


@given(st.one_of(st.text(), st.text(MAP_ALPHABET)))
def test_map_arbitrary_text(text: str) -> None:
    value = _check_outcome(parse_map, "map", text)
    if isinstance(value, Map):
        assert parse_map(format_map(value)) == value


def _part_regex(part: str) -> str:
    """A part as a regex over one field (dev or kind, matched apart with DOTALL)."""
    out = []
    for i, ch in enumerate(part):
        if ch == "*" and i == len(part) - 1:
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def reference_resolve(value: Map, dev: str, kind: str) -> tuple[str, ...] | None:
    """Spell each pattern part out as a regex and take the first rule whose parts both match.

    An empty dev part is replaced by the text of the latest dev pattern before it, which
    matches exactly when that pattern matched the device. (Dev and kind are matched apart:
    joined by a separator, a kind holding that separator once let ``*`` swallow it.)
    """
    latest_dev = ""
    for rule in value.rules:
        for pattern in rule.patterns:
            if pattern.dev is not None:
                latest_dev = pattern.dev
            kind_regex = "" if pattern.kind is None else _part_regex(pattern.kind)
            if re.fullmatch(_part_regex(latest_dev), dev, re.DOTALL) and re.fullmatch(
                kind_regex, kind, re.DOTALL
            ):
                return rule.regions
    return None


devices = st.text("ab", min_size=1, max_size=4)
kinds = st.text("ab", max_size=3)


@given(small_maps, devices, kinds)
def test_resolve_matches_reference(value: Map, dev: str, kind: str) -> None:
    assert value.resolve(dev, kind) == reference_resolve(value, dev, kind)


@given(wide_maps, st.text(WIDE_PART_CHARS, min_size=1, max_size=4), st.text(max_size=3))
def test_resolve_matches_reference_wide(value: Map, dev: str, kind: str) -> None:
    assert value.resolve(dev, kind) == reference_resolve(value, dev, kind)


@given(small_maps, devices, kinds)
def test_resolve_survives_format_and_parse(value: Map, dev: str, kind: str) -> None:
    reparsed = parse_map(format_map(value))
    assert reparsed is not None
    assert reparsed.resolve(dev, kind) == value.resolve(dev, kind)


# --------------------------------------------------------------------------------------------
# asterisk


@given(st.lists(names, max_size=6).map(tuple))
def test_asterisk_round_trip(value: tuple[str, ...]) -> None:
    text = format_asterisk(value)
    assert parse_asterisk(text) == value
    assert parse_asterisk(text + "\n") == value


@given(st.one_of(st.text(), st.text(ASTERISK_ALPHABET)))
def test_asterisk_arbitrary_text(text: str) -> None:
    value = _check_outcome(parse_asterisk, "asterisk", text)
    if isinstance(value, tuple):
        assert parse_asterisk(format_asterisk(value)) == value


def test_reference_agrees_when_the_kind_holds_a_nul() -> None:
    # found by hypothesis: the old reference joined dev and kind with NUL, so `*` swallowed it
    value = parse_map("*=;/*=")
    assert value is not None
    assert value.resolve("0", "\x00") == () == reference_resolve(value, "0", "\x00")
