"""Convolutions and transposed convolutions, channels-last: input `(*batch, *spatial,
channels)`.

One N-d implementation (`_ConvNd`, `_ConvTransposeNd`) serves the 1-d, 2-d and 3-d
layers and holds their documentation; these only fix the number of spatial axes and
name the axes of their input for the runtime shape check (one line of docstring each,
as in Equinox).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from ._init import torch_uniform
from ._shapes import expect_rank, trailing

Padding = int | Sequence[int] | Sequence[tuple[int, int]] | str

# Names of the spatial axes, as in the error messages and the jaxtyping shapes.
SPATIAL_NAMES = {1: "length", 2: "height, width", 3: "depth, height, width"}
_LAYOUT = {1: "W", 2: "HW", 3: "DHW"}


def _tuple(
    name: str, value: int | Sequence[int], n: int, minimum: int = 1, layer: str = ""
) -> tuple[int, ...]:
    """`value` as `n` ints, each `>= minimum`; a ValueError naming the argument otherwise."""
    if isinstance(value, int):
        out: tuple[Any, ...] = (value,) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        out = tuple(value)
    else:
        out = ()
    if len(out) != n or not all(isinstance(v, int) and v >= minimum for v in out):
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        prefix = f"{layer}: " if layer else ""
        raise ValueError(f"{prefix}{name}={value!r}: expected a {kind} int or {n} {kind} ints")
    return out


def _padding(value: Padding, n: int, layer: str = "") -> str | tuple[tuple[int, int], ...]:
    """`"SAME"`, `"VALID"` (any case) or `n` non-negative `(low, high)` pairs."""
    prefix = f"{layer}: " if layer else ""
    if isinstance(value, str):
        if value.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"{prefix}padding={value!r}: expected 'SAME', 'VALID', an int or a tuple"
            )
        return value.upper()
    items: tuple[Any, ...] = (value,) * n if isinstance(value, int) else tuple(value)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in items)
    if len(pads) != n or not all(
        len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in pads
    ):
        raise ValueError(
            f"{prefix}padding={value!r}: expected {n} non-negative ints or (low, high) pairs"
        )
    return pads


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """Padding of a "SAME" convolution (output `ceil(size / stride)`), the smaller half low:
    XLA's, TensorFlow's, and PyTorch's `padding="same"` (stride 1)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _check_channels_groups(layer: str, in_channels: int, out_channels: int, groups: int) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"{layer}: in_channels={in_channels}, out_channels={out_channels}: channel counts "
            "must be positive"
        )
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{layer}({in_channels}, {out_channels}, groups={groups}): both channel counts "
            "must be divisible by groups"
        )


def _conv(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    *,
    strides: tuple[int, ...],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
    groups: int,
) -> jax.Array:
    """Channels-last convolution over `x` of shape `(*batch, *spatial, channels)` with a
    PyTorch-layout weight `(out, in / groups, *kernel)`."""
    n = weight.ndim - 2
    batch = x.shape[: x.ndim - n - 1]
    sp = _LAYOUT[n]
    y = jax.lax.conv_general_dilated(
        x.reshape((-1, *x.shape[x.ndim - n - 1 :])),
        weight,
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=(f"N{sp}C", f"OI{sp}", f"N{sp}C"),
        feature_group_count=groups,
    )
    if bias is not None:
        y = y + trailing(bias, y.ndim)
    return y.reshape((*batch, *y.shape[1:]))


class _ConvBase(Module):
    """What convolutions and transposed convolutions share: configuration and checks."""

    weight: Array
    bias: Array | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: Any = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    num_spatial_dims: ClassVar[int]

    def _name(self) -> str:
        return f"nn.{type(self).__name__}({self.in_channels}, {self.out_channels})"

    def _check_input(self, x: jax.Array) -> tuple[int, ...]:
        """Raise a clear error unless `x` is `(*batch, *spatial, in_channels)`; return the
        spatial sizes."""
        n = self.num_spatial_dims
        names = SPATIAL_NAMES[n]
        expect_rank(self._name(), x, n + 1, f"{names}, in_channels")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{self._name()} expects input of shape (*batch, {names}, "
                f"{self.in_channels}), got shape {tuple(x.shape)}"
            )
        return tuple(x.shape[x.ndim - n - 1 : -1])

    def _too_small(self, x: jax.Array, out: Sequence[int]) -> None:
        if min(out) < 1:
            raise ValueError(
                f"{self._name()}: input of shape {tuple(x.shape)} is too small for "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}: output spatial size "
                f"would be {tuple(out)}"
            )


