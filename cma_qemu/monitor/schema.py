"""Declarations of the monitor's commands and events, and their introspection in QEMU's shape.

A command is declared once, as a :class:`Command`: its name, its handler, its argument members
(name, type, optional with a default) and its return type's name. The dispatcher decodes a
request's arguments through that declaration and calls the handler with them by name, and
``query-qmp-schema`` lists the same declarations as QEMU's ``SchemaInfo`` entries, so the two
cannot drift (a handler whose parameters differ from its members is refused when the table is
built). Events are declared the same way (:class:`Event`), types as :class:`ObjectType`,
:class:`Alternate` and :class:`Enum`.

Type names follow QEMU's schema language: ``str``, ``int``, ``bool``, ``any``, ``null``, and
``uint64`` (checked as 0..2**64-1; introspected as ``int``, as QEMU introspects every integer
type); ``[T]`` is an array of ``T``. Implicit argument types are named as unmasked QEMU
names them (``q_obj_NAME-arg``, ``q_empty``); the monitor does not mask type names.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cma_qemu.wire.arguments import Arguments

__all__ = [
    "BUILTIN_JSON_TYPES",
    "EMPTY",
    "INTROSPECTION_TYPES",
    "Alternate",
    "Command",
    "Enum",
    "Event",
    "Member",
    "ObjectType",
    "SchemaType",
    "introspect",
]

#: Builtin type -> the ``json-type`` QEMU reports for it.
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    "int": "int",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}
#: Builtin names that introspect as another builtin (QEMU reports all integers as ``int``).
_BUILTIN_ALIASES = {"uint64": "int"}
#: A valid value per argument type, to check each declared argument has a decoder.
_SAMPLE: dict[str, object] = {"str": "", "uint64": 0, "int": 0, "bool": False}
#: The name of the object with no members (argument type of a command that takes none).
EMPTY = "q_empty"


@dataclass(frozen=True, slots=True)
class Member:
    """One argument or object member. ``default`` is what an absent optional argument means."""

    name: str
    type: str
    optional: bool = False
    default: object = None

    @property
    def python_name(self) -> str:
        """The handler's parameter name (``-`` becomes ``_``; a Python keyword gets ``_``)."""
        name = self.name.replace("-", "_")
        return f"{name}_" if keyword.iskeyword(name) else name

    def read(self, args: Arguments) -> object:
        """The argument's value from a request, checked against the member's type."""
        kind, name, optional = self.type, self.name, self.optional
        default = self.default
        if kind == "str" and (not optional or isinstance(default, str)):
            return args.string(name, default if optional else None)  # type: ignore[arg-type]
        if kind == "uint64" and (not optional or isinstance(default, int)):
            return args.u64(name, default if optional else None)  # type: ignore[arg-type]
        if kind == "int" and not optional:
            return args.integer(name)
        if kind == "bool" and optional and isinstance(default, bool):
            return args.boolean(name, default)
        if kind == "StrOrNull" and optional and default is None:
            return args.optional_string(name)
        if kind == "[str]" and optional and default is None:
            return args.strings(name)
        # a table bug, caught when the table is built
        raise TypeError(f"argument {name}: no decoder for {kind!r} (optional={optional})")


@dataclass(frozen=True, slots=True)
class ObjectType:
    """An object type; ``tag`` and ``variants`` (case -> object type) make it a union."""

    name: str
    members: tuple[Member, ...]
    tag: str | None = None
    variants: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Alternate:
    """A value of any one of ``types`` (``StrOrNull``: a string or null)."""

    name: str
    types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Enum:
    """A string from a fixed set."""

    name: str
    values: tuple[str, ...]


SchemaType = ObjectType | Alternate | Enum


@dataclass(frozen=True)
class Command:
    """One monitor command: called with a request's :class:`Arguments`, it decodes them by
    ``args`` and calls ``handler`` with them as keywords (all of them, defaults filled in).
    """

    name: str
    handler: Callable[..., object]
    args: tuple[Member, ...] = ()
    returns: str = EMPTY

    def __post_init__(self) -> None:
        params = set(inspect.signature(self.handler).parameters)
        declared = {m.python_name for m in self.args}
        if params != declared:
            raise TypeError(
                f"command {self.name}: handler parameters {sorted(params)} differ from the "
                f"declared arguments {sorted(declared)}"
            )
        for member in self.args:  # every argument has a decoder (raises TypeError if not)
            member.read(
                Arguments({})
                if member.optional
                else Arguments({member.name: _SAMPLE.get(member.type)})
            )

    @property
    def arg_type(self) -> str:
        return f"q_obj_{self.name}-arg" if self.args else EMPTY

    def __call__(self, args: Arguments) -> object:
        """Decode, reject leftovers (before any state changes), then run. O(len(args))."""
        values = {m.python_name: m.read(args) for m in self.args}
        args.done()
        return self.handler(**values)


@dataclass(frozen=True, slots=True)
class Event:
    """One event the monitor emits and the members of its ``data``."""

    name: str
    data: tuple[Member, ...]
    doc: str = ""

    @property
    def arg_type(self) -> str:
        return f"q_obj_{self.name}-arg" if self.data else EMPTY


