"""`treenn.jit`: `eqx.filter_jit`'s semantics with little Python work per call.

Every array leaf of the arguments is traced; every other leaf (Python bools such as
`inference`, ints, strings, functions) is static: part of the compilation key, compared
by type and value as `jax.jit` compares static arguments. Per call:

1. keyword arguments are bound to the signature, so `f(a, y=b)` and `f(a, b)` are one
   call;
2. each argument is flattened with JAX's C++ flatten into its arrays and an interned
   *structure* (tree structure and static leaves), and one `jax.jit` over the lists of
   arrays is cached per tuple of structures. An argument this function returned (or
   received) on its previous call, the model and optimiser state of a training loop, is
   recognised by identity and not flattened again. The recognition holds only weak
   references to the tree's Equinox modules (a tuple, such as an optimiser state, is
   recognised by its items), holds arrays only inside those modules, and is dropped when
   one of them dies: it never keeps anything alive;
3. the compiled function returns its computed arrays together with a description of its
   output as static pytree data, so JAX's own cache hands every call the description of
   the very trace it ran (shapes, dtypes, weak types, shardings: whatever `jax.jit`
   keys on), and no call or thread can see another's. Outputs are rebuilt by code
   generated once per structure (`_fastbuild`), after the computation was dispatched;
4. an output array that is an input array unchanged (a frozen weight) is not an output of
   the computation: the input array itself is put back in its place, saving the copy
   `jax.jit` would make of it every call.
"""

from __future__ import annotations

import functools
import inspect
import operator
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._caches import register
from ._fastbuild import builder
from ._status import MARK_TYPES, is_array

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
_MAX_TRACES = 256  # compiled structures kept per function; the oldest dropped beyond
_MAX_STRUCTURES = 4096  # interned argument structures per function; all dropped beyond
_HOST = (np.ndarray, np.generic)


class _Structure:
    """One argument's tree structure and static leaves (`None` where an array goes).
    Interned per function, so that it is its own, identity-hashed, cache key."""

    __slots__ = ("treedef", "statics", "plan", "guard", "collect", "_fast")

    def __init__(self, treedef: Any, statics: tuple[Any, ...]):
        self.treedef = treedef
        self.statics = statics
        # How to recognise a tree of this structure next call (`None`: flatten it).
        plan = _plan(treedef, statics) if _immutable(treedef) else None
        self.plan = None if plan is _ITEM or plan is _NONE else plan
        # A tuple (an optimiser state) is recognised by code generated for its plan.
        code: tuple[Any, Any] = _tuple_code(plan) if type(plan) is tuple else (None, None)
        self.guard, self.collect = code
        self._fast: Callable[[Any], Any] | None = None

    def build_fast(self, arrays: Sequence[Any]) -> Any:
        """`build`, through code generated once for this structure (per-call outputs)."""
        fast: Callable[[Any], Any] | None = self._fast
        if fast is None:
            try:
                fast = builder(self.treedef, self.statics, None)
            except RecursionError:  # a very deep model: JAX rebuilds it
                fast = self.build
            self._fast = fast
        return fast(arrays)

    def build(self, arrays: Sequence[Any]) -> Any:
        it = iter(arrays)
        return self.treedef.unflatten([next(it) if s is None else s for s in self.statics])


_ARRAY: Any = object()  # the structure of a bare array argument
_NOTHING: Mapping[int, Any] = types.MappingProxyType({})  # no tree remembered


def _immutable(treedef: Any) -> bool:
    """Whether every node of `treedef` is of a type that cannot change in place (a list,
    a dict or a user's own pytree class might: those are flattened every call)."""
    stack = [treedef]
    while stack:
        node = stack.pop()
        data = node.node_data()
        if data is not None:
            kind = data[0]
            if not (
                issubclass(kind, (tuple, eqx.Module, jtu.Partial))
                or kind is type(None)
                or kind in MARK_TYPES
            ):
                return False
        stack.extend(node.children())
    return True


