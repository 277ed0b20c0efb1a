"""`treenn.save` / `treenn.load`: bit-exact safetensors checkpoints of arrays, frozen
status, modes and pins; atomic writes; clear errors for files that do not fit."""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import Net

import treenn
import treenn.nn as nn
from treenn import CheckpointError

# -- helpers ---------------------------------------------------------------------------


class Rich(treenn.Module):
    """Net plus every kind of leaf a checkpoint must carry."""

    net: Net
    half: nn.Linear  # bfloat16 parameters
    drop: nn.Dropout
    steps: jax.Array  # int32
    rng: jax.Array  # typed threefry key
    rbg: jax.Array  # typed rbg key (other impl, other data shape)
    legacy: jax.Array  # raw uint32 key data

    def __init__(self, *, key: jax.Array):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.net = Net(key=k1)
        self.half = nn.Linear(2, 3, dtype=jnp.bfloat16, key=k2)
        self.drop = nn.Dropout(0.1)
        self.steps = jnp.array([3, -7], jnp.int32)
        self.rng = k3
        self.rbg = jax.random.key(int(jax.random.randint(k4, (), 0, 1000)), impl="rbg")
        self.legacy = jax.random.key_data(k4)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.net(x, key=key)


F32_BITS = np.array(
    [
        0x00000000,  # +0.0
        0x80000000,  # -0.0
        0x7F800000,  # +inf
        0xFF800000,  # -inf
        0x7FC00001,  # quiet NaN with payload
        0xFFC12345,  # negative quiet NaN with payload
        0x7F800001,  # signalling NaN
        0x00000001,  # smallest subnormal
        0x807FFFFF,  # largest negative subnormal
        0x7F7FFFFF,  # max float32
        0x3F800000,  # 1.0
        0xBFC00000,  # -1.5
    ],
    np.uint32,
)
BF16_BITS = np.array([0x8000, 0x7FC1, 0x0001, 0x3F80, 0xFF80, 0x7F7F], np.uint16)


def special(model: Rich) -> Rich:
    """Odd bit patterns, frozen parts, modes and pins: everything a load must restore."""
    model = eqx.tree_at(
        lambda m: (m.net.head.weight, m.half.weight, m.steps),
        model,
        (
            jnp.asarray(F32_BITS.view(np.float32).reshape(3, 4)),
            jnp.asarray(BF16_BITS.view(ml_dtypes.bfloat16).reshape(3, 2)),
            jnp.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max], jnp.int32),
        ),
    )
    model = treenn.freeze(model, "net.backbone.**")
    model = treenn.freeze(model, "half.bias")
    model = nn.eval_mode(model, nn.BatchNorm, pin=True)  # the frozen-BN recipe
    model = nn.eval_mode(model, "net.backbone.layers.3")  # Dropout in eval, unpinned
    model = nn.train_mode(model, "drop", pin=True)  # pinned in *training* mode
    return model


def leaf_bytes(x: Any) -> Any:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x  # a non-array leaf (an activation function): compared as is
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return "key:" + str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes()
    return str(np.dtype(x.dtype)), np.asarray(x).tobytes()


