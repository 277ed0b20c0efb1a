"""`treenn.jit`: `eqx.filter_jit` semantics with almost no Python dispatch cost.

Semantics: every array leaf of the arguments is traced, everything else is static (part
of the compilation key), outputs may hold anything. Speed comes from doing as little
per call as possible:

- Each argument is flattened once with JAX's C++ flatten into its array leaves and a
  small-integer *structure id* (interned from the tree structure and static leaves), and
  one `jax.jit` over the flat array list is cached per tuple of structure ids.
- An object this function returned on its previous call (the model and optimiser state
  of a training loop), or received on its previous call, is recognised by identity and
  not flattened again: its leaves and structure id are remembered. Only trees with no
  mutable containers (lists, dicts) are remembered this way.
- Outputs are rebuilt after the computation was dispatched, so with JAX's asynchronous
  dispatch the rebuild overlaps the computation.
- An output array that is an input array unchanged (a frozen weight, a pinned
  BatchNorm's statistics) is not an output of the computation: the input array is put
  in its place, so freezing saves the copy `jax.jit` would make of it every call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.tree_util as jtu
import numpy as np

from ._fastbuild import builder, immutable
from ._status import is_array

Donate = Literal["none", "all", "all-except-first", "warn", "warn-except-first"]

_DONATE = ("none", "all", "all-except-first", "warn", "warn-except-first")
_ARRAY_ID = 0  # structure id of a bare array argument


class _Dynamic:
    """Placeholder for an array leaf inside a structure key."""

    def __repr__(self) -> str:
        return "<array>"


_DYNAMIC = _Dynamic()


class _Structure:
    """A tree structure with its static leaves: how to rebuild an object from arrays."""

    __slots__ = ("treedef", "statics", "n_dynamic", "immutable", "_fast")

    def __init__(self, treedef: Any, statics: tuple[Any, ...]):
        self.treedef = treedef
        self.statics = statics
        self.n_dynamic = sum(1 for s in statics if s is _DYNAMIC)
        self.immutable = immutable(treedef)
        self._fast: Callable[[list[Any]], Any] | None = None

    def build(self, arrays: list[Any]) -> Any:
        it = iter(arrays)
        return self.treedef.unflatten([next(it) if s is _DYNAMIC else s for s in self.statics])

    def build_fast(self, arrays: list[Any]) -> Any:
        """`build`, through code generated for this structure (for per-call outputs)."""
        if self._fast is None:
            self._fast = builder(self.treedef, self.statics, _DYNAMIC)
        return self._fast(arrays)


class _Entry:
    """One compiled function: for one tuple of argument structure ids."""

    __slots__ = ("jitted", "out", "by_shape")

    def __init__(self) -> None:
        self.jitted: Any = None
        # (structure of the output, [(start, stop, structure id) of each top-level
        # element when the output is a tuple]) as found by the latest trace.
        self.out: Any = None
        # Set when two traces of this entry gave different output structures.
        self.by_shape: dict[Any, Any] | None = None


class _Jit:
    def __init__(self, fn: Callable[..., Any], donate: str):
        if donate not in _DONATE:
            raise ValueError(f"donate={donate!r} is not one of {list(_DONATE)}")
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._donate = donate
        self._quiet = donate in ("all", "all-except-first")
        # A bound method or callable module carries arrays: trace them too.
        self._fn_is_arg = any(is_array(x) for x in jtu.tree_leaves(fn))
        self._structures: list[_Structure | None] = [None]
        self._ids: dict[tuple[Any, Any], int] = {}
        self._entries: dict[tuple[int, ...], _Entry] = {}
        self._known: dict[int, tuple[Any, list[Any], int]] = {}

    # -- per-argument flattening ----------------------------------------------------
    def _split(
        self, x: Any, known: dict[int, Any], remember: dict[int, Any]
    ) -> tuple[list[Any], int, bool]:
        """`(arrays, structure id, whether any array is a NumPy one)`."""
        if is_array(x):
            return [x], _ARRAY_ID, isinstance(x, _HOST)
        hit = known.get(id(x))
        if hit is not None and hit[0] is x:
            remember[id(x)] = hit
            return hit[1], hit[2], False
        treedef, statics, dynamic = _split_leaves(x)
        sid = self._structure_id(treedef, statics)
        structure = self._structures[sid]
        host = any(isinstance(leaf, _HOST) for leaf in dynamic)
        if structure is not None and structure.immutable and not host:
            remember[id(x)] = (x, dynamic, sid)
        return dynamic, sid, host

    def _structure_id(self, treedef: Any, statics: tuple[Any, ...]) -> int:
        key = (treedef, statics)
        try:
            sid = self._ids.get(key)
        except TypeError as err:
            bad = next((s for s in statics if not _hashable(s)), None)
            raise TypeError(
                f"treenn.jit({_name(self._fn)}): non-array argument leaves are static and "
                f"must be hashable; got unhashable {type(bad).__name__}: {bad!r}"
            ) from err
        if sid is None:
            sid = self._ids[key] = len(self._structures)
            self._structures.append(_Structure(treedef, statics))
        return sid

    # -- call -------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        known = self._known
        remember: dict[int, tuple[Any, list[Any], int]] = {}
        objects: tuple[Any, ...] = args
        if self._fn_is_arg:
            objects = (*objects, self._fn)
        if kwargs:
            objects = (*objects, kwargs)
        # One list of arrays per argument object: JAX flattens the lists in C++, and
        # output lists come back per output element, ready to be passed in again.
        lists = []
        sids = []
        host = False
        for obj in objects:
            dynamic, sid, on_host = self._split(obj, known, remember)
            lists.append(dynamic)
            sids.append(sid)
            host = host or on_host
        key = (len(args), bool(kwargs), *sids)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._compile(key)
        jitted = entry.jitted
        if entry.by_shape is not None:
            jitted = self._by_shape(entry, key, lists)
        if self._quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                out_lists = jitted(*lists)
        else:
            out_lists = jitted(*lists)
        # Forwarded NumPy inputs come back as JAX arrays, as from `jax.jit`.
        inputs = _on_device(lists) if host else lists
        out = self._rebuild(entry.out, out_lists, inputs, remember)
        self._known = remember
        return out

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Trace and lower for these arguments without running, as `jax.jit(f).lower`:
        the result's `.compile()`, `.as_text()` and `.cost_analysis()` are JAX's. (Its
        compiled executable takes treenn's internal flat argument lists: to run the
        function, call it.)"""
        objects: tuple[Any, ...] = args
        if self._fn_is_arg:
            objects = (*objects, self._fn)
        if kwargs:
            objects = (*objects, kwargs)
        split = [self._split(obj, {}, {}) for obj in objects]
        lists = [dynamic for dynamic, _, _ in split]
        key = (len(args), bool(kwargs), *(sid for _, sid, _ in split))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._compile(key)
        if entry.by_shape is not None:
            entry = self._shape_entry(entry, key, lists)
        return entry.jitted.lower(*lists)

    def _rebuild(
        self,
        out_info: Any,
        out_lists: list[list[Any]],
        in_lists: list[list[Any]],
        remember: dict[int, Any],
    ) -> Any:
        structure, parts, merges = out_info
        if parts is None:
            arrays = out_lists[0] if merges[0] is None else merges[0](out_lists[0], in_lists)
            return structure.build_fast(arrays)
        elements = []
        for arrays, (part, sid), merge in zip(out_lists, parts, merges):
            if merge is not None:
                arrays = merge(arrays, in_lists)
            element = part.build_fast(arrays)
            if sid is not None:
                remember[id(element)] = (element, arrays, sid)
            elements.append(element)
        return tuple(elements)

    def _compile(self, key: tuple[Any, ...]) -> _Entry:
        n_args, has_kwargs, *sids = key
        structures = [self._structures[sid] for sid in sids]
        entry = _Entry()
        fn = self._fn

        first = 1 if self._donate.endswith("except-first") else 0
        donate = tuple(range(first, len(sids))) if self._donate != "none" else ()

        def flat(*lists: list[Any]) -> list[list[Any]]:
            objects = [
                arrays[0] if structure is None else structure.build(arrays)
                for structure, arrays in zip(structures, lists)
            ]
            call_fn = objects[n_args] if self._fn_is_arg else fn
            call_kwargs = objects[-1] if has_kwargs else {}
            out = call_fn(*objects[:n_args], **call_kwargs)
            structure, parts = self._describe_output(out)
            outputs = [_arrays(out)] if parts is None else [_arrays(element) for element in out]
            # Donated inputs are deleted by the call: only the others can be forwarded.
            inputs = {
                id(x): (k, j)
                for k, arrays in enumerate(lists)
                if k not in donate
                for j, x in enumerate(arrays)
            }
            split = [_forwarding(arrays, inputs) for arrays in outputs]
            out_info = (structure, parts, tuple(merge for _, merge in split))
            if entry.out is not None and entry.by_shape is None and not _same(entry.out, out_info):
                entry.by_shape = {}
            entry.out = out_info
            return [computed for computed, _ in split]

        entry.jitted = jax.jit(flat, donate_argnums=donate)
        return entry

    def _describe_output(self, out: Any) -> tuple[_Structure, Any]:
        """The output's structure (its non-array leaves need not be hashable), and for a
        tuple output the structure of each element, with a structure id when the element
        (a model, an optimiser state) can be recognised when passed back."""
        structure = _Structure(*_split_leaves(out)[:2])
        if type(out) is not tuple:
            return structure, None
        parts = []
        for element in out:
            e_treedef, e_statics, _ = _split_leaves(element)
            part = _Structure(e_treedef, e_statics)
            sid = None
            if part.immutable and all(_hashable(x) for x in e_statics):
                sid = self._structure_id(e_treedef, e_statics)
            parts.append((part, sid))
        return structure, parts

    def _shape_entry(self, entry: _Entry, key: tuple[Any, ...], lists: list[list[Any]]) -> _Entry:
        # Rare: output structure depends on input shapes. One jit per shape signature,
        # so each call's output structure is the one its own trace produced.
        assert entry.by_shape is not None
        signature = tuple((np.shape(x), x.dtype) for arrays in lists for x in arrays)
        sub = entry.by_shape.get(signature)
        if sub is None:
            sub = entry.by_shape[signature] = self._compile(key)
        return sub

    def _by_shape(self, entry: _Entry, key: tuple[Any, ...], lists: list[list[Any]]) -> Any:
        sub = self._shape_entry(entry, key, lists)
        jitted = sub.jitted

        def call(*lists: list[Any]) -> list[list[Any]]:
            result = jitted(*lists)
            entry.out = sub.out
            return result

        return call


