"""GPT-2 with transformers' parameter names and layouts.

GPT-2's projections are transformers' `Conv1D`: a Linear layer whose weight is stored
transposed, `(in_features, out_features)`. `Conv1D` here keeps that layout, so
`transformer.h.0.attn.c_attn.weight` loads from (and saves to) a checkpoint as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer, PRNGKeyArray, Shaped

from .._module import Module
from ..nn._dropout import Dropout
from ..nn._embedding import Embedding
from ..nn._init import sample
from ..nn._linear import Linear
from ..nn._normalization import LayerNorm
from ..nn._shapes import expect_trailing, trailing
from ._llama import (
    Cache,
    activation,
    attend,
    attend_cached,
    attention_mask_of,
    config_text,
    keys,
    normal_embedding,
    normal_linear,
)


class Conv1D(Module):
    """transformers' `Conv1D`: `y = x @ weight + bias` with `weight` of shape
    `(in_features, out_features)`, the transpose of `nn.Linear`'s (GPT-2's layout).

    **Arguments:**

    - `in_features`, `out_features`: input and output sizes.
    - `std`: standard deviation of the normal initialisation of `weight` (transformers':
        0.02); `bias` starts at zero.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key.

    **Returns:** `layer(x)` returns `x @ weight + bias`, `(*batch, out_features)` for `x`
    of shape `(*batch, in_features)`.

    !!! Example

        ```python
        layer = treenn.models.Conv1D(32, 96, key=jax.random.key(0))
        y = layer(jnp.ones((2, 5, 32)))  # (2, 5, 96); layer.weight is (32, 96)
        ```
    """

    weight: Float[Array, "in_features out_features"]
    bias: Float[Array, " out_features"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        std: float = 0.02,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        dtype = jnp.float32 if dtype is None else dtype
        self.in_features = in_features
        self.out_features = out_features
        self.weight = sample("normal", key, (in_features, out_features), dtype, scale=std)
        self.bias = jnp.zeros((out_features,), dtype)

    def __call__(
        self, x: Float[Array, "*batch in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_features"]:
        name = f"Conv1D({self.in_features}, {self.out_features})"
        expect_trailing(name, x, (self.in_features,), "in_features")
        y = x @ self.weight
        return y + trailing(self.bias, y.ndim)


class GPT2Attention(Module):
    """GPT-2's causal self-attention: fused `c_attn` (query, key, value), `c_proj`."""

    c_attn: Conv1D
    c_proj: Conv1D
    attn_dropout: Dropout
    resid_dropout: Dropout
    num_heads: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], layer: int, *, dtype: Any, key: PRNGKeyArray):
        hidden, heads = _hidden(config), _heads(config)
        std = config.get("initializer_range", 0.02)
        ka, kp = jax.random.split(key)
        self.c_attn = Conv1D(hidden, 3 * hidden, std=std, dtype=dtype, key=ka)
        self.c_proj = Conv1D(hidden, hidden, std=std, dtype=dtype, key=kp)
        self.attn_dropout = Dropout(config.get("attn_pdrop", 0.1))
        self.resid_dropout = Dropout(config.get("resid_pdrop", 0.1))
        self.num_heads = heads
        scale = (hidden // heads) ** -0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        self.scale = scale

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        attention_mask: Shaped[Array, "batch seq"] | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        ka, kd, kp, kr = keys(key, 4)
        batch, length, hidden = x.shape
        shape = (batch, length, self.num_heads, hidden // self.num_heads)
        qkv = self.c_attn(x, key=ka)
        q, k, v = (qkv[..., i * hidden : (i + 1) * hidden].reshape(shape) for i in range(3))
        mask = attention_mask_of(attention_mask, batch, length, None)
        out = attend(q, k, v, mask, self.scale, self.attn_dropout, kd)
        return self.resid_dropout(self.c_proj(out, key=kp), key=kr)

    def cached(
        self, x: jax.Array, cache: Cache, index: Any, valid: jax.Array
    ) -> tuple[jax.Array, Cache]:
        batch, length, hidden = x.shape
        shape = (batch, length, self.num_heads, hidden // self.num_heads)
        qkv = self.c_attn(x)
        q, k, v = (qkv[..., i * hidden : (i + 1) * hidden].reshape(shape) for i in range(3))
        out, cache = attend_cached(
            q, k, v, cache, index, valid, None, self.scale, self.attn_dropout
        )
        return self.resid_dropout(self.c_proj(out)), cache


class GPT2MLP(Module):
    """`dropout(c_proj(act(c_fc(x))))`."""

    c_fc: Conv1D
    c_proj: Conv1D
    dropout: Dropout
    act: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden = _hidden(config)
        inner = config.get("n_inner") or 4 * hidden
        std = config.get("initializer_range", 0.02)
        kf, kp = jax.random.split(key)
        self.c_fc = Conv1D(hidden, inner, std=std, dtype=dtype, key=kf)
        self.c_proj = Conv1D(inner, hidden, std=std, dtype=dtype, key=kp)
        self.dropout = Dropout(config.get("resid_pdrop", 0.1))
        self.act = activation(config.get("activation_function", "gelu_new"), "GPT2MLP")

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch hidden"]:
        kf, kp, kd = keys(key, 3)
        return self.dropout(self.c_proj(self.act(self.c_fc(x, key=kf)), key=kp), key=kd)


class GPT2Block(Module):
    """`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

    ln_1: LayerNorm
    attn: GPT2Attention
    ln_2: LayerNorm
    mlp: GPT2MLP

    def __init__(self, config: dict[str, Any], layer: int, *, dtype: Any, key: PRNGKeyArray):
        if config.get("add_cross_attention", False):
            raise ValueError("GPT2: add_cross_attention=True is not supported")
        eps = config.get("layer_norm_epsilon", 1e-5)
        hidden = _hidden(config)
        ka, km = jax.random.split(key)
        self.ln_1 = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.attn = GPT2Attention(config, layer, dtype=dtype, key=ka)
        self.ln_2 = LayerNorm(hidden, eps=eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype=dtype, key=km)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        attention_mask: Shaped[Array, "batch seq"] | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        ka, km = keys(key, 2)
        x = x + self.attn(self.ln_1(x), attention_mask, key=ka)
        return x + self.mlp(self.ln_2(x), key=km)

    def cached(
        self, x: jax.Array, cache: Cache, index: Any, valid: jax.Array
    ) -> tuple[jax.Array, Cache]:
        attended, cache = self.attn.cached(self.ln_1(x), cache, index, valid)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), cache


def _hidden(config: dict[str, Any]) -> int:
    return int(config.get("n_embd", config.get("hidden_size", 768)))


def _heads(config: dict[str, Any]) -> int:
    return int(config.get("n_head", config.get("num_attention_heads", 12)))


class GPT2Model(Module):
    """GPT-2 without a head, with transformers' names: `wte`, `wpe` (learned positions),
    `drop`, `h.i`, `ln_f`. `GPT2LMHeadModel` holds one as `transformer`.

    **Arguments:**

    - `config`: a transformers GPT-2 config, as a dict (`config.json`'s contents).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (transformers': N(0, initializer_range)).

    **Returns:** `model(input_ids, *, attention_mask=None, position_ids=None, key=None)`
    returns the last hidden states `(batch, seq, n_embd)`. `attention_mask` (1 or True
    for tokens, 0 for padding) hides padded keys, as in transformers; `position_ids`
    default to `0, 1, 2...`. A new model is in training mode (GPT-2 has dropout): pass
    `key`, or switch it with `nn.eval_mode`.

    !!! Example

        ```python
        config = {"architectures": ["GPT2Model"], "model_type": "gpt2", "vocab_size": 99,
                  "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}
        model = nn.eval_mode(treenn.models.from_config(config, key=jax.random.key(0)))
        hidden = model(jnp.ones((2, 5), jnp.int32))  # (2, 5, 32)
        ```
    """

    wte: Embedding
    wpe: Embedding
    drop: Dropout
    h: tuple[GPT2Block, ...]
    ln_f: LayerNorm
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        hidden = _hidden(config)
        std = config.get("initializer_range", 0.02)
        kt, kp, kh = jax.random.split(key, 3)
        self.wte = normal_embedding(config["vocab_size"], hidden, None, std, dtype, kt)
        positions = config.get("n_positions", config.get("max_position_embeddings", 1024))
        self.wpe = normal_embedding(positions, hidden, None, std, dtype, kp)
        self.drop = Dropout(config.get("embd_pdrop", 0.1))
        layers = config.get("n_layer", config.get("num_hidden_layers", 12))
        self.h = tuple(
            GPT2Block(config, i, dtype=dtype, key=k)
            for i, k in enumerate(jax.random.split(kh, layers))
        )
        self.ln_f = LayerNorm(hidden, eps=config.get("layer_norm_epsilon", 1e-5), dtype=dtype)
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        all_keys = keys(key, len(self.h) + 1)
        x = self.wte(input_ids) + self.wpe(position_ids)
        x = self.drop(x, key=all_keys[-1])
        for block, k in zip(self.h, all_keys):
            x = block(x, attention_mask, key=k)
        return self.ln_f(x)

    def cached(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        caches: list[Cache],
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, list[Cache]]:
        """The forward pass for decoding (see `treenn.models.generate`)."""
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        new = []
        for block, cache in zip(self.h, caches):
            x, cache = block.cached(x, cache, index, valid)
            new.append(cache)
        return self.ln_f(x), new

    def empty_cache(self, batch: int, slots: int) -> list[Cache]:
        """Zeroed key/value caches of every block, in the embedding's dtype."""
        hidden = self.wte.embedding_dim
        out = []
        for block in self.h:
            heads = block.attn.num_heads
            shape = (batch, slots, heads, hidden // heads)
            dtype = self.wte.weight.dtype
            out.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        return out

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out


class GPT2LMHeadModel(Module):
    """GPT-2 with its language-model head, with transformers' names: `transformer`
    (`GPT2Model`) and `lm_head`, which GPT-2 ties to `transformer.wte` by default
    (`tie_word_embeddings`): then there is no `lm_head` field and the logits read
    `transformer.wte.weight`, one array.

    **Arguments:**

    - `config`: a transformers GPT-2 config, as a dict (`config.json`'s contents).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation.

    **Returns:** `model(input_ids, *, attention_mask=None, position_ids=None, key=None)`
    returns the logits `(batch, seq, vocab_size)`; the arguments as `GPT2Model`'s.

    !!! Example

        ```python
        model = nn.eval_mode(treenn.load_hf("path/to/gpt2"))
        logits = model(ids, attention_mask=mask)  # (batch, seq, vocab_size)
        ```
    """

    transformer: GPT2Model
    lm_head: Linear | None
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        kt, kh = jax.random.split(key)
        self.transformer = GPT2Model(config, dtype=dtype, key=kt)
        tied = config.get("tie_word_embeddings", True)
        std = config.get("initializer_range", 0.02)
        hidden = _hidden(config)
        self.lm_head = (
            None if tied else normal_linear(hidden, config["vocab_size"], False, std, dtype, kh)
        )
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        kt, kh = keys(key, 2)
        hidden = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, key=kt
        )
        if self.lm_head is None:
            return hidden @ self.transformer.wte.weight.T
        return self.lm_head(hidden, key=kh)

    def cached(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        caches: list[Cache],
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, list[Cache]]:
        hidden, caches = self.transformer.cached(input_ids, position_ids, caches, index, valid)
        if self.lm_head is None:
            return hidden @ self.transformer.wte.weight.T, caches
        return self.lm_head(hidden), caches

    def empty_cache(self, batch: int, slots: int) -> list[Cache]:
        return self.transformer.empty_cache(batch, slots)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out
