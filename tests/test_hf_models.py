"""transformers models in treenn (`treenn.models.from_config`), checked against
transformers itself: tiny random models built offline, written with `save_pretrained`,
loaded with `treenn.load_hf`; the logits agree in float32 on padded batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treenn
import treenn.nn as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 4,
}


def tiny(arch: str, **options: Any) -> Any:
    """A tiny random transformers model of `arch`, in evaluation mode, seeded."""
    torch.manual_seed(0)
    if arch.startswith("Bert"):
        config = transformers.BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=3,
            **options,
        )
    elif arch.startswith("GPT2"):
        config = transformers.GPT2Config(
            vocab_size=99, n_positions=16, n_embd=32, n_layer=2, n_head=4, **options
        )
    else:
        family = {"Llama": "Llama", "Mistral": "Mistral", "Qwen2": "Qwen2"}
        prefix = next(p for p in family if arch.startswith(p))
        kind = getattr(transformers, f"{prefix}Config")
        config = kind(**SIZES, num_attention_heads=4, num_key_value_heads=2, **options)
    return getattr(transformers, arch)(config).eval()


def config_of(arch: str, **options: Any) -> dict[str, Any]:
    config: dict[str, Any] = tiny(arch, **options).config.to_dict()
    return config | {"architectures": [arch]}


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Ids and a mask with a left-padded row, a right-padded row and a full row."""
    ids = np.random.RandomState(0).randint(0, 99, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    return ids, mask


def reference(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    field = "logits" if hasattr(out, "logits") else "last_hidden_state"
    result: np.ndarray = getattr(out, field).numpy()
    return result


def run(model: Any, ids: Any, **options: Any) -> Any:
    """The model called once, compiled (op-by-op dispatch compiles every op anew)."""
    return treenn.jit(lambda m, i, o: m(i, **o))(model, jnp.asarray(ids), options)


def relative(ours: Any, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


CASES = {
    "gpt2": ("GPT2LMHeadModel", {}),
    "gpt2-untied": ("GPT2LMHeadModel", {"tie_word_embeddings": False}),
    "gpt2-base": ("GPT2Model", {}),
    "gpt2-scaled-by-layer": ("GPT2LMHeadModel", {"scale_attn_by_inverse_layer_idx": True}),
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-base": ("LlamaModel", {}),
    "llama-rope-llama3": ("LlamaForCausalLM", {"rope_scaling": LLAMA3, "rope_theta": 500.0}),
    "llama-rope-linear": ("LlamaForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama-head-dim": ("LlamaForCausalLM", {"head_dim": 16}),  # heads * head_dim != hidden
    "gpt2-inner-gelu": ("GPT2LMHeadModel", {"n_inner": 48, "activation_function": "gelu"}),
    "llama-biases": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 3}),
    "mistral-no-window": ("MistralForCausalLM", {"sliding_window": None}),
    "bert-base": ("BertModel", {}),
    "bert-classifier": ("BertForSequenceClassification", {}),
    "bert-masked-lm": ("BertForMaskedLM", {}),
    "bert-masked-lm-untied": ("BertForMaskedLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2-window": (
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 2, "max_window_layers": 1},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    arch, options = CASES[case]
    torch_model = tiny(arch, **options)
    torch_model.save_pretrained(tmp_path)
    ids, mask = batch()
    ref = reference(torch_model, ids, mask)
    model = treenn.load_hf(tmp_path)
    out = treenn.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, jnp.asarray(ids), jnp.asarray(mask)
    )
    assert out.shape == ref.shape
    # Every position, padded ones included (a query with no visible key gives zeros
    # there, as PyTorch's scaled_dot_product_attention).
    assert relative(out, ref) < 1e-5, case


def test_the_window_cases_depend_on_the_window() -> None:
    """The sliding-window cases above test the window: with these sizes, transformers'
    logits with and without it differ (a model ignoring it would fail them)."""
    ids, mask = batch()
    for arch, options in (CASES["mistral-window"], CASES["qwen2-window"]):
        windowed = reference(tiny(arch, **options), ids, mask)
        unwindowed = reference(tiny(arch, **(options | {"sliding_window": None})), ids, mask)
        assert np.abs(windowed - unwindowed).max() > 1e-4, arch


def test_position_ids_match_transformers(tmp_path: Path) -> None:
    """Explicit position ids (a left-padded batch counted from its first token)."""
    torch_model = tiny("LlamaForCausalLM")
    torch_model.save_pretrained(tmp_path)
    ids, mask = batch()
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    model = treenn.load_hf(tmp_path)
    out = model(
        jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(positions)
    )
    assert relative(out, ref) < 1e-5


@pytest.mark.parametrize(
    "arch",
    [
        "GPT2LMHeadModel",
        "GPT2Model",
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "BertForSequenceClassification",
        "BertForMaskedLM",
    ],
)
def test_paths_are_the_state_dict_keys(arch: str) -> None:
    torch_model = tiny(arch, tie_word_embeddings=False)
    config = torch_model.config.to_dict() | {"architectures": [arch]}
    model = treenn.models.from_config(config, key=jax.random.key(0))
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    ours = {
        jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model)
        if isinstance(leaf, jax.Array)
    }
    assert set(treenn.statuses(model)) == set(shapes)
    assert ours == shapes


def test_tied_head_is_one_array() -> None:
    config = config_of("LlamaForCausalLM", tie_word_embeddings=True)
    model = treenn.models.from_config(config, key=jax.random.key(0))
    assert model.lm_head is None
    assert "lm_head.weight" not in treenn.statuses(model)
    ids = jnp.array([[1, 2, 3]])
    expected = run(model.model, ids) @ model.model.embed_tokens.weight.T
    assert jnp.allclose(run(model, ids), expected)


def test_config_from_a_path_and_a_directory(tmp_path: Path) -> None:
    tiny("GPT2LMHeadModel").save_pretrained(tmp_path)
    by_file = treenn.models.from_config(tmp_path / "config.json", key=jax.random.key(0))
    by_folder = treenn.models.from_config(str(tmp_path), key=jax.random.key(0))
    assert type(by_file) is type(by_folder) is treenn.models.GPT2LMHeadModel
    assert by_file.config["n_embd"] == 32


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="'T5ForConditionalGeneration'.*GPT2LMHeadModel.*Qwen2"):
        treenn.models.from_config(
            {"architectures": ["T5ForConditionalGeneration"]}, key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="names no architecture"):
        treenn.models.from_config({"model_type": "llama"}, key=jax.random.key(0))


def test_unsupported_rope_type_is_named() -> None:
    config = config_of("LlamaForCausalLM")
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="'yarn'.*llama3"):
        treenn.models.from_config(config, key=jax.random.key(0))


