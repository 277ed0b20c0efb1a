"""`treenn.jit`: `eqx.filter_jit`'s semantics with little Python work per call.

Every array leaf of the arguments is traced; every other leaf (Python bools such as
`inference`, ints, strings, functions) is static: part of the compilation key, compared
by type and value as `jax.jit` compares static arguments. Per call:

1. keyword arguments are bound to the signature, so `f(a, y=b)` and `f(a, b)` are one
   call;
2. `(args, kwargs)` is flattened once with JAX's C++ flatten, and `(treedef, static
   leaves, their types)` picks one `jax.jit` over the flat list of arrays;
3. the compiled function returns its computed arrays together with a description of its
   output as static pytree data, so JAX's own cache hands every call the description of
   the very trace it ran (shapes, dtypes, weak types, shardings: whatever `jax.jit`
   keys on), with no state shared between calls or threads;
4. an output array that is an input array unchanged (a frozen weight) is not an output of
   the computation: the input array itself is put back in its place, saving the copy
   `jax.jit` would make of it every call.

Nothing is kept from a call but the compiled code: no reference to its inputs or
outputs outlives it.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import jax
import jax.tree_util as jtu
import numpy as np

from ._caches import register
from ._status import is_array

_P = ParamSpec("_P")
_Q = ParamSpec("_Q")
_R = TypeVar("_R")
_S = TypeVar("_S")

Donate = Literal["none", "all", "all-except-first", "warn", "warn-except-first"]

# donate -> (donate_argnums of (kept, donated), JAX's unusable-donation warning hidden)
_DONATE: dict[str, tuple[tuple[int, ...], bool]] = {
    "none": ((), False),
    "all": ((1,), True),
    "all-except-first": ((1,), True),
    "warn": ((1,), False),
    "warn-except-first": ((1,), False),
}
_MAX_TRACES = 256  # structures kept per function; the oldest is dropped beyond
_HOST = (np.ndarray, np.generic)


class _Out:
    """How to rebuild one trace's output from the computed arrays and the inputs.

    The compiled function returns it as static pytree data, so each call receives the
    description made by the trace that produced its arrays."""

    __slots__ = ("treedef", "template", "computed", "forwarded")

    def __init__(self, treedef: Any, template: tuple[Any, ...], computed: Any, forwarded: Any):
        self.treedef = treedef
        self.template = template  # the output's leaves, `None` where an array goes
        self.computed = computed  # leaf positions of the computed arrays, in order
        self.forwarded = forwarded  # ((leaf position, input array index), ...)

    def build(self, computed: list[Any], inputs: list[Any]) -> Any:
        leaves = list(self.template)
        for position, x in zip(self.computed, computed):
            leaves[position] = x
        for position, index in self.forwarded:
            x = inputs[index]
            # A NumPy input passed through comes back as a JAX array, as from `jax.jit`.
            leaves[position] = jax.numpy.asarray(x) if isinstance(x, _HOST) else x
        return self.treedef.unflatten(leaves)


jtu.register_pytree_node(_Out, lambda out: ((), out), lambda out, _: out)


def _describe(out: Any, inputs: list[Any]) -> tuple[list[Any], _Out]:
    """At trace time: the arrays the computation must return, and how to rebuild `out`
    from them and from `inputs` (the forwardable input tracers)."""
    leaves, treedef = jtu.tree_flatten(out)
    source = {id(x): i for i, x in enumerate(inputs)}
    template = list(leaves)
    computed, positions, forwarded = [], [], []
    for position, leaf in enumerate(leaves):
        if not is_array(leaf):
            continue
        template[position] = None
        index = source.get(id(leaf))
        if index is None:
            positions.append(position)
            computed.append(leaf)
        else:
            forwarded.append((position, index))
    return computed, _Out(treedef, tuple(template), tuple(positions), tuple(forwarded))


class _Entry:
    """One structure's compiled function."""

    __slots__ = ("jitted", "n_kept")

    def __init__(self, jitted: Any, n_kept: int):
        self.jitted = jitted
        self.n_kept = n_kept  # the first this many array leaves are never donated


