"""Equinox interop: treenn models under Equinox's and JAX's own tools, and treenn's
helpers on plain Equinox models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EqxUser, Net

import treenn
import treenn.nn as nn


def arrays_equal(a: Any, b: Any) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def loss(model: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(model(x)))


def abs_sum(x: Any) -> float:
    """Sum of absolute values of the array(s) in `x` (seen through status marks, which a
    plain Equinox layer's attribute access does not unwrap)."""
    return float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(x)))


# -- treenn.Module is an Equinox module ------------------------------------------------------


def test_treenn_module_is_an_equinox_module(net: Net) -> None:
    assert issubclass(treenn.Module, eqx.Module)
    for module in (
        net,
        net.backbone,
        net.head,
        net.backbone[1],
        net.backbone[3],
        nn.LayerNorm(3),
        nn.Lambda(jnp.tanh),
    ):
        assert isinstance(module, eqx.Module)
        assert dataclasses.is_dataclass(module)
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.head = net.head  # type: ignore[misc]


def test_inference_is_a_bool_leaf_as_in_equinox(net: Net) -> None:
    """As on Equinox's layers, `inference` is an ordinary field holding a Python bool
    leaf (so `tree_at`-based helpers flip it); sizes and wrapped functions are static.
    Filtered transforms treat the bools as static (see test_filter_jit)."""
    leaves = jax.tree_util.tree_leaves(net)
    assert len(leaves) == 12
    assert sum(isinstance(x, jax.Array) for x in leaves) == 10
    assert [x for x in leaves if not isinstance(x, jax.Array)] == [False, False]
    for cls in (nn.Dropout, nn.DropPath, nn.BatchNorm):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert not fields["inference"].metadata.get("static", False)
        assert "pinned" not in fields  # the pin is a mark around the bool
    assert {f.name for f in dataclasses.fields(nn.Dropout) if f.metadata.get("static")} == {"p"}


# -- Equinox transforms on treenn models -------------------------------------------------------


def test_filter_jit(net: Net, images: jax.Array, key: jax.Array) -> None:
    model = treenn.freeze(nn.eval_mode(net), "backbone.**")
    call = eqx.filter_jit(lambda m, x: m(x))
    np.testing.assert_allclose(
        np.asarray(call(model, images)), np.asarray(model(images)), rtol=1e-5, atol=1e-6
    )

    # Training step with state: treenn.apply inside filter_jit, model returned.
    step = eqx.filter_jit(lambda m, x, k: treenn.apply(m, x, key=k))
    out, new = step(net, images, key)
    eager_out, eager_new = treenn.apply(net, images, key=key)
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(new.backbone[1].running_var),
        np.asarray(eager_new.backbone[1].running_var),
        rtol=1e-5,
    )
    assert not np.array_equal(
        np.asarray(new.backbone[1].running_var), np.asarray(net.backbone[1].running_var)
    )
    # Statuses come back through filter_jit.
    same = eqx.filter_jit(lambda m: m)(model)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(model)
    assert treenn.trainable(same).backbone[0].weight is None


def test_filter_grad_gives_zero_to_frozen_arrays_and_buffers(net: Net, images: jax.Array) -> None:
    # Eval mode: the loss depends on the running statistics, which still get no gradient.
    model = treenn.freeze(nn.eval_mode(net), "backbone.layers.0")
    grads = eqx.filter_grad(loss)(model, images)
    arrays = eqx.filter(model, eqx.is_inexact_array)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(arrays)
    bn = grads.backbone[1]
    assert abs_sum(grads.backbone[0].weight) == 0 and abs_sum(grads.backbone[0].bias) == 0  # frozen
    assert abs_sum(bn.running_mean) == 0 and abs_sum(bn.running_var) == 0  # buffers
    assert (
        abs_sum(bn.weight) > 0
        and abs_sum(grads.backbone[4].weight) > 0
        and abs_sum(grads.head.weight) > 0
    )
    # The trainable gradients agree with treenn.grad.
    tgrads = treenn.grad(loss)(model, images)
    np.testing.assert_allclose(
        np.asarray(grads.head.weight), np.asarray(tgrads.head.weight), rtol=1e-5, atol=1e-7
    )
    assert tgrads.backbone[0].weight is None