def test_dtype_and_a_bfloat16_forward() -> None:
    config = config_of("LlamaForCausalLM")
    model = treenn.models.from_config(config, key=jax.random.key(0), dtype=jnp.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == jnp.bfloat16
    logits = run(model, jnp.array([[1, 2, 3]]), attention_mask=jnp.array([[0, 1, 1]]))
    assert logits.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))


def test_surgeries_work_on_the_models() -> None:
    config = config_of("LlamaForCausalLM")
    model = treenn.models.from_config(config, key=jax.random.key(0))
    ids = jnp.array([[1, 2, 3, 4]])
    adapted = treenn.lora(model, "**.q_proj", rank=2, key=jax.random.key(1))
    adapters = [p for p in treenn.statuses(adapted) if "lora_" in p]
    assert adapters == [
        f"model.layers.{i}.self_attn.q_proj.{name}"
        for i in range(2)
        for name in ("lora_A", "lora_B")
    ]
    # lora_B starts at zero: the outputs are unchanged
    assert jnp.allclose(run(adapted, ids), run(model, ids), atol=1e-6)
    frozen = treenn.freeze(model, "model.embed_tokens")
    assert treenn.statuses(frozen)["model.embed_tokens.weight"] == "frozen"
    text = treenn.summary(model)
    assert "model.layers.0.self_attn.q_proj" in text


def test_gpt2_dropout_is_mode_bearing() -> None:
    config = config_of("GPT2LMHeadModel")
    model = treenn.models.from_config(config, key=jax.random.key(0))
    ids = jnp.array([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="needs `key=`"):
        model(ids)
    a = run(model, ids, key=jax.random.key(1))
    b = run(model, ids, key=jax.random.key(2))
    assert not jnp.allclose(a, b)
    evaluated = nn.eval_mode(model)
    assert jnp.allclose(run(evaluated, ids), run(evaluated, ids, key=jax.random.key(1)))


# -- generation ---------------------------------------------------------------------------


def _generate_both(
    arch: str,
    options: dict[str, Any],
    tmp_path: Path,
    pad_token_id: int | None = None,
    **kwargs: Any,
) -> Any:
    source = tiny(arch, **options)
    source.save_pretrained(tmp_path)
    model = treenn.load_hf(tmp_path)
    ids = np.random.RandomState(1).randint(3, 99, (3, 5))
    mask = np.ones((3, 5), np.int64)
    mask[1, :2] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        ref = source.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            **kwargs,
        ).numpy()
    ours = treenn.models.generate(
        model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), **kwargs
    )
    return model, ids, mask, np.asarray(ours), ref


