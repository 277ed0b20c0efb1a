"""`treenn.statuses`: the dotted path and status of every array of a model, as a dict."""

from __future__ import annotations

from typing import Any

from ._status import is_array_leaf, status_of
from ._tree import check_model, dotted, flatten


def _status(leaf: Any) -> str | None:
    """The leaf's status, or None where it is not an array (no entry)."""
    return status_of(leaf).value if is_array_leaf(leaf) else None


def statuses(model: Any) -> dict[str, str]:
    """The status of every array of a model, by dotted path: PyTorch's
    `named_parameters()` and `named_buffers()` in one dict.

    **Arguments:**

    - `model`: a treenn or Equinox model, or any pytree of them (abstract models from
      `jax.eval_shape` included).

    **Returns:** a dict, in the model's leaf order, from each array's PyTorch-style dotted
    path (`backbone.layers.0.weight`, the paths that selectors match) to its status:

    - `"trainable"`: a floating-point array that `treenn.grad` differentiates and the
      optimiser updates;
    - `"frozen"`: a floating-point array frozen by `treenn.freeze`;
    - `"buffer"`: state that is never trained (BatchNorm's `running_mean`, `running_var`);
    - `"static"`: an integer or boolean array (a step counter, a mask): never trained.

    Leaves that are not arrays (Python numbers, functions, modes) have no entry. In an
    abstract model, `jax.eval_shape` has turned Python bools (modes) into bool scalars:
    those have no entry either.

    `treenn.summary` prints the same statuses as a table, with shapes and modes.

    !!! Example

        ```python
        model = treenn.freeze(nn.Sequential(nn.Linear(2, 3, key=key), nn.BatchNorm(3)), "layers.0")
        treenn.statuses(model)
        # {'layers.0.weight': 'frozen', 'layers.0.bias': 'frozen',
        #  'layers.1.weight': 'trainable', 'layers.1.bias': 'trainable',
        #  'layers.1.running_mean': 'buffer', 'layers.1.running_var': 'buffer'}
        ```
    """
    check_model(model, "treenn.statuses")
    paths, leaves, _ = flatten(model)
    out = {}
    for path, leaf in zip(paths, leaves):
        status = _status(leaf)
        if status is not None:
            out[dotted(path)] = status
    return out
