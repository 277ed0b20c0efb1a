"""Every cache treenn keeps, registered here so that `treenn.clear_caches()` empties them.

A cache is anything with a `clear()` method: a module-level dict, an `functools.lru_cache`
function, the per-function trace cache of `treenn.jit`. Each module registers its own
caches where it creates them, with `register(cache)`.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Protocol, TypeVar, runtime_checkable


@runtime_checkable
class _Clearable(Protocol):
    def clear(self) -> Any: ...


_C = TypeVar("_C", bound=_Clearable)

# Held weakly when possible: a `treenn.jit` function's cache goes away with the function.
_WEAK: weakref.WeakSet[Any] = weakref.WeakSet()
_STRONG: list[Any] = []  # plain dicts cannot be weakly referenced (module-level anyway)


def register(cache: _C) -> _C:
    """Register `cache` (anything with a `clear()` method) with `treenn.clear_caches`;
    returns it, so that `_X = register({})` reads naturally."""
    if not callable(getattr(cache, "clear", None)):
        raise TypeError(f"register: {type(cache).__name__} has no clear() method")
    try:
        _WEAK.add(cache)
    except TypeError:
        if not any(cache is kept for kept in _STRONG):
            _STRONG.append(cache)
    return cache


class Cache(OrderedDict):  # type: ignore[type-arg]
    """A registered, bounded dict cache: emptied (back to its `seed` entries) by
    `treenn.clear_caches()`, and bounded to `maxsize` entries by dropping the least
    recently used one, so that a program that keeps meeting new types or structures
    cannot grow it without end, and one that meets many keeps the ones it uses.

    Lookups (`get`) are plain `dict` lookups while the cache is less than half full:
    until entries may be dropped, there is no order to keep. From then on, a hit also
    marks its entry as recently used (about 0.15 µs). Seed entries are never dropped.
    Safe to use from several threads: a lookup is atomic; inserting, dropping and
    reordering are done under a lock."""

    def __init__(self, seed: Any = (), *, maxsize: int = 4096):
        self._seed = dict(seed)
        self.maxsize = maxsize
        self._lock = threading.Lock()
        super().__init__(self._seed)
        register(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > max(self.maxsize, len(self._seed)):
                oldest = next(k for k in self if k not in self._seed)
                super().__delitem__(oldest)
            if len(self) * 2 >= self.maxsize and "get" not in self.__dict__:
                self.get = self._get_and_touch  # type: ignore[method-assign]

    def _get_and_touch(self, key: Any, default: Any = None) -> Any:
        value = OrderedDict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        with self._lock:
            if key in self:  # (another thread may have dropped it meanwhile)
                self.move_to_end(key)
        return value

    def clear(self) -> None:
        with self._lock:
            super().clear()
            for key, value in self._seed.items():
                OrderedDict.__setitem__(self, key, value)
            self.__dict__.pop("get", None)  # plain lookups again

    # Registered in a WeakSet: hashed by identity, as any object.
    __hash__ = object.__hash__  # type: ignore[assignment]


_MISSING = object()


def clear_caches() -> None:
    """Empty every cache treenn keeps: `treenn.jit`'s compiled functions and the
    per-type and per-structure tables of its tree helpers. As `eqx.clear_caches()`, best
    followed by `jax.clear_caches()` to release JAX's own compiled code too.

    **Arguments:** none.

    **Returns:** `None`.

    !!! Example

        ```python
        treenn.clear_caches()
        jax.clear_caches()
        ```
    """
    for cache in [*_WEAK, *_STRONG]:
        cache.clear()
