"""`treenn.models.generate`: decoding with a key/value cache for the causal LMs."""

from __future__ import annotations

import json
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Integer, PRNGKeyArray, Shaped

from .._modes import eval_mode
from ._gpt2 import GPT2LMHeadModel
from ._llama import LlamaForCausalLM

_CAUSAL_LMS = (GPT2LMHeadModel, LlamaForCausalLM)


def _bucket(length: int) -> int:
    """Prompt lengths rounded up to a power of two (at least 8): one compilation serves
    every prompt length of a bucket (the extra left padding is masked, and positions
    count from each sequence's first token, so the tokens do not change)."""
    return max(8, 1 << (length - 1).bit_length())


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"generate: {name}={value!r} must be a token id or a list of them")
    return tuple(int(v) for v in values)


def _choose(
    logits: jax.Array,
    temperature: jax.Array | None,
    top_k: int | None,
    top_p: jax.Array | None,
    key: Any,
) -> jax.Array:
    """The next token from the last position's logits: argmax (no `temperature`), or a
    sample after transformers' processors in their order (temperature, top-k, top-p).
    The temperature and top-p are traced: changing them does not recompile."""
    logits = logits.astype(jnp.float32)
    if temperature is None:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    lowest = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, lowest, logits)
    if top_p is not None:
        # As transformers' TopPLogitsWarper: drop the smallest tokens whose cumulative
        # probability stays within 1 - top_p, always keeping the most likely one.
        order = jnp.argsort(logits, axis=-1)
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop = cumulative <= 1.0 - top_p
        drop = drop.at[:, -1].set(False)
        removed = jnp.zeros_like(drop).at[jnp.arange(drop.shape[0])[:, None], order].set(drop)
        logits = jnp.where(removed, lowest, logits)
    return jax.random.categorical(key, logits, axis=-1)


@eqx.filter_jit
def _decode(
    model: Any,
    ids: jax.Array,
    mask: jax.Array,
    max_new_tokens: int,
    temperature: jax.Array | None,
    top_k: int | None,
    top_p: jax.Array | None,
    eos: tuple[int, ...],
    pad: int,
    key: Any,
) -> tuple[jax.Array, jax.Array]:
    """Prefill the cache with the prompt, then decode `max_new_tokens` tokens in one
    `lax.fori_loop`. Returns the new tokens and, per step, whether every sequence had
    finished after it."""
    batch, length = ids.shape
    slots = length + max_new_tokens
    valid = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), bool)], axis=1)
    # transformers' generate: positions count the prompt's tokens (padding gets 1).
    positions = jnp.where(mask, jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 1)
    logits, caches = model.cached(ids, positions, model.empty_cache(batch, slots), 0, valid)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    keys = jax.random.split(key, max_new_tokens) if key is not None else None

    def step(i: Any, carry: Any) -> Any:
        last, caches, unfinished, position, out, done = carry
        k = None if keys is None else keys[i]
        token = _choose(last, temperature, top_k, top_p, k).astype(jnp.int32)
        token = jnp.where(unfinished, token, jnp.int32(pad))
        out = out.at[:, i].set(token)
        unfinished = unfinished & ~jnp.any(token[:, None] == eos_ids[None, :], axis=1)
        done = done.at[i].set(~jnp.any(unfinished))
        position = position + 1
        logits, caches = model.cached(token[:, None], position[:, None], caches, length + i, valid)
        return logits[:, -1], caches, unfinished, position, out, done

    carry = (
        logits[:, -1],
        caches,
        jnp.ones((batch,), bool),
        positions[:, -1],
        jnp.zeros((batch, max_new_tokens), jnp.int32),
        jnp.zeros((max_new_tokens,), bool),
    )
    carry = jax.lax.fori_loop(0, max_new_tokens, step, carry)
    return carry[4], carry[5]


