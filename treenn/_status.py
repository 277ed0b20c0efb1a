"""Marks: the thin pytree nodes that store a leaf's status in the model itself.

A mark is a pytree node with one child. `Frozen` and `Buffer` hold an array (a frozen
array, a buffer such as BatchNorm's running statistics); `Pinned` holds the `inference`
bool of a pinned mode-bearing module. A mark's path key prints as nothing, so
`jax.tree_util.keystr` paths and treenn's dotted paths are the same with or without it,
and a mark survives every JAX transform (it is structure, not data).

This module is the one place that knows what a mark is. User code never sees one:
`treenn.Module` (and the class `_module` fits to a plain Equinox module that holds a
mark) returns a mark's child on attribute access, through any container a field holds,
with the gradient of an array stopped.
"""

from __future__ import annotations

import enum
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax._src.interpreters import ad  # JVPTracer, LinearizeTracer: no public name
from jax.core import Tracer

from ._caches import Cache


class Status(enum.Enum):
    """What an array leaf is to the optimiser."""

    TRAINABLE = "trainable"
    FROZEN = "frozen"
    BUFFER = "buffer"
    # Integer/bool arrays, Python scalars, strings...: never trainable.
    STATIC = "static"


class MarkKey:
    """Path key of a mark's only child. Prints as '' so paths do not change."""

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{self.kind}Key()"


def _stopped(value: Any) -> Any:
    # Concrete arrays carry no gradient; only tracers need stopping. Non-arrays
    # (eqx.tree_at's sentinels, ShapeDtypeStructs, bools) pass through untouched.
    if isinstance(value, Tracer):
        return jax.lax.stop_gradient(value)
    return value


_AD_TRACERS = (ad.JVPTracer, ad.LinearizeTracer)


def _ad_stopped(value: Any) -> Any:
    if isinstance(value, _AD_TRACERS):
        return jax.lax.stop_gradient(value)
    return value


