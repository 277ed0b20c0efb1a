"""Embedding: a lookup table of vectors indexed by integer ids."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer, PRNGKeyArray

from .._module import Module
from ._init import sample


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `embedding_dim`, looked up by id, as
    PyTorch's `Embedding`.

    **Arguments:**

    - `num_embeddings`: number of rows (the vocabulary size).
    - `embedding_dim`: size of each vector.
    - `padding_idx`: optional id of a padding row. As in PyTorch, that row starts at
        zero and receives no gradient: looking it up gives its current value with the
        gradient stopped. A negative value counts from the end (`-1` is the last row).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (PyTorch's: N(0, 1)).

    The parameter follows PyTorch: `weight` of shape `(num_embeddings, embedding_dim)`.

    The input must be an integer array of ids (signed or unsigned), of any shape; the
    output has that shape followed by `embedding_dim`. Non-integer input (floats,
    booleans) is a `TypeError`.
    Ids are not range-checked (that would need a host round trip under `jit`): as JAX's
    gathers do, out-of-range ids are clamped, so an id below 0 reads row 0 and an id of
    `num_embeddings` or more reads the last row. (PyTorch raises an `IndexError`; check
    your ids if they may be out of range. Negative ids do not count from the end.)

    **Returns:** `embedding(ids)` returns the rows `weight[ids]`, of shape `(*batch,
    embedding_dim)` for integer `ids` of shape `(*batch,)`.

    !!! Example

        ```python
        embed = nn.Embedding(1000, 64, padding_idx=0, key=jax.random.key(0))
        vectors = embed(jnp.array([[5, 7, 0], [1, 0, 0]]))  # (2, 3, 64)
        ```
    """

    weight: Float[Array, "num_embeddings embedding_dim"]
    num_embeddings: int = eqx.field(static=True)
    embedding_dim: int = eqx.field(static=True)
    padding_idx: int | None = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None = None,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        name = f"nn.Embedding({num_embeddings}, {embedding_dim})"
        if num_embeddings < 1:
            raise ValueError(f"{name}: num_embeddings={num_embeddings} must be >= 1")
        if embedding_dim < 0:
            raise ValueError(f"{name}: embedding_dim={embedding_dim} must be >= 0")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"{name}: padding_idx={padding_idx} must be within "
                    f"[-{num_embeddings}, {num_embeddings})"
                )
            padding_idx = padding_idx % num_embeddings
        dtype = jnp.float32 if dtype is None else dtype
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        weight = sample("normal", key, (num_embeddings, embedding_dim), dtype)
        if padding_idx is not None:
            weight = weight.at[padding_idx].set(0)
        self.weight = weight

    def __call__(
        self, ids: Integer[Array, "*batch"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch embedding_dim"]:
        dtype = jnp.dtype(ids.dtype)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"nn.Embedding({self.num_embeddings}, {self.embedding_dim}) expects an "
                f"integer array of ids, got dtype {dtype}"
            )
        ids = jnp.clip(ids, 0, min(self.num_embeddings - 1, int(jnp.iinfo(dtype).max)))
        out = jnp.take(self.weight, ids, axis=0, mode="clip")
        if self.padding_idx is not None:
            padding = (ids == self.padding_idx)[..., None]
            out = jnp.where(padding, jax.lax.stop_gradient(out), out)
        return out
