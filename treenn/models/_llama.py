"""The Llama family (Llama, Mistral, Qwen2) with transformers' parameter names.

One implementation, three configurations: Mistral is Llama with a sliding attention
window, Qwen2 is Llama with biases on the query, key and value projections (and a
sliding window on the layers its config names). Paths are transformers' state-dict keys
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so a checkpoint loads array
for array and PEFT-style selectors (`"**.q_proj"`) pick the same layers.

The attention is written out (`softmax(q k^T * scale + mask) v`, logits and softmax in
float32) rather than through `jax.nn.dot_product_attention`: transformers' default
(PyTorch's `scaled_dot_product_attention`) gives a query whose every key is masked (the
padded positions of a left-padded batch) an output of zero, which the explicit form can
match, and it takes grouped-query heads without repeating the keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer, PRNGKeyArray, Shaped

from .._module import Module
from .._tree import replace_fields
from ..nn._dropout import Dropout
from ..nn._embedding import Embedding
from ..nn._init import sample
from ..nn._linear import Linear
from ..nn._normalization import RMSNorm

# transformers' ACT2FN names for the activations these models use.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "tanh": jnp.tanh,
}


def activation(name: str, arch: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{arch}: activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def keys(key: PRNGKeyArray | None, n: int) -> list[Any]:
    """`n` keys split from `key`, or `n` Nones without one (evaluation mode)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def normal_linear(
    in_features: int, out_features: int, bias: bool, std: float, dtype: Any, key: PRNGKeyArray
) -> Linear:
    """An `nn.Linear` initialised as transformers does: N(0, std) weight, zero bias."""
    linear = Linear(in_features, out_features, bias=bias, dtype=dtype, key=key)
    weight = sample("normal", key, (out_features, in_features), dtype, scale=std)
    zero = None if linear.bias is None else jnp.zeros_like(linear.bias)
    out: Linear = replace_fields(linear, weight=weight, bias=zero)
    return out


def normal_embedding(
    num: int, dim: int, padding_idx: int | None, std: float, dtype: Any, key: PRNGKeyArray
) -> Embedding:
    if padding_idx is not None and not 0 <= padding_idx < num:
        padding_idx = None  # a pad id outside the vocabulary (GPT-2's 50256 in a tiny model)
    embedding = Embedding(num, dim, padding_idx=padding_idx, dtype=dtype, key=key)
    weight = sample("normal", key, (num, dim), dtype, scale=std)
    if padding_idx is not None:
        weight = weight.at[padding_idx].set(0)
    out: Embedding = replace_fields(embedding, weight=weight)
    return out


def config_text(config: dict[str, Any]) -> str:
    """The config as canonical JSON: a hashable static field (jit keys on it)."""
    return json.dumps(config, sort_keys=True)


def attention_mask_of(
    attention_mask: Shaped[Array, "batch seq"] | None,
    batch: int,
    length: int,
    window: int | None,
) -> Bool[Array, "batch 1 1 seq seq"]:
    """transformers' causal mask: query `i` sees key `j <= i` (and `i - j < window` with a
    sliding window) whose `attention_mask` is set. Shaped for `(batch, kv_heads,
    groups, query, key)` logits."""
    index = jnp.arange(length)
    allowed = index[:, None] >= index[None, :]
    if window is not None:
        allowed = allowed & (index[:, None] - index[None, :] < window)
    mask = jnp.broadcast_to(allowed[None], (batch, length, length))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    return mask[:, None, None]


