"""treenn.labels and treenn.layer_decay: per-path optimiser groups (issue 17)."""

from __future__ import annotations

import re

import equinox as eqx
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
    assert p["head.weight"] == p["head.bias"] == "layer_4"
    moved = _sgd_groups(vit, groups, {k: 0.1 * s for k, s in groups.scales.items()})
    assert moved["blocks.1.norm1.weight"] == pytest.approx(-0.1 * 0.25)
    tx = optax.multi_transform(groups.transforms(lambda s: optax.sgd(s)), groups)
    with optax_promotion():
        tx.init(treenn.trainable(vit))


# timm 1.0.x (timm/models/vision_transformer.py, timm/models/resnet.py): the models'
# group_matcher(coarse=False), which timm.optim's param_groups_layer_decay groups by.
TIMM_MATCHERS = {
    "vit": {
        "stem": r"^cls_token|reg_token|pos_embed|patch_embed",
        "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
    },
    "resnet": {"stem": r"^conv1|bn1|maxpool", "blocks": r"^layer(\d+)\.(\d+)"},
}


def _timm_layer_ids(names, matcher):
    """timm's layer id of each parameter name: timm's own `group_with_matcher` when
    timm is installed, else this transcription of it (timm/models/_manipulate.py):
    each name gets the ordinal tuple of the first regex matching it (unmatched: last),
    tuples are numbered in sorted order, and one ending in 99999 (MATCH_PREV_GROUP)
    joins the group before it."""
    try:
        from timm.models._manipulate import group_with_matcher
    except ImportError:
        pass
    else:
        return group_with_matcher([(n, None) for n in names], matcher, reverse=True)
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        for regex, suffix in spec if isinstance(spec, list) else [(spec, None)]:
            compiled.append((re.compile(regex), (ordinal,), suffix))

    def key(name):
        for regex, prefix, suffix in compiled:
            found = regex.match(name)
            if found:
                parts = filter(None, (prefix, found.groups(), suffix))
                return tuple(float(x) for part in parts for x in part)
        return (float("inf"),)

    keys = {name: key(name) for name in names}
    layer, ids = -1, {}
    for k in sorted(set(keys.values())):
        if layer < 0 or k[-1] != 99999:
            layer += 1
        ids[k] = layer
    return {name: ids[k] for name, k in keys.items()}


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_layer_decay_groups_as_timm(arch, key):
    """Regression: the ViT's final norm had the head's scale; timm groups it with the
    last block. Every parameter's layer (and so its scale) is timm's."""
    if arch == "vit":
        model = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=3, key=key)
    else:
        model = treenn.models.resnet18(3, width=4, key=key)
    groups = treenn.layer_decay(model, 0.75)
    params = [p for p, s in treenn.statuses(model).items() if s == "trainable"]
    timm_ids = _timm_layer_ids(params, TIMM_MATCHERS[arch])
    assert {p: int(groups.paths[p].removeprefix("layer_")) for p in params} == timm_ids
    top = max(timm_ids.values())  # timm: scale = layer_decay ** (top - layer id)
    assert groups.scales == {f"layer_{i}": 0.75 ** (top - i) for i in range(top + 1)}
    if arch == "vit":
        assert groups.paths["norm.weight"] == groups.paths["blocks.2.norm2.weight"] == "layer_3"


def test_layer_decay_asks_the_model_for_its_layers(key):
    """A model of one's own, Equinox's or treenn's, names its layers with layer_groups():
    groups in order, each a selector or a list of them; the rest is the head."""

    class Tower(eqx.Module):
        embed: eqx.nn.Linear
        blocks: tuple[eqx.nn.Linear, ...]
        out: eqx.nn.Linear

        def __init__(self, key):
            keys = jax.random.split(key, 4)
            self.embed = eqx.nn.Linear(2, 2, key=keys[0])
            self.blocks = (eqx.nn.Linear(2, 2, key=keys[1]), eqx.nn.Linear(2, 2, key=keys[2]))
            self.out = eqx.nn.Linear(2, 2, key=keys[3])

        def layer_groups(self):
            return ["embed.**", [lambda m: m.blocks[0], "blocks.1.bias"], "blocks.1.weight"]

        def __call__(self, x):
            return x

    groups = treenn.layer_decay(Tower(key), 0.5)
    assert groups.paths == {
        "embed.weight": "layer_0",
        "embed.bias": "layer_0",
        "blocks.0.weight": "layer_1",
        "blocks.0.bias": "layer_1",
        "blocks.1.bias": "layer_1",
        "blocks.1.weight": "layer_2",
        "out.weight": "layer_3",
        "out.bias": "layer_3",
    }
    assert groups.scales == {"layer_0": 0.125, "layer_1": 0.25, "layer_2": 0.5, "layer_3": 1.0}

    class Headless(Tower):
        def layer_groups(self):  # every array in a group: no head, no error
            return ["embed", "blocks", "out"]

    assert set(treenn.layer_decay(Headless(key), 0.5).paths.values()) == {
        "layer_0",
        "layer_1",
        "layer_2",
    }

    class Typo(Tower):
        def layer_groups(self):
            return ["embed", "blcoks", "out"]

    with pytest.raises(ValueError, match=r"treenn\.layer_decay: rule 'blcoks' matches no array"):
        treenn.layer_decay(Typo(key), 0.5)

    class NotAList(Tower):
        def layer_groups(self):
            return "embed"

    with pytest.raises(TypeError, match=r"NotAList\.layer_groups\(\) returned 'embed'"):
        treenn.layer_decay(NotAList(key), 0.5)


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
    with pytest.raises(TypeError, match=r"Net has no layer_groups\(\) method.*add one"):
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
