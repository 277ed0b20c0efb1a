"""Fast rebuilding of one fixed tree structure from its leaves.

`jax.tree_util.tree_unflatten` calls back into Python once per custom node (each
Equinox module), which dominates `treenn.jit`'s per-call cost when a step returns a model
and an optimiser state. `builder(treedef)` instead generates, once per structure, one
straight-line Python function that builds the whole tree: containers as literals,
Equinox modules as `object.__new__` plus one `__dict__`, exactly what Equinox's own
unflatten produces. Node types it does not know are rebuilt by JAX as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._status import MARK_TYPES


def _immutable_node(kind: type) -> bool:
    # Only node types known to be immutable: anything else (list, dict, OrderedDict, a
    # user's mutable pytree class) may change in place.
    return (
        issubclass(kind, tuple)
        or kind is type(None)
        or issubclass(kind, eqx.Module)
        or kind in MARK_TYPES
        or kind is jtu.Partial
    )


def immutable(treedef: Any) -> bool:
    """Whether every node of `treedef` is of an immutable type."""
    data = treedef.node_data()
    if data is not None and not _immutable_node(data[0]):
        return False
    return all(immutable(child) for child in treedef.children())


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {
            "_new": object.__new__,
            "_set": object.__setattr__,
            "_tuple_new": tuple.__new__,
        }
        self.leaf = 0

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def var(self, expr: str) -> str:
        name = f"_n{len(self.lines)}"  # unique: one line per variable at most
        self.lines.append(f"    {name} = {expr}")
        return name

    def node(self, treedef: Any, leaves: list[Any]) -> str:
        """Emit code for `treedef`; `leaves` holds the leaf expressions in order."""
        data = treedef.node_data()
        if data is None:
            expr = leaves[self.leaf]
            self.leaf += 1
            return expr
        start = self.leaf
        own = leaves[start : start + treedef.num_leaves]
        if not any(leaf.startswith("a") for leaf in own) and immutable(treedef):
            # No array below: the subtree is the same (immutable) object every call.
            self.leaf += treedef.num_leaves
            return self.const(treedef.unflatten([self.consts[leaf] for leaf in own]))
        kind, aux = data
        children = [self.node(child, leaves) for child in treedef.children()]
        if kind is type(None):
            return "None"
        if kind is tuple:
            return self.var("(" + "".join(c + ", " for c in children) + ")")
        if kind is list:
            return self.var("[" + ", ".join(children) + "]")
        if kind is dict:
            items = ", ".join(f"{self.const(k)}: {c}" for k, c in zip(aux, children))
            return self.var("{" + items + "}")
        if kind in MARK_TYPES:
            mark = self.var(f"_new({self.const(kind)})")
            self.lines.append(f"    _set({mark}, 'value', {children[0]})")
            return mark
        if issubclass(kind, tuple) and hasattr(kind, "_fields"):
            items = "".join(c + ", " for c in children)
            return self.var(f"_tuple_new({self.const(kind)}, ({items}))")
        if issubclass(kind, eqx.Module):
            names = _child_names(treedef)
            if names is not None:
                template = treedef.unflatten([None] * treedef.num_leaves)
                rest = {k: v for k, v in template.__dict__.items() if k not in names}
                state = self.var(f"{self.const(rest)}.copy()")
                for name, child in zip(names, children):
                    self.lines.append(f"    {state}[{name!r}] = {child}")
                module = self.var(f"_new({self.const(kind)})")
                self.lines.append(f"    _set({module}, '__dict__', {state})")
                return module
        # Unknown node type: let JAX rebuild this subtree.
        subtree = ", ".join(leaves[start : self.leaf])
        return self.var(f"{self.const(treedef)}.unflatten([{subtree}])")


def _child_names(treedef: Any) -> list[str] | None:
    """Field names of an Equinox module's dynamic children, in flatten order."""
    template = treedef.unflatten([None] * treedef.num_leaves)
    pairs, _ = jtu.tree_flatten_with_path(template, is_leaf=lambda x: x is not template)
    names = []
    for path, _ in pairs:
        if len(path) != 1 or not isinstance(path[0], jtu.GetAttrKey):
            return None
        names.append(path[0].name)
    if len(names) != len(treedef.children()):
        return None
    return names


def builder(treedef: Any, statics: tuple[Any, ...], dynamic: Any) -> Callable[[Sequence[Any]], Any]:
    """A function `build(a)` that returns `treedef` filled with the leaves `statics`,
    taking the entries equal to `dynamic` from the list `a`, in order."""
    writer = _Writer()
    leaves = []
    index = 0
    for leaf in statics:
        if leaf is dynamic:
            leaves.append(f"a{index}")
            index += 1
        else:
            leaves.append(writer.const(leaf))
    result = writer.node(treedef, leaves)
    unpack = "".join(f"a{i}, " for i in range(index))
    head = f"def build(a):\n    ({unpack}) = a\n" if index else "def build(a):\n"
    source = head + "\n".join(writer.lines) + f"\n    return {result}\n"
    namespace = dict(writer.consts)
    exec(compile(source, f"<treenn build {id(treedef):x}>", "exec"), namespace)
    return namespace["build"]
