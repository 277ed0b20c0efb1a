"""Hugging Face transformers checkpoints in and out: `treenn.load_hf`, `treenn.save_hf`.

A `save_pretrained` directory is a `config.json` (the architecture and its sizes) and the
weights under transformers' state-dict keys: `model.safetensors`, or shards listed by
`model.safetensors.index.json`, or PyTorch's `pytorch_model.bin` (and its index). The
models of `treenn.models.from_config` have those keys as their paths, so loading is
filling: the model is built abstractly (`eqx.filter_eval_shape`, no initialisation), then
each array is read from its file, one at a time, straight into its place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._fill import array_slots, check_filled, fill
from ._modes import eval_mode
from ._safetensors import CheckpointError, SafetensorsFile, write_safetensors
from ._status import unmarked
from ._tree import dotted, flatten, modules, unflatten
from .models._config import ARCHITECTURES, architecture, read_config

PathLike = str | os.PathLike[str]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH = "pytorch_model.bin"
_TORCH_INDEX = "pytorch_model.bin.index.json"

# Keys of older checkpoints that hold no parameter: GPT-2's causal-mask buffers and
# Llama's rotary frequencies, which transformers also ignores.
_IGNORED = re.compile(
    r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids)$"
)
# The base model's attribute in each head model: checkpoints of a base model load into
# the head model (and back) by adding or removing it, as transformers does.
_PREFIXES = {
    "gpt2": "transformer",
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "bert": "bert",
}
# Keys a model without them reads from another array (tied heads), or has no use for (a
# checkpoint's pooler in a masked-LM model): ignored where the model lacks them, as
# transformers ignores them.
_TIED = re.compile(
    r"^(lm_head\.weight|cls\.predictions\.decoder\.(weight|bias)|(bert\.)?pooler\..*)$"
)


# -- reading ------------------------------------------------------------------------------


class _Weights:
    """The arrays of a `save_pretrained` directory, read on demand by key."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # key -> file name
        self.torch: dict[str, Any] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        names = set(os.listdir(folder))
        if _SAFETENSORS_INDEX in names:
            self._index(_SAFETENSORS_INDEX)
        elif _SAFETENSORS in names:
            self._open(_SAFETENSORS)
            self.where = dict.fromkeys(self.files[_SAFETENSORS].entries, _SAFETENSORS)
        elif _TORCH_INDEX in names or _TORCH in names:
            self._torch(_TORCH_INDEX if _TORCH_INDEX in names else _TORCH)
        else:
            raise FileNotFoundError(
                f"load_hf: {folder!r} holds no weights: expected {_SAFETENSORS}, "
                f"{_SAFETENSORS_INDEX}, {_TORCH} or {_TORCH_INDEX}"
            )
        for key, name in self.where.items():
            if name in self.files:
                self.shapes[key] = self.files[name].entries[key].shape

    def _index(self, index: str) -> dict[str, str]:
        with open(os.path.join(self.folder, index), encoding="utf-8") as file:
            content = json.load(file)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"load_hf: {index} in {self.folder!r} has no weight_map")
        self.where = {str(k): str(v) for k, v in weight_map.items()}
        if index == _SAFETENSORS_INDEX:
            for name in sorted(set(self.where.values())):
                self._open(name)
                listed = {k for k, v in self.where.items() if v == name}
                held = set(self.files[name].entries)
                if listed - held:
                    raise CheckpointError(
                        f"load_hf: {index} lists {sorted(listed - held)[:5]} in {name}, "
                        "which does not hold them"
                    )
        return self.where

    def _open(self, name: str) -> None:
        self.files[name] = SafetensorsFile(os.path.join(self.folder, name))

    def _torch(self, name: str) -> None:
        from ._torch import _arrays, _torch_load

        parts = sorted(set(self._index(name).values())) if name == _TORCH_INDEX else [name]
        self.torch = {}
        for part in parts:
            path = os.path.join(self.folder, part)
            self.torch.update(_arrays(_torch_load(path), repr(path)))
        self.where = dict.fromkeys(self.torch, _TORCH)
        self.shapes = {k: tuple(v.shape) for k, v in self.torch.items()}

    def read(self, key: str) -> np.ndarray:
        if self.torch is not None:
            return self.torch[key]
        return self.files[self.where[key]].read(key)

    def close(self) -> None:
        for file in self.files.values():
            file.file.close()


