"""Request and reply messages of the QMP / guest-agent wire format: decode, validate, encode.

The guest channel and the monitor share one envelope (``execute``, ``arguments``, ``id``), so
both parse through here and report malformed input the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cma_qemu.errors import CmaError, GenericError

__all__ = [
    "OWNER_MEMBER",
    "Request",
    "RequestError",
    "describe_value",
    "encode_error",
    "encode_return",
    "guest_id_ok",
    "parse_request",
]

_ENVELOPE: Final = frozenset({"execute", "arguments", "id"})
#: The envelope member that names who, on the sender's side, a request is for (guest only).
OWNER_MEMBER: Final = "owner"
_MAX_ID_STRING: Final = 256
_ID_MIN: Final = -(2**63)
_ID_MAX: Final = 2**64 - 1


class RequestError(GenericError):
    """A line that is not a well-formed request; the id is echoed when it could be read."""

    def __init__(self, message: str, *, request_id: object = None, has_id: bool = False) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.has_id = has_id


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request; ``has_id`` tells an absent id from ``"id": null``.

    ``owner`` is the envelope's optional ``"owner"`` member (None when absent): a guest
    daemon names the kernel code it serves with it, so those chunks are told apart.
    """

    execute: str
    arguments: dict[str, object] = field(default_factory=dict)
    id: object = None
    has_id: bool = False
    owner: str | None = None


class _DuplicateKey(ValueError):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"duplicate key {describe_value(key)}")
            seen.add(key)
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def describe_value(value: object) -> str:
    """A short rendering of a JSON value for an error message (never huge, never raises)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = json.dumps(value[:40])
        return text if len(value) <= 40 else text[:-1] + '..."'
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= 40 else text[:20] + "..." + f" ({len(text)} digits)"
    return repr(value)[:40]


def guest_id_ok(value: object) -> bool:
    """Ids the guest channel echoes: a 64-bit integer or a short string."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _ID_MIN <= value <= _ID_MAX
    return isinstance(value, str) and len(value) <= _MAX_ID_STRING


def _decode(line: bytes) -> object:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"invalid UTF-8 at byte {err.start + 1} of the line") from None
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise RequestError(f"invalid JSON at column {err.pos + 1}: {err.msg}") from None
    except RecursionError:
        raise RequestError("invalid JSON: nested too deeply") from None
    except ValueError as err:  # duplicate keys, NaN, integers with too many digits
        raise RequestError(f"invalid JSON: {err}") from None


def parse_request(
    line: bytes,
    *,
    id_ok: Callable[[object], bool] | None = None,
    owners: frozenset[str] = frozenset(),
) -> Request:
    """Decode one line into a :class:`Request` or raise :class:`RequestError`.

    ``id_ok`` restricts the ids that are accepted (and therefore echoed); None accepts any
    JSON value, as QMP does. ``owners`` are the values the ``"owner"`` member may take; when
    empty (QMP) the member is rejected like any other unknown one.
    """
    message = _decode(line)
    if not isinstance(message, dict):
        raise RequestError(f"a request must be a JSON object, got {describe_value(message)}")
    has_id = "id" in message
    request_id = message.get("id")
    if has_id and id_ok is not None and not id_ok(request_id):
        raise RequestError(
            f"member 'id' must be an integer or a string of at most {_MAX_ID_STRING} "
            f"characters, got {describe_value(request_id)}"
        )
    for key in message:
        if key not in _ENVELOPE and not (owners and key == OWNER_MEMBER):
            raise RequestError(
                f"member {key[:64]!r} is unexpected",
                request_id=request_id,
                has_id=has_id,
            )
    execute = message.get("execute")
    if execute is None:
        raise RequestError("member 'execute' is missing", request_id=request_id, has_id=has_id)
    if not isinstance(execute, str):
        raise RequestError(
            f"member 'execute' must be a string, got {describe_value(execute)}",
            request_id=request_id,
            has_id=has_id,
        )
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise RequestError(
            f"{execute}: member 'arguments' must be an object, got {describe_value(arguments)}",
            request_id=request_id,
            has_id=has_id,
        )
    owner: str | None = None
    if OWNER_MEMBER in message:
        value = message[OWNER_MEMBER]
        if not (isinstance(value, str) and value in owners):
            raise RequestError(
                f"{execute}: member 'owner' must be one of {', '.join(sorted(owners))}, "
                f"got {describe_value(value)}",
                request_id=request_id,
                has_id=has_id,
            )
        owner = value
    return Request(execute, arguments, request_id, has_id, owner)


_dumps: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode_return(value: object, request_id: object = None, has_id: bool = False) -> bytes:
    """A ``{"return": ...}`` line."""
    reply: dict[str, object] = {"return": value}
    if has_id:
        reply["id"] = request_id
    return (_dumps(reply) + "\n").encode()


def encode_error(
    error: CmaError | str,
    desc: str,
    request_id: object = None,
    has_id: bool = False,
) -> bytes:
    """An ``{"error": {"class": ..., "desc": ...}}`` line; the class is the errno name.

    ``desc`` is one line: a newline inside it (from a device name or command the client
    sent, which messages quote as given) is written as the two characters ``\\n``, so the
    stub still prints one ``CMD: CLASS: desc`` line. Script lines cannot hold a newline, so
    this never changes what ``cma-qemu replay`` is compared against.
    """
    cls = error if isinstance(error, str) else type(error).errno_name
    reply: dict[str, object] = {"error": {"class": cls, "desc": desc.replace("\n", "\\n")}}
    if has_id:
        reply["id"] = request_id
    return (_dumps(reply) + "\n").encode()