def assert_identical(a: Any, b: Any) -> None:
    """Same structure (status marks, static fields such as modes and pins, None
    positions), same dtypes, same bytes."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    la = jax.tree_util.tree_leaves_with_path(a)
    lb = jax.tree_util.tree_leaves_with_path(b)
    assert len(la) == len(lb)
    for (pa, xa), (pb, xb) in zip(la, lb):
        assert pa == pb
        assert leaf_bytes(xa) == leaf_bytes(xb), jax.tree_util.keystr(pa)
    assert nn.modes(a) == nn.modes(b)
    assert nn.pinned(a) == nn.pinned(b)
    sa = jax.tree_util.tree_structure(treenn.trainable(a))
    assert sa == jax.tree_util.tree_structure(treenn.trainable(b))


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    return header, data[8 + size :]


def write_raw(path: Path, header: dict[str, Any], body: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


def linears(key: jax.Array, n: int) -> nn.Sequential:
    """`n` Linear(2, 2) layers: paths `layers.{i}.weight` / `layers.{i}.bias`."""
    return nn.Sequential(*[nn.Linear(2, 2, key=k) for k in jax.random.split(key, n)])


# -- round trips -------------------------------------------------------------------------


def test_round_trip_restores_bits_status_modes_and_pins(tmp_path: Path, key: jax.Array) -> None:
    model = special(Rich(key=key))
    like = Rich(key=jax.random.key(123))  # default state: trainable, train mode, unpinned
    # The test can fail: `like` really differs from `model` before loading.
    assert jax.tree_util.tree_structure(like) != jax.tree_util.tree_structure(model)
    assert not np.array_equal(np.asarray(like.net.head.bias), np.asarray(model.net.head.bias))

    path = tmp_path / "model.safetensors"
    treenn.save(path, model)
    loaded = treenn.load(path, like)

    assert type(loaded) is Rich
    assert_identical(loaded, model)
    # Spelled out, each came from the file and not from `like`:
    head_bits = np.asarray(loaded.net.head.weight).view(np.uint32).reshape(-1)
    np.testing.assert_array_equal(head_bits, F32_BITS)  # NaN payloads, -0.0, subnormals
    half_bits = np.asarray(loaded.half.weight).view(np.uint16).reshape(-1)
    np.testing.assert_array_equal(half_bits, BF16_BITS)
    assert loaded.half.weight.dtype == jnp.bfloat16
    assert loaded.steps.dtype == jnp.int32
    np.testing.assert_array_equal(
        np.asarray(loaded.steps), [np.iinfo(np.int32).min, np.iinfo(np.int32).max]
    )
    trainable = treenn.trainable(loaded)
    assert trainable.net.backbone.layers[0].weight is None  # frozen backbone
    assert trainable.net.backbone.layers[1].running_mean is None  # buffer
    assert trainable.half.bias is None and trainable.half.weight is not None
    assert trainable.net.head.weight is not None
    assert nn.modes(loaded) == {
        "net.backbone.layers.1": True,
        "net.backbone.layers.3": True,
        "drop": False,
    }
    assert nn.pinned(loaded) == {
        "net.backbone.layers.1": True,
        "net.backbone.layers.3": False,
        "drop": True,
    }
    # `like` is untouched.
    assert nn.modes(like) == {
        "net.backbone.layers.1": False,
        "net.backbone.layers.3": False,
        "drop": False,
    }


def test_round_trip_file_state_overrides_like_state(tmp_path: Path, key: jax.Array) -> None:
    """The other direction: a default model loaded into a frozen/eval/pinned `like`
    comes back trainable, in training mode and unpinned."""
    model = Rich(key=key)
    like = special(Rich(key=jax.random.key(5)))
    path = tmp_path / "model.safetensors"
    treenn.save(str(path), model)  # str paths work as well as Path
    loaded = treenn.load(str(path), like)
    assert_identical(loaded, model)
    assert all(not v for v in nn.pinned(loaded).values())
    assert all(not v for v in nn.modes(loaded).values())


class Bag(eqx.Module):
    arrays: dict[str, Any]


DTYPES = [
    jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.complex64,
    jnp.int8, jnp.int16, jnp.uint8, jnp.uint16, jnp.uint32, jnp.bool_,
]  # fmt: skip


def test_every_dtype_round_trips_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def bag(random: bool) -> Bag:
        arrays = {}
        for dtype in DTYPES:
            dt = np.dtype(dtype)
            raw = (
                rng.integers(0, 256, 6 * dt.itemsize, dtype=np.uint8)
                if random
                else np.zeros(6 * dt.itemsize, np.uint8)
            )
            if dt == np.bool_:
                raw = raw % 2
            arrays[dt.name] = jnp.asarray(raw.view(dt).reshape(2, 3))
        return Bag(arrays)

    model = bag(True)
    treenn.save(tmp_path / "d.safetensors", model)
    loaded = treenn.load(tmp_path / "d.safetensors", bag(False))
    for name, array in model.arrays.items():
        assert loaded.arrays[name].dtype == array.dtype, name
        assert leaf_bytes(loaded.arrays[name]) == leaf_bytes(array), name
    header, _ = read_header(tmp_path / "d.safetensors")
    assert header["arrays.bfloat16"]["dtype"] == "BF16"
    assert header["arrays.float8_e4m3fn"]["dtype"] == "F8_E4M3"
    assert header["arrays.bool"]["dtype"] == "BOOL"


def test_root_mode_bearing_module_round_trips(tmp_path: Path) -> None:
    bn = nn.eval_mode(nn.BatchNorm(3), pin=True)
    bn = eqx.tree_at(lambda m: m.running_var, bn, jnp.array([0.5, 2.0, 3.0]))
    treenn.save(tmp_path / "bn.safetensors", bn)
    loaded = treenn.load(tmp_path / "bn.safetensors", nn.BatchNorm(3))
    assert loaded.inference is True and loaded.pinned is True
    assert_identical(loaded, bn)


def test_prng_keys_round_trip(tmp_path: Path, key: jax.Array) -> None:
    model = Rich(key=key)
    like = Rich(key=jax.random.key(99))
    treenn.save(tmp_path / "k.safetensors", model)
    loaded = treenn.load(tmp_path / "k.safetensors", like)
    for name in ("rng", "rbg"):
        got, want = getattr(loaded, name), getattr(model, name)
        assert jnp.issubdtype(got.dtype, jax.dtypes.prng_key)
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(got)), np.asarray(jax.random.key_data(want))
        )
        # Usable, and the same stream as the original key.
        np.testing.assert_array_equal(
            np.asarray(jax.random.normal(got, (3,))), np.asarray(jax.random.normal(want, (3,)))
        )
    assert loaded.legacy.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(loaded.legacy), np.asarray(model.legacy))


def test_numpy_leaves_keep_dtype_and_bits(tmp_path: Path) -> None:
    """Equinox models may hold NumPy arrays; float64/int64 ones must not be squeezed
    into JAX's 32-bit defaults on load."""

    class Consts(eqx.Module):
        table: np.ndarray
        ids: np.ndarray

    model = Consts(np.array([1 / 3, -0.0, np.pi], np.float64), np.array([2**40, -1], np.int64))
    like = Consts(np.zeros(3, np.float64), np.zeros(2, np.int64))
    treenn.save(tmp_path / "c.safetensors", model)
    loaded = treenn.load(tmp_path / "c.safetensors", like)
    assert np.dtype(loaded.table.dtype) == np.float64
    assert np.dtype(loaded.ids.dtype) == np.int64
    assert np.asarray(loaded.table).tobytes() == model.table.tobytes()
    assert np.asarray(loaded.ids).tobytes() == model.ids.tobytes()


