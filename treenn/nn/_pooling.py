"""Pooling, channels-last: input `(*batch, *spatial, channels)`.

One N-d implementation per kind (`_MaxPoolNd`, `_AvgPoolNd`, `_AdaptiveAvgPoolNd`) serves
the 1-d, 2-d and 3-d layers and holds their documentation; these only fix the number
of spatial axes and name the axes of their input for the runtime shape check. Pooling
layers hold no arrays: every field is static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from ._conv import SPATIAL_NAMES, _tuple
from ._shapes import expect_rank


def _sum_dtype(x: jax.Array) -> Any:
    # Sums of half-precision inputs are accumulated in float32, as PyTorch does.
    return jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else x.dtype


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's `pooling_output_shape`: in ceil mode, a last window that would start in
    the right padding is dropped."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class _PoolNd(Module):
    """Windowed pooling: shared configuration, checks and window geometry."""

    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: tuple[int, ...] = eqx.field(static=True)
    ceil_mode: bool = eqx.field(static=True)

    num_spatial_dims: ClassVar[int]

    def _setup(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: int | Sequence[int],
        ceil_mode: bool,
    ) -> None:
        n = self.num_spatial_dims
        layer = f"nn.{type(self).__name__}"
        self.kernel_size = _tuple("kernel_size", kernel_size, n, layer=layer)
        self.stride = (
            self.kernel_size if stride is None else _tuple("stride", stride, n, layer=layer)
        )
        self.padding = _tuple("padding", padding, n, 0, layer)
        self.ceil_mode = ceil_mode

    def _check_padding(self) -> None:
        # PyTorch's rule (for max pooling too, whatever the dilation).
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"nn.{type(self).__name__}: padding={self.padding} must be at most half the "
                f"kernel size {self.kernel_size}"
            )

    def _name(self) -> str:
        return f"nn.{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride})"

    def _geometry(
        self, x: jax.Array, dilation: tuple[int, ...]
    ) -> tuple[tuple[int, ...], list[tuple[int, int]], list[int]]:
        """Check `x`; return its spatial sizes, the padding of its spatial axes (the high
        side extended for ceil mode) and the output sizes."""
        n = self.num_spatial_dims
        expect_rank(self._name(), x, n + 1, f"{SPATIAL_NAMES[n]}, channels")
        sizes = tuple(x.shape[x.ndim - n - 1 : -1])
        outs, pads = [], []
        for size, k, s, p, d in zip(sizes, self.kernel_size, self.stride, self.padding, dilation):
            out = _out_size(size, k, s, p, d, self.ceil_mode)
            # The high padding that gives exactly `out` windows (at least `p`).
            high = max((out - 1) * s + d * (k - 1) + 1 - size - p, p)
            outs.append(out)
            pads.append((p, high))
        if min(outs) < 1:
            raise ValueError(
                f"{self._name()}: input of shape {tuple(x.shape)} is too small for "
                f"padding={self.padding}: output spatial size would be {tuple(outs)}"
            )
        return sizes, pads, outs

    def _window(self, x: jax.Array, values: Sequence[int]) -> tuple[int, ...]:
        """`values` (per spatial axis) extended with 1 over the batch and channel axes."""
        return (1,) * (x.ndim - self.num_spatial_dims - 1) + tuple(values) + (1,)


class _MaxPoolNd(_PoolNd):
    """Max pooling over channels-last input `(*batch, *spatial, channels)`, as
    PyTorch's `MaxPool1d`/`2d`/`3d`. `nn.MaxPool1d`, `nn.MaxPool2d` and `nn.MaxPool3d` are
    this layer with 1, 2 and 3 spatial axes.

    **Arguments:**

    - `kernel_size`: window size, an int or one int per spatial axis.
    - `stride`: an int or one int per spatial axis; default `kernel_size`.
    - `padding`: an int or one int per spatial axis, on both sides, padded with `-inf`; at
      most half the kernel size.
    - `dilation`: spacing between window elements, an int or one int per spatial axis.
    - `ceil_mode`: round the output size up instead of down (a last window that would
      start in the far padding is dropped, as in PyTorch).

    Each output spatial size is `(size + 2 * padding - dilation * (kernel - 1) - 1) //
    stride + 1` (rounded up with `ceil_mode`).

    **Returns:** `pool(x)` returns `(*batch, *out_spatial, channels)` for `x` of shape
    `(*batch, *spatial, channels)`.

    !!! Example

        ```python
        pool = nn.MaxPool1d(2)
        y = pool(jnp.ones((8, 100, 16)))  # (8, 50, 16)
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        y = pool(jnp.ones((8, 32, 32, 16)))  # (8, 16, 16, 16)
        ```
    """

    dilation: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
    ):
        self._setup(kernel_size, stride, padding, ceil_mode)
        layer = f"nn.{type(self).__name__}"
        self.dilation = _tuple("dilation", dilation, self.num_spatial_dims, layer=layer)
        self._check_padding()

    def _forward(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        _, pads, _ = self._geometry(x, self.dilation)
        lead = x.ndim - self.num_spatial_dims - 1
        return jax.lax.reduce_window(
            x,
            np.array(-np.inf, x.dtype),
            jax.lax.max,
            window_dimensions=self._window(x, self.kernel_size),
            window_strides=self._window(x, self.stride),
            padding=((0, 0),) * lead + tuple(pads) + ((0, 0),),
            window_dilation=self._window(x, self.dilation),
        )


class _AvgPoolNd(_PoolNd):
    """Average pooling over channels-last input `(*batch, *spatial, channels)`, as
    PyTorch's `AvgPool1d`/`2d`/`3d`. `nn.AvgPool1d`, `nn.AvgPool2d` and `nn.AvgPool3d` are
    this layer with 1, 2 and 3 spatial axes.

    **Arguments:**

    - `kernel_size`: window size, an int or one int per spatial axis.
    - `stride`: an int or one int per spatial axis; default `kernel_size`.
    - `padding`: an int or one int per spatial axis, zeros on both sides; at most half
      the kernel size.
    - `ceil_mode`: round the output size up instead of down (a last window that would
      start in the far padding is dropped, as in PyTorch).
    - `count_include_pad`: whether the padding counts in the divisor (PyTorch's default,
      `True`); with `False` each window is averaged over its elements inside the input.
      The extra padding of `ceil_mode` never counts.

    Each output spatial size is `(size + 2 * padding - kernel) // stride + 1` (rounded up
    with `ceil_mode`).

    **Returns:** `pool(x)` returns `(*batch, *out_spatial, channels)` for `x` of shape
    `(*batch, *spatial, channels)`.

    !!! Example

        ```python
        pool = nn.AvgPool2d(2)
        y = pool(jnp.ones((8, 32, 32, 16)))  # (8, 16, 16, 16)
        pool = nn.AvgPool3d(2)
        y = pool(jnp.ones((2, 16, 16, 16, 8)))  # (2, 8, 8, 8, 8)
        ```
    """

    count_include_pad: bool = eqx.field(static=True)

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ):
        self._setup(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = count_include_pad
        self._check_padding()

    def _forward(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        n = self.num_spatial_dims
        sizes, pads, outs = self._geometry(x, (1,) * n)
        lead = x.ndim - n - 1
        dtype = _sum_dtype(x)
        total = jax.lax.reduce_window(
            x.astype(dtype),
            np.array(0, dtype),
            jax.lax.add,
            window_dimensions=self._window(x, self.kernel_size),
            window_strides=self._window(x, self.stride),
            padding=((0, 0),) * lead + tuple(pads) + ((0, 0),),
        )
        # PyTorch's divisor, known statically: the window clipped to the padded input
        # (count_include_pad) or to the input, never to ceil mode's extra padding.
        divisor = np.ones((), np.float64)
        for size, out, k, s, p in zip(sizes, outs, self.kernel_size, self.stride, self.padding):
            start = np.arange(out) * s - p
            end = np.minimum(start + k, size + p)
            if not self.count_include_pad:
                start, end = np.maximum(start, 0), np.minimum(end, size)
            divisor = np.multiply.outer(divisor, end - start)
        divisor = divisor.reshape((1,) * lead + divisor.shape + (1,))
        return (total / jnp.asarray(divisor, dtype)).astype(x.dtype)


class MaxPool1d(_MaxPoolNd):
    """As [max pooling][treenn.nn._pooling._MaxPoolNd] with 1 spatial axis."""

    num_spatial_dims: ClassVar[int] = 1
    __init__ = _MaxPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self, x: Float[Array, "*batch length channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_length channels"]:
        return self._forward(x)


class MaxPool2d(_MaxPoolNd):
    """As [max pooling][treenn.nn._pooling._MaxPoolNd] with 2 spatial axes."""

    num_spatial_dims: ClassVar[int] = 2
    __init__ = _MaxPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width channels"]:
        return self._forward(x)


class MaxPool3d(_MaxPoolNd):
    """As [max pooling][treenn.nn._pooling._MaxPoolNd] with 3 spatial axes."""

    num_spatial_dims: ClassVar[int] = 3
    __init__ = _MaxPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch depth height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width channels"]:
        return self._forward(x)


class AvgPool1d(_AvgPoolNd):
    """As [average pooling][treenn.nn._pooling._AvgPoolNd] with 1 spatial axis."""

    num_spatial_dims: ClassVar[int] = 1
    __init__ = _AvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self, x: Float[Array, "*batch length channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_length channels"]:
        return self._forward(x)


class AvgPool2d(_AvgPoolNd):
    """As [average pooling][treenn.nn._pooling._AvgPoolNd] with 2 spatial axes."""

    num_spatial_dims: ClassVar[int] = 2
    __init__ = _AvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width channels"]:
        return self._forward(x)


class AvgPool3d(_AvgPoolNd):
    """As [average pooling][treenn.nn._pooling._AvgPoolNd] with 3 spatial axes."""

    num_spatial_dims: ClassVar[int] = 3
    __init__ = _AvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch depth height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width channels"]:
        return self._forward(x)


# -- adaptive and global pooling -------------------------------------------------------------


class _AdaptiveAvgPoolNd(Module):
    """Adaptive average pooling over channels-last input `(*batch, *spatial,
    channels)` to a fixed output size, as PyTorch's `AdaptiveAvgPool1d`/`2d`/`3d`.
    `nn.AdaptiveAvgPool1d`, `nn.AdaptiveAvgPool2d` and `nn.AdaptiveAvgPool3d` are this
    layer with 1, 2 and 3 spatial axes.

    Output position `j` of each axis averages the input over `[floor(j * size / out),
    ceil((j + 1) * size / out))`, PyTorch's bins (they overlap when `size` is not a
    multiple of `out`).

    **Arguments:**

    - `output_size`: one size per spatial axis (`(out_height, out_width)` for
      `AdaptiveAvgPool2d`), or an int for all of them; an entry `None` keeps the input's
      size on that axis.

    **Returns:** `pool(x)` returns `(*batch, *output_size, channels)` for `x` of shape
    `(*batch, *spatial, channels)`.

    !!! Example

        ```python
        pool = nn.AdaptiveAvgPool1d(4)
        y = pool(jnp.ones((8, 30, 16)))  # (8, 4, 16)
        pool = nn.AdaptiveAvgPool2d((7, 7))
        y = pool(jnp.ones((8, 30, 30, 16)))  # (8, 7, 7, 16)
        ```
    """

    output_size: tuple[int | None, ...] = eqx.field(static=True)

    num_spatial_dims: ClassVar[int]

    def __init__(self, output_size: int | None | Sequence[int | None]):
        n = self.num_spatial_dims
        sizes = (
            (output_size,) * n
            if output_size is None or isinstance(output_size, int)
            else tuple(output_size)
        )
        if len(sizes) != n or not all(s is None or (isinstance(s, int) and s >= 1) for s in sizes):
            raise ValueError(
                f"nn.{type(self).__name__}: output_size={output_size!r}: expected a positive "
                f"int or {n} positive ints (or None: keep the input size)"
            )
        self.output_size = sizes

    def _forward(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        n = self.num_spatial_dims
        name = f"nn.{type(self).__name__}({self.output_size})"
        expect_rank(name, x, n + 1, f"{SPATIAL_NAMES[n]}, channels")
        y = x.astype(_sum_dtype(x))
        for i, target in enumerate(self.output_size):
            axis = y.ndim - n - 1 + i
            size = y.shape[axis]
            if target is None or target == size:
                continue
            if size < 1:
                raise ValueError(f"{name}: cannot pool an empty axis, got shape {tuple(x.shape)}")
            # PyTorch's bins: [floor(j * size / target), ceil((j + 1) * size / target)),
            # summed by a 0/1 matrix product (exact: HIGHEST precision), then averaged.
            j = np.arange(target)
            start = (j * size) // target
            end = -((-(j + 1) * size) // target)
            cols = np.arange(size)
            mask = (cols >= start[:, None]) & (cols < end[:, None])  # (target, size)
            total = jnp.tensordot(
                y,
                jnp.asarray(mask, y.dtype),
                axes=((axis,), (1,)),
                precision=jax.lax.Precision.HIGHEST,
            )
            count = (end - start).reshape((1,) * (y.ndim - 1) + (target,))
            y = jnp.moveaxis(total / jnp.asarray(count, y.dtype), -1, axis)
        return y.astype(x.dtype)


class AdaptiveAvgPool1d(_AdaptiveAvgPoolNd):
    """As [adaptive average pooling][treenn.nn._pooling._AdaptiveAvgPoolNd] with 1 spatial axis."""

    num_spatial_dims: ClassVar[int] = 1
    __init__ = _AdaptiveAvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self, x: Float[Array, "*batch length channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_length channels"]:
        return self._forward(x)


class AdaptiveAvgPool2d(_AdaptiveAvgPoolNd):
    """As [adaptive average pooling][treenn.nn._pooling._AdaptiveAvgPoolNd] with 2 spatial axes."""

    num_spatial_dims: ClassVar[int] = 2
    __init__ = _AdaptiveAvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width channels"]:
        return self._forward(x)


class AdaptiveAvgPool3d(_AdaptiveAvgPoolNd):
    """As [adaptive average pooling][treenn.nn._pooling._AdaptiveAvgPoolNd] with 3 spatial axes."""

    num_spatial_dims: ClassVar[int] = 3
    __init__ = _AdaptiveAvgPoolNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch depth height width channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width channels"]:
        return self._forward(x)


class GlobalAvgPool(Module):
    """Mean over all spatial axes of channels-last input `(*batch, *spatial, channels)`.

    With `keepdims=False` (the default) the spatial axes are dropped: the output is
    `(*batch, channels)`, ready for a `Linear` head. With `keepdims=True` they are kept
    with size 1: `(*batch, 1, ..., 1, channels)`, as PyTorch's `AdaptiveAvgPool2d(1)`
    (channels-last).

    **Arguments:**

    - `num_spatial_dims`: how many axes before the channel axis are spatial (2 for
      images); the axes before them are batch axes.
    - `keepdims`: keep the spatial axes with size 1.

    **Returns:** `pool(x)` returns the spatial mean, `(*batch, channels)`, or `(*batch, 1, ...,
    1, channels)` with `keepdims=True`.

    !!! Example

        ```python
        pool = nn.GlobalAvgPool(2)
        y = pool(jnp.ones((8, 7, 7, 512)))  # (8, 512)
        ```
    """

    num_spatial_dims: int = eqx.field(static=True)
    keepdims: bool = eqx.field(static=True)

    def __init__(self, num_spatial_dims: int, *, keepdims: bool = False):
        if not isinstance(num_spatial_dims, int) or num_spatial_dims < 1:
            raise ValueError(
                f"nn.GlobalAvgPool: num_spatial_dims={num_spatial_dims!r}: expected a positive int"
            )
        self.num_spatial_dims = num_spatial_dims
        self.keepdims = keepdims

    def __call__(
        self, x: Float[Array, "... channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "... channels"]:
        n = self.num_spatial_dims
        names = SPATIAL_NAMES.get(n, f"{n} spatial axes")
        expect_rank(f"nn.GlobalAvgPool(num_spatial_dims={n})", x, n + 1, f"{names}, channels")
        axes = tuple(range(x.ndim - n - 1, x.ndim - 1))
        return jnp.mean(x, axis=axes, keepdims=self.keepdims)
