"""Optimiser state across a change of the trainable set (gradual unfreezing)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ._transforms import _is_none, structure_mismatch, trainable
from ._tree import check_model, dotted, flatten, unflatten


def check_transform(tx: Any, fn: str) -> None:
    """Reject what is not an optax transform before it fails deep inside optax."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{fn}: tx={tx!r} is not an optax transform (it needs `init` and `update`), "
            "e.g. `optax.adam(1e-3)`"
        )


def migrate_opt_state(tx: Any, opt_state: Any, model: Any) -> Any:
    """Carry an optax state over to the model's current trainable arrays.

    After `treenn.unfreeze` (or `freeze`) the trainable set changes, and so does the
    structure the optimiser expects. This builds `tx.init(treenn.trainable(model))` and
    copies into it everything `opt_state` already had: the moments of arrays that stay
    trainable and the step counts; arrays that just became trainable start fresh, and
    the state of arrays that became frozen is dropped.

    **Arguments:**

    - `tx`: the optax transform `opt_state` was made by.
    - `opt_state`: its state for an earlier trainable set of the same model.
    - `model`: the model with its new trainable set.

    **Returns:** the new optimiser state. Raises `ValueError` naming the paths when
    `opt_state` does not come from this model (other structure, or other shapes).

    !!! Example

        ```python
        model = treenn.unfreeze(model, "layer4.**")
        opt_state = treenn.migrate_opt_state(tx, opt_state, model)
        ```
    """
    check_model(model, "treenn.migrate_opt_state")
    check_transform(tx, "migrate_opt_state")
    fresh = tx.init(trainable(model))
    new_paths, new_leaves, new_def = flatten(fresh, _is_none)
    old_paths, old_leaves, old_def = flatten(opt_state, _is_none)
    if new_def != old_def:
        raise ValueError(
            "migrate_opt_state: the optimiser state does not come from this model and "
            "transform; " + structure_mismatch(opt_state, fresh, "the old state", "the new one")
        )
    merged = []
    for path, new, old in zip(new_paths, new_leaves, old_leaves):
        if new is None or old is None:
            merged.append(new)  # newly trainable (fresh) or newly frozen (dropped)
            continue
        if jnp.shape(new) != jnp.shape(old) or jnp.result_type(new) != jnp.result_type(old):
            raise ValueError(
                f"migrate_opt_state: the optimiser state does not come from this model: "
                f"{dotted(path)!r} holds {jnp.result_type(old)}{list(jnp.shape(old))}, the "
                f"model needs {jnp.result_type(new)}{list(jnp.shape(new))}"
            )
        merged.append(old)
    return unflatten(new_def, merged)
