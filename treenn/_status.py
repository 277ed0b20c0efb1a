"""Leaf status: the thin pytree nodes that mark an array as frozen or as a buffer.

A mark is a pytree node with one child, the array. Its path key prints as nothing, so
`jax.tree_util.keystr` paths and treenn's dotted paths are the same with or without it,
and the mark survives every JAX transform (it is structure, not data). `treenn.Module`
unwraps marks on attribute access, behind `lax.stop_gradient`; code that reaches a mark
some other way (a foreign Equinox layer, an array inside a tuple) sees an array proxy that
supports operators and indexing, with the gradient stopped as well.
"""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer


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
    # (eqx.tree_at's sentinels, ShapeDtypeStructs) pass through untouched.
    if isinstance(value, Tracer):
        return jax.lax.stop_gradient(value)
    return value


class Mark:
    """Base of `Frozen` and `Buffer`: a pytree node holding one array."""

    __slots__ = ("value",)
    status: Status = Status.STATIC
    key: MarkKey = MarkKey("Mark")

    def __init__(self, value: Any):
        self.value = value

    def unwrap(self) -> Any:
        """The array, with its gradient stopped."""
        return _stopped(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"

    # -- array proxy, for code that reaches the mark without `treenn.Module` --------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def size(self) -> int:
        return self.value.size

    @property
    def T(self) -> Any:
        return self.unwrap().T

    def __len__(self) -> int:
        return len(self.value)

    def __jax_array__(self) -> Any:
        # Lets `jnp` functions take a mark that reached them directly.
        return self.unwrap()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.value, dtype=dtype)

    def __getattr__(self, name: str) -> Any:
        # Only called for names the mark itself lacks: `.reshape`, `.astype`, `.sum`...
        if name.startswith("__") or name == "value":
            raise AttributeError(name)
        return getattr(self.unwrap(), name)


def _forward(name: str) -> Any:
    def method(self: Mark, *args: Any) -> Any:
        return getattr(self.unwrap(), name)(*args)

    method.__name__ = name
    return method


for _name in (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ "
    "__floordiv__ __rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __matmul__ "
    "__rmatmul__ __neg__ __pos__ __abs__ __getitem__ __lt__ __le__ __gt__ __ge__ "
    "__and__ __rand__ __or__ __ror__ __invert__"
).split():
    setattr(Mark, _name, _forward(_name))


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


def _register(cls: type[Mark]) -> None:
    key = cls.key
    jtu.register_pytree_with_keys(
        cls,
        lambda m: (((key, m.value),), None),
        lambda _, children: cls(*children),
        lambda m: ((m.value,), None),
    )


_register(Frozen)
_register(Buffer)

MARK_TYPES: frozenset[type] = frozenset({Frozen, Buffer})
ARRAY_TYPES: tuple[type, ...] = (jax.Array, np.ndarray, np.generic)


_IS_ARRAY: dict[type, bool] = {}


def is_array(x: Any) -> bool:
    """`isinstance(x, ARRAY_TYPES)`, cached per type: `jax.Array`'s isinstance check is
    an ABC lookup that costs over a microsecond for an Equinox module."""
    kind = type(x)
    known = _IS_ARRAY.get(kind)
    if known is None:
        known = _IS_ARRAY[kind] = isinstance(x, ARRAY_TYPES)
    return known


def is_mark(x: Any) -> bool:
    return type(x) in MARK_TYPES


def is_array_leaf(leaf: Any) -> bool:
    """An array leaf of a model as the walker sees it: an array or a marked one."""
    return type(leaf) in MARK_TYPES or isinstance(leaf, ARRAY_TYPES)


def unmarked(leaf: Any) -> Any:
    """The array inside a status mark, or `leaf` itself when it is not marked."""
    return leaf.value if type(leaf) in MARK_TYPES else leaf


def marked_like(leaf: Any, value: Any) -> Any:
    """`value` in the status mark `leaf` has (as it is when `leaf` has none)."""
    return type(leaf)(value) if type(leaf) in MARK_TYPES else value


_INEXACT: dict[Any, bool] = {}


def is_inexact(dtype: Any) -> bool:
    """Whether `dtype` is floating-point or complex (a trainable array's)."""
    # jnp.issubdtype knows bfloat16 and friends, but is slow: cache per dtype.
    known = _INEXACT.get(dtype)
    if known is None:
        known = _INEXACT[dtype] = bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))
    return known


def is_float_array(x: Any) -> bool:
    return is_array(x) and is_inexact(x.dtype)


def status_of(leaf: Any) -> Status:
    """Status of a leaf of a tree flattened with marks as leaves."""
    if type(leaf) in MARK_TYPES:
        return leaf.status
    if is_array(leaf) and is_inexact(leaf.dtype):
        return Status.TRAINABLE
    return Status.STATIC
