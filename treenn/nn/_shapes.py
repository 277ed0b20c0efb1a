"""Shape checks and broadcasting helpers shared by the layers."""

from __future__ import annotations

from typing import Any

import jax


def expect_trailing(layer: str, x: Any, trailing: tuple[int, ...], names: str) -> None:
    """Raise a clear error unless `x.shape` ends with `trailing`."""
    if x.ndim < len(trailing) or tuple(x.shape[x.ndim - len(trailing) :]) != trailing:
        raise ValueError(
            f"{layer} expects input of shape (*batch, {names}) = (*batch, "
            f"{', '.join(map(str, trailing))}), got shape {tuple(x.shape)}"
        )


def expect_rank(layer: str, x: Any, rank: int, names: str) -> None:
    if x.ndim < rank:
        raise ValueError(
            f"{layer} expects input of shape (*batch, {names}) with at least {rank} axes, "
            f"got shape {tuple(x.shape)}"
        )


def trailing(v: jax.Array, ndim: int) -> jax.Array:
    """`v` reshaped to broadcast against the last axes of an `ndim`-axis array, explicitly
    (the test suite runs with `jax_numpy_rank_promotion="raise"`)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)
