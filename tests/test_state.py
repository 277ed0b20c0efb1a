"""treenn.apply: (out, model) with BatchNorm running statistics updated as in PyTorch,
and errors, never silent loss, where the statistics could not reach the model."""

from __future__ import annotations

import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import treenn
import treenn.nn as nn
from treenn import _state

EPS = 1e-5


def expected_stats(x, mean=0.0, var=1.0, momentum=0.1):
    """PyTorch's update over every axis but the last, in float64 numpy."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    new_mean = (1 - momentum) * mean + momentum * x.mean(axis=0)
    new_var = (1 - momentum) * var + momentum * x.var(axis=0, ddof=1)
    return new_mean, new_var


def expected_train_output(x, weight=1.0, bias=0.0):
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    return (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + EPS) * weight + bias


def assert_stats(bn, mean, var):
    np.testing.assert_allclose(np.asarray(bn.running_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.running_var), var, rtol=1e-5, atol=1e-6)


@pytest.fixture
def bn():
    return nn.BatchNorm(3)


@pytest.fixture
def x(key):
    # Channels with distinct means and spreads, so a wrong axis or estimator shows.
    z = jax.random.normal(jax.random.fold_in(key, 2), (4, 2, 3))
    return z * jnp.array([1.0, 2.0, 0.5])[None, None] + jnp.array([0.5, -1.0, 3.0])[None, None]


def _is_buffer(model, getter) -> bool:
    """Still a buffer: not trainable and not an array of treenn.trainable."""
    return (
        getter(treenn.trainable(model)) is None and getter(treenn.partition(model)[1]) is not None
    )


# -- the update ----------------------------------------------------------------------------


def test_apply_updates_running_stats_like_pytorch(bn, x):
    out, new = treenn.apply(bn, x)
    mean, var = expected_stats(x)
    assert_stats(new, mean, var)
    np.testing.assert_allclose(np.asarray(out), expected_train_output(x), rtol=1e-4, atol=1e-5)
    # The input model is untouched; buffers stay buffers; parameters are shared.
    assert_stats(bn, np.zeros(3), np.ones(3))
    assert _is_buffer(new, lambda m: m.running_mean) and _is_buffer(new, lambda m: m.running_var)
    assert new.weight is bn.weight and new.bias is bn.bias
    assert new.momentum == 0.1 and new.eps == EPS and new.inference is False
    # A second step continues from the new statistics.
    _, newer = treenn.apply(new, 2 * x)
    assert_stats(newer, *expected_stats(2 * x, mean, var))


def test_apply_custom_momentum_and_affine(x):
    layer = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        nn.BatchNorm(3, momentum=0.3),
        (
            jnp.array([1.0, 2.0, 3.0]),
            jnp.array([0.0, 1.0, -1.0]),
        ),
    )
    out, new = treenn.apply(layer, x)
    assert_stats(new, *expected_stats(x, momentum=0.3))
    np.testing.assert_allclose(
        np.asarray(out),
        expected_train_output(x, np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, -1.0])),
        rtol=1e-4,
        atol=1e-5,
    )


def _net_expectation(net, images):
    h = np.asarray(net.backbone.layers[0](images))
    return expected_stats(h)


def test_apply_on_net_changes_only_the_statistics(net, images, key):
    out, new = treenn.apply(net, images, key=key)
    assert out.shape == (6, 3)
    assert_stats(new.backbone.layers[1], *_net_expectation(net, images))
    assert jtu.tree_structure(new) == jtu.tree_structure(net)
    old_pairs, _ = jtu.tree_flatten_with_path(net)
    new_leaves = jtu.tree_leaves(new)
    changed = {jtu.keystr(p) for (p, a), b in zip(old_pairs, new_leaves) if a is not b}
    assert changed == {".backbone.layers[1].running_mean", ".backbone.layers[1].running_var"}
    assert nn.modes(new) == nn.modes(net)
    assert treenn.summary(new).splitlines()[-1] == treenn.summary(net).splitlines()[-1]


def test_apply_keeps_frozen_marks(net, images, key):
    frozen = treenn.freeze(net, "backbone.**")
    _, new = treenn.apply(frozen, images, key=key)
    assert treenn.trainable(new).backbone.layers[1].weight is None
    assert jtu.tree_structure(new) == jtu.tree_structure(frozen)
    assert_stats(new.backbone.layers[1], *_net_expectation(net, images))


@pytest.mark.parametrize("how", ["treenn.jit", "eqx.filter_jit"])
def test_apply_under_jit(net, images, key, how):
    # Filtered jits only: modes are bool leaves, as in Equinox (plain jax.jit not promised).
    jit = {"treenn.jit": treenn.jit, "eqx.filter_jit": eqx.filter_jit}[how]
    out, new = jit(lambda m, x, k: treenn.apply(m, x, key=k))(net, images, key)
    eager_out, eager = treenn.apply(net, images, key=key)
    np.testing.assert_allclose(out, eager_out, rtol=1e-5, atol=1e-6)
    assert_stats(new.backbone.layers[1], *_net_expectation(net, images))
    assert treenn.trainable(new).backbone.layers[1].running_mean is None


def test_apply_inside_value_and_grad_has_aux(bn, x):
    def loss_fn(model, x):
        out, model = treenn.apply(model, x)
        return jnp.sum(out * jnp.arange(3.0)[None, None]), model

    (loss, new), grads = treenn.value_and_grad(loss_fn, has_aux=True)(bn, x)
    assert_stats(new, *expected_stats(x))
    assert grads.running_mean is None and grads.running_var is None
    # d loss / d bias = count * channel index; the statistics carry no gradient.
    np.testing.assert_allclose(grads.bias, 8.0 * np.arange(3.0), rtol=1e-6)
    assert _is_buffer(new, lambda m: m.running_var)
    jitted = treenn.jit(treenn.value_and_grad(loss_fn, has_aux=True))
    (loss_j, new_j), _ = jitted(bn, x)
    assert_stats(new_j, *expected_stats(x))
    np.testing.assert_allclose(loss_j, loss, rtol=1e-5, atol=1e-5)


# -- errors instead of lost statistics ----------------------------------------------------


def test_training_batchnorm_outside_apply_raises(bn, x, net, images, key):
    with pytest.raises(RuntimeError, match=r"treenn\.apply"):
        bn(x)
    with pytest.raises(RuntimeError, match=r"treenn\.apply"):
        eqx.filter_jit(lambda m, x: m(x))(bn, x)
    with pytest.raises(RuntimeError, match=r"treenn\.apply"):
        treenn.jit(lambda m, x: m(x))(bn, x)
    with pytest.raises(RuntimeError, match=r"treenn\.apply"):
        net(images, key=key)


class InTransform(treenn.Module):
    bn: nn.BatchNorm
    how: str = eqx.field(static=True)

    def __call__(self, x):
        if self.how == "vmap":
            return jax.vmap(self.bn)(x)
        if self.how == "scan":
            return jax.lax.scan(lambda c, xi: (c, self.bn(xi)), None, x)[1]
        if self.how == "checkpoint":
            return jax.checkpoint(lambda x: self.bn(x))(x)
        return jax.jit(lambda x: self.bn(x))(x)


@pytest.mark.parametrize("how", ["vmap", "scan", "checkpoint", "jit"])
def test_batchnorm_inside_inner_transform_raises(bn, x, how):
    model = InTransform(bn, how)
    with pytest.raises(RuntimeError, match="transform"):
        treenn.apply(model, x)
    with pytest.raises(RuntimeError, match="transform"):
        treenn.jit(treenn.apply)(model, x)
    # No residue: a plain apply still works afterwards.
    _, new = treenn.apply(bn, x)
    assert_stats(new, *expected_stats(x))


def test_inner_transform_in_eval_mode_is_fine(bn, x):
    model = nn.eval_mode(InTransform(bn, "vmap"))
    out, new = treenn.apply(model, x)
    assert new is model
    np.testing.assert_allclose(out, x / np.sqrt(1 + EPS), rtol=1e-5)


def test_eval_mode_batchnorm_outside_apply(bn, x):
    _, trained = treenn.apply(bn, x)
    evaluated = nn.eval_mode(trained)
    mean, var = expected_stats(x)
    want = (np.asarray(x, np.float64) - mean) / np.sqrt(var + EPS)
    np.testing.assert_allclose(evaluated(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        eqx.filter_jit(lambda m, x: m(x))(evaluated, x), want, rtol=1e-4, atol=1e-5
    )
    out, same = treenn.apply(evaluated, x)
    assert same is evaluated
    assert_stats(same, mean, var)


def test_batchnorm_not_in_model_raises(x):
    stranger = nn.BatchNorm(3)

    class Outsider(treenn.Module):
        scale: jax.Array

        def __call__(self, x):
            return stranger(x) * self.scale[None, None]

    class Creator(treenn.Module):
        def __call__(self, x):
            return nn.BatchNorm(3)(x)

    with pytest.raises(RuntimeError, match="not part of the model"):
        treenn.apply(Outsider(jnp.ones(3)), x)
    with pytest.raises(RuntimeError, match="not part of the model"):
        treenn.apply(Creator(), x)


# -- sharing, nesting, exceptions, threads ------------------------------------------------


class Twice(treenn.Module):
    bn: nn.BatchNorm

    def __call__(self, x):
        return self.bn(self.bn(x))


def test_batchnorm_called_twice_updates_twice(bn, x):
    out, new = treenn.apply(Twice(bn), x)
    m1, v1 = expected_stats(x)
    y1 = expected_train_output(x)
    assert_stats(new.bn, *expected_stats(y1, m1, v1))
    np.testing.assert_allclose(out, expected_train_output(y1), rtol=1e-4, atol=1e-4)
    # Under jit the same.
    _, new_j = treenn.jit(treenn.apply)(Twice(bn), x)
    assert_stats(new_j.bn, *expected_stats(y1, m1, v1))


def test_shared_batchnorm_object_in_two_places(bn, x):
    class Shared(treenn.Module):
        a: nn.BatchNorm
        b: nn.BatchNorm

        def __call__(self, x):
            return self.b(self.a(x))

    _, new = treenn.apply(Shared(bn, bn), x)
    m1, v1 = expected_stats(x)
    m2, v2 = expected_stats(expected_train_output(x), m1, v1)
    assert_stats(new.a, m2, v2)
    assert_stats(new.b, m2, v2)


def test_nested_apply(bn, x):
    seen = []

    class Outer(treenn.Module):
        inner: nn.BatchNorm
        bn: nn.BatchNorm

        def __call__(self, x):
            y, new_inner = treenn.apply(self.inner, x)
            seen.append(new_inner)
            return self.bn(y)

    out, new = treenn.apply(Outer(bn, nn.BatchNorm(3)), x)
    y = expected_train_output(x)
    assert_stats(seen[0], *expected_stats(x))
    assert_stats(new.bn, *expected_stats(y))
    np.testing.assert_allclose(out, expected_train_output(y), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"treenn\.apply"):
        bn(x)


def test_exception_inside_model_leaves_no_residue(bn, x):
    class Boom(treenn.Module):
        bn: nn.BatchNorm

        def __call__(self, x):
            self.bn(x)
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        treenn.apply(Boom(bn), x)
    with pytest.raises(RuntimeError, match=r"outside `?treenn\.apply"):
        bn(x)
    _, new = treenn.apply(bn, x)
    assert_stats(new, *expected_stats(x))  # one update, not two
    _, again = treenn.apply(Twice(bn), x)  # weight sharing starts from the model's stats
    m1, v1 = expected_stats(x)
    assert_stats(again.bn, *expected_stats(expected_train_output(x), m1, v1))


def test_concurrent_apply_in_threads(bn, x):
    barrier = threading.Barrier(2)

    class Sync(treenn.Module):
        bn: nn.BatchNorm

        def __call__(self, x):
            barrier.wait(timeout=60)  # both threads are inside apply before either records
            y = self.bn(x)
            barrier.wait(timeout=60)  # and both have recorded before either leaves
            return y

    inputs = [x, 3.0 * x + 1.0]
    results: list = [None, None]
    errors: list = []

    def work(i):
        try:
            results[i] = treenn.apply(Sync(bn), inputs[i])
        except BaseException as err:  # reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        out, new = results[i]
        assert_stats(new.bn, *expected_stats(inputs[i]))
        np.testing.assert_allclose(out, expected_train_output(inputs[i]), rtol=1e-4, atol=1e-4)


def test_model_without_state_is_returned_as_is(key, net, images):
    lin = nn.Linear(3, 2, key=key)
    inputs = jnp.ones((2, 3))
    out, same = treenn.apply(lin, inputs)
    assert same is lin
    np.testing.assert_allclose(out, lin(inputs))
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=key)
    _, same = treenn.apply(mlp, inputs[0])
    assert same is mlp
    evaluated = nn.eval_mode(net)
    out, same = treenn.apply(evaluated, images)
    assert same is evaluated
    np.testing.assert_allclose(out, evaluated(images), rtol=1e-6)


def test_apply_passes_args_and_kwargs(bn, x):
    class Scaled(treenn.Module):
        bn: nn.BatchNorm

        def __call__(self, x, factor, *, offset):
            return self.bn(x * factor + offset)

    _, new = treenn.apply(Scaled(bn), x, 2.0, offset=1.0)
    assert_stats(new.bn, *expected_stats(2.0 * np.asarray(x) + 1.0))


# -- issue 21, defect 5: apply inside a transform within a model (rematerialisation) -------


def _block(key):
    return nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4))


class OwnRemat(treenn.Module):
    """A user's remat of a block: the block's model comes out of the checkpoint, but a
    model's `__call__` has no way to hand it to the enclosing apply."""

    block: nn.Sequential
    how: str = eqx.field(static=True)

    def __call__(self, x):
        if self.how == "eqx.filter_checkpoint":
            out, _ = eqx.filter_checkpoint(treenn.apply)(self.block, x)
        else:
            out, _ = jax.checkpoint(lambda x: treenn.apply(self.block, x))(x)
        return out