def test_plain_equinox_mlp_round_trips(tmp_path: Path, key: jax.Array) -> None:
    mlp = treenn.freeze(eqx.nn.MLP(3, 2, 4, 2, key=key), "layers.0")
    like = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(8))
    treenn.save(tmp_path / "mlp.safetensors", mlp)
    loaded = treenn.load(tmp_path / "mlp.safetensors", like)
    assert isinstance(loaded, eqx.nn.MLP)
    assert_identical(loaded, mlp)
    assert treenn.trainable(loaded).layers[0].weight is None
    assert treenn.trainable(loaded).layers[1].weight is not None
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(mlp(x)))


def test_equinox_dropout_mode_round_trips(tmp_path: Path, eqx_user: Any, key: jax.Array) -> None:
    model = nn.eval_mode(eqx_user)
    assert model.drop.inference is True
    like = type(eqx_user)(key=jax.random.key(4))
    assert like.drop.inference is False
    treenn.save(tmp_path / "u.safetensors", model)
    loaded = treenn.load(tmp_path / "u.safetensors", like)
    assert loaded.drop.inference is True
    assert_identical(loaded, model)


def test_treenn_dropout_file_into_equinox_dropout_names_its_p(
    tmp_path: Path, key: jax.Array
) -> None:
    """Equinox's Dropout holds `p` as a float leaf, treenn's as a static field: the
    file of one does not fit the other, and the error says which leaf differs."""

    class Mine(treenn.Module):
        mlp: eqx.nn.MLP
        drop: nn.Dropout

        def __init__(self, *, key: jax.Array):
            self.mlp = eqx.nn.MLP(3, 2, 8, 2, key=key)
            self.drop = nn.Dropout(0.5, inference=True)

    from conftest import EqxUser

    treenn.save(tmp_path / "m.safetensors", Mine(key=key))
    with pytest.raises(CheckpointError, match=r"missing from the file: 'drop\.p'"):
        treenn.load(tmp_path / "m.safetensors", EqxUser(key=jax.random.key(1)))


# -- the file ----------------------------------------------------------------------------


def test_file_is_safetensors_keyed_by_dotted_paths(tmp_path: Path, key: jax.Array) -> None:
    model = special(Rich(key=key))
    path = tmp_path / "model.safetensors"
    treenn.save(path, model)
    header, body = read_header(path)
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.read_bytes()[8:9] == b"{"
    assert len(path.read_bytes()) == 8 + size + len(body)
    metadata = header.pop("__metadata__")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())

    expected = {
        "net.backbone.layers.0.weight": ("F32", [4, 3, 3, 3]),
        "net.backbone.layers.0.bias": ("F32", [4]),
        "net.backbone.layers.1.weight": ("F32", [4]),
        "net.backbone.layers.1.bias": ("F32", [4]),
        "net.backbone.layers.1.running_mean": ("F32", [4]),
        "net.backbone.layers.1.running_var": ("F32", [4]),
        "net.backbone.layers.4.weight": ("F32", [4, 4, 3, 3]),
        "net.backbone.layers.4.bias": ("F32", [4]),
        "net.head.weight": ("F32", [3, 4]),
        "net.head.bias": ("F32", [3]),
        "half.weight": ("BF16", [3, 2]),
        "half.bias": ("BF16", [3]),
        "steps": ("I32", [2]),
        "rng": ("U32", [2]),
        "rbg": ("U32", [4]),
        "legacy": ("U32", [2]),
    }
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == expected

    # Offsets tile the body exactly, and each slice holds the array's little-endian bytes.
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    values = {
        "net.head.weight": model.net.head.weight,
        "half.weight": model.half.weight,
        "net.backbone.layers.0.weight": model.net.backbone.layers[0].weight,
        "net.backbone.layers.1.running_var": model.net.backbone.layers[1].running_var,
        "steps": model.steps,
        "rng": jax.random.key_data(model.rng),
    }
    for name, value in values.items():
        begin, end = header[name]["data_offsets"]
        arr = np.asarray(value)
        assert body[begin:end] == arr.astype(arr.dtype.newbyteorder("<")).tobytes(), name