def _arrays(tree: Any) -> list[Any]:
    return [x for x in jtu.tree_leaves(tree) if is_array(x)]


_HOST = (np.ndarray, np.generic)


def _on_device(lists: list[list[Any]]) -> list[list[Any]]:
    """The input lists with NumPy arrays put on the device."""
    return [[jax.numpy.asarray(x) if isinstance(x, _HOST) else x for x in xs] for xs in lists]


def _forwarding(
    arrays: list[Any], inputs: dict[int, tuple[int, int]]
) -> tuple[list[Any], Callable[[list[Any], list[list[Any]]], list[Any]] | None]:
    """Split an output's (traced) arrays into those the computation must return and
    those that are inputs passed through unchanged: `(computed, merge)`, where
    `merge(computed_values, input_lists)` rebuilds the whole list after the call (`None`
    when nothing is passed through)."""
    computed: list[Any] = []
    items: list[str] = []
    for x in arrays:
        source = inputs.get(id(x))
        if source is None:
            items.append(f"c[{len(computed)}]")
            computed.append(x)
        else:
            items.append(f"i[{source[0]}][{source[1]}]")
    if len(computed) == len(arrays):
        return arrays, None
    return computed, _merger(", ".join(items))


@functools.lru_cache(maxsize=None)
def _merger(items: str) -> Callable[[list[Any], list[list[Any]]], list[Any]]:
    # Cached by its source, so two traces that forward alike compare equal (`_same`).
    namespace: dict[str, Any] = {}
    exec(f"def merge(c, i):\n    return [{items}]\n", namespace)
    merge: Callable[[list[Any], list[list[Any]]], list[Any]] = namespace["merge"]
    return merge


