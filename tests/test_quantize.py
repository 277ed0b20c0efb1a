"""treenn.quantize and treenn.dequantize (issue 23, API.md §9): NF4 and int8 storage of
Linear and Embedding weights, QLoRA, checked against bitsandbytes."""

from __future__ import annotations

import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import close, optax_promotion, rand, rand_np

import treenn
import treenn.nn as nn
from treenn._module import build
from treenn._quantize import _DYNAMIC, _NF4, QuantizedWeight, _nested_with

X = rand((3, 64), seed=5)


def mlp(key: int = 0) -> nn.Sequential:
    k1, k2 = jax.random.split(jax.random.key(key))
    return nn.Sequential(nn.Linear(64, 96, key=k1), nn.Linear(96, 8, key=k2))


def packed(layer: object) -> QuantizedWeight:
    """The packed storage a quantized layer holds (what the tests compare bit for bit)."""
    storage = object.__getattribute__(layer, "__dict__")["weight"].value
    assert type(storage) is QuantizedWeight
    return storage


def bits(x: jax.Array) -> np.ndarray:
    return np.asarray(x).view(np.float32)


# -- bitsandbytes ------------------------------------------------------------------------

# (96, 128) rows hold whole blocks; (33, 47) an odd count (a padded nibble, a partial
# last block); (300, 200) blocks straddling rows.
SHAPES = [(96, 128), (33, 47), (300, 200)]


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    # Rows of different scales, so that the blocks' absmaxes (double-quantized) spread.
    scales = np.random.default_rng(seed + 100).uniform(0.01, 3, size=(shape[0], 1))
    return (rand_np(shape, seed) * scales).astype(np.float32)


