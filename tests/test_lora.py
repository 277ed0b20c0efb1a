"""treenn.lora, treenn.merge_lora and adapter-only checkpoints (issue 17)."""

from __future__ import annotations

import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Net, close, named, optax_promotion, rand, rand_np, statuses

import treenn
import treenn.nn as nn
from treenn._lora import (  # private on purpose: the classes treenn.lora builds
    LoRAConv2d,
    LoRAEqxConv2d,
    LoRAEqxLinear,
    LoRALinear,
    LoRAMultiheadAttention,
)


class Zoo(treenn.Module):
    """One of each adaptable layer, treenn's and Equinox's, and a norm that is not."""

    lin: nn.Linear
    conv: nn.Conv2d
    mha: nn.MultiheadAttention
    norm: nn.LayerNorm
    elin: eqx.nn.Linear
    econv: eqx.nn.Conv2d

    def __init__(self, *, key: jax.Array):
        k = jax.random.split(key, 5)
        self.lin = nn.Linear(4, 6, key=k[0])
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, key=k[1])
        self.mha = nn.MultiheadAttention(8, 2, key=k[2])
        self.norm = nn.LayerNorm(8)
        self.elin = eqx.nn.Linear(4, 6, key=k[3])
        self.econv = eqx.nn.Conv2d(3, 5, 3, padding=1, key=k[4])


X = rand((2, 4))
IMG = rand((2, 7, 7, 3), seed=1)
SEQ = rand((2, 5, 8), seed=2)
CHW = rand((3, 6, 6), seed=3)

CALLS = {
    "lin": lambda m: m.lin(X),
    "conv": lambda m: m.conv(IMG),
    "mha": lambda m: nn.eval_mode(m.mha)(SEQ),
    "elin": lambda m: m.elin(X[0]),
    "econv": lambda m: m.econv(CHW),
}


def randomised(model, seed=0):
    """`model` with every trainable array (the adapters) redrawn: lora_B nonzero."""
    params, rest = treenn.partition(model)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    new = [
        rand(x.shape, seed=seed + i, scale=0.3).astype(x.dtype) if isinstance(x, jax.Array) else x
        for i, x in enumerate(leaves)
    ]
    return treenn.combine(jax.tree_util.tree_unflatten(treedef, new), rest)


@pytest.fixture
def zoo(key):
    return Zoo(key=key)


# -- structure, status, initial outputs -----------------------------------------------


def test_adapters_paths_layouts_and_status(zoo, key):
    model = treenn.lora(zoo, None, rank=2, key=key)
    got = {p: s for p, s in statuses(model).items() if s != "static"}
    for layer, (w, b) in {
        "lin": ("weight", "bias"),
        "conv": ("weight", "bias"),
        "mha": ("in_proj_weight", "in_proj_bias"),
        "mha.out_proj": ("weight", "bias"),
        "elin": ("weight", "bias"),
        "econv": ("weight", "bias"),
    }.items():
        assert got[f"{layer}.{w}"] == got[f"{layer}.{b}"] == "frozen"
        assert got[f"{layer}.lora_A"] == got[f"{layer}.lora_B"] == "trainable"
    # The norm is not adaptable: its status is untouched.
    assert got["norm.weight"] == "trainable"
    assert model.lin.lora_A.shape == (2, 4) and model.lin.lora_B.shape == (6, 2)
    assert model.conv.lora_A.shape == (2, 3, 3, 3) and model.conv.lora_B.shape == (5, 2, 1, 1)
    assert model.mha.lora_A.shape == (2, 8) and model.mha.lora_B.shape == (24, 2)
    assert model.econv.lora_A.shape == (2, 3, 3, 3)
    assert isinstance(model.lin, nn.Linear) and type(model.lin) is LoRALinear
    assert isinstance(model.conv, nn.Conv2d) and type(model.conv) is LoRAConv2d
    assert type(model.mha) is LoRAMultiheadAttention
    assert isinstance(model.elin, eqx.nn.Linear) and type(model.elin) is LoRAEqxLinear
    assert isinstance(model.econv, eqx.nn.Conv2d) and type(model.econv) is LoRAEqxConv2d
    assert np.all(np.asarray(model.lin.lora_B) == 0)
    # lora_A: PEFT's Kaiming-uniform, U(±1/sqrt(fan_in)), not zero.
    bound = 1 / np.sqrt(3 * 9)
    a = np.asarray(model.conv.lora_A)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound


def test_zero_init_leaves_outputs_unchanged(zoo, key):
    model = treenn.lora(zoo, None, rank=3, alpha=7, key=key)
    for name, call in CALLS.items():
        np.testing.assert_array_equal(call(model), call(zoo), err_msg=name)


def test_adapter_formula_and_scaling(key):
    layer = nn.Linear(4, 6, key=key)
    adapted = randomised(treenn.lora(layer, None, rank=2, alpha=5, key=key))
    a, b = np.asarray(adapted.lora_A, np.float64), np.asarray(adapted.lora_B, np.float64)
    x = np.asarray(X, np.float64)
    want = (
        x @ np.asarray(layer.weight, np.float64).T + np.asarray(layer.bias) + 2.5 * (x @ a.T @ b.T)
    )
    close(adapted(X), want.astype(np.float32), rtol=1e-5, atol=1e-5)
    # alpha=None means alpha=rank: scaling 1.
    plain = treenn.lora(layer, None, rank=2, key=key)
    assert plain.scaling == 1.0 and adapted.scaling == 2.5


def test_selection_rest_keeps_status(key):
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=2, key=key)
    model = treenn.lora(treenn.freeze(vit), "blocks.*.attn.*", rank=2, key=key)
    trainable = {p for p, s in statuses(model).items() if s == "trainable"}
    assert trainable == {
        f"blocks.{i}.attn.{proj}.lora_{ab}"
        for i in range(2)
        for proj in ("qkv", "proj")
        for ab in "AB"
    }
    # A layer selected by class, unfrozen model: only the selected layers freeze.
    model = treenn.lora(vit, lambda m: m.head, rank=2, key=key)
    st = statuses(model)
    assert st["head.weight"] == "frozen" and st["blocks.0.mlp.fc1.weight"] == "trainable"


def test_root_layer_and_class_selector(key):
    layer = treenn.lora(nn.Linear(3, 2, key=key), nn.Linear, rank=1, key=key)
    assert type(layer) is LoRALinear
    assert type(treenn.merge_lora(layer)) is nn.Linear


# -- merge ------------------------------------------------------------------------------


def test_merge_gives_plain_model_with_the_same_outputs(zoo, key):
    model = randomised(treenn.lora(zoo, None, rank=2, alpha=3, key=key))
    merged = treenn.merge_lora(model)
    for name, call in CALLS.items():
        close(call(merged), np.asarray(call(model)), rtol=1e-5, atol=1e-5)
        assert not np.allclose(call(merged), call(zoo), atol=1e-3), name  # adapters act
    assert type(merged.lin) is nn.Linear and type(merged.conv) is nn.Conv2d
    assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj) is nn.Linear
    assert isinstance(merged.elin, eqx.nn.Linear) and not isinstance(merged.elin, LoRAEqxLinear)
    st = statuses(merged)
    assert not any("lora" in p for p in st)
    assert st["lin.weight"] == st["econv.weight"] == st["mha.in_proj_weight"] == "frozen"
    assert statuses(treenn.merge_lora(treenn.unfreeze(model)))["lin.weight"] == "trainable"


def test_merge_without_adapters_is_an_error(zoo):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        treenn.merge_lora(zoo)


@pytest.mark.parametrize(
    "layer, x",
    [
        (lambda k: nn.Conv2d(3, 4, 3, padding=2, dilation=2, key=k), rand((2, 7, 7, 3))),
        (lambda k: nn.Conv1d(3, 4, 3, stride=2, key=k), rand((2, 9, 3))),
        (lambda k: nn.Conv3d(2, 3, (1, 3, 3), padding="SAME", key=k), rand((1, 3, 5, 5, 2))),
        (lambda k: eqx.nn.Conv1d(3, 4, 3, padding=1, key=k), rand((3, 9))),
        (lambda k: eqx.nn.MLP(4, 2, 8, 2, key=k), rand((4,))),
        (lambda k: eqx.nn.MultiheadAttention(2, 8, key=k), rand((5, 8))),
    ],
)
def test_merge_matches_adapted_across_layers(layer, x, key):
    base = layer(key)
    model = randomised(treenn.lora(base, None, rank=2, alpha=4, key=key))
    call = (
        (lambda m: m(x, x, x)) if isinstance(base, eqx.nn.MultiheadAttention) else (lambda m: m(x))
    )
    got = call(model)
    assert not np.allclose(got, call(base), atol=1e-3)
    close(call(treenn.merge_lora(model)), np.asarray(got), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16])