# How a remembered tree is recognised (its *plan*, from its structure): `_ITEM` an array
# leaf (any array fits: arrays are leaves), `_NONE` None, an int n a weakly referable node
# (an Equinox module) with n arrays, `(type, items, sizes)` a tuple (immutable, not weakly
# referable: it is its items), `None` not recognisable.
_ITEM: Any = object()
_NONE: Any = object()


def _plan(treedef: Any, statics: tuple[Any, ...], depth: int = 0) -> Any:
    data = treedef.node_data()
    if data is None:
        return _ITEM if statics[0] is None else None
    kind = data[0]
    if kind is type(None):
        return _NONE
    if issubclass(kind, tuple) and depth < 8:
        items, sizes, start = [], [], 0
        for child in treedef.children():
            part = statics[start : start + child.num_leaves]
            item = _plan(child, part, depth + 1)
            if item is None:
                return None
            items.append(item)
            sizes.append(sum(1 for s in part if s is None))
            start += child.num_leaves
        return (kind, tuple(items), tuple(sizes))
    if kind.__weakrefoffset__:
        return sum(1 for s in statics if s is None)
    return None


class _Weak:
    """A weakly referenced node of a remembered tree, and its arrays. The arrays are the
    node's own: holding them while the node lives keeps nothing alive longer."""

    __slots__ = ("ref", "arrays")

    def __init__(self, ref: Any, arrays: Sequence[Any]):
        self.ref = ref
        self.arrays = arrays


def _tuple_code(plan: Any) -> tuple[Callable[..., Any], Callable[..., bool]]:
    """For a tuple plan, straight-line code (a call per item would be a measurable share
    of a call): `guard(x, arrays, forget)`, the `_Weak` records of `x`'s weakly
    referable nodes, and `collect(x, guards, out)`, whether `x` is still the tree they
    were made for (same tuple types and lengths, the same nodes, arrays where arrays
    were), its arrays appended to `out`."""
    consts: dict[str, Any] = {"_Weak": _Weak, "_ref": weakref.ref, "_is_array": is_array}
    access: list[str] = []  # `guard`'s lines
    check: list[str] = []  # `collect`'s lines
    weak: list[str] = []

    def walk(plan: Any, var: str, start: int) -> None:
        kind, items, sizes = plan
        consts[f"_k{len(consts)}"] = kind
        check.append(
            f"    if type({var}) is not _k{len(consts) - 1} or len({var}) != {len(items)}:"
        )
        check.append("        return False")
        for index, (item, size) in enumerate(zip(items, sizes)):
            name = f"x{len(access)}"
            access.append(f"    {name} = {var}[{index}]")
            check.append(f"    {name} = {var}[{index}]")
            if type(item) is int:
                check.append(f"    w = g[{len(weak)}]")
                check.append(f"    if w.ref() is not {name}:")
                check.append("        return False")
                check.append("    out.extend(w.arrays)")
                weak.append(f"_Weak(_ref({name}, forget), a[{start}:{start + size}])")
            elif item is _ITEM:
                check.append(f"    if not _is_array({name}):")
                check.append("        return False")
                check.append(f"    out.append({name})")
            elif item is _NONE:
                check.append(f"    if {name} is not None:")
                check.append("        return False")
            else:
                walk(item, name, start)
            start += size

    walk(plan, "x", 0)
    source = (
        "def guard(x, a, forget):\n"
        + "".join(line + "\n" for line in access)
        + f"    return ({''.join(w + ', ' for w in weak)})\n"
        + "def collect(x, g, out):\n"
        + "".join(line + "\n" for line in check)
        + "    return True\n"
    )
    namespace = dict(consts)
    exec(compile(source, "<treenn guard>", "exec"), namespace)
    return namespace["guard"], namespace["collect"]


class _Known:
    """A tree this function received or returned, recognised by identity next call.
    It holds arrays only inside its weakly referenced nodes, and is dropped as soon as
    one of them dies."""

    __slots__ = ("guard", "structure", "token")

    def __init__(self, guard: Any, structure: _Structure, token: object):
        self.guard = guard
        self.structure = structure
        self.token = token


