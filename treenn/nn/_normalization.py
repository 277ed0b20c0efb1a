"""Normalisation layers, channels-last."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._module import Module
from .._state import current_value, record
from .._status import Buffer
from ._mode_bearing import ModeBearing
from ._shapes import expect_trailing, trailing


def _stats_dtype(x: jax.Array) -> Any:
    # Statistics of half-precision inputs are computed in float32, as PyTorch does.
    return jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype


def _check_eps(layer: str, eps: float | None) -> None:
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"{layer}: eps={eps!r} must be >= 0")


def _shape_tuple(layer: str, shape: int | Sequence[int]) -> tuple[int, ...]:
    out = (shape,) if isinstance(shape, int) else tuple(shape)
    if not out or not all(isinstance(s, int) and s >= 1 for s in out):
        raise ValueError(f"{layer}({shape!r}): expected positive sizes")
    return out


class BatchNorm(ModeBearing):
    """Batch normalisation over the last (channel) axis, with PyTorch's conventions.

    In training mode it normalises with the batch's statistics (over every axis but the
    last) and updates the running statistics: `new = (1 - momentum) * old + momentum *
    batch`, with the unbiased batch variance. The update must be returned: call the model
    through `treenn.apply`, which gives back the updated model (a training-mode
    BatchNorm called outside it raises an error rather than lose the update). In
    evaluation mode it normalises with the running statistics.

    Three ways to use batch statistics without touching running ones:

    - `update_stats=False`: in training mode the layer normalises with the batch's
        statistics and records nothing, so it also works outside `treenn.apply`. Its
        buffers are kept (and used in evaluation mode). This separates "which statistics
        normalise" (the mode) from "are the running statistics updated" (`update_stats`),
        e.g. for a second forward pass in a training step that must not count twice.
    - `track_running_stats=False` (as in PyTorch): no buffers at all (`running_mean` and
        `running_var` are `None`); the layer always normalises with the batch's
        statistics, in evaluation mode too, and records nothing.
    - `nn.eval_mode`: the running statistics normalise and nothing is updated.

    **Arguments:**

    - `num_features`: number of channels (size of the last axis).
    - `eps`: added to the variance (PyTorch: 1e-5).
    - `momentum`: weight of the new batch in the running statistics (PyTorch: 0.1).
        `None` gives PyTorch's cumulative moving average (the running statistics are the
        plain mean of every batch's statistics so far), counted in an extra integer
        buffer `num_batches_tracked`, which exists only then.
    - `affine`: whether to learn a per-channel `weight` (ones) and `bias` (zeros).
    - `track_running_stats`: whether to keep the `running_mean` and `running_var`
        buffers (default `True`); see above.
    - `update_stats`: whether training mode updates the running statistics (default
        `True`); see above. Static: it is part of the layer's structure, not a value.
    - `inference`, `pinned`: initial mode and pin.
    - `dtype`: parameter dtype (default float32).

    Parameters and buffers follow PyTorch: `weight`, `bias`, and the buffers
    `running_mean`, `running_var` (float32), which are never trainable.

    **Returns:** `bn(x)` returns the normalised `x`, of its shape `(*batch, num_features)`. In
    training mode with `update_stats=True`, call it through `treenn.apply`, which
    returns `(y, updated_model)`.

    !!! Example

        ```python
        bn = nn.BatchNorm(16)
        y, bn = treenn.apply(bn, x)      # training: bn's running statistics updated
        y = nn.eval_mode(bn)(x)          # evaluation: uses them

        probe = nn.BatchNorm(16, update_stats=False)
        y = probe(x)                     # batch statistics, nothing recorded
        ```
    """

    weight: Float[Array, " num_features"] | None
    bias: Float[Array, " num_features"] | None
    running_mean: Float[Array, " num_features"] | None
    running_var: Float[Array, " num_features"] | None
    num_batches_tracked: Int[Array, ""] | None
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    track_running_stats: bool = eqx.field(static=True)
    update_stats: bool = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        update_stats: bool = True,
        inference: bool = False,
        pinned: bool = False,
        dtype: Any = None,
    ):
        if num_features < 1:
            raise ValueError(f"nn.BatchNorm({num_features}): num_features must be >= 1")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"nn.BatchNorm(momentum={momentum!r}): must be in [0, 1], or None for a "
                "cumulative moving average"
            )
        _check_eps(f"nn.BatchNorm({num_features})", eps)
        dtype = jnp.float32 if dtype is None else dtype
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.update_stats = bool(update_stats)
        self._init_mode(inference, pinned)
        self.weight = jnp.ones((num_features,), dtype) if affine else None
        self.bias = jnp.zeros((num_features,), dtype) if affine else None
        if track_running_stats:
            self.running_mean = Buffer(jnp.zeros((num_features,), jnp.float32))  # type: ignore[assignment]
            self.running_var = Buffer(jnp.ones((num_features,), jnp.float32))  # type: ignore[assignment]
        else:
            self.running_mean = self.running_var = None
        if track_running_stats and momentum is None:
            self.num_batches_tracked = Buffer(jnp.zeros((), jnp.int32))  # type: ignore[assignment]
        else:
            self.num_batches_tracked = None

    def __call__(
        self, x: Float[Array, "*batch num_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch num_features"]:
        name = f"nn.BatchNorm({self.num_features})"
        expect_trailing(name, x, (self.num_features,), "num_features")
        stats_x = x.astype(_stats_dtype(x))
        if self.inference and self.running_mean is not None and self.running_var is not None:
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
        if (
            not self.inference
            and self.update_stats
            and self.running_mean is not None
            and self.running_var is not None
        ):
            self._record(name, mean, var * (count / (count - 1)))
        return mean, var

    def _record(self, name: str, mean: jax.Array, unbiased: jax.Array) -> None:
        assert self.running_mean is not None and self.running_var is not None
        old_mean = current_value(self, "running_mean", self.running_mean)
        old_var = current_value(self, "running_var", self.running_var)
        extra = {}
        m: Any
        if self.momentum is None:
            assert self.num_batches_tracked is not None
            n = current_value(self, "num_batches_tracked", self.num_batches_tracked) + 1
            m = 1.0 / n.astype(old_mean.dtype)
            extra["num_batches_tracked"] = n
        else:
            m = self.momentum
        record(
            self,
            name,
            running_mean=((1 - m) * old_mean + m * mean).astype(old_mean.dtype),
            running_var=((1 - m) * old_var + m * unbiased).astype(old_var.dtype),
            **extra,
        )


class LayerNorm(Module):
    """Layer normalisation over the last `len(normalized_shape)` axes, as PyTorch's.

    **Arguments:**

    - `normalized_shape`: an int or tuple: the trailing shape to normalise over.
    - `eps`: added to the variance (1e-5).
    - `elementwise_affine`: learn `weight` (ones) and `bias` (zeros) of that shape.
    - `bias`: with `elementwise_affine`, whether to learn the bias.
    - `dtype`: parameter dtype (default float32).

    **Returns:** `norm(x)` returns the normalised `x`, of its shape `(*batch,
    *normalized_shape)`.

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
        shape = _shape_tuple("nn.LayerNorm", normalized_shape)
        _check_eps(f"nn.LayerNorm({normalized_shape!r})", eps)
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


