"""Freezing: `treenn.freeze` and `treenn.unfreeze`.

A frozen array is stored inside a `Frozen` mark in the model itself, so the status travels
with the model through `jit`, `vmap`, `tree_map`, save and load, and no mask has to be
carried beside it.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import jax.tree_util as jtu

from ._module import fit_class, is_foreign_type
from ._selectors import Selection, Where, no_match, select
from ._status import Frozen, Status, status_of
from ._tree import (
    STOP_CONTAINER,
    STOP_FOREIGN,
    KeyPath,
    below,
    check_model,
    dotted,
    dynamic_fields,
    flatten,
    leaves,
    no_gc,
    replace_fields,
    state_of,
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


def unfreeze(model: T, where: Where = None) -> T:
    """Make frozen floating-point arrays trainable again.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: what to unfreeze, as for `treenn.freeze`.

    **Returns:** a new model. Buffers stay buffers: `unfreeze` never makes them
    trainable.

    !!! Example

        ```python
        model = treenn.unfreeze(model, "layer4.**")
        ```
    """
    return _set_frozen(model, where, False)


_PARAMETER = (Status.TRAINABLE, Status.FROZEN)


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
    from .nn._modes import eval_mode, modes

    check_model(model, "treenn.freeze_backbone")
    selection = select(head, model)
    if selection is None:
        raise ValueError("freeze_backbone: head=None selects the whole model; name the head")
    model = _set_frozen(_set_frozen(model, None, True), head, False)
    backbone = [path for path in modes(model) if not selection.covers(path)]
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
    covers = None if selection is None else selection.covers
    report = _Report()
    new = _walk(model, covers, frozen, (), report)
    if covers is not None and not report.acted:
        raise no_match(where, "floating-point parameter array", report.parameters)
    return new


def _walk(tree: Any, covers: Any, frozen: bool, prefix: KeyPath, report: _Report) -> Any:
    """(Un)freeze the selected arrays of `tree`. Plain Equinox modules are visited
    separately, so that their class can be fitted to the marks they end up holding."""
    is_leaf = below(tree, STOP_FOREIGN)
    paths: list[KeyPath] | None = None
    if covers is None:
        flat, treedef = leaves(tree, is_leaf)
    else:
        paths, flat, treedef = flatten(tree, is_leaf)
    for i, leaf in enumerate(flat):
        status = status_of(leaf)
        if status is Status.TRAINABLE or status is Status.FROZEN:
            if paths is not None:
                name = dotted(prefix + paths[i])
                report.parameters.append(name)
                if not covers(name):
                    continue
            report.acted = True
            if frozen and status is Status.TRAINABLE:
                flat[i] = Frozen(leaf)
            elif not frozen and status is Status.FROZEN:
                flat[i] = leaf.value
        elif status is Status.STATIC and is_foreign_type(type(leaf)):
            path = prefix + paths[i] if paths else ()
            new = _walk_shallow(leaf, covers, frozen, path, report)
            flat[i] = _walk(leaf, covers, frozen, path, report) if new is None else new
    out = unflatten(treedef, flat)
    return fit_class(out) if is_foreign_type(type(out)) else out


def _walk_shallow(
    module: Any, covers: Any, frozen: bool, prefix: KeyPath, report: _Report
) -> Any | None:
    """`_walk` for a plain Equinox layer whose dynamic fields hold only arrays (an
    `eqx.nn.Linear`): edits its fields directly, without flattening it. `None` when the
    module holds anything else."""
    state = state_of(module)
    changes: dict[str, Any] = {}
    parameters: list[str] = []
    acted = False
    for name in dynamic_fields(type(module)):
        value = state.get(name)
        status = status_of(value)
        if status is Status.STATIC:
            if value is None or not STOP_CONTAINER(value):
                continue
            return None  # a container or module: take the general path
        if status is Status.BUFFER:
            continue
        if covers is not None:
            path = dotted(prefix + (jtu.GetAttrKey(name),))
            parameters.append(path)
            if not covers(path):
                continue
        acted = True
        if frozen and status is Status.TRAINABLE:
            changes[name] = Frozen(value)
        elif not frozen and status is Status.FROZEN:
            changes[name] = cast(Frozen, value).value
    report.parameters.extend(parameters)
    report.acted = report.acted or acted
    return fit_class(replace_fields(module, **changes) if changes else module)
