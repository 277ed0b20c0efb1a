"""The fine-tuning toolkit: load_pretrained, migrate_opt_state, train_step / eval_step,
freeze_backbone."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Net, optax_promotion, paths_with

import treenn
import treenn.nn as nn


def xent(model, x, y, key):
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key=key), y).mean()


# -- load_pretrained ---------------------------------------------------------------------


def test_load_pretrained_fills_matching_paths_and_reports_the_rest(tmp_path, net, key):
    path = tmp_path / "pretrained.safetensors"
    treenn.save(path, net)
    new = Net(key=jax.random.fold_in(key, 7), classes=5)  # another head shape
    with pytest.raises(treenn.CheckpointError, match=r"skip_mismatched.*head\.weight"):
        treenn.load_pretrained(path, new)
    model, report = treenn.load_pretrained(path, new, skip_mismatched=True)
    assert report.skipped == ["head.weight", "head.bias"]
    assert report.missing == [] and report.unexpected == []
    assert "backbone.layers.0.weight" in report.loaded
    assert "backbone.layers.1.running_mean" in report.loaded
    assert jnp.array_equal(model.backbone.layers[0].weight, net.backbone.layers[0].weight)
    assert jnp.array_equal(model.head.weight, new.head.weight)  # kept as initialised


def test_load_pretrained_keeps_the_models_status_and_modes(tmp_path, net):
    path = tmp_path / "p.safetensors"
    treenn.save(path, net)
    like = nn.eval_mode(treenn.freeze(net, "backbone.**"), "backbone.**", pin=True)
    model, _ = treenn.load_pretrained(path, like)
    assert paths_with(model, "frozen") == paths_with(like, "frozen")
    assert nn.pinned(model) == nn.pinned(like)


def test_load_pretrained_reports_missing_and_unexpected(tmp_path, net, key):
    class Bigger(treenn.Module):
        backbone: nn.Sequential
        extra: nn.Linear

    path = tmp_path / "p.safetensors"
    treenn.save(path, net)
    bigger = Bigger(net.backbone, nn.Linear(2, 2, key=key))
    model, report = treenn.load_pretrained(path, bigger)
    assert report.missing == ["extra.weight", "extra.bias"]
    assert report.unexpected == ["head.bias", "head.weight"]
    assert jnp.array_equal(model.extra.weight, bigger.extra.weight)


def test_load_pretrained_with_nothing_in_common_is_an_error(tmp_path, net, key):
    path = tmp_path / "p.safetensors"
    treenn.save(path, nn.Linear(2, 2, key=key))
    with pytest.raises(treenn.CheckpointError, match="no array of the file matches"):
        treenn.load_pretrained(path, net)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        treenn.load_pretrained(tmp_path / "missing.safetensors", net)


def test_load_pretrained_where_every_path_has_another_shape_names_them(tmp_path, key):
    """With skip_mismatched=True and every path of another shape, the error lists the
    model's arrays and why each was skipped (it listed none: they were not 'missing')."""
    path = tmp_path / "p.safetensors"
    treenn.save(path, nn.Linear(2, 3, key=key))
    with pytest.raises(
        treenn.CheckpointError,
        match=r"model: 'bias', 'weight'; skipped for shape/dtype: .*'bias': file float32\[3\]",
    ):
        treenn.load_pretrained(path, nn.Linear(2, 4, key=key), skip_mismatched=True)


# -- migrate_opt_state --------------------------------------------------------------------


def test_migrate_keeps_moments_of_arrays_that_stay_trainable(net, images, labels, key):
    tx = optax.adam(1e-2)
    model = treenn.freeze(net, "backbone.**")
    step = treenn.train_step(xent, tx)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        for i in range(3):
            model, opt_state, _ = step(model, opt_state, images, labels, jax.random.fold_in(key, i))
        unfrozen = treenn.unfreeze(model, "backbone.layers.4")
        migrated = treenn.migrate_opt_state(tx, opt_state, unfrozen)
    adam = migrated[0]
    assert int(adam.count) == 3  # the step count continues
    assert jnp.array_equal(adam.mu.head.weight, opt_state[0].mu.head.weight)  # kept
    assert jnp.array_equal(adam.nu.head.bias, opt_state[0].nu.head.bias)
    assert jnp.all(adam.mu.backbone.layers[4].weight == 0)  # new: fresh
    assert adam.mu.backbone.layers[0].weight is None  # still frozen: no state
    with optax_promotion():  # and it trains on
        model, migrated, loss = step(unfrozen, migrated, images, labels, key)
    assert jnp.isfinite(loss)


def test_migrate_drops_state_of_newly_frozen_arrays(net):
    tx = optax.sgd(0.1, momentum=0.9)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(net))
        migrated = treenn.migrate_opt_state(tx, opt_state, treenn.freeze(net, "head"))
    assert sum(x.size for x in jax.tree_util.tree_leaves(migrated)) < sum(
        x.size for x in jax.tree_util.tree_leaves(opt_state)
    )