def _split_leaves(tree: Any) -> tuple[Any, tuple[Any, ...], list[Any]]:
    """`(treedef, statics, arrays)`: the structure key of `tree` and its array leaves."""
    leaves, treedef = jtu.tree_flatten(tree)
    statics = tuple(_DYNAMIC if is_array(x) else x for x in leaves)
    return treedef, statics, [x for x in leaves if is_array(x)]


def _parts_key(parts: list[tuple[_Structure, int]] | None) -> Any:
    # `_Structure` has identity equality; a re-trace (new input placement) builds new ones.
    return None if parts is None else [(p.treedef, p.statics, sid) for p, sid in parts]


def _same(a: tuple[_Structure, Any, Any], b: tuple[_Structure, Any, Any]) -> bool:
    """Whether two traces gave the same output structure, with the same inputs passed
    through."""
    try:
        return bool(
            a[0].treedef == b[0].treedef
            and a[0].statics == b[0].statics
            and _parts_key(a[1]) == _parts_key(b[1])
            and a[2] == b[2]
        )
    except Exception:  # statics whose == is not a plain bool: assume they differ
        return False


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def jit(fn: Callable[..., Any] | None = None, *, donate: Donate = "none") -> Any:
    """Compile `fn` with XLA: array leaves of the arguments are traced, everything else
    is static, as in `eqx.filter_jit`.

    **Arguments:**

    - `fn`: the function to compile. Its arguments may be any pytrees (models,
        optimiser states, batches); non-array leaves must be hashable.
    - `donate`: which argument buffers XLA may reuse for the outputs, as in
        `eqx.filter_jit`: `"none"`, `"all"`, `"all-except-first"`, or `"warn"` /
        `"warn-except-first"` (the same, but JAX's warning about unusable donations is
        shown).

    **Returns:** the compiled function; outputs may hold anything (models included).
    Used as `@treenn.jit` or `@treenn.jit(donate="all")`. `f.lower(*args)` traces and
    lowers without running, as `jax.jit`'s does (`.compile()`, `.cost_analysis()`).

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
        return functools.partial(jit, donate=donate)
    return _Jit(fn, donate)
