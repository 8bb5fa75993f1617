"""``async with`` for objects whose whole teardown is ``await close()``.

The channel server, the monitor, a launched or attached machine and the agent all end the same
way on every exit path; this mixin is that one ``__aenter__``/``__aexit__`` pair.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing:
    """Mixin: ``async with obj:`` gives ``obj`` and awaits ``obj.close()`` on the way out."""

    async def close(self) -> None:
        """Release everything the object holds; subclasses define it (idempotent there)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
