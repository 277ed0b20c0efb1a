"""`treenn.Module`: an `equinox.Module` that sees through status marks.

Frozen arrays and buffers are stored inside thin status marks (see `_status`). Reading a
field of a `treenn.Module` returns the array behind them, gradient stopped, also inside
tuples, lists and dicts held by the field. Plain Equinox modules that come to hold a
mark (freezing an `eqx.nn.Conv2d`'s weight) are given the same ability: their class is
swapped for a subclass with this attribute access (same name, same fields, still an
instance of the original class), and swapped back once they hold no mark.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx

from ._status import MARK_TYPES

_CONTAINERS = (tuple, list, dict)
_get = object.__getattribute__
_module_getattribute = eqx.Module.__getattribute__


def _holds_mark(value: Any) -> bool:
    kind = type(value)
    if kind in MARK_TYPES:
        return True
    if kind is tuple or kind is list:
        return any(_holds_mark(v) for v in value)
    if kind is dict:
        return any(_holds_mark(v) for v in value.values())
    return False


def _unwrapped(value: Any) -> Any:
    kind = type(value)
    if kind in MARK_TYPES:
        return value.unwrap()
    if (kind is tuple or kind is list or kind is dict) and _holds_mark(value):
        if kind is dict:
            return {k: _unwrapped(v) for k, v in value.items()}
        return kind(_unwrapped(v) for v in value)
    return value


class Unwrapping:
    """Mixin: attribute reads return the arrays behind status marks."""

    if not TYPE_CHECKING:

        def __getattribute__(self, name: str, /) -> Any:
            if name == "__dict__":
                # Equinox's flatten reads it twice per module: skip the slow path.
                return _get(self, "__dict__")
            out = _module_getattribute(self, name)
            kind = type(out)
            if kind in MARK_TYPES:
                return out.unwrap()
            if kind is tuple or kind is list or kind is dict:
                return _unwrapped(out)
            return out


class Module(Unwrapping, eqx.Module):
    """Base class of treenn's layers and of user models: an `equinox.Module` (an
    immutable dataclass pytree) whose frozen arrays and buffers read as plain arrays.

    A frozen array (see `treenn.freeze`) or a buffer (BatchNorm running statistics) is
    stored inside a thin status mark; reading the field returns the array with its
    gradient stopped, so even a plain `jax.grad` of the whole model gives it a zero
    gradient. Everything else is exactly `equinox.Module`.

    !!! Example

        ```python
        class Head(treenn.Module):
            linear: nn.Linear

            def __init__(self, *, key):
                self.linear = nn.Linear(8, 2, key=key)

            def __call__(self, x, *, key=None):
                return self.linear(x)
        ```
    """


# Foreign class -> its unwrapping subclass, and back.
_UNWRAPPING: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def _unwrapping_class(cls: type) -> type:
    sub = _UNWRAPPING.get(cls)
    if sub is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        sub = type(cls.__name__, (Unwrapping, cls), namespace)
        _UNWRAPPING[cls] = sub
        _ORIGINAL[sub] = cls
    return sub


def is_foreign_type(kind: type) -> bool:
    """An Equinox module class that does not unwrap marks by itself."""
    return issubclass(kind, eqx.Module) and not issubclass(kind, Module)


_FITTED: dict[tuple[type, bool], type] = {}


def fitted_class(cls: type, marked: bool) -> type:
    """The class a module of class `cls` should have when it holds (`marked`) or does
    not hold status marks; cached, as surgery asks once per module."""
    key = (cls, marked)
    fitted = _FITTED.get(key)
    if fitted is None:
        original = _ORIGINAL.get(cls)
        if marked and original is None and not issubclass(cls, Unwrapping):
            fitted = _unwrapping_class(cls)
        elif not marked and original is not None:
            fitted = original
        else:
            fitted = cls
        _FITTED[key] = fitted
    return fitted


def fit_class(module: Any) -> Any:
    """`module`, with its class swapped so that it reads through the marks it holds."""
    cls = type(module)
    state = _get(module, "__dict__")
    new_cls = fitted_class(cls, any(_holds_mark(v) for v in state.values()))
    if new_cls is cls:
        return module
    new: Any = object.__new__(new_cls)
    _get(new, "__dict__").update(state)
    return new