def attend(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch kv_seq kv_heads head_dim"],
    v: Float[Array, "batch kv_seq kv_heads head_dim"],
    mask: Bool[Array, "batch 1 1 seq kv_seq"],
    scale: float,
    dropout: Dropout,
    key: PRNGKeyArray | None,
) -> Float[Array, "batch seq heads*head_dim"]:
    """Grouped-query attention: query head `h` reads key/value head `h // groups`, as
    transformers' `repeat_kv`. Logits and softmax in float32; a query with no visible
    key gets zeros (as PyTorch's `scaled_dot_product_attention`)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", grouped.astype(jnp.float32), k.astype(jnp.float32)
    ) * jnp.float32(scale)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, jnp.zeros_like(probs))
    probs = dropout(probs, key=key)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
    return out.reshape(batch, length, heads * head_dim)


Cache = tuple[
    jax.Array, jax.Array
]  # one layer's keys and values, (batch, slots, kv_heads, head_dim)


def attend_cached(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: Cache,
    index: Any,
    valid: Bool[Array, "batch slots"],
    window: int | None,
    scale: float,
    dropout: Dropout,
) -> tuple[jax.Array, Cache]:
    """`attend` for decoding: the new keys and values written into the cache at slot
    `index` onwards, the queries (at those slots) reading every cached slot up to their
    own whose `valid` is set (and within the window)."""
    keys_, values = cache
    start = (0, index, 0, 0)
    keys_ = jax.lax.dynamic_update_slice(keys_, k.astype(keys_.dtype), start)
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
    slots = jnp.arange(keys_.shape[1])
    query_slots = index + jnp.arange(q.shape[1])
    allowed = slots[None, :] <= query_slots[:, None]
    if window is not None:
        allowed = allowed & (query_slots[:, None] - slots[None, :] < window)
    mask = allowed[None] & valid[:, None, :]
    out = attend(q, keys_, values, mask[:, None, None], scale, dropout, None)
    return out, (keys_, values)


# -- rotary embeddings ------------------------------------------------------------------------


_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: dict[str, Any], arch: str) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    if params is None:
        scaling = dict(config.get("rope_scaling") or {})
        params = {**scaling, "rope_theta": config.get("rope_theta", 10000.0)}
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    params = dict(params)
    kind = params.get("rope_type", "default")
    if kind not in _ROPE_TYPES:
        raise ValueError(
            f"{arch}: rope type {kind!r} is not supported; supported: {list(_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{arch}: partial_rotary_factor is not supported")
    return params


def inverse_frequencies(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """The rotary inverse frequencies, computed in float32 step for step as
    transformers' `ROPE_INIT_FUNCTIONS`."""
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    inv = f32(1.0) / np.power(f32(params["rope_theta"]), exponent, dtype=f32)
    kind = params.get("rope_type", "default")
    if kind == "linear":
        inv = inv / f32(params["factor"])
    elif kind == "llama3":
        factor = f32(params["factor"])
        low, high = f32(params["low_freq_factor"]), f32(params["high_freq_factor"])
        old = f32(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return np.asarray(inv, f32)


class RotaryEmbedding(Module):
    """Rotary position embeddings (no arrays: the frequencies are configuration)."""

    inv_freq: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, params: dict[str, Any], head_dim: int):
        self.inv_freq = tuple(float(f) for f in inverse_frequencies(params, head_dim))

    def __call__(
        self,
        q: Float[Array, "batch seq heads head_dim"],
        k: Float[Array, "batch seq kv_heads head_dim"],
        position_ids: Integer[Array, "#batch seq"],
    ) -> tuple[
        Float[Array, "batch seq heads head_dim"], Float[Array, "batch seq kv_heads head_dim"]
    ]:
        inv = jnp.asarray(np.asarray(self.inv_freq, np.float32))
        freqs = position_ids.astype(jnp.float32)[..., None] * inv[None, None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(emb).astype(q.dtype), jnp.sin(emb).astype(q.dtype)

        def rotate(x: jax.Array) -> jax.Array:
            half = x.shape[-1] // 2
            rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
            return x * cos + rotated * sin

        return rotate(q), rotate(k)


# -- the layers ---------------------------------------------------------------------------


class LlamaAttention(Module):
    """Grouped-query self-attention with rotary embeddings: `q_proj`, `k_proj`, `v_proj`,
    `o_proj` (`nn.Linear`), as transformers' `LlamaAttention`."""

    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    attention_dropout: Dropout
    num_heads: int = eqx.field(static=True)
    num_key_value_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], layer: int, *, dtype: Any, key: PRNGKeyArray):
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        std = config.get("initializer_range", 0.02)
        # Qwen2 has biases on q, k, v and none on o; Llama's `attention_bias` is all four.
        qkv_bias = config.get("attention_bias", False) or config.get("model_type") == "qwen2"
        o_bias = config.get("attention_bias", False)
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q_proj = normal_linear(hidden, heads * head_dim, qkv_bias, std, dtype, kq)
        self.k_proj = normal_linear(hidden, kv_heads * head_dim, qkv_bias, std, dtype, kk)
        self.v_proj = normal_linear(hidden, kv_heads * head_dim, qkv_bias, std, dtype, kv)
        self.o_proj = normal_linear(heads * head_dim, hidden, o_bias, std, dtype, ko)
        self.attention_dropout = Dropout(config.get("attention_dropout", 0.0))
        self.num_heads = heads
        self.num_key_value_heads = kv_heads
        self.head_dim = head_dim
        self.sliding_window = _window(config, layer)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        rotary: RotaryEmbedding,
        position_ids: Integer[Array, "#batch seq"],
        attention_mask: Shaped[Array, "batch seq"] | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        kq, kk, kv, kd, ko = keys(key, 5)
        batch, length, _ = x.shape
        q = self.q_proj(x, key=kq).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x, key=kk).reshape(batch, length, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(x, key=kv).reshape(batch, length, self.num_key_value_heads, self.head_dim)
        q, k = rotary(q, k, position_ids)
        mask = attention_mask_of(attention_mask, batch, length, self.sliding_window)
        out = attend(q, k, v, mask, self.head_dim**-0.5, self.attention_dropout, kd)
        return self.o_proj(out, key=ko)

    def cached(
        self,
        x: jax.Array,
        rotary: RotaryEmbedding,
        position_ids: jax.Array,
        cache: Cache,
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, Cache]:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, self.num_key_value_heads, self.head_dim)
        q, k = rotary(q, k, position_ids)
        scale = self.head_dim**-0.5
        out, cache = attend_cached(
            q, k, v, cache, index, valid, self.sliding_window, scale, self.attention_dropout
        )
        return self.o_proj(out), cache


