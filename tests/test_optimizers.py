"""optax interop: `treenn.migrate_opt_state` across gradual unfreezing with partitioned
transforms, and `treenn.train_step` with transforms that take extra arguments."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, optax_promotion

import treenn
import treenn.nn as nn


class Small(treenn.Module):
    """conftest's Net with Linear layers (cheap to compile): `backbone.layers.{0..4}`
    (Linear, BatchNorm, relu, Dropout, Linear) and `head` (Linear)."""

    backbone: nn.Sequential
    head: nn.Linear

    def __init__(self, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.backbone = nn.Sequential(
            nn.Linear(3, 4, key=k1),
            nn.BatchNorm(4),
            jax.nn.relu,
            nn.Dropout(0.25),
            nn.Linear(4, 4, key=k2),
        )
        self.head = nn.Linear(4, 3, key=k3)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.head(self.backbone(x, key=key))


@pytest.fixture
def net(key: jax.Array) -> Small:
    return Small(key=key)


@pytest.fixture
def images(key: jax.Array) -> jax.Array:  # the conftest fixtures' names, rows of 3 features
    return jax.random.normal(jax.random.fold_in(key, 1), (6, 3))


def xent(model: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key=key), y).mean()


def arrays(tree: Any) -> dict[str, Any]:
    """Dotted path -> value of every array leaf (marks unwrapped)."""
    return {path: x for path, x in leaves_by_path(tree) if isinstance(x, jax.Array)}


# -- migrate_opt_state: gradual unfreezing with per-group transforms ------------------------


def by_part(params: Any) -> Any:
    """optax labels: the head's arrays train at the head's rate, the rest at the body's."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "head" if path[0].name == "head" else "body", params
    )


def groups(body_lr: float = 1e-3) -> optax.GradientTransformation:
    return optax.multi_transform({"head": optax.adam(1e-2), "body": optax.adam(body_lr)}, by_part)


PARTITIONED = {
    "multi_transform": groups,
    # The same groups by treenn.labels: it labels by path, so one optimiser serves
    # every stage.
    "treenn.labels": lambda: optax.multi_transform(
        {"head": optax.adam(1e-2), "body": optax.adam(1e-3)},
        treenn.labels(Small(key=jax.random.key(0)), {"head.**": "head", "**": "body"}),
    ),
    "masked": lambda: optax.masked(
        optax.adam(1e-2), lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
    ),
    # Muon for the head's (2-D) weight, AdamW for the rest: two groups, MaskedNodes in each.
    "muon": lambda: optax.contrib.muon(1e-2),
}


# Gradual unfreezing: first the head's bias alone; then the head's weight and the last
# conv join (new state in their groups); then the head's weight is frozen again (its state
# is dropped).
STAGES = [
    lambda m: treenn.freeze(m, lambda m: (m.backbone, m.head.weight)),
    lambda m: treenn.unfreeze(m, lambda m: (m.backbone.layers[4], m.head.weight)),
    lambda m: treenn.freeze(m, "head.weight"),
]


# The group state that restarts at a stage: the group held no trainable array before it
# (in the first stage, only the head's bias trains). `masked`'s one group leaves biases
# out, so its whole state restarts.
RESTARTED = {
    ("multi_transform", 1): "inner_states.body.",
    ("treenn.labels", 1): "inner_states.body.",
    ("masked", 1): "",
    ("muon", 1): "inner_states.muon.",
}


@pytest.mark.parametrize("name", PARTITIONED)
def test_migrate_through_gradual_unfreezing_with_partitioned_transforms(
    name, net, images, labels, key
):
    """Regression: after `unfreeze`, a state of `multi_transform`, `masked` or `muon` (which
    hold optax's MaskedNode where a plain state holds None) was refused as "not from this
    model". State carries over for arrays that stay trainable, starts afresh for new ones,
    and training goes on."""
    tx = PARTITIONED[name]()
    step = treenn.train_step(xent, tx)
    model = STAGES[0](net)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        model, opt_state, _ = step(model, opt_state, images, labels, key)
        for index, stage in enumerate(STAGES[1:], 1):
            model = stage(model)
            old = arrays(opt_state)
            migrated = treenn.migrate_opt_state(tx, opt_state, model)
            expected = tx.init(treenn.trainable(model))
            assert jax.tree.structure(migrated) == jax.tree.structure(expected)
            fresh, new = arrays(expected), arrays(migrated)
            assert new.keys() == fresh.keys()
            # A group that held no trainable array restarts (its count too); elsewhere
            # state is carried where it was, fresh for new arrays.
            restarted = RESTARTED.get((name, index))
            for path, value in new.items():
                if restarted is not None and path.startswith(restarted):
                    np.testing.assert_array_equal(value, fresh[path], path)
                else:
                    np.testing.assert_array_equal(value, old.get(path, fresh[path]), path)
            carried = [p for p in new if p in old and not p.startswith(restarted or "@")]
            assert any("count" in p for p in carried) or (index == 1 and name == "masked")
            assert any("count" not in p for p in carried) or (index == 1 and name == "masked")
            if index == 1:  # the conv's state starts afresh
                assert any("layers.4" in p for p in new) and not any("layers.4" in p for p in old)
            before = arrays(model)
            model, opt_state, _ = step(model, migrated, images, labels, key)
            after = arrays(model)
            trained = {p for p in before if not np.array_equal(before[p], after[p])}
            assert {"backbone.layers.4.weight", "head.bias"} <= trained
            assert ("head.weight" in trained) == (index == 1)
            assert "backbone.layers.0.weight" not in trained  # still frozen


