"""Every helper works on abstract models (`jax.eval_shape`, `eqx.filter_eval_shape` of a
builder) exactly as on concrete ones (API.md §7, last point): the same statuses, modes,
pins and errors, so "build the same structure abstractly, then load" works for every
recipe."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import EqxUser, Net, summary_totals

import treenn
from treenn import nn

# Each surgery of a fine-tuning recipe, as a user writes it.
SURGERIES = {
    "freeze": lambda m: treenn.freeze(m),
    "freeze-path": lambda m: treenn.freeze(m, "backbone.**"),
    "freeze-getter": lambda m: treenn.freeze(m, lambda m: m.head),
    "freeze-class": lambda m: treenn.freeze(m, nn.Conv2d),
    "bitfit": lambda m: treenn.unfreeze(treenn.freeze(m), "**.bias"),
    "freeze-backbone": lambda m: treenn.freeze_backbone(m, "head"),
    "frozen-bn": lambda m: nn.train_mode(nn.eval_mode(m, nn.BatchNorm, pin=True)),
    "mc-dropout": lambda m: nn.train_mode(nn.eval_mode(m), nn.Dropout, pin=True),
    "unpin": lambda m: nn.unpin(treenn.freeze_backbone(m, "head"), "backbone.**"),
    "gradual": lambda m: treenn.unfreeze(
        treenn.freeze_backbone(m, "head"), "backbone.layers.4", unpin=True
    ),
}

ABSTRACT = {"jax.eval_shape": jax.eval_shape, "eqx.filter_eval_shape": eqx.filter_eval_shape}


def build(key: jax.Array) -> Net:
    return Net(key=key)


@pytest.mark.parametrize("make", ABSTRACT.values(), ids=ABSTRACT.keys())
@pytest.mark.parametrize("surgery", SURGERIES.values(), ids=SURGERIES.keys())
def test_surgery_on_an_abstract_model_equals_surgery_on_the_concrete_one(key, surgery, make):
    concrete = surgery(build(key))
    abstract = surgery(make(build, key))
    assert treenn.statuses(abstract) == treenn.statuses(concrete)
    assert nn.pinned(abstract) == nn.pinned(concrete)
    # `trainable` agrees with `statuses` on the abstract model too.
    trainable = jax.tree_util.tree_leaves(treenn.trainable(abstract))
    assert len(trainable) == list(treenn.statuses(abstract).values()).count("trainable")
    assert summary_totals(treenn.summary(abstract)) == summary_totals(treenn.summary(concrete))


@pytest.mark.parametrize("surgery", ["frozen-bn", "mc-dropout", "freeze-backbone"])
def test_modes_set_on_an_abstract_model_are_the_concrete_ones(key, surgery):
    for make in ABSTRACT.values():
        abstract = SURGERIES[surgery](make(build, key))
        assert nn.modes(abstract) == nn.modes(SURGERIES[surgery](build(key)))


def test_filter_eval_shape_keeps_modes_and_eval_shape_says_they_are_unknown(key):
    assert nn.modes(eqx.filter_eval_shape(build, key)) == nn.modes(build(key))
    # jax.eval_shape abstracts the mode bools themselves: unknown, never guessed.
    abstract = jax.eval_shape(build, key)
    assert set(nn.modes(abstract).values()) == {None}
    assert nn.pinned(abstract) == nn.pinned(build(key))
    modes = {row.split()[0]: row.split()[-1] for row in treenn.summary(abstract).splitlines()}
    assert modes["backbone.layers.1.weight"] == "unknown"
    assert nn.modes(nn.eval_mode(abstract)) == nn.modes(nn.eval_mode(build(key)))


@pytest.mark.parametrize("make", ABSTRACT.values(), ids=ABSTRACT.keys())
def test_errors_on_an_abstract_model_are_the_concrete_ones(key, make):
    abstract, concrete = make(build, key), build(key)
    for fn in (
        lambda m: treenn.freeze(m, "nothing.**"),
        lambda m: nn.eval_mode(m, "head"),
        lambda m: nn.train_mode(nn.eval_mode(m, nn.BatchNorm, pin=True), nn.BatchNorm),
    ):
        with pytest.raises(ValueError) as want:
            fn(concrete)
        with pytest.raises(ValueError) as got:
            fn(abstract)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("make", ABSTRACT.values(), ids=ABSTRACT.keys())
def test_labels_and_lora_on_an_abstract_model(key, make):
    abstract = make(build, key)
    labels = treenn.labels(abstract, {"head": "head", "backbone.**": "backbone"})
    assert jax.tree_util.tree_leaves(labels(treenn.trainable(abstract))).count("head") == 2
    adapted = treenn.lora(abstract, "head", rank=2, key=key)
    assert treenn.statuses(adapted) == treenn.statuses(
        treenn.lora(build(key), "head", rank=2, key=key)
    )


def test_an_equinox_model_made_abstract(key):
    # (jax.eval_shape cannot return an eqx.nn.MLP: its activation is no JAX type.)
    abstract = eqx.filter_eval_shape(lambda k: EqxUser(key=k), key)
    frozen = treenn.freeze(abstract, "mlp.layers.0")
    assert treenn.statuses(frozen) == treenn.statuses(
        treenn.freeze(EqxUser(key=key), "mlp.layers.0")
    )
    # The filled-in model behaves as the concrete one: build abstractly, then load.
    concrete = treenn.freeze(EqxUser(key=key), "mlp.layers.0")
    filled = jax.tree_util.tree_map(
        lambda a, c: c, frozen, concrete, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    x = jnp.ones((3,))
    assert jnp.allclose(nn.eval_mode(filled)(x), nn.eval_mode(concrete)(x))