def test_filter_value_and_grad_with_aux(net: Net, images: jax.Array, key: jax.Array) -> None:
    def loss_fn(m: Net, x: jax.Array, k: jax.Array) -> tuple[jax.Array, Net]:
        out, m = treenn.apply(m, x, key=k)
        return jnp.mean(jnp.square(out)), m

    (value, new), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(net, images, key)
    (t_value, t_new), t_grads = treenn.value_and_grad(loss_fn, has_aux=True)(net, images, key)
    assert float(value) == pytest.approx(float(t_value), rel=1e-6)
    assert abs_sum(grads.head.weight) > 0
    np.testing.assert_allclose(
        np.asarray(grads.head.weight), np.asarray(t_grads.head.weight), rtol=1e-5, atol=1e-7
    )
    assert abs_sum(grads.backbone[1].running_mean) == 0
    np.testing.assert_allclose(
        np.asarray(new.backbone[1].running_mean),
        np.asarray(t_new.backbone[1].running_mean),
        rtol=1e-6,
    )


def test_partition_and_combine(net: Net, images: jax.Array) -> None:
    model = nn.eval_mode(treenn.freeze(net, "head"))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    assert len(jax.tree_util.tree_leaves(params)) == 10  # frozen arrays and buffers are arrays too
    assert jax.tree_util.tree_leaves(static) == [True, True]  # the modes: bool leaves
    back = eqx.combine(params, static)
    assert eqx.tree_equal(back, model)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model)
    assert treenn.trainable(back).head.weight is None
    np.testing.assert_array_equal(np.asarray(back(images)), np.asarray(model(images)))
    # treenn.partition's trainable half holds None at modes (so optimiser states do not
    # depend on modes); both combines rebuild the model.
    train, rest = treenn.partition(model)
    assert eqx.tree_equal(treenn.combine(train, rest), model)
    assert eqx.tree_equal(eqx.combine(train, rest), model)
    train2, _ = treenn.partition(nn.train_mode(model, pin=True))
    assert jax.tree_util.tree_structure(train2) == jax.tree_util.tree_structure(train)


def test_tree_at_keeps_status(net: Net) -> None:
    model = treenn.freeze(net, "head.weight")
    new_w = jnp.full((3, 4), 2.0)
    edited = eqx.tree_at(lambda m: m.head.weight, model, new_w)
    np.testing.assert_array_equal(np.asarray(edited.head.weight), np.asarray(new_w))
    trainable = treenn.trainable(edited)
    assert trainable.head.weight is None  # still frozen
    assert trainable.head.bias is not None
    # A trainable array stays trainable, a buffer stays a buffer.
    edited = eqx.tree_at(
        lambda m: (m.head.bias, m.backbone[1].running_mean), edited, (jnp.ones(3), jnp.ones(4))
    )
    trainable = treenn.trainable(edited)
    assert trainable.head.bias is not None and trainable.backbone[1].running_mean is None
    assert jax.tree_util.tree_structure(edited) == jax.tree_util.tree_structure(model)
    # Replacing a whole submodule works too.
    swapped = eqx.tree_at(lambda m: m.head, model, nn.Linear(4, 3, key=jax.random.key(9)))
    assert treenn.trainable(swapped).head.weight is not None


def test_tree_serialise_and_deserialise_leaves(tmp_path: Path, net: Net) -> None:
    model = treenn.freeze(net, "backbone.**")
    path = tmp_path / "leaves.eqx"
    eqx.tree_serialise_leaves(path, model)
    like = treenn.freeze(Net(key=jax.random.key(42)), "backbone.**")
    assert not arrays_equal(like, model)
    loaded = eqx.tree_deserialise_leaves(path, like)
    assert arrays_equal(loaded, model)
    assert treenn.trainable(loaded).backbone[0].weight is None
    assert eqx.tree_equal(loaded, model)


def test_tree_equal(net: Net) -> None:
    assert eqx.tree_equal(net, Net(key=jax.random.key(0)))
    assert not eqx.tree_equal(net, Net(key=jax.random.key(1)))
    frozen = treenn.freeze(net, "head")
    assert eqx.tree_equal(frozen, treenn.freeze(net, "head"))
    assert not eqx.tree_equal(frozen, net)  # different status, different tree
    assert not eqx.tree_equal(nn.eval_mode(net), net)  # different mode