def test_half_precision_base_gets_float32_adapters(half, key):
    """PEFT's autocast_adapter_dtype=True: float32 adapters on a half-precision base, the
    adapter path in float32, the layer's output in the base's dtype (strict promotion:
    the suite would raise on an implicit bfloat16 + float32)."""
    layers = {
        "lin": nn.Linear(4, 6, dtype=half, key=key),
        "conv": nn.Conv2d(3, 4, 3, padding=1, dtype=half, key=key),
        "elin": eqx.tree_at(
            lambda m: (m.weight, m.bias),
            eqx.nn.Linear(4, 6, key=key),
            replace_fn=lambda w: w.astype(half),
        ),
    }
    inputs = {"lin": X, "conv": IMG, "elin": X[0]}
    for name, layer in layers.items():
        model = randomised(treenn.lora(layer, None, rank=2, alpha=4, key=key))
        assert model.lora_A.dtype == model.lora_B.dtype == jnp.float32, name
        x = inputs[name].astype(half)
        y = model(x)
        assert y.dtype == half, name
        # The adapter's contribution, computed in float64 from the same arrays.
        base = np.asarray(layer(x), np.float64)
        merged = treenn.merge_lora(model)
        assert merged.weight.dtype == half, name
        want = np.asarray(merged(x), np.float64)
        close(np.asarray(y, np.float64), want, rtol=2e-2, atol=2e-2)
        assert not np.allclose(np.asarray(y, np.float64), base, atol=1e-2), name
    # merge_lora sums in float32 and rounds once: the merged weight is the float64 sum
    # rounded to the base dtype.
    model = randomised(treenn.lora(layers["lin"], None, rank=2, alpha=4, key=key))
    a, b = (np.asarray(v, np.float64) for v in (model.lora_A, model.lora_B))
    want = np.asarray(layers["lin"].weight, np.float64) + 2.0 * b @ a
    got = treenn.merge_lora(model).weight
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, half)))