class Jitted(Generic[_P, _R]):
    """A function compiled by `treenn.jit`: called as the wrapped function."""

    def __init__(self, fn: Callable[_P, _R], donate: str):
        if donate not in _DONATE:
            raise ValueError(f"donate={donate!r} is not one of {list(_DONATE)}")
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, name):
                setattr(self, name, getattr(fn, name))
        self.__wrapped__ = fn
        self._fn = fn
        self._donate = donate
        self._donate_argnums, self._quiet = _DONATE[donate]
        self._keep_first = donate.endswith("except-first")
        # A callable module or bound method holds arrays: flatten it with the arguments.
        self._static_fn = len(jtu.tree_leaves(fn)) == 1 and jtu.tree_leaves(fn)[0] is fn
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have none: kwargs stay kwargs
            self._signature = None
        self._cache: dict[Any, _Entry] = register(_Cache())
        self._lock = threading.Lock()

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Jitted[_P, _R]: ...

    @overload
    def __get__(
        self: Jitted[Concatenate[_S, _Q], _R], instance: _S, owner: type | None = None
    ) -> Callable[_Q, _R]: ...

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # A method: bind `self` as the first argument, as `jax.jit` and `eqx.filter_jit`
        # do; `jtu.Partial` keeps the bound method a pytree (its arrays stay traceable).
        if instance is None:
            return self
        return jtu.Partial(self, instance)

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        entry, arrays = self._prepare(args, kwargs)
        kept, donated = arrays[: entry.n_kept], arrays[entry.n_kept :]
        if self._quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                computed, out = entry.jitted(kept, donated)
        else:
            computed, out = entry.jitted(kept, donated)
        result: _R = out.build(computed, arrays)
        return result

    def lower(self, *args: _P.args, **kwargs: _P.kwargs) -> Any:
        """Trace and lower for these arguments without running, as `jax.jit(f).lower`:
        the result's `.compile()`, `.as_text()` and `.cost_analysis()` are JAX's. (Its
        executable takes treenn's internal flat argument lists: to run, call `f`.)"""
        entry, arrays = self._prepare(args, kwargs)
        return entry.jitted.lower(arrays[: entry.n_kept], arrays[entry.n_kept :])

    # -- internals ----------------------------------------------------------------------
    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Entry, list[Any]]:
        """The compiled function for these arguments' structure, and their array leaves."""
        if kwargs and self._signature is not None:
            args, kwargs = self._bind(args, kwargs)
        tree = (args, kwargs) if self._static_fn else (args, kwargs, self._fn)
        leaves, treedef = jtu.tree_flatten(tree)
        arrays: list[Any] = []
        statics: list[Any] = []
        for leaf in leaves:
            if is_array(leaf):
                arrays.append(leaf)
                statics.append(None)  # never a leaf itself: a free placeholder
            else:
                statics.append(leaf)
        key = (treedef, tuple(statics), tuple(map(type, statics)))
        try:
            entry = self._cache.get(key)
        except TypeError:
            raise self._unhashable(tree) from None
        if entry is None:
            entry = self._compile(key, args)
        if self._donate_argnums and entry.n_kept < len(arrays):
            self._check_donation(arrays, entry.n_kept, tree)
        return entry, arrays

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self._signature is not None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"treenn.jit({_name(self._fn)}): {err}") from None
        return bound.args, bound.kwargs

    def _compile(self, key: tuple[Any, Any, Any], args: tuple[Any, ...]) -> _Entry:
        treedef, statics, _ = key
        fn, static_fn = self._fn, self._static_fn
        n_kept = 0
        if not self._donate_argnums:
            n_kept = sum(1 for s in statics if s is None)  # nothing donated: all kept
        elif self._keep_first and args:
            n_kept = sum(1 for leaf in jtu.tree_leaves(args[0]) if is_array(leaf))

        def flat(kept: list[Any], donated: list[Any]) -> tuple[list[Any], _Out]:
            arrays = iter([*kept, *donated])
            tree = treedef.unflatten([next(arrays) if s is None else s for s in statics])
            args, kwargs = tree[0], tree[1]
            out = (fn if static_fn else tree[2])(*args, **kwargs)
            # Donated buffers are deleted by the call: only kept inputs pass through.
            return _describe(out, kept)

        entry = _Entry(jax.jit(flat, donate_argnums=self._donate_argnums), n_kept)
        with self._lock:
            if len(self._cache) >= _MAX_TRACES:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = entry
        return entry

    def _check_donation(self, arrays: list[Any], n_kept: int, tree: Any) -> None:
        """A donated buffer must not be used elsewhere in the call: that use would see a
        deleted array (or the forwarded input would come back deleted)."""
        seen: set[int] = set()
        clash = False
        for x in arrays[n_kept:]:
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                clash = clash or id(x) in seen
                seen.add(id(x))
        clash = clash or any(id(x) in seen for x in arrays[:n_kept])
        if not clash:
            return
        paths: dict[int, list[str]] = {}
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            if id(leaf) in seen:
                paths.setdefault(id(leaf), []).append(_where(path))
        shared = next(p for p in paths.values() if len(p) > 1)
        raise ValueError(
            f"treenn.jit({_name(self._fn)}, donate={self._donate!r}): one array is passed "
            f"as {' and as '.join(shared)}; it would be donated (deleted) by the call while "
            "still used. Pass it once, or copy it (jnp.copy) for the second use"
        )

    def _unhashable(self, tree: Any) -> TypeError:
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            if not is_array(leaf) and not _hashable(leaf):
                return TypeError(
                    f"treenn.jit({_name(self._fn)}): non-array argument leaves are static "
                    f"and must be hashable; got unhashable {type(leaf).__name__} at "
                    f"{_where(path)}: {leaf!r}"
                )
        return TypeError(f"treenn.jit({_name(self._fn)}): an argument leaf is unhashable")