def test_file_reads_with_the_safetensors_library(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "net.safetensors"
    treenn.save(path, treenn.freeze(net, "backbone.**"))
    tensors = safetensors.numpy.load_file(str(path))
    assert set(tensors) == {
        "backbone.layers.0.weight", "backbone.layers.0.bias",
        "backbone.layers.1.weight", "backbone.layers.1.bias",
        "backbone.layers.1.running_mean", "backbone.layers.1.running_var",
        "backbone.layers.4.weight", "backbone.layers.4.bias",
        "head.weight", "head.bias",
    }  # fmt: skip
    np.testing.assert_array_equal(
        tensors["backbone.layers.0.weight"], np.asarray(net.backbone.layers[0].weight)
    )
    np.testing.assert_array_equal(tensors["head.weight"], np.asarray(net.head.weight))


def test_foreign_safetensors_file_loads_by_name(tmp_path: Path, net: Net) -> None:
    """A state dict written by another tool (no treenn metadata) loads by dotted name;
    the structure and statuses come from `like`."""
    rng = np.random.default_rng(0)
    tensors = {}
    for p, x in jax.tree_util.tree_leaves_with_path(net):
        if not isinstance(x, jax.Array):
            continue  # the Dropout's `inference` flag
        name = ".".join(str(getattr(k, "name", getattr(k, "idx", ""))) for k in p)
        name = re.sub(r"\.+", ".", name).strip(".")
        tensors[name] = rng.standard_normal(x.shape).astype(np.float32)
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    like = treenn.freeze(net, "backbone.**")
    loaded = treenn.load(path, like)
    np.testing.assert_array_equal(np.asarray(loaded.head.weight), tensors["head.weight"])
    np.testing.assert_array_equal(
        np.asarray(loaded.backbone.layers[1].running_var), tensors["backbone.layers.1.running_var"]
    )
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(like)


# -- atomic writes ---------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "model.safetensors"
    treenn.save(path, net)
    treenn.save(path, treenn.freeze(net))  # overwrite
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert treenn.trainable(treenn.load(path, net)).head.weight is None


def _assert_previous_checkpoint_intact(tmp_path: Path, path: Path, before: bytes, net: Net) -> None:
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    assert path.read_bytes() == before
    assert_identical(treenn.load(path, Net(key=jax.random.key(77))), net)


def test_failing_rename_keeps_previous_checkpoint(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    treenn.save(path, net)
    before = path.read_bytes()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        treenn.save(path, treenn.freeze(nn.eval_mode(net)))
    monkeypatch.undo()
    _assert_previous_checkpoint_intact(tmp_path, path, before, net)


def test_failing_write_keeps_previous_checkpoint(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    treenn.save(path, net)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("simulated disk failure")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated disk failure"):
        treenn.save(path, treenn.freeze(net))
    monkeypatch.undo()
    _assert_previous_checkpoint_intact(tmp_path, path, before, net)


def test_unsavable_dtype_is_a_clear_error_and_keeps_previous_checkpoint(
    tmp_path: Path, net: Net
) -> None:
    class Packed(treenn.Module):
        net: Net
        codes: jax.Array

    path = tmp_path / "model.safetensors"
    treenn.save(path, net)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"'codes'.*int4"):
        treenn.save(path, Packed(net, jnp.zeros((4,), jnp.int4)))
    _assert_previous_checkpoint_intact(tmp_path, path, before, net)


# -- errors ------------------------------------------------------------------------------------


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_missing_file(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        treenn.load(path, net)


def test_extra_layer_in_model_names_missing_paths(tmp_path: Path, key: jax.Array) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, linears(key, 2))
    with pytest.raises(CheckpointError, match=r"missing from the file") as err:
        treenn.load(path, linears(key, 3))
    assert "'layers.2.weight'" in str(err.value) and "'layers.2.bias'" in str(err.value)
    assert "'layers.1.weight'" not in str(err.value)


def test_missing_layer_in_model_names_unexpected_paths(tmp_path: Path, key: jax.Array) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, linears(key, 3))
    with pytest.raises(CheckpointError, match=r"not in the model") as err:
        treenn.load(path, linears(key, 2))
    assert "'layers.2.weight'" in str(err.value) and "'layers.2.bias'" in str(err.value)


def test_shape_mismatch_names_path_and_both_shapes(tmp_path: Path, key: jax.Array) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, nn.Linear(2, 3, key=key))
    with pytest.raises(CheckpointError, match=r"'weight'") as err:
        treenn.load(path, nn.Linear(2, 4, key=key))
    msg = str(err.value)
    assert re.search(r"'weight'[^;]*\[3, 2\][^;]*\[4, 2\]", msg), msg
    assert re.search(r"'bias'[^;]*\[3\][^;]*\[4\]", msg), msg


def test_dtype_mismatch_names_path_and_both_dtypes(tmp_path: Path, key: jax.Array) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, nn.Linear(2, 3, key=key))
    with pytest.raises(CheckpointError, match=r"'weight'") as err:
        treenn.load(path, nn.Linear(2, 3, dtype=jnp.bfloat16, key=key))
    assert re.search(r"'weight'[^;]*float32[^;]*bfloat16", str(err.value)), str(err.value)


