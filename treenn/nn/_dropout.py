"""Dropout and DropPath (stochastic depth): mode-bearing layers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._mode_bearing import ModeBearing


class Dropout(ModeBearing):
    """Zero each element with probability `p` in training mode, scaling the rest by
    `1 / (1 - p)`; the identity in evaluation mode.

    **Arguments:**

    - `p`: drop probability, in `[0, 1]`.
    - `inference`: start in evaluation mode (default: training mode, as in PyTorch).
    - `pinned`: start pinned (see `nn.eval_mode`).

    In training mode a `key` is required.

    **Returns:** `dropout(x, key=None)` returns an array of `x`'s shape and dtype: `x` with
    dropped elements zeroed and the rest scaled in training mode, `x` itself in
    evaluation mode.

    !!! Example

        ```python
        drop = nn.Dropout(0.1)
        y = drop(x, key=key)          # training mode
        y = nn.eval_mode(drop)(x)     # identity
        ```
    """

    p: float = eqx.field(static=True)

    def __init__(self, p: float = 0.5, *, inference: bool = False, pinned: bool = False):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"nn.Dropout(p={p!r}): p must be in [0, 1]")
        self.p = float(p)
        self._init_mode(inference, pinned)

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


class DropPath(ModeBearing):
    """Stochastic depth: in training mode, zero whole samples (along the first axis)
    with probability `p`, scaling the kept ones by `1 / (1 - p)`; the identity in
    evaluation mode. This is timm's `DropPath` (`drop_path` with `scale_by_keep=True`),
    meant for the residual branch of a block: `x + drop_path(branch(x), key=key)`.

    It is mode-bearing exactly like `nn.Dropout`: `nn.eval_mode` / `nn.train_mode`
    switch it, and pins work the same.

    **Arguments:**

    - `p`: probability of dropping a sample, in `[0, 1]`. With `p=1` every sample is
        zeroed (no scaling).
    - `inference`: start in evaluation mode (default: training mode).
    - `pinned`: start pinned (see `nn.eval_mode`).

    In training mode with `p > 0` a `key` is required. The input needs at least one axis,
    the sample axis: each sample `x[i]` is kept or dropped as a whole.

    **Returns:** `drop_path(x, key=None)` returns an array of `x`'s shape `(batch, *rest)` and
    dtype: whole samples zeroed and the rest scaled in training mode, `x` itself in
    evaluation mode.

    !!! Example

        ```python
        drop_path = nn.DropPath(0.1)
        y = x + drop_path(branch(x), key=key)   # training mode
        y = nn.eval_mode(drop_path)(x)          # identity
        ```
    """

    p: float = eqx.field(static=True)

    def __init__(self, p: float = 0.0, *, inference: bool = False, pinned: bool = False):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"nn.DropPath(p={p!r}): p must be in [0, 1]")
        self.p = float(p)
        self._init_mode(inference, pinned)

    def __call__(
        self, x: Float[Array, "batch *rest"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch *rest"]:
        if x.ndim < 1:
            raise ValueError(
                f"nn.DropPath(p={self.p}) expects input of shape (batch, *rest), with a "
                f"sample axis first, got shape {tuple(x.shape)}"
            )
        if self.inference or self.p == 0.0:
            return x
        if key is None:
            raise ValueError(
                f"nn.DropPath(p={self.p}) is in training mode and needs `key=`; pass a PRNG "
                "key, or switch it to evaluation mode with nn.eval_mode"
            )
        if self.p == 1.0:
            return jnp.zeros_like(x)
        keep = jax.random.bernoulli(key, 1.0 - self.p, (x.shape[0],))
        keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / (1.0 - self.p), jnp.zeros_like(x))