def _renamed(keys: list[str], wanted: set[str], prefix: str) -> dict[str, str]:
    """model path -> file key: as they are, or with the base model's `prefix` added or
    removed when the file and the model disagree about it (a base model's checkpoint
    in a head model, or the other way)."""
    plain = {k: k for k in keys}
    start = prefix + "."
    if not any(k.startswith(start) for k in keys) and any(w.startswith(start) for w in wanted):
        return {start + k: k for k in keys}
    if any(k.startswith(start) for k in keys) and not any(w.startswith(start) for w in wanted):
        return {k[len(start) :]: k for k in keys if k.startswith(start)} | {
            k: k for k in keys if not k.startswith(start)
        }
    return plain


def load_hf(path: PathLike, *, dtype: Any = None) -> Any:
    """Load a Hugging Face transformers model directory (what `save_pretrained` writes)
    into the treenn model its `config.json` names.

    **Arguments:**

    - `path`: the directory: `config.json` and `model.safetensors`, a sharded
        `model.safetensors.index.json` with its shards, or `pytorch_model.bin` (read
        with `torch.load(weights_only=True)`: needs torch).
    - `dtype`: cast every floating array to this dtype. By default each array keeps
        the file's dtype: a bfloat16 checkpoint loads as bfloat16.

    The model is built abstractly (`eqx.filter_eval_shape` of
    `treenn.models.from_config`: nothing is initialised) and each array is read from its
    file straight into its place, one at a time, so the host holds about one copy of the
    weights. A tied head (`tie_word_embeddings`) stays one array, the input embedding.
    Loading is strict: a key the model needs and the files lack (missing), a key of the
    files the model has no place for (unexpected), and a shape that differs
    (mis-shaped) are each named in one `CheckpointError` (a `ValueError`). Keys that hold
    no parameter in older checkpoints (GPT-2's `attn.bias`, Llama's
    `rotary_emb.inv_freq`) are ignored, and a base model's checkpoint loads into its
    head model's base (and the other way), as in transformers.

    **Returns:** the model, in evaluation mode as transformers' `from_pretrained` gives
    it (`treenn.train_step` switches modes itself; `nn.train_mode` for your own loop).

    !!! Example

        ```python
        model = treenn.load_hf("runs/llama")            # a save_pretrained directory
        logits = model(ids, attention_mask=mask)        # (batch, seq, vocab_size)
        model = treenn.load_hf("runs/llama", dtype=jnp.bfloat16)
        ```
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_hf: {folder!r} is not a directory")
    config = read_config(folder, "load_hf")
    name = architecture(config, "load_hf")
    kind, model_type = ARCHITECTURES[name]
    config.setdefault("model_type", model_type)
    abstract = eqx.filter_eval_shape(
        lambda key: kind(config, key=key),
        jax.random.key(0),
    )
    weights = _Weights(folder)
    try:
        model = _fill(abstract, weights, config, dtype, folder)
    finally:
        weights.close()
    return eval_mode(model)


def _fill(model: Any, weights: _Weights, config: dict[str, Any], dtype: Any, folder: str) -> Any:
    paths, leaves, treedef = flatten(model)
    names = array_slots(model, paths, leaves)
    wanted = {n for n in names if n is not None}
    prefix = _PREFIXES.get(config["model_type"], "model")
    file_keys = [k for k in weights.where if not _IGNORED.search(k)]
    source = _renamed(file_keys, wanted, prefix)
    missing, wrong, new = [], [], []
    for name, leaf in zip(names, leaves):
        if name is None:
            new.append(leaf)
            continue
        key = source.get(name)
        if key is None:
            missing.append(name)
            new.append(leaf)
            continue
        want = tuple(unmarked(leaf).shape)
        if weights.shapes[key] != want:
            wrong.append(f"{name!r}: file {list(weights.shapes[key])}, model {list(want)}")
            new.append(leaf)
            continue
        value = weights.read(key)
        if dtype is not None and _floating(value):
            value = value.astype(dtype)
        new.append(fill(leaf, value))
    unexpected = sorted(k for k in set(source) - wanted if not _TIED.match(k))
    if missing or unexpected or wrong:
        lines = [f"load_hf: the weights in {folder!r} do not fit the model the config names:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(map(repr, missing)))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(map(repr, unexpected)))
        if wrong:
            lines.append(f"  mis-shaped ({len(wrong)}): " + "; ".join(wrong))
        raise CheckpointError("\n".join(lines))
    check_filled("load_hf", repr(folder), names, new)
    return unflatten(treedef, new)


def _floating(value: np.ndarray) -> bool:
    # ml_dtypes' bfloat16 is not a NumPy floating subtype: ask JAX.
    return bool(jax.numpy.issubdtype(value.dtype, jax.numpy.floating))


# -- writing ------------------------------------------------------------------------------


def _shard_size(size: int | str) -> int:
    """transformers' sizes: an int of bytes, or "5GB" (10**9) / "5GiB" (2**30)..."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if match is None:
        raise ValueError(
            f"save_hf: max_shard_size={size!r} is not a size (an int of bytes, or '5GB', "
            "'500MB', '2GiB')"
        )
    number, unit = float(match[1]), match[2]
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(number * base**power)