def _window(config: dict[str, Any], layer: int) -> int | None:
    """The sliding window of layer `layer`, or None (full attention), as transformers."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if config.get("model_type") == "mistral":
        return int(window)
    types = config.get("layer_types")
    if types is not None:
        return int(window) if types[layer] == "sliding_attention" else None
    if config.get("model_type") == "qwen2":
        used = config.get("use_sliding_window", False)
        return int(window) if used and layer >= config.get("max_window_layers", 28) else None
    return None


class LlamaMLP(Module):
    """SwiGLU: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    act: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden, inner = config["hidden_size"], config["intermediate_size"]
        bias = config.get("mlp_bias", False)
        std = config.get("initializer_range", 0.02)
        kg, ku, kd = jax.random.split(key, 3)
        self.gate_proj = normal_linear(hidden, inner, bias, std, dtype, kg)
        self.up_proj = normal_linear(hidden, inner, bias, std, dtype, ku)
        self.down_proj = normal_linear(inner, hidden, bias, std, dtype, kd)
        self.act = activation(config.get("hidden_act", "silu"), "LlamaMLP")

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch hidden"]:
        kg, ku, kd = keys(key, 3)
        return self.down_proj(self.act(self.gate_proj(x, key=kg)) * self.up_proj(x, key=ku), key=kd)


