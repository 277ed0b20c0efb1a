"""Every cache treenn keeps, registered here so that `treenn.clear_caches()` empties them.

A cache is anything with a `clear()` method: a module-level dict, an `functools.lru_cache`
function, the per-function trace cache of `treenn.jit`. Each module registers its own
caches where it creates them, with `register(cache)`.
"""

from __future__ import annotations

import weakref
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


class Cache(dict):  # type: ignore[type-arg]
    """A registered, bounded dict cache: emptied (back to its `seed` entries) by
    `treenn.clear_caches()`, and when it would grow past `maxsize` entries, so that a
    program that keeps meeting new types or structures cannot grow it without end.
    Lookups are plain `dict` lookups; only a miss pays for the bound."""

    def __init__(self, seed: Any = (), *, maxsize: int = 4096):
        super().__init__(seed)
        self._seed = dict(self)
        self.maxsize = maxsize
        register(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        if len(self) >= self.maxsize:
            self.clear()
        super().__setitem__(key, value)

    def clear(self) -> None:
        super().clear()
        self.update(self._seed)

    # `dict` subclasses hash by identity here: registered in a WeakSet.
    __hash__ = object.__hash__  # type: ignore[assignment]


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
