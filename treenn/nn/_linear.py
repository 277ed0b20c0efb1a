"""Linear layers: Linear, Identity and a timm-style MLP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from .._module import Module
from ._dropout import Dropout
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

    **Returns:** `layer(x)` returns `x @ weight.T + bias`, of shape `(*batch, out_features)`
    for `x` of shape `(*batch, in_features)`.

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


class Identity(Module):
    """Return the input unchanged: a placeholder layer, as PyTorch's `Identity`.

    **Arguments:**

    - `*args`, `**kwargs`: ignored, as in PyTorch, so that `nn.Identity` can stand in for
        a layer class called with that layer's arguments (`norm_layer(dim)`).

    **Returns:** `layer(x)` returns `x` itself, same shape and dtype.

    !!! Example

        ```python
        norm = nn.LayerNorm(64) if use_norm else nn.Identity()
        y = norm(x)
        ```
    """

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs

    def __call__(
        self, x: Shaped[Array, "*shape"], *, key: PRNGKeyArray | None = None
    ) -> Shaped[Array, "*shape"]:
        return x


def gelu(x: Array) -> Array:
    """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`: PyTorch's `nn.GELU()`
    default, and so timm's. (`jax.nn.gelu` alone is the tanh approximation.)

    **Arguments:**

    - `x`: an array of any shape.

    **Returns:** `x * Φ(x)` elementwise (`Φ` the standard normal CDF), of `x`'s shape and
    dtype.

    !!! Example

        ```python
        y = nn.gelu(jnp.array([-1.0, 0.0, 1.0]))  # [-0.1587, 0.0, 0.8413]
        mlp = nn.MLP(64, 256, act=nn.gelu, key=jax.random.key(0))  # the default act
        ```
    """
    return jax.nn.gelu(x, approximate=False)


def _pair(value: Any, name: str, kind: type) -> tuple[Any, Any]:
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"nn.MLP({name}={value!r}): expected one value or a pair")
        return value
    return (kind(value), kind(value))


class MLP(Module):
    """The two-layer perceptron of transformers, shaped like timm's `Mlp`:
    `fc1 -> act -> drop1 -> fc2 -> drop2`.

    **Arguments:**

    - `in_features`: input size.
    - `hidden_features`: size of the hidden layer (e.g. `4 * in_features` in a ViT).
    - `out_features`: output size (default: `in_features`).
    - `act`: activation function, static. The default is the exact (erf) GELU,
        `jax.nn.gelu(x, approximate=False)`, which is PyTorch's `nn.GELU()` and so
        timm's default; note that `jax.nn.gelu` on its own is the tanh approximation
        (pass `act=jax.nn.gelu` for that).
    - `drop`: dropout probability after the activation and after `fc2`; a pair gives
        each its own, as in timm.
    - `bias`: whether `fc1` and `fc2` have biases; a pair gives each its own.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (PyTorch's Linear default).

    Submodules follow timm's names, so paths match its checkpoints: `fc1` and `fc2`
    (`nn.Linear`, `fc1.weight` of shape `(hidden_features, in_features)`...), and
    `drop1`, `drop2` (`nn.Dropout`, mode-bearing: switch them with `nn.eval_mode`). In
    training mode with dropout, `key` is required and split between the two dropouts.

    **Returns:** `mlp(x, key=None)` returns an array of shape `(*batch, out_features)` for `x` of
    shape `(*batch, in_features)`.

    !!! Example

        ```python
        mlp = nn.MLP(64, 256, drop=0.1, key=jax.random.key(0))
        y = mlp(x, key=key)          # training mode: dropout
        y = nn.eval_mode(mlp)(x)     # evaluation mode: no key needed
        ```
    """

    fc1: Linear
    drop1: Dropout
    fc2: Linear
    drop2: Dropout
    act: Callable[[Array], Array] = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    hidden_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        *,
        act: Callable[[Array], Array] = gelu,
        drop: float | tuple[float, float] = 0.0,
        bias: bool | tuple[bool, bool] = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        out_features = in_features if out_features is None else out_features
        name = f"nn.MLP({in_features}, {hidden_features}, {out_features})"
        for arg, size in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
        ):
            if size < 0:
                raise ValueError(f"{name}: {arg}={size} must be >= 0")
        if not callable(act):
            raise ValueError(f"{name}: act={act!r} is not callable")
        drop1, drop2 = _pair(drop, "drop", float)
        bias1, bias2 = _pair(bias, "bias", bool)
        for p in (drop1, drop2):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: drop={drop!r} must be in [0, 1]")
        k1, k2 = jax.random.split(key)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.act = act
        self.fc1 = Linear(in_features, hidden_features, bias=bias1, dtype=dtype, key=k1)
        self.drop1 = Dropout(drop1)
        self.fc2 = Linear(hidden_features, out_features, bias=bias2, dtype=dtype, key=k2)
        self.drop2 = Dropout(drop2)

    def __call__(
        self, x: Float[Array, "*batch in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_features"]:
        # Every sublayer gets a key of its own: fc1/fc2 may need one (a LoRA adapter's
        # dropout).
        k1, k2, k3, k4 = (None,) * 4 if key is None else tuple(jax.random.split(key, 4))
        x = self.act(self.fc1(x, key=k1))
        x = self.drop1(x, key=k2)
        x = self.fc2(x, key=k3)
        return self.drop2(x, key=k4)
