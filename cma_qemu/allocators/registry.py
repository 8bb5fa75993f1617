"""The allocator registry: ``cma_allocator_register()`` and the name lookup of attachment.

As in the 2010 code the default allocator is the first one registered, and regions ask for
one by name (``:ALLOC-NAME``). Third-party allocators arrive through the entry-point group
:data:`ENTRY_POINT_GROUP` and may be registered while an agent runs; a name can be taken only
once, so a region never silently changes allocator.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging

from cma_qemu.allocators.base import Allocator
from cma_qemu.errors import EBUSY, EINVAL, ENOENT, CmaError

__all__ = ["ENTRY_POINT_GROUP", "AllocatorRegistry"]

ENTRY_POINT_GROUP = "cma_qemu.allocators"


def _why_not_allocator(obj: object) -> str | None:
    """None if ``obj`` is a registrable allocator class, else the reason it is not."""
    if not isinstance(obj, type) or not issubclass(obj, Allocator):
        return f"{obj!r} is not an Allocator subclass"
    if inspect.isabstract(obj):
        return f"{obj.__qualname__} is abstract"
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"{obj.__qualname__} has no name (a non-empty str class attribute)"
    return None


log = logging.getLogger(__name__)


class AllocatorRegistry:
    """Allocator classes by name, in registration order (the first is the default)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Allocator]] = {}

    @classmethod
    def with_builtins(cls) -> AllocatorRegistry:
        """A registry holding ``bf`` (the default, as in v2) then ``bitmap``.

        Imported directly so this works from a source tree without installed metadata.
        """
        from cma_qemu.allocators.best_fit import BestFitAllocator
        from cma_qemu.allocators.bitmap import BitmapAllocator

        registry = cls()
        registry.register(BestFitAllocator)
        registry.register(BitmapAllocator)
        return registry

    def register(self, cls: type[Allocator]) -> None:
        """File ``cls`` under ``cls.name``: EINVAL if it is not an allocator, EBUSY if taken.

        Runtime complexity: O(1).
        """
        why = _why_not_allocator(cls)
        if why is not None:
            raise EINVAL(f"cannot register allocator: {why}", where="allocators")
        taken = self._classes.get(cls.name)
        if taken is not None:
            raise EBUSY(
                f"allocator name {cls.name!r} is already taken by "
                f"{taken.__module__}.{taken.__qualname__}",
                where="allocators",
            )
        self._classes[cls.name] = cls

    def get(self, name: str | None) -> type[Allocator] | None:
        """The class registered as ``name``; None or ``""`` mean the default; None if unknown.

        Runtime complexity: O(1).
        """
        if not name:
            return next(iter(self._classes.values()), None)
        return self._classes.get(name)

    def names(self) -> list[str]:
        """Registered names in registration order. Runtime complexity: O(number of names)."""
        return list(self._classes)

    @property
    def default_name(self) -> str | None:
        """The first registered name, or None while the registry is empty. O(1)."""
        return next(iter(self._classes), None)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __len__(self) -> int:
        return len(self._classes)

    @classmethod
    def installed(cls) -> AllocatorRegistry:
        """The built-ins, then every allocator installed packages declare (``ENTRY_POINT_GROUP``).

        A broken third-party entry point is logged and skipped as a whole (see
        :meth:`load_entry_points`); it must not take the built-in allocators down with it.
        """
        registry = cls.with_builtins()
        try:
            registry.load_entry_points()
        except CmaError as error:
            log.warning("third-party allocators not loaded: %s", error)
        return registry

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register every allocator the installed packages declare in ``group``.

        Returns the names newly registered, in entry-point order. Classes already registered
        under their name are skipped, so calling this twice, or after :meth:`with_builtins`,
        is harmless. All entry points are loaded and checked before any is registered, so an
        error (ENOENT for a broken or wrong entry point, EBUSY for a name taken by another
        class) leaves the registry as it was.
        """
        found: list[type[Allocator]] = []
        for ep in importlib.metadata.entry_points(group=group):
            label = f"entry point {ep.name!r} ({ep.value}) in {group!r}"
            try:
                obj = ep.load()
            except Exception as exc:
                raise ENOENT(
                    f"{label} failed to load: {type(exc).__name__}: {exc}", where="allocators"
                ) from exc
            why = _why_not_allocator(obj)
            if why is not None:
                raise ENOENT(f"{label} is not an allocator: {why}", where="allocators")
            if obj.name != ep.name:
                raise ENOENT(
                    f"{label} names a class whose name is {obj.name!r}", where="allocators"
                )
            found.append(obj)
        new: list[type[Allocator]] = []
        pending: dict[str, type[Allocator]] = {}
        for cls in found:
            taken = self._classes.get(cls.name) or pending.get(cls.name)
            if taken is cls:
                continue
            if taken is not None:
                raise EBUSY(
                    f"allocator name {cls.name!r} from {cls.__module__}.{cls.__qualname__} "
                    f"is already taken by {taken.__module__}.{taken.__qualname__}",
                    where="allocators",
                )
            pending[cls.name] = cls
            new.append(cls)
        for cls in new:
            self.register(cls)
        return [cls.name for cls in new]
