"""`treenn.Module`: an `equinox.Module` that sees through status marks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx

from ._status import MARK_TYPES


class Module(eqx.Module):
    """Base class of treenn's layers and of user models: an `equinox.Module` (an
    immutable dataclass pytree) whose frozen arrays and buffers read as plain arrays.

    A frozen array (see `treenn.freeze`) or a buffer (BatchNorm running statistics) is
    stored inside a thin status mark; reading the field returns the array with its
    gradient stopped, so even a plain `jax.grad` of the whole model gives it a zero
    gradient. Everything else is exactly `equinox.Module`.

    !!! Example

        ```python
        class Head(treenn.Module):
            linear: nn.Linear

            def __init__(self, *, key):
                self.linear = nn.Linear(8, 2, key=key)

            def __call__(self, x, *, key=None):
                return self.linear(x)
        ```
    """

    if not TYPE_CHECKING:

        def __getattribute__(self, name: str, /) -> Any:
            out = eqx.Module.__getattribute__(self, name)
            if type(out) in MARK_TYPES:
                return out.unwrap()
            return out
