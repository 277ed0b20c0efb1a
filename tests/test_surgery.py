"""Tree surgery internals: `nn.eval_mode`, `treenn.freeze` and the walker behind them
rebuild only what changes, build each edited layer once with its final class, and still
reach every node, including ones behind custom pytree nodes."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from conftest import paths_with

import treenn
from treenn import nn

# Private on purpose: these tests check the walker's internals (the class a marked layer
# gets, the marks stored in it, which modules the walk may skip).
from treenn._module import Unwrapping
from treenn._status import Frozen
from treenn._tree import holds_nothing, inert


class Block(treenn.Module):
    linear: eqx.nn.Linear
    norm: nn.LayerNorm
    dropout: eqx.nn.Dropout

    def __init__(self, *, key: jax.Array):
        self.linear = eqx.nn.Linear(3, 3, key=key)
        self.norm = nn.LayerNorm(3)
        self.dropout = eqx.nn.Dropout(0.5)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.dropout(self.norm(self.linear(x)), key=key)


class Stack(treenn.Module):
    blocks: tuple[Block, ...]
    head: nn.Linear

    def __init__(self, *, key: jax.Array):
        keys = jax.random.split(key, 3)
        self.blocks = (Block(key=keys[0]), Block(key=keys[1]))
        self.head = nn.Linear(3, 2, key=keys[2])

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        for block in self.blocks:
            x = block(x, key=key)
        return self.head(x)


class Wrapped(eqx.Module):
    """A plain Equinox module holding a layer and an array behind a custom pytree node
    (`jtu.Partial`), which is neither a container nor a module."""

    fn: jtu.Partial

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.fn(x, key=key)


class Outer(treenn.Module):
    inner: Wrapped

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.inner(x, key=key)


def _apply(dropout: eqx.nn.Dropout, scale: jax.Array, x: jax.Array, *, key: jax.Array | None):
    return dropout(x * scale, key=key)


@pytest.fixture
def stack(key: jax.Array) -> Stack:
    return Stack(key=key)


def test_eval_mode_rebuilds_only_the_path_to_switched_layers(stack):
    new = nn.eval_mode(stack)
    for old_block, new_block in zip(stack.blocks, new.blocks):
        assert new_block.dropout.inference and not old_block.dropout.inference
        # Layers holding only arrays are not entered, let alone rebuilt.
        assert new_block.linear is old_block.linear
        assert new_block.norm is old_block.norm
    assert new.head is stack.head
    assert not any(nn.modes(stack).values())  # the input is unchanged


def test_eval_mode_with_a_path_selector_replaces_only_the_selected_layer(stack):
    new = nn.eval_mode(stack, "blocks.1.dropout")
    assert nn.modes(new) == {"blocks.0.dropout": False, "blocks.1.dropout": True}
    assert new.blocks[0].dropout is stack.blocks[0].dropout
    assert new.blocks[1].linear is stack.blocks[1].linear


def test_surgery_that_changes_nothing_returns_the_model_itself(stack):
    evaluating = nn.eval_mode(stack)
    assert nn.eval_mode(evaluating) is evaluating
    frozen = treenn.freeze(stack)
    assert treenn.freeze(frozen) is frozen
    assert treenn.unfreeze(stack) is stack
    # A selection of already-frozen arrays acts (no error) but changes nothing.
    assert treenn.freeze(frozen, "blocks.*.linear") is frozen


def test_freeze_gives_equinox_layers_their_final_class_at_once(stack):
    linear = stack.blocks[0].linear
    frozen = treenn.freeze(stack, "blocks.0.linear.weight")
    layer = frozen.blocks[0].linear
    assert type(layer) is not eqx.nn.Linear and isinstance(layer, eqx.nn.Linear)
    assert isinstance(layer, Unwrapping)
    assert type(layer.__dict__["weight"]) is Frozen
    assert layer.bias is layer.__dict__["bias"] is linear.bias
    # Reads through the mark, and computes what the unfrozen layer computes.
    assert jnp.array_equal(layer.weight, linear.weight)
    x = jnp.array([1.0, -2.0, 0.5])
    assert jnp.array_equal(layer(x), linear(x))
    # Untouched layers keep their class and identity.
    assert frozen.blocks[1].linear is stack.blocks[1].linear
    assert type(frozen.blocks[1].linear) is eqx.nn.Linear


def test_unfreeze_restores_the_original_class_only_when_no_mark_is_left(stack):
    frozen = treenn.freeze(stack, "blocks.0.linear")
    half = treenn.unfreeze(frozen, "blocks.0.linear.bias")
    assert isinstance(half.blocks[0].linear, Unwrapping)  # the weight is still frozen
    assert paths_with(half, "frozen") == {"blocks.0.linear.weight"}
    back = treenn.unfreeze(half, "blocks.0.linear.weight")
    assert type(back.blocks[0].linear) is eqx.nn.Linear
    assert paths_with(back, "frozen") == set()
    assert eqx.tree_equal(back, stack)


def _wrapped() -> Outer:
    return Outer(Wrapped(jtu.Partial(_apply, eqx.nn.Dropout(0.5), jnp.array([2.0, 3.0]))))


def test_freeze_reaches_arrays_behind_a_custom_pytree_node_in_an_equinox_layer():
    model = _wrapped()
    assert not inert(model.inner)  # the walk must enter it, not edit it field by field
    frozen = treenn.freeze(model)
    assert paths_with(frozen, "frozen") == {"inner.fn.0.1"}
    assert jtu.tree_leaves(treenn.trainable(frozen)) == []
    assert paths_with(treenn.freeze(model, "inner.fn.0.1"), "frozen") == {"inner.fn.0.1"}
    assert paths_with(treenn.unfreeze(frozen), "frozen") == set()
    x = jnp.array([1.0, 1.0])
    assert jnp.array_equal(nn.eval_mode(frozen)(x), jnp.array([2.0, 3.0]))


def test_eval_mode_reaches_layers_behind_a_custom_pytree_node():
    model = _wrapped()
    assert nn.modes(model) == {"inner.fn.0.0": False}
    new = nn.eval_mode(model)
    assert nn.modes(new) == {"inner.fn.0.0": True}
    assert new.inner.fn.args[1] is model.inner.fn.args[1]
    x = jnp.array([1.0, 1.0])
    assert jnp.array_equal(new(x, key=jax.random.key(1)), jnp.array([2.0, 3.0]))
    assert nn.modes(nn.train_mode(new)) == {"inner.fn.0.0": False}


def test_module_dict_is_the_raw_state(stack):
    # `__dict__` is what Equinox's flatten reads: marks stay, only fields unwrap.
    head = treenn.freeze(stack).head
    assert type(head.__dict__["weight"]) is Frozen
    assert head.__dict__["weight"].value is stack.head.weight
    assert type(head.weight) is not Frozen and jnp.array_equal(head.weight, stack.head.weight)


def test_inert_modules_hold_only_leaves(stack):
    assert inert(stack.blocks[0].linear)
    assert inert(stack.blocks[0].dropout)
    assert inert(stack.head)
    assert inert(treenn.freeze(stack).head)  # marks hold one array each
    assert not inert(stack.blocks[0])
    assert not inert(stack)
    assert not inert(eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (jnp.ones(2), True),
        (1.5, True),
        ("name", True),
        (None, True),
        (jax.nn.relu, True),
        (Frozen(jnp.ones(2)), True),
        ((), False),
        ([jnp.ones(2)], False),
        ({"a": 1}, False),
        (jtu.Partial(jnp.add, 1.0), False),
        (eqx.nn.Dropout(0.1), False),
    ],
)
def test_holds_nothing(value, expected):
    assert holds_nothing(value) is expected
