"""Parameter initialisers (PyTorch's defaults)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def torch_uniform(key: Any, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear and Conv weights
    (kaiming_uniform with a=sqrt(5)) and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    dtype = jnp.float32 if dtype is None else dtype
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