def test_jax_tree_util(net: Net) -> None:
    model = treenn.freeze(net, "head")
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, model)
    np.testing.assert_allclose(np.asarray(doubled.head.weight), 2 * np.asarray(net.head.weight))
    assert treenn.trainable(doubled).head.weight is None  # status kept by tree_map
    assert treenn.trainable(doubled).backbone[1].running_mean is None
    leaves, treedef = jax.tree_util.tree_flatten(model)
    assert eqx.tree_equal(jax.tree_util.tree_unflatten(treedef, leaves), model)
    assert len(leaves) == len(jax.tree_util.tree_leaves(net))


def test_keystr_paths_unchanged_by_freezing(net: Net) -> None:
    def paths(model: Any, **kwargs: Any) -> list[str]:
        return [
            jax.tree_util.keystr(p, **kwargs) for p, _ in jax.tree_util.tree_leaves_with_path(model)
        ]

    frozen = treenn.freeze(net)  # frozen parameters, and buffers: every leaf marked
    assert paths(frozen) == paths(net)
    assert ".head.weight" in paths(frozen)
    assert ".backbone.layers[1].running_var" in paths(frozen)


def test_keystr_simple_paths_gain_only_a_trailing_separator(net: Net) -> None:
    """The default `keystr` is unchanged by freezing (above). Its `simple=True` form joins
    every key with the separator, the status mark's empty one included, so marked arrays
    (frozen arrays, buffers) end with one separator: documented in the README."""

    def paths(model: Any) -> list[str]:
        return [
            jax.tree_util.keystr(p, simple=True, separator=".")
            for p, _ in jax.tree_util.tree_leaves_with_path(model)
        ]

    assert "head.weight" in paths(net)
    assert "backbone.layers.1.running_var." in paths(net)
    assert [p.rstrip(".") for p in paths(treenn.freeze(net))] == [p.rstrip(".") for p in paths(net)]


# -- filtered transforms on whole treenn models (plain jax.jit/grad: not promised) ---------------