def _still(known: _Known, x: Any, out: list[Any]) -> bool:
    """Whether `x` is the remembered tree; its arrays are appended to `out`."""
    guard = known.guard
    if type(guard) is _Weak:
        if guard.ref() is not x:
            return False
        out.extend(guard.arrays)
        return True
    collect = known.structure.collect
    assert collect is not None
    return bool(collect(x, guard, out))


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
        # `(pool index, None, None)`: an array; `(get, structure, None)`: a tree rebuilt by
        # `structure` from `get(pool)` and remembered; `(get, treedef, template)`: any
        # other tree, unflattened from `template` (its leaves, `None` where an array goes).
        self.parts = parts
        self.is_tuple = is_tuple

    def build(
        self, computed: list[Any], inputs: list[list[Any]], owner: Jitted[..., Any], memo: Any
    ) -> Any:
        pool = computed
        if self.forwarded:
            # A NumPy input passed through comes back as a JAX array, as from `jax.jit`.
            pool = computed + [
                jax.numpy.asarray(x) if isinstance(x, _HOST) else x
                for x in [inputs[k][j] for k, j in self.forwarded]
            ]
        elements = []
        for get, how, template in self.parts:
            if how is None:
                elements.append(pool[get])
                continue
            arrays = get(pool)
            if template is None:
                element = how.build_fast(arrays)
                owner._remember(memo, element, how, arrays)
            else:
                it = iter(arrays)
                element = how.unflatten([next(it) if s is None else s for s in template])
            elements.append(element)
        return tuple(elements) if self.is_tuple else elements[0]