class GroupNorm(Module):
    """Group normalisation, as PyTorch's `GroupNorm` with the channels last.

    The channels are split into `num_groups` groups of consecutive channels; each sample
    is normalised with the mean and (biased) variance of each group, over the group's
    channels and every spatial axis. The statistics are per sample, so, unlike BatchNorm,
    the layer needs to tell the sample axis from the spatial ones: the input is
    `(batch, *spatial, num_channels)`, PyTorch's `(N, C, *)` layout with the channels
    moved last (as Flax's `GroupNorm`): the first axis is the batch, every axis between it
    and the channels is spatial. For several batch axes, `jax.vmap` the layer (or merge
    them). There is no mode and no state: training and evaluation are the same.

    **Arguments:**

    - `num_groups`: number of groups; must divide `num_channels`.
    - `num_channels`: number of channels (size of the last axis).
    - `eps`: added to the variance (PyTorch: 1e-5).
    - `affine`: whether to learn a per-channel `weight` (ones) and `bias` (zeros).
    - `dtype`: parameter dtype (default float32).

    **Returns:** `norm(x)` returns the normalised `x`, of its shape `(batch, *spatial,
    num_channels)`.

    !!! Example

        ```python
        norm = nn.GroupNorm(8, 32)
        y = norm(jnp.ones((4, 16, 16, 32)))  # (N, H, W, C)
        ```
    """

    weight: Float[Array, " num_channels"] | None
    bias: Float[Array, " num_channels"] | None
    num_groups: int = eqx.field(static=True)
    num_channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        dtype: Any = None,
    ):
        name = f"nn.GroupNorm({num_groups}, {num_channels})"
        if num_groups < 1:
            raise ValueError(f"{name}: num_groups={num_groups} must be >= 1")
        if num_channels < 1:
            raise ValueError(f"{name}: num_channels={num_channels} must be >= 1")
        if num_channels % num_groups:
            raise ValueError(
                f"{name}: num_channels={num_channels} must be divisible by num_groups={num_groups}"
            )
        _check_eps(name, eps)
        dtype = jnp.float32 if dtype is None else dtype
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = float(eps)
        self.weight = jnp.ones((num_channels,), dtype) if affine else None
        self.bias = jnp.zeros((num_channels,), dtype) if affine else None

    def __call__(
        self, x: Float[Array, "batch *spatial num_channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch *spatial num_channels"]:
        c, g = self.num_channels, self.num_groups
        if x.ndim < 2 or x.shape[-1] != c:
            raise ValueError(
                f"nn.GroupNorm({g}, {c}) expects input of shape (batch, *spatial, "
                f"num_channels) = (batch, *spatial, {c}), got shape {tuple(x.shape)}"
            )
        stats_x = x.astype(_stats_dtype(x))
        grouped = stats_x.reshape((x.shape[0], math.prod(x.shape[1:-1]), g, c // g))
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            y = y * trailing(self.weight.astype(y.dtype), x.ndim)
        if self.bias is not None:
            y = y + trailing(self.bias.astype(y.dtype), x.ndim)
        return y.astype(x.dtype)


class RMSNorm(Module):
    """Root-mean-square normalisation over the last `len(normalized_shape)` axes, as
    PyTorch's `RMSNorm`: `y = x / sqrt(mean(x**2) + eps) * weight`.

    **Arguments:**

    - `normalized_shape`: an int or tuple: the trailing shape to normalise over.
    - `eps`: added to the mean square. `None` (the default, as in PyTorch) uses the
        machine epsilon of the computation dtype, `jnp.finfo(dtype).eps`: the input's
        dtype, or float32 for half-precision inputs, whose statistics are computed in
        float32 (PyTorch does the same).
    - `elementwise_affine`: learn a `weight` (ones) of that shape. There is no bias, as
        in PyTorch.
    - `dtype`: parameter dtype (default float32).

    **Returns:** `norm(x)` returns the normalised `x`, of its shape `(*batch,
    *normalized_shape)`.

    !!! Example

        ```python
        norm = nn.RMSNorm(64)
        y = norm(jnp.ones((8, 10, 64)))
        ```
    """

    weight: Float[Array, "*normalized"] | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    eps: float | None = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        *,
        eps: float | None = None,
        elementwise_affine: bool = True,
        dtype: Any = None,
    ):
        shape = _shape_tuple("nn.RMSNorm", normalized_shape)
        _check_eps(f"nn.RMSNorm({normalized_shape!r})", eps)
        dtype = jnp.float32 if dtype is None else dtype
        self.normalized_shape = shape
        self.eps = None if eps is None else float(eps)
        self.weight = jnp.ones(shape, dtype) if elementwise_affine else None

    def __call__(
        self, x: Float[Array, "*shape"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*shape"]:
        shape = self.normalized_shape
        expect_trailing(f"nn.RMSNorm({shape})", x, shape, ", ".join(map(str, shape)))
        axes = tuple(range(x.ndim - len(shape), x.ndim))
        dtype = _stats_dtype(x)
        stats_x = x.astype(dtype)
        eps = float(jnp.finfo(dtype).eps) if self.eps is None else self.eps
        mean_square = jnp.mean(jnp.square(stats_x), axis=axes, keepdims=True)
        y = stats_x * jax.lax.rsqrt(mean_square + eps)
        if self.weight is not None:
            y = y * trailing(self.weight.astype(y.dtype), x.ndim)
        return y.astype(x.dtype)
