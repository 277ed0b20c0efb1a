"""Dropout: a mode-bearing layer."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module


class Dropout(Module):
    """Zero each element with probability `p` in training mode, scaling the rest by
    `1 / (1 - p)`; the identity in evaluation mode.

    **Arguments:**

    - `p`: drop probability, in `[0, 1]`.
    - `inference`: start in evaluation mode (default: training mode, as in PyTorch).
    - `pinned`: start pinned (see `nn.eval_mode`).

    In training mode a `key` is required.

    !!! Example

        ```python
        drop = nn.Dropout(0.1)
        y = drop(x, key=key)          # training mode
        y = nn.eval_mode(drop)(x)     # identity
        ```
    """

    p: float = eqx.field(static=True)
    inference: bool = eqx.field(static=True)
    pinned: bool = eqx.field(static=True)

    def __init__(self, p: float = 0.5, *, inference: bool = False, pinned: bool = False):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"nn.Dropout(p={p!r}): p must be in [0, 1]")
        self.p = float(p)
        self.inference = inference
        self.pinned = pinned

    def __call__(
        self, x: Float[Array, "*shape"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*shape"]:
        if self.inference or self.p == 0.0:
            return x
        if key is None:
            raise ValueError(
                f"nn.Dropout(p={self.p}) is in training mode and needs `key=`; pass a PRNG "
                "key, or switch it to evaluation mode with nn.eval_mode"
            )
        if self.p == 1.0:
            return jnp.zeros_like(x)
        keep = jax.random.bernoulli(key, 1.0 - self.p, x.shape)
        return jnp.where(keep, x / (1.0 - self.p), jnp.zeros_like(x))