class Mark:
    """Base of the marks: a pytree node holding one child, `value`."""

    __slots__ = ("value",)
    status: Status = Status.STATIC
    key: MarkKey = MarkKey("Mark")

    def __init__(self, value: Any):
        self.value = value

    def unwrap(self) -> Any:
        """What user code sees: the child, an array's gradient stopped."""
        return _stopped(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


class Frozen(Mark):
    """Marks a frozen array: excluded from training, zero gradient everywhere."""

    __slots__ = ()
    status = Status.FROZEN
    key = MarkKey("Frozen")


class Buffer(Mark):
    """Marks a buffer (state such as BatchNorm running statistics): never trained."""

    __slots__ = ()
    status = Status.BUFFER
    key = MarkKey("Buffer")


class Pinned(Mark):
    """Marks the `inference` bool of a pinned mode-bearing module: later calls of
    `nn.eval_mode`/`nn.train_mode` with `pin=False`, and the implicit switches of
    `treenn.train_step`/`eval_step`, leave its mode alone. Stored around the bool, so
    `eqx.tree_at` on `inference` edits the bool inside and the pin survives."""

    __slots__ = ()
    key = MarkKey("Pinned")

    # By value, so that a pin stored in a user's static `inference` field compares
    # equal across copies (static fields are part of the tree structure).
    def __eq__(self, other: object) -> bool:
        return type(other) is Pinned and (
            other.value is self.value
            or (
                type(self.value) is bool and type(other.value) is bool and other.value == self.value
            )
        )

    def __hash__(self) -> int:
        return hash((Pinned, self.value if type(self.value) is bool else id(self.value)))

    # A safety net, not the mechanism: a module whose class reads through its marks never
    # hands a pin to its own code. Were one ever to (an Equinox layer rebuilt by code that
    # bypasses `_module.build`), `if self.inference:` still tests the mode, not the mark.
    def __bool__(self) -> bool:
        return bool(self.value)


def _register(cls: type[Mark]) -> None:
    key = cls.key
    # Rebuilding a mark around a value being differentiated stops its gradient: code
    # that reads the model's leaves without attribute access (`jtu.tree_leaves(
    # eqx.filter(m, eqx.is_inexact_array))` in an L2 penalty, under `eqx.filter_grad`)
    # then still gives frozen arrays and buffers zero gradient, as API.md §4 promises.
    # Only AD tracers: stopping every tracer would make a jitted function return a new
    # array for each frozen one it passes through (a copy per step, and `treenn.jit`
    # could no longer hand the input back: 2x its dispatch time on a frozen ResNet).
    jtu.register_pytree_with_keys(
        cls,
        lambda m: (((key, m.value),), None),
        lambda _, children: cls(_ad_stopped(next(iter(children)))),
        lambda m: ((m.value,), None),
    )


class Quantized(Mark):
    """Marks a weight stored quantized (`treenn.quantize`). Its child is the packed
    storage, a module of integer arrays (codes, scales) that knows the weight's shape
    and dtype and dequantizes it; the mark reads as the dequantized array, its gradient
    stopped. Not a mark around an array (not in `MARK_TYPES`): walkers enter it and see
    the packed arrays under `<path>.codes`..., integer arrays that nothing trains."""

    __slots__ = ()
    key = MarkKey("Quantized")

    def unwrap(self) -> Any:
        return _stopped(self.value.dequantized())

    # The logical weight's, for code that reads a stored field's shape and dtype.
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype


_register(Frozen)
_register(Buffer)
_register(Pinned)
_register(Quantized)

# The marks around arrays (what the tree walker keeps whole, as one array leaf).
MARK_TYPES: frozenset[type] = frozenset({Frozen, Buffer})
# Every mark, the pin and the quantized weight included (what attribute access unwraps).
ALL_MARKS: frozenset[type] = frozenset({Frozen, Buffer, Pinned, Quantized})
ARRAY_TYPES: tuple[type, ...] = (jax.Array, np.ndarray, np.generic)


_IS_ARRAY: dict[type, bool] = Cache()


def is_array(x: Any) -> bool:
    """`isinstance(x, ARRAY_TYPES)`, cached per type: `jax.Array`'s isinstance check is
    an ABC lookup that costs over a microsecond for an Equinox module."""
    kind = type(x)
    known = _IS_ARRAY.get(kind)
    if known is None:
        known = _IS_ARRAY[kind] = isinstance(x, ARRAY_TYPES)
    return known


def is_mark(x: Any) -> bool:
    """Whether `x` is an array's status mark (`Frozen` or `Buffer`)."""
    return type(x) in MARK_TYPES


def is_any_mark(x: Any) -> bool:
    """Whether `x` is any mark, `Pinned` included."""
    return type(x) in ALL_MARKS


def is_array_leaf(leaf: Any) -> bool:
    """An array leaf of a model as the walker sees it: an array (concrete or abstract) or
    a marked one."""
    return type(leaf) in MARK_TYPES or is_array_like(leaf)


def unmarked(leaf: Any) -> Any:
    """The array inside a status mark, or `leaf` itself when it is not marked."""
    return leaf.value if type(leaf) in MARK_TYPES else leaf


def marked_like(leaf: Any, value: Any) -> Any:
    """`value` in the status mark `leaf` has (as it is when `leaf` has none)."""
    return type(leaf)(value) if type(leaf) in MARK_TYPES else value


# -- what a value is: the one table, per type ------------------------------------------

_LEAF, _MARK, _MODULE, _CONTAINER = range(4)
_KIND: dict[type, int] = Cache(
    {
        **{kind: _MARK for kind in ALL_MARKS},
        **{tuple: _CONTAINER, list: _CONTAINER, dict: _CONTAINER, type(None): _LEAF},
    }
)


def _kind(value: Any) -> int:
    kind = _KIND.get(type(value))
    if kind is None:
        if isinstance(value, eqx.Module):
            kind = _MODULE  # reads through its own marks (or is given a class that does)
        else:
            # JAX registers pytree nodes by type: a leaf flattens to itself.
            found = jtu.tree_leaves(value)
            kind = _LEAF if len(found) == 1 and found[0] is value else _CONTAINER
        _KIND[type(value)] = kind
    return kind


def holds_nothing(value: Any) -> bool:
    """Whether a field value can hold no module or container: a pytree leaf (array,
    scalar, function...), `None` or a mark (which holds one leaf). What lets a walk edit
    a module field by field instead of flattening it."""
    kind = _KIND.get(type(value))
    if kind is None:
        kind = _kind(value)
    return kind == _LEAF or kind == _MARK


def _stop_at_mark_or_module(x: Any) -> bool:
    kind = _KIND.get(type(x))
    return (kind if kind is not None else _kind(x)) in (_MARK, _MODULE)


def holds_mark(value: Any) -> bool:
    """Whether a field value is a mark or a container (tuple, list, dict, NamedTuple,
    any pytree node but a module) holding one."""
    kind = _KIND.get(type(value))
    if kind is None:
        kind = _kind(value)
    if kind == _MARK:
        return True
    if kind != _CONTAINER:
        return False
    if type(value) is tuple or type(value) is list:
        return any(holds_mark(v) for v in value)
    if type(value) is dict:
        return any(holds_mark(v) for v in value.values())
    return any(
        type(x) in ALL_MARKS for x in jtu.tree_leaves(value, is_leaf=_stop_at_mark_or_module)
    )


def _unwrap_leaf(x: Any) -> Any:
    return x.unwrap() if type(x) in ALL_MARKS else x


def unwrapped(value: Any) -> Any:
    """A field value as user code sees it: marks replaced by their children, in any
    container, modules left as they are (they read through their own marks)."""
    kind = type(value)
    if kind in ALL_MARKS:
        return value.unwrap()
    if not holds_mark(value):
        return value
    if kind is tuple or kind is list:
        return kind(unwrapped(v) for v in value)
    if kind is dict:
        return {k: unwrapped(v) for k, v in value.items()}
    return jtu.tree_map(_unwrap_leaf, value, is_leaf=_stop_at_mark_or_module)


# -- status ---------------------------------------------------------------------------

_INEXACT: dict[Any, bool] = Cache()


def is_inexact(dtype: Any) -> bool:
    """Whether `dtype` is floating-point or complex (a trainable array's)."""
    # jnp.issubdtype knows bfloat16 and friends, but is slow: cache per dtype.
    known = _INEXACT.get(dtype)
    if known is None:
        known = _INEXACT[dtype] = bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))
    return known


def is_float_array(x: Any) -> bool:
    return is_array(x) and is_inexact(x.dtype)


def is_abstract_array(x: Any) -> bool:
    """An array of an abstract model (`jax.eval_shape`, `eqx.filter_eval_shape`)."""
    return type(x) is jax.ShapeDtypeStruct


def is_array_like(x: Any) -> bool:
    """An array, concrete or abstract: what surgery and statuses act on, so that every
    helper treats an abstract model as the concrete one it describes. An abstract bool
    scalar is not one: `jax.eval_shape` makes every Python bool (a mode) one."""
    if type(x) is jax.ShapeDtypeStruct:
        return not (x.shape == () and x.dtype == bool)
    return is_array(x)


def status_of(leaf: Any) -> Status:
    """Status of a leaf of a tree flattened with marks as leaves."""
    if type(leaf) in MARK_TYPES:
        return leaf.status
    if (is_array(leaf) or type(leaf) is jax.ShapeDtypeStruct) and is_inexact(leaf.dtype):
        return Status.TRAINABLE
    return Status.STATIC
