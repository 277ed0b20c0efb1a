"""Freezing: `treenn.freeze` and `treenn.unfreeze`.

A frozen array is stored inside a `Frozen` mark in the model itself, so the status travels
with the model through `jit`, `vmap`, `tree_map`, save and load, and no mask has to be
carried beside it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._caches import Cache
from ._modes import eval_mode, mode_bearing, unpin_selected
from ._module import fit_class, fitted_class
from ._selectors import Selection, Where, no_match, select
from ._status import Buffer, Frozen, is_array, is_inexact, is_mark
from ._tree import (
    STOP_FOREIGN,
    KeyPath,
    below,
    by_type,
    check_model,
    dotted,
    dynamic_fields,
    flatten,
    holds_nothing,
    leaves,
    map_stopped,
    no_gc,
    pruned,
    unflatten,
)

T = TypeVar("T")


def freeze(model: T, where: Where = None) -> T:
    """Freeze floating-point arrays: they stop training and get zero gradient.

    **Arguments:**

    - `model`: a treenn or Equinox model (any pytree).
    - `where`: what to freeze (see selectors): `None` for everything, a path pattern
        (`"backbone.**"`), a class, or a getter. Selecting a module freezes every
        floating-point array inside it; selecting an array freezes just that array.

    **Returns:** a new model; `model` is unchanged. Buffers, integer arrays and
    non-array leaves are never trainable and are left as they are.

    !!! Example

        ```python
        model = treenn.freeze(model, "backbone.**")
        model = treenn.unfreeze(treenn.freeze(model), "**.bias")  # BitFit
        ```
    """
    return _set_frozen(model, where, True)


def unfreeze(model: T, where: Where = None, *, unpin: bool = False) -> T:
    """Make frozen floating-point arrays trainable again.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: what to unfreeze, as for `treenn.freeze`.
    - `unpin`: also remove the pins of the selection's mode-bearing modules (as
        `nn.unpin(model, where)`), so that its BatchNorms train with its weights: the
        usual gradual-unfreezing step. Leave it `False` to keep them pinned (their
        weights train, their statistics stay frozen: `treenn.summary` shows
        "trainable" beside "eval (pinned)").

    **Returns:** a new model. Buffers stay buffers: `unfreeze` never makes them
    trainable.

    !!! Example

        ```python
        model = treenn.unfreeze(model, "layer4.**", unpin=True)  # gradual unfreezing
        model = treenn.unfreeze(model, "layer4.**")  # weights train, BN stays pinned
        ```
    """
    if not unpin:
        return _set_frozen(model, where, False)
    check_model(model, "treenn.unfreeze")
    selection = select(where, model)  # resolved once, against the model given
    return unpin_selected(_set_frozen(model, selection, False), selection, strict=False)


def freeze_backbone(model: T, head: Where) -> T:
    """The frozen-backbone recipe in one call (linear probing): everything but `head` is
    frozen, and every mode-bearing module outside `head` (BatchNorm, Dropout) is pinned
    in evaluation mode, so training steps leave the backbone exactly as it was: no
    gradients, no optimiser state, no running-statistics updates.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `head`: what stays trainable (a selector, e.g. `"fc"` or `lambda m: m.head`).

    **Returns:** the new model. Undo with `treenn.unfreeze` and `nn.unpin`.

    !!! Example

        ```python
        model = treenn.freeze_backbone(model, "fc")
        opt_state = tx.init(treenn.trainable(model))   # the head's arrays only
        ```
    """
    check_model(model, "treenn.freeze_backbone")
    selection = select(head, model)
    if selection is None:
        raise ValueError("freeze_backbone: head=None selects the whole model; name the head")
    model = _set_frozen(_set_frozen(model, None, True), head, False)
    backbone = {path for path, _ in mode_bearing(model) if not selection.covers(path)}
    if not backbone:
        return model
    outside_head: Any = Selection(head, lambda path: path in backbone)
    return eval_mode(model, outside_head, pin=True)


class _Report:
    """What a (un)freeze walk found: whether it acted, and the candidate paths."""

    def __init__(self) -> None:
        self.acted = False
        self.parameters: list[str] = []


@no_gc()
def _set_frozen(model: Any, where: Any, frozen: bool) -> Any:
    check_model(model, "treenn.freeze" if frozen else "treenn.unfreeze")
    selection = select(where, model)
    if selection is not None and selection.classes is not None:
        new = _walk_classes(model, selection.classes, frozen)
        if new is not None:
            return new
    covers = None if selection is None else selection.covers
    report = _Report()
    new = _walk(model, covers, frozen, (), report)
    if covers is not None and not report.acted:
        raise no_match(where, "floating-point parameter array", report.parameters)
    return new


_CLASS_STOPS: dict[Any, Any] = Cache()


def _walk_classes(model: Any, classes: Any, frozen: bool) -> Any | None:
    """`_walk` for a class selector, without paths: every instance is (un)frozen whole,
    as with `where=None` (what it costs). `None` when it acted on nothing (the caller's
    path walk then names the candidates in its error)."""
    report = _Report()

    def visit(_: Any, node: Any) -> Any:
        if not isinstance(node, classes):
            return node
        new = _walk_shallow(node, None, frozen, (), report)
        return _walk(node, None, frozen, (), report) if new is None else new

    if isinstance(model, classes):
        new = visit(None, model)
    else:
        stop = _CLASS_STOPS.get(classes)
        if stop is None:
            stop = _CLASS_STOPS[classes] = by_type(lambda kind: issubclass(kind, classes))
        new = map_stopped(model, stop, visit, paths=False)
    return new if report.acted else None


# Where a walk stops: status marks, plain Equinox modules (their class is fitted to the
# marks they end up holding) and modules holding only leaves (edited field by field).
_STOP = pruned(STOP_FOREIGN)


def _walk(tree: Any, covers: Any, frozen: bool, prefix: KeyPath, report: _Report) -> Any:
    """(Un)freeze the selected arrays of `tree`; `tree` itself when nothing changes."""
    is_leaf = below(tree, _STOP)
    paths: list[KeyPath] | None = None
    if covers is None:
        flat, treedef = leaves(tree, is_leaf)
    else:
        paths, flat, treedef = flatten(tree, is_leaf)
    changed = False
    for i, leaf in enumerate(flat):
        kind = _KINDS.get(type(leaf))
        if kind is None:
            kind = _value_kind(leaf)
        if kind == _NODE:  # a module the walk stopped at
            path = prefix + paths[i] if paths is not None else ()
            new = _walk_shallow(leaf, covers, frozen, path, report)
            if new is None:
                new = _walk(leaf, covers, frozen, path, report)
        elif kind == _FROZEN or (kind == _ARRAY and is_inexact(leaf.dtype)):
            if paths is not None:
                name = dotted(prefix + paths[i])
                report.parameters.append(name)
                if not covers(name):
                    continue
            report.acted = True
            new = _set_status(leaf, frozen)
        else:
            continue
        if new is not leaf:
            flat[i] = new
            changed = True
    out = unflatten(treedef, flat) if changed else tree
    return fit_class(out) if STOP_FOREIGN(out) and not is_mark(out) else out


def _set_status(leaf: Any, frozen: bool) -> Any:
    """A trainable array or a `Frozen` mark, (un)frozen."""
    if frozen:
        return leaf if type(leaf) is Frozen else Frozen(leaf)
    return leaf.value if type(leaf) is Frozen else leaf


# What a field value is to a walk, by type: see `_value_kind`.
_OTHER, _ARRAY, _FROZEN, _BUFFER, _NODE = range(5)
_KINDS: dict[type, int] = {Frozen: _FROZEN, Buffer: _BUFFER}


def _value_kind(value: Any) -> int:
    kind = _KINDS.get(type(value))
    if kind is None:
        if is_array(value):
            kind = _ARRAY
        else:
            kind = _OTHER if holds_nothing(value) else _NODE
        _KINDS[type(value)] = kind
    return kind


# Module class -> (dynamic field names, class when holding marks, class when not).
_PLANS: dict[type, tuple[tuple[str, ...], type, type]] = Cache()


def _plan(kind: type) -> tuple[tuple[str, ...], type, type]:
    plan = _PLANS.get(kind)
    if plan is None:
        plan = _PLANS[kind] = (
            dynamic_fields(kind),
            fitted_class(kind, True),
            fitted_class(kind, False),
        )
    return plan


_get = object.__getattribute__
_new = object.__new__
_set = object.__setattr__


def _walk_shallow(
    module: Any, covers: Any, frozen: bool, prefix: KeyPath, report: _Report
) -> Any | None:
    """`_walk` for a module whose pytree children are all leaves (an `eqx.nn.Linear`):
    edits its fields directly, without flattening it, and builds the edited module once,
    with the class that fits the marks it holds (`fit_class`). `None` when the module
    holds a container or another module."""
    names, marked_cls, plain_cls = _PLANS.get(type(module)) or _plan(type(module))
    state = _get(module, "__dict__")
    new_state = None
    base = None
    marked = False
    for name in names:
        value = state.get(name)
        kind = _KINDS.get(type(value))
        if kind is None:
            kind = _value_kind(value)
        if kind == _OTHER:
            continue
        if kind == _ARRAY:
            if not is_inexact(value.dtype):
                continue
        elif kind == _BUFFER:
            marked = True
            continue
        elif kind == _NODE:
            return None  # a container or module: take the general path
        if covers is not None:
            if base is None:
                base = dotted(prefix)
            path = f"{base}.{name}" if base else name
            report.parameters.append(path)
            if not covers(path):
                marked = marked or kind == _FROZEN
                continue
        report.acted = True
        if frozen:
            marked = True
            if kind == _FROZEN:
                continue
            new = Frozen(value)
        elif kind == _FROZEN:
            new = value.value
        else:
            continue
        if new_state is None:
            new_state = state.copy()
        new_state[name] = new
    cls = marked_cls if marked else plain_cls
    if new_state is None:
        if cls is type(module):
            return module
        new_state = state.copy()
    out: Any = _new(cls)
    _set(out, "__dict__", new_state)
    return out
