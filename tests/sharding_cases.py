"""Sharded training on 8 simulated CPU devices, against the single-device run.

Not collected by a plain `pytest` (the name does not start with `test_`): JAX fixes its
device count when it starts, and tests/conftest.py starts it with one device. Run by
tests/test_sharding.py in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, under the same strict conftest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Net, leaves_by_path, optax_promotion, statuses
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import treenn
import treenn.nn as nn
from treenn.models import vit_tiny

if jax.device_count() != 8:
    raise RuntimeError(
        f"sharding_cases.py needs 8 devices, JAX has {jax.device_count()}: run it through "
        "tests/test_sharding.py (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
    )

AUTO = (AxisType.Auto, AxisType.Auto)
TOL = {"rtol": 2e-5, "atol": 2e-6}  # sharded reductions sum in another order


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def step_loss(model: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    return xent(model(x, key=key), y)


def arrays(tree: Any) -> dict[str, Any]:
    """Dotted path -> array (marks unwrapped) of every array leaf."""
    return {path: x for path, x in leaves_by_path(tree) if isinstance(x, jax.Array)}


def assert_close(sharded: Any, single: Any, what: str) -> None:
    a, b = arrays(sharded), arrays(single)
    assert a.keys() == b.keys(), what
    for name in a:
        np.testing.assert_allclose(
            np.asarray(a[name]), np.asarray(b[name]), **TOL, err_msg=f"{what}: {name}"
        )


def assert_placed(tree: Any, mesh: Any, expected: dict[str, P]) -> None:
    """Every array has the spec `expected` gives its path (P() when absent), and each
    device holds exactly its slice of the values."""
    for name, x in arrays(tree).items():
        spec = expected.get(name, P())
        want = NamedSharding(mesh, spec)
        assert x.sharding.is_equivalent_to(want, x.ndim), f"{name}: {x.sharding.spec} != {spec}"
        full = np.asarray(x)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], name)


def same_sharding(tree: Any, like: Any, what: str) -> None:
    a, b = arrays(tree), arrays(like)
    for name, x in a.items():
        assert x.sharding.is_equivalent_to(b[name].sharding, x.ndim), (
            f"{what}: {name} is {x.sharding}, its parameter {b[name].sharding}"
        )


# SGD with momentum: after the first step its state (the momentum trace) *is* the
# gradient, so one compiled step per placement checks loss, gradients, updated parameters
# and BatchNorm statistics together. (Adam would also divide near-zero gradients, such
# as a key bias's, by their own magnitude: summation-order noise into full-size steps.)
TX = optax.sgd(0.1, momentum=0.9)


def grads_of(opt_state: Any) -> Any:
    """The gradient of the first step, by parameter path (also the optimiser state)."""
    return opt_state[0].trace


def small_vit(key: jax.Array) -> Any:
    return vit_tiny(8, img_size=8, patch_size=4, in_channels=1, dim=16, depth=1, num_heads=2,
                    key=key)  # fmt: skip


def vit_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(key, (8, 8, 8, 1))
    return x, jax.random.randint(jax.random.fold_in(key, 1), (8,), 0, 8)


def train(
    model: Any, batch: Any, key: jax.Array, mesh: Any = None, rules: Any = None, step: Any = None
) -> tuple[Any, Any, Any, jax.Array]:
    """One training step, `treenn.train_step` unless `step` is given: `(initial optimiser
    state, model, optimiser state, loss)`. On a mesh, the optimiser state is placed by
    `rules` first (`tx.init` leaves its step count on one device), and the outputs are
    fed back for a second step, as in a training loop."""
    step = step or treenn.train_step(step_loss, TX)
    with optax_promotion():
        opt_state = TX.init(treenn.trainable(model))
        if mesh is not None:
            opt_state = treenn.shard(opt_state, mesh, rules)
        result = (opt_state, *step(model, opt_state, *batch, key))
        if mesh is not None:
            assert np.isfinite(step(result[1], result[2], *batch, key)[2])
    return result


def placed_step(rules: dict[str, P]) -> Any:
    """The README's hand-written step, with its outputs constrained by `treenn.shard` (a
    sharding constraint inside a compiled step): the placement the rules give comes back,
    instead of wherever XLA's propagation would move an array."""

    def loss_and_model(m: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        logits, m = treenn.apply(m, x, key=key)
        return xent(logits, y), m

    @treenn.jit
    def step(m: Any, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        (loss, m), grads = treenn.value_and_grad(loss_and_model, has_aux=True)(m, x, y, key)
        updates, opt_state = TX.update(grads, opt_state, treenn.trainable(m))
        m = treenn.apply_updates(m, updates)
        return treenn.shard(m, MESH, rules), treenn.shard(opt_state, MESH, rules), loss

    return step


def assert_same_step(sharded: Any, single: Any) -> None:
    """Two `train` results agree: loss, gradients, updated model (with BN statistics)."""
    np.testing.assert_allclose(sharded[3], single[3], **TOL, err_msg="loss")
    assert_close(grads_of(sharded[2]), grads_of(single[2]), "gradients")
    assert_close(sharded[1], single[1], "trained model")


# -- data parallel -----------------------------------------------------------------------


def test_data_parallel_step_matches_single_device_with_global_batchnorm_statistics():
    # jax.make_mesh's default (Explicit) axes: data parallelism needs no Auto axes.
    mesh = jax.make_mesh((8,), ("data",))
    key = jax.random.key(0)
    model = Net(key=key)  # Conv, BatchNorm (training mode), Dropout, Linear
    x = jax.random.normal(jax.random.fold_in(key, 1), (16, 5, 5, 3))
    y = jnp.arange(16) % 3
    replicated = treenn.shard(model, mesh)
    assert_placed(replicated, mesh, {})
    xs, ys = treenn.shard((x, y), mesh, P("data"))
    assert xs.sharding.spec == P("data") and ys.sharding.spec == P("data")
    assert {s.data.shape for s in xs.addressable_shards} == {(2, 5, 5, 3)}

    single, sharded = train(model, (x, y), key), train(replicated, (xs, ys), key, mesh)
    assert len(sharded[3].sharding.device_set) == 8  # it ran on the mesh
    assert_same_step(sharded, single)
    # Running statistics of the global batch of 16: a device's own 2 images would give
    # another variance (and the loss and gradients would differ).
    bn1, bn8 = single[1].backbone.layers[1], sharded[1].backbone.layers[1]
    assert not np.allclose(bn1.running_var, Net(key=key).backbone.layers[1].running_var)
    np.testing.assert_allclose(bn8.running_mean, bn1.running_mean, **TOL)
    np.testing.assert_allclose(bn8.running_var, bn1.running_var, **TOL)
    assert statuses(sharded[1]) == statuses(model)
    assert_placed(sharded[1], mesh, {})  # still replicated on all 8 devices


# -- fully-sharded data parallel and tensor parallel, on a small ViT ---------------------

MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO)
FSDP = {"**.weight": P("data"), "**": P()}
# Megatron-style: column-parallel qkv and fc1 (output features split), row-parallel
# proj and fc2 (input features split); PyTorch's (out, in) weight layout.
TENSOR_PARALLEL = {
    "**.attn.qkv.*": P("model"),
    "**.attn.proj.weight": P(None, "model"),
    "**.mlp.fc1.*": P("model"),
    "**.mlp.fc2.weight": P(None, "model"),
    "**": P(),
}


@pytest.fixture(scope="module")
def vit_run() -> tuple[Any, Any, jax.Array, Any]:
    """A small ViT (patch embedding frozen), a batch, a key, and its single-device step."""
    key = jax.random.key(1)
    model = treenn.freeze(small_vit(key), "patch_embed")
    batch = vit_batch(key)
    return model, batch, key, train(model, batch, key)


def test_fsdp_placement_training_and_optimizer_state_follow_the_rules(vit_run):
    model, batch, key, single = vit_run
    sharded = treenn.shard(model, MESH, FSDP)
    weights = [n for n in arrays(model) if n.endswith(".weight")]
    assert "blocks.0.attn.qkv.weight" in weights and "head.weight" in weights
    assert_placed(sharded, MESH, {n: P("data") for n in weights})
    qkv = arrays(sharded)["blocks.0.attn.qkv.weight"]
    assert {s.data.shape for s in qkv.addressable_shards} == {(12, 16)}  # a quarter each
    assert statuses(sharded) == statuses(model)  # frozen arrays stay frozen

    with optax_promotion():
        same_sharding(grads_of(TX.init(treenn.trainable(sharded))), sharded, "tx.init's state")

    # The rules place the optimiser state too: its paths are the parameters' behind a
    # prefix ("0.trace.blocks.0.attn.qkv.weight"), which "**.weight" matches.
    sharded_batch = treenn.shard(batch, MESH, P("data"))
    result = train(sharded, sharded_batch, key, MESH, FSDP, placed_step(FSDP))
    assert_same_step(result, single)
    same_sharding(result[1], sharded, "trained model")  # placed as the rules say
    same_sharding(grads_of(result[2]), sharded, "optimiser state after the step")


def test_train_step_as_it_is_runs_fsdp_steps_with_the_state_tx_init_made():
    # Placements change between calls here (Adam's count starts on one device and comes
    # back on the mesh; XLA returns some BatchNorm vectors split): each change re-traces,
    # and treenn.jit must take the new trace as the same function (keys as arguments).
    key = jax.random.key(2)
    model = treenn.models.resnet18(3, in_channels=1, width=4, small_input=True, key=key)
    rules = {nn.BatchNorm: P(), "**.fc.weight": P(None, "data"), "**.weight": P("data"), "**": P()}
    sharded = treenn.shard(model, MESH, rules)
    batch = (jax.random.normal(key, (8, 8, 8, 1)), jnp.arange(8) % 3)
    step = treenn.train_step(step_loss, TX)
    with optax_promotion():
        single = step(model, TX.init(treenn.trainable(model)), *batch, key)
        m, opt_state = sharded, TX.init(treenn.trainable(sharded))
        losses = []
        for k in (key, key, key):
            m, opt_state, loss = step(m, opt_state, *treenn.shard(batch, MESH, P("data")), k)
            losses.append(float(loss))
    np.testing.assert_allclose(losses[0], single[2], **TOL)
    assert all(np.isfinite(losses)) and losses[2] < losses[0]
    assert statuses(m) == statuses(model)


def test_adam_state_of_a_model_with_frozen_batchnorm_takes_the_models_rules():
    """Issue 15: Adam keeps no moments for a frozen BatchNorm, and the model's rules (a
    class rule for it, paths written for the model) place its state on the mesh: each
    moment like its parameter."""
    model = treenn.freeze(Net(key=jax.random.key(3)), nn.BatchNorm)
    rules = {
        nn.BatchNorm: P(),
        "backbone.**.weight": P("data"),  # (out, in, h, w): 4 output channels
        "head.weight": P(None, "data"),
        "**": P(),
    }
    sharded = treenn.shard(model, MESH, rules)
    with optax_promotion():
        opt_state = treenn.shard(optax.adam(1e-3).init(treenn.trainable(sharded)), MESH, rules)
    assert arrays(opt_state[0].mu).keys() == arrays(treenn.trainable(model)).keys()
    same_sharding(opt_state[0].mu, sharded, "first moments")
    same_sharding(opt_state[0].nu, sharded, "second moments")
    assert arrays(opt_state[0].mu)["head.weight"].sharding.spec == P(None, "data")


def test_inside_a_compiled_step_shard_constrains_the_outputs(vit_run):
    model = treenn.shard(vit_run[0], MESH)  # replicated in, FSDP out
    out = treenn.jit(lambda m: treenn.shard(m, MESH, FSDP))(model)
    assert_placed(out, MESH, {n: P("data") for n in arrays(model) if n.endswith(".weight")})
    assert statuses(out) == statuses(model)


def test_tensor_parallel_placement_and_training_match_single_device(vit_run):
    model, batch, key, single = vit_run
    sharded = treenn.shard(model, MESH, TENSOR_PARALLEL)
    expected = {
        "blocks.0.attn.qkv.weight": P("model"),
        "blocks.0.attn.qkv.bias": P("model"),
        "blocks.0.attn.proj.weight": P(None, "model"),
        "blocks.0.mlp.fc1.weight": P("model"),
        "blocks.0.mlp.fc1.bias": P("model"),
        "blocks.0.mlp.fc2.weight": P(None, "model"),
    }
    assert_placed(sharded, MESH, expected)
    fc2 = arrays(sharded)["blocks.0.mlp.fc2.weight"]
    assert {s.data.shape for s in fc2.addressable_shards} == {(16, 32)}

    # treenn.train_step as it is: the same numbers as on one device.
    result = train(sharded, treenn.shard(batch, MESH, P("data")), key, MESH, TENSOR_PARALLEL)
    assert_same_step(result, single)


# -- errors that need a mesh axis larger than 1 -----------------------------------------


def test_indivisible_dimension_names_path_shape_and_axis():
    mesh = MESH
    net = Net(key=jax.random.key(0))  # head: Linear(4, 3)
    with pytest.raises(ValueError, match=r"'head\.bias' has shape \(3,\): dimension 0 \(3\) is "
                       r"not divisible by the size of mesh axis 'data' \(4\)"):  # fmt: skip
        treenn.shard(net, mesh, {"head.bias": P("data"), "**": P()})
    with pytest.raises(ValueError, match=r"'head\.weight'.*mesh axes \('data', 'model'\) \(8\)"):
        treenn.shard(net, mesh, {"head.weight": P(None, ("data", "model")), "**": P()})
    with pytest.raises(ValueError, match=r"'x' has shape \(6, 3\).*'data' \(4\)"):
        treenn.shard({"x": jnp.ones((6, 3))}, mesh, P("data"))


# -- checkpoints ---------------------------------------------------------------------------

NET_RULES = {
    "backbone.layers.0.weight": P("data"),
    "backbone.layers.1.running_mean": P("data"),
    "head.weight": P(None, "data"),
    "**": P(),
}


def test_checkpoint_of_a_sharded_model_round_trips_values_status_and_shardings(tmp_path):
    mesh = MESH
    model = treenn.freeze(Net(key=jax.random.key(0)), "backbone.layers.0")
    sharded = treenn.shard(model, mesh, NET_RULES)
    path = tmp_path / "sharded.safetensors"
    treenn.save(path, sharded)

    like = treenn.shard(Net(key=jax.random.key(9)), mesh, NET_RULES)
    loaded = treenn.load(path, like)
    assert statuses(loaded) == statuses(sharded)  # frozen weight, buffers
    saved = arrays(sharded)
    for name, x in arrays(loaded).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(saved[name]), name)
    same_sharding(loaded, sharded, "loaded model")
    assert_placed(loaded, mesh, {k: v for k, v in NET_RULES.items() if k != "**"})

    # Another placement of the same model: each array goes where `like`'s is.
    replicated = treenn.load(path, treenn.shard(Net(key=jax.random.key(9)), mesh))
    assert_placed(replicated, mesh, {})
    single = treenn.load(path, Net(key=jax.random.key(9)))
    for name, x in arrays(single).items():
        assert len(x.sharding.device_set) == 1, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(saved[name]), name)