@pytest.mark.parametrize("how", ["eqx.filter_checkpoint", "jax.checkpoint"])
def test_apply_inside_a_checkpoint_within_the_model_raises_naming_the_layer(key, how):
    """Used to return the model unchanged: the statistics were silently dropped."""
    model = OwnRemat(_block(key), how)
    x = jax.random.normal(key, (8, 3))
    match = r"nn\.BatchNorm\(4\) at 'layers\.1'.*inside the model's `__call__`.*nn\.eval_mode"
    with pytest.raises(RuntimeError, match=match):
        treenn.apply(model, x)
    with pytest.raises(RuntimeError, match=match):
        treenn.jit(treenn.apply)(model, x)
    # Evaluation mode records nothing: fine.
    evaluated = nn.eval_mode(model)
    assert treenn.apply(evaluated, x)[1] is evaluated


class Remat(treenn.Module):
    """Rematerialisation as treenn's wrappers do it: the block runs through `apply`
    inside the checkpoint, and `_state.through` records the statistics of the block
    that comes out into the enclosing apply."""

    block: nn.Sequential
    how: str = eqx.field(static=True, default="eqx.filter_checkpoint")
    times: int = eqx.field(static=True, default=1)

    def __call__(self, x):
        for _ in range(self.times):
            if self.how == "eqx.filter_checkpoint":
                call = lambda b, x=x: eqx.filter_checkpoint(treenn.apply)(b, x)  # noqa: E731
            else:
                call = lambda b, x=x: jax.checkpoint(lambda x: treenn.apply(b, x))(x)  # noqa: E731
            x = _state.through(self.block, call)
        return x