def test_unfrozen_arrays_train_at_their_groups_learning_rate(net, images, labels, key):
    """Per-group learning rates through gradual unfreezing: a backbone array unfrozen
    later moves at the backbone's rate (twice the rate, twice the step), the head at its
    own."""
    moved = []
    for body_lr in (1e-3, 2e-3):
        tx = groups(body_lr)
        step = treenn.train_step(xent, tx)
        model = STAGES[0](net)
        with optax_promotion():
            opt_state = tx.init(treenn.trainable(model))
            model, opt_state, _ = step(model, opt_state, images, labels, key)
            model = STAGES[1](model)
            opt_state = treenn.migrate_opt_state(tx, opt_state, model)
            after, _, _ = step(model, opt_state, images, labels, key)
        moved.append({p: arrays(after)[p] - arrays(model)[p] for p in arrays(model)})
    slow, fast = moved
    conv = "backbone.layers.4.weight"
    assert float(jnp.abs(slow[conv]).max()) > 0
    np.testing.assert_allclose(fast[conv], 2 * slow[conv], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(fast["head.bias"], slow["head.bias"])


def _updates_after_unfreezing(tx: Any, model: Any, steps: int) -> tuple[Any, Any, Any]:
    """`steps` updates with the backbone frozen, then unfreeze it, migrate the state, and
    take one more: `(updates, params, grads)` of that last one (gradients of ones and
    twos: any will do, Adam's first update is their sign)."""
    params = treenn.trainable(model)
    with optax_promotion():
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        for _ in range(steps):
            _, state = tx.update(grads, state, params)
        model = treenn.unfreeze(model)
        state = treenn.migrate_opt_state(tx, state, model)
        params = treenn.trainable(model)
        grads = jax.tree.map(lambda a: jnp.full_like(a, 2.0), params)
        updates, _ = tx.update(grads, state, params)
    return updates, params, grads


def _fresh_adam(params: Any, grads: Any, lr: float) -> dict[str, Any]:
    adam = optax.adam(lr)
    with optax_promotion():
        return arrays(adam.update(grads, adam.init(params), params)[0])


def test_a_group_unfrozen_after_training_updates_as_a_fresh_adam(net):
    """Regression: a `multi_transform` group whose arrays were all frozen kept the step
    count its (empty) Adam state had counted, so after `unfreeze` + `migrate_opt_state`
    its first updates were those of Adam at step 11 with zero moments (0.48x a fresh
    Adam's here, 3.2x after many steps). Now the group restarts: its first update is a
    fresh Adam's; the head's group keeps its count."""
    groups = treenn.labels(net, {"head.**": "head", "**": "body"})
    tx = optax.multi_transform({"head": optax.adam(1e-2), "body": optax.adam(1e-3)}, groups)
    updates, params, grads = _updates_after_unfreezing(tx, treenn.freeze(net, "backbone"), 10)
    fresh, moved = _fresh_adam(params, grads, 1e-3), arrays(updates)
    body = [p for p in moved if p.startswith("backbone.")]
    assert len(body) == 6  # both Linears' and the BatchNorm's weights and biases
    for path in body:
        np.testing.assert_allclose(moved[path], fresh[path], rtol=1e-6, err_msg=path)
    # The head trained on: its step is not a first step's (moments of ones, new gradient 2).
    head = _fresh_adam(params, grads, 1e-2)
    assert not np.allclose(moved["head.weight"], head["head.weight"], rtol=1e-3)


def test_a_plain_adam_gives_new_arrays_its_step_count_as_documented(net):
    """One count for every array (plain `optax.adam`) cannot restart for new arrays: as
    `migrate_opt_state`'s docstring says, their first update is `(1 - b1) / (1 - b1**t)
    * sqrt((1 - b2**t) / (1 - b2))` times a fresh Adam's, `t` the old count plus one."""
    updates, params, grads = _updates_after_unfreezing(
        optax.adam(1e-3), treenn.freeze(net, "backbone"), 10
    )
    t, b1, b2 = 11, 0.9, 0.999
    ratio = (1 - b1) / (1 - b1**t) * np.sqrt((1 - b2**t) / (1 - b2))
    assert ratio == pytest.approx(0.482, abs=1e-3)
    fresh, moved = _fresh_adam(params, grads, 1e-3), arrays(updates)
    for path in ("backbone.layers.0.weight", "backbone.layers.4.bias"):
        np.testing.assert_allclose(moved[path], ratio * fresh[path], rtol=1e-4, err_msg=path)


def test_a_state_that_held_no_array_restarts(net):
    """Everything frozen, then unfrozen: the whole state held no array, so it restarts
    (the first update is a fresh Adam's), even with one shared count."""
    updates, params, grads = _updates_after_unfreezing(optax.adam(1e-3), treenn.freeze(net), 5)
    fresh, moved = _fresh_adam(params, grads, 1e-3), arrays(updates)
    assert moved.keys() == fresh.keys()
    for path in moved:
        np.testing.assert_allclose(moved[path], fresh[path], rtol=1e-6, err_msg=path)


def test_migrate_error_for_a_state_not_kept_per_array_does_not_blame_the_model(net):
    """Regression: `optax.flatten` keeps one vector for all arrays, so its shape changes
    with the trainable set; the error said the state "does not come from this model"."""
    tx = optax.flatten(optax.adam(1e-3))
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(treenn.freeze(net, "head")))
    with pytest.raises(ValueError, match=r"holds float32\[\d+\] at '0\.mu'.*optax\.flatten") as err:
        treenn.migrate_opt_state(tx, opt_state, net)
    assert "does not come from this model" not in str(err.value)


