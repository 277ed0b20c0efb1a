"""The tree walker: the one traversal behind modes, freezing, selectors, summary and
checkpoints.

Everything is built on JAX's C++ `tree_flatten_with_path`, which visits nodes far faster
than a Python recursion over `__dict__`s. `flatten` stops at status marks (so a frozen
array is one leaf that knows its status) and at whatever else the caller asks for;
`modules` and `map_stopped` build module-level views and edits on top of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._status import MARK_TYPES, MarkKey

KeyPath = tuple[Any, ...]
Stop = Callable[[Any], bool]


def _is_mark(x: Any) -> bool:
    return type(x) in MARK_TYPES


def flatten(
    tree: Any, stop: Stop | None = None, *, keep_marks: bool = True
) -> tuple[list[KeyPath], list[Any], Any]:
    """Flatten `tree` into `(paths, leaves, treedef)`, status marks kept whole.

    `stop(node)` may name further nodes to keep whole (returned as leaves).
    """
    if not keep_marks:
        is_leaf = stop
    elif stop is None:
        is_leaf = _is_mark
    else:
        is_leaf = lambda x: type(x) in MARK_TYPES or stop(x)  # noqa: E731
    pairs, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    paths = [p for p, _ in pairs]
    leaves = [x for _, x in pairs]
    return paths, leaves, treedef


def leaves(tree: Any, stop: Stop | None = None) -> tuple[list[Any], Any]:
    """Flatten `tree` into `(leaves, treedef)`, without paths (cheaper), status marks
    kept whole."""
    is_leaf = _is_mark if stop is None else (lambda x: type(x) in MARK_TYPES or stop(x))
    return jtu.tree_flatten(tree, is_leaf=is_leaf)


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


# -- modules ------------------------------------------------------------------------

_FIELDS: dict[type, frozenset[str]] = {}


def field_names(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        if dataclasses.is_dataclass(cls):
            names = frozenset(f.name for f in dataclasses.fields(cls))
        else:
            names = frozenset()
        _FIELDS[cls] = names
    return names


def is_module(x: Any) -> bool:
    return isinstance(x, eqx.Module)


def is_mode_bearing(x: Any) -> bool:
    """A module with an `inference` field (treenn's layers, Equinox's, users')."""
    return isinstance(x, eqx.Module) and "inference" in field_names(type(x))


def replace_fields(module: Any, **changes: Any) -> Any:
    """A copy of an (immutable) module with some fields' stored values changed.

    Bypasses `__init__` as JAX's unflatten does; values are stored as given, so a
    status mark can be stored around an array.
    """
    new = object.__new__(type(module))
    state = new.__dict__
    state.update(module.__dict__)
    state.update(changes)
    return new


def children_flatten(
    module: Any, stop: Stop
) -> tuple[list[KeyPath], list[Any], Any]:
    """Flatten a module's contents, stopping at nodes `stop` names (but never at the
    module itself)."""
    return flatten(module, lambda x: x is not module and stop(x))


_CONTAINERS = (eqx.Module, tuple, list, dict)


def _may_nest(node: Any) -> bool:
    # Most stopped nodes are leaf layers (Dropout, BatchNorm): skip a flatten of their
    # contents when no field could hold another module.
    state = getattr(node, "__dict__", None)
    if state is None:
        return True
    return any(isinstance(v, _CONTAINERS) for v in state.values())


def map_stopped(
    tree: Any,
    stop: Stop,
    fn: Callable[[KeyPath, Any], Any],
    prefix: KeyPath = (),
) -> Any:
    """Rebuild `tree`, replacing each node `stop` names by `fn(path, node)`.

    Nodes `stop` names that sit inside another are visited too, innermost first:
    `fn` receives a node whose own stopped descendants were already replaced.
    """
    paths, leaves, treedef = flatten(tree, lambda x: x is not tree and stop(x))
    changed = False
    for i, leaf in enumerate(leaves):
        if type(leaf) in MARK_TYPES or not stop(leaf):
            continue
        path = prefix + paths[i]
        inner = map_stopped(leaf, stop, fn, path) if _may_nest(leaf) else leaf
        new = fn(path, inner)
        if new is not leaf:
            leaves[i] = new
            changed = True
    if not changed:
        return tree
    return unflatten(treedef, leaves)


def modules(tree: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any, list[tuple[KeyPath, Any]]]]:
    """Every module in `tree`, pre-order, as `(path, module, own_leaves)`.

    `own_leaves` are the `(path, leaf)` pairs the module holds directly or inside plain
    containers (tuples, lists, dicts), not inside a submodule. A tree whose root is not
    a module yields its top-level leaves under a root entry with `module=None`.
    """
    paths, leaves, _ = flatten(tree, lambda x: x is not tree and is_module(x))
    own: list[tuple[KeyPath, Any]] = []
    subs: list[tuple[KeyPath, Any]] = []
    for path, leaf in zip(paths, leaves):
        if type(leaf) not in MARK_TYPES and is_module(leaf):
            subs.append((prefix + path, leaf))
        else:
            own.append((prefix + path, leaf))
    yield prefix, (tree if is_module(tree) else None), own
    for path, sub in subs:
        yield from modules(sub, path)
