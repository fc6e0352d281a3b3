"""Objects that ops find by a string key: custom ops take tensors and plain values, not modules.

A graph can hold neither a delayed-scaling state (a module that owns its amax history) nor a
packed weight (a graph constant would have to be a fake tensor while the graph is traced), so the
graph holds a key and the op looks the object up. A :class:`Registry` holds its objects weakly:
their owner (the compiled model's state, the graph module) keeps them alive, and a deleted model
takes them with it.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # for the error message: "delayed-scaling state", "packed weight"
        self._objects: weakref.WeakValueDictionary[str, T] = weakref.WeakValueDictionary()
        self._ids = itertools.count()

    def register(self, value: T, key: str | None = None) -> str:
        """Keep ``value`` under ``key`` (a new unique one by default); the caller keeps it alive."""
        key = f"{self.what.split()[-1]}{next(self._ids)}" if key is None else key
        self._objects[key] = value
        return key

    def __contains__(self, key: str) -> bool:
        return key in self._objects

    def __getitem__(self, key: str) -> T:
        value = self._objects.get(key)
        if value is None:
            raise RuntimeError(f"qpass {self.what} {key!r} no longer exists (was its model deleted?)")
        return value


DELAYED_STATES: Registry = Registry("delayed-scaling state")
PACKED_WEIGHTS: Registry = Registry("packed weight")
