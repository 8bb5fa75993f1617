"""The allocator registry: default, names, duplicates, bad classes and entry points."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from cma_qemu.allocators import ENTRY_POINT_GROUP, Allocator, AllocatorRegistry
from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.allocators.bitmap import BitmapAllocator
from cma_qemu.errors import EBUSY, EINVAL, ENOENT


class Dummy(Allocator):
    """A do-nothing allocator for registry tests."""

    name: ClassVar[str] = "dummy"

    def alloc(self, size: int, alignment: int) -> int | None:
        return None

    def free(self, start: int, size: int) -> None:
        pass

    def holes(self) -> Iterator[tuple[int, int]]:
        yield self.start, self.size

    def largest_free(self) -> int:
        return self.size


class OtherBf(Dummy):
    name = "bf"


class Abstract(Allocator):
    name = "abstract"


class Nameless(Dummy):
    name = ""


class NotAString(Dummy):
    name = 42  # type: ignore[assignment]


class NoName(Allocator):
    def alloc(self, size: int, alignment: int) -> int | None:
        return None

    def free(self, start: int, size: int) -> None:
        pass

    def holes(self) -> Iterator[tuple[int, int]]:
        yield from ()

    def largest_free(self) -> int:
        return 0


def test_builtins_bf_first_and_default() -> None:
    registry = AllocatorRegistry.with_builtins()
    assert registry.names() == ["bf", "bitmap"]
    assert registry.default_name == "bf"
    assert registry.get(None) is BestFitAllocator
    assert registry.get("") is BestFitAllocator
    assert registry.get("bf") is BestFitAllocator
    assert registry.get("bitmap") is BitmapAllocator
    assert registry.get("nope") is None
    assert "bitmap" in registry
    assert len(registry) == 2


def test_empty_registry_has_no_default() -> None:
    registry = AllocatorRegistry()
    assert registry.names() == []
    assert registry.default_name is None
    assert registry.get(None) is None


def test_default_is_the_first_registered() -> None:
    registry = AllocatorRegistry()
    registry.register(Dummy)
    registry.register(BestFitAllocator)
    assert registry.default_name == "dummy"
    assert registry.get(None) is Dummy
    assert registry.names() == ["dummy", "bf"]


def test_a_taken_name_raises_ebusy() -> None:
    registry = AllocatorRegistry.with_builtins()
    with pytest.raises(EBUSY, match="bf"):
        registry.register(OtherBf)
    with pytest.raises(EBUSY):
        registry.register(BestFitAllocator)
    assert registry.get("bf") is BestFitAllocator


@pytest.mark.parametrize(
    "bad", [Abstract, Nameless, NotAString, NoName, int, object(), "bf", BestFitAllocator(0, 4096)]
)
def test_bad_classes_raise_einval(bad: Any) -> None:
    registry = AllocatorRegistry()
    with pytest.raises(EINVAL):
        registry.register(bad)
    assert registry.names() == []


def test_installed_entry_points_load_bf_and_bitmap() -> None:
    registry = AllocatorRegistry()
    assert registry.load_entry_points() == ["bf", "bitmap"]
    assert registry.get("bf") is BestFitAllocator
    assert registry.get("bitmap") is BitmapAllocator
    assert registry.load_entry_points() == []  # identical classes are skipped
    assert AllocatorRegistry.with_builtins().load_entry_points() == []


def fake_entry_points(
    monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]
) -> list[importlib.metadata.EntryPoint]:
    """Make importlib.metadata report exactly ``specs`` (name, value) in our group."""
    eps = [importlib.metadata.EntryPoint(n, v, ENTRY_POINT_GROUP) for n, v in specs]

    def entry_points(**params: Any) -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in eps if params.get("group") in (None, ep.group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return eps


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """A third-party module holding allocator classes, importable by entry points."""
    module = types.ModuleType("fake_cma_plugin")
    module.Dummy = Dummy  # type: ignore[attr-defined]
    module.OtherBf = OtherBf  # type: ignore[attr-defined]
    module.Abstract = Abstract  # type: ignore[attr-defined]
    module.not_a_class = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_third_party_entry_point_registers(
    monkeypatch: pytest.MonkeyPatch, plugin_module: str
) -> None:
    fake_entry_points(monkeypatch, ("dummy", f"{plugin_module}:Dummy"))
    registry = AllocatorRegistry.with_builtins()
    assert registry.load_entry_points() == ["dummy"]
    assert registry.names() == ["bf", "bitmap", "dummy"]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("no_such_module_for_cma_tests:Thing", "failed to load: ModuleNotFoundError"),
        ("fake_cma_plugin:Missing", "failed to load: AttributeError"),
        ("fake_cma_plugin:not_a_class", "not an allocator"),
        ("fake_cma_plugin:Abstract", "abstract"),
        ("fake_cma_plugin:Dummy", "whose name is 'dummy'"),
    ],
)
def test_broken_entry_point_raises_enoent(
    monkeypatch: pytest.MonkeyPatch, plugin_module: str, value: str, why: str
) -> None:
    fake_entry_points(
        monkeypatch,
        ("bitmap", "cma_qemu.allocators.bitmap:BitmapAllocator"),
        ("broken", value),
    )
    registry = AllocatorRegistry()
    with pytest.raises(ENOENT, match="broken") as info:
        registry.load_entry_points()
    assert why in str(info.value)
    assert registry.names() == []  # nothing half-loaded


def test_entry_point_name_taken_by_another_class_raises_ebusy(
    monkeypatch: pytest.MonkeyPatch, plugin_module: str
) -> None:
    fake_entry_points(
        monkeypatch,
        ("dummy", f"{plugin_module}:Dummy"),
        ("bf", f"{plugin_module}:OtherBf"),
    )
    registry = AllocatorRegistry.with_builtins()
    with pytest.raises(EBUSY):
        registry.load_entry_points()
    assert registry.names() == ["bf", "bitmap"]


def test_other_groups_are_ignored(monkeypatch: pytest.MonkeyPatch, plugin_module: str) -> None:
    fake_entry_points(monkeypatch, ("dummy", f"{plugin_module}:Dummy"))
    assert AllocatorRegistry().load_entry_points(group="some.other.group") == []