def test_migrate_names_another_transforms_state(net):
    with optax_promotion():
        opt_state = optax.adam(1e-3).init(treenn.trainable(net))
    with pytest.raises(ValueError, match=r"same state arrays, but other state types"):
        treenn.migrate_opt_state(optax.adabelief(1e-3), opt_state, net)


# -- train_step: value=, grad= and value_fn= for transforms that take extra arguments -------


def test_reduce_on_plateau_gets_the_loss(net, images, labels, key):
    """Regression: `train_step` did not pass `value=`, so reduce_on_plateau failed inside
    optax. With a learning rate of 0 the loss is flat: after `patience` steps the scale
    halves, and the best value is the loss the step returned."""
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=2, accumulation_size=1)
    tx = optax.chain(optax.sgd(0.0), plateau)
    step = treenn.train_step(xent, tx)
    model = net
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(net))
        scales = []
        for _ in range(3):
            model, opt_state, loss = step(model, opt_state, images, labels, key)
            scales.append(float(opt_state[1].scale))
    assert scales == [1.0, 1.0, 0.5]
    assert float(opt_state[1].best_value) == float(loss)


def mse(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


@pytest.fixture
def regression(key: jax.Array) -> tuple[nn.Linear, jax.Array, jax.Array]:
    kx, ky, kl = jax.random.split(key, 3)
    x, y = jax.random.normal(kx, (16, 3)), jax.random.normal(ky, (16, 2))
    return nn.Linear(3, 2, key=kl), x, y


def test_polyak_sgd_gets_the_loss_and_the_gradient(regression):
    """Regression: polyak_sgd needs `value=`. Its step is -(loss - f_min) / |g|^2 * g."""
    model, x, y = regression
    tx = optax.polyak_sgd(max_learning_rate=1e3, f_min=0.0, eps=0.0)
    with optax_promotion():
        new, _, loss = treenn.train_step(mse, tx)(model, tx.init(treenn.trainable(model)), x, y)
    value, grads = treenn.value_and_grad(mse)(model, x, y)
    np.testing.assert_allclose(float(loss), float(value), rtol=1e-6)
    with optax_promotion():  # with auxiliary output, value= is still the loss alone
        new_aux, _, (loss_aux, aux) = treenn.train_step(
            lambda m, x, y: (mse(m, x, y), "aux"), tx, has_aux=True
        )(model, tx.init(treenn.trainable(model)), x, y)
    assert float(loss_aux) == float(loss)
    np.testing.assert_array_equal(new_aux.weight, new.weight)
    norm = float(jnp.sum(grads.weight**2) + jnp.sum(grads.bias**2))
    for name in ("weight", "bias"):
        expected = getattr(model, name) - float(value) / norm * getattr(grads, name)
        np.testing.assert_allclose(getattr(new, name), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # the zoom line search through BatchNorm and Dropout: ~50 s to compile
def test_lbfgs_line_search_gets_the_loss_function(net, images, labels, key):
    """Regression: lbfgs's line search needs `value=`, `grad=` and `value_fn=`. The value
    it keeps is the loss at the new arrays, batch fixed: the next step's loss; the loss
    decreases each step (the line search's sufficient decrease)."""
    tx = optax.lbfgs()
    step = treenn.train_step(xent, tx)
    model = net
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(net))
        losses, kept = [], []
        for _ in range(3):
            model, opt_state, loss = step(model, opt_state, images, labels, key)
            losses.append(float(loss))
            kept.append(float(opt_state[-1].value))
    np.testing.assert_allclose(losses[1:], kept[:-1], rtol=1e-5)
    assert losses[0] > losses[1] > losses[2]


def test_lbfgs_solves_least_squares(regression):
    """value_fn is the loss at given trainable arrays: on a linear least-squares problem
    lbfgs reaches NumPy's solution."""
    model, x, y = regression
    tx = optax.lbfgs()
    step = treenn.train_step(mse, tx)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
        for _ in range(12):
            model, opt_state, _ = step(model, opt_state, x, y)
    design = np.concatenate([np.asarray(x), np.ones((16, 1), np.float32)], axis=1)
    solution = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(model.weight).T, solution[:3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.bias), solution[3], atol=1e-4)