def test_migrate_rejects_state_from_another_model(net, key):
    tx = optax.adam(1e-3)
    with optax_promotion():
        other = tx.init(treenn.trainable(nn.Linear(3, 3, key=key)))
        with pytest.raises(ValueError, match=r"opt_state does not fit .*only in opt_state"):
            treenn.migrate_opt_state(tx, other, net)
        wider = Net(key=key, classes=7)
        state = tx.init(treenn.trainable(wider))
        with pytest.raises(ValueError, match=r"at '0\.mu\.head': out_features is 7"):
            treenn.migrate_opt_state(tx, state, net)


# -- train_step / eval_step ----------------------------------------------------------------


def test_train_step_trains_in_training_mode_and_keeps_modes(net, images, labels, key):
    tx = optax.adam(1e-2)
    model = nn.eval_mode(net)  # the user forgot train(): the step does not care
    step = treenn.train_step(xent, tx)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        losses = []
        for i in range(6):
            model, opt_state, loss = step(
                model, opt_state, images, labels, jax.random.fold_in(key, i)
            )
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert nn.modes(model) == nn.modes(nn.eval_mode(net))  # modes as they went in
    bn = model.backbone.layers[1]
    assert not jnp.array_equal(bn.running_mean, net.backbone.layers[1].running_mean)


def test_train_step_respects_pins(net, images, labels, key):
    tx = optax.sgd(0.1)
    model = nn.eval_mode(net, nn.BatchNorm, pin=True)
    step = treenn.train_step(xent, tx)
    with optax_promotion():
        model, _, _ = step(model, tx.init(treenn.trainable(model)), images, labels, key)
    bn = model.backbone.layers[1]
    assert jnp.array_equal(bn.running_mean, net.backbone.layers[1].running_mean)


def test_train_step_with_aux_and_eval_step(net, images, labels, key):
    tx = optax.sgd(0.1)

    def loss_with_accuracy(model, x, y, key):
        logits = model(x, key=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    step = treenn.train_step(loss_with_accuracy, tx, has_aux=True)
    with optax_promotion():
        model, _, (loss, accuracy) = step(net, tx.init(treenn.trainable(net)), images, labels, key)
    assert 0.0 <= float(accuracy) <= 1.0 and jnp.isfinite(loss)
    predict = treenn.eval_step(lambda m, x: m(x))
    expected = nn.eval_mode(model)(images)
    assert jnp.allclose(predict(model, images), expected)
    assert jnp.array_equal(predict(model, images), predict(model, images))  # dropout off


def test_eval_step_keeps_mc_dropout_pins(net, images, key):
    mc = nn.train_mode(net, nn.Dropout, pin=True)
    sample = treenn.eval_step(lambda m, x, k: m(x, key=k))
    a, b = sample(mc, images, jax.random.key(1)), sample(mc, images, jax.random.key(2))
    assert not jnp.allclose(a, b)


# -- freeze_backbone -----------------------------------------------------------------------


def test_freeze_backbone_recipe(net, images, labels, key):
    model = treenn.freeze_backbone(net, "head")
    assert paths_with(model, "trainable") == {"head.weight", "head.bias"}
    assert all(nn.pinned(model).values()) and all(nn.modes(model).values())
    tx = optax.adam(1e-2)
    step = treenn.train_step(xent, tx)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 1 + 2 * (4 * 3 + 3)
        trained, _, _ = step(model, opt_state, images, labels, key)
    # Arrays only: the modes (bool leaves) differ, freeze_backbone pins evaluation mode.
    before, after = (
        [x for x in jax.tree_util.tree_leaves(m.backbone) if eqx.is_array(x)]
        for m in (net, trained)
    )
    assert len(before) == len(after) >= 6  # two convs, a BatchNorm with its statistics
    assert all(jnp.array_equal(a, b) for a, b in zip(before, after))  # stats included
    assert not jnp.array_equal(trained.head.weight, net.head.weight)


def test_freeze_backbone_errors(net):
    with pytest.raises(ValueError, match="name the head"):
        treenn.freeze_backbone(net, None)
    with pytest.raises(ValueError, match="nope"):
        treenn.freeze_backbone(net, "nope")


def test_train_step_matches_the_hand_written_step(net, images, labels, key):
    tx = optax.sgd(0.05)

    @treenn.jit
    def by_hand(model, opt_state):
        def loss_fn(model):
            logits, model = treenn.apply(model, images, key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), model

        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        return treenn.apply_updates(model, updates), loss

    with optax_promotion():
        opt_state = tx.init(treenn.trainable(net))
        expected, expected_loss = by_hand(net, opt_state)
        got, _, loss = treenn.train_step(xent, tx)(net, opt_state, images, labels, key)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
