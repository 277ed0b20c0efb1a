"""`treenn.models.from_config`: a model from a transformers `config.json`."""

from __future__ import annotations

import json
import os
from typing import Any

from jaxtyping import PRNGKeyArray

from .._module import Module
from ._bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from ._gpt2 import GPT2LMHeadModel, GPT2Model
from ._llama import LlamaForCausalLM, LlamaModel

# architecture -> (class, the model_type its config must carry)
ARCHITECTURES: dict[str, tuple[type[Module], str]] = {
    "GPT2LMHeadModel": (GPT2LMHeadModel, "gpt2"),
    "GPT2Model": (GPT2Model, "gpt2"),
    "LlamaForCausalLM": (LlamaForCausalLM, "llama"),
    "LlamaModel": (LlamaModel, "llama"),
    "MistralForCausalLM": (LlamaForCausalLM, "mistral"),
    "Qwen2ForCausalLM": (LlamaForCausalLM, "qwen2"),
    "BertModel": (BertModel, "bert"),
    "BertForSequenceClassification": (BertForSequenceClassification, "bert"),
    "BertForMaskedLM": (BertForMaskedLM, "bert"),
}


def read_config(config: dict[str, Any] | str | os.PathLike[str], fn: str) -> dict[str, Any]:
    """A config dict from a dict, a `config.json` path, or a directory holding one."""
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: no config file at {path!r}")
    with open(path, encoding="utf-8") as file:
        loaded = json.load(file)
    if not isinstance(loaded, dict):
        raise ValueError(f"{fn}: {path!r} holds a {type(loaded).__name__}, not a JSON object")
    return loaded


def architecture(config: dict[str, Any], fn: str) -> str:
    """The supported architecture the config names, or a ValueError listing them."""
    names = config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise ValueError(
            f"{fn}: the config names no architecture (its 'architectures' list is empty or "
            f"missing); supported: {supported}"
        )
    name = names[0]
    if name not in ARCHITECTURES:
        raise ValueError(f"{fn}: architecture {name!r} is not supported; supported: {supported}")
    return str(name)


def from_config(
    config: dict[str, Any] | str | os.PathLike[str], *, key: PRNGKeyArray, dtype: Any = None
) -> Module:
    """Build the model a Hugging Face transformers config names, randomly initialised,
    with transformers' state-dict keys as its paths.

    **Arguments:**

    - `config`: the config, as a dict (`config.json`'s contents, or
        `transformers_config.to_dict()`), the path of a `config.json`, or a directory
        holding one. Its `architectures[0]` picks the model: `GPT2LMHeadModel`,
        `GPT2Model`, `LlamaForCausalLM`, `LlamaModel`, `MistralForCausalLM`,
        `Qwen2ForCausalLM`, `BertModel`, `BertForSequenceClassification`,
        `BertForMaskedLM`; another is a `ValueError` listing these.
    - `key`: PRNG key for the initialisation (transformers': normal weights of standard
        deviation `initializer_range`, zero biases, unit norms).
    - `dtype`: parameter dtype (default float32).

    Paths are transformers' (`transformer.h.0.attn.c_attn.weight`,
    `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so `treenn.lora(model,
    "**.q_proj", ...)`, `treenn.freeze`, `nn.eval_mode` and `treenn.summary` select what
    PEFT's and transformers' names select. A tied head (`tie_word_embeddings`) is one
    array: the model has no `lm_head` and reads the input embedding. The model keeps the
    config (`model.config`), which `treenn.save_hf` writes back.

    **Returns:** the model, in training mode (GPT-2's dropouts need `key=` until
    `nn.eval_mode`). `model(input_ids, *, attention_mask=None, position_ids=None,
    key=None)` gives logits `(batch, seq, vocab_size)` for the language models and the
    last hidden states for `GPT2Model`, `LlamaModel` and `BertModel`; BERT's models also
    take `token_type_ids=`, and `BertForSequenceClassification` gives `(batch,
    num_labels)`.

    !!! Example

        ```python
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                  "vocab_size": 99, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2}
        model = treenn.models.from_config(config, key=jax.random.key(0))
        logits = model(jnp.array([[1, 2, 3]]))  # (1, 3, 99)
        ```
    """
    config = read_config(config, "from_config")
    name = architecture(config, "from_config")
    kind, model_type = ARCHITECTURES[name]
    config.setdefault("model_type", model_type)
    if config["model_type"] != model_type:
        raise ValueError(
            f"from_config: architecture {name!r} expects model_type {model_type!r}, the "
            f"config says {config['model_type']!r}"
        )
    model: Module = kind(config, dtype=dtype, key=key)
    return model