def _introspection_types() -> tuple[SchemaType, ...]:
    """QEMU's ``SchemaInfo`` and its variants: the return type of ``query-qmp-schema``."""
    meta = ("builtin", "enum", "array", "object", "alternate", "command", "event")
    str_list = "[str]"
    return (
        Enum("SchemaMetaType", meta),
        Enum(
            "JSONType", ("string", "number", "int", "boolean", "null", "object", "array", "value")
        ),
        ObjectType(
            "SchemaInfo",
            (Member("name", "str"), Member("meta-type", "SchemaMetaType")),
            tag="meta-type",
            variants=tuple((case, f"SchemaInfo{case.capitalize()}") for case in meta),
        ),
        ObjectType("SchemaInfoBuiltin", (Member("json-type", "JSONType"),)),
        ObjectType(
            "SchemaInfoEnum",
            (
                Member("members", "[SchemaInfoEnumMember]"),
                Member("values", str_list),
            ),
        ),
        ObjectType("SchemaInfoEnumMember", (Member("name", "str"),)),
        ObjectType("SchemaInfoArray", (Member("element-type", "str"),)),
        ObjectType(
            "SchemaInfoObject",
            (
                Member("members", "[SchemaInfoObjectMember]"),
                Member("tag", "str", optional=True),
                Member("variants", "[SchemaInfoObjectVariant]", optional=True),
            ),
        ),
        ObjectType(
            "SchemaInfoObjectMember",
            (
                Member("name", "str"),
                Member("type", "str"),
                Member("default", "any", optional=True),
            ),
        ),
        ObjectType("SchemaInfoObjectVariant", (Member("case", "str"), Member("type", "str"))),
        ObjectType("SchemaInfoAlternate", (Member("members", "[SchemaInfoAlternateMember]"),)),
        ObjectType("SchemaInfoAlternateMember", (Member("type", "str"),)),
        ObjectType("SchemaInfoCommand", (Member("arg-type", "str"), Member("ret-type", "str"))),
        ObjectType("SchemaInfoEvent", (Member("arg-type", "str"),)),
    )


#: The types ``query-qmp-schema``'s own reply is made of.
INTROSPECTION_TYPES: tuple[SchemaType, ...] = _introspection_types()


def _member_info(member: Member) -> dict[str, object]:
    info: dict[str, object] = {"name": member.name, "type": _public(member.type)}
    if member.optional:
        info["default"] = None  # QEMU: present (and null) exactly for optional members
    return info


def _public(name: str) -> str:
    """The name a type is introspected under (integers collapse to ``int``, arrays too)."""
    if name.startswith("[") and name.endswith("]"):
        return f"[{_public(name[1:-1])}]"
    return _BUILTIN_ALIASES.get(name, name)


def introspect(
    commands: Iterable[Command], events: Iterable[Event], types: Iterable[SchemaType]
) -> list[dict[str, object]]:
    """``query-qmp-schema``: every command and event, and every type they reach, once.

    Raises TypeError naming a type that is referenced but not declared (a table bug).
    Cost: O(total members).
    """
    declared = {t.name: t for t in (*INTROSPECTION_TYPES, *types)}
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    pending: list[str] = []

    def use(name: str) -> str:
        public = _public(name)
        if public not in seen:
            seen.add(public)
            pending.append(public)
        return public

    def implicit(name: str, members: Sequence[Member]) -> str:
        if name not in seen:
            seen.add(name)
            out.append(
                {
                    "name": name,
                    "meta-type": "object",
                    "members": [_member_info(m) for m in members],
                }
            )
            for m in members:
                use(m.type)
        return name

    for command in commands:
        out.append(
            {
                "name": command.name,
                "meta-type": "command",
                "arg-type": implicit(command.arg_type, command.args),
                "ret-type": use(command.returns)
                if command.returns != EMPTY
                else implicit(EMPTY, ()),
            }
        )
    for event in events:
        out.append(
            {
                "name": event.name,
                "meta-type": "event",
                "arg-type": implicit(event.arg_type, event.data),
            }
        )
    while pending:
        name = pending.pop(0)
        out.append(_type_info(name, declared, use))
    return out


def _type_info(
    name: str, declared: Mapping[str, SchemaType], use: Callable[[str], str]
) -> dict[str, object]:
    if name in BUILTIN_JSON_TYPES:
        return {"name": name, "meta-type": "builtin", "json-type": BUILTIN_JSON_TYPES[name]}
    if name.startswith("[") and name.endswith("]"):
        return {"name": name, "meta-type": "array", "element-type": use(name[1:-1])}
    found = declared.get(name)
    if found is None:
        raise TypeError(f"type {name!r} is used but not declared")
    if isinstance(found, Enum):
        return {
            "name": name,
            "meta-type": "enum",
            "members": [{"name": v} for v in found.values],
            "values": list(found.values),
        }
    if isinstance(found, Alternate):
        return {
            "name": name,
            "meta-type": "alternate",
            "members": [{"type": use(t)} for t in found.types],
        }
    info: dict[str, object] = {
        "name": name,
        "meta-type": "object",
        "members": [_member_info(m) for m in found.members],
    }
    for m in found.members:
        use(m.type)
    if found.tag is not None:
        info["tag"] = found.tag
        info["variants"] = [{"case": case, "type": use(t)} for case, t in found.variants]
    return info
