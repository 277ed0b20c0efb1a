"""Freezing: `treenn.freeze` and `treenn.unfreeze`.

A frozen array is stored inside a `Frozen` mark in the model itself, so the status travels
with the model through `jit`, `vmap`, `tree_map`, save and load, and no mask has to be
carried beside it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._selectors import Where, no_match, select
from ._status import Frozen, Status, status_of
from ._tree import dotted, flatten, leaves, unflatten

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


def _set_frozen(model: Any, where: Any, frozen: bool) -> Any:
    selection = select(where, model)
    paths: list[Any] | None = None
    if selection is None:
        flat, treedef = leaves(model)
    else:
        paths, flat, treedef = flatten(model)
        covers = selection.covers
    acted = False
    for i, leaf in enumerate(flat):
        status = status_of(leaf)
        if status is not Status.TRAINABLE and status is not Status.FROZEN:
            continue
        if paths is not None and not covers(dotted(paths[i])):
            continue
        acted = True
        if frozen and status is Status.TRAINABLE:
            flat[i] = Frozen(leaf)
        elif not frozen and status is Status.FROZEN:
            flat[i] = leaf.value
    if paths is not None and not acted:
        candidates = [dotted(p) for p, x in zip(paths, flat) if status_of(x) in _PARAMETER]
        raise no_match(where, "floating-point parameter array", candidates)
    return unflatten(treedef, flat)