def _state_dict(model: Any) -> dict[str, Any]:
    """The model's arrays under their dotted paths (transformers' keys), unmarked."""
    paths, leaves, _ = flatten(model)
    names = array_slots(model, paths, leaves)
    return {n: unmarked(leaf) for n, leaf in zip(names, leaves) if n is not None}


def _adapters(model: Any) -> list[str]:
    from ._lora import _Adapter

    return [dotted(p) for p, m, _ in modules(model) if isinstance(m, _Adapter)]


def _shards(arrays: dict[str, Any], limit: int) -> Iterator[dict[str, Any]]:
    shard: dict[str, Any] = {}
    size = 0
    for key, array in arrays.items():
        nbytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[key] = array
        size += nbytes
    if shard:
        yield shard


def save_hf(path: PathLike, model: Any, *, max_shard_size: int | str = "5GB") -> None:
    """Write a treenn transformers model as a Hugging Face `save_pretrained` directory,
    which transformers' `from_pretrained` loads with no missing or unexpected key.

    **Arguments:**

    - `path`: the directory (created if needed).
    - `model`: a model of `treenn.models.from_config` or `treenn.load_hf`, fine-tuned or
        not. A model holding LoRA adapters is a `ValueError` naming them: merge them
        first (`treenn.merge_lora`).
    - `max_shard_size`: above this size the weights are split into
        `model-00001-of-0000N.safetensors` shards listed by `model.safetensors.index.json`,
        as transformers does; an int of bytes or a string such as `"5GB"` (10^9 bytes)
        or `"2GiB"` (2^30).

    Writes `config.json` (the config the model was built from, its `dtype` set to the
    weights') and the weights as safetensors under transformers' keys. A tied head is
    written once, as the input embedding, as transformers writes it. Frozen arrays are
    written as any other.

    **Returns:** `None`.

    !!! Example

        ```python
        treenn.save_hf("runs/tuned", treenn.merge_lora(model))
        # torch: AutoModelForCausalLM.from_pretrained("runs/tuned")
        ```
    """
    config_text = getattr(model, "hf_config", None)
    if not isinstance(config_text, str):
        raise TypeError(
            f"save_hf: expected a transformers model of treenn.models (from_config or "
            f"load_hf), got a {type(model).__name__}"
        )
    adapted = _adapters(model)
    if adapted:
        raise ValueError(
            f"save_hf: the model holds LoRA adapters at {', '.join(map(repr, adapted))}; "
            "merge them first (treenn.merge_lora), or write the adapters alone"
        )
    limit = _shard_size(max_shard_size)
    arrays = _state_dict(model)
    config = json.loads(config_text)
    floating = [a.dtype for a in arrays.values() if _floating_dtype(a.dtype)]
    if floating:
        config["dtype"] = str(np.dtype(max(set(floating), key=floating.count)))
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    shards = list(_shards(arrays, limit))
    metadata = {"format": "pt"}
    if len(shards) <= 1:
        write_safetensors(os.path.join(folder, _SAFETENSORS), shards[0] if shards else {}, metadata)
        _remove_stale(folder, {_SAFETENSORS})
        return
    weight_map: dict[str, str] = {}
    total = 0
    names = set()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        names.add(name)
        write_safetensors(os.path.join(folder, name), shard, metadata)
        for key, array in shard.items():
            weight_map[key] = name
            total += int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, _SAFETENSORS_INDEX), "w", encoding="utf-8") as file:
        json.dump(index, file, indent=2, sort_keys=True)
    _remove_stale(folder, names | {_SAFETENSORS_INDEX})


