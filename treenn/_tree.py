"""The tree walker: the one traversal behind modes, freezing, selectors, summary and
checkpoints.

Everything is built on JAX's C++ `tree_flatten_with_path`, which visits nodes far faster
than a Python recursion over `__dict__`s. `flatten` stops at status marks (so a frozen
array is one leaf that knows its status) and at whatever else the caller asks for;
`modules` builds a module-level view on top of it; `_edit` the one edit walk.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._caches import Cache
from ._module import is_foreign_type, replace
from ._status import MARK_TYPES, MarkKey, holds_nothing

KeyPath = tuple[Any, ...]
Stop = Callable[[Any], bool]


def by_type(pred: Callable[[type], bool]) -> Stop:
    """A stop predicate decided by a node's type alone: cached per type (JAX calls it on
    every node), and stopping at status marks too."""
    cache: dict[type, bool] = {kind: True for kind in MARK_TYPES}

    def stop(x: Any) -> bool:
        kind = type(x)
        known = cache.get(kind)
        if known is None:
            known = cache[kind] = bool(pred(kind))
        return known

    stop.by_type = True  # type: ignore[attr-defined]
    stop.stops_marks = True  # type: ignore[attr-defined]
    return stop


IS_MARK = by_type(lambda kind: False)


def _is_leaf(stop: Stop | None, keep_marks: bool) -> Stop | None:
    if not keep_marks:
        return stop
    if stop is None:
        return IS_MARK
    if getattr(stop, "stops_marks", False):
        return stop
    return lambda x: type(x) in MARK_TYPES or stop(x)


def flatten(
    tree: Any, stop: Stop | None = None, *, keep_marks: bool = True
) -> tuple[list[KeyPath], list[Any], Any]:
    """Flatten `tree` into `(paths, leaves, treedef)`, status marks kept whole.

    `stop(node)` may name further nodes to keep whole (returned as leaves); make it with
    `by_type` when the type decides, which is much faster.
    """
    pairs, treedef = jtu.tree_flatten_with_path(tree, is_leaf=_is_leaf(stop, keep_marks))
    paths = [p for p, _ in pairs]
    leaves = [x for _, x in pairs]
    return paths, leaves, treedef


def leaves(tree: Any, stop: Stop | None = None) -> tuple[list[Any], Any]:
    """`flatten` without the paths (about half the cost)."""
    return jtu.tree_flatten(tree, is_leaf=_is_leaf(stop, True))


def unflatten(treedef: Any, leaves: list[Any]) -> Any:
    return jtu.tree_unflatten(treedef, leaves)


def _component(key: Any) -> str:
    kind = type(key)
    if kind is jtu.GetAttrKey:
        return key.name
    if kind is jtu.SequenceKey:
        return str(key.idx)
    if kind is jtu.DictKey or kind is jtu.FlattenedIndexKey:
        return str(key.key)
    return str(key).strip(".[]'\"")


def dotted(path: KeyPath) -> str:
    """PyTorch-style dotted path of a key path: `layers.0.weight`. Marks are invisible."""
    return ".".join([_component(k) for k in path if type(k) is not MarkKey])


def check_model(model: Any, fn: str, name: str = "model") -> None:
    """Reject what cannot be a model, where treating it as an empty pytree would make
    `fn` silently do nothing: a class (not instantiated) or a path (arguments swapped).
    """
    if isinstance(model, type):
        raise TypeError(
            f"{fn}: {name} is the class {model.__qualname__}, not a model; build one "
            f"first, e.g. `{model.__name__}(..., key=key)`"
        )
    if isinstance(model, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{fn}: {name}={model!r} is a {type(model).__name__}, not a model; check the "
            "order of the arguments"
        )


# -- modules ------------------------------------------------------------------------

_FIELDS: dict[type, frozenset[str]] = Cache()


def field_names(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        if dataclasses.is_dataclass(cls):
            names = frozenset(f.name for f in dataclasses.fields(cls))
        else:
            names = frozenset()
        _FIELDS[cls] = names
    return names


def _module_type(kind: type) -> bool:
    return issubclass(kind, eqx.Module)


def mode_bearing_type(kind: type) -> bool:
    """Whether modules of class `kind` are mode-bearing (have an `inference` field)."""
    return issubclass(kind, eqx.Module) and "inference" in field_names(kind)


STOP_MODULE = by_type(_module_type)
STOP_FOREIGN = by_type(is_foreign_type)
STOP_MODE_BEARING = by_type(mode_bearing_type)


def is_module(x: Any) -> bool:
    return type(x) not in MARK_TYPES and STOP_MODULE(x)


def is_mode_bearing(x: Any) -> bool:
    """A module with an `inference` field (treenn's layers, Equinox's, users')."""
    return type(x) not in MARK_TYPES and STOP_MODE_BEARING(x)


_get = object.__getattribute__


def state_of(module: Any) -> dict[str, Any]:
    """A module's `__dict__`, read without going through `Module.__getattribute__`."""
    state: dict[str, Any] = _get(module, "__dict__")
    return state


def replace_fields(module: Any, **changes: Any) -> Any:
    """A copy of an (immutable) module with some fields' stored values changed: see
    `_module.replace` (its class fits the marks it then holds)."""
    return replace(module, **changes)


_DYNAMIC_FIELDS: dict[type, tuple[str, ...]] = Cache()


def dynamic_fields(kind: type) -> tuple[str, ...]:
    """Names of a dataclass module's non-static fields (its pytree children)."""
    names = _DYNAMIC_FIELDS.get(kind)
    if names is None:
        names = _DYNAMIC_FIELDS[kind] = tuple(
            f.name for f in dataclasses.fields(kind) if not f.metadata.get("static", False)
        )
    return names


_STATIC_FIELDS: dict[type, tuple[str, ...]] = Cache()


def static_fields(kind: type) -> tuple[str, ...]:
    """Names of a dataclass module's static fields (part of its tree structure)."""
    names = _STATIC_FIELDS.get(kind)
    if names is None:
        names = _STATIC_FIELDS[kind] = tuple(
            f.name for f in dataclasses.fields(kind) if f.metadata.get("static", False)
        )
    return names


def inert(module: Any) -> bool:
    """Whether every pytree child of `module` is a leaf (array, scalar, function...),
    `None` or a status mark: it holds no other module or container, so a walk can stop
    at it and edit its fields directly instead of flattening and rebuilding it."""
    # Inlined lookups: called on every module a pruned walk meets.
    state = _get(module, "__dict__")
    names = _DYNAMIC_FIELDS.get(type(module))
    if names is None:
        names = dynamic_fields(type(module))
    for name in names:
        if not holds_nothing(state.get(name)):
            return False
    return True


_PRUNED: dict[Stop, Stop] = Cache()


def pruned(stop: Stop) -> Stop:
    """`stop`, also stopping at status marks and at inert modules (see `inert`).

    A walk for the nodes `stop` names then flattens, and rebuilds, only the modules and
    containers that may lead to one (an `eqx.nn.Linear` is returned whole, untouched).
    Callers tell stopped nodes from inert ones with `stop` itself.
    """
    if not getattr(stop, "by_type", False):

        def any_stop(x: Any) -> bool:
            return type(x) in MARK_TYPES or bool(stop(x)) or (STOP_MODULE(x) and inert(x))

        any_stop.stops_marks = True  # type: ignore[attr-defined]
        return any_stop
    known_pruned = _PRUNED.get(stop)
    if known_pruned is not None:
        return known_pruned
    # Per type: True (stop), False (enter), None (a module: stop when inert).
    cache: dict[type, bool | None] = {}

    def is_leaf(x: Any) -> bool:
        kind = type(x)
        try:
            known = cache[kind]
        except KeyError:
            if stop(x):
                known = True
            elif STOP_MODULE(x):
                # A module with no dynamic field (all static) holds nothing.
                known = None if dynamic_fields(kind) else True
            else:
                known = False
            cache[kind] = known
        if known is None:
            return inert(x)
        return known

    is_leaf.stops_marks = True  # type: ignore[attr-defined]
    _PRUNED[stop] = is_leaf
    return is_leaf


def below(tree: Any, stop: Stop) -> Stop:
    """`stop`, but never stopping at `tree` itself (to visit a stopped node's contents)."""
    if not stop(tree):
        return stop

    def below_tree(x: Any) -> bool:
        return x is not tree and (type(x) in MARK_TYPES or bool(stop(x)))

    below_tree.stops_marks = True  # type: ignore[attr-defined]
    return below_tree


def modules(
    tree: Any, prefix: KeyPath = ()
) -> Iterator[tuple[KeyPath, Any, list[tuple[KeyPath, Any]]]]:
    """Every module in `tree`, pre-order, as `(path, module, own_leaves)`.

    `own_leaves` are the `(path, leaf)` pairs the module holds directly or inside plain
    containers (tuples, lists, dicts), not inside a submodule. A tree whose root is not
    a module yields its top-level leaves under a root entry with `module=None`.
    """
    paths, flat, _ = flatten(tree, below(tree, STOP_MODULE))
    own: list[tuple[KeyPath, Any]] = []
    subs: list[tuple[KeyPath, Any]] = []
    for path, leaf in zip(paths, flat):
        if is_module(leaf):
            subs.append((prefix + path, leaf))
        else:
            own.append((prefix + path, leaf))
    yield prefix, (tree if is_module(tree) else None), own
    for path, sub in subs:
        yield from modules(sub, path)