def generate(
    model: Any,
    input_ids: Integer[Array, "batch prompt"],
    *,
    max_new_tokens: int,
    attention_mask: Shaped[Array, "batch prompt"] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    key: PRNGKeyArray | None = None,
) -> Integer[Array, "batch total"]:
    """Generate tokens with a causal language model of `treenn.models`
    (`GPT2LMHeadModel`, `LlamaForCausalLM` and its Mistral and Qwen2 configurations),
    with a key/value cache: the prompt is run once, then each new token costs one
    single-token forward pass.

    **Arguments:**

    - `model`: the model (its dropouts are switched off for decoding; LoRA adapters
        are used as they are).
    - `input_ids`: the prompts, `(batch, prompt)`, left-padded for a batch of
        different lengths.
    - `max_new_tokens`: how many tokens to generate at most.
    - `attention_mask`: `(batch, prompt)`, 1 for tokens, 0 for padding; positions
        count from each prompt's first token, as transformers' `generate`.
    - `temperature`: `0.0` (the default) is greedy decoding, equal token for token to
        transformers' `generate(do_sample=False)`; above 0 samples from `softmax(logits /
        temperature)`, filtered by `top_k` and `top_p` as transformers' processors, and
        needs `key`.
    - `top_k`: sample among the `top_k` most likely tokens only.
    - `top_p`: sample among the most likely tokens whose probabilities add up to
        `top_p` (nucleus sampling).
    - `eos_token_id`: a token id (or a list) that ends a sequence; default: the model
        config's `eos_token_id`, as transformers. A finished sequence is padded with the
        config's `pad_token_id` (or the first end token), and generation stops once every
        sequence has finished.
    - `key`: PRNG key for sampling.

    The decoding loop is compiled once per batch size, prompt-length bucket (a power
    of two: prompts are left-padded up to it, which changes no token) and
    `max_new_tokens`, and reused.

    **Returns:** the prompts followed by the new tokens, `(batch, prompt + n)` with `n <=
    max_new_tokens` (fewer when every sequence ended early).

    !!! Example

        ```python
        model = treenn.load_hf("runs/llama")
        tokens = treenn.models.generate(model, ids, attention_mask=mask, max_new_tokens=20)
        sampled = treenn.models.generate(
            model, ids, max_new_tokens=20, temperature=0.8, top_p=0.9,
            key=jax.random.key(0),
        )
        ```
    """
    if not isinstance(model, _CAUSAL_LMS):
        raise TypeError(
            "generate: expected a causal language model of treenn.models (GPT2LMHeadModel, "
            f"LlamaForCausalLM), got a {type(model).__name__}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if temperature < 0.0:
        raise ValueError(f"generate: temperature={temperature!r} must be >= 0")
    if temperature > 0.0 and key is None:
        raise ValueError(f"generate: sampling (temperature={temperature}) needs `key=`")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k!r} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p!r} must be in (0, 1]")
    config = json.loads(model.hf_config)
    eos = _token_ids(config.get("eos_token_id") if eos_token_id is None else eos_token_id, "eos")
    pad_ids = _token_ids(config.get("pad_token_id"), "pad_token_id") or eos or (0,)
    batch, length = input_ids.shape
    mask = (
        jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    )
    sampling = temperature > 0.0
    bucket = _bucket(length)
    ids = jnp.pad(input_ids.astype(jnp.int32), ((0, 0), (bucket - length, 0)))
    mask = jnp.pad(mask, ((0, 0), (bucket - length, 0)))
    new, done = _decode(
        eval_mode(model),
        ids,
        mask,
        max_new_tokens,
        jnp.float32(temperature) if sampling else None,
        top_k if sampling else None,
        jnp.float32(top_p) if sampling and top_p is not None else None,
        eos,
        pad_ids[0],
        key if sampling else None,
    )
    finished = np.asarray(done)
    count = int(np.argmax(finished)) + 1 if finished.any() else max_new_tokens
    return jnp.concatenate([input_ids, new[:, :count].astype(input_ids.dtype)], axis=1)