class LlamaDecoderLayer(Module):
    """A pre-norm block: `x + self_attn(input_layernorm(x))`, then
    `x + mlp(post_attention_layernorm(x))`."""

    self_attn: LlamaAttention
    mlp: LlamaMLP
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def __init__(self, config: dict[str, Any], layer: int, *, dtype: Any, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, layer, dtype=dtype, key=ka)
        self.mlp = LlamaMLP(config, dtype=dtype, key=km)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps=eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps=eps, dtype=dtype)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        rotary: RotaryEmbedding,
        position_ids: Integer[Array, "#batch seq"],
        attention_mask: Shaped[Array, "batch seq"] | None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        ka, km = keys(key, 2)
        x = x + self.self_attn(
            self.input_layernorm(x), rotary, position_ids, attention_mask, key=ka
        )
        return x + self.mlp(self.post_attention_layernorm(x), key=km)

    def cached(
        self,
        x: jax.Array,
        rotary: RotaryEmbedding,
        position_ids: jax.Array,
        cache: Cache,
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, Cache]:
        attended, cache = self.self_attn.cached(
            self.input_layernorm(x), rotary, position_ids, cache, index, valid
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _positions(
    input_ids: Integer[Array, "batch seq"], position_ids: Integer[Array, "#batch seq"] | None
) -> Integer[Array, "#batch seq"]:
    # As transformers' forward (not its `generate`): 0, 1, 2... whatever the padding.
    if position_ids is None:
        return jnp.arange(input_ids.shape[1])[None, :]
    return position_ids


class LlamaModel(Module):
    """The Llama-family decoder without a head, with transformers' names: `embed_tokens`,
    `layers.i`, `norm`. Built by `treenn.models.from_config` from a `LlamaModel`
    config; `LlamaForCausalLM` and its Mistral and Qwen2 variants hold one as `model`.

    **Arguments:**

    - `config`: a transformers config, as a dict (`config.json`'s contents).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (transformers': N(0, initializer_range)
        weights, zero biases, unit norms).

    **Returns:** `model(input_ids, *, attention_mask=None, position_ids=None, key=None)`
    returns the last hidden states `(batch, seq, hidden_size)` for integer `input_ids`
    `(batch, seq)`. `attention_mask` (`(batch, seq)`, 1 or True for tokens, 0 for
    padding) hides padded keys, left or right padding, as in transformers; `position_ids`
    default to `0, 1, 2...` as in transformers' forward (pass them for left-padded
    batches whose positions should start at each sequence's first token).

    !!! Example

        ```python
        config = {"architectures": ["LlamaModel"], "model_type": "llama", "vocab_size": 99,
                  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2}
        model = treenn.models.from_config(config, key=jax.random.key(0))
        hidden = model(jnp.ones((2, 5), jnp.int32))  # (2, 5, 32)
        ```
    """

    embed_tokens: Embedding
    layers: tuple[LlamaDecoderLayer, ...]
    norm: RMSNorm
    rotary_emb: RotaryEmbedding
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        arch = (config.get("architectures") or ["LlamaModel"])[0]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        ke, kl = jax.random.split(key)
        std = config.get("initializer_range", 0.02)
        self.embed_tokens = normal_embedding(
            config["vocab_size"], hidden, config.get("pad_token_id"), std, dtype, ke
        )
        layer_keys = jax.random.split(kl, config["num_hidden_layers"])
        self.layers = tuple(
            LlamaDecoderLayer(config, i, dtype=dtype, key=k) for i, k in enumerate(layer_keys)
        )
        self.norm = RMSNorm(hidden, eps=config.get("rms_norm_eps", 1e-6), dtype=dtype)
        self.rotary_emb = RotaryEmbedding(rope_parameters(config, arch), head_dim)
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        positions = _positions(input_ids, position_ids)
        x = self.embed_tokens(input_ids)
        for layer, k in zip(self.layers, keys(key, len(self.layers))):
            x = layer(x, self.rotary_emb, positions, attention_mask, key=k)
        return self.norm(x)

    def cached(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        caches: list[Cache],
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, list[Cache]]:
        """The forward pass for decoding: `input_ids` at cache slots `index`..., with
        every layer's key/value cache read and updated (see `treenn.models.generate`)."""
        x = self.embed_tokens(input_ids)
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.cached(x, self.rotary_emb, position_ids, cache, index, valid)
            new.append(cache)
        return self.norm(x), new

    def empty_cache(self, batch: int, slots: int) -> list[Cache]:
        """Zeroed key/value caches of every layer, in the embedding's dtype."""
        out = []
        for layer in self.layers:
            attn = layer.self_attn
            shape = (batch, slots, attn.num_key_value_heads, attn.head_dim)
            dtype = self.embed_tokens.weight.dtype
            out.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        return out

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out


class LlamaForCausalLM(Module):
    """A Llama-family causal language model with transformers' names: `model`
    (`LlamaModel`) and `lm_head` (`nn.Linear` without bias), or no `lm_head` when the
    config ties it to the input embedding (`tie_word_embeddings`): the logits then read
    `model.embed_tokens.weight`, one array. Built by `treenn.models.from_config` for the
    architectures `LlamaForCausalLM`, `MistralForCausalLM` (a sliding window where the
    config sets `sliding_window`) and `Qwen2ForCausalLM` (query, key and value biases).

    **Arguments:**

    - `config`: a transformers config, as a dict (`config.json`'s contents).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation.

    **Returns:** `model(input_ids, *, attention_mask=None, position_ids=None, key=None)`
    returns the logits `(batch, seq, vocab_size)`; the arguments as `LlamaModel`'s.

    !!! Example

        ```python
        model = treenn.load_hf("path/to/llama")          # a save_pretrained directory
        logits = model(ids, attention_mask=mask)          # (batch, seq, vocab_size)
        model = treenn.lora(model, "**.q_proj", rank=8, key=jax.random.key(0))
        ```
    """

    model: LlamaModel
    lm_head: Linear | None
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        km, kh = jax.random.split(key)
        self.model = LlamaModel(config, dtype=dtype, key=km)
        tied = config.get("tie_word_embeddings", False)
        std = config.get("initializer_range", 0.02)
        self.lm_head = (
            None
            if tied
            else normal_linear(config["hidden_size"], config["vocab_size"], False, std, dtype, kh)
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
        km, kh = keys(key, 2)
        hidden = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, key=km
        )
        if self.lm_head is None:
            return hidden @ self.model.embed_tokens.weight.T
        return self.lm_head(hidden, key=kh)

    def cached(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        caches: list[Cache],
        index: Any,
        valid: jax.Array,
    ) -> tuple[jax.Array, list[Cache]]:
        hidden, caches = self.model.cached(input_ids, position_ids, caches, index, valid)
        if self.lm_head is None:
            return hidden @ self.model.embed_tokens.weight.T, caches
        return self.lm_head(hidden), caches

    def empty_cache(self, batch: int, slots: int) -> list[Cache]:
        return self.model.empty_cache(batch, slots)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out
