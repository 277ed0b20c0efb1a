"""`treenn.filter_spec`: treenn's freezing for Equinox's own training loop."""

from __future__ import annotations

from typing import Any

from ._status import Status, status_of
from ._tree import check_model, leaves, unflatten


def filter_spec(model: Any) -> Any:
    """A bool pytree, `True` exactly at the trainable arrays of `model`, for Equinox's
    `eqx.partition(model, spec)` and `eqx.filter(model, spec)`.

    Frozen arrays and buffers are stored inside marks, and the arrays in them are
    floating-point arrays like any other: `eqx.is_inexact_array` sees them as
    trainable, so an Equinox loop filtered with it gives them to the optimiser, and
    weight decay (`optax.adamw`) moves them although their gradient is zero. Filter with
    this spec instead: frozen arrays and buffers then stay bit-identical.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** a pytree with `model`'s structure down to its array leaves: `True` at
    each trainable array, `False` at frozen arrays, buffers, modes and every other leaf.

    !!! Example

        ```python
        params, static = eqx.partition(model, treenn.filter_spec(model))
        opt_state = optax.adamw(1e-3).init(params)
        grads = eqx.filter_grad(loss)(params, static, x, y)  # loss: eqx.combine inside
        updates, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        ```
    """
    check_model(model, "treenn.filter_spec")
    flat, treedef = leaves(model)
    return unflatten(treedef, [status_of(leaf) is Status.TRAINABLE for leaf in flat])