def test_adapter_dtype_override_and_full_precision_bases(key):
    half = nn.Linear(4, 6, dtype=jnp.bfloat16, key=key)
    model = randomised(treenn.lora(half, None, rank=2, dtype=jnp.bfloat16, key=key))
    assert model.lora_A.dtype == model.lora_B.dtype == jnp.bfloat16
    assert model(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    # A bfloat16 adapter on a float32 base: the sum in float32, the output float32.
    lin = nn.Linear(4, 6, key=key)
    low = randomised(treenn.lora(lin, None, rank=2, dtype=jnp.bfloat16, key=key))
    assert low.lora_A.dtype == jnp.bfloat16 and low(X).dtype == jnp.float32
    close(low(X), np.asarray(treenn.merge_lora(low)(X)), rtol=1e-2, atol=1e-2)
    # float32 and float64 bases keep their own dtype by default.
    assert treenn.lora(lin, None, rank=2, key=key).lora_A.dtype == jnp.float32
    with jax.enable_x64(True):
        wide = nn.Linear(4, 6, dtype=jnp.float64, key=key)
        assert treenn.lora(wide, None, rank=2, key=key).lora_B.dtype == jnp.float64
    with pytest.raises(ValueError, match="dtype=.*int32.* floating dtype"):
        treenn.lora(lin, None, rank=2, dtype=jnp.int32, key=key)


# -- stacked layers (eqx.filter_vmap) ---------------------------------------------------


def _slice(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def test_stacked_layers_get_stacked_adapters(key):
    """Defect 8: a stack of blocks built with eqx.filter_vmap and run with lax.scan, the
    standard Equinox pattern. The adapters used to take the stack axis for the rank."""
    stack = eqx.filter_vmap(lambda k: nn.Linear(4, 4, key=k))(jax.random.split(key, 3))
    model = randomised(treenn.lora(stack, None, rank=2, alpha=3, key=key))
    assert model.lora_A.shape == (3, 2, 4) and model.lora_B.shape == (3, 4, 2)
    st = statuses(model)
    assert st["weight"] == st["bias"] == "frozen" and st["lora_A"] == "trainable"

    def scan(layers, x):
        params, static = eqx.partition(layers, eqx.is_array)
        step = lambda h, p: (eqx.combine(p, static)(h), None)
        return jax.lax.scan(step, x, params)[0]

    # Each slice is an adapted layer computing LoRA's formula (float64 reference).
    h = np.asarray(X, np.float64)
    for i in range(3):
        w, b, a, bb = (
            np.asarray(v[i], np.float64)
            for v in (stack.weight, stack.bias, model.lora_A, model.lora_B)
        )
        h = h @ w.T + b + 1.5 * (h @ a.T @ bb.T)
        assert type(_slice(model, i)) is LoRALinear
    got = scan(model, X)
    close(got, h.astype(np.float32))
    assert not np.allclose(got, scan(stack, X), atol=1e-3)  # the adapters act
    # merge_lora: slice by slice; the merged stack scans to the same output.
    merged = treenn.merge_lora(model)
    assert type(merged) is nn.Linear and merged.weight.shape == (3, 4, 4)
    for i in range(3):
        a, bb = (np.asarray(v[i], np.float64) for v in (model.lora_A, model.lora_B))
        want = np.asarray(stack.weight[i], np.float64) + 1.5 * bb @ a
        close(merged.weight[i], want.astype(np.float32))
    close(scan(merged, X), np.asarray(got))


def test_stacked_ensemble_of_equinox_convs_and_non_square_linears(key):
    """An eqx.filter_vmap ensemble: per-member adapters, merged per member (the merge
    used to fail with a reshape TypeError on non-square layers)."""
    keys = jax.random.split(key, 2)
    convs = eqx.filter_vmap(lambda k: eqx.nn.Conv2d(3, 5, 3, padding=1, key=k))(keys)
    lins = eqx.filter_vmap(lambda k: nn.Linear(4, 6, key=k))(keys)
    run = lambda m, x: eqx.filter_vmap(lambda member: member(x))(m)
    for stack, x, a_shape, b_shape in [
        (convs, CHW, (2, 2, 3, 3, 3), (2, 5, 2, 1, 1)),
        (lins, X, (2, 2, 4), (2, 6, 2)),
    ]:
        model = randomised(treenn.lora(stack, None, rank=2, key=key))
        assert model.lora_A.shape == a_shape and model.lora_B.shape == b_shape
        got = run(model, x)
        for i in range(2):  # each member is the adapted layer it holds
            close(got[i], np.asarray(_slice(model, i)(x)))
        merged = treenn.merge_lora(model)
        close(run(merged, x), np.asarray(got))
        for i in range(2):
            close(merged.weight[i], np.asarray(treenn.merge_lora(_slice(model, i)).weight))


def test_weight_shape_the_layer_does_not_declare_is_an_error(key):
    layer = eqx.tree_at(lambda m: m.weight, nn.Linear(4, 6, key=key), jnp.ones((6, 5)))
    model = nn.Sequential(nn.Linear(4, 4, key=key), layer)
    with pytest.raises(ValueError, match=r"'layers\.1'.*weight has shape \(6, 5\).*\(6, 4\)"):
        treenn.lora(model, None, rank=2, key=key)


# -- misuse ---------------------------------------------------------------------------


def test_selector_with_nothing_adaptable_is_an_error(zoo, key):
    with pytest.raises(ValueError, match=r"where='norm' matches no layer that takes a LoRA"):
        treenn.lora(zoo, "norm", rank=2, key=key)
    with pytest.raises(ValueError, match=r"where='lin.weight' matches no layer"):
        treenn.lora(zoo, "lin.weight", rank=2, key=key)
    with pytest.raises(ValueError, match="has no layer that takes a LoRA"):
        treenn.lora(nn.LayerNorm(3), None, rank=2, key=key)


def test_bad_arguments(zoo, key):
    for kwargs, match in [
        ({"rank": 0}, "rank=0"),
        ({"rank": 2, "alpha": -1}, "alpha=-1"),
        ({"rank": 2, "dropout": 1.0}, "dropout=1.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            treenn.lora(zoo, "lin", key=key, **kwargs)
    with pytest.raises(TypeError, match="key"):
        treenn.lora(zoo, "lin", rank=2, key=3)


def test_already_adapted_grouped_and_unsupported_layers(zoo, key):
    model = treenn.lora(zoo, "lin", rank=2, key=key)
    with pytest.raises(ValueError, match="'lin' already has a LoRA adapter"):
        treenn.lora(model, "**", rank=2, key=key)
    grouped = nn.Conv2d(4, 4, 3, groups=2, key=key)
    with pytest.raises(ValueError, match="grouped convolution"):
        treenn.lora(grouped, None, rank=2, key=key)
    cross = nn.MultiheadAttention(8, 2, kdim=4, key=key)
    with pytest.raises(ValueError, match="separate q/k/v"):
        treenn.lora(cross, None, rank=2, key=key)
    with pytest.raises(ValueError, match="dropout=0.1 on 'mha'"):
        treenn.lora(zoo, "mha", rank=2, dropout=0.1, key=key)

    class MyLinear(nn.Linear):
        def __call__(self, x, *, key=None):
            return x @ self.weight.T * 2

    with pytest.raises(TypeError, match="is a .*MyLinear, a subclass"):
        treenn.lora(MyLinear(3, 3, key=key), None, rank=1, key=key)


# -- modes, freezing and the other helpers --------------------------------------------


def test_adapter_dropout_is_mode_bearing(key):
    mlp = nn.Sequential(nn.Linear(4, 8, key=key), nn.Dropout(0.2))
    model = treenn.lora(mlp, "layers.0", rank=2, dropout=0.5, key=key)
    assert nn.modes(model) == {"layers.0.lora_dropout": False, "layers.1": False}
    adapted = randomised(model)
    with pytest.raises(ValueError, match="lora_dropout.*needs `key=`"):
        adapted.layers[0](X)
    y1, y2 = (adapted.layers[0](X, key=jax.random.key(i)) for i in (1, 2))
    assert not np.allclose(y1, y2)  # dropout acts in training mode
    ev = nn.eval_mode(adapted)
    assert set(nn.modes(ev).values()) == {True}
    want = treenn.merge_lora(adapted).layers[0](X)
    close(ev.layers[0](X), np.asarray(want))
    # Pins: a pinned adapter dropout keeps its mode.
    pinned = nn.eval_mode(adapted, "**.lora_dropout", pin=True)
    assert nn.modes(nn.train_mode(pinned))["layers.0.lora_dropout"] is True
    # The dropout starts in evaluation mode when the whole model is in it.
    ev_model = treenn.lora(nn.eval_mode(mlp), "layers.0", rank=2, dropout=0.5, key=key)
    assert set(nn.modes(ev_model).values()) == {True}
    # No dropout: PEFT's Identity, no mode.
    assert nn.modes(treenn.lora(mlp, "layers.0", rank=2, key=key)) == {"layers.1": False}


def test_adapter_dropout_takes_the_unpinned_modules_mode(key):
    """Defect 12: the adapters' dropout took its mode from every module, pins included:
    with an MC-dropout pin (dropout pinned in training, the rest in evaluation) it
    started in training, and eval_step refused the adapted model as mixed modes."""
    net = Net(key=key)
    mc = nn.train_mode(nn.eval_mode(net), nn.Dropout, pin=True)
    predict = treenn.eval_step(lambda m, x, k: m(x, key=k))
    images = rand((2, 5, 5, 3))
    want = predict(mc, images, jax.random.key(1))  # accepted before lora
    adapted = treenn.lora(mc, "head", rank=2, dropout=0.3, key=key)
    np.testing.assert_array_equal(predict(adapted, images, jax.random.key(1)), want)
    assert nn.modes(adapted)["head.lora_dropout"] is True
    assert nn.pinned(adapted)["head.lora_dropout"] is False
    # The other way round: the BatchNorm pinned in evaluation, the dropout trains.
    frozen_bn = nn.eval_mode(net, nn.BatchNorm, pin=True)
    assert (
        nn.modes(treenn.lora(frozen_bn, "head", rank=2, dropout=0.3, key=key))["head.lora_dropout"]
        is False
    )
    # Every module pinned: the adapter dropout is the only one the steps switch; it
    # starts in evaluation when all of them are, else in training.
    pinned_eval = nn.eval_mode(net, pin=True)
    assert (
        nn.modes(treenn.lora(pinned_eval, "head", rank=2, dropout=0.3, key=key))[
            "head.lora_dropout"
        ]
        is True
    )
    pinned_mixed = nn.train_mode(pinned_eval, nn.Dropout, pin=True)
    assert (
        nn.modes(treenn.lora(pinned_mixed, "head", rank=2, dropout=0.3, key=key))[
            "head.lora_dropout"
        ]
        is False
    )


@pytest.mark.slow  # a ViT's compile; test_adapter_dropout_is_mode_bearing stays quick
def test_adapter_dropout_inside_attention_and_mlp_gets_keys(key):
    """treenn's Attention, MLP and MultiheadAttention hand their projections keys of
    their own, so an adapter's dropout trains inside them."""
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=1, key=key)
    where = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
    model = vit
    for w in where:
        model = treenn.lora(model, w, rank=2, dropout=0.5, key=key)
    model = randomised(model)
    images = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    y1, y2 = (model(images, key=jax.random.key(i)) for i in (1, 2))
    assert not np.allclose(y1, y2)  # the adapters' dropout acts
    with pytest.raises(ValueError, match="lora_dropout.*needs `key=`"):
        model(images)
    mha = treenn.lora(
        nn.MultiheadAttention(8, 2, key=key), "out_proj", rank=2, dropout=0.5, key=key
    )
    mha = randomised(mha)
    x = jax.random.normal(jax.random.key(4), (2, 5, 8))
    assert not np.allclose(mha(x, key=jax.random.key(1)), mha(x, key=jax.random.key(2)))


def test_freeze_and_unfreeze_adapters(zoo, key):
    model = treenn.lora(zoo, "lin", rank=2, key=key)
    frozen = treenn.freeze(model, "lin")
    assert statuses(frozen)["lin.lora_A"] == "frozen"
    back = treenn.unfreeze(frozen, "**.lora_*")
    assert statuses(back)["lin.lora_A"] == "trainable"
    assert statuses(back)["lin.weight"] == "frozen"
    assert type(back.lin) is LoRALinear


def test_summary_shows_adapters(zoo, key):
    text = treenn.summary(treenn.lora(zoo, "lin", rank=2, dropout=0.1, key=key))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("lin")}
    assert rows["lin.lora_A"][1] == "LoRALinear" and "trainable" in rows["lin.lora_A"]
    assert rows["lin.weight"][1] == "LoRALinear" and "frozen" in rows["lin.weight"]
    assert rows["lin.lora_dropout"][1] == "Dropout"


def test_save_load_pickle_jit(zoo, key, tmp_path):
    model = randomised(treenn.lora(zoo, None, rank=2, key=key))
    treenn.save(tmp_path / "m.eqx", model)
    back = treenn.load(tmp_path / "m.eqx", treenn.lora(Zoo(key=key), None, rank=2, key=key))
    assert statuses(back) == statuses(model)
    for name, call in CALLS.items():
        np.testing.assert_array_equal(call(back), call(model), err_msg=name)
    again = pickle.loads(pickle.dumps(model))
    assert type(again.elin) is LoRAEqxLinear
    np.testing.assert_array_equal(again.lin(X), model.lin(X))
    jitted = treenn.jit(lambda m, x: m.conv(x))
    close(jitted(model, IMG), np.asarray(model.conv(IMG)))


def test_adapter_only_checkpoint(key, tmp_path):
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=2, key=key)
    model = treenn.lora(treenn.freeze(vit), "**.qkv", rank=2, key=key)
    model = randomised(treenn.unfreeze(model, "head"))
    treenn.save(tmp_path / "adapters.eqx", treenn.trainable(model))
    treenn.save(tmp_path / "full.eqx", model)
    small, full = ((tmp_path / f).stat().st_size for f in ("adapters.eqx", "full.eqx"))
    assert small < full / 5
    # A fresh model: the base from elsewhere (here: the same init), adapters from the file.
    fresh = treenn.unfreeze(treenn.lora(treenn.freeze(vit), "**.qkv", rank=2, key=key), "head")
    loaded = treenn.load_trainable(tmp_path / "adapters.eqx", fresh)
    img = rand((2, 8, 8, 3))
    forward = treenn.jit(lambda m, x: m(x))  # one compile, not one per op
    np.testing.assert_array_equal(forward(loaded, img), forward(model, img))
    # Another trainable set: load's error names the paths.
    other = treenn.lora(treenn.freeze(vit), "**.proj", rank=2, key=key)
    with pytest.raises(Exception, match="qkv|proj"):
        treenn.load_trainable(tmp_path / "adapters.eqx", other)


def test_train_step_trains_adapters_only(key):
    net = nn.Sequential(nn.Linear(4, 8, key=key), jax.nn.relu, nn.Linear(8, 2, key=key))
    model = treenn.lora(treenn.freeze(net), nn.Linear, rank=2, key=key)
    tx = optax.adam(1e-2)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
    step = treenn.train_step(lambda m, x: jnp.mean(m(x) ** 2), tx)
    with optax_promotion():
        new, opt_state, _ = step(model, opt_state, X)
    for i in (0, 2):
        np.testing.assert_array_equal(new.layers[i].weight, model.layers[i].weight)
    assert not np.array_equal(new.layers[2].lora_B, model.layers[2].lora_B)
    assert set(jax.tree_util.tree_leaves(jax.tree.map(lambda x: x.shape, opt_state[0].mu)))


def test_shard_rules_on_adapted_model(key):
    from jax.sharding import AxisType, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
    model = treenn.lora(nn.Linear(4, 6, key=key), None, rank=2, key=key)
    placed = treenn.shard(model, mesh, {"lora_B": P("model"), "**": P()})
    assert statuses(placed) == statuses(model)
    assert placed.lora_B.sharding.spec == P("model")


def test_load_torch_base_weights_by_unchanged_paths(key):
    vit = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=1, key=key)
    state = {k: np.asarray(v) for k, v in named(vit).items()}
    other = treenn.models.vit_tiny(3, img_size=8, patch_size=4, depth=1, key=jax.random.key(9))
    adapted = treenn.lora(treenn.freeze(other), "**.qkv", rank=2, key=key)
    loaded, report = treenn.load_torch(state, adapted, strict=False, report=True)
    np.testing.assert_array_equal(loaded.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert set(report.missing) == {"blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B"}
    assert statuses(loaded) == statuses(adapted)
    with pytest.raises(treenn.CheckpointError, match="lora_A"):
        treenn.load_torch(state, adapted)


# -- numerics against Hugging Face PEFT -------------------------------------------------


@pytest.mark.slow
def test_matches_peft_linear_and_conv2d():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 5)
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    torch.manual_seed(0)
    net = Net()
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["fc", "conv"])
    peft_net = peft.get_peft_model(net, config)
    for name, p in peft_net.named_parameters():
        if "lora_B" in name:  # nonzero, so that the adapter shows
            torch.nn.init.normal_(p, std=0.5)
    inner = peft_net.base_model.model
    sd = {k: v.detach().numpy() for k, v in inner.fc.state_dict().items()}
    sd_c = {k: v.detach().numpy() for k, v in inner.conv.state_dict().items()}

    key = jax.random.key(0)
    fc = treenn.lora(nn.Linear(6, 5, key=key), None, rank=3, alpha=7, key=key)
    fc = _fill(
        fc,
        sd["base_layer.weight"],
        sd["base_layer.bias"],
        sd["lora_A.default.weight"],
        sd["lora_B.default.weight"],
    )
    conv = treenn.lora(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, key=key), None, rank=3, alpha=7, key=key
    )
    conv = _fill(
        conv,
        sd_c["base_layer.weight"],
        sd_c["base_layer.bias"],
        sd_c["lora_A.default.weight"],
        sd_c["lora_B.default.weight"],
    )
    x = rand_np((2, 6))
    img = rand_np((2, 3, 9, 9), seed=1)  # NCHW for torch
    with torch.no_grad():
        want_fc = inner.fc(torch.from_numpy(x)).numpy()
        want_conv = inner.conv(torch.from_numpy(img)).numpy()
    close(fc(jnp.asarray(x)), want_fc, rtol=1e-5, atol=1e-5)
    got = conv(jnp.asarray(img.transpose(0, 2, 3, 1)))
    close(np.asarray(got).transpose(0, 3, 1, 2), want_conv, rtol=1e-5, atol=1e-5)
    # merge_and_unload: the same merged weights.
    merged_torch = peft_net.merge_and_unload()
    close(treenn.merge_lora(fc).weight, merged_torch.fc.weight, rtol=1e-6, atol=1e-6)
    close(treenn.merge_lora(conv).weight, merged_torch.conv.weight, rtol=1e-6, atol=1e-6)