def test_filter_jit_with_batchnorm_and_dropout(net: Net, images: jax.Array, key: jax.Array) -> None:
    @eqx.filter_jit
    def step(model: Net, x: jax.Array, k: jax.Array) -> tuple[jax.Array, Net]:
        return treenn.apply(model, x, key=k)

    out, new = step(net, images, key)
    eager_out, eager_new = treenn.apply(net, images, key=key)
    assert out.shape == (6, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(new.backbone[1].running_mean),
        np.asarray(eager_new.backbone[1].running_mean),
        rtol=1e-5,
        atol=1e-7,
    )
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(net)
    # Modes are bool leaves, static to filtered jit: an eval-mode model is a different
    # specialisation, deterministic.
    ev = nn.eval_mode(new)
    a, same = step(ev, images, key)
    b, _ = step(ev, images, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert arrays_equal(same, ev)


def test_filter_grad_of_whole_model(net: Net, images: jax.Array) -> None:
    model = treenn.freeze(nn.eval_mode(net), "head")
    grads = eqx.filter_grad(loss)(model, images)
    assert abs_sum(grads.head.weight) == 0 and abs_sum(grads.head.bias) == 0
    assert abs_sum(grads.backbone[1].running_var) == 0
    assert abs_sum(grads.backbone[0].weight) > 0


# -- modes: Equinox's inference_mode vs nn.eval_mode --------------------------------------------


def test_equinox_inference_mode_and_tree_at_on_treenn_layers(net: Net) -> None:
    """Issue 13: `eqx.nn.inference_mode` and `eqx.tree_at` on `inference` work on treenn
    models (they raised "not a leaf" while `inference` was static) and agree with
    `nn.modes`. They know no pins: an explicit call does what it says, the pin stays."""
    evaluated = eqx.nn.inference_mode(net)
    assert nn.modes(evaluated) == {"backbone.layers.1": True, "backbone.layers.3": True}
    assert eqx.tree_equal(evaluated, nn.eval_mode(net))
    back = eqx.nn.inference_mode(evaluated, value=False)
    assert eqx.tree_equal(back, net)
    assert nn.modes(eqx.nn.inference_mode(nn.Dropout(0.5))) == {"": True}
    edited = eqx.tree_at(lambda m: m.backbone.layers[3].inference, net, True)
    assert nn.modes(edited) == {"backbone.layers.1": False, "backbone.layers.3": True}
    # Pinned: the explicit Equinox call switches it, and the pin survives.
    pinned = nn.eval_mode(net, "backbone.layers.1", pin=True)
    switched = eqx.tree_at(lambda m: m.backbone.layers[1].inference, pinned, False)
    assert nn.modes(switched)["backbone.layers.1"] is False
    assert nn.pinned(switched)["backbone.layers.1"] is True
    assert nn.modes(eqx.nn.inference_mode(pinned, value=False))["backbone.layers.1"] is False
    assert nn.pinned(eqx.nn.inference_mode(pinned, value=False))["backbone.layers.1"] is True


class Mixed(eqx.Module):
    """A plain Equinox module mixing treenn and Equinox mode-bearing layers."""

    ours: nn.Dropout
    bn: nn.BatchNorm
    theirs: eqx.nn.Dropout
    their_bn: eqx.nn.BatchNorm


def _mixed() -> tuple[Mixed, Any]:
    return eqx.nn.make_with_state(Mixed)(
        nn.Dropout(0.5),
        nn.BatchNorm(3),
        eqx.nn.Dropout(0.5),
        eqx.nn.BatchNorm(3, "batch", mode="batch"),
    )


def test_eval_mode_works_on_treenn_and_equinox_layers() -> None:
    model, _ = _mixed()
    assert nn.modes(model) == {"ours": False, "bn": False, "theirs": False, "their_bn": False}
    ev = nn.eval_mode(model)
    assert nn.modes(ev) == {"ours": True, "bn": True, "theirs": True, "their_bn": True}
    assert ev.theirs.inference is True and ev.ours.inference is True
    assert nn.modes(nn.train_mode(ev)) == {
        "ours": False,
        "bn": False,
        "theirs": False,
        "their_bn": False,
    }
    # Equinox's own helper still works on Equinox layers.
    assert eqx.nn.inference_mode(EqxUser(key=jax.random.key(0))).drop.inference is True


def test_pins_work_on_equinox_layers() -> None:
    """Issue 13: pinning an Equinox layer raised `cannot pin ... it has no pinned field`."""
    model, state = _mixed()
    pinned = nn.eval_mode(model, "their*", pin=True)
    assert nn.pinned(pinned) == {"ours": False, "bn": False, "theirs": True, "their_bn": True}
    trained = nn.train_mode(pinned)
    assert nn.modes(trained) == {"ours": False, "bn": False, "theirs": True, "their_bn": True}
    # The pinned Equinox dropout really runs in evaluation mode (the identity).
    x = jnp.ones((4, 3))
    assert jnp.array_equal(trained.theirs(x, key=jax.random.key(0)), x)
    assert isinstance(trained.theirs, eqx.nn.Dropout)
    assert trained.theirs.inference is True  # a bool, never a mark
    unpinned = nn.unpin(trained)
    assert nn.pinned(unpinned) == dict.fromkeys(("ours", "bn", "theirs", "their_bn"), False)
    assert type(unpinned.theirs) is eqx.nn.Dropout  # the original class again


# -- treenn helpers on plain Equinox models --------------------------------------------------------


def test_treenn_helpers_on_equinox_mlp(key: jax.Array) -> None:
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=key)
    frozen = treenn.freeze(mlp, "layers.0")
    x = jnp.arange(3.0)
    np.testing.assert_allclose(
        np.asarray(frozen(x)), np.asarray(mlp(x)), rtol=1e-6
    )  # still callable
    trainable, rest = treenn.partition(frozen)
    assert trainable.layers[0].weight is None and trainable.layers[0].bias is None
    assert trainable.layers[1].weight is not None
    assert eqx.tree_equal(treenn.combine(trainable, rest), frozen)
    grads = treenn.grad(lambda m, x: jnp.sum(m(x) ** 2))(frozen, x)
    assert grads.layers[0].weight is None and abs_sum(grads.layers[2].weight) > 0
    # The Equinox transforms give the frozen layer zero gradient too.
    egrads = eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2))(frozen, x)
    assert abs_sum(egrads.layers[0].weight) == 0
    np.testing.assert_allclose(
        np.asarray(egrads.layers[2].weight), np.asarray(grads.layers[2].weight), rtol=1e-5
    )
    # Whole-model freeze of an Equinox root; unfreeze restores.
    assert jax.tree_util.tree_leaves(treenn.trainable(treenn.freeze(mlp))) == []
    assert eqx.tree_equal(treenn.unfreeze(treenn.freeze(mlp)), mlp)


