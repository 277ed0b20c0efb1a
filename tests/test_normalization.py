"""Normalisation layers against torch.nn: BatchNorm (outputs and running statistics over
training steps through `treenn.apply`, its variants and `update_stats=False`), GroupNorm,
RMSNorm and LayerNorm, channels-last; parameter names, initialisation and errors."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import BATCHES, close, names, np64, rand, to_torch
from jaxtyping import TypeCheckError

import treenn
import treenn.nn as nn
from treenn.nn import BatchNorm, GroupNorm, LayerNorm, RMSNorm

# One jitted call for every test (a new lambda per call would compile each time).
call = eqx.filter_jit(lambda m, x: m(x))


def nchw(x: Any) -> torch.Tensor:
    """Channels-last JAX array -> channels-first torch tensor."""
    t = to_torch(x)
    return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, *range(2, t.ndim), 1).detach().numpy()


def with_affine(layer: Any, seed: int) -> Any:
    """`layer` with random weight and bias (where it has them)."""
    shape = layer.weight.shape
    weight = 1.0 + 0.5 * rand(shape, seed)
    if getattr(layer, "bias", None) is None:
        return eqx.tree_at(lambda m: m.weight, layer, weight)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, 0.3 * rand(shape, seed + 1)))


def copy_to_torch(layer: Any, module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            value = getattr(layer, name, None)
            if value is not None:
                getattr(module, name).copy_(to_torch(value))


# Channels with distinct means and spreads, so a wrong axis or estimator shows.
LOC = np.array([0.5, -1.0, 3.0])
SCALE = np.array([1.0, 2.0, 0.5])


def batches(n: int = 3) -> list[jax.Array]:
    return [rand((4, 3, 2, 3), 10 + i, LOC * (i + 1), SCALE) for i in range(n)]


# -- BatchNorm -----------------------------------------------------------------------------


def test_batchnorm_variants_names_and_buffers() -> None:
    assert names(BatchNorm(3)) == {
        "weight": (3,),
        "bias": (3,),
        "running_mean": (3,),
        "running_var": (3,),
    }
    untracked = BatchNorm(3, track_running_stats=False)
    assert untracked.running_mean is None and untracked.running_var is None
    assert untracked.num_batches_tracked is None
    assert names(untracked) == {"weight": (3,), "bias": (3,)}
    assert names(BatchNorm(3, affine=False, track_running_stats=False)) == {}
    cumulative = BatchNorm(3, momentum=None)
    assert names(cumulative)["num_batches_tracked"] == ()
    assert cumulative.num_batches_tracked is not None
    assert cumulative.num_batches_tracked.dtype == jnp.int32
    assert int(cumulative.num_batches_tracked) == 0
    # The counter is a buffer like the running statistics; nothing else is trainable.
    assert treenn.trainable(cumulative).num_batches_tracked is None
    assert treenn.trainable(cumulative).running_var is None
    assert treenn.trainable(cumulative).weight is not None
    frozen_field = BatchNorm(3, update_stats=False)
    assert frozen_field.update_stats is False and BatchNorm(3).update_stats is True
    assert BatchNorm(3).track_running_stats is True
    # Both are static: not leaves (unlike `inference`, which mode switches edit).
    leaves = jax.tree_util.tree_leaves_with_path(frozen_field)
    paths = {jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in leaves}
    assert not {"update_stats", "track_running_stats"} & paths


BN_CASES = [
    pytest.param({}, True, id="defaults"),
    pytest.param({"momentum": 0.3, "eps": 1e-3}, True, id="momentum-eps"),
    pytest.param({"affine": False}, False, id="no-affine"),
    pytest.param({"momentum": None}, True, id="cumulative"),
    pytest.param({"momentum": 1.0}, True, id="momentum-1"),
    pytest.param({"momentum": 0.0, "eps": 0.1}, False, id="momentum-0"),
]


@pytest.mark.parametrize("kwargs, affine", BN_CASES)
def test_batchnorm_training_steps_match_torch(kwargs: dict[str, Any], affine: bool) -> None:
    bn = BatchNorm(3, **kwargs)
    ref = torch.nn.BatchNorm2d(3, **kwargs)
    if affine:
        bn = with_affine(bn, 1)
        copy_to_torch(bn, ref)
    ref.train()
    for i, x in enumerate(batches()):
        y, bn = treenn.apply(bn, x)
        want = ref(nchw(x))
        close(y, nhwc(want), atol=1e-4)
        close(bn.running_mean, ref.running_mean)
        close(bn.running_var, ref.running_var)
        if kwargs.get("momentum", 0.1) is None:
            assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == i + 1
    # Evaluation mode: the running statistics, outside treenn.apply.
    ref.eval()
    x = rand((2, 2, 3, 3), 99, LOC, SCALE)
    close(nn.eval_mode(bn)(x), nhwc(ref(nchw(x))), atol=1e-4)


def test_batchnorm_cumulative_average_under_jit() -> None:
    bn = BatchNorm(3, momentum=None)
    ref = torch.nn.BatchNorm2d(3, momentum=None)
    step = treenn.jit(lambda m, x: treenn.apply(m, x))
    for x in batches(3):
        y, bn = step(bn, x)
        close(y, nhwc(ref(nchw(x))), atol=1e-4)
    close(bn.running_mean, ref.running_mean)
    close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 3
    # Still a buffer after the update.
    assert treenn.trainable(bn).num_batches_tracked is None


def test_batchnorm_gradients_match_torch() -> None:
    bn = with_affine(BatchNorm(3), 2)
    ref = torch.nn.BatchNorm2d(3)
    copy_to_torch(bn, ref)
    x = batches(1)[0]
    weights = rand(x.shape, 5)

    def loss(model: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        y, model = treenn.apply(model, x)
        return jnp.sum(y * weights), model

    (_, _), grads = treenn.jit(treenn.value_and_grad(loss, has_aux=True))(bn, x)
    tx = nchw(x).requires_grad_(True)
    (ref(tx) * nchw(weights)).sum().backward()
    close(grads.weight, ref.weight.grad, atol=1e-4)
    close(grads.bias, ref.bias.grad, atol=1e-4)
    assert grads.running_mean is None and grads.running_var is None
    gx = jax.jit(jax.grad(lambda x: loss(bn, x)[0]))(x)
    close(gx, nhwc(tx.grad), atol=1e-4)


def test_batchnorm_without_running_stats_matches_torch() -> None:
    bn = with_affine(BatchNorm(3, track_running_stats=False), 3)
    ref = torch.nn.BatchNorm2d(3, track_running_stats=False)
    copy_to_torch(bn, ref)
    x = batches(1)[0]
    want = nhwc(ref(nchw(x)))
    # Training mode: batch statistics, and no treenn.apply needed (nothing to record).
    close(bn(x), want, atol=1e-4)
    close(call(bn, x), want, atol=1e-4)
    out, same = treenn.apply(bn, x)
    assert same is bn
    close(out, want, atol=1e-4)
    # Evaluation mode: still batch statistics, as in PyTorch.
    ref.eval()
    close(nn.eval_mode(bn)(x), nhwc(ref(nchw(x))), atol=1e-4)
    close(nn.eval_mode(bn)(x), want, atol=1e-4)
    # More than one value per channel is still needed.
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*more than one value"):
        nn.eval_mode(bn)(jnp.ones((1, 3)))


def test_batchnorm_update_stats_false_uses_batch_stats_and_records_nothing() -> None:
    bn = with_affine(BatchNorm(3, update_stats=False), 4)
    stats = (jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 4.0, 1.5]))
    bn = eqx.tree_at(lambda m: (m.running_mean, m.running_var), bn, stats)
    ref = torch.nn.BatchNorm2d(3)
    copy_to_torch(bn, ref)
    with torch.no_grad():
        ref.running_mean.copy_(to_torch(stats[0]))
        ref.running_var.copy_(to_torch(stats[1]))
    for x in batches(2):
        want = nhwc(ref(nchw(x)))  # torch's training step: batch statistics
        out, same = treenn.apply(bn, x)
        assert same is bn  # nothing recorded: the model comes back as it was
        close(out, want, atol=1e-4)
        close(bn(x), want, atol=1e-4)  # works outside treenn.apply too
        close(call(bn, x), want, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(same.running_mean), np.asarray(stats[0]))
        np.testing.assert_array_equal(np.asarray(same.running_var), np.asarray(stats[1]))
    # Evaluation mode uses the (untouched) running statistics.
    ref.eval()
    with torch.no_grad():
        ref.running_mean.copy_(to_torch(stats[0]))
        ref.running_var.copy_(to_torch(stats[1]))
    x = batches(1)[0]
    close(nn.eval_mode(bn)(x), nhwc(ref(nchw(x))), atol=1e-4)
    # Still buffers; modes switch as usual.
    assert treenn.trainable(bn).running_mean is None
    assert nn.modes(nn.eval_mode(bn)) == {"": True}


def test_batchnorm_update_stats_false_inside_a_model_leaves_others_updating() -> None:
    seq = nn.Sequential(BatchNorm(3), BatchNorm(3, update_stats=False))
    x = batches(1)[0]
    _, new = treenn.apply(seq, x)
    ref = torch.nn.BatchNorm2d(3)
    ref(nchw(x))
    close(new[0].running_mean, ref.running_mean)
    close(new[0].running_var, ref.running_var)
    np.testing.assert_array_equal(np.asarray(new[1].running_mean), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(new[1].running_var), np.ones(3))


def test_batchnorm_training_outside_apply_still_raises() -> None:
    with pytest.raises(RuntimeError, match=r"nn\.BatchNorm\(3\).*treenn\.apply"):
        BatchNorm(3)(batches(1)[0])
    with pytest.raises(RuntimeError, match=r"nn\.BatchNorm\(3\).*treenn\.apply"):
        BatchNorm(3, momentum=None)(batches(1)[0])


def test_batchnorm_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"momentum=1\.5.*\[0, 1\].*None"):
        BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"momentum=-0\.1"):
        BatchNorm(3, momentum=-0.1)
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*eps=-1\.0"):
        BatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(0\).*num_features"):
        BatchNorm(0)


# -- GroupNorm -----------------------------------------------------------------------------

GN_CASES = [
    pytest.param(2, 4, (2, 3, 3, 4), {}, id="nhwc"),
    pytest.param(1, 4, (2, 3, 4), {"eps": 1e-3}, id="one-group-nlc"),
    pytest.param(4, 4, (2, 3, 3, 4), {}, id="instance"),
    pytest.param(2, 4, (2, 4), {"affine": False}, id="nc-no-affine"),
    pytest.param(2, 4, (2, 2, 2, 2, 4), {}, id="3d"),
]


@pytest.mark.parametrize("groups, channels, shape, kwargs", GN_CASES)
def test_groupnorm_matches_torch(
    groups: int, channels: int, shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    norm = GroupNorm(groups, channels, **kwargs)
    ref = torch.nn.GroupNorm(groups, channels, **kwargs)
    if kwargs.get("affine", True):
        norm = with_affine(norm, 7)
        copy_to_torch(norm, ref)
    x = rand(shape, 8, np.linspace(-2, 2, channels), np.linspace(0.5, 3, channels))
    y = norm(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    close(y, nhwc(ref(nchw(x))), atol=1e-4)


def test_groupnorm_names_init_and_no_mode() -> None:
    norm = GroupNorm(2, 4)
    assert names(norm) == {"weight": (4,), "bias": (4,)}
    np.testing.assert_array_equal(np.asarray(norm.weight), np.ones(4))
    np.testing.assert_array_equal(np.asarray(norm.bias), np.zeros(4))
    assert names(GroupNorm(2, 4, affine=False)) == {}
    assert norm.num_groups == 2 and norm.num_channels == 4 and norm.eps == 1e-5
    assert nn.modes(norm) == {}
    half = jax.eval_shape(lambda: GroupNorm(2, 4, dtype=jnp.bfloat16))
    assert half.weight.dtype == jnp.bfloat16
    # Per sample: samples do not see each other.
    x = rand((2, 3, 3, 4), 1)
    close(norm(x)[:1], norm(x[:1]))


def test_groupnorm_half_precision() -> None:
    x = rand((2, 3, 4), 3).astype(jnp.bfloat16)
    y = GroupNorm(2, 4)(x)
    assert y.dtype == jnp.bfloat16
    want = torch.nn.GroupNorm(2, 4)(nchw(x.astype(jnp.float32)))
    close(y.astype(jnp.float32), nhwc(want), rtol=2e-2, atol=2e-2)


def test_groupnorm_errors() -> None:
    with pytest.raises(ValueError, match=r"nn\.GroupNorm\(4, 6\).*num_channels=6.*divisible.*4"):
        GroupNorm(4, 6)
    with pytest.raises(ValueError, match=r"num_groups=0"):
        GroupNorm(0, 6)
    with pytest.raises(ValueError, match=r"num_channels=0"):
        GroupNorm(1, 0)
    with pytest.raises(ValueError, match=r"eps=-0\.5"):
        GroupNorm(1, 2, eps=-0.5)
    norm = GroupNorm(2, 4)
    with pytest.raises(
        ValueError,
        match=r"nn\.GroupNorm\(2, 4\).*\(batch, \*spatial, num_channels\).*got shape \(2, 3\)",
    ):
        norm(jnp.ones((2, 3)))
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)GroupNorm.*num_channels"):
        norm(jnp.ones((4,)))


# -- RMSNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        pytest.param(5, {}, id="default-eps"),
        pytest.param((3, 4), {"eps": 1e-3}, id="tuple-eps"),
        pytest.param([4], {"elementwise_affine": False}, id="no-affine"),
    ],
)
def test_rmsnorm_matches_torch(shape: Any, kwargs: dict[str, Any]) -> None:
    norm = RMSNorm(shape, **kwargs)
    ref = torch.nn.RMSNorm(shape, **kwargs)
    if kwargs.get("elementwise_affine", True):
        norm = with_affine(norm, 11)
        copy_to_torch(norm, ref)
    trailing = (shape,) if isinstance(shape, int) else tuple(shape)
    # Small values, so that eps matters.
    x = rand((2, 3, *trailing), 12, 0.0, 1e-3)
    y = norm(x)
    assert y.shape == x.shape
    close(y, ref(to_torch(x)), rtol=1e-4, atol=1e-5)


def test_rmsnorm_default_eps_is_machine_epsilon() -> None:
    norm = RMSNorm(4)
    assert norm.eps is None
    x = jnp.zeros((2, 4)).at[0, 0].set(1e-4)
    # mean square = 2.5e-9, comparable to float32's eps (1.19e-7): the result shows it.
    eps = float(jnp.finfo(jnp.float32).eps)
    close(norm(x)[0, 0], 1e-4 / np.sqrt(2.5e-9 + eps), rtol=1e-5)
    close(norm(x), torch.nn.RMSNorm(4)(to_torch(x)), rtol=1e-5)
    # Half precision computes in float32, with float32's eps, as PyTorch does.
    xh = (rand((2, 4), 3) * 1e-2).astype(jnp.bfloat16)
    want = torch.nn.RMSNorm(4, dtype=torch.bfloat16)(to_torch(xh.astype(jnp.float32)).bfloat16())
    got = norm(xh)
    assert got.dtype == jnp.bfloat16
    close(got.astype(jnp.float32), want.float(), rtol=2e-2, atol=2e-2)


def test_rmsnorm_names_init_and_errors() -> None:
    assert names(RMSNorm((3, 4))) == {"weight": (3, 4)}
    np.testing.assert_array_equal(np.asarray(RMSNorm(3).weight), np.ones(3))
    assert names(RMSNorm(3, elementwise_affine=False)) == {}
    assert jax.eval_shape(lambda: RMSNorm(3, dtype=jnp.bfloat16)).weight.dtype == jnp.bfloat16
    with pytest.raises(
        ValueError, match=r"nn\.RMSNorm\(\(3, 4\)\).*\(\*batch, 3, 4\).*got shape \(2, 4, 3\)"
    ):
        RMSNorm((3, 4))(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"nn\.RMSNorm\(0\).*positive"):
        RMSNorm(0)
    with pytest.raises(ValueError, match=r"nn\.RMSNorm\(3\).*eps=-1\.0"):
        RMSNorm(3, eps=-1.0)


# -- LayerNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        pytest.param(5, {}, id="last-axis"),
        pytest.param((3, 4), {"eps": 1e-3}, id="tuple"),
        pytest.param(4, {"bias": False}, id="no-bias"),
        pytest.param(4, {"elementwise_affine": False}, id="no-affine"),
    ],
)
def test_layernorm_matches_torch(shape: Any, kwargs: dict[str, Any]) -> None:
    norm = LayerNorm(shape, **kwargs)
    ref = torch.nn.LayerNorm(shape, **kwargs)
    if kwargs.get("elementwise_affine", True):
        norm = with_affine(norm, 13)
        copy_to_torch(norm, ref)
    trailing = (shape,) if isinstance(shape, int) else tuple(shape)
    x = rand((2, 3, *trailing), 14, 2.0, 3.0)
    close(norm(x), ref(to_torch(x)), atol=1e-4)
    with pytest.raises(ValueError, match=r"nn\.LayerNorm\(5\).*eps=-1\.0"):
        LayerNorm(5, eps=-1.0)


# -- the calling convention ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        BatchNorm(3, track_running_stats=False),
        BatchNorm(3, update_stats=False),
        GroupNorm(1, 3),
        RMSNorm(3),
    ],
    ids=["bn-untracked", "bn-no-update", "group", "rms"],
)
def test_keyword_only_key(layer: Any) -> None:
    import inspect

    params = inspect.signature(layer).parameters
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY and params["key"].default is None
    x = rand((2, 2, 3), 1)
    assert layer(x, key=jax.random.key(0)).shape == x.shape
    with pytest.raises(TypeError):
        layer(x, jax.random.key(0))


# -- NumPy references (BatchNorm, LayerNorm) ------------------------------------------


def batchnorm_ref(x: Any, mean: Any, var: Any, w: Any, b: Any, eps: float = 1e-5) -> np.ndarray:
    return (np64(x) - np64(mean)) / np.sqrt(np64(var) + eps) * np64(w) + np64(b)


def layernorm_ref(x: Any, n_axes: int, w: Any, b: Any, eps: float = 1e-5) -> np.ndarray:
    x = np64(x)
    axes = tuple(range(x.ndim - n_axes, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * np64(w)
    if b is not None:
        y = y + np64(b)
    return y


# -- BatchNorm ---------------------------------------------------------------------------


def _affine_bn(n: int, key: jax.Array, **kwargs: Any) -> nn.BatchNorm:
    bn = nn.BatchNorm(n, **kwargs)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        bn,
        (1 + 0.5 * rand((n,), 1), 0.3 * rand((n,), 2)),
    )


def test_batchnorm_names_and_defaults() -> None:
    bn = nn.BatchNorm(3)
    assert names(bn) == {"weight": (3,), "bias": (3,), "running_mean": (3,), "running_var": (3,)}
    np.testing.assert_array_equal(np.asarray(bn.weight), np.ones(3))
    np.testing.assert_array_equal(np.asarray(bn.bias), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.running_mean), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.running_var), np.ones(3))
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.inference is False
    trainable = treenn.trainable(bn)
    assert trainable.running_mean is None and trainable.running_var is None
    assert trainable.weight is not None and trainable.bias is not None
    assert treenn.trainable(treenn.unfreeze(bn)).running_var is None  # buffers stay buffers


@pytest.mark.parametrize("batch", [(8,), (2, 3), (2, 3, 4)])
def test_batchnorm_training_and_running_statistics(key: jax.Array, batch: tuple[int, ...]) -> None:
    bn = _affine_bn(3, key)
    x = 2.0 + 1.5 * rand((*batch, 3))
    y, bn1 = treenn.apply(bn, x)
    flat = np64(x).reshape(-1, 3)
    mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    assert y.shape == x.shape
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, mean, biased, bn.weight, bn.bias), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np64(bn1.running_mean), 0.9 * 0 + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(bn1.running_var), 0.9 * 1 + 0.1 * unbiased, rtol=1e-5)
    # The input model is unchanged; the update is in the returned one only.
    np.testing.assert_array_equal(np.asarray(bn.running_mean), np.zeros(3))
    # A second step compounds from the first's statistics.
    x2 = rand((*batch, 3), 7) - 1.0
    _, bn2 = treenn.apply(bn1, x2)
    flat2 = np64(x2).reshape(-1, 3)
    np.testing.assert_allclose(
        np64(bn2.running_mean),
        0.9 * np64(bn1.running_mean) + 0.1 * flat2.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np64(bn2.running_var), 0.9 * np64(bn1.running_var) + 0.1 * flat2.var(0, ddof=1), rtol=1e-5
    )
    # Running statistics remain buffers after the update.
    assert treenn.trainable(bn2).running_var is None


def test_batchnorm_momentum_and_eps_arguments(key: jax.Array) -> None:
    bn = nn.BatchNorm(2, momentum=0.25, eps=1e-2)
    x = rand((5, 2))
    y, new = treenn.apply(bn, x)
    flat = np64(x)
    np.testing.assert_allclose(np64(new.running_mean), 0.25 * flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(new.running_var), 0.75 + 0.25 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, flat.mean(0), flat.var(0), 1, 0, eps=1e-2), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("batch", BATCHES)
def test_batchnorm_eval_uses_running_statistics(key: jax.Array, batch: tuple[int, ...]) -> None:
    bn = _affine_bn(3, key)
    bn = eqx.tree_at(
        lambda m: (m.running_mean, m.running_var),
        bn,
        (jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 4.0, 1.5])),
    )
    assert treenn.trainable(bn).running_mean is None  # still a buffer after tree_at
    ev = nn.eval_mode(bn)
    x = rand((*batch, 3))
    y = ev(x)  # no treenn.apply needed in eval mode
    assert y.shape == x.shape
    want = batchnorm_ref(x, [0.5, -1.0, 2.0], [0.25, 4.0, 1.5], bn.weight, bn.bias)
    np.testing.assert_allclose(np64(y), want, rtol=1e-5, atol=1e-5)
    out, same = treenn.apply(ev, x)  # eval mode: no statistics update
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(same.running_mean), np.asarray(bn.running_mean))


def test_batchnorm_without_affine(key: jax.Array) -> None:
    bn = nn.BatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    assert names(bn) == {"running_mean": (3,), "running_var": (3,)}
    x = rand((4, 3))
    y, _ = treenn.apply(bn, x)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, np64(x).mean(0), np64(x).var(0), 1, 0), rtol=1e-4, atol=1e-5
    )


def test_batchnorm_half_precision_input(key: jax.Array) -> None:
    bn = nn.BatchNorm(3)
    x = rand((6, 3)).astype(jnp.bfloat16)
    y, new = treenn.apply(bn, x)
    assert y.dtype == jnp.bfloat16
    assert new.running_mean.dtype == jnp.float32
    flat = np64(x)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(flat, flat.mean(0), flat.var(0), 1, 0), rtol=2e-2, atol=2e-2
    )


def test_batchnorm_errors(key: jax.Array) -> None:
    bn = nn.BatchNorm(3)
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*\(\*batch, 3\).*got shape \(4, 2\)"):
        treenn.apply(bn, jnp.ones((4, 2)))
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)BatchNorm.*num_features"):
        nn.eval_mode(bn)(jnp.ones(()))
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*more than one value per channel"):
        treenn.apply(bn, jnp.ones((3,)))
    with pytest.raises(RuntimeError, match=r"nn\.BatchNorm\(3\).*treenn\.apply"):
        bn(jnp.ones((4, 3)))  # training mode outside treenn.apply would lose the statistics
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(0\)"):
        nn.BatchNorm(0)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        nn.BatchNorm(3, momentum=1.5)


# -- LayerNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_layernorm_last_axis(key: jax.Array, batch: tuple[int, ...]) -> None:
    norm = nn.LayerNorm(5)
    assert names(norm) == {"weight": (5,), "bias": (5,)}
    norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (rand((5,), 1), rand((5,), 2)))
    x = 3.0 + rand((*batch, 5))
    y = norm(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(
        np64(y), layernorm_ref(x, 1, norm.weight, norm.bias), rtol=1e-4, atol=1e-5
    )


def test_layernorm_tuple_shape_and_no_affine(key: jax.Array) -> None:
    norm = nn.LayerNorm((3, 4))
    assert names(norm) == {"weight": (3, 4), "bias": (3, 4)}
    norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (rand((3, 4), 1), rand((3, 4), 2)))
    x = rand((2, 3, 4))
    np.testing.assert_allclose(
        np64(norm(x)), layernorm_ref(x, 2, norm.weight, norm.bias), rtol=1e-4, atol=1e-5
    )

    bare = nn.LayerNorm([3, 4], elementwise_affine=False, eps=1e-3)
    assert bare.weight is None and bare.bias is None and names(bare) == {}
    np.testing.assert_allclose(
        np64(bare(x)), layernorm_ref(x, 2, None, None, eps=1e-3), rtol=1e-4, atol=1e-5
    )

    no_bias = nn.LayerNorm(4, bias=False)
    assert names(no_bias) == {"weight": (4,)}


def test_layernorm_errors(key: jax.Array) -> None:
    with pytest.raises(
        ValueError, match=r"nn\.LayerNorm\(\(3, 4\)\).*\(\*batch, 3, 4\).*got shape \(2, 4, 3\)"
    ):
        nn.LayerNorm((3, 4))(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"nn\.LayerNorm\(\(3, 4\)\).*got shape \(4,\)"):
        nn.LayerNorm((3, 4))(jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"nn\.LayerNorm\(0\)"):
        nn.LayerNorm(0)