_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _remove_stale(folder: str, written: set[str]) -> None:
    """Remove the safetensors weights an earlier save left that this one did not write
    (a single file after shards, or shards of another count), as transformers'
    `save_pretrained` does: a loader would otherwise read the stale ones. Done after
    the new files are written, so an interrupted save leaves the old model whole."""
    for name in os.listdir(folder):
        if _WEIGHT_FILE.fullmatch(name) and name not in written:
            os.remove(os.path.join(folder, name))


def _floating_dtype(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


# -- PEFT LoRA adapters -------------------------------------------------------------------

_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT options `load_peft` cannot honour, with the value that means "not used".
_PEFT_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "target_parameters": None,
}
_TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
}


def _layer_at(model: Any, path: str) -> Any:
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (tuple, list)) else getattr(node, part)
    return node


def _dropout_rate(layer: Any) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def save_peft(path: PathLike, model: Any) -> None:
    """Write the LoRA adapters of a model adapted with `treenn.lora` as a PEFT adapter
    directory, which `peft.PeftModel.from_pretrained(base, path)` loads onto the
    transformers model with the same outputs.

    **Arguments:**

    - `path`: the directory (created if needed).
    - `model`: a model of `treenn.models` (or `treenn.load_hf`) holding adapters.

    Writes `adapter_config.json` (`r`, `lora_alpha` so that `lora_alpha / r` is each
    adapter's scaling, `lora_dropout`, the adapted layers' full paths as
    `target_modules`, and `rank_pattern`/`alpha_pattern` for layers whose rank or alpha
    differ from the most common) and `adapter_model.safetensors` with PEFT's keys
    (`base_model.model.<path>.lora_A.weight`, `lora_B.weight`). Only the adapters are
    written: other arrays a fine-tuning changed (an unfrozen head) are not, as PEFT's
    adapter files hold only the adapters; save those with `treenn.save_hf` after
    `treenn.merge_lora`, or `treenn.save`.

    **Returns:** `None`. Raises `ValueError` when the model holds no adapter.

    !!! Example

        ```python
        model = treenn.lora(treenn.load_hf("base"), "**.q_proj", rank=8, key=key)
        # ... fine-tune ...
        treenn.save_peft("adapter", model)
        # torch: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"),
        #                                      "adapter")
        ```
    """
    from collections import Counter

    from ._lora import _Adapter

    layers = [(dotted(p), m) for p, m, _ in modules(model) if isinstance(m, _Adapter)]
    if not layers:
        raise ValueError(
            "save_peft: the model holds no LoRA adapter; adapt it with treenn.lora first"
        )
    ranks = {name: int(layer.lora_A.shape[0]) for name, layer in layers}
    alphas = {name: layer.scaling * ranks[name] for name, layer in layers}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rates = {_dropout_rate(layer) for _, layer in layers}
    if len(rates) > 1:
        raise ValueError(
            f"save_peft: the adapters' dropout rates differ ({sorted(rates)}); PEFT's "
            "config has one lora_dropout"
        )
    config_text = getattr(model, "hf_config", None)
    arch = (json.loads(config_text).get("architectures") or [""])[0] if config_text else ""
    task = next((t for suffix, t in _TASKS.items() if arch.endswith(suffix)), None)
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": rates.pop(),
        "target_modules": sorted(ranks),
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    arrays: dict[str, Any] = {}
    for name, layer in layers:
        arrays[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        arrays[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _PEFT_CONFIG), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    write_safetensors(os.path.join(folder, _PEFT_WEIGHTS), arrays, {"format": "pt"})


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matching the end of the
    layer's path (as a regular expression), else the default."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def load_peft(path: PathLike, model: Any) -> Any:
    """Apply a PEFT LoRA adapter directory (what `peft`'s `save_pretrained` writes) to a
    treenn model: the layers it names are adapted (`treenn.lora`) and their adapters
    filled from the file, so the model gives PEFT's outputs.

    **Arguments:**

    - `path`: the directory: `adapter_config.json` and `adapter_model.safetensors`.
    - `model`: the base model, e.g. `treenn.load_hf` of the adapter's base.

    `r`, `lora_alpha`, `lora_dropout`, `use_rslora` and the per-layer
    `rank_pattern`/`alpha_pattern` are honoured; an option treenn's LoRA cannot honour
    (`use_dora`, `fan_in_fan_out`, a `bias` other than `"none"`, `modules_to_save`...)
    is a `ValueError` naming it, as is a layer the model lacks or an adapter whose
    shape does not fit its layer.

    **Returns:** the adapted model (its adapters trainable, the rest unchanged).

    !!! Example

        ```python
        model = treenn.load_peft("adapter", treenn.load_hf("base"))
        logits = model(ids, attention_mask=mask)
        ```
    """
    folder = os.fspath(path)
    config = read_config(os.path.join(folder, _PEFT_CONFIG), "load_peft")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"load_peft: {folder!r} holds a {config['peft_type']} adapter; only LORA is supported"
        )
    for option, neutral in _PEFT_UNSUPPORTED.items():
        value = config.get(option, neutral)
        if value not in (neutral, None, [], {}, False) and value != neutral:
            raise ValueError(
                f"load_peft: the adapter sets {option}={value!r}, which treenn's LoRA does "
                "not support"
            )
    with SafetensorsFile(os.path.join(folder, _PEFT_WEIGHTS)) as file:
        arrays = {k: file.read(k) for k in file.entries}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])\.weight", key)
        if match is None:
            raise ValueError(f"load_peft: {key!r} is not a LoRA weight (lora_A or lora_B)")
        pairs.setdefault(match[1], {})[match[2]] = value
    incomplete = sorted(n for n, p in pairs.items() if set(p) != {"lora_A", "lora_B"})
    if incomplete:
        raise ValueError(f"load_peft: lora_A or lora_B missing for {incomplete}")
    groups: dict[tuple[int, float], list[str]] = {}
    for name, pair in sorted(pairs.items()):
        rank = int(pair["lora_A"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        groups.setdefault((rank, scaling * rank), []).append(name)
    for names in groups.values():
        for name in names:
            try:
                _layer_at(model, name)
            except (AttributeError, IndexError, ValueError) as err:
                raise ValueError(f"load_peft: the model has no layer at {name!r}") from err
    from ._lora import lora

    dropout = float(config.get("lora_dropout") or 0.0)
    for (rank, alpha), names in groups.items():
        model = lora(
            model,
            lambda m, names=names: tuple(_layer_at(m, n) for n in names),  # type: ignore[misc]
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            key=jax.random.key(0),
        )
    wrong = []
    for name, pair in pairs.items():
        layer = _layer_at(model, name)
        for field in ("lora_A", "lora_B"):
            want = getattr(layer, field)
            if tuple(pair[field].shape) != tuple(want.shape):
                wrong.append(
                    f"{name}.{field}: file {list(pair[field].shape)}, model {list(want.shape)}"
                )
    if wrong:
        raise ValueError("load_peft: adapters that do not fit their layers: " + "; ".join(wrong))
    names = sorted(pairs)
    values = [
        jax.numpy.asarray(pairs[n][f], getattr(_layer_at(model, n), f).dtype)
        for n in names
        for f in ("lora_A", "lora_B")
    ]
    return eqx.tree_at(
        lambda m: [getattr(_layer_at(m, n), f) for n in names for f in ("lora_A", "lora_B")],
        model,
        values,
    )
