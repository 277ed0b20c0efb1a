"""`treenn.remat`: activation checkpointing by selector (API.md §9).

What must hold: the selected modules' calls really run under `jax.checkpoint` (the
gradient's jaxpr holds a remat primitive; `policy=False` removes it), and nothing else
changes: outputs, gradients (frozen and LoRA layers inside included), BatchNorm
statistics under `apply`/`train_step`, paths, statuses, modes; the policy survives
pickling, `save`/`load`, and makes `jit` retrace when it changes.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, optax_promotion

import treenn
import treenn.nn as nn

POLICIES = [None, jax.checkpoint_policies.dots_saveable]


class Block(treenn.Module):
    """A transformer-ish block: norm, MLP, residual; BatchNorm as the norm."""

    norm: nn.BatchNorm
    up: nn.Linear
    down: nn.Linear

    def __init__(self, dim: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm = nn.BatchNorm(dim)
        self.up = nn.Linear(dim, 2 * dim, key=k1)
        self.down = nn.Linear(2 * dim, dim, key=k2)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Stack(treenn.Module):
    blocks: list[Block]
    head: eqx.nn.Linear

    def __init__(self, depth: int = 3, dim: int = 4, *, key: jax.Array):
        keys = jax.random.split(key, depth + 1)
        self.blocks = [Block(dim, key=k) for k in keys[:depth]]
        self.head = eqx.nn.Linear(dim, 2, key=keys[-1])

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(x)


class EqxBlock(eqx.Module):
    """A user's plain Equinox module (not a treenn.Module)."""

    mlp: eqx.nn.MLP

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.vmap(self.mlp)(x)


@pytest.fixture
def stack() -> Stack:
    return Stack(key=jax.random.key(0))


@pytest.fixture
def x() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (5, 4))


def loss(model: Any, x: jax.Array) -> jax.Array:
    out, _ = treenn.apply(model, x)
    return (out**2).mean()


def assert_trees_close(a: Any, b: Any) -> None:
    """Same paths, leaves equal to float32 rounding (classes may differ: a remat one)."""
    left, right = leaves_by_path(a), leaves_by_path(b)
    assert [p for p, _ in left] == [p for p, _ in right]
    for (path, u), (_, v) in zip(left, right):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6, err_msg=path)


