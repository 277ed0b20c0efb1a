"""Selectors: the one meaning of every `where=` argument.

A selector resolves against a model into a `Selection`, a test on dotted paths. Selecting
a node selects everything inside it, so a selection covers a path when it covers the path
itself or any ancestor of it.

- `None`: the whole model.
- a class or tuple of classes: every instance, at any depth, the root included.
- a string: a glob over dotted paths; `*` matches one component (or, inside a component,
  any characters), `**` any number of components, zero included.
- any other callable: an `eqx.tree_at`-style getter returning one node or a sequence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import equinox as eqx

from ._caches import Cache
from ._status import is_array_leaf, unmarked
from ._tree import by_type, dotted, flatten

Where: TypeAlias = "None | str | type | tuple[type, ...] | Callable[[Any], Any]"
"""The type of every `where=` argument (`treenn.freeze`, `nn.eval_mode`, `treenn.labels`
rules...): which parts of a model an operation applies to. Selecting a node selects
everything inside it.

**Arguments:** (the forms a `Where` takes)

- `None`: the whole model.
- a class or tuple of classes: every instance, at any depth, the root included.
- a string: a glob over dotted paths (`"backbone.layer1.0.conv1.weight"`): `*` matches
    one component (or, inside a component, any characters), `**` any number of
    components, zero included.
- any other callable: an `eqx.tree_at`-style getter, `lambda m: m.head`, returning one
    node or a sequence of nodes.

**Returns:** (what an operation does with it) the set of dotted paths selected: a path
is covered when it or one of its ancestors is selected. A selector of none of these forms
raises a `TypeError`; one that selects nothing the operation acts on, a `ValueError`
naming it and the paths available.

!!! Example

    ```python
    model = treenn.models.resnet18(10, key=jax.random.key(0))
    model = treenn.freeze(model, where="layer1.**")  # a glob
    model = nn.eval_mode(model, where=nn.BatchNorm)  # a class
    model = treenn.unfreeze(model, where=lambda m: m.fc)  # a getter
    ```
"""

_FORBIDDEN = set("[]?{}()|\\^$+!,; \t\n")


class Selection:
    """The set of dotted paths a `where=` selects."""

    def __init__(self, where: Any, covers: Callable[[str], bool], classes: Any = None) -> None:
        self.where = where
        self.covers = covers
        # For a class selector: the classes, so that walks can test instances (what
        # `where=None` costs) instead of resolving paths.
        self.classes = classes

    def __repr__(self) -> str:
        return f"Selection(where={describe(self.where)})"


def describe(where: Any) -> str:
    """How a selector is named in error messages."""
    if isinstance(where, Selection):
        return describe(where.where)
    if isinstance(where, type):
        return where.__qualname__
    if isinstance(where, tuple) and all(isinstance(w, type) for w in where):
        return "(" + ", ".join(w.__qualname__ for w in where) + ")"
    if callable(where) and not isinstance(where, str):
        name = getattr(where, "__qualname__", None) or _short(where)
        return f"<getter {name}>"
    return repr(where) if isinstance(where, str) else _short(where)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob into a regex matched against `path + "."`.

    Every component in the regex ends with an escaped dot, so `match` (anchored at the
    start, free at the end) succeeds exactly when the glob matches a prefix of the path
    that ends at a component boundary: the path itself or one of its ancestors.
    """
    if not pattern:
        raise ValueError("where='' is not a path pattern; use where=None for the whole model")
    bad = sorted(set(pattern) & _FORBIDDEN)
    if bad:
        raise ValueError(
            f"where={pattern!r}: unsupported character(s) {''.join(bad)!r} in path pattern; "
            "patterns are dotted paths with '*' (one component) and '**' (any number)"
        )
    parts = []
    for component in pattern.split("."):
        if not component:
            raise ValueError(f"where={pattern!r}: empty path component (stray '.')")
        if component == "**":
            parts.append(r"(?:[^.]+\.)*")
        elif "**" in component:
            raise ValueError(
                f"where={pattern!r}: '**' must be a whole path component, as in 'a.**.b'"
            )
        elif component == "*":
            parts.append(r"[^.]+\.")
        else:
            body = "".join("[^.]*" if ch == "*" else re.escape(ch) for ch in component)
            parts.append(body + r"\.")
    return re.compile("".join(parts))


def _glob(pattern: str) -> Selection:
    match = glob_regex(pattern).match
    return Selection(pattern, lambda path: match(path + ".") is not None)


def _prefixes(where: Any, selected: set[str]) -> Selection:
    if "" in selected:
        return Selection(where, lambda path: True)

    def covers(path: str) -> bool:
        if path in selected:
            return True
        end = path.find(".")
        while end != -1:
            if path[:end] in selected:
                return True
            end = path.find(".", end + 1)
        return False

    return Selection(where, covers)


