"""Multi-head attention: PyTorch's `nn.MultiheadAttention` and timm's ViT `Attention`.

Both layers run the attention itself through `jax.nn.dot_product_attention` (the fused
kernel, where the backend has one) whenever no attention dropout is active and no
attention weights are requested; otherwise through an explicit
`softmax(Q K^T / sqrt(d)) V` that mirrors it step for step (logits and softmax in
float32 at least, the same large negative number for masked logits), so the two paths
agree to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._module import Module
from ._dropout import Dropout
from ._init import uniform
from ._linear import Linear
from ._shapes import trailing

# -- shared helpers ---------------------------------------------------------------------


def _xavier_uniform(key: PRNGKeyArray, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """PyTorch's `xavier_uniform_` for a `(fan_out, fan_in)` weight."""
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out)) if fan_in + fan_out > 0 else 0.0
    return uniform(key, shape, bound, dtype)


def _check_prng_key(layer: str, key: Any) -> None:
    """`key=` is the PRNG key; catch the torch habit of passing the key *input* there."""
    if key is None:
        return
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and tuple(key.shape) == (2,))
    ):
        return
    raise TypeError(
        f"{layer}: `key=` is the PRNG key (treenn's convention, `layer(x, *, key=None)`), "
        f"got {type(key).__name__} of shape {tuple(getattr(key, 'shape', ()))} and dtype "
        f"{dtype}. Pass the key input of cross-attention positionally, "
        "`attn(query, kv, value)`, or as `kv=`"
    )


def _linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = x @ weight.T
    return y if bias is None else y + trailing(bias, y.ndim)


def _logits_dtype(dtype: Any) -> Any:
    """At least float32 (`jnp.promote_types(dtype, float32)`, which strict dtype
    promotion refuses for half precision)."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _dropping(drop: Dropout) -> bool:
    return not drop.inference and drop.p > 0.0


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None,
    bias: jax.Array | None,
    is_causal: bool,
    drop: Dropout,
    key: PRNGKeyArray | None,
    need_weights: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention over heads.

    `q`: `(B, L, N, D)`, `k`: `(B, S, N, D)`, `v`: `(B, S, N, D)`; `mask`: bool, True =
    may attend, 4-D and broadcastable to `(B, N, L, S)`; `bias`: float, likewise, added
    to the scaled logits. Returns the output `(B, L, N, D)` and, when `need_weights` or
    dropout is active, the attention weights `(B, N, L, S)` (after dropout).

    A query row with no allowed key gets all-zero weights and a zero output (PyTorch's
    `scaled_dot_product_attention` does the same; its softmax path gives NaN).
    """
    length, source = q.shape[1], k.shape[1]
    full = mask
    if full is not None and is_causal:
        causal = jnp.tril(jnp.ones((length, source), dtype=bool)).reshape((1, 1, length, source))
        full = full & causal
    # (B|1, N|1, L, 1): does the row have at least one key to attend to?
    valid = None if full is None else jnp.any(full, axis=-1, keepdims=True)

    if not _dropping(drop) and not need_weights and q.dtype != jnp.float64:
        # (Not in float64: jax.nn.dot_product_attention takes its softmax in float32.)
        # jax.nn.dot_product_attention promotes half precision to float32 internally with
        # `jnp.promote_types`, which strict dtype promotion rejects; allow it there only.
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
        if valid is not None:
            out = jnp.where(jnp.swapaxes(valid, 1, 2), out, jnp.zeros((), out.dtype))
        return out, None

    if full is None and is_causal:
        full = jnp.tril(jnp.ones((length, source), dtype=bool)).reshape((1, 1, length, source))
    logits_dtype = _logits_dtype(q.dtype)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits_dtype)
    if bias is not None:
        logits = logits + bias.astype(logits_dtype)
    if full is not None:
        big = min(float(jnp.finfo(logits_dtype).max), float(jnp.finfo(jnp.float32).max))
        logits = jnp.where(full, logits, jnp.asarray(-0.7 * big, logits_dtype))
    probs = jax.nn.softmax(logits, axis=-1)  # in the logits' dtype: float32 or float64
    if valid is not None:
        probs = jnp.where(valid, probs, jnp.zeros((), probs.dtype))
    probs = drop(probs.astype(v.dtype), key=key)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return out, probs