def remat_primitives(jaxpr: Any) -> int:
    """How many remat (`jax.checkpoint`) equations a jaxpr holds, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    count += remat_primitives(getattr(inner, "jaxpr", inner))
    return count


def grad_jaxpr(model: Any, x: jax.Array) -> Any:
    return jax.make_jaxpr(lambda x: treenn.grad(loss)(model, x))(x).jaxpr


# -- the checkpoint is there, and only there ---------------------------------------------


def test_gradient_jaxpr_holds_one_checkpoint_per_selected_block(stack: Stack, x: jax.Array) -> None:
    assert remat_primitives(grad_jaxpr(stack, x)) == 0
    rematted = treenn.remat(stack, "blocks.*")
    assert remat_primitives(grad_jaxpr(rematted, x)) == 3
    assert remat_primitives(grad_jaxpr(treenn.remat(stack, "blocks.1"), x)) == 1


def test_policy_false_removes_the_checkpoint(stack: Stack, x: jax.Array) -> None:
    rematted = treenn.remat(stack, "blocks.*")
    removed = treenn.remat(rematted, None, policy=False)
    assert remat_primitives(grad_jaxpr(removed, x)) == 0
    assert all(type(b) is Block for b in removed.blocks)
    assert jax.tree_util.tree_structure(removed) == jax.tree_util.tree_structure(stack)
    # Only the selected ones.
    partly = treenn.remat(rematted, "blocks.0", policy=False)
    assert [type(b) is Block for b in partly.blocks] == [True, False, False]
    assert remat_primitives(grad_jaxpr(partly, x)) == 2


def test_only_the_outermost_selected_modules_are_checkpointed(stack: Stack) -> None:
    # Selecting a block covers its layers too; a checkpoint inside it would only add a
    # recomputation.
    rematted = treenn.remat(stack, "blocks.*")
    assert all(type(layer) is nn.Linear for b in rematted.blocks for layer in (b.up, b.down))
    whole = treenn.remat(stack, None)
    assert isinstance(whole, Stack) and type(whole) is not Stack
    assert all(type(b) is Block for b in whole.blocks)
    # A getter returning a list (not a module): the modules in it are the outermost.
    listed = treenn.remat(stack, lambda m: m.blocks)
    assert all(type(b) is not Block and isinstance(b, Block) for b in listed.blocks)
    assert type(listed.head) is eqx.nn.Linear


def test_rematerialised_classes_are_subclasses_named_for_summary(stack: Stack) -> None:
    rematted = treenn.remat(stack, (Block, eqx.nn.Linear))
    block = rematted.blocks[0]
    assert isinstance(block, Block) and type(block).__name__ == "RematBlock"
    assert isinstance(rematted.head, eqx.nn.Linear)
    # One class per (base, policy): structures of separately rematerialised models match.
    again = treenn.remat(stack, (Block, eqx.nn.Linear))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(rematted)
    assert "RematLinear" in treenn.summary(treenn.remat(stack, nn.Linear))


# -- nothing else changes ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_and_gradients_equal_the_plain_model(
    stack: Stack, x: jax.Array, policy: Any
) -> None:
    rematted = treenn.remat(stack, "blocks.*", policy=policy)
    out, new = treenn.apply(rematted, x)
    ref, ref_new = treenn.apply(stack, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert_trees_close(treenn.trainable(new), treenn.trainable(ref_new))
    assert_trees_close(treenn.grad(loss)(rematted, x), treenn.grad(loss)(stack, x))
    evaluated = nn.eval_mode(rematted)
    grads = eqx.filter_grad(lambda m: (m(x) ** 2).mean())(evaluated)
    ref_grads = eqx.filter_grad(lambda m: (m(x) ** 2).mean())(nn.eval_mode(stack))
    assert_trees_close(grads, ref_grads)
    assert float(jnp.abs(grads.blocks[0].up.weight).sum()) > 0


def test_lora_adapters_inside_a_checkpointed_block_get_their_gradient(
    stack: Stack, x: jax.Array
) -> None:
    # PyTorch's reentrant checkpoint gave frozen-input blocks no gradient at all
    # (transformers#26221); here the adapters' gradients equal the plain model's.
    key = jax.random.key(3)
    adapted = treenn.lora(treenn.freeze(stack), "blocks.*.up", rank=2, key=key)
    # Non-zero lora_B so that lora_A's gradient is not zero by construction.
    adapted = jax.tree_util.tree_map(lambda a: a, adapted)
    adapted = eqx.tree_at(
        lambda m: [b.up.lora_B for b in m.blocks],
        adapted,
        [jnp.full_like(b.up.lora_B, 0.1) for b in adapted.blocks],
    )
    rematted = treenn.remat(adapted, "blocks.*")
    grads = treenn.grad(loss)(rematted, x)
    ref = treenn.grad(loss)(adapted, x)
    assert_trees_close(grads, ref)
    for block in grads.blocks:
        assert float(jnp.abs(block.up.lora_A).sum()) > 0
        assert float(jnp.abs(block.up.lora_B).sum()) > 0
    assert treenn.statuses(rematted) == treenn.statuses(adapted)


def test_a_rematerialised_lora_layer_itself(stack: Stack, x: jax.Array) -> None:
    adapted = treenn.lora(treenn.freeze(stack), "blocks.*.up", rank=2, key=jax.random.key(3))
    rematted = treenn.remat(adapted, "blocks.*.up")
    assert type(rematted.blocks[0].up).__name__ == "RematLoRALinear"
    assert_trees_close(treenn.grad(loss)(rematted, x), treenn.grad(loss)(adapted, x))


@pytest.mark.parametrize("where", ["blocks.*", nn.BatchNorm, None])
def test_batchnorm_statistics_equal_under_train_step(
    stack: Stack, x: jax.Array, where: Any
) -> None:
    tx = optax.sgd(0.1)

    def loss_fn(model: Any, x: jax.Array) -> jax.Array:
        return (model(x) ** 2).mean()

    def two_steps(model: Any) -> Any:
        step = treenn.train_step(loss_fn, tx)
        with optax_promotion():
            state = tx.init(treenn.trainable(model))
        for _ in range(2):
            with optax_promotion():
                model, state, value = step(model, state, x)
        return model, value

    rematted = treenn.remat(stack, where)
    new, value = two_steps(rematted)
    ref, ref_value = two_steps(stack)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for b, r in zip(new.blocks, ref.blocks):
        np.testing.assert_allclose(b.norm.running_mean, r.norm.running_mean, rtol=1e-6)
        np.testing.assert_allclose(b.norm.running_var, r.norm.running_var, rtol=1e-6)
        assert not np.allclose(b.norm.running_var, 1.0)  # the statistics did move
    # The model the step returns is still rematerialised as it was.
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(rematted)


def test_batchnorm_called_twice_in_a_checkpointed_block_continues_its_statistics(
    x: jax.Array,
) -> None:
    class Twice(treenn.Module):
        norm: nn.BatchNorm

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.norm(self.norm(x) * 2.0)

    model = Twice(nn.BatchNorm(4))
    _, ref = treenn.apply(model, x)
    _, new = treenn.apply(treenn.remat(model, None), x)
    np.testing.assert_allclose(new.norm.running_mean, ref.norm.running_mean, rtol=1e-6)
    np.testing.assert_allclose(new.norm.running_var, ref.norm.running_var, rtol=1e-6)


def test_paths_statuses_modes_and_pins_are_unchanged(stack: Stack) -> None:
    model = treenn.freeze(stack, "blocks.0.**")
    model = nn.eval_mode(model, "blocks.1.norm", pin=True)
    for where in ("blocks.*", None, nn.Linear, eqx.nn.Linear, nn.BatchNorm):
        rematted = treenn.remat(model, where)
        assert treenn.statuses(rematted) == treenn.statuses(model)
        assert nn.modes(rematted) == nn.modes(model)
        assert nn.pinned(rematted) == nn.pinned(model)
    rematted = treenn.remat(model, "blocks.*")
    # Surgery after remat keeps the remat classes (the class follows the fields).
    frozen = treenn.freeze(rematted)
    assert type(frozen.blocks[1]) is type(rematted.blocks[1])
    assert nn.modes(nn.train_mode(rematted)) == nn.modes(nn.train_mode(model))


def test_equinox_layers_and_user_modules(x: jax.Array) -> None:
    key = jax.random.key(0)
    model = [EqxBlock(eqx.nn.MLP(4, 4, 8, 2, key=key)), eqx.nn.Linear(4, 3, key=key)]
    rematted = treenn.remat(model, (EqxBlock, eqx.nn.Linear))
    assert isinstance(rematted[0], EqxBlock) and type(rematted[0]) is not EqxBlock
    assert isinstance(rematted[1], eqx.nn.Linear)

    def f(m: Any) -> jax.Array:
        return jax.vmap(m[1])(m[0](x)).sum()

    np.testing.assert_allclose(f(rematted), f(model), rtol=1e-6)
    assert_trees_close(eqx.filter_grad(f)(rematted), eqx.filter_grad(f)(model))
    # An Equinox layer holding a frozen array keeps its remat class and reads through.
    frozen = treenn.freeze(rematted, "1.weight")
    assert type(frozen[1]) is type(rematted[1])
    assert isinstance(frozen[1].weight, jax.Array)
    grads = treenn.grad(f)(frozen)
    assert grads[1].weight is None and grads[1].bias is not None
    mlp = treenn.remat(eqx.nn.MLP(4, 2, 8, 2, key=key), "layers.*")
    assert (
        remat_primitives(jax.make_jaxpr(lambda v: jax.grad(lambda v: mlp(v).sum())(v))(x[0]).jaxpr)
        == 3
    )


def test_abstract_models(stack: Stack) -> None:
    abstract = jax.eval_shape(lambda: Stack(key=jax.random.key(0)))
    rematted = treenn.remat(abstract, "blocks.*")
    assert type(rematted.blocks[0]) is type(treenn.remat(stack, "blocks.*").blocks[0])
    assert treenn.statuses(rematted) == treenn.statuses(abstract)
    filtered = eqx.filter_eval_shape(lambda: Stack(key=jax.random.key(0)))
    out = eqx.filter_eval_shape(
        lambda m, v: nn.eval_mode(m)(v), treenn.remat(filtered, None), jnp.ones((5, 4))
    )
    assert out.shape == (5, 2)


# -- the policy is part of the structure -------------------------------------------------


def test_policy_changes_the_structure_and_jit_retraces(stack: Stack, x: jax.Array) -> None:
    traces = []

    @treenn.jit
    def f(model: Any, x: jax.Array) -> jax.Array:
        traces.append(None)
        return model(x)

    model = nn.eval_mode(stack)
    plain = treenn.remat(model, "blocks.*")
    dots = treenn.remat(model, "blocks.*", policy=jax.checkpoint_policies.dots_saveable)
    f(plain, x)
    f(treenn.remat(model, "blocks.*"), x)
    assert len(traces) == 1
    f(dots, x)
    assert len(traces) == 2
    assert jax.tree_util.tree_structure(plain) != jax.tree_util.tree_structure(dots)
    # Rematerialising again with another policy replaces it; with the same, is a no-op.
    assert type(treenn.remat(dots, "blocks.*").blocks[0]) is type(plain.blocks[0])
    same = treenn.remat(plain, "blocks.*")
    assert all(a is b for a, b in zip(same.blocks, plain.blocks))


def test_pickle_and_deepcopy_keep_the_policy(stack: Stack, x: jax.Array) -> None:
    policy = jax.checkpoint_policies.dots_saveable
    model = treenn.freeze(treenn.remat(stack, (Block, eqx.nn.Linear), policy=policy), "head")
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert jax.tree_util.tree_structure(copied) == jax.tree_util.tree_structure(model)
        assert type(copied.blocks[0]) is type(model.blocks[0])
        assert treenn.statuses(copied) == treenn.statuses(model)
        assert_trees_close(copied, model)
    # The pickle names the base class, never the generated one.
    assert b"RematBlock" not in pickle.dumps(model)


def test_save_load_keeps_what_like_has(stack: Stack, tmp_path: Any) -> None:
    policy = jax.checkpoint_policies.dots_saveable
    model = treenn.remat(stack, "blocks.*", policy=policy)
    treenn.save(tmp_path / "m.safetensors", model)
    like = treenn.remat(Stack(key=jax.random.key(9)), "blocks.*", policy=policy)
    loaded = treenn.load(tmp_path / "m.safetensors", like)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(model)
    assert_trees_close(loaded, model)
    abstract = treenn.remat(
        jax.eval_shape(lambda: Stack(key=jax.random.key(0))), "blocks.*", policy=policy
    )
    assert_trees_close(treenn.load(tmp_path / "m.safetensors", abstract), model)


# -- errors ---------------------------------------------------------------------------


def test_a_selection_without_a_module_names_the_selector(stack: Stack) -> None:
    with pytest.raises(
        ValueError, match=r"where='blocks\.0\.up\.weight' matches no callable module.*'blocks\.0'"
    ):
        treenn.remat(stack, "blocks.0.up.weight")
    with pytest.raises(ValueError, match="where='nothing' matches no callable module"):
        treenn.remat(stack, "nothing", policy=False)
    with pytest.raises(ValueError, match="the model has no callable module"):
        treenn.remat({"w": jnp.ones(3)}, None)


def test_bad_policies_and_models_are_refused(stack: Stack) -> None:
    with pytest.raises(TypeError, match="policy=True is not a checkpoint policy"):
        treenn.remat(stack, "blocks.*", policy=True)
    # (The suite's runtime type checker refuses a non-callable first; both name it.)
    with pytest.raises(TypeError, match="policy"):
        treenn.remat(stack, "blocks.*", policy="dots")  # type: ignore[arg-type]

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, *args: Any, **kwargs: Any) -> bool:
            return False

    with pytest.raises(TypeError, match="is not hashable"):
        treenn.remat(stack, "blocks.*", policy=Unhashable())
    with pytest.raises(TypeError, match="treenn.remat: model is the class Stack"):
        treenn.remat(Stack, "blocks.*")
    with pytest.raises(TypeError, match="where"):
        treenn.remat(stack, 3)  # type: ignore[arg-type]


def test_lora_and_merge_lora_keep_a_rematerialised_layer_rematerialised() -> None:
    # lora after remat of the layer itself: the adapted layer stays under remat, with
    # the same outputs, statuses and (after merge_lora) merged weight as without remat.
    key = jax.random.key(0)
    plain = nn.Sequential(nn.Linear(4, 4, key=key), nn.Linear(4, 2, key=key))
    remat = treenn.remat(plain, "layers.0", policy=None)

    def adapt(m: Any) -> Any:
        m = treenn.lora(m, "layers.0", rank=2, key=key)
        return eqx.tree_at(lambda m: m.layers[0].lora_B, m, jnp.full((4, 2), 0.1))

    with_remat, without = adapt(remat), adapt(plain)
    assert type(with_remat.layers[0]).__name__ == "RematLoRALinear"
    assert isinstance(with_remat.layers[0], nn.Linear)
    assert treenn.statuses(with_remat) == treenn.statuses(without)
    x = jnp.ones((3, 4))
    assert jnp.allclose(with_remat(x), without(x))
    merged = treenn.merge_lora(with_remat)
    assert type(merged.layers[0]).__name__ == "RematLinear"
    assert jnp.allclose(merged.layers[0].weight, treenn.merge_lora(without).layers[0].weight)