_INSTANCE_STOPS: dict[Any, Any] = Cache()


def _classes(where: type | tuple[type, ...], tree: Any) -> Selection:
    stop = _INSTANCE_STOPS.get(where)
    if stop is None:
        stop = _INSTANCE_STOPS[where] = by_type(lambda kind: issubclass(kind, where))
    resolved: list[Callable[[str], bool]] = []

    def covers(path: str) -> bool:
        # Paths are resolved on first use only: walks that test instances never need them.
        if not resolved:
            paths, leaves, _ = flatten(tree, stop)
            found = {dotted(p) for p, x in zip(paths, leaves) if isinstance(x, where)}
            resolved.append(_prefixes(where, found).covers)
        return resolved[0](path)

    return Selection(where, covers, classes=where)


class _Probe:
    """Stands in for an array leaf (marked or not) while a getter runs, so leaves are
    found by identity; the getter sees no mark, so the containers it returns are the
    model's own (a dict field with a frozen entry included)."""

    __slots__ = ("index", "shape", "dtype")

    def __init__(self, index: int, leaf: Any):
        self.index = index
        self.shape = leaf.shape
        self.dtype = leaf.dtype


def _getter(where: Callable[[Any], Any], tree: Any) -> Selection:
    paths, leaves, treedef = flatten(tree)
    probes = [_Probe(i, unmarked(x)) if is_array_leaf(x) else x for i, x in enumerate(leaves)]
    probed = treedef.unflatten(probes)
    try:
        found = where(probed)
    except Exception as err:
        raise ValueError(
            f"where={describe(where)} failed on the model ({type(err).__name__}: {err}); a "
            "getter must only navigate the model, e.g. `lambda m: (m.blocks[0], m.head.bias)`"
        ) from err
    targets = list(found) if isinstance(found, (list, tuple)) else [found]
    if not targets:
        raise ValueError(f"where={describe(where)} returned no node")
    selected: set[str] = set()
    nodes: dict[int, Any] = {}
    for target in targets:
        if isinstance(target, _Probe):
            selected.add(dotted(paths[target.index]))
        else:
            nodes[id(target)] = target
    if nodes:
        node_paths, node_leaves, _ = flatten(probed, lambda x: id(x) in nodes)
        seen = set()
        for path, leaf in zip(node_paths, node_leaves):
            if id(leaf) in nodes and nodes[id(leaf)] is leaf:
                selected.add(dotted(path))
                seen.add(id(leaf))
        if id(probed) in nodes:
            selected.add("")
            seen.add(id(probed))
        missing = [nodes[i] for i in nodes if i not in seen]
        if missing:
            raise ValueError(
                f"where={describe(where)} returned {_short(missing[0])}, which is not a node of "
                "the model; a getter must return parts of the model it is given"
            )
    return _prefixes(where, selected)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) < 80 else text[:77] + "..."


def select(where: Any, tree: Any) -> Selection | None:
    """Resolve `where` against `tree`. `None` means the whole tree."""
    if where is None:
        return None
    if isinstance(where, Selection):
        return where  # already resolved (internal callers)
    if isinstance(where, str):
        return _glob(where)
    if isinstance(where, type) or (
        isinstance(where, tuple) and where and all(isinstance(w, type) for w in where)
    ):
        return _classes(where, tree)
    if isinstance(where, eqx.Module):
        # A callable module would otherwise run as a getter, with a baffling error.
        raise TypeError(
            f"where= is a {type(where).__name__} module, not a selector: select a submodule "
            "with a getter such as `lambda m: m.head` or its path; if it is the model, it "
            "comes first: `f(model, where)`"
        )
    if callable(where):
        return _getter(where, tree)
    raise TypeError(
        f"where={where!r} ({type(where).__name__}) is not a selector: use None, a path "
        "pattern such as 'backbone.**', a class or tuple of classes, or a getter such as "
        "`lambda m: m.head`"
    )


def few(names: Sequence[str], limit: int = 8) -> str:
    """`names` quoted for an error message, at most `limit` of them."""
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def no_match(where: Any, kind: str, candidates: Sequence[str]) -> ValueError:
    """The error for an explicit selector that selects nothing a helper acts on."""
    shown = ", ".join(repr(c) for c in list(candidates)[:6])
    more = f" (of {len(candidates)})" if len(candidates) > 6 else ""
    hint = f"; available: {shown}{more}" if candidates else "; the model has none"
    return ValueError(f"where={describe(where)} matches no {kind}{hint}")