class _ConvNd(_ConvBase):
    """Convolution over channels-last input `(*batch, *spatial, in_channels)`, with
    PyTorch's parameters. `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` are this layer with
    1, 2 and 3 spatial axes: `(length,)`, `(height, width)`, `(depth, height, width)`.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `kernel_size`: an int, or one int per spatial axis.
    - `stride`, `dilation`: an int, or one int per spatial axis.
    - `padding`: an int (both sides of every axis), one int per spatial axis (both sides
      of it), one `(low, high)` pair per spatial axis, `"SAME"` or `"VALID"` (any case;
      see below).
    - `groups`: grouped convolution; both channel counts must divide by it.
    - `bias`: whether to add a bias.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation: PyTorch's, U(±1/sqrt(fan_in)) for the weight
      and the bias, with `fan_in = in_channels // groups * prod(kernel_size)`.

    Parameters follow PyTorch: `weight` of shape `(out_channels, in_channels // groups,
    *kernel_size)` (`kh, kw` for `Conv2d`), `bias` of shape `(out_channels,)`, so PyTorch
    checkpoints load as they are. Each output spatial size is `(size + low + high -
    dilation * (kernel - 1) - 1) // stride + 1`, as in PyTorch. `"VALID"` is no padding;
    `"SAME"` pads to an output size of `ceil(size / stride)`, the smaller half at the
    start (XLA's and TensorFlow's rule; with stride 1 exactly PyTorch's `padding="same"`,
    which PyTorch refuses for stride > 1).

    **Returns:** `conv(x)` returns `(*batch, *out_spatial, out_channels)` for `x` of shape
    `(*batch, *spatial, in_channels)`.

    !!! Example

        ```python
        conv = nn.Conv1d(3, 16, 5, padding=2, key=jax.random.key(0))
        y = conv(jnp.ones((8, 100, 3)))  # (8, 100, 16)
        conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, key=jax.random.key(0))
        y = conv(jnp.ones((8, 32, 32, 3)))  # (8, 16, 16, 16)
        conv = nn.Conv3d(1, 8, 3, padding="same", key=jax.random.key(0))
        y = conv(jnp.ones((2, 16, 16, 16, 1)))  # (2, 16, 16, 16, 8)
        ```
    """

    weight: Float[Array, "out_channels in_per_group *kernel"]
    bias: Float[Array, " out_channels"] | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: Padding = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        n = self.num_spatial_dims
        layer = f"nn.{type(self).__name__}"
        _check_channels_groups(layer, in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple("kernel_size", kernel_size, n, layer=layer)
        self.stride = _tuple("stride", stride, n, layer=layer)
        self.dilation = _tuple("dilation", dilation, n, layer=layer)
        self.padding = _padding(padding, n, layer)
        self.groups = groups
        # PyTorch: fan_in = weight.size(1) * prod(kernel), for the weight and the bias.
        fan_in = in_channels // groups * math.prod(self.kernel_size)
        wkey, bkey = jax.random.split(key)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = torch_uniform(wkey, shape, fan_in, dtype)
        self.bias = torch_uniform(bkey, (out_channels,), fan_in, dtype) if bias else None

    def _forward(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        sizes = self._check_input(x)
        if self.padding == "SAME":
            pads = tuple(
                _same_pads(*a) for a in zip(sizes, self.kernel_size, self.stride, self.dilation)
            )
        elif self.padding == "VALID":
            pads = ((0, 0),) * len(sizes)
        else:
            pads = self.padding
        out = [
            (size + lo + hi - d * (k - 1) - 1) // s + 1
            for size, (lo, hi), k, s, d in zip(
                sizes, pads, self.kernel_size, self.stride, self.dilation
            )
        ]
        self._too_small(x, out)
        return _conv(
            x,
            self.weight,
            self.bias,
            strides=self.stride,
            padding=pads,
            lhs_dilation=(1,) * len(sizes),
            rhs_dilation=self.dilation,
            groups=self.groups,
        )


class Conv1d(_ConvNd):
    """As [convolution][treenn.nn._conv._ConvNd] with 1 spatial axis."""

    num_spatial_dims: ClassVar[int] = 1
    __init__ = _ConvNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch length in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_length out_channels"]:
        return self._forward(x)


class Conv2d(_ConvNd):
    """As [convolution][treenn.nn._conv._ConvNd] with 2 spatial axes."""

    num_spatial_dims: ClassVar[int] = 2
    __init__ = _ConvNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width out_channels"]:
        return self._forward(x)


class Conv3d(_ConvNd):
    """As [convolution][treenn.nn._conv._ConvNd] with 3 spatial axes."""

    num_spatial_dims: ClassVar[int] = 3
    __init__ = _ConvNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch depth height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width out_channels"]:
        return self._forward(x)


# -- transposed convolutions ----------------------------------------------------------------


def _same_crop(kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """Crop (low, high) of a "SAME" transposed convolution: the output is `size * stride`.
    It is the adjoint of a "SAME" convolution of an input `size * stride` long: that pads
    `total = dilation * (kernel - 1) + 1 - stride` (smaller half low), which the transpose
    crops; a negative total (stride larger than the dilated kernel) appends zeros at the
    end instead."""
    total = dilation * (kernel - 1) + 1 - stride
    if total < 0:
        return 0, total
    return total // 2, total - total // 2


class _ConvTransposeNd(_ConvBase):
    """Transposed convolution over channels-last input `(*batch, *spatial,
    in_channels)`, as PyTorch's `ConvTranspose1d`/`2d`/`3d`: the gradient (adjoint) of the
    convolution with the same `weight`, stride, padding and dilation.
    `nn.ConvTranspose1d`, `nn.ConvTranspose2d` and `nn.ConvTranspose3d` are this layer
    with 1, 2 and 3 spatial axes. Each output spatial size is `(size - 1) * stride - 2 *
    padding + dilation * (kernel - 1) + output_padding + 1`.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `kernel_size`: an int, or one int per spatial axis.
    - `stride`, `dilation`: an int, or one int per spatial axis.
    - `padding`: as in PyTorch, the amount cropped from each side of the full output: an
      int, one int per spatial axis, or one `(low, high)` pair per spatial axis to crop
      the start and the end differently. Also `"VALID"` (any case): no padding, the full
      output; and `"SAME"`: an output size of exactly `size * stride`. It is the adjoint
      of the convolution with `padding="SAME"` on an input `size * stride` long: `total =
      dilation * (kernel - 1) + 1 - stride` is cropped, the smaller half at the start; if
      `total < 0`, `-total` zeros are appended at the end instead.
    - `output_padding`: an int or one int per spatial axis, added at the end of each axis
      (PyTorch's: picks among the input sizes a strided convolution maps to one output
      size); each must be smaller than the stride or the dilation of its axis. Not with
      `"SAME"`.
    - `groups`: grouped convolution; both channel counts must divide by it.
    - `bias`: whether to add a bias.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation: PyTorch's, U(±1/sqrt(fan_in)) for the weight
      and the bias, with PyTorch's `fan_in = out_channels // groups * prod(kernel_size)`.

    Parameters follow PyTorch: `weight` of shape `(in_channels, out_channels // groups,
    *kernel_size)`, `bias` of shape `(out_channels,)`, so PyTorch checkpoints load as they
    are.

    **Returns:** `conv(x)` returns `(*batch, *out_spatial, out_channels)` for `x` of shape
    `(*batch, *spatial, in_channels)`.

    !!! Example

        ```python
        up = nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1, key=jax.random.key(0))
        y = up(jnp.ones((8, 50, 16)))  # (8, 100, 8)
        up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1,
                                key=jax.random.key(0))
        y = up(jnp.ones((8, 16, 16, 16)))  # (8, 32, 32, 8)
        up = nn.ConvTranspose3d(8, 4, 2, stride=2, key=jax.random.key(0))
        y = up(jnp.ones((2, 8, 8, 8, 8)))  # (2, 16, 16, 16, 4)
        ```
    """

    weight: Float[Array, "in_channels out_per_group *kernel"]
    bias: Float[Array, " out_channels"] | None
    output_padding: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: Padding = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        n = self.num_spatial_dims
        layer = f"nn.{type(self).__name__}"
        _check_channels_groups(layer, in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple("kernel_size", kernel_size, n, layer=layer)
        self.stride = _tuple("stride", stride, n, layer=layer)
        self.dilation = _tuple("dilation", dilation, n, layer=layer)
        self.padding = _padding(padding, n, layer)
        self.output_padding = _tuple("output_padding", output_padding, n, 0, layer)
        if any(p >= max(s, d) for p, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(
                f"{layer}: output_padding={output_padding!r} must be smaller than either "
                f"stride={self.stride} or dilation={self.dilation} along each axis"
            )
        if self.padding == "SAME" and any(self.output_padding):
            raise ValueError(
                f"{layer}: output_padding={output_padding!r} cannot be used with "
                "padding='SAME' (the output size is already size * stride)"
            )
        self.groups = groups
        # PyTorch's fan_in for transposed convolutions: weight.size(1) * prod(kernel).
        fan_in = out_channels // groups * math.prod(self.kernel_size)
        wkey, bkey = jax.random.split(key)
        shape = (in_channels, out_channels // groups, *self.kernel_size)
        self.weight = torch_uniform(wkey, shape, fan_in, dtype)
        self.bias = torch_uniform(bkey, (out_channels,), fan_in, dtype) if bias else None

    def _forward(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        sizes = self._check_input(x)
        n = len(sizes)
        if self.padding == "SAME":
            crops = tuple(_same_crop(*a) for a in zip(self.kernel_size, self.stride, self.dilation))
        elif self.padding == "VALID":
            crops = ((0, 0),) * n
        else:
            crops = self.padding
        out = [
            (size - 1) * s - lo - hi + d * (k - 1) + op + 1
            for size, (lo, hi), k, s, d, op in zip(
                sizes, crops, self.kernel_size, self.stride, self.dilation, self.output_padding
            )
        ]
        self._too_small(x, out)
        # A transposed convolution is a convolution of the stride-dilated input with the
        # spatially flipped kernel, its in/out axes swapped within each group, padded by
        # the dilated kernel size less the crop (plus output_padding at the end).
        g = self.groups
        w = self.weight
        w = w.reshape((g, self.in_channels // g, self.out_channels // g, *self.kernel_size))
        w = jnp.swapaxes(w, 1, 2).reshape(
            (self.out_channels, self.in_channels // g, *self.kernel_size)
        )
        w = jnp.flip(w, axis=tuple(range(2, 2 + n)))
        pads = [
            (d * (k - 1) - lo, d * (k - 1) - hi + op)
            for (lo, hi), k, d, op in zip(
                crops, self.kernel_size, self.dilation, self.output_padding
            )
        ]
        return _conv(
            x,
            w,
            self.bias,
            strides=(1,) * n,
            padding=pads,
            lhs_dilation=self.stride,
            rhs_dilation=self.dilation,
            groups=g,
        )


class ConvTranspose1d(_ConvTransposeNd):
    """As [transposed convolution][treenn.nn._conv._ConvTransposeNd] with 1 spatial axis."""

    num_spatial_dims: ClassVar[int] = 1
    __init__ = _ConvTransposeNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch length in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_length out_channels"]:
        return self._forward(x)


class ConvTranspose2d(_ConvTransposeNd):
    """As [transposed convolution][treenn.nn._conv._ConvTransposeNd] with 2 spatial axes."""

    num_spatial_dims: ClassVar[int] = 2
    __init__ = _ConvTransposeNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width out_channels"]:
        return self._forward(x)


class ConvTranspose3d(_ConvTransposeNd):
    """As [transposed convolution][treenn.nn._conv._ConvTransposeNd] with 3 spatial axes."""

    num_spatial_dims: ClassVar[int] = 3
    __init__ = _ConvTransposeNd.__init__  # explicit, so that type checkers see the signature

    def __call__(
        self,
        x: Float[Array, "*batch depth height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width out_channels"]:
        return self._forward(x)