def _fill(layer, w, b, a, bb):
    """New values for the adapter's arrays; `eqx.tree_at` keeps their statuses."""
    filled = eqx.tree_at(
        lambda m: (m.weight, m.bias, m.lora_A, m.lora_B),
        layer,
        tuple(map(jnp.asarray, (w, b, a, bb))),
    )
    assert statuses(filled) == statuses(layer)  # the base weights stay frozen
    return filled


@pytest.mark.slow
def test_example_quick(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "lora.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical predictions: True" in out.stdout
    assert "LoRA + layer decay" in out.stdout and "linear probe" in out.stdout
    assert (tmp_path / "lora-trainable.eqx").stat().st_size < (tmp_path / "full.eqx").stat().st_size


@pytest.mark.slow
def test_matches_peft_multihead_attention():
    """In-projection adapter against PEFT; the out_proj adapter against a torch
    MultiheadAttention with the merged weight W + dW: PEFT 0.21 applies out_proj's delta
    twice (huggingface/peft#3774), so with it nonzero PEFT is no reference."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["mha"])
    peft_net = peft.get_peft_model(Net(), config)
    for name, p in peft_net.named_parameters():
        if "lora_B" in name and "out_proj" not in name:
            torch.nn.init.normal_(p, std=0.5)
    torch_mha = peft_net.base_model.model.mha
    sd = {k: v.detach().numpy() for k, v in torch_mha.state_dict().items()}
    key = jax.random.key(0)
    mha = treenn.lora(nn.MultiheadAttention(8, 2, key=key), None, rank=2, alpha=3, key=key)
    b_out = rand_np((8, 2), seed=5)
    out_proj = _fill(
        mha.out_proj,
        sd["base_layer.out_proj.base_layer.weight"],
        sd["base_layer.out_proj.base_layer.bias"],
        sd["base_layer.out_proj.lora_A.default.weight"],
        np.zeros((8, 2), np.float32),
    )
    filled = eqx.tree_at(
        lambda m: (m.in_proj_weight, m.in_proj_bias, m.lora_A, m.lora_B, m.out_proj),
        mha,
        (
            jnp.asarray(sd["base_layer.in_proj_weight"]),
            jnp.asarray(sd["base_layer.in_proj_bias"]),
            jnp.asarray(sd["lora_A.default.weight"]),
            jnp.asarray(sd["lora_B.default.weight"]),
            out_proj,
        ),
    )
    assert statuses(filled) == statuses(mha)  # the base weights stay frozen
    mha = filled
    x = rand_np((2, 5, 8))
    xs = (torch.from_numpy(x),) * 3
    with torch.no_grad():
        want = torch_mha(*xs, need_weights=False)[0].numpy()
    close(nn.eval_mode(mha)(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    # Both adapters: a plain torch layer with each delta merged once.
    mha = eqx.tree_at(lambda m: m.out_proj.lora_B, mha, jnp.asarray(b_out))
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    a_out = sd["base_layer.out_proj.lora_A.default.weight"]
    merged = {
        "in_proj_weight": sd["base_layer.in_proj_weight"]
        + 1.5 * sd["lora_B.default.weight"] @ sd["lora_A.default.weight"],
        "in_proj_bias": sd["base_layer.in_proj_bias"],
        "out_proj.weight": sd["base_layer.out_proj.base_layer.weight"] + 1.5 * b_out @ a_out,
        "out_proj.bias": sd["base_layer.out_proj.base_layer.bias"],
    }
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in merged.items()})
    with torch.no_grad():
        want = ref(*xs, need_weights=False)[0].numpy()
    close(nn.eval_mode(mha)(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    close(nn.eval_mode(treenn.merge_lora(mha))(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
