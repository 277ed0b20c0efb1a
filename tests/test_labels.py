"""treenn.labels and treenn.layer_decay: per-path optimiser groups (issue 17)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, optax_promotion

import treenn
import treenn.nn as nn


def _sgd_groups(model, groups, rates):
    """One SGD step of gradient 1 everywhere: each array moves by -its group's rate."""
    tx = optax.multi_transform({k: optax.sgd(v) for k, v in rates.items()}, groups)
    params = treenn.trainable(model)
    with optax_promotion():
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(grads, state, params)
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in _by_path(updates).items()}


def _by_path(tree):
    return {p: x for p, x in leaves_by_path(tree) if hasattr(x, "shape")}


def test_labels_plug_into_multi_transform_first_match_wins(net):
    groups = treenn.labels(net, {"head.bias": "bias", "head.**": "head", "**": "body"})
    moved = _sgd_groups(net, groups, {"bias": 1.0, "head": 0.1, "body": 0.01})
    assert moved["head.bias"] == pytest.approx(-1.0)
    assert moved["head.weight"] == pytest.approx(-0.1)
    assert moved["backbone.layers.0.weight"] == pytest.approx(-0.01)
    assert groups.paths["head.weight"] == "head"
    # Buffers are labelled (rules may match them) but are not optimised.
    assert "backbone.layers.1.running_mean" not in moved


def test_unmatched_trainable_array_is_an_error(net):
    with pytest.raises(ValueError, match=r"no rule matches trainable array\(s\) 'backbone"):
        treenn.labels(net, {"head.**": "head"})


def test_rule_matching_no_array_is_an_error(net):
    with pytest.raises(ValueError, match=r"rule 'neck.\*\*' matches no array"):
        treenn.labels(net, {"neck.**": "neck", "**": "rest"})
    with pytest.raises(ValueError, match=r"rule 'head.weight' is never used.*earlier rule"):
        treenn.labels(net, {"**": "rest", "head.weight": "head"})


def test_rule_matching_only_frozen_arrays_counts_as_used(net):
    frozen = treenn.freeze(net, "backbone")
    groups = treenn.labels(frozen, {"backbone.**": "slow", "**": "fast"})
    assert groups.paths["backbone.layers.0.weight"] == "slow"
    # A frozen array needs no rule.
    assert treenn.labels(frozen, {"head": "fast"}).paths == {
        "head.weight": "fast",
        "head.bias": "fast",
    }


def test_bad_rules(net):
    # (Under the runtime type checker these are its TypeErrors; without, treenn's.)
    with pytest.raises(TypeError, match="str"):
        treenn.labels(net, {"**": 1e-3})
    with pytest.raises(TypeError, match="[Mm]apping"):
        treenn.labels(net, ["**"])
    with pytest.raises(TypeError, match="non-empty mapping"):
        treenn.labels(net, {})
    with pytest.raises(ValueError, match=r"where='a\.\.b'|empty path component"):
        treenn.labels(net, {"a..b": "x"})


def test_labels_tree_rooted_at_a_callable_model_would_be_called_by_optax(net):
    # Why labels is a callable: optax calls a callable labels argument, and a
    # model-shaped labels tree is rooted at the (callable) model.
    groups = treenn.labels(net, {"**": "all"})
    tree = groups(treenn.trainable(net))
    assert callable(tree)
    assert set(jax.tree_util.tree_leaves(tree)) == {"all"}


def test_gradual_unfreezing_with_groups(net):
    rules = {"head.**": "head", "backbone.**": "body"}
    model = treenn.freeze(net, "backbone")
    groups = treenn.labels(model, rules)
    tx = optax.multi_transform({"head": optax.adam(1e-2), "body": optax.adam(1e-4)}, groups)
    with optax_promotion():
        state = tx.init(treenn.trainable(model))
    model = treenn.unfreeze(model, "backbone.layers.4")
    state = treenn.migrate_opt_state(tx, state, model)
    params = treenn.trainable(model)
    with optax_promotion():
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
    moved = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in _by_path(updates).items()}
    assert moved["head.weight"] == pytest.approx(-1e-2, rel=1e-3)
    assert moved["backbone.layers.4.weight"] == pytest.approx(-1e-4, rel=1e-3)


# -- layer-wise learning-rate decay -------------------------------------------------------


def test_layer_decay_vit_as_timm(key):
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=3, key=key)
    groups = treenn.layer_decay(vit, 0.5)
    assert groups.scales == {
        "layer_0": 0.5**4,
        "layer_1": 0.5**3,
        "layer_2": 0.5**2,
        "layer_3": 0.5,
        "layer_4": 1.0,
    }
    p = groups.paths
    assert p["cls_token"] == p["pos_embed"] == p["patch_embed.proj.weight"] == "layer_0"
    assert p["blocks.0.attn.qkv.weight"] == "layer_1"
    assert p["blocks.2.mlp.fc2.bias"] == "layer_3"
    assert p["norm.weight"] == p["head.bias"] == "layer_4"
    moved = _sgd_groups(vit, groups, {k: 0.1 * s for k, s in groups.scales.items()})
    assert moved["blocks.1.norm1.weight"] == pytest.approx(-0.1 * 0.25)
    tx = optax.multi_transform(groups.transforms(lambda s: optax.sgd(s)), groups)
    with optax_promotion():
        tx.init(treenn.trainable(vit))


def test_layer_decay_resnet_and_lora(key):
    res = treenn.models.resnet18(3, key=key)
    groups = treenn.layer_decay(res, 0.9)
    assert len(groups.scales) == 10  # stem, 8 blocks, head
    assert groups.paths["conv1.weight"] == groups.paths["bn1.bias"] == "layer_0"
    assert groups.paths["layer1.1.conv2.weight"] == "layer_2"
    assert groups.paths["layer4.1.bn2.weight"] == "layer_8"
    assert groups.paths["fc.weight"] == "layer_9"
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=2, key=key)
    adapted = treenn.lora(treenn.freeze(vit), "**.qkv", rank=2, key=key)
    g = treenn.layer_decay(adapted, 0.75)
    labelled = g(treenn.trainable(adapted))
    assert _by_path(labelled) == {}  # strings are not arrays
    flat = {k: v for k, v in _flat_labels(labelled).items()}
    assert flat == {
        "blocks.0.attn.qkv.lora_A": "layer_1",
        "blocks.0.attn.qkv.lora_B": "layer_1",
        "blocks.1.attn.qkv.lora_A": "layer_2",
        "blocks.1.attn.qkv.lora_B": "layer_2",
    }


def _flat_labels(tree):
    return {p: x for p, x in leaves_by_path(tree) if isinstance(x, str)}


def test_layer_decay_misuse(net, key):
    with pytest.raises(TypeError, match="knows treenn.models.VisionTransformer and ResNet"):
        treenn.layer_decay(net, 0.75)
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=1, key=key)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay="):
            treenn.layer_decay(vit, bad)
    with pytest.raises(ValueError, match="no scales"):
        treenn.labels(vit, {"**": "x"}).transforms(optax.sgd)


def test_unmatched_array_after_surgery_is_named(key):
    model = nn.Sequential(nn.Linear(2, 2, key=key), nn.Linear(2, 2, key=key))
    groups = treenn.labels(treenn.freeze(model, "layers.1"), {"layers.0": "a"})
    with pytest.raises(ValueError, match="no rule matches trainable array 'layers.1.weight'"):
        groups(treenn.trainable(model))