def _need_key(layer: str, drop: Dropout, what: str, key: PRNGKeyArray | None) -> None:
    if key is None and _dropping(drop):
        raise ValueError(
            f"{layer}: {what} (p={drop.p}) is in training mode and needs `key=`; pass a "
            "PRNG key, or switch it to evaluation mode with nn.eval_mode"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


# -- PyTorch's nn.MultiheadAttention ----------------------------------------------------


class MultiheadAttention(Module):
    """Multi-head attention, as PyTorch's `nn.MultiheadAttention(batch_first=True)`:
    `out_proj(concat_h softmax(q_h k_h^T / sqrt(d) + mask) v_h)`, over any number of
    leading batch axes.

    **Arguments:**

    - `embed_dim`: size `E` of the queries and of the output; split over the heads.
    - `num_heads`: number of heads; must divide `embed_dim`.
    - `dropout`: dropout probability on the attention weights (the `attn_drop` submodule,
        an `nn.Dropout`: switched by `nn.eval_mode` / `nn.train_mode`; training mode at
        construction, as in PyTorch).
    - `bias`: whether the input and output projections have biases.
    - `kdim`, `vdim`: feature sizes of the key and value inputs (default `embed_dim`).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation.

    Parameters follow PyTorch, so its checkpoints map by name: `in_proj_weight`
    `(3 * embed_dim, embed_dim)` when `kdim == vdim == embed_dim`, else `q_proj_weight`
    `(embed_dim, embed_dim)`, `k_proj_weight` `(embed_dim, kdim)` and `v_proj_weight`
    `(embed_dim, vdim)`; `in_proj_bias` `(3 * embed_dim,)`; `out_proj.weight` and
    `out_proj.bias` (an `nn.Linear`). Initialisation is PyTorch's: Xavier-uniform input
    projections, `U(±1/sqrt(embed_dim))` output weight, zero biases. PyTorch's
    `add_bias_kv` and `add_zero_attn` are not supported.

    **Calling:** `attn(query, kv=None, value=None, *, key_padding_mask=None,
    attn_mask=None, is_causal=False, need_weights=False, average_attn_weights=True,
    key=None)`.

    - `query`: `(*batch, L, embed_dim)`.
    - `kv`: the *key input* (PyTorch's `key`), `(*batch, S, kdim)`. `None` means
        self-attention (keys and values are `query`).
    - `value`: `(*batch, S, vdim)`; defaults to `kv`.
    - `key_padding_mask`: bool `(*batch, S)`, `True` = ignore that key (PyTorch's).
    - `attn_mask`: `(L, S)`; bool with `True` = may NOT attend (PyTorch's convention),
        or float, added to the scaled scores (`-inf` entries count as masked).
    - `is_causal`: also apply a causal mask (query `i` sees keys `0..i`). Unlike PyTorch,
        where it is only a hint about `attn_mask`, it needs no `attn_mask`.
    - `need_weights`: also return the attention weights (after dropout, as PyTorch).
    - `average_attn_weights`: average the returned weights over heads, `(*batch, L, S)`;
        `False` gives `(*batch, num_heads, L, S)`.
    - `key`: the PRNG key for attention dropout, keyword-only like every treenn layer,
        so the layer works in `nn.Sequential`. Note the difference from PyTorch: there
        `key=` is the key input; here it is `kv` (a non-PRNG array passed as `key=`
        raises a `TypeError` saying so).

    **Returns:** the output `(*batch, L, embed_dim)`, or `(output, weights)` when
    `need_weights=True`.

    A query that may attend to no key at all (every key masked) gets zero attention
    weights and a zero attention output, so its output is `out_proj.bias`: what PyTorch
    returns with `need_weights=False` (its `need_weights=True` path gives NaN). No NaN
    appears, in values or gradients.

    Without active dropout and without `need_weights`, the attention runs through
    `jax.nn.dot_product_attention` (fused kernels where available); otherwise through
    an explicit softmax that agrees with it to rounding.

    !!! Example

        ```python
        mha = nn.MultiheadAttention(64, 8, dropout=0.1, key=jax.random.key(0))
        y = mha(x, key=key)                     # self-attention, x: (B, L, 64)
        y = mha(x, memory, key_padding_mask=pad, key=key)  # cross-attention
        y, w = nn.eval_mode(mha)(x, is_causal=True, need_weights=True)
        ```
    """

    in_proj_weight: Float[Array, "three_embed_dim embed_dim"] | None
    q_proj_weight: Float[Array, "embed_dim embed_dim"] | None
    k_proj_weight: Float[Array, "embed_dim kdim"] | None
    v_proj_weight: Float[Array, "embed_dim vdim"] | None
    in_proj_bias: Float[Array, " three_embed_dim"] | None
    out_proj: Linear
    attn_drop: Dropout
    embed_dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    kdim: int = eqx.field(static=True)
    vdim: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        name = f"nn.MultiheadAttention({embed_dim}, {num_heads})"
        if embed_dim < 1 or num_heads < 1 or kdim < 1 or vdim < 1:
            raise ValueError(
                f"{name}: embed_dim, num_heads, kdim and vdim must be >= 1, got "
                f"embed_dim={embed_dim}, num_heads={num_heads}, kdim={kdim}, vdim={vdim}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"{name}: embed_dim={embed_dim} must be divisible by num_heads={num_heads}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{name}: dropout={dropout!r} must be in [0, 1]")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.head_dim = embed_dim // num_heads
        kq, kk, kv, ko = jax.random.split(key, 4)
        if kdim == embed_dim and vdim == embed_dim:
            self.in_proj_weight = _xavier_uniform(kq, (3 * embed_dim, embed_dim), dtype)
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = _xavier_uniform(kq, (embed_dim, embed_dim), dtype)
            self.k_proj_weight = _xavier_uniform(kk, (embed_dim, kdim), dtype)
            self.v_proj_weight = _xavier_uniform(kv, (embed_dim, vdim), dtype)
        zeros = jnp.zeros((3 * embed_dim,), jnp.float32 if dtype is None else dtype)
        self.in_proj_bias = zeros if bias else None
        out_proj = Linear(embed_dim, embed_dim, bias=bias, dtype=dtype, key=ko)
        if out_proj.bias is not None:
            out_proj = eqx.tree_at(lambda m: m.bias, out_proj, jnp.zeros_like(out_proj.bias))
        self.out_proj = out_proj
        self.attn_drop = Dropout(dropout)

    @property
    def dropout(self) -> float:
        """The attention-dropout probability (`attn_drop.p`), as PyTorch's attribute."""
        return self.attn_drop.p

    def __call__(
        self,
        query: Float[Array, "*batch L E"],
        kv: Float[Array, "*batch S kdim"] | None = None,
        value: Float[Array, "*batch S vdim"] | None = None,
        *,
        key_padding_mask: Bool[Array, "*batch S"] | None = None,
        attn_mask: Bool[Array, "L S"] | Float[Array, "L S"] | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        key: PRNGKeyArray | None = None,
    ) -> (
        Float[Array, "*batch L E"]
        | tuple[
            Float[Array, "*batch L E"],
            Float[Array, "*batch L S"] | Float[Array, "*batch heads L S"],
        ]
    ):
        name = self._name()
        _check_prng_key(name, key)
        e = self.embed_dim
        if query.ndim < 2 or query.shape[-1] != e:
            raise ValueError(
                f"{name} expects query of shape (*batch, L, embed_dim) = (*batch, L, {e}), "
                f"got shape {_shape(query.shape)}"
            )
        batch, length = tuple(query.shape[:-2]), query.shape[-2]
        # Self-attention (one in-projection product, as PyTorch when query is key is value).
        self_attention = kv is None or (kv is query and (value is None or value is query))
        if kv is None:
            if value is not None:
                raise ValueError(
                    f"{name}: `value` given without the key input `kv`; pass both "
                    "(cross-attention) or neither (self-attention)"
                )
            kv = query
        if value is None:
            value = kv
        if kv.ndim != len(batch) + 2 or kv.shape[:-2] != batch or kv.shape[-1] != self.kdim:
            raise ValueError(
                f"{name} expects the key input of shape (*batch, S, kdim) = "
                f"({', '.join(map(str, batch + ('S', self.kdim)))}) (batch axes as the "
                f"query's), got shape {_shape(kv.shape)}"
            )
        source = kv.shape[-2]
        if value.shape != (*batch, source, self.vdim):
            raise ValueError(
                f"{name} expects value of shape (*batch, S, vdim) = "
                f"{_shape((*batch, source, self.vdim))} (batch and S as the key input's), "
                f"got shape {_shape(value.shape)}"
            )
        self._check_masks(batch, length, source, key_padding_mask, attn_mask)
        _need_key(name, self.attn_drop, "attention dropout (attn_drop)", key)
        return _mha_forward(
            self,
            query,
            kv,
            value,
            key_padding_mask,
            attn_mask,
            key,
            self_attention=self_attention,
            is_causal=is_causal,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
        )

    def _check_masks(
        self,
        batch: tuple[int, ...],
        length: int,
        source: int,
        key_padding_mask: jax.Array | None,
        attn_mask: jax.Array | None,
    ) -> None:
        name = self._name()
        if key_padding_mask is not None:
            if key_padding_mask.dtype != jnp.bool_:
                raise ValueError(
                    f"{name}: key_padding_mask must be boolean (True = ignore that key), got "
                    f"dtype {key_padding_mask.dtype}"
                )
            if key_padding_mask.shape != (*batch, source):
                raise ValueError(
                    f"{name} expects key_padding_mask of shape (*batch, S) = "
                    f"{_shape((*batch, source))}, got shape {_shape(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            if attn_mask.shape != (length, source):
                raise ValueError(
                    f"{name} expects attn_mask of shape (L, S) = ({length}, {source}), got "
                    f"shape {_shape(attn_mask.shape)}"
                )
            if attn_mask.dtype != jnp.bool_ and not jnp.issubdtype(attn_mask.dtype, jnp.floating):
                raise ValueError(
                    f"{name}: attn_mask must be boolean (True = may not attend) or floating "
                    f"(added to the scores), got dtype {attn_mask.dtype}"
                )

    def _name(self) -> str:
        extra = ""
        if self.kdim != self.embed_dim:
            extra += f", kdim={self.kdim}"
        if self.vdim != self.embed_dim:
            extra += f", vdim={self.vdim}"
        return f"nn.MultiheadAttention({self.embed_dim}, {self.num_heads}{extra})"


def _mha_forward(
    layer: MultiheadAttention,
    query: jax.Array,
    kv: jax.Array,
    value: jax.Array,
    key_padding_mask: jax.Array | None,
    attn_mask: jax.Array | None,
    key: PRNGKeyArray | None,
    *,
    self_attention: bool,
    is_causal: bool,
    need_weights: bool,
    average_attn_weights: bool,
) -> Any:
    batch, length, source = tuple(query.shape[:-2]), query.shape[-2], kv.shape[-2]
    attn_key, out_key = (None, None) if key is None else tuple(jax.random.split(key))
    # In-projection: one matrix product for self-attention, as PyTorch.
    if layer.in_proj_weight is not None and self_attention:
        qkv = _linear(query, layer.in_proj_weight, layer.in_proj_bias)
        q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
        if layer.in_proj_weight is not None:
            wq, wk, wv = jnp.split(layer.in_proj_weight, 3, axis=0)
        else:
            assert layer.q_proj_weight is not None and layer.k_proj_weight is not None
            assert layer.v_proj_weight is not None
            wq, wk, wv = layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight
        bq = bk = bv = None
        if layer.in_proj_bias is not None:
            bq, bk, bv = jnp.split(layer.in_proj_bias, 3)
        q, k, v = _linear(query, wq, bq), _linear(kv, wk, bk), _linear(value, wv, bv)
    n, heads, d = math.prod(batch), layer.num_heads, layer.head_dim
    q = q.reshape((n, length, heads, d))
    k = k.reshape((n, source, heads, d))
    v = v.reshape((n, source, heads, d))

    # PyTorch's masks as `mask` (True = may attend) and `bias`, 4-D.
    mask = bias = None
    if key_padding_mask is not None:
        mask = jnp.logical_not(key_padding_mask).reshape((n, 1, 1, source))
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            allowed = jnp.logical_not(attn_mask)
        else:
            # -inf entries count as masked: a fully masked row then gets zero weights.
            allowed = attn_mask != -jnp.inf
            bias = jnp.where(allowed, attn_mask, jnp.zeros((), attn_mask.dtype))
            bias = bias.astype(_logits_dtype(attn_mask.dtype)).reshape((1, 1, length, source))
        allowed = allowed.reshape((1, 1, length, source))
        mask = allowed if mask is None else mask & allowed

    out, probs = _attend(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        drop=layer.attn_drop,
        key=attn_key,
        need_weights=need_weights,
    )
    # out_proj gets a key of its own: a layer there may need one (a LoRA adapter's dropout).
    y = layer.out_proj(out.reshape((*batch, length, layer.embed_dim)), key=out_key)
    if not need_weights:
        return y
    assert probs is not None
    if average_attn_weights:
        weights = jnp.mean(probs, axis=1).reshape((*batch, length, source))
    else:
        weights = probs.reshape((*batch, heads, length, source))
    return y, weights


# -- timm's ViT Attention ---------------------------------------------------------------


class Attention(Module):
    """Self-attention as in timm's Vision Transformer (`timm.models.vision_transformer.
    Attention`), with timm's submodule names, so that a ViT's paths read
    `blocks.0.attn.qkv.weight`, `blocks.0.attn.proj.bias`.

    `qkv` projects `x` to queries, keys and values at once (laid out `(3, heads,
    head_dim)` along the features, as timm), the heads attend with
    `softmax(q k^T / sqrt(head_dim))`, `proj` maps the concatenated heads back.

    **Arguments:**

    - `dim`: feature size `C` of the tokens; split over the heads.
    - `num_heads`: number of heads; must divide `dim`.
    - `qkv_bias`: whether `qkv` has a bias (`proj` always has one, as in timm).
    - `attn_drop`: dropout probability on the attention weights.
    - `proj_drop`: dropout probability on the output.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (PyTorch's `nn.Linear` default; timm's ViT
        re-initialises at the model level).

    Submodules: `qkv` (`nn.Linear(dim, 3 * dim)`), `attn_drop` (`nn.Dropout`), `proj`
    (`nn.Linear(dim, dim)`), `proj_drop` (`nn.Dropout`). Both dropouts are mode-bearing
    and start in training mode; with either active, calls need `key=`.

    **Calling:** `attn(x, *, key=None)` with `x` of shape `(*batch, N, C)`; returns the
    same shape. Without active attention dropout the attention runs through
    `jax.nn.dot_product_attention` (fused kernels where available).

    **Returns:** `attn(x, key=None)` returns an array of `x`'s shape `(*batch, N, C)`.

    !!! Example

        ```python
        attn = nn.Attention(192, num_heads=3, key=jax.random.key(0))
        y = attn(tokens)  # tokens: (B, 197, 192)
        ```
    """

    qkv: Linear
    attn_drop: Dropout
    proj: Linear
    proj_drop: Dropout
    dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        name = f"nn.Attention({dim}, num_heads={num_heads})"
        if dim < 1 or num_heads < 1:
            raise ValueError(
                f"{name}: dim and num_heads must be >= 1, got dim={dim}, num_heads={num_heads}"
            )
        if dim % num_heads != 0:
            raise ValueError(f"{name}: dim={dim} must be divisible by num_heads={num_heads}")
        for label, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: {label}={p!r} must be in [0, 1]")
        k1, k2 = jax.random.split(key)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, key=k1)
        self.attn_drop = Dropout(attn_drop)
        self.proj = Linear(dim, dim, dtype=dtype, key=k2)
        self.proj_drop = Dropout(proj_drop)

    def __call__(
        self, x: Float[Array, "*batch N C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch N C"]:
        name = self._name()
        _check_prng_key(name, key)
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} expects input of shape (*batch, N, C) = (*batch, N, {self.dim}), "
                f"got shape {_shape(x.shape)}"
            )
        _need_key(name, self.attn_drop, "attention dropout (attn_drop)", key)
        _need_key(name, self.proj_drop, "output dropout (proj_drop)", key)
        return _vit_forward(self, x, key)

    def _name(self) -> str:
        return f"nn.Attention({self.dim}, num_heads={self.num_heads})"


def _vit_forward(layer: Attention, x: jax.Array, key: PRNGKeyArray | None) -> jax.Array:
    batch, tokens = tuple(x.shape[:-2]), x.shape[-2]
    n, heads, d = math.prod(batch), layer.num_heads, layer.head_dim
    # Every sublayer gets a key of its own: the projections may need one (a LoRA
    # adapter's dropout).
    keys = (None,) * 4 if key is None else tuple(jax.random.split(key, 4))
    qkv_key, attn_key, proj_key, drop_key = keys
    qkv = layer.qkv(x, key=qkv_key).reshape((n, tokens, 3, heads, d))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out, _ = _attend(
        q,
        k,
        v,
        mask=None,
        bias=None,
        is_causal=False,
        drop=layer.attn_drop,
        key=attn_key,
        need_weights=False,
    )
    y = layer.proj(out.reshape((*batch, tokens, layer.dim)), key=proj_key)
    return layer.proj_drop(y, key=drop_key)
