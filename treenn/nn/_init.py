"""Parameter initialisers (PyTorch's defaults), and cheap random draws to build them.

Eager `jax.random.uniform(key, shape)` compiles a new program for every new shape, about
half a second each on a CPU: a ResNet would spend most of its construction compiling.
Draws here reuse one compiled sampler per distribution, drawing fixed-size chunks, and
shape the result on the host, so building a model costs a handful of compilations.
Inside a JAX transformation (`jax.eval_shape`, `vmap`, `jit`), where the key is traced,
the same draws are traced instead: the same key gives the same parameters either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .._caches import Cache

_SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "uniform": lambda key, shape: jax.random.uniform(key, shape),
    "normal": lambda key, shape: jax.random.normal(key, shape),
    "truncated_normal": lambda key, shape: jax.random.truncated_normal(key, -2.0, 2.0, shape),
}


_CHUNK = 1 << 16


_COMPILED: dict[str, Callable[[Any, Any], jax.Array]] = Cache()


def _sampler(kind: str) -> Callable[[Any, Any], jax.Array]:
    sampler = _COMPILED.get(kind)
    if sampler is None:
        draw = _SAMPLERS[kind]
        sampler = jax.jit(lambda key, i: draw(jax.random.fold_in(key, i), (_CHUNK,)))
        _COMPILED[kind] = sampler
    return sampler


def sample(
    kind: str,
    key: Any,
    shape: tuple[int, ...],
    dtype: Any = None,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
) -> jax.Array:
    """`scale * s + shift` for standard `kind` samples `s` ("uniform" on [0, 1),
    "normal", "truncated_normal" on [-2, 2]) of `shape`, as `dtype` (default float32)."""
    dtype = jnp.float32 if dtype is None else dtype
    size = math.prod(shape)
    count = max(1, -(-size // _CHUNK))
    if isinstance(key, Tracer):
        # The same draws as below (same values for the same key), traced.
        draw = _SAMPLERS[kind]
        parts = [draw(jax.random.fold_in(key, i), (_CHUNK,)) for i in range(count)]
        traced = jnp.concatenate(parts)[:size].reshape(shape)
        return (traced * scale + shift).astype(dtype)
    sampler = _sampler(kind)
    chunks = [np.asarray(sampler(key, i)) for i in range(count)]
    flat = chunks[0] if count == 1 else np.concatenate(chunks)
    return jnp.asarray(flat[:size].reshape(shape) * np.float32(scale) + np.float32(shift), dtype)


def uniform(key: Any, shape: tuple[int, ...], bound: float, dtype: Any = None) -> jax.Array:
    """U(-bound, bound)."""
    return sample("uniform", key, shape, dtype, scale=2 * bound, shift=-bound)


def torch_uniform(key: Any, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear and Conv weights
    (kaiming_uniform with a=sqrt(5)) and biases."""
    return uniform(key, shape, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0, dtype)