@pytest.mark.parametrize(
    "make",
    [lambda k: eqx.nn.Linear(2, 3, key=k), lambda k: nn.Linear(2, 3, key=k)],
    ids=["eqx", "treenn"],
)
def test_freeze_a_root_layer(key: jax.Array, make: Any) -> None:
    layer = make(key)
    frozen = treenn.freeze(layer)
    assert isinstance(frozen, type(layer))
    assert frozen.weight.shape == (3, 2)
    trainable = treenn.trainable(frozen)
    assert trainable.weight is None and trainable.bias is None
    x = jnp.ones((2,))
    np.testing.assert_array_equal(np.asarray(frozen(x)), np.asarray(layer(x)))
    assert abs_sum(jax.grad(lambda m: jnp.sum(m(x)))(frozen)) == 0
    assert treenn.trainable(treenn.unfreeze(frozen)).weight is not None


def test_filter_vmap_ensemble_keeps_status(key: jax.Array) -> None:
    make = lambda k: treenn.freeze(nn.Linear(2, 3, key=k), "weight")
    ensemble = eqx.filter_vmap(make)(jax.random.split(key, 4))
    assert ensemble.weight.shape == (4, 3, 2)
    trainable = treenn.trainable(ensemble)
    assert trainable.weight is None and trainable.bias.shape == (4, 3)
    out = eqx.filter_vmap(lambda m, x: m(x), in_axes=(eqx.if_array(0), None))(ensemble, jnp.ones(2))
    assert out.shape == (4, 3)
    np.testing.assert_allclose(
        np.asarray(out[1]), np.asarray(make(jax.random.split(key, 4)[1])(jnp.ones(2))), rtol=1e-6
    )


def test_treenn_helpers_on_equinox_layers_inside_user_module(
    eqx_user: EqxUser, key: jax.Array, tmp_path: Path
) -> None:
    x = jnp.ones((3,))
    ev = nn.eval_mode(eqx_user)
    assert ev.drop.inference is True
    np.testing.assert_array_equal(
        np.asarray(ev(x)), np.asarray(ev.mlp(x))
    )  # eval dropout: identity
    frozen = treenn.freeze(ev, "mlp.layers.0")
    assert "frozen" in treenn.summary(frozen)
    path = tmp_path / "u.safetensors"
    treenn.save(path, frozen)
    loaded = treenn.load(path, EqxUser(key=jax.random.key(3)))
    assert eqx.tree_equal(loaded, frozen)
    assert loaded.drop.inference is True


def test_equinox_batchnorm_inside_user_module(key: jax.Array) -> None:
    class User(eqx.Module):
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm

        def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            return self.bn(self.lin(x), state)

    model, state = eqx.nn.make_with_state(User)(
        eqx.nn.Linear(3, 4, key=key), eqx.nn.BatchNorm(4, "batch", mode="batch")
    )
    model = treenn.freeze(model, "bn")
    assert (
        treenn.trainable(model).bn.weight is None and treenn.trainable(model).lin.weight is not None
    )
    x = jax.random.normal(key, (5, 3))

    def run(m: User, s: Any) -> tuple[jax.Array, Any]:
        return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)

    out, state = run(model, state)
    assert out.shape == (5, 4)
    np.testing.assert_allclose(np.asarray(out.mean(0)), np.zeros(4), atol=1e-5)  # batch statistics
    grads = eqx.filter_grad(lambda m: jnp.sum(run(m, state)[0] * jnp.arange(4.0)[None, :]))(model)
    assert abs_sum(grads.bn.weight) == 0 and abs_sum(grads.lin.weight) > 0
    ev = nn.eval_mode(model)
    assert ev.bn.inference is True
    out_eval, _ = run(ev, state)
    assert not np.allclose(np.asarray(out_eval), np.asarray(out))  # running statistics in eval mode


def test_treenn_layers_inside_equinox_containers(key: jax.Array) -> None:
    seq = eqx.nn.Sequential([nn.Linear(3, 4, key=key), nn.Lambda(jax.nn.relu), nn.Dropout(0.5)])
    x = jnp.ones((2, 3))
    y = seq(x, key=key)
    assert y.shape == (2, 4)
    ev = nn.eval_mode(seq)
    np.testing.assert_allclose(np.asarray(ev(x)), np.asarray(jax.nn.relu(seq[0](x))), rtol=1e-6)
    assert nn.modes(ev) == {"layers.2": True}
