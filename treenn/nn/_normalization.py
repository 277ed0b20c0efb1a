"""Normalisation layers, channels-last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from .._state import current_value, record
from .._status import Buffer
from ._shapes import expect_trailing, trailing


def _stats_dtype(x: jax.Array) -> Any:
    # Statistics of half-precision inputs are computed in float32, as PyTorch does.
    return jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype


class BatchNorm(Module):
    """Batch normalisation over the last (channel) axis, with PyTorch's conventions.

    In training mode it normalises with the batch's statistics (over every axis but the
    last) and updates the running statistics: `new = (1 - momentum) * old + momentum *
    batch`, with the unbiased batch variance. The update must be returned: call the model
    through `treenn.apply`, which gives back the updated model (a training-mode
    BatchNorm called outside it raises an error rather than lose the update). In
    evaluation mode it normalises with the running statistics.

    **Arguments:**

    - `num_features`: number of channels (size of the last axis).
    - `eps`: added to the variance (PyTorch: 1e-5).
    - `momentum`: weight of the new batch in the running statistics (PyTorch: 0.1).
    - `affine`: whether to learn a per-channel `weight` and `bias`.
    - `inference`, `pinned`: initial mode and pin.
    - `dtype`: parameter dtype (default float32).

    Parameters and buffers follow PyTorch: `weight`, `bias`, and the buffers
    `running_mean`, `running_var`, which are never trainable.

    !!! Example

        ```python
        bn = nn.BatchNorm(16)
        y, bn = treenn.apply(bn, x)      # training: bn's running statistics updated
        y = nn.eval_mode(bn)(x)          # evaluation: uses them
        ```
    """

    weight: Float[Array, " num_features"] | None
    bias: Float[Array, " num_features"] | None
    running_mean: Float[Array, " num_features"]
    running_var: Float[Array, " num_features"]
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    inference: bool = eqx.field(static=True)
    pinned: bool = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        inference: bool = False,
        pinned: bool = False,
        dtype: Any = None,
    ):
        if num_features < 1:
            raise ValueError(f"nn.BatchNorm({num_features}): num_features must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"nn.BatchNorm(momentum={momentum!r}): must be in [0, 1]")
        dtype = jnp.float32 if dtype is None else dtype
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.inference = inference
        self.pinned = pinned
        self.weight = jnp.ones((num_features,), dtype) if affine else None
        self.bias = jnp.zeros((num_features,), dtype) if affine else None
        self.running_mean = Buffer(jnp.zeros((num_features,), jnp.float32))  # type: ignore[assignment]
        self.running_var = Buffer(jnp.ones((num_features,), jnp.float32))  # type: ignore[assignment]

    def __call__(
        self, x: Float[Array, "*batch num_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch num_features"]:
        name = f"nn.BatchNorm({self.num_features})"
        expect_trailing(name, x, (self.num_features,), "num_features")
        stats_x = x.astype(_stats_dtype(x))
        if self.inference:
            mean, var = self.running_mean, self.running_var
        else:
            mean, var = self._batch_statistics(name, stats_x)
        scale = jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.astype(scale.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.astype(shift.dtype)
        y = stats_x * trailing(scale, x.ndim) + trailing(shift, x.ndim)
        return y.astype(x.dtype)

    def _batch_statistics(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        axes = tuple(range(x.ndim - 1))
        count = x.size // self.num_features
        if count < 2:
            raise ValueError(
                f"{name} in training mode needs more than one value per channel, got input "
                f"shape {tuple(x.shape)}; use a larger batch or nn.eval_mode"
            )
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - trailing(mean, x.ndim)), axis=axes)
        m = self.momentum
        old_mean = current_value(self, "running_mean", self.running_mean)
        old_var = current_value(self, "running_var", self.running_var)
        unbiased = var * (count / (count - 1))
        record(
            self,
            name,
            running_mean=((1 - m) * old_mean + m * mean).astype(old_mean.dtype),
            running_var=((1 - m) * old_var + m * unbiased).astype(old_var.dtype),
        )
        return mean, var


class LayerNorm(Module):
    """Layer normalisation over the last `len(normalized_shape)` axes, as PyTorch's.

    **Arguments:**

    - `normalized_shape`: an int or tuple: the trailing shape to normalise over.
    - `eps`: added to the variance (1e-5).
    - `elementwise_affine`: learn `weight` (ones) and `bias` (zeros) of that shape.
    - `bias`: with `elementwise_affine`, whether to learn the bias.
    - `dtype`: parameter dtype (default float32).

    !!! Example

        ```python
        norm = nn.LayerNorm(64)
        y = norm(jnp.ones((8, 10, 64)))
        ```
    """

    weight: Float[Array, "*normalized"] | None
    bias: Float[Array, "*normalized"] | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: Any = None,
    ):
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(f"nn.LayerNorm({normalized_shape!r}): expected positive sizes")
        dtype = jnp.float32 if dtype is None else dtype
        self.normalized_shape = shape
        self.eps = float(eps)
        self.weight = jnp.ones(shape, dtype) if elementwise_affine else None
        self.bias = jnp.zeros(shape, dtype) if elementwise_affine and bias else None

    def __call__(
        self, x: Float[Array, "*shape"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*shape"]:
        shape = self.normalized_shape
        expect_trailing(f"nn.LayerNorm({shape})", x, shape, ", ".join(map(str, shape)))
        axes = tuple(range(x.ndim - len(shape), x.ndim))
        stats_x = x.astype(_stats_dtype(x))
        mean = jnp.mean(stats_x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(stats_x - mean), axis=axes, keepdims=True)
        y = (stats_x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * trailing(self.weight.astype(y.dtype), x.ndim)
        if self.bias is not None:
            y = y + trailing(self.bias.astype(y.dtype), x.ndim)
        return y.astype(x.dtype)
