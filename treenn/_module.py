"""`treenn.Module`: an `equinox.Module` that sees through marks.

Frozen arrays, buffers and pins are stored inside thin marks (see `_status`). Reading a
field of a `treenn.Module` returns what the mark holds (an array with its gradient
stopped, or the `inference` bool), also inside any container the field holds (tuple,
list, dict, NamedTuple, any pytree node but a module). Plain Equinox modules that come
to hold a mark (freezing an `eqx.nn.Conv2d`'s weight, pinning an `eqx.nn.Dropout`) are
given the same ability: their class is swapped for a subclass with this attribute access
(same name, same fields, still an instance of the original class), and swapped back once
they hold no mark. That subclass pickles (and deep-copies) as the original class
rebuilt with its marks, so pickles never refer to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx

from ._caches import Cache
from ._status import ALL_MARKS, holds_mark, unwrapped

_get = object.__getattribute__
_module_getattribute = eqx.Module.__getattribute__


class Unwrapping:
    """Mixin: attribute reads return what marks hold, never a mark."""

    if not TYPE_CHECKING:

        def __getattribute__(self, name: str, /) -> Any:
            if name == "__dict__":
                # Equinox's flatten reads it twice per module: skip the slow path.
                return _get(self, "__dict__")
            out = _module_getattribute(self, name)
            if type(out) in ALL_MARKS:
                return out.unwrap()
            return unwrapped(out)


class Module(Unwrapping, eqx.Module):
    """Base class of treenn's layers and of user models: an `equinox.Module` (an
    immutable dataclass pytree) whose frozen arrays, buffers and pins read as plain
    values.

    A frozen array (see `treenn.freeze`) or a buffer (BatchNorm running statistics) is
    stored inside a thin status mark; reading the field returns the array with its
    gradient stopped, so even `eqx.filter_grad` of the whole model gives it a zero
    gradient. Everything else is exactly `equinox.Module`.

    **Arguments:** what a subclass declares: its fields (annotated class attributes;
    `eqx.field(static=True)` for non-array configuration), set in `__init__`, which takes
    a keyword-only `key` when it initialises parameters. By treenn's convention
    `__call__(x, *, key=None)` takes the PRNG key keyword-only too, so the module works
    in `nn.Sequential` and under `treenn.train_step`.

    **Returns:** what the subclass's `__call__` returns. The module itself is immutable:
    `treenn.freeze`, `nn.eval_mode`, `treenn.apply`... return a new one.

    !!! Example

        ```python
        class Head(treenn.Module):
            linear: nn.Linear

            def __init__(self, *, key):
                self.linear = nn.Linear(8, 2, key=key)

            def __call__(self, x, *, key=None):
                return self.linear(x)


        head = Head(key=jax.random.key(0))
        y = head(jnp.ones((4, 8)))  # (4, 2)
        ```
    """


# Foreign class -> its unwrapping subclass, and back.
_UNWRAPPING: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    """Unpickle a module of the foreign class `cls` that holds marks."""
    return build(cls, state)


def _reduce(self: Any) -> tuple[Any, ...]:
    # Pickle as the original (importable) class: the subclass exists in this process only.
    return (_rebuild, (_ORIGINAL[type(self)], dict(_get(self, "__dict__"))))


def _unwrapping_class(cls: type) -> type:
    sub = _UNWRAPPING.get(cls)
    if sub is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce__": _reduce,
        }
        sub = type(cls.__name__, (Unwrapping, cls), namespace)
        _UNWRAPPING[cls] = sub
        _ORIGINAL[sub] = cls
    return sub


def is_foreign_type(kind: type) -> bool:
    """An Equinox module class that does not unwrap marks by itself."""
    return issubclass(kind, eqx.Module) and not issubclass(kind, Module)


def original_class(kind: type) -> type:
    """The class a module would have if it held no mark."""
    return _ORIGINAL.get(kind, kind)


_FITTED: dict[tuple[type, bool], type] = Cache()


def fitted_class(cls: type, marked: bool) -> type:
    """The class a module of class `cls` should have when it holds (`marked`) or does
    not hold marks; cached, as surgery asks once per module."""
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


def build(cls: type, state: dict[str, Any]) -> Any:
    """The one constructor of surgery: a module of class `cls` (or of the class that
    fits the marks `state` holds) with `state` as its fields.

    Bypasses `__init__`, as JAX's unflatten does. Every edit of a module's fields goes
    through here, so a module's class always follows the marks it holds: a plain
    Equinox layer holding a frozen array or a pin reads through it, and gets its own
    class back once it holds none. A surgery never decides a class itself.
    """
    marked = False
    for value in state.values():
        if holds_mark(value):
            marked = True
            break
    new: Any = object.__new__(fitted_class(cls, marked))
    _get(new, "__dict__").update(state)
    return new


def replace(module: Any, **changes: Any) -> Any:
    """A copy of an (immutable) module with some fields' stored values changed (a mark
    can be stored around an array); built by `build`, so its class fits."""
    state = dict(_get(module, "__dict__"))
    state.update(changes)
    return build(type(module), state)


def fit_class(module: Any) -> Any:
    """`module`, with its class swapped so that it reads through the marks it holds (for
    modules rebuilt by JAX's unflatten from a structure made before a mark was added or
    removed)."""
    cls = type(module)
    state = _get(module, "__dict__")
    new_cls = fitted_class(cls, any(holds_mark(v) for v in state.values()))
    if new_cls is cls:
        return module
    return build(cls, dict(state))
