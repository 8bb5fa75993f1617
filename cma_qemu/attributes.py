"""The three CMA attribute strings of the 2010 patch set: regions, map and asterisk.

Pure parsers and formatters (no I/O) of the grammars in docs/semantics.md, with the
project's decisions: the map follows its grammar exactly (not the v2 matcher's quirks), ``@0``
and ``/0`` mean "anywhere" / "default", and generous bounds replace v2's 15-region and
128-byte limits. Every malformed input raises :class:`~cma_qemu.errors.AttributeSyntaxError`
with the offending position, so a front end can point at it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from cma_qemu.errors import EINVAL, ENOSPC, AttributeSyntaxError

__all__ = [
    "MAX_ATTRIBUTE_LENGTH",
    "MAX_MEMSIZE",
    "MAX_REGIONS",
    "PAGE_SIZE",
    "AttributeBoundError",
    "Map",
    "MapRule",
    "Pattern",
    "RegionSpec",
    "derive_asterisk",
    "format_asterisk",
    "format_map",
    "format_memsize",
    "format_regions",
    "match_part",
    "memparse",
    "parse_asterisk",
    "parse_map",
    "parse_memsize",
    "parse_regions",
]

PAGE_SIZE = 4096
MAX_ATTRIBUTE_LENGTH = 64 * 1024
MAX_REGIONS = 1024
#: The largest value ``memparse`` can return (it yields an ``unsigned long long``).
MAX_MEMSIZE = 2**64 - 1

_ADDRESS_SPACE_END = 2**64
_SUFFIX_SHIFTS = {"K": 10, "k": 10, "M": 20, "m": 20, "G": 30, "g": 30}
_DEC_DIGITS = frozenset(string.digits)
_OCT_DIGITS = frozenset("01234567")
_HEX_DIGITS = frozenset(string.hexdigits)
_ALLOC_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
# Characters that end a part of a map pattern.
_PART_ENDS = frozenset(",;=/")
# Longest digit strings (leading zeros stripped) that can still fit in 64 bits.
_MAX_DIGITS = {8: 22, 10: 20, 16: 16}


@dataclass(frozen=True)
class RegionSpec:
    """One ``[-]NAME=SIZE[@START][/ALIGN][:ALLOC]`` entry, as written (not yet normalised).

    ``start`` and ``alignment`` are None when absent or given as 0 ("anywhere" / "default").
    """

    name: str
    size: int
    start: int | None = None
    alignment: int | None = None
    allocator: str | None = None
    in_asterisk: bool = True


@dataclass(frozen=True)
class Pattern:
    """``dev[/kind]``; ``dev`` None is the empty dev part, ``kind`` None means no ``/kind``."""

    dev: str | None
    kind: str | None


@dataclass(frozen=True)
class MapRule:
    """``patterns=regions``; ``regions`` None stands for ``*`` (the asterisk list)."""

    patterns: tuple[Pattern, ...]
    regions: tuple[str, ...] | None


@dataclass(frozen=True)
class Map:
    """A parsed map attribute: rules tried in order, the first match wins."""

    rules: tuple[MapRule, ...]

    def resolve(self, dev: str, kind: str) -> tuple[str, ...] | None:
        """Region names for (dev, kind) from the first matching rule; None = use asterisk.

        No matching rule also gives None (the documented implied ``*/*=*``). ``kind`` is ""
        for "no kind". An empty device name is EINVAL, as in v2.
        """
        if not dev:
            raise EINVAL("device name must not be empty", where="map")
        kind = kind or ""
        # An empty dev part repeats the verdict of the most recent dev pattern, across rules.
        previous_dev_matched = False
        for rule in self.rules:
            for pattern in rule.patterns:
                if pattern.dev is None:
                    dev_matches = previous_dev_matched
                else:
                    dev_matches = match_part(pattern.dev, dev)
                    previous_dev_matched = dev_matches
                if pattern.kind is None:
                    kind_matches = kind == ""
                else:
                    kind_matches = match_part(pattern.kind, kind)
                if dev_matches and kind_matches:
                    return rule.regions
        return None


def match_part(pattern: str, name: str) -> bool:
    """Match one pattern part: ``?`` is any one character, a final ``*`` any rest.

    Everything else, including a ``*`` that is not last, is literal and case-sensitive.
    Written by hand because fnmatch's ``[...]`` and inner ``*`` mean something else.
    """
    for i, ch in enumerate(pattern):
        if ch == "*" and i == len(pattern) - 1:
            return True
        if i >= len(name) or (ch != "?" and ch != name[i]):
            return False
    return len(name) == len(pattern)


class AttributeBoundError(AttributeSyntaxError, ENOSPC):
    """An attribute over a documented bound (length, region count).

    Still a syntax error with a position, but its errno is ENOSPC, as v2 returned for too
    many regions and as ``errors.ENOSPC`` documents.
    """

    errno_name = "ENOSPC"


# --------------------------------------------------------------------------------------------
# Scanning helpers


class _Scanner:
    """A position in one attribute string plus the error helpers that report it."""

    __slots__ = ("attribute", "end", "pos", "text")

    def __init__(self, attribute: str, text: str, end: int | None = None) -> None:
        self.attribute = attribute
        self.text = text
        # ``end`` excludes an accepted trailing newline from the grammar.
        self.end = len(text) if end is None else end
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> str:
        """The current character, or "" at the end."""
        return self.text[self.pos] if self.pos < self.end else ""

    def found(self, pos: int | None = None) -> str:
        """How to name the character at ``pos`` in a message."""
        pos = self.pos if pos is None else pos
        return "end of input" if pos >= self.end else repr(self.text[pos])

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        raise AttributeSyntaxError(
            self.attribute, self.text, self.pos if pos is None else pos, message
        )

    def fail_bound(self, message: str, pos: int) -> NoReturn:
        raise AttributeBoundError(self.attribute, self.text, pos, message)

    def check_length(self) -> None:
        """Refuse hostile, huge attributes before doing any work on them."""
        if self.end > MAX_ATTRIBUTE_LENGTH:
            self.fail_bound(
                f"the {self.attribute} attribute is longer than {MAX_ATTRIBUTE_LENGTH} characters",
                MAX_ATTRIBUTE_LENGTH,
            )


def _name_char_problem(ch: str) -> str | None:
    """Why ``ch`` cannot be part of a region name (None if it can).

    ',' and ';' separate names in the map and asterisk, '*' means the asterisk list and '='
    ends a name in the regions attribute, so a name with any of them could never be found.
    """
    if ch.isspace():
        return f"whitespace ({ch!r})"
    if not ch.isprintable():
        return f"control or unprintable characters ({ch!r})"
    if ch in ",;*=":
        return repr(ch)
    return None


def _unprintable(ch: str) -> bool:
    return ch.isspace() or not ch.isprintable()


def _without_trailing_newline(text: str) -> int:
    """The end of the grammar's text: sysfs-style writes may add exactly one newline."""
    return len(text) - 1 if text.endswith("\n") else len(text)


# --------------------------------------------------------------------------------------------
# memparse


#: One memparse number: ``0x`` hex, leading-``0`` octal or decimal digits, one optional suffix.
_MEMSIZE = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([kKmMgG]?)")


def _memsize_value(digits: str, suffix: str) -> int | None:
    """The value of a :data:`_MEMSIZE` match's groups; None above 2^64-1."""
    if digits[:2] in ("0x", "0X"):
        base, body = 16, digits[2:]
    elif digits[0] == "0":
        base, body = 8, digits
    else:
        base, body = 10, digits
    significant = body.lstrip("0") or "0"
    # Check the length first: int() refuses very long digit strings, and they cannot fit.
    if len(significant) > _MAX_DIGITS[base]:
        return None
    value = int(significant, base) << _SUFFIX_SHIFTS.get(suffix, 0)
    return value if value <= MAX_MEMSIZE else None


def memparse(token: str, *, suffix: bool = True) -> int | None:
    """A whole token read as :func:`parse_memsize` reads it; None unless it is exactly one number.

    For callers that report their own error (the line format, CLI operands). ``suffix=False``
    refuses ``K``/``M``/``G``. Runtime complexity: O(len(token)).
    """
    if token.isdigit() and token.isascii() and token[0] != "0" and len(token) <= 20:
        value = int(token)  # plain decimal, most input: no regex (the replay hot path)
        return value if value <= MAX_MEMSIZE else None
    match = _MEMSIZE.fullmatch(token)
    if match is None or (match[2] and not suffix):
        return None
    return _memsize_value(match[1], match[2])


def parse_memsize(text: str, position: int = 0, *, attribute: str = "size") -> tuple[int, int]:
    """Kernel ``memparse`` at ``position``: returns (value, position after it).

    ``strtoull`` base 0 (decimal, ``0x`` hex, leading-``0`` octal), then one optional
    ``K``/``M``/``G`` suffix (either case). Parsing stops at the first other character; the
    caller decides whether it may follow. No digits, or a value above 2^64-1, is an error.
    This is the project's one memparse: :func:`memparse` reads whole tokens with it.
    """
    if not 0 <= position <= len(text):
        raise ValueError(f"position {position} is outside the text (length {len(text)})")
    match = _MEMSIZE.match(text, position)
    if match is not None:
        digits, end = match[1], match.end()
        following = text[match.end(1) : match.end(1) + 1]  # what stopped the digits
        hex_prefix_alone = digits == "0" and following in ("x", "X")
        octal_then_decimal = (
            digits[:2] not in ("0x", "0X") and digits[0] == "0" and (following in ("8", "9"))
        )
        if not hex_prefix_alone and not octal_then_decimal:
            value = _memsize_value(digits, match[2])
            if value is not None:
                return value, end
    _memsize_error(_Scanner(attribute, text), position)


def _memsize_error(sc: _Scanner, position: int) -> NoReturn:
    """Why there is no valid number at ``position`` (only called when there is none)."""
    text = sc.text
    sc.pos = position
    if text.startswith(("0x", "0X"), position):
        digits_start = position + 2
        if digits_start >= len(text) or text[digits_start] not in _HEX_DIGITS:
            sc.fail(
                f"expected a hex digit after {text[position : position + 2]!r}, "
                f"found {sc.found(digits_start)}",
                digits_start,
            )
    elif sc.peek() not in _DEC_DIGITS:
        sc.fail(f"expected a number, found {sc.found()}")
    elif sc.peek() == "0":
        end = position
        while end < len(text) and text[end] in _OCT_DIGITS:
            end += 1
        if end < len(text) and text[end] in "89":
            sc.fail(
                f"{text[end]!r} is not an octal digit (a number with a leading 0 is octal)", end
            )
    sc.fail("number is too large: the largest value is 0xffffffffffffffff (2^64-1)")


def format_memsize(value: int) -> str:
    """``value`` with the largest exact suffix (``G``, ``M``, ``K``), else in ``0x`` hex.

    The result reads back through :func:`parse_memsize` to the same value.
    """
    if value < 0 or value > MAX_MEMSIZE:
        raise ValueError(f"{value} is not a memparse value (0 .. 2^64-1)")
    if value == 0:
        return "0"
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return f"{value:#x}"


# --------------------------------------------------------------------------------------------
# regions


def parse_regions(text: str) -> tuple[RegionSpec, ...]:
    """Parse ``[-]NAME=SIZE[@START][/ALIGN][:ALLOC]`` entries separated by ``;``.

    One trailing ``;`` is allowed; an empty string gives no regions. Unlike v2, an error
    rejects the whole string (no partial result), so a typo never half-applies.
    """
    sc = _Scanner("regions", text)
    sc.check_length()
    specs: list[RegionSpec] = []
    while not sc.at_end():
        if len(specs) == MAX_REGIONS:
            sc.fail_bound(f"too many regions: at most {MAX_REGIONS} are allowed", sc.pos)
        specs.append(_parse_region(sc))
        if not sc.at_end():
            sc.pos += 1  # the ';' that _parse_region stopped at; a trailing one ends the loop
    return tuple(specs)


def _parse_region(sc: _Scanner) -> RegionSpec:
    in_asterisk = True
    if sc.peek() == "-":
        in_asterisk = False
        sc.pos += 1
    name_start = sc.pos
    while not sc.at_end() and sc.peek() != "=":
        ch = sc.peek()
        if ch == ";":
            break
        problem = _name_char_problem(ch)
        if problem is not None:
            sc.fail(f"region names cannot contain {problem}")
        sc.pos += 1
    name = sc.text[name_start : sc.pos]
    if not name:
        sc.fail(f"expected a region name, found {sc.found()}")
    if sc.peek() != "=":
        sc.fail(f"expected '=' and a size after the region name {name!r}, found {sc.found()}")
    sc.pos += 1

    size_pos = sc.pos
    size, sc.pos = parse_memsize(sc.text, sc.pos, attribute="regions")
    if size == 0:
        sc.fail(f"the size of region {name!r} must not be 0", size_pos)
    after, expected = "the size", "'@', '/', ':' or ';'"

    start: int | None = None
    start_pos = 0
    if sc.peek() == "@":
        sc.pos += 1
        start_pos = sc.pos
        value, sc.pos = parse_memsize(sc.text, sc.pos, attribute="regions")
        start = value or None
        after, expected = "the start", "'/', ':' or ';'"

    alignment: int | None = None
    if sc.peek() == "/":
        sc.pos += 1
        align_pos = sc.pos
        value, sc.pos = parse_memsize(sc.text, sc.pos, attribute="regions")
        if value & (value - 1):
            sc.fail(f"alignment {value:#x} is not a power of two", align_pos)
        alignment = value or None
        after, expected = "the alignment", "':' or ';'"

    allocator: str | None = None
    if sc.peek() == ":":
        sc.pos += 1
        alloc_start = sc.pos
        while not sc.at_end() and sc.peek() != ";":
            ch = sc.peek()
            if ch == "(":
                sc.fail("allocator parameters are not supported (':name(params)')")
            if ch not in _ALLOC_CHARS:
                sc.fail(
                    "allocator names may contain only letters, digits, '_', '.' and '-', "
                    f"found {ch!r}"
                )
            sc.pos += 1
        allocator = sc.text[alloc_start : sc.pos] or None

    if not sc.at_end() and sc.peek() != ";":
        hint = ""
        if sc.peek() in "@/:":
            hint = " (the optional parts come in the order '@', '/', ':', each at most once)"
        sc.fail(f"expected {expected} after {after} of region {name!r}, found {sc.found()}{hint}")

    if start is not None:
        # The normalisation (docs/semantics.md) must not wrap around the 64-bit address space.
        step = max(alignment or 0, PAGE_SIZE)
        rounded_start = -(-start // step) * step
        rounded_size = -(-size // PAGE_SIZE) * PAGE_SIZE
        if rounded_start + rounded_size > _ADDRESS_SPACE_END:
            sc.fail(
                f"region {name!r} would end past the 64-bit address space "
                f"(start {rounded_start:#x} + size {rounded_size:#x} after rounding)",
                start_pos,
            )
    return RegionSpec(name, size, start, alignment, allocator, in_asterisk)


def format_regions(specs: tuple[RegionSpec, ...]) -> str:
    """Write specs as a regions attribute that parses back to an equal tuple.

    Sizes and alignments use the largest exact suffix; starts are addresses, so they are
    written in hex. A spec that cannot be written that way raises EINVAL.
    """
    parts: list[str] = []
    for spec in specs:
        try:
            part = ("" if spec.in_asterisk else "-") + f"{spec.name}={format_memsize(spec.size)}"
            if spec.start is not None:
                part += f"@{spec.start:#x}"
            if spec.alignment is not None:
                part += f"/{format_memsize(spec.alignment)}"
        except ValueError as exc:
            raise EINVAL(f"cannot write region {spec.name!r}: {exc}", where="regions") from exc
        if spec.allocator is not None:
            part += f":{spec.allocator}"
        parts.append(part)
    text = ";".join(parts)
    _check_round_trip("regions", text, parse_regions, tuple(specs))
    return text


# --------------------------------------------------------------------------------------------
# map


def parse_map(text: str) -> Map | None:
    """Parse the map attribute (the intended semantics); None for empty (unset).

    One trailing newline (sysfs writes) and one trailing ``;`` are accepted.
    """
    sc = _Scanner("map", text, _without_trailing_newline(text))
    sc.check_length()
    for i in range(sc.end):
        if text[i] == "\n":
            sc.fail("the map must be a single line (only one trailing newline is allowed)", i)
        if text[i] == "\0":
            sc.fail("the map must not contain a NUL character", i)
    if sc.at_end():
        return None
    rules: list[MapRule] = []
    seen_dev = False
    while True:
        patterns: list[Pattern] = []
        while True:
            pattern = _parse_pattern(sc, seen_dev)
            seen_dev = seen_dev or pattern.dev is not None
            patterns.append(pattern)
            if sc.peek() != ",":
                break
            sc.pos += 1
        if sc.peek() != "=":
            sc.fail(f"expected ',' or '=' and a region list after a pattern, found {sc.found()}")
        sc.pos += 1
        rules.append(MapRule(tuple(patterns), _parse_map_regions(sc)))
        if sc.at_end():
            break
        sc.pos += 1  # ';'
        if sc.at_end():
            break  # one trailing ';'
    return Map(tuple(rules))


def _parse_pattern(sc: _Scanner, seen_dev: bool) -> Pattern:
    start = sc.pos
    dev = _parse_part(sc, "device")
    kind: str | None = None
    if sc.peek() == "/":
        sc.pos += 1
        kind = _parse_part(sc, "kind")
        if not kind:
            sc.fail(f"expected a kind pattern after '/', found {sc.found()}")
        if sc.peek() == "/":
            sc.fail("a pattern has at most one '/' (dev/kind)")
    if dev:
        return Pattern(dev, kind)
    if kind is None:
        sc.fail(f"expected a pattern (dev, dev/kind or /kind), found {sc.found()}", start)
    if not seen_dev:
        sc.fail(
            f"the pattern '/{kind}' has no device pattern before it "
            "(an empty device part repeats the previous device pattern's result)",
            start,
        )
    return Pattern(None, kind)


def _parse_part(sc: _Scanner, what: str) -> str:
    """One dev or kind part: ``?`` any one character, ``*`` the rest but only at the end."""
    begin = sc.pos
    text = sc.text
    while not sc.at_end() and sc.peek() not in _PART_ENDS:
        ch = sc.peek()
        if _unprintable(ch):
            sc.fail(f"{what} patterns cannot contain whitespace or control characters ({ch!r})")
        following = text[sc.pos + 1] if sc.pos + 1 < sc.end else ""
        # (Whitespace after a '*' is reported as whitespace, on the next character.)
        if ch == "*" and following and following not in _PART_ENDS and not _unprintable(following):
            sc.fail(f"'*' is allowed only as the last character of a {what} pattern")
        sc.pos += 1
    return text[begin : sc.pos]


def _parse_map_regions(sc: _Scanner) -> tuple[str, ...] | None:
    """The list after ``=``: names, exactly ``*`` (None), or nothing (an empty list)."""
    begin = sc.pos
    stop = sc.text.find(";", begin, sc.end)
    stop = sc.end if stop < 0 else stop
    if sc.text[begin:stop] == "*":
        sc.pos = stop
        return None
    return _scan_names(sc, stop, in_map=True)


def format_map(value: Map | None) -> str:
    """Write a map attribute that parses back to an equal Map; "" for unset (or no rules)."""
    if value is None or not value.rules:
        return ""
    rules: list[str] = []
    for rule in value.rules:
        patterns = ",".join(
            (p.dev or "") + ("" if p.kind is None else f"/{p.kind}") for p in rule.patterns
        )
        regions = "*" if rule.regions is None else ",".join(rule.regions)
        rules.append(f"{patterns}={regions}")
    text = ";".join(rules)
    expected: Map | None = value
    _check_round_trip("map", text, parse_map, expected)
    return text


# --------------------------------------------------------------------------------------------
# asterisk


def parse_asterisk(text: str) -> tuple[str, ...]:
    """Parse ``[NAME[,NAME]*]``; one trailing newline is accepted.

    v2 stored sysfs writes verbatim, so ``echo name`` left a newline in the name; the
    names are checked here so such mistakes surface at once.
    """
    sc = _Scanner("asterisk", text, _without_trailing_newline(text))
    sc.check_length()
    if sc.at_end():
        return ()
    return _scan_names(sc, sc.end, in_map=False)


def _scan_names(sc: _Scanner, stop: int, *, in_map: bool) -> tuple[str, ...]:
    """Comma-separated non-empty region names from ``sc.pos`` up to ``stop``."""
    if sc.pos == stop:
        return ()
    names: list[str] = []
    text = sc.text
    name_start = sc.pos
    while True:
        if sc.pos == stop or text[sc.pos] == ",":
            if sc.pos == name_start:
                sc.fail("empty region name (two ',' in a row, or a ',' at an end of the list)")
            names.append(text[name_start : sc.pos])
            if sc.pos == stop:
                return tuple(names)
            sc.pos += 1
            name_start = sc.pos
            continue
        ch = text[sc.pos]
        if ch == "*" and in_map:
            sc.fail("'*' (the asterisk list) must be the whole region list, not one of its names")
        problem = _name_char_problem(ch)
        if problem is not None:
            sc.fail(f"region names cannot contain {problem}")
        sc.pos += 1


def format_asterisk(names: tuple[str, ...]) -> str:
    """Write names as an asterisk attribute that parses back to the same tuple."""
    text = ",".join(names)
    _check_round_trip("asterisk", text, parse_asterisk, tuple(names))
    return text


def derive_asterisk(specs: tuple[RegionSpec, ...]) -> tuple[str, ...]:
    """The names without a leading ``-``, in order: the derived asterisk list."""
    return tuple(spec.name for spec in specs if spec.in_asterisk)


# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _check_round_trip(attribute: str, text: str, parse: Callable[[str], _T], value: _T) -> None:
    """Formatting must be lossless: refuse values whose text would read back differently."""
    try:
        parsed = parse(text)
    except AttributeSyntaxError as exc:
        raise EINVAL(
            f"this value cannot be written as a {attribute} attribute: {exc.message}",
            where=attribute,
        ) from exc
    if parsed != value:
        raise EINVAL(
            f"this value cannot be written as a {attribute} attribute: "
            f"it would read back as {parsed!r}",
            where=attribute,
        )