def test_a_transform_needing_another_argument_is_named(net, images, labels, key):
    def update(
        updates: Any, state: Any, params: Any = None, *, temperature: Any, **extra: Any
    ) -> Any:
        return updates, state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    with pytest.raises(
        TypeError,
        match=r"train_step: tx\.update needs 1 required keyword-only argument: 'temperature'.*"
        r"value= \(the loss\), grad= and value_fn=",
    ):
        treenn.train_step(xent, tx)(net, optax.EmptyState(), images, labels, key)


def test_a_plain_transform_wrapping_one_that_needs_the_loss_is_named(net, images, labels, key):
    plateau = optax.contrib.reduce_on_plateau()
    tx = optax.GradientTransformation(plateau.init, plateau.update)  # extra args lost
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(net))
    with pytest.raises(
        TypeError,
        match=r"needs 1 required keyword-only argument: 'value'.*plain "
        r"optax\.GradientTransformation",
    ):
        treenn.train_step(xent, tx)(net, opt_state, images, labels, key)


def test_an_extra_args_transform_that_takes_no_extra_arguments_is_named(net, images, labels, key):
    tx = optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), lambda updates, state, params=None: (updates, state)
    )
    with pytest.raises(
        TypeError,
        match=r"train_step: tx is an optax\.GradientTransformationExtraArgs.*"
        r"must accept \*\*extra_args",
    ):
        treenn.train_step(xent, tx)(net, optax.EmptyState(), images, labels, key)


def test_a_type_error_inside_the_update_is_not_blamed_on_its_arguments(net, images, labels, key):
    """Regression: train_step read CPython's TypeError wording to tell what tx.update
    lacked, so a bug inside an update (a call missing an argument) was reported as
    "tx.update needs ... 'scale'", an argument tx.update does not have. The arguments are
    now checked from the update's signature, and an error inside it is left as it is."""

    def scaled(x: Any, *, scale: Any) -> Any:
        return x * scale

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return jax.tree.map(lambda g: scaled(g), updates), state  # type: ignore[call-arg]

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    with pytest.raises(TypeError, match=r"scaled\(\) missing 1 required keyword-only") as err:
        treenn.train_step(xent, tx)(net, optax.EmptyState(), images, labels, key)
    assert "train_step" not in str(err.value)


def test_the_update_signature_is_named_with_every_missing_argument(net, images, labels, key):
    def update(updates: Any, state: Any, params: Any = None, *, a: Any, b: Any) -> Any:
        return updates, state

    tx = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    with pytest.raises(
        TypeError,
        match=r"tx\.update needs 2 required keyword-only arguments: 'a', 'b', and tx is a "
        r"plain optax\.GradientTransformation.*\(update\(updates.*, \*, a.*, b",
    ):
        treenn.train_step(xent, tx)(net, optax.EmptyState(), images, labels, key)
