"""The model zoo: architectures (parameter counts of the reference implementations),
torchvision/timm paths, forward shapes, training, and selectors on real models."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import is_array, optax_promotion, paths_with

import treenn
import treenn.nn as nn
from treenn import models


def parameter_count(factory, **kwargs) -> int:
    """Parameters (not buffers) of a full-size model, without allocating it."""
    shapes = jax.eval_shape(lambda k: factory(key=k, **kwargs), jax.random.key(0))
    # `statuses` lists the arrays in the model's leaf order, as `tree_leaves` does.
    kinds = treenn.statuses(shapes).values()
    leaves = [x for x in jax.tree_util.tree_leaves(shapes) if is_array(x)]
    counted = ("trainable", "frozen")  # not buffers nor integer arrays
    return sum(math.prod(x.shape) for s, x in zip(kinds, leaves, strict=True) if s in counted)


@pytest.mark.parametrize(
    "factory, expected",
    [
        # torchvision's numbers: sum(p.numel() for p in model.parameters()).
        (models.resnet18, 11_689_512),
        (models.resnet34, 21_797_672),
        (models.resnet50, 25_557_032),
        # timm's vit_tiny_patch16_224 and vit_small_patch16_224.
        (models.vit_tiny, 5_717_416),
        (models.vit_small, 22_050_664),
    ],
)
def test_full_size_parameter_counts_match_the_references(factory, expected):
    assert parameter_count(factory) == expected


@functools.cache
def small_resnet(factory=models.resnet18, **kwargs):
    # Built once per configuration: models are immutable, tests share them.
    return factory(5, width=4, small_input=True, key=jax.random.key(0), **kwargs)


@functools.cache
def small_vit(**kwargs):
    options = dict(img_size=8, patch_size=4, depth=2)
    return models.vit_tiny(5, key=jax.random.key(0), **(options | kwargs))


def test_resnet_paths_follow_torchvision():
    paths = paths_with(small_resnet(), "trainable") | paths_with(small_resnet(), "buffer")
    for path in [
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert path in paths
    assert "layer1.0.downsample.0.weight" not in paths  # same width, stride 1
    bottleneck = paths_with(small_resnet(models.resnet50), "trainable")
    assert {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight"} <= bottleneck
    assert "conv1.bias" not in paths  # torchvision's convolutions have no bias


def test_vit_paths_follow_timm():
    paths = paths_with(small_vit(), "trainable")
    for path in [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
        "head.weight",
    ]:
        assert path in paths


def shape_of(fn, *args):
    """The output shape of `fn(*args)`, traced, not compiled (shapes only: the numerics
    are checked against torchvision in test_torch_loading.py)."""
    return eqx.filter_eval_shape(fn, *args).shape


def images(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.mark.parametrize(
    "factory",
    [models.resnet18, models.resnet34, pytest.param(models.resnet50, marks=pytest.mark.slow)],
)
def test_resnet_forward_shapes(factory):
    model = small_resnet(factory)
    assert shape_of(lambda m, x: treenn.apply(m, x)[0], model, images(2, 8, 8, 3)) == (2, 5)
    # No batch axis.
    assert shape_of(lambda m, x: m(x), nn.eval_mode(model), images(8, 8, 3)) == (5,)


def test_resnet_imagenet_stem_downsamples_by_32():
    model = eqx.filter_eval_shape(models.resnet18, 3, width=4, key=jax.random.key(0))
    assert shape_of(lambda m, x: treenn.apply(m, x)[0], model, images(2, 64, 64, 3)) == (2, 3)
    assert shape_of(lambda m, x: treenn.apply(m, x)[0], model, images(2, 32, 32, 3)) == (2, 3)


@pytest.mark.slow
def test_vit_forward_shapes_and_image_size_check():
    model = nn.eval_mode(small_vit())
    assert model(jnp.ones((2, 8, 8, 3))).shape == (2, 5)
    assert model(jnp.ones((3, 2, 8, 8, 3))).shape == (3, 2, 5)
    with pytest.raises(ValueError, match="img_size"):
        model(jnp.ones((2, 12, 12, 3)))
    with pytest.raises(ValueError, match="divisible"):
        models.vit_tiny(5, img_size=10, patch_size=4, key=jax.random.key(0))


def train(model, x, y, steps=8):
    tx = optax.adam(3e-3)

    def loss_fn(model, key):
        logits, model = treenn.apply(model, x, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model

    @treenn.jit
    def step(model, opt_state, key):
        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, key)
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt_state, loss

    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        losses = []
        for i in range(steps):
            model, opt_state, loss = step(model, opt_state, jax.random.key(i))
            losses.append(float(loss))
    return model, losses


@pytest.mark.slow
@pytest.mark.parametrize("make", [small_resnet, lambda: small_vit(drop_path_rate=0.1)])
def test_a_few_training_steps_reduce_the_loss(make):
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    y = jnp.arange(8) % 5
    model, losses = train(make(), x, y)
    assert losses[-1] < losses[0]


def test_resnet_selectors_read_like_torchvision():
    model = small_resnet()
    frozen = treenn.freeze(model, "layer1.**")
    assert paths_with(frozen, "frozen") == {
        p for p in paths_with(model, "trainable") if p.startswith("layer1.")
    }
    bn_eval = nn.eval_mode(model, "layer1.**")
    modes = nn.modes(bn_eval)
    assert all(v for p, v in modes.items() if p.startswith("layer1."))
    assert not any(v for p, v in modes.items() if not p.startswith("layer1."))
    # The frozen-backbone recipe: everything but fc frozen, BatchNorm pinned in eval.
    probe = nn.eval_mode(treenn.unfreeze(treenn.freeze(model), "fc"), nn.BatchNorm, pin=True)
    assert paths_with(probe, "trainable") == {"fc.weight", "fc.bias"}
    assert all(nn.modes(nn.train_mode(probe)).values())


def test_vit_selectors_read_like_timm():
    model = small_vit(drop_path_rate=0.1)
    frozen = treenn.freeze(model, "blocks.*.attn")
    assert paths_with(frozen, "frozen") == {
        f"blocks.{i}.attn.{name}.{p}"
        for i in range(2)
        for name in ("qkv", "proj")
        for p in ("weight", "bias")
    }
    evaluated = nn.modes(nn.eval_mode(model, "blocks.*.attn"))
    assert evaluated["blocks.0.attn.attn_drop"] is True
    assert evaluated["blocks.0.drop_path1"] is False
    assert evaluated["pos_drop"] is False