def test_tables_equal_bitsandbytes() -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_array_equal(_NF4, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(_DYNAMIC, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes(shape: tuple[int, ...]) -> None:
    """Codes, scales and dequantized values of bitsandbytes' quantize_4bit/dequantize_4bit
    (blocksize 64, nf4), without and with double quantization."""
    F = pytest.importorskip("bitsandbytes.functional")
    torch = pytest.importorskip("torch")
    w = _weights(shape, seed=sum(shape))
    layer = nn.Linear(shape[1], shape[0], key=jax.random.key(0))
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.asarray(w))

    q, state = F.quantize_4bit(
        torch.from_numpy(w), blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    mine = packed(treenn.quantize(layer, None, double_quant=False))
    np.testing.assert_array_equal(np.asarray(mine.codes), q.numpy().reshape(-1))
    np.testing.assert_array_equal(bits(mine.absmax), state.absmax.numpy())
    want = F.dequantize_4bit(q, state).numpy()
    np.testing.assert_array_equal(np.asarray(mine.dequantized()), want)

    q2, state2 = F.quantize_4bit(
        torch.from_numpy(w), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    mine2 = packed(treenn.quantize(layer, None, double_quant=True))
    np.testing.assert_array_equal(np.asarray(mine2.codes), q2.numpy().reshape(-1))
    # The offset is a float32 mean: torch's and XLA's sum in different orders.
    offset = float(bits(mine2.offset)[0])
    assert offset == pytest.approx(state2.offset.item(), rel=1e-6)
    # From bitsandbytes' offset, the scales' codes and their absmax are bitsandbytes'...
    codes, nested = _nested_with(
        jnp.asarray(state.absmax.numpy()), jnp.asarray(state2.offset.numpy())
    )
    np.testing.assert_array_equal(np.asarray(codes), state2.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(nested), state2.state2.absmax.numpy())
    # ...and so are the dequantized values.
    theirs = build(
        QuantizedWeight,
        {
            **mine2.__dict__,
            "absmax": jnp.asarray(state2.absmax.numpy()),
            "nested_absmax": jnp.asarray(state2.state2.absmax.numpy()).view(jnp.uint32),
            "offset": jnp.asarray(state2.offset.numpy().reshape(1)).view(jnp.uint32),
        },
    )
    want2 = F.dequantize_4bit(q2, state2).numpy()
    np.testing.assert_array_equal(np.asarray(theirs.dequantized()), want2)
    # With its own offset: the same to float32 rounding of the scales.
    close(mine2.dequantized(), want2, rtol=1e-5, atol=1e-6)


# -- the model ---------------------------------------------------------------------------


def test_quantized_layers_read_dequantized_weights() -> None:
    model = mlp()
    q = treenn.quantize(model, nn.Linear)
    assert type(q.layers[0]) is nn.Linear  # no subclass: the field reads as a float array
    assert q.layers[0].weight.dtype == jnp.float32 and q.layers[0].weight.shape == (96, 64)
    assert treenn.statuses(q) == {
        **{f"layers.{i}.weight.{a}": "static" for i in (0, 1) for a in ARRAYS},
        "layers.0.bias": "trainable",
        "layers.1.bias": "trainable",
    }
    # Within NF4's error of the float model: half a level's gap (<= 0.16) of each
    # block's absmax per weight.
    for i in (0, 1):
        w, wq = model.layers[i].weight, q.layers[i].weight
        assert float(jnp.max(jnp.abs(w - wq))) <= 0.17 * float(jnp.max(jnp.abs(w)))
    close(q(X), model(X), rtol=0.2, atol=0.2)
    # Exactly a float model holding the dequantized weights.
    deq = treenn.dequantize(q)
    np.testing.assert_array_equal(np.asarray(q(X)), np.asarray(deq(X)))
    assert treenn.statuses(deq)["layers.0.weight"] == "frozen"
    np.testing.assert_array_equal(
        np.asarray(deq.layers[0].weight), np.asarray(packed(q.layers[0]).dequantized())
    )


ARRAYS = ("codes", "absmax", "nested_absmax", "offset")


def test_int8_and_embeddings() -> None:
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    emb = nn.Embedding(50, 16, key=k1)
    eemb = eqx.nn.Embedding(50, 16, key=k2)
    elin = eqx.nn.Linear(16, 4, key=k3)
    ids = jnp.arange(7)
    for dtype, bound in (("int8", 0.5 / 127), ("nf4", 0.17)):
        q = treenn.quantize(emb, None, dtype=dtype)
        assert float(jnp.max(jnp.abs(q(ids) - emb(ids)))) <= bound * float(
            jnp.max(jnp.abs(emb.weight))
        )
        qe = treenn.quantize(eemb, None, dtype=dtype, double_quant=False)
        assert isinstance(qe, eqx.nn.Embedding)
        np.testing.assert_array_equal(np.asarray(qe(3)), np.asarray(qe.weight[3]))
        assert float(jnp.max(jnp.abs(qe.weight - eemb.weight))) <= bound * float(
            jnp.max(jnp.abs(eemb.weight))
        )
        ql = treenn.quantize(elin, None, dtype=dtype)
        close(ql(X[0, :16]), elin(X[0, :16]), rtol=0.1, atol=0.1)
    assert packed(treenn.quantize(emb, None, dtype="int8")).codes.dtype == jnp.int8


def test_bfloat16_weights_dequantize_to_bfloat16() -> None:
    layer = nn.Linear(64, 8, dtype=jnp.bfloat16, key=jax.random.key(2))
    q = treenn.quantize(layer, None)
    assert q.weight.dtype == jnp.bfloat16
    assert q(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_bits_per_parameter_4096() -> None:
    """QLoRA's 4.127 bits a weight for NF4 with double quantization (measured on the
    abstract model: the packed arrays' shapes and dtypes are the storage)."""
    big = jax.eval_shape(lambda: nn.Linear(4096, 4096, bias=False, key=jax.random.key(0)))
    total = {}
    for dq in (True, False):
        storage = packed(treenn.quantize(big, None, double_quant=dq))
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(storage))
        total[dq] = 8 * nbytes / 4096**2
    assert total[True] == pytest.approx(4.127, abs=1e-3) and total[True] <= 4.15
    assert total[False] == 4.5
    int8 = packed(treenn.quantize(big, None, dtype="int8"))
    assert 8 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(int8)) / 4096**2 < 8.2


@pytest.mark.slow  # about 10 s on two shared cores: compiles a train step
def test_qlora_trains_only_the_adapters() -> None:
    model = treenn.lora(
        treenn.quantize(treenn.freeze(mlp()), None), None, rank=4, key=jax.random.key(3)
    )
    status = treenn.statuses(model)
    assert {p for p, s in status.items() if s == "trainable"} == {
        "layers.0.lora_A",
        "layers.0.lora_B",
        "layers.1.lora_A",
        "layers.1.lora_B",
    }
    assert status["layers.0.weight.codes"] == "static"

    def loss(m: nn.Sequential) -> jax.Array:
        return jnp.mean(m(X) ** 2)

    grads = treenn.jit(treenn.grad(loss))(model)
    # lora_B starts at zero, so lora_A's gradient is zero at step 0; lora_B's is not.
    assert float(jnp.max(jnp.abs(grads.layers[0].lora_B))) > 0
    assert float(jnp.max(jnp.abs(grads.layers[1].lora_B))) > 0
    tx = optax.adam(1e-2)
    opt_state = tx.init(treenn.trainable(model))
    step = treenn.train_step(lambda m, x: jnp.mean(m(x) ** 2), tx)
    before = packed(model.layers[0])
    first = float(loss(model))
    with optax_promotion():
        for _ in range(3):
            model, opt_state, _ = step(model, opt_state, X)
    assert float(loss(model)) < first
    after = packed(model.layers[0])
    for name in ARRAYS:
        assert getattr(after, name) is getattr(before, name)  # the base never moves
    # An unfreeze of everything leaves the packed storage static (integers).
    assert treenn.statuses(treenn.unfreeze(model))["layers.0.weight.absmax"] == "static"

    merged = treenn.merge_lora(model)
    assert type(merged.layers[0]) is nn.Linear
    assert treenn.statuses(merged)["layers.0.weight"] == "frozen"
    assert merged.layers[0].weight.dtype == jnp.float32
    close(merged(X), model(X), rtol=1e-5, atol=1e-5)


def test_jit_treats_packed_arrays_as_arrays() -> None:
    q = treenn.quantize(mlp(), None)
    traces = []

    def forward(m: nn.Sequential, x: jax.Array) -> jax.Array:
        traces.append(1)
        return m(x)

    call = treenn.jit(forward)
    close(call(q, X), q(X), rtol=1e-6, atol=1e-6)  # XLA fuses: float32 rounding only
    other = treenn.quantize(mlp(key=1), None)  # same structure, other arrays: no retrace
    close(call(other, X), other(X), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1
    leaves = jax.tree.leaves(eqx.filter(q, eqx.is_array))
    assert any(x.dtype == jnp.uint8 for x in leaves)


def test_save_load_and_pickle_keep_packed_storage(tmp_path) -> None:
    q = treenn.quantize(mlp(), "layers.0")
    path = tmp_path / "q.safetensors"
    treenn.save(path, q)
    like = treenn.quantize(mlp(key=7), "layers.0")
    back = treenn.load(path, like)
    for name in ARRAYS:
        np.testing.assert_array_equal(
            np.asarray(getattr(packed(back.layers[0]), name)),
            np.asarray(getattr(packed(q.layers[0]), name)),
        )
    assert treenn.statuses(back) == treenn.statuses(q)
    np.testing.assert_array_equal(np.asarray(back(X)), np.asarray(q(X)))
    # A float model does not take the packed file, and says where.
    with pytest.raises(treenn.CheckpointError, match=r"layers\.0\.weight"):
        treenn.load(path, mlp())
    again = pickle.loads(pickle.dumps(q))
    np.testing.assert_array_equal(np.asarray(again(X)), np.asarray(q(X)))


def test_abstract_models() -> None:
    concrete = treenn.quantize(mlp(), None)
    abstract = treenn.quantize(jax.eval_shape(mlp), None)
    traced = jax.eval_shape(lambda: treenn.quantize(mlp(), None))
    shapes = lambda m: [(x.shape, x.dtype) for x in jax.tree.leaves(m)]  # noqa: E731
    assert shapes(abstract) == shapes(concrete) == shapes(traced)
    assert treenn.statuses(abstract) == treenn.statuses(concrete)
    deq = treenn.dequantize(abstract)
    assert deq.layers[0].weight.shape == (96, 64)
    assert treenn.statuses(deq) == treenn.statuses(treenn.dequantize(concrete))


def test_where_selects_layers() -> None:
    q = treenn.quantize(mlp(), "layers.1")
    assert treenn.statuses(q)["layers.0.weight"] == "trainable"
    assert treenn.statuses(q)["layers.1.weight.codes"] == "static"
    # Quantizing again leaves quantized weights as they are.
    again = treenn.quantize(q, None)
    assert packed(again.layers[1]) is packed(q.layers[1])
    # dequantize(where=) acts on the selection only.
    both = treenn.quantize(mlp(), None)
    one = treenn.dequantize(both, "layers.0")
    assert treenn.statuses(one)["layers.0.weight"] == "frozen"
    assert "layers.1.weight.codes" in treenn.statuses(one)


def test_errors_name_what_was_wrong() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"nope.*matches no Linear or Embedding.*layers\.0"):
        treenn.quantize(model, "nope")
    with pytest.raises(ValueError, match="has no Linear or Embedding"):
        treenn.quantize(nn.LayerNorm(4), None)
    for bad in (0, 1, -64, True):
        with pytest.raises(ValueError, match=rf"block_size={bad!r} must be an int >= 2"):
            treenn.quantize(model, None, block_size=bad)
    # Not an int: refused by the runtime type check (the suite's) or by quantize itself.
    for bad in (64.0, "64"):
        with pytest.raises((TypeError, ValueError), match="block_size"):
            treenn.quantize(model, None, block_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dtype='fp4' must be one of \('nf4', 'int8'\)"):
        treenn.quantize(model, None, dtype="fp4")
    with pytest.raises(TypeError, match="double_quant"):
        treenn.quantize(model, None, double_quant=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the model has no quantized weight"):
        treenn.dequantize(model)
    with pytest.raises(ValueError, match=r"where='layers\.1' selects no quantized weight"):
        treenn.dequantize(treenn.quantize(model, "layers.0"), "layers.1")
    with pytest.raises(TypeError, match="not a model"):
        treenn.quantize("model.safetensors", None)  # type: ignore[arg-type]
