"""BERT with transformers' parameter names: the encoder, its pooler, and the
sequence-classification and masked-LM heads."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Integer, PRNGKeyArray, Shaped

from .._module import Module
from ..nn._dropout import Dropout
from ..nn._embedding import Embedding
from ..nn._linear import Linear
from ..nn._normalization import LayerNorm
from ..nn._shapes import trailing
from ._llama import activation, attend, config_text, keys, normal_embedding, normal_linear


def _std(config: dict[str, Any]) -> float:
    return float(config.get("initializer_range", 0.02))


def _norm(config: dict[str, Any], dtype: Any) -> LayerNorm:
    return LayerNorm(config["hidden_size"], eps=config.get("layer_norm_eps", 1e-12), dtype=dtype)


def _padding_mask(
    attention_mask: Shaped[Array, "batch seq"] | None, batch: int, length: int
) -> Bool[Array, "batch 1 1 seq seq"]:
    """Every query sees every key its `attention_mask` keeps (no causal mask)."""
    valid = (
        jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    )
    return jnp.broadcast_to(valid[:, None, :], (batch, length, length))[:, None, None]


class BertEmbeddings(Module):
    """Word, position and token-type embeddings, summed, then `LayerNorm` and dropout."""

    word_embeddings: Embedding
    position_embeddings: Embedding
    token_type_embeddings: Embedding
    LayerNorm: LayerNorm  # noqa: N815 (transformers' name, part of the paths)
    dropout: Dropout

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden, std = config["hidden_size"], _std(config)
        kw, kp, kt = jax.random.split(key, 3)
        pad = config.get("pad_token_id")
        self.word_embeddings = normal_embedding(config["vocab_size"], hidden, pad, std, dtype, kw)
        positions = config.get("max_position_embeddings", 512)
        self.position_embeddings = normal_embedding(positions, hidden, None, std, dtype, kp)
        types = config.get("type_vocab_size", 2)
        self.token_type_embeddings = normal_embedding(types, hidden, None, std, dtype, kt)
        self.LayerNorm = _norm(config, dtype)
        self.dropout = Dropout(config.get("hidden_dropout_prob", 0.1))

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        token_type_ids: Integer[Array, "batch seq"],
        position_ids: Integer[Array, "#batch seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x), key=key)


class BertSelfAttention(Module):
    """`query`, `key`, `value` projections and the attention itself."""

    query: Linear
    key: Linear
    value: Linear
    dropout: Dropout
    num_heads: int = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden, std = config["hidden_size"], _std(config)
        kq, kk, kv = jax.random.split(key, 3)
        self.query = normal_linear(hidden, hidden, True, std, dtype, kq)
        self.key = normal_linear(hidden, hidden, True, std, dtype, kk)
        self.value = normal_linear(hidden, hidden, True, std, dtype, kv)
        self.dropout = Dropout(config.get("attention_probs_dropout_prob", 0.1))
        self.num_heads = config["num_attention_heads"]

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        mask: Bool[Array, "batch 1 1 seq seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        kq, kk, kv, kd = keys(key, 4)
        batch, length, hidden = x.shape
        shape = (batch, length, self.num_heads, hidden // self.num_heads)
        q = self.query(x, key=kq).reshape(shape)
        k = self.key(x, key=kk).reshape(shape)
        v = self.value(x, key=kv).reshape(shape)
        return attend(q, k, v, mask, (hidden // self.num_heads) ** -0.5, self.dropout, kd)


class BertSelfOutput(Module):
    """`LayerNorm(dropout(dense(x)) + residual)`: BERT's post-norm residual."""

    dense: Linear
    LayerNorm: LayerNorm  # noqa: N815
    dropout: Dropout

    def __init__(self, config: dict[str, Any], inner: int, *, dtype: Any, key: PRNGKeyArray):
        self.dense = normal_linear(inner, config["hidden_size"], True, _std(config), dtype, key)
        self.LayerNorm = _norm(config, dtype)
        self.dropout = Dropout(config.get("hidden_dropout_prob", 0.1))

    def __call__(
        self,
        x: Float[Array, "batch seq inner"],
        residual: Float[Array, "batch seq hidden"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        kd, kr = keys(key, 2)
        return self.LayerNorm(self.dropout(self.dense(x, key=kd), key=kr) + residual)


class BertAttention(Module):
    """`self` (the attention) and `output` (projection, residual, norm)."""

    self: BertSelfAttention
    output: BertSelfOutput

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        ks, ko = jax.random.split(key)
        # `self` is transformers' name (a path component): set through __dict__-free
        # object.__setattr__, as any field.
        object.__setattr__(self, "self", BertSelfAttention(config, dtype=dtype, key=ks))
        self.output = BertSelfOutput(config, config["hidden_size"], dtype=dtype, key=ko)

    def __call__(
        self_,  # noqa: N805 (the field is called `self`)
        x: Float[Array, "batch seq hidden"],
        mask: Bool[Array, "batch 1 1 seq seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        ks, ko = keys(key, 2)
        return self_.output(self_.self(x, mask, key=ks), x, key=ko)


class BertIntermediate(Module):
    """`act(dense(x))`."""

    dense: Linear
    act: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden, inner = config["hidden_size"], config["intermediate_size"]
        self.dense = normal_linear(hidden, inner, True, _std(config), dtype, key)
        self.act = activation(config.get("hidden_act", "gelu"), "Bert")

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch inner"]:
        return self.act(self.dense(x, key=key))


class BertLayer(Module):
    """`attention`, then the feed-forward `intermediate` and `output`."""

    attention: BertAttention
    intermediate: BertIntermediate
    output: BertSelfOutput

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        ka, ki, ko = jax.random.split(key, 3)
        self.attention = BertAttention(config, dtype=dtype, key=ka)
        self.intermediate = BertIntermediate(config, dtype=dtype, key=ki)
        self.output = BertSelfOutput(config, config["intermediate_size"], dtype=dtype, key=ko)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        mask: Bool[Array, "batch 1 1 seq seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        ka, ki, ko = keys(key, 3)
        x = self.attention(x, mask, key=ka)
        return self.output(self.intermediate(x, key=ki), x, key=ko)


class BertEncoder(Module):
    """The stack of `layer.i`."""

    layer: tuple[BertLayer, ...]

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        layer_keys = jax.random.split(key, config["num_hidden_layers"])
        self.layer = tuple(BertLayer(config, dtype=dtype, key=k) for k in layer_keys)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        mask: Bool[Array, "batch 1 1 seq seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        for layer, k in zip(self.layer, keys(key, len(self.layer))):
            x = layer(x, mask, key=k)
        return x


class BertPooler(Module):
    """`tanh(dense(x[:, 0]))`: the first token's hidden state, projected."""

    dense: Linear

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden = config["hidden_size"]
        self.dense = normal_linear(hidden, hidden, True, _std(config), dtype, key)

    def __call__(
        self, x: Float[Array, "batch seq hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch hidden"]:
        return jnp.tanh(self.dense(x[:, 0], key=key))


class BertModel(Module):
    """The BERT encoder with transformers' names: `embeddings`, `encoder.layer.i`
    (`attention.self.query`/`key`/`value`, `attention.output.dense`, `intermediate.dense`,
    `output.dense`, each `LayerNorm`), and `pooler` (absent inside `BertForMaskedLM`, as
    in transformers). Built by `treenn.models.from_config` from a `BertModel` config.

    **Arguments:**

    - `config`: a transformers BERT config, as a dict (`config.json`'s contents).
    - `add_pooling_layer`: whether the model has its `pooler`.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation (transformers': N(0, initializer_range)).

    **Returns:** `model(input_ids, *, attention_mask=None, token_type_ids=None,
    position_ids=None, key=None)` returns the last hidden states `(batch, seq,
    hidden_size)`; `model.pooled(hidden)` the pooler's output `(batch, hidden_size)`.
    `attention_mask` (1 for tokens, 0 for padding) hides padded keys; `token_type_ids`
    default to zeros and `position_ids` to `0, 1, 2...`, as in transformers. A new model
    is in training mode (dropout): pass `key`, or `nn.eval_mode` it.

    !!! Example

        ```python
        model = nn.eval_mode(treenn.load_hf("path/to/bert"))
        hidden = model(ids, attention_mask=mask)  # (batch, seq, hidden_size)
        ```
    """

    embeddings: BertEmbeddings
    encoder: BertEncoder
    pooler: BertPooler | None
    hf_config: str = eqx.field(static=True)

    def __init__(
        self,
        config: dict[str, Any],
        *,
        add_pooling_layer: bool = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        ke, kc, kp = jax.random.split(key, 3)
        self.embeddings = BertEmbeddings(config, dtype=dtype, key=ke)
        self.encoder = BertEncoder(config, dtype=dtype, key=kc)
        self.pooler = BertPooler(config, dtype=dtype, key=kp) if add_pooling_layer else None
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        token_type_ids: Integer[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        batch, length = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(length)[None, :]
        ke, kc = keys(key, 2)
        x = self.embeddings(input_ids, token_type_ids, position_ids, key=ke)
        return self.encoder(x, _padding_mask(attention_mask, batch, length), key=kc)

    def pooled(
        self, hidden: Float[Array, "batch seq hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch hidden"]:
        """The pooler's output for the hidden states `model(...)` returned.

        **Arguments:**

        - `hidden`: the last hidden states, `(batch, seq, hidden_size)`.
        - `key`: passed to the pooler's layer (a LoRA adapter's dropout).

        **Returns:** `tanh(pooler.dense(hidden[:, 0]))`, `(batch, hidden_size)`.

        !!! Example

            ```python
            pooled = model.pooled(model(ids, attention_mask=mask))
            ```
        """
        if self.pooler is None:
            raise ValueError("BertModel.pooled: this model has no pooler")
        return self.pooler(hidden, key=key)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out


def _num_labels(config: dict[str, Any]) -> int:
    labels = config.get("id2label")
    return len(labels) if labels else int(config.get("num_labels", 2))


class BertForSequenceClassification(Module):
    """BERT with a classification head on the pooled first token: `bert` (`BertModel`),
    `dropout`, `classifier` (`nn.Linear`), transformers' names.

    **Arguments:**

    - `config`: a transformers BERT config, as a dict; the number of classes is the
        size of its `id2label` (or `num_labels`).
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation.

    **Returns:** `model(input_ids, *, attention_mask=None, token_type_ids=None,
    position_ids=None, key=None)` returns the logits `(batch, num_labels)`.

    !!! Example

        ```python
        model = treenn.load_hf("path/to/bert-classifier")
        logits = model(ids, attention_mask=mask)  # (batch, num_labels)
        ```
    """

    bert: BertModel
    dropout: Dropout
    classifier: Linear
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        kb, kc = jax.random.split(key)
        self.bert = BertModel(config, dtype=dtype, key=kb)
        rate = config.get("classifier_dropout")
        self.dropout = Dropout(config.get("hidden_dropout_prob", 0.1) if rate is None else rate)
        hidden = config["hidden_size"]
        self.classifier = normal_linear(hidden, _num_labels(config), True, _std(config), dtype, kc)
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        token_type_ids: Integer[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch labels"]:
        kb, kp, kd, kc = keys(key, 4)
        hidden = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            key=kb,
        )
        pooled = self.bert.pooled(hidden, key=kp)
        return self.classifier(self.dropout(pooled, key=kd), key=kc)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out


class BertPredictionHeadTransform(Module):
    """`LayerNorm(act(dense(x)))`."""

    dense: Linear
    LayerNorm: LayerNorm  # noqa: N815
    act: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        hidden = config["hidden_size"]
        self.dense = normal_linear(hidden, hidden, True, _std(config), dtype, key)
        self.LayerNorm = _norm(config, dtype)
        self.act = activation(config.get("hidden_act", "gelu"), "Bert")

    def __call__(
        self, x: Float[Array, "*batch hidden"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch hidden"]:
        return self.LayerNorm(self.act(self.dense(x, key=key)))


class BertLMPredictionHead(Module):
    """`transform`, then the vocabulary projection: the word embedding (tied, as
    transformers by default) plus `bias`, or, untied, `decoder` (with its own bias)."""

    transform: BertPredictionHeadTransform
    decoder: Linear | None
    bias: Float[Array, " vocab"]

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        kt, kd = jax.random.split(key)
        self.transform = BertPredictionHeadTransform(config, dtype=dtype, key=kt)
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        tied = config.get("tie_word_embeddings", True)
        # Untied, transformers' decoder has a bias of its own and `bias` goes unused.
        self.decoder = None if tied else normal_linear(hidden, vocab, True, _std(config), dtype, kd)
        self.bias = jnp.zeros((vocab,), jnp.float32 if dtype is None else dtype)

    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        embedding: Float[Array, "vocab hidden"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        kt, kd = keys(key, 2)
        x = self.transform(x, key=kt)
        if self.decoder is not None:
            return self.decoder(x, key=kd)
        y = x @ embedding.T
        return y + trailing(self.bias, y.ndim)


class BertOnlyMLMHead(Module):
    """transformers' `cls` module of the masked-LM model: `predictions`."""

    predictions: BertLMPredictionHead

    def __init__(self, config: dict[str, Any], *, dtype: Any, key: PRNGKeyArray):
        self.predictions = BertLMPredictionHead(config, dtype=dtype, key=key)


class BertForMaskedLM(Module):
    """BERT with its masked-language-model head: `bert` (`BertModel` without a pooler)
    and `cls.predictions` (`transform.dense`, `transform.LayerNorm`, `bias`; the
    projection is the word embedding, tied, unless `tie_word_embeddings` is false,
    then `cls.predictions.decoder`), transformers' names.

    **Arguments:**

    - `config`: a transformers BERT config, as a dict.
    - `dtype`: parameter dtype (default float32).
    - `key`: PRNG key for the initialisation.

    **Returns:** `model(input_ids, *, attention_mask=None, token_type_ids=None,
    position_ids=None, key=None)` returns the logits `(batch, seq, vocab_size)`.

    !!! Example

        ```python
        model = treenn.load_hf("path/to/bert")
        logits = model(ids, attention_mask=mask)  # (batch, seq, vocab_size)
        ```
    """

    bert: BertModel
    cls: BertOnlyMLMHead
    hf_config: str = eqx.field(static=True)

    def __init__(self, config: dict[str, Any], *, dtype: Any = None, key: PRNGKeyArray):
        kb, kc = jax.random.split(key)
        self.bert = BertModel(config, add_pooling_layer=False, dtype=dtype, key=kb)
        self.cls = BertOnlyMLMHead(config, dtype=dtype, key=kc)
        self.hf_config = config_text(config)

    def __call__(
        self,
        input_ids: Integer[Array, "batch seq"],
        *,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        token_type_ids: Integer[Array, "batch seq"] | None = None,
        position_ids: Integer[Array, "#batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        kb, kc = keys(key, 2)
        hidden = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            key=kb,
        )
        embedding = self.bert.embeddings.word_embeddings.weight
        return self.cls.predictions(hidden, embedding, key=kc)

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config the model was built from (a new dict)."""
        out: dict[str, Any] = json.loads(self.hf_config)
        return out