@pytest.mark.parametrize("how", ["eqx.filter_checkpoint", "jax.checkpoint"])
def test_remat_through_records_the_statistics_into_the_enclosing_apply(key, how):
    block, x = _block(key), jax.random.normal(key, (8, 3))
    want_out, want = treenn.apply(block, x)
    for run in (treenn.apply, treenn.jit(treenn.apply)):
        out, new = run(Remat(block, how), x)
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
        assert_stats(new.block.layers[1], want.layers[1].running_mean, want.layers[1].running_var)
        assert _is_buffer(new, lambda m: m.block.layers[1].running_mean)


def test_remat_through_a_block_run_twice_continues_from_its_first_run(key):
    # 4 -> 4 features, so that the block can run on its own output.
    block = nn.Sequential(nn.Linear(4, 4, key=key), nn.BatchNorm(4))
    x = jax.random.normal(key, (8, 4))
    y, once = treenn.apply(block, x)
    _, twice = treenn.apply(once, y)
    _, new = treenn.apply(Remat(block, times=2), x)
    got = new.block.layers[1]
    assert_stats(got, twice.layers[1].running_mean, twice.layers[1].running_var)


def test_remat_through_in_train_step_gives_the_plain_models_step(key):
    block, x = _block(key), jax.random.normal(key, (8, 3))
    results = []
    for model in (Remat(block), Remat(block, how="jax.checkpoint"), block):
        # The loss calls the model directly: train_step collects as apply does.
        with jax.numpy_dtype_promotion("standard"):
            tx = optax.sgd(0.1)
            step = treenn.train_step(lambda m, x: jnp.mean(m(x) ** 2), tx)
            new, _, loss = step(model, tx.init(treenn.trainable(model)), x)
        results.append((getattr(new, "block", new), loss))
    (plain, plain_loss) = results[-1]
    assert not jnp.array_equal(plain.layers[1].running_mean, jnp.zeros(4))
    for got, loss in results[:-1]:
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(plain)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_through_outside_apply_raises(key):
    model, x = Remat(_block(key)), jax.random.normal(key, (8, 3))
    with pytest.raises(RuntimeError, match=r"outside `treenn\.apply`"):
        model(x)
    with pytest.raises(RuntimeError, match=r"outside `treenn\.apply`"):
        eqx.filter_jit(lambda m, x: m(x))(model, x)
    evaluated = nn.eval_mode(model)
    np.testing.assert_allclose(evaluated(x), nn.eval_mode(model.block)(x), rtol=1e-6)
    assert treenn.apply(evaluated, x)[1] is evaluated


def test_a_transform_around_the_whole_model_works_as_the_errors_advise(key):
    """The advice of the errors above: open the transform outside the model and call
    treenn.apply inside it; the model it returns holds the statistics."""
    block, x = _block(key), jax.random.normal(key, (8, 3))
    _, want = treenn.apply(block, x)
    _, new = eqx.filter_checkpoint(treenn.apply)(block, x)
    assert_stats(new.layers[1], want.layers[1].running_mean, want.layers[1].running_var)
    _, new = eqx.filter_jit(eqx.filter_checkpoint(treenn.apply))(block, x)
    assert_stats(new.layers[1], want.layers[1].running_mean, want.layers[1].running_var)


def test_remat_through_of_a_block_not_in_the_model_raises(key):
    class Fresh(treenn.Module):
        scale: jax.Array

        def __call__(self, x):
            return Remat(_block(key))(x) * self.scale[None]

    with pytest.raises(RuntimeError, match="not part of the model"):
        treenn.apply(Fresh(jnp.ones(4)), jax.random.normal(key, (8, 3)))
