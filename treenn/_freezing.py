"""Freezing: `treenn.freeze` and `treenn.unfreeze`.

A frozen array is stored inside a `Frozen` mark in the model itself, so the status travels
with the model through `jit`, `vmap`, `tree_map`, save and load, and no mask has to be
carried beside it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._edit import Edit, edit
from ._modes import eval_mode, mode_bearing, unpin_selected
from ._selectors import Selection, Where, no_match, select
from ._status import Frozen, is_array_leaf, is_inexact, is_mark
from ._tree import check_model, dotted, flatten

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
    model = _set_frozen(_set_frozen(model, None, True), selection, False)
    backbone = {path for path, _ in mode_bearing(model) if not selection.covers(path)}
    if not backbone:
        return model
    outside_head: Any = Selection(head, lambda path: path in backbone)
    return eval_mode(model, outside_head, pin=True)


class _SetFrozen(Edit):
    """(Un)freeze each covered floating-point array (buffers and integer arrays are no
    candidates); `acted` tells whether any was covered."""

    on_leaves = True

    def __init__(self, frozen: bool) -> None:
        self.frozen = frozen
        self.acted = False

    def leaf(self, path: Any, leaf: Any) -> Any:
        if not _candidate(leaf):
            return leaf
        self.acted = True
        if self.frozen:
            return leaf if type(leaf) is Frozen else Frozen(leaf)
        return leaf.value if type(leaf) is Frozen else leaf


def _candidate(leaf: Any) -> bool:
    """A floating-point array, frozen or not, concrete or abstract: what (un)freezing
    acts on."""
    return type(leaf) is Frozen or (not is_mark(leaf) and is_inexact(leaf.dtype))


def _set_frozen(model: Any, where: Any, frozen: bool) -> Any:
    check_model(model, "treenn.freeze" if frozen else "treenn.unfreeze")
    surgery = _SetFrozen(frozen)
    new = edit(model, where, surgery)
    if where is not None and not surgery.acted:
        paths, leaves, _ = flatten(model)
        candidates = [dotted(p) for p, x in zip(paths, leaves) if _is_parameter(x)]
        raise no_match(where, "floating-point parameter array", candidates)
    return new


def _is_parameter(leaf: Any) -> bool:
    return is_array_leaf(leaf) and _candidate(leaf)