def test_mode_bearing_module_mismatch(tmp_path: Path, key: jax.Array) -> None:
    """Dropouts hold no arrays, so only the modes can tell the structures apart."""
    lin = nn.Linear(2, 2, key=key)
    path = tmp_path / "m.safetensors"
    treenn.save(path, nn.Sequential(lin, nn.Dropout(0.1)))
    with pytest.raises(CheckpointError, match=r"mode-bearing.*'layers\.2'"):
        treenn.load(path, nn.Sequential(lin, nn.Dropout(0.1), nn.Dropout(0.2)))
    treenn.save(path, nn.Sequential(lin, nn.Dropout(0.1), nn.Dropout(0.2)))
    with pytest.raises(CheckpointError, match=r"mode-bearing.*'layers\.2'"):
        treenn.load(path, nn.Sequential(lin, nn.Dropout(0.1), jax.nn.relu))


def test_pins_round_trip_on_equinox_layers(tmp_path: Path, eqx_user: Any) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, nn.eval_mode(eqx_user, "drop", pin=True))
    loaded = treenn.load(path, eqx_user)
    assert nn.modes(loaded)["drop"] is True and nn.pinned(loaded)["drop"] is True
    assert nn.pinned(eqx_user)["drop"] is False


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data, size: data[:-1], id="last-byte-cut"),
        pytest.param(lambda data, size: data[: 8 + size + 3], id="body-cut"),
        pytest.param(lambda data, size: data[: 8 + size // 2], id="cut-inside-header"),
        pytest.param(lambda data, size: data[:5], id="cut-inside-size"),
        pytest.param(lambda data, size: b"", id="empty"),
        pytest.param(
            lambda data, size: data[:8] + b"\xff\xfe" * (size // 2) + data[8 + 2 * (size // 2) :],
            id="garbage-header",
        ),
        pytest.param(
            lambda data, size: data[:8] + b"[1, 2, 3]".ljust(size) + data[8 + size :],
            id="header-not-object",
        ),
        pytest.param(
            lambda data, size: (
                np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
            ),
            id="random-bytes",
        ),
        pytest.param(lambda data, size: struct.pack("<Q", 2**63) + data[8:], id="huge-header-size"),
    ],
)
def test_damaged_file_is_a_checkpoint_error(tmp_path: Path, net: Net, damage: Any) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, net)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    path.write_bytes(damage(data, size))
    with pytest.raises(CheckpointError, match=r"truncated|corrupt") as err:
        treenn.load(path, net)
    assert str(path) in str(err.value)


def test_corrupt_entry_in_header_is_a_checkpoint_error(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, net)
    header, body = read_header(path)
    header["head.weight"]["dtype"] = "NOT_A_DTYPE"
    write_raw(path, header, body)
    with pytest.raises(CheckpointError, match=r"corrupt.*'head\.weight'"):
        treenn.load(path, net)


@pytest.mark.parametrize(
    "meta", ["{not json", '"a string"', '{"frozen": 3, "buffers": [], "modes": {}, "keys": {}}']
)
def test_corrupt_treenn_metadata_is_a_checkpoint_error(tmp_path: Path, net: Net, meta: str) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, net)
    header, body = read_header(path)
    assert "treenn" in header["__metadata__"]
    header["__metadata__"]["treenn"] = meta
    write_raw(path, header, body)
    with pytest.raises(CheckpointError, match=r"corrupt"):
        treenn.load(path, net)


# -- issue 15: Python scalars -----------------------------------------------------------------


def test_python_scalars_round_trip_exactly(tmp_path: Path, net: Net) -> None:
    nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_1234))[0]  # payload, sign
    state = {
        "model": net, "step": 1234, "best_loss": 0.05, "done": True,
        "big": -(2**70), "neg_zero": -0.0, "nan": nan, "inf": float("inf"),
    }  # fmt: skip
    like = {
        "model": Net(key=jax.random.key(5)), "step": 0, "best_loss": float("inf"),
        "done": False, "big": 0, "neg_zero": 0.0, "nan": 0.0, "inf": 0.0,
    }  # fmt: skip
    treenn.save(tmp_path / "s.safetensors", state)
    loaded = treenn.load(tmp_path / "s.safetensors", like)
    for name in ("step", "best_loss", "done", "big", "inf"):
        assert type(loaded[name]) is type(state[name]) and loaded[name] == state[name], name
    for name in ("neg_zero", "nan"):
        assert struct.pack("<d", loaded[name]) == struct.pack("<d", state[name]), name
    assert_identical(loaded["model"], net)