def _getter(indices: list[int]) -> Callable[[list[Any]], Any]:
    """`get(pool)`: the sequence of `pool`'s items at `indices` (C speed)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda pool: (pool[index],)
    if not indices:
        return lambda pool: ()
    return operator.itemgetter(*indices)


jtu.register_pytree_node(_Out, lambda out: ((), out), lambda out, _: out)


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
        self._cache: dict[tuple[Any, ...], Any] = register(_Cache())
        self._structures: dict[Any, _Structure] = register(_Cache())
        self._memo: dict[int, _Known] = {}
        self._lock = threading.Lock()
        self._weakself = weakref.ref(self)

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
        memo: dict[int, _Known] = {}
        jitted, lists = self._prepare(args, kwargs, memo)
        if self._quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                computed, out = jitted(*lists)
        else:
            computed, out = jitted(*lists)
        result: _R = out.build(computed, lists, self, memo)
        self._memo = memo  # this call's objects only: the previous ones are forgotten
        return result

    def lower(self, *args: _P.args, **kwargs: _P.kwargs) -> Any:
        """Trace and lower for these arguments without running, as `jax.jit(f).lower`:
        the result's `.compile()`, `.as_text()` and `.cost_analysis()` are JAX's. (Its
        executable takes treenn's internal flat argument lists: to run, call `f`.)"""
        jitted, lists = self._prepare(args, kwargs, {}, recognise=False)
        return jitted.lower(*lists)

    # -- internals ----------------------------------------------------------------------
    def _prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        memo: dict[int, _Known],
        recognise: bool = True,
    ) -> tuple[Any, list[list[Any]]]:
        """The compiled function for these arguments, and one list of arrays per argument
        (positional arguments, then the keyword ones, then the function's own); the trees
        recognised from the previous call (when `recognise`) and those to recognise next
        time go to `memo`."""
        # `self._memo` is shared: other threads replace it and weakref callbacks pop from
        # it at any moment. Only single lookups are atomic, so it is read here, once, and
        # never handed to anything that iterates it (as a runtime type checker would).
        known = self._memo if recognise else _NOTHING
        if kwargs and self._signature is not None:
            args, kwargs = self._bind(args, kwargs)
        objects: tuple[Any, ...] = args
        if kwargs:
            objects = (*objects, kwargs)
        if not self._static_fn:
            objects = (*objects, self._fn)
        lists = []
        key: list[Any] = [len(args), bool(kwargs)]
        for x in objects:
            if is_array(x):
                lists.append([x])
                key.append(_ARRAY)
                continue
            hit = known.get(id(x))
            arrays: list[Any] = []
            if hit is not None and _still(hit, x, arrays):
                memo[id(x)] = hit
                structure = hit.structure
            else:
                arrays, structure = self._split(x, args, kwargs)
                if structure.plan is not None and not any(isinstance(a, _HOST) for a in arrays):
                    self._remember(memo, x, structure, arrays)
            lists.append(arrays)
            key.append(structure)
        jitted = self._cache.get(tuple(key))
        if jitted is None:
            jitted = self._compile(tuple(key))
        if self._donating:
            self._check_donation(lists, len(args), args, kwargs)
        return jitted, lists

    def _remember(
        self, memo: dict[int, _Known], x: Any, structure: _Structure, arrays: Sequence[Any]
    ) -> None:
        key, token, owner = id(x), object(), self._weakself

        def forget(_: Any) -> None:
            # `x` (or an item of it) died: drop the record, and with it the arrays.
            jitted = owner()
            if jitted is not None:
                known = jitted._memo.get(key)
                if known is not None and known.token is token:
                    jitted._memo.pop(key, None)

        guard: Any
        if structure.guard is None:  # a weakly referable node (an Equinox module)
            guard = _Weak(weakref.ref(x, forget), arrays)
        else:
            guard = structure.guard(x, arrays, forget)
        memo[key] = _Known(guard, structure, token)

    def _split(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], _Structure]:
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
            return arrays, self._intern(treedef, tuple(statics))
        except TypeError:
            raise self._unhashable(args, kwargs) from None

    def _intern(self, treedef: Any, statics: tuple[Any, ...]) -> _Structure:
        """The one `_Structure` for this structure; `TypeError` if a static is unhashable."""
        key = (treedef, statics, tuple(map(type, statics)))
        structure = self._structures.get(key)
        if structure is None:
            with self._lock:
                if len(self._structures) >= _MAX_STRUCTURES:
                    self._structures.clear()
                structure = self._structures.setdefault(key, _Structure(treedef, statics))
        return structure

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self._signature is not None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"treenn.jit({_name(self._fn)}): {err}") from None
        return bound.args, bound.kwargs

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
            return self._describe(out, [[] if k in donated else a for k, a in enumerate(lists)])

        jitted = jax.jit(flat, donate_argnums=donated)
        with self._lock:
            if len(self._cache) >= _MAX_TRACES:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = jitted
        return jitted

    def _describe(self, out: Any, inputs: list[list[Any]]) -> tuple[list[Any], _Out]:
        """At trace time: the arrays the computation must return, and how to rebuild `out`
        from them and from the inputs that may pass through (`inputs`, tracers)."""
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
        parts: list[tuple[Any, Any, Any]] = []
        start = 0
        pool = {p: i for i, p in enumerate(positions)}
        pool.update((p, len(positions) + i) for i, (p, _, _) in enumerate(forwarded))
        for part in treedef.children() if is_tuple else [treedef]:
            end = start + part.num_leaves
            statics = tuple(template[start:end])
            get = [pool[start + p] for p in range(end - start) if statics[p] is None]
            if part.num_nodes == 1 and statics == (None,):
                parts.append((get[0], None, None))  # a bare array
                start = end
                continue
            try:
                structure: _Structure | None = self._intern(part, statics)
            except TypeError:  # outputs may hold unhashable objects: just not remembered
                structure = None
            if structure is not None and structure.plan is not None:
                parts.append((_getter(get), structure, None))
            else:
                parts.append((_getter(get), part, statics))
            start = end
        description = _Out(tuple((k, j) for _, k, j in forwarded), tuple(parts), is_tuple)
        return computed, description

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
