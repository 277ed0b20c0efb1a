"""Optimiser state across a change of the trainable set (gradual unfreezing)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from ._selectors import few
from ._transforms import (
    _first_static_difference as first_static_difference,
    combine,
    partition,
    trainable,
)
from ._tree import by_type, check_model, dotted, flatten, unflatten


def check_transform(tx: Any, fn: str) -> None:
    """Reject what is not an optax transform before it fails deep inside optax."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{fn}: tx={tx!r} is not an optax transform (it needs `init` and `update`), "
            "e.g. `optax.adam(1e-3)`"
        )


def update(
    tx: Any, grads: Any, opt_state: Any, model: Any, value: Any, loss_at: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """`tx.update` inside `train_step`: transforms that take extra arguments (optax's
    `GradientTransformationExtraArgs`: `reduce_on_plateau`, `polyak_sgd`, `lbfgs`, any
    `optax.chain`) also get `value=` (the loss), `grad=` and `value_fn=`, the loss at
    given trainable arrays with the rest of `model` and the batch fixed (for `lbfgs`'s
    line search). `model` is the model the loss was taken at: its running statistics only
    matter to layers in evaluation mode, which do not change them."""
    params, rest = partition(model)
    extra = _takes_extra_args(tx)

    def value_fn(new_params: Any) -> Any:
        return loss_at(combine(new_params, rest))

    try:
        if not extra:
            return tx.update(grads, opt_state, params)
        return tx.update(grads, opt_state, params, value=value, grad=grads, value_fn=value_fn)
    except TypeError as err:
        if extra and _UNEXPECTED.search(str(err)):
            raise TypeError(
                "train_step: tx is an optax.GradientTransformationExtraArgs, so its update gets "
                "value=, grad= and value_fn=, but it does not take them: its update must "
                f"accept **extra_args, as optax's do ({err})"
            ) from err
        missing = _MISSING.search(str(err))
        if missing is None:
            raise
        given = (
            "it gets value= (the loss), grad= and value_fn= (the loss at given trainable "
            "arrays) only"
            if extra
            else "tx is a plain optax.GradientTransformation, which gets no extra arguments "
            "(an optax.GradientTransformationExtraArgs gets value=, grad= and value_fn=)"
        )
        raise TypeError(
            f"train_step: tx.update needs {missing.group(0)}, and {given}; for other "
            f"arguments call tx.update in your own step ({err})"
        ) from err


_MISSING = re.compile(r"(?<=missing )\d+ required keyword-only arguments?: .*")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(value|grad|value_fn)'")


def _takes_extra_args(tx: Any) -> bool:
    optax = sys.modules.get("optax")
    extra = getattr(optax, "GradientTransformationExtraArgs", None)
    return extra is not None and isinstance(tx, extra)


def placeholder_types() -> tuple[type, ...]:
    """What an optimiser state holds where a parameter has no state: `None` (the place
    `treenn.trainable` leaves for a frozen array, a buffer or a non-array leaf) and
    optax's `MaskedNode` (an array that `optax.masked` / `multi_transform` / `muon` give
    to another group). Without optax imported, no state can hold a `MaskedNode`."""
    optax = sys.modules.get("optax")
    masked = getattr(optax, "MaskedNode", None)
    return (type(None),) if masked is None else (type(None), masked)


def is_placeholder(x: Any) -> bool:
    return isinstance(x, placeholder_types())


def _placeholder_stop() -> Any:
    kinds = placeholder_types()
    return by_type(lambda kind: issubclass(kind, kinds))


def migrate_opt_state(tx: Any, opt_state: Any, model: Any) -> Any:
    """Carry an optax state over to the model's current trainable arrays.

    After `treenn.unfreeze` (or `freeze`) the trainable set changes, and so does the
    structure the optimiser expects. This builds `tx.init(treenn.trainable(model))` and
    copies into it everything `opt_state` already had: the moments of arrays that stay
    trainable and the step counts; arrays that just became trainable start fresh, and
    the state of arrays that became frozen is dropped. Partitioned transforms
    (`optax.multi_transform`, `optax.masked`, `optax.contrib.muon`) work too, so each
    group keeps its own learning rate through gradual unfreezing.

    **Arguments:**

    - `tx`: the optax transform `opt_state` was made by (rebuilt with the same
        hyperparameters if its labels or masks are trees made for the old trainable set).
    - `opt_state`: its state for an earlier trainable set of the same model.
    - `model`: the model with its new trainable set.

    **Returns:** the new optimiser state. Raises `ValueError` naming the paths when
    `opt_state` does not fit `tx` and the model (another model or transform), or when a
    state array is not kept per parameter (`optax.flatten`'s one vector), so its shape
    changes with the trainable set.

    !!! Example

        ```python
        model = treenn.unfreeze(model, "layer4.**")
        opt_state = treenn.migrate_opt_state(tx, opt_state, model)
        ```
    """
    check_model(model, "treenn.migrate_opt_state")
    check_transform(tx, "migrate_opt_state")
    fresh = tx.init(trainable(model))
    # A parameter without state is a placeholder (`None` or `MaskedNode`) in one state
    # and its moments in the other: stopping at placeholders lines the two up leaf by leaf.
    stop = _placeholder_stop()
    new_paths, new_leaves, new_def = flatten(fresh, stop)
    old_paths, old_leaves, old_def = flatten(opt_state, stop)
    if new_def != old_def:
        raise ValueError(
            "migrate_opt_state: opt_state does not fit tx.init(treenn.trainable(model)); "
            + _difference(opt_state, fresh, (old_paths, old_leaves), (new_paths, new_leaves))
            + ". Pass the transform that made opt_state and the same model (any trainable set)"
        )
    merged = []
    for path, new, old in zip(new_paths, new_leaves, old_leaves):
        if is_placeholder(new) or is_placeholder(old):
            merged.append(new)  # newly trainable (fresh) or newly frozen (dropped)
            continue
        if jnp.shape(new) != jnp.shape(old) or jnp.result_type(new) != jnp.result_type(old):
            raise ValueError(
                f"migrate_opt_state: opt_state holds {_kind(old)} at {dotted(path)!r}, where "
                f"tx.init(treenn.trainable(model)) has {_kind(new)}: either opt_state is not "
                "this transform's state for this model, or the transform keeps state that is "
                "not one array per parameter (such as optax.flatten's single vector), which "
                "cannot be carried across a change of the trainable set; start afresh with "
                "tx.init(treenn.trainable(model))"
            )
        merged.append(old)
    return unflatten(new_def, merged)


def _kind(x: Any) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def _difference(opt_state: Any, fresh: Any, old: Any, new: Any) -> str:
    """Where the two states differ: the state arrays only one side has (placeholders
    left out: they say nothing), or else the first module or state type that differs."""
    have = {dotted(p) for p, x in zip(*old) if not is_placeholder(x)}
    want = {dotted(p) for p, x in zip(*new) if not is_placeholder(x)}
    parts = []
    if have - want:
        parts.append(f"state only in opt_state: {few(sorted(have - want), 5)}")
    if want - have:
        parts.append(f"state only in the new one: {few(sorted(want - have), 5)}")
    if parts:
        return "; ".join(parts)
    static = first_static_difference(opt_state, fresh, "opt_state", "the new one")
    if "same paths" in static:
        return "the same state arrays, but other state types (another transform)"
    return static