def test_python_scalar_of_another_type_or_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    treenn.save(path, {"step": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"'step': file int 3, model float"):
        treenn.load(path, {"step": 0.0, "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"missing from the file: 'epoch'"):
        treenn.load(path, {"step": 0, "lr": 0.1, "epoch": 0})
    with pytest.raises(CheckpointError, match=r"not in the model: 'lr'"):
        treenn.load(path, {"step": 0})


# -- issue 15: permissions, symlinks ----------------------------------------------------------


def test_new_file_gets_umask_mode_and_overwrite_keeps_mode(tmp_path: Path, net: Net) -> None:
    old = os.umask(0o027)
    try:
        treenn.save(tmp_path / "new.safetensors", net)
        np.save(tmp_path / "ref.npy", np.zeros(2))
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "new.safetensors") == 0o640 == mode(tmp_path / "ref.npy")
    path = tmp_path / "shared.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    treenn.save(path, net)
    assert mode(path) == 0o644
    os.chmod(path, 0o600)
    treenn.save(path, net)
    assert mode(path) == 0o600


def test_save_through_a_symlink_replaces_the_target(tmp_path: Path, net: Net) -> None:
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "epoch3.safetensors"
    treenn.save(target, net)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    frozen = treenn.freeze(net)
    treenn.save(link, frozen)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_identical(treenn.load(target, net), frozen)  # the target is the new file
    assert sorted(os.listdir(tmp_path / "runs")) == ["epoch3.safetensors"]


# -- issue 15: streaming ----------------------------------------------------------------------


class Many(eqx.Module):
    arrays: list[Any]


def test_save_and_load_stream_one_array_at_a_time(tmp_path: Path) -> None:
    """Peak extra host memory (NumPy and Python allocations) stays within the largest
    array: the old `save` built a second copy of every array (8 MiB here)."""
    import tracemalloc

    mib = 2**20
    model = Many([jnp.full((mib // 4,), i, jnp.float32) for i in range(8)])
    model = Many([*model.arrays, np.arange(mib // 8, dtype=np.float64)])  # NumPy leaves too
    path = tmp_path / "big.safetensors"
    treenn.save(path, model)  # warm up (imports, caches)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        treenn.save(path, model)
        save_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert save_peak < mib + mib // 4, save_peak
    assert treenn.load(path, model).arrays[5][0] == 5


# -- issue 15: abstract models ----------------------------------------------------------------


def test_load_and_load_pretrained_fill_an_abstract_model(tmp_path: Path, net: Net) -> None:
    model = nn.eval_mode(treenn.freeze(net, "backbone.**"), nn.BatchNorm, pin=True)
    state = {"model": model, "rng": jax.random.key(3, impl="rbg"), "step": 7}
    path = tmp_path / "m.safetensors"
    treenn.save(path, state)
    make = lambda: {
        "model": Net(key=jax.random.key(0)),
        "rng": jax.random.key(0, impl="rbg"),
        "step": 0,
    }  # noqa: E501, E731
    loaded = treenn.load(path, jax.eval_shape(make))
    assert_identical(loaded["model"], model)
    assert leaf_bytes(loaded["rng"]) == leaf_bytes(state["rng"])
    assert loaded["step"] == 7 and type(loaded["step"]) is int

    treenn.save(path, model)
    abstract = jax.eval_shape(lambda: Net(key=jax.random.key(0)))
    pretrained, report = treenn.load_pretrained(path, abstract)
    assert report.missing == [] and report.skipped == []
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(pretrained))
    # Arrays from the file, statuses and modes from the model: an abstract model's
    # modes come back in training mode (jax.eval_shape loses the bools)...
    assert treenn.statuses(pretrained) == treenn.statuses(net)
    assert nn.modes(pretrained) == {"backbone.layers.1": False, "backbone.layers.3": False}
    x = jnp.ones((1, 5, 5, 3))
    np.testing.assert_array_equal(
        np.asarray(nn.eval_mode(pretrained)(x)), np.asarray(nn.eval_mode(model)(x))
    )
    # ...and a pinned mode it lost is an error, not a silent training-mode pin.
    pinned = jax.eval_shape(lambda: nn.eval_mode(Net(key=jax.random.key(0)), pin=True))
    with pytest.raises(CheckpointError, match=r"pins 'backbone\.layers\.1'.*lost"):
        treenn.load_pretrained(path, pinned)


def test_abstract_model_not_filled_entirely_is_an_error(tmp_path: Path, key: jax.Array) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, linears(key, 2))
    abstract = jax.eval_shape(lambda: linears(key, 3))
    with pytest.raises(CheckpointError, match=r"abstract.*does not fill 2.*'layers\.2\.weight'"):
        treenn.load_pretrained(path, abstract)
    with pytest.raises(CheckpointError, match=r"missing from the file.*'layers\.2\.weight'"):
        treenn.load(path, abstract)


# -- issue 15: PRNG keys ----------------------------------------------------------------------


def test_prng_key_leaves_in_summary_and_load_pretrained(tmp_path: Path, key: jax.Array) -> None:
    model = Rich(key=key)
    table = treenn.summary(model)
    assert re.search(r"^rng\s.*key<fry>", table, re.M), table
    path = tmp_path / "k.safetensors"
    treenn.save(path, model)
    loaded, report = treenn.load_pretrained(path, Rich(key=jax.random.key(99)))
    assert "rng" in report.loaded and "rbg" in report.loaded
    assert str(jax.random.key_impl(loaded.rbg)) == "rbg"
    assert leaf_bytes(loaded.rng) == leaf_bytes(model.rng)


# -- issue 15: damaged metadata and headers ---------------------------------------------------


def _damage_meta(path: Path, edit: Any) -> None:
    """Edit the treenn metadata as a hand (not a bit flip) would, checksum fixed up."""
    import zlib

    header, body = read_header(path)
    meta = json.loads(header["__metadata__"]["treenn"])
    edit(meta)
    text = json.dumps(meta)
    header["__metadata__"]["treenn"] = text
    header["__metadata__"]["treenn_crc32"] = f"{zlib.crc32(text.encode()):08x}"
    write_raw(path, header, body)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["frozen"].__setitem__(0, "head.weighx"), r"frozen 'head\.weighx'"),
        (lambda m: m["buffers"].append("head.bias"), r"buffer 'head\.bias'"),
        (lambda m: m["keys"].__setitem__("nothing", "rbg"), r"key 'nothing'"),
        (lambda m: m["modes"].__setitem__("head", m["modes"]["backbone.layers.1"]), r"'head'"),
        (lambda m: m["modes"].pop("backbone.layers.3"), r"'backbone\.layers\.3'"),
    ],
    ids=["frozen", "buffers", "keys", "modes-extra", "modes-lacking"],
)
def test_metadata_names_that_match_nothing_are_errors(
    tmp_path: Path, net: Net, edit: Any, message: str
) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, treenn.freeze(net, "head"))
    _damage_meta(path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        treenn.load(path, net)
    assert str(path) in str(err.value)


def _entry_edit(name: str, field: str, value: Any) -> Any:
    def edit(header: dict[str, Any]) -> None:
        header[name][field] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _entry_edit("head.weight", "shape", [-3, -4]),
        _entry_edit("head.weight", "shape", [True, 12]),
        _entry_edit("head.weight", "shape", [2**62, 2**62]),
        _entry_edit("head.weight", "data_offsets", [-48, 0]),
        _entry_edit("head.weight", "data_offsets", "0-48"),
        _entry_edit("head.bias", "dtype", "U32"),  # same size, other dtype
        lambda h: h.__setitem__("__metadata__", ["not", "a", "dict"]),
        lambda h: h["__metadata__"].__setitem__("treenn", json.dumps({"frozen": [[[[0]]]]})),
        lambda h: h["__metadata__"].__setitem__("format", "treenn-9"),
        lambda h: h["__metadata__"].pop("treenn"),
        lambda h: h["__metadata__"].__setitem__("treenn_crc32", "00000000"),
    ],
    ids=[
        "negative-shape",
        "bool-in-shape",
        "huge-shape",
        "negative-offset",
        "offsets-string",
        "dtype-of-same-size",
        "metadata-list",
        "metadata-without-crc",
        "unknown-format",
        "format-without-metadata",
        "bad-crc",
    ],  # fmt: skip
)
def test_corrupt_header_fields_are_checkpoint_errors(tmp_path: Path, net: Net, edit: Any) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, net)
    header, body = read_header(path)
    edit(header)
    write_raw(path, header, body)
    with pytest.raises(CheckpointError) as err:
        treenn.load(path, net)
    assert str(path) in str(err.value)


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "m.safetensors"
    head = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        treenn.load(path, net)


def test_float_array_marked_as_prng_key_is_a_checkpoint_error(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "m.safetensors"
    treenn.save(path, net)
    _damage_meta(path, lambda m: m["keys"].__setitem__("head.weight", "threefry2x32"))
    with pytest.raises(CheckpointError, match=r"'head\.weight': file key<threefry2x32>"):
        treenn.load(path, net)


@pytest.mark.slow  # the corrupt-header tests above stay quick
def test_fuzzed_headers_are_checkpoint_errors_naming_the_file(
    tmp_path: Path, key: jax.Array
) -> None:
    """Bit flips anywhere in the size field and header, and cuts at any length: each
    is a CheckpointError naming the file (a seeded sample; the full sweep of every
    bit of this header, 13,184 flips, gave the same)."""
    model = {"model": special(Rich(key=key)), "step": 12, "loss": 0.5, "done": False}
    like = {"model": Rich(key=jax.random.key(1)), "step": 0, "loss": 0.0, "done": True}
    good = tmp_path / "good.safetensors"
    treenn.save(good, model)
    data = good.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.safetensors"
    flips = rng.choice(8 * (8 + size), 400, replace=False)
    cuts = rng.choice(len(data), 100, replace=False)
    outcomes = []
    for bit in flips:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        outcomes.append(bytes(damaged))
    outcomes += [data[:cut] for cut in cuts]
    for damaged in outcomes:
        bad.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            treenn.load(bad, like)


# -- issue 21: process state, complexity, reserved names, load_trainable ---------------------


def test_save_never_changes_the_process_umask(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 7: `save` read the umask by setting it to 0 for a moment, so a file
    another thread created then was world-writable. Reading it must not change it."""

    def umask(mask: int) -> int:
        raise AssertionError(
            f"treenn.save called os.umask({mask:#o}): every thread's new files get it"
        )

    old = os.umask(0o027)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "umask", umask)
            treenn.save(tmp_path / "new.safetensors", net)
    finally:
        os.umask(old)
    # ...and a new file still gets 0666 less the umask of the moment.
    assert os.stat(tmp_path / "new.safetensors").st_mode & 0o777 == 0o640


def test_load_is_linear_in_the_number_of_frozen_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 10: each loaded array looked its path up in the metadata's list of frozen
    paths, so loading n frozen arrays compared n²/2 names (24,000 tiny frozen arrays
    loaded in 3x the time of trainable ones). Counted, not timed: the names compared."""
    import treenn._checkpoints as checkpoints

    compared = 0

    class Name(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            nonlocal compared
            compared += 1
            return str.__eq__(self, other)

    read = checkpoints._metadata

    def counting(file: Any) -> Any:
        meta = read(file)
        if meta is not None:
            meta["frozen"] = [Name(n) for n in meta["frozen"]]
        return meta

    n = 300
    model = treenn.freeze({f"a{i}": jnp.zeros(1) for i in range(n)})
    treenn.save(tmp_path / "frozen.safetensors", model)
    monkeypatch.setattr(checkpoints, "_metadata", counting)
    loaded = treenn.load(tmp_path / "frozen.safetensors", model)
    assert set(treenn.statuses(loaded).values()) == {"frozen"}
    assert compared <= 4 * n, f"{compared} name comparisons for {n} frozen arrays"


def test_array_at_the_metadata_path_is_refused(tmp_path: Path, net: Net) -> None:
    """Defect 14: safetensors keeps the header's metadata under `__metadata__`; an array
    stored at that path replaced it, `save` succeeded and `load` called the file corrupt.
    Now `save` refuses it, naming the path, and keeps the previous checkpoint."""
    path = tmp_path / "model.safetensors"
    treenn.save(path, net)
    before = path.read_bytes()
    for model in (
        {"__metadata__": jnp.ones(2), "w": jnp.ones(3)},
        {"__metadata__": treenn.freeze(jnp.ones(2))},
    ):
        with pytest.raises(CheckpointError, match=r"'__metadata__'.*reserves that name"):
            treenn.save(path, model)
        assert path.read_bytes() == before
    # The name is reserved as a whole header key only: deeper in a model it is a path
    # like any other, and round-trips.
    nested = {"extra": {"__metadata__": jnp.arange(3.0)}, "net": net}
    treenn.save(path, nested)
    assert_identical(treenn.load(path, nested), nested)


class _Unprintable:
    """Static configuration whose repr fails (a handle on a closed resource, say)."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class _Tagged(treenn.Module):
    lin: nn.Linear
    head: nn.Linear
    tag: Any = eqx.field(static=True)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.head(self.lin(x))


def test_load_trainable_compares_structures_not_their_text(tmp_path: Path, key: jax.Array) -> None:
    """Defect 15: `load_trainable` compared `str()` of two structures: printing one
    calls every static field's repr (which may fail, or differ between equal
    structures), and two different classes of one name print alike."""
    k1, k2 = jax.random.split(key)
    model = treenn.freeze(
        _Tagged(nn.Linear(2, 3, key=k1), nn.Linear(3, 2, key=k2), _Unprintable()), "lin"
    )
    path = tmp_path / "trainable.safetensors"
    treenn.save(path, treenn.trainable(model))
    fresh = treenn.freeze(
        _Tagged(nn.Linear(2, 3, key=k1), nn.Linear(3, 2, key=k1), model.tag), "lin"
    )
    loaded = treenn.load_trainable(path, fresh)
    assert_identical(loaded, model)


def test_load_trainable_names_a_structure_that_differs(
    tmp_path: Path, key: jax.Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the loaded arrays come back in another structure than the model's trainable
    half, the error names the path, also when the two classes print alike (an Equinox
    class and its mark-reading subclass share a name): `str()` called them equal and
    went on."""
    import treenn._checkpoints as checkpoints

    model = {"body": treenn.freeze(nn.Linear(2, 3, key=key)), "head": nn.Linear(3, 2, key=key)}
    path = tmp_path / "trainable.safetensors"
    treenn.save(path, treenn.trainable(model))
    impostor = type("Linear", (nn.Linear,), {"__module__": nn.Linear.__module__})
    load = checkpoints.load

    def other_class(path: Any, like: Any) -> Any:
        out = load(path, like)
        head = object.__new__(impostor)
        head.__dict__.update(out["head"].__dict__)
        return {**out, "head": head}

    monkeypatch.setattr(checkpoints, "load", other_class)
    with pytest.raises(CheckpointError, match=r"at 'head': two different classes named .*Linear"):
        treenn.load_trainable(path, model)
