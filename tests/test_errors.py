"""The bad-input census: every public function of `treenn` and `treenn.nn` (and the model
factories) × every kind of misuse that applies to it, as one table.

Each row calls something wrongly and checks three things: the exception's type; that its
message names the cause (the path, the shape, the selector, the file, the argument); and
that nothing was half-changed: every model the row could reach has the same arrays (bit
for bit), statuses, modes and pins afterwards, and every file in the checkpoint folder
the same bytes. The rows share one `World` of inputs, built once.

Row ids read `<public name>/<misuse>`; `test_census_covers_every_public_name` checks that
every public callable has at least one row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import EqxUser, Net, leaves_by_path, optax_promotion
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import treenn
import treenn.nn as nn
from treenn import CheckpointError, models

# -- the world the rows misuse ------------------------------------------------------------


class Ints(treenn.Module):
    """A model without a single floating-point array."""

    steps: jax.Array


class InVmap(treenn.Module):
    """A training-mode BatchNorm inside a `vmap` opened within the model."""

    bn: nn.BatchNorm

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.vmap(self.bn)(x)


@dataclasses.dataclass
class World:
    key: jax.Array
    net: Net
    frozen_head: Net  # net with its head frozen
    eqx_user: EqxUser
    mixed: nn.Sequential  # a treenn Dropout, then a plain Equinox Dropout
    linear: nn.Linear
    ints: Ints
    images: jax.Array
    labels: jax.Array
    opt_state: Any  # optax.adam's state for net
    folder: Path
    ckpt: Path  # net, saved
    linear_ckpt: Path  # linear, saved
    wide_ckpt: Path  # a Net with 5 classes: the head's shapes differ
    half_ckpt: Path  # net in bfloat16: the dtypes differ
    dropout_ckpt: Path  # Sequential(linear, Dropout): modes for a module net lacks
    damaged: dict[str, Path]
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)  # its fingerprint

    def models(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in ("net", "frozen_head", "eqx_user", "mixed", "linear", "ints", "opt_state")
        }


def _damage(folder: Path, ckpt: Path) -> dict[str, Path]:
    data = ckpt.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    entry = dict(header)
    entry["head.weight"] = {**header["head.weight"], "dtype": "NOT_A_DTYPE"}
    meta = dict(header)
    meta["__metadata__"] = {**header["__metadata__"], "treenn": "{not json"}
    raw = {
        "truncated": data[:-5],
        "header-cut": data[: 8 + size // 2],
        "empty": b"",
        "garbage": b"\xff\xfe" * 100,
        "huge-header": struct.pack("<Q", 2**62) + data[8:],
        "bad-entry": _container(entry, data[8 + size :]),
        "bad-metadata": _container(meta, data[8 + size :]),
    }
    paths = {}
    for name, content in raw.items():
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(content)
    paths["npz"] = folder / "npz.npz"  # a format no loader reads
    paths["npz"].write_bytes(b"PK")
    return paths


def _container(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    key = jax.random.key(0)
    net = Net(key=key)
    linear = nn.Linear(2, 2, key=key)
    folder = tmp_path_factory.mktemp("census")
    ckpt, linear_ckpt = folder / "net.safetensors", folder / "linear.safetensors"
    wide_ckpt, half_ckpt = folder / "wide.safetensors", folder / "half.safetensors"
    dropout_ckpt = folder / "dropout.safetensors"
    treenn.save(ckpt, net)
    treenn.save(linear_ckpt, linear)
    treenn.save(wide_ckpt, Net(key=key, classes=5))
    treenn.save(
        half_ckpt, jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_array(a) else a, net)
    )
    treenn.save(dropout_ckpt, nn.Sequential(linear, nn.Dropout(0.5)))
    with optax_promotion():
        opt_state = optax.adam(1e-3).init(treenn.trainable(net))
    world = World(
        key=key,
        net=net,
        frozen_head=treenn.freeze(net, "head"),
        eqx_user=EqxUser(key=key),
        mixed=nn.Sequential(nn.Dropout(0.1), eqx.nn.Dropout(0.5)),
        linear=linear,
        ints=Ints(jnp.arange(3)),
        images=jax.random.normal(key, (6, 5, 5, 3)),
        labels=jnp.array([0, 1, 2, 0, 1, 2]),
        opt_state=opt_state,
        folder=folder,
        ckpt=ckpt,
        linear_ckpt=linear_ckpt,
        wide_ckpt=wide_ckpt,
        half_ckpt=half_ckpt,
        dropout_ckpt=dropout_ckpt,
        damaged=_damage(folder, ckpt),
    )
    world.baseline = fingerprint(world)
    return world


# -- the "nothing changed" check ------------------------------------------------------------


def _leaf(x: Any) -> Any:
    value = getattr(x, "value", x)
    if isinstance(value, (jax.Array, np.ndarray)):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        array = np.asarray(value)
        return (str(array.dtype), array.shape, array.tobytes())
    return x


def fingerprint(world: World) -> dict[str, Any]:
    """Every reachable model's leaves (bits, status), modes and pins; every file's bytes."""
    out: dict[str, Any] = {}
    for name, model in world.models().items():
        out[name] = (
            jax.tree_util.tree_structure(model),  # status marks are nodes: kept in here
            [(path, _leaf(x)) for path, x in leaves_by_path(model)],
            treenn.statuses(model),
            nn.modes(model),
            nn.pinned(model),
        )
    out["files"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(world.folder.iterdir())
    }
    return out


# -- helpers the rows use ---------------------------------------------------------------


def _xent(model: Any, x: jax.Array, y: jax.Array, key: jax.Array | None) -> jax.Array:
    logits = model(x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _eval(model: Any) -> Any:
    return nn.eval_mode(model)


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))


def _set_head(world: World) -> None:
    world.net.head = world.linear  # PyTorch habit: modules are immutable here


def _opt_state_of(model: Any) -> Any:
    with optax_promotion():
        return optax.adam(1e-3).init(treenn.trainable(model))


def _needs_temperature() -> optax.GradientTransformationExtraArgs:
    """A transform taking extra arguments, one of them one train_step does not know."""

    def update(updates: Any, state: Any, params: Any = None, *, temperature: Any, **_: Any) -> Any:
        return updates, state

    return optax.GradientTransformationExtraArgs(optax.adam(1e-3).init, update)


def _takes_no_extra() -> optax.GradientTransformationExtraArgs:
    """Declared as taking extra arguments, but its update accepts none."""
    adam = optax.adam(1e-3)
    return optax.GradientTransformationExtraArgs(
        adam.init, lambda u, s, p=None: adam.update(u, s, p)
    )


def _plain_plateau() -> optax.GradientTransformation:
    """reduce_on_plateau needs the loss; rewrapped as a plain transform it gets none."""
    plateau = optax.contrib.reduce_on_plateau()
    return optax.GradientTransformation(plateau.init, plateau.update)


def _step_with(w: World, tx: Any) -> Any:
    state = tx.init(treenn.trainable(w.net))
    return treenn.train_step(_xent, tx)(w.net, state, w.images, w.labels, w.key)


Row = Callable[[World], Any]
X = (2, 5)  # a Linear(5, ...) batch


def case(name: str, call: Row, error: type[BaseException], match: str) -> Any:
    return pytest.param(call, error, match, id=name)


CLASS = r"model is the class Net, not a model"
SWAPPED = r"model='[^']*' is a str, not a model; check the order of the arguments"
GLOB = r"where='{}'.*{}"
NO_PARAM = r"where={} matches no floating-point parameter array; {}"
NO_MODE = r"where={} matches no mode-bearing module .*available: 'backbone\.layers\.1'"
AVAILABLE = r"available: 'backbone\.layers\.0\.weight'"
NEEDS_KEY = r"nn\.{}\(p={}\) is in training mode and needs `key=`"
PARAM = r"typechecking parameter '{}'"  # jaxtyping + beartype, installed by conftest.py


def _no_key(layer: str, p: float) -> str:
    return NEEDS_KEY.format(layer, re.escape(str(p)))


@treenn.typechecked
def _rowsum(x: Float[Array, "batch n"], y: Float[Array, " batch"]) -> Float[Array, " batch"]:
    return x.sum(-1) + y


CASES = [
    # -- treenn.freeze / unfreeze / freeze_backbone: tree surgery -------------------------
    case("freeze/class-not-instance", lambda w: treenn.freeze(Net), TypeError, CLASS),
    case(
        "freeze/arguments-swapped",
        lambda w: treenn.freeze("backbone.**", w.net),  # type: ignore[arg-type]
        TypeError,
        SWAPPED,
    ),
    case(
        "freeze/where-wrong-type",
        lambda w: treenn.freeze(w.net, 3),  # type: ignore[arg-type]
        TypeError,
        r"where=3 \(int\) is not a selector",
    ),
    case(
        "freeze/where-list",
        lambda w: treenn.freeze(w.net, ["head", "backbone"]),  # type: ignore[arg-type]
        TypeError,
        r"where=\['head', 'backbone'\] \(list\) is not a selector",
    ),
    case(
        "freeze/where-is-a-module",
        lambda w: treenn.freeze(w.net, w.net.head),
        TypeError,
        r"where= is a Linear module, not a selector.*lambda m: m\.head",
    ),
    case(
        "freeze/selector-matches-nothing",
        lambda w: treenn.freeze(w.net, "backbone.nothing"),
        ValueError,
        NO_PARAM.format("'backbone\\.nothing'", AVAILABLE),
    ),
    case(
        "freeze/path-to-a-function",
        lambda w: treenn.freeze(w.net, "backbone.layers.2"),  # relu: no array
        ValueError,
        NO_PARAM.format("'backbone\\.layers\\.2'", AVAILABLE),
    ),
    case(
        "freeze/path-to-a-buffer",
        lambda w: treenn.freeze(w.net, "backbone.layers.1.running_mean"),
        ValueError,
        NO_PARAM.format("'backbone\\.layers\\.1\\.running_mean'", AVAILABLE),
    ),
    case(
        "freeze/class-without-parameters",
        lambda w: treenn.freeze(w.net, nn.Dropout),
        ValueError,
        NO_PARAM.format("Dropout", AVAILABLE),
    ),
    case(
        "freeze/integer-arrays-only",
        lambda w: treenn.freeze(w.ints, "steps"),
        ValueError,
        NO_PARAM.format("'steps'", "the model has none"),
    ),
    case(
        "freeze/glob-brackets",
        lambda w: treenn.freeze(w.net, "backbone.layers[0]"),
        ValueError,
        GLOB.format(r"backbone\.layers\[0\]", r"unsupported character\(s\) '\[\]'"),
    ),
    case(
        "freeze/glob-question-mark",
        lambda w: treenn.freeze(w.net, "head.?eight"),
        ValueError,
        GLOB.format(r"head\.\?eight", r"unsupported character\(s\) '\?'"),
    ),
    case(
        "freeze/glob-braces",
        lambda w: treenn.freeze(w.net, "head.{weight,bias}"),
        ValueError,
        GLOB.format(r"head\.\{weight,bias\}", r"unsupported character"),
    ),
    case(
        "freeze/glob-stray-dot",
        lambda w: treenn.freeze(w.net, "backbone..layers"),
        ValueError,
        GLOB.format(r"backbone\.\.layers", r"empty path component"),
    ),
    case(
        "freeze/glob-double-star-inside",
        lambda w: treenn.freeze(w.net, "**weight"),
        ValueError,
        GLOB.format(r"\*\*weight", r"'\*\*' must be a whole path component"),
    ),
    case(
        "freeze/glob-empty",
        lambda w: treenn.freeze(w.net, ""),
        ValueError,
        r"where='' is not a path pattern; use where=None",
    ),
    case(
        "freeze/getter-fails",
        lambda w: treenn.freeze(w.net, lambda m: m.neck),
        ValueError,
        r"where=<getter .*<lambda>> failed on the model \(AttributeError: .*'neck'",
    ),
    case(
        "freeze/getter-returns-foreign-node",
        lambda w: treenn.freeze(w.net, lambda m: jnp.ones(3)),
        ValueError,
        r"where=<getter .*> returned Array\(.*which is not a node of the model",
    ),
    case(
        "freeze/getter-returns-nothing",
        lambda w: treenn.freeze(w.net, lambda m: ()),
        ValueError,
        r"where=<getter .*<lambda>> returned no node",
    ),
    case("unfreeze/class-not-instance", lambda w: treenn.unfreeze(Net), TypeError, CLASS),
    case(
        "unfreeze/selector-matches-nothing",
        lambda w: treenn.unfreeze(w.frozen_head, "heads"),
        ValueError,
        NO_PARAM.format("'heads'", AVAILABLE),
    ),
    case(
        "unfreeze/path-to-a-buffer",  # buffers never become trainable
        lambda w: treenn.unfreeze(w.net, "backbone.layers.1.running_var"),
        ValueError,
        NO_PARAM.format("'backbone\\.layers\\.1\\.running_var'", AVAILABLE),
    ),
    case(
        "freeze_backbone/class-not-instance",
        lambda w: treenn.freeze_backbone(Net, "head"),
        TypeError,
        CLASS,
    ),
    case(
        "freeze_backbone/head-none",
        lambda w: treenn.freeze_backbone(w.net, None),
        ValueError,
        r"freeze_backbone: head=None selects the whole model; name the head",
    ),
    case(
        "freeze_backbone/selector-matches-nothing",
        lambda w: treenn.freeze_backbone(w.net, "fc"),
        ValueError,
        NO_PARAM.format("'fc'", AVAILABLE),
    ),
    # -- treenn.nn modes ----------------------------------------------------------------------
    case("eval_mode/class-not-instance", lambda w: nn.eval_mode(Net), TypeError, CLASS),
    case(
        "eval_mode/arguments-swapped",
        lambda w: nn.eval_mode("backbone.**", w.net),  # type: ignore[arg-type]
        TypeError,
        SWAPPED,
    ),
    case(
        "eval_mode/where-wrong-type",
        lambda w: nn.eval_mode(w.net, True),  # type: ignore[arg-type]
        TypeError,
        r"where=True \(bool\) is not a selector",
    ),
    case(
        "eval_mode/selector-matches-nothing",
        lambda w: nn.eval_mode(w.net, "neck.**"),
        ValueError,
        NO_MODE.format("'neck\\.\\*\\*'"),
    ),
    case(
        "eval_mode/selection-without-mode-bearing-module",
        lambda w: nn.eval_mode(w.net, "head"),
        ValueError,
        NO_MODE.format("'head'"),
    ),
    case(
        "eval_mode/class-selects-no-mode-bearing-module",
        lambda w: nn.eval_mode(w.net, nn.Linear),
        ValueError,
        NO_MODE.format("Linear"),
    ),
    case(
        "eval_mode/glob-syntax",
        lambda w: nn.eval_mode(w.net, "backbone.layers[1]"),
        ValueError,
        GLOB.format(r"backbone\.layers\[1\]", "unsupported character"),
    ),
    case(
        "eval_mode/only-pinned-selection",  # issue 13: was a silent no-op
        lambda w: nn.eval_mode(nn.train_mode(w.eqx_user, pin=True), "drop"),
        ValueError,
        r"selects only pinned modules \('drop'\).*pin=True.*nn\.unpin",
    ),
    case("train_mode/class-not-instance", lambda w: nn.train_mode(Net), TypeError, CLASS),
    case(
        "train_mode/selector-matches-nothing",
        lambda w: nn.train_mode(w.net, "backbone.layers.9"),
        ValueError,
        NO_MODE.format("'backbone\\.layers\\.9'"),
    ),
    case(
        "train_mode/only-pinned-selection",  # issue 13: was a silent no-op
        lambda w: nn.train_mode(
            nn.eval_mode(w.net, "backbone.layers.1", pin=True), "backbone.layers.1"
        ),
        ValueError,
        r"selects only pinned modules \('backbone\.layers\.1'\)",
    ),
    case("unpin/class-not-instance", lambda w: nn.unpin(Net), TypeError, CLASS),
    case(
        "unpin/selector-matches-nothing",
        lambda w: nn.unpin(w.net, nn.Conv2d),
        ValueError,
        NO_MODE.format("Conv2d"),
    ),
    case(
        "unpin/where-wrong-type",
        lambda w: nn.unpin(w.net, 1.5),  # type: ignore[arg-type]
        TypeError,
        r"where=1\.5 \(float\) is not a selector",
    ),
    case("modes/class-not-instance", lambda w: nn.modes(Net), TypeError, CLASS),
    case("pinned/class-not-instance", lambda w: nn.pinned(Net), TypeError, CLASS),
    case(
        "modes/path-instead-of-model",
        lambda w: nn.modes(w.ckpt),
        TypeError,
        r"nn\.modes: model=.*net\.safetensors.* is a \w*Path, not a model",
    ),
    # -- inspection ---------------------------------------------------------------------------
    case(
        "summary/class-not-instance",
        lambda w: treenn.summary(Net),
        TypeError,
        r"treenn\.summary: " + CLASS,
    ),
    case(
        "summary/path-instead-of-model",
        lambda w: treenn.summary("model.safetensors"),
        TypeError,
        r"treenn\.summary: model='model\.safetensors' is a str",
    ),
    # -- transforms ---------------------------------------------------------------------------
    case(
        "combine/halves-of-other-models",
        lambda w: treenn.combine(treenn.trainable(w.net), treenn.partition(w.linear)[1]),
        ValueError,
        r"combine: structures differ; paths only in trainable: 'backbone\.layers\.0\.bias'",
    ),
    case(
        "combine/rest-missing",
        lambda w: treenn.combine(treenn.trainable(w.net), None),
        ValueError,
        r"combine: structures differ; paths only in trainable: 'backbone",
    ),
    case("partition/class-not-instance", lambda w: treenn.partition(Net), TypeError, CLASS),
    case("trainable/class-not-instance", lambda w: treenn.trainable(Net), TypeError, CLASS),
    case(
        "combine/halves-of-two-partitions",
        lambda w: treenn.combine(treenn.trainable(w.net), treenn.partition(w.frozen_head)[1]),
        ValueError,
        r"combine: both halves hold a value at 'head\.weight', 'head\.bias'",
    ),
    case(
        "partition/where-given",  # eqx.partition takes a filter; treenn's needs none
        lambda w: treenn.partition(w.net, eqx.is_array),  # type: ignore[call-arg]
        TypeError,
        r"too many positional arguments",
    ),
    case(
        "trainable/where-given",
        lambda w: treenn.trainable(w.net, "head"),  # type: ignore[call-arg]
        TypeError,
        r"too many positional arguments",
    ),
    case(
        "grad/non-scalar-output",
        lambda w: treenn.grad(lambda m, x: _eval(m)(x))(w.net, w.images),
        TypeError,
        r"scalar-output.*shape: \(6, 3\)",
    ),
    case(
        "grad/integer-output",
        lambda w: treenn.grad(lambda m: jnp.int32(1))(w.net),
        TypeError,
        r"grad requires real-valued outputs.*int32",
    ),
    case(
        "grad/has-aux-without-a-pair",
        lambda w: treenn.grad(lambda m: jnp.float32(0.0), has_aux=True)(w.net),
        TypeError,
        r"<lambda> was differentiated with has_aux=True, so it must return a pair "
        r"\(value, aux\); it returned ArrayImpl",
    ),
    case(
        "grad/not-a-function",
        lambda w: treenn.grad(w.ckpt),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("fn"),
    ),
    case(
        "value_and_grad/non-scalar-output",
        lambda w: treenn.value_and_grad(lambda m, x: _eval(m)(x).sum(0))(w.net, w.images),
        TypeError,
        r"scalar-output.*shape: \(3,\)",
    ),
    case(
        "value_and_grad/has-aux-without-a-pair",
        lambda w: treenn.value_and_grad(lambda m: (1.0, 2.0, 3.0), has_aux=True)(w.net),
        TypeError,
        r"must return a pair \(value, aux\); it returned tuple",
    ),
    case(
        "apply_updates/structure-of-another-model",
        lambda w: treenn.apply_updates(w.net, treenn.trainable(w.linear)),
        ValueError,
        r"apply_updates: updates do not match the model's trainable arrays; structures "
        r"differ; paths only in model: 'backbone\.layers\.0\.bias'.*paths only in updates: 'bias'",
    ),
    case(
        "apply_updates/updates-and-state-swapped",
        lambda w: treenn.apply_updates(w.net, (treenn.trainable(w.net), w.opt_state)),
        ValueError,
        r"apply_updates: updates do not match.*paths only in updates: '0\.backbone",
    ),
    case(
        "apply_updates/wrong-shape",
        lambda w: treenn.apply_updates(
            w.net, jax.tree.map(lambda a: a[None], treenn.trainable(w.net))
        ),
        ValueError,
        r"update for 'backbone\.layers\.0\.weight' has shape \(1, 4, 3, 3, 3\), the array "
        r"has shape \(4, 3, 3, 3\)",
    ),
    case(
        "jit/donate-unknown",
        lambda w: treenn.jit(lambda m: m, donate="yes"),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("donate"),
    ),
    case(
        "jit/unhashable-static-argument",
        lambda w: treenn.jit(lambda m, s: m)(w.net, {1, 2}),
        TypeError,
        r"treenn\.jit\(.*\): non-array argument leaves are static and must be hashable; "
        r"got unhashable set at args\[1\]: \{1, 2\}",
    ),
    case(
        "jit/not-a-function",
        lambda w: treenn.jit(3),  # type: ignore[call-overload]
        TypeError,
        PARAM.format("fn"),
    ),
    # -- state ---------------------------------------------------------------------------------
    case(
        "apply/missing-key-in-training-dropout",
        lambda w: treenn.apply(w.net, w.images),
        ValueError,
        _no_key("Dropout", 0.25),
    ),
    case(
        "apply/batchnorm-inside-inner-vmap",
        lambda w: treenn.apply(InVmap(nn.BatchNorm(3)), w.images),
        RuntimeError,
        r"nn\.BatchNorm\(3\) ran in training mode inside a JAX transform",
    ),
    case(
        "apply/model-not-callable",
        lambda w: treenn.apply(w.opt_state, w.images),
        TypeError,
        r"treenn\.apply: the model \(tuple\) is not callable",
    ),
    case("apply/class-not-instance", lambda w: treenn.apply(Net, w.images), TypeError, CLASS),
    # -- steps and optimiser states ----------------------------------------------------------
    case(
        "train_step/non-scalar-loss",
        lambda w: treenn.train_step(lambda m, x, k: m(x, key=k), optax.adam(1e-3))(
            w.net, _opt_state_of(w.net), w.images, w.key
        ),
        TypeError,
        r"scalar-output.*shape: \(6, 3\)",
    ),
    case(
        "train_step/missing-key-in-training-dropout",
        lambda w: treenn.train_step(_xent, optax.adam(1e-3))(
            w.net, _opt_state_of(w.net), w.images, w.labels, None
        ),
        ValueError,
        _no_key("Dropout", 0.25),
    ),
    # -- memory by selector ------------------------------------------------------------
    case(
        "quantize/selector-matches-nothing",
        lambda w: treenn.quantize(w.net, "nothing.**"),
        ValueError,
        r"where='nothing\.\*\*' matches no Linear or Embedding",
    ),
    case(
        "quantize/unknown-dtype",
        lambda w: treenn.quantize(w.net, "head", dtype="fp4"),
        ValueError,
        r"dtype='fp4' must be one of \('nf4', 'int8'\)",
    ),
    case(
        "dequantize/nothing-quantized",
        lambda w: treenn.dequantize(w.net),
        ValueError,
        r"the model has no quantized weight",
    ),
    case(
        "remat/selector-matches-nothing",
        lambda w: treenn.remat(w.net, "nothing"),
        ValueError,
        r"where='nothing' matches no callable module",
    ),
    case(
        "remat/policy-not-a-policy",
        lambda w: treenn.remat(w.net, "head", policy=True),
        TypeError,
        r"policy=True is not a checkpoint policy",
    ),
    case(
        "train_step/loss-drops-the-model-a-transform-updated",
        lambda w: treenn.train_step(
            lambda m, x, k: jnp.mean(eqx.filter_checkpoint(treenn.apply)(m, x, key=k)[0]),
            optax.adam(1e-3),
        )(w.net, _opt_state_of(w.net), w.images, w.key),
        RuntimeError,
        r"nn\.BatchNorm\(4\) at 'backbone\.layers\.1'.*loss did not return that model.*"
        r"has_aux=True",
    ),
    case(
        "train_step/opt-state-of-other-trainable-set",
        lambda w: treenn.train_step(_xent, optax.adam(1e-3))(
            w.frozen_head, w.opt_state, w.images, w.labels, w.key
        ),
        ValueError,
        r"train_step: opt_state does not fit the model's trainable arrays \(state only in "
        r"opt_state: '0\.mu\.head\.bias', '0\.mu\.head\.weight', '0\.nu\.head\.bias'",
    ),
    case(
        "train_step/not-an-optax-transform",
        lambda w: treenn.train_step(lambda m: 0.0, optax.adam),
        TypeError,
        r"train_step: tx=<function adam.*> is not an optax transform",
    ),
    case(
        "train_step/not-a-function",
        lambda w: treenn.train_step("loss", optax.sgd(0.1)),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("loss_fn"),
    ),
    case(
        "train_step/extra-args-transform-needs-an-unknown-argument",
        lambda w: _step_with(w, _needs_temperature()),
        TypeError,
        r"train_step: tx\.update needs 1 required keyword-only argument: 'temperature', and "
        r"it gets value= \(the loss\), grad= and value_fn=",
    ),
    case(
        "train_step/extra-args-transform-that-takes-none",
        lambda w: _step_with(w, _takes_no_extra()),
        TypeError,
        r"train_step: tx is an optax\.GradientTransformationExtraArgs.*must accept \*\*extra_args",
    ),
    case(
        "train_step/plain-transform-that-needs-the-loss",
        lambda w: _step_with(w, _plain_plateau()),
        TypeError,
        r"tx\.update needs 1 required keyword-only argument: 'value', and tx is a plain "
        r"optax\.GradientTransformation",
    ),
    case(
        "eval_step/input-of-wrong-shape",
        lambda w: treenn.eval_step(lambda m, x: m(x))(w.net, w.images[..., :2]),
        ValueError,
        r"nn\.Conv2d\(3, 4\) expects input of shape \(\*batch, height, width, 3\), got "
        r"shape \(6, 5, 5, 2\)",
    ),
    case(
        "eval_step/not-a-function",
        lambda w: treenn.eval_step(None),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("fn"),
    ),
    case(
        "migrate_opt_state/state-of-another-model",
        lambda w: treenn.migrate_opt_state(optax.adam(1e-3), _opt_state_of(w.linear), w.net),
        ValueError,
        r"migrate_opt_state: opt_state does not fit tx\.init\(treenn\.trainable\(model\)\); "
        r"state only in opt_state: '0\.mu\.bias'",
    ),
    case(
        "migrate_opt_state/state-of-another-transform",
        lambda w: treenn.migrate_opt_state(optax.sgd(0.1, momentum=0.9), w.opt_state, w.net),
        ValueError,
        r"migrate_opt_state: opt_state does not fit .*state only in opt_state: '0\.count'.*"
        r"state only in the new one: '0\.trace\.backbone",
    ),
    case(
        "migrate_opt_state/state-of-another-transform-with-the-same-arrays",
        lambda w: treenn.migrate_opt_state(optax.adabelief(1e-3), w.opt_state, w.net),
        ValueError,
        r"migrate_opt_state: opt_state does not fit .*the same state arrays, but other state "
        r"types \(another transform\)",
    ),
    case(
        "migrate_opt_state/state-not-kept-per-array",  # optax.flatten: one vector for all
        lambda w: treenn.migrate_opt_state(
            optax.flatten(optax.adam(1e-3)),
            optax.flatten(optax.adam(1e-3)).init(treenn.trainable(w.frozen_head)),
            w.net,
        ),
        ValueError,
        r"migrate_opt_state: opt_state holds float32\[\d+\] at '0\.mu', where "
        r"tx\.init\(treenn\.trainable\(model\)\) has float32\[\d+\].*optax\.flatten",
    ),
    case(
        "migrate_opt_state/not-an-optax-transform",
        lambda w: treenn.migrate_opt_state(optax.adam, w.opt_state, w.net),
        TypeError,
        r"migrate_opt_state: tx=<function adam.*> is not an optax transform",
    ),
    case(
        "migrate_opt_state/class-not-instance",
        lambda w: treenn.migrate_opt_state(optax.adam(1e-3), w.opt_state, Net),
        TypeError,
        CLASS,
    ),
    # -- filter_spec, statuses, clear_caches ---------------------------------------------------
    case("filter_spec/class-not-instance", lambda w: treenn.filter_spec(Net), TypeError, CLASS),
    case(
        "filter_spec/path-instead-of-model",
        lambda w: treenn.filter_spec("head.**"),
        TypeError,
        SWAPPED,
    ),
    case("statuses/class-not-instance", lambda w: treenn.statuses(Net), TypeError, CLASS),
    case(
        "statuses/path-instead-of-model",
        lambda w: treenn.statuses(str(w.ckpt)),
        TypeError,
        SWAPPED,
    ),
    case(
        "clear_caches/given-a-model",  # it empties every cache; it takes nothing
        lambda w: treenn.clear_caches(w.net),  # type: ignore[call-arg]
        TypeError,
        r"positional argument",
    ),
    # -- fine-tuning surgery and optimiser groups ----------------------------------------------
    case(
        "lora/class-not-instance",
        lambda w: treenn.lora(Net, "head", rank=2, key=w.key),
        TypeError,
        CLASS,
    ),
    case(
        "lora/arguments-swapped",
        lambda w: treenn.lora("head", w.net, rank=2, key=w.key),  # type: ignore[arg-type]
        TypeError,
        SWAPPED,
    ),
    case(
        "lora/selector-matches-nothing",
        lambda w: treenn.lora(w.net, "neck", rank=2, key=w.key),
        ValueError,
        r"where='neck' matches no layer that takes a LoRA adapter .*available: "
        r"'backbone\.layers\.0', 'backbone\.layers\.4', 'head'",
    ),
    case(
        "lora/selection-without-adaptable-layer",
        lambda w: treenn.lora(w.net, nn.BatchNorm, rank=2, key=w.key),
        ValueError,
        r"where=BatchNorm matches no layer that takes a LoRA adapter",
    ),
    case(
        "lora/zero-rank",
        lambda w: treenn.lora(w.net, "head", rank=0, key=w.key),
        ValueError,
        r"treenn\.lora: rank=0 must be an int >= 1",
    ),
    case(
        "lora/missing-key",
        lambda w: treenn.lora(w.net, "head", rank=2),  # type: ignore[call-arg]
        TypeError,
        r"'key'",
    ),
    case(
        "lora/adapter-twice",
        lambda w: treenn.lora(
            treenn.lora(w.net, "head", rank=2, key=w.key), "head", rank=2, key=w.key
        ),
        ValueError,
        r"treenn\.lora: 'head' already has a LoRA adapter .*treenn\.merge_lora",
    ),
    case("merge_lora/class-not-instance", lambda w: treenn.merge_lora(Net), TypeError, CLASS),
    case(
        "merge_lora/model-without-adapters",
        lambda w: treenn.merge_lora(w.net),
        ValueError,
        r"treenn\.merge_lora: the model has no LoRA adapter",
    ),
    case(
        "load_trainable/class-not-instance",
        lambda w: treenn.load_trainable(w.ckpt, Net),
        TypeError,
        CLASS,
    ),
    case(
        "load_trainable/arguments-swapped",
        lambda w: treenn.load_trainable(w.net, w.ckpt),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("path"),
    ),
    case(
        "load_trainable/file-does-not-exist",
        lambda w: treenn.load_trainable(w.folder / "missing.safetensors", w.net),
        FileNotFoundError,
        r"no checkpoint at '.*missing\.safetensors'",
    ),
    case(
        "labels/class-not-instance",
        lambda w: treenn.labels(Net, {"**": "all"}),
        TypeError,
        CLASS,
    ),
    case(
        "labels/arguments-swapped",
        lambda w: treenn.labels({"**": "all"}, w.net),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("rules"),
    ),
    case(
        "labels/rule-matches-nothing",
        lambda w: treenn.labels(w.net, {"neck.**": "neck", "**": "rest"}),
        ValueError,
        r"treenn\.labels: rule 'neck\.\*\*' matches no array of the model",
    ),
    case(
        "labels/trainable-array-unmatched",
        lambda w: treenn.labels(w.net, {"head.**": "head"}),
        ValueError,
        r"treenn\.labels: no rule matches trainable array\(s\) 'backbone\.layers\.0\.weight'",
    ),
    case(
        "labels/rule-shadowed",
        lambda w: treenn.labels(w.net, {"**": "all", "head.**": "head"}),
        ValueError,
        r"treenn\.labels: rule 'head\.\*\*' is never used: .*earlier rule \('\*\*'\)",
    ),
    case(
        "labels/label-not-a-string",
        lambda w: treenn.labels(w.net, {"**": 1}),  # type: ignore[dict-item]
        TypeError,
        PARAM.format("rules"),
    ),
    case(
        "labels/glob-syntax",
        lambda w: treenn.labels(w.net, {"head[0]": "head", "**": "rest"}),
        ValueError,
        GLOB.format(r"head\[0\]", "unsupported character"),
    ),
    case(
        "layer_decay/class-not-instance",
        lambda w: treenn.layer_decay(Net, 0.75),
        TypeError,
        CLASS,
    ),
    case(
        "layer_decay/model-outside-the-zoo",
        lambda w: treenn.layer_decay(w.net, 0.75),
        TypeError,
        r"treenn\.layer_decay: Net has no layer_groups\(\) method",
    ),
    case(
        "layer_decay/decay-out-of-range",
        lambda w: treenn.layer_decay(models.resnet18(3, width=4, key=w.key), 1.5),
        ValueError,
        r"treenn\.layer_decay: decay=1\.5 must be in \(0, 1\]",
    ),
    # -- checkpoints ---------------------------------------------------------------------------
    case(
        "save/folder-does-not-exist",
        lambda w: treenn.save(w.folder / "runs" / "m.safetensors", w.net),
        FileNotFoundError,
        r"cannot save to '.*runs/m\.safetensors': the folder '.*runs' does not exist",
    ),
    case(
        "save/onto-a-folder",
        lambda w: treenn.save(w.folder, w.net),
        IsADirectoryError,
        r"cannot save to '.*census\d*': it is a folder; name a file in it",
    ),
    case(
        "save/class-not-instance",
        lambda w: treenn.save(w.ckpt, Net),
        TypeError,
        r"treenn\.save: " + CLASS,
    ),
    case(
        "save/arguments-swapped",
        lambda w: treenn.save(w.net, w.ckpt),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("path"),
    ),
    case(
        "save/inside-jit",
        lambda w: jax.jit(lambda m: treenn.save(w.ckpt, m))(w.net),
        CheckpointError,
        r"cannot save 'backbone\.layers\.0\.weight': it is a traced value",
    ),
    case(
        "save/unsavable-dtype",
        lambda w: treenn.save(w.ckpt, {"net": w.net, "codes": jnp.zeros(4, jnp.int4)}),
        CheckpointError,
        r"cannot save 'codes': dtype int4 has no safetensors code",
    ),
    case(
        "save/two-arrays-one-path",
        lambda w: treenn.save(w.ckpt, {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}),
        CheckpointError,
        r"cannot save: two arrays share the path 'a\.b'",
    ),
    case(
        "load/non-existent-path",
        lambda w: treenn.load(w.folder / "nope.safetensors", w.net),
        FileNotFoundError,
        r"no checkpoint at '.*nope\.safetensors'",
    ),
    case(
        "load/a-folder",
        lambda w: treenn.load(w.folder, w.net),
        IsADirectoryError,
        r"census",
    ),
    *[
        case(
            f"load/{name}-file",
            lambda w, name=name: treenn.load(w.damaged[name], w.net),
            CheckpointError,
            rf"'.*{name}\.safetensors' is (truncated|corrupt)",
        )
        for name in (
            "truncated",
            "header-cut",
            "empty",
            "garbage",
            "huge-header",
            "bad-entry",
            "bad-metadata",
        )
    ],
    case(
        "load/checkpoint-of-another-model",
        lambda w: treenn.load(w.linear_ckpt, w.net),
        CheckpointError,
        r"checkpoint '.*linear\.safetensors' does not fit the model: missing from the file: "
        r"'backbone\.layers\.0\.bias'.*not in the model: 'bias', 'weight'",
    ),
    case(
        "load/shape-mismatch",
        lambda w: treenn.load(w.wide_ckpt, w.net),
        CheckpointError,
        r"wide\.safetensors' does not fit the model: shape/dtype/type mismatch: 'head\.bias': "
        r"file float32\[5\], model float32\[3\]; 'head\.weight': file float32\[5, 4\], model "
        r"float32\[3, 4\]",
    ),
    case(
        "load/dtype-mismatch",
        lambda w: treenn.load(w.half_ckpt, w.net),
        CheckpointError,
        r"'backbone\.layers\.0\.weight': file bfloat16\[4, 3, 3, 3\], model float32",
    ),
    case(
        "load/mode-bearing-modules-differ",
        lambda w: treenn.load(w.dropout_ckpt, nn.Sequential(w.linear, jax.nn.relu)),
        CheckpointError,
        r"does not fit the model's mode-bearing modules: in the file only: 'layers\.1'",
    ),
    case(
        "load/like-is-a-class",
        lambda w: treenn.load(w.ckpt, Net),
        TypeError,
        r"treenn\.load: like is the class Net, not a model",
    ),
    case(
        "load/arguments-swapped",
        lambda w: treenn.load(w.net, w.ckpt),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("path"),
    ),
    case(
        "load_pretrained/non-existent-path",
        lambda w: treenn.load_pretrained(w.folder / "pretrained.safetensors", w.net),
        FileNotFoundError,
        r"no checkpoint at '.*pretrained\.safetensors'",
    ),
    case(
        "load_pretrained/truncated-file",
        lambda w: treenn.load_pretrained(w.damaged["truncated"], w.net),
        CheckpointError,
        r"'.*truncated\.safetensors' is truncated",
    ),
    case(
        "load_pretrained/nothing-matches",
        lambda w: treenn.load_pretrained(w.linear_ckpt, w.net),
        CheckpointError,
        r"load_pretrained\('.*linear\.safetensors'\): no array of the file matches the model "
        r"by path, shape and dtype; file: 'bias', 'weight'; model: 'backbone",
    ),
    case(
        "load_pretrained/shape-mismatch",
        lambda w: treenn.load_pretrained(w.wide_ckpt, w.net),
        CheckpointError,
        r"shape/dtype mismatch \(pass skip_mismatched=True.*'head\.weight': file float32\[5, "
        r"4\], model float32\[3, 4\]",
    ),
    case(
        "load_pretrained/like-is-a-class",
        lambda w: treenn.load_pretrained(w.ckpt, Net),
        TypeError,
        r"treenn\.load_pretrained: like is the class Net",
    ),
    # -- PyTorch state dicts -----------------------------------------------------------------
    case(
        "load_torch/state-dict-of-another-model",
        lambda w: treenn.load_torch({"weight": np.ones((2, 2)), "bias": np.ones(2)}, w.net),
        CheckpointError,
        r"load_torch: the state dict does not fit the model.*\n.*missing from the state dict "
        r"\(10\): 'backbone\.layers\.0\.weight'(.|\n)*unexpected, not in the model \(2\): "
        r"'bias', 'weight'",
    ),
    case(
        "load_torch/mis-shaped-array",
        lambda w: treenn.load_torch(
            {"weight": np.ones((3, 2), np.float32), "bias": np.ones(2, np.float32)}, w.linear
        ),
        CheckpointError,
        r"mis-shaped \(1\): 'weight': state dict float32\[3, 2\], model float32\[2, 2\]",
    ),
    case(
        "load_torch/training-checkpoint-instead-of-state-dict",
        lambda w: treenn.load_torch({"model": {"weight": np.ones((2, 2))}, "epoch": 3}, w.linear),
        CheckpointError,
        r"the state dict is not a state dict of arrays: 'model' \(dict\), 'epoch' \(int\); "
        r"a training checkpoint\? pass its 'model' entry",
    ),
    case(
        "load_torch/non-existent-path",
        lambda w: treenn.load_torch(w.folder / "resnet.pth", w.net),
        FileNotFoundError,
        r"load_torch: no file at '.*resnet\.pth'",
    ),
    case(
        "load_torch/truncated-file",
        lambda w: treenn.load_torch(w.damaged["truncated"], w.net),
        CheckpointError,
        r"'.*truncated\.safetensors' is truncated",
    ),
    case(
        "load_torch/unknown-file-format",
        lambda w: treenn.load_torch(w.damaged["npz"], w.net),
        CheckpointError,
        r"load_torch: cannot tell the format of '.*npz\.npz' from its extension '\.npz'",
    ),
    case(
        "load_torch/arguments-swapped",
        lambda w: treenn.load_torch(w.net, w.ckpt),
        TypeError,
        r"like=PosixPath\('[^']*'\) is a PosixPath, not a model; check the order of the "
        r"arguments\. treenn\.load_torch takes the file first.*the order changed",
    ),
    case(
        "load_torch/arguments-swapped-state-dict",
        lambda w: treenn.load_torch(w.net, {"weight": np.ones((2, 2))}),
        TypeError,
        r"path is a Net, not a file or a state dict, and like is a dict: arguments swapped\? "
        r"treenn\.load_torch takes the file first",
    ),
    # -- treenn.load_hf / save_hf: Hugging Face transformers directories ----------------
    case(
        "load_hf/not-a-directory",
        lambda w: treenn.load_hf(w.folder / "nowhere"),
        FileNotFoundError,
        r"load_hf: '.*nowhere' is not a directory",
    ),
    case(
        "load_hf/no-config-json",
        lambda w: treenn.load_hf(w.folder),
        FileNotFoundError,
        r"load_hf: no config file at '.*config\.json'",
    ),
    case(
        "save_hf/not-a-transformers-model",
        lambda w: treenn.save_hf(w.folder / "hf", w.net),
        TypeError,
        r"save_hf: expected a transformers model of treenn\.models.*got a Net",
    ),
    case(
        "save_peft/no-adapters",
        lambda w: treenn.save_peft(w.folder / "peft", w.net),
        ValueError,
        r"save_peft: the model holds no LoRA adapter; adapt it with treenn\.lora first",
    ),
    case(
        "load_peft/no-adapter-config",
        lambda w: treenn.load_peft(w.folder, w.net),
        FileNotFoundError,
        r"load_peft: no config file at '.*adapter_config\.json'",
    ),
    # -- sharding ------------------------------------------------------------------------------
    case(
        "shard/class-not-instance",
        lambda w: treenn.shard(Net, jax.make_mesh((1,), ("data",))),
        TypeError,
        CLASS,
    ),
    case(
        "shard/not-a-mesh",
        lambda w: treenn.shard(w.net, "data"),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("mesh"),
    ),
    case(
        "shard/rule-matches-nothing",
        lambda w: treenn.shard(w.net, _mesh(), {"neck.**": P(), "**": P()}),
        ValueError,
        r"shard: rule 'neck\.\*\*' matches no array",
    ),
    case(
        "shard/rule-matches-nothing-in-an-optimiser-state",  # a typo: no array, no place
        lambda w: treenn.shard(w.opt_state, _mesh(), {"head.wieght": P(), "**": P()}),
        ValueError,
        r"shard: rule 'head\.wieght' matches no array \(nor the place of a frozen array or "
        r"buffer in an optimiser state\); arrays: '0\.count'",
    ),
    case(
        "shard/getter-fails-on-a-copy-in-an-optimiser-state",
        lambda w: treenn.shard(w.opt_state, _mesh(), {lambda m: m.neck: P(), "**": P()}),
        ValueError,
        r"where=<getter .*<lambda>> failed on the model \(AttributeError: .*'neck'",
    ),
    case(
        "shard/array-left-unmatched",
        lambda w: treenn.shard(w.net, _mesh(), {"head.**": P()}),
        ValueError,
        r"shard: no rule matches 'backbone\.layers\.0\.weight'",
    ),
    case(
        "shard/spec-not-a-partition-spec",
        lambda w: treenn.shard(w.net, _mesh(), {"**": "data"}),
        TypeError,
        r"shard: rule '\*\*' maps to 'data' \(str\), not a jax\.sharding\.PartitionSpec",
    ),
    case(
        "shard/axis-not-in-mesh",
        lambda w: treenn.shard(w.net, _mesh(), P("model")),
        ValueError,
        r"uses mesh axis 'model', which the mesh does not have; its axes are 'data'",
    ),
    case(
        "shard/spec-longer-than-array",
        lambda w: treenn.shard(w.net, _mesh(), {"head.bias": P(None, "data"), "**": P()}),
        ValueError,
        r"'head\.bias' has shape \(3,\) \(rank 1\), but rule 'head\.bias' gives",
    ),
    case(
        "shard/glob-syntax",
        lambda w: treenn.shard(w.net, _mesh(), {"head[0]": P(), "**": P()}),
        ValueError,
        GLOB.format(r"head\[0\]", "unsupported character"),
    ),
    # -- Module and typechecked -----------------------------------------------------------------
    case(
        "Module/assigning-a-field",
        _set_head,
        dataclasses.FrozenInstanceError,
        r"cannot assign to field 'head'",
    ),
    case(
        "typechecked/not-a-function",
        lambda w: treenn.typechecked(3),  # type: ignore[type-var]
        TypeError,
        PARAM.format("fn"),
    ),
    case(
        "typechecked/argument-of-wrong-shape",
        lambda w: _rowsum(jnp.ones((2, 3)), jnp.ones(3)),
        TypeError,
        PARAM.format("y") + r"(.|\n)*batch=2",
    ),
    # -- treenn.nn layers: construction and calls --------------------------------------------
    case(
        "Linear/negative-size",
        lambda w: nn.Linear(-1, 2, key=w.key),
        ValueError,
        r"nn\.Linear\(-1, 2\): sizes must be >= 0",
    ),
    case(
        "Linear/size-of-wrong-type",
        lambda w: nn.Linear("5", 2, key=w.key),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("in_features"),
    ),
    case(
        "Linear/missing-key",
        lambda w: nn.Linear(5, 2),  # type: ignore[call-arg]
        TypeError,
        r"'key'",
    ),
    case(
        "Linear/input-of-wrong-shape",
        lambda w: nn.Linear(5, 2, key=w.key)(jnp.ones((2, 4))),
        ValueError,
        r"nn\.Linear\(5, 2\) expects input of shape \(\*batch, in_features\) = \(\*batch, 5\), "
        r"got shape \(2, 4\)",
    ),
    case(
        "Linear/integer-input",
        lambda w: nn.Linear(5, 2, key=w.key)(jnp.ones(X, jnp.int32)),
        TypeError,
        PARAM.format("x") + r"(.|\n)*i32\[2,5\]",
    ),
    case(
        "Identity/missing-input",
        lambda w: nn.Identity()(),  # type: ignore[call-arg]
        TypeError,
        r"'x'",
    ),
    case(
        "MLP/negative-size",
        lambda w: nn.MLP(5, -8, 2, key=w.key),
        ValueError,
        r"nn\.MLP.*hidden_features=-8 must be >= 0",
    ),
    case(
        "MLP/activation-not-callable",
        lambda w: nn.MLP(5, 8, 2, act=3, key=w.key),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("act"),
    ),
    case(
        "MLP/missing-key-in-training-dropout",
        lambda w: nn.MLP(5, 8, 2, drop=0.5, key=w.key)(jnp.ones(X)),
        ValueError,
        _no_key("Dropout", 0.5),
    ),
    case(
        "MLP/input-of-wrong-shape",
        lambda w: nn.MLP(5, 8, 2, key=w.key)(jnp.ones((2, 3))),
        ValueError,
        r"nn\.Linear\(5, 8\) expects input of shape .*got shape \(2, 3\)",
    ),
    case(
        "gelu/not-an-array",
        lambda w: nn.gelu([1.0, 2.0]),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("x"),
    ),
    case(
        "Embedding/no-rows",
        lambda w: nn.Embedding(0, 2, key=w.key),
        ValueError,
        r"nn\.Embedding\(0, 2\): num_embeddings=0 must be >= 1",
    ),
    case(
        "Embedding/padding-index-out-of-range",
        lambda w: nn.Embedding(4, 2, padding_idx=7, key=w.key),
        ValueError,
        r"padding_idx=7 must be within \[-4, 4\)",
    ),
    case(
        "Embedding/float-ids",
        lambda w: nn.Embedding(4, 2, key=w.key)(jnp.ones(2)),
        TypeError,
        PARAM.format("ids") + r"(.|\n)*f32\[2\]",
    ),
    *[
        case(
            f"{layer.__name__}/input-channels-wrong",
            lambda w, layer=layer, n=n: layer(3, 4, 3, key=w.key)(jnp.ones((1,) + (4,) * n + (2,))),
            ValueError,
            rf"nn\.{layer.__name__}\(3, 4\) expects input of shape .*, 3\), got shape \(1, "
            + ", ".join(["4"] * n)
            + r", 2\)",
        )
        for layer, n in [
            (nn.Conv1d, 1),
            (nn.Conv2d, 2),
            (nn.Conv3d, 3),
            (nn.ConvTranspose1d, 1),
            (nn.ConvTranspose2d, 2),
            (nn.ConvTranspose3d, 3),
        ]
    ],
    *[
        case(
            f"{layer.__name__}/groups-do-not-divide",
            lambda w, layer=layer: layer(3, 4, 3, groups=2, key=w.key),
            ValueError,
            rf"nn\.{layer.__name__}\(3, 4, groups=2\).*divisible by groups",
        )
        for layer in (nn.Conv2d, nn.ConvTranspose1d)
    ],
    case(
        "Conv2d/unknown-padding",
        lambda w: nn.Conv2d(3, 4, 3, padding="FULL", key=w.key),  # type: ignore[arg-type]
        ValueError,
        r"nn\.Conv2d: padding='FULL': expected 'SAME', 'VALID', an int or a tuple",
    ),
    case(
        "Conv3d/zero-stride",
        lambda w: nn.Conv3d(3, 4, 3, stride=0, key=w.key),
        ValueError,
        r"nn\.Conv3d: stride=0: expected a positive int or 3 positive ints",
    ),
    case(
        "Conv1d/kernel-of-wrong-length",
        lambda w: nn.Conv1d(3, 4, (3, 3), key=w.key),
        ValueError,
        r"nn\.Conv1d: kernel_size=\(3, 3\): expected a positive int or 1 positive ints",
    ),
    *[
        case(
            f"{layer.__name__}/input-too-small",
            lambda w, layer=layer, n=n: layer(3)(jnp.ones((1,) + (2,) * n + (1,))),
            ValueError,
            rf"nn\.{layer.__name__}\(kernel_size=.*input of shape \(1, "
            + ", ".join(["2"] * n)
            + r", 1\) is too small",
        )
        for layer, n in [
            (nn.MaxPool1d, 1),
            (nn.MaxPool2d, 2),
            (nn.MaxPool3d, 3),
            (nn.AvgPool1d, 1),
            (nn.AvgPool2d, 2),
            (nn.AvgPool3d, 3),
        ]
    ],
    case(
        "AvgPool2d/zero-stride",
        lambda w: nn.AvgPool2d(3, stride=0),
        ValueError,
        r"nn\.AvgPool2d: stride=0: expected a positive int or 2 positive ints",
    ),
    case(
        "MaxPool2d/input-without-spatial-axes",
        lambda w: nn.MaxPool2d(2)(jnp.ones(4)),
        TypeError,
        PARAM.format("x") + r"(.|\n)*f32\[4\]",
    ),
    *[
        case(
            f"{layer.__name__}/output-size-of-wrong-length",
            lambda w, layer=layer, n=n: layer((2,) * (n + 1)),
            ValueError,
            rf"nn\.{layer.__name__}: output_size=\({'2, ' * n}2\): expected a positive int or "
            rf"{n} positive ints",
        )
        for layer, n in [
            (nn.AdaptiveAvgPool1d, 1),
            (nn.AdaptiveAvgPool2d, 2),
            (nn.AdaptiveAvgPool3d, 3),
        ]
    ],
    case(
        "AdaptiveAvgPool2d/empty-axis",
        lambda w: nn.AdaptiveAvgPool2d(2)(jnp.ones((1, 0, 3, 2))),
        ValueError,
        r"nn\.AdaptiveAvgPool2d\(\(2, 2\)\): cannot pool an empty axis, got shape \(1, 0, 3, 2\)",
    ),
    case(
        "GlobalAvgPool/no-spatial-dims",
        lambda w: nn.GlobalAvgPool(0),
        ValueError,
        r"nn\.GlobalAvgPool: num_spatial_dims=0: expected a positive int",
    ),
    case(
        "GlobalAvgPool/input-of-too-few-axes",
        lambda w: nn.GlobalAvgPool(2)(jnp.ones((3, 4))),
        ValueError,
        r"nn\.GlobalAvgPool\(num_spatial_dims=2\) expects .*at least 3 axes, got shape \(3, 4\)",
    ),
    case(
        "BatchNorm/no-features",
        lambda w: nn.BatchNorm(0),
        ValueError,
        r"nn\.BatchNorm\(0\): num_features must be >= 1",
    ),
    case(
        "BatchNorm/momentum-out-of-range",
        lambda w: nn.BatchNorm(3, momentum=2.0),
        ValueError,
        r"nn\.BatchNorm\(momentum=2\.0\): must be in \[0, 1\]",
    ),
    case(
        "BatchNorm/input-of-wrong-shape",
        lambda w: treenn.apply(nn.BatchNorm(3), jnp.ones((2, 4))),
        ValueError,
        r"nn\.BatchNorm\(3\) expects input of shape \(\*batch, num_features\) = \(\*batch, 3\), "
        r"got shape \(2, 4\)",
    ),
    case(
        "BatchNorm/training-outside-apply",
        lambda w: nn.BatchNorm(3)(jnp.ones((2, 3))),
        RuntimeError,
        r"nn\.BatchNorm\(3\) ran in training mode outside `treenn\.apply`",
    ),
    case(
        "LayerNorm/negative-eps",
        lambda w: nn.LayerNorm(3, eps=-1.0),
        ValueError,
        r"nn\.LayerNorm\(3\): eps=-1\.0 must be >= 0",
    ),
    case(
        "LayerNorm/input-of-wrong-shape",
        lambda w: nn.LayerNorm(3)(jnp.ones((2, 4))),
        ValueError,
        r"nn\.LayerNorm\(\(3,\)\) expects input of shape \(\*batch, 3\).*got shape \(2, 4\)",
    ),
    case(
        "GroupNorm/groups-do-not-divide",
        lambda w: nn.GroupNorm(3, 4),
        ValueError,
        r"nn\.GroupNorm\(3, 4\): num_channels=4 must be divisible by num_groups=3",
    ),
    case(
        "GroupNorm/input-of-wrong-shape",
        lambda w: nn.GroupNorm(2, 4)(jnp.ones((2, 3))),
        ValueError,
        r"nn\.GroupNorm\(2, 4\).*got shape \(2, 3\)",
    ),
    case(
        "RMSNorm/input-of-wrong-shape",
        lambda w: nn.RMSNorm(3)(jnp.ones((2, 4))),
        ValueError,
        r"nn\.RMSNorm\(\(3,\)\) expects input of shape \(\*batch, 3\).*got shape \(2, 4\)",
    ),
    case(
        "Dropout/p-out-of-range",
        lambda w: nn.Dropout(1.5),
        ValueError,
        r"nn\.Dropout\(p=1\.5\): p must be in \[0, 1\]",
    ),
    case(
        "Dropout/missing-key-in-training-mode",
        lambda w: nn.Dropout(0.5)(jnp.ones(X)),
        ValueError,
        _no_key("Dropout", 0.5),
    ),
    case(
        "DropPath/p-out-of-range",
        lambda w: nn.DropPath(-0.1),
        ValueError,
        r"nn\.DropPath\(p=-0\.1\): p must be in \[0, 1\]",
    ),
    case(
        "DropPath/missing-key-in-training-mode",
        lambda w: nn.DropPath(0.5)(jnp.ones(X)),
        ValueError,
        _no_key("DropPath", 0.5),
    ),
    case(
        "DropPath/input-without-sample-axis",
        lambda w: nn.DropPath(0.5)(jnp.float32(1.0), key=w.key),
        TypeError,
        PARAM.format("x") + r"(.|\n)*f32\[\]",
    ),
    case(
        "MultiheadAttention/heads-do-not-divide",
        lambda w: nn.MultiheadAttention(6, 4, key=w.key),
        ValueError,
        r"nn\.MultiheadAttention\(6, 4\): embed_dim=6 must be divisible by num_heads=4",
    ),
    case(
        "MultiheadAttention/query-of-wrong-shape",
        lambda w: nn.MultiheadAttention(8, 2, key=w.key)(
            jnp.ones((2, 3, 7)), jnp.ones((2, 3, 8)), jnp.ones((2, 3, 8))
        ),
        ValueError,
        r"nn\.MultiheadAttention\(8, 2\) expects query of shape .*got shape \(2, 3, 7\)",
    ),
    case(
        "MultiheadAttention/missing-key-in-training-dropout",
        lambda w: nn.MultiheadAttention(8, 2, dropout=0.1, key=w.key)(
            jnp.ones((2, 3, 8)), jnp.ones((2, 3, 8)), jnp.ones((2, 3, 8))
        ),
        ValueError,
        r"nn\.MultiheadAttention\(8, 2\): attention dropout .*needs `key=`",
    ),
    case(
        "Attention/heads-do-not-divide",
        lambda w: nn.Attention(8, 3, key=w.key),
        ValueError,
        r"nn\.Attention\(8, num_heads=3\): dim=8 must be divisible by num_heads=3",
    ),
    case(
        "Attention/input-of-wrong-shape",
        lambda w: nn.Attention(8, 2, key=w.key)(jnp.ones((2, 3, 7))),
        ValueError,
        r"nn\.Attention\(8, num_heads=2\) expects input of shape .*got shape \(2, 3, 7\)",
    ),
    case(
        "Attention/missing-key-in-training-dropout",
        lambda w: nn.Attention(8, 2, proj_drop=0.1, key=w.key)(jnp.ones((2, 3, 8))),
        ValueError,
        r"nn\.Attention\(8, num_heads=2\): .*needs `key=`",
    ),
    case(
        "Sequential/layer-not-callable",
        lambda w: nn.Sequential(w.linear, 3),
        TypeError,
        r"nn\.Sequential: layer 1 is not callable: 3",
    ),
    case(
        "Lambda/not-a-function",
        lambda w: nn.Lambda(3),  # type: ignore[arg-type]
        TypeError,
        PARAM.format("fn"),
    ),
    # -- the model zoo ------------------------------------------------------------------------
    case(
        "resnet18/unknown-option",
        lambda w: models.resnet18(10, colour=True, key=w.key),
        TypeError,
        r"'colour'",
    ),
    case(
        "resnet34/zero-width",
        lambda w: models.resnet34(10, width=0, key=w.key),
        ValueError,
        r"channel counts must be positive",
    ),
    case(
        "resnet50/no-input-channels",
        lambda w: models.resnet50(10, in_channels=0, key=w.key),
        ValueError,
        r"in_channels=0.*channel counts must be positive",
    ),
    case(
        "ResNet/wrong-number-of-stages",
        lambda w: models.ResNet(models.BasicBlock, (2, 2), key=w.key),
        ValueError,
        r"ResNet\(layers=\(2, 2\)\): expected four positive counts",
    ),
    case(
        "vit_small/image-not-divisible-into-patches",
        lambda w: models.vit_small(10, img_size=30, patch_size=16, key=w.key),
        ValueError,
        r"img_size=30 is not divisible by patch_size=16",
    ),
    case(
        "vit_tiny/image-of-another-size",
        lambda w: models.vit_tiny(3, img_size=4, patch_size=4, depth=1, key=w.key)(
            jnp.ones((1, 8, 8, 3))
        ),
        ValueError,
        r"VisionTransformer: the image gives 4 patches, the model was built for 1",
    ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_misuse_names_its_cause_and_changes_nothing(
    world: World, call: Row, error: type[BaseException], match: str
) -> None:
    with optax_promotion(), pytest.raises(error, match=match):
        call(world)
    assert fingerprint(world) == world.baseline


def test_fingerprint_sees_every_kind_of_change(world: World) -> None:
    """The "nothing changed" check is not vacuous: bits, statuses, modes, pins and
    files each show in it."""
    before = world.baseline
    assert fingerprint(world) == before
    changes = [
        eqx.tree_at(lambda m: m.head.bias, world.net, world.net.head.bias.at[0].add(1e-7)),
        treenn.freeze(world.net, "head.bias"),
        nn.eval_mode(world.net, nn.Dropout),
        nn.eval_mode(world.net, nn.Dropout, pin=True),
    ]
    assert nn.modes(changes[2]) == nn.modes(changes[3])  # only the pin differs
    for changed in changes:
        assert fingerprint(dataclasses.replace(world, net=changed)) != before
    stray = world.folder / ".net.safetensors.x.tmp"
    stray.write_bytes(b"")
    try:
        assert fingerprint(world) != before
    finally:
        stray.unlink()
    assert fingerprint(world) == before


# -- every public name has a row --------------------------------------------------------

# Public names that are not functions to misuse: an exception, result records (`Labels`
# comes from `treenn.labels`), a type alias, and the subpackages (whose names are covered
# one by one).
NOT_CALLED = {"CheckpointError", "LoadReport", "Labels", "Where", "models", "nn"}


def _public(module: Any) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


@pytest.mark.parametrize("module", [treenn, nn], ids=["treenn", "treenn.nn"])
def test_census_covers_every_public_name(module: Any) -> None:
    covered = {param.id.split("/")[0] for param in CASES}
    names = _public(module) - NOT_CALLED
    assert names - covered == set()
    assert all(callable(getattr(module, name)) for name in names)
