"""The monitor's introspection (``query-qmp-schema``), ``query-version`` and HMP text.

Every reply and every event the monitor really produces is checked against the schema the
monitor itself reports, by a validator that knows only QEMU's SchemaInfo format: so the
table the dispatcher uses and what it introspects cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cma_helpers import cma_state, make_cma
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.errors import GenericError
from cma_qemu.monitor import Monitor
from cma_qemu.monitor.commands import MonitorCommands
from cma_qemu.monitor.hmp import EOL
from cma_qemu.monitor.protocol import version_info
from cma_qemu.monitor.schema import Command, Member, introspect
from cma_qemu.wire.arguments import Arguments

MiB = 1 << 20
Schema = dict[str, dict[str, Any]]


class Later(BestFitAllocator):
    """An allocator registered while the monitor runs ('priv' waits for it)."""

    name = "later"


class Validator:
    """``value`` against type ``name`` of a SchemaInfo list; returns the problems found."""

    JSON: dict[str, Callable[[object], bool]] = {  # noqa: RUF012 - read only
        "string": lambda v: isinstance(v, str),
        "int": lambda v: type(v) is int,
        "number": lambda v: type(v) in (int, float),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "value": lambda v: True,
    }

    def __init__(self, schema: list[dict[str, Any]]) -> None:
        self.types: Schema = {}
        for entry in schema:
            assert entry["name"] not in self.types, f"{entry['name']} introspected twice"
            self.types[entry["name"]] = entry

    def check(self, name: str, value: object, where: str = "$") -> list[str]:
        info = self.types.get(name)
        if info is None:
            return [f"{where}: type {name!r} is not in the schema"]
        meta = info["meta-type"]
        if meta == "builtin":
            ok = self.JSON[info["json-type"]](value)
            return [] if ok else [f"{where}: {value!r} is not {info['json-type']}"]
        if meta == "enum":
            return [] if value in info["values"] else [f"{where}: {value!r} not in {name}"]
        if meta == "array":
            if not isinstance(value, list):
                return [f"{where}: {value!r} is not an array"]
            problems = []
            for i, item in enumerate(value):
                problems += self.check(info["element-type"], item, f"{where}[{i}]")
            return problems
        if meta == "alternate":
            for member in info["members"]:
                if not self.check(member["type"], value, where):
                    return []
            return [f"{where}: {value!r} fits no branch of {name}"]
        if meta == "object":
            return self.check_object(info, value, where)
        return [f"{where}: {name} is a {meta}, not a type"]

    def check_object(self, info: dict[str, Any], value: object, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        members = list(info["members"])
        if "tag" in info:
            tag = value.get(info["tag"])
            branch = [v["type"] for v in info["variants"] if v["case"] == tag]
            if len(branch) != 1:
                return [f"{where}: tag {tag!r} has no variant"]
            members += self.types[branch[0]]["members"]
        problems = []
        known = {m["name"] for m in members}
        for extra in sorted(set(value) - known):
            problems.append(f"{where}: member {extra!r} is not declared")
        for member in members:
            if member["name"] not in value:
                if "default" not in member:
                    problems.append(f"{where}: required member {member['name']!r} missing")
                continue
            problems += self.check(
                member["type"], value[member["name"]], f"{where}.{member['name']}"
            )
        return problems


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    async def read_memory(addr: int, size: int) -> bytes:
        return bytes(size)

    mon = Monitor(make_cma(regions="a=16M;b=16M;-priv=4M:later"), read_memory=read_memory)
    await mon.start(tmp_path / "run" / "m.sock")
    yield mon
    await mon.close()


@pytest.fixture
async def qmp(monitor: Monitor) -> AsyncIterator[QMPClient]:
    client = QMPClient("schema-test")
    assert monitor.path is not None
    await client.connect(str(monitor.path))
    yield client
    await client.disconnect()


async def schema_of(qmp: QMPClient) -> tuple[list[dict[str, Any]], Validator]:
    schema: Any = await qmp.execute("query-qmp-schema")
    return schema, Validator(schema)


async def test_version_is_the_package_version(qmp: QMPClient) -> None:
    version = importlib.metadata.version("cma-qemu")
    reply: Any = await qmp.execute("query-version")
    major, minor, micro = (int(x) for x in version.split(".")[:3])
    assert reply == {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"cma-qemu {version}",
    }
    assert qmp.greeting is not None
    assert qmp.greeting.QMP.version == reply  # the greeting says the same
    _, validator = await schema_of(qmp)
    assert validator.check("VersionInfo", reply) == []


def test_version_numbers_from_any_version_string() -> None:
    assert version_info("1.2.3")["qemu"] == {"major": 1, "minor": 2, "micro": 3}
    assert version_info("0.1.0.dev3")["qemu"] == {"major": 0, "minor": 1, "micro": 0}
    assert version_info("2.0")["qemu"] == {"major": 2, "minor": 0, "micro": 0}
    assert version_info("unknown") == {
        "qemu": {"major": 0, "minor": 0, "micro": 0},
        "package": "cma-qemu unknown",
    }


async def test_schema_lists_every_command_and_event(qmp: QMPClient, monitor: Monitor) -> None:
    schema, validator = await schema_of(qmp)
    # the reply is itself valid SchemaInfo, variants included
    assert validator.check("[SchemaInfo]", schema) == []
    commands: Any = await qmp.execute("query-commands")
    listed = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert listed == {c["name"] for c in commands}
    assert {"query-version", "query-qmp-schema", "human-monitor-command"} <= listed
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    assert events == {"CMA_ALLOC", "CMA_FREE", "CMA_ALLOC_FAILED", "CMA_GUEST_RESET"}
    for entry in schema:  # every name an entry refers to is introspected
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entry:
                assert entry[key] in validator.types, (entry, key)
    # the arguments are the dispatcher's own declarations
    alloc = validator.types["cma-alloc"]
    args = validator.types[alloc["arg-type"]]["members"]
    assert args == [
        {"name": "dev", "type": "str"},
        {"name": "kind", "type": "str", "default": None},
        {"name": "size", "type": "int"},
        {"name": "alignment", "type": "int", "default": None},
    ]
    assert alloc["ret-type"] == "CmaChunk"
    for name, command in monitor.commands.table.items():
        info = validator.types[name]
        members = validator.types[info["arg-type"]]["members"]
        assert [m["name"] for m in members] == [m.name for m in command.args]
        assert [("default" in m) for m in members] == [m.optional for m in command.args]


async def test_every_reply_fits_its_return_type(qmp: QMPClient, monitor: Monitor) -> None:
    _, validator = await schema_of(qmp)
    recorded: list[str] = []
    monitor.commands.record_start = lambda path: {
        "path": recorded.append(path) or path,
        "allocations": 0,
        "frees": 0,
        "live": 0,
    }
    monitor.commands.record_stop = lambda: {"path": "x", "allocations": 1, "frees": 1, "live": 0}
    chunk: Any = await qmp.execute("cma-alloc", {"dev": "dev", "size": MiB})
    assert validator.check("CmaChunk", chunk) == []
    calls: list[tuple[str, dict[str, object]]] = [
        ("cma-alloc", {"dev": "dev", "kind": "", "size": MiB, "alignment": 0}),
        ("query-commands", {}),
        ("query-version", {}),
        ("query-cma-regions", {}),
        ("query-cma-regions", {"holes": True}),
        ("query-cma-chunks", {}),
        ("query-cma-map", {}),
        ("query-cma-stats", {}),
        ("query-cma-info", {"dev": "dev"}),
        ("query-cma-info-about", {"regions": None}),
        ("query-cma-info-about", {"regions": "a,b"}),
        ("cma-set-map", {"map": "dev/*=a;*/*=b"}),
        ("cma-set-asterisk", {"asterisk": "b"}),
        ("cma-alloc-from", {"regions": "b", "size": MiB, "alignment": MiB}),
        ("cma-read", {"addr": chunk["addr"], "size": 16}),
        ("query-cma-allocators", {}),
        ("cma-allocator-register", {"class": f"{__name__}:Later"}),
        ("cma-record-start", {"path": "/nowhere"}),
        ("cma-record-stop", {}),
        ("human-monitor-command", {"command-line": "info cma"}),
        ("cma-free", {"addr": chunk["addr"]}),
    ]
    for name, args in calls:
        reply = await qmp.execute(name, args)
        ret = validator.types[name]["ret-type"]
        assert validator.check(ret, reply) == [], (name, reply)
    assert recorded == ["/nowhere"]
    declared = set(monitor.commands.table) - {"query-qmp-schema"}  # checked above
    assert declared == {name for name, _ in calls}  # no command left unchecked


async def test_every_event_fits_its_data_type(qmp: QMPClient, monitor: Monitor) -> None:
    _, validator = await schema_of(qmp)
    chunk: Any = await qmp.execute("cma-alloc", {"dev": "dev", "size": MiB})
    await qmp.execute("cma-free", {"addr": chunk["addr"]})
    with pytest.raises(ExecuteError):
        await qmp.execute("cma-alloc-from", {"regions": "a", "size": 64 * MiB})
    kept = monitor.cma.alloc("dev", "", MiB, 0, owner="guest")
    monitor.guest_reset("org.cma.0", "reset", [kept])
    seen = set()
    for _ in range(5):  # alloc, free, failed, alloc (the guest's), reset
        event = await asyncio.wait_for(qmp.events.get(), 5)
        arg_type = validator.types[event["event"]]["arg-type"]
        assert validator.check(arg_type, event["data"]) == [], event
        seen.add(event["event"])
    assert seen == {"CMA_ALLOC", "CMA_FREE", "CMA_ALLOC_FAILED", "CMA_GUEST_RESET"}


async def test_the_validator_catches_a_wrong_reply(qmp: QMPClient) -> None:
    _, validator = await schema_of(qmp)
    chunk = {"addr": 1, "size": 2, "region": None, "requested": 2, "refcount": 1, "owner": "x"}
    assert validator.check("CmaChunk", chunk) == []
    assert validator.check("CmaChunk", {**chunk, "extra": 1}) == [
        "$: member 'extra' is not declared"
    ]
    assert validator.check("CmaChunk", {**chunk, "addr": "1"}) == ["$.addr: '1' is not int"]
    del chunk["owner"]
    assert validator.check("CmaChunk", chunk) == ["$: required member 'owner' missing"]


def test_handlers_must_match_their_declared_arguments() -> None:
    def handler(dev: str, size: int) -> object:
        return None

    Command("x", handler, (Member("dev", "str"), Member("size", "uint64")))
    with pytest.raises(TypeError, match=r"handler parameters \['dev', 'size'\] differ"):
        Command("x", handler, (Member("dev", "str"),))
    with pytest.raises(TypeError, match="no decoder"):
        Command("x", handler, (Member("dev", "str"), Member("size", "float")))


def test_an_undeclared_type_is_refused() -> None:
    def handler() -> object:
        return None

    with pytest.raises(TypeError, match="'Nowhere' is used but not declared"):
        introspect([Command("x", handler, returns="Nowhere")], [], [])


# --- bad arguments: a clear error naming the argument, and no state change ----------------

_WRONG = {
    "str": st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.text(), max_size=2)),
    "uint64": st.one_of(
        st.text(max_size=4),
        st.booleans(),
        st.none(),
        st.integers(max_value=-1),
        st.integers(min_value=2**64),
        st.floats(allow_nan=False),
    ),
    "bool": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "StrOrNull": st.one_of(st.integers(), st.booleans(), st.lists(st.text(), max_size=2)),
}


@st.composite
def wrong_call(draw: st.DrawFn) -> tuple[str, str, dict[str, object]]:
    commands = MonitorCommands(make_cma(regions="a=16M;b=16M;-priv=4M:later"))
    name = draw(st.sampled_from(sorted(n for n, c in commands.table.items() if c.args)))
    members = commands.table[name].args
    bad = draw(st.sampled_from([m for m in members if m.type in _WRONG]))
    args: dict[str, object] = {m.name: _GOOD[m.type] for m in members if not m.optional}
    args[bad.name] = draw(_WRONG[bad.type])
    return name, bad.name, args


_GOOD: dict[str, object] = {"str": "a", "uint64": MiB, "bool": True, "StrOrNull": "a"}


@given(call=wrong_call())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_wrong_argument_types_are_named_and_change_nothing(
    call: tuple[str, str, dict[str, object]],
) -> None:
    name, bad, args = call
    commands = MonitorCommands(make_cma(regions="a=16M;b=16M;-priv=4M:later"))
    commands.table["cma-alloc"](Arguments({"dev": "dev", "size": MiB}))
    before = cma_state(commands.cma, attached=True)
    with pytest.raises(GenericError) as caught:
        commands.table[name](Arguments(args))
    assert caught.value.where == f"argument '{bad}'", caught.value
    assert cma_state(commands.cma, attached=True) == before


def test_missing_and_extra_arguments() -> None:
    commands = MonitorCommands(make_cma(regions="a=16M;b=16M;-priv=4M:later"))
    with pytest.raises(GenericError, match="missing argument 'dev'"):
        commands.table["cma-alloc"](Arguments({"size": MiB}))
    with pytest.raises(GenericError, match="unexpected argument 'sizes'"):
        commands.table["cma-alloc"](Arguments({"dev": "dev", "size": MiB, "sizes": 1}))
    assert commands.cma.chunks == []


# --- human-monitor-command ----------------------------------------------------------------


async def hmp(qmp: QMPClient, line: str) -> str:
    reply: Any = await qmp.execute("human-monitor-command", {"command-line": line, "cpu-index": 0})
    assert isinstance(reply, str)
    return reply


async def test_hmp_help_and_info(qmp: QMPClient) -> None:
    help_text = await hmp(qmp, "help")
    assert help_text.endswith(EOL)
    # the shape qmp-shell -H completes on: "NAME ARGS -- TEXT" per line
    assert [line.split()[0] for line in help_text.split(EOL) if line] == ["help|?", "info"]
    assert await hmp(qmp, "help info") == await hmp(qmp, "info")
    info = [line.split()[1] for line in (await hmp(qmp, "info")).split(EOL) if line]
    assert info == ["chunks", "cma", "version"]
    version = importlib.metadata.version("cma-qemu")
    assert await hmp(qmp, "info version") == f"{version} (cma-qemu){EOL}"
    assert await hmp(qmp, "frobnicate") == f"unknown command: 'frobnicate'{EOL}"
    assert "unknown subcommand 'nope'" in await hmp(qmp, "info nope")
    assert await hmp(qmp, "") == ""


async def test_hmp_info_cma_and_chunks(qmp: QMPClient, monitor: Monitor) -> None:
    table = (await hmp(qmp, "info cma")).split(EOL)
    assert table[0].split() == [
        "name", "start", "end", "size", "free", "users", "allocator", "asterisk",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in table[1:] if line and ":" not in line}
    assert set(rows) == {r.name for r in monitor.cma.regions}
    a = next(r for r in monitor.cma.regions if r.name == "a")
    assert rows["a"][1:6] == [f"{a.start:#x}", f"{a.start + a.size - 1:#x}", "16M", "16M", "0"]
    assert rows["priv"][-1] == "no"  # '-priv' is not in the asterisk
    assert "map: dev/*=a" in table
    assert await hmp(qmp, "info chunks") == f"no live chunks{EOL}"

    chunk: Any = await qmp.execute("cma-alloc", {"dev": "dev", "size": 3 * MiB})
    lines = (await hmp(qmp, "info chunks")).split(EOL)
    assert lines[1].split() == [f"{chunk['addr']:#x}", "3M", "a", "monitor", "1"]
    rows = {
        line.split()[0]: line.split()
        for line in (await hmp(qmp, "info cma")).split(EOL)[1:]
        if line
    }
    assert rows["a"][4:7] == ["13M", "1", "bf"]
