"""`treenn.load_hf` and `treenn.save_hf` against transformers: what transformers writes
loads (single file, shards, PyTorch pickles, bfloat16), what treenn writes
transformers loads strictly with the same logits, and every mismatch is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import treenn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import batch, reference, relative, run, tiny  # noqa: E402


def logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(run(model, ids, attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("GPT2LMHeadModel", {}),
        ("GPT2LMHeadModel", {"tie_word_embeddings": False}),
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"tie_word_embeddings": True}),
        ("MistralForCausalLM", {"sliding_window": 3}),
        ("Qwen2ForCausalLM", {}),
        ("LlamaModel", {}),
        ("BertForMaskedLM", {}),
        ("BertForSequenceClassification", {}),
    ],
)
def test_save_hf_loads_in_transformers_strictly(
    arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    source = tiny(arch, **options)
    source.save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    # Sharded: a limit below the model's size (about 60 kB) gives several shards.
    treenn.save_hf(tmp_path / "out", model, max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.startswith("model-")]) > 1
    loaded, info = getattr(transformers, arch).from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids, mask = batch()
    ref = reference(source, ids, mask)
    assert relative(reference(loaded.eval(), ids, mask), ref) < 1e-6
    # and back: treenn reads its own shards
    again = treenn.load_hf(tmp_path / "out")
    assert relative(logits(again, ids, mask), ref) < 1e-5


def test_tied_head_written_once_as_transformers_does(tmp_path: Path) -> None:
    source = tiny("GPT2LMHeadModel")
    source.save_pretrained(tmp_path / "source")
    treenn.save_hf(tmp_path / "out", treenn.load_hf(tmp_path / "source"))
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(tmp_path / "source" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert "lm_head.weight" not in ours


def test_config_round_trips(tmp_path: Path) -> None:
    tiny("Qwen2ForCausalLM").save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    treenn.save_hf(tmp_path / "out", model)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((tmp_path / "source" / "config.json").read_text())
    assert written == original


def test_loads_transformers_shards(tmp_path: Path) -> None:
    source = tiny("LlamaForCausalLM")
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = batch()
    assert (
        relative(logits(treenn.load_hf(tmp_path), ids, mask), reference(source, ids, mask)) < 1e-5
    )


def test_loads_a_pytorch_pickle(tmp_path: Path) -> None:
    source = tiny("GPT2LMHeadModel")
    source.config.architectures = ["GPT2LMHeadModel"]
    source.config.save_pretrained(tmp_path)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    ids, mask = batch()
    model = treenn.load_hf(tmp_path)
    assert relative(logits(model, ids, mask), reference(source, ids, mask)) < 1e-5


def test_bfloat16_stays_bfloat16(tmp_path: Path) -> None:
    source = tiny("LlamaForCausalLM").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    dtypes = {
        leaf.dtype for leaf in jax.tree_util.tree_leaves(model) if isinstance(leaf, jax.Array)
    }
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    upcast = treenn.load_hf(tmp_path / "source", dtype=jnp.float32)
    assert upcast.lm_head.weight.dtype == jnp.float32
    treenn.save_hf(tmp_path / "out", model)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight)


def _rewrite(folder: Path, change: Any) -> None:
    arrays = load_file(folder / "model.safetensors")
    change(arrays)
    save_file(arrays, folder / "model.safetensors", metadata={"format": "pt"})


def test_strict_errors_name_the_keys(tmp_path: Path) -> None:
    tiny("LlamaForCausalLM").save_pretrained(tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"

    def edit(arrays: dict[str, np.ndarray]) -> None:
        arrays["model.extra.weight"] = np.zeros(3, np.float32)
        arrays["model.norm.weight"] = np.ones(5, np.float32)
        del arrays[key]

    _rewrite(tmp_path, edit)
    with pytest.raises(treenn.CheckpointError) as err:
        treenn.load_hf(tmp_path)
    text = str(err.value)
    assert f"missing (1): {key!r}" in text
    assert "unexpected (1): 'model.extra.weight'" in text
    assert "'model.norm.weight': file [5], model [32]" in text
    assert isinstance(err.value, ValueError)


def test_base_checkpoint_loads_into_the_head_model(tmp_path: Path) -> None:
    """transformers' prefix rule: a GPT2Model checkpoint (keys without `transformer.`,
    old mask buffers) fills GPT2LMHeadModel's base; the tied head needs nothing more."""
    base = tiny("GPT2Model")
    base.save_pretrained(tmp_path)

    def old_buffers(arrays: dict[str, np.ndarray]) -> None:
        # the hub's gpt2 checkpoint still holds the causal-mask buffers
        arrays["h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
        arrays["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)

    _rewrite(tmp_path, old_buffers)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(config | {"architectures": ["GPT2LMHeadModel"]})
    )
    model = treenn.load_hf(tmp_path)
    assert np.array_equal(
        np.asarray(model.transformer.wte.weight), base.wte.weight.detach().numpy()
    )


def test_save_hf_refuses_lora_adapters(tmp_path: Path) -> None:
    tiny("LlamaForCausalLM").save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    adapted = treenn.lora(model, "**.v_proj", rank=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.v_proj'.*merge"):
        treenn.save_hf(tmp_path / "out", adapted)
    assert not (tmp_path / "out").exists()
    treenn.save_hf(tmp_path / "out", treenn.merge_lora(adapted))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_save_hf_writes_frozen_arrays(tmp_path: Path) -> None:
    tiny("GPT2LMHeadModel").save_pretrained(tmp_path / "source")
    model = treenn.freeze(treenn.load_hf(tmp_path / "source"), "transformer.h.0")
    treenn.save_hf(tmp_path / "out", model)
    assert "transformer.h.0.attn.c_attn.weight" in load_file(tmp_path / "out" / "model.safetensors")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="from_config or load_hf"):
        treenn.save_hf(tmp_path, treenn.nn.Linear(2, 2, key=jax.random.key(0)))
    tiny("GPT2Model").save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        treenn.save_hf(tmp_path / "out", model, max_shard_size="lots")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        treenn.load_hf(tmp_path / "nowhere")
    (tmp_path / "source" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        treenn.load_hf(tmp_path / "source")


# -- PEFT adapters ------------------------------------------------------------------------

# PEFT calls transformers' deprecated `is_gradient_checkpointing` (a FutureWarning).
PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")


def _layer(model: Any, path: str) -> Any:
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@pytest.mark.slow  # imports peft (seconds)
@PEFT_WARNINGS
def test_save_peft_loads_in_peft_and_back(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    import equinox as eqx

    source = tiny("LlamaForCausalLM")
    source.save_pretrained(tmp_path / "base")
    base = treenn.load_hf(tmp_path / "base")
    model = treenn.lora(base, "**.q_proj", rank=4, alpha=8, key=jax.random.key(0))
    model = treenn.lora(model, "**.v_proj", rank=2, alpha=3, key=jax.random.key(1))
    # lora_B starts at zero: give every adapter a delta, so the test sees the adapters
    paths = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    shapes = [_layer(model, p).lora_B.shape for p in paths]
    model = eqx.tree_at(
        lambda m: [_layer(m, p).lora_B for p in paths],
        model,
        [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)],
    )
    ids, mask = batch()
    ours = logits(model, ids, mask)
    assert relative(ours, logits(base, ids, mask)) > 1e-3
    treenn.save_peft(tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {p: 2 for p in paths if p.endswith("v_proj")}
    theirs = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    assert relative(ours, reference(theirs, ids, mask)) < 1e-5
    again = treenn.load_peft(tmp_path / "adapter", base)
    assert relative(logits(again, ids, mask), ours) < 1e-6


@pytest.mark.slow
@PEFT_WARNINGS
def test_load_peft_of_what_peft_writes(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    source = tiny("Qwen2ForCausalLM")
    source.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["k_proj", "o_proj"], use_rslora=True
    )
    adapted = peft.get_peft_model(
        transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), config
    )
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_()
    adapted.eval().save_pretrained(tmp_path / "adapter")
    model = treenn.load_peft(tmp_path / "adapter", treenn.load_hf(tmp_path / "base"))
    assert "model.layers.1.self_attn.o_proj.lora_A" in treenn.statuses(model)
    ids, mask = batch()
    assert relative(logits(model, ids, mask), reference(adapted, ids, mask)) < 1e-5


def test_load_peft_names_what_it_cannot_honour(tmp_path: Path) -> None:
    tiny("LlamaForCausalLM").save_pretrained(tmp_path / "base")
    base = treenn.load_hf(tmp_path / "base")
    treenn.save_peft(
        tmp_path / "adapter", treenn.lora(base, "**.q_proj", rank=2, key=jax.random.key(0))
    )
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        treenn.load_peft(tmp_path / "adapter", base)
    gpt2 = treenn.models.from_config(
        tiny("GPT2LMHeadModel").config.to_dict() | {"architectures": ["GPT2LMHeadModel"]},
        key=jax.random.key(0),
    )
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no layer at 'model.layers.0.self_attn.q_proj'"):
        treenn.load_peft(tmp_path / "adapter", gpt2)
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        treenn.save_peft(tmp_path / "empty", base)


def test_save_hf_over_an_earlier_save_removes_its_stale_weights(tmp_path: Path) -> None:
    tiny("LlamaForCausalLM").save_pretrained(tmp_path / "source")
    model = treenn.load_hf(tmp_path / "source")
    treenn.save_hf(tmp_path / "out", model, max_shard_size=20_000)
    tuned = treenn.load_hf(tmp_path / "source", dtype=jnp.bfloat16)  # a different model
    treenn.save_hf(tmp_path / "out", tuned)  # one file now
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    again = treenn.load_hf(tmp_path / "out")
    assert again.lm_head.weight.dtype == jnp.bfloat16
    treenn.save_hf(tmp_path / "out", model, max_shard_size=20_000)  # and shards again
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert treenn.load_hf(tmp_path / "out").lm_head.weight.dtype == jnp.float32
