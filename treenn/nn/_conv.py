"""Convolutions, channels-last: input `(*batch, *spatial, channels)`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from ._init import torch_uniform
from ._shapes import expect_rank, trailing

Padding = int | Sequence[int] | Sequence[tuple[int, int]] | str


def _tuple(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    out = (value,) * n if isinstance(value, int) else tuple(value)
    if len(out) != n or not all(isinstance(v, int) and v >= 1 for v in out):
        raise ValueError(f"{name}={value!r}: expected a positive int or {n} positive ints")
    return out


def _padding(value: Padding, n: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(value, str):
        if value.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding={value!r}: expected 'SAME', 'VALID', an int or a tuple")
        return value.upper()
    if isinstance(value, int):
        value = (value,) * n
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in value)
    if len(pads) != n or not all(len(p) == 2 and min(p) >= 0 for p in pads):
        raise ValueError(f"padding={value!r}: expected {n} non-negative ints or (low, high) pairs")
    return pads  # type: ignore[return-value]


class Conv2d(Module):
    """2-d convolution over channels-last input `(*batch, height, width, in_channels)`.

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `kernel_size`: an int or `(kh, kw)`.
    - `stride`, `dilation`: an int or a pair.
    - `padding`: an int, a pair, `((top, bottom), (left, right))`, `"SAME"` or `"VALID"`.
    - `groups`: grouped convolution; both channel counts must divide by it.
    - `bias`: whether to add a bias.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key (PyTorch's initialisation).

    Parameters follow PyTorch: `weight` of shape `(out_channels, in_channels // groups,
    kh, kw)`, `bias` of shape `(out_channels,)`, so PyTorch checkpoints load as they are.

    !!! Example

        ```python
        conv = nn.Conv2d(3, 16, 3, padding=1, key=jax.random.key(0))
        y = conv(jnp.ones((8, 32, 32, 3)))  # (8, 32, 32, 16)
        ```
    """

    weight: Float[Array, "out_channels in_per_group kh kw"]
    bias: Float[Array, " out_channels"] | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: Any = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    groups: int = eqx.field(static=True)

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
        n = 2
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"nn.Conv2d({in_channels}, {out_channels}, groups={groups}): both channel "
                "counts must be divisible by groups"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple("kernel_size", kernel_size, n)
        self.stride = _tuple("stride", stride, n)
        self.dilation = _tuple("dilation", dilation, n)
        self.padding = _padding(padding, n)
        self.groups = groups
        fan_in = in_channels // groups * math.prod(self.kernel_size)
        wkey, bkey = jax.random.split(key)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = torch_uniform(wkey, shape, fan_in, dtype)
        self.bias = torch_uniform(bkey, (out_channels,), fan_in, dtype) if bias else None

    def __call__(
        self,
        x: Float[Array, "*batch height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width out_channels"]:
        name = f"nn.Conv2d({self.in_channels}, {self.out_channels})"
        expect_rank(name, x, 3, "height, width, in_channels")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{name} expects input of shape (*batch, height, width, {self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        batch = x.shape[:-3]
        y = jax.lax.conv_general_dilated(
            x.reshape((-1, *x.shape[-3:])),
            self.weight,
            window_strides=self.stride,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + trailing(self.bias, y.ndim)
        return y.reshape((*batch, *y.shape[1:]))