class _Cache(dict):  # type: ignore[type-arg]
    """A dict that `treenn.clear_caches` can hold weakly (a plain dict cannot)."""


def _where(path: tuple[Any, ...]) -> str:
    """`args[1].layers[0].weight` for a key path into `(args, kwargs[, fn])`."""
    head, rest = path[0], jtu.keystr(path[1:])
    index = getattr(head, "idx", 0)
    return ("args" if index == 0 else "kwargs" if index == 1 else "the function") + rest


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@overload
def jit(fn: Callable[_P, _R], *, donate: Donate = "none") -> Jitted[_P, _R]: ...


@overload
def jit(
    fn: None = None, *, donate: Donate = "none"
) -> Callable[[Callable[_P, _R]], Jitted[_P, _R]]: ...


def jit(fn: Callable[..., Any] | None = None, *, donate: Donate = "none") -> Any:
    """Compile `fn` with XLA: array leaves of the arguments are traced, everything else
    is static, as in `eqx.filter_jit`.

    **Arguments:**

    - `fn`: the function (or method, or callable module) to compile. Its arguments may be
        any pytrees (models, optimiser states, batches); non-array leaves (Python bools
        such as `inference`, numbers, strings) are static, compared by type and value,
        and must be hashable.
    - `donate`: which argument buffers XLA may reuse for the outputs, as in
        `eqx.filter_jit`: `"none"`, `"all"`, `"all-except-first"`, or `"warn"` /
        `"warn-except-first"` (the same, but JAX's warning about unusable donations is
        shown). An array passed both in a donated argument and elsewhere in the call
        raises a `ValueError`.

    **Returns:** the compiled function, typed as `fn`; outputs may hold anything (models
    included). Positional and keyword calls are bound to `fn`'s signature (one trace),
    methods bind `self`, and it is safe to call from several threads. It keeps no
    reference to a call's inputs or outputs; `treenn.clear_caches()` drops its compiled
    code. `f.lower(*args)` traces and lowers without running, as `jax.jit`'s does.

    An output array that is an input array passed through unchanged (a frozen weight)
    is that very array, not the copy `jax.jit` would make: a frozen backbone costs no
    copy and no extra memory per step. (So donating it later, in another call, deletes
    it in the input's model too. Donated arguments are never passed through.)

    !!! Example

        ```python
        @treenn.jit
        def step(model, opt_state, x, y):
            loss, grads = treenn.value_and_grad(loss_fn)(model, x, y)
            updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
            return treenn.apply_updates(model, updates), opt_state, loss
        ```
    """
    if fn is None:
        if donate not in _DONATE:
            raise ValueError(f"donate={donate!r} is not one of {list(_DONATE)}")
        return functools.partial(jit, donate=donate)
    return Jitted(fn, donate)
