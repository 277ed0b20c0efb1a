"""Linear layers."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from ._init import torch_uniform
from ._shapes import expect_trailing, trailing


class Linear(Module):
    """`y = x @ weight.T + bias`, over any number of leading batch axes.

    **Arguments:**

    - `in_features`, `out_features`: input and output sizes.
    - `bias`: whether to add a bias.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (PyTorch's: U(±1/sqrt(in_features))).

    Parameters follow PyTorch: `weight` of shape `(out_features, in_features)`, `bias` of
    shape `(out_features,)`.

    !!! Example

        ```python
        layer = nn.Linear(64, 10, key=jax.random.key(0))
        y = layer(jnp.ones((32, 64)))  # (32, 10)
        ```
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        if in_features < 0 or out_features < 0:
            raise ValueError(f"nn.Linear({in_features}, {out_features}): sizes must be >= 0")
        wkey, bkey = jax.random.split(key)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch_uniform(wkey, (out_features, in_features), in_features, dtype)
        self.bias = torch_uniform(bkey, (out_features,), in_features, dtype) if bias else None

    def __call__(
        self, x: Float[Array, "*batch in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_features"]:
        expect_trailing(self._name(), x, (self.in_features,), "in_features")
        y = x @ self.weight.T
        if self.bias is not None:
            y = y + trailing(self.bias, y.ndim)
        return y

    def _name(self) -> str:
        return f"nn.Linear({self.in_features}, {self.out_features})"