# Generation compiles a prefill and a decoding loop (3-5 s each here): slow tests.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "options"),
    [("GPT2LMHeadModel", {}), ("MistralForCausalLM", {"sliding_window": 3})],
)
def test_greedy_generation_equals_transformers(
    arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    _, _, _, ours, ref = _generate_both(
        arch, options, tmp_path, max_new_tokens=6, eos_token_id=None
    )
    assert ours.shape == ref.shape == (3, 11)
    assert np.array_equal(ours, ref)


@pytest.mark.slow
def test_generation_stops_and_pads_as_transformers(tmp_path: Path) -> None:
    """An end token one sequence produces: it is padded from then on, and generation
    stops when all have ended, both as transformers does."""
    _, _, _, free, _ = _generate_both(
        "LlamaForCausalLM", {"pad_token_id": 0}, tmp_path, max_new_tokens=6, eos_token_id=None
    )
    eos = int(free[0, 7])  # the first sequence's third new token ends it
    _, _, _, ours, ref = _generate_both(
        "LlamaForCausalLM", {"pad_token_id": 0}, tmp_path, max_new_tokens=6, eos_token_id=eos
    )
    assert np.array_equal(ours, ref)
    assert ours[0, 7] == eos and np.all(ours[0, 8:] == 0)


@pytest.mark.slow
def test_generation_ends_when_every_sequence_has(tmp_path: Path) -> None:
    """End tokens every sequence produces by its second new token: the output stops
    there, as transformers' does (fewer than max_new_tokens)."""
    _, _, _, free, _ = _generate_both(
        "GPT2LMHeadModel", {}, tmp_path, max_new_tokens=6, eos_token_id=None
    )
    ends = sorted({int(t) for t in free[:, 6]})
    _, _, _, ours, ref = _generate_both(
        "GPT2LMHeadModel", {}, tmp_path, max_new_tokens=6, eos_token_id=ends
    )
    assert ours.shape == ref.shape and ours.shape[1] <= 7
    assert np.array_equal(ours, ref)


@pytest.mark.slow
def test_sampling() -> None:
    model = treenn.models.from_config(config_of("LlamaForCausalLM"), key=jax.random.key(0))
    ids = jnp.array([[5, 6, 7]])
    greedy = treenn.models.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    top1 = treenn.models.generate(
        model,
        ids,
        max_new_tokens=4,
        temperature=1.0,
        top_k=1,
        eos_token_id=[],
        key=jax.random.key(3),
    )
    assert np.array_equal(greedy, top1)  # top_k=1 leaves only the argmax
    a, b, c = (
        treenn.models.generate(
            model,
            ids,
            max_new_tokens=8,
            temperature=5.0,
            top_p=0.99,
            eos_token_id=[],
            key=jax.random.key(k),
        )
        for k in (1, 1, 2)
    )
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="needs `key=`"):
        treenn.models.generate(model, ids, max_new_tokens=2, temperature=0.7)
    with pytest.raises(TypeError, match="causal language model"):
        treenn.models.generate(model.model, ids, max_new_tokens=2)


def test_bert_token_types_match_transformers(tmp_path: Path) -> None:
    source = tiny("BertForMaskedLM")
    source.save_pretrained(tmp_path)
    ids, mask = batch()
    types = np.zeros_like(ids)
    types[:, 3:] = 1
    with torch.no_grad():
        ref = source(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).logits.numpy()
    out = run(
        treenn.load_hf(tmp_path),
        ids,
        attention_mask=jnp.asarray(mask),
        token_type_ids=jnp.asarray(types),
    )
    assert relative(out, ref) < 1e-5
    assert relative(out, reference(source, ids, mask)) > 1e-3  # the types matter


# -- tensor parallelism ---------------------------------------------------------------------

TENSOR_PARALLEL = """
import sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import treenn
from test_hf_models import batch, tiny

folder = tempfile.mkdtemp()
tiny("LlamaForCausalLM").save_pretrained(folder)
model = treenn.load_hf(folder)
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
# Megatron's split: q/k/v and gate/up by output rows, o/down by input columns.
rules = {
    "**.self_attn.q_proj.weight": P("model", None),
    "**.self_attn.k_proj.weight": P("model", None),
    "**.self_attn.v_proj.weight": P("model", None),
    "**.self_attn.o_proj.weight": P(None, "model"),
    "**.mlp.gate_proj.weight": P("model", None),
    "**.mlp.up_proj.weight": P("model", None),
    "**.mlp.down_proj.weight": P(None, "model"),
    "**": P(),
}
sharded = treenn.shard(model, mesh, rules)
spec = sharded.model.layers[1].mlp.down_proj.weight.sharding.spec
assert spec == P(None, "model"), spec
ids, mask = (jnp.asarray(np.concatenate([x, x[:1]])) for x in batch())  # 4 rows
forward = treenn.jit(lambda m, i, a: m(i, attention_mask=a))
a = forward(sharded, *treenn.shard((ids, mask), mesh, P("data")))
b = forward(model, ids, mask)
assert float(jnp.abs(a - b).max()) < 1e-5
print("ok")
"""


@pytest.mark.slow  # a subprocess with 4 host devices
def test_llama_tensor_parallel_rules() -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(
        [sys.executable, "-c", TENSOR_PARALLEL],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
