"""`treenn.jit`: `eqx.filter_jit`'s semantics, with little Python work per call.

This file is what a call *means*, read on its own. `_jit_fast.py` makes the same calls
cheaper (a memo of the previous call's trees, generated code); it changes no result, and
`TREENN_JIT_FAST=0` in the environment (read at import) switches it off, leaving this path
alone. The jit tests run both ways.

Every array leaf of the arguments is traced; every other leaf (Python bools such as
`inference`, ints, strings, functions) is static: part of the compilation key, compared
by type and value as `jax.jit` compares static arguments. Per call:

1. keyword arguments are bound to the signature, so `f(a, y=b)` and `f(a, b)` are one
   call;
2. each argument is flattened with JAX's C++ flatten into its list of arrays and its
   `Structure` (tree structure and static leaves); one `jax.jit` over the lists of
   arrays is kept per tuple of structures (the *key*), the least recently used dropped
   beyond `_MAX_TRACES`;
3. the compiled function returns its computed arrays together with a description of its
   output (`_Out`) as static pytree data, so JAX's own cache hands every call the
   description of the very trace it ran (shapes, dtypes, weak types, shardings: whatever
   `jax.jit` keys on), and no call or thread can see another's;
4. an output array that is an input array unchanged (a frozen weight) is not an output of
   the computation: the input array itself is put back in its place, saving the copy
   `jax.jit` would make of it every call. Donated arguments are never passed through,
   and an array both donated and used elsewhere in the call is an error.

Nothing of a call is kept once it returns: this path holds no input or output at all, and
the fast path's memo only weak references (`_jit_fast.py`). The only shared state is the
trace cache, whose single lookups and insertions are atomic; so is calling from several
threads.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import jax
import jax.tree_util as jtu
import numpy as np

from ._caches import Cache
from ._status import is_array

_P = ParamSpec("_P")
_Q = ParamSpec("_Q")
_R = TypeVar("_R")
_S = TypeVar("_S")

Donate = Literal["none", "all", "all-except-first", "warn", "warn-except-first"]

# donate -> (whether to donate, whether the first argument is kept, warning hidden)
_DONATE: dict[str, tuple[bool, bool, bool]] = {
    "none": (False, False, False),
    "all": (True, False, True),
    "all-except-first": (True, True, True),
    "warn": (True, False, False),
    "warn-except-first": (True, True, False),
}
_MAX_TRACES = 256  # compiled structures kept per function, least recently used dropped
_HOST = (np.ndarray, np.generic)

# Whether `treenn.jit` functions made from now on take the fast paths of `_jit_fast.py`.
_FAST = os.environ.get("TREENN_JIT_FAST", "1") != "0"


def _set_fast(on: bool) -> bool:
    """Switch the fast paths for `treenn.jit` functions made afterwards (tests and
    benchmarks); returns the previous setting."""
    global _FAST
    previous, _FAST = _FAST, bool(on)
    return previous


class Structure:
    """One argument's tree structure and static leaves (`None` where an array goes): an
    entry of the compilation key. Compared by value, and static leaves by type too, as
    `jax.jit` compares static arguments (`1`, `1.0` and `True` are three keys).

    Raises `TypeError` when a static leaf is unhashable."""

    __slots__ = ("treedef", "statics", "_key", "_hash")

    def __init__(self, treedef: Any, statics: tuple[Any, ...]):
        self.treedef = treedef
        self.statics = statics
        self._key = (treedef, statics, tuple(map(type, statics)))
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Structure) and self._hash == other._hash and self._key == other._key
        )

    def build(self, arrays: Sequence[Any]) -> Any:
        """The tree, its array places filled from `arrays` in order."""
        it = iter(arrays)
        return self.treedef.unflatten([next(it) if s is None else s for s in self.statics])


class _Template:
    """An output part that is not a key entry (its static leaves may be unhashable)."""

    __slots__ = ("treedef", "statics")

    def __init__(self, treedef: Any, statics: tuple[Any, ...]):
        self.treedef = treedef
        self.statics = statics

    build = Structure.build


_ARRAY: Any = object()  # the key entry of a bare array argument


class _Out:
    """How to rebuild one trace's output from the computed arrays and the inputs.

    The compiled function returns it as static pytree data, so each call receives the
    description made by the trace that produced its arrays."""

    __slots__ = ("forwarded", "parts", "is_tuple")

    def __init__(self, forwarded: Any, parts: Any, is_tuple: bool):
        # Arrays are taken from a *pool*: the computed arrays, then the forwarded inputs
        # `((input list, index in it), ...)`.
        self.forwarded = forwarded
        # Per top-level element (the output itself unless it is a tuple), one of
        # `(pool index, None)`: a bare array; `(get, how)`: a tree, `how.build(get(pool))`
        # (`how` a `Structure`, or a `_Template` where a static leaf is unhashable).
        self.parts = parts
        self.is_tuple = is_tuple

    def build(
        self,
        computed: list[Any],
        inputs: list[list[Any]],
        make: Callable[[Any, Sequence[Any]], Any],
    ) -> Any:
        """The output; each tree part is `make(how, arrays)`."""
        pool = computed
        if self.forwarded:
            # A NumPy input passed through comes back as a JAX array, as from `jax.jit`.
            pool = computed + [
                jax.numpy.asarray(x) if isinstance(x, _HOST) else x
                for x in [inputs[k][j] for k, j in self.forwarded]
            ]
        elements = [pool[get] if how is None else make(how, get(pool)) for get, how in self.parts]
        return tuple(elements) if self.is_tuple else elements[0]


jtu.register_pytree_node(_Out, lambda out: ((), out), lambda out, _: out)


def _build(how: Any, arrays: Sequence[Any]) -> Any:
    return how.build(arrays)


def _getter(indices: list[int]) -> Callable[[list[Any]], Any]:
    """`get(pool)`: the sequence of `pool`'s items at `indices` (C speed)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda pool: (pool[index],)
    if not indices:
        return lambda pool: ()
    return operator.itemgetter(*indices)


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
        self._donating, self._keep_first, self._quiet = _DONATE[donate]
        # A callable module or bound method holds arrays: flatten it with the arguments.
        self._static_fn = len(jtu.tree_leaves(fn)) == 1 and jtu.tree_leaves(fn)[0] is fn
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have none: kwargs stay kwargs
            self._signature = None
        self._cache: dict[tuple[Any, ...], Any] = Cache(maxsize=_MAX_TRACES)

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
        jitted, lists = self._prepare(args, kwargs)
        computed, out = self._run(jitted, lists)
        result: _R = out.build(computed, lists, _build)
        return result

    def lower(self, *args: _P.args, **kwargs: _P.kwargs) -> Any:
        """Trace and lower for these arguments without running, as `jax.jit(f).lower`:
        the result's `.compile()`, `.as_text()` and `.cost_analysis()` are JAX's. (Its
        executable takes treenn's internal flat argument lists: to run, call `f`.)"""
        jitted, lists = self._prepare(args, kwargs)
        return jitted.lower(*lists)

    # -- one call -------------------------------------------------------------------------
    def _prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *more: Any
    ) -> tuple[Any, list[list[Any]]]:
        """The compiled function for these arguments, and one list of arrays per argument
        (positional arguments, then the keyword ones, then the function's own). `more` is
        passed on to `_partition`."""
        if kwargs and self._signature is not None:
            args, kwargs = self._bind(args, kwargs)
        objects: tuple[Any, ...] = args
        if kwargs:
            objects = (*objects, kwargs)
        if not self._static_fn:
            objects = (*objects, self._fn)
        lists, structures = self._partition(objects, args, kwargs, *more)
        key = (len(args), bool(kwargs), *structures)
        jitted = self._cache.get(key)
        if jitted is None:
            jitted = self._compile(key)
        if self._donating:
            self._check_donation(lists, len(args), args, kwargs)
        return jitted, lists

    def _partition(
        self, objects: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[list[Any]], list[Any]]:
        """Each object's arrays and key entry (`_ARRAY` for a bare array)."""
        lists, structures = [], []
        for x in objects:
            if is_array(x):
                lists.append([x])
                structures.append(_ARRAY)
            else:
                arrays, structure = self._split(x, args, kwargs)
                lists.append(arrays)
                structures.append(structure)
        return lists, structures

    def _split(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], Structure]:
        leaves, treedef = jtu.tree_flatten(x)
        arrays: list[Any] = []
        statics: list[Any] = []
        for leaf in leaves:
            if is_array(leaf):
                arrays.append(leaf)
                statics.append(None)  # never a leaf itself: a free placeholder
            else:
                statics.append(leaf)
        try:
            return arrays, self._structure(treedef, tuple(statics))
        except TypeError:
            raise self._unhashable(args, kwargs) from None

    def _structure(self, treedef: Any, statics: tuple[Any, ...]) -> Structure:
        """The key entry of a tree; `TypeError` if a static leaf is unhashable."""
        return Structure(treedef, statics)

    def _run(self, jitted: Any, lists: list[list[Any]]) -> tuple[list[Any], _Out]:
        if self._quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                return jitted(*lists)
        return jitted(*lists)

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self._signature is not None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"treenn.jit({_name(self._fn)}): {err}") from None
        return bound.args, bound.kwargs

    # -- one trace ------------------------------------------------------------------------
    def _donated(self, n_objects: int, n_args: int) -> tuple[int, ...]:
        if not self._donating:
            return ()
        first = 1 if self._keep_first and n_args > 0 else 0
        return tuple(range(first, n_objects))

    def _compile(self, key: tuple[Any, ...]) -> Any:
        n_args, has_kwargs, *structures = key
        fn, static_fn = self._fn, self._static_fn
        donated = self._donated(len(structures), n_args)

        def flat(*lists: list[Any]) -> tuple[list[Any], _Out]:
            objects = [
                arrays[0] if s is _ARRAY else s.build(arrays)
                for s, arrays in zip(structures, lists)
            ]
            call = fn if static_fn else objects[-1]
            out = call(*objects[:n_args], **(objects[n_args] if has_kwargs else {}))
            # Donated buffers are deleted by the call: only kept inputs pass through.
            kept = [[] if k in donated else a for k, a in enumerate(lists)]
            return self._describe(out, kept, structures)

        jitted = jax.jit(flat, donate_argnums=donated)
        self._cache[key] = jitted  # two threads may both compile a new key: either wins
        return jitted

    def _describe(
        self, out: Any, inputs: list[list[Any]], structures: Sequence[Any]
    ) -> tuple[list[Any], _Out]:
        """At trace time: the arrays the computation must return, and how to rebuild `out`
        from them and from the inputs that may pass through (`inputs`, tracers, whose key
        entries are `structures`)."""
        leaves, flat_def = jtu.tree_flatten(out)
        treedef: Any = flat_def  # (`children()` is missing from JAX's type stubs)
        source = {id(x): (k, j) for k, arrays in enumerate(inputs) for j, x in enumerate(arrays)}
        template = list(leaves)
        computed, positions, forwarded = [], [], []
        for position, leaf in enumerate(leaves):
            if not is_array(leaf):
                continue
            template[position] = None
            where = source.get(id(leaf))
            if where is None:
                positions.append(position)
                computed.append(leaf)
            else:
                forwarded.append((position, *where))
        is_tuple = type(out) is tuple
        parts: list[tuple[Any, Any]] = []
        start = 0
        pool = {p: i for i, p in enumerate(positions)}
        pool.update((p, len(positions) + i) for i, (p, _, _) in enumerate(forwarded))
        for part in treedef.children() if is_tuple else [treedef]:
            end = start + part.num_leaves
            statics = tuple(template[start:end])
            get = [pool[start + p] for p in range(end - start) if statics[p] is None]
            if part.num_nodes == 1 and statics == (None,):
                parts.append((get[0], None))  # a bare array
            else:
                try:
                    how: Any = self._structure(part, statics)
                except TypeError:  # outputs may hold unhashable objects
                    how = _Template(part, statics)
                parts.append((_getter(get), how))
            start = end
        description = _Out(tuple((k, j) for _, k, j in forwarded), tuple(parts), is_tuple)
        return computed, description

    # -- errors ---------------------------------------------------------------------------
    def _check_donation(
        self, lists: list[list[Any]], n_args: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """A donated buffer must not be used elsewhere in the call: that use would see a
        deleted array (or the forwarded input would come back deleted)."""
        donated = self._donated(len(lists), n_args)
        seen: set[int] = set()
        clash = False
        for k in donated:
            for x in lists[k]:
                if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                    clash = clash or id(x) in seen
                    seen.add(id(x))
        for k in range(len(lists)):
            if k not in donated:
                clash = clash or any(id(x) in seen for x in lists[k])
        if not clash:
            return
        tree = (args, kwargs) if self._static_fn else (args, kwargs, self._fn)
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

    def _unhashable(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TypeError:
        tree = (args, kwargs) if self._static_fn else (args, kwargs, self._fn)
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            if not is_array(leaf) and not _hashable(leaf):
                return TypeError(
                    f"treenn.jit({_name(self._fn)}): non-array argument leaves are static "
                    f"and must be hashable; got unhashable {type(leaf).__name__} at "
                    f"{_where(path)}: {leaf!r}"
                )
        return TypeError(f"treenn.jit({_name(self._fn)}): an argument leaf is unhashable")


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
    if _FAST:
        from ._jit_fast import FastJitted  # (it builds on this file)

        return FastJitted(fn, donate)
    return Jitted(fn, donate)
